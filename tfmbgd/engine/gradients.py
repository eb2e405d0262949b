"""Batch gradients and per-example gradients of any Keras model and per-example loss.

Conventions, shared by all of tfmbgd:

- The per-example loss `l_n = loss_fn(y_n, model(x_n))` is *unscaled*: no 1/B.
- The per-example gradient is `g_n = d l_n / d theta`, unscaled too. (BackPACK scales
  per-example gradients of a mean loss by 1/B; Opacus and tfmbgd do not.)
- The gradient of the `reduce_mean` batch loss is the mean of the `g_n`; of the
  `reduce_sum` batch loss, their sum, i.e. B times the mean.

Every function takes a model whose variables exist, a `loss_fn(y_true, y_pred) -> [B]`,
and a batch `x [B, ...]` (or a list or dict of such tensors, for a model with several
inputs), `y [B, ...]`; every one works eagerly and inside `tf.function`.
Gradient lists are aligned with `model.trainable_variables`; a variable that does not
affect the loss gets zeros, never None.
"""

import contextlib
import logging
from typing import NamedTuple

import keras
import tensorflow as tf

from tfmbgd import losses as losses_lib
from tfmbgd.errors import UserError

METHODS = ("jacobian", "vectorized", "loop")


class PerExample(NamedTuple):
    """Per-example losses, model outputs and gradients of one batch."""

    losses: tf.Tensor      # [B] unscaled per-example losses
    outputs: tf.Tensor     # [B, ...] model outputs
    gradients: list        # per variable, [B, *variable.shape]


def check_call(model, loss_fn, x, y):
    """What every public function checks of its arguments before it traces anything.

    Raises:
      UserError: naming the argument and the fix: a model without trainable variables (or
        not built yet), a Keras loss object that reduces over the batch, inputs and
        targets of different batch sizes (static shapes), an empty batch.
    """
    if not model.trainable_variables:
        raise UserError(f"model {model.name!r} has no trainable variables: nothing to differentiate "
                        "(a subclassed model is built by calling it once on a batch; frozen layers have "
                        "trainable=False)")
    if isinstance(loss_fn, keras.losses.Loss) and loss_fn.reduction not in (None, "none"):
        raise UserError(f"loss_fn {type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) returns one "
                        f"number for the whole batch; pass {type(loss_fn).__name__}(reduction=None), "
                        "which returns the per-example losses [B] tfmbgd needs")
    sizes = {}
    for name, tensors in (("x", x), ("y", y)):
        for t in tf.nest.flatten(tensors):
            shape = getattr(t, "shape", None)
            if shape is not None and len(shape) and shape[0] is not None:
                sizes.setdefault(name, int(shape[0]))
                if int(shape[0]) != sizes[name]:
                    raise UserError(f"the inputs in {name} have different batch sizes ({sizes[name]} and "
                                    f"{int(shape[0])}); give every input one row per example")
    if len(set(sizes.values())) > 1:
        raise UserError(f"x has {sizes['x']} examples but y has {sizes['y']}; pass one target per example")
    if 0 in sizes.values():
        raise UserError("the batch is empty (0 examples); gradients and their statistics need at least one")


def batch_gradients(model, loss_fn, x, y, reduction="mean"):
    """The batch loss and its gradient by one ordinary backward pass.

    Args:
      reduction: "mean" (`reduce_mean` of the per-example losses) or "sum".

    Returns:
      `(loss, grads)`: the scalar batch loss, and a list aligned with
      `model.trainable_variables` of gradients shaped like the variables.

    Raises:
      UserError: arguments that cannot work (`check_call`).
    """
    check_call(model, loss_fn, x, y)
    with tf.GradientTape() as tape:
        loss = losses_lib.reduce(loss_fn(y, model(x, training=True)), reduction)
    return loss, _gradient(tape, loss, model.trainable_variables)


def example_gradients(model, loss_fn, x_n, y_n, variables=None):
    """Loss, output and gradient of one example `x_n` (no batch axis), by one backprop.

    Args:
      variables: the variables to differentiate; default `model.trainable_variables`.

    Returns:
      `(loss, output, grads)`: scalar loss, the model output without the batch axis, and
      a gradient per variable, shaped like the variable.
    """
    with tf.GradientTape() as tape:
        output = model(tf.nest.map_structure(lambda t: t[None], x_n), training=True)
        loss = loss_fn(y_n[None], output)[0]
    variables = model.trainable_variables if variables is None else variables
    return loss, output[0], _gradient(tape, loss, variables)


