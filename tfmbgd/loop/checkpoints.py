"""Checkpoints of a run and exact resume.

A run directory (`tfmbgd.loop.rundir`) holds `config.json` (the settings it was started
with) and `checkpoints/` (`tf.train.CheckpointManager`): the model, the optimizer with its
slots, the step, the epoch and the steps done in it, the state of the random generator
that orders the epoch's examples (drawn at the epoch's start), the running sums behind a
study's means, and each instrument's state (the noise-scale smoothing, ...). Batches are
gathered by indices from that generator, so the position in the data is the generator
state plus the steps done in the epoch: a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

import json
import os

import tensorflow as tf

from tfmbgd.errors import UserError
from tfmbgd.loop.rundir import CHECKPOINTS


def latest(run_dir):
    """The path of the latest checkpoint of the run in `run_dir`, or None if it has none."""
    return tf.train.latest_checkpoint(os.path.join(run_dir, CHECKPOINTS))


def step_of(path):
    """The step a checkpoint path was saved at (`RunState.save` numbers them by step)."""
    return int(path.rsplit("-", 1)[-1])


EPOCH = "epoch"     # the checkpoint's name of the run's epoch counter (`RunState`)


def epochs_done(path):
    """The epochs the run had finished when the checkpoint `path` was saved (read from the
    file, without building the run)."""
    return int(tf.train.load_variable(path, f"{EPOCH}/.ATTRIBUTES/VARIABLE_VALUE"))


class RunState:
    """The counters of a run and the checkpoint that holds them with model and optimizer."""

    def __init__(self, run_dir, model, optimizer, extra_variables, keep, instruments=None):
        """`extra_variables`: more variables to save; `instruments`: `{name: {name: variable}}`
        (`tfmbgd.instruments.Panel.state`)."""
        counter = lambda: tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step, self.epoch, self.in_epoch, self.examples = counter(), counter(), counter(), counter()
        self.rng_state = tf.Variable("", dtype=tf.string, trainable=False)
        items = dict(model=model, step=self.step, **{EPOCH: self.epoch}, in_epoch=self.in_epoch,
                     examples=self.examples, rng_state=self.rng_state, extra=list(extra_variables))
        if instruments:
            items["instruments"] = {name: dict(state) for name, state in instruments.items()}
        if optimizer is not None:
            items["optimizer"] = optimizer
        self.checkpoint = tf.train.Checkpoint(**items)
        self._keep = keep
        self.moved_to(run_dir)

    def moved_to(self, run_dir):
        """The run's directory was renamed to `run_dir` (the manager records checkpoints by
        relative paths, so the ones saved before the move are found there)."""
        self.run_dir = run_dir
        self.manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(run_dir, CHECKPOINTS),
                                                  max_to_keep=self._keep)

    def save(self):
        return self.manager.save(checkpoint_number=int(self.step.numpy()))

    def restore(self, run_dir=None):
        """Restores the latest checkpoint of `run_dir` (default: this run's own directory;
        a worker that is not the chief reads the chief's and writes its own elsewhere)."""
        path = latest(run_dir if run_dir is not None else self.run_dir)
        if path is None:
            raise UserError(f"no checkpoint in {run_dir or self.run_dir}; nothing to resume")
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def remember_rng(self, rng):
        self.rng_state.assign(json.dumps(rng.bit_generator.state))

    def recall_rng(self, rng):
        rng.bit_generator.state = json.loads(self.rng_state.numpy().decode())
