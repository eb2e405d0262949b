"""Per-op rules: how one use of a variable turns into that variable's per-example gradients.

`tfmbgd.layerwise` finds, in the traced step, every op that reads a trainable variable
(through reads, casts and reshapes) and asks the rule for that op's type. A rule sees the
op, which of its inputs carries the variable, and a `Context` (the batch size and the
dtype the moments are accumulated in). It returns a `Pending` (the form of the
per-example gradients, see `tfmbgd.forms`, and how to make it from the gradient `dz` at
the op's output), or a short reason why it cannot, and the variable then takes the exact
fallback. Because the gradient at the op's *output* is used, the activation after it, and
whatever the model does with the output, never matters.

Example n's output depends only on example n's input, so `dz[n]` is the gradient of
`l_n` alone (scaled by 1/B, see `tfmbgd.forms`). Every rule checks that the op keeps
examples apart: its non-variable input and its output have the batch as their leading
axis.

The maths follows BackPACK's first-order extensions and, for Dense, the ghost norm of
Goodfellow (2015) and Li et al. (2021).
"""

import itertools
from typing import Callable, NamedTuple

import tensorflow as tf

from tfmbgd.forms import Explicit, Outer, Rows


class Context(NamedTuple):
    batch: int | None     # static batch size, None when known only at run time
    b: object             # the batch size as used in reshapes: `batch`, or a scalar tensor
    dtype: tf.DType       # moments are computed in this dtype (the variable's: float32 under
                          # mixed precision, whatever the op computes in)
    checks: list          # tensors whose leading axis must be B at run time (see `_is_batch`)


class Pending(NamedTuple):
    kind: type            # forms.Outer, forms.Explicit or forms.Rows
    make: Callable        # dz (the gradient at op.outputs[0]) -> a form
    dims: tuple = ()      # Outer: static (T, K, C), T None when unknown
    output: tf.Tensor = None   # the tensor whose gradient `make` takes; None: op.outputs[0]


def _is_batch(t, ctx):
    """Whether `t`'s leading axis is the batch. With a batch size known only at run time
    (Keras' fit traces so) an unknown leading axis is taken for the batch, and `t` is
    added to `ctx.checks`: `tfmbgd.layerwise` asserts its size at run time, so a wrong
    guess fails loudly instead of giving wrong moments."""
    if t.shape.rank is None or t.shape.rank == 0 or t.shape[0] != ctx.batch:
        return False
    if ctx.batch is None:
        ctx.checks.append(t)
    return True


def _cast(t, ctx):
    return tf.cast(t, ctx.dtype)


def matmul(op, operand, ctx):
    """`MatMul`, `BatchMatMulV2/V3` with a `[K, C]` kernel as the right factor: Dense,
    EinsumDense (Keras reshapes its kernel to a matrix), attention projections. A rank-2
    input of B*T rows (Dense on sequences, via Tensordot) is regrouped per example."""
    ta, tb = (("transpose_a", "transpose_b") if op.type == "MatMul" else ("adj_x", "adj_y"))
    if operand != 1 or op.get_attr(ta):
        return "the variable is the left factor"
    a, kernel = op.inputs[0], op.inputs[1]
    if kernel.shape.rank != 2:
        return "a batched kernel"
    k, c = (kernel.shape[1], kernel.shape[0]) if op.get_attr(tb) else tuple(kernel.shape)
    source = _tensordot_source(a, k) if op.type == "MatMul" else None
    if source is not None and _is_batch(source, ctx):
        # Tensordot's [B, T..., K] -> [B*T, K] (Dense on sequences). Checked first: with an
        # unknown batch size the merged rows would pass for a batch too.
        batched = source
    elif _is_batch(a, ctx):
        batched = a
    else:
        return "its rows are not examples"
    inner = batched.shape[1:-1]          # the positions T of each example
    t = inner.num_elements() if inner.is_fully_defined() else None
    if t == 1:      # [B, K]: forms.Outer takes it as it is
        group = lambda x, width: _cast(x if x.shape.rank == 2 else tf.reshape(x, [ctx.b, width]), ctx)
    else:
        group = lambda x, width: _cast(tf.reshape(x, [ctx.b, -1, width]), ctx)
    a3 = group(a, k)
    if op.get_attr(tb):      # the kernel is [C, K]: its gradient is dz^T a
        return Pending(Outer, lambda dz: Outer(group(dz, c), a3), (t, c, k))
    return Pending(Outer, lambda dz: Outer(a3, group(dz, c)), (t, k, c))


