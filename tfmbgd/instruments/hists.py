"""Histograms of the per-example gradients' elements (Cockpit's GradHist1d and GradHist2d).

`grad_hist/elements`: every element of every per-example gradient `g_n` (unscaled), counted
in 100 equal bins on (-2, 2), values outside counted in the edge bins (Cockpit clamps so),
written as a TensorBoard histogram. The per-example gradients are built one variable and
a few examples at a time (`CHUNK_ELEMENTS`) from the step's forms (the `DOTS` need), so no
B x parameters tensor lives at once. It reads B x P numbers, so it costs about a backward
pass per statistics step whatever the method: the one instrument of Cockpit's economy set
that is not nearly free.

`grad_hist/elements_vs_params`: the 2-D histogram of gradient element (rows, 40 bins on
(-2, 2)) against the parameter's value (columns, 50 bins on (-r, r), r the largest
parameter magnitude at that step), as an image: log(1 + count), dark = many.
"""

import functools
import math

import tensorflow as tf

from tfmbgd.engine import forms
from tfmbgd.instruments.base import DOTS, PARAMETERS, Instrument

LOW, HIGH = -2.0, 2.0


def _bins(values, low, high, bins):
    """Edge-clamped bin indices (int32) of `values` in `bins` equal bins on (low, high)."""
    index = tf.floor((tf.cast(values, tf.float32) - low) / (high - low) * bins)
    return tf.cast(tf.clip_by_value(index, 0, bins - 1), tf.int32)


def _outer_products(a, d, scale):
    """`scale * a_n^T d_n`, `[n, K, C]`: a Dense kernel's per-example gradients."""
    return scale * a[:, :, None] * d[:, None, :]


@functools.cache
def _fused(make, bins):
    """`_bins(make(*args), low, high, bins)` as one XLA-compiled function: a single fused pass
    (TensorFlow's kernels make one pass per op, slower over a Dense layer's per-example
    gradients), and with `_outer_products` the products are never stored as floats (the
    costs: `benchmarks/cockpit_cost.py`)."""
    def index(*args):
        *args, low, high = args
        return _bins(make(*args), low, high, bins)
    return tf.function(index, jit_compile=True, autograph=False)


def _fused_bins(make, *args, low, high, bins):
    """Edge-clamped bin indices of `make(*args)`, in one XLA-fused pass (`_fused`)."""
    return _fused(make, bins)(*(tf.cast(t, tf.float32) for t in (*args, low, high)))


def _count(index, bins):
    """`[bins]` int32: how many of `index` fall in each bin. `bincount` where TensorFlow runs
    the op (several times faster on a CPU than a segment sum), a segment sum where XLA
    compiles it (it has no bincount)."""
    if forms.in_xla():
        return tf.math.unsorted_segment_sum(tf.ones_like(index), index, bins)
    return tf.math.bincount(index, minlength=bins, maxlength=bins)


CHUNK_ELEMENTS = 1 << 19     # per-example gradient elements built at a time (2 MiB of float32)


def _over_chunks(batch, shape, count, bins):
    """`sum_k count(start_k, stop_k)` (`[bins]` int32 each) over the batch in chunks of as
    many examples as make `CHUNK_ELEMENTS` elements of a variable of `shape` (at least one):
    a loop, so one chunk's per-example gradients live at a time, and they stay in the CPU's
    caches (faster than the whole batch at once)."""
    chunk = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape)))
    b = tf.cast(batch, tf.int32)

    def body(start, total):
        return start + chunk, total + count(start, tf.minimum(start + chunk, b))
    first = (tf.constant(0), tf.zeros([bins], tf.int32))
    return tf.while_loop(lambda start, total: start < b, body, first)[1]


def element_counts(measurement, bins=100, low=LOW, high=HIGH):
    """`[bins]` float64 counts of the per-example gradient elements (see the module)."""
    project = measurement.require(DOTS, measurement.project)
    counts = tf.zeros([bins], tf.float64)
    for piece in project.pieces():           # micro-batches: one after another
        for i, v in enumerate(measurement.variables):
            outer = piece.outer(i)

            def count(start, stop, i=i, shape=tuple(v.shape), piece=piece, outer=outer):
                if outer is not None:
                    a, d, scale = outer
                    index = _fused_bins(_outer_products, a[start:stop], d[start:stop], scale,
                                        low=low, high=high, bins=bins)
                else:
                    index = _fused_bins(tf.identity, piece.explicit(i, shape, start, stop),
                                        low=low, high=high, bins=bins)
                return _count(tf.reshape(index, [-1]), bins)
            counts += tf.cast(_over_chunks(piece.batch, tuple(v.shape), count, bins), tf.float64)
    return counts


