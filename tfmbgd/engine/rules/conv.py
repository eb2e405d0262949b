"""Convolutions: Conv1D/2D/3D (strides, dilations, paddings, groups), transposed and
depthwise, and a function call holding one (Keras' grouped convolutions). The per-example
filter gradient, one batched matmul per kernel offset over a strided window of the padded
input (BackPACK's unfolding, without building the patches)."""

import itertools
import math

import tensorflow as tf

from tfmbgd.engine.forms import Explicit, Outer, Pieces, batch_size
from tfmbgd.engine.rules.base import Pending, cast, is_batch


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
    if not transpose and _is_split(source):
        return _dilated(op, kernel, ctx)
    x, y = (op.outputs[0], op.inputs[2]) if transpose else (op.inputs[0], op.outputs[0])
    if not is_batch(x, ctx) or not is_batch(y, ctx):
        return "its rows are not examples"
    geometry = _conv_geometry(op, x, y, kernel)
    if isinstance(geometry, str):
        return geometry
    groups = x.shape[-1] // op.inputs[1].shape[-2]
    if transpose and groups != 1:
        return "a grouped transposed convolution"
    if transpose:
        ya = cast(y, ctx)
        return Pending(Pieces, lambda dz: Pieces(filter_pieces(cast(dz, ctx), ya, kernel, *geometry)),
                       why="transposed; replaces the filter gradient")
    xa = cast(x, ctx)
    positions, k, c = math.prod(y.shape[1:-1]), math.prod(kernel) * x.shape[-1], y.shape[-1]
    ghost, kernels = positions * positions * (k + c), k * c
    if groups == 1 and ghost < kernels:
        # Few output positions (late layers): the unfolded input `a [B, T, k^2 C_in]` and `dz
        # [B, T, C_out]` as an outer product, whose norms are the ghost norm of Gram
        # matrices: B T^2 (k^2 C_in + C_out) multiply-adds on top of the plain step's filter
        # gradient, which the backward pass then computes. The per-example kernels replace
        # that gradient (their sum is it) and add B k^2 C_in C_out squares over an array B
        # times the kernel's size. So the ghost norm where T^2 (k^2 C_in + C_out) <
        # k^2 C_in C_out (Goodfellow 2015; Bu et al. 2023 choose layer by layer so); then
        # T^2 < k^2 C_in C_out too, and `forms` takes the Gram path.
        def unfolded(dz):
            with tf.control_dependencies([dz]):       # not before dz: see `_windows`
                a = tf.concat(list(_windows(xa, y.shape[1:-1], kernel, *geometry)), axis=-1)
            return Outer(a, tf.reshape(cast(dz, ctx), [ctx.b, positions, c]))
        return Pending(Outer, unfolded, (positions, k, c),
                       why=f"T^2 (k^2 C_in + C_out) = {ghost:,} < k^2 C_in C_out = {kernels:,} multiply-adds "
                           "per example")
    why = (f"groups={groups}" if groups > 1 else
           f"per-example kernels: k^2 C_in C_out = {kernels:,} <= the ghost norm's T^2 (k^2 C_in + C_out) "
           f"= {ghost:,} multiply-adds per example, T={positions}")
    grads = lambda a, d: filter_pieces(a, d, kernel, *geometry, groups)
    if kernel[0] == 1 and x.shape[1] == 1:
        # Conv1D (a Conv2D of height 1): its per-offset products are many small batched
        # matmuls, which XLA runs faster than TensorFlow's kernels on a CPU; for 2-D
        # convolutions the XLA cluster measured slower (`benchmarks/step_cost.py --zoo`).
        grads = tf.function(grads, jit_compile=True, autograph=False)
    return Pending(Pieces, lambda dz: Pieces(grads(xa, cast(dz, ctx))),
                   why=why + "; replaces the filter gradient")


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
    if block is None or paddings is None or crops is None or not is_batch(x, ctx) or not is_batch(out, ctx):
        return "a dilated convolution of unknown layout"
    if any(s != 1 for s in op.get_attr("strides")) or not x.shape[1:].is_fully_defined():
        return "a dilated convolution of unknown layout"
    pads = [tuple(int(p) for p in pair) for pair in paddings]
    xa = tf.pad(cast(x, ctx), [[0, 0], *pads, [0, 0]])
    geometry = [1] * len(kernel), [int(d) for d in block], [(0, 0)] * len(kernel)
    if op.type == "DepthwiseConv2dNative":
        grads = lambda a, d: depthwise_grads(a, d, kernel, *geometry, op.inputs[1].shape[-1])
    else:
        groups = x.shape[-1] // op.inputs[1].shape[-2]
        grads = lambda a, d: filter_grads(a, d, kernel, *geometry, groups)

    def make(dz):
        y = tf.pad(cast(dz, ctx), [[0, 0], *[[int(c) for c in pair] for pair in crops], [0, 0]])
        return Explicit(grads(xa, y))
    return Pending(Explicit, make, output=out, why="dilated; replaces the filter gradient")


