"""Run directories and TensorBoard writers: dicts of numbers in, event files out.

A run lives in `<logdir>/<run-name>/` with one writer per split (`train/`, `test/`). The
step of every summary is the optimizer step. A new run never reuses a directory.
"""

import datetime
import os
import re

import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar

from tfmbgd.config import check_logdir
from tfmbgd.errors import UserError


def run_name(config, now=None, with_batch=True):
    """A readable run name from the main settings plus a timestamp."""
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.dataset.replace("npz:", "npz-").split("/")[-1])
    batch = "full" if config.batch_size is None else str(config.batch_size)
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


class RunWriters:
    """One `tf.summary` writer per split, created on first use and closed by `close()`."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._writers = {}

    def writer(self, split):
        """The `tf.summary` writer of `split` ("train", "test"), created on first use."""
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(os.path.join(self.run_dir, split))
        return self._writers[split]

    def write(self, split, values, step):
        """Writes `values` at `step`: numbers as scalars, vectors (e.g. the per-example
        gradient norms) as histograms."""
        with self.writer(split).as_default(step=step):
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


def write_in_graph(writer, values, step):
    """Writes a dict of tensors at `step` from inside a `tf.function`.

    Scalars become scalar summaries and vectors (the per-example gradient norms)
    histograms; a non-finite `noise_scale/*` (undefined while the noise hides the
    signal) is not written. The writes usually sit in a `tf.cond` branch: `name_scope(None)`
    keeps its "cond/" scope out of the tags, so they read as when written eagerly.
    """
    with writer.as_default(step=step), tf.compat.v1.name_scope(None):
        for tag, value in values.items():
            if value.shape.rank:
                tf.summary.histogram(tag, value)
            elif tag.startswith("noise_scale/"):
                tf.cond(tf.math.is_finite(value), lambda t=tag, v=value: _scalar(t, v),
                        lambda: tf.constant(False))
            else:
                tf.summary.scalar(tag, value)


def _scalar(tag, value):
    with tf.compat.v1.name_scope(None):
        return tf.summary.scalar(tag, value)


def layout(variable_paths):
    """The custom-scalars layout: loss, per-variable signal and noise, noise scale and batch size."""
    def chart(title, *patterns):
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(patterns)))

    per_variable = [chart(f"{path}: norm of the mean gradient and variance of the mean",
                          f"^grad/norm/{path}$", f"^grad_var/of_mean/{path}$") for path in variable_paths]
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title="Loss (train and test)", chart=[
            chart("loss by step", "^loss$"),
            chart("loss by examples seen", "^loss_by/examples_seen$"),
            chart("loss by milliseconds of training", "^loss_by/milliseconds$"),
            chart("accuracy", "^accuracy$")]),
        layout_pb2.Category(title="Gradient signal and noise per variable", chart=[
            chart("all variables: norm of the mean gradient, variance of the mean",
                  "^grad/norm$", "^grad_var/of_mean$"), *per_variable]),
        layout_pb2.Category(title="Noise scale and batch size", chart=[
            chart("B_simple (smoothed); two_batch: from replicas vs global batch",
                  "^noise_scale/simple$", "^noise_scale/two_batch$"),
            chart("batch size", "^batch_size$")]),
    ])


def write_layout(writer, variable_paths):
    """Writes the custom-scalars layout with `writer` (once per run)."""
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(
            custom_scalar.pb(layout(variable_paths)).SerializeToString(), step=0)
