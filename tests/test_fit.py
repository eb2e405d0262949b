"""Gradient statistics inside model.fit: equal to the custom loop's, for every kind of model."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_histograms, read_scalars
from tfmbgd import fit, gradients, losses, models, optimizers, stats
from tfmbgd.errors import UserError
from tfmbgd.moments import gradient_moments

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 0.5).astype(np.int32)


def test_fit_statistics_equal_the_custom_loops(tmp_path):
    x, y = _data()
    model = fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
    model.configure_statistics(str(tmp_path / "fit"), stats_every=3, elementwise=True)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)     # 8 steps
    model.flush_statistics()
    written = read_scalars(tmp_path / "fit")

    # The oracle: a loop written out here, with the single-example loop's moments, the
    # statistics as pure functions of them and SGD by hand; nothing of fit's or Steps' code.
    twin = models.build("mlp", (6,), 3, hidden=(8,), seed=5)
    paths = [v.path for v in twin.trainable_variables]
    ema = stats.NoiseScaleEMA(0.9)
    expected = {}
    for i in range(8):
        xb, yb = x[16 * (i % 4): 16 * (i % 4) + 16], y[16 * (i % 4): 16 * (i % 4) + 16]
        if i % 3 == 0:
            m = gradient_moments(twin, losses.crossentropy, xb, yb, method="loop", elementwise=True)
            values = dict(stats.statistics(m, paths), loss=tf.reduce_mean(m.losses),
                          accuracy=tf.constant(0.0))
            values["noise_scale/simple"] = ema.update(*stats.noise_scale_terms(m))
            expected[i] = {k: np.asarray(v) for k, v in values.items()}
            grads = m.mean
        else:
            _, grads = gradients.batch_gradients(twin, losses.crossentropy, xb, yb)
        for v, g in zip(twin.trainable_variables, grads):
            v.assign_sub(0.1 * g)
    tags = [t for t in expected[0] if t not in ("accuracy", "per_example_grad_norm")]
    assert {"grad/norm", "grad_var/trace", "grad_snr/mean_gsnr", "noise_scale/simple",
            "grad_var/hidden_1/kernel", "loss"} <= set(tags)
    for tag in tags:
        # B_simple is undefined (inf in the loop's dict) while noise hides the signal: not written
        want_steps = [s for s in (0, 3, 6) if np.isfinite(expected[s][tag])]
        assert [s for s, _ in written.get(tag, [])] == want_steps, (tag, sorted(written))
        for s, value in written[tag]:
            assert value == pytest.approx(float(expected[s][tag]), rel=1e-4, abs=1e-7), (tag, s)
    hist = read_histograms(tmp_path / "fit")["per_example_grad_norm"]
    assert [s for s, _ in hist] == [0, 3, 6] and all(h.num == 16 for _, h in hist)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class Subclassed(fit.GradientStatisticsMixin, keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def _functional():
    return fit.with_statistics(models.build("mlp", (6,), 3, hidden=(8,), seed=1))


def _sequential():
    return fit.with_statistics(keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                                 keras.layers.Dense(3)]))


def _direct_sequential():
    return fit.GradientStatisticsSequential([keras.Input((6,)), keras.layers.Dense(3)])


KINDS = [
    dict(id="functional", build=_functional, steps_per_execution=1),
    dict(id="sequential", build=_sequential, steps_per_execution=4),
    dict(id="direct_sequential", build=_direct_sequential, steps_per_execution=1),
    dict(id="subclassed", build=Subclassed, steps_per_execution=2),
]


@pytest.mark.parametrize("kind", KINDS, ids=[k["id"] for k in KINDS])
def test_every_kind_of_model_logs_statistics(kind, tmp_path, capsys):
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = kind["build"]()
    model(x[:1])                  # a subclassed model has no weights until it is called
    model.compile(optimizer=optimizers.Adam(0.01), loss=CE, metrics=["accuracy"],
                  steps_per_execution=kind["steps_per_execution"], jit_compile=False)
    model.configure_statistics(str(tmp_path), stats_every=2)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    model.flush_statistics()
    n = len(model.trainable_variables)      # said once, when fit first traces the step
    line = f"gradient statistics: {n} of {n} variables by the layer-wise rules"
    assert capsys.readouterr().out.count(line) == 1
    assert set(history.history) == {"loss", "accuracy"}
    written = read_scalars(tmp_path)
    assert [s for s, _ in written["grad_var/trace"]] == list(range(0, 16, 2))
    assert all(np.isfinite(v) and v > 0 for _, v in written["grad_var/trace"])
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_regularized_model_applies_the_penalty_gradient_on_statistics_steps(tmp_path):
    x, y = _data()
    weights = {}
    for with_stats in (True, False):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        out = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.1),
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=2))(inputs)
        model = fit.GradientStatisticsModel(inputs, out)
        model.compile(optimizer=optimizers.MiniBatchSGD(0.1), loss=CE)
        if with_stats:
            model.configure_statistics(str(tmp_path), stats_every=1)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights[with_stats] = model.get_weights()
    for a, b in zip(weights[True], weights[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jit_compiled_model_is_refused(tmp_path):
    # In its own process: with op determinism on (as in these tests) Keras turns XLA off.
    script = ("import keras, tfmbgd\n"
              "m = tfmbgd.fit.with_statistics(tfmbgd.models.build('mlp', (6,), 3))\n"
              "m.compile(optimizer='sgd', loss='mse', jit_compile=True)\n"
              "assert m.jit_compile is True\n"
              "try:\n    m.configure_statistics('unused')\n"
              "except ValueError as e:\n    print('refused:', e)\n"
              # XLA asked for after configure_statistics: a UserError, not XLA's own (issue 16)
              "m.compile(optimizer='sgd', loss='mse', jit_compile=False)\n"
              "m.configure_statistics('later')\n"
              "m.compile(optimizer='sgd', loss='mse', jit_compile=True)\n"
              "import numpy as np\n"
              "try:\n    m.fit(np.zeros((8, 6)), np.zeros((8, 3)), verbose=0)\n"
              "except tfmbgd.errors.UserError as e:\n    print('refused later:', e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert "refused:" in proc.stdout and "jit_compile=False" in proc.stdout, proc.stderr[-2000:]
    assert "refused later:" in proc.stdout and "XLA cannot compile" in proc.stdout, proc.stderr[-2000:]


def test_unbuilt_model_is_a_clear_error(tmp_path):
    keras.utils.set_random_seed(0)
    model = Subclassed()
    model.compile(optimizer="sgd", loss=CE)
    with pytest.raises(UserError, match="build it first"):
        model.configure_statistics(str(tmp_path))


def test_statistics_across_replicas_are_refused(tmp_path):
    from tfmbgd import distribute
    with distribute.make_strategy("mirrored", 2).scope():
        model = fit.with_statistics(models.build("mlp", (6,), 3, seed=0))
        model.compile(optimizer="sgd", loss=CE)
    with pytest.raises(UserError, match="2 replicas use train.py --strategy"):
        model.configure_statistics(str(tmp_path))


def test_subclassed_model_cannot_be_wrapped():
    keras.utils.set_random_seed(0)
    class Plain(keras.Model):
        def call(self, x):
            return x
    with pytest.raises(UserError, match="GradientStatisticsMixin"):
        fit.with_statistics(Plain())


def test_per_example_loss_from_compiled_losses():
    y, logits = tf.constant([0, 2]), tf.constant([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    want = losses.crossentropy(y, logits).numpy()
    np.testing.assert_allclose(fit.per_example_loss(CE)(y, logits).numpy(), want, rtol=1e-6)
    mse = fit.per_example_loss("mean_squared_error")(tf.ones((2, 1)), tf.zeros((2, 1)))
    np.testing.assert_allclose(mse.numpy(), [1.0, 1.0])
