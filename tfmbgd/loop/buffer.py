"""Statistics that compile: a step records its values in variables, written after the call.

Nothing inside an XLA-compiled function can write a summary, and a compiled call of many
steps (`steps_per_execution`, `--steps_per_call`) returns to Python only at its end. So
the statistics step records each statistics step's values in a `StatisticsBuffer` (rows
of fixed-shape, non-trainable variables; XLA compiles the assignments), and after the call
a `writer_function` (an ordinary `tf.function`) writes every row at its own step.
Scalars are kept in float64 with a mask of the tags a step wrote (an instrument can skip
a step: a batch of one has no variance); histograms as TensorBoard's `[30, 3]` rows
(`tensorboard.histogram_rows`), so a batch of any size fits.
"""

import tensorflow as tf

from tfmbgd.errors import UserError
from tfmbgd.loop import tensorboard

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
    replica's are read). `record` runs in the compiled step, `writer_function`'s function
    after it.
    """

    def __init__(self, scalar_tags, histogram_tags, capacity, widths=None, images=None):
        """`widths`: `{tag: bins}` of the histogram tags whose values are their `[bins, 3]`
        rows already (fixed bins); the others are bucketed into `BUCKETS` rows. `images`:
        `{tag: shape}` of uint8 image tags."""
        self.scalar_tags, self.histogram_tags = list(scalar_tags), list(histogram_tags)
        self.image_shapes = dict(images or {})
        self.capacity = int(capacity)
        self.widths = {tag: (widths or {}).get(tag, BUCKETS) for tag in self.histogram_tags}
        self.width = max([BUCKETS, *self.widths.values()])
        t, h, k = len(self.scalar_tags), len(self.histogram_tags), self.capacity

        def variable(shape, dtype):     # see `first_replica_variables`
            return tf.Variable(tf.zeros(shape, dtype), trainable=False, **FIRST_REPLICA)
        self.scalars = variable([k, t], tf.float64)
        self.written = variable([k, t + h + len(self.image_shapes)], tf.bool)   # which tags the row holds
        self.histograms = variable([k, h, self.width, 3], tf.float64)
        self.images = {tag: variable([k, *shape], tf.uint8) for tag, shape in self.image_shapes.items()}
        self.steps = variable([k], tf.int64)
        self.count = variable([], tf.int32)      # rows recorded since the last drain
        self.lost = variable([], tf.int32)       # rows that found the buffer full

    @classmethod
    def for_panel(cls, panel, capacity, extra_scalars=()):
        """Room for `capacity` steps of the tags of the instruments `panel` (built), after the
        scalar tags `extra_scalars` (the loss, ...)."""
        spec = panel.buffer_spec()
        return cls([*extra_scalars, *spec["scalar_tags"]], spec["histogram_tags"], capacity,
                   widths=spec["widths"], images=spec["images"])

    def record(self, values, step):
        """Records `values` (`{tag: tensor}`, tags among this buffer's) at `step`, in the
        next free row; a full buffer counts the row as lost (the writer then says so)."""
        unknown = set(values) - set(self.scalar_tags) - set(self.histogram_tags) - set(self.image_shapes)
        if unknown:
            raise UserError(f"the step wrote tags its instruments did not declare: {sorted(unknown)}")
        row = tf.minimum(self.count, self.capacity - 1)
        full = self.count >= self.capacity
        nan = tf.constant(float("nan"), tf.float64)
        scalars = tf.stack([tf.cast(values[tag], tf.float64) if tag in values else nan
                            for tag in self.scalar_tags]) if self.scalar_tags else tf.zeros([0], tf.float64)
        tags = self.scalar_tags + self.histogram_tags + list(self.image_shapes)
        written = tf.constant([tag in values for tag in tags], tf.bool, shape=[len(tags)])
        histograms = tf.stack([self._rows(values[tag]) if tag in values
                               else tf.zeros([self.width, 3], tf.float64) for tag in self.histogram_tags]) \
            if self.histogram_tags else tf.zeros([0, self.width, 3], tf.float64)
        # Scatters, not slice assignments: XLA compiles a row index that is known only at
        # run time in a scatter. (A full buffer overwrites its last row; the writer fails.)
        def put(variable, value):
            return variable.assign(tf.tensor_scatter_nd_update(variable, [[row]], value[None]))
        updates = [put(self.scalars, scalars), put(self.written, written), put(self.histograms, histograms),
                   put(self.steps, tf.cast(step, tf.int64))]
        updates += [put(self.images[tag], tf.cast(values[tag], tf.uint8)) for tag in self.image_shapes
                    if tag in values]
        with tf.control_dependencies(updates):
            return tf.group(self.count.assign(tf.where(full, self.count, self.count + 1)),
                            self.lost.assign_add(tf.cast(full, tf.int32)))

    def _rows(self, value):
        """A histogram's rows padded to the buffer's width (the writer cuts them back)."""
        if value.shape.rank == 2:
            rows = tf.cast(value, tf.float64)
        else:
            rows = tensorboard.histogram_rows(value, BUCKETS)
        return tf.pad(rows, [[0, self.width - rows.shape[0]], [0, 0]])

    def writer_function(self, writer, finite_only=(), skip=(), extra=None, lags=None, descriptions=None):
        """A `tf.function` (not XLA-compiled) that writes the recorded rows with `writer`,
        each at its step, and empties the buffer; it returns the number of rows written.

        In one call, not one eager write per value: eager `tf.summary.scalar` calls are
        slow enough that, for some thirty tags per statistics step, they would be most of
        what the statistics cost `fit`. Tags in `finite_only` are written only when finite, tags
        in `skip` not at all; `extra(values, step, *args)` (traced once per row, `values`
        `{tag: scalar tensor}`) writes more from a row, with the function's `*args`.
        `lags` `{tag: j}`: those tags are written at their row's step minus j. `descriptions`
        `{tag: text}`: TensorBoard's description of each tag.

        Raises (when called):
          tf.errors.InvalidArgumentError: rows were lost to a full buffer (a bug: the
            capacity is sized from the calls' steps and the schedule).
        """
        t = len(self.scalar_tags)
        lags, about = lags or {}, descriptions or {}
        only_finite = [tag in finite_only for tag in self.scalar_tags]

        @tf.function
        def write(*args):
            count = tf.convert_to_tensor(self.count)
            tf.debugging.assert_equal(tf.convert_to_tensor(self.lost), 0, message=(
                f"statistics steps did not fit in a buffer of {self.capacity} rows; this is a bug in "
                "tfmbgd, please report it"))
            scalars, written = tf.convert_to_tensor(self.scalars), tf.convert_to_tensor(self.written)
            histograms, steps = tf.convert_to_tensor(self.histograms), tf.convert_to_tensor(self.steps)
            with writer.as_default():
                for i in tf.range(count):
                    step, row, wrote = steps[i], scalars[i], written[i]
                    values = {tag: row[j] for j, tag in enumerate(self.scalar_tags)}
                    for j, tag in enumerate(self.scalar_tags):
                        if tag in skip:
                            continue
                        ok = wrote[j] & tf.math.is_finite(row[j]) if only_finite[j] else wrote[j]
                        at = step - lags.get(tag, 0)
                        tf.cond(ok, lambda tag=tag, value=row[j], at=at: _unscoped(
                            tf.summary.scalar, tag, value, step=at, description=about.get(tag)),
                                lambda: tf.constant(False))
                    for k, tag in enumerate(self.histogram_tags):
                        at = step - lags.get(tag, 0)
                        tf.cond(wrote[t + k],
                                lambda tag=tag, rows=histograms[i, k, :self.widths[tag]], at=at: _unscoped(
                                    tf.summary.write, tag, rows, step=at,
                                    metadata=tensorboard.histogram_metadata_for(about.get(tag))),
                                lambda: tf.constant(False))
                    for k, tag in enumerate(self.image_shapes):
                        at = step - lags.get(tag, 0)
                        tf.cond(wrote[t + len(self.histogram_tags) + k],
                                lambda tag=tag, image=self.images[tag][i], at=at: _unscoped(
                                    tf.summary.image, tag, image, step=at, description=about.get(tag)),
                                lambda: tf.constant(False))
                    if extra is not None:
                        _unscoped(extra, values, step, *args)
            with tf.control_dependencies([count]):
                self.count.assign(0)
            return count
        return write


def _unscoped(write, *args, **kwargs):
    """`write(...)` outside the loop's and branches' name scopes, which would prefix the tags."""
    with tf.compat.v1.name_scope(None):
        return write(*args, **kwargs)
