"""The per-example gradients of one variable, kept in the cheapest form that is exact.

A layer-wise rule (`tfmbgd.engine.rules`) never needs the `[B, *variable.shape]` per-example
gradients of a whole model. It describes those of one variable in one of three forms,
and this module reduces a form to the variable's moments:

- `Outer(a, d)`: `g_n = a_n^T d_n`, with `a [B, T, K]` and `d [B, T, C]` (a matrix
  product: Dense, EinsumDense, attention projections; `T` positions per example, 1 for a
  plain Dense). Norms by `||a_n||^2 ||d_n||^2` (T = 1) or by the Gram ("ghost norm")
  identity `sum_{t,s} (a_n a_n^T)_{ts} (d_n d_n^T)_{ts}` (Goodfellow 2015; Li et al. 2021),
  elementwise sums by `(a^2)^T (d^2)` (T = 1) or, over a few positions, by cross terms;
  otherwise the `[B, K, C]` gradients of this variable alone are built.
- `Explicit(g)`: `g [B, ...]` itself (depthwise convolutions; normalization scales and
  offsets; biases).
- `Pieces(parts)`: `g` in consecutive pieces `[B, ...]` (a convolution's kernel, one piece
  per kernel offset): reduced piece by piece, so the whole `[B, *kernel]` array is never
  stacked (one copy less, and one offset's piece alive at a time instead of all).
- `Rows(ids, rows)`: `g_n` adds `rows[n, t]` to row `ids[n, t]` of a `[vocab, dim]` table
  (Embedding, any gather of rows): segment sums per (example, row), never `B x vocab`.

Whatever is built is read once per sum (`sum_of_squares`), never squared into a copy.

Every form is built from the gradient of the *mean* loss, `delta / B`, where `delta` is
the unscaled per-example signal; moments are quadratic in it, so the squares are scaled
by `B^2` and the sum of the per-example gradients is then the mean gradient itself.
"""

import weakref
from typing import NamedTuple

import tensorflow as tf


class Outer(NamedTuple):
    a: tf.Tensor      # [B, T, K], or [B, K] for T = 1
    d: tf.Tensor      # [B, T, C], or [B, C]


def _positions(x):
    """`[B, T, ...]` of an `Outer` factor, `[B, K]` read as T = 1."""
    return x[:, None] if x.shape.rank == 2 else x


def reshaped(t, shape):
    """`tf.reshape(t, shape)`, or `t` itself when it has that static shape already: on the
    small models of a step that takes a millisecond, every op left out counts."""
    static = all(isinstance(d, int) for d in shape) and t.shape.is_fully_defined()
    if static and tuple(t.shape) == tuple(shape):
        return t
    return tf.reshape(t, shape)


def batch_size(t):
    """The leading dimension of `t`: a Python int when static (no op), else a tensor."""
    return t.shape[0] if t.shape[0] is not None else tf.shape(t)[0]


def per_example_sum(t):
    """`[B]`: `t` summed over every axis but the first (no reshape)."""
    return tf.reduce_sum(t, list(range(1, t.shape.rank))) if t.shape.rank > 1 else t


class Explicit(NamedTuple):
    g: tf.Tensor      # [B, ...] with as many elements per example as the variable


class Pieces(NamedTuple):
    parts: tuple      # [B, ...] each; g_n is their flattened values one after another


class Rows(NamedTuple):
    ids: tf.Tensor    # [B, N] int64 row of each gathered position
    rows: tf.Tensor   # [B, N, dim] the gradient at each gathered row


# Up to this many positions, elementwise sums by T(T+1)/2 matrix products (the cross terms)
# rather than by building `[B, K, C]`: at B=32, K=4608, C=512 (VGG16's last convolutions)
# the cross terms of T=4 took 2.4-4.2x the weight gradient's time and building 11-16x; at
# T=16 and K = C = 128, 3.9x and 2.4x (`benchmarks/step_cost.py --outer`).
CROSS_TERMS = 6


# Where the per-example gradients `[K, C]` hold at most this many times the values of a
# Gram matrix `[T, T]`, an `Outer` form builds them: one batched product instead of two Gram
# matrices, and their sum is the batch gradient, so the backward pass leaves its product out.
# In the statistics step of the KerasHub backbones at test size (16 tokens, K = C = 16, and
# K C = 2 T^2 in their feed-forward layers) building took the norm tier from 1.29-1.34x to
# 1.18-1.22x; 8 and 16 measured the same as 4, and at K C = 64 T^2 building is slower
# (`benchmarks/step_cost.py --outer`: 1.5x the weight gradient against 1.2x at T=16, K=C=128).
BUILD_WITHIN = 4


