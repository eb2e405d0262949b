"""`keras.applications` networks of the Keras-models table (`benchmarks/keras_models.py`),
built from their constructors with random weights (nothing downloaded), 32x32x3 inputs and
10 classes, and the oracle for those with BatchNormalization in training mode.

The oracle is the definition of what tfmbgd measures there (README, "BatchNormalization"):
example n's contribution is B times the gradient of the batch's mean loss with respect to a
copy of every variable that example n alone uses. `contributions` builds exactly that model:
`keras.models.clone_model` replaces every layer that has trainable variables by `Copies`,
which holds one copy of each variable per example and runs the original layer on each
example with its own copy (`Layer.stateless_call`); BatchNormalization normalises by the
statistics of the whole batch, as in training, then scales and shifts each example by its
own copy of gamma and beta. One backward pass of that model gives every contribution. It
shares no code with tfmbgd.
"""

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

NAMES = ["VGG16", "ConvNeXtTiny", "ResNet50", "MobileNetV2", "EfficientNetB0"]


def build(name, size=32):
    common = dict(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None)
    constructor = getattr(keras.applications, name)
    extra = dict(ConvNeXtTiny=dict(include_preprocessing=False), MobileNetV2=dict(alpha=0.35)).get(name, {})
    model = constructor(**common, **extra)
    for layer in model.layers:          # EfficientNet's dropout and drop-connect: off, so that two
        if isinstance(layer, keras.layers.Dropout):       # forward passes compare
            layer.rate = 0.0
    return model


def make(name, batch=8, dtype="float32", seed=0, size=32):
    """`(model, x, y)`: the network `name` in `dtype`, a batch of uniform `size`x`size` images
    and labels."""
    keras.utils.set_random_seed(seed)
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        model = build(name, size)
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(batch, size, size, 3)).astype(dtype)
    return model, x, rng.integers(0, 10, batch).astype(np.int32)


class Copies(keras.layers.Layer):
    """`layer` with one copy of each of its trainable variables per example of a batch of `b`."""

    def __init__(self, layer, b):
        super().__init__(name=layer.name + "_copies", dtype=layer.dtype_policy)
        self.inner, self.b = layer, b
        self.copies = []
        for v in layer.trainable_variables:
            copy = self.add_weight(shape=(b, *v.shape), initializer="zeros", dtype=v.dtype)
            copy.assign(np.repeat(v.numpy()[None], b, axis=0))
            self.copies.append(copy)

    def compute_output_spec(self, x, training=None, mask=None):
        return self.inner.compute_output_spec(x)

    def call(self, x, training=None, mask=None):
        if isinstance(self.inner, keras.layers.BatchNormalization):
            bn, rank = self.inner, len(x.shape)
            axis = bn.axis % rank
            mean, var = tf.nn.moments(x, [i for i in range(rank) if i != axis], keepdims=True)
            h = (x - mean) / tf.sqrt(var + bn.epsilon)
            shape = [self.b] + [x.shape[i] if i == axis else 1 for i in range(1, rank)]
            copies = iter(self.copies)
            h = h * tf.reshape(next(copies), shape) if bn.scale else h
            return h + tf.reshape(next(copies), shape) if bn.center else h
        fixed = [v.value for v in self.inner.non_trainable_variables]
        return tf.concat([self.inner.stateless_call([c[n] for c in self.copies], fixed, x[n:n + 1])[0]
                          for n in range(self.b)], axis=0)


class Moments(NamedTuple):
    mean: list
    sum_sq: list
    var_norms_sq: list


def contributions(model, x, y, loss_fn):
    """Every trainable variable's `[B, *shape]` contributions (see the module), and their
    moments as a `Moments`."""
    b = len(x)
    made = []

    def copy(layer):
        if not layer.trainable_variables:
            return layer
        made.append(Copies(layer, b))
        return made[-1]
    twin = keras.models.clone_model(model, clone_function=copy)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(y, twin(x, training=True)))
    grads = iter(tape.gradient(loss, [c for layer in made for c in layer.copies]))
    by_path = {v.path: b * next(grads).numpy() for layer in made for v in layer.inner.trainable_variables}
    per_example = [by_path[v.path] for v in model.trainable_variables]
    return per_example, Moments([g.mean(0) for g in per_example], [(g ** 2).sum(0) for g in per_example],
                                [(g.reshape(b, -1) ** 2).sum(1) for g in per_example])
