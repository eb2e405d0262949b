"""Running many train steps per compiled call, and drawing the batches of an epoch."""

import time

import numpy as np
import tensorflow as tf

from tfmbgd.loop import buffer, tensorboard
from tfmbgd.loop.steps import Schedule, capacity


class StepRunner:
    """Runs many train steps per `tf.function` call and writes their summaries from inside.

    Coming back to Python after every step costs more than a small step itself (and a
    sync per step); `model.fit` avoids it with `steps_per_execution`, and so does this.
    Batches are gathered from the training set held as tensors, by indices drawn in
    Python, so every batch of a call has the same static size: a batch of one is known to
    have no variance, and an epoch's remainder batch runs in a call of its own.

    Besides the step's own values it writes, on log steps, `loss_by/examples_seen` (the
    x-axis is the number of examples used so far) and `loss_by/milliseconds` (training time
    since this process's first step, without the tracing of compiled calls), so runs with
    different batch sizes compare on one chart. It keeps the running sums of the finite
    values of the tags its instruments' `summaries` name, for `means()`.
    """

    def __init__(self, steps, writer, log_every, stats_every):
        """`writer`: a `tf.summary` writer, or a function that returns one, called when the
        first call is traced (a new run's event files appear once its directory is in place)."""
        self.steps, self._writer = steps, writer
        self.log_every, self.schedule = log_every, Schedule(stats_every, steps.panel)
        self.lags = steps.panel.lags
        self.descriptions = tensorboard.descriptions(steps.panel)
        averaged = [s.tag for s in steps.panel.summaries()]
        self._sums = {tag: (tf.Variable(0.0, trainable=False, dtype=tf.float64),
                            tf.Variable(0, trainable=False, dtype=tf.int64)) for tag in averaged}
        self._compiled = {}
        # loss_by/milliseconds counts from the first step's write (set in the graph, so the
        # first call's tracing and graph optimization do not count), less later tracing.
        self._origin = tf.Variable(-1.0, trainable=False, dtype=tf.float64)

    def compiles(self, batch):
        """Whether the next call with batches of `batch` examples traces a new function."""
        return batch not in self._compiled

    def compile(self, x_all, y_all, batch):
        """Traces and compiles the call for batches of `batch` examples by running it for no
        step (nothing changes), so that the first real call runs at full speed."""
        none = tf.constant(0, tf.int64)
        self.run(x_all, y_all, tf.zeros([0, batch], tf.int32), none, none)

    def run(self, x_all, y_all, index, first_step, first_example):
        """Runs `len(index)` steps in one call: one compiled function per batch size, for
        any number of steps (checkpoints and epoch ends cut calls short)."""
        batch = int(index.shape[1])
        if batch not in self._compiled:
            spec = lambda t: tf.TensorSpec(t.shape, t.dtype)
            self._compiled[batch] = tf.function(self._run, input_signature=[
                spec(x_all), spec(y_all), tf.TensorSpec([None, batch], tf.int32),
                tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)])
            began = time.time()
            self._compiled[batch].get_concrete_function()
            if self._origin.numpy() >= 0:
                self._origin.assign_add(time.time() - began)
        return self._compiled[batch](x_all, y_all, index, first_step, first_example)

    @property
    def writer(self):
        if callable(self._writer):
            self._writer = self._writer()
        return self._writer

    def variables(self):
        """The running sums behind `means()` (checkpointed with the run)."""
        return [v for pair in self._sums.values() for v in pair]

    def means(self):
        """Mean of each summarised tag over the steps that wrote it (NaN if none)."""
        return {tag: float(total.numpy()) / int(count.numpy()) if int(count.numpy()) else float("nan")
                for tag, (total, count) in self._sums.items()}

    def _run(self, x_all, y_all, index, first_step, first_example, n=None):
        """Steps `first_step, first_step + 1, ...` on batches `x_all[index[i]]` (the first
        `n` rows of `index`, default all); returns the sum of their mean losses (float32;
        NaN if one was).

        No step sits in a `tf.cond`: a step wrapped in a cond measured slower on a CPU, so
        choosing the step kind per step would make every step pay for `--stats_every`. The
        statistics steps of a call (`self.schedule`) are known from `first_step` alone: the
        plain steps before the first of them run in a loop, then each statistics step is
        followed by a loop of the plain steps up to the next one. With a two-step
        instrument (width 2) the step after each statistics step is an end step
        (`Steps.end_step`: the two-step instruments only).
        """
        n = tf.shape(index)[0] if n is None else n
        batch = tf.cast(tf.shape(index)[1], tf.int64)

        def one(i, kind):
            i64 = tf.cast(i, tf.int64)
            where = (first_step + i64, first_example + i64 * batch)
            x, y = tf.gather(x_all, index[i]), tf.gather(y_all, index[i])
            self.steps.at_step(where[0])
            if kind == "plain":
                loss = self._plain(x, y, where)
            else:
                loss = self._with_stats(x, y, where, self.steps.stats_step if kind == "stats"
                                        else self.steps.end_step)
            return tf.cast(loss, tf.float32)

        def steps_from(start, stop, step, total, body):
            # An explicit while loop, not autograph's `for i in tf.range(...)`: nested in
            # another loop, that builds a Range op whose bounds XLA requires to be constants.
            return tf.while_loop(lambda i, total: i < stop, lambda i, total: (i + step, body(i, total)),
                                 (start, total))[1]

        def plain_steps(start, stop, total):
            return steps_from(start, stop, 1, total, lambda i, total: total + one(i, "plain"))

        if not self.schedule.every:
            return plain_steps(0, n, tf.constant(0.0))
        every, width = self.schedule.every, self.schedule.width

        def end_steps(start, stop, total):
            return steps_from(start, stop, 1, total, lambda i, total: total + one(i, "end"))

        def stats_then_plain(i, total):
            total += one(i, "stats")
            if width > 1:
                total = end_steps(i + 1, tf.minimum(n, i + width), total)
            return plain_steps(i + width, tf.minimum(n, i + every), total) if every > width else total
        # The call's first period: the first i with (first_step + i) % every == 0. Before it,
        # the rest of a pair that the previous call began, then plain steps.
        first = tf.minimum(n, tf.cast(tf.math.floormod(-first_step, every), tf.int32))
        if width == 1:
            total = plain_steps(0, first, tf.constant(0.0))
        else:
            offset = tf.cast(tf.math.floormod(first_step, every), tf.int32)
            head = tf.minimum(first, tf.where(offset > 0, tf.maximum(width - offset, 0), 0))
            total = plain_steps(head, first, end_steps(0, head, tf.constant(0.0)))
        return steps_from(first, n, every, total, stats_then_plain)

    def _plain(self, x, y, where):
        out = self.steps.plain_step(x, y)
        tf.cond(where[0] % self.log_every == 0, lambda: self._write(out, where),
                lambda: tf.constant(False))
        return out["loss"]

    def _with_stats(self, x, y, where, step_fn=None):
        out = (step_fn or self.steps.stats_step)(x, y)
        for tag, (total, count) in self._sums.items():
            if tag in out:
                value = tf.cast(out[tag], tf.float64)
                finite = tf.math.is_finite(value)
                total.assign_add(tf.where(finite, value, tf.zeros_like(value)))
                count.assign_add(tf.cast(finite, tf.int64))
        self._write(out, where)
        return out["loss"]

    def _with_skipped(self, values):
        """`values` and, with `on_nonfinite="skip"`, the count of skipped updates."""
        skipped = self.steps.skipped()
        return values if skipped is None else {**values, "nonfinite/skipped": skipped}

    def _write(self, values, where):
        step, examples = where
        values = self._with_skipped(values)
        tensorboard.write_in_graph(self.writer, values, step, self.steps.finite_only, lags=self.lags,
                                   descriptions=self.descriptions)
        now = _clock()
        origin = self._origin.assign(tf.where(self._origin < 0, now, self._origin))
        elapsed_ms = tf.cast((now - origin) * 1000.0, tf.int64)
        tensorboard.write_in_graph(self.writer, {"loss_by/examples_seen": values["loss"]}, examples,
                                   descriptions=self.descriptions)
        tensorboard.write_in_graph(self.writer, {"loss_by/milliseconds": values["loss"]}, elapsed_ms,
                                   descriptions=self.descriptions)
        return tf.constant(True)


