"""The layer-wise rules on the models users bring (`tests/zoo.py`) and on every layer with a
rule, against the single-example loop and against per-example gradients derived by hand
in numpy."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_layerwise import in_dtype, linear_loss, make

import zoo
from tfmbgd import losses
from tfmbgd.engine import gradients, layerwise
from tfmbgd.engine.moments import gradient_moments

L = keras.layers


def assert_close(got, want, rtol):
    """Each moment within `rtol` of the oracle, relative to the largest value of that kind of
    moment over all variables (a gradient that is zero in exact arithmetic, such as that of
    attention's key bias, is round-off in both and is compared at that scale)."""
    for field in ("mean", "sum_sq", "var_norms_sq"):
        if getattr(got, field) is None:
            continue
        pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
                 for a, b in zip(getattr(got, field), getattr(want, field))]
        scale = max(np.abs(b).max() for _, b in pairs)
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=field)


@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise", "norms"])
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_matches_the_loop_eagerly(name, elementwise):
    model, x, y = zoo.make(name, batch=5)
    assert layerwise.coverage(model, x) == {v.path: None for v in model.trainable_variables}
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop", elementwise=elementwise)
    got = gradient_moments(model, losses.crossentropy, x, y, method="layerwise", elementwise=elementwise)
    assert_close(got, oracle, rtol=2e-4)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_matches_the_loop_inside_tf_function(name):
    model, x, y = zoo.make(name, batch=4)
    step = tf.function(lambda x, y: gradient_moments(model, losses.crossentropy, x, y, "auto", True))
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    assert_close(step(x, y), oracle, rtol=2e-4)


@pytest.mark.parametrize("name", ["transformer", "every_rule", "subclassed_mlp"])
def test_zoo_model_with_a_batch_size_known_only_at_run_time(name):
    # Keras' fit traces its step with an unknown batch size; so does an input signature.
    # Dense on sequences (Tensordot's merged rows) must not be taken for a batch then.
    model, x, y = zoo.make(name, batch=5)
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], tf.as_dtype(t.dtype)), x)
    step = tf.function(lambda x, y: gradient_moments(model, losses.crossentropy, x, y, "layerwise", True),
                       input_signature=[spec, tf.TensorSpec([None], tf.int32)])
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    assert_close(step(x, y), oracle, rtol=2e-4)


class MergedRows(L.Layer):
    """Scales the rows of [B, T, C] after merging them into [B*T, C]: with a batch size
    known only at run time the scan cannot tell those rows from examples."""

    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        rows = keras.ops.reshape(x, (-1, x.shape[-1])) * self.scale
        return keras.ops.reshape(rows, (-1, x.shape[1] * x.shape[2]))


def test_rows_taken_for_examples_fail_loudly_at_run_time():
    def build():
        inputs = keras.Input((3, 2))
        return keras.Model(inputs, L.Dense(3)(MergedRows()(inputs)))
    model, loss_fn, x, y = make(dict(build=build, loss="crossentropy"))
    scale = next(layer for layer in model.layers if isinstance(layer, MergedRows)).scale
    assert layerwise.coverage(model)[scale.path] is not None     # with a static batch size: seen
    signature = [tf.TensorSpec([None, 3, 2], tf.float64), tf.TensorSpec([None], tf.int32)]
    step = tf.function(lambda x, y: gradient_moments(model, loss_fn, x, y, "layerwise"),
                       input_signature=signature)
    with pytest.raises(tf.errors.InvalidArgumentError, match="is not the batch"):
        step(x, y)


def _float64(x):
    return tf.nest.map_structure(lambda t: t.astype(np.float64) if t.dtype.kind == "f" else t, x)


def test_every_rule_in_float64_to_round_off():
    model, x, y = in_dtype(lambda: zoo.make("every_rule", batch=4), "float64")
    x = _float64(x)
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    assert_close(gradient_moments(model, losses.crossentropy, x, y, method="layerwise"), oracle, rtol=1e-10)


