"""The training loop: update rules agree, reductions relate, batch sizes from 1 to full."""

import dataclasses
import os
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import final_weights, read_histograms, read_scalars
from tfmbgd import data as tfmbgd_data
from tfmbgd import losses, models
from tfmbgd.config import TrainConfig
from tfmbgd.engine import layerwise
from tfmbgd.errors import UserError
from tfmbgd.loop import rundir, steps, training
from tfmbgd.loop.update import make_update


def _batches(n_batches=4, b=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(tf.constant(rng.normal(size=(b, 6)).astype(np.float32)),
             tf.constant(rng.integers(0, 3, size=b).astype(np.int32))) for _ in range(n_batches)]


def _steps(rule, learning_rate=0.3, reduction="mean", method="vectorized"):
    keras.utils.set_random_seed(0)
    model = models.build("mlp", (6,), 3, hidden=(5,), seed=1)
    apply = make_update(rule, model.trainable_variables, learning_rate)
    return model, steps.Steps(model, losses.crossentropy, apply, reduction=reduction, method=method)


def _run(steps, batches, stats_on=()):
    for i, (x, y) in enumerate(batches):
        (steps.with_stats if i in stats_on else steps.plain)(x, y)


def test_manual_custom_and_keras_updates_give_identical_weights():
    batches = _batches(6)
    weights = {}
    for rule in ("manual", "custom", "keras"):
        model, steps = _steps(rule)
        _run(steps, batches, stats_on={0, 3})
        weights[rule] = [v.numpy() for v in model.trainable_variables]
    start = models.build("mlp", (6,), 3, hidden=(5,), seed=1)
    assert np.abs(weights["manual"][0] - start.trainable_variables[0].numpy()).max() > 1e-3
    for rule in ("custom", "keras"):
        for a, b in zip(weights[rule], weights["manual"]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["vectorized", "jacobian", "loop"])
def test_statistics_step_applies_the_same_update_as_the_plain_step(method):
    batches = _batches(3)
    plain_model, plain = _steps("custom")
    stats_model, with_stats = _steps("custom", method=method)
    _run(plain, batches)
    _run(with_stats, batches, stats_on={0, 1, 2})
    for a, b in zip(plain_model.trainable_variables, stats_model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_auto_statistics_step_on_a_cnn_applies_the_same_update_as_the_plain_step():
    # The conv rule's sums of per-example gradients replace the backward pass's filter
    # gradient in the statistics step; the update must stay that of the plain step.
    rng = np.random.default_rng(0)
    batches = [(tf.constant(rng.uniform(size=(8, 8, 8, 1)).astype(np.float32)),
                tf.constant(rng.integers(0, 3, size=8).astype(np.int32))) for _ in range(3)]
    weights = []
    for stats_on in ((), (0, 1, 2)):
        model = models.build("cnn", (8, 8, 1), 3, seed=1)
        apply = make_update("manual", model.trainable_variables, 0.3)
        _run(steps.Steps(model, losses.crossentropy, apply, method="auto"), batches, stats_on)
        weights.append([v.numpy() for v in model.trainable_variables])
    start = models.build("cnn", (8, 8, 1), 3, seed=1).trainable_variables[0].numpy()
    assert np.abs(weights[0][0] - start).max() > 1e-3
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sum_reduction_acts_as_a_learning_rate_b_times_larger():
    b = 8
    batches = _batches(4, b=b)
    mean_model, mean_steps = _steps("manual", learning_rate=0.4)
    sum_model, sum_steps = _steps("manual", learning_rate=0.4 / b, reduction="sum")
    _run(mean_steps, batches, stats_on={1})
    _run(sum_steps, batches, stats_on={2})
    for a, c in zip(mean_model.trainable_variables, sum_model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-5, atol=1e-6)


def test_step_returns_loss_accuracy_and_statistics():
    model, steps = _steps("custom")
    x, y = _batches(1)[0]
    logits = model(x)
    out = steps.with_stats(x, y)
    expected_loss = losses.crossentropy(y, logits).numpy().mean()
    expected_acc = np.mean(np.argmax(logits, axis=1) == y.numpy())
    assert float(out["loss"]) == pytest.approx(expected_loss, rel=1e-6)
    assert float(out["accuracy"]) == pytest.approx(expected_acc)
    assert {"grad/norm", "grad_var/trace", "grad_var/of_mean",
            "grad_var/hidden_1/kernel", "grad/norm/output/bias"} <= set(out)


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(3, 4))
    y = np.arange(60) % 3
    x = centers[y] + rng.normal(size=(60, 4))
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    return f"npz:{path}"


def _config(tmp_path, dataset, **overrides):
    base = TrainConfig(dataset=dataset, model="mlp", hidden=(8,), epochs=3, learning_rate=0.1,
                       log_every=1, stats_every=2, logdir=str(tmp_path / "logs"))
    return dataclasses.replace(base, **overrides)


