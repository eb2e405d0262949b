"""Gradient statistics as pure functions of `GradientMoments` (no tape, no model, no writer).

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


def statistics(m, names):
    """All scalar statistics of the moments as a dict `tag -> scalar tensor`.

    Args:
      m: `GradientMoments`.
      names: per variable the tag suffix, e.g. `[v.path for v in model.trainable_variables]`.

    Returns:
      `grad/norm`, `grad/norm/<name>` always; `grad_var/trace`, `grad_var/<name>` and
      `grad_var/of_mean` when the batch has at least two examples (or its size is unknown
      until run time). Works inside `tf.function`.
    """
    norms = gradient_norms(m)
    out = {"grad/norm": tf.sqrt(tf.add_n([tf.square(n) for n in norms]))}
    out.update({f"grad/norm/{name}": n for name, n in zip(names, norms)})
    if isinstance(m.batch_size, int) and m.batch_size < 2:
        return out
    traces = variance_traces(m)
    total = tf.add_n(traces)
    out["grad_var/trace"] = total
    out.update({f"grad_var/{name}": t for name, t in zip(names, traces)})
    out["grad_var/of_mean"] = total / _b(m, total.dtype)
    return out


def summarize(m, variables):
    """`statistics` as plain floats, named by `variable.path` (eager use)."""
    return {tag: float(value) for tag, value in statistics(m, [v.path for v in variables]).items()}
