"""The statistics buffer (`tfmbgd.loop.buffer`): rows recorded in a compiled call, written
after it at their own steps, read back with TensorBoard's reader."""

import pytest
import tensorflow as tf

from conftest import read_histograms, read_scalars
from tfmbgd.loop.buffer import StatisticsBuffer


def test_rows_are_written_at_their_steps_lags_and_finite_only_honoured(tmp_path):
    buf = StatisticsBuffer(["loss", "late", "maybe"], ["norms"], capacity=3)

    @tf.function(jit_compile=True)          # recorded where XLA compiles, as in fit and --jit_compile
    def record(step, loss, late, maybe, norms):
        buf.record({"loss": loss, "late": late, "maybe": maybe, "norms": norms}, step)

    rows = [(4, 1.5, 10.0, 2.0, [1.0, 2.0, 3.0]), (8, 0.5, 20.0, float("nan"), [4.0, 4.0, 4.0])]
    for step, *values in rows:
        record(tf.constant(step, tf.int64), *(tf.constant(v, tf.float32) for v in values))
    assert int(buf.count.numpy()) == 2
    writer = tf.summary.create_file_writer(str(tmp_path))
    written = buf.writer_function(writer, finite_only={"maybe"}, lags={"late": 1})()
    writer.flush()
    assert int(written) == 2 and int(buf.count.numpy()) == 0          # emptied
    scalars = read_scalars(tmp_path)
    assert scalars["loss"] == [(4, 1.5), (8, 0.5)]
    assert scalars["late"] == [(3, 10.0), (7, 20.0)]                  # one step back
    assert scalars["maybe"] == [(4, 2.0)]                             # the NaN is not written
    histograms = read_histograms(tmp_path)["norms"]
    assert [step for step, _ in histograms] == [4, 8]
    assert [h.num for _, h in histograms] == [3, 3]
    assert histograms[1][1].min == 4.0        # all values equal: the buckets sit at that value


def test_a_row_that_finds_the_buffer_full_is_counted_and_the_writer_says_so(tmp_path):
    buf = StatisticsBuffer(["loss"], ["norms"], capacity=1)
    for step in (0, 1):
        buf.record({"loss": tf.constant(1.0)}, tf.constant(step, tf.int64))
    assert int(buf.lost.numpy()) == 1
    write = buf.writer_function(tf.summary.create_file_writer(str(tmp_path)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="did not fit in a buffer of 1 rows"):
        write()


def test_undeclared_tags_are_refused():
    from tfmbgd.errors import UserError
    buf = StatisticsBuffer(["loss"], [], capacity=1)
    with pytest.raises(UserError, match="did not declare: \\['other'\\]"):
        buf.record({"loss": tf.constant(1.0), "other": tf.constant(2.0)}, tf.constant(0, tf.int64))