def _tensordot_source(a, k):
    """The `[B, T..., K]` tensor that `tf.tensordot` merged into the rows of `a`, or None."""
    if a.op.type != "Reshape":
        return None
    source = a.op.inputs[0]
    if source.op.type == "Transpose":          # tensordot transposes, with perm = identity here
        perm = tf.get_static_value(source.op.inputs[1])
        if perm is None or list(perm) != list(range(len(perm))):
            return None
        source = source.op.inputs[0]
    if (source.shape.rank or 0) <= 2 or source.shape[-1] != k:
        return None
    return source


def _pads(op, size_in, size_out, kernel, strides, dilations):
    """`[(before, after)]` per spatial axis, as the op pads its input."""
    padding = op.get_attr("padding").decode()
    if padding == "VALID":
        return [(0, 0)] * len(kernel)
    if padding == "EXPLICIT":
        flat = op.get_attr("explicit_paddings")
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(1, len(kernel) + 1)]
    pads = []       # SAME: the odd pixel goes at the end, as in TensorFlow
    for n, m, k, s, d in zip(size_in, size_out, kernel, strides, dilations):
        total = max((m - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _conv_geometry(op, x, y, kernel):
    """`(strides, dilations, pads)` of a convolution op with input-shaped `x`, output-shaped
    `y`, or a reason."""
    if op.get_attr("data_format").decode() not in ("NHWC", "NDHWC"):
        return "channels_first"
    if not (x.shape[1:].is_fully_defined() and y.shape[1:].is_fully_defined()):
        return "spatial size unknown until run time"
    strides, dilations = op.get_attr("strides")[1:-1], op.get_attr("dilations")[1:-1]
    return strides, dilations, _pads(op, x.shape[1:-1], y.shape[1:-1], kernel, strides, dilations)


def convolution(op, operand, ctx):
    """`Conv2D` (Keras Conv1D and Conv2D, SeparableConv2D's pointwise step), `Conv3D`, and
    `Conv2DBackpropInput` (Conv2DTranspose: the gradient of a convolution whose input is
    `dz` and whose output is the op's input). Strides, dilations, paddings, groups."""
    transpose = op.type == "Conv2DBackpropInput"
    if operand != 1:
        return "the variable is not the filter"
    kernel = tuple(op.inputs[1].shape[:-2])
    source = op.inputs[0].op
    if not transpose and (source.type == "SpaceToBatchND" or
                          source.type == "ExpandDims" and source.inputs[0].op.type == "SpaceToBatchND"):
        return _dilated(op, kernel, ctx)
    x, y = (op.outputs[0], op.inputs[2]) if transpose else (op.inputs[0], op.outputs[0])
    if not _is_batch(x, ctx) or not _is_batch(y, ctx):
        return "its rows are not examples"
    geometry = _conv_geometry(op, x, y, kernel)
    if isinstance(geometry, str):
        return geometry
    groups = x.shape[-1] // op.inputs[1].shape[-2]
    if transpose and groups != 1:
        return "a grouped transposed convolution"
    if transpose:
        ya = _cast(y, ctx)
        return Pending(Explicit, lambda dz: Explicit(filter_grads(_cast(dz, ctx), ya, kernel, *geometry)))
    xa = _cast(x, ctx)
    grads = lambda a, d: filter_grads(a, d, kernel, *geometry, groups)
    if kernel[0] == 1 and x.shape[1] == 1:
        # Conv1D (a Conv2D of height 1): its per-offset products are many small batched
        # matmuls, which XLA runs about 3x faster than TensorFlow's kernels on a CPU
        # (measured: the zoo's Conv1D model 2.06x -> 1.33x a plain step). For 2-D
        # convolutions the XLA cluster measured slower (CNN 1.22x -> 1.28x), so not there.
        grads = tf.function(grads, jit_compile=True, autograph=False)
    return Pending(Explicit, lambda dz: Explicit(grads(xa, _cast(dz, ctx))))


def _dilated(op, kernel, ctx):
    """A dilated convolution as `tf.nn.convolution` builds it: `SpaceToBatchND` (pads the
    input by `paddings` and splits it into dilation blocks), a VALID convolution, then
    `BatchToSpaceND` (joins the blocks and crops by `crops`). Per example this is a
    convolution with dilation `block` of the padded input, cropped: its filter gradient
    takes the input before the split and the gradient after the join, zero-padded back.
    A 1-D convolution runs as a 2-D one of height 1 between the split and the join."""
    to_batch, z = op.inputs[0].op, op.outputs[0]
    if to_batch.type == "ExpandDims":         # Conv1D: [B, W, C] -> [B, 1, W, C] -> Conv2D -> Squeeze
        to_batch, kernel = to_batch.inputs[0].op, kernel[1:]
        squeezes = z.consumers()
        if len(squeezes) != 1 or squeezes[0].type != "Squeeze":
            return "a dilated convolution of unknown layout"
        z = squeezes[0].outputs[0]
    joins = [c for c in z.consumers() if c.type == "BatchToSpaceND"]
    if len(joins) != 1 or len(z.consumers()) != 1 or op.get_attr("padding") != b"VALID":
        return "a dilated convolution of unknown layout"
    x, out = to_batch.inputs[0], joins[0].outputs[0]
    block = tf.get_static_value(to_batch.inputs[1])
    paddings, crops = tf.get_static_value(to_batch.inputs[2]), tf.get_static_value(joins[0].inputs[2])
    if block is None or paddings is None or crops is None or not _is_batch(x, ctx) or not _is_batch(out, ctx):
        return "a dilated convolution of unknown layout"
    if any(s != 1 for s in op.get_attr("strides")) or not x.shape[1:].is_fully_defined():
        return "a dilated convolution of unknown layout"
    pads = [tuple(int(p) for p in pair) for pair in paddings]
    xa = tf.pad(_cast(x, ctx), [[0, 0], *pads, [0, 0]])
    ones = [1] * len(kernel)
    groups = x.shape[-1] // op.inputs[1].shape[-2]

    def make(dz):
        y = tf.pad(_cast(dz, ctx), [[0, 0], *[[int(c) for c in pair] for pair in crops], [0, 0]])
        dilations = [int(d) for d in block]
        return Explicit(filter_grads(xa, y, kernel, ones, dilations, [(0, 0)] * len(kernel), groups))
    return Pending(Explicit, make, output=out)


def depthwise(op, operand, ctx):
    """`DepthwiseConv2dNative` (DepthwiseConv2D, SeparableConv2D's depthwise step):
    `g[n, i, j, c, m] = sum_{p,q} x_pad[n, ., ., c] dz[n, p, q, c M + m]`."""
    if operand != 1:
        return "the variable is not the filter"
    x, y = op.inputs[0], op.outputs[0]
    kernel = tuple(op.inputs[1].shape[:2])
    if not _is_batch(x, ctx):
        return "its rows are not examples"
    geometry = _conv_geometry(op, x, y, kernel)
    if isinstance(geometry, str):
        return geometry
    c, m = op.inputs[1].shape[2], op.inputs[1].shape[3]
    xa = _cast(x, ctx)

    def make(dz):
        d4 = tf.reshape(_cast(dz, ctx), [ctx.b, -1, c, m])
        return Explicit(tf.stack([tf.einsum("bpc,bpcm->bcm", w, d4)
                                  for w in _windows(xa, y.shape[1:-1], kernel, *geometry)], axis=1))
    return Pending(Explicit, make)


def _windows(x, out, kernel, strides, dilations, pads):
    """For each kernel offset, row-major, the input pixels it meets: `[B, positions, c]`."""
    if any(p != (0, 0) for p in pads):
        x = tf.pad(x, [[0, 0], *pads, [0, 0]])
    b = tf.shape(x)[0]
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, n, s in zip(offset, dilations, out, strides))
        yield tf.reshape(x[(slice(None),) + index], [b, -1, x.shape[-1]])


def filter_grads(x, y, kernel, strides, dilations, pads, groups=1):
    """Per-example filter gradients `[B, *kernel, c_x / groups, c_y]` of an N-D convolution
    of `x [B, *spatial, c_x]` whose output gradient is `y [B, *out, c_y]`: at kernel offset
    o, `g_n[o] = sum_p x_pad[n, p s + o d, :]^T y[n, p, :]`, one batched matmul per offset
    over a strided window of the padded input (several times faster on a CPU than
    `tf.image.extract_patches` and one matmul). With one input channel the windows stack
    into one matmul; with groups, each group's channels meet only their own outputs."""
    b, c_x, c_y = tf.shape(x)[0], x.shape[-1], y.shape[-1]
    y3 = tf.reshape(y, [b, -1, c_y])
    windows = list(_windows(x, y.shape[1:-1], kernel, strides, dilations, pads))
    if c_x == 1:      # [B, offsets, positions] x [B, positions, c_y]
        grads = tf.matmul(tf.stack([w[..., 0] for w in windows], axis=1), y3)
    elif groups == 1:
        grads = tf.stack([tf.matmul(w, y3, transpose_a=True) for w in windows], axis=1)
    else:
        gx, gy = c_x // groups, c_y // groups
        grads = tf.stack([tf.concat([tf.matmul(w[..., g * gx:(g + 1) * gx], y3[..., g * gy:(g + 1) * gy],
                                               transpose_a=True) for g in range(groups)], axis=-1)
                          for w in windows], axis=1)
    return tf.reshape(grads, [b, *kernel, c_x // groups, c_y])


def broadcast(op, operand, ctx):
    """`Mul`, `AddV2`, `Sub`, `BiasAdd` of a variable broadcast over the batch: biases,
    the scales and offsets of LayerNormalization, GroupNormalization, RMSNormalization.
    The per-example gradient is `dz` (times the other factor for Mul, negated for the
    subtrahend) summed over the axes the variable is broadcast along."""
    z, w = op.outputs[0], op.inputs[operand]
    rank = z.shape.rank
    if not _is_batch(z, ctx) or not w.shape.is_fully_defined():
        return "its rows are not examples"
    if op.type == "BiasAdd":
        if op.get_attr("data_format").decode() != "NHWC":
            return "channels_first"
        shape = [1] * (rank - 1) + list(w.shape)
    else:
        shape = [1] * (rank - w.shape.rank) + list(w.shape)
    if shape[0] != 1:
        return "the variable has a batch axis"
    axes = [i for i in range(1, rank) if shape[i] == 1 and z.shape[i] != 1]
    other = _cast(op.inputs[1 - operand], ctx) if op.type == "Mul" else None
    sign = -1.0 if op.type == "Sub" and operand == 1 else 1.0

    def make(dz):
        g = _cast(dz, ctx)
        g = g * other if other is not None else g * sign if sign < 0 else g
        return Explicit(tf.reduce_sum(g, axes, keepdims=True) if axes else g)
    return Pending(Explicit, make)


def gather(op, operand, ctx):
    """`GatherV2` on axis 0 and `ResourceGather` (Embedding): `g_n` adds `dz[n, t]` to row
    `ids[n, t]`."""
    if operand != 0 or op.get_attr("batch_dims") != 0:
        return "not a gather of rows"
    if op.type == "GatherV2" and (tf.get_static_value(op.inputs[2]) != 0 or op.inputs[0].shape.rank != 2):
        return "not a gather of rows"
    ids, dim = op.inputs[1], op.outputs[0].shape[-1]
    if not _is_batch(ids, ctx):
        return "its rows are not examples"
    flat = tf.cast(tf.reshape(ids, [ctx.b, -1]), tf.int64)
    return Pending(Rows, lambda dz: Rows(flat, tf.reshape(_cast(dz, ctx), [ctx.b, -1, dim])))


RULES = {
    "MatMul": matmul, "BatchMatMulV2": matmul, "BatchMatMulV3": matmul,
    "Conv2D": convolution, "Conv3D": convolution, "Conv2DBackpropInput": convolution,
    "DepthwiseConv2dNative": depthwise,
    "Mul": broadcast, "AddV2": broadcast, "Add": broadcast, "Sub": broadcast, "BiasAdd": broadcast,
    "GatherV2": gather, "ResourceGather": gather,
}
