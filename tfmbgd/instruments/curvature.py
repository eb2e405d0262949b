"""Curvature: how sharp the loss is at the weights a statistics step measured.

Cockpit's HessTrace, HessMaxEV, TICDiag and TICTrace (Schneider et al. 2021), computed
before the step's update from the model, the loss and the batch (the `BATCH` need), by the
estimators of `tfmbgd.engine.hessian`:

- `curvature/hess_trace`: the trace of the Hessian of the batch's mean loss. Cockpit takes
  BackPACK's exact diagonal Hessian; here `estimator` is "hutchinson" (default: Rademacher
  probes of Hessian-vector products, unbiased, any model), "ggn_mc" (the Monte-Carlo
  Gauss-Newton diagonal from the gradient moments of sampled labels: one more pass, the
  Hessian's for ReLU networks) or "exact" (the whole Hessian: small models only). Each tag's
  description names its estimator; `curvature/hess_trace/<path>` per variable.
- `curvature/hess_max_ev`: the eigenvalue of largest magnitude, by the Lanczos method (at most
  100 Hessian-vector products, relative tolerance 1e-3, absolute 1e-6, as Cockpit), started
  from the previous statistics step's eigenvector (state): the Hessian changes little
  between steps, so a few products usually suffice (Cockpit starts from a random vector).
- `curvature/tic_diag` = `sum_k (S2_k / B) / (h_k + 1e-7)` and `curvature/tic_trace` =
  `(sum_k S2_k / B) / (sum_k h_k + 1e-7)`, the Takeuchi information criterion (Thomas et
  al. 2020) with `S2_k = sum_n g_n,k^2` (the elementwise tier) and `h` the curvature
  diagonal of `estimator` (default "ggn_mc", Cockpit's cheapest; "hutchinson" diagonals are
  noisy and can be near zero or negative).
"""

import tensorflow as tf

from tfmbgd.engine import hessian
from tfmbgd.engine.fields import unflatten
from tfmbgd.errors import UserError
from tfmbgd.instruments.base import BATCH, ELEMENTWISE, Chart, Instrument, per_variable

EPSILON = 1e-7


def _check(estimator):
    if estimator not in hessian.ESTIMATORS:
        raise UserError(f"curvature estimator must be one of {', '.join(hessian.ESTIMATORS)}; "
                        f"got {estimator!r}")
    return estimator


def _seed(measurement, salt):
    """A stateless seed that differs per step, so probes are fresh and runs repeat."""
    step = measurement.step if measurement.step is not None else tf.constant(0, tf.int64)
    return tf.stack([tf.cast(step % 2 ** 30, tf.int32), tf.constant(salt, tf.int32)])


def diagonal(measurement, estimator, samples=1):
    """`[per-variable Hessian diagonal estimates]` of the step's batch (cached per step)."""
    def make():
        model, loss_fn, x, y = measurement.require(BATCH, measurement.batch)
        variables = model.trainable_variables
        if estimator == "exact":
            h = tf.linalg.diag_part(hessian.hessian(model, loss_fn, x, y))
            return [tf.cast(t, tf.float32) for t in unflatten(h, variables)]
        if estimator == "ggn_mc":
            return hessian.ggn_mc_diagonal(model, loss_fn, x, measurement.moments.outputs,
                                             _seed(measurement, 7))
        _, diag = hessian.hutchinson(model, loss_fn, x, y, samples, _seed(measurement, 11))
        return [tf.cast(t, tf.float32) for t in diag]
    return measurement.cached(("diagonal", estimator, samples), make)


DESCRIBE = {"hutchinson": "Hutchinson's estimator with Rademacher probes",
            "ggn_mc": "the Monte-Carlo GGN diagonal (labels sampled from the model)",
            "exact": "the exact Hessian"}


