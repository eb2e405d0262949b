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