EXAMPLES = "_examples"      # a buffered row's examples seen: the x of loss_by/examples_seen


class XlaStepRunner(StepRunner):
    """A `StepRunner` whose calls XLA compiles (`--jit_compile`, like `fit`'s
    `jit_compile=True`).

    Nothing inside an XLA-compiled function can write a summary, so the steps record their
    values in a `tfmbgd.loop.buffer.StatisticsBuffer` and Python writes them after each call.
    Every call runs `steps_per_call` rows of indices, the unused ones padding, and takes the
    number of steps as a tensor: XLA compiles once per batch size, not once per call length.
    The time axis of `loss_by/milliseconds` is the host clock around each call, shared
    evenly among the call's steps (a compiled call has no clock inside), compiling left
    out.
    """

    def __init__(self, steps, writer, log_every, stats_every, steps_per_call):
        super().__init__(steps, writer, log_every, stats_every)
        self.steps_per_call = steps_per_call
        base = ["loss"] + ["accuracy"] * steps.classification + \
            ["nonfinite/skipped"] * (steps.skipped() is not None) + [EXAMPLES]
        rows = capacity(steps_per_call, log_every) + self.schedule.rows(steps_per_call)
        self._buffer = buffer.StatisticsBuffer.for_panel(steps.panel, rows, base)
        self._began, self._paused = None, 0.0      # the first call's start; compiling since
        self._write_rows = None                    # the buffer's writer function, made at first use

    def compile(self, x_all, y_all, batch):
        began = time.time()
        super().compile(x_all, y_all, batch)
        if self._began is not None:
            self._paused += time.time() - began

    def run(self, x_all, y_all, index, first_step, first_example):
        n, batch = int(index.shape[0]), int(index.shape[1])
        if batch not in self._compiled:
            spec = lambda t: tf.TensorSpec(t.shape, t.dtype)
            self._compiled[batch] = tf.function(self._run, jit_compile=True, input_signature=[
                spec(x_all), spec(y_all), tf.TensorSpec([self.steps_per_call, batch], tf.int32),
                tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int32)])
        padded = tf.concat([index, tf.zeros([self.steps_per_call - n, batch], tf.int32)], 0)
        began = time.time()
        total = self._compiled[batch](x_all, y_all, padded, first_step, first_example, tf.constant(n))
        total = total.numpy()                   # the call has run: its rows are in the buffer
        if n:
            ended = time.time()
            if self._began is None:
                self._began = began
            if self._write_rows is None:
                self._write_rows = self._buffer.writer_function(self.writer, self.steps.finite_only,
                                                                skip=(EXAMPLES,), extra=self._write_by,
                                                                lags=self.lags,
                                                                descriptions=self.descriptions)
            since = began - self._began - self._paused
            self._write_rows(first_step, tf.constant(n, tf.int64), tf.constant(since * 1000, tf.float64),
                             tf.constant((ended - began) * 1000, tf.float64))
        return total

    def _write(self, values, where):
        step, examples = where
        values = self._with_skipped(values)
        with tf.control_dependencies([self._buffer.record({**values, EXAMPLES: examples}, step)]):
            return tf.constant(True)

    @staticmethod
    def _write_by(values, step, first_step, n, since_ms, call_ms):
        """A row's loss against examples seen and milliseconds (the call's time shared evenly
        among its steps)."""
        done = tf.cast(step - first_step + 1, tf.float64) / tf.cast(n, tf.float64)
        ms = tf.cast(since_ms + done * call_ms, tf.int64)
        about = tensorboard.LOOP_DESCRIPTIONS
        tf.summary.scalar("loss_by/examples_seen", values["loss"], step=tf.cast(values[EXAMPLES], tf.int64),
                          description=about["loss_by/examples_seen"])
        tf.summary.scalar("loss_by/milliseconds", values["loss"], step=ms,
                          description=about["loss_by/milliseconds"])


