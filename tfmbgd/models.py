"""Small Keras functional models with seeded initial weights.

Layers have fixed names (`hidden_1`, `conv_1`, `output`, ...), so a variable's
`variable.path` — and with it its TensorBoard tag — is the same in every run.
Classification models output logits; regression models one linear unit.
"""

import keras

from tfmbgd.errors import UserError, check_images


def build(name, input_shape, num_classes, hidden=(64,), seed=0, activation="relu"):
    """Builds `linear`, `mlp` or `cnn` for inputs of `input_shape`.

    Args:
      name: "linear" (one Dense layer: softmax or linear regression), "mlp" (Dense layers
        of widths `hidden`, then the output layer) or "cnn" (two 3x3 convolutions with
        max pooling, then a Dense output; needs image inputs `[height, width, channels]`).
      input_shape: shape of one example, e.g. `(8, 8, 1)`.
      num_classes: number of classes (logits out), or 0 for regression (one output).
      hidden: widths of the mlp's hidden layers.
      seed: seed of every initializer; the same seed gives the same initial weights.
      activation: activation of the hidden layers.

    Returns:
      A `keras.Model` whose variables already exist.

    Raises:
      UserError: an unknown name, or a cnn for inputs that are not images.
    """
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))
    init = lambda: dict(kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)))
    outputs = num_classes if num_classes else 1
    inputs = keras.Input(shape=tuple(input_shape), name="x")
    if name in ("linear", "mlp"):
        h = keras.layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
        for i, width in enumerate(hidden if name == "mlp" else ()):
            h = keras.layers.Dense(width, activation=activation, name=f"hidden_{i + 1}", **init())(h)
    elif name == "cnn":
        check_images(input_shape)
        h = inputs
        for i, filters in enumerate((8, 16)):
            h = keras.layers.Conv2D(filters, 3, padding="same", activation=activation,
                                    name=f"conv_{i + 1}", **init())(h)
            h = keras.layers.MaxPooling2D(2, name=f"pool_{i + 1}")(h)
        h = keras.layers.Flatten(name="flatten")(h)
    else:
        raise UserError(f"unknown model {name!r}: use linear, mlp or cnn")
    out = keras.layers.Dense(outputs, name="output", **init())(h)
    return keras.Model(inputs, out, name=name)


def nested_layers(model):
    """Every layer inside `model`, those held as attributes included (a KerasHub block's
    attention layer), by Keras' own traversal where it has one."""
    flatten = getattr(model, "_flatten_layers", None)
    return list(flatten(include_self=False, recursive=True)) if flatten else all_layers(model)


def all_layers(model):
    """Every layer of `model`, nested models' layers included (public API only)."""
    stack, seen = list(model.layers), []
    while stack:
        layer = stack.pop()
        seen.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return seen
