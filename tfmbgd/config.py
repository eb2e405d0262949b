"""TrainConfig: every setting of a run, in one frozen, validated object.

Only `train.py` turns flags into a TrainConfig; library code takes the config (or plain
arguments) and never reads flags or the environment. This module imports no TensorFlow, so
that bad settings are reported before TensorFlow starts.
"""

import dataclasses
import json
import math
import os

from tfmbgd.errors import UserError

DATASETS = ("digits", "linear", "mnist", "fashion_mnist")  # plus "npz:PATH"
MODELS = ("linear", "mlp", "cnn")
REDUCTIONS = ("mean", "sum")
UPDATES = ("manual", "custom", "keras")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam")
GRAD_METHODS = ("auto", "layerwise", "vectorized", "jacobian", "loop")
MODES = ("train", "compare")
LR_SCALINGS = ("none", "linear", "sqrt")
STRATEGIES = ("default", "mirrored", "multi_worker")
ON_NONFINITE = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run of `train.py`. Invalid values raise `UserError` naming the field."""

    dataset: str = "digits"            # digits | linear | mnist | fashion_mnist | npz:PATH
    model: str = "mlp"                 # linear | mlp | cnn
    hidden: tuple = (64,)              # widths of the mlp's hidden layers
    batch_size: int | None = 32        # examples per update; None = the whole training set
    batch_sizes: tuple = ()            # a study: one run per batch size (None = full); () = one run
    lr_scaling: str = "none"           # study: learning rate fixed, or scaled linear / sqrt from batch_size
    accumulate: int = 1                # micro-batches of batch_size summed into one update
    epochs: int = 10                   # passes over the training set
    learning_rate: float = 0.1         # step size of every update rule
    reduction: str = "mean"            # batch loss = mean or sum of per-example losses
    update: str = "custom"             # manual (w -= lr*g) | custom (tfmbgd) | keras (built-in)
    optimizer: str = "sgd"             # sgd | momentum | nesterov | rmsprop | adagrad | adam
    grad_method: str = "auto"          # how gradient moments are computed for statistics
    log_every: int = 10                # write the mini-batch loss every N steps
    steps_per_call: int = 32           # train steps per tf.function call (like fit's steps_per_execution)
    stats_every: int = 10              # gradient statistics every N steps; 0 = never
    elementwise_stats: bool = False    # also per-parameter variance and GSNR (one more matmul/layer)
    noise_scale_decay: float = 0.9     # EMA decay of B_simple's numerator and denominator
    logdir: str = "logs"               # runs land in logdir/<run-name>/{train,test}
    checkpoint_every: int = 500        # checkpoint every N steps and after every epoch; 0 = epochs only
    keep_checkpoints: int = 3          # how many checkpoints to keep
    resume: str | None = None          # a run directory to continue from its last checkpoint
    deterministic: bool = False        # TensorFlow op determinism: bit-identical reruns and resumes
    on_nonfinite: str = "stop"         # a non-finite gradient: stop the run, or skip that update
    seed: int = 0                      # initial weights, shuffling and synthetic data
    strategy: str = "default"          # default (one device) | mirrored (local devices) | multi_worker
    cpu_devices: int = 1               # split the CPU into N logical devices (mirrored, no GPU)
    mode: str = "train"                # train | compare (one batch, every method side by side)

    def __post_init__(self):
        _check_dataset(self.dataset)
        _check_choice("model", self.model, MODELS)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("update", self.update, UPDATES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.update == "manual" and self.optimizer != "sgd":
            raise UserError(f"update manual writes out plain SGD only; use --update=custom or keras "
                            f"for optimizer {self.optimizer}")
        _check_choice("grad_method", self.grad_method, GRAD_METHODS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_int("cpu_devices", self.cpu_devices, minimum=1)
        if self.cpu_devices > 1 and self.strategy != "mirrored":
            raise UserError(f"cpu_devices={self.cpu_devices} splits the CPU into replicas of "
                            "--strategy=mirrored; add that flag, or leave cpu_devices at 1")
        if self.strategy != "default" and self.accumulate > 1:
            raise UserError(f"accumulate={self.accumulate} is not supported with --strategy={self.strategy}: "
                            "raise --batch_size instead (it is the global batch, split across replicas)")
        if self.strategy != "default" and self.mode == "compare":
            raise UserError("--mode=compare contrasts gradients on one device; drop --strategy")
        if any(b is not None and (not _is_int(b) or b < 1) for b in self.batch_sizes):
            raise UserError(f"batch_sizes must be positive integers or None (full); got {self.batch_sizes!r}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise UserError(f"batch_sizes has repeats: {self.batch_sizes!r}")
        if not self.hidden or any(not _is_int(h) or h < 1 for h in self.hidden):
            raise UserError(f"hidden must be positive layer widths, e.g. 64,32; got {self.hidden!r}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise UserError(
                f"batch_size must be a positive integer or None (full batch); got {self.batch_size!r}")
        for name in ("epochs", "log_every", "steps_per_call", "accumulate"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("stats_every", self.stats_every, minimum=0)
        _check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        _check_int("keep_checkpoints", self.keep_checkpoints, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UserError(f"learning_rate must be a finite number > 0; got {lr!r}")
        d = self.noise_scale_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise UserError(f"noise_scale_decay must be in [0, 1); got {d!r}")
        if not isinstance(self.elementwise_stats, bool):
            raise UserError(f"elementwise_stats must be True or False; got {self.elementwise_stats!r}")
        if not self.logdir:
            raise UserError("logdir must be a directory path; got an empty string")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name, value, minimum):
    if not _is_int(value) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_dataset(name):
    if name in DATASETS:
        return
    if isinstance(name, str) and name.startswith("npz:") and len(name) > 4:
        return
    raise UserError(
        f"dataset must be one of {', '.join(DATASETS)} or npz:PATH; got {name!r}")


# Checks of the world a run needs, made before TensorFlow starts (train.py) and again by
# the library where it uses them.

def check_logdir(logdir):
    """Creates `logdir` if needed; a `UserError` if it is a file or cannot be created."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise UserError(f"logdir {logdir!r} is a file, not a directory; pass another --logdir")
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create logdir {logdir!r} ({err.strerror}); pass another --logdir") from err


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


