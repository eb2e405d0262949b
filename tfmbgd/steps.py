"""One training step, plain or with gradient statistics, for the custom loop and model.fit.

A step takes a mini-batch, computes the batch gradient and applies it once — one update
per batch, never per example. The gradient is that of the `reduce_mean` (or `reduce_sum`)
of the unscaled per-example losses. On statistics steps it comes from the gradient moments
instead: their `mean` *is* the gradient of the mean loss, so the update is the same and the
statistics are of the very batch that was applied.
"""

from typing import NamedTuple

import tensorflow as tf

from tfmbgd import distribute, gradients, losses, optimizers
from tfmbgd import instruments as instruments_lib
from tfmbgd.config import ON_NONFINITE
from tfmbgd.errors import UserError
from tfmbgd.moments import accumulated_moments, gradient_moments, measured_moments, micro_batches


def make_update(rule, variables, learning_rate, optimizer="sgd"):
    """Returns `apply(grads)` that changes `variables` by one update of `rule`.

    Args:
      rule: "manual" (`v.assign_sub(learning_rate * g)` written out; plain SGD only),
        "custom" (tfmbgd's optimizer, `MiniBatchSGD` for sgd) or "keras" (the Keras
        built-in). For sgd all three compute `w - lr * g` and give bit-identical weights.
      variables: the variables to update, aligned with the gradients.
      learning_rate: a float > 0.
      optimizer: "sgd", "momentum", "nesterov", "rmsprop", "adagrad" or "adam".
    """
    if rule == "manual":
        if optimizer != "sgd":
            raise UserError(f"update manual writes out plain SGD only, not {optimizer}")

        def apply(grads):
            if isinstance(grads, distribute.Unsummed):
                grads = grads.summed()
            for v, g in zip(variables, grads):
                if g is not None:                 # None: the loss does not depend on v
                    v.assign_sub(tf.cast(learning_rate, g.dtype) * tf.convert_to_tensor(g))
        return apply
    if rule not in ("custom", "keras"):
        raise UserError(f"update must be manual, custom or keras; got {rule!r}")
    return optimizer_update(optimizers.make_optimizer(optimizer, learning_rate, rule), variables)


def optimizer_update(optimizer, variables):
    """Builds `optimizer` for `variables` (its slots exist before a step is traced) and
    returns `apply(grads)` that applies one update with it.

    Under a tf.distribute strategy `apply` is called in cross-replica context. Keras
    optimizers apply only in replica context, and sum the replicas' gradients there. A
    plain step passes its gradients unsummed (`distribute.Unsummed`): each replica hands
    its own to the optimizer, which makes the one all-reduce. A statistics step has already
    summed them (its statistics need the sum): then replica 0 passes the whole gradient and
    the others zeros, whose sum is exactly the gradient (x + 0 = x).
    """
    optimizer.build(variables)

    def apply(grads):
        if not (tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context()):
            return optimizer.apply_gradients(zip(grads, variables))
        if isinstance(grads, distribute.Unsummed):
            grads.strategy.extended.call_for_each_replica(
                lambda grads: optimizer.apply_gradients(zip(grads, variables)), args=(grads.per_replica,))
            return

        def in_replica(grads):
            first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
            optimizer.apply_gradients(zip([tf.where(first, g, tf.zeros_like(g)) for g in grads], variables))
        tf.distribute.get_strategy().extended.call_for_each_replica(in_replica, args=(grads,))
    return apply


class Measured(NamedTuple):
    """A statistics step's measurement, before its update is applied."""

    moments: object      # the GradientMoments of the batch
    grads: list          # the gradient to apply, aligned with model.trainable_variables
    small_sq: object     # the replicas' mean |G_share|^2 (the REPLICA_NORMS need), or None
    project: object = None   # the per-example gradients' forms.Projector (the DOTS need), or None


