"""TensorBoard: dicts of numbers in, event files out.

A run (`tfmbgd.loop.rundir`) has one writer per split (`train/`, `test/`). The step of
every summary is the optimizer step. The custom-scalars layout comes from the instruments'
charts (`tfmbgd.instruments.Panel.charts`).
"""

import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar
from tensorboard.plugins.histogram import metadata as histogram_metadata

from tfmbgd.instruments.base import Chart


class RunWriters:
    """One `tf.summary` writer per split, created on first use and closed by `close()`.
    `run_dir` may change until the first writer is made (a new run's directory is renamed
    into place first)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._writers = {}

    def writer(self, split):
        """The `tf.summary` writer of `split` ("train", "test"), created on first use."""
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(os.path.join(self.run_dir, split))
        return self._writers[split]

    def write(self, split, values, step):
        """Writes `values` at `step`: numbers as scalars, vectors (e.g. the per-example
        gradient norms) as histograms."""
        with self.writer(split).as_default(step=step):
            for tag, value in values.items():
                if np.ndim(value) == 0:
                    tf.summary.scalar(tag, value, description=LOOP_DESCRIPTIONS.get(tag))
                else:
                    tf.summary.histogram(tag, value)

    def close(self):
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_in_graph(writer, values, step, finite_only=(), lags=None, descriptions=None):
    """Writes a dict of tensors at `step` from inside a `tf.function`.

    Scalars become scalar summaries and vectors (the per-example gradient norms)
    histograms; a scalar whose tag is in `finite_only` is written only when finite (the
    noise scale is undefined while the noise hides the signal). The writes usually sit in
    a `tf.cond` branch: `name_scope(None)` keeps its "cond/" scope out of the tags, so they
    read as when written eagerly. `descriptions` `{tag: text}`: TensorBoard's text for each
    tag (shown beside the chart). A `[k, 3]` value is a histogram's rows already (fixed
    bins); `lags` `{tag: j}` writes those tags at `step - j` (two-step instruments).
    """
    lags, descriptions = lags or {}, descriptions or {}
    with writer.as_default(step=step), tf.compat.v1.name_scope(None):
        for tag, value in values.items():
            text = descriptions.get(tag)
            if tag in lags:
                write_in_graph(writer, {tag: value}, step - lags[tag], finite_only, descriptions=descriptions)
            elif value.shape.rank == 4:
                tf.summary.image(tag, value, description=text)
            elif value.shape.rank == 2:
                tf.summary.write(tag, tf.cast(value, tf.float64), metadata=histogram_metadata_for(text))
            elif value.shape.rank:
                histogram(tag, value, description=text)
            elif tag in finite_only:
                tf.cond(tf.math.is_finite(value), lambda t=tag, v=value, d=text: _scalar(t, v, d),
                        lambda: tf.constant(False))
            else:
                tf.summary.scalar(tag, value, description=text)


HISTOGRAM_METADATA = histogram_metadata.create_summary_metadata(display_name=None, description=None)

# What the loop's own tags are; the instruments describe theirs (`Panel.descriptions`).
LOOP_DESCRIPTIONS = {
    "loss": "mean per-example loss: of the mini-batch (train), of the whole split after each epoch (test)",
    "accuracy": "share of correct argmax predictions: of the mini-batch (train), of the split (test)",
    "loss_by/examples_seen": "the mini-batch loss against the number of training examples seen (x axis)",
    "nonfinite/skipped": "updates skipped so far because the loss or a gradient was not finite",
    "loss_by/milliseconds": "The mini-batch loss against milliseconds of training since this process's "
                            "first step: the time to trace and compile the train step is left out, so runs "
                            "compare by the time their steps take.",
}


def descriptions(panel):
    """`{tag: text}` of a run's tags: the loop's own and its instruments' (`Panel.descriptions`)."""
    return {**LOOP_DESCRIPTIONS, **panel.descriptions}


def histogram_metadata_for(description):
    """The histogram plugin's metadata, with TensorBoard's `description` of the tag."""
    if not description:
        return HISTOGRAM_METADATA
    return histogram_metadata.create_summary_metadata(display_name=None, description=description)


