"""The per-op rules (`tfmbgd.engine.rules`), one op family at a time, against numpy maths
derived by hand: convolutions (matmul by offset), matrix products on sequences, gathers
(Embedding), the Dense kernels and biases of an MLP; and the convolution rule leaving the
filter gradient out of the backward pass. (Moved from test_layerwise.py, which checks the
method as a whole against the single-example loop.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_layerwise import PROBLEMS, SPEC, make

from tfmbgd import stats
from tfmbgd.engine import forms, layerwise, rules
from tfmbgd.engine.moments import gradient_moments


def numpy_conv_per_example(x, y, kernel_shape, strides, padding, dilation):
    """Per-example Conv2D kernel gradients of sum(y * conv(x)) by the definition:
    g[n, i, j, c, o] = sum_{p, q} x_pad[n, p s_h + i d_h, q s_w + j d_w, c] * y[n, p, q, o]."""
    (kh, kw, _, _), (sh, sw), (dh, dw) = kernel_shape, strides, dilation
    n, h, w, _ = x.shape
    _, oh, ow, _ = y.shape
    if padding == "same":        # TensorFlow's SAME: the extra row/column goes at the end
        ph = max((oh - 1) * sh + (kh - 1) * dh + 1 - h, 0)
        pw = max((ow - 1) * sw + (kw - 1) * dw + 1 - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    g = np.zeros((n,) + tuple(kernel_shape))
    for i in range(kh):
        for j in range(kw):
            window = x[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :]
            g[:, i, j] = np.einsum("npqc,npqo->nco", window, y)
    return g



CONV_CASES = [p for p in PROBLEMS if p["id"].startswith("conv_") and p["id"] != "conv_relu"]


@pytest.mark.parametrize("spec", CONV_CASES, ids=[p["id"] for p in CONV_CASES])
def test_conv2d_matches_numpy_definition(spec):
    model, loss_fn, x, y = make(spec)
    conv = model.layers[1]
    g = numpy_conv_per_example(x.numpy(), y.numpy(), conv.kernel.shape, conv.strides, conv.padding,
                               conv.dilation_rate)
    m = gradient_moments(model, loss_fn, x, y, method="layerwise")
    np.testing.assert_allclose(m.mean[0].numpy(), g.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(m.sum_sq[0].numpy(), (g ** 2).sum(axis=0), rtol=1e-10)
    np.testing.assert_allclose(m.var_norms_sq[0].numpy(), (g ** 2).sum(axis=(1, 2, 3, 4)), rtol=1e-10)
    np.testing.assert_allclose(stats.variance(m)[0].numpy(), np.var(g, axis=0, ddof=1), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("steps", [4, 2], ids=["per_example_built", "gram"])
@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise", "norms"])
def test_dense_on_sequences_matches_numpy(steps, elementwise):
    # Input (steps, 6), Dense(3): with T = 2, 4 T^2 < 6 * 3: the Gram identity for the norms
    # and cross terms for the elementwise sums (the batch gradient then comes from the
    # backward pass); with T = 4 the rule builds the per-example gradients and their sum
    # is the batch gradient.
    def build():
        inputs = keras.Input((steps, 6))
        return keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model, loss_fn, x, y = make(dict(SPEC["dense_3d"], build=build))
    crossed = steps <= forms.CROSS_TERMS
    assert forms.builds(steps, 6, 3, elementwise) == (steps == 4 or elementwise and not crossed)
    g = np.einsum("nti,nto->nio", x.numpy(), y.numpy())   # per-example kernel gradient
    gb = y.numpy().sum(axis=1)
    m = gradient_moments(model, loss_fn, x, y, method="layerwise", elementwise=elementwise)
    np.testing.assert_allclose(m.mean[0].numpy(), g.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(m.mean[1].numpy(), gb.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(m.var_norms_sq[0].numpy(), (g ** 2).sum(axis=(1, 2)), rtol=1e-10)
    np.testing.assert_allclose(m.var_norms_sq[1].numpy(), (gb ** 2).sum(axis=1), rtol=1e-10)
    if elementwise:
        np.testing.assert_allclose(m.sum_sq[0].numpy(), (g ** 2).sum(axis=0), rtol=1e-10)


def _used_filter_gradients(fn, *args):
    """How many convolution filter gradient ops (`Conv2DBackpropFilter`,
    `Conv3DBackpropFilterV2`, ...) of `fn`'s graph feed anything. Tracing a convolution's
    gradient creates its filter gradient op either way; one whose output nothing reads is
    pruned when the function runs, so it is never computed."""
    graph = tf.function(fn).get_concrete_function(*args).graph
    return sum(1 for op in graph.get_operations()
               if "BackpropFilter" in op.type and op.outputs[0].consumers())


def test_convolution_filter_gradient_is_not_computed_twice():
    # Where the conv rule builds the per-example kernel gradients (the first layer: 8x8
    # output positions, T^2 = 4096 > k^2 C_in C_out = 36), their sum is the batch gradient,
    # so the backward pass must not compute that filter gradient as well. Where it takes
    # the ghost norm instead (the second: one position, T^2 (K + C) = 41 < K C = 180), it builds none, and
    # the backward pass computes that one filter gradient, once.
    model, loss_fn, x, y = make(SPEC["cnn"], dtype="float32")       # cnn: two Conv2D layers

    def plain(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
        return tape.gradient(loss, model.trainable_variables)

    assert _used_filter_gradients(plain, x, y) == 2                  # the count can fail
    for elementwise in (True, False):
        def mean(x, y, elementwise=elementwise):
            return gradient_moments(model, loss_fn, x, y, "auto", elementwise).mean
        assert _used_filter_gradients(mean, x, y) == 1


def test_embedding_matches_numpy_with_repeated_ids():
    model, loss_fn, _, y = make(SPEC["embedding"])
    ids = np.array([[1, 1, 1, 2, 0, 6], [3, 4, 3, 4, 3, 4], [5, 5, 5, 5, 5, 5],
                    [0, 1, 2, 3, 4, 5], [6, 6, 0, 0, 2, 2]], np.int32)
    g = np.zeros((5, 7, 3))
    for n in range(5):
        for t in range(6):
            g[n, ids[n, t]] += y.numpy()[n, t]
    m = gradient_moments(model, loss_fn, tf.constant(ids), y, method="layerwise")
    np.testing.assert_allclose(m.mean[0].numpy(), g.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.sum_sq[0].numpy(), (g ** 2).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.var_norms_sq[0].numpy(), (g ** 2).sum(axis=(1, 2)), rtol=1e-12)


def test_dense_mlp_matches_hand_derived_numpy():
    from test_gradients import numpy_per_example
    model, loss_fn, x, y = make(SPEC["mlp_tanh"])
    g = numpy_per_example(model, x.numpy(), y.numpy(), "crossentropy")
    m = gradient_moments(model, loss_fn, x, y, method="layerwise")
    for got_mean, got_sq, got_norm, want in zip(m.mean, m.sum_sq, m.var_norms_sq, g):
        np.testing.assert_allclose(got_mean.numpy(), want.mean(axis=0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(got_sq.numpy(), (want ** 2).sum(axis=0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(got_norm.numpy(), (want.reshape(5, -1) ** 2).sum(axis=1), rtol=1e-10)


def test_every_op_family_has_its_module_and_register_adds_one(monkeypatch):
    # RULES maps op types to the families' functions; register is the one way in.
    families = {rule.__module__.rsplit(".", 1)[-1] for rule in rules.RULES.values()}
    assert families == {"matmul", "conv", "broadcast", "gather"}
    assert rules.RULES["MatMul"] is rules.matmul and rules.RULES["ResourceGather"] is rules.gather
    monkeypatch.setitem(rules.RULES, "Fake", None)          # restored after the test
    rules.register("Fake", rules.broadcast)
    assert rules.RULES["Fake"] is rules.broadcast


class _Positions(keras.layers.Layer):
    """A table of positions, sliced to the sequence and broadcast over the batch, as KerasHub's
    PositionEmbedding does (Slice, then BroadcastTo)."""

    def build(self, shape):
        self.table = self.add_weight(shape=(7, shape[-1]), initializer="random_normal")

    def call(self, x):
        rows = keras.ops.slice(self.table, (2, 0), (x.shape[1], x.shape[-1]))
        return x + keras.ops.broadcast_to(rows, keras.ops.shape(x))


def test_a_sliced_table_broadcast_over_the_batch_takes_the_rules():
    def build():
        inputs = keras.Input((4, 3))
        return keras.Model(inputs, keras.layers.Dense(2)(_Positions()(inputs)))
    model, loss_fn, x, y = make(dict(SPEC["dense_3d"], build=build))
    table = model.layers[1].table
    assert rules.RULES["BroadcastTo"] is rules.broadcast_to
    # by hand: example n's gradient of the table is dz_n at rows 2..5, zero elsewhere, with
    # dz_n = y_n W^T (the linear loss's output gradient through the Dense kernel)
    kernel = model.layers[2].kernel.numpy()
    g = np.zeros((len(x), 7, 3))
    g[:, 2:6] = np.einsum("nto,io->nti", y.numpy(), kernel)
    m = gradient_moments(model, loss_fn, x, y, method="layerwise")     # every variable by a rule
    i = [v.path for v in model.trainable_variables].index(table.path)
    np.testing.assert_allclose(m.mean[i].numpy(), g.mean(axis=0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(m.sum_sq[i].numpy(), (g ** 2).sum(axis=0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(m.var_norms_sq[i].numpy(), (g ** 2).sum(axis=(1, 2)), rtol=1e-10)


class _Heads(keras.layers.Layer):
    """An attention projection as Gemma writes it: `einsum("btd,ndh->btnh")`, which TensorFlow
    computes by transposing and reshaping the kernel before a matrix product."""

    def build(self, shape):
        self.kernel = self.add_weight(shape=(2, shape[-1], 3), initializer="random_normal")

    def call(self, x):
        return keras.ops.reshape(keras.ops.einsum("btd,ndh->btnh", x, self.kernel), (-1, x.shape[1], 6))


@pytest.mark.parametrize("scale", [False, True], ids=["heads", "heads_then_one_plus_scale"])
def test_a_kernel_transposed_before_its_product_and_a_one_plus_scale_take_the_rules(scale):
    from test_layerwise import assert_moments_close

    class OnePlusScale(keras.layers.Layer):       # Gemma's RMS norm scale: x * (1 + s)
        def build(self, shape):
            self.s = self.add_weight(shape=(shape[-1],), initializer="zeros")

        def call(self, x):
            return x * (1.0 + self.s)

    def build():
        inputs = keras.Input((4, 5))
        h = _Heads()(inputs)
        return keras.Model(inputs, OnePlusScale()(h) if scale else h)
    model, loss_fn, x, y = make(dict(SPEC["dense_3d"], build=build))
    got = gradient_moments(model, loss_fn, x, y, method="layerwise")     # every variable by a rule
    assert_moments_close(got, gradient_moments(model, loss_fn, x, y, method="loop"), rtol=1e-10)


def test_a_variable_the_model_never_reads_is_zero_without_the_fallback(monkeypatch):
    # KerasHub's Llama backbone holds an output embedding only its CausalLM reads: no rule is
    # needed (every example's gradient is zero), and the fallback's B backward passes must
    # not run for it.
    from test_layerwise import assert_moments_close

    from tfmbgd.engine import gradients, layerwise

    class Unused(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(3,), initializer="ones")

        def call(self, x):
            return x

    def build():
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2)(Unused()(inputs)))
    model, loss_fn, x, y = make(dict(SPEC["dense_3d"], build=build))
    assert not any(layerwise.coverage(model, x).values())
    oracle = gradient_moments(model, loss_fn, x, y, method="loop")
    monkeypatch.setattr(gradients, "unvectorized", None)       # the fallback would fail
    got = gradient_moments(model, loss_fn, x, y, method="auto")
    assert_moments_close(got, oracle, rtol=1e-10)
    assert not np.any(got.var_norms_sq[0].numpy()) and not np.any(got.mean[0].numpy())


@pytest.mark.parametrize("filters", [21, 22], ids=["per_example_kernels", "ghost_norm"])
@pytest.mark.parametrize("elementwise", [False, True], ids=["norms", "elementwise"])
def test_a_convolution_takes_the_ghost_norm_below_the_arithmetic_threshold(filters, elementwise):
    # 3x3x16 images, 2x2 kernel: T = 4 output positions, K = 64 inputs per position. The
    # ghost norm costs T^2 (K + C) on top of the filter gradient; the per-example kernels
    # replace it. With C = 22, 16 * 86 = 1376 < 64 * 22 = 1408: the norms come from the
    # Gram matrices of the unfolded input and of dz, and the backward pass computes the
    # filter gradient; with C = 21, 1360 > 1344: the per-example kernels are built and
    # summed (no filter gradient op). The elementwise tier takes the cross terms of the
    # T = 4 positions where the norms take the ghost norm (T <= forms.CROSS_TERMS). Both
    # against the loop, float64.
    from test_layerwise import assert_moments_close

    def build():
        inputs = keras.Input((3, 3, 16))
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(
            keras.layers.Conv2D(filters, 2, activation="tanh")(inputs))))
    model, loss_fn, x, y = make(dict(build=build, loss="crossentropy"))
    got = gradient_moments(model, loss_fn, x, y, method="layerwise", elementwise=elementwise)
    assert_moments_close(got, gradient_moments(model, loss_fn, x, y, method="loop", elementwise=elementwise),
                         rtol=1e-10)
    ghost = filters == 22
    model32, _, x32, y32 = make(dict(build=build, loss="crossentropy"), dtype="float32")
    fn = lambda x, y: gradient_moments(model32, loss_fn, x, y, "auto", elementwise).mean
    assert _used_filter_gradients(fn, x32, y32) == (1 if ghost else 0)
    # ... and layerwise.choices says so, with the arithmetic: T^2 (K + C) against K C.
    said = layerwise.choices(model, x, elementwise)[model.layers[1].kernel.path]
    cost = f"{16 * (64 + filters):,}", f"{64 * filters:,}"
    assert said.startswith("Conv2D: ")
    if filters == 22:
        assert f"T^2 (k^2 C_in + C_out) = {cost[0]} < k^2 C_in C_out = {cost[1]}" in said
    else:
        assert f"k^2 C_in C_out = {cost[1]} <= the ghost norm's T^2 (k^2 C_in + C_out) = {cost[0]}" in said
    assert ("ghost norm: Gram matrices of T=4 positions" in said) == ghost
    assert said.endswith("the backward pass leaves out its batch gradient") != ghost


def _gram_products(fn, *args):
    """The `BatchMatMulV2` ops of `fn`'s graph that multiply a tensor by itself (a Gram matrix
    `x x^T`): the layer's own products have two different operands."""
    graph = tf.function(fn).get_concrete_function(*args).graph
    return [op for op in graph.get_operations()
            if op.type.startswith("BatchMatMul") and op.inputs[0] is op.inputs[1]]


