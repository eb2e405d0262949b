"""The non-finite guard: stop keeps the last good weights, skip leaves bad updates out."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_scalars, user_env
from tfmbgd import losses, models
from tfmbgd.loop import steps
from tfmbgd.loop.update import NonFiniteGuard, make_update

ROOT = Path(__file__).resolve().parent.parent


def _steps(mode):
    keras.utils.set_random_seed(0)
    model = models.build("mlp", (4,), 3, hidden=(5,), seed=0)
    apply = make_update("custom", model.trainable_variables, 0.1)
    guard = NonFiniteGuard(apply, mode)
    return model, guard, steps.Steps(model, losses.crossentropy, apply, guard=guard)


def _batch(seed, nan=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    if nan:
        x[3, 2] = np.nan                           # one planted NaN in one example
    return tf.constant(x), tf.constant(rng.integers(0, 3, size=8).astype(np.int32))


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def test_skip_leaves_out_only_the_bad_update():
    model, guard, s = _steps("skip")
    s.plain(*_batch(0))
    before = _weights(model)
    guard.current_step.assign(1)
    s.plain(*_batch(1, nan=True))
    for a, b in zip(_weights(model), before):
        np.testing.assert_array_equal(a, b)
    assert int(guard.skipped.numpy()) == 1 and not bool(guard.tripped.numpy())
    assert int(guard.first_bad_step.numpy()) == 1
    assert model.trainable_variables[int(guard.first_bad_variable.numpy())].path == "hidden_1/kernel"
    s.with_stats(*_batch(2))                                  # good updates go on
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_weights(model), before))


def test_stop_applies_nothing_after_the_first_bad_step():
    model, guard, s = _steps("stop")
    s.with_stats(*_batch(1, nan=True))
    frozen = _weights(model)
    s.plain(*_batch(2))
    s.with_stats(*_batch(3))
    assert bool(guard.tripped.numpy())
    for a, b in zip(_weights(model), frozen):
        np.testing.assert_array_equal(a, b)


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--dataset=linear", "--model=linear",
                           "--epochs=2", *args], capture_output=True, text=True, timeout=180, env=user_env())


@pytest.mark.slow     # a train.py process
def test_diverging_run_stops_with_one_line_and_keeps_good_checkpoints(tmp_path):
    proc = _run("--learning_rate=5", "--checkpoint_every=10", f"--logdir={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "was not finite at step" in lines[-1] and "--on_nonfinite=skip" in lines[-1]
    bad_step = int(lines[-1].split("at step ")[1].split(";")[0])
    (run_dir,) = tmp_path.iterdir()
    indexes = (run_dir / "checkpoints").glob("ckpt-*.index")
    saved = sorted(int(p.name.split("-")[1].split(".")[0]) for p in indexes)
    assert saved and max(saved) <= bad_step


@pytest.mark.slow     # a train.py process
def test_skip_mode_logs_the_count(tmp_path):
    proc = _run("--learning_rate=5", "--on_nonfinite=skip", "--log_every=1", f"--logdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    skipped = read_scalars(run_dir / "train")["nonfinite/skipped"]
    assert skipped[-1][1] >= 1 and [v for _, v in skipped] == sorted(v for _, v in skipped)


def test_a_nan_in_one_replicas_share_skips_the_update_on_every_replica():
    from tfmbgd import distribute
    from tfmbgd.engine.replicas import Replicas
    strategy = distribute.make_strategy("mirrored", 2)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = models.build("mlp", (4,), 3, hidden=(5,), seed=0)
        apply = make_update("custom", model.trainable_variables, 0.1)
        guard = NonFiniteGuard(apply, "skip")
        replicas = Replicas(strategy)
        s = steps.Steps(model, losses.crossentropy, apply, guard=guard, replicas=replicas)
        s.plain(*_batch(0))
        before = _weights(model)
        guard.current_step.assign(1)
        s.plain(*_batch(1, nan=True))             # example 3: in the first replica's share only
        after_nan = _weights(model)
        s.with_stats(*_batch(2))
    for a, b in zip(after_nan, before):
        np.testing.assert_array_equal(a, b)
    for v in model.trainable_variables:       # the replicas' copies agree
        first, second = strategy.experimental_local_results(v.value)
        np.testing.assert_array_equal(first, second)
    assert int(guard.skipped.numpy()) == 1 and int(guard.first_bad_step.numpy()) == 1
    assert model.trainable_variables[int(guard.first_bad_variable.numpy())].path == "hidden_1/kernel"
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_weights(model), before))


class _SparseAndUnused(keras.Model):
    """An Embedding (its gradient is IndexedSlices) and a Dense layer the loss never uses
    (its gradient is None)."""

    def __init__(self):
        super().__init__(name="sparse_and_unused")
        self.embed = keras.layers.Embedding(6, 3, embeddings_initializer="ones")
        self.unused = keras.layers.Dense(2)
        self.unused.build((None, 3))

    def call(self, ids):
        return tf.reduce_sum(self.embed(ids), axis=1)       # [B, 3]: logits of 3 classes


def test_guard_takes_sparse_and_missing_gradients():
    """Hand arithmetic: logits are the sums of two all-ones rows, so every softmax is
    uniform and d l_n / d logits = 1/3 - onehot(y_n); each id's row moves by
    -lr * (1/B) * sum over its occurrences of that vector. The unused layer stays put."""
    ids = np.array([[0, 1], [1, 1], [2, 0], [5, 5]], np.int32)
    y = np.array([0, 2, 1, 0], np.int32)
    expected = np.ones((6, 3), np.float32)
    for row, label in zip(ids, y):
        for i in row:
            expected[i] -= 0.5 * (1 / 3 - np.eye(3)[label]) / len(y)
    for rule in ("manual", "custom", "keras"):
        model = _SparseAndUnused()
        model(ids)
        unused = [v.numpy().copy() for v in model.unused.trainable_variables]
        apply = make_update(rule, model.trainable_variables, 0.5)
        guard = NonFiniteGuard(apply, "skip")
        steps.Steps(model, losses.crossentropy, apply, guard=guard).plain(tf.constant(ids), tf.constant(y))
        np.testing.assert_allclose(model.embed.embeddings.numpy(), expected, rtol=1e-6, err_msg=rule)
        for a, b in zip(model.unused.trainable_variables, unused):
            np.testing.assert_array_equal(a.numpy(), b)
        assert int(guard.skipped.numpy()) == 0
