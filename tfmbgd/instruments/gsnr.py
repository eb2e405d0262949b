"""The gradient signal-to-noise ratio (elementwise tier)."""

import tensorflow as tf

from tfmbgd.errors import UserError
from tfmbgd.instruments.base import ELEMENTWISE, Instrument, batch_float
from tfmbgd.instruments.variance import parameter_sums


def mean_gsnr(m):
    """Mean over parameters of the gradient signal-to-noise ratio `mean^2 / variance`.

    GSNR after Liu et al. (2020), "Understanding Why Neural Networks Generalize Well Through
    GSNR of Parameters", with the unbiased per-parameter variance. Parameters whose
    variance is exactly 0 (e.g. weights of dead ReLU units, with zero gradient for every
    example) have no defined ratio and are left out of the mean. Needs the elementwise tier.
    """
    if m.sum_sq is None:
        raise UserError("GSNR needs the elementwise moments: call gradient_moments(..., elementwise=True)")
    total, count = parameter_sums(m, _gsnr_terms)
    return tf.math.divide_no_nan((batch_float(m, total.dtype) - 1) * total, count)


def _gsnr_terms(mean, sum_sq, b):
    """Per parameter: `mean^2 / spread` where the spread `sum_sq - B mean^2` ((B - 1) times the
    variance) is not zero, else 0; and 1 where it is not zero."""
    mean2 = tf.square(mean)
    spread = tf.maximum(sum_sq - b * mean2, 0)
    return tf.math.divide_no_nan(mean2, spread), tf.sign(spread)      # spread >= 0


class MeanGSNR(Instrument):
    """`grad_snr/mean_gsnr`: the mean over parameters of `mean^2 / variance`."""

    name = "gsnr"
    needs = frozenset({ELEMENTWISE})
    min_batch = 2

    def tags(self, names):
        return {"grad_snr/mean_gsnr": "mean over parameters of mean^2 / variance (unbiased)"}

    def compute(self, measurement):
        return {"grad_snr/mean_gsnr": mean_gsnr(measurement.moments)}


COCKPIT_EPSILON = 1e-5      # cockpit-for-pytorch 1.0.2, MeanGSNR's default


def mean_gsnr_biased(m, epsilon=COCKPIT_EPSILON):
    """Cockpit's MeanGSNR (`cockpit-for-pytorch` 1.0.2): the mean over *all* parameters of
    `mean^2 / (biased variance + epsilon)`, the biased variance `sum_sq / B - mean^2` (not
    divided by B - 1). Beside `mean_gsnr` for those who compare with Cockpit: the epsilon
    makes zero-variance parameters count (as mean^2 / epsilon), and the biased variance is
    smaller by (B - 1) / B. Needs the elementwise tier."""
    if m.sum_sq is None:
        raise UserError("GSNR needs the elementwise moments: call gradient_moments(..., elementwise=True)")
    total, = parameter_sums(m, _biased_terms, epsilon)
    return total / sum(t.shape.num_elements() for t in m.mean)


def _biased_terms(mean, sum_sq, b, epsilon):
    """Per parameter: `mean^2 / (biased variance + epsilon)`."""
    mean2 = tf.square(mean)
    return (mean2 / (sum_sq / b - mean2 + epsilon),)


class MeanGSNRBiased(Instrument):
    """`grad_snr/mean_gsnr_biased`: Cockpit's MeanGSNR, with the biased variance plus 1e-5."""

    name = "gsnr_biased"
    needs = frozenset({ELEMENTWISE})

    def tags(self, names):
        return {"grad_snr/mean_gsnr_biased": "Cockpit's MeanGSNR: mean over all parameters of "
                                             "mean^2 / (biased variance + 1e-5)"}

    def compute(self, measurement):
        return {"grad_snr/mean_gsnr_biased": mean_gsnr_biased(measurement.moments)}
