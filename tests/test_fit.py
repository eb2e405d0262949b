"""Gradient statistics inside model.fit: equal to the custom loop's, for every kind of model."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_histograms, read_scalars
from tfmbgd import callbacks as tfmbgd_callbacks
from tfmbgd import fit, losses, models, optimizers, stats
from tfmbgd.engine import gradients
from tfmbgd.engine.moments import gradient_moments
from tfmbgd.errors import UserError

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 0.5).astype(np.int32)


@pytest.mark.parametrize("jit_compile,steps_per_execution,fused",
                         [(False, 1, False), (True, 1, False), (True, 8, True), (False, 3, True)],
                         ids=["plain", "xla", "xla spe=8 fused", "spe=3 fused"])
def test_fit_statistics_equal_the_custom_loops(tmp_path, xla_allowed, jit_compile, steps_per_execution, fused,
                                               monkeypatch):
    # statistics every 3 steps, in executions of 1, 3 or 8 steps (8: two or three statistics
    # steps inside one compiled call, all of them written); "fused": GSNR's sums over the
    # parameters XLA-compiled as for a large model (variance.FUSE_FROM lowered to 0), inside
    # fit's XLA-compiled step and inside its plain graph
    from tfmbgd.instruments import variance
    monkeypatch.setattr(variance, "FUSE_FROM", 0 if fused else variance.FUSE_FROM)
    x, y = _data()
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE, jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    assert model.jit_compile is jit_compile
    statistics = tfmbgd_callbacks.GradientStatistics(str(tmp_path / "fit"), freq=3, elementwise=True)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[statistics])   # 8 steps
    written = read_scalars(tmp_path / "fit" / "train")

    # The oracle: a loop written out here, with the single-example loop's moments, the
    # statistics as pure functions of them and SGD by hand; nothing of fit's or Steps' code.
    twin = models.build("mlp", (6,), 3, hidden=(8,), seed=5)
    paths = [v.path for v in twin.trainable_variables]
    ema = stats.NoiseScaleEMA(0.9)
    expected = {}
    for i in range(8):
        xb, yb = x[16 * (i % 4): 16 * (i % 4) + 16], y[16 * (i % 4): 16 * (i % 4) + 16]
        if i % 3 == 0:
            m = gradient_moments(twin, losses.crossentropy, xb, yb, method="loop", elementwise=True)
            values = dict(stats.statistics(m, paths), loss=tf.reduce_mean(m.losses),
                          accuracy=tf.constant(0.0))
            values["noise_scale/simple"] = ema.update(*stats.noise_scale_terms(m))
            expected[i] = {k: np.asarray(v) for k, v in values.items()}
            grads = m.mean
        else:
            _, grads = gradients.batch_gradients(twin, losses.crossentropy, xb, yb)
        for v, g in zip(twin.trainable_variables, grads):
            v.assign_sub(0.1 * g)
    tags = [t for t in expected[0] if t not in ("accuracy", "per_example_grad_norm")]
    assert {"grad/norm", "grad_var/trace", "grad_snr/mean_gsnr", "noise_scale/simple",
            "grad_var/hidden_1/kernel", "loss"} <= set(tags)
    for tag in tags:
        # B_simple is undefined (inf in the loop's dict) while noise hides the signal: not written
        want_steps = [s for s in (0, 3, 6) if np.isfinite(expected[s][tag])]
        assert [s for s, _ in written.get(tag, [])] == want_steps, (tag, sorted(written))
        for s, value in written[tag]:
            assert value == pytest.approx(float(expected[s][tag]), rel=1e-4, abs=1e-7), (tag, s)
    hist = read_histograms(tmp_path / "fit" / "train")["per_example_grad_norm"]
    assert [s for s, _ in hist] == [0, 3, 6] and all(h.num == 16 for _, h in hist)
    for s, h in hist:          # the buckets start at the smallest per-example norm
        assert h.min == pytest.approx(float(np.min(expected[s]["per_example_grad_norm"])), rel=1e-4)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class Subclassed(fit.GradientStatisticsMixin, keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def _functional():
    return fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=1))


def _sequential():
    return fit.with_statistics(keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                                 keras.layers.Dense(3)]))


def _direct_sequential():
    return fit.GradientStatisticsSequential([keras.Input((6,)), keras.layers.Dense(3)])


KINDS = [
    dict(id="functional", build=_functional, steps_per_execution=1),
    dict(id="sequential", build=_sequential, steps_per_execution=4),
    dict(id="direct_sequential", build=_direct_sequential, steps_per_execution=1),
    dict(id="subclassed", build=Subclassed, steps_per_execution=2),
]


@pytest.mark.parametrize("kind", KINDS, ids=[k["id"] for k in KINDS])
def test_every_kind_of_model_logs_statistics(kind, tmp_path, capsys):
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = kind["build"]()
    model(x[:1])                  # a subclassed model has no weights until it is called
    model.compile(optimizer=optimizers.Adam(0.01), loss=CE, metrics=["accuracy"],
                  steps_per_execution=kind["steps_per_execution"], jit_compile=False)
    model.configure_statistics(str(tmp_path), freq=2)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    n = len(model.trainable_variables)      # said once, when fit first traces the step
    line = f"gradient statistics: {n} of {n} variables by the layer-wise rules"
    assert capsys.readouterr().out.count(line) == 1
    assert set(history.history) == {"loss", "accuracy"}
    written = read_scalars(tmp_path / "train")
    assert [s for s, _ in written["grad_var/trace"]] == list(range(0, 16, 2))
    assert all(np.isfinite(v) and v > 0 for _, v in written["grad_var/trace"])
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_regularized_model_applies_the_penalty_gradient_on_statistics_steps(tmp_path):
    x, y = _data()
    weights = {}
    for with_stats in (True, False):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        out = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.1),
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=2))(inputs)
        model = fit.GradientStatisticsModel(inputs, out)
        model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
        if with_stats:
            model.configure_statistics(str(tmp_path), freq=1)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights[with_stats] = model.get_weights()
    for a, b in zip(weights[True], weights[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_unbuilt_subclassed_model_is_built_by_fit(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = Subclassed()          # no weights until fit's first batch builds it
    model.compile(optimizer="sgd", loss=CE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[tfmbgd_callbacks.GradientStatistics(str(tmp_path), freq=2)])
    assert [s for s, _ in read_scalars(tmp_path / "train")["grad/norm"]] == [0, 2]


def test_a_model_without_the_mixin_is_refused_by_the_callback(tmp_path):
    x, y = _data()
    model = models.build("mlp", (6,), 3, seed=0)
    model.compile(optimizer="sgd", loss=CE)
    with pytest.raises(UserError, match="with_statistics"):
        model.fit(x, y, verbose=0, callbacks=[tfmbgd_callbacks.GradientStatistics(str(tmp_path))])


def _fit_with_statistics(log_dir, strategy=None, n=320, freq=4, **fit_args):
    """An MLP fitted by plain SGD with statistics every `freq` steps: `(model, scalars, histograms)`."""
    x, y = _data(n)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
        model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
    model.fit(x, y, shuffle=False, verbose=0, **{"batch_size": 16, "epochs": 1, **fit_args},
              callbacks=[tfmbgd_callbacks.GradientStatistics(str(log_dir), freq=freq, elementwise=True)])
    return model, read_scalars(log_dir / "train"), read_histograms(log_dir / "train")


def test_two_replicas_in_fit_equal_one_device(tmp_path):
    # 20 steps of a global batch of 16, split 8 + 8 over two logical CPUs: each replica
    # measures its share, the moments are merged into the global batch's.
    from tfmbgd import distribute
    one, one_scalars, one_hist = _fit_with_statistics(tmp_path / "one")
    mirrored = distribute.make_strategy("mirrored", 2)
    two, two_scalars, two_hist = _fit_with_statistics(tmp_path / "two", mirrored)
    assert two.distribute_strategy.num_replicas_in_sync == 2
    assert set(two_scalars) == set(one_scalars) and "grad_snr/mean_gsnr" in one_scalars
    assert [s for s, _ in one_scalars["grad_var/trace"]] == list(range(0, 20, 4))
    for tag, points in one_scalars.items():
        assert [s for s, _ in two_scalars[tag]] == [s for s, _ in points], tag
        # float32 sums in another order; the noise scale divides by a difference
        rtol = 1e-4 if tag.startswith("noise_scale") else 1e-5
        np.testing.assert_allclose([v for _, v in two_scalars[tag]], [v for _, v in points],
                                   rtol=rtol, atol=1e-7, err_msg=tag)
    assert [(s, h.num) for s, h in two_hist["per_example_grad_norm"]] == \
        [(s, h.num) for s, h in one_hist["per_example_grad_norm"]]
    for a, b in zip(two.get_weights(), one.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy,tolerance", [("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)])
def test_mixed_precision_in_fit(tmp_path, policy, tolerance):
    # tolerance: relative, about ten times the 16-bit type's epsilon (2^-10, 2^-7), for
    # statistics whose per-example gradients are computed in that type
    x, y = _data()
    keras.mixed_precision.set_global_policy(policy)
    try:
        runs = {}
        for stats_on in (True, False):
            model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
            model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
            if policy == "mixed_float16":
                assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            cbs = [tfmbgd_callbacks.GradientStatistics(str(tmp_path), freq=2, elementwise=True)] * stats_on
            history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=cbs)
            runs[stats_on] = model.get_weights(), history.history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for a, b in zip(runs[True][0], runs[False][0]):          # trains as without statistics
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * 0.1)
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=tolerance)
    written = read_scalars(tmp_path / "train")
    # The oracle: float32, the same initial weights, the single-example loop (step 0).
    twin = models.build("mlp", (6,), 3, hidden=(8,), seed=5)
    m = gradient_moments(twin, losses.crossentropy, x[:16], y[:16], method="loop", elementwise=True)
    want = stats.summarize(m, twin.trainable_variables)
    for tag in ("grad/norm", "grad_var/trace", "grad_var/of_mean", "grad_snr/mean_gsnr",
                "grad/norm/hidden_1/kernel"):
        step, value = written[tag][0]
        assert step == 0 and value == pytest.approx(want[tag], rel=tolerance), (tag, value, want[tag])
    assert written["loss"][0][1] == pytest.approx(float(tf.reduce_mean(m.losses)), rel=tolerance)


def test_a_keras_save_loads_without_custom_objects_and_goes_on(tmp_path):
    x, y = _data()
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
    model.configure_statistics(str(tmp_path / "run"), freq=3, elementwise=True)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)          # steps 0-3
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")                  # no custom_objects
    assert type(loaded) is fit.GradientStatisticsModel
    assert loaded.get_config()["statistics"] == dict(log_dir=str(tmp_path / "run"), freq=3, method="auto",
                                                     elementwise=True, noise_scale_decay=0.9)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)         # steps 4-7
    written = read_scalars(tmp_path / "run" / "train")
    assert [s for s, _ in written["grad_var/trace"]] == [0, 3, 6]
    model.configure_statistics(str(tmp_path / "twin"), freq=3, elementwise=True)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)          # the same 4 steps, unsaved
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert read_scalars(tmp_path / "twin" / "train")["grad_var/trace"][0][0] == 6


def test_keras_default_compile_takes_statistics(tmp_path):
    # compile() as Keras users write it (jit_compile="auto", which means XLA on a GPU)
    x, y = _data()
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                        callbacks=[tfmbgd_callbacks.GradientStatistics(str(tmp_path), freq=2)])
    assert set(history.history) == {"loss", "accuracy"}
    assert [s for s, _ in read_scalars(tmp_path / "train")["grad/norm"]] == [0, 2]


def test_subclassed_model_cannot_be_wrapped():
    keras.utils.set_random_seed(0)
    class Plain(keras.Model):
        def call(self, x):
            return x
    with pytest.raises(UserError, match="GradientStatisticsMixin"):
        fit.with_statistics(Plain())


def test_per_example_loss_from_compiled_losses():
    y, logits = tf.constant([0, 2]), tf.constant([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    want = losses.crossentropy(y, logits).numpy()
    np.testing.assert_allclose(fit.per_example_loss(CE)(y, logits).numpy(), want, rtol=1e-6)
    mse = fit.per_example_loss("mean_squared_error")(tf.ones((2, 1)), tf.zeros((2, 1)))
    np.testing.assert_allclose(mse.numpy(), [1.0, 1.0])


def test_fit_called_epoch_by_epoch_traces_once_and_a_fit_without_statistics_writes_none(tmp_path):
    x, y = _data()
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
    statistics = tfmbgd_callbacks.GradientStatistics(str(tmp_path), freq=3)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[statistics])   # steps 0-3
    function = model.train_function
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[statistics])   # steps 4-7
    assert model.train_function is function                     # not made (nor traced) again
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)                           # steps 8-11
    assert model.train_function is not function
    assert [s for s, _ in read_scalars(tmp_path / "train")["grad/norm"]] == [0, 3, 6]
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[statistics])   # 12-15
    assert [s for s, _ in read_scalars(tmp_path / "train")["grad/norm"]] == [0, 3, 6, 12, 15]


def _weighted_oracle(twin, x, y, w):
    """The statistics of one step of Keras' weighted loss `mean_n w_n l_n`, written out: each
    example's gradient by its own tape, times its weight (numpy), then the moments' maths by
    hand. Nothing of tfmbgd's moments or fit."""
    per_example = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            loss = w[n] * losses.crossentropy(y[n:n + 1], twin(x[n:n + 1]))[0]
        grads = tape.gradient(loss, twin.trainable_variables)
        per_example.append(np.concatenate([g.numpy().ravel() for g in grads]))
    g = np.stack(per_example)
    b, mean = len(x), g.mean(axis=0)
    loss = np.mean([w[n] * float(losses.crossentropy(y[n:n + 1], twin(x[n:n + 1]))[0]) for n in range(b)])
    return {"grad/norm": np.linalg.norm(mean), "grad_var/trace": np.sum(np.var(g, axis=0, ddof=1)),
            "loss": loss}