def test_tfmbgd_run_does_what_train_py_does(tmp_path, tiny_npz):
    # A notebook's way in: the same checks before TensorFlow, then the run.
    import tfmbgd
    with pytest.raises(UserError, match="batch"):
        tfmbgd.run(_config(tmp_path, tiny_npz, batch_size=500))          # 48 examples
    assert not (tmp_path / "logs").exists()                               # nothing written
    result = tfmbgd.run(_config(tmp_path, tiny_npz, batch_size=16, epochs=1))     # what it measured
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert result.run_dir == str(run_dir) and result.epochs == 1 and result.steps == 3
    assert set(result.test) == {"loss", "accuracy"}
    assert (run_dir / "final.weights.h5").exists()


def test_batch_size_one_is_sgd_one_update_per_example(tmp_path, tiny_npz):
    result = training.train(_config(tmp_path, tiny_npz, batch_size=1, epochs=2), verbose=0)
    assert result.steps == 2 * 48
    assert result.train_history[-1] < result.train_history[0]


def test_full_batch_makes_one_step_per_epoch(tmp_path, tiny_npz):
    result = training.train(_config(tmp_path, tiny_npz, batch_size=None, epochs=5, learning_rate=0.5),
                            verbose=0)
    assert result.steps == 5
    assert result.train_history == sorted(result.train_history, reverse=True)
    assert result.test["accuracy"] > 0.5


def test_remainder_batch_is_kept(tmp_path, tiny_npz):
    result = training.train(_config(tmp_path, tiny_npz, batch_size=20, epochs=2), verbose=0)
    assert result.steps == 2 * 3          # 48 = 20 + 20 + 8


def test_batch_larger_than_training_set_is_refused(tmp_path, tiny_npz):
    with pytest.raises(UserError, match="--batch_size=full"):
        training.train(_config(tmp_path, tiny_npz, batch_size=49), verbose=0)


def test_cnn_needs_images(tmp_path, tiny_npz):
    with pytest.raises(UserError, match="needs images \\[height, width, channels\\]"):
        training.train(_config(tmp_path, tiny_npz, model="cnn"), verbose=0)


def test_new_run_dir_never_reuses_a_directory(tmp_path):
    first = rundir.new_run_dir(str(tmp_path), "run")
    open(os.path.join(first, "keep"), "w").close()
    second = rundir.new_run_dir(str(tmp_path), "run")
    assert second != first and os.path.basename(second) == "run-2"
    assert os.listdir(first) == ["keep"] and os.listdir(second) == []


def test_logdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        rundir.new_run_dir(str(path), "run")


