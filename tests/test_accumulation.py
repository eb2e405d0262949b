"""Gradient accumulation: K micro-batches make the same update and statistics as one batch."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import PROBLEMS, make_problem, oracle_per_example
from tfmbgd import losses, models
from tfmbgd.config import TrainConfig
from tfmbgd.engine.moments import accumulated_moments, gradient_moments
from tfmbgd.loop import steps, training
from tfmbgd.loop.update import make_update


@pytest.mark.parametrize("micro", [1, 2, 4, 5])
def test_accumulated_moments_equal_the_whole_batch(micro):
    model, loss_fn, x, y = make_problem(PROBLEMS[1], dtype="float64")     # B = 6
    oracle = oracle_per_example(model, loss_fn, x, y)
    m = accumulated_moments(model, loss_fn, x, y, micro, method="auto", elementwise=True)
    assert m.batch_size == 6
    for i, o in enumerate(oracle):
        np.testing.assert_allclose(m.mean[i].numpy(), o.mean(axis=0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(m.sum_sq[i].numpy(), (o ** 2).sum(axis=0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(m.var_norms_sq[i].numpy(), (o.reshape(6, -1) ** 2).sum(1), rtol=1e-10)
    whole = gradient_moments(model, loss_fn, x, y)
    np.testing.assert_allclose(m.losses.numpy(), whole.losses.numpy(), rtol=1e-12)


def _updated(micro, reduction, stats_on, n_updates=3, update_batch=12):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(3)
    model = models.build("mlp", (5,), 3, hidden=(4,), seed=2)
    apply = make_update("keras", model.trainable_variables, 0.2, "momentum")
    s = steps.Steps(model, losses.crossentropy, apply, reduction=reduction, micro_batch=micro)
    outs = []
    for i in range(n_updates):
        x = tf.constant(rng.normal(size=(update_batch, 5)).astype(np.float32))
        y = tf.constant(rng.integers(0, 3, size=update_batch).astype(np.int32))
        outs.append((s.with_stats if i in stats_on else s.plain)(x, y))
    return [v.numpy() for v in model.trainable_variables], outs


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("micro", [3, 5])
def test_accumulation_equals_one_batch_k_times_larger(micro, reduction):
    whole, whole_out = _updated(None, reduction, stats_on={1})
    accumulated, acc_out = _updated(micro, reduction, stats_on={1})
    for a, b in zip(accumulated, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for tag in ("loss", "grad/norm", "grad_var/trace", "grad_var/of_mean", "noise_scale/simple"):
        assert float(acc_out[1][tag]) == pytest.approx(float(whole_out[1][tag]), rel=1e-4), tag
    np.testing.assert_allclose(acc_out[1]["per_example_grad_norm"], whole_out[1]["per_example_grad_norm"],
                               rtol=1e-5)


def test_train_with_accumulation_counts_updates(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), np.arange(40) % 2
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    config = TrainConfig(dataset=f"npz:{path}", hidden=(4,), batch_size=4, accumulate=3, epochs=2,
                         stats_every=2, logdir=str(tmp_path / "logs"))
    result = training.train(config, verbose=0)
    assert result.steps == 2 * 4                    # 40 = 3 updates of 12 + one of 4, per epoch
    with pytest.raises(ValueError, match="batch_size x accumulate"):
        training.train(dataclasses.replace(config, accumulate=11), verbose=0)