def _sequence_dense(positions, width, outputs, dtype, elementwise, batch=6):
    """`(model, loss_fn, x, y)` of a Dense layer of `outputs` units on `positions` positions of
    `width` values, then a 3-way head, after checking its moments against the loop: 1e-10 in
    float64, round-off in float32."""
    from test_layerwise import assert_moments_close

    def build():
        inputs = keras.Input((positions, width))
        hidden = keras.layers.Dense(outputs, activation="tanh")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(hidden)))
    model, loss_fn, x, y = make(dict(build=build, loss="crossentropy"), batch=batch, dtype=dtype)
    got = gradient_moments(model, loss_fn, x, y, method="layerwise", elementwise=elementwise)
    assert_moments_close(got, gradient_moments(model, loss_fn, x, y, method="loop", elementwise=elementwise),
                         rtol=1e-10 if dtype == "float64" else 2e-5)
    return model, loss_fn, x, y


@pytest.mark.parametrize("width", [64, 65])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_gram_matrices_flip_from_broadcast_sums_to_batched_products_at_the_threshold(width, dtype):
    # A Dense layer on T = 4 positions of K values, C = 3 outputs: the ghost norm takes the
    # Gram matrices of a ([B, 4, K]) and of d ([B, 4, 3]). With T^2 K = 16 * 64 = 1024 (at
    # forms.GRAM_BY_BROADCAST) a's is summed from a broadcast product; with K = 65, 1040, it
    # is a batched matrix product. d's (T^2 C = 48) is a broadcast sum either way. Both
    # against the loop: 1e-10 in float64, round-off in float32.
    model, loss_fn, x, y = _sequence_dense(4, width, 3, dtype, elementwise=False)
    fn = lambda x, y: gradient_moments(model, loss_fn, x, y, "auto", False).var_norms_sq
    assert len(_gram_products(fn, x, y)) == (width > 64)
    said = layerwise.choices(model, x)[model.layers[1].kernel.path]
    if width == 64:
        assert "of T=4 positions by broadcast sums, T^2 K = 1,024 and T^2 C = 48 at most 1,024" in said
    else:
        assert ("of T=4 positions: a's by batched product, d's by broadcast sum, T^2 K = 1,040 and "
                "T^2 C = 48 against 1,024") in said


