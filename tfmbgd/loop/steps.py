"""One training step, plain or with gradient statistics, and the schedule of statistics steps.

A step takes a mini-batch, computes the batch gradient and applies it once — one update
per batch, never per example. The gradient is that of the `reduce_mean` (or `reduce_sum`)
of the unscaled per-example losses. On statistics steps it comes from the gradient moments
instead: their `mean` *is* the gradient of the mean loss, so the update is the same and the
statistics are of the very batch that was applied.

Every driver — the custom loop (`Steps`, `runner`), `model.fit` (`tfmbgd.fit`) and
`Cockpit` — runs a statistics step as `measure`, then `statistics_step` (the one order of
instruments, snapshot and update), on the steps `Schedule` picks.
"""

from typing import NamedTuple

import tensorflow as tf

from tfmbgd import losses
from tfmbgd.engine import gradients
from tfmbgd.engine.moments import accumulated_moments, gradient_moments, measured_moments, micro_batches
from tfmbgd.errors import UserError
from tfmbgd.instruments import DOTS, ELEMENTWISE, ONE_DEVICE, PARAMETERS, REPLICA_NORMS, Measurement, Panel
from tfmbgd.instruments import default as default_instruments
from tfmbgd.instruments.panel import refuse_on_replicas


class Schedule:
    """Which steps are statistics steps: every `every` optimizer steps from step 0, and, when
    an instrument is two-step (the panel's `width` 2, alpha), the step after each too (an
    *end step*, where only the two-step instruments run). `every` 0: none."""

    def __init__(self, every, panel):
        self.every = int(every)
        self.width = min(panel.width, self.every) if self.every else 1

    def is_stats(self, step):
        return step % self.every == 0

    def is_end(self, step):
        """Whether `step` is an end step (with width 1: Python's False, for any step)."""
        return self.width > 1 and step % self.every == 1

    def rows(self, steps):
        """Statistics and end steps among any `steps` consecutive ones, at most (a buffer's
        rows for a call of that many steps)."""
        return capacity(steps, self.every) * self.width if self.every else 0


class Measured(NamedTuple):
    """A statistics step's measurement, before its update is applied."""

    moments: object      # the GradientMoments of the batch
    grads: list          # the gradient to apply, aligned with model.trainable_variables
    small_sq: object     # the replicas' mean |G_share|^2 (the REPLICA_NORMS need), or None
    project: object = None   # the per-example gradients' forms.Projector (the DOTS need), or None


