"""Gradient statistics as pure functions of `GradientMoments` (no tape, no model, no writer).

The only state is `NoiseScaleEMA`, the smoothing of the gradient noise scale over steps.

Conventions: per-example losses and gradients are unscaled; variances are unbiased over
the batch, `sum_n (g_n - mean)^2 / (B - 1)`; the value for a variable is the trace of its
block of the per-example gradient covariance (the sum of its per-parameter variances), and
`tr(Sigma)` sums all variables. The mini-batch mean gradient has variance `tr(Sigma) / B`.
Variances need B >= 2: for a batch of one they are undefined and not reported.
"""

import tensorflow as tf

from tfmbgd.errors import UserError
from tfmbgd.moments import GradientMoments, gradient_moments  # noqa: F401  (public API)


def _b(m, dtype):
    """B as a number of `dtype`; a Python float when the batch size is static (no op)."""
    if isinstance(m.batch_size, int):
        return float(m.batch_size)
    return tf.cast(m.batch_size, dtype)


def variance(m):
    """Unbiased per-parameter variance of the per-example gradients, per variable.

    `var = (sum_sq - B * mean^2) / (B - 1)`, shaped like each variable. Needs the
    elementwise tier (`gradient_moments(..., elementwise=True)`). Round-off can make the
    difference a hair below zero where the true variance is ~0; it is clipped at 0.
    """
    if m.sum_sq is None:
        raise UserError("per-parameter variance needs the elementwise moments: "
                        "call gradient_moments(..., elementwise=True)")
    out = []
    for mean, sum_sq in zip(m.mean, m.sum_sq):
        b = _b(m, mean.dtype)
        out.append(tf.maximum((sum_sq - b * tf.square(mean)) / (b - 1), 0))
    return out


def variance_traces(m):
    """Per variable, the sum of its per-parameter variances (a scalar each).

    From the norm tier alone: `(sum_n ||g_n,v||^2 - B ||mean_v||^2) / (B - 1)`.
    """
    return tf.unstack(_traces(m, _mean_sq(m)))


def gradient_norms(m):
    """Per variable, the Euclidean norm of the mean gradient."""
    return tf.unstack(tf.sqrt(_mean_sq(m)))


def _mean_sq(m):
    """`[V]`: squared norm of the mean gradient of each variable."""
    return tf.stack([2 * tf.nn.l2_loss(mean) for mean in m.mean])    # l2_loss: one fused pass


def _traces(m, mean_sq, example_sq=None):
    """`[V]` variance traces, computed for all variables at once (few ops, one kernel each).

    `example_sq`: `[V, B]`, the stacked `m.var_norms_sq`, when the caller has it already.
    """
    b = _b(m, mean_sq.dtype)
    if example_sq is None:
        example_sq = tf.stack(m.var_norms_sq)
    return tf.maximum((tf.reduce_sum(example_sq, axis=1) - b * mean_sq) / (b - 1), 0)


def mean_gsnr(m):
    """Mean over parameters of the gradient signal-to-noise ratio `mean^2 / variance`.

    GSNR after Liu et al. (2020), "Understanding Why Neural Networks Generalize Well Through
    GSNR of Parameters", with the unbiased per-parameter variance. Parameters whose
    variance is exactly 0 (e.g. weights of dead ReLU units, with zero gradient for every
    example) have no defined ratio and are left out of the mean. Needs the elementwise tier.
    """
    if m.sum_sq is None:
        raise UserError("GSNR needs the elementwise moments: call gradient_moments(..., elementwise=True)")
    total, count = 0.0, 0.0
    for mean, sum_sq in zip(m.mean, m.sum_sq):
        mean2 = tf.square(mean)
        spread = tf.maximum(sum_sq - _b(m, mean.dtype) * mean2, 0)     # (B - 1) * variance
        total += tf.reduce_sum(tf.math.divide_no_nan(mean2, spread))
        count += tf.reduce_sum(tf.sign(spread))      # spread >= 0: counts the non-zero ones
    b = _b(m, total.dtype)
    return tf.math.divide_no_nan((b - 1) * total, count)


def noise_scale_terms(m):
    """`(tr(Sigma), |G|^2)`: numerator and denominator of the simple noise scale.

    `|G|^2 = |mean|^2 - tr(Sigma) / B` is the unbiased estimate of the squared norm of the
    true gradient (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
    Appendix A): `E|mean|^2 = |G|^2 + tr(Sigma) / B`. It can be negative on a single batch.
    """
    mean_sq = _mean_sq(m)
    trace = tf.reduce_sum(_traces(m, mean_sq))
    return trace, tf.reduce_sum(mean_sq) - trace / _b(m, trace.dtype)