def histogram(tag, values, buckets=30, description=None):
    """Writes the histogram `tf.summary.histogram` writes for the finite `values`, in fewer
    ops (to the default writer, at its default step): `histogram_rows`."""
    return tf.summary.write(tag, histogram_rows(values, buckets),
                            metadata=histogram_metadata_for(description))


def histogram_rows(values, buckets=30):
    """The `[buckets, 3]` float64 rows (left edge, right edge, count) of TensorBoard's
    histogram of the finite `values`; ops that XLA compiles, of fixed shapes.

    The rows `tf.summary.histogram` writes: equal-width buckets from the minimum to the
    maximum, a value's bucket `floor((v - min) / width)` with the maximum in the last; all
    values equal: zero-width buckets at that value, all counted in the last. TensorBoard's
    version branches with two `tf.cond`s and counts by a `[size, buckets]` one-hot matrix,
    several ops per write; a statistics step writes the per-example norms every
    time. Here the bucket index is that of `tf.histogram_fixed_width` (which XLA cannot
    compile), counted by a segment sum, and a single value needs no branch. Values are
    counted in float64: from float32 (or narrower) inputs the range `max - min` cannot
    overflow. Non-finite values are left out (a NaN would crash the bucketing and give
    meaningless buckets in TensorBoard's version); with none finite the buckets are empty,
    at 0.
    """
    data = tf.cast(tf.reshape(values, [-1]), tf.float64)
    finite = tf.math.is_finite(data)
    inf = tf.constant(float("inf"), tf.float64)
    low = tf.reduce_min(tf.where(finite, data, inf))
    high = tf.reduce_max(tf.where(finite, data, -inf))
    empty = low > high
    low, high = tf.where(empty, tf.zeros_like(low), low), tf.where(empty, tf.zeros_like(high), high)
    single = tf.equal(low, high)
    # One value v: the range [v - max(1, |v|), v] puts it in the last bucket, as TensorBoard
    # does (v - 1 would round to v for large v).
    below = tf.where(single, low - tf.maximum(tf.abs(low), 1.0), low)
    step = (high - below) / buckets
    data = tf.where(finite, data, below)              # counted with weight 0 below
    index = tf.cast(tf.minimum((data - below) / step, buckets - 1.0), tf.int32)
    counts = tf.math.unsorted_segment_sum(tf.cast(finite, tf.float64), index, buckets)
    edges = tf.concat([tf.linspace(low, high, buckets + 1)[:-1], [high]], 0)
    return tf.stack([edges[:-1], edges[1:], counts], axis=1)


def _scalar(tag, value, description=None):
    with tf.compat.v1.name_scope(None):
        return tf.summary.scalar(tag, value, description=description)


LOSS_CHARTS = (
    Chart("Loss (train and test)", "loss by step", ("^loss$",)),
    Chart("Loss (train and test)", "loss by examples seen", ("^loss_by/examples_seen$",)),
    Chart("Loss (train and test)", "loss by milliseconds of training (compiling left out)",
          ("^loss_by/milliseconds$",)),
    Chart("Loss (train and test)", "accuracy", ("^accuracy$",)),
)


def layout(charts=(), loss_charts=True):
    """The custom-scalars layout: the loss charts (unless not `loss_charts`), then `charts`
    (a run's instruments', `Panel.charts()`), grouped by category in order."""
    categories = {}
    for c in (LOSS_CHARTS if loss_charts else ()) + tuple(charts):
        categories.setdefault(c.category, []).append(layout_pb2.Chart(
            title=c.title, multiline=layout_pb2.MultilineChartContent(tag=list(c.patterns))))
    return layout_pb2.Layout(category=[layout_pb2.Category(title=title, chart=charts)
                                       for title, charts in categories.items()])


def write_layout(writer, charts=(), loss_charts=True):
    """Writes the custom-scalars `layout` with `writer` (once per run)."""
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(
            custom_scalar.pb(layout(charts, loss_charts)).SerializeToString(), step=0)