def test_self_attentions_query_key_and_value_share_one_gram_matrix_of_their_input():
    # The query, key and value projections read the same input (T = 8 positions of K = 40:
    # T^2 K = 2,560, batched products; K C = 320 is above forms.BUILD_WITHIN T^2 = 256, so no
    # projection is built): the ghost norm needs its Gram matrices once, not three times.
    # Against the loop in float64.
    from test_layerwise import assert_moments_close

    def build():
        inputs = keras.Input((8, 40))
        attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(attended)))
    model, loss_fn, x, y = make(dict(build=build, loss="crossentropy"), batch=4)
    got = gradient_moments(model, loss_fn, x, y, method="layerwise", elementwise=False)
    assert_moments_close(got, gradient_moments(model, loss_fn, x, y, method="loop", elementwise=False),
                         rtol=1e-10)
    fn = lambda x, y: gradient_moments(model, loss_fn, x, y, "auto", False).var_norms_sq
    of_input = [op for op in _gram_products(fn, x, y) if _source(op.inputs[0]).op.type == "Placeholder"]
    assert len(of_input) == 1




@pytest.mark.parametrize("outputs", [8, 9])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_small_outer_products_build_their_per_example_gradients_within_the_threshold(outputs, dtype):
    # A Dense layer on T = 4 positions of K = 8 values: with C = 8 outputs its per-example
    # gradients hold K C = 64 values, forms.BUILD_WITHIN (4) times the T^2 = 16 of a Gram
    # matrix, so they are built (one batched product whose sum is the batch gradient: the
    # backward pass leaves the layer's product out); with C = 9, 72 > 64, the ghost norm.
    # Against the loop: 1e-10 in float64, round-off in float32.
    model, loss_fn, x, y = _sequence_dense(4, 8, outputs, dtype, elementwise=False)
    fn = lambda x, y: gradient_moments(model, loss_fn, x, y, "auto", False).var_norms_sq
    graph = tf.function(fn).get_concrete_function(x, y).graph
    per_example = [op for op in graph.get_operations()
                   if op.type.startswith("BatchMatMul") and op.outputs[0].shape[1:] == (8, outputs)]
    assert len(per_example) == (outputs == 8)
    said = layerwise.choices(model, x)[model.layers[1].kernel.path]
    assert said.startswith("MatMul: outer product over T=4 positions, built per example (8x8)" if outputs == 8
                           else "MatMul: ghost norm: Gram matrices of T=4 positions")
    assert said.endswith("the backward pass leaves out its batch gradient") == (outputs == 8)


