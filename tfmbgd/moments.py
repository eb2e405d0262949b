"""Gradient moments of one mini-batch: the one quantity every statistic is built from.

For every trainable variable v and the per-example gradients `g_n` (unscaled, see
`tfmbgd.gradients`), the moments are

- `mean[v]         = (1/B) sum_n g_n,v`      the gradient of the `reduce_mean` loss
- `sum_sq[v]       = sum_n g_n,v ** 2`       elementwise; the "elementwise tier"
- `var_norms_sq[v] = [||g_n,v||^2]_n`        `[B]`; the cheap "norm tier"

`tfmbgd.stats` turns them into variances, norms and the rest without touching a tape.
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from tfmbgd import gradients, layerwise
from tfmbgd.config import GRAD_METHODS as METHODS
from tfmbgd.errors import UserError
from tfmbgd.models import all_layers


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


def gradient_moments(model, loss_fn, x, y, method="auto", elementwise=True):
    """Computes the gradient moments of the batch `(x, y)`.

    Args:
      model: a Keras model whose variables exist.
      loss_fn: per-example loss `(y_true, y_pred) -> [B]`, unscaled.
      method: how per-example information is obtained; all give the same moments.
        "auto" (default): the layer-wise rules of `tfmbgd.layerwise` (matrix products,
        convolutions, scales and offsets, gathers, in any Keras model), from one backward
        pass, and `vectorized` per-example gradients for the remaining variables
        (`tfmbgd.layerwise.coverage` says which). "layerwise": the rules only (an error
        if a variable has none). "vectorized", "jacobian", "loop": from
        per-example gradients, see `tfmbgd.gradients.per_example_gradients`.
      elementwise: also compute `sum_sq` (needed for per-parameter variance and GSNR).

    Returns:
      A `GradientMoments`.

    Raises:
      UserError: an unknown method, or a model with BatchNormalization (its training mode
        mixes the examples of a batch, so per-example gradients are not defined).
    """
    if method not in METHODS:
        raise UserError(f"gradient method must be one of {', '.join(METHODS)}; got {method!r}")
    _refuse_batch_norm(model)
    if method in ("auto", "layerwise"):
        fields = layerwise.moments(model, loss_fn, x, y, elementwise, strict=method == "layerwise")
        if fields is not None:
            return GradientMoments(**fields, batch_size=_batch_size(fields["losses"]))
        method = "vectorized"       # no layer has a rule: the exact fallback for all
    return from_per_example(gradients.per_example(model, loss_fn, x, y, method), elementwise)


def _refuse_batch_norm(model):
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            raise UserError(
                f"layer {layer.name} is BatchNormalization: in training mode it mixes the "
                "examples of a batch, so per-example gradients are not defined; use "
                "LayerNormalization or GroupNormalization, or freeze it (trainable=False)")


def _batch_size(losses):
    static = losses.shape[0]
    return static if static is not None else tf.shape(losses)[0]


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
        batch_size=_batch_size(per_example.losses),
    )


def micro_batches(n, size):
    """Static `(start, stop)` slices of `n` examples in micro-batches of `size` (last smaller)."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def accumulated_moments(model, loss_fn, x, y, micro_batch, method="auto", elementwise=True):
    """`gradient_moments` of the whole batch, computed one micro-batch at a time.

    For gradient accumulation: memory holds one micro-batch, the moments are exactly those
    of the whole batch (see `combine`). The batch size must be static.
    """
    parts, previous = [], []
    for start, stop in micro_batches(x.shape[0], micro_batch):
        with tf.control_dependencies(previous):        # one micro-batch after another
            part = gradient_moments(model, loss_fn, x[start:stop], y[start:stop], method, elementwise)
        parts.append(part)
        previous = part.mean
    return combine(parts)


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
