"""Gathers of rows: Embedding. The per-example gradient adds `dz[n, t]` to row `ids[n, t]`
(`forms.Rows`), never densified."""

import tensorflow as tf

from tfmbgd.engine.forms import Rows
from tfmbgd.engine.rules.base import Pending, cast, is_batch


def gather(op, operand, ctx):
    """`GatherV2` on axis 0 and `ResourceGather` (Embedding): `g_n` adds `dz[n, t]` to row
    `ids[n, t]`."""
    if operand != 0 or op.get_attr("batch_dims") != 0:
        return "not a gather of rows"
    if op.type == "GatherV2" and (tf.get_static_value(op.inputs[2]) != 0 or op.inputs[0].shape.rank != 2):
        return "not a gather of rows"
    ids, dim = op.inputs[1], op.outputs[0].shape[-1]
    if not is_batch(ids, ctx):
        return "its rows are not examples"
    flat = tf.cast(tf.reshape(ids, [ctx.b, -1]), tf.int64)
    return Pending(Rows, lambda dz: Rows(flat, tf.reshape(cast(dz, ctx), [ctx.b, -1, dim])))
