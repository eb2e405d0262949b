"""Per-layer rules: per-example gradient moments from one ordinary backward pass.

A rule sees a layer's input `a` and `delta`, the gradient of the *summed* per-example
loss with respect to the layer's pre-activation output. Because example n's output affects
only its own loss, `delta[n]` is exactly `d l_n / d z_n` — unscaled, as everywhere in
tfmbgd. For each trainable variable of the layer (in `layer.trainable_variables` order) a
rule returns `(sum_sq, norms_sq)`: the elementwise sum over the batch of the squared
per-example gradients (shaped like the variable; None unless `elementwise`) and the `[B]`
squared norms of the per-example gradients.

A rule that builds the per-example gradients anyway (convolutions; Dense on sequences,
where the Gram identity does not pay) also returns their sum over the batch, the gradient
of the summed loss: `(sum_sq, norms_sq, grad_sum)`. Its `sums` function says so before the
backward pass runs, and `tfmbgd.layerwise` then leaves those variables out of the backward
pass: for a convolution that saves the filter gradient, as costly as the per-example
gradients themselves.

Per-example gradients are linear in `delta`, so a rule's moments are quadratic in it:
`moments(c * delta) = c^2 * moments(delta)`. `tfmbgd.layerwise` relies on this (it may
pass `delta / B`, the gradient of the mean loss, and scale the moments by `B^2`); a rule
registered with `layerwise.register` must keep it, as every rule of squared per-example
gradients does.

The maths follows BackPACK's first-order extensions and the "ghost norm" of Goodfellow
(2015) and Li et al. (2021); nothing here builds the per-example gradients of all
parameters at once.
"""

import tensorflow as tf


def dense_sums(layer, a, elementwise):
    """Whether `dense` returns the sums of the per-example gradients for input `a`."""
    if a.shape.rank == 2:
        return False
    return _builds(_inner_size(a), a.shape[-1], layer.units, elementwise)


def _inner_size(a):
    """The number of positions per example of `a [B, ..., k]`, or None if unknown."""
    inner = a.shape[1:-1]
    return inner.num_elements() if inner.is_fully_defined() else None


def _builds(t, k, c, elementwise):
    """Whether the per-example gradients `[B, k, c]` of `T = t` positions are built: for the
    elementwise tier, or when the Gram matrices `[B, T, T]` would be larger."""
    return elementwise or t is None or t * t > k * c


def dense(layer, a, delta, elementwise):
    """`Dense`: `z = a W + b`, per-example kernel gradient `a_n^T delta_n`.

    2-D inputs: `||g_n,W||^2 = ||a_n||^2 ||delta_n||^2` and `sum_sq = (a*a)^T (delta*delta)`,
    so no per-example tensor larger than the activations is built. N-D inputs `[B, ..., in]`
    (sequences): the per-example gradient sums over the inner axes; see `_unfolded`. Where
    it builds them (`dense_sums`), the rule also returns the sums; for the Gram identity the
    kernel's sum is None and `tfmbgd.layerwise` takes the layer's gradient from the
    backward pass.
    """
    if a.shape.rank == 2:
        delta_sq = _row_sq(delta)           # ||delta_n||^2: the bias's per-example norm too
        kernel_sq = tf.matmul(tf.square(a), tf.square(delta), transpose_a=True) if elementwise else None
        out = [(kernel_sq, _row_sq(a) * delta_sq)]
        if layer.use_bias:
            out.append((tf.reduce_sum(tf.square(delta), 0) if elementwise else None, delta_sq))
        return out
    b = tf.shape(a)[0]
    a3 = tf.reshape(a, [b, -1, a.shape[-1]])
    d3 = tf.reshape(delta, [b, -1, delta.shape[-1]])
    out = [_unfolded(a3, d3, elementwise, dense_sums(layer, a, elementwise))]
    if layer.use_bias:
        out.append(_direct(tf.reduce_sum(d3, axis=1), elementwise))
    return out


def _row_sq(x):
    """`[B]` squared norms of the rows of `x [B, k]`."""
    return tf.reduce_sum(tf.square(x), axis=1)