def depthwise(op, operand, ctx):
    """`DepthwiseConv2dNative` (DepthwiseConv1D/2D, SeparableConv1D/2D's depthwise step;
    strides, paddings, dilations, depth multipliers)."""
    if operand != 1:
        return "the variable is not the filter"
    kernel = tuple(op.inputs[1].shape[:2])
    if _is_split(op.inputs[0].op):
        return _dilated(op, kernel, ctx)
    x, y = op.inputs[0], op.outputs[0]
    if not is_batch(x, ctx):
        return "its rows are not examples"
    geometry = _conv_geometry(op, x, y, kernel)
    if isinstance(geometry, str):
        return geometry
    xa, m = cast(x, ctx), op.inputs[1].shape[-1]
    return Pending(Explicit, lambda dz: Explicit(depthwise_grads(xa, cast(dz, ctx), kernel, *geometry, m)),
                   why="depthwise: per-example kernels, k^2 C M multiply-adds per position as the filter "
                       "gradient they replace (a ghost norm would cost T (k^2 + M) C)")


def _is_split(source):
    """Whether a convolution's input comes from `SpaceToBatchND` (a dilated convolution as
    `tf.nn` builds it; a 1-D one through `ExpandDims`)."""
    return source.type == "SpaceToBatchND" or (source.type == "ExpandDims"
                                               and source.inputs[0].op.type == "SpaceToBatchND")


@tf.function(jit_compile=True, autograph=False)
def _depthwise(x, dz, kernel, strides, dilations, pads, m):
    c = x.shape[-1]
    d4 = tf.reshape(dz, [batch_size(x), -1, c, m])
    return tf.stack([tf.reduce_sum(w[..., None] * d4, axis=1)
                     for w in _windows(x, dz.shape[1:-1], kernel, strides, dilations, pads)], axis=1)


def depthwise_grads(x, dz, kernel, strides, dilations, pads, m):
    """Per-example filter gradients `[B, *kernel, c, m]` of a depthwise convolution of `x [B,
    *spatial, c]` with `m` outputs per channel, whose output gradient is `dz [B, *out, c m]`:
    at kernel offset o, `g_n[o, c, j] = sum_p x_pad[n, p s + o d, c] dz[n, p, c m + j]`.
    One product and one sum over positions per offset, memory-bound; XLA fuses the strided
    window, the product and the sum into one pass (on a CPU several times faster than
    TensorFlow's kernels and within about 1.6x of the plain step's filter gradient, which
    the backward pass then leaves out: `benchmarks/step_cost.py --depthwise`)."""
    g = _depthwise(x, dz, tuple(kernel), tuple(strides), tuple(dilations), tuple(map(tuple, pads)), m)
    return tf.reshape(g, [batch_size(x), *kernel, x.shape[-1], m])


def _windows(x, out, kernel, strides, dilations, pads):
    """For each kernel offset, row-major, the input pixels it meets: `[B, positions, c]`.

    Each window is a copy as large as the layer's input. Made from the forward pass's
    activations alone, TensorFlow would be free to make all of them as soon as the forward
    pass ends and hold them through the backward pass (VGG16: nine copies of every early
    layer's input); callers make them under a control dependency on the layer's output
    gradient, so they exist only while that layer's per-example gradients are computed."""
    if any(p != (0, 0) for p in pads):
        x = tf.pad(x, [[0, 0], *pads, [0, 0]])
    b = batch_size(x)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, n, s in zip(offset, dilations, out, strides))
        yield tf.reshape(x[(slice(None),) + index], [b, -1, x.shape[-1]])


