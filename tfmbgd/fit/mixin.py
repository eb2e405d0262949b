"""The same gradient statistics inside `model.fit`, as Keras runs it: XLA, several
replicas, mixed precision, `steps_per_execution`, save and load.

Keras 3 offers two places to add work to `fit`: callbacks, which never see the gradients
or the batch, and `Model.train_step`, which does. Statistics need both, so tfmbgd
overrides `train_step` (the way the Keras guide "Customizing what happens in fit()"
shows) in a mixin, and a callback writes what the step measured:

    model = tfmbgd.fit.with_statistics(functional_or_sequential_model)   # shares its layers
    # or, for a subclassed model:  class MyModel(tfmbgd.fit.GradientStatisticsMixin, keras.Model)
    model.compile(optimizer=tfmbgd.optimizers.Adam(1e-3), loss=..., metrics=[...])
    model.fit(x, y, epochs=5, callbacks=[tfmbgd.callbacks.GradientStatistics("logs/my-run", freq=10)])

(`model.configure_statistics("logs/my-run", freq=10)` instead keeps the settings with the
model, saved in its `.keras` file, and `fit` adds the callback itself.)

Every `freq` optimizer steps the step computes the gradient moments of its batch
(`tfmbgd.stats.gradient_moments`, any method), applies their mean (plus the gradient of
weight regularization penalties) and computes the tags of the custom loop at the optimizer
step, counted from 0 as there; other steps are Keras' own step. The choice is made inside
the compiled step (`tf.cond`), so it works with `steps_per_execution > 1` and under XLA:
the values go into a `tfmbgd.loop.buffer.StatisticsBuffer`, and the callback writes them after
each execution. Under a `tf.distribute` strategy each replica measures its share and the
moments are merged into those of the global batch (`tfmbgd.engine.replicas.merge_flat`). With a
`LossScaleOptimizer` (Keras' `mixed_float16`) the moments are taken of the scaled loss, as
Keras' own step takes its gradient, and divided by the scale before any statistic. With
sample weights, class weights or a token mask, the per-example loss is weighted as Keras'
default reduction weighs it (`tfmbgd.losses.weighted`), so the moments' mean is the gradient
Keras applies. Activity regularizers are refused on statistics steps.
"""

import keras
import tensorflow as tf

from tfmbgd import losses
from tfmbgd.engine import fields, gradients, layerwise, replicas
from tfmbgd.errors import UserError
from tfmbgd.fit.callback import GradientStatistics
from tfmbgd.fit.settings import Settings, check_settings, per_example_loss
from tfmbgd.instruments import ELEMENTWISE, REPLICA_NORMS, Panel
from tfmbgd.loop import buffer, steps
from tfmbgd.models import all_layers


class Recorder:
    """What the statistics steps of one model need for one set of settings: the built
    instruments (`panel`), their `schedule` and the `buffer` the callback writes from."""

    def __init__(self, model, settings):
        self.settings = settings
        panel = Panel.for_optimizer(model.optimizer, settings.more_instruments,
                                    elementwise=settings.elementwise,
                                    noise_scale_decay=settings.noise_scale_decay)
        panel.refuse_replicas(model.distribute_strategy.num_replicas_in_sync > 1)
        self.schedule = steps.Schedule(settings.freq, panel)
        with model.distribute_strategy.scope(), buffer.first_replica_variables():
            self.panel = panel.build(model.trainable_variables)
            self.buffer = buffer.StatisticsBuffer.for_panel(
                panel, self.schedule.rows(model.steps_per_execution), ["loss"])
        self.finite_only, self.lags = panel.finite_only, panel.lags
        self.described = False        # the coverage line is printed once per recorder


class StatisticsHook:
    """A model's statistics state, and the one object its `GradientStatistics` callback
    talks to: the settings kept with the model (`configured`), those of the fit in progress
    (`on`), those its train function was traced for (`traced`), the `recorder` of the
    statistics steps, and the callback that `fit` adds for the configured settings."""

    def __init__(self, model):
        self.model = model
        self.configured = self.on = self.traced = self.recorder = self.callback = None

    def use(self, settings):
        """Before `fit` makes its train function: a new one (traced at its first call) when
        the statistics settings differ from those the current one was traced with; the
        same one, not traced again, when they are the same (a fit called epoch by epoch)."""
        if self.traced != settings:
            self.on = settings
            self.model.make_train_function(force=True)
            self.traced = settings

    def start(self, settings):
        """As `fit` begins: statistics of `settings` on. The recorder is that of the last
        `fit` when the settings are the same (the noise scale's averages go on); a new one
        is made now, or, for a model that `fit` has yet to build, when the step is first
        traced."""
        if self.recorder is not None and self.recorder.settings != settings:
            self.recorder = None
        self.on = settings
        if self.recorder is None and self.model.trainable_variables:
            self.recorder = Recorder(self.model, settings)

    def stop(self):
        self.on = None


