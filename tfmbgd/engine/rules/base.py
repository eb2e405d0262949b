"""What every rule shares: the `Context` it is asked in, the `Pending` it answers, and
the check that a tensor's rows are examples."""

from typing import Callable, NamedTuple

import tensorflow as tf


class Context(NamedTuple):
    batch: int | None     # static batch size, None when known only at run time
    b: object             # the batch size as used in reshapes: `batch`, or a scalar tensor
    dtype: tf.DType       # moments are computed in this dtype (the variable's: float32 under
                          # mixed precision, whatever the op computes in)
    checks: list          # tensors whose leading axis must be B at run time (see `is_batch`)


class Pending(NamedTuple):
    kind: type            # forms.Outer, forms.Explicit or forms.Rows
    make: Callable        # dz (the gradient at op.outputs[0]) -> a form
    dims: tuple = ()      # Outer: static (T, K, C), T None when unknown
    output: tf.Tensor = None   # the tensor whose gradient `make` takes; None: op.outputs[0]
    why: str = ""         # why this form, when the rule chose between two (shown by layerwise.choices)


def is_batch(t, ctx):
    """Whether `t`'s leading axis is the batch. With a batch size known only at run time
    (Keras' fit traces so) an unknown leading axis is taken for the batch, and `t` is
    added to `ctx.checks`: `tfmbgd.engine.layerwise` asserts its size at run time, so a wrong
    guess fails loudly instead of giving wrong moments."""
    if t.shape.rank is None or t.shape.rank == 0 or t.shape[0] != ctx.batch:
        return False
    if ctx.batch is None:
        ctx.checks.append(t)
    return True


def cast(t, ctx):
    return tf.cast(t, ctx.dtype)

