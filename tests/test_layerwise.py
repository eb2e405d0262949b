"""Layer-wise and auto moments against the single-example loop and hand-derived numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmbgd.engine import layerwise
from tfmbgd.engine.moments import gradient_moments
from tfmbgd.errors import UserError


def linear_loss(y, z):
    """l_n = sum(y_n * z_n): its gradient at the output z_n is y_n itself."""
    return tf.reduce_sum(tf.reshape(y * z, [tf.shape(z)[0], -1]), axis=1)


def crossentropy(y, z):
    return keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True)


def _conv(strides=1, padding="valid", dilation=1, activation=None, bias=True, channels=2):
    def build():
        inputs = keras.Input((7, 6, channels))
        z = keras.layers.Conv2D(3, (3, 2), strides=strides, padding=padding, dilation_rate=dilation,
                                activation=activation, use_bias=bias)(inputs)
        return keras.Model(inputs, z)
    return build


def _dense3d(activation=None):
    def build():
        inputs = keras.Input((4, 5))
        return keras.Model(inputs, keras.layers.Dense(3, activation=activation)(inputs))
    return build


def _embedding():
    inputs = keras.Input((6,), dtype="int32")
    return keras.Model(inputs, keras.layers.Embedding(7, 3)(inputs))


def _mlp(activation):
    def build():
        inputs = keras.Input((5,))
        h = keras.layers.Dense(6, activation=activation)(inputs)
        h = keras.layers.Dense(4, activation=activation)(h)
        return keras.Model(inputs, keras.layers.Dense(3)(h))
    return build


def _cnn():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(5, 3, strides=2, activation="tanh")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _text():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(9, 4)(inputs)
    h = keras.layers.Dense(3, activation="sigmoid")(h)      # Dense on a sequence
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _rand_ids(vocab, shape):
    return lambda rng: rng.integers(0, vocab, size=shape).astype(np.int32)


PROBLEMS = [
    dict(id="conv_valid", build=_conv(), loss="linear"),
    dict(id="conv_same_stride2", build=_conv(strides=2, padding="same"), loss="linear"),
    dict(id="conv_valid_stride_2x1", build=_conv(strides=(2, 1)), loss="linear"),
    dict(id="conv_same_dilation2", build=_conv(padding="same", dilation=2), loss="linear"),
    dict(id="conv_valid_dilation_1x2_nobias", build=_conv(dilation=(1, 2), bias=False), loss="linear"),
    dict(id="conv_relu", build=_conv(padding="same", activation="relu"), loss="linear"),
    dict(id="conv_one_channel_same_stride2", build=_conv(strides=2, padding="same", channels=1),
         loss="linear"),
    dict(id="dense_3d", build=_dense3d(), loss="linear"),
    dict(id="dense_3d_tanh", build=_dense3d("tanh"), loss="linear"),
    dict(id="embedding", build=_embedding, loss="linear", x=_rand_ids(7, (5, 6))),
    dict(id="mlp_relu", build=_mlp("relu"), loss="crossentropy"),
    dict(id="mlp_tanh", build=_mlp("tanh"), loss="crossentropy"),
    dict(id="mlp_sigmoid", build=_mlp("sigmoid"), loss="crossentropy"),
    dict(id="cnn", build=_cnn, loss="crossentropy"),
    dict(id="embedding_dense_seq", build=_text, loss="crossentropy", x=_rand_ids(9, (5, 5))),
]


SPEC = {p["id"]: p for p in PROBLEMS}


def in_dtype(build, dtype):
    """Builds a model with every layer in `dtype` (Keras' global floatx and dtype policy)."""
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        return build()
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def make(spec, batch=5, seed=0, dtype="float64"):
    keras.utils.set_random_seed(seed)
    model = in_dtype(spec["build"], dtype)
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:      # non-zero biases, so no unit is trivially dead
        v.assign(rng.normal(scale=0.5, size=v.shape))
    x = spec.get("x", lambda r: r.normal(size=(batch,) + tuple(model.inputs[0].shape[1:])))(rng)
    x = tf.constant(x if x.dtype.kind == "i" else x.astype(dtype))
    if spec["loss"] == "linear":
        y = tf.constant(rng.normal(size=(batch,) + tuple(model.outputs[0].shape[1:])).astype(dtype))
        return model, linear_loss, x, y
    return model, crossentropy, x, tf.constant(rng.integers(0, 3, size=batch).astype(np.int32))


def assert_moments_close(m, oracle, rtol):
    """Each moment within rtol of the oracle, relative to the largest entry of the tensor."""
    pairs = list(zip(m.mean, oracle.mean)) + list(zip(m.var_norms_sq, oracle.var_norms_sq))
    if m.sum_sq is not None:
        pairs += list(zip(m.sum_sq, oracle.sum_sq))
    for got, want in pairs:
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise", "norms"])
@pytest.mark.parametrize("spec", PROBLEMS, ids=[p["id"] for p in PROBLEMS])
def test_layerwise_matches_loop_oracle(spec, elementwise):
    model, loss_fn, x, y = make(spec)
    oracle = gradient_moments(model, loss_fn, x, y, method="loop", elementwise=elementwise)
    got = gradient_moments(model, loss_fn, x, y, method="layerwise", elementwise=elementwise)
    assert not any(layerwise.coverage(model).values())
    assert (got.sum_sq is None) == (not elementwise)
    assert_moments_close(got, oracle, rtol=1e-10)
    np.testing.assert_allclose(got.losses.numpy(), oracle.losses.numpy(), rtol=1e-12)


class ExpScale(keras.layers.Layer):
    """x * exp(s): its variable reaches the model through Exp, an op without a rule."""

    def build(self, shape):
        self.log_scale = self.add_weight(shape=(shape[-1],), initializer="zeros")

    def call(self, x):
        return x * keras.ops.exp(self.log_scale)


def _with_unsupported_layer():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, activation="gelu")(inputs)
    h = ExpScale()(h)                                             # no rule
    return keras.Model(inputs, keras.layers.Dense(3, activation="relu")(h))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def _shared_layer():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh")
    return keras.Model(inputs, keras.layers.Dense(3)(shared(shared(inputs))))