def test_stats_every_skips_the_moments_on_other_steps(tmp_path, tiny_npz, monkeypatch):
    """Counts executions of the moment computation inside the compiled steps."""
    calls = tf.Variable(0)
    real = steps.gradient_moments

    def counting(*args, **kwargs):
        calls.assign_add(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(steps, "gradient_moments", counting)
    result = training.train(_config(tmp_path, tiny_npz, batch_size=8, epochs=2, stats_every=5),
                            verbose=0)
    assert result.steps == 12
    assert int(calls.numpy()) == 3                  # steps 0, 5, 10
    never = training.train(_config(tmp_path, tiny_npz, batch_size=8, epochs=1, stats_every=0),
                           verbose=0)
    assert never.steps == 6 and int(calls.numpy()) == 3


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_statistics_steps_of_the_loop_take_the_rules_not_the_fallback(tmp_path, tiny_npz, monkeypatch, model):
    # The statistics step is traced inside the runner's loop body: every variable must be
    # found in that nested graph, or the exact but slow fallback would quietly take over.
    def fallback(*args, **kwargs):
        raise AssertionError("the per-example fallback ran")
    monkeypatch.setattr(layerwise.gradients, "unvectorized", fallback)
    dataset, batch = (tiny_npz, 8) if model == "mlp" else ("digits", 256)      # cnn: images
    result = training.train(_config(tmp_path, dataset, batch_size=batch, epochs=1, stats_every=2,
                                    steps_per_call=4, model=model), verbose=0)
    written = read_scalars(os.path.join(result.run_dir, "train"))["grad/norm"]
    assert [step for step, _ in written] == list(range(0, result.steps, 2))


@pytest.mark.parametrize("steps_per_call", [1, 4, 32])
def test_statistics_fall_on_multiples_of_stats_every_across_calls(tmp_path, tiny_npz, steps_per_call):
    """Calls of 4 steps cut the 3-step period at every place; the loss is logged every step."""
    result = training.train(_config(tmp_path, tiny_npz, batch_size=8, epochs=2, stats_every=3,
                                    steps_per_call=steps_per_call), verbose=0)
    tags = read_scalars(os.path.join(result.run_dir, "train"))
    assert result.steps == 12
    assert [step for step, _ in tags["loss"]] == list(range(12))
    assert [step for step, _ in tags["grad/norm"]] == [0, 3, 6, 9]


def test_milliseconds_axis_is_the_host_clock_since_training_began(tmp_path, tiny_npz):
    """`loss_by/milliseconds` is written at step = ms since the runner began, read from the
    host clock in the graph; here under op determinism (numpy_function; test_cli covers
    tf.timestamp, which train.py uses without --deterministic)."""
    before = time.time()
    result = training.train(_config(tmp_path, tiny_npz, batch_size=8, epochs=2, stats_every=3,
                                    steps_per_call=4), verbose=0)
    wall_ms = (time.time() - before) * 1000
    tags = read_scalars(os.path.join(result.run_dir, "train"))
    ms = [step for step, _ in tags["loss_by/milliseconds"]]
    assert len(ms) == 12 and ms == sorted(ms)
    assert 0 <= ms[0] < ms[-1] <= wall_ms       # the clock moves, in milliseconds
    assert [v for _, v in tags["loss_by/milliseconds"]] == [v for _, v in tags["loss"]]


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov", "rmsprop", "adagrad", "adam"])
def test_custom_loop_family_matches_keras_builtins(optimizer):
    batches = _batches(6)
    weights = {}
    for rule in ("custom", "keras"):
        keras.utils.set_random_seed(0)
        model = models.build("mlp", (6,), 3, hidden=(5,), seed=1)
        apply = make_update(rule, model.trainable_variables, 0.05, optimizer)
        _run(steps.Steps(model, losses.crossentropy, apply), batches, stats_on={0, 4})
        weights[rule] = [v.numpy() for v in model.trainable_variables]
    for a, b in zip(weights["custom"], weights["keras"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


XLA_RUNS = [dict(model="mlp", dataset="digits", batch_size=64, elementwise_stats=True),
            dict(model="linear", dataset="linear", batch_size=16, on_nonfinite="skip")]


@pytest.mark.parametrize("settings", XLA_RUNS, ids=["mlp digits", "linear, skip"])
def test_xla_compiled_calls_write_what_the_plain_loop_writes(tmp_path, settings):
    # --jit_compile: the steps record into a buffer that Python writes after each call; the
    # same tags at the same steps with the same values (float32 round-off: XLA fuses), and
    # the same weights. Calls of 8 steps with statistics every 3 and the loss every 2: rows
    # of both kinds inside one call.
    common = dict(**settings, epochs=2, stats_every=3, log_every=2, steps_per_call=8)
    runs = {jit: training.train(TrainConfig(**common, jit_compile=jit, logdir=str(tmp_path / str(jit))),
                                verbose=0) for jit in (False, True)}
    plain, xla = (read_scalars(f"{runs[jit].run_dir}/train") for jit in (False, True))
    assert set(xla) == set(plain)
    for tag, points in plain.items():
        if tag == "loss_by/milliseconds":       # another clock; the same number of points
            assert len(xla[tag]) == len(points)
            continue
        assert [s for s, _ in xla[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in xla[tag]], [v for _, v in points], rtol=2e-4,
                                   atol=1e-6, err_msg=tag)
    hist = {jit: read_histograms(f"{runs[jit].run_dir}/train")["per_example_grad_norm"] for jit in runs}
    assert [(s, h.num) for s, h in hist[True]] == [(s, h.num) for s, h in hist[False]]
    for a, b in zip(final_weights(runs[True].run_dir), final_weights(runs[False].run_dir)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mixed_bfloat16_run_computes_in_bfloat16_and_measures_like_float32(tmp_path):
    # tolerance: 5% relative, a few times bfloat16's epsilon (2^-7) for gradients whose
    # activations are rounded to it; a leaked cast or a 16-bit accumulation would be far off
    common = dict(epochs=1, batch_size=64, stats_every=5, log_every=5, logdir=str(tmp_path))
    bf16 = training.train(TrainConfig(**common, mixed_precision="mixed_bfloat16"), verbose=0)
    f32 = training.train(TrainConfig(**common), verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"        # left as it was
    half, full = read_scalars(f"{bf16.run_dir}/train"), read_scalars(f"{f32.run_dir}/train")
    for tag in ("loss", "grad/norm", "grad_var/trace", "grad/norm/hidden_1/kernel"):
        assert half[tag][0][0] == full[tag][0][0] == 0
        assert half[tag][0][1] == pytest.approx(full[tag][0][1], rel=5e-2), tag      # same initial weights
    assert bf16.test["loss"] == pytest.approx(f32.test["loss"], rel=5e-2)
    model, _, _, _ = training.setup(TrainConfig(mixed_precision="mixed_bfloat16"),
                                    tfmbgd_data.load("digits"))
    assert {layer.compute_dtype for layer in model.layers[1:]} == {"bfloat16"}
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