@pytest.mark.parametrize("cut", [20, 21], ids=["one_product", "a_product_per_pair"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_cross_terms_join_into_one_product_from_the_threshold(cut, dtype, monkeypatch):
    # A Dense layer on T = 2 positions, K = 5 inputs, C = 4 outputs: the elementwise tier takes
    # the cross terms of its T(T+1)/2 = 3 pairs of positions. With K C = 20 at
    # forms.CROSS_JOINED they are one product of the pairs' factors stacked, [B 3, K] by
    # [B 3, C]; one below, one [B, K] by [B, C] product per pair. Against the loop: 1e-10 in
    # float64, round-off in float32.
    monkeypatch.setattr(forms, "CROSS_JOINED", cut)
    b = 5
    model, loss_fn, x, y = _sequence_dense(2, 5, 4, dtype, elementwise=True, batch=b)
    fn = lambda x, y: gradient_moments(model, loss_fn, x, y, "auto", True).sum_sq
    graph = tf.function(fn).get_concrete_function(x, y).graph
    rows = [op.inputs[0].shape[0] for op in graph.get_operations()
            if op.type == "MatMul" and op.inputs[0].shape[-1] == 5 and op.inputs[1].shape[-1] == 4]
    assert (rows.count(b * 3), rows.count(b)) == ((1, 0) if cut == 20 else (0, 3))


@pytest.mark.parametrize("width", [128, 130])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_built_gradients_take_their_norms_from_the_gram_matrices_below_the_threshold(width, dtype):
    # A Dense layer of K = C = width on T = 8 positions: more than forms.CROSS_TERMS, so the
    # elementwise tier builds its [B, K, C] per-example gradients. Their norms come from the
    # Gram matrices where those cost fewer multiply-adds than the gradients hold values,
    # T^2 (K + C) < K C: at width 130, 16,640 < 16,900 (two Gram products, of a and of d);
    # at 128, 16,384 = 16,384, so from the built gradients. Against the loop.
    assert forms.builds(8, width, width, True) and not forms.builds(8, width, width, False)
    model, loss_fn, x, y = _sequence_dense(8, width, width, dtype, elementwise=True, batch=4)
    fn = lambda x, y: gradient_moments(model, loss_fn, x, y, "auto", True).var_norms_sq
    assert len(_gram_products(fn, x, y)) == (2 if width == 130 else 0)


def _source(t):
    while t.op.type in ("Reshape", "Cast", "Identity"):
        t = t.op.inputs[0]
    return t


GHOST_CASES = [  # (id, input shape, layer): each with T^2 (K + C) < K C, so the ghost norm
    ("conv1d_same_stride2", (5, 16), lambda: keras.layers.Conv1D(16, 3, strides=2, padding="same")),
    ("conv2d_same_stride2", (3, 3, 16), lambda: keras.layers.Conv2D(32, 3, strides=2, padding="same")),
    ("conv3d_valid", (2, 2, 2, 8), lambda: keras.layers.Conv3D(16, 2)),
]


@pytest.mark.parametrize("shape, layer", [c[1:] for c in GHOST_CASES], ids=[c[0] for c in GHOST_CASES])
def test_the_ghost_norm_matches_the_loop_on_strides_padding_and_1d_3d(shape, layer):
    from test_layerwise import assert_moments_close

    def build():
        inputs = keras.Input(shape)
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(
            keras.layers.Activation("tanh")(layer()(inputs)))))
    model, loss_fn, x, y = make(dict(build=build, loss="crossentropy"))
    got = gradient_moments(model, loss_fn, x, y, method="layerwise", elementwise=False)
    assert_moments_close(got, gradient_moments(model, loss_fn, x, y, method="loop", elementwise=False),
                         rtol=1e-10)
    model32, _, x32, y32 = make(dict(build=build, loss="crossentropy"), dtype="float32")
    fn = lambda x, y: gradient_moments(model32, loss_fn, x, y, "auto", False).mean
    assert _used_filter_gradients(fn, x32, y32) == 1    # the ghost norm: from the backward pass
