"""Per-example losses and the two reductions that turn them into a batch loss.

A per-example loss maps `(y_true, y_pred)` to a `[B]` tensor of *unscaled* losses: no
division by the batch size. The batch loss is their `reduce_mean` (the gradient is then
the mean of the per-example gradients) or `reduce_sum` (B times that).
"""

import keras
import tensorflow as tf

from tfmbgd.choices import REDUCTIONS  # noqa: F401  (public here too)
from tfmbgd.errors import UserError


def crossentropy(y_true, logits):
    """Softmax cross-entropy of integer labels `[B]` against logits `[B, C]` -> `[B]`."""
    return keras.losses.sparse_categorical_crossentropy(y_true, _wide(logits), from_logits=True)


def mse(y_true, y_pred):
    """Squared error averaged over the output units `[B, K]` -> `[B]` (not over the batch)."""
    y_pred = _wide(y_pred)
    return keras.losses.mean_squared_error(tf.cast(y_true, y_pred.dtype), y_pred)


def _wide(outputs):
    """16-bit outputs (mixed precision) in float32: the loss is computed in float32, as Keras
    recommends for the last layer; other dtypes as they are."""
    return tf.cast(outputs, tf.float32) if outputs.dtype in (tf.float16, tf.bfloat16) else outputs


_LOSSES = {"crossentropy": crossentropy, "mse": mse}


def per_example(name):
    """The per-example loss called `name` ("crossentropy" or "mse")."""
    if name not in _LOSSES:
        raise UserError(f"unknown loss {name!r}: use {' or '.join(_LOSSES)}")
    return _LOSSES[name]


def for_task(num_classes):
    """The natural loss name for a data set: crossentropy for classes, mse for regression."""
    return "crossentropy" if num_classes else "mse"


def reduce(losses, reduction="mean"):
    """The batch loss: `reduce_mean` or `reduce_sum` of the `[B]` per-example losses."""
    if reduction == "mean":
        return tf.reduce_mean(losses)
    if reduction == "sum":
        return tf.reduce_sum(losses)
    raise UserError(f"reduction must be mean or sum; got {reduction!r}")