def builds(t, k, c, elementwise):
    """Whether an `Outer` form with `t` positions builds its per-example gradients `[B, K, C]`:
    when `t` is unknown or they hold at most `BUILD_WITHIN` times the values of the Gram
    matrices `[B, T, T]`, and for the elementwise tier beyond `CROSS_TERMS` positions. T = 1
    never builds: the identities are exact and cheaper. A few positions (a layer called a
    few times, a convolution's last 2x2 output) take the Gram norms and the cross terms
    `sum_{t<=s} (a_t a_s)^T (d_t d_s)`: a few large matrix products over the batch are far
    faster on a CPU than B tiny ones."""
    if t == 1:
        return False
    if t is None or BUILD_WITHIN * t * t >= k * c:
        return True
    return elementwise and t > CROSS_TERMS


def norms_by_gram(t, k, c):
    """Whether an `Outer` form built for the elementwise sums alone (T > `CROSS_TERMS`) takes
    its norms from the Gram matrices all the same: where they cost fewer multiply-adds per
    example, T^2 (K + C), than a pass over the built `[K, C]` gradients reads values."""
    return t is not None and t * t * (k + c) < k * c


def merge(forms):
    """One form for the sum over several uses of a variable (a layer called twice, tied
    weights): `Outer`s and `Rows` concatenate their positions, anything else is summed
    `Explicit`ly. Per-example gradients add over uses, so their norms need the whole sum."""
    if len(forms) == 1:
        return forms[0]
    kinds = {type(f) for f in forms}
    if kinds == {Outer} and len({(f.a.shape[-1], f.d.shape[-1]) for f in forms}) == 1:
        if all(f.a.shape.rank == 2 for f in forms):      # one position per use: stack them
            return Outer(tf.stack([f.a for f in forms], 1), tf.stack([f.d for f in forms], 1))
        return Outer(*(tf.concat([_positions(f[i]) for f in forms], 1) for i in (0, 1)))
    if kinds == {Rows}:
        return Rows(tf.concat([f.ids for f in forms], 1), tf.concat([f.rows for f in forms], 1))
    return None     # different kinds: the caller makes each explicit and sums


def explicit(form, shape):
    """The per-example gradients `[B, *shape]` of any form."""
    b = batch_size(_first(form))
    if isinstance(form, Outer):
        g = tf.matmul(_positions(form.a), _positions(form.d), transpose_a=True)
    elif isinstance(form, Pieces):
        g = tf.concat([tf.reshape(p, [b, -1]) for p in form.parts], 1)
    elif isinstance(form, Rows):
        vocab = shape[0]
        index = tf.range(tf.cast(b, tf.int64))[:, None] * vocab + form.ids
        g = tf.math.unsorted_segment_sum(tf.reshape(form.rows, [-1, shape[-1]]), tf.reshape(index, [-1]),
                                         b * vocab)
    else:
        g = form.g
    return reshaped(g, [b, *shape])


def _first(form):
    if isinstance(form, Pieces):
        return form.parts[0]
    return form.a if isinstance(form, Outer) else form.ids if isinstance(form, Rows) else form.g


def moments(form, shape, b, elementwise):
    """`(sum_sq, norms_sq, mean)` of the per-example gradients that `form` describes.

    Args:
      form: built from the gradient of the mean loss (see the module docstring).
      shape: the variable's shape.
      b: the batch size B (int or scalar tensor of the form's dtype).
      elementwise: also compute `sum_sq`.

    Returns:
      `sum_sq` (`shape`, None unless elementwise), `norms_sq` `[B]`, both of the unscaled
      per-example gradients; `mean` (`shape`) where the form builds the per-example
      gradients anyway (their sum is the batch gradient), else None.
    """
    b2 = b * b
    if isinstance(form, Rows):
        return _rows(form, shape, b2, elementwise)
    if isinstance(form, Outer):
        t, k, c = 1 if form.a.shape.rank == 2 else form.a.shape[1], form.a.shape[-1], form.d.shape[-1]
        if form.a.shape.rank == 2:
            # B^2 goes where it is cheapest: into d ([B, C]) when the [K, C] sums are
            # wanted, else onto the [B] norms.
            a_sq, d_sq = tf.square(form.a), tf.square(form.d * b if elementwise else form.d)
            norms = tf.reduce_sum(a_sq, 1) * tf.reduce_sum(d_sq, 1)
            if not elementwise:
                return None, norms * b2, None
            return tf.reshape(tf.matmul(a_sq, d_sq, transpose_a=True), shape), norms, None
        ghost = lambda: tf.reduce_sum(_gram(form.a) * _gram(form.d), axis=[1, 2]) * b2
        if not builds(t, k, c, elementwise):
            if not elementwise:
                return None, ghost(), None
            sum_sq = cross_terms(form.a, form.d, joins_cross_terms(k, c)) * b2
            return tf.reshape(sum_sq, shape), ghost(), None
        norms = ghost() if norms_by_gram(t, k, c) else None
    elif isinstance(form, Pieces):
        return _pieces(form, shape, b2, elementwise)
    else:
        norms = None
    g = explicit(form, shape)
    if norms is None:
        norms = sum_of_squares(g, list(range(1, g.shape.rank))) * b2
    sum_sq = sum_of_squares(g, 0) * b2 if elementwise else None
    return sum_sq, norms, tf.reduce_sum(g, 0)