def measure(model, loss_fn, x, y, *, needs=frozenset(), method="auto", reduction="mean",
            extra_gradients=None, micro_batch=None, replicas=None):
    """The gradient moments of `(x, y)` and the gradient of the update they give, which the
    caller applies; then `statistics(...)` of the same measurement.

    Args:
      needs: what the active instruments need beyond the norm tier
        (`tfmbgd.instruments.needs`): `ELEMENTWISE` computes `sum_sq`, `REPLICA_NORMS` the
        replicas' mean-gradient norms; nothing else is computed.
      method: as for `tfmbgd.stats.gradient_moments`.
      reduction: "mean" applies the mean gradient, "sum" B times it.
      extra_gradients: `() -> grads` added to the update, e.g. of regularization penalties.
      micro_batch: accumulate the moments over micro-batches of this size (None: at once).
      replicas: a `distribute.Replicas`: `(x, y)` is the global batch, split across them,
        and the moments are merged into those of the global batch.

    Returns:
      A `Measured`: the moments, and the gradient to apply (their mean, times B for "sum",
      plus `extra_gradients`).
    """
    elementwise = instruments_lib.ELEMENTWISE in needs
    small_sq = project = None
    if replicas is not None and needs & instruments_lib.ONE_DEVICE:
        raise UserError("the gradient tests' dot products, alpha, the element histograms and curvature "
                        "are not computed across replicas yet; run them on one device")
    if instruments_lib.DOTS in needs:
        m, project = measured_moments(model, loss_fn, x, y, method, elementwise, micro_batch)
    elif replicas is not None:
        m, small_sq = replicas.moments(model, loss_fn, x, y, method, elementwise,
                                       two_batch=instruments_lib.REPLICA_NORMS in needs)
    elif micro_batch is None:
        m = gradient_moments(model, loss_fn, x, y, method, elementwise)
    else:
        m = accumulated_moments(model, loss_fn, x, y, micro_batch, method, elementwise)
    grads = m.mean
    if reduction == "sum":
        grads = [tf.cast(m.batch_size, g.dtype) * g for g in grads]
    if extra_gradients is not None:
        grads = [g + e for g, e in zip(grads, extra_gradients())]
    return Measured(m, grads, small_sq, project)


def statistics(measured, variables, active, replicas=None, before=None, batch=None, step=None,
               before_update=False):
    """`{tag: tensor}` of the instruments `active` (built) on a `Measured` step: with
    `before_update`, of those that run before its update (curvature), else of the others,
    after it. `before`: the variables' values before the update (`snapshot`), for the
    instruments that need `PARAMETERS`; `batch`: `(model, loss_fn, x, y)`, for those that
    need `BATCH`; `step`: the step's number."""
    measurement = instruments_lib.Measurement(measured.moments, [v.path for v in variables],
                                              small_sq=measured.small_sq, replicas=replicas,
                                              before=before, variables=variables, project=measured.project,
                                              batch=batch, step=step)
    return instruments_lib.compute([i for i in active if i.before_update == before_update], measurement)


def snapshot(variables, needs):
    """The variables' values now, when the instruments need `PARAMETERS` (else None): call
    it before the update (reads and assignments of a variable run in program order)."""
    if instruments_lib.PARAMETERS not in needs:
        return None
    return [tf.identity(v) for v in variables]


def _finite(grad):
    """Whether a gradient from `tape.gradient` is finite: None (the loss does not depend on
    the variable) is; IndexedSlices (Embedding) are checked on their values, not densified."""
    if grad is None:
        return tf.constant(True)
    return tf.reduce_all(tf.math.is_finite(grad.values if isinstance(grad, tf.IndexedSlices) else grad))