# Saving a run's settings and resuming it (no TensorFlow needed).

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
# Settings that may differ when a run is resumed; every other one must match the run's.
CHANGEABLE_ON_RESUME = ("epochs", "log_every", "steps_per_call", "checkpoint_every", "keep_checkpoints",
                        "resume", "logdir", "deterministic", "on_nonfinite", "strategy", "cpu_devices")


def save(run_dir, config):
    with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1, sort_keys=True)


def load(run_dir):
    """The `TrainConfig` a run was started with; `UserError` if `run_dir` holds no run."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
        raise UserError(f"{run_dir!r} holds no run to resume (no {CONFIG_FILE} and {CHECKPOINTS}/); "
                        "pass a directory that train.py wrote")
    try:
        with open(path) as f:
            values = json.load(f)
        values["hidden"] = tuple(values["hidden"])
        values["batch_sizes"] = tuple(values["batch_sizes"])
        return TrainConfig(**values)
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path} cannot be read as a run's settings ({err})") from err


def resume(run_dir, overrides):
    """The saved config of `run_dir` with the changeable `overrides` applied.

    Raises:
      UserError: an override that contradicts the run (another model, data set, ...).
    """
    saved = load(run_dir)
    for name, value in overrides.items():
        if name not in CHANGEABLE_ON_RESUME and getattr(saved, name) != value:
            raise UserError(f"--{name}={value} contradicts the run in {run_dir}, which has "
                            f"{name}={getattr(saved, name)}; drop the flag or start a new run")
    allowed = {k: v for k, v in overrides.items() if k in CHANGEABLE_ON_RESUME}
    return dataclasses.replace(saved, **allowed, resume=run_dir, logdir=os.path.dirname(run_dir.rstrip("/")))
