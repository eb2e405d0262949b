"""Instruments defined for plain SGD: CABS's batch size and the EB stopping criterion.

Both as Cockpit (`cockpit-for-pytorch` 1.0.2) computes them, which defines them for plain
SGD only; a run with another optimizer is refused (`sgd_only`).

- CABS (Balles, Romero and Hennig 2017, "Coupling adaptive batch sizes with learning
  rates"): the batch size that the learning rate and the gradient noise call for,
  `lr * (S2 - B |mean|^2) / (B L)` with `S2 = sum_n |g_n|^2` and `L` the batch loss
  (biased, as Cockpit's: the sum of squares over B, not B - 1).
- EB (Mahsereci, Balles, Lassner and Hennig 2017, "Early stopping without a validation
  set"): `1 - (B / D) sum_k mean_k^2 / (var_k + 1e-5)` over the D parameters, the unbiased
  per-parameter variance; it turns positive when the gradient is mostly noise: stop.
"""

import tensorflow as tf

from tfmbgd.instruments.base import ELEMENTWISE, Chart, Instrument
from tfmbgd.instruments.variance import parameter_sums

EPSILON = 1e-5      # Cockpit's EarlyStopping default


class CABS(Instrument):
    """`batch_size/cabs`: CABS's batch size for SGD at `learning_rate`."""

    name = "cabs"
    sgd_only = True

    def __init__(self, learning_rate):
        self.learning_rate = float(learning_rate)

    @classmethod
    def for_run(cls, learning_rate=None, optimizer=None):
        return cls(learning_rate)

    def tags(self, names):
        return {"batch_size/cabs": "CABS batch size lr (S2 - B |mean|^2) / (B L) (Balles et al. 2017)"}

    def charts(self, names):
        return [Chart("Cockpit", "CABS batch size", ("^batch_size/cabs$",))]

    def compute(self, measurement):
        m = measurement.moments
        dtype = measurement.dtype
        b = measurement.b(dtype)
        s2 = tf.cast(tf.reduce_sum(measurement.example_sq), dtype)
        loss = tf.reduce_mean(tf.cast(m.losses, dtype))
        spread = s2 - b * tf.cast(tf.reduce_sum(measurement.mean_sq), dtype)
        return {"batch_size/cabs": self.learning_rate * spread / (b * loss)}


class EarlyStopping(Instrument):
    """`early_stopping/eb`: the EB criterion; positive: the gradient is mostly noise."""

    name = "eb"
    needs = frozenset({ELEMENTWISE})
    min_batch = 2
    sgd_only = True

    def tags(self, names):
        return {"early_stopping/eb": "EB criterion 1 - (B/D) sum_k mean_k^2 / (var_k + 1e-5) "
                                     "(Mahsereci et al. 2017): stop when positive"}

    def charts(self, names):
        return [Chart("Cockpit", "EB criterion", ("^early_stopping/eb$",))]

    def compute(self, measurement):
        m = measurement.moments
        total, = parameter_sums(m, _eb_terms, EPSILON)
        size = sum(t.shape.num_elements() for t in m.mean)
        return {"early_stopping/eb": 1 - measurement.b(total.dtype) * total / size}


def _eb_terms(mean, sum_sq, b, epsilon):
    """Per parameter: `mean^2 / (variance + epsilon)`, the unbiased variance."""
    mean2 = tf.square(mean)
    return (mean2 / ((sum_sq - b * mean2) / (b - 1) + epsilon),)