FALLBACK = [
    dict(id="unsupported_layers", build=_with_unsupported_layer, loss="crossentropy", slow=["exp_scale"]),
    dict(id="shared_layer", build=_shared_layer, loss="crossentropy", slow=[]),
    dict(id="sequential", loss="crossentropy", slow=[], build=lambda: keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])),
]


@pytest.mark.parametrize("spec", FALLBACK, ids=[p["id"] for p in FALLBACK])
def test_auto_takes_the_exact_fallback_only_where_no_rule_applies(spec):
    model, loss_fn, x, y = make(spec)
    oracle = gradient_moments(model, loss_fn, x, y, method="loop")
    got = gradient_moments(model, loss_fn, x, y, method="auto")
    slow = {path: why for path, why in layerwise.coverage(model).items() if why}
    assert sorted(path.split("/")[0] for path in slow) == spec["slow"]
    assert all("Exp" in why for why in slow.values())
    assert_moments_close(got, oracle, rtol=1e-10)
    if slow:
        with pytest.raises(UserError, match="use method auto"):
            gradient_moments(model, loss_fn, x, y, method="layerwise")


def test_choices_name_each_variables_form_and_the_fallbacks_reason():
    # One line per variable: the op, the form the statistics step uses, and whether the
    # backward pass leaves the variable's batch gradient out (its per-example gradients sum
    # to it). Checked against what the step does: the fallback's reason is coverage's.
    ids = keras.Input((3,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(7, 4)(ids))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(5, activation="tanh")(h))
    h = ExpScale()(keras.layers.Dense(4)(h))                  # no rule: the fallback
    model = keras.Model(ids, keras.layers.Dense(2)(h))
    said = layerwise.choices(model)
    paths = [v.path for v in model.trainable_variables]
    assert list(said) == paths
    embed, kernel, bias, gamma, beta = (said[p] for p in paths[:5])
    assert embed.startswith("GatherV2: gathered rows") and "leaves out" not in embed
    assert kernel == "MatMul: outer product a_n^T d_n: norms ||a_n||^2 ||d_n||^2"
    assert bias.startswith("BiasAdd: per-example gradients")
    assert bias.endswith("the backward pass leaves out its batch gradient")
    assert "through Mul" in gamma and "through Sub" in beta
    fallback = {p: why for p, why in layerwise.coverage(model).items() if why}
    assert fallback and all(said[p] == f"fallback, B backward passes: {why}" for p, why in fallback.items())


def test_subclassed_model_takes_the_rules():
    model = in_dtype(Subclassed, "float64")
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 5)))
    model(x)
    y = tf.constant([0, 1, 2, 1, 0])
    oracle = gradient_moments(model, crossentropy, x, y, method="loop")
    got = gradient_moments(model, crossentropy, x, y, method="layerwise")
    assert layerwise.coverage(model, x) == {v.path: None for v in model.trainable_variables}
    assert_moments_close(got, oracle, rtol=1e-10)
    with pytest.raises(UserError, match="pass a batch"):
        layerwise.coverage(model)


def test_layerwise_inside_tf_function_float32():
    model, loss_fn, x, y = make(SPEC["cnn"], batch=8, dtype="float32")
    fn = tf.function(lambda a, b: gradient_moments(model, loss_fn, a, b, method="auto"))
    got = fn(x, y)
    oracle = gradient_moments(model, loss_fn, x, y, method="loop")
    assert_moments_close(got, oracle, rtol=2e-4)


def test_batch_normalization_is_measured_by_the_rules_and_refused_by_the_per_example_methods():
    # (what is measured, against its oracle: test_batch_norm.py)
    inputs = keras.Input((4,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, h)
    x, y = tf.random.normal((4, 4), seed=1), tf.constant([0, 1, 2, 0])
    m = gradient_moments(model, crossentropy, x, y, method="auto")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(crossentropy(y, model(x, training=True)))
    for got, want in zip(m.mean, tape.gradient(loss, model.trainable_variables)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="BatchNormalization"):
        gradient_moments(model, crossentropy, x, y, method="vectorized")
