"""A run directory: its name, how it comes to exist, and the settings it keeps.

A run lives in `<logdir>/<run-name>/`: `config.json` (the `TrainConfig` it was started
with), `checkpoints/` (`tfmbgd.loop.checkpoints`), one TensorBoard writer directory per
split (`train/`, `test/`) and, at its end, the final weights. A new run is set up in a
hidden directory and renamed to its name once it holds config.json and its first
checkpoint (`staging_dir`, `publish`), so a run directory is resumable from the moment it
exists; a new run never reuses a directory. No TensorFlow here: `train.py` checks a run to
resume before TensorFlow starts.
"""

import dataclasses
import datetime
import errno
import json
import os
import re
import tempfile

from tfmbgd.config import CHANGEABLE_ON_RESUME, TrainConfig
from tfmbgd.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
FINISHED = "finished.json"     # {"epochs": N}, written when a run ends having trained N epochs


def mark_finished(run_dir, epochs):
    """Records that the run in `run_dir` has trained `epochs` epochs (read by `check_unfinished`)."""
    with open(os.path.join(run_dir, FINISHED), "w") as f:
        json.dump({"epochs": int(epochs)}, f)


def check_unfinished(run_dir, epochs):
    """A `UserError`, before TensorFlow starts, if the run in `run_dir` has trained `epochs`
    epochs already (a resumed run with nothing left to do). Runs that were stopped have no
    mark; the checkpoint then decides (`tfmbgd.loop.training`)."""
    try:
        with open(os.path.join(run_dir, FINISHED)) as f:
            done = int(json.load(f)["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    refuse_finished(run_dir, done, epochs)


def refuse_finished(run_dir, done, epochs):
    """A `UserError` if a run that has trained `done` epochs is resumed for `epochs`."""
    if done >= epochs:
        raise UserError(f"the run in {run_dir} has finished its {done} epochs; nothing was changed. "
                        f"Pass --epochs={done + 1} or more to train it further")


def save_config(run_dir, config):
    """Writes `config` (a `TrainConfig`) to the run's config.json."""
    with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1, sort_keys=True)


def load_config(run_dir):
    """The `TrainConfig` a run was started with; `UserError` if `run_dir` holds no run."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir!r} holds no run to resume (no {CONFIG_FILE}); "
                        "pass a directory that train.py wrote")
    with open(path) as f:
        text = f.read()
    try:
        values = json.loads(text)
    except ValueError:
        values = None                    # reported below, after the checkpoints
    probe = isinstance(values, dict) and values.get("mode") == "critical_batch"   # keeps branches instead
    if not probe and not os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
        raise UserError(f"{run_dir!r} holds {CONFIG_FILE} but no {CHECKPOINTS}/: the run stopped before its "
                        "first checkpoint, so there is nothing to resume; start it again")
    try:
        if values is None:
            json.loads(text)             # raises the parse error again, for the message
        values["hidden"] = tuple(values["hidden"])
        values["batch_sizes"] = tuple(values["batch_sizes"])
        values["instruments"] = tuple(values.get("instruments", ()))
        return TrainConfig(**values)
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path} cannot be read as a run's settings ({err})") from err


def resume_config(run_dir, overrides):
    """The saved config of `run_dir` with the changeable `overrides` applied.

    Raises:
      UserError: an override that contradicts the run (another model, data set, ...).
    """
    saved = load_config(run_dir)
    for name, value in overrides.items():
        if name not in CHANGEABLE_ON_RESUME and getattr(saved, name) != value:
            raise UserError(f"--{name}={value} contradicts the run in {run_dir}, which has "
                            f"{name}={getattr(saved, name)}; drop the flag or start a new run")
    allowed = {k: v for k, v in overrides.items() if k in CHANGEABLE_ON_RESUME}
    return dataclasses.replace(saved, **allowed, resume=run_dir, logdir=os.path.dirname(run_dir.rstrip("/")))


def check_logdir(logdir):
    """Creates `logdir` if needed; a `UserError` if it is a file or cannot be created."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise UserError(f"logdir {logdir!r} is a file, not a directory; pass another --logdir")
    if os.path.islink(logdir) and not os.path.exists(logdir):
        # makedirs would say "File exists": the link is there, what it names is not
        raise UserError(f"logdir {logdir!r} is a symbolic link to {os.readlink(logdir)!r}, which does not "
                        "resolve to a directory (missing, or a loop of links); pass another --logdir")
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create logdir {logdir!r} ({err.strerror}); pass another --logdir") from err


def run_name(config, now=None, with_batch=True):
    """A readable run name from the main settings plus a timestamp."""
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.dataset.replace("npz:", "npz-").split("/")[-1])
    batch = "full" if config.batch_size is None else str(config.batch_size)
    if config.accumulate > 1:
        batch += f"x{config.accumulate}"          # b32x4: micro-batches of 32, updates of 128
    width = "x".join(map(str, config.hidden)) if config.model == "mlp" else ""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    rule = config.update if config.optimizer == "sgd" else f"{config.update}_{config.optimizer}"
    batch = f"-b{batch}" if with_batch else ""
    return (f"{data}-{config.model}{width}{batch}-{config.reduction}-{rule}"
            f"-lr{config.learning_rate:g}-s{config.seed}-{stamp}")


def new_run_dir(logdir, name):
    """Creates and returns `<logdir>/<name>`, adding `-2`, `-3`, ... if it exists already."""
    check_logdir(logdir)
    for attempt in range(1, 1000):
        path = os.path.join(logdir, name if attempt == 1 else f"{name}-{attempt}")
        try:
            os.mkdir(path)   # atomic: two runs started in the same second get two directories
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise UserError(f"cannot write in logdir {logdir!r} ({err.strerror}); "
                            "pass another --logdir") from err
    raise UserError(f"too many runs named {name!r} in {logdir!r}")


def staging_dir(logdir):
    """A new hidden directory in `logdir` where a run is set up before it gets its name
    (`publish`): config.json and the first checkpoint, so that a run directory is
    resumable from the moment it exists under its own name."""
    check_logdir(logdir)
    try:
        path = tempfile.mkdtemp(prefix=".starting-", dir=logdir)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o777 & ~umask)          # as os.mkdir would make it, not mkdtemp's 0700
        return path
    except OSError as err:
        raise UserError(f"cannot write in logdir {logdir!r} ({err.strerror}); pass another --logdir") from err


def publish(staged, path):
    """Renames the directory `staged` to `path`, or `path-2`, `path-3`, ... if that is
    taken; returns the name it got. A rename is atomic: the run appears whole."""
    for attempt in range(1, 1000):
        target = path if attempt == 1 else f"{path}-{attempt}"
        if os.path.lexists(target):
            continue
        try:
            os.rename(staged, target)     # onto a name another run took meanwhile: it fails
            return target
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise UserError(f"cannot name the run {target!r} ({err.strerror})") from err
    raise UserError(f"too many runs named {os.path.basename(path)!r} in {os.path.dirname(path)!r}")