class NonFiniteGuard:
    """Applies an update only when every gradient is finite, and remembers when one was not.

    `mode="stop"`: after the first non-finite gradient no update is applied any more (the
    weights stay those of the last good step) and `tripped` says so; the loop then stops.
    `mode="skip"`: that update is left out, the others go on; `skipped` counts them.
    `first_bad_step` (from `current_step`, which the loop sets) and `first_bad_variable`
    (index into the variables, or -1 when the gradients were finite but the loss was not)
    name the first offence.
    """

    def __init__(self, apply, mode="stop"):
        if mode not in ON_NONFINITE:
            raise UserError(f"on_nonfinite must be {' or '.join(ON_NONFINITE)}; got {mode!r}")
        self.inner, self.mode = apply, mode
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.tripped = tf.Variable(False, trainable=False)
        self.first_bad_variable = tf.Variable(-2, dtype=tf.int64, trainable=False)   # -2: none yet
        self.current_step = tf.Variable(0, dtype=tf.int64, trainable=False)    # set by the loop
        self.first_bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False)

    def __call__(self, grads, loss=None, finite=None):
        """Applies `grads` if they (and `loss`) are finite. `finite`: `[V]` bools, when the
        caller knows already (unsummed gradients of replicas)."""
        if finite is None:
            finite = tf.stack([_finite(g) for g in grads])
        ok = tf.reduce_all(finite)
        if loss is not None:
            ok = ok & tf.reduce_all(tf.math.is_finite(loss))
        if self.mode == "stop":
            ok = ok & tf.logical_not(self.tripped)

        def good():
            self.inner(grads)
            return tf.constant(True)

        def bad():
            first = tf.where(tf.reduce_all(finite), tf.constant(-1, tf.int64),
                             tf.argmin(tf.cast(finite, tf.int64), output_type=tf.int64))
            new = self.first_bad_variable == -2
            self.first_bad_variable.assign(tf.where(new, first, self.first_bad_variable))
            self.first_bad_step.assign(tf.where(new, self.current_step, self.first_bad_step))
            if self.mode == "stop":
                self.tripped.assign(True)
            self.skipped.assign_add(1)
            return tf.constant(False)
        return tf.cond(ok, good, bad)


