"""Gradient tests: is the batch large enough for its gradient's direction to be trusted?

The norm test (Byrd, Chin, Nocedal and Wu 2012), as Cockpit (`cockpit-for-pytorch`
1.0.2) computes it: `sqrt((S2 - B |mean|^2) / (B (B - 1) |mean|^2))`, with
`S2 = sum_n |g_n|^2`: the estimated relative error of the mini-batch gradient, the
standard error of its norm over the norm. Above 1 the batch is too small for the step to
be a descent direction with confidence. It needs only the per-example norms (the norm
tier), and squared and times B it is `tr(Sigma) / |mean|^2`, the noise scale with the
biased |G|^2. (The inner-product and orthogonality tests need `g_n . mean` per example:
another moment, not built yet.)
"""

import tensorflow as tf

from tfmbgd.instruments.base import Chart, Instrument


def norm_test(measurement):
    """Cockpit's NormTest of one batch (B >= 2)."""
    b = measurement.b(tf.float32)
    s2 = tf.reduce_sum(measurement.example_sq)
    mean_sq = tf.reduce_sum(measurement.mean_sq)
    return tf.sqrt((s2 - b * mean_sq) / (b * (b - 1) * mean_sq))


class NormTest(Instrument):
    """`grad_test/norm`: the norm test of the statistics step's batch."""

    name = "norm_test"
    min_batch = 2

    def tags(self, names):
        return {"grad_test/norm": "norm test sqrt((S2 - B |mean|^2) / (B (B-1) |mean|^2)) "
                                  "(Byrd et al. 2012): above 1, the batch is too small"}

    def charts(self, names):
        return [Chart("Gradient tests", "norm test", ("^grad_test/norm$",))]

    def compute(self, measurement):
        return {"grad_test/norm": norm_test(measurement)}
