"""`GradientStatistics`: the callback that turns statistics on in `fit` and writes them.

    model.fit(x, y, callbacks=[tfmbgd.callbacks.GradientStatistics("logs/my-run", freq=10),
                               keras.callbacks.TensorBoard("logs/my-run")])

The model must have `tfmbgd.fit.GradientStatisticsMixin` (`tfmbgd.fit.with_statistics`
gives one): its `train_step` measures, this callback owns the writer. Like Keras'
TensorBoard callback it writes to `log_dir/train` and opens its writer lazily; it flushes it
when `fit` ends (nothing to flush by hand), and TensorFlow closes it with the callback. After every
execution (`steps_per_execution` steps) one compiled function writes what the compiled
steps recorded (`tfmbgd.buffer`), each statistics step at its own step.
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from tfmbgd.errors import UserError


class Settings(NamedTuple):
    """The statistics of a `fit`: see `GradientStatistics`."""

    log_dir: str
    freq: int = 10
    method: str = "auto"
    elementwise: bool = False
    noise_scale_decay: float = 0.9
    loss: object = None
    more_instruments: tuple = ()

    def serializable(self):
        """The settings a `.keras` file keeps (`loss` and `more_instruments` are code)."""
        return dict(log_dir=self.log_dir, freq=self.freq, method=self.method, elementwise=self.elementwise,
                    noise_scale_decay=self.noise_scale_decay)


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
      more_instruments: `tfmbgd.instruments.Instrument`s added to the default ones.
    """

    def __init__(self, log_dir, freq=10, method="auto", elementwise=False, noise_scale_decay=0.9, loss=None,
                 more_instruments=()):
        super().__init__()
        from tfmbgd.fit import check_settings
        check_settings(freq, method)
        self.settings = Settings(log_dir, freq, method, elementwise, noise_scale_decay, loss,
                                 tuple(more_instruments))
        self._writer = None
        self._write_rows = None         # (recorder, its buffer's writer function)

    @classmethod
    def from_settings(cls, settings):
        return cls(*settings)

    def set_model(self, model):
        from tfmbgd.fit import GradientStatisticsMixin
        if not isinstance(model, GradientStatisticsMixin):
            raise UserError(f"GradientStatistics needs a model with tfmbgd.fit.GradientStatisticsMixin; "
                            f"{type(model).__name__} has none: wrap it with tfmbgd.fit.with_statistics "
                            "(functional, Sequential) or add the mixin to its bases (subclassed)")
        super().set_model(model)
        model._use_statistics(self.settings)

    def on_train_begin(self, logs=None):
        self.model._start_statistics(self.settings)

    def on_train_batch_end(self, batch, logs=None):
        self._write()

    def on_train_end(self, logs=None):
        self._write()
        self.model._stop_statistics()
        if self._writer is not None:
            # Flushed, not closed: a fit called again (epoch by epoch) writes with the same
            # writer and the same compiled writing function, not one traced again per fit.
            self._writer.flush()

    def _write(self):
        recorder = self.model._statistics        # None until the first statistics step is traced
        if recorder is None or not int(recorder.buffer.count.numpy()):
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(f"{self.settings.log_dir}/train")
        if self._write_rows is None or self._write_rows[0] is not recorder:
            self._write_rows = (recorder, recorder.buffer.writer_function(self._writer, recorder.finite_only,
                                                                          lags=recorder.lags))
        self._write_rows[1]()
