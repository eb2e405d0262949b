"""The models Keras users load, against independent oracles: every `keras.applications`
network of the Keras-models table (`benchmarks/keras_models.py`), eagerly and inside a
`tf.function`. Every variable takes a rule (no fallback).

- Without BatchNormalization (VGG16, ConvNeXtTiny): the single-example loop, float32 to
  round-off; VGG16 in float64 to 1e-10 (grouped convolutions and LayerNormalization,
  ConvNeXt's, are checked in float64 one layer at a time in test_zoo's rule cases).
- With BatchNormalization in training mode (ResNet50, MobileNetV2, EfficientNetB0): the
  model with a copy of every variable per example (`applications.contributions`);
  MobileNetV2 in float64 to 1e-10. In float32 these deep networks at random initialisation
  amplify round-off (ResNet50 at B=8: the oracle itself, computed in float32, is about 1e-2
  from its float64 value), so float32 is checked against the float64 answer, within a few
  times the float32 oracle's own distance to it.

KerasHub's transformers: `test_fallback.py` (a child process, float32, eagerly and in
`tf.function`) and GPT-2 in float64 here.
"""

import applications
import keras
import keras_hub_models
import numpy as np
import pytest
import tensorflow as tf

from tfmbgd import losses
from tfmbgd.engine import layerwise
from tfmbgd.engine.moments import gradient_moments

ROUND_OFF = {"float32": 2e-5, "float64": 1e-10}     # relative to the largest value of each kind
WITHOUT_BATCH_NORM, WITH_BATCH_NORM = ["VGG16", "ConvNeXtTiny"], ["ResNet50", "MobileNetV2", "EfficientNetB0"]


def _measured(model, x, y, traced=True):
    """The moments by method "auto", eagerly and (with `traced`) in a user's `tf.function`;
    and that every variable took a rule."""
    moments = lambda x, y: gradient_moments(model, losses.crossentropy, x, y, method="auto")
    out = [moments(x, y)]
    assert not any(layerwise.traced_coverage(model).values())    # every variable by a rule
    if traced:
        out.append(tf.function(moments)(tf.constant(x), tf.constant(y)))
    return out


@pytest.mark.slow         # about a minute on 2 cores
@pytest.mark.parametrize("name", WITHOUT_BATCH_NORM)
def test_networks_without_batch_norm_match_the_loop_eagerly_and_in_tf_function(name):
    model, x, y = applications.make(name, batch=3)
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    for got in _measured(model, x, y):
        assert keras_hub_models.largest_difference(got, oracle) <= ROUND_OFF["float32"]


@pytest.mark.slow
def test_vgg16_matches_the_loop_in_float64():
    model, x, y = applications.make("VGG16", batch=3, dtype="float64")
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    for got in _measured(model, x, y, traced=False):
        assert keras_hub_models.largest_difference(got, oracle) <= ROUND_OFF["float64"]


def _truth(name, batch=8):
    """The float64 network `name`, its batch, and its contributions by the copies oracle."""
    exact, x, y = applications.make(name, batch=batch, dtype="float64")
    return exact, x, y, applications.contributions(exact, x, y, losses.crossentropy)[1]


@pytest.mark.slow         # about two and a half minutes on 2 cores
@pytest.mark.parametrize("name", WITH_BATCH_NORM)
def test_batch_norm_networks_in_float32_are_as_close_to_the_copies_oracle_as_float32_can_be(name):
    exact, x, y, truth = _truth(name)
    model, x32, _ = applications.make(name, batch=8)
    model.set_weights([w.astype(np.float32) for w in exact.get_weights()])
    oracle32 = applications.contributions(model, x32, y, losses.crossentropy)[1]
    own = keras_hub_models.largest_difference(oracle32, truth)      # float32's own round-off here
    for got in _measured(model, x32, y):
        assert keras_hub_models.largest_difference(got, truth) <= max(ROUND_OFF["float32"], 5 * own)


@pytest.mark.slow
def test_a_batch_norm_network_gives_the_copies_oracles_contributions_in_float64():
    exact, x, y, truth = _truth("MobileNetV2")
    for got in _measured(exact, x, y, traced=False):
        assert keras_hub_models.largest_difference(got, truth) <= ROUND_OFF["float64"]


def test_the_copies_oracle_is_the_per_example_gradient_without_batch_norm():
    # The oracle itself, where the answer is known: with nothing that mixes the examples, a
    # copy per example gives each example's own gradient, the single-example loop's.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, activation="tanh")(inputs)
    h = keras.layers.LayerNormalization()(keras.layers.DepthwiseConv2D(2)(h))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 6, 6, 2)).astype(np.float32), np.array([0, 3, 1], np.int32)
    per_example, _ = applications.contributions(model, x, y, losses.crossentropy)
    for n in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(losses.crossentropy(y[n:n + 1], model(x[n:n + 1], training=True)))
        for g, want in zip(per_example, tape.gradient(loss, model.trainable_variables)):
            np.testing.assert_allclose(g[n], want.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_keras_hub_transformer_matches_the_loop_in_float64():
    # GPT-2 computes in the policy's dtype throughout (Gemma and Llama compute their norms
    # and rotary embeddings in float32 whatever the policy: 1e-8 there is float32 round-off)
    from test_layerwise import in_dtype
    model, x, y = in_dtype(lambda: keras_hub_models.make("gpt2"), "float64")
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    for got in _measured(model, x, y, traced=False):
        assert keras_hub_models.largest_difference(got, oracle) <= ROUND_OFF["float64"]
