"""A function call that holds one convolution. Keras compiles a grouped convolution
(`groups > 1`: ConvNeXt's 7x7 depthwise, ResNeXt) into a `tf.function(jit_compile=True)` of
its own, which the step's graph holds as one `StatefulPartitionedCall` op. When the called
function only reads the kernel, convolves the argument (a Conv1D adds and removes a unit
axis around it) and returns the result, the call is that convolution seen from outside:
the convolution rule runs on the inner op with the call's argument and output in its place."""

import tensorflow as tf

from tfmbgd.engine.rules.base import Pending
from tfmbgd.engine.rules.conv import convolution

CONVOLUTIONS = {"Conv2D", "Conv3D"}
PLUMBING = {"Placeholder", "Const", "ReadVariableOp", "Identity", "NoOp"}
UNIT_AXES = {"ExpandDims", "Squeeze"}        # Conv1D runs as a Conv2D of height 1


class _Seen(object):
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


def call(op, operand, ctx):
    """`StatefulPartitionedCall` / `PartitionedCall` of a function holding one convolution
    whose filter is the call's argument `operand`."""
    try:
        graph = op.graph._get_function(op.get_attr("f").name).graph
    except (AttributeError, ValueError, KeyError):
        graph = None
    if graph is None:
        return "a nested function call whose body is not visible"
    ops = [o for o in graph.get_operations() if o.type not in PLUMBING]
    convs = [o for o in ops if o.type in CONVOLUTIONS]
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
    return Pending(pending.kind, lambda dz: pending.make(_like(dz, conv.outputs[0])), output=out)
