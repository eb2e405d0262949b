"""Run directories and TensorBoard writers: dicts of numbers in, event files out.

A run lives in `<logdir>/<run-name>/` with one writer per split (`train/`, `test/`). The
step of every summary is the optimizer step. A new run never reuses a directory.
"""

import datetime
import os
import re

import numpy as np
import tensorflow as tf

from tfmbgd.errors import UserError


def run_name(config, now=None):
    """A readable run name from the main settings plus a timestamp."""
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.dataset.replace("npz:", "npz-").split("/")[-1])
    batch = "full" if config.batch_size is None else str(config.batch_size)
    width = "x".join(map(str, config.hidden)) if config.model == "mlp" else ""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    rule = config.update if config.optimizer == "sgd" else f"{config.update}_{config.optimizer}"
    return (f"{data}-{config.model}{width}-b{batch}-{config.reduction}-{rule}"
            f"-lr{config.learning_rate:g}-s{config.seed}-{stamp}")


def new_run_dir(logdir, name):
    """Creates and returns `<logdir>/<name>`, adding `-2`, `-3`, ... if it exists already."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise UserError(f"logdir {logdir!r} is a file, not a directory; pass another --logdir")
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create logdir {logdir!r} ({err.strerror}); pass another --logdir") from err
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


class RunWriters:
    """One `tf.summary` writer per split, created on first use and closed by `close()`."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._writers = {}

    def _writer(self, split):
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(os.path.join(self.run_dir, split))
        return self._writers[split]

    def write(self, split, values, step):
        """Writes `values` at `step`: numbers as scalars, vectors (e.g. the per-example
        gradient norms) as histograms."""
        with self._writer(split).as_default(step=step):
            for tag, value in values.items():
                if np.ndim(value) == 0:
                    tf.summary.scalar(tag, value)
                else:
                    tf.summary.histogram(tag, value)

    def close(self):
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
