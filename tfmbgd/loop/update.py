"""Applying one update: the manual rule, an optimizer (under a strategy too), and the guard
that applies only finite updates."""

import tensorflow as tf

from tfmbgd import optimizers
from tfmbgd.choices import ON_NONFINITE
from tfmbgd.engine.replicas import Unsummed
from tfmbgd.errors import UserError


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
            if isinstance(grads, Unsummed):
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
    plain step passes its gradients unsummed (`tfmbgd.engine.replicas.Unsummed`): each replica hands
    its own to the optimizer, which makes the one all-reduce. A statistics step has already
    summed them (its statistics need the sum): then replica 0 passes the whole gradient and
    the others zeros, whose sum is exactly the gradient (x + 0 = x).
    """
    optimizer.build(variables)

    def apply(grads):
        if not (tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context()):
            return optimizer.apply_gradients(zip(grads, variables))
        if isinstance(grads, Unsummed):
            grads.strategy.extended.call_for_each_replica(
                lambda grads: optimizer.apply_gradients(zip(grads, variables)), args=(grads.per_replica,))
            return

        def in_replica(grads):
            first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
            optimizer.apply_gradients(zip([tf.where(first, g, tf.zeros_like(g)) for g in grads], variables))
        tf.distribute.get_strategy().extended.call_for_each_replica(in_replica, args=(grads,))
    return apply


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
