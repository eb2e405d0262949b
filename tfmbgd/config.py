"""TrainConfig: every setting of a run, in one frozen, validated object.

Each field carries its flag's help text and its allowed values (`_setting`): `tfmbgd.app.cli`
makes `train.py`'s flags from them, and `__post_init__` checks them, so a setting is
described and validated once. Library code takes the config (or plain arguments) and never
reads flags or the environment. This module imports no TensorFlow, so that bad settings
are reported before TensorFlow starts.
"""

import dataclasses
import json
import math
import os

from tfmbgd.choices import (
    DATASETS,
    GRAD_METHODS,
    LR_SCALINGS,
    MODELS,
    MODES,
    ON_NONFINITE,
    OPTIMIZERS,
    PRECISIONS,
    REDUCTIONS,
    STRATEGIES,
    UPDATES,
)
from tfmbgd.errors import SettingError, UserError

# Settings that may differ when a run is resumed; every other one must match the run's.
# (resume and logdir last: the help of --resume lists the others.)
CHANGEABLE_ON_RESUME = ("epochs", "log_every", "steps_per_call", "checkpoint_every", "keep_checkpoints",
                        "deterministic", "on_nonfinite", "strategy", "cpu_devices", "jit_compile", "resume",
                        "logdir")


def _setting(default, help, choices=None, minimum=None, parse=None, form=None):
    """A `TrainConfig` field with what its flag needs (`tfmbgd.app.cli`): the help text, the
    allowed values or the minimum (checked by `TrainConfig` itself, for flags and Python
    callers alike), and for tuples and `None` values how a flag's text becomes the value
    (`parse`, which raises ValueError on text it cannot read, and `form`, what it reads)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, minimum=minimum,
                                                            parse=parse, form=form))


def _batch(text):
    return None if text == "full" else int(text)


def _batches(text):
    return tuple(_batch(b) for b in text.split(",")) if text else ()


def _widths(text):
    return tuple(int(h) for h in text.split(","))


def _target(text):
    return None if text == "auto" else float(text)


def _names(text):
    return tuple(text.split(",")) if text else ()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run of `train.py`, one flag per field. Invalid values raise `UserError` naming
    the field (`SettingError`)."""

    dataset: str = _setting("digits", f"{' | '.join(DATASETS)} | npz:PATH (arrays x_train, y_train, "
                            "x_test, y_test).")
    model: str = _setting("mlp", "Network to train.", MODELS)
    hidden: tuple = _setting((64,), "Hidden layer widths of the mlp, e.g. 128,64.", parse=_widths,
                             form="positive integers separated by commas, e.g. 128,64")
    batch_size: int | None = _setting(32, "Examples per update: 1 (SGD) ... N, or 'full' (the whole "
                                      "training set: full-batch gradient descent).", parse=_batch,
                                      form="a positive integer or full")
    batch_sizes: tuple = _setting((), "A study: one run per batch size, e.g. 1,8,32,128,full, same data "
                                  "and initial weights, compared in TensorBoard's HParams dashboard.",
                                  parse=_batches, form="positive integers or full, separated by commas")
    lr_scaling: str = _setting("none", "Study: the learning rate is fixed (none) or scaled with "
                               "batch / --batch_size (linear, sqrt).", LR_SCALINGS)
    accumulate: int = _setting(1, "Gradient accumulation: sum K micro-batches of batch_size into one "
                               "update.", minimum=1)
    epochs: int = _setting(10, "Passes over the training set.", minimum=1)
    drop_remainder: bool = _setting(False, "Leave out each epoch's last, smaller batch (other examples each "
                                    "epoch): one compile of the train step fewer. Off by default: every "
                                    "example counts in every epoch.")
    learning_rate: float = _setting(0.1, "Step size of every update rule, > 0.")
    reduction: str = _setting("mean", "Batch loss = mean or sum of the per-example losses.", REDUCTIONS)
    update: str = _setting("custom", "Who applies the update: manual w -= lr*g (sgd only), custom "
                           "(tfmbgd's optimizer), keras (the Keras built-in of the same name).", UPDATES)
    optimizer: str = _setting("sgd", "Update rule; other hyperparameters at the Keras defaults "
                              "(momentum 0.9).", OPTIMIZERS)
    grad_method: str = _setting("auto", "How gradient moments are computed for statistics: auto "
                                "(layer-wise rules, exact fallback), layerwise, vectorized, jacobian, "
                                "loop.", GRAD_METHODS)
    log_every: int = _setting(10, "Write the mini-batch loss every N steps.", minimum=1)
    steps_per_call: int = _setting(32, "Train steps per compiled call (like fit's steps_per_execution); "
                                   "Python sees the loss only between calls.", minimum=1)
    stats_every: int = _setting(10, "Gradient statistics every N steps; 0 = never.", minimum=0)
    elementwise_stats: bool = _setting(False, "Also per-parameter variance and grad_snr/mean_gsnr (one "
                                       "more matmul per layer).")
    noise_scale_decay: float = _setting(0.9, "EMA decay in [0, 1) of B_simple's numerator and "
                                        "denominator, per statistics step.")
    instruments: tuple = _setting((), "More statistics: Cockpit's sets economy, business or full, "
                                  "and instruments by name (e.g. economy,hess_max_ev; README lists "
                                  "them; tfmbgd.instruments.register adds one).", parse=_names)
    logdir: str = _setting("logs", "Runs are written to LOGDIR/<run-name>/{train,test}.")
    checkpoint_every: int = _setting(500, "Save a checkpoint every N steps (and after every epoch); "
                                     "0 = after epochs only.", minimum=0)
    keep_checkpoints: int = _setting(3, "Checkpoints to keep.", minimum=1)
    resume: str | None = _setting(None, "Continue the run in this directory from its last checkpoint; "
                                  "other flags may only change "
                                  + ", ".join(n for n in CHANGEABLE_ON_RESUME[:-2])
                                  + ".", parse=str)
    deterministic: bool = _setting(False, "TensorFlow op determinism: reruns and resumed runs give "
                                   "bit-identical weights.")
    on_nonfinite: str = _setting("stop", "A non-finite loss or gradient: stop (keep the last good "
                                 "checkpoint, exit 2) or skip that update and count it in "
                                 "nonfinite/skipped.", ON_NONFINITE)
    mixed_precision: str = _setting("none", "Keras' mixed-precision policy: layers compute in 16 bits, "
                                    "variables and the gradient moments stay float32. Training takes "
                                    "mixed_bfloat16; mixed_float16 only --mode=compare (it needs loss "
                                    "scaling: model.fit's LossScaleOptimizer).", PRECISIONS)
    jit_compile: bool = _setting(False, "XLA-compile each call of train steps (as fit's jit_compile); "
                                 "statistics are written after the call. Off by default: compiling takes "
                                 "longer (see benchmarks/fit_vs_loop.py for the speed).")
    seed: int = _setting(0, "Seed of initial weights, shuffling and synthetic data.", minimum=0)
    strategy: str = _setting("default", "default: one device. mirrored: one replica per local GPU (or "
                             "per --cpu_devices). multi_worker: one replica per process of the TF_CONFIG "
                             "cluster. --batch_size is the global batch, split across replicas.", STRATEGIES)
    cpu_devices: int = _setting(1, "Split the CPU into N logical devices, the replicas of "
                                "--strategy=mirrored on a machine without GPUs.", minimum=1)
    mode: str = _setting("train", "train; compare: contrast every gradient method and update rule "
                         "on one batch; critical_batch: branches at --batch_sizes, each with its best "
                         "learning rate, to --target_loss, and the critical batch size they give.", MODES)
    target_loss: float | None = _setting(None, "critical_batch: the loss every branch trains to, on a fixed "
                                         "evaluation set of training examples; auto = a fifth of the loss "
                                         "at the branch point.", parse=_target, form="a number or auto")
    budget_epochs: int = _setting(100, "critical_batch: a branch that has not reached the target after this "
                                  "many epochs' worth of examples stops, not reached.", minimum=1)
    repeats: int = _setting(1, "critical_batch: data orders per branch, trained side by side; a branch "
                            "reaches the target when their mean loss does (less noise, proportionally "
                            "more time).", minimum=1)
    branch_from: str | None = _setting(None, "critical_batch: branch from the last checkpoint of this "
                                       "training run (default: from the initial weights of --seed).",
                                       parse=str)

    def __post_init__(self):
        # `--logdir=~/runs` reaches Python unexpanded (the shell expands ~ only at a word's start)
        for name in ("logdir", "resume", "branch_from"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, os.path.expanduser(getattr(self, name)))
        if isinstance(self.dataset, str) and self.dataset.startswith("npz:"):
            object.__setattr__(self, "dataset", "npz:" + os.path.expanduser(self.dataset[4:]))
        for field in dataclasses.fields(self):
            value, meta = getattr(self, field.name), field.metadata
            if meta["choices"] is not None and value not in meta["choices"]:
                raise SettingError(field.name, f"must be one of {', '.join(meta['choices'])}", value)
            if meta["minimum"] is not None and (not _is_int(value) or value < meta["minimum"]):
                raise SettingError(field.name, f"must be an integer >= {meta['minimum']}", value)
        _check_dataset(self.dataset)
        if self.update == "manual" and self.optimizer != "sgd":
            raise UserError(f"update manual writes out plain SGD only; use --update=custom or keras "
                            f"for optimizer {self.optimizer}")
        if self.cpu_devices > 1 and self.strategy != "mirrored":
            raise UserError(f"cpu_devices={self.cpu_devices} splits the CPU into replicas of "
                            "--strategy=mirrored; add that flag, or leave cpu_devices at 1")
        if self.strategy != "default" and self.accumulate > 1:
            raise UserError(f"accumulate={self.accumulate} is not supported with --strategy={self.strategy}: "
                            "raise --batch_size instead (it is the global batch, split across replicas)")
        if self.mixed_precision == "mixed_float16" and self.mode == "train":
            raise SettingError("mixed_precision", "needs loss scaling (float16 gradients underflow), which "
                               "the custom loop does not do: use mixed_bfloat16 here, or model.fit with "
                               "tfmbgd.callbacks.GradientStatistics (Keras' LossScaleOptimizer)",
                               self.mixed_precision)
        if self.jit_compile and self.strategy != "default":
            raise UserError(f"jit_compile compiles the calls of one device; drop it, or "
                            f"--strategy={self.strategy}")
        if self.strategy != "default" and self.mode == "compare":
            raise UserError("--mode=compare contrasts gradients on one device; drop --strategy")
        if not isinstance(self.batch_sizes, tuple) or any(
                b is not None and (not _is_int(b) or b < 1) for b in self.batch_sizes):
            raise SettingError("batch_sizes", "must be positive integers or full (None in Python)",
                               self.batch_sizes)
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise SettingError("batch_sizes", "has repeats", self.batch_sizes)
        t = self.target_loss
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise SettingError("target_loss", "must be a finite number, or auto (None in Python)", t)
        if self.mode == "critical_batch":
            if self.strategy != "default" or self.accumulate > 1:
                raise UserError("--mode=critical_batch trains its branches on one device with plain batches; "
                                "drop --strategy and --accumulate")
        elif self.branch_from is not None:
            raise SettingError("branch_from", "is where a critical-batch probe branches; add "
                               "--mode=critical_batch, or drop it", self.branch_from)
        if self.batch_sizes and self.mode == "compare":
            raise SettingError("batch_sizes", "is a study of training runs; --mode=compare takes one "
                               "batch of --batch_size: drop one of the two",
                               ",".join(map(str, self.batch_sizes)))
        if self.lr_scaling != "none" and (not self.batch_sizes or self.mode == "critical_batch"):
            raise SettingError("lr_scaling", "scales the learning rate across the batch sizes of a "
                               "study (a critical-batch probe searches each rate); add --batch_sizes=..., "
                               "or drop it", self.lr_scaling)
        if not isinstance(self.hidden, tuple) or not self.hidden or any(not _is_int(h) or h < 1
                                                                        for h in self.hidden):
            raise SettingError("hidden", "must be positive layer widths, e.g. 64,32", self.hidden)
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise SettingError("batch_size", "must be a positive integer, or full (None in Python)",
                               self.batch_size)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise SettingError("learning_rate", "must be a finite number > 0", lr)
        d = self.noise_scale_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise SettingError("noise_scale_decay", "must be in [0, 1)", d)
        for name in ("elementwise_stats", "jit_compile", "deterministic", "drop_remainder"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(name, "must be True or False", getattr(self, name))
        names = self.instruments
        if not isinstance(names, tuple) or not all(n and isinstance(n, str) for n in names):
            raise SettingError("instruments", "must be instrument names", self.instruments)
        if len(set(self.instruments)) != len(self.instruments):
            raise SettingError("instruments", "has repeats", self.instruments)
        if not self.logdir:
            raise SettingError("logdir", "must be a directory path", self.logdir)


# What each kind of run leaves unused: a setting changed from its default there is named in
# a warning (`ignored`), not silently dropped.
_TRAINING_ONLY = ("epochs", "log_every", "steps_per_call", "stats_every", "elementwise_stats",
                  "noise_scale_decay", "instruments", "logdir", "checkpoint_every", "keep_checkpoints",
                  "deterministic", "on_nonfinite", "optimizer", "update", "reduction", "grad_method",
                  "jit_compile", "mixed_precision", "drop_remainder")
_STATISTICS_ONLY = ("elementwise_stats", "noise_scale_decay", "instruments", "grad_method")
_NOT_IN_PROBE = ("batch_size", "drop_remainder", "epochs", "log_every", "steps_per_call", "stats_every",
                 "elementwise_stats", "noise_scale_decay", "instruments", "checkpoint_every",
                 "keep_checkpoints", "on_nonfinite", "optimizer", "update", "reduction", "grad_method",
                 "jit_compile", "mixed_precision")
PROBE_ONLY = ("target_loss", "budget_epochs", "repeats")


def ignored(config):
    """The settings of `config` that differ from their defaults but do nothing in the run it
    asks for: training settings in compare mode, statistics settings with `stats_every=0`,
    the probe's settings outside `mode="critical_batch"` and the training run's in it."""
    if config.mode == "compare":
        unused = _TRAINING_ONLY + PROBE_ONLY
    elif config.mode == "critical_batch":
        unused = _NOT_IN_PROBE
    else:
        unused = (_STATISTICS_ONLY if config.stats_every == 0 else ()) + PROBE_ONLY
    defaults = TrainConfig.__dataclass_fields__
    return [name for name in unused if getattr(config, name) != defaults[name].default]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_dataset(name):
    if name in DATASETS:
        return
    if isinstance(name, str) and name.startswith("npz:") and len(name) > 4:
        return
    raise SettingError("dataset", f"must be one of {', '.join(DATASETS)} or npz:PATH", name)


# Checks of the world a run needs, made before TensorFlow starts (train.py) and again by
# the library where it uses them.

def check_update_size(batch_size, accumulate, n, dataset):
    """Examples per update (`batch_size` x `accumulate`; None = full batch) against the `n`
    training examples of `dataset`: a `UserError` if there are too few."""
    if batch_size is None:
        return
    update = batch_size * accumulate
    if update > n:
        what = (f"batch_size {update}" if accumulate == 1
                else f"an update of {update} examples (batch_size x accumulate)")
        raise UserError(f"{what} is more than the {n} training examples of {dataset}; use "
                        "--batch_size=full for full-batch gradient descent")


def check_tf_config(text):
    """A `TF_CONFIG` that names this process's task in a cluster, or a `UserError`."""
    if not text:
        raise UserError("strategy multi_worker needs TF_CONFIG, e.g. "
                        '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                        '"index": 0}}; see the README')
    try:
        spec = json.loads(text)
        task = spec["task"]
        hosts = spec["cluster"][task["type"]]
        if not 0 <= int(task["index"]) < len(hosts):
            raise IndexError(f"task index {task['index']} but {len(hosts)} {task['type']}(s)")
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"TF_CONFIG cannot be used ({err!r}); it needs a cluster and this process's "
                        "task in it, see the README") from None


def reports(config, tf_config_text):
    """Whether this process prints the run: always, but in a multi-worker cluster only the
    chief (a task "chief", or worker 0 of a cluster without one), as `distribute.is_chief`
    decides once TensorFlow runs."""
    if config.strategy != "multi_worker":
        return True
    spec = json.loads(tf_config_text)         # checked by check_tf_config
    task = spec["task"]
    return task["type"] == "chief" or (task["type"] == "worker" and int(task["index"]) == 0
                                       and "chief" not in spec["cluster"])
