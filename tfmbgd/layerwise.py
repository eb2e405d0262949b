"""`method="layerwise"` and `"auto"`: gradient moments from one ordinary backward pass.

How the layer inputs and output gradients are obtained. For a functional or Sequential
model, a second `keras.Model(model.inputs, [l.input ...] + [l.output ...] + model.outputs)`
is built once per model (and cached). It shares the model's layers and variables, so
calling it computes exactly what the model computes, and it also returns each supported
layer's input `a` and output `h`. One tape over that call differentiates the mean loss with
respect to the variables *and* the outputs `h`: one backward pass gives the batch gradient
and every `dL/dh`. Dense and Conv2D fuse their activation, so the gradient at the
pre-activation is `dL/dh * act'(z)`; for linear, relu, tanh and sigmoid it follows from
`h` by the same ops TensorFlow's own gradients use, so no layer is changed or re-run.

Rules that build per-example gradients anyway (Conv2D; Dense on sequences, see
`rules.dense_sums`) return their sum, which is the batch gradient of those variables. The
backward pass then leaves those variables out: a convolution's filter gradient, as costly
as the per-example gradients, is never computed (TensorFlow prunes the unused op).

Layers without a rule, layers called more than once, and every layer of a subclassed model
(which has no graph to tap) take the exact fallback: per-example gradients by
`tf.vectorized_map`, for their variables only. Extend the registry with `register`.
"""

import weakref
from typing import Callable, NamedTuple

import keras
import tensorflow as tf

from tfmbgd import gradients, rules
from tfmbgd.errors import UserError


def _backprop_activation(activation):
    """`(dL/dh, h) -> dL/dz` for `h = act(z)`, computed from the output h, or None.

    These are the very ops TensorFlow's own gradients of relu, tanh and sigmoid use (they
    too read the output), so the result equals what the backward pass computed inside
    the layer; each is one fused kernel.
    """
    table = {
        keras.activations.linear: lambda dh, h: dh,
        keras.activations.relu: lambda dh, h: tf.raw_ops.ReluGrad(gradients=dh, features=h),
        keras.activations.tanh: lambda dh, h: tf.raw_ops.TanhGrad(y=h, dy=dh),
        keras.activations.sigmoid: lambda dh, h: tf.raw_ops.SigmoidGrad(y=h, dy=dh),
    }
    return table.get(activation)


class Rule(NamedTuple):
    check: Callable      # layer -> None if the rule applies, else a short reason
    moments: Callable    # (layer, a, delta, elementwise) -> [(sum_sq | None, norms_sq[, grad_sum])]
    sums: Callable | None = None   # (layer, a, elementwise) -> whether moments gives grad_sum


def _dense_check(layer):
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return "LoRA or quantized"
    return None if _backprop_activation(layer.activation) else "activation"


def _conv_check(layer):
    if layer.data_format != "channels_last" or layer.groups != 1:
        return "channels_first or grouped"
    if layer.padding not in ("valid", "same") or getattr(layer, "lora_enabled", False):
        return "padding or LoRA"
    if None in tuple(layer.input.shape[1:3]) + tuple(layer.output.shape[1:3]):
        return "spatial size unknown until run time"
    return None if _backprop_activation(layer.activation) else "activation"


def _embedding_check(layer):
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return "LoRA or quantized"
    return None


RULES = {
    keras.layers.Dense: Rule(_dense_check, rules.dense, rules.dense_sums),
    keras.layers.Conv2D: Rule(_conv_check, rules.conv2d, rules.conv2d_sums),
    keras.layers.Embedding: Rule(_embedding_check, rules.embedding),
}


def register(layer_class, check, moments, sums=None):
    """Adds a rule for `layer_class` (exact type; subclasses may compute something else).

    `moments(layer, a, delta, elementwise)` returns per variable `(sum_sq, norms_sq)`, see
    `tfmbgd.rules`; when `sums(layer, a, elementwise)` is true it returns
    `(sum_sq, norms_sq, grad_sum)` for every variable of the layer instead, and the
    backward pass skips them.
    """
    RULES[layer_class] = Rule(check, moments, sums)


class Tap(NamedTuple):
    layer: keras.layers.Layer
    rule: Rule
    indices: list        # positions of the layer's variables in model.trainable_variables


class Plan(NamedTuple):
    """What the layer-wise method does for one model."""

    probe: keras.Model | None     # returns taps' inputs, taps' outputs, model outputs
    taps: list                    # [Tap]
    fallback: list                # indices of variables without a rule
    reasons: dict                 # layer name -> why it takes the fallback


_PLANS = weakref.WeakKeyDictionary()