def histogram_rows(counts, low, high):
    """TensorBoard's `[bins, 3]` histogram rows (left edge, right edge, count)."""
    bins = counts.shape[0]
    edges = tf.linspace(tf.constant(low, tf.float64), tf.constant(high, tf.float64), bins + 1)
    return tf.stack([edges[:-1], edges[1:], counts], axis=1)


class GradHist1d(Instrument):
    """`grad_hist/elements`: the histogram of every per-example gradient element."""

    name = "grad_hist"
    needs = frozenset({DOTS})
    histograms = frozenset({"grad_hist/elements"})
    bins = {"grad_hist/elements": 100}

    def tags(self, names):
        return {"grad_hist/elements": "every per-example gradient element, 100 bins on (-2, 2), "
                                      "edge-clamped (Cockpit's GradHist1d)"}

    def compute(self, measurement):
        return {"grad_hist/elements": histogram_rows(element_counts(measurement), LOW, HIGH)}


PIXELS = 4                        # image pixels per bin, each way
AXIS = (40, 110, 220)             # the axes' colour, drawn over light pixels only


class GradHist2d(Instrument):
    """`grad_hist/elements_vs_params`: gradient element against parameter value, an image."""

    name = "grad_hist_2d"
    needs = frozenset({DOTS, PARAMETERS})
    shape = (40, 50)
    images = {"grad_hist/elements_vs_params": (1, shape[0] * PIXELS, shape[1] * PIXELS, 3)}

    def tags(self, names):
        return {"grad_hist/elements_vs_params": (
            "2-D histogram of per-example gradient elements (rows, 40 bins on (-2, 2), top = -2) "
            "against parameter values (columns, 50 bins on (-r, r), r = largest |parameter|); "
            "log(1 + count), dark = many; 4x4 pixels per bin, blue axes at gradient 0 (across) "
            "and parameter 0 (down) (Cockpit's GradHist2d)")}

    def compute(self, measurement):
        return {"grad_hist/elements_vs_params": image(counts_2d(measurement, *self.shape))}


def counts_2d(measurement, rows=40, columns=50):
    """`[rows, columns]` float64 counts: gradient elements against the parameters' values
    before the update, on (-2, 2) x (-r, r)."""
    project = measurement.require(DOTS, measurement.project)
    before = measurement.require(PARAMETERS, measurement.before)
    largest = [tf.reduce_max(tf.abs(tf.cast(p, tf.float32))) for p in before]
    r = tf.maximum(tf.reduce_max(tf.stack(largest)), 1e-12)
    counts = tf.zeros([rows * columns], tf.float64)
    for piece in project.pieces():
        for i, v in enumerate(measurement.variables):
            column = _bins(tf.reshape(before[i], [-1]), -r, r, columns)

            def count(start, stop, i=i, shape=tuple(v.shape), column=column, piece=piece):
                g = piece.explicit(i, shape, start, stop)
                row = _fused_bins(tf.identity, tf.reshape(g, [tf.shape(g)[0], -1]),
                                  low=LOW, high=HIGH, bins=rows)
                return _count(tf.reshape(row * columns + column[None], [-1]), rows * columns)
            found = _over_chunks(piece.batch, tuple(v.shape), count, rows * columns)
            counts += tf.cast(found, tf.float64)
    return tf.reshape(counts, [rows, columns])


def image(counts):
    """`[1, rows * PIXELS, columns * PIXELS, 3]` uint8: log(1 + count), scaled so the largest
    is black, each bin a PIXELS x PIXELS square; with a frame, and the axes (gradient 0 and
    parameter 0: the middle row and column boundaries, for an even number of bins) drawn in
    blue where the histogram is light, so a reader sees where zero is."""
    level = tf.math.log1p(counts)
    level = level / tf.maximum(tf.reduce_max(level), 1e-12)
    gray = tf.cast(tf.round(255.0 * (1.0 - level)), tf.float32)
    rows, columns = counts.shape
    big = tf.repeat(tf.repeat(gray, PIXELS, axis=0), PIXELS, axis=1)          # [H, W]
    height, width = rows * PIXELS, columns * PIXELS
    r, c = tf.range(height)[:, None], tf.range(width)[None, :]
    line = ((r == rows // 2 * PIXELS) | (c == columns // 2 * PIXELS) | (r == 0) | (c == 0)
            | (r == height - 1) | (c == width - 1))
    axis = line & (big >= 128.0)
    rgb = tf.stack([tf.where(axis, float(a), big) for a in AXIS], axis=-1)
    return tf.cast(rgb, tf.uint8)[None]
