"""Curvature of the mean loss of one batch: Hessian-vector products and what they give.

Everything here evaluates the batch's mean loss `L = (1/B) sum_n l_n` at the model's
current weights, inside a `tf.function` or eagerly:

- `hvp`: `H v` by forward-over-backward differentiation (a forward-mode accumulator
  around the backward pass: about the cost of two gradients, any model, exact);
- `hessian`: the whole `[P, P]` Hessian by the Jacobian of the gradient (small models: it
  builds P Hessian-vector products);
- `hutchinson_trace`: `tr H ~ mean_k v_k . H v_k` over Rademacher vectors (Hutchinson 1989),
  unbiased; `hutchinson_diagonal`: `diag H ~ mean_k v_k * H v_k`;
- `ggn_mc_diagonal`: the Monte-Carlo generalized Gauss-Newton diagonal (BackPACK's
  DiagGGNMC): labels drawn from the model's own predictive distribution, then the mean of
  the squared per-example gradients of the loss on them, `(1/B) sum_n g_n(y~)^2`, from the
  gradient moments (the layer-wise rules: one more forward and backward pass). Its
  expectation is the GGN diagonal, which equals the Hessian's for a piecewise-linear
  network (ReLU) with the crossentropy or squared loss;
- `max_eigenvalue`: the eigenvalue of largest magnitude by the Lanczos method on `hvp`;
- `noise_terms`: `tr(H Sigma)` and `G^T H G`, the numerator and denominator of the
  Hessian-aware gradient noise scale `B_noise` (McCandlish et al. 2018), from probes,
  per-example dot products and Hessian-vector products.
"""

import math

import tensorflow as tf

from tfmbgd import losses
from tfmbgd.engine.fields import flatten, unflatten
from tfmbgd.engine.moments import gradient_moments
from tfmbgd.errors import UserError

ESTIMATORS = ("hutchinson", "exact", "ggn_mc")


def _handles(variables):
    """What a forward accumulator and a tape watch for Keras variables: the tf.Variables."""
    return [getattr(v, "value", v) for v in variables]


def mean_loss(model, loss_fn, x, y):
    per_example = loss_fn(y, model(x, training=True))
    if per_example.dtype != tf.float64:
        per_example = tf.cast(per_example, tf.float32)
    return tf.reduce_mean(per_example)


def hvp(model, loss_fn, x, y, vectors):
    """`[H v]`: the Hessian of the batch's mean loss times `vectors` (a list aligned with
    `model.trainable_variables`), by forward-over-backward differentiation."""
    variables = model.trainable_variables
    tangents = [tf.cast(v, w.dtype) for v, w in zip(vectors, variables)]
    with tf.autodiff.ForwardAccumulator(_handles(variables), tangents) as accumulator:
        with tf.GradientTape() as tape:
            loss = mean_loss(model, loss_fn, x, y)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [accumulator.jvp(g, unconnected_gradients=tf.UnconnectedGradients.ZERO) for g in grads]


