"""Checkpoints and exact resume: a run killed at a random step ends bit-identical."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import tree_hash, user_env

pytestmark = pytest.mark.slow     # real train.py processes, killed and resumed

ROOT = Path(__file__).resolve().parent.parent
# Six epochs: the run trains for about 4 s after its first checkpoint, well past the
# random delay before an interrupt (with three, a slow start left under 1.5 s, and a signal
# could land after training had ended).
FLAGS = ["--hidden=8", "--batch_size=4", "--epochs=6", "--learning_rate=0.05", "--stats_every=4",
         "--log_every=2", "--checkpoint_every=7", "--keep_checkpoints=2", "--steps_per_call=1",
         "--optimizer=adam", "--deterministic"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.npz"
    rng = np.random.default_rng(0)
    y = np.arange(460) % 3
    x = rng.normal(size=(3, 6))[y] + rng.normal(size=(460, 6))
    np.savez(path, x_train=x[:400], y_train=y[:400], x_test=x[400:], y_test=y[400:])
    return f"--dataset=npz:{path}"


def _train(*args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=user_env())


def _start(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=user_env())


def _weights(run_dir):
    out = {}
    with h5py.File(Path(run_dir) / "final.weights.h5") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def _only_run(logdir):
    (run_dir,) = Path(logdir).iterdir()
    return run_dir


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("reference")
    proc = _train(dataset, *FLAGS, f"--logdir={logdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(_only_run(logdir))


def _interrupt_and_resume(dataset, logdir, send):
    proc = _start(dataset, *FLAGS, f"--logdir={logdir}")
    try:
        deadline = time.monotonic() + 120
        while not list(Path(logdir).glob("*/checkpoints/checkpoint")):      # training has begun
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.5))
        assert proc.poll() is None, "the run ended before it could be interrupted: make it longer"
        proc.send_signal(send)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_dir = _only_run(logdir)
    resumed = _train(f"--resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout
    return proc.returncode, err, run_dir


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(dataset, reference, tmp_path, trial):
    random.seed(trial)
    code, _, run_dir = _interrupt_and_resume(dataset, tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = _weights(run_dir)
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])


@pytest.mark.parametrize("sent,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_interrupt_saves_prints_the_resume_command_and_exits(dataset, reference, tmp_path, sent, exit_code):
    random.seed(exit_code)
    code, err, run_dir = _interrupt_and_resume(dataset, tmp_path, sent)
    assert code == exit_code
    assert f"python train.py --resume={run_dir}" in err and "Traceback" not in err
    for name, value in _weights(run_dir).items():
        np.testing.assert_array_equal(value, reference[name])


def test_resume_refuses_a_contradicting_config_and_changes_nothing(dataset, tmp_path):
    done = _train(dataset, *FLAGS[:2], "--epochs=1", f"--logdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = _only_run(tmp_path)
    before = tree_hash(run_dir)
    for flag, name in (("--model=linear", "model"), ("--optimizer=adam", "optimizer"),
                       ("--dataset=digits", "dataset"), ("--batch_size=8", "batch_size")):
        proc = _train(f"--resume={run_dir}", flag, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert f"{name}=" in lines[0] and "contradicts" in lines[0]
    nothing = _train(f"--resume={tmp_path / 'no-run'}", timeout=60)
    assert nothing.returncode == 2 and "holds no run" in nothing.stderr
    assert tree_hash(run_dir) == before
