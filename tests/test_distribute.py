"""tf.distribute: the global batch on several replicas trains and measures as one device does.

Oracles: the same run on one device (weights, every statistic), the non-vectorized
jacobian of the global batch and numpy (merged moments, the two-batch noise scale), the
closed form of the linear data set, and, for multi-worker, two real worker processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import final_weights, make_problem, oracle_per_example, read_scalars, user_env
from tfmbgd import config as cfg
from tfmbgd import data, distribute, losses, models, stats
from tfmbgd.engine.replicas import Replicas
from tfmbgd.instruments.noise_scale import two_batch_terms
from tfmbgd.loop import training
from tfmbgd.loop.rundir import resume_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mirrored(count=2):
    return distribute.make_strategy("mirrored", count)


def assert_same_run(one_dir, many_dir, weight_tol=1e-6, rel=1e-4):
    """Final weights within `weight_tol`; every scalar the one-device run logged, at the
    same steps, within `rel` (timings aside)."""
    one, many = final_weights(one_dir), final_weights(many_dir)
    assert len(one) == len(many)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(one, many)) <= weight_tol
    for split in ("train", "test"):
        a, b = read_scalars(os.path.join(one_dir, split)), read_scalars(os.path.join(many_dir, split))
        assert set(a) <= set(b)
        for tag in a:
            if tag == "loss_by/milliseconds":
                continue
            steps_a, values_a = zip(*a[tag])
            steps_b, values_b = zip(*b[tag])
            assert steps_a == steps_b, tag
            np.testing.assert_allclose(values_b, values_a, rtol=rel, atol=1e-7, err_msg=tag)


# On digits (1437 training examples) one epoch is 23 steps at B=64 and 31 at B=47.
CASES = [
    dict(batch_size=64, optimizer="sgd", update="custom", elementwise_stats=True),   # even shares
    dict(batch_size=47, optimizer="momentum", update="keras"),     # 24 + 23 (padded), remainder 27
    dict(batch_size=64, optimizer="sgd", update="manual", reduction="sum", learning_rate=0.003),
]


@pytest.mark.parametrize("case", CASES, ids=["even-custom", "uneven-keras-momentum", "manual-sum"])
def test_mirrored_on_two_devices_matches_one_device(tmp_path, case, monkeypatch):
    if case.get("elementwise_stats"):     # GSNR's sums XLA-fused, as for a large model, in both runs
        from tfmbgd.instruments import variance
        monkeypatch.setattr(variance, "FUSE_FROM", 0)
    common = dict(epochs=1, stats_every=3, log_every=1, steps_per_call=8, checkpoint_every=0, **case)
    one = training.train(cfg.TrainConfig(**common, logdir=str(tmp_path / "one")), verbose=0)
    many = training.train(cfg.TrainConfig(**common, strategy="mirrored", cpu_devices=2,
                                          logdir=str(tmp_path / "many")), verbose=0)
    assert one.steps == many.steps >= 20
    assert_same_run(one.run_dir, many.run_dir)
    tags = read_scalars(os.path.join(many.run_dir, "train"))
    # The two-batch estimate needs shares of one size: B=64 only.
    assert ("noise_scale/two_batch" in tags) == (case["batch_size"] % 2 == 0)


@pytest.mark.parametrize("batch", [5, 6, 1])
def test_merged_moments_are_those_of_the_global_batch(problem, batch):
    """Uneven shares (5 = 3 + 2 padded), even ones, and a batch of one on two replicas."""
    model, loss_fn, x, y = make_problem({**problem, "batch": batch})
    replicas = Replicas(mirrored())
    m, small_sq = tf.function(
        lambda x, y: replicas.moments(model, loss_fn, x, y, "auto", True, two_batch=True))(x, y)
    grads, finite, per_example, _ = tf.function(
        lambda x, y: (lambda g, *rest: (g.summed(), *rest))(*replicas.gradients(model, loss_fn, x, y)))(x, y)
    assert bool(tf.reduce_all(finite))
    oracle = oracle_per_example(model, loss_fn, x, y)
    for i, g in enumerate(oracle):
        np.testing.assert_allclose(m.mean[i], g.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grads[i], g.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.sum_sq[i], (g ** 2).sum(0), rtol=1e-5, atol=1e-6)
        norms = (g ** 2).reshape(batch, -1).sum(1)
        np.testing.assert_allclose(m.var_norms_sq[i], norms, rtol=1e-5, atol=1e-6)
    assert m.batch_size == batch and m.losses.shape == (batch,)
    np.testing.assert_allclose(per_example, loss_fn(y, model(x)), rtol=1e-6)
    assert (small_sq is None) == (batch % 2 == 1)


def test_two_batch_terms_against_numpy_on_the_oracle(problem):
    model, loss_fn, x, y = make_problem({**problem, "batch": 6})
    replicas = Replicas(mirrored())

    @tf.function
    def step(x, y):
        m, small_sq = replicas.moments(model, loss_fn, x, y, "auto", False, two_batch=True)
        big_sq = tf.add_n([tf.reduce_sum(tf.square(g)) for g in m.mean])
        return two_batch_terms(small_sq, big_sq, 3, 6)
    trace, grad_sq = step(x, y)
    flat = np.concatenate([g.reshape(6, -1) for g in oracle_per_example(model, loss_fn, x, y)], axis=1)
    big = np.sum(flat.mean(0) ** 2)
    small = np.mean([np.sum(flat[:3].mean(0) ** 2), np.sum(flat[3:].mean(0) ** 2)])
    # E|G_b|^2 = |G|^2 + S / b at b = 3 and 6, solved for S and |G|^2.
    s = (small - big) / (1 / 3 - 1 / 6)
    np.testing.assert_allclose(trace, s, rtol=1e-4)
    np.testing.assert_allclose(grad_sq, big - s / 6, rtol=1e-4, atol=1e-6)


def test_two_batch_noise_scale_matches_closed_form_on_linear_data():
    truth = data.load("linear", seed=0).truth
    d = truth.kernel.size
    strategy = mirrored()
    with strategy.scope():
        model = models.build("linear", (d,), 0, seed=0)
    kernel, bias = truth.kernel + np.linspace(-0.6, 0.6, d), truth.bias + 0.4   # off the optimum
    model.trainable_variables[0].assign(kernel[:, None])
    model.trainable_variables[1].assign([bias])
    mean, cov = data.linear_gradient_moments(kernel, bias, truth)
    expected = np.trace(cov) / (mean @ mean)
    replicas = Replicas(strategy)
    ema = stats.NoiseScaleEMA(decay=0.995, dtype=tf.float64)

    @tf.function
    def step(x, y):
        m, small_sq = replicas.moments(model, losses.mse, x, y, "auto", False, two_batch=True)
        big_sq = tf.add_n([tf.reduce_sum(tf.square(g)) for g in m.mean])
        return ema.update(*two_batch_terms(small_sq, big_sq, 16, 32))
    rng = np.random.default_rng(2)
    for _ in range(2000):        # fresh examples from the generating distribution
        x = rng.normal(size=(32, d))
        y = x @ truth.kernel + truth.bias + truth.noise_std * rng.normal(size=32)
        smoothed = float(step(tf.constant(x, tf.float32), tf.constant(y[:, None], tf.float32)))
    # An average over about 1/(1 - 0.995) = 200 noisy batches: a few percent of sampling error.
    assert smoothed == pytest.approx(expected, rel=0.05)


def test_split_cpu_after_start_only_checks():
    distribute.split_cpu(2)        # conftest split it so: nothing to do
    with pytest.raises(distribute.UserError, match="already started with 2"):
        distribute.split_cpu(3)


def test_the_chief_is_a_chief_task_or_worker_0_of_a_cluster_without_one():
    from types import SimpleNamespace

    def strategy(task_type, task_id, cluster):
        spec = SimpleNamespace(as_dict=lambda: cluster)
        return SimpleNamespace(cluster_resolver=SimpleNamespace(
            task_type=task_type, task_id=task_id, cluster_spec=lambda: spec))
    workers = {"worker": ["a:1", "b:1"]}
    with_chief = {"chief": ["c:1"], **workers}
    assert distribute.is_chief(mirrored())                       # no cluster: this process
    assert distribute.is_chief(strategy("worker", 0, workers))
    assert not distribute.is_chief(strategy("worker", 1, workers))
    assert distribute.is_chief(strategy("chief", 0, with_chief))
    assert not distribute.is_chief(strategy("worker", 0, with_chief))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(tmp_path, flags, scratch):
    """Two train.py worker processes on free local ports; output in files (no pipe to fill)."""
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    procs = []
    for index in range(2):
        env = user_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                       TMPDIR=str(scratch))
        out = open(tmp_path / f"worker{index}.txt", "w")
        command = [sys.executable, os.path.join(ROOT, "train.py"), "--strategy=multi_worker", *flags]
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
        out.close()
    return procs


def _stop_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow     # two worker processes
def test_multi_worker_with_two_processes_matches_one_device(tmp_path):
    flags = ["--epochs=1", "--batch_size=64", "--stats_every=3", "--log_every=1", "--steps_per_call=8",
             "--checkpoint_every=0", "--deterministic"]
    one = training.train(cfg.TrainConfig(epochs=1, batch_size=64, stats_every=3, log_every=1,
                                         steps_per_call=8, checkpoint_every=0, logdir=str(tmp_path / "one")),
                         verbose=0)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    procs = _start_workers(tmp_path, [f"--logdir={tmp_path / 'many'}", *flags], scratch)
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        _stop_all(procs)
    outputs = [(tmp_path / f"worker{i}.txt").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "2 replicas share each global batch of 64" in outputs[0]
    assert outputs[1].strip() == ""                 # only the chief reports
    runs = os.listdir(tmp_path / "many")
    assert len(runs) == 1                           # only the chief writes the run
    assert_same_run(one.run_dir, str(tmp_path / "many" / runs[0]))
    assert list(scratch.iterdir()) == []            # the other worker's files are gone


def test_a_run_resumes_on_two_replicas(tmp_path):
    common = dict(batch_size=64, stats_every=3, steps_per_call=8, checkpoint_every=0)
    whole = training.train(cfg.TrainConfig(**common, epochs=2, logdir=str(tmp_path / "whole")), verbose=0)
    half = training.train(cfg.TrainConfig(**common, epochs=1, logdir=str(tmp_path / "half")), verbose=0)
    more = {"epochs": 2, "strategy": "mirrored", "cpu_devices": 2}
    resumed = training.train(resume_config(half.run_dir, more), verbose=0)
    assert resumed.run_dir == half.run_dir          # a resumed run goes on in its own directory
    assert resumed.steps == whole.steps
    for a, b in zip(final_weights(whole.run_dir), final_weights(resumed.run_dir)):
        np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.slow     # two worker processes
def test_a_worker_that_stops_ends_the_other_with_one_line(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    logdir = tmp_path / "logs"
    procs = _start_workers(tmp_path, ["--epochs=100", "--batch_size=8", "--checkpoint_every=40",
                                      "--steps_per_call=8", f"--logdir={logdir}"], scratch)
    try:
        deadline = time.monotonic() + 120
        while not list(logdir.glob("*/checkpoints/checkpoint")):     # training is under way
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=90)
    finally:
        _stop_all(procs)
    chief, other = [(tmp_path / f"worker{i}.txt").read_text() for i in range(2)]
    assert procs[1].returncode == 143 and "the chief's run directory holds the checkpoints" in other
    assert procs[0].returncode == 2
    assert "train.py: error: another worker of the cluster stopped or cannot be reached" in chief
    assert "Traceback" not in chief + other
    assert list(scratch.iterdir()) == []            # the stopped worker cleaned up too