def _tap_moments(tap, a, h, dh, b, elementwise):
    """The rule's moments for one layer, from its input, output and output gradient:
    per variable `(sum_sq, norms_sq, mean)`, `mean` None unless the rule gives sums.

    `dh` is the gradient of the *mean* loss; through the activation (from h) it becomes
    `delta / B`, where `delta` is the gradient of the summed loss at the pre-activation
    that the rules expect. A rule's moments are squares of per-example gradients, which are
    linear in `delta`, so `moments(B * d) = B^2 * moments(d)` exactly. The factor is applied
    where it is cheaper: to the `[B]` norms (and `sum_sq`), or, when the elementwise sums
    are larger than the layer's output, to `delta` itself. For a convolution the output is
    far larger than the kernel, so this saves a pass over it. Sums are linear in `delta`:
    `sum(delta / B)` is the mean itself, `sum(delta)` is B times it.
    """
    backprop = _backprop_activation(getattr(tap.layer, "activation", keras.activations.linear))
    delta = backprop(dh, h)
    b = float(b) if isinstance(b, int) else tf.cast(b, dh.dtype)
    params = sum(v.shape.num_elements() for v in tap.layer.trainable_variables)
    per_example = delta.shape[1:].num_elements()       # None if unknown until run time
    scale_delta = elementwise and per_example is not None and per_example < params
    b2, out = b * b, []
    for sum_sq, norms_sq, *grad_sum in tap.rule.moments(tap.layer, a, delta * b if scale_delta else delta,
                                                         elementwise):
        grad_sum = grad_sum[0] if grad_sum else None        # rules without sums give pairs
        if scale_delta:
            out.append((sum_sq, norms_sq, None if grad_sum is None else grad_sum / b))
        else:
            out.append((None if sum_sq is None else sum_sq * b2, norms_sq * b2, grad_sum))
    return out


def plan(model):
    """The (cached) `Plan` for `model`."""
    if model not in _PLANS:
        _PLANS[model] = _make_plan(model)
    return _PLANS[model]


def _calls_per_layer(model):
    """How often each layer of a functional/Sequential model is called, or None."""
    if isinstance(model, keras.Sequential):
        names = [layer.name for layer in model.layers]
        return {name: names.count(name) for name in names}
    try:
        config = model.get_config()
        return {entry["name"]: len(entry["inbound_nodes"]) for entry in config["layers"]}
    except Exception:   # custom layers that cannot serialize: no graph to trust
        return None


def _make_plan(model):
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    # Functional and Sequential models have symbolic inputs and outputs; subclassed do not.
    is_graph = getattr(model, "inputs", None) is not None and getattr(model, "outputs", None) is not None
    calls = _calls_per_layer(model) if is_graph else None
    taps, reasons = [], {}
    for layer in model.layers if calls else ():
        rule = RULES.get(type(layer))
        if not layer.trainable_variables:
            continue
        why = "no rule" if rule is None else rule.check(layer)
        if why is None and calls.get(layer.name) != 1:
            why = "called more than once"
        if why is None:
            taps.append(Tap(layer, rule, [index[id(v)] for v in layer.trainable_variables]))
        else:
            reasons[layer.name] = why
    if not is_graph:
        reasons[model.name] = "subclassed model: no graph to tap"
    covered = {i for tap in taps for i in tap.indices}
    fallback = [i for i in range(len(model.trainable_variables)) if i not in covered]
    probe = None
    if taps:
        probe = keras.Model(model.inputs, [t.layer.input for t in taps] +
                            [t.layer.output for t in taps] + list(model.outputs))
    return Plan(probe, taps, fallback, reasons)


def moments(model, loss_fn, x, y, elementwise=True, strict=False):
    """Gradient moments by the layer-wise rules, with the exact fallback for the rest.

    Returns the fields of `tfmbgd.moments.GradientMoments` as a dict.

    Raises:
      UserError: `strict` (method "layerwise") and some variable has no rule.
    """
    p = plan(model)
    if strict and p.fallback:
        raise UserError("method layerwise has no rule for: "
                        + ", ".join(f"{name} ({why})" for name, why in p.reasons.items())
                        + "; use method auto to take the exact fallback for them")
    if not p.taps:
        return None
    variables = model.trainable_variables
    k = len(p.taps)
    with tf.GradientTape() as tape:
        results = p.probe(x, training=True)
        outputs = results[2 * k] if len(results) == 2 * k + 1 else results[2 * k:]
        losses = loss_fn(y, outputs)
        loss = tf.reduce_mean(losses)
    inputs, hidden = results[:k], results[k:2 * k]
    # Variables whose rule sums the per-example gradients it builds: not differentiated.
    summed = {i for tap, a in zip(p.taps, inputs)
              if tap.rule.sums is not None and tap.rule.sums(tap.layer, a, elementwise) for i in tap.indices}
    asked = [variables[i] for i in range(len(variables)) if i not in summed]
    grads = tape.gradient(loss, asked + list(hidden))
    from_tape = iter(gradients.dense_gradients(asked, grads[:len(asked)]))
    mean = [None if i in summed else next(from_tape) for i in range(len(variables))]
    b = losses.shape[0] if losses.shape[0] is not None else tf.shape(losses)[0]
    sum_sq = [None] * len(variables)
    norms = [None] * len(variables)
    for tap, a, h, dh in zip(p.taps, inputs, hidden, grads[len(asked):]):
        for i, (sq, nsq, tap_mean) in zip(tap.indices, _tap_moments(tap, a, h, dh, b, elementwise)):
            sum_sq[i], norms[i] = sq, nsq
            if i in summed:
                if tap_mean is None:
                    raise ValueError(f"the rule for {type(tap.layer).__name__} said it sums the "
                                     "per-example gradients but returned no sum")
                mean[i] = tap_mean
    if p.fallback:
        rest = [variables[i] for i in p.fallback]
        per_ex = gradients.per_example(model, loss_fn, x, y, "vectorized", variables=rest)
        for i, g in zip(p.fallback, per_ex.gradients):
            squares = tf.square(g)
            norms[i] = tf.reduce_sum(tf.reshape(squares, [b, -1]), axis=1)
            sum_sq[i] = tf.reduce_sum(squares, axis=0) if elementwise else None
    return dict(mean=mean, sum_sq=sum_sq if elementwise else None, var_norms_sq=norms,
                losses=losses, outputs=outputs)