def filter_grads(x, y, kernel, strides, dilations, pads, groups=1):
    """Per-example filter gradients `[B, *kernel, c_x / groups, c_y]` of an N-D convolution
    of `x [B, *spatial, c_x]` whose output gradient is `y [B, *out, c_y]` (`filter_pieces`
    joined)."""
    pieces = filter_pieces(x, y, kernel, strides, dilations, pads, groups)
    b = batch_size(x)
    return tf.reshape(tf.concat([tf.reshape(p, [b, -1]) for p in pieces], 1),
                      [b, *kernel, x.shape[-1] // groups, y.shape[-1]])


def filter_pieces(x, y, kernel, strides, dilations, pads, groups=1):
    """The per-example filter gradients of `filter_grads` as consecutive pieces (a
    `forms.Pieces`): at kernel offset o, `g_n[o] = sum_p x_pad[n, p s + o d, :]^T y[n, p, :]`,
    one batched matmul per offset over a strided window of the padded input (several times
    faster on a CPU than `tf.image.extract_patches` and one matmul), one piece each. With
    one input channel the windows stack into one matmul; with groups, each group's
    channels meet only their own outputs (one input channel per group, ConvNeXt's:
    `depthwise_grads`)."""
    b, c_x, c_y = batch_size(x), x.shape[-1], y.shape[-1]
    if groups > 1 and groups == c_x:      # one input channel per group: a depthwise convolution
        return [depthwise_grads(x, y, kernel, strides, dilations, pads, c_y // c_x)]
    y3 = tf.reshape(y, [b, -1, c_y])
    with tf.control_dependencies([y]):       # not before the gradient: see `_windows`
        windows = list(_windows(x, y.shape[1:-1], kernel, strides, dilations, pads))
    if c_x == 1:      # [B, offsets, positions] x [B, positions, c_y]
        return [tf.matmul(tf.stack([w[..., 0] for w in windows], axis=1), y3)]
    if groups == 1:
        return [tf.matmul(w, y3, transpose_a=True) for w in windows]
    # [B, P, groups, c_x / groups] x [B, P, groups, c_y / groups]: output channel
    # g (c_y / groups) + j meets input channels g (c_x / groups) + i only.
    gx, gy = c_x // groups, c_y // groups
    yg = tf.reshape(y3, [b, -1, groups, gy])
    return [tf.einsum("bpgi,bpgo->bigo", tf.reshape(w, [b, -1, groups, gx]), yg) for w in windows]


CALLED = {"Conv2D", "Conv3D"}      # what a call may hold (Keras compiles grouped ones so)
PLUMBING = {"Placeholder", "Const", "ReadVariableOp", "Identity", "NoOp"}
UNIT_AXES = {"ExpandDims", "Squeeze"}        # Conv1D runs as a Conv2D of height 1


class _Seen:
    """The inner convolution as its rule sees it from outside the call: the inner op's
    attributes and kernel, the call's argument and output (given the inner op's shapes)."""

    def __init__(self, inner, x, output):
        self.type, self.name, self._inner = inner.type, inner.name, inner
        self.inputs, self.outputs = [x, inner.inputs[1]], [output]

    def get_attr(self, name):
        return self._inner.get_attr(name)


def _argument(t, graph):
    """The index in `graph.inputs` that the inner tensor `t` is computed from by reads and unit
    axes, or None."""
    while t.op.type in {"ReadVariableOp", "Identity", "ExpandDims"}:
        t = t.op.inputs[0]
    return next((i for i, s in enumerate(graph.inputs) if s is t), None)


def _result(t):
    while t.op.type in {"Identity", "Squeeze"}:
        t = t.op.inputs[0]
    return t


def _like(t, inner):
    """The outer tensor `t` shaped as the inner `inner` (they differ by unit axes only)."""
    return t if t.shape.rank == inner.shape.rank else tf.reshape(t, [-1, *inner.shape[1:]])


def called(op, operand, ctx):
    """`StatefulPartitionedCall` / `PartitionedCall` of a function holding one convolution
    whose filter is the call's argument `operand`: a function call that holds one
    convolution is that convolution seen from outside. Keras compiles a grouped convolution
    (`groups > 1`: ConvNeXt's 7x7 depthwise, ResNeXt) into a `tf.function(jit_compile=True)`
    of its own, which the step's graph holds as one call op. When the called function only
    reads the kernel, convolves the argument (a Conv1D adds and removes a unit axis around
    it) and returns the result, `convolution` runs on the inner op with the call's argument
    and output in its place."""
    try:
        graph = op.graph._get_function(op.get_attr("f").name).graph
    except (AttributeError, ValueError, KeyError):
        graph = None
    if graph is None:
        return "a nested function call whose body is not visible"
    ops = [o for o in graph.get_operations() if o.type not in PLUMBING]
    convs = [o for o in ops if o.type in CALLED]
    if len(convs) != 1 or any(o.type not in UNIT_AXES for o in ops if o is not convs[0]):
        return "a nested function call that is not one convolution"
    conv = convs[0]
    x = _argument(conv.inputs[0], graph)
    outputs = [i for i, t in enumerate(graph.outputs) if _result(t) is conv.outputs[0]]
    if (_argument(conv.inputs[1], graph) != operand or x is None or len(outputs) != 1
            or len(graph.inputs) != len(op.inputs) or not conv.inputs[0].shape[1:].is_fully_defined()
            or not conv.outputs[0].shape[1:].is_fully_defined()):
        return "a nested function call of unknown layout"
    out = op.outputs[outputs[0]]
    seen = _Seen(conv, _like(op.inputs[x], conv.inputs[0]), _like(out, conv.outputs[0]))
    pending = convolution(seen, 1, ctx)
    if isinstance(pending, str):
        return pending
    return Pending(pending.kind, lambda dz: pending.make(_like(dz, conv.outputs[0])), pending.dims, out,
                   f"a call holding {conv.type}; {pending.why}")
