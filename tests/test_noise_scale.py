"""The smoothed gradient noise scale against the closed form of the linear data set."""

import numpy as np
import pytest
import tensorflow as tf

from tfmbgd import data, losses, models, stats
from tfmbgd.engine.moments import gradient_moments


def test_smoothed_b_simple_matches_closed_form_on_linear_data():
    truth = data.load("linear", seed=0).truth
    d = truth.kernel.size
    model = models.build("linear", (d,), 0, seed=0)
    kernel = truth.kernel + np.linspace(-0.6, 0.6, d)          # fixed weights, off the optimum
    bias = truth.bias + 0.4
    model.trainable_variables[0].assign(kernel[:, None])
    model.trainable_variables[1].assign([bias])
    mean, cov = data.linear_gradient_moments(kernel, bias, truth)
    expected = np.trace(cov) / (mean @ mean)

    ema = stats.NoiseScaleEMA(decay=0.995, dtype=tf.float64)
    step = tf.function(lambda x, y: ema.update(*stats.noise_scale_terms(
        gradient_moments(model, losses.mse, x, y, "auto", elementwise=False))))
    rng = np.random.default_rng(1)
    b = 32
    for _ in range(2000):       # fresh examples from the generating distribution
        x = rng.normal(size=(b, d))
        y = x @ truth.kernel + truth.bias + truth.noise_std * rng.normal(size=b)
        smoothed = float(step(tf.constant(x, tf.float32), tf.constant(y[:, None], tf.float32)))
    # An average over about 1/(1 - 0.995) = 200 noisy batches: a few percent of sampling error.
    assert smoothed == pytest.approx(expected, rel=0.05)


# --- B_noise = tr(H Sigma) / G^T H G ---------------------------------------------------------

