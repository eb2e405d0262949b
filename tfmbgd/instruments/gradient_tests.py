"""Gradient tests: is the batch large enough for its gradient's direction to be trusted?

The norm test (Byrd, Chin, Nocedal and Wu 2012), as Cockpit (`cockpit-for-pytorch`
1.0.2) computes it: `sqrt((S2 - B |mean|^2) / (B (B - 1) |mean|^2))`, with
`S2 = sum_n |g_n|^2`: the estimated relative error of the mini-batch gradient, the
standard error of its norm over the norm. Above 1 the batch is too small for the step to
be a descent direction with confidence. It needs only the per-example norms (the norm
tier), and squared and times B it is `tr(Sigma) / |mean|^2`, the noise scale with the
biased |G|^2.

The inner-product test (Bollapragada, Byrd and Nocedal 2018) asks whether the examples'
gradients agree with the mean in direction, `sqrt((sum_n P_n^2 - B |mean|^4) /
(B (B - 1) |mean|^4))`, and the orthogonality test how large their parts orthogonal to it
are, `sqrt((S2 - sum_n P_n^2 / |mean|^2) / (B (B - 1) |mean|^2))`, with `P_n = g_n . mean`
(the `DOTS` need: from the layer-wise forms, one matrix product per layer, no per-example
gradient built; see `tfmbgd.engine.forms.project`).
"""

import tensorflow as tf

from tfmbgd.instruments.base import DOTS, Chart, Instrument


def norm_test(measurement):
    """Cockpit's NormTest of one batch (B >= 2)."""
    b, cast = measurement.b(measurement.dtype), lambda t: tf.cast(t, measurement.dtype)
    s2 = cast(tf.reduce_sum(measurement.example_sq))
    mean_sq = cast(tf.reduce_sum(measurement.mean_sq))
    return tf.sqrt((s2 - b * mean_sq) / (b * (b - 1) * mean_sq))


class NormTest(Instrument):
    """`grad_test/norm`: the norm test of the statistics step's batch."""

    name = "norm_test"
    min_batch = 2

    def tags(self, names):
        return {"grad_test/norm": "norm test sqrt((S2 - B |mean|^2) / (B (B-1) |mean|^2)) "
                                  "(Byrd et al. 2012): above 1, the batch is too small"}

    def charts(self, names):
        return [Chart("Cockpit", "norm test", ("^grad_test/norm$",))]

    def compute(self, measurement):
        return {"grad_test/norm": norm_test(measurement)}


def inner_test(measurement):
    """Cockpit's InnerTest of one batch (B >= 2)."""
    b, cast = measurement.b(measurement.dtype), lambda t: tf.cast(t, measurement.dtype)
    mean_sq = cast(tf.reduce_sum(measurement.mean_sq))
    p_sq = tf.reduce_sum(tf.square(measurement.dots))
    return tf.sqrt((p_sq - b * mean_sq ** 2) / (b * (b - 1) * mean_sq ** 2))


def ortho_test(measurement):
    """Cockpit's OrthoTest of one batch (B >= 2)."""
    b, cast = measurement.b(measurement.dtype), lambda t: tf.cast(t, measurement.dtype)
    mean_sq = cast(tf.reduce_sum(measurement.mean_sq))
    s2 = cast(tf.reduce_sum(measurement.example_sq))
    p_sq = tf.reduce_sum(tf.square(measurement.dots))
    return tf.sqrt((s2 - p_sq / mean_sq) / (b * (b - 1) * mean_sq))


class InnerTest(Instrument):
    """`grad_test/inner`: the inner-product test of the statistics step's batch."""

    name = "inner_test"
    needs = frozenset({DOTS})
    min_batch = 2

    def tags(self, names):
        return {"grad_test/inner": "inner-product test sqrt((sum P_n^2 - B |mean|^4) / (B (B-1) |mean|^4)), "
                                   "P_n = g_n . mean (Bollapragada et al. 2018): above 1, the examples "
                                   "disagree with the mean's direction"}

    def charts(self, names):
        return [Chart("Cockpit", "inner-product test", ("^grad_test/inner$",))]

    def compute(self, measurement):
        return {"grad_test/inner": inner_test(measurement)}


class OrthoTest(Instrument):
    """`grad_test/ortho`: the orthogonality test of the statistics step's batch."""

    name = "ortho_test"
    needs = frozenset({DOTS})
    min_batch = 2

    def tags(self, names):
        return {"grad_test/ortho": "orthogonality test sqrt((S2 - sum P_n^2 / |mean|^2) / "
                                   "(B (B-1) |mean|^2)) (Bollapragada et al. 2018): above 1, the parts "
                                   "of the examples' gradients orthogonal to the mean dominate"}

    def charts(self, names):
        return [Chart("Cockpit", "orthogonality test", ("^grad_test/ortho$",))]

    def compute(self, measurement):
        return {"grad_test/ortho": ortho_test(measurement)}
