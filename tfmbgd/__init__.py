"""tfmbgd: see and measure how mini-batch gradient descent updates a network's weights.

Submodules are imported on first use (PEP 562), so `import tfmbgd` and `train.py --help`
stay fast and do not start TensorFlow until something needs it:

    import tfmbgd
    ds = tfmbgd.data.load("digits")          # imports tfmbgd.data (and numpy) here
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "buffer", "callbacks", "checkpoints", "compare", "config", "curvature", "data", "distribute", "errors",
    "fit", "forms", "gradients", "launch", "layerwise", "losses", "models", "moments", "optimizers", "rules",
    "runner", "signals", "stats", "steps", "study", "summaries", "training", "zoo", "fields", "instruments",
)

__all__ = list(_SUBMODULES) + ["run"]


def run(config, should_stop=None):
    """All that `python train.py` does with a `tfmbgd.config.TrainConfig`: the checks before
    TensorFlow starts, then the training run, study or comparison; returns the exit status.
    See `tfmbgd.launch.run`."""
    from tfmbgd import launch
    return launch.run(config, should_stop)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