def conv2d(layer, a, delta, elementwise):
    """`Conv2D` (channels_last, groups=1, static spatial size).

    The per-example kernel gradient at kernel offset (i, j) is
    `g_n[i, j] = sum_{p,q} a_pad[n, p s_h + i d_h, q s_w + j d_w, :]^T delta[n, p, q, :]`:
    one batched matmul per offset over a strided window of the (padded) input, with the
    layer's strides, dilation rate and padding ("same" pads as TensorFlow does, the odd
    pixel at the end). This builds the layer's per-example gradients `[B, *kernel.shape]`
    (small for convolutions) and is several times faster on CPU than
    `tf.image.extract_patches` followed by one matmul (and faster than one matmul over the
    windows concatenated, except with one input channel, where the windows stack without a
    copy of the channels). Their sum is the kernel's batch gradient, returned too.
    """
    b = tf.shape(a)[0]
    c_in, c_out = a.shape[-1], delta.shape[-1]
    d3 = tf.reshape(delta, [b, -1, c_out])
    windows = _windows(layer, a, delta.shape[1], delta.shape[2])
    if c_in == 1:      # the windows stack into [B, offsets, positions]: one matmul in all
        grads = tf.matmul(tf.stack([tf.reshape(w, [b, -1]) for w in windows], axis=1), d3)
    else:              # per offset [B, c_in, c_out]
        grads = tf.stack([tf.matmul(tf.reshape(w, [b, -1, c_in]), d3, transpose_a=True) for w in windows],
                         axis=1)
    grads = tf.reshape(grads, [b, *layer.kernel.shape])
    squares = tf.square(grads)
    out = [(tf.reduce_sum(squares, 0) if elementwise else None, tf.reduce_sum(squares, axis=[1, 2, 3, 4]),
            tf.reduce_sum(grads, 0))]
    if layer.use_bias:
        out.append(_direct(tf.reduce_sum(d3, axis=1), elementwise))
    return out


def conv2d_sums(layer, a, elementwise):
    """`conv2d` always returns the sums of the per-example gradients."""
    return True


def _windows(layer, a, out_h, out_w):
    """For each kernel offset (i, j), row-major, the input pixels it meets: `[B, out_h, out_w, c]`."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.strides, layer.dilation_rate
    if layer.padding == "same":
        pad_h = max((out_h - 1) * sh + (kh - 1) * dh + 1 - a.shape[1], 0)
        pad_w = max((out_w - 1) * sw + (kw - 1) * dw + 1 - a.shape[2], 0)
        a = tf.pad(a, [[0, 0], [pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]])
    return [a[:, i * dh: i * dh + (out_h - 1) * sh + 1: sh, j * dw: j * dw + (out_w - 1) * sw + 1: sw, :]
            for i in range(kh) for j in range(kw)]


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
    """Moments and sum of per-example gradients given directly, `[B, k]` (biases)."""
    squares = tf.square(grads)
    sum_sq = tf.reduce_sum(squares, 0) if elementwise else None
    return sum_sq, tf.reduce_sum(squares, 1), tf.reduce_sum(grads, 0)


def _unfolded(a, delta, elementwise, build):
    """`(sum_sq, norms_sq, grad_sum)` of `g_n = a_n^T delta_n` for `a [B, T, K]`, `delta [B, T, C]`.

    Norms alone, when `T^2 <= K C`: the Gram ("ghost norm") identity
    `||a_n^T delta_n||^2 = sum_{t,s} (a_n a_n^T)_{ts} (delta_n delta_n^T)_{ts}` costs
    `B T^2` memory. Otherwise, and for the elementwise tier, the layer's per-example
    gradients `[B, K, C]` are built (one layer at a time; for convolutions this is the
    smaller choice, since K C << T^2): `build` says which (`_builds`). `grad_sum` is None
    for the Gram identity.
    """
    if not build:
        gram = tf.matmul(a, a, transpose_b=True) * tf.matmul(delta, delta, transpose_b=True)
        return None, tf.reduce_sum(gram, axis=[1, 2]), None
    grads = tf.einsum("btk,btc->bkc", a, delta)
    squares = tf.square(grads)
    return ((tf.reduce_sum(squares, 0) if elementwise else None), tf.reduce_sum(squares, axis=[1, 2]),
            tf.reduce_sum(grads, 0))