def in_xla():
    """Whether the graph being traced is compiled by XLA (fit's `jit_compile`, `--jit_compile`),
    which lacks a few of TensorFlow's ops."""
    from tensorflow.python.ops import control_flow_util  # no public test for an XLA context

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def sum_of_squares(t, axis):
    """`reduce_sum(t^2, axis)` in one pass over `t`: a Euclidean norm, squared. Squaring and
    then summing writes the squares and reads them again, once per sum, which on a large
    array costs twice or more (`benchmarks/step_cost.py --outer`, the built columns). XLA
    has no Euclidean norm, and fuses the square into the sum itself."""
    if in_xla():
        return tf.reduce_sum(tf.square(t), axis)
    return tf.square(tf.math.reduce_euclidean_norm(t, axis))


# Up to this many multiply-adds per example (T^2 K), a Gram matrix `x x^T` by broadcasting and
# summing: on a CPU, oneDNN's batched product of B tiny matrices costs more to start than to
# compute. At B=32 the product took 25-42 us at T=2..4, K=64..256 (T^2 K <= 1024), the broadcast
# sum 6-17 us; at T^2 K = 2048 they are even, beyond it the product wins (`step_cost.py --gram`).
GRAM_BY_BROADCAST = 1024


def gram_by_broadcast(t, width):
    """Whether the Gram matrices of `t` positions of `width` values are summed from a
    broadcast product rather than taken by a batched matrix product (`GRAM_BY_BROADCAST`)."""
    return t is not None and width is not None and t * t * width <= GRAM_BY_BROADCAST


def _gram(x):
    """`[B, T, T]`: the Gram matrix `x_n x_n^T` of each example's `[T, K]` positions; in a graph,
    once per value: the query, key and value projections of self-attention read the same
    input, reshaped and cast by each rule, and their Gram matrices are one."""
    if tf.executing_eagerly():
        return _new_gram(x)
    source = x
    while source.op.type in ("Reshape", "Cast", "Identity"):
        source = source.op.inputs[0]
    known = _GRAMS.setdefault(x.graph, {})
    key = (source.ref(), tuple(x.shape), x.dtype)
    if key not in known:
        known[key] = _new_gram(x)
    return known[key]


def gram_by_product(x):
    """`[B, T, T]` Gram matrices of `x` `[B, T, K]` by one batched matrix product."""
    return tf.matmul(x, x, transpose_b=True)


def gram_by_sum(x):
    """`[B, T, T]` Gram matrices of `x` `[B, T, K]` by a broadcast product summed over K."""
    return tf.reduce_sum(tf.expand_dims(x, 2) * tf.expand_dims(x, 1), -1)


_GRAMS = weakref.WeakKeyDictionary()     # graph -> {(value, shape, dtype): its Gram matrices}


def _new_gram(x):
    return gram_by_sum(x) if gram_by_broadcast(x.shape[1], x.shape[-1]) else gram_by_product(x)


def _pieces(form, shape, b2, elementwise):
    """`moments` of `Pieces`, a piece at a time: the `[B]` norms add up, the sums over the
    batch are laid end to end."""
    parts = form.parts
    norms = tf.add_n([sum_of_squares(p, list(range(1, p.shape.rank))) for p in parts])
    joined = lambda ts: tf.reshape(tf.concat([tf.reshape(t, [-1]) for t in ts], 0), shape)
    sum_sq = joined([sum_of_squares(p, 0) for p in parts]) * b2 if elementwise else None
    return sum_sq, norms * b2, joined([tf.reduce_sum(p, 0) for p in parts])


