"""Variables broadcast over the batch: biases, the scales and offsets of the normalization
layers, values broadcast to a batch's shape (KerasHub's position embeddings) or tiled over
it (a class token). The per-example gradient is `dz` summed over the broadcast axes."""

import tensorflow as tf

from tfmbgd.engine.forms import Explicit
from tfmbgd.engine.rules.base import Pending, cast, is_batch


def _broadcast_axes(shape, z):
    """The axes of `z` after the batch along which a value of `shape`, aligned to `z`'s last
    axes, is broadcast; None if the value has a batch axis of its own."""
    padded = [1] * (z.shape.rank - len(shape)) + list(shape)
    if padded[0] != 1:
        return None
    return [i for i in range(1, z.shape.rank) if padded[i] == 1 and z.shape[i] != 1]


def broadcast(op, operand, ctx):
    """`Mul`, `AddV2`, `Sub`, `BiasAdd` of a variable broadcast over the batch: biases,
    the scales and offsets of LayerNormalization, GroupNormalization, RMSNormalization.
    The per-example gradient is `dz` (times the other factor for Mul, negated for the
    subtrahend) summed over the axes the variable is broadcast along."""
    z, w = op.outputs[0], op.inputs[operand]
    if not is_batch(z, ctx) or not w.shape.is_fully_defined():
        return "its rows are not examples"
    if op.type == "BiasAdd" and op.get_attr("data_format").decode() != "NHWC":
        return "channels_first"
    axes = _broadcast_axes(w.shape, z)      # (a bias is one channel axis, the last)
    if axes is None:
        return "the variable has a batch axis"
    other = cast(op.inputs[1 - operand], ctx) if op.type == "Mul" else None
    sign = -1.0 if op.type == "Sub" and operand == 1 else 1.0

    def make(dz):
        g = cast(dz, ctx)
        g = g * other if other is not None else g * sign if sign < 0 else g
        return Explicit(tf.reduce_sum(g, axes, keepdims=True) if axes else g)
    return Pending(Explicit, make)


def broadcast_to(op, operand, ctx):
    """`BroadcastTo` of a variable's value to a shape with the batch as its leading axis (KerasHub's
    position embeddings: every example gets the same rows): example n's gradient is `dz[n]`,
    summed over the axes the value was broadcast along."""
    z, w = op.outputs[0], op.inputs[0]
    if operand != 0:
        return "the variable is the shape"
    if not is_batch(z, ctx) or not w.shape.is_fully_defined() or w.shape.rank > z.shape.rank:
        return "its rows are not examples"
    axes = _broadcast_axes(w.shape, z)
    if axes is None:
        return "the variable has a batch axis"

    def make(dz):
        g = cast(dz, ctx)
        return Explicit(tf.reduce_sum(g, axes, keepdims=True) if axes else g)
    return Pending(Explicit, make)


def tile(op, operand, ctx):
    """`Tile` of a variable's value over the batch (a class token: `[1, 1, D]` tiled to
    `[B, 1, D]`): example n's gradient is `dz[n]`, its copies along the other tiled axes
    summed."""
    z, w = op.outputs[0], op.inputs[0]
    if operand != 0:
        return "the variable is the multiples"
    multiples = tf.get_static_value(op.inputs[1], partial=True)
    if not is_batch(z, ctx) or not w.shape.is_fully_defined() or multiples is None:
        return "its rows are not examples"
    if w.shape[0] != 1:
        return "the variable has a batch axis"
    if any(m is None or m < 0 for m in multiples[1:]):
        return "multiples known at run time"
    split = [ctx.b] + [n for m, s in zip(multiples[1:], w.shape[1:]) for n in (int(m), s)]
    axes = [1 + 2 * i for i, m in enumerate(multiples[1:]) if m != 1]

    def make(dz):
        g = tf.reshape(cast(dz, ctx), split)
        return Explicit(tf.reduce_sum(g, axes) if axes else tf.reshape(g, [ctx.b, *w.shape[1:]]))
    return Pending(Explicit, make)
