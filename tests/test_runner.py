"""The schedule of statistics steps (`tfmbgd.loop.steps.Schedule`) and the runner's compiled
calls (`tfmbgd.loop.runner`), against the schedule written out in Python: step s is a
statistics step when s % every == 0 and, with a two-step instrument, an end step when
s % every == 1."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmbgd.instruments import Alpha, Panel, default
from tfmbgd.loop.runner import StepRunner, XlaStepRunner, epoch_batches
from tfmbgd.loop.steps import Schedule

PLAIN, STATS, END = 1, 2, 3


def _kinds(every, two_step, first, n):
    """The oracle: the kind of each of the steps first .. first + n - 1."""
    out = []
    for s in range(first, first + n):
        if every and s % every == 0:
            out.append(STATS)
        elif every and two_step and every > 1 and s % every == 1:
            out.append(END)
        else:
            out.append(PLAIN)
    return out


def _panel(two_step):
    return Panel(default() + ([Alpha()] if two_step else []))


@pytest.mark.parametrize("two_step", [False, True], ids=["one_step", "two_step"])
@pytest.mark.parametrize("every", [1, 2, 3, 5])
def test_schedule_kinds_and_rows_bound_every_window(every, two_step):
    schedule = Schedule(every, _panel(two_step))
    for s in range(12):
        kind = STATS if schedule.is_stats(s) else END if schedule.is_end(s) else PLAIN
        assert kind == _kinds(every, two_step, s, 1)[0], s
    for n in range(1, 9):            # a buffer of rows(n) holds the measured steps of any n in a row
        most = max(sum(k != PLAIN for k in _kinds(every, two_step, first, n)) for first in range(12))
        assert schedule.rows(n) >= most
        if not two_step:
            assert schedule.rows(n) == most
    assert Schedule(0, _panel(two_step)).rows(8) == 0


class _Recording:
    """A stand-in for `Steps` that records the kind of every step it is asked for."""

    def __init__(self, two_step):
        self.panel = _panel(two_step).build([keras.Variable(np.zeros(2, np.float32), name="w")])
        self.finite_only, self.classification = frozenset(), False
        self.kinds = tf.Variable(tf.zeros([64], tf.int32))
        self.current = tf.Variable(0, dtype=tf.int64)

    def at_step(self, step):
        self.current.assign(step)

    def skipped(self):
        return None

    def _mark(self, kind):
        self.kinds.scatter_nd_update([[self.current]], [kind])
        return {"loss": tf.constant(0.0)}

    def plain_step(self, x, y):
        return self._mark(PLAIN)

    def stats_step(self, x, y):
        return self._mark(STATS)

    def end_step(self, x, y):
        return self._mark(END)


@pytest.mark.parametrize("xla", [False, True], ids=["loop", "xla"])
@pytest.mark.parametrize("two_step", [False, True], ids=["one_step", "two_step"])
@pytest.mark.parametrize("every, steps_per_call", [(1, 4), (3, 4), (4, 3), (5, 7)])
def test_the_runners_calls_follow_the_schedule_wherever_a_call_starts(every, steps_per_call, two_step,
                                                                      xla, xla_allowed):
    steps = _Recording(two_step)
    writer = tf.summary.create_noop_writer()
    runner = (XlaStepRunner(steps, writer, 1000, every, steps_per_call) if xla
              else StepRunner(steps, writer, 1000, every))
    x_all, y_all = tf.zeros([40, 2]), tf.zeros([40], tf.int32)
    rng, step = np.random.default_rng(0), 0
    for calls in (epoch_batches(rng, 40, 2, steps_per_call), epoch_batches(rng, 40, 3, steps_per_call)):
        for index in calls:
            first = tf.constant(step, tf.int64)
            runner.run(x_all, y_all, tf.constant(index), first, tf.constant(0, tf.int64))
            step += len(index)
    assert list(steps.kinds.numpy()[:step]) == _kinds(every, two_step, 0, step)
