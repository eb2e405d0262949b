"""Matrix products with a variable as the right factor: Dense, EinsumDense, attention
projections. The per-example gradient is an outer product `a_n^T dz_n` (`forms.Outer`),
never built for the norms (Goodfellow 2015's ghost norm)."""

import tensorflow as tf

from tfmbgd.engine.forms import Outer
from tfmbgd.engine.rules.base import Pending, cast, is_batch


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
    if source is not None and is_batch(source, ctx):
        # Tensordot's [B, T..., K] -> [B*T, K] (Dense on sequences). Checked first: with an
        # unknown batch size the merged rows would pass for a batch too.
        batched = source
    elif is_batch(a, ctx):
        batched = a
    else:
        return "its rows are not examples"
    inner = batched.shape[1:-1]          # the positions T of each example
    t = inner.num_elements() if inner.is_fully_defined() else None
    if t == 1:      # [B, K]: forms.Outer takes it as it is
        group = lambda x, width: cast(x if x.shape.rank == 2 else tf.reshape(x, [ctx.b, width]), ctx)
    else:
        group = lambda x, width: cast(tf.reshape(x, [ctx.b, -1, width]), ctx)
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
