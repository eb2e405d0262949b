"""MiniBatchSGD against hand arithmetic and keras.optimizers.SGD; serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmbgd import models
from tfmbgd.optimizers import MiniBatchSGD


def test_one_step_by_hand():
    v = keras.Variable(np.array([[1.0, 2.0], [-3.0, 0.5]], np.float32))
    MiniBatchSGD(learning_rate=0.5).apply_gradients([(tf.constant([[0.2, -0.4], [1.0, 0.0]]), v)])
    # w - lr * g: 1 - 0.1, 2 + 0.2, -3 - 0.5, 0.5 - 0
    np.testing.assert_array_equal(v.numpy(), np.array([[0.9, 2.2], [-3.5, 0.5]], np.float32))


def _fit(optimizer, epochs=3):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=96).astype(np.int32)
    model = models.build("mlp", (6,), 3, hidden=(8,), seed=3)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


def test_matches_keras_sgd_over_several_fit_epochs():
    ours = _fit(MiniBatchSGD(learning_rate=0.2))
    keras_sgd = _fit(keras.optimizers.SGD(learning_rate=0.2))
    assert int(ours.optimizer.iterations) == int(keras_sgd.optimizer.iterations) == 18
    start = models.build("mlp", (6,), 3, hidden=(8,), seed=3)
    moved = [np.abs(a.numpy() - b.numpy()).max() for a, b in zip(ours.weights, start.weights)]
    assert min(moved) > 1e-3, "training should have moved every variable"
    for a, b in zip(ours.weights, keras_sgd.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_config_round_trip():
    opt = MiniBatchSGD(learning_rate=0.05, clipnorm=1.5, name="mine")
    config = opt.get_config()
    assert config["learning_rate"] == pytest.approx(0.05) and config["clipnorm"] == 1.5
    again = MiniBatchSGD.from_config(config)
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, MiniBatchSGD) and restored.get_config() == config


def test_compiled_model_saves_and_loads(tmp_path):
    model = _fit(MiniBatchSGD(learning_rate=0.1), epochs=1)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, MiniBatchSGD)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(0.1)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_rejects_non_positive_learning_rate(bad):
    with pytest.raises(ValueError, match="learning_rate"):
        MiniBatchSGD(learning_rate=bad)
