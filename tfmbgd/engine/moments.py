"""Gradient moments of one mini-batch: the one quantity every statistic is built from.

For every trainable variable v and the per-example gradients `g_n` (unscaled, see
`tfmbgd.engine.gradients`), the moments are

- `mean[v]         = (1/B) sum_n g_n,v`      the gradient of the `reduce_mean` loss
- `sum_sq[v]       = sum_n g_n,v ** 2`       elementwise; the "elementwise tier"
- `var_norms_sq[v] = [||g_n,v||^2]_n`        `[B]`; the cheap "norm tier"

The type and how its fields merge are in `tfmbgd.engine.fields`; this module chooses the method
that computes them. `tfmbgd.stats` and `tfmbgd.instruments` turn them into variances,
norms and the rest without touching a tape.
"""

import weakref

import tensorflow as tf

from tfmbgd import models
from tfmbgd.choices import GRAD_METHODS as METHODS
from tfmbgd.engine import forms, gradients, layerwise
from tfmbgd.engine.fields import (  # noqa: F401
    MERGES,
    GradientMoments,
    batch_size_of,
    combine,
    from_per_example,
    pack,
    unpack,
)
from tfmbgd.errors import UserError


def gradient_moments(model, loss_fn, x, y, method="auto", elementwise=True):
    """Computes the gradient moments of the batch `(x, y)`.

    Args:
      model: a Keras model whose variables exist.
      loss_fn: per-example loss `(y_true, y_pred) -> [B]`, unscaled.
      method: how per-example information is obtained; all give the same moments.
        "auto" (default): the layer-wise rules of `tfmbgd.engine.layerwise` (matrix products,
        convolutions, scales and offsets, gathers, in any Keras model), from one backward
        pass, and per-example gradients of the remaining variables by B backward passes
        (`tfmbgd.engine.gradients.unvectorized`; `tfmbgd.engine.layerwise.coverage` says
        which). "layerwise": the rules only (an error
        if a variable has none). "vectorized", "jacobian", "loop": from
        per-example gradients, see `tfmbgd.engine.gradients.per_example_gradients`.
      elementwise: also compute `sum_sq` (needed for per-parameter variance and GSNR).

    Returns:
      A `GradientMoments`.

    BatchNormalization in training mode mixes the examples of a batch through its
    statistics: what is measured for every variable is then each example's *contribution*,
    B times the gradient of the batch's mean loss with respect to a copy of the variable
    used by that example alone (the batch's mean and variance as they are). The
    contributions' mean is the batch gradient, and without such layers they are the
    per-example gradients. The layer-wise rules give them ("auto", "layerwise"); the other
    methods, and the fallback, give other quantities and are refused for such a model.

    Raises:
      UserError: an unknown method; a method other than "auto" or "layerwise", or a
        variable without a rule, in a model with BatchNormalization in training mode; or
        arguments that cannot work (`tfmbgd.engine.gradients.check_call`).
    """
    _check(model, loss_fn, x, y, method)
    if method in ("auto", "layerwise"):       # the rules, with the exact fallback where none applies
        return layerwise.moments(model, loss_fn, x, y, elementwise, strict=method == "layerwise")
    return from_per_example(gradients.per_example(model, loss_fn, x, y, method), elementwise)


def _check(model, loss_fn, x, y, method):
    """What every moments call checks before it traces anything (see `gradient_moments`)."""
    if method not in METHODS:
        raise UserError(f"gradient method must be one of {', '.join(METHODS)}; got {method!r}")
    gradients.check_call(model, loss_fn, x, y)
    if method not in ("auto", "layerwise"):
        _refuse_batch_norm(model, method)
    if method == "vectorized":
        _refuse_vectorized(model)


def measured_moments(model, loss_fn, x, y, method="auto", elementwise=True, micro_batch=None):
    """`(GradientMoments, forms.Projector)` of the batch: the moments, and the per-example
    gradients kept in their cheap forms, for dot products with vectors known only later
    (`g_n . mean`, `g_n . update`) and element histograms. With `micro_batch`, one
    micro-batch at a time, their projectors concatenated. Eagerly, the forms are computed
    by a `tf.function` kept per model and settings, and the projector holds their values."""
    if not tf.inside_function():
        return _eager_measured(model, loss_fn, x, y, method, elementwise, micro_batch)
    if micro_batch is not None:
        parts = _one_after_another(lambda x, y: measured_moments(model, loss_fn, x, y, method, elementwise),
                                   x, y, micro_batch)
        return combine([m for m, _ in parts]), forms.Projector.concat([p for _, p in parts])
    _check(model, loss_fn, x, y, method)
    if method in ("auto", "layerwise"):
        return layerwise._traced_moments(model, loss_fn, x, y, elementwise, method == "layerwise",
                                         projector=True)
    per_ex = gradients.per_example(model, loss_fn, x, y, method)
    m = from_per_example(per_ex, elementwise)
    variables = model.trainable_variables
    parts = [[(forms.Explicit(tf.cast(g, v.dtype)), tuple(v.shape), 1.0)]
             for g, v in zip(per_ex.gradients, variables)]
    return m, forms.Projector(parts, m.batch_size)