@pytest.mark.parametrize("how", ["sample_weight", "class_weight"])
def test_fit_with_sample_or_class_weights_measures_kerass_weighted_loss(tmp_path, how):
    x, y = _data(n=16)
    weights = {0: 0.5, 1: 2.0, 2: 1.0}
    w = np.array([weights[c] for c in y], np.float32) if how == "class_weight" else \
        np.random.default_rng(1).uniform(0, 2, size=16).astype(np.float32)
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
    twin = models.build("mlp", (6,), 3, hidden=(8,), seed=5)
    want = _weighted_oracle(twin, x, y, w)
    given = dict(sample_weight=w) if how == "sample_weight" else dict(class_weight=weights)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, **given,
                        callbacks=[tfmbgd_callbacks.GradientStatistics(str(tmp_path), freq=1)])
    written = read_scalars(tmp_path / "train")
    for tag in ("grad/norm", "grad_var/trace", "loss"):
        assert written[tag][0][0] == 0
        assert written[tag][0][1] == pytest.approx(want[tag], rel=1e-4), tag
    assert history.history["loss"][0] == pytest.approx(want["loss"], rel=1e-5)   # Keras' own, the same
    # and the update is SGD on Keras' weighted loss: the twin by hand
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(w * losses.crossentropy(y, twin(x)))
    for v, g in zip(twin.trainable_variables, tape.gradient(loss, twin.trainable_variables)):
        v.assign_sub(0.1 * g)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_token_mask_weighs_each_examples_tokens():
    # [B, T] per-token losses with a [B, T] mask: example n's loss is the mean over its T
    # tokens of mask * loss, as Keras' default reduction makes it (sum / (B T)).
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=(3, 5)).astype(np.int32)
    logits = tf.constant(rng.normal(size=(3, 5, 4)).astype(np.float32))
    mask = (rng.uniform(size=(3, 5)) > 0.3).astype(np.float32)
    values = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(y, logits).numpy()
    per_token = lambda t, p: keras.losses.sparse_categorical_crossentropy(t, p, from_logits=True)
    loss_fn, packed = losses.weighted(per_token, tf.constant(y), tf.constant(mask))
    got = loss_fn(packed, logits).numpy()
    np.testing.assert_allclose(got, (values * mask).mean(axis=1), rtol=1e-6)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits, sample_weight=mask)
    assert float(np.mean(got)) == pytest.approx(float(keras_loss), rel=1e-6)