def hessian(model, loss_fn, x, y, limit=4096):
    """The `[P, P]` Hessian of the batch's mean loss over all trainable parameters, flattened
    in `model.trainable_variables` order (a UserError beyond `limit` parameters)."""
    variables = model.trainable_variables
    size = sum(math.prod(v.shape) for v in variables)
    if size > limit:
        raise UserError(f"the exact Hessian of {size} parameters is too large (limit {limit}); "
                        "use the hutchinson or ggn_mc estimator")
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = mean_loss(model, loss_fn, x, y)
        grads = inner.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat = flatten(grads)
    rows = outer.jacobian(flat, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.concat([tf.reshape(r, [size, -1]) for r in rows], 1)


def rademacher(variables, seed):
    """Random +-1 vectors shaped like `variables`, from a stateless `seed` ([2] int)."""
    out = []
    for i, v in enumerate(variables):
        bits = tf.random.stateless_uniform(v.shape, seed=seed + [0, i], minval=0, maxval=2, dtype=tf.int32)
        out.append(tf.cast(2 * bits - 1, v.dtype))
    return out


def rademacher_probes(variables, samples, seed):
    """`samples` Rademacher vectors shaped like `variables`, each from its own part of the
    stateless `seed` ([2] int)."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int32)
    return [rademacher(variables, seed + [0, 1000 * k]) for k in range(samples)]


def hutchinson(model, loss_fn, x, y, samples=1, seed=(0, 0)):
    """`(trace, [diagonal per variable])` estimates from `samples` Rademacher vectors."""
    variables = model.trainable_variables
    trace, diagonal = 0.0, [tf.zeros(v.shape, v.dtype) for v in variables]
    for v in rademacher_probes(variables, samples, seed):
        hv = hvp(model, loss_fn, x, y, v)
        products = [a * b for a, b in zip(v, hv)]
        trace += tf.add_n([tf.reduce_sum(tf.cast(p, tf.float32)) for p in products])
        diagonal = [d + p for d, p in zip(diagonal, products)]
    return trace / samples, [d / samples for d in diagonal]


def sampled_labels(loss_fn, outputs, seed):
    """Labels drawn from the model's predictive distribution for `loss_fn` (tfmbgd's
    crossentropy: a class from the softmax of the logits; mse: the output plus Gaussian
    noise of variance K/2, the inverse of the loss's curvature 2/K in each of K outputs)."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int32)
    if loss_fn is losses.crossentropy:
        logits = tf.cast(outputs, tf.float32)
        return tf.reshape(tf.random.stateless_categorical(tf.reshape(logits, [-1, logits.shape[-1]]), 1, seed,
                                                          dtype=tf.int32), [-1])
    if loss_fn is losses.mse:
        k = outputs.shape[-1]
        noise = tf.random.stateless_normal(tf.shape(outputs), seed, dtype=outputs.dtype)
        return outputs + noise * (k / 2.0) ** 0.5
    raise UserError("the ggn_mc curvature samples labels from the model's predictive distribution, known for "
                    "tfmbgd.losses.crossentropy and tfmbgd.losses.mse only; use the hutchinson estimator")


def ggn_mc_diagonal(model, loss_fn, x, outputs, seed=(0, 0), method="auto"):
    """The Monte-Carlo GGN diagonal per variable: `(1/B) sum_n g_n(y~_n)^2` with one label
    `y~_n` drawn per example from the model's predictions `outputs`."""
    y_tilde = tf.stop_gradient(sampled_labels(loss_fn, outputs, seed))
    m = gradient_moments(model, loss_fn, x, y_tilde, method=method, elementwise=True)
    b = tf.cast(m.batch_size, tf.float32)
    return [tf.cast(s, tf.float32) / b for s in m.sum_sq]


RESTART = 20      # Lanczos vectors kept before a restart (ARPACK's default for one eigenvalue)


def max_eigenvalue(model, loss_fn, x, y, max_iterations=100, rtol=1e-3, atol=1e-6, seed=(0, 0), start=None):
    """The Hessian's eigenvalue of largest magnitude (with its sign), by the Lanczos method
    with Hessian-vector products (as Cockpit's `eigsh`, largest magnitude).

    Lanczos runs of at most `RESTART` products, each restarted from the last run's Ritz
    vector, with the vectors of a run reorthogonalized in full (`RESTART x P` numbers are
    kept); stopped when the Ritz pair's residual `|H v - lambda v|` (from the recurrence,
    no extra product) is at most `atol + rtol * |lambda|` (Cockpit's tolerances), or after
    `max_iterations` products. `start`: a list shaped like the variables (a random vector
    when None or zero), e.g. the last eigenvector. Returns `(eigenvalue, eigenvector,
    products)`.

    Power iteration, the simpler choice, stalls when two eigenvalues of opposite sign have
    nearly the same magnitude (common: the Hessian of a network is indefinite), and a
    stopping rule on the change of its estimate then fires far from the answer."""
    variables = model.trainable_variables
    size = sum(math.prod(v.shape) for v in variables)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int32)
    flat = lambda vs: flatten([tf.cast(v, tf.float32) for v in vs])
    unflat = lambda vector: unflatten(vector, variables)
    random = tf.random.stateless_normal([size], seed, dtype=tf.float32)
    q = random
    if start is not None:
        given = flat(start)
        q = tf.where(tf.norm(given) > 0, given, random)
    m = min(RESTART, max_iterations)

    def ritz(alphas, betas, j):
        """The eigenpair of largest magnitude of the tridiagonal matrix of steps 0..j (rows
        past j are zero: they add zero eigenvalues, never a larger magnitude)."""
        off = (betas * tf.cast(tf.range(m) < j, tf.float32))[:-1]
        values, vectors = tf.linalg.eigh(tf.linalg.diag(alphas) + tf.linalg.diag(off, k=1)
                                         + tf.linalg.diag(off, k=-1))
        top = tf.argmax(tf.abs(values))
        return values[top], vectors[:, top]

    def run(q, budget):
        """One Lanczos run from `q` of at most `budget` products: `(value, Ritz vector,
        products, converged)`."""
        steps = tf.minimum(budget, m)

        def body(j, q, previous, basis, alphas, betas, value, residual):
            basis = tf.tensor_scatter_nd_update(basis, [[j]], q[None])
            w = flat(hvp(model, loss_fn, x, y, unflat(q)))
            a = tf.reduce_sum(q * w)
            w = w - a * q - tf.where(j > 0, betas[tf.maximum(j - 1, 0)], 0.0) * previous
            w = w - tf.linalg.matvec(basis, tf.linalg.matvec(basis, w), transpose_a=True)   # reorthogonalize
            b = tf.norm(w)
            alphas = tf.tensor_scatter_nd_update(alphas, [[j]], [a])
            betas = tf.tensor_scatter_nd_update(betas, [[j]], [b])
            value, vector = ritz(alphas, betas, j)
            return j + 1, w / tf.maximum(b, 1e-30), q, basis, alphas, betas, value, tf.abs(b * vector[j])

        def more(j, q, previous, basis, alphas, betas, value, residual):
            return (j < steps) & (residual > atol + rtol * tf.abs(value))

        first = (tf.constant(0), q / tf.norm(q), tf.zeros([size]), tf.zeros([m, size]), tf.zeros([m]),
                 tf.zeros([m]), tf.constant(0.0), tf.constant(float("inf")))
        j, _, _, basis, alphas, betas, value, residual = tf.while_loop(more, body, first)
        _, vector = ritz(alphas, betas, j - 1)
        return value, tf.linalg.matvec(basis, vector, transpose_a=True), j, \
            residual <= atol + rtol * tf.abs(value)

    def restart(used, q, value, converged):
        value, q, steps, converged = run(q, max_iterations - used)
        return used + steps, q, value, converged

    used, q, value, _ = tf.while_loop(lambda used, q, value, converged: (used < max_iterations) & ~converged,
                                      restart, (tf.constant(0), q, tf.constant(0.0), tf.constant(False)))
    return value, unflat(q), used