@pytest.mark.parametrize("method", ["vectorized", "jacobian"])
def test_several_inputs_work_with_every_method(method):
    model, x, y = zoo.make("siamese", batch=4)
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    assert_close(gradient_moments(model, losses.crossentropy, x, y, method=method), oracle, rtol=2e-4)


def test_user_activation_and_custom_layer_take_the_rules():
    # zoo.Block owns a Dense with a lambda activation and a LayerNormalization; the nested
    # model also has a softmax activation written as a lambda.
    model, x, y = zoo.make("nested", batch=5)
    paths = [v.path for v in model.trainable_variables]
    assert any("/block" in p for p in paths), paths
    assert not any(layerwise.coverage(model).values())


@pytest.mark.parametrize("policy, name, rtol", [
    # bfloat16 keeps 8 significant bits (eps 2^-8 = 0.4%), float16 11 (0.05%); the
    # forward, the backward and the rule each round, so the tolerance is 8 eps.
    ("mixed_bfloat16", "mlp_gelu_silu", 8 * 2.0 ** -8),
    ("mixed_bfloat16", "transformer", 8 * 2.0 ** -8),
    ("mixed_float16", "mlp_gelu_silu", 8 * 2.0 ** -11),
    ("mixed_float16", "transformer", 8 * 2.0 ** -11),
])
def test_mixed_precision_moments_match_a_float32_oracle(policy, name, rtol):
    model, x, y = zoo.make(name, batch=6)
    weights = model.get_weights()
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixed, _, _ = zoo.make(name, batch=6)
        mixed.set_weights(weights)
        got = gradient_moments(mixed, losses.crossentropy, x, y, method="auto")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(m.dtype == tf.float32 for m in got.mean + got.sum_sq + got.var_norms_sq)
    assert_close(got, oracle, rtol=rtol)


# Each rule against per-example gradients from its definition, on one layer and the
# linear loss l_n = sum(y_n * z_n), whose gradient at the output z_n is y_n.

def numpy_conv(x, y, kernel, strides, dilation, pads, groups=1):
    """g[n, *o, c, k] = sum_p x_pad[n, p s + o d, c] y[n, p, k], channels in groups."""
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = y.shape[1:-1]
    c_in, c_out = x.shape[-1] // groups, y.shape[-1]
    g = np.zeros((x.shape[0], *kernel, c_in, c_out))
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = x[(slice(None),) + tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                                          for o, d, m, s in zip(offset, dilation, out, strides))]
        for k in range(c_out):
            group = k // (c_out // groups)
            part = window[..., group * c_in:(group + 1) * c_in].reshape(len(x), -1, c_in)
            per_k = y[..., k].reshape(len(x), -1)
            g[(slice(None), *offset, slice(None), k)] = np.einsum("npc,np->nc", part, per_k)
    return g


def numpy_depthwise(x, y, kernel, strides, pads, multiplier, dilation=None):
    """g[n, *o, c, m] = sum_p x_pad[n, p s + o d, c] y[n, p, c multiplier + m], any number of
    spatial axes."""
    dilation = dilation or (1,) * len(kernel)
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out, c = y.shape[1:-1], x.shape[-1]
    y = y.reshape(*y.shape[:-1], c, multiplier)
    g = np.zeros((x.shape[0], *kernel, c, multiplier))
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = x[(slice(None),) + tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                                          for o, d, n, s in zip(offset, dilation, out, strides))]
        g[(slice(None),) + offset] = np.einsum("npc,npcm->ncm", window.reshape(len(x), -1, c),
                                               y.reshape(len(x), -1, c, multiplier))
    return g


def numpy_conv_transpose(x, y, kernel, stride, pad_before):
    """z[n, p s + i - pad, q s + j - pad, o] += x[n, p, q, c] w[i, j, o, c]."""
    n, h, w, c = x.shape
    g = np.zeros((n, *kernel, y.shape[-1], c))
    for i, j, p, q in itertools.product(range(kernel[0]), range(kernel[1]), range(h), range(w)):
        r, s = p * stride + i - pad_before, q * stride + j - pad_before
        if 0 <= r < y.shape[1] and 0 <= s < y.shape[2]:
            g[:, i, j] += np.einsum("no,nc->noc", y[:, r, s], x[:, p, q])
    return g