def _batch_size(x):
    """The examples in the batch `x` (a tensor, or a list or dict of them), as a tensor."""
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


class GradientStatisticsMixin:
    """Adds tfmbgd's gradient statistics to `fit`; put it before `keras.Model` in the bases."""

    def statistics_hook(self):
        """The model's `StatisticsHook` (made at first use)."""
        if getattr(self, "_statistics_hook", None) is None:
            self._statistics_hook = StatisticsHook(self)
        return self._statistics_hook

    def configure_statistics(self, log_dir, freq=10, method="auto", elementwise=False,
                             noise_scale_decay=0.9, loss=None, more_instruments=()):
        """Keeps statistics settings with the model: every later `fit` writes them to
        `log_dir/train` (a `tfmbgd.callbacks.GradientStatistics` callback that `fit` adds,
        unless one is given), and a `.keras` save keeps them (but `loss` and
        `more_instruments`, which are code). Arguments as for that callback."""
        check_settings(freq, method)
        self.statistics_hook().configured = Settings(log_dir, freq, method, elementwise, noise_scale_decay,
                                                     loss, tuple(more_instruments))

    def fit(self, *args, callbacks=None, **kwargs):
        if len(args) > 5:        # callbacks given by position: x, y, batch_size, epochs, verbose, callbacks
            args, callbacks = args[:5] + args[6:], args[5]
        callbacks = list(callbacks or [])
        hook = self.statistics_hook()
        if not any(isinstance(c, GradientStatistics) for c in callbacks):
            if hook.configured is None:
                hook.use(None)
            else:                # the same callback while the settings are the same
                if hook.callback is None or hook.callback.settings != hook.configured:
                    hook.callback = GradientStatistics.from_settings(hook.configured)
                callbacks.append(hook.callback)
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def get_config(self):
        config = super().get_config()
        settings = self.statistics_hook().configured
        if settings is not None:
            config["statistics"] = settings.serializable()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        statistics = config.pop("statistics", None)
        model = super().from_config(config, custom_objects=custom_objects)
        if statistics is not None:
            model.configure_statistics(**statistics)
        return model

    def train_step(self, data):
        hook = self.statistics_hook()
        if hook.on is None:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if hook.recorder is None:         # a subclassed model, built by this first trace
            self(x, training=False)       # its variables, as Keras' own first step makes them
            with tf.init_scope():         # the recorder's variables, outside the trace
                hook.recorder = Recorder(self, hook.on)
        rec = hook.recorder
        if not self.optimizer.built:                   # slots exist before the branches
            with tf.init_scope():
                self.optimizer.build(self.trainable_variables)
        step = self.optimizer.iterations + 0           # read once, before this update
        count = self.distribute_strategy.num_replicas_in_sync
        if count > 1:
            loss, y_pred = self._replicated_step(x, y, sample_weight, step)
        else:     # all in the branches: a plain step does nothing for the statistics
            def statistics():
                return self._statistics_step(x, y, sample_weight, step, rec.panel)

            def end():        # a two-step instrument (alpha) measures its end point here
                return self._statistics_step(x, y, sample_weight, step, rec.panel.two_step())

            def plain():
                return self._plain_step(x, y, sample_weight)

            def other():
                return tf.cond(rec.schedule.is_end(step), end, plain) if rec.schedule.width > 1 else plain()
            loss, y_pred = tf.cond(rec.schedule.is_stats(step), statistics, other)
        # As Keras' own train_step: the loss tracker takes the loss unscaled for
        # distribution, weighted by the batch; compute_metrics the rest.
        tracker = next(m for m in self.metrics if m.name == "loss")
        tracker.update_state(loss * count, sample_weight=_batch_size(x))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _plain_gradients(self, x, y, sample_weight, dense=False):
        """Keras' own step, but the update: the loss scaled for the optimizer (a
        LossScaleOptimizer's scale) and its gradient; `(loss, y_pred, grads)`. `dense`:
        zeros for None and IndexedSlices densified, as a branch of `tf.cond` whose twin
        returns dense tensors needs; else as the tape gives them (an Embedding's gradient
        stays sparse, as in Keras' own step)."""
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        return loss, y_pred, (gradients.dense_gradients(variables, grads) if dense else grads)

    def _plain_step(self, x, y, sample_weight):
        loss, y_pred, grads = self._plain_gradients(x, y, sample_weight)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return loss, y_pred

    def _statistics_step(self, x, y, sample_weight, step, panel):
        """One device: measure, then the statistics step of `panel` (`steps.statistics_step`)
        around the optimizer's update, and record the values."""
        loss_fn, targets = self._weighted_loss(y, sample_weight)
        measured, scale = self._measure(x, targets, loss_fn, panel.needs)
        local, unscaled = measured.moments, self._unscaled(measured, scale)
        variables = self.trainable_variables
        update = lambda: self.optimizer.apply_gradients(zip(self._update(local, 1.0, scale), variables))
        values = steps.statistics_step(unscaled, panel, update, variables=variables, step=step,
                                       batch=(self, loss_fn, x, targets))
        self._record(values, unscaled.moments.losses, step)
        return self._tracked_loss(local, scale), local.outputs

    def _weighted_loss(self, y, sample_weight):
        """`(loss_fn, targets)`: the per-example data loss in float32 (the statistics' loss),
        each example's values averaged as Keras' default reduction does, and the targets it
        takes. With `sample_weight` (a `[B]` weight, class weights turned into one by Keras,
        or a `[B, T]` mask) the values are weighted as Keras weighs them and the weights
        are packed into the targets (`tfmbgd.losses.weighted`): the mean of the per-example
        losses is the loss Keras optimizes."""
        data_loss = self.statistics_hook().recorder.settings.loss or per_example_loss(self.loss)
        values = lambda y_true, y_pred: tf.cast(data_loss(y_true, y_pred), tf.float32)
        if sample_weight is None:
            return lambda y_true, y_pred: losses.per_example_mean(values(y_true, y_pred)), y
        return losses.weighted(values, y, sample_weight)

    @staticmethod
    def _unscaled(measured, scale):
        """A `steps.Measured` of the loss times `scale` as one of the loss itself."""
        project = measured.project
        if project is not None:
            project = project.scaled(1.0 / scale)
        m = fields.unscaled(measured.moments, scale)
        return steps.Measured(m, m.mean, None, project)

    def _replicated_step(self, x, y, sample_weight, step):
        """Several replicas: a branch of `tf.cond` in a replica cannot hold a synchronization
        point (an all-reduce, the optimizer's sum of the gradients), so the branch only
        measures (or takes the plain gradient), and the update and the merge of the moments
        follow it; on plain steps the merge carries zeros. (No instrument that runs before
        the update or on two steps works across replicas: the panel refuses them.)"""
        ctx = tf.distribute.get_replica_context()
        rec, variables = self.statistics_hook().recorder, self.trainable_variables
        elementwise = ELEMENTWISE in rec.panel.needs
        batch = _batch_size(x)
        share = tf.cast(batch, tf.float32) / ctx.all_reduce("SUM", tf.cast(batch, tf.float32))

        def measured():
            loss_fn, targets = self._weighted_loss(y, sample_weight)
            local, scale = self._measure(x, targets, loss_fn, rec.panel.needs)
            local = local.moments
            sums, rows = replicas.flat_for_merge(local)
            grads = self._update(local, share, scale)
            return self._tracked_loss(local, scale), local.outputs, grads, sums, rows, scale

        def plain():
            loss, y_pred, grads = self._plain_gradients(x, y, sample_weight, dense=True)
            sums, rows = replicas.zeros_for_merge(variables, elementwise, batch)
            return loss, y_pred, grads, sums, rows, tf.constant(1.0)
        due = rec.schedule.is_stats(step)
        loss, y_pred, grads, sums, rows, scale = tf.cond(due, measured, plain)
        before = steps.snapshot(variables, rec.panel.needs)     # (every step, if needed)
        self.optimizer.apply_gradients(zip(grads, variables))
        merged = replicas.merge_flat(ctx, sums, rows, variables, elementwise)

        def record():
            unscaled = self._unscaled(steps.Measured(merged, merged.mean, None), scale)
            values = rec.panel.compute(steps.measurement(unscaled, variables, step=step, before=before))
            return self._record(values, unscaled.moments.losses, step)
        tf.cond(due, record, lambda: tf.constant(False))
        return loss, y_pred

    def _measure(self, x, y, data_loss, needs):
        """The moments of this replica's batch under the per-example `data_loss`, of the loss
        times the optimizer's loss scale (a LossScaleOptimizer's, 1 otherwise: as Keras
        takes its gradient, so that float16 gradients do not underflow); `(measured, scale)`."""
        rec = self.statistics_hook().recorder
        if any(getattr(layer, "activity_regularizer", None) for layer in all_layers(self)):
            raise UserError("gradient statistics do not support activity regularizers")
        scale = tf.cast(self.optimizer.scale_loss(tf.constant(1.0)), tf.float32)
        # float32 before the scale (2^15 at first): 16-bit losses times it would overflow
        loss_fn = lambda y_true, y_pred: data_loss(y_true, y_pred) * scale
        measured = steps.measure(self, loss_fn, x, y, needs=needs - {REPLICA_NORMS},
                                 method=rec.settings.method)
        cover = layerwise.traced_coverage(self)
        if cover is not None and not rec.described:      # once, when the step is first traced
            print(layerwise.describe(cover, layerwise.batch_norms(self)))
            rec.described = True
        return measured, scale

    def _update(self, local, share, scale):
        """What this replica gives the optimizer, which sums over the replicas (and divides
        by a loss scale): its `share` of the global batch's mean gradient, and 1/R of the
        penalties' gradient, both times the loss scale."""
        grads = [g * tf.cast(share, g.dtype) for g in local.mean]
        if self.losses:
            count = self.distribute_strategy.num_replicas_in_sync
            penalty = self._penalty_gradients()
            grads = [g + p * tf.cast(scale / count, p.dtype) for g, p in zip(grads, penalty)]
        return grads

    def _record(self, values, losses, step):
        """The statistics `values` of a step and its mean loss `losses` (unscaled) into the
        buffer."""
        values = {**values, "loss": tf.reduce_mean(losses)}
        with tf.control_dependencies([self.statistics_hook().recorder.buffer.record(values, step)]):
            return tf.constant(True)

    def _tracked_loss(self, local, scale):
        """The loss Keras' compute_loss gives: the batch's mean data loss plus the penalties,
        divided by the replicas (the tracker multiplies back)."""
        penalty = tf.add_n(self.losses) if self.losses else 0.0
        count = self.distribute_strategy.num_replicas_in_sync
        return (tf.reduce_mean(tf.cast(local.losses, tf.float32)) / scale + penalty) / count

    def _penalty_gradients(self):
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            total = tf.add_n(self.losses)
        return gradients.dense_gradients(variables, tape.gradient(total, variables))


