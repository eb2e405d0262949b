"""Per-example losses and the two reductions that turn them into a batch loss.

A per-example loss maps `(y_true, y_pred)` to a `[B]` tensor of *unscaled* losses: no
division by the batch size. The batch loss is their `reduce_mean` (the gradient is then
the mean of the per-example gradients) or `reduce_sum` (B times that).
"""

import math

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


def per_example_mean(values):
    """`[B]`: the mean of each example's loss values over their non-batch axes (a sequence
    model's per-token losses `[B, T]`), so that the mean over the batch is Keras' default
    reduction (`sum_over_batch_size`: the sum over every value, divided by their count)."""
    if values.shape.rank is not None and values.shape.rank <= 1:
        return values
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def weighted(loss_fn, y, weights):
    """`(loss_fn', y')`: the per-example loss of `loss_fn` weighted as Keras weighs it, and
    `y` with the `weights` packed in as more columns, so that they travel with their
    examples through every per-example method (layer-wise, jacobian, vectorized, loop).

    `weights` is `[B]` (one per example: a sample weight, a class weight, 0 for padding) or
    shaped like the loss values (`[B, T]`: a mask over tokens). As Keras' default reduction
    does, each value is multiplied by its weight (a `[B]` weight broadcast over the
    example's values) and example n's loss is the mean of its weighted values: the mean
    over the batch of the per-example losses is then exactly the loss Keras reports and
    optimizes, `sum(w * values) / count(values)`. Packed as float64, which holds integer
    labels and float32 or float64 targets exactly.
    """
    dtype, tail = y.dtype, list(y.shape[1:])
    width, w_tail = math.prod(tail), list(weights.shape[1:])
    packed = tf.concat([tf.reshape(tf.cast(y, tf.float64), [-1, width]),
                        tf.reshape(tf.cast(weights, tf.float64), [-1, math.prod(w_tail)])], axis=1)

    def weighted_loss(packed, outputs):
        y = tf.reshape(tf.cast(packed[:, :width], dtype), [-1, *tail])
        values = loss_fn(y, outputs)
        w = tf.cast(tf.reshape(packed[:, width:], [-1, *w_tail]), values.dtype)
        while w.shape.rank < values.shape.rank:      # a weight per example, over its values
            w = w[..., None]
        return per_example_mean(values * w)
    return weighted_loss, packed
