"""Norms of the mean gradient, and the histogram of the per-example gradient norms."""

import tensorflow as tf

from tfmbgd.instruments.base import Chart, Instrument, mean_norms_sq, per_variable


def gradient_norms(m):
    """Per variable, the Euclidean norm of the mean gradient."""
    return tf.unstack(tf.sqrt(mean_norms_sq(m)))


class GradientNorm(Instrument):
    """`grad/norm`: the norm of the mean gradient (the applied direction, before the learning
    rate), over all variables and per variable. The norm tier's cheapest statistic."""

    name = "grad_norm"

    def tags(self, names):
        return {"grad/norm": "norm of the mean gradient, all variables",
                **{f"grad/norm/{n}": f"norm of the mean gradient of {n}" for n in names}}

    def charts(self, names):
        category = "Norm of the mean gradient"
        return [Chart(category, "all variables", ("^grad/norm$",))] + [
            Chart(category, n, (f"^grad/norm/{n}$",)) for n in names]

    def compute(self, measurement):
        mean_sq = measurement.mean_sq
        out = per_variable("grad/norm", tf.sqrt(mean_sq), measurement.names)
        out["grad/norm"] = tf.sqrt(tf.reduce_sum(mean_sq))
        return out


class PerExampleNorms(Instrument):
    """`per_example_grad_norm`: the histogram of the B per-example gradient norms
    `||g_n||` over all variables (unscaled: the gradient of example n's own loss)."""

    name = "per_example_norms"
    histograms = frozenset({"per_example_grad_norm"})

    def tags(self, names):
        return {"per_example_grad_norm": "histogram of the B per-example gradient norms"}

    def compute(self, measurement):
        return {"per_example_grad_norm": tf.sqrt(tf.reduce_sum(measurement.example_sq, axis=0))}
