"""The same gradient statistics inside `model.fit`, as Keras runs it.

    model = tfmbgd.fit.with_statistics(functional_or_sequential_model)
    model.compile(optimizer=..., loss=...)
    model.fit(x, y, callbacks=[tfmbgd.callbacks.GradientStatistics("logs/my-run", freq=10)])

`settings` (a leaf: what a fit measures, checked), `callback` (`GradientStatistics`, which
writes what the steps recorded and talks to the model through one hook) and `mixin`
(`GradientStatisticsMixin`: the `train_step` over the loop's one statistics step).
"""

from tfmbgd.fit.callback import GradientStatistics  # noqa: F401
from tfmbgd.fit.mixin import (  # noqa: F401
    GradientStatisticsMixin,
    GradientStatisticsModel,
    GradientStatisticsSequential,
    Recorder,
    StatisticsHook,
    with_statistics,
)
from tfmbgd.fit.settings import Settings, check_settings, per_example_loss  # noqa: F401