class Steps:
    """The two compiled train steps of a run: `plain(x, y)` and `with_stats(x, y)`
    (`plain_step` and `stats_step` uncompiled, for a caller's own `tf.function`).

    Both apply one update and return a dict of tensors: `loss` (the mean per-example loss
    of the batch, whatever the reduction, so runs compare), `accuracy` (classification);
    `with_stats` adds the values of its instruments. `plain` computes no moments at all.

    Args:
      method: how `gradient_moments` gets per-example information ("auto", ...).
      instruments: the statistics of `with_stats`, instances of
        `tfmbgd.instruments.Instrument`; built here (their state is made now, so make the
        `Steps` under the run's strategy scope). Default: `tfmbgd.instruments.default()`.
      micro_batch: gradient accumulation: the batch of one update is processed in
        micro-batches of this size, one after another, and their summed gradients applied
        once — the same update as the whole batch at once. None: no accumulation.
      guard: a `NonFiniteGuard` around `apply`, or None to apply every update.
      replicas: a `distribute.Replicas` to split every (global) batch across; the update
        and the statistics are those of the global batch.
    """

    def __init__(self, model, loss_fn, apply, *, reduction="mean", method="auto",
                 classification=True, instruments=None, micro_batch=None, guard=None, replicas=None):
        if replicas is not None and micro_batch is not None:
            raise UserError("gradient accumulation is not supported across replicas; raise the batch size")
        self.model, self.loss_fn, self.guard = model, loss_fn, guard
        self.replicas, self.apply = replicas, apply
        self.reduction, self.method, self.classification = reduction, method, classification
        self.micro_batch = micro_batch
        if instruments is None:
            instruments = instruments_lib.default()
        self.instruments = instruments_lib.build(list(instruments), model.trainable_variables)
        self.needs = instruments_lib.needs(self.instruments)
        instruments_lib.refuse_replicas(self.instruments, replicas is not None)
        self.finite_only = instruments_lib.finite_only(self.instruments,
                                                       [v.path for v in model.trainable_variables])
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)     # set by at_step
        self.plain = tf.function(self.plain_step)
        self.with_stats = tf.function(self.stats_step)

    def at_step(self, step):
        """Tells the instruments and the non-finite guard (if any) the number of the step
        about to run."""
        self.step.assign(step)
        if self.guard is not None:
            self.guard.current_step.assign(step)

    def skipped(self):
        """The count of updates skipped as non-finite (`on_nonfinite="skip"`), else None."""
        return self.guard.skipped if self.guard is not None and self.guard.mode == "skip" else None

    def plain_step(self, x, y):
        """The plain step, uncompiled (to be traced inside a caller's `tf.function`)."""
        if self.micro_batch is not None:
            return self._accumulated(x, y)
        if self.replicas is not None:
            return self._replicated(x, y)
        with tf.GradientTape() as tape:
            outputs = self.model(x, training=True)
            per_example = self.loss_fn(y, outputs)
            loss = losses.reduce(per_example, self.reduction)
        self._apply(tape.gradient(loss, self.model.trainable_variables), loss)
        return self._metrics(per_example, outputs, y)

    def _accumulated(self, x, y):
        """Sums the gradients of the summed loss of each micro-batch, then applies once."""
        variables = self.model.trainable_variables
        total, per_example, outputs = None, [], []
        for start, stop in micro_batches(x.shape[0], self.micro_batch):
            with tf.control_dependencies(total or []):    # one micro-batch after another
                with tf.GradientTape() as tape:
                    out = self.model(x[start:stop], training=True)
                    losses_k = self.loss_fn(y[start:stop], out)
                    summed = tf.reduce_sum(losses_k)
                grads = gradients.dense_gradients(variables, tape.gradient(summed, variables))
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
            per_example.append(losses_k)
            outputs.append(out)
        if self.reduction == "mean":
            total = [g / x.shape[0] for g in total]
        self._apply(total, tf.reduce_sum(tf.concat(per_example, 0)))
        return self._metrics(tf.concat(per_example, 0), tf.concat(outputs, 0), y)

    def _replicated(self, x, y):
        """The plain step with the global batch `x` split across replicas."""
        grads, finite, per_example, outputs = self.replicas.gradients(self.model, self.loss_fn, x, y,
                                                                      self.reduction)
        self._apply(grads, losses.reduce(per_example, self.reduction), finite)
        return self._metrics(per_example, outputs, y)

    def _apply(self, grads, loss, finite=None):
        """One update; with a guard, only when `grads` and `loss` are finite."""
        if self.guard is None:
            self.apply(grads)
        else:
            self.guard(grads, loss, finite)

    def stats_step(self, x, y, active=None):
        """The statistics step, uncompiled (to be traced inside a caller's `tf.function`);
        `active`: only these of the instruments (default all)."""
        active = self.instruments if active is None else active
        needs = instruments_lib.needs(active)
        measured = measure(self.model, self.loss_fn, x, y, needs=needs, method=self.method,
                           reduction=self.reduction, micro_batch=self.micro_batch, replicas=self.replicas)
        m = measured.moments
        variables = self.model.trainable_variables
        step = self.step.read_value()
        early = statistics(measured, variables, active, self.replicas, step=step,
                           batch=(self.model, self.loss_fn, x, y), before_update=True)
        with tf.control_dependencies(tf.nest.flatten(early)):     # curvature at the weights measured
            before = snapshot(variables, needs)
            self._apply(measured.grads, tf.reduce_mean(m.losses))
        out = self._metrics(m.losses, m.outputs, y)
        out.update(early)
        out.update(statistics(measured, variables, active, self.replicas, before, step=step))
        return out

    def end_step(self, x, y):
        """The step after a statistics step when an instrument is two-step (alpha): only
        those instruments, which measure their second point on this step's batch."""
        return self.stats_step(x, y, [i for i in self.instruments if i.two_step])

    def _metrics(self, per_example, outputs, y):
        out = {"loss": tf.reduce_mean(per_example)}
        if self.classification:
            correct = tf.equal(tf.argmax(outputs, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
            out["accuracy"] = tf.reduce_mean(tf.cast(correct, tf.float32))
        return out
