"""tfmbgd: see and measure how mini-batch gradient descent updates a network's weights.

The package is a house of floors, each importing only the floors below it (checked by
import-linter, see `setup.cfg`):

    app/          train.py's command line, launch, signals, the study and compare modes
    fit/          the statistics inside model.fit (mixin, callback, settings)
    loop/         the statistics step and its schedule, the custom loop, Cockpit, run dirs
    instruments/  one module per statistic, and the Panel of a run's active ones
    engine/       one batch -> GradientMoments: per-example methods, layer-wise rules
    leaves        config, choices, errors, data, models, losses, optimizers, distribute

Submodules are imported on first use (PEP 562), so `import tfmbgd` and `train.py --help`
stay fast and do not start TensorFlow until something needs it:

    import tfmbgd
    ds = tfmbgd.data.load("digits")          # imports tfmbgd.data (and numpy) here

The public names of the library face are attributes here: `tfmbgd.gradients`,
`tfmbgd.moments`, `tfmbgd.layerwise` (the engine's), `tfmbgd.stats`, `tfmbgd.instruments`,
`tfmbgd.fit`, `tfmbgd.callbacks`, `tfmbgd.data`, `tfmbgd.models`, `tfmbgd.losses`,
`tfmbgd.optimizers`, `tfmbgd.config`, `tfmbgd.run`, `tfmbgd.critical_batch`.
"""

import importlib

from tfmbgd._version import __version__  # noqa: F401

# The modules reachable as attributes, by the name a user types: the top-level ones, and
# the library faces that live on a floor.
_SUBMODULES = {
    **{name: name for name in ("app", "callbacks", "choices", "config", "data", "distribute", "engine",
                               "errors", "fit", "instruments", "loop", "losses", "models", "optimizers",
                               "stats")},
    "gradients": "engine.gradients", "moments": "engine.moments", "layerwise": "engine.layerwise",
    "fields": "engine.fields", "forms": "engine.forms", "rules": "engine.rules",
    "curvature": "engine.hessian",
}

__all__ = list(_SUBMODULES) + ["run", "critical_batch"]


def run(config, should_stop=None):
    """All that `python train.py` does with a `tfmbgd.config.TrainConfig`: the checks before
    TensorFlow starts, then the training run, study, probe or comparison; returns what it
    measured (a training run's `RunResult`: its directory, steps, test metrics, ...). See
    `tfmbgd.app.launch.execute`."""
    from tfmbgd.app import launch
    return launch.run(config, should_stop)


def critical_batch(model, loss_fn, train, **options):
    """The critical batch size of `model` from its current weights, measured by branches per
    batch size with tuned learning rates, with B_simple and B_noise beside it; returns a
    `CriticalBatch` (`.table()`, `.b_crit`, `.frontier`, ...). See `tfmbgd.app.critical.probe`."""
    from tfmbgd.app import critical
    return critical.probe(model, loss_fn, train, **options)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{_SUBMODULES[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