_EAGER = weakref.WeakKeyDictionary()


def _eager_measured(model, loss_fn, x, y, method, elementwise, micro_batch):
    compiled = _EAGER.setdefault(model, {})
    key = (loss_fn, method, elementwise, micro_batch)
    if key not in compiled:
        layout = {}

        def traced(x, y):
            m, project = measured_moments(model, loss_fn, x, y, method, elementwise, micro_batch)
            layout["projector"] = project        # its structure; the tensors are returned
            return m, forms.projector_tensors(project)
        compiled[key] = (tf.function(traced, autograph=False), layout)
    function, layout = compiled[key]
    m, tensors = function(x, y)
    return m._replace(batch_size=batch_size_of(m.losses)), forms.projector_from(layout["projector"], tensors)


def per_example_dots(model, loss_fn, x, y, vectors=None, method="auto"):
    """`[B]`: the dot product of each example's gradient `g_n` (all variables) with
    `vectors` (a list aligned with `model.trainable_variables`); by default the batch's mean
    gradient, giving `P_n = g_n . mean` of the gradient tests. No per-example gradient is
    built by the layer-wise rules (see `tfmbgd.engine.forms.project`). Eager or in a `tf.function`."""
    m, project = measured_moments(model, loss_fn, x, y, method, elementwise=False)
    return project(m.mean if vectors is None else vectors)


def _refuse_batch_norm(model, method):
    """A `UserError` if `model` has BatchNormalization in training mode, which `method` (one
    of the per-example methods) cannot measure as the layer-wise rules do."""
    names = layerwise.batch_norms(model)
    if names:
        how = ("normalizes each example by itself" if method == "loop" else
               "differentiates each example's loss, which the whole batch's statistics shape")
        raise UserError(f"{', '.join(names)}: BatchNormalization in training mode mixes the examples of a "
                        f"batch, and method {method} {how}: not the examples' contributions that tfmbgd "
                        "measures for it; use method auto or layerwise, or freeze the layer "
                        "(trainable=False)")


def _refuse_vectorized(model):
    """A `UserError` for method "vectorized" on a model with attention layers. There
    `tf.vectorized_map` over single-example backprops has killed the process (SIGSEGV,
    SIGABRT: heap corruption inside TensorFlow's pfor, which no `except` can catch) on every
    model tried: Keras' MultiHeadAttention, KerasHub's GPT-2, BERT, Gemma and Llama. A
    process must not die under a user, so that path is not taken. ("jacobian", pfor over
    the backward pass only, ran on all of them.)"""
    names = [layer.name for layer in models.nested_layers(model) if "Attention" in type(layer).__name__]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{shown}: method vectorized (tf.vectorized_map) has crashed the process on "
                        "attention layers; use method auto (exact, one backward pass), jacobian or loop")


def micro_batches(n, size):
    """Static `(start, stop)` slices of `n` examples in micro-batches of `size` (last smaller)."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def accumulated_moments(model, loss_fn, x, y, micro_batch, method="auto", elementwise=True):
    """`gradient_moments` of the whole batch, computed one micro-batch at a time.

    For gradient accumulation: memory holds one micro-batch, the moments are exactly those
    of the whole batch (see `combine`). The batch size must be static.
    """
    parts = _one_after_another(lambda x, y: (gradient_moments(model, loss_fn, x, y, method, elementwise),),
                               x, y, micro_batch)
    return combine([m for m, in parts])


def _one_after_another(compute, x, y, size):
    """`compute(x_k, y_k)` of each micro-batch of `size` examples, in order, each after the
    previous one's moments (`compute` returns a tuple whose first item is the moments), so
    memory holds one micro-batch's work at a time."""
    parts, previous = [], []
    for start, stop in micro_batches(x.shape[0], size):
        with tf.control_dependencies(previous):
            part = compute(x[start:stop], y[start:stop])
        parts.append(part)
        previous = part[0].mean
    return parts


