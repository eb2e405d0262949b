"""The optimizer family against the Keras built-ins, over 100+ model.fit steps; saving."""

import keras
import numpy as np
import pytest
from keras import ops

from tfmbgd import models, optimizers

FAMILY = [  # (ours, the Keras built-in it must match)
    dict(id="momentum", ours=lambda: optimizers.MomentumSGD(0.05, momentum=0.9),
         keras=lambda: keras.optimizers.SGD(0.05, momentum=0.9)),
    dict(id="nesterov", ours=lambda: optimizers.MomentumSGD(0.05, momentum=0.8, nesterov=True),
         keras=lambda: keras.optimizers.SGD(0.05, momentum=0.8, nesterov=True)),
    dict(id="rmsprop", ours=lambda: optimizers.RMSprop(0.003, rho=0.8),
         keras=lambda: keras.optimizers.RMSprop(0.003, rho=0.8)),
    dict(id="adagrad", ours=lambda: optimizers.Adagrad(0.05),
         keras=lambda: keras.optimizers.Adagrad(0.05)),
    dict(id="adam", ours=lambda: optimizers.Adam(0.003, beta_1=0.8, beta_2=0.99),
         keras=lambda: keras.optimizers.Adam(0.003, beta_1=0.8, beta_2=0.99)),
]


def _data(n=200):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] > x[:, 1]).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)


def _compiled(optimizer):
    model = models.build("mlp", (6,), 3, hidden=(8,), seed=4)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("spec", FAMILY, ids=[f["id"] for f in FAMILY])
def test_matches_keras_builtin_over_100_fit_steps(spec):
    x, y = _data()
    ours, theirs = _compiled(spec["ours"]()), _compiled(spec["keras"]())
    for model in (ours, theirs):
        model.fit(x, y, batch_size=16, epochs=8, shuffle=False, verbose=0)     # 13 x 8 = 104 steps
    assert int(ours.optimizer.iterations) == 104
    start = models.build("mlp", (6,), 3, hidden=(8,), seed=4)
    assert max(np.abs(a - b).max() for a, b in zip(ours.get_weights(), start.get_weights())) > 1e-2
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", FAMILY, ids=[f["id"] for f in FAMILY])
def test_save_and_load_mid_training_continues_identically(spec, tmp_path):
    x, y = _data()
    model = _compiled(spec["ours"]())
    model.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0)
    path = tmp_path / "mid.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for m in (model, loaded):
        m.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 40
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip_keeps_subclass_arguments():
    opt = optimizers.MomentumSGD(0.2, momentum=0.7, nesterov=True)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, optimizers.MomentumSGD)
    assert again.momentum == 0.7 and again.nesterov is True and again.get_config() == opt.get_config()


def test_a_user_subclass_trains_in_fit():
    class SignSGD(optimizers.MiniBatchSGD):      # defined here, not shipped
        def update_step(self, gradient, variable, learning_rate):
            lr = ops.cast(learning_rate, variable.dtype)
            self.assign_sub(variable, lr * ops.sign(ops.cast(gradient, variable.dtype)))

    x, y = _data()
    model = _compiled(SignSGD(0.01))
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=50, epochs=3, shuffle=False, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    # Every step moves every weight with a non-zero gradient by exactly lr.
    steps = np.abs(model.get_weights()[0] - before[0]) / 0.01
    np.testing.assert_allclose(steps[steps > 0], np.round(steps[steps > 0]), atol=1e-3)


def test_bad_momentum_is_rejected():
    with pytest.raises(ValueError, match="momentum"):
        optimizers.MomentumSGD(0.1, momentum=1.5)