def weighted_gradient(model, loss_fn, x, y, weights):
    """`sum_n weights[n] g_n`: the gradient of the per-example losses weighted by the constant
    `weights` ([B]), one backward pass."""
    variables = model.trainable_variables
    weights = tf.stop_gradient(weights)
    with tf.GradientTape() as tape:
        per_example = loss_fn(y, model(x, training=True))
        total = tf.reduce_sum(tf.cast(per_example, weights.dtype) * weights)
    return tape.gradient(total, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def noise_terms(model, loss_fn, x, y, dots, probes):
    """`(tr(H Sigma), G^T H G)`, the terms of `B_noise = tr(H Sigma) / G^T H G` (McCandlish et
    al. 2018, Appendix A), from one batch split in two halves, in the variables' dtype.

    `H` is the Hessian of the mean loss, `Sigma` the covariance of the per-example gradients
    `g_n`, `G` the true gradient. `H` is taken on the first half of the batch, `Sigma` and
    the mean gradient on the second: on the same examples the two are correlated, and the
    ratio of the averaged terms comes out biased (on the `linear` data set at B=32, 18 %
    below the closed form; split, within the averages' sampling error). For each probe v
    (Rademacher: `E v v^T = I`), `v^T H Sigma v = (H v) . (Sigma v)`, and `Sigma v = (sum_n
    g_n (g_n . v) - b m (m . v)) / (b - 1)` over the second half (b examples, mean m) needs
    only the dot products `g_n . v` (`dots`, e.g. the step's `forms.Projector`) and one
    backward pass of the losses weighted by them; the mean over probes is unbiased for
    `tr(H Sigma)`. `G^T H G` takes one Hessian-vector product along m, unbiased as `|G|^2` is
    for `B_simple`: `E[m^T H m] = G^T H G + tr(H Sigma) / b`, so the estimate is `m^T H m -
    tr(H Sigma) / b` (it can be negative on one batch).

    Args:
      dots: `vectors -> [B]`, `g_n . vectors` for the whole batch (a list aligned with the
        variables).
      probes: a list of probe vectors, each a list aligned with the variables.
    Cost: per probe, one Hessian-vector product on half the batch (about one gradient), the
    dot products and one backward pass; one more backward pass for m and one more
    Hessian-vector product for `G^T H G`. Needs a batch of at least 4.
    """
    variables = model.trainable_variables
    dtype = tf.float64 if any(v.dtype == tf.float64 for v in variables) else tf.float32
    dot = lambda a, b: tf.add_n([tf.reduce_sum(tf.cast(u, dtype) * tf.cast(w, dtype)) for u, w in zip(a, b)])
    n = tf.shape(tf.nest.flatten(x)[0])[0]
    half = n // 2
    first = lambda t: tf.nest.map_structure(lambda u: u[:half], t)
    x_h, y_h = first(x), first(y)
    b = tf.cast(n - half, dtype)
    rest = tf.cast(tf.range(n) >= half, dtype)                   # 1 on the second half
    m = [tf.cast(t, dtype) for t in weighted_gradient(model, loss_fn, x, y, rest / b)]
    total = 0.0
    for v in probes:
        c = tf.cast(dots(v), dtype) * rest
        weighted = weighted_gradient(model, loss_fn, x, y, c)
        m_dot = tf.reduce_sum(c) / b                              # m . v
        sigma_v = [(tf.cast(w, dtype) - b * mu * m_dot) / (b - 1) for w, mu in zip(weighted, m)]
        total += dot(hvp(model, loss_fn, x_h, y_h, v), sigma_v)
    trace = total / len(probes)
    ghg = dot(m, hvp(model, loss_fn, x_h, y_h, m))
    return trace, ghg - trace / b


def hutchinson_noise_terms(model, loss_fn, x, y, dots, samples=1, seed=(0, 0)):
    """`noise_terms` with `samples` Rademacher probes drawn from the stateless `seed`: the
    estimate of `tr(H Sigma)` is unbiased and its variance falls as 1 / samples."""
    vectors = rademacher_probes(model.trainable_variables, samples, seed)
    return noise_terms(model, loss_fn, x, y, dots, vectors)