def _clock():
    """Seconds since the epoch, as `time.time()`, read when the op runs (float64 scalar).

    `tf.timestamp` is one cheap op but is refused under op determinism (`--deterministic`);
    there the host clock is read through `tf.numpy_function` (cheaper than
    `tf.py_function`). Whether determinism is on is known only through TensorFlow's
    internal `is_op_determinism_enabled`; where it is missing the safe choice is taken.
    """
    from tensorflow.python.framework import config as tf_config  # no public accessor

    if not getattr(tf_config, "is_op_determinism_enabled", lambda: True)():
        return tf.timestamp()
    now = tf.numpy_function(time.time, [], tf.float64, stateful=True)
    now.set_shape([])
    return now


def epoch_batches(rng, n, batch, steps_per_call, skip=0, checkpoint_every=0, first_step=0,
                  drop_remainder=False):
    """Index arrays for one epoch, one array `[steps, batch]` per compiled call.

    The epoch's order is drawn from `rng` (every example once); full batches first, then
    the remainder batch alone (left out with `drop_remainder`: each epoch then misses the
    last `n % batch` examples of its order, different ones each epoch). The first `skip`
    steps are left out (a resumed epoch), and calls end at multiples of `checkpoint_every`
    (counted from `first_step`, the step of the first batch returned) so that checkpoints
    fall between calls.
    """
    order = rng.permutation(n).astype(np.int32)
    full = n // batch * batch
    batches = list(order[:full].reshape(-1, batch))
    if full < n and not drop_remainder:
        batches.append(order[full:])
    batches = batches[skip:]
    calls, step = [], first_step
    while batches:
        size = len(batches[0])
        limit = steps_per_call
        if checkpoint_every:
            limit = min(limit, checkpoint_every - step % checkpoint_every)
        take = 1
        while take < min(limit, len(batches)) and len(batches[take]) == size:
            take += 1
        calls.append(np.stack(batches[:take]))
        batches, step = batches[take:], step + take
    return calls