def _tiny(dtype="float64", batch=6):
    """A 2-1-2 tanh network (7 parameters), its batch, and the exact oracles: the Hessian of
    the mean loss over the batch's first half (where `noise_terms` takes it) by a Jacobian of
    the gradient without pfor, and the per-example gradients of the second half (where it
    takes the covariance and the mean) by the single-example loop."""
    import keras
    from test_cockpit import _flat_loop_gradients

    keras.utils.set_random_seed(0)
    keras.backend.set_floatx(dtype)
    try:
        inputs = keras.Input((2,))
        model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(1, activation="tanh")(inputs)))
    finally:
        keras.backend.set_floatx("float32")
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(batch, 2)), dtype)
    y = tf.constant((rng.random(batch) < 0.8).astype(np.int32))     # mostly one class: a clear gradient
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(losses.crossentropy(y[:batch // 2], model(x[:batch // 2])))
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    rows = outer.jacobian(flat, variables, experimental_use_pfor=False)
    h = tf.concat([tf.reshape(r, [flat.shape[0], -1]) for r in rows], 1).numpy()
    g = _flat_loop_gradients(model, losses.crossentropy, x, y)
    return model, x, y, h, g[batch // 2:]


def _dots(g):
    """`g_n . v` for the whole batch from the loop's gradients of its second half (the first
    half's dots are not used: zeros)."""
    return lambda v: tf.constant(np.concatenate([np.zeros(len(g)), g @ np.concatenate([np.ravel(t)
                                                                                       for t in v])]))


def _terms(model, x, y, g, probes):
    from test_cockpit import _unflat

    from tfmbgd.engine import hessian

    return hessian.noise_terms(model, losses.crossentropy, x, y, _dots(g),
                               [_unflat(p, model.trainable_variables) for p in probes])


def test_hessian_noise_terms_with_every_probe_equal_the_exact_hessian_and_covariance():
    # With all 2^P Rademacher vectors the probes' mean of v^T H Sigma v is exactly
    # tr(H Sigma) (E v v^T = I holds exactly over all of them); float64, P = 7.
    import itertools

    model, x, y, h, g = _tiny()
    sigma = np.cov(g, rowvar=False, ddof=1)
    mean = g.mean(0)
    probes = [np.array(signs) for signs in itertools.product((-1.0, 1.0), repeat=h.shape[0])]
    trace, ghg = _terms(model, x, y, g, probes)
    want = np.trace(h @ sigma)
    assert float(trace) == pytest.approx(want, rel=1e-6)
    assert float(ghg) == pytest.approx(mean @ h @ mean - want / len(g), rel=1e-6)


def test_hessian_noise_terms_are_unbiased_and_their_variance_falls_as_one_over_probes():
    # Seeded probes, 1 and 4 per estimate, 40 seeds each: both means within four standard
    # errors of the exact tr(H Sigma), and four probes' variance about a quarter of one's
    # (the ratio of two variances from 40 draws each lies well within 2..8).
    from tfmbgd.engine import hessian

    model, x, y, h, g = _tiny()
    want = np.trace(h @ np.cov(g, rowvar=False, ddof=1))
    dots = _dots(g)
    estimate = lambda k, seed: float(hessian.hutchinson_noise_terms(model, losses.crossentropy, x, y, dots, k,
                                                                    (seed, 5))[0])
    draws = {k: np.array([estimate(k, seed) for seed in range(40)]) for k in (1, 4)}
    for d in draws.values():
        assert abs(d.mean() - want) < 4 * d.std(ddof=1) / np.sqrt(len(d))
    assert 2 < draws[1].var(ddof=1) / draws[4].var(ddof=1) < 8


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hessian_noise_scale_instrument_in_a_cockpit_step(dtype):
    # The instrument as a user runs it: its probes' estimate of tr(H Sigma) within five of its
    # standard deviations (computed from the exact H Sigma) of the exact value, G^T H G + tr / B
    # equal to mean^T H mean of the exact Hessian, and the smoothed B_noise with decay 0 their
    # ratio (where G^T H G > 0: B_noise is undefined otherwise, and not written); measured
    # before the step's update.
    import keras

    from tfmbgd import instruments
    from tfmbgd.instruments.noise_scale import HessianNoiseScale

    model, x, y, h, g = _tiny(dtype, batch=32)
    a = h @ np.cov(g, rowvar=False, ddof=1)
    s = (a + a.T) / 2
    samples = 16
    sd = np.sqrt(2 * (np.sum(s ** 2) - np.sum(np.diag(s) ** 2)) / samples)   # Rademacher: Var v^T S v
    mean = g.mean(0)
    cockpit = instruments.Cockpit(model, losses.crossentropy, keras.optimizers.SGD(0.1),
                                  instruments=[HessianNoiseScale(decay=0.0, samples=samples)])
    values = cockpit.step(x, y)
    trace, ghg = float(values["noise_scale/hessian/tr_h_sigma"]), float(values["noise_scale/hessian/g_h_g"])
    tol = 1e-6 if dtype == "float64" else 1e-3
    assert abs(trace - np.trace(a)) < 5 * sd
    assert ghg + trace / len(g) == pytest.approx(mean @ h @ mean, rel=tol, abs=tol * abs(np.trace(a)))
    assert ghg > 0 and float(values["noise_scale/hessian"]) == pytest.approx(trace / ghg, rel=tol)


def test_smoothed_b_noise_matches_closed_form_on_linear_data():
    # On the linear data set the Hessian of the squared error is 2 E[(x, 1)(x, 1)^T] = 2 I
    # (x ~ N(0, I)), so B_noise = tr(H Sigma) / G^T H G = tr(Sigma) / |G|^2: the closed form
    # of `data.linear_gradient_moments`. The step's own path (the projector's dots, the
    # half-batch Hessian), averaged like the instrument averages it over 3000 fresh batches
    # (decay 0.998: about 500 batches weigh in, each a noisy ratio term): within 8 %. On the
    # same examples for H and Sigma it came out 18 % low (`hessian.noise_terms`).
    from tfmbgd.engine import hessian
    from tfmbgd.engine.moments import measured_moments

    truth = data.load("linear", seed=0).truth
    d = truth.kernel.size
    model = models.build("linear", (d,), 0, seed=0)
    kernel = truth.kernel + np.linspace(-0.6, 0.6, d)
    bias = truth.bias + 0.4
    model.trainable_variables[0].assign(kernel[:, None])
    model.trainable_variables[1].assign([bias])
    mean, cov = data.linear_gradient_moments(kernel, bias, truth)
    h = 2 * np.eye(d + 1)
    expected = np.trace(h @ cov) / (mean @ h @ mean)

    ema = stats.NoiseScaleEMA(decay=0.998, dtype=tf.float64)

    @tf.function
    def step(x, y, seed):
        _, project = measured_moments(model, losses.mse, x, y, elementwise=False)
        trace, ghg = hessian.hutchinson_noise_terms(model, losses.mse, x, y, project, 1, seed)
        return ema.update(tf.cast(trace, tf.float64), tf.cast(ghg, tf.float64))

    rng = np.random.default_rng(1)
    for i in range(3000):
        x = rng.normal(size=(32, d))
        y = x @ truth.kernel + truth.bias + truth.noise_std * rng.normal(size=32)
        smoothed = float(step(tf.constant(x, tf.float32), tf.constant(y[:, None], tf.float32),
                              tf.constant([i, 3])))
    assert smoothed == pytest.approx(expected, rel=0.08)
