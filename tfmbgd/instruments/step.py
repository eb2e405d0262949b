"""How far the weights move: the size of one update and the distance from the start.

Cockpit's UpdateSize and Distance (Schneider et al. 2021): `||theta_{t+1} - theta_t||`, the
update the optimizer made at step t, whatever the optimizer (the difference of the weights,
not `lr * g`), and `||theta_t - theta_0||`, how far step t starts from the initial weights;
over all variables and per variable. Both need the weights before the update
(`PARAMETERS`); Distance keeps the initial weights as state (checkpointed, so a resumed run
measures from the same start).
"""

import tensorflow as tf

from tfmbgd.errors import UserError
from tfmbgd.instruments.base import PARAMETERS, Chart, Instrument, per_variable


def _before(measurement):
    if measurement.before is None:
        raise UserError("update_size and distance need the weights before the update (PARAMETERS): "
                        "pass steps.snapshot(...) to steps.statistics")
    return measurement.before


def _norms(differences):
    """`([V] norms, total norm)` of a list of per-variable differences."""
    squares = tf.stack([tf.reduce_sum(tf.square(tf.cast(d, tf.float32))) for d in differences])
    return tf.sqrt(squares), tf.sqrt(tf.reduce_sum(squares))


class UpdateSize(Instrument):
    """`step/update_size` and `step/update_size/<path>`: `||theta_{t+1} - theta_t||` of the
    update applied at the statistics step t (0 when a non-finite update was skipped)."""

    name = "update_size"
    needs = frozenset({PARAMETERS})

    def tags(self, names):
        return {"step/update_size": "norm of the update the step applied, all variables",
                **{f"step/update_size/{n}": f"norm of the update of {n}" for n in names}}

    def charts(self, names):
        return [Chart("Step", "update size ||theta_t+1 - theta_t||", ("^step/update_size$",))]

    def compute(self, measurement):
        after = [tf.convert_to_tensor(v) for v in measurement.variables]
        vector, total = _norms([a - b for a, b in zip(after, _before(measurement))])
        return {**per_variable("step/update_size", vector, measurement.names), "step/update_size": total}


class Distance(Instrument):
    """`step/distance` and `step/distance/<path>`: `||theta_t - theta_0||`, the weights at the
    start of the statistics step t against the initial weights."""

    name = "distance"
    needs = frozenset({PARAMETERS})

    def build(self, variables):
        self.initial = [tf.Variable(tf.convert_to_tensor(v), trainable=False) for v in variables]

    def state(self):
        return {f"initial_{i}": v for i, v in enumerate(self.initial)}

    def tags(self, names):
        return {"step/distance": "distance of the weights from the initial ones, all variables",
                **{f"step/distance/{n}": f"distance of {n} from its initial value" for n in names}}

    def charts(self, names):
        return [Chart("Step", "distance ||theta_t - theta_0||", ("^step/distance$",))]

    def compute(self, measurement):
        initial = [tf.convert_to_tensor(i) for i in self.initial]
        vector, total = _norms([b - i for b, i in zip(_before(measurement), initial)])
        return {**per_variable("step/distance", vector, measurement.names), "step/distance": total}
