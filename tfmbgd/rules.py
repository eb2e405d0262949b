"""Per-layer rules: per-example gradient moments from one ordinary backward pass.

A rule sees a layer's input `a` and `delta`, the gradient of the *summed* per-example
loss with respect to the layer's pre-activation output. Because example n's output affects
only its own loss, `delta[n]` is exactly `d l_n / d z_n` — unscaled, as everywhere in
tfmbgd. For each trainable variable of the layer (in `layer.trainable_variables` order) a
rule returns `(sum_sq, norms_sq)`: the elementwise sum over the batch of the squared
per-example gradients (shaped like the variable; None unless `elementwise`) and the `[B]`
squared norms of the per-example gradients.

The maths follows BackPACK's first-order extensions and the "ghost norm" of Goodfellow
(2015) and Li et al. (2021); nothing here builds the per-example gradients of all
parameters at once.
"""

import tensorflow as tf


def dense(layer, a, delta, elementwise):
    """`Dense`: `z = a W + b`, per-example kernel gradient `a_n^T delta_n`.

    2-D inputs: `||g_n,W||^2 = ||a_n||^2 ||delta_n||^2` and `sum_sq = (a*a)^T (delta*delta)`,
    so no per-example tensor larger than the activations is built. N-D inputs `[B, ..., in]`
    (sequences): the per-example gradient sums over the inner axes; see `_unfolded`.
    """
    if a.shape.rank == 2:
        a2, d2 = tf.square(a), tf.square(delta)
        kernel_sq = tf.matmul(a2, d2, transpose_a=True) if elementwise else None
        out = [(kernel_sq, tf.reduce_sum(a2, 1) * tf.reduce_sum(d2, 1))]
        bias_grad = delta
    else:
        b = tf.shape(a)[0]
        a3 = tf.reshape(a, [b, -1, a.shape[-1]])
        d3 = tf.reshape(delta, [b, -1, delta.shape[-1]])
        out = [_unfolded(a3, d3, elementwise)]
        bias_grad = tf.reduce_sum(d3, axis=1)
    if layer.use_bias:
        out.append(_direct(bias_grad, elementwise))
    return out


def conv2d(layer, a, delta, elementwise):
    """`Conv2D` (channels_last, groups=1): a Dense rule over image patches.

    The per-example kernel gradient is `sum_p patch_{n,p}^T delta_{n,p}` over output
    positions p; `tf.image.extract_patches` with the layer's kernel size, strides,
    dilation rate and padding ("valid" or "same", TensorFlow's rule for both ops) gives the
    patches in the `(kh, kw, c_in)` order of the kernel.
    """
    kh, kw = layer.kernel_size
    patches = tf.image.extract_patches(
        a, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1],
        rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())
    b = tf.shape(a)[0]
    a3 = tf.reshape(patches, [b, -1, patches.shape[-1]])
    d3 = tf.reshape(delta, [b, -1, delta.shape[-1]])
    kernel_sq, kernel_norms = _unfolded(a3, d3, elementwise)
    if kernel_sq is not None:
        kernel_sq = tf.reshape(kernel_sq, layer.kernel.shape)
    out = [(kernel_sq, kernel_norms)]
    if layer.use_bias:
        out.append(_direct(tf.reduce_sum(d3, axis=1), elementwise))
    return out


def embedding(layer, ids, delta, elementwise):
    """`Embedding`: the per-example gradient adds `delta_{n,t}` to row `ids_{n,t}`.

    Rows hit twice by one example add up before squaring, so the rule sums `delta` per
    (example, row) pair with a segment sum; sizes stay `B x T x dim`, never `B x vocab`.
    """
    vocab = layer.input_dim
    b = tf.shape(ids)[0]
    flat_ids = tf.reshape(tf.cast(ids, tf.int64), [b, -1])
    rows = tf.reshape(delta, [-1, delta.shape[-1]])
    example = tf.repeat(tf.range(tf.cast(b, tf.int64)), tf.shape(flat_ids)[1])
    pairs, index = tf.unique(example * vocab + tf.reshape(flat_ids, [-1]))
    per_pair = tf.math.unsorted_segment_sum(rows, index, tf.size(pairs))     # [pairs, dim]
    squares = tf.square(per_pair)
    norms = tf.math.unsorted_segment_sum(tf.reduce_sum(squares, 1), pairs // vocab, b)
    sum_sq = tf.math.unsorted_segment_sum(squares, pairs % vocab, vocab) if elementwise else None
    return [(sum_sq, norms)]


def _direct(grads, elementwise):
    """Moments of per-example gradients given directly, `[B, k]` (biases)."""
    squares = tf.square(grads)
    return (tf.reduce_sum(squares, 0) if elementwise else None), tf.reduce_sum(squares, 1)


def _unfolded(a, delta, elementwise):
    """Moments of `g_n = a_n^T delta_n` for `a [B, T, K]`, `delta [B, T, C]`.

    Norms alone, when `T^2 <= K C`: the Gram ("ghost norm") identity
    `||a_n^T delta_n||^2 = sum_{t,s} (a_n a_n^T)_{ts} (delta_n delta_n^T)_{ts}` costs
    `B T^2` memory. Otherwise, and for the elementwise tier, the layer's per-example
    gradients `[B, K, C]` are built (one layer at a time; for convolutions this is the
    smaller choice, since K C << T^2).
    """
    t, k, c = a.shape[1], a.shape[2], delta.shape[2]
    if not elementwise and t is not None and t * t <= k * c:
        gram = tf.matmul(a, a, transpose_b=True) * tf.matmul(delta, delta, transpose_b=True)
        return None, tf.reduce_sum(gram, axis=[1, 2])
    squares = tf.square(tf.einsum("btk,btc->bkc", a, delta))
    return (tf.reduce_sum(squares, 0) if elementwise else None), tf.reduce_sum(squares, axis=[1, 2])
