"""`GradientMoments`: the fields of one batch's gradient moments, and how each merges.

Every producer (the layer-wise rules, the per-example methods, the replicas' merge)
returns a `GradientMoments`; `MERGES` says how each field combines over disjoint batches,
so micro-batches (`combine`) and replicas (`tfmbgd.engine.replicas`) merge them with one
generic function, and a new field is one line. Imports no other tfmbgd module.
"""

import math
from typing import NamedTuple

import tensorflow as tf

from tfmbgd.errors import UserError


class GradientMoments(NamedTuple):
    """First and second moments of the per-example gradients of one batch.

    Lists are aligned with `model.trainable_variables`. The per-example loss is unscaled,
    so `mean` is exactly the gradient of the `reduce_mean` batch loss.
    """

    mean: list             # per variable, variable.shape
    sum_sq: list | None    # per variable, variable.shape; None without the elementwise tier
    var_norms_sq: list     # per variable, [B]: squared norm of each example's gradient
    losses: tf.Tensor      # [B] per-example losses of the same forward pass
    outputs: tf.Tensor     # [B, ...] model outputs of the same forward pass
    batch_size: object     # B: a Python int when the batch shape is static, else a tensor

    @property
    def norms_sq(self):
        """`[B]` squared norm of each example's gradient over all variables."""
        return tf.add_n(self.var_norms_sq)


# How each field merges over disjoint batches (micro-batches, the replicas' shares): the
# batch-size weighted mean, the sum, or the concatenation along the batch axis. A new
# field is one more line here; `batch_size` adds up.
WEIGHTED_MEAN, SUM, CONCAT = "weighted mean", "sum", "concat"
MERGES = dict(mean=WEIGHTED_MEAN, sum_sq=SUM, var_norms_sq=CONCAT, losses=CONCAT, outputs=CONCAT)


# The power of a loss scale s in each field, when every per-example loss is multiplied by s
# (mixed precision's loss scaling): gradients scale by s, their squares by s^2.
SCALE_POWERS = dict(mean=1, sum_sq=2, var_norms_sq=2, losses=1, outputs=0)


def unscaled(m, scale):
    """The moments of the losses `l_n`, from those of the scaled losses `scale * l_n`."""
    def divide(value, power):
        if value is None or power == 0:
            return value
        return tf.nest.map_structure(lambda t: t / tf.cast(scale, t.dtype) ** power, value)
    return m._replace(**{name: divide(getattr(m, name), power) for name, power in SCALE_POWERS.items()})


def pack(m):
    """One part's fields, ready to merge: `(added, joined)`, dicts of the fields that add up
    over the parts (a weighted mean as `batch_size * mean`) and of those that concatenate.
    Fields that are None are left out."""
    added, joined = {}, {}
    for name, how in MERGES.items():
        value = getattr(m, name)
        if value is None:
            continue
        if how == WEIGHTED_MEAN:
            value = tf.nest.map_structure(lambda t: t * tf.cast(m.batch_size, t.dtype), value)
        (joined if how == CONCAT else added)[name] = value
    return added, joined


def unpack(added, joined, batch_size):
    """The merged `GradientMoments` from the parts' `pack`s added up and concatenated."""
    fields = {name: (joined if how == CONCAT else added).get(name) for name, how in MERGES.items()}
    fields = {name: (tf.nest.map_structure(lambda t: t / tf.cast(batch_size, t.dtype), value)
                     if MERGES[name] == WEIGHTED_MEAN and value is not None else value)
              for name, value in fields.items()}
    return GradientMoments(**fields, batch_size=batch_size)


def from_per_example(per_example, elementwise=True):
    """Reduces a `gradients.PerExample` (gradients `[B, *shape]`) to `GradientMoments`."""
    grads = per_example.gradients
    squares = [tf.square(g) for g in grads]
    return GradientMoments(
        mean=[tf.reduce_mean(g, axis=0) for g in grads],
        sum_sq=[tf.reduce_sum(s, axis=0) for s in squares] if elementwise else None,
        var_norms_sq=[tf.reduce_sum(tf.reshape(s, [tf.shape(s)[0], -1]), axis=1) for s in squares],
        losses=per_example.losses,
        outputs=per_example.outputs,
        batch_size=batch_size_of(per_example.losses),
    )


def batch_size_of(losses):
    """B of a batch from its `[B]` losses: a Python int when static, else a tensor."""
    static = losses.shape[0]
    return static if static is not None else tf.shape(losses)[0]


def combine(parts):
    """The moments of the union of disjoint batches, from each batch's moments, field by
    field as `MERGES` says. Exact: mean = sum_k B_k mean_k / B, sum_sq = sum_k sum_sq_k,
    per-example norms, losses and outputs concatenated.
    """
    sizes = [p.batch_size for p in parts]
    if not all(isinstance(b, int) for b in sizes):
        raise UserError("combining moments needs static batch sizes")
    packs = [pack(p) for p in parts]
    added = tf.nest.map_structure(lambda *ts: tf.add_n(ts), *[a for a, _ in packs])
    joined = tf.nest.map_structure(lambda *ts: tf.concat(ts, 0), *[j for _, j in packs])
    return unpack(added, joined, sum(sizes))


def flatten(tensors):
    """One vector of all elements of `tensors`, in order (a list of any shapes)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(flat, like):
    """`flatten`'s inverse: `flat` split into tensors shaped like `like` (variables, tensors
    or specs)."""
    sizes = [math.prod(tuple(v.shape)) for v in like]
    return [tf.reshape(t, v.shape) for t, v in zip(tf.split(flat, sizes), like)]
