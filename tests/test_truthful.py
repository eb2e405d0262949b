"""Runs that say truthfully how they went (issue 16): resumable from the first moment,
a finished run left alone, skipped updates counted, a diverging loss named."""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import read_scalars, tree_hash
from tfmbgd import training
from tfmbgd.config import CHECKPOINTS, TrainConfig, resume
from tfmbgd.errors import UserError

SMALL = dict(dataset="linear", model="linear", batch_size=16, stats_every=5, log_every=5)


def test_config_and_a_checkpoint_exist_before_the_first_step(tmp_path, monkeypatch):
    seen = {}
    real = training.StepRunner.run

    def spy(self, *args):
        if "dir" not in seen:        # the first real call: what the directory holds now
            run_dir = next(p for p in tmp_path.iterdir())
            seen["dir"] = sorted(os.listdir(run_dir))
            seen["checkpoint"] = tf.train.latest_checkpoint(str(run_dir / CHECKPOINTS))
        return real(self, *args)
    monkeypatch.setattr(training.StepRunner, "run", spy)
    training.train(TrainConfig(**SMALL, epochs=1, logdir=str(tmp_path)), verbose=0)
    assert "config.json" in seen["dir"] and seen["checkpoint"].endswith("ckpt-0")


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path):
    done = training.train(TrainConfig(**SMALL, epochs=1, logdir=str(tmp_path)), verbose=0)
    before = tree_hash(tmp_path)
    with pytest.raises(UserError, match="has finished its 1 epochs; nothing was changed. Pass --epochs=2"):
        training.train(resume(done.run_dir, {"epochs": 1}), verbose=0)
    assert tree_hash(tmp_path) == before


def test_skipped_updates_are_counted_and_the_bar_shows_the_non_finite_loss(tmp_path, capsys):
    # Step 0 is finite and applied; its update makes every later loss overflow.
    run = training.train(TrainConfig(**SMALL, epochs=1, learning_rate=1e30, on_nonfinite="skip",
                                     logdir=str(tmp_path)), verbose=1)
    out = capsys.readouterr().out
    skipped = run.steps - 1
    assert f"{skipped} updates skipped as non-finite in this epoch" in out
    assert f"{skipped} updates were skipped as non-finite" in out
    assert "loss: nan" in out.lower() or "loss: inf" in out.lower()


def test_a_run_whose_every_update_was_skipped_is_an_error():
    class AllSkipped:
        def skipped_in_run(self):
            return 7
    result = training.RunResult("logs/run", 7, 1, {})
    with pytest.raises(UserError, match=r"every update of the run \(7\) was skipped"):
        training._report_end(AllSkipped(), result, TrainConfig(), 0, updates=7)
    training._report_end(AllSkipped(), result, TrainConfig(), 0, updates=8)    # one was applied


def test_a_diverging_loss_is_named_once(tmp_path, capsys):
    training.train(TrainConfig(**SMALL, epochs=3, learning_rate=1.2, on_nonfinite="skip",
                               logdir=str(tmp_path)), verbose=1)
    assert capsys.readouterr().out.count("the run is diverging") == 1


def test_batch_size_is_also_written_at_the_last_step(tmp_path):
    run = training.train(TrainConfig(**{**SMALL, "batch_size": None}, epochs=1, logdir=str(tmp_path)),
                         verbose=0)
    points = read_scalars(f"{run.run_dir}/train")["batch_size"]
    assert [s for s, _ in points] == [0, 1] and np.allclose([v for _, v in points], points[0][1])
