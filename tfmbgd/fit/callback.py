"""`GradientStatistics`: the callback that turns statistics on in `fit` and writes them.

    model.fit(x, y, callbacks=[tfmbgd.callbacks.GradientStatistics("logs/my-run", freq=10),
                               keras.callbacks.TensorBoard("logs/my-run")])

The model must have `tfmbgd.fit.GradientStatisticsMixin` (`tfmbgd.fit.with_statistics`
gives one): its `train_step` measures, this callback owns the writer. Like Keras'
TensorBoard callback it writes to `log_dir/train` and opens its writer lazily; it flushes it
when `fit` ends (nothing to flush by hand), and TensorFlow closes it with the callback. After every
execution (`steps_per_execution` steps) one compiled function writes what the compiled
steps recorded (`tfmbgd.loop.buffer`), each statistics step at its own step. It talks to
the model through one object, the model's `statistics_hook()` (`tfmbgd.fit.mixin`).
"""

import keras
import tensorflow as tf

from tfmbgd.errors import UserError
from tfmbgd.fit.settings import Settings, check_settings
from tfmbgd.loop import tensorboard


class GradientStatistics(keras.callbacks.Callback):
    """Gradient statistics every `freq` optimizer steps of `fit`, written to `log_dir/train`.

    Args:
      log_dir: the run's directory, as for `keras.callbacks.TensorBoard`; the statistics
        go to its `train/` writer directory.
      freq: compute and write the statistics every N optimizer steps (from step 0).
      method, elementwise: as for `tfmbgd.stats.gradient_moments` (the elementwise tier
        adds per-parameter variance and `grad_snr/mean_gsnr`).
      noise_scale_decay: smoothing of `noise_scale/simple`.
      loss: per-example loss `(y_true, y_pred) -> [B]`; default: derived from the
        compiled loss.
      more_instruments: instruments added to the default ones: instances of
        `tfmbgd.instruments.Instrument`, registered names or presets ("economy", ...).
    """

    def __init__(self, log_dir, freq=10, method="auto", elementwise=False, noise_scale_decay=0.9, loss=None,
                 more_instruments=()):
        super().__init__()
        check_settings(freq, method)
        self.settings = Settings(log_dir, freq, method, elementwise, noise_scale_decay, loss,
                                 tuple(more_instruments))
        self._writer = None
        self._hook = None               # the model's statistics_hook(), set with the model
        self._write_rows = None         # (recorder, its buffer's writer function)

    @classmethod
    def from_settings(cls, settings):
        return cls(*settings)

    def set_model(self, model):
        if not callable(getattr(model, "statistics_hook", None)):
            raise UserError(f"GradientStatistics needs a model with tfmbgd.fit.GradientStatisticsMixin; "
                            f"{type(model).__name__} has none: wrap it with tfmbgd.fit.with_statistics "
                            "(functional, Sequential) or add the mixin to its bases (subclassed)")
        super().set_model(model)
        self._hook = model.statistics_hook()
        self._hook.use(self.settings)

    def on_train_begin(self, logs=None):
        self._hook.start(self.settings)

    def on_train_batch_end(self, batch, logs=None):
        self._write()

    def on_train_end(self, logs=None):
        self._write()
        self._hook.stop()
        if self._writer is not None:
            # Flushed, not closed: a fit called again (epoch by epoch) writes with the same
            # writer and the same compiled writing function, not one traced again per fit.
            self._writer.flush()

    def _write(self):
        recorder = self._hook.recorder           # None until the first statistics step is traced
        if recorder is None or not int(recorder.buffer.count.numpy()):
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(f"{self.settings.log_dir}/train")
            # the custom-scalars layout of a train.py run: loss, then the instruments' charts
            tensorboard.write_layout(self._writer, recorder.panel.charts())
        if self._write_rows is None or self._write_rows[0] is not recorder:
            self._write_rows = (recorder, recorder.buffer.writer_function(
                self._writer, recorder.finite_only, lags=recorder.lags,
                descriptions=tensorboard.descriptions(recorder.panel)))
        self._write_rows[1]()
