"""The instrument protocol: an instrument written here, outside tfmbgd, is computed, written,
charted and checkpointed like the built-in ones; each built-in says what it writes."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from conftest import make_problem, oracle_per_example, read_scalars
from tfmbgd import data, instruments, losses, models
from tfmbgd.config import TrainConfig
from tfmbgd.errors import UserError
from tfmbgd.loop import steps, training
from tfmbgd.loop.rundir import resume_config
from tfmbgd.loop.update import make_update


class SquaredNormSum(instruments.Instrument):
    """Counts its statistics steps (state) and logs S2 = sum_n ||g_n||^2 from the elementwise
    sums, so turning it on must make the step compute them."""

    name = "test_squared_norm_sum"
    needs = frozenset({instruments.ELEMENTWISE})

    def build(self, variables):
        self.count = tf.Variable(0.0, trainable=False)

    def state(self):
        return {"count": self.count}

    def tags(self, names):
        return {"test/count": "statistics steps so far", "test/s2": "sum_n ||g_n||^2"}

    def charts(self, names):
        return [instruments.Chart("Test instruments", "count and S2", ("^test/count$", "^test/s2$"))]

    def compute(self, measurement):
        s2 = tf.add_n([tf.reduce_sum(s) for s in measurement.moments.sum_sq])
        return {"test/count": self.count.assign_add(1.0), "test/s2": s2}


instruments.register(SquaredNormSum)


def _layout(event_dir):
    acc = event_accumulator.EventAccumulator(str(event_dir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(tf.make_ndarray(event.tensor_proto).item())


def test_an_instrument_defined_here_is_written_charted_and_resumed(tmp_path):
    common = dict(dataset="linear", model="linear", batch_size=16, stats_every=3, log_every=50,
                  checkpoint_every=0, instruments=(SquaredNormSum.name,), deterministic=True)
    whole = training.train(TrainConfig(**common, epochs=2, logdir=str(tmp_path / "whole")), verbose=0)
    half = training.train(TrainConfig(**common, epochs=1, logdir=str(tmp_path / "half")), verbose=0)
    resumed = training.train(resume_config(half.run_dir, {"epochs": 2}), verbose=0)
    full, again = read_scalars(f"{whole.run_dir}/train"), read_scalars(f"{resumed.run_dir}/train")
    stats_steps = [s for s, _ in full["grad/norm"]]
    # The state was restored: the count goes on from the first half's, as in the whole run.
    assert full["test/count"] == [(s, float(k + 1)) for k, s in enumerate(stats_steps)]
    assert again["test/count"] == full["test/count"]
    # S2 is the sum over examples of the squared per-example norms: the histogram's support.
    assert [s for s, _ in full["test/s2"]] == stats_steps
    categories = _layout(f"{whole.run_dir}/train").category
    charts = [(c.title, [chart.title for chart in c.chart]) for c in categories]
    assert ("Test instruments", ["count and S2"]) in charts


def test_the_instruments_needs_are_what_the_step_computes(problem):
    model, loss_fn, x, y = make_problem(problem)
    x, y = tf.constant(x), tf.constant(y)
    plain = steps.measure(model, loss_fn, x, y, needs=instruments.Panel(instruments.default()).needs)
    assert plain.moments.sum_sq is None          # nothing asked for the elementwise tier
    active = instruments.Panel(instruments.default() + [SquaredNormSum()]).build(model.trainable_variables)
    measured = steps.measure(model, loss_fn, x, y, needs=active.needs)
    values = active.compute(steps.measurement(measured, model.trainable_variables, step=None))
    oracle = oracle_per_example(model, loss_fn, x, y)
    s2 = sum(np.sum(g ** 2) for g in oracle)
    np.testing.assert_allclose(float(values["test/s2"]), s2, rtol=1e-5)
    assert float(values["test/count"]) == 1.0


def test_every_built_in_writes_only_the_tags_it_declares(problem):
    model, loss_fn, x, y = make_problem(problem)
    names = [v.path for v in model.trainable_variables]
    for cls in instruments.BUILT_IN:
        instrument = cls.for_run(learning_rate=0.1, optimizer="sgd")
        panel = instruments.Panel([instrument]).build(model.trainable_variables)
        x, y = tf.constant(x), tf.constant(y)
        measured = steps.measure(model, loss_fn, x, y, needs=instrument.needs)
        before = steps.snapshot(model.trainable_variables, instrument.needs)     # PARAMETERS only
        values = panel.compute(steps.measurement(measured, model.trainable_variables, before=before,
                                                 batch=(model, loss_fn, x, y), step=tf.constant(0, tf.int64)),
                               before_update=instrument.before_update)
        assert set(values) <= set(instrument.tags(names)), cls.name
        if cls is not instruments.TwoBatchNoiseScale:       # that one needs replicas
            assert values, cls.name
        assert all(tag in instrument.tags(names) for tag in instrument.lags), cls.name


def test_registry_and_configuration_errors_are_one_line():
    with pytest.raises(UserError, match="unknown instrument 'nope'; presets: economy, business, full; "
                                        "registered: .*test_squared_norm_sum"):
        instruments.create(["nope"])

    class Other(SquaredNormSum):
        pass
    with pytest.raises(UserError, match="registered already"):
        instruments.register(Other)
    with pytest.raises(UserError, match="on twice"):
        instruments.Panel([SquaredNormSum(), SquaredNormSum()]).build([])
    with pytest.raises(UserError, match="instruments has repeats"):
        TrainConfig(instruments=("a", "a"))
    assert dataclasses.replace(TrainConfig(), instruments=("a",)).instruments == ("a",)


def test_a_runs_first_statistics_are_numpys_on_its_first_batch(tmp_path):
    # Every scalar tag of the README's table, read back from a run's event files, against
    # numpy on the non-vectorized jacobian of the batch that step 0 drew (from the same seed).
    config = TrainConfig(dataset="linear", model="mlp", hidden=(4,), batch_size=16, epochs=1,
                         stats_every=1, log_every=1, elementwise_stats=True, logdir=str(tmp_path))
    result = training.train(config, verbose=0)
    written = {tag: dict(points)[0] for tag, points in read_scalars(f"{result.run_dir}/train").items()
               if points[0][0] == 0}
    ds = data.load("linear", 0)
    first = np.random.default_rng(0).permutation(len(ds.train[0]))[:16]
    model = models.build("mlp", ds.input_shape, ds.num_classes, (4,), seed=0)
    loss_fn = losses.per_example(losses.for_task(ds.num_classes))
    per_example = oracle_per_example(model, loss_fn, tf.constant(ds.train[0][first]),
                                     tf.constant(ds.train[1][first]))
    expected = {"batch_size": 16.0}
    flat = [g.reshape(16, -1) for g in per_example]
    for v, g in zip(model.trainable_variables, flat):
        expected[f"grad/norm/{v.path}"] = np.linalg.norm(g.mean(0))
        expected[f"grad_var/{v.path}"] = g.var(0, ddof=1).sum()
        expected[f"grad_var/of_mean/{v.path}"] = g.var(0, ddof=1).sum() / 16
    every = np.concatenate(flat, axis=1)
    mean, var = every.mean(0), every.var(0, ddof=1)
    trace = var.sum()
    expected.update({"grad/norm": np.linalg.norm(mean), "grad_var/trace": trace,
                     "grad_var/of_mean": trace / 16,
                     "grad_snr/mean_gsnr": np.mean(mean[var > 0] ** 2 / var[var > 0]),
                     # The EMAs start at 0: after one step the ratio is that step's own.
                     "noise_scale/simple": trace / (mean @ mean - trace / 16)})
    assert expected["noise_scale/simple"] > 0
    for tag, value in expected.items():
        assert written[tag] == pytest.approx(value, rel=1e-4), tag


def test_update_size_and_distance_by_hand_on_a_one_weight_quadratic():
    # y_pred = w x, l_n = (w x_n)^2 with x = (1, 2): the mean loss's gradient is 5 w. Plain
    # SGD at lr 0.1 halves w: 2 -> 1 -> 0.5. Update sizes |w_t+1 - w_t|: 1, 0.5; distances
    # |w_t - w_0| at the start of each step: 0, 1.
    from tfmbgd.instruments import Distance, UpdateSize
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign([[2.0]])
    apply = make_update("manual", model.trainable_variables, 0.1)
    run = steps.Steps(model, losses.per_example("mse"), apply, classification=False,
                          instruments=[UpdateSize(), Distance()])
    x, y = tf.constant([[1.0], [2.0]]), tf.constant([[0.0], [0.0]])
    first, second = run.with_stats(x, y), run.with_stats(x, y)
    assert float(model.layers[0].kernel[0, 0]) == pytest.approx(0.5)
    assert float(first["step/update_size"]) == pytest.approx(1.0)
    assert float(second["step/update_size"]) == pytest.approx(0.5)
    assert float(first["step/distance"]) == 0.0 and float(second["step/distance"]) == pytest.approx(1.0)
    assert float(second["step/update_size/" + model.layers[0].kernel.path]) == pytest.approx(0.5)


def test_update_size_in_fit_is_the_sgd_step_and_distance_starts_at_zero(tmp_path):
    # Plain SGD: the update is lr * mean gradient, so its norm is lr * grad/norm (another
    # instrument, tested against the loop) at every statistics step.
    from tfmbgd import callbacks, fit, optimizers
    from tfmbgd.instruments import Distance, UpdateSize
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    statistics = callbacks.GradientStatistics(str(tmp_path), freq=3,
                                              more_instruments=[UpdateSize(), Distance()])
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[statistics])
    written = read_scalars(tmp_path / "train")
    assert [s for s, _ in written["step/update_size"]] == [0, 3, 6]
    for (_, size), (_, norm) in zip(written["step/update_size"], written["grad/norm"]):
        assert size == pytest.approx(0.1 * norm, rel=1e-4)
    distances = [v for _, v in written["step/distance"]]
    assert distances[0] == 0.0 and 0 < distances[1] < distances[2]


def test_cabs_and_eb_match_cockpits_formulas_in_numpy(problem):
    # Cockpit 1.0.2 from BackPACK's 1/B-scaled per-example gradients g_n / B:
    # sgs = B^2 sum (g_n/B)^2; CABS = lr sum(sgs - B grad^2) / (B L);
    # EB = 1 - B mean(grad^2 / ((sgs - B grad^2) / (B - 1) + 1e-5)).
    from tfmbgd.instruments import CABS, EarlyStopping
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    b, lr = len(x), 0.3
    grad = np.concatenate([o.mean(axis=0).ravel() for o in oracle])
    sgs = b ** 2 * np.concatenate([((o / b) ** 2).sum(axis=0).ravel() for o in oracle])
    loss = float(np.mean(loss_fn(y, model(x)).numpy()))
    want_cabs = lr * np.sum(sgs - b * grad ** 2) / (b * loss)
    want_eb = 1 - b * np.mean(grad ** 2 / ((sgs - b * grad ** 2) / (b - 1) + 1e-5))
    active = instruments.Panel([CABS(lr), EarlyStopping()]).build(model.trainable_variables)
    measured = steps.measure(model, loss_fn, x, y, needs=active.needs)
    values = active.compute(steps.measurement(measured, model.trainable_variables, step=None))
    assert float(values["batch_size/cabs"]) == pytest.approx(want_cabs, rel=1e-4)
    assert float(values["early_stopping/eb"]) == pytest.approx(want_eb, rel=1e-3)   # as GSNR's


def test_sgd_only_instruments_refuse_other_optimizers(tmp_path):
    from tfmbgd import callbacks, fit, optimizers
    from tfmbgd.instruments import CABS
    with pytest.raises(UserError, match="instrument cabs is defined for plain SGD only.*--optimizer=adam"):
        training.run_panel(TrainConfig(instruments=("cabs",), optimizer="adam"))
    assert [i.learning_rate for i in training.run_panel(
        TrainConfig(instruments=("cabs",), learning_rate=0.05)) if i.name == "cabs"] == [0.05]
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = np.zeros((8, 6), np.float32), np.zeros(8, np.int32)
    cabs = callbacks.GradientStatistics(str(tmp_path), more_instruments=[CABS(0.01)])
    with pytest.raises(UserError, match="the run has Adam"):
        model.fit(x, y, verbose=0, callbacks=[cabs])


def test_norm_test_matches_cockpits_formula_and_is_the_noise_scale_over_b(problem):
    # Cockpit 1.0.2: sqrt((B * sum_n |g_n / B|^2 - |grad|^2) / ((B - 1) |grad|^2)), from
    # BackPACK's 1/B-scaled per-example gradients.
    from tfmbgd.instruments import NormTest
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    b = len(x)
    grad_sq = sum(np.sum(o.mean(axis=0) ** 2) for o in oracle)
    batch_l2 = sum(np.sum((o / b) ** 2) for o in oracle)
    want = np.sqrt((b * batch_l2 - grad_sq) / ((b - 1) * grad_sq))
    active = instruments.Panel([NormTest()] + instruments.default()).build(model.trainable_variables)
    values = active.compute(steps.measurement(steps.measure(model, loss_fn, x, y), model.trainable_variables,
                                              step=None))
    norm = float(values["grad_test/norm"])
    assert norm == pytest.approx(want, rel=1e-4)
    # norm^2 = B_simple / B with B_simple = tr(Sigma) / |mean|^2, from the variance and norm tags
    b_simple = float(values["grad_var/trace"]) / float(values["grad/norm"]) ** 2
    assert norm ** 2 == pytest.approx(b_simple / b, rel=1e-4)
