"""Shared set-up: quiet TensorFlow, deterministic ops, two logical CPU devices, and small
test problems as data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices for the tf.distribute tests; this has to happen before TensorFlow
# runs any op, hence here. Everything else runs on the first, as it would without the split.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()

from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

from tfmbgd import losses  # noqa: E402

# Test problems as data: a tiny Keras model, a batch, a per-example loss.
PROBLEMS = [
    dict(id="softmax_regression", layers=[], inputs=5, outputs=3, loss="crossentropy", batch=6),
    dict(id="tanh_mlp", layers=[4], inputs=5, outputs=3, loss="crossentropy", batch=6),
    dict(id="mse_mlp", layers=[3], inputs=4, outputs=1, loss="mse", batch=5),
]


def make_problem(spec, dtype="float32", seed=0):
    """`(model, loss_fn, x, y)` for a problem of PROBLEMS, in `dtype`."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = keras.Input((spec["inputs"],), dtype=dtype)
    h = inputs
    for width in spec["layers"]:
        h = keras.layers.Dense(width, activation="tanh", dtype=dtype)(h)
    out = keras.layers.Dense(spec["outputs"], dtype=dtype)(h)
    model = keras.Model(inputs, out)
    # Larger-than-default weights so that per-example gradients differ visibly.
    for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.7, size=v.shape).astype(dtype))
    x = rng.normal(size=(spec["batch"], spec["inputs"])).astype(dtype)
    if spec["loss"] == "crossentropy":
        y = rng.integers(0, spec["outputs"], size=spec["batch"]).astype(np.int32)
    else:
        y = rng.normal(size=(spec["batch"], 1)).astype(dtype)
    return model, losses.per_example(spec["loss"]), tf.constant(x), tf.constant(y)


@pytest.fixture
def xla_allowed():
    """Op determinism off for one test: Keras turns XLA off while it is on. (TensorFlow
    exports enable_op_determinism but not its inverse; this test may use the inner module.)"""
    from tensorflow.python.framework import config as tf_config
    tf_config.disable_op_determinism()
    yield
    tf.config.experimental.enable_op_determinism()


@pytest.fixture(params=PROBLEMS, ids=[p["id"] for p in PROBLEMS])
def problem(request):
    return request.param


def oracle_per_example(model, loss_fn, x, y):
    """Per-example gradients by the non-vectorized `tape.jacobian` (no pfor): numpy list."""
    with tf.GradientTape(persistent=True) as tape:
        per_example = loss_fn(y, model(x, training=True))
    jac = tape.jacobian(per_example, model.trainable_variables, experimental_use_pfor=False)
    return [j.numpy().astype(np.float64) for j in jac]


def read_scalars(event_dir):
    """`{tag: [(step, value), ...]}` of a writer directory, by TensorBoard's own reader."""
    acc = event_accumulator.EventAccumulator(str(event_dir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


def read_histograms(event_dir):
    """`{tag: [(step, HistogramValue), ...]}`; TF2 summaries store them as tensors."""
    acc = event_accumulator.EventAccumulator(str(event_dir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "histograms":   # [buckets, 3]
            out[tag] = [(e.step, _Hist(tf.make_ndarray(e.tensor_proto))) for e in events]
    return out


class _Hist:
    def __init__(self, buckets):      # rows (left edge, right edge, count)
        self.num = int(round(buckets[:, 2].sum()))
        self.min = float(buckets[0, 0])


def user_env(**extra):
    """The environment a user runs train.py in: without the test session's quieting of
    TensorFlow (train.py hides its start-up lines itself) and without a stray TF_CONFIG;
    plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CONFIG")}
    env.update(extra)
    return env


def tree_hash(path):
    """SHA-256 over the names and contents of every file below `path`."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def final_weights(run_dir):
    """The arrays of a run's `final.weights.h5`, in file order."""
    import h5py

    from tfmbgd.loop import training
    weights = []
    with h5py.File(os.path.join(run_dir, training.FINAL_WEIGHTS)) as f:
        f.visititems(lambda _, obj: weights.append(np.array(obj)) if isinstance(obj, h5py.Dataset) else None)
    return weights