def _norm(x, axes, eps):
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


def _single(layer, shape):
    def build():
        inputs = keras.Input(shape)
        return keras.Model(inputs, layer()(inputs))
    return build


def _group_norm_hat(x):      # GroupNormalization(groups=2) of [n, h, w, 4], eps 1e-3
    n, h, w, c = x.shape
    return _norm(x.reshape(n, h, w, 2, c // 2), (1, 2, 4), 1e-3).reshape(x.shape)


class ClassToken(L.Layer):
    """A learned token, tiled over the batch (and twice along the sequence) and put before
    the sequence: `Tile` of a variable."""

    def build(self, shape):
        self.token = self.add_weight(shape=(1, 1, shape[-1]), initializer="random_normal")

    def call(self, x):
        tokens = keras.ops.tile(self.token, [keras.ops.shape(x)[0], 2, 1])
        return keras.ops.concatenate([keras.ops.cast(tokens, x.dtype), x], axis=1)


RULE_CASES = [
    dict(id="conv1d_valid_stride2", shape=(9, 2), layer=lambda: L.Conv1D(3, 3, strides=2),
         want=lambda x, y: [numpy_conv(x, y, (3,), (2,), (1,), [(0, 0)]), y.sum(1)]),
    dict(id="conv1d_causal_dilation2", shape=(9, 2),
         layer=lambda: L.Conv1D(3, 3, padding="causal", dilation_rate=2),
         want=lambda x, y: [numpy_conv(x, y, (3,), (1,), (2,), [(4, 0)]), y.sum(1)]),
    dict(id="conv3d_same_stride_1x2x1", shape=(4, 5, 3, 2),
         layer=lambda: L.Conv3D(2, (2, 3, 2), strides=(1, 2, 1), padding="same"),
         want=lambda x, y: [numpy_conv(x, y, (2, 3, 2), (1, 2, 1), (1, 1, 1), [(0, 1), (1, 1), (0, 1)]),
                            y.sum((1, 2, 3))]),
    dict(id="conv1d_grouped_in_a_call", shape=(7, 4), layer=lambda: L.Conv1D(6, 3, groups=2),
         want=lambda x, y: [numpy_conv(x, y, (3,), (1,), (1,), [(0, 0)], groups=2), y.sum(1)]),
    dict(id="conv2d_grouped_same_stride2", shape=(5, 6, 4),
         layer=lambda: L.Conv2D(2, 3, strides=2, padding="same", groups=2),
         want=lambda x, y: [numpy_conv(x, y, (3, 3), (2, 2), (1, 1), [(1, 1), (0, 1)], groups=2),
                            y.sum((1, 2))]),
    dict(id="conv2d_groups_equal_channels", shape=(5, 5, 3),     # ConvNeXt's depthwise 7x7
         layer=lambda: L.Conv2D(3, 3, padding="same", groups=3),
         want=lambda x, y: [numpy_conv(x, y, (3, 3), (1, 1), (1, 1), [(1, 1), (1, 1)], groups=3),
                            y.sum((1, 2))]),
    dict(id="conv1d_groups_equal_channels_two_each", shape=(7, 3), layer=lambda: L.Conv1D(6, 3, groups=3),
         want=lambda x, y: [numpy_conv(x, y, (3,), (1,), (1,), [(0, 0)], groups=3), y.sum(1)]),
    dict(id="conv2d_groups_equal_channels_strided", shape=(6, 5, 2),
         layer=lambda: L.Conv2D(4, 3, strides=2, padding="same", groups=2),
         want=lambda x, y: [numpy_conv(x, y, (3, 3), (2, 2), (1, 1), [(0, 1), (1, 1)], groups=2),
                            y.sum((1, 2))]),
    dict(id="conv3d_grouped", shape=(3, 4, 3, 4), layer=lambda: L.Conv3D(4, 2, groups=2),
         want=lambda x, y: [numpy_conv(x, y, (2, 2, 2), (1, 1, 1), (1, 1, 1), [(0, 0)] * 3, groups=2),
                            y.sum((1, 2, 3))]),
    dict(id="class_token_tiled", shape=(3, 2), layer=lambda: ClassToken(),
         want=lambda x, y: [y[:, :2].sum(1)[:, None, None]]),
    dict(id="depthwise_same_stride2", shape=(6, 5, 2),
         layer=lambda: L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2),
         want=lambda x, y: [numpy_depthwise(x, y, (3, 3), (2, 2), [(0, 1), (1, 1)], 2), y.sum((1, 2))]),
    dict(id="depthwise_dilated_same", shape=(7, 6, 2),      # SpaceToBatchND, the op, BatchToSpaceND
         layer=lambda: L.DepthwiseConv2D((3, 2), dilation_rate=(2, 3), padding="same", depth_multiplier=2),
         want=lambda x, y: [numpy_depthwise(x, y, (3, 2), (1, 1), [(2, 2), (1, 2)], 2, (2, 3)),
                            y.sum((1, 2))]),
    dict(id="depthwise1d_dilated_valid", shape=(9, 3),
         layer=lambda: L.DepthwiseConv1D(3, dilation_rate=2),
         want=lambda x, y: [numpy_depthwise(x, y, (3,), (1,), [(0, 0)], 1, (2,)), y.sum(1)]),
    dict(id="depthwise1d_same_stride2", shape=(9, 3),
         layer=lambda: L.DepthwiseConv1D(3, strides=2, padding="same", depth_multiplier=2),
         want=lambda x, y: [numpy_depthwise(x, y, (3,), (2,), [(1, 1)], 2), y.sum(1)]),
    dict(id="conv2d_transpose_same_stride2", shape=(3, 4, 2),
         layer=lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same"),
         want=lambda x, y: [numpy_conv_transpose(x, y, (3, 3), 2, 0), y.sum((1, 2))]),
    dict(id="conv2d_transpose_valid", shape=(3, 4, 2), layer=lambda: L.Conv2DTranspose(3, (2, 3)),
         want=lambda x, y: [numpy_conv_transpose(x, y, (2, 3), 1, 0), y.sum((1, 2))]),
    dict(id="einsum_dense", shape=(4, 3),
         layer=lambda: L.EinsumDense("abc,cde->abde", output_shape=(4, 2, 2), bias_axes="de"),
         want=lambda x, y: [np.einsum("ntc,ntde->ncde", x, y), y.sum(1)]),
    dict(id="layer_normalization", shape=(4, 5), layer=lambda: L.LayerNormalization(),
         want=lambda x, y: [(y * _norm(x, -1, 1e-3)).sum(1), y.sum(1)]),
    dict(id="group_normalization", shape=(3, 2, 4), layer=lambda: L.GroupNormalization(groups=2),
         want=lambda x, y: [(y * _group_norm_hat(x)).sum((1, 2)), y.sum((1, 2))]),
    dict(id="rms_normalization", shape=(4, 5), layer=lambda: L.RMSNormalization(),
         want=lambda x, y: [(y * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)).sum(1)]),
]