def test_a_keras_hub_causal_lm_with_its_padding_mask_logs_statistics(tmp_path):
    # KerasHub's preprocessor hands a causal LM its padding mask as sample_weight ([B, T]);
    # the statistics are those of Keras' masked loss (the oracle: Keras' own loss, by a tape).
    keras_hub = pytest.importorskip("keras_hub")

    def build():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=30, num_layers=1, num_heads=2, hidden_dim=8,
                                                 intermediate_dim=16, max_sequence_length=8, dropout=0.0)
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 30, size=(4, 9)).astype(np.int32)
    mask = np.ones((4, 8), np.int32)
    mask[1, 5:], mask[3, 2:] = 0, 0                    # two padded sequences
    x = {"token_ids": tokens[:, :-1] * mask, "padding_mask": mask}
    y, w = tokens[:, 1:] * mask, mask.astype(np.float32)
    model = fit.with_statistics(build())
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
    history = model.fit(x, y, sample_weight=w, batch_size=4, epochs=1, verbose=0,
                        callbacks=[tfmbgd_callbacks.GradientStatistics(str(tmp_path), freq=1)])
    written = read_scalars(tmp_path / "train")
    twin = build()
    with tf.GradientTape() as tape:
        loss = CE(y, twin(x), sample_weight=w)
    grads = tape.gradient(loss, twin.trainable_variables)
    norm = float(tf.linalg.global_norm([tf.convert_to_tensor(g) for g in grads]))
    assert written["loss"][0] == (0, pytest.approx(float(loss), rel=1e-5))
    assert history.history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert written["grad/norm"][0] == (0, pytest.approx(norm, rel=1e-4))
    assert written["grad_var/trace"][0][1] > 0
