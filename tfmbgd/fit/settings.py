"""The statistics settings of a `fit`, checked: a leaf that the callback and the mixin share."""

from typing import NamedTuple

import keras

from tfmbgd.choices import GRAD_METHODS
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
    """A `UserError` unless `freq` is an integer >= 1 and `method` a method of the moments."""
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise UserError(f"freq (statistics every N optimizer steps) must be an integer >= 1; got {freq!r}")
    if method not in GRAD_METHODS:
        raise UserError(f"method must be one of {', '.join(GRAD_METHODS)}; got {method!r}")