# From this many weights (K C), the cross terms as one matrix product over all pairs of
# positions, their factors stacked (inner size B T(T+1)/2), rather than one product per pair
# added up: the `[K, C]` result is written once instead of T(T+1)/2 times. At B=32 one product
# took 0.64-0.78x the time of the pairs' at K C = 262,144-2,359,296 (VGG16's last
# convolutions: 9.2 against 14.4 ms at T=4), 1.2x at 65,536 (`benchmarks/step_cost.py --outer`).
CROSS_JOINED = 2 ** 18


def joins_cross_terms(k, c):
    """Whether the cross terms of an `Outer` form of `k` by `c` weights are one matrix product
    (`CROSS_JOINED`)."""
    return k * c >= CROSS_JOINED


def cross_terms(a, d, joined):
    """`[K, C]`: `sum_n g_n^2` for `g_n = sum_t a_nt^T d_nt` (`a [B, T, K]`, `d [B, T, C]`).
    `g_n[k, c]^2` expands into `sum_{t,s} (a_nt a_ns)_k (d_nt d_ns)_c`, so the batch's sum is
    a matrix product per pair of positions (each off-diagonal pair counted twice), or, with
    `joined`, one product of the pairs' factors stacked."""
    t = a.shape[1]
    pairs = [(i, j) for i in range(t) for j in range(i, t)]
    a = [a[:, i] * a[:, j] for i, j in pairs]
    d = [d[:, i] * d[:, j] if i == j else 2.0 * d[:, i] * d[:, j] for i, j in pairs]
    if joined:
        stacked = lambda xs: tf.reshape(tf.stack(xs, 1), [-1, xs[0].shape[-1]])
        return tf.matmul(stacked(a), stacked(d), transpose_a=True)
    return tf.add_n([tf.matmul(x, y, transpose_a=True) for x, y in zip(a, d)])


