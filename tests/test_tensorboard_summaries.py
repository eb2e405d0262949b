"""tfmbgd's own summary writers (`tfmbgd.loop.tensorboard`) against TensorBoard's: the same
records, read back."""

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tfmbgd.loop import tensorboard

RNG = np.random.default_rng(0)
CASES = {
    "normal": RNG.normal(size=128),
    "ties at both ends": np.array([0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0]),
    "on bucket edges": np.arange(31.0),          # width 1: value k opens bucket k; 30 is the last's
    "one value": np.full(5, 2.5),
    "one example": np.array([7.0]),
    "one large value": np.full(3, 1.5e19, np.float32),     # v - 1 rounds to v
    "one negative value": np.full(2, -5.0),
    "float32 norms": RNG.gamma(2.0, size=64).astype(np.float32),
}


def _written(tmp_path, name, write):
    """`(rows, plugin name)` of the one histogram `write()` puts in a fresh directory."""
    writer = tf.summary.create_file_writer(str(tmp_path / name))
    with writer.as_default(step=3):
        write()
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / name),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    (event,) = acc.Tensors("h")
    assert event.step == 3
    return tf.make_ndarray(event.tensor_proto), acc.SummaryMetadata("h").plugin_data.plugin_name


def _ours(values):
    return tf.function(lambda: tensorboard.histogram("h", tf.constant(values)))


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_histogram_writes_what_tf_summary_histogram_writes(tmp_path, values):
    ours, plugin = _written(tmp_path, "ours", _ours(values))
    theirs, their_plugin = _written(tmp_path, "theirs",
                                    lambda: tf.summary.histogram("h", tf.constant(values)))
    assert plugin == their_plugin == "histograms"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == (30, 3)
    np.testing.assert_array_equal(ours, theirs)
    assert ours[:, 2].sum() == len(values)


def test_histogram_counts_the_finite_values_and_survives_none(tmp_path):
    # A diverging run's per-example norms: NaN and inf are left out (a NaN used to crash the
    # bucketing op); with no finite value at all the buckets are empty.
    values = np.array([1.0, np.nan, 2.0, np.inf, -np.inf, 4.0])
    ours, _ = _written(tmp_path, "ours", _ours(values))
    finite, _ = _written(tmp_path, "theirs", lambda: tf.summary.histogram("h", tf.constant([1.0, 2.0, 4.0])))
    np.testing.assert_array_equal(ours, finite)
    none, _ = _written(tmp_path, "none", _ours([np.nan, np.inf]))
    np.testing.assert_array_equal(none, np.zeros((30, 3)))
