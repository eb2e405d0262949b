"""Per-op rules: how one use of a variable turns into that variable's per-example gradients.

`tfmbgd.engine.layerwise` finds, in the traced step, every op that reads a trainable variable
(through reads, casts and reshapes) and asks the rule for that op's type. A rule sees the
op, which of its inputs carries the variable, and a `Context` (the batch size and the
dtype the moments are accumulated in). It returns a `Pending` (the form of the
per-example gradients, see `tfmbgd.engine.forms`, and how to make it from the gradient `dz` at
the op's output), or a short reason why it cannot, and the variable then takes the exact
fallback. Because the gradient at the op's *output* is used, the activation after it, and
whatever the model does with the output, never matters.

Example n's output depends only on example n's input, so `dz[n]` is the gradient of
`l_n` alone (scaled by 1/B, see `tfmbgd.engine.forms`). Every rule checks that the op keeps
examples apart: its non-variable input and its output have the batch as their leading
axis.

The maths follows BackPACK's first-order extensions and, for Dense and convolutions with
few output positions, the ghost norm of Goodfellow (2015), Li et al. (2021) and Bu et al.
(2023).

One module per op family (`matmul`, `conv`, `broadcast`, `gather`), each a pure function
`rule(op, operand, ctx)`; `RULES` maps TensorFlow op types to them. A new op rule is one
module here plus one `register` line.
"""

from tfmbgd.engine.rules.base import Context, Pending  # noqa: F401  (what a rule takes and returns)
from tfmbgd.engine.rules.broadcast import broadcast, broadcast_to, tile
from tfmbgd.engine.rules.conv import called, convolution, depthwise, filter_grads  # noqa: F401
from tfmbgd.engine.rules.gather import gather
from tfmbgd.engine.rules.matmul import matmul

RULES = {}


def register(op_type, rule):
    """Adds (or replaces) the rule for ops of `op_type`: `rule(op, operand, ctx)` returns a
    `Pending` or a reason string (the variable then takes the exact fallback)."""
    RULES[op_type] = rule


for _types, _rule in ((("MatMul", "BatchMatMulV2", "BatchMatMulV3"), matmul),
                      (("Conv2D", "Conv3D", "Conv2DBackpropInput"), convolution),
                      (("DepthwiseConv2dNative",), depthwise),
                      (("Mul", "AddV2", "Add", "Sub", "BiasAdd"), broadcast),
                      (("BroadcastTo",), broadcast_to),
                      (("Tile",), tile),
                      (("StatefulPartitionedCall", "PartitionedCall"), called),
                      (("GatherV2", "ResourceGather"), gather)):
    for _type in _types:
        register(_type, _rule)