class HessTrace(Instrument):
    """`curvature/hess_trace` and per variable `curvature/hess_trace/<path>`."""

    name = "hess_trace"
    needs = frozenset({BATCH})
    before_update = True

    def __init__(self, estimator="hutchinson", samples=1):
        self.estimator, self.samples = _check(estimator), samples

    def tags(self, names):
        how = DESCRIBE[self.estimator]
        return {"curvature/hess_trace": f"trace of the Hessian of the mean loss, by {how}",
                **{f"curvature/hess_trace/{n}": f"the Hessian trace of {n}, by {how}" for n in names}}

    def charts(self, names):
        return [Chart("Cockpit", "Hessian trace", ("^curvature/hess_trace$",))]

    def compute(self, measurement):
        diag = diagonal(measurement, self.estimator, self.samples)
        vector = tf.stack([tf.reduce_sum(d) for d in diag])
        return {**per_variable("curvature/hess_trace", vector, measurement.names),
                "curvature/hess_trace": tf.reduce_sum(vector)}


class HessMaxEV(Instrument):
    """`curvature/hess_max_ev`: the Hessian's eigenvalue of largest magnitude."""

    name = "hess_max_ev"
    needs = frozenset({BATCH})
    before_update = True

    def __init__(self, max_iterations=100, rtol=1e-3, atol=1e-6):
        self.max_iterations, self.rtol, self.atol = max_iterations, rtol, atol

    def build(self, variables):
        self.vector = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False) for v in variables]

    def state(self):
        return {f"vector_{i}": v for i, v in enumerate(self.vector)}

    def tags(self, names):
        return {"curvature/hess_max_ev": "eigenvalue of largest magnitude of the Hessian of the mean loss, "
                                         "by the Lanczos method with Hessian-vector products"}

    def charts(self, names):
        return [Chart("Cockpit", "top Hessian eigenvalue", ("^curvature/hess_max_ev$",))]

    def compute(self, measurement):
        model, loss_fn, x, y = measurement.require(BATCH, measurement.batch)
        value, vector, _ = hessian.max_eigenvalue(model, loss_fn, x, y, self.max_iterations, self.rtol,
                                                    self.atol, seed=_seed(measurement, 13),
                                                    start=[v.read_value() for v in self.vector])
        with tf.control_dependencies([v.assign(t) for v, t in zip(self.vector, vector)]):
            return {"curvature/hess_max_ev": tf.identity(value)}


class _TIC(Instrument):
    needs = frozenset({BATCH, ELEMENTWISE})
    before_update = True
    finite_only = True

    def __init__(self, estimator="ggn_mc", samples=1):
        self.estimator, self.samples = _check(estimator), samples

    def _parts(self, measurement):
        b = measurement.b(tf.float32)
        noise = [tf.cast(s, tf.float32) / b for s in measurement.moments.sum_sq]     # S2 / B
        return noise, diagonal(measurement, self.estimator, self.samples)


class TICDiag(_TIC):
    """`curvature/tic_diag`: the TIC with the curvature's diagonal."""

    name = "tic_diag"

    def tags(self, names):
        return {"curvature/tic_diag": "Takeuchi information criterion sum_k (S2_k/B) / (h_k + 1e-7), "
                                      f"h by {DESCRIBE[self.estimator]}"}

    def charts(self, names):
        return [Chart("Cockpit", "TIC (diagonal)", ("^curvature/tic_diag$",))]

    def compute(self, measurement):
        noise, diag = self._parts(measurement)
        terms = [tf.reduce_sum(n / (h + EPSILON)) for n, h in zip(noise, diag)]
        return {"curvature/tic_diag": tf.add_n(terms)}


class TICTrace(_TIC):
    """`curvature/tic_trace`: the TIC with traces."""

    name = "tic_trace"

    def tags(self, names):
        return {"curvature/tic_trace": "Takeuchi information criterion (sum_k S2_k/B) / (sum_k h_k + 1e-7), "
                                       f"h by {DESCRIBE[self.estimator]}"}

    def charts(self, names):
        return [Chart("Cockpit", "TIC (trace)", ("^curvature/tic_trace$",))]

    def compute(self, measurement):
        noise, diag = self._parts(measurement)
        total = tf.add_n([tf.reduce_sum(n) for n in noise])
        return {"curvature/tic_trace": total / (tf.add_n([tf.reduce_sum(h) for h in diag]) + EPSILON)}
