"""Gradient statistics as pure functions of `GradientMoments` (no tape, no model, no writer).

The maths lives with the instruments that log it (`tfmbgd.instruments`); this module is
the functional view of it for a user's own code:

    m = tfmbgd.stats.gradient_moments(model, loss_fn, x, y)
    tfmbgd.stats.summarize(m, model.trainable_variables)     # {tag: float}

Conventions: per-example losses and gradients are unscaled; variances are unbiased over
the batch, `sum_n (g_n - mean)^2 / (B - 1)`; the value for a variable is the trace of its
block of the per-example gradient covariance (the sum of its per-parameter variances), and
`tr(Sigma)` sums all variables. The mini-batch mean gradient has variance `tr(Sigma) / B`.
Variances need B >= 2: for a batch of one they are undefined and not reported.
"""

from tfmbgd import instruments
from tfmbgd.engine.moments import GradientMoments, gradient_moments  # noqa: F401
from tfmbgd.instruments.gsnr import mean_gsnr  # noqa: F401  (public API)
from tfmbgd.instruments.noise_scale import NoiseScaleEMA, noise_scale_terms  # noqa: F401
from tfmbgd.instruments.norms import gradient_norms  # noqa: F401
from tfmbgd.instruments.variance import variance, variance_traces  # noqa: F401


def statistics(m, names):
    """The statistics of one batch's moments that need no state, as a dict `tag -> tensor`.

    Args:
      m: `GradientMoments`.
      names: per variable the tag suffix, e.g. `[v.path for v in model.trainable_variables]`.

    Returns:
      Scalars `grad/norm`, `grad/norm/<name>`, and, when the batch has at least two
      examples (or its size is unknown until run time), `grad_var/trace`,
      `grad_var/<name>`, `grad_var/of_mean`, `grad_var/of_mean/<name>` (the variance of
      the mini-batch gradient of one variable), plus `grad_snr/mean_gsnr` with the elementwise
      tier; and the vector `per_example_grad_norm` (`[B]`, for a histogram). Works inside
      `tf.function`. The smoothed noise scale keeps state: `tfmbgd.instruments.NoiseScale`.
    """
    active = [instruments.GradientNorm(), instruments.VarianceTrace(), instruments.PerExampleNorms()]
    if m.sum_sq is not None:
        active.append(instruments.MeanGSNR())
    return instruments.Panel(active).compute_all(instruments.Measurement(m, names))


def summarize(m, variables):
    """The scalar `statistics` as `{tag: float}`, named by `variable.path` (eager use).

    The per-example norms behind the `per_example_grad_norm` histogram are a vector, not a
    scalar: they are in `statistics(m, names)` and `tf.sqrt(m.norms_sq)`.
    """
    return {tag: float(value) for tag, value in statistics(m, [v.path for v in variables]).items()
            if value.shape.rank == 0}
