"""Variance of the per-example gradients: per parameter, its trace per variable, and the
variance of the mini-batch mean.

Variances are unbiased over the batch, `sum_n (g_n - mean)^2 / (B - 1)`, and need B >= 2.
The value for a variable is the trace of its block of the per-example gradient covariance
(the sum of its per-parameter variances); `tr(Sigma)` sums all variables, and the mean of
a mini-batch has variance `tr(Sigma) / B`.
"""

import functools

import tensorflow as tf

from tfmbgd.errors import UserError
from tfmbgd.instruments.base import Chart, Instrument, Summary, batch_float, mean_norms_sq, per_variable

# From this many parameters, the sums over every parameter (GSNR, EB) are XLA-fused loops, one
# per variable, that read each mean and sum of squares once. TensorFlow's ops make about ten
# passes over the joined vectors (the joins, squares, differences, quotients, signs, sums),
# which on the 270k parameters of a 784-256-256-10 MLP cost more than the fused call; on small
# models launching that call costs more than the passes, and they keep the joined vectors.
FUSE_FROM = 2 ** 17


def parameter_sums(m, terms, *scalars):
    """Sums over every parameter of the model of `terms(mean, sum_sq, b, *scalars)`, a tuple of
    tensors shaped like `mean` (one parameter's values each): the elementwise statistics,
    from the elementwise tier's moments. `b` is the batch size and `scalars` any constants,
    all in the statistics' dtype (the widest of the variables'); `terms` must be a function
    defined once (it keys the compiled sums).

    From `FUSE_FROM` parameters, one XLA-compiled function sums the terms variable by
    variable, fused; below, the variables are joined into two vectors first (few ops)."""
    dtype = tf.float64 if any(t.dtype == tf.float64 for t in m.mean) else m.mean[0].dtype
    b = tf.constant(batch_float(m, dtype), dtype) if isinstance(m.batch_size, int) else batch_float(m, dtype)
    scalars = [tf.constant(s, dtype) for s in scalars]
    sizes = [t.shape.num_elements() for t in m.mean]
    if None not in sizes and sum(sizes) >= FUSE_FROM:
        if terms not in _FUSED:
            _FUSED[terms] = tf.function(functools.partial(_summed, terms), jit_compile=True, autograph=False)
        return _FUSED[terms](list(m.mean), list(m.sum_sq), b, scalars)
    join = lambda ts: tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in ts], 0) if len(ts) > 1 \
        else tf.reshape(tf.cast(ts[0], dtype), [-1])
    return tuple(tf.reduce_sum(t) for t in terms(join(m.mean), join(m.sum_sq), b, *scalars))


_FUSED = {}     # terms -> its compiled sums


def _summed(terms, means, sums_sq, b, scalars):
    """The compiled body of `parameter_sums`: each variable's terms summed, then added up."""
    totals = None
    for mean, sum_sq in zip(means, sums_sq):
        mean, sum_sq = tf.cast(mean, b.dtype), tf.cast(sum_sq, b.dtype)
        parts = [tf.reduce_sum(t) for t in terms(mean, sum_sq, b, *scalars)]
        totals = parts if totals is None else [a + p for a, p in zip(totals, parts)]
    return tuple(totals)


def spreads(m):
    """Per variable, shaped like it: `sum_n (g_n - mean)^2 = sum_sq - B * mean^2`, which is
    B - 1 times the unbiased per-parameter variance; not clipped (round-off can take it a
    hair below zero where the variance is ~0). Needs the elementwise tier."""
    return [sum_sq - batch_float(m, mean.dtype) * tf.square(mean) for mean, sum_sq in zip(m.mean, m.sum_sq)]


def variance(m):
    """Unbiased per-parameter variance of the per-example gradients, per variable.

    `var = (sum_sq - B * mean^2) / (B - 1)`, shaped like each variable. Needs the
    elementwise tier (`gradient_moments(..., elementwise=True)`). Round-off can make the
    difference a hair below zero where the true variance is ~0; it is clipped at 0.
    """
    if m.sum_sq is None:
        raise UserError("per-parameter variance needs the elementwise moments: "
                        "call gradient_moments(..., elementwise=True)")
    return [tf.maximum(s / (batch_float(m, s.dtype) - 1), 0) for s in spreads(m)]


def trace_vector(m, mean_sq=None, example_sq=None):
    """`[V]` variance traces, all variables at once (few ops, one kernel each), from the norm
    tier alone: `(sum_n ||g_n,v||^2 - B ||mean_v||^2) / (B - 1)`, clipped at 0.

    `mean_sq` (`[V]`) and `example_sq` (`[V, B]`, the stacked `m.var_norms_sq`): when the
    caller has them already.
    """
    mean_sq = mean_norms_sq(m) if mean_sq is None else mean_sq
    example_sq = tf.stack(m.var_norms_sq) if example_sq is None else example_sq
    b = batch_float(m, mean_sq.dtype)
    return tf.maximum((tf.reduce_sum(example_sq, axis=1) - b * mean_sq) / (b - 1), 0)


def variance_traces(m):
    """Per variable, the sum of its per-parameter variances (a scalar each)."""
    return tf.unstack(trace_vector(m))


def traces(measurement):
    """`([V] traces, tr(Sigma))` of a step's `Measurement`, computed once per step."""
    def make():
        vector = trace_vector(measurement.moments, measurement.mean_sq, measurement.example_sq)
        return vector, tf.reduce_sum(vector)
    return measurement.cached("variance traces", make)


class VarianceTrace(Instrument):
    """`grad_var/trace`, `grad_var/<path>`, `grad_var/of_mean` and `grad_var/of_mean/<path>`:
    how far the examples' gradients spread around their mean, and how noisy the mean is."""

    name = "variance"
    min_batch = 2
    summaries = (Summary("grad_var/trace", "mean tr(Sigma)"),
                 Summary("grad_var/of_mean", "mean tr(Sigma)/B"))

    def tags(self, names):
        out = {"grad_var/trace": "tr(Sigma): sum of the per-parameter unbiased variances",
               "grad_var/of_mean": "tr(Sigma) / B: the variance of the mini-batch mean gradient"}
        for n in names:
            out[f"grad_var/{n}"] = f"tr(Sigma) restricted to {n}"
            out[f"grad_var/of_mean/{n}"] = f"variance of the mini-batch mean gradient of {n}"
        return out

    def charts(self, names):
        # One quantity per chart: the runs of a study are then its only series, each in its
        # run's colour (the norm of the mean is GradientNorm's, in a category of its own).
        category = "Variance of the mean gradient, tr(Sigma)/B"
        return [Chart(category, "all variables", ("^grad_var/of_mean$",))] + [
            Chart(category, n, (f"^grad_var/of_mean/{n}$",)) for n in names]

    def compute(self, measurement):
        vector, trace = traces(measurement)
        b = measurement.b(vector.dtype)
        out = per_variable("grad_var", vector, measurement.names)
        out.update(per_variable("grad_var/of_mean", vector / b, measurement.names))
        out["grad_var/trace"], out["grad_var/of_mean"] = trace, trace / b
        return out