@keras.saving.register_keras_serializable(package="tfmbgd")
class GradientStatisticsModel(GradientStatisticsMixin, keras.Model):
    """A functional `keras.Model` with gradient statistics in `fit`."""


@keras.saving.register_keras_serializable(package="tfmbgd")
class GradientStatisticsSequential(GradientStatisticsMixin, keras.Sequential):
    """A `keras.Sequential` with gradient statistics in `fit`."""


def with_statistics(model):
    """A model with statistics in `fit` that shares `model`'s layers and weights.

    For functional and Sequential models (built with an `Input`): the result is a functional
    model over the same layers. Subclassed models add `GradientStatisticsMixin` to their
    bases instead.
    """
    if isinstance(model, GradientStatisticsMixin):
        return model
    if getattr(model, "inputs", None) is not None:        # functional, or a built Sequential
        # The inputs as the model takes them (one tensor, a list, a dict): given `inputs`,
        # always a list, a one-input model would warn at every call that its input's
        # structure does not match.
        try:
            structure = model.input
        except AttributeError:                            # a Sequential never called
            structure = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return GradientStatisticsModel(structure, model.outputs[0] if len(model.outputs) == 1
                                       else model.outputs, name=model.name)
    if isinstance(model, keras.Sequential):
        raise UserError(f"the Sequential model {model.name!r} has no Input yet, so it has no graph to "
                        "share: start it with keras.Input(shape=...), as in keras.Sequential([keras.Input("
                        "(28, 28)), ...]), or use tfmbgd.fit.GradientStatisticsSequential in its place")
    raise UserError(f"{type(model).__name__} is a subclassed model: add "
                    "tfmbgd.fit.GradientStatisticsMixin before keras.Model in its bases")
