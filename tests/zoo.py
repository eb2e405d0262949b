"""Models as users write them, for the tests and the benchmarks of the layer-wise rules.

Each entry builds a Keras model and a batch for it, in two sizes: `"tiny"` (tests: a few
units, exact comparisons against the single-example loop) and `"bench"` (the sizes of
the benchmark, e.g. the MLP 784-256-256-10 of TensorFlow's "quickstart for experts").
Every model outputs logits for `CLASSES` classes and takes the crossentropy loss.

    model, x, y = zoo.make("transformer", batch=8, size="tiny", seed=0)
"""

import keras
import numpy as np

L = keras.layers
CLASSES = 3


class QuickstartMLP(keras.Model):
    """The subclassed style of TensorFlow's quickstart for experts: layers made in
    `__init__`, wired in `call`."""

    def __init__(self, widths, classes, **kwargs):
        super().__init__(**kwargs)
        self.flatten = L.Flatten()
        self.hidden = [L.Dense(w, activation="relu") for w in widths]
        self.out = L.Dense(classes)

    def call(self, x):
        h = self.flatten(x)
        for layer in self.hidden:
            h = layer(h)
        return self.out(h)


class Block(L.Layer):
    """A user's custom layer that owns a Dense and a LayerNormalization (a residual block)."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(width, activation=lambda z: z * keras.ops.sigmoid(1.5 * z))   # a user activation
        self.norm = L.LayerNormalization()

    def call(self, x):
        return self.norm(x + self.dense(x))


def _mlp_gelu_silu(s):
    w = (256, 256) if s == "bench" else (6, 5)
    return keras.Sequential([keras.Input((784 if s == "bench" else 7,)), L.Dense(w[0], activation="gelu"),
                             L.Dense(w[1], activation="silu"), L.Dense(CLASSES)], name="mlp_gelu_silu")


def _transformer(s):
    t, dim, heads, vocab = (32, 64, 4, 1000) if s == "bench" else (5, 8, 2, 11)
    ids = keras.Input((t,), dtype="int32")
    h = L.Embedding(vocab, dim)(ids)
    attn = L.MultiHeadAttention(heads, dim // heads)(h, h)
    h = L.LayerNormalization()(h + attn)
    ff = L.Dense(dim, activation="relu")(L.Dense(2 * dim, activation="gelu")(h))
    h = L.LayerNormalization()(h + ff)
    return keras.Model(ids, L.Dense(CLASSES)(L.GlobalAveragePooling1D()(h)), name="transformer")


def _conv1d(s):
    t, c = (128, 32) if s == "bench" else (9, 3)
    x = keras.Input((t, 4))
    h = L.Conv1D(c, 5, activation="relu")(x)
    h = L.Conv1D(c, 3, strides=2, padding="same", activation="elu")(h)
    return keras.Model(x, L.Dense(CLASSES)(L.GlobalMaxPooling1D()(h)), name="conv1d")


def _residual_cnn(s):
    size, c = (28, 16) if s == "bench" else (6, 4)
    x = keras.Input((size, size, 1))
    h = L.Conv2D(c, 3, padding="same", activation="relu")(x)
    r = L.Conv2D(c, 3, padding="same")(h)
    r = L.GroupNormalization(groups=2)(r)
    h = L.Activation("relu")(h + r)
    h = L.MaxPooling2D(2)(h)
    return keras.Model(x, L.Dense(CLASSES)(L.Flatten()(h)), name="residual_cnn")


def _siamese(s):
    k = 64 if s == "bench" else 4
    encoder = keras.Sequential([keras.Input((k,)), L.Dense(k, activation="tanh"), L.Dense(k)], name="encoder")
    left, right = keras.Input((k,), name="left"), keras.Input((k,), name="right")
    both = L.Concatenate()([encoder(left), encoder(right)])      # one encoder, called twice
    return keras.Model({"left": left, "right": right}, L.Dense(CLASSES)(both), name="siamese")


def _nested(s):
    k = 32 if s == "bench" else 5
    x = keras.Input((k,))
    inner = keras.Sequential([keras.Input((k,)), L.Dense(k, activation="leaky_relu"), Block(k)], name="inner")
    h = inner(x)
    h = L.Dense(k, activation=lambda z: keras.ops.softmax(z))(h)
    return keras.Model(x, L.Dense(CLASSES)(h), name="nested")


def _every_rule(s):
    """One of each layer with a rule, on three inputs (a dict)."""
    img, seq, ids = keras.Input((6, 6, 2), name="image"), keras.Input((7, 3), name="sequence"), \
        keras.Input((4,), dtype="int32", name="ids")
    a = L.Conv2D(3, 3, strides=2, padding="same", dilation_rate=1)(img)
    a = L.DepthwiseConv2D(2, depth_multiplier=2)(a)
    a = L.SeparableConv2D(3, 2, padding="same", activation="silu")(a)
    a = L.Conv2DTranspose(2, 3, strides=2, padding="same")(a)
    a = L.Conv2D(2, 3, padding="same", dilation_rate=2)(a)
    a = L.GroupNormalization(groups=2)(a)
    v = L.Conv3D(2, 2)(L.Reshape((6, 6, 2, 1))(img))
    b = L.Conv1D(4, 3, padding="causal")(seq)
    b = L.RMSNormalization()(b)
    b = L.EinsumDense("btc,cd->btd", output_shape=(None, 4), bias_axes="d")(b)
    e = L.LayerNormalization()(L.Embedding(9, 4)(ids))
    parts = [L.GlobalAveragePooling2D()(a), L.Flatten()(v), L.GlobalAveragePooling1D()(b), L.Flatten()(e)]
    return keras.Model({"image": img, "sequence": seq, "ids": ids},
                       L.Dense(CLASSES)(L.Concatenate()(parts)), name="every_rule")


def _quickstart(s):
    model = QuickstartMLP((256, 256) if s == "bench" else (6, 5), CLASSES, name="subclassed_mlp")
    model(np.zeros((1, 784 if s == "bench" else 7), np.float32))
    return model


BUILD = {
    "subclassed_mlp": _quickstart,
    "mlp_gelu_silu": _mlp_gelu_silu,
    "transformer": _transformer,
    "conv1d": _conv1d,
    "residual_cnn": _residual_cnn,
    "siamese": _siamese,
    "nested": _nested,
    "every_rule": _every_rule,
}
NAMES = tuple(BUILD)


def _inputs(model, batch, rng):
    """A random batch for the model's inputs (functional models) or a flat 784/7 vector."""
    specs = getattr(model, "inputs", None)
    if specs is None:
        return rng.normal(size=(batch, model.hidden[0].kernel.shape[0])).astype(np.float32)
    names = [t.name for t in specs]

    def one(t):
        shape = (batch, *t.shape[1:])
        if "int" in str(t.dtype):
            return rng.integers(0, 9, size=shape).astype(np.int32)
        return rng.normal(size=shape).astype(np.float32)
    if len(specs) > 1:          # the zoo's models with several inputs take a dict
        return {name: one(t) for name, t in zip(names, specs)}
    return one(specs[0])


def make(name, batch=8, size="tiny", seed=0):
    """`(model, x, y)`: zoo model `name` with seeded weights, a random batch and labels."""
    keras.utils.set_random_seed(seed)
    model = BUILD[name](size)
    rng = np.random.default_rng(seed)
    x = _inputs(model, batch, rng)
    if size == "tiny":                       # larger weights: per-example gradients differ visibly
        for v in model.trainable_variables:
            v.assign(rng.normal(scale=0.5, size=v.shape).astype(v.dtype))
    return model, x, rng.integers(0, CLASSES, size=batch).astype(np.int32)
