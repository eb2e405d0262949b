"""What `train.py` does with a `TrainConfig`, for a notebook as much as for the command line.

    import tfmbgd
    from tfmbgd.config import TrainConfig
    result = tfmbgd.run(TrainConfig(batch_size=8, epochs=2))   # checks, then trains: a RunResult

`check` runs before TensorFlow starts (numpy only): bad input is reported in about a
second, not after TensorFlow's start-up. `start_tensorflow` makes what must exist before
TensorFlow runs any op (the CPU split, a multi-worker strategy). `run` does all three and
then the run the config asks for. Importing this module imports no TensorFlow.
"""

import os
import sys

from tfmbgd import choices
from tfmbgd import config as cfg
from tfmbgd.errors import UserError, check_images
from tfmbgd.loop import rundir  # no TensorFlow (the tf-free contract in setup.cfg)


def check(config):
    """Checks what numpy alone can check: the cluster in TF_CONFIG, the data set, the batch
    size against it, the logdir. Returns the loaded data set of a single run (None for
    studies, compare mode, and the keras.datasets sets, whose loader starts TensorFlow).

    Raises:
      UserError: what is wrong, and what to do.
    """
    _warn_ignored(config)
    _check_instruments(config.instruments)
    if config.strategy == "multi_worker":
        cfg.check_tf_config(os.environ.get("TF_CONFIG"))
    if config.mode == "critical_batch" and not config.resume:
        rundir.check_logdir(config.logdir)
        if config.branch_from is not None:
            rundir.load_config(config.branch_from)     # a training run with a checkpoint
    if config.mode == "train" and config.resume:
        rundir.check_unfinished(config.resume, config.epochs)
    if config.mode != "train" or config.batch_sizes or config.dataset in ("mnist", "fashion_mnist"):
        return None
    from tfmbgd import data
    ds = data.load(config.dataset, config.seed)
    if config.model == "cnn":
        check_images(ds.input_shape)
    cfg.check_update_size(config.batch_size, config.accumulate, len(ds.train[0]), ds.name)
    if not config.resume:
        rundir.check_logdir(config.logdir)
    return ds


def reports(config):
    """Whether this process prints what the run does (not a multi-worker cluster's other
    workers); after `check`."""
    return cfg.reports(config, os.environ.get("TF_CONFIG"))


def _check_instruments(names):
    """Unknown instrument names, before TensorFlow starts: against the built-in names, or the
    registry itself once it is loaded (where `tfmbgd.instruments.register` adds to them)."""
    registry = sys.modules.get("tfmbgd.instruments.registry")
    known = set(registry.REGISTRY) if registry is not None else set(choices.INSTRUMENTS)
    unknown = [n for n in names if n not in known and n not in choices.PRESETS]
    if unknown:
        raise UserError(f"unknown instrument {unknown[0]!r}; presets: {', '.join(choices.PRESETS)}; "
                        f"built in: {', '.join(sorted(known))} (see --help)")


def _warn_ignored(config):
    """One line on stderr per reason, naming the settings that do nothing in this run."""
    names = cfg.ignored(config)
    probe = [n for n in names if n in cfg.PROBE_ONLY and config.mode == "train"]
    rest = [n for n in names if n not in probe]
    why = {"compare": "with --mode=compare (one batch, nothing trained or written)",
           "critical_batch": "with --mode=critical_batch (its branches take plain SGD steps on "
                             "--batch_sizes to --target_loss)",
           "train": "with --stats_every=0 (no statistics)"}[config.mode]
    for group, reason in ((rest, why), (probe, "outside --mode=critical_batch")):
        if group:
            print(f"warning: {', '.join('--' + n for n in group)} {'has' if len(group) == 1 else 'have'} no "
                  f"effect {reason}; ignored", file=sys.stderr)


def start_tensorflow(config):
    """Imports TensorFlow; splits the CPU and makes the strategy, which must come first."""
    import tensorflow as tf

    from tfmbgd import distribute
    if config.cpu_devices > 1:
        distribute.split_cpu(config.cpu_devices)
    if config.strategy != "default":
        distribute.make_strategy(config.strategy, config.cpu_devices)
    tf.config.list_logical_devices()


def dispatch(config, should_stop=None, dataset=None):
    """The run `config` asks for, after `check` and `start_tensorflow`. Returns the exit
    status: 0, or 1 when compare mode finds a contrast that fails.

    Args:
      should_stop: `() -> bool`, asked between compiled calls of a training run, and
        between the computations of compare mode.
      dataset: the data set `check` returned, so it is not read twice.

    Raises:
      UserError: bad input found once TensorFlow runs.
      tfmbgd.errors.Interrupted: `should_stop` said so; a checkpoint was saved.
    """
    result = execute(config, should_stop, dataset)
    return 1 if result is False else 0


def execute(config, should_stop=None, dataset=None):
    """As `dispatch`, but returns what the run measured: a `tfmbgd.loop.training.RunResult`
    (a training run: its directory, steps, test metrics, ...), `{run name: RunResult}` (a
    study), a `tfmbgd.app.critical.CriticalBatch` (a probe), or whether every contrast
    passed (compare mode)."""
    if config.mode == "compare":
        from tfmbgd.app import compare
        return bool(compare.run(config, should_stop=should_stop))
    if config.mode == "critical_batch":
        from tfmbgd.app import critical
        return critical.run(config, should_stop=should_stop)
    if config.batch_sizes:
        from tfmbgd.app import study
        return study.run(config, should_stop=should_stop)
    from tfmbgd.loop import training
    return training.train(config, should_stop=should_stop, dataset=dataset)


def run(config, should_stop=None):
    """`check`, `start_tensorflow`, then `execute`: all that `python train.py` does with
    `config`, but for parsing flags, quieting TensorFlow's start-up and catching signals.
    Returns what `execute` returns."""
    dataset = check(config)
    start_tensorflow(config)
    return execute(config, should_stop=should_stop, dataset=dataset)