class NoiseScaleEMA:
    """Smoothed simple noise scale `B_simple = tr(Sigma) / |G|^2` over training steps.

    As McCandlish et al. recommend, numerator and denominator are averaged separately
    (exponential moving averages with `decay`) and the ratio is taken last; a ratio of
    single-batch estimates is far too noisy. The EMAs start at 0 without bias correction:
    the correction `1 - decay^t` is the same for both and cancels in the ratio. While the
    averaged `|G|^2` is not positive the noise hides the signal and `B_simple` is
    undefined; `update` then returns infinity.

        ema = NoiseScaleEMA(0.9)
        b_simple = ema.update(*noise_scale_terms(moments))

    Args:
      decay: weight of the past in each update, in [0, 1); 0 means no smoothing.
    """

    def __init__(self, decay=0.9, dtype=tf.float32):
        if not 0 <= decay < 1:
            raise UserError(f"noise scale decay must be in [0, 1); got {decay!r}")
        self.decay = decay
        self.trace = tf.Variable(tf.zeros([], dtype), trainable=False, name="noise_scale_trace")
        self.grad_sq = tf.Variable(tf.zeros([], dtype), trainable=False, name="noise_scale_grad_sq")

    def update(self, trace, grad_sq):
        """Folds in one batch's `noise_scale_terms`; returns the smoothed `B_simple`."""
        d = tf.cast(self.decay, self.trace.dtype)
        self.trace.assign(d * self.trace + (1 - d) * tf.cast(trace, self.trace.dtype))
        self.grad_sq.assign(d * self.grad_sq + (1 - d) * tf.cast(grad_sq, self.trace.dtype))
        return tf.where(self.grad_sq > 0, self.trace / self.grad_sq, float("inf"))


def statistics(m, names):
    """All statistics of the moments as a dict `tag -> tensor`.

    Args:
      m: `GradientMoments`.
      names: per variable the tag suffix, e.g. `[v.path for v in model.trainable_variables]`.

    Returns:
      Scalars `grad/norm`, `grad/norm/<name>`, and, when the batch has at least two
      examples (or its size is unknown until run time), `grad_var/trace`,
      `grad_var/<name>`, `grad_var/of_mean`, `grad_var/of_mean/<name>` (the variance of
      the mini-batch gradient of one variable), plus `grad_snr/mean_gsnr` with the elementwise
      tier; and the vector `per_example_grad_norm` (`[B]`, for a histogram). Works inside
      `tf.function`.
    """
    # Each statistic is computed for all variables at once, and the scalars leave in one
    # unstack: a statistics step costs a few dozen small ops more than a plain step, and on
    # a CPU each op costs microseconds whatever its size.
    mean_sq = _mean_sq(m)                                   # [V]
    example_sq = tf.stack(m.var_norms_sq)                   # [V, B]
    columns, prefixes = [tf.sqrt(mean_sq)], ["grad/norm"]
    totals, total_tags = [tf.sqrt(tf.reduce_sum(mean_sq))], ["grad/norm"]
    if not (isinstance(m.batch_size, int) and m.batch_size < 2):
        b = _b(m, mean_sq.dtype)
        traces = _traces(m, mean_sq, example_sq)
        trace = tf.reduce_sum(traces)
        columns += [traces, traces / b]
        prefixes += ["grad_var", "grad_var/of_mean"]
        totals += [trace, trace / b]
        total_tags += ["grad_var/trace", "grad_var/of_mean"]
    values = tf.unstack(tf.concat(columns + [tf.stack(totals)], axis=0))
    tags = [f"{prefix}/{name}" for prefix in prefixes for name in names] + total_tags
    out = dict(zip(tags, values))
    out["per_example_grad_norm"] = tf.sqrt(tf.reduce_sum(example_sq, axis=0))
    if m.sum_sq is not None and len(totals) > 1:
        out["grad_snr/mean_gsnr"] = mean_gsnr(m)
    return out


def summarize(m, variables):
    """The scalar `statistics` as `{tag: float}`, named by `variable.path` (eager use).

    The per-example norms behind the `per_example_grad_norm` histogram are a vector, not a
    scalar: they are in `statistics(m, names)` and `tf.sqrt(m.norms_sq)`.
    """
    return {tag: float(value) for tag, value in statistics(m, [v.path for v in variables]).items()
            if value.shape.rank == 0}