def _rows(form, shape, b2, elementwise):
    """Rows hit twice by one example add up before squaring: a segment sum per
    (example, row) pair; sizes stay `B x N x dim`."""
    vocab, dim = shape[0], shape[-1]
    b = tf.shape(form.ids)[0]
    example = tf.repeat(tf.range(tf.cast(b, tf.int64)), tf.shape(form.ids)[1])
    pairs, index = tf.unique(example * vocab + tf.reshape(form.ids, [-1]))
    per_pair = tf.math.unsorted_segment_sum(tf.reshape(form.rows, [-1, dim]), index, tf.size(pairs))
    squares = tf.square(per_pair)
    norms = tf.math.unsorted_segment_sum(tf.reduce_sum(squares, 1), pairs // vocab, b) * b2
    sum_sq = tf.math.unsorted_segment_sum(squares, pairs % vocab, vocab) * b2 if elementwise else None
    return sum_sq, norms, None


def project(form, vector, b):
    """`[B]`: `g_n . v` for the per-example gradients `g_n` that `form` describes (built from
    the mean loss's gradient, so times `b`), and `vector` shaped as the variable's use.

    Linear in `g_n`, so no per-example gradient is built: for `Outer`, `sum_t (a_nt V) . d_nt`
    (one matrix product, V as `[K, C]`); for `Rows`, the gathered rows of V dotted with the
    rows; for `Explicit`, the dot product itself."""
    if isinstance(form, Outer):
        v = tf.reshape(tf.cast(vector, form.a.dtype), [form.a.shape[-1], form.d.shape[-1]])
        dots = tf.matmul(form.a, v) * form.d         # [B, K] x [K, C], or [B, T, K] x [K, C]
        return per_example_sum(dots) * b
    if isinstance(form, Rows):
        v = tf.cast(vector, form.rows.dtype)
        table = tf.reshape(v, [-1, form.rows.shape[-1]])
        return tf.reduce_sum(tf.gather(table, form.ids) * form.rows, [1, 2]) * b
    g = explicit(form, [-1])            # Explicit or Pieces: [B, elements]
    return tf.linalg.matvec(g, tf.reshape(tf.cast(vector, g.dtype), [-1])) * b


class Projector:
    """The per-example gradients of a whole model, kept in their forms: dot products
    `g_n . v` with any vector (`__call__`) and, one variable at a time, the gradients
    themselves (`explicit`), computed after the fact (e.g. after the update, when the
    optimizer's step `v` is known).

    `parts[i]` is variable i's list of `(form, shape, scale)` (its uses; empty when no
    gradient reaches it); the per-example gradients are `scale` times those the form
    describes. `concat` joins projectors of disjoint batches (micro-batches), `scaled`
    multiplies one by a factor; each answers the same methods.
    """

    def __init__(self, parts, batch):
        self.parts, self.batch = parts, batch

    def __call__(self, vectors):
        """`[B]`: `sum_i g_n,i . vectors[i]`, over every variable i (float32, float64 if a
        variable is)."""
        terms = [project(form, tf.reshape(v, shape), scale)
                 for uses, v in zip(self.parts, vectors) for form, shape, scale in uses]
        dtype = tf.float64 if any(t.dtype == tf.float64 for t in terms) else tf.float32
        return tf.add_n([tf.zeros([self.batch], dtype)] + [tf.cast(t, dtype) for t in terms])

    def explicit(self, i, variable_shape, start=None, stop=None):
        """`[n, *variable_shape]`: the per-example gradients of variable i (their uses summed),
        of the examples `start:stop` (default all): built a slice at a time, a caller never
        holds B x (all parameters) at once."""
        uses = self.parts[i]
        cut = slice(start, stop)
        if not uses:
            n = (stop if stop is not None else self.batch) - (start or 0)
            return tf.zeros([n, *variable_shape])
        return tf.add_n([tf.reshape(explicit(_sliced(form, cut), shape), [-1, *variable_shape]) * scale
                         for form, shape, scale in uses])

    def pieces(self):
        """The projectors of disjoint parts of the batch that this one joins (itself)."""
        return [self]

    def outer(self, i):
        """`(a [B, K], d [B, C], scale)` when variable i's per-example gradients are one plain
        outer product `scale * a_n^T d_n` (a Dense kernel), else None."""
        uses = self.parts[i]
        if len(uses) == 1 and isinstance(uses[0][0], Outer) and uses[0][0].a.shape.rank == 2:
            form, _, scale = uses[0]
            return form.a, form.d, scale
        return None

    def scaled(self, factor):
        """The projector of the per-example gradients times `factor` (a loss scale undone)."""
        return _Scaled(self, factor)

    @staticmethod
    def concat(projectors):
        """The projector of disjoint batches one after another (micro-batches)."""
        return _Concatenated(projectors)


class _Concatenated(Projector):
    def __init__(self, projectors):       # no `parts`: its pieces have theirs
        self.projectors = projectors
        self.batch = sum(p.batch for p in projectors)

    def __call__(self, vectors):
        return tf.concat([p(vectors) for p in self.projectors], 0)

    def explicit(self, i, variable_shape, start=None, stop=None):
        if start is not None or stop is not None:
            raise NotImplementedError("slices of concatenated projectors: slice its pieces()")
        return tf.concat([p.explicit(i, variable_shape) for p in self.projectors], 0)

    def pieces(self):
        return [piece for p in self.projectors for piece in p.pieces()]

    def outer(self, i):
        return None          # a variable's factors are its pieces'; see pieces()


class _Scaled(Projector):
    def __init__(self, inner, factor):
        self.inner, self.factor, self.batch = inner, factor, inner.batch

    def __call__(self, vectors):
        dots = self.inner(vectors)
        return dots * tf.cast(self.factor, dots.dtype)

    def explicit(self, i, variable_shape, start=None, stop=None):
        g = self.inner.explicit(i, variable_shape, start, stop)
        return g * tf.cast(self.factor, g.dtype)

    def pieces(self):
        return [_Scaled(p, self.factor) for p in self.inner.pieces()]

    def outer(self, i):
        found = self.inner.outer(i)
        return None if found is None else (found[0], found[1], found[2] * self.factor)


def _sliced(form, cut):
    """The form of the examples `cut` (a slice of the batch axis)."""
    if isinstance(form, Pieces):
        return Pieces([p[cut] for p in form.parts])
    return type(form)(*(t[cut] for t in form))


def projector_tensors(projector):
    """The tensors of a projector's forms (and batch size), to return from a `tf.function`."""
    if isinstance(projector, _Concatenated):
        return [projector_tensors(p) for p in projector.projectors]
    if isinstance(projector, _Scaled):
        return [projector_tensors(projector.inner), projector.factor]
    return [[tuple(form) for form, _, _ in uses] for uses in projector.parts], projector.batch


def projector_from(like, tensors):
    """The projector shaped as `like` (made while tracing) over `tensors` (returned values)."""
    if isinstance(like, _Concatenated):
        return _Concatenated([projector_from(p, t) for p, t in zip(like.projectors, tensors)])
    if isinstance(like, _Scaled):
        return _Scaled(projector_from(like.inner, tensors[0]), tensors[1])
    forms, batch = tensors
    parts = [[(type(form)(*values), shape, scale) for (form, shape, scale), values in zip(uses, got)]
             for uses, got in zip(like.parts, forms)]
    return Projector(parts, batch)
