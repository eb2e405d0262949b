"""Statistics that compile: a step records its values in variables, Python writes them.

Nothing inside an XLA-compiled function can write a summary, and a compiled call of many
steps (`steps_per_execution`, `--steps_per_call`) returns to Python only at its end. So
the statistics step records each statistics step's values in a `StatisticsBuffer` (rows
of fixed-shape, non-trainable variables; XLA compiles the assignments), and after the call
Python `drain`s it and writes every row at its own step. Scalars are kept in float64 with
a mask of the tags a step wrote (an instrument can skip a step: a batch of one has no
variance); histograms as TensorBoard's `[30, 3]` rows (`summaries.histogram_rows`), so a
batch of any size fits.
"""

import numpy as np
import tensorflow as tf

from tfmbgd import summaries
from tfmbgd.errors import UserError

BUCKETS = 30


# Variables that each replica updates on its own (no synchronization point, which a
# branch of `tf.cond` in a replica cannot hold), with the same values, since every replica
# computes the statistics of the merged moments; Python reads the first replica's.
FIRST_REPLICA = dict(synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def first_replica_variables():
    """A scope in which every new variable is made like the buffer's (`FIRST_REPLICA`): for
    the instruments' state, updated by the statistics step inside a replica."""
    def creator(next_creator, **kwargs):
        return next_creator(**{**kwargs, **FIRST_REPLICA})
    return tf.variable_creator_scope(creator)


class StatisticsBuffer:
    """Room for `capacity` statistics steps of the tags `scalar_tags` and `histogram_tags`.

    Make it under the strategy's scope (replicas record the same merged values: the first
    replica's are read). `record` runs in the compiled step, `drain` in Python after it.
    """

    def __init__(self, scalar_tags, histogram_tags, capacity):
        self.scalar_tags, self.histogram_tags = list(scalar_tags), list(histogram_tags)
        self.capacity = int(capacity)
        t, h, k = len(self.scalar_tags), len(self.histogram_tags), self.capacity

        def variable(shape, dtype):     # see `first_replica_variables`
            return tf.Variable(tf.zeros(shape, dtype), trainable=False, **FIRST_REPLICA)
        self.scalars = variable([k, t], tf.float64)
        self.written = variable([k, t + h], tf.bool)         # which tags the row holds
        self.histograms = variable([k, h, BUCKETS, 3], tf.float64)
        self.steps = variable([k], tf.int64)
        self.count = variable([], tf.int32)      # rows recorded since the last drain
        self.lost = variable([], tf.int32)       # rows that found the buffer full

    def record(self, values, step):
        """Records `values` (`{tag: tensor}`, tags among this buffer's) at `step`, in the
        next free row; a full buffer counts the row as lost (`drain` then says so)."""
        unknown = set(values) - set(self.scalar_tags) - set(self.histogram_tags)
        if unknown:
            raise UserError(f"the step wrote tags its instruments did not declare: {sorted(unknown)}")
        row = tf.minimum(self.count, self.capacity - 1)
        full = self.count >= self.capacity
        nan = tf.constant(float("nan"), tf.float64)
        scalars = tf.stack([tf.cast(values[tag], tf.float64) if tag in values else nan
                            for tag in self.scalar_tags]) if self.scalar_tags else tf.zeros([0], tf.float64)
        tags = self.scalar_tags + self.histogram_tags
        written = tf.constant([tag in values for tag in tags], tf.bool, shape=[len(tags)])
        histograms = tf.stack([summaries.histogram_rows(values[tag], BUCKETS) if tag in values
                               else tf.zeros([BUCKETS, 3], tf.float64) for tag in self.histogram_tags]) \
            if self.histogram_tags else tf.zeros([0, BUCKETS, 3], tf.float64)
        # Scatters, not slice assignments: XLA compiles a row index that is known only at
        # run time in a scatter. (A full buffer overwrites its last row; drain then fails.)
        def put(variable, value):
            return variable.assign(tf.tensor_scatter_nd_update(variable, [[row]], value[None]))
        updates = [put(self.scalars, scalars), put(self.written, written), put(self.histograms, histograms),
                   put(self.steps, tf.cast(step, tf.int64))]
        with tf.control_dependencies(updates):
            return tf.group(self.count.assign(tf.where(full, self.count, self.count + 1)),
                            self.lost.assign_add(tf.cast(full, tf.int32)))

    def drain(self):
        """The recorded rows, oldest first, as `(step, {tag: float}, {tag: [30, 3] rows})`,
        and empties the buffer (eagerly, between compiled calls).

        Raises:
          UserError: rows were lost to a full buffer (a bug: the capacity is sized from
            the calls' steps and the statistics schedule).
        """
        count, lost = int(self.count.numpy()), int(self.lost.numpy())
        if lost:
            self.lost.assign(0)
            raise UserError(f"{lost} statistics steps did not fit in a buffer of {self.capacity}; "
                            "this is a bug in tfmbgd, please report it")
        if not count:
            return []
        scalars, written = self.scalars.numpy()[:count], self.written.numpy()[:count]
        histograms, steps = self.histograms.numpy()[:count], self.steps.numpy()[:count]
        self.count.assign(0)
        rows = []
        for i in range(count):
            values = {tag: float(scalars[i, j]) for j, tag in enumerate(self.scalar_tags) if written[i, j]}
            t = len(self.scalar_tags)
            hists = {tag: histograms[i, j] for j, tag in enumerate(self.histogram_tags) if written[i, t + j]}
            rows.append((int(steps[i]), values, hists))
        return rows


def write(writer, rows, finite_only=()):
    """Writes drained `rows` with `writer`: scalars (those in `finite_only` only when
    finite) and histograms, each at its row's step."""
    with writer.as_default():
        for step, values, hists in rows:
            for tag, value in values.items():
                if tag in finite_only and not np.isfinite(value):
                    continue
                tf.summary.scalar(tag, value, step=step)
            for tag, rows_ in hists.items():
                tf.summary.write(tag, tf.constant(rows_), step=step, metadata=summaries.HISTOGRAM_METADATA)


def capacity(steps_per_call, stats_every):
    """Rows a buffer needs for the statistics steps of one call of `steps_per_call` steps:
    at most one every `stats_every` steps, wherever the call starts."""
    return max(1, -(-int(steps_per_call) // int(stats_every)))
