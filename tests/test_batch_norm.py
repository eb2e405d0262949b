"""BatchNormalization in training mode, measured: each example's contribution, B times the
gradient of the batch's mean loss with respect to a copy of every variable used by that
example alone. The oracle builds those copies: a model written in TensorFlow ops whose every
variable has one copy per example, differentiated directly (no tfmbgd code)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmbgd import losses
from tfmbgd.engine import layerwise
from tfmbgd.engine.moments import gradient_moments
from tfmbgd.errors import UserError

EPSILON = 1e-3       # Keras' BatchNormalization default


def _model(conv):
    """Dense (or Conv2D) without bias -> BatchNormalization -> tanh -> Dense(2), in float64."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3, 3, 2) if conv else (4,))
        first = keras.layers.Conv2D(3, 2, use_bias=False) if conv else keras.layers.Dense(3, use_bias=False)
        h = first(inputs)
        h = keras.layers.Activation("tanh")(keras.layers.BatchNormalization(epsilon=EPSILON)(h))
        h = keras.layers.Flatten()(h) if conv else h
        return keras.Model(inputs, keras.layers.Dense(2)(h))
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def _contributions(model, x, y, conv):
    """The oracle: `[B, *shape]` contributions of every trainable variable, by copies."""
    b = len(x)
    weights = [v.numpy() for v in model.trainable_variables]       # kernel, gamma, beta, V, c
    copies = [tf.Variable(np.repeat(w[None], b, axis=0)) for w in weights]
    kernel, gamma, beta, v, c = copies
    with tf.GradientTape() as tape:
        if conv:     # a 2x2 VALID convolution of 3x3 images, each example with its own filter
            patches = tf.stack([tf.stack([x[:, i:i + 2, j:j + 2, :] for j in range(2)], 1)
                                for i in range(2)], 1)
            z = tf.einsum("nijpqc,npqco->nijo", patches, kernel)
            axes = [0, 1, 2]
        else:
            z = tf.einsum("nk,nkc->nc", x, kernel)
            axes = [0]
        mean = tf.reduce_mean(z, axes, keepdims=True)
        var = tf.reduce_mean(tf.square(z - mean), axes, keepdims=True)
        shape = [b] + [1] * (len(z.shape) - 2) + [3]
        h = tf.tanh((z - mean) / tf.sqrt(var + EPSILON) * tf.reshape(gamma, shape) + tf.reshape(beta, shape))
        h = tf.reshape(h, [b, -1])
        out = tf.einsum("nk,nko->no", h, v) + c
        loss = tf.reduce_mean(losses.crossentropy(y, out))
    return [b * g.numpy() for g in tape.gradient(loss, copies)]


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv2d"])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("batch", [5, 3], ids=["B=5", "B=channels"])     # 3 channels: no mix-up
def test_training_mode_batch_norm_gives_each_examples_contribution(conv, traced, batch):
    model = _model(conv)
    rng = np.random.default_rng(1)
    for var in model.trainable_variables:
        var.assign(rng.normal(size=var.shape))
    x = rng.normal(size=(batch, 3, 3, 2) if conv else (batch, 4))
    y = rng.integers(0, 2, batch).astype(np.int32)
    assert all(why is None for why in layerwise.coverage(model, x).values())
    moments = lambda x, y: gradient_moments(model, losses.crossentropy, x, y, method="auto")
    m = tf.function(moments)(x, y) if traced else moments(x, y)
    want = _contributions(model, x, y, conv)
    for got_mean, got_sq, got_norm, c in zip(m.mean, m.sum_sq, m.var_norms_sq, want):
        np.testing.assert_allclose(got_mean.numpy(), c.mean(axis=0), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(got_sq.numpy(), (c ** 2).sum(axis=0), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(got_norm.numpy(), (c.reshape(batch, -1) ** 2).sum(axis=1), rtol=1e-10,
                                   atol=1e-13)
    # their mean is the batch gradient, Keras' own
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.crossentropy(y, model(x, training=True)))
    for got, g in zip(m.mean, tape.gradient(loss, model.trainable_variables)):
        np.testing.assert_allclose(got.numpy(), g.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["loop", "vectorized", "jacobian"])
def test_the_per_example_methods_are_refused_with_the_reason(method):
    model = _model(conv=False)
    x, y = np.ones((4, 4)), np.zeros(4, np.int32)
    with pytest.raises(UserError, match=f"training mode mixes the examples.*method {method}"):
        gradient_moments(model, losses.crossentropy, x, y, method=method)


def test_a_frozen_batch_norm_is_exact_per_example_and_the_run_line_says_what_is_measured():
    model = _model(conv=False)
    cover = layerwise.coverage(model, np.ones((2, 4)))
    assert "each example's contribution" in layerwise.describe(cover, layerwise.batch_norms(model))
    model.layers[2].trainable = False          # inference mode: the moving statistics
    assert layerwise.batch_norms(model) == []
    x, y = np.random.default_rng(0).normal(size=(4, 4)), np.array([0, 1, 1, 0], np.int32)
    want = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    got = gradient_moments(model, losses.crossentropy, x, y, method="auto")
    for a, b in zip(got.var_norms_sq, want.var_norms_sq):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10)


# keras.applications networks with BatchNormalization in training mode (ResNet50,
# MobileNetV2, EfficientNetB0) against the per-example copies oracle: test_keras_models.py


class _HeldNorm(keras.layers.Layer):
    """A custom layer that holds its BatchNormalization as an attribute (as KerasHub blocks
    hold theirs): not in any `.layers` list."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return self.norm(self.dense(x), training=training)


def test_a_batch_norm_held_as_an_attribute_is_found_and_the_per_example_methods_refused():
    # Missed, the loop would have normalized each example by itself and called it a
    # per-example gradient.
    held = _HeldNorm()
    model = keras.Sequential([keras.Input((4,)), held, keras.layers.Dense(2)])
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 4)), tf.float32)
    y = tf.constant([0, 1, 1, 0, 1])
    assert layerwise.batch_norms(model) == [held.norm.name]
    with pytest.raises(UserError, match="BatchNormalization"):
        gradient_moments(model, losses.crossentropy, x, y, method="loop")