def capacity(steps_per_call, stats_every):
    """Rows a buffer needs for the statistics steps of one call of `steps_per_call` steps:
    at most one every `stats_every` steps, wherever the call starts."""
    return max(1, -(-int(steps_per_call) // int(stats_every)))


def measure(model, loss_fn, x, y, *, needs=frozenset(), method="auto", reduction="mean",
            extra_gradients=None, micro_batch=None, replicas=None):
    """The gradient moments of `(x, y)` and the gradient of the update they give, which the
    caller applies; then `statistics_step` of the same measurement.

    Args:
      needs: what the active instruments need beyond the norm tier (`Panel.needs`):
        `ELEMENTWISE` computes `sum_sq`, `REPLICA_NORMS` the replicas' mean-gradient norms,
        `DOTS` the per-example forms; nothing else is computed.
      method: as for `tfmbgd.stats.gradient_moments`.
      reduction: "mean" applies the mean gradient, "sum" B times it.
      extra_gradients: `() -> grads` added to the update, e.g. of regularization penalties.
      micro_batch: accumulate the moments over micro-batches of this size (None: at once).
      replicas: a `tfmbgd.engine.replicas.Replicas`: `(x, y)` is the global batch, split across them,
        and the moments are merged into those of the global batch.

    Returns:
      A `Measured`: the moments, and the gradient to apply (their mean, times B for "sum",
      plus `extra_gradients`).
    """
    elementwise = ELEMENTWISE in needs
    small_sq = project = None
    if replicas is not None:
        refuse_on_replicas(sorted(needs & ONE_DEVICE))
    if DOTS in needs:
        m, project = measured_moments(model, loss_fn, x, y, method, elementwise, micro_batch)
    elif replicas is not None:
        m, small_sq = replicas.moments(model, loss_fn, x, y, method, elementwise,
                                       two_batch=REPLICA_NORMS in needs)
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


def measurement(measured, variables, *, step, replicas=None, before=None, batch=None):
    """The instruments' `Measurement` of a `Measured` step. `before`: the variables' values
    before the update (`snapshot`), for the `PARAMETERS` need; `batch`: `(model, loss_fn,
    x, y)`, for the `BATCH` need; `step`: the step's number."""
    return Measurement(measured.moments, [v.path for v in variables], small_sq=measured.small_sq,
                       replicas=replicas, before=before, variables=variables, project=measured.project,
                       batch=batch, step=step)


def statistics_step(measured, panel, update, *, variables, step, batch=None, replicas=None):
    """The statistics step after `measure`, in the one order every driver follows: the
    instruments that run before the update (curvature, at the weights that measured the
    batch), a snapshot of the weights (if an instrument needs them), `update()`, then the
    other instruments (which see the update: alpha, update size). Returns `{tag: tensor}`
    of the `panel`'s instruments."""
    early = panel.compute(measurement(measured, variables, step=step, replicas=replicas, batch=batch),
                          before_update=True)
    with tf.control_dependencies(tf.nest.flatten(early)):     # curvature at the weights measured
        before = snapshot(variables, panel.needs)
        update()
    late = panel.compute(measurement(measured, variables, step=step, replicas=replicas, before=before))
    return {**early, **late}


def snapshot(variables, needs):
    """The variables' values now, when the instruments need `PARAMETERS` (else None): call
    it before the update (reads and assignments of a variable run in program order)."""
    if PARAMETERS not in needs:
        return None
    return [tf.identity(v) for v in variables]


class Steps:
    """The two compiled train steps of a run: `plain(x, y)` and `with_stats(x, y)`
    (`plain_step` and `stats_step` uncompiled, for a caller's own `tf.function`).

    Both apply one update and return a dict of tensors: `loss` (the mean per-example loss
    of the batch, whatever the reduction, so runs compare), `accuracy` (classification);
    `with_stats` adds the values of its instruments. `plain` computes no moments at all.

    Args:
      method: how `gradient_moments` gets per-example information ("auto", ...).
      instruments: the statistics of `with_stats`: a `tfmbgd.instruments.Panel`, or a list
        of instruments; built here (their state is made now, so make the `Steps` under the
        run's strategy scope). Default: `tfmbgd.instruments.default()`.
      micro_batch: gradient accumulation: the batch of one update is processed in
        micro-batches of this size, one after another, and their summed gradients applied
        once — the same update as the whole batch at once. None: no accumulation.
      guard: a `NonFiniteGuard` around `apply`, or None to apply every update.
      replicas: a `tfmbgd.engine.replicas.Replicas` to split every (global) batch across; the update
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
        if not isinstance(instruments, Panel):
            instruments = Panel(default_instruments() if instruments is None else instruments)
        self.panel = instruments.build(model.trainable_variables)
        self.panel.refuse_replicas(replicas is not None)
        self.finite_only = self.panel.finite_only
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)     # set by at_step
        self.plain = tf.function(self.plain_step)
        self.with_stats = tf.function(self._every_stat)

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

    @property
    def instruments(self):
        """The instruments of `with_stats`, in order."""
        return list(self.panel)

    def stats_step(self, x, y, panel=None):
        """The statistics step, uncompiled (to be traced inside a caller's `tf.function`);
        `panel`: only these of the instruments (default all)."""
        panel = self.panel if panel is None else panel
        measured = measure(self.model, self.loss_fn, x, y, needs=panel.needs, method=self.method,
                           reduction=self.reduction, micro_batch=self.micro_batch, replicas=self.replicas)
        m = measured.moments
        update = lambda: self._apply(measured.grads, tf.reduce_mean(m.losses))
        values = statistics_step(measured, panel, update, variables=self.model.trainable_variables,
                                 step=self.step.read_value(), batch=(self.model, self.loss_fn, x, y),
                                 replicas=self.replicas)
        return {**self._metrics(m.losses, m.outputs, y), **values}

    def _every_stat(self, x, y):
        """`stats_step` with all the instruments, for `with_stats`: a `tf.function` of a
        Python function with a defaulted parameter (`stats_step`'s `panel`) binds every
        call's arguments on a slower path, which the step of a small model feels
        (`docs/benchmarks.md`)."""
        return self.stats_step(x, y)

    def end_step(self, x, y):
        """The step after a statistics step when an instrument is two-step (alpha): only
        those instruments, which measure their second point on this step's batch."""
        return self.stats_step(x, y, self.panel.two_step())

    def _metrics(self, per_example, outputs, y):
        out = {"loss": tf.reduce_mean(per_example)}
        if self.classification:
            correct = tf.equal(tf.argmax(outputs, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
            out["accuracy"] = tf.reduce_mean(tf.cast(correct, tf.float32))
        return out
