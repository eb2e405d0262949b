"""How far the weights move: the size of one update and the distance from the start.

Cockpit's UpdateSize and Distance (Schneider et al. 2021): `||theta_{t+1} - theta_t||`, the
update the optimizer made at step t, whatever the optimizer (the difference of the weights,
not `lr * g`), and `||theta_t - theta_0||`, how far step t starts from the initial weights;
over all variables and per variable. Both need the weights before the update
(`PARAMETERS`); Distance keeps the initial weights as state (checkpointed, so a resumed run
measures from the same start).
"""

import tensorflow as tf

from tfmbgd.instruments.base import DOTS, PARAMETERS, Chart, Instrument, per_variable


def _before(measurement):
    return measurement.require(PARAMETERS, measurement.before)


def update(measurement):
    """The update the step applied, `theta_{t+1} - theta_t` per variable (float32), computed
    once per step for every instrument that reads it."""
    return measurement.cached("update", lambda: [
        tf.cast(a, tf.float32) - tf.cast(b, tf.float32)
        for a, b in zip(measurement.variables, _before(measurement))])


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
        return [Chart("Cockpit", "update size ||theta_t+1 - theta_t||", ("^step/update_size$",))]

    def compute(self, measurement):
        vector, total = _norms(update(measurement))
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
        return [Chart("Cockpit", "distance ||theta_t - theta_0||", ("^step/distance$",))]

    def compute(self, measurement):
        initial = [tf.convert_to_tensor(i) for i in self.initial]
        vector, total = _norms([b - i for b, i in zip(_before(measurement), initial)])
        return {**per_variable("step/distance", vector, measurement.names), "step/distance": total}


def fit_alpha(t, fs, dfs, var_fs, var_dfs):
    """Cockpit's alpha from a noise-aware quadratic fit along the step (Schneider et al. 2021,
    after Mahsereci and Hennig's probabilistic line search): the quadratic
    `q(s) = mu0 + mu1 s + mu2 s^2` fitted by weighted least squares to the losses `fs` and
    directional derivatives `dfs` at `s = 0` and `s = t` (the step's length), each weighted
    by the inverse of its per-example variance (a zero variance taken as 1e-10). Then
    `alpha = 2 t / (-mu1 / mu2) - 1`: -1 a step that made no progress (or a concave fit, or
    no step at all), 0 a step to the minimum, 1 a step to the other side of the valley.
    All arguments float64 scalars (pairs for the lists)."""
    eps = tf.constant(1e-10, tf.float64)
    safe = lambda v: tf.where(tf.equal(v, 0.0), eps, v)
    moved = tf.not_equal(t, 0.0)
    s = tf.where(moved, t, tf.ones_like(t))         # a zero step has no fit: alpha -1 below
    zero, one = tf.zeros_like(s), tf.ones_like(s)
    phi = tf.stack([tf.stack([one, one, zero, zero]), tf.stack([zero, s, one, one]),
                    tf.stack([zero, s * s, zero, 2 * s])])            # [3, 4]: how q is observed
    weights = 1.0 / tf.stack([safe(var_fs[0]), safe(var_fs[1]), safe(var_dfs[0]), safe(var_dfs[1])])
    observed = tf.stack([fs[0], fs[1], dfs[0], dfs[1]])
    lhs = tf.matmul(phi * weights, phi, transpose_b=True)
    rhs = tf.linalg.matvec(phi * weights, observed)
    mu = tf.linalg.solve(lhs, rhs[:, None])[:, 0]
    alpha = 2 * s / (-mu[1] / mu[2]) - 1
    return tf.where(moved & (mu[2] >= 0), alpha, -tf.ones_like(alpha))


def _point(measurement, direction, length):
    """`(f, var f, df, var df)` of a batch along `direction`: the mean and unbiased variance
    of the per-example losses, and of their derivatives `g_n . d / |d|` along it."""
    losses = tf.cast(measurement.moments.losses, tf.float64)
    along = tf.cast(measurement.require(DOTS, measurement.project)(direction), tf.float64) / length
    var = lambda t: tf.reduce_sum(tf.square(t - tf.reduce_mean(t))) / tf.cast(tf.size(t) - 1, tf.float64)
    return tf.stack([tf.reduce_mean(losses), var(losses), tf.reduce_mean(along), var(along)])


class Alpha(Instrument):
    """`step/alpha`: Cockpit's normalized step length of the update made at a statistics step t.

    It needs two points: at step t the losses and their derivatives along the update
    `d = theta_{t+1} - theta_t` on batch t (before the update, `g_n . d` from the step's
    per-example forms, whatever the optimizer), and at step t + 1 the same on batch t + 1
    at `theta_{t+1}`. So the step after each statistics step measures this end point
    (`two_step`: only the two-step instruments run there), and the value computed there is
    written at step t (`lags`). The update direction is kept
    as state (one copy of the weights, not B of them).
    """

    name = "alpha"
    needs = frozenset({DOTS, PARAMETERS})
    min_batch = 2
    finite_only = True
    two_step = True
    lags = {"step/alpha": 1}

    def build(self, variables):
        self.direction = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False) for v in variables]
        self.start = tf.Variable(tf.zeros([4], tf.float64), trainable=False)    # f, var f, df, var df
        self.start_step = tf.Variable(-2, dtype=tf.int64, trainable=False)
        self.length = tf.Variable(0.0, dtype=tf.float64, trainable=False)

    def state(self):
        return {"start": self.start, "start_step": self.start_step, "length": self.length,
                **{f"direction_{i}": d for i, d in enumerate(self.direction)}}

    def tags(self, names):
        return {"step/alpha": "normalized step length from a noise-aware quadratic fit along the update "
                              "(Cockpit): 0 = stepped to the minimum, 1 = to the other side, "
                              "-1 = no progress; logged at the step of the update"}

    def charts(self, names):
        return [Chart("Cockpit", "alpha (0: to the minimum, 1: across it)", ("^step/alpha$",))]

    def compute(self, measurement):
        step = measurement.require("the step number", measurement.step)
        length = tf.maximum(self.length.read_value(), 1e-30)
        direction = [d.read_value() for d in self.direction]
        end = _point(measurement, direction, length)
        start = self.start.read_value()
        alpha = fit_alpha(self.length.read_value(), (start[0], end[0]), (start[2], end[2]),
                          (start[1], end[1]), (start[3], end[3]))
        alpha = tf.where(tf.equal(self.start_step, step - 1), alpha, tf.constant(float("nan"), tf.float64))
        # this step as the next one's start: the update it just made, and its point along it
        with tf.control_dependencies([alpha]):
            applied = update(measurement)
            new_length = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(u, tf.float64)))
                                           for u in applied]))
            point = _point(measurement, applied, tf.maximum(new_length, 1e-30))
            saved = [d.assign(u) for d, u in zip(self.direction, applied)]
            saved += [self.start.assign(point), self.length.assign(new_length), self.start_step.assign(step)]
        with tf.control_dependencies(saved):
            return {"step/alpha": tf.cast(tf.identity(alpha), tf.float32)}