@pytest.mark.parametrize("case", RULE_CASES, ids=[c["id"] for c in RULE_CASES])
def test_rule_matches_numpy_definition(case):
    model, loss_fn, x, y = make(dict(build=_single(case["layer"], case["shape"]), loss="linear"))
    assert loss_fn is linear_loss and not any(layerwise.coverage(model).values())
    want = case["want"](x.numpy(), y.numpy())
    m = gradient_moments(model, loss_fn, x, y, method="layerwise")
    for i, g in enumerate(want):
        flat = g.reshape(len(g), -1)
        np.testing.assert_allclose(m.mean[i].numpy(), g.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(m.sum_sq[i].numpy(), (g ** 2).sum(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(m.var_norms_sq[i].numpy(), (flat ** 2).sum(1), rtol=1e-9)


def test_tied_weights_sum_their_uses_before_squaring():
    # An embedding table used to embed and, transposed, to score (a gather and a MatMul):
    # per example the two uses' gradients add, and ||g1 + g2||^2 != ||g1||^2 + ||g2||^2.
    class Tied(keras.Model):
        def __init__(self):
            super().__init__()
            self.embed = L.Embedding(6, 3)

        def call(self, ids):
            h = keras.ops.mean(self.embed(ids), axis=1)
            return tf.matmul(keras.ops.tanh(h), self.embed.embeddings, transpose_b=True)

    model = in_dtype(Tied, "float64")
    ids = tf.constant(np.random.default_rng(1).integers(0, 6, size=(5, 4)).astype(np.int32))
    model(ids)
    y = tf.constant([0, 5, 2, 2, 1])
    oracle = gradient_moments(model, losses.crossentropy, ids, y, method="loop")
    got = gradient_moments(model, losses.crossentropy, ids, y, method="auto")
    assert layerwise.coverage(model, ids) == {model.embed.embeddings.path: None}
    assert_close(got, oracle, rtol=1e-10)


def test_a_call_that_is_not_one_convolution_is_named_and_takes_the_fallback():
    # Keras compiles grouped convolutions into a function call of their own. A dilated one
    # holds the dilation's SpaceToBatchND as well: the call rule does not read it, and
    # coverage says so. TensorFlow's pfor fails on that call's filter gradient; the
    # fallback's backward passes in a while loop do not.
    model, loss_fn, x, y = make(dict(build=_single(lambda: L.Conv1D(4, 3, groups=2, dilation_rate=2), (7, 2)),
                                     loss="linear"))
    cover = layerwise.coverage(model)
    kernel, bias = (v.path for v in model.trainable_variables)
    assert cover[kernel] == ("used by StatefulPartitionedCall: "
                             "a nested function call that is not one convolution")
    assert cover[bias] is None
    assert layerwise.describe(cover).endswith(
        f"exact per-example fallback (B backward passes, not vectorized) for {kernel} ({cover[kernel]})")
    oracle = gradient_moments(model, loss_fn, x, y, method="loop")
    assert_close(gradient_moments(model, loss_fn, x, y, method="auto"), oracle, rtol=1e-10)
    assert_close(tf.function(lambda x, y: gradient_moments(model, loss_fn, x, y, method="auto"))(x, y),
                 oracle, rtol=1e-10)


def test_example_gradients_take_a_dict_of_inputs():
    model, x, y = zoo.make("siamese", batch=3)
    first = {k: v[0] for k, v in x.items()}
    loss, _, grads = gradients.example_gradients(model, losses.crossentropy, first, y[0])
    assert np.isfinite(loss.numpy()) and len(grads) == len(model.trainable_variables)


class Divide(L.Layer):
    """x / s: the variable reaches the model through RealDiv, which has no rule of its own."""

    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x / self.scale


def test_a_registered_rule_extends_the_fast_path(monkeypatch):
    from tfmbgd.engine import rules
    from tfmbgd.engine.forms import Explicit

    def real_div(op, operand, ctx):
        # z = x / s: dz/ds = -x / s^2, summed per example over the positions s is broadcast to
        if operand != 1 or op.inputs[1].shape.rank != 1 or op.outputs[0].shape[0] != ctx.batch:
            return "not a division of examples by a vector"
        x, s = (tf.cast(t, ctx.dtype) for t in op.inputs)
        return rules.Pending(Explicit, lambda dz: Explicit(-tf.cast(dz, ctx.dtype) * x / (s * s)))

    def build():
        inputs = keras.Input((4,))
        return keras.Model(inputs, L.Dense(3)(Divide()(inputs)))
    model, loss_fn, x, y = make(dict(build=build, loss="crossentropy"))
    scale = model.layers[1].scale.path
    assert "RealDiv" in layerwise.coverage(model)[scale]
    monkeypatch.setitem(rules.RULES, "RealDiv", None)       # restored after the test
    rules.register("RealDiv", real_div)
    assert not any(layerwise.coverage(model).values())
    oracle = gradient_moments(model, loss_fn, x, y, method="loop")
    assert_close(gradient_moments(model, loss_fn, x, y, method="layerwise"), oracle, rtol=1e-10)
