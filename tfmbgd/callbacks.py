"""`tfmbgd.callbacks.GradientStatistics`: the public name of the callback that turns gradient
statistics on in `model.fit` and writes them (`tfmbgd.fit.callback`)."""

from tfmbgd.fit.callback import GradientStatistics  # noqa: F401
from tfmbgd.fit.settings import Settings  # noqa: F401