def _gradient(tape, target, variables):
    return dense_gradients(variables, tape.gradient(target, variables))


def dense_gradients(variables, grads):
    """Gradients as dense tensors: zeros for None, IndexedSlices (Embedding) densified.

    Zeros are filled in here because `UnconnectedGradients.ZERO` fails on Keras 3
    variables, whose dtype is a string.
    """
    return [tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g)
            for v, g in zip(variables, grads)]


def per_example_gradients(model, loss_fn, x, y, method="vectorized"):
    """Per-example gradients `g_n` (unscaled), each `[B, *variable.shape]`.

    Args:
      method: "jacobian" (`tape.jacobian` of the `[B]` loss vector), "vectorized"
        (`tf.vectorized_map` over single-example backprops) or "loop" (B single-example
        backprops one after another: the slow oracle).
    """
    return per_example(model, loss_fn, x, y, method).gradients


def per_example(model, loss_fn, x, y, method="vectorized", variables=None):
    """Like `per_example_gradients`, with the per-example losses and outputs as well.

    Args:
      variables: the variables to differentiate; default `model.trainable_variables`.

    Raises:
      UserError: an unknown method, or arguments that cannot work (`check_call`).
    """
    check_call(model, loss_fn, x, y)
    variables = model.trainable_variables if variables is None else variables
    if method == "jacobian":
        return _jacobian(model, loss_fn, x, y, variables)
    if method == "vectorized":
        with _quiet_tensorflow_logger():
            return PerExample(*tf.vectorized_map(_example_fn(model, loss_fn, variables), (x, y)))
    if method == "loop":
        return _loop(model, loss_fn, x, y, variables)
    raise UserError(f"per-example method must be one of {', '.join(METHODS)}; got {method!r}")


@contextlib.contextmanager
def _quiet_tensorflow_logger():
    """TensorFlow's logger at ERROR for a while: `vectorized_map` warns, for some ops it
    loops over (e.g. "Conv2DBackpropFilter uses a while_loop. Fix that!"), about its own
    internals, which a user can do nothing about."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _example_fn(model, loss_fn, variables):
    return lambda example: example_gradients(model, loss_fn, *example, variables=variables)


def _jacobian(model, loss_fn, x, y, variables, pfor=True):
    """`tape.jacobian` of the `[B]` per-example losses, vectorized (pfor) or in a while loop."""
    with tf.GradientTape() as tape:
        outputs = model(x, training=True)
        losses = loss_fn(y, outputs)
    # Zeros filled in here, as in _gradient.
    grads = [tf.zeros(tf.concat([tf.shape(losses), tf.shape(v)], 0), dtype=v.dtype) if g is None else g
             for v, g in zip(variables, tape.jacobian(losses, variables, experimental_use_pfor=pfor))]
    return PerExample(losses, outputs, grads)


def unvectorized(model, loss_fn, x, y, variables):
    """Per-example gradients of `variables` only, by one forward pass and a `tf.while_loop`
    of B backward passes (`tape.jacobian` without pfor): the fallback of the layer-wise
    method. Never `tf.vectorized_map` (pfor), which has corrupted the heap and killed the
    process on KerasHub transformers (GPT-2, BERT, Gemma: SIGSEGV, SIGABRT); a fallback
    must not be able to take the process down. Returns a `PerExample`."""
    return _jacobian(model, loss_fn, x, y, variables, pfor=False)


def _loop(model, loss_fn, x, y, variables):
    fn = _example_fn(model, loss_fn, variables)
    # The first example fixes the dtypes and shapes of the rest, for any model.
    x = tf.nest.map_structure(tf.convert_to_tensor, x)     # a tensor, or a list or dict of them
    first = fn((tf.nest.map_structure(lambda t: t[0], x), y[0]))
    signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), first)
    # parallel_iterations=1: one backprop after another, as a Python for-loop would do.
    rest = tf.map_fn(fn, (tf.nest.map_structure(lambda t: t[1:], x), y[1:]), fn_output_signature=signature,
                     parallel_iterations=1)
    stacked = tf.nest.map_structure(lambda a, b: tf.concat([a[None], b], 0), first, rest)
    return PerExample(*stacked)
