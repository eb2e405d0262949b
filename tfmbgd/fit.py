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
the values go into a `tfmbgd.buffer.StatisticsBuffer`, and the callback writes them after
each execution. Under a `tf.distribute` strategy each replica measures its share and the
moments are merged into those of the global batch (`distribute.merge_flat`). With a
`LossScaleOptimizer` (Keras' `mixed_float16`) the moments are taken of the scaled loss, as
Keras' own step takes its gradient, and divided by the scale before any statistic. Sample
weights and activity regularizers are refused on statistics steps: the moments are of the
unweighted per-example data loss.
"""

import keras
import tensorflow as tf

from tfmbgd import buffer, distribute, fields, gradients, instruments, layerwise, steps
from tfmbgd.errors import UserError
from tfmbgd.models import all_layers
from tfmbgd.moments import METHODS


def per_example_loss(compiled_loss):
    """The per-example (unreduced) form of the loss given to `compile`."""
    if isinstance(compiled_loss, keras.losses.Loss):
        return compiled_loss.call           # Loss.call is the unreduced per-example loss
    fn = keras.losses.get(compiled_loss) if compiled_loss is not None else None
    if fn is None or isinstance(fn, keras.losses.Loss) or not callable(fn):
        raise UserError(f"cannot derive a per-example loss from {compiled_loss!r}; "
                        "pass loss= to configure_statistics")
    return fn


def check_settings(freq, method):
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise UserError(f"freq (statistics every N optimizer steps) must be an integer >= 1; got {freq!r}")
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


class _Recorder:
    """What the statistics step of one model needs: settings, built instruments, buffer."""

    def __init__(self, model, settings):
        self.settings = settings
        variables = model.trainable_variables
        names = [v.path for v in variables]
        active = active_instruments(model.optimizer, settings.more_instruments, settings.elementwise,
                                    settings.noise_scale_decay)
        instruments.refuse_replicas(active, model.distribute_strategy.num_replicas_in_sync > 1)
        self.needs = instruments.needs(active)
        scalar_tags, histogram_tags = instruments.tag_kinds(active, names)
        self.width = min(instruments.width(active), settings.freq)
        self.lags = instruments.lags(active)
        with model.distribute_strategy.scope(), buffer.first_replica_variables():
            self.instruments = instruments.build(active, variables)
            self.buffer = buffer.StatisticsBuffer(
                ["loss", *scalar_tags], histogram_tags,
                buffer.capacity(model.steps_per_execution, settings.freq) * self.width,
                widths=instruments.histogram_bins(active), images=instruments.images(active))
        self.finite_only = instruments.finite_only(active, names)
        self.described = False        # the coverage line is printed once per recorder


def _batch_size(x):
    """The examples in the batch `x` (a tensor, or a list or dict of them), as a tensor."""
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


def active_instruments(optimizer, more, elementwise=False, noise_scale_decay=0.9):
    """The instruments of a `fit` or a `tfmbgd.instruments.Cockpit` with `optimizer`: the
    defaults, then `more` (instances, names and presets), each name made for the optimizer's
    learning rate; instruments defined for plain SGD only are refused with another
    optimizer."""
    sgd = _plain_sgd(optimizer)
    named = [n for n in more if isinstance(n, str)]
    active = instruments.default(elementwise, noise_scale_decay) + instruments.create(
        named, _learning_rate(optimizer), "sgd" if sgd else type(optimizer).__name__) + [
        i for i in more if not isinstance(i, str)]
    instruments.check_sgd(active, sgd, type(optimizer).__name__)
    return active


def _learning_rate(optimizer):
    """The optimizer's learning rate as a float, or None (a schedule)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except (TypeError, ValueError):
        return None


def _plain_sgd(optimizer):
    """Whether `optimizer` is plain SGD: tfmbgd's MiniBatchSGD itself, or Keras' SGD without
    momentum (a LossScaleOptimizer is looked through)."""
    from tfmbgd.optimizers import MiniBatchSGD
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if type(optimizer) is MiniBatchSGD:
        return True
    return type(optimizer) is keras.optimizers.SGD and not optimizer.momentum and not optimizer.nesterov


class GradientStatisticsMixin:
    """Adds tfmbgd's gradient statistics to `fit`; put it before `keras.Model` in the bases."""

    _statistics_settings = None     # from configure_statistics: kept with the model
    _statistics_settings_on = None  # the settings of the fit in progress (its callback's)
    _statistics = None              # their _Recorder: instruments, buffer
    _statistics_traced = None       # the settings the current train function was made for

    def configure_statistics(self, log_dir, freq=10, method="auto", elementwise=False,
                             noise_scale_decay=0.9, loss=None, more_instruments=()):
        """Keeps statistics settings with the model: every later `fit` writes them to
        `log_dir/train` (a `tfmbgd.callbacks.GradientStatistics` callback that `fit` adds,
        unless one is given), and a `.keras` save keeps them (but `loss` and
        `more_instruments`, which are code). Arguments as for that callback."""
        from tfmbgd.callbacks import Settings
        check_settings(freq, method)
        self._statistics_settings = Settings(log_dir, freq, method, elementwise, noise_scale_decay, loss,
                                             tuple(more_instruments))

    def fit(self, *args, callbacks=None, **kwargs):
        from tfmbgd.callbacks import GradientStatistics
        if len(args) > 5:        # callbacks given by position: x, y, batch_size, epochs, verbose, callbacks
            args, callbacks = args[:5] + args[6:], args[5]
        callbacks = list(callbacks or [])
        settings = self._statistics_settings
        given = any(isinstance(c, GradientStatistics) for c in callbacks)
        if settings is not None and not given:     # the same callback while the settings are
            if getattr(self, "_statistics_callback", None) is None or \
                    self._statistics_callback.settings != settings:
                self._statistics_callback = GradientStatistics.from_settings(settings)
            callbacks.append(self._statistics_callback)
        elif settings is None and not given:
            self._use_statistics(None)
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def _use_statistics(self, settings):
        """Before `fit` makes its train function: a new one (traced at its first call) when
        the statistics settings differ from those the current one was traced with; the
        same one, not traced again, when they are the same (a fit called epoch by epoch)."""
        if self._statistics_traced != settings:
            self._statistics_settings_on = settings
            self.make_train_function(force=True)
            self._statistics_traced = settings

    def get_config(self):
        config = super().get_config()
        settings = self._statistics_settings
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

    def _start_statistics(self, settings):
        """Called by the callback as `fit` begins: statistics of `settings` on. The recorder
        is that of the last `fit` when the settings are the same (the noise scale's
        averages go on); a new one is made now, or, for a model that `fit` has yet to
        build, when the step is first traced."""
        if self._statistics is not None and self._statistics.settings != settings:
            self._statistics = None
        self._statistics_settings_on = settings
        if self._statistics is None and self.trainable_variables:
            self._statistics = _Recorder(self, settings)

    def _stop_statistics(self):
        self._statistics_settings_on = None

    def train_step(self, data):
        settings = self._statistics_settings_on
        if settings is None:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._statistics is None:      # a subclassed model, built by this first trace
            self(x, training=False)       # its variables, as Keras' own first step makes them
            with tf.init_scope():         # the recorder's variables, outside the trace
                self._statistics = _Recorder(self, settings)
        rec = self._statistics
        variables = self.trainable_variables
        if not self.optimizer.built:                   # slots exist before the branches
            with tf.init_scope():
                self.optimizer.build(variables)
        step = self.optimizer.iterations + 0           # read once, before this update
        due = step % rec.settings.freq == 0
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas == 1:     # all in the branch: a plain step does nothing for the statistics
            plain = lambda: self._plain_step(x, y, sample_weight)
            if rec.width > 1:      # a two-step instrument (alpha): the next step measures its end point
                end = step % rec.settings.freq == 1
                other, plain = plain, lambda: tf.cond(end, lambda: self._statistics_step(
                    x, y, sample_weight, step, [i for i in rec.instruments if i.two_step]), other)
            loss, y_pred = tf.cond(due, lambda: self._statistics_step(x, y, sample_weight, step), plain)
        else:
            loss, y_pred = self._replicated_step(x, y, sample_weight, step, due)
        # As Keras' own train_step: the loss tracker takes the loss unscaled for
        # distribution, weighted by the batch; compute_metrics the rest.
        tracker = next(m for m in self.metrics if m.name == "loss")
        tracker.update_state(loss * replicas, sample_weight=_batch_size(x))
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

    def _statistics_step(self, x, y, sample_weight, step, active=None):
        """One device: measure, apply the mean gradient, record the statistics (of `active`,
        default all the instruments)."""
        active = self._statistics.instruments if active is None else active
        needs = instruments.needs(active)
        measured, scale = self._measure(x, y, sample_weight, needs)
        local, variables = measured.moments, self.trainable_variables
        measured = self._unscaled(measured, scale)
        early = steps.statistics(measured, variables, active, step=step,
                                 batch=(self, self._data_loss(), x, y), before_update=True)
        with tf.control_dependencies(tf.nest.flatten(early)):      # curvature at the weights measured
            before = steps.snapshot(variables, needs)
            self.optimizer.apply_gradients(zip(self._update(local, 1.0, scale), variables))
        self._record(measured, step, before, early, active)
        return self._tracked_loss(local, scale), local.outputs

    def _data_loss(self):
        """The per-example data loss, in float32 (the statistics' loss)."""
        data_loss = self._statistics.settings.loss or per_example_loss(self.loss)
        return lambda y_true, y_pred: tf.cast(data_loss(y_true, y_pred), tf.float32)

    @staticmethod
    def _unscaled(measured, scale):
        """A `steps.Measured` of the loss times `scale` as one of the loss itself."""
        project = measured.project
        if project is not None:
            project = project.scaled(1.0 / scale)
        m = fields.unscaled(measured.moments, scale)
        return steps.Measured(m, m.mean, None, project)

    def _replicated_step(self, x, y, sample_weight, step, due):
        """Several replicas: a branch of `tf.cond` in a replica cannot hold a synchronization
        point (an all-reduce, the optimizer's sum of the gradients), so the branch only
        measures (or takes the plain gradient), and the update and the merge of the moments
        follow it; on plain steps the merge carries zeros."""
        ctx = tf.distribute.get_replica_context()
        variables = self.trainable_variables
        elementwise = instruments.ELEMENTWISE in self._statistics.needs
        batch = _batch_size(x)
        share = tf.cast(batch, tf.float32) / ctx.all_reduce("SUM", tf.cast(batch, tf.float32))

        def measured():
            local, scale = self._measure(x, y, sample_weight)
            local = local.moments
            sums, rows = distribute.flat_for_merge(local)
            grads = self._update(local, share, scale)
            return self._tracked_loss(local, scale), local.outputs, grads, sums, rows, scale

        def plain():
            loss, y_pred, grads = self._plain_gradients(x, y, sample_weight, dense=True)
            sums, rows = distribute.zeros_for_merge(variables, elementwise, batch)
            return loss, y_pred, grads, sums, rows, tf.constant(1.0)
        loss, y_pred, grads, sums, rows, scale = tf.cond(due, measured, plain)
        before = steps.snapshot(variables, self._statistics.needs)     # (every step, if needed)
        self.optimizer.apply_gradients(zip(grads, variables))
        merged = distribute.merge_flat(ctx, sums, rows, variables, elementwise)
        unscaled = lambda: self._unscaled(steps.Measured(merged, merged.mean, None), scale)
        tf.cond(due, lambda: self._record(unscaled(), step, before), lambda: tf.constant(False))
        return loss, y_pred

    def _measure(self, x, y, sample_weight, needs=None):
        """The moments of this replica's batch, of the loss times the optimizer's loss scale
        (a LossScaleOptimizer's, 1 otherwise: as Keras takes its gradient, so that float16
        gradients do not underflow); `(moments, scale)`."""
        rec = self._statistics
        if sample_weight is not None:
            raise UserError("gradient statistics take no sample weights")
        if any(getattr(layer, "activity_regularizer", None) for layer in all_layers(self)):
            raise UserError("gradient statistics do not support activity regularizers")
        data_loss = self._data_loss()
        scale = tf.cast(self.optimizer.scale_loss(tf.constant(1.0)), tf.float32)
        # float32 before the scale (2^15 at first): 16-bit losses times it would overflow
        loss_fn = lambda y_true, y_pred: data_loss(y_true, y_pred) * scale
        needs = rec.needs if needs is None else needs
        measured = steps.measure(self, loss_fn, x, y, needs=needs - {instruments.REPLICA_NORMS},
                                 method=rec.settings.method)
        cover = layerwise.traced_coverage(self)
        if cover is not None and not rec.described:      # once, when the step is first traced
            print(layerwise.describe(cover))
            rec.described = True
        return measured, scale

    def _update(self, local, share, scale):
        """What this replica gives the optimizer, which sums over the replicas (and divides
        by a loss scale): its `share` of the global batch's mean gradient, and 1/R of the
        penalties' gradient, both times the loss scale."""
        grads = [g * tf.cast(share, g.dtype) for g in local.mean]
        if self.losses:
            replicas = self.distribute_strategy.num_replicas_in_sync
            penalty = self._penalty_gradients()
            grads = [g + p * tf.cast(scale / replicas, p.dtype) for g, p in zip(grads, penalty)]
        return grads

    def _record(self, measured, step, before=None, early=None, active=None):
        """The statistics of the (merged, unscaled) measurement into the buffer, with those
        computed before the update (`early`); `before`: the weights before the update
        (`steps.snapshot`)."""
        rec = self._statistics
        values = steps.statistics(measured, self.trainable_variables,
                                  rec.instruments if active is None else active, before=before, step=step)
        values.update(early or {})
        values["loss"] = tf.reduce_mean(measured.moments.losses)
        with tf.control_dependencies([rec.buffer.record(values, step)]):
            return tf.constant(True)

    def _tracked_loss(self, local, scale):
        """The loss Keras' compute_loss gives: the batch's mean data loss plus the penalties,
        divided by the replicas (the tracker multiplies back)."""
        penalty = tf.add_n(self.losses) if self.losses else 0.0
        replicas = self.distribute_strategy.num_replicas_in_sync
        return (tf.reduce_mean(tf.cast(local.losses, tf.float32)) / scale + penalty) / replicas

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
    raise UserError(f"{type(model).__name__} is a subclassed model: add "
                    "tfmbgd.fit.GradientStatisticsMixin before keras.Model in its bases")
