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
    out = []
    for mean, norms_sq in zip(m.mean, m.var_norms_sq):
        b = _b(m, mean.dtype)
        total = tf.reduce_sum(norms_sq) - b * tf.reduce_sum(tf.square(mean))
        out.append(tf.maximum(total / (b - 1), 0))
    return out


def gradient_norms(m):
    """Per variable, the Euclidean norm of the mean gradient."""
    return [tf.norm(tf.reshape(mean, [-1])) for mean in m.mean]


def mean_gsnr(m):
    """Mean over parameters of the gradient signal-to-noise ratio `mean^2 / variance`.

    GSNR after Liu et al. (2020), "Understanding Why Neural Networks Generalize Well Through
    GSNR of Parameters", with the unbiased per-parameter variance. Parameters whose
    variance is exactly 0 (e.g. weights of dead ReLU units, with zero gradient for every
    example) have no defined ratio and are left out of the mean. Needs the elementwise tier.
    """
    total, count = 0.0, 0.0
    for mean, var in zip(m.mean, variance(m)):
        defined = var > 0
        ratio = tf.math.divide_no_nan(tf.square(mean), var)
        total += tf.reduce_sum(tf.where(defined, ratio, tf.zeros_like(ratio)))
        count += tf.reduce_sum(tf.cast(defined, ratio.dtype))
    return tf.math.divide_no_nan(total, count)


def noise_scale_terms(m):
    """`(tr(Sigma), |G|^2)`: numerator and denominator of the simple noise scale.

    `|G|^2 = |mean|^2 - tr(Sigma) / B` is the unbiased estimate of the squared norm of the
    true gradient (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
    Appendix A): `E|mean|^2 = |G|^2 + tr(Sigma) / B`. It can be negative on a single batch.
    """
    trace = tf.add_n(variance_traces(m))
    mean_sq = tf.add_n([tf.reduce_sum(tf.square(mean)) for mean in m.mean])
    return trace, mean_sq - trace / _b(m, trace.dtype)


class NoiseScaleEMA:
    """Smoothed simple noise scale `B_simple = tr(Sigma) / |G|^2` over training steps.

    As McCandlish et al. recommend, numerator and denominator are averaged separately
    (exponential moving averages with `decay`) and the ratio is taken last; a ratio of
    single-batch estimates is far too noisy. The EMAs start at 0 without bias correction:
    the correction `1 - decay^t` is the same for both and cancels in the ratio. While the
    averaged `|G|^2` is not positive the noise hides the signal and `B_simple` is
    undefined; `update` then returns infinity.

    Args:
      decay: weight of the past in each update, in [0, 1); 0 means no smoothing.
    """

    def __init__(self, decay=0.9, dtype=tf.float32):
        if not 0 <= decay < 1:
            raise UserError(f"noise scale decay must be in [0, 1); got {decay!r}")
        self.decay = decay
        self.trace = tf.Variable(tf.zeros([], dtype), trainable=False, name="noise_scale_trace")
        self.grad_sq = tf.Variable(tf.zeros([], dtype), trainable=False, name="noise_scale_grad_sq")

    def update(self, m):
        """Folds the moments of one batch in; returns the smoothed `B_simple`."""
        trace, grad_sq = noise_scale_terms(m)
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
      `grad_var/<name>`, `grad_var/of_mean`, plus `grad_snr/mean_gsnr` with the elementwise
      tier; and the vector `per_example_grad_norm` (`[B]`, for a histogram). Works inside
      `tf.function`.
    """
    norms = gradient_norms(m)
    out = {"grad/norm": tf.sqrt(tf.add_n([tf.square(n) for n in norms]))}
    out.update({f"grad/norm/{name}": n for name, n in zip(names, norms)})
    out["per_example_grad_norm"] = tf.sqrt(m.norms_sq)
    if isinstance(m.batch_size, int) and m.batch_size < 2:
        return out
    traces = variance_traces(m)
    total = tf.add_n(traces)
    out["grad_var/trace"] = total
    out.update({f"grad_var/{name}": t for name, t in zip(names, traces)})
    out["grad_var/of_mean"] = total / _b(m, total.dtype)
    if m.sum_sq is not None:
        out["grad_snr/mean_gsnr"] = mean_gsnr(m)
    return out


def summarize(m, variables):
    """`statistics` as plain Python values named by `variable.path` (eager use): floats
    for scalars, a numpy array for `per_example_grad_norm`."""
    out = {}
    for tag, value in statistics(m, [v.path for v in variables]).items():
        out[tag] = float(value) if value.shape.rank == 0 else value.numpy()
    return out
