"""The same gradient statistics inside `model.fit`.

Keras 3 offers two places to add work to `fit`: callbacks, which never see the gradients
or the batch, and `Model.train_step`, which does. Statistics need both, so tfmbgd
overrides `train_step` (the way the Keras guide "Customizing what happens in fit()"
shows) in a mixin:

    model = tfmbgd.fit.with_statistics(functional_or_sequential_model)   # shares its layers
    # or, for a subclassed model:  class MyModel(tfmbgd.fit.GradientStatisticsMixin, keras.Model)
    model.compile(optimizer=tfmbgd.optimizers.Adam(1e-3), loss=..., metrics=[...])
    model.configure_statistics("logs/my-run/train", stats_every=10)
    model.fit(x, y, batch_size=32, epochs=5)
    model.flush_statistics()

Every `stats_every` optimizer steps the step computes the gradient moments of its batch
(`tfmbgd.stats.gradient_moments`, any method), applies their mean (plus the gradient of
weight regularization penalties) and writes the tags of the custom loop at the optimizer
step, counted from 0 as there. Other steps are Keras' own step. The choice is made inside
the compiled step (`tf.cond`), so it works with `steps_per_execution > 1`.

Summary writes cannot run under XLA: a model compiled with `jit_compile=True` is refused
(compile with `jit_compile=False`). Sample weights and activity regularizers are refused
on statistics steps: the moments are of the unweighted per-example data loss.
"""

import keras
import tensorflow as tf

from tfmbgd import gradients, instruments, layerwise, steps, summaries
from tfmbgd.errors import UserError
from tfmbgd.models import all_layers


def per_example_loss(compiled_loss):
    """The per-example (unreduced) form of the loss given to `compile`."""
    if isinstance(compiled_loss, keras.losses.Loss):
        return compiled_loss.call           # Loss.call is the unreduced per-example loss
    fn = keras.losses.get(compiled_loss) if compiled_loss is not None else None
    if fn is None or isinstance(fn, keras.losses.Loss) or not callable(fn):
        raise UserError(f"cannot derive a per-example loss from {compiled_loss!r}; "
                        "pass loss= to configure_statistics")
    return fn


class _Recorder:
    """Settings and state of the statistics of one model: writer, method, instruments."""

    def __init__(self, log_dir, stats_every, method, active, variables, loss):
        if not isinstance(stats_every, int) or stats_every < 1:
            raise UserError(f"stats_every must be an integer >= 1; got {stats_every!r}")
        self.writer = tf.summary.create_file_writer(log_dir)
        self.stats_every, self.method = stats_every, method
        self.instruments = instruments.build(active, variables)
        self.needs = instruments.needs(active)
        self.finite_only = instruments.finite_only(active, [v.path for v in variables])
        self.loss = loss
        self.described = False        # the coverage line is printed once per configuration


class GradientStatisticsMixin:
    """Adds tfmbgd's gradient statistics to `fit`; put it before `keras.Model` in the bases."""

    _statistics = None

    def configure_statistics(self, log_dir, stats_every=10, method="auto", elementwise=False,
                             noise_scale_decay=0.9, loss=None, more_instruments=()):
        """Turns statistics on for the next `fit` calls (call after `compile`).

        Args:
          log_dir: directory of the TensorBoard event files, e.g. `logs/run/train`.
          stats_every: compute and write statistics every N optimizer steps.
          method, elementwise: as for `tfmbgd.stats.gradient_moments`.
          noise_scale_decay: smoothing of `noise_scale/simple`.
          loss: per-example loss `(y_true, y_pred) -> [B]`; default: derived from the
            compiled loss.
          more_instruments: `tfmbgd.instruments.Instrument`s to add to the default ones
            (`tfmbgd.instruments.default(elementwise, noise_scale_decay)`).
        """
        _refuse_xla(self)
        if not self.trainable_variables:
            raise UserError("the model has no weights yet: build it first, e.g. by calling it "
                            "on one batch, then configure_statistics")
        strategy = getattr(self, "distribute_strategy", None)
        if strategy is not None and strategy.num_replicas_in_sync > 1:
            # fit's train_step runs in each replica on its share: its moments would be the
            # share's, not the global batch's. The custom loop merges them (tfmbgd.distribute).
            raise UserError("gradient statistics in model.fit describe one device's batch; with "
                            f"{strategy.num_replicas_in_sync} replicas use train.py --strategy=... instead")
        active = instruments.default(elementwise, noise_scale_decay) + list(more_instruments)
        self._statistics = _Recorder(log_dir, stats_every, method, active, self.trainable_variables, loss)
        if getattr(self, "train_function", None) is not None:
            self.make_train_function(force=True)     # the old trace has no statistics

    def flush_statistics(self):
        """Writes buffered statistics to disk."""
        if self._statistics is not None:
            self._statistics.writer.flush()

    def train_step(self, data):
        if self._statistics is None:
            return super().train_step(data)
        _refuse_xla(self)        # compiled with XLA after configure_statistics: say so, not XLA's error
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        self.optimizer.build(variables)                # slots exist before the branches
        step = self.optimizer.iterations + 0           # read once, before this update
        loss, y_pred = tf.cond(
            step % self._statistics.stats_every == 0,
            lambda: self._statistics_step(x, y, sample_weight, step),
            lambda: self._plain_step(x, y, sample_weight))
        for metric in self.metrics:                    # as the Keras guide does it
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def _plain_step(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return loss, y_pred

    def _statistics_step(self, x, y, sample_weight, step):
        rec = self._statistics
        if sample_weight is not None:
            raise UserError("gradient statistics take no sample weights")
        if any(getattr(layer, "activity_regularizer", None) for layer in all_layers(self)):
            raise UserError("gradient statistics do not support activity regularizers")
        loss_fn = rec.loss or per_example_loss(self.loss)
        variables = self.trainable_variables

        def penalties():      # called only when there are penalties
            with tf.GradientTape() as tape:
                total = tf.add_n(self.losses)
            return gradients.dense_gradients(variables, tape.gradient(total, variables))

        measured = steps.measure(self, loss_fn, x, y, needs=rec.needs, method=rec.method,
                                 extra_gradients=penalties if self.losses else None)
        self.optimizer.apply_gradients(zip(measured.grads, variables))
        m = measured.moments
        values = steps.statistics(measured, variables, rec.instruments)
        cover = layerwise.traced_coverage(self)
        if cover is not None and not rec.described:      # once, when the step is first traced
            print(layerwise.describe(cover))
            rec.described = True
        values["loss"] = data_loss = tf.reduce_mean(m.losses)
        summaries.write_in_graph(rec.writer, values, step, rec.finite_only)
        return data_loss + (tf.add_n(self.losses) if self.losses else 0.0), m.outputs


def _refuse_xla(model):
    if getattr(model, "jit_compile", False) is True:
        raise UserError("gradient statistics write summaries, which XLA cannot compile: "
                        "compile the model with jit_compile=False")


class GradientStatisticsModel(GradientStatisticsMixin, keras.Model):
    """A functional `keras.Model` with gradient statistics in `fit`."""


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
        return GradientStatisticsModel(model.inputs, model.outputs, name=model.name)
    raise UserError(f"{type(model).__name__} is a subclassed model: add "
                    "tfmbgd.fit.GradientStatisticsMixin before keras.Model in its bases")


