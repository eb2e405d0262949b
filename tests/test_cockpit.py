"""Cockpit's instruments (issue 18) against oracles that share no code with them: numpy on
the per-example gradients of the non-vectorized Jacobian or the single-example loop, the
whole Hessian by the non-vectorized Jacobian of the gradient (numpy's trace, diagonal and
`eigh`), finite differences, and hand arithmetic on a one-weight quadratic."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_layerwise import FALLBACK, PROBLEMS, SPEC, in_dtype, make

import zoo
from conftest import PROBLEMS as SMALL_PROBLEMS
from conftest import make_problem, oracle_per_example, read_histograms, read_scalars
from tfmbgd import instruments, losses, models, optimizers
from tfmbgd.config import TrainConfig
from tfmbgd.engine import gradients, hessian
from tfmbgd.engine.moments import measured_moments, per_example_dots
from tfmbgd.errors import UserError
from tfmbgd.instruments import Cockpit
from tfmbgd.instruments.trajectory import fit_alpha
from tfmbgd.loop import steps, training
from tfmbgd.loop.update import make_update


def _flat_loop_gradients(model, loss_fn, x, y):
    """`[B, P]` per-example gradients from the single-example loop, float64."""
    g = gradients.per_example_gradients(model, loss_fn, x, y, method="loop")
    return np.concatenate([np.reshape(np.asarray(t, np.float64), (len(np.asarray(t)), -1)) for t in g], 1)


def _unflat(vector, variables):
    out, at = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        out.append(tf.constant(vector[at:at + size].reshape(v.shape), v.dtype))
        at += size
    return out


# --- P_n = g_n . v from the forms of every rule ------------------------------------------

@pytest.mark.parametrize("spec", PROBLEMS + FALLBACK, ids=[p["id"] for p in PROBLEMS + FALLBACK])
def test_per_example_dots_of_every_rule_equal_the_loops(spec):
    model, loss_fn, x, y = make(spec)
    flat = _flat_loop_gradients(model, loss_fn, x, y)
    method = "auto" if spec in FALLBACK else "layerwise"
    got = per_example_dots(model, loss_fn, x, y, method=method)         # P_n = g_n . mean
    np.testing.assert_allclose(got.numpy(), flat @ flat.mean(0), rtol=1e-9,
                               atol=1e-9 * np.abs(flat).max() ** 2)
    v = np.random.default_rng(1).normal(size=flat.shape[1])
    got = per_example_dots(model, loss_fn, x, y, _unflat(v, model.trainable_variables), method=method)
    np.testing.assert_allclose(got.numpy(), flat @ v, rtol=1e-9, atol=1e-9 * np.abs(flat @ v).max())
    keras.backend.clear_session()       # layer names count from zero again for test_layerwise's checks


def test_per_example_dots_of_the_every_rule_zoo_model_in_float64():
    model, x, y = in_dtype(lambda: zoo.make("every_rule", batch=4), "float64")
    x = tf.nest.map_structure(lambda t: t.astype(np.float64) if t.dtype.kind == "f" else t, x)
    flat = _flat_loop_gradients(model, losses.crossentropy, x, y)
    got = per_example_dots(model, losses.crossentropy, x, y, method="layerwise")
    np.testing.assert_allclose(got.numpy(), flat @ flat.mean(0), rtol=1e-9)


@pytest.mark.parametrize("method", ["vectorized", "jacobian"])
def test_per_example_dots_of_the_per_example_methods(method):
    model, loss_fn, x, y = make(PROBLEMS[-1])
    flat = _flat_loop_gradients(model, loss_fn, x, y)
    got = per_example_dots(model, loss_fn, x, y, method=method)
    np.testing.assert_allclose(got.numpy(), flat @ flat.mean(0), rtol=1e-9)


@pytest.mark.parametrize("spec", ["mlp_tanh", "conv_same_stride2"])
def test_micro_batches_project_on_the_whole_batchs_mean(spec):
    # The convolution's per-example kernels are kept a kernel offset at a time
    # (`forms.Pieces`): joined, sliced and dotted they are the loop's.
    model, loss_fn, x, y = make(SPEC[spec], batch=6)
    flat = _flat_loop_gradients(model, loss_fn, x, y)

    @tf.function
    def dots(x, y):
        m, project = measured_moments(model, loss_fn, x, y, micro_batch=4)
        return project(m.mean), project.explicit(0, tuple(model.trainable_variables[0].shape))
    got, first = dots(x, y)
    np.testing.assert_allclose(got.numpy(), flat @ flat.mean(0), rtol=1e-9)
    size = int(np.prod(model.trainable_variables[0].shape))
    np.testing.assert_allclose(first.numpy().reshape(6, -1), flat[:, :size], rtol=1e-9, atol=1e-12)
    m, project = measured_moments(model, loss_fn, x, y)
    some = project.explicit(0, tuple(model.trainable_variables[0].shape), 1, 4).numpy()
    np.testing.assert_allclose(some.reshape(3, -1), flat[1:4, :size], rtol=1e-9, atol=1e-12)


# --- gradient tests ------------------------------------------------------------------------

def _values(model, loss_fn, x, y, active, learning_rate=0.1):
    """One statistics step of plain SGD with `active` (built here), as train.py runs it."""
    x, y = tf.constant(x), tf.constant(y)
    variables = model.trainable_variables
    s = steps.Steps(model, loss_fn, make_update("manual", variables, learning_rate), instruments=active,
                    classification=loss_fn is losses.crossentropy)
    return {k: v.numpy() for k, v in s.with_stats(x, y).items()}


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-4), ("float64", 1e-10)])
def test_gradient_tests_and_cabs_match_their_formulas_in_numpy(problem, dtype, rel):
    # Bollapragada et al. 2018 and Balles et al. 2017 as Cockpit 1.0.2 computes them, from
    # numpy per-example gradients: P_n = g_n . mean. In float64 too (issue 28: the inner test
    # mixed a float32 B with float64 dot products and raised a TypeError).
    model, loss_fn, x, y = make_problem(problem, dtype=dtype)
    g = np.concatenate([o.reshape(len(x), -1) for o in oracle_per_example(model, loss_fn, x, y)], 1)
    b, mean = len(x), g.mean(0)
    m2, p = mean @ mean, g @ mean
    s2 = np.sum(g ** 2)
    loss = np.mean(np.asarray(loss_fn(y, model(x)), np.float64))
    want = {"grad_test/norm": np.sqrt((s2 - b * m2) / (b * (b - 1) * m2)),
            "grad_test/inner": np.sqrt((np.sum(p ** 2) - b * m2 ** 2) / (b * (b - 1) * m2 ** 2)),
            "grad_test/ortho": np.sqrt((s2 - np.sum(p ** 2) / m2) / (b * (b - 1) * m2)),
            "batch_size/cabs": 0.1 * (s2 - b * m2) / (b * loss)}
    active = instruments.create(["norm_test", "inner_test", "ortho_test", "cabs"], learning_rate=0.1)
    values = _values(model, loss_fn, x, y, active, learning_rate=0.1)
    for tag, value in want.items():
        assert values[tag] == pytest.approx(value, rel=rel), tag


def test_every_preset_runs_in_float64():
    model, loss_fn, x, y = make_problem(SMALL_PROBLEMS[1], dtype="float64")
    for preset in ("economy", "business", "full"):
        cockpit = Cockpit(model, loss_fn, optimizers.MiniBatchSGD(0.1), instruments=preset)
        values = [cockpit.step(x, y) for _ in range(2)][-1]
        assert all(np.all(np.isfinite(v)) for k, v in values.items() if k != "step/alpha"), preset


# --- alpha -----------------------------------------------------------------------------------

def _quadratic(w0):
    """One weight w, l_n = (w - y_n)^2 (mse of the output w): the mean loss's minimum is at
    mean(y), its curvature 2."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign([[w0]])
    return model


@pytest.mark.parametrize("lr, want", [(0.5, 0.0), (1.0, 1.0), (0.25, -0.5)],
                         ids=["to_the_minimum", "twice_as_long", "half_way"])
def test_alpha_by_hand_on_a_one_weight_quadratic(lr, want):
    # From w0, SGD steps t = 2 lr |w0 - mean(y)| along the slope; the quadratic's other side
    # is at 2 |w0 - mean(y)|, so alpha = 2 t / (2 |w0 - mean(y)|) - 1 = 2 lr - 1. Both points
    # see the same batch, so the four observations lie on one quadratic and the weighted fit
    # is exact whatever the per-example variances.
    model = _quadratic(3.0)
    x, y = np.ones((4, 1), np.float32), np.array([[0.0], [1.0], [2.0], [-1.0]], np.float32)
    cockpit = Cockpit(model, losses.mse, keras.optimizers.SGD(lr), instruments=["alpha"])
    first = cockpit.step(x, y)
    assert "step/alpha" not in first             # nothing to describe yet
    cockpit.step(x, y)
    assert cockpit.history[0]["step/alpha"] == pytest.approx(want, abs=1e-4)
    assert 2 * lr - 1 == want


def test_alpha_fit_by_hand():
    # A quadratic q(s) = 1 - 2 s + s^2 (minimum at 1, other side at 2), observed at 0 and t.
    q, dq = (lambda s: 1 - 2 * s + s * s), (lambda s: -2 + 2 * s)
    f64 = lambda v: tf.constant(v, tf.float64)
    for t, want in [(1.0, 0.0), (2.0, 1.0), (0.5, -0.5), (0.0, -1.0)]:
        got = fit_alpha(f64(t), (f64(q(0)), f64(q(t))), (f64(dq(0)), f64(dq(t))), (f64(0.3), f64(0.1)),
                        (f64(0.2), f64(0.0)))
        assert float(got) == pytest.approx(want, abs=1e-6), t     # a zero variance weighs 1e10
    # concave along the step: -1
    ones = (f64(1), f64(1))
    got = fit_alpha(f64(1.0), (f64(1.0), f64(0.0)), (f64(-0.5), f64(-1.5)), ones, ones)
    assert float(got) == -1.0


# --- curvature -------------------------------------------------------------------------------

def _small(seed=0, dtype="float64"):
    keras.utils.set_random_seed(seed)
    model = in_dtype(lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                               keras.layers.Dense(3)]), dtype)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(6, 3)), dtype)
    y = tf.constant(rng.integers(0, 3, 6).astype(np.int32))
    return model, x, y


def _oracle_hessian(model, loss_fn, x, y):
    """The Hessian of the mean loss by the non-vectorized Jacobian of the gradient."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(loss_fn(y, model(x)))
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    rows = outer.jacobian(flat, variables, experimental_use_pfor=False)
    return np.concatenate([np.reshape(r.numpy(), (flat.shape[0], -1)) for r in rows], 1)


def test_hessian_vector_products_match_finite_differences():
    model, x, y = _small()
    variables = model.trainable_variables
    rng = np.random.default_rng(3)
    v = [tf.constant(rng.normal(size=w.shape)) for w in variables]
    got = np.concatenate([np.ravel(t) for t in hessian.hvp(model, losses.crossentropy, x, y, v)])

    def grad_at(sign, eps=1e-5):
        for w, d in zip(variables, v):
            w.assign_add(sign * eps * d)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(losses.crossentropy(y, model(x)))
        g = np.concatenate([np.ravel(t) for t in tape.gradient(loss, variables)])
        for w, d in zip(variables, v):
            w.assign_sub(sign * eps * d)
        return g
    want = (grad_at(1) - grad_at(-1)) / 2e-5
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_hessian_trace_eigenvalue_and_tic_match_the_whole_hessian():
    model, x, y = _small()
    h = _oracle_hessian(model, losses.crossentropy, x, y)
    eig = np.linalg.eigvalsh(h)
    top = eig[np.argmax(np.abs(eig))]
    g = _flat_loop_gradients(model, losses.crossentropy, x, y)
    noise = np.sum(g ** 2, 0) / len(g)                     # S2_k / B
    value, vector, cold = hessian.max_eigenvalue(model, losses.crossentropy, x, y)
    again, _, warm = hessian.max_eigenvalue(model, losses.crossentropy, x, y, start=vector)
    assert float(value) == pytest.approx(top, rel=1e-3) and float(again) == pytest.approx(top, rel=1e-3)
    assert int(warm) < int(cold)                  # started from the eigenvector
    active = [instruments.HessTrace("exact"), instruments.HessMaxEV(), instruments.TICDiag("exact"),
              instruments.TICTrace("exact")]
    values = _values(model, losses.crossentropy, x, y, active)
    assert values["curvature/hess_trace"] == pytest.approx(np.trace(h), rel=1e-5)
    assert values["curvature/hess_max_ev"] == pytest.approx(top, rel=1e-3)     # the tolerance, rtol 1e-3

    assert values["curvature/tic_diag"] == pytest.approx(np.sum(noise / (np.diag(h) + 1e-7)), rel=1e-4)
    assert values["curvature/tic_trace"] == pytest.approx(noise.sum() / (np.trace(h) + 1e-7), rel=1e-4)
    first = model.trainable_variables[0]
    size = int(np.prod(first.shape))
    assert values[f"curvature/hess_trace/{first.path}"] == pytest.approx(np.trace(h[:size, :size]), rel=1e-5)


def test_top_eigenvalue_of_an_indefinite_hessian_with_a_near_tie():
    # L(w) = sum_i a_i w_i^2 / 2, so H = diag(a): eigenvalues 1 and -0.99 nearly tie in
    # magnitude, where power iteration crawls (ratio 0.99 per product) and its stopping
    # rule fires early; Lanczos has the answer after three products.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign([[0.3], [-0.2], [0.5]])
    a = np.array([1.0, -0.99, 0.1], np.float32)
    x, y = tf.constant(np.eye(3, dtype=np.float32)), tf.constant(a[:, None])
    quadratic = lambda y, z: 1.5 * y[:, 0] * z[:, 0] ** 2          # mean over B=3 -> sum a_i w_i^2 / 2
    value, vector, iterations = hessian.max_eigenvalue(model, quadratic, x, y)
    assert float(value) == pytest.approx(1.0, rel=1e-5) and int(iterations) <= 4
    np.testing.assert_allclose(np.abs(np.ravel(vector[0])), [1, 0, 0], atol=1e-4)


@pytest.mark.slow     # many probes, to show the estimator unbiased
def test_hutchinson_is_v_h_v_and_unbiased():
    model, x, y = _small()
    h = _oracle_hessian(model, losses.crossentropy, x, y)
    variables = model.trainable_variables
    v = np.concatenate([np.ravel(t) for t in hessian.rademacher(variables, tf.constant([4, 2]))])
    assert set(np.unique(v)) == {-1.0, 1.0}
    trace, _ = hessian.hutchinson(model, losses.crossentropy, x, y, samples=1, seed=[4, 2])
    assert float(trace) == pytest.approx(v @ h @ v, rel=1e-5)
    many, diag = hessian.hutchinson(model, losses.crossentropy, x, y, samples=400, seed=[1, 1])
    spread = np.sqrt(2 * np.sum(h ** 2) / 400)     # the estimator's standard error, Rademacher
    assert abs(float(many) - np.trace(h)) < 4 * spread


def test_ggn_mc_diagonal_expects_the_hessians_of_a_linear_softmax_model():
    # For logits W x (no hidden layer) the Hessian is the GGN: the Monte-Carlo GGN diagonal,
    # averaged over draws of the labels, tends to the exact diagonal.
    keras.utils.set_random_seed(0)
    model = in_dtype(lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)]), "float64")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(8, 3)))
    y = tf.constant(rng.integers(0, 3, 8).astype(np.int32))
    want = np.diag(_oracle_hessian(model, losses.crossentropy, x, y))
    outputs = model(x)
    draw = tf.function(lambda seed: tf.concat([tf.reshape(d, [-1]) for d in hessian.ggn_mc_diagonal(
        model, losses.crossentropy, x, outputs, seed)], 0))
    got = np.mean([draw(tf.constant([s, 0])).numpy() for s in range(300)], 0)
    np.testing.assert_allclose(got, want, rtol=0.15, atol=0.02 * want.max())


# --- element histograms -----------------------------------------------------------------------

def test_element_histograms_count_numpys_per_example_elements(problem):
    model, loss_fn, x, y = make_problem(problem)
    g = np.concatenate([o.reshape(len(x), -1) for o in oracle_per_example(model, loss_fn, x, y)], 1)
    before = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
    values = _values(model, loss_fn, x, y, instruments.create(["grad_hist", "grad_hist_2d"]))
    rows = values["grad_hist/elements"]
    want, edges = np.histogram(np.clip(g, -2, 2 - 1e-9), bins=100, range=(-2, 2))
    np.testing.assert_allclose(rows[:, 0], edges[:-1]) and np.testing.assert_allclose(rows[:, 1], edges[1:])
    assert rows[:, 2].sum() == g.size
    assert np.abs(rows[:, 2] - want).sum() <= 2        # float32 against float64 at a bin edge
    r = np.abs(before).max()
    params = np.broadcast_to(before, g.shape)
    want2, _, _ = np.histogram2d(np.clip(g, -2, 2 - 1e-9).ravel(),
                                 np.clip(params, -r, r * (1 - 1e-9)).ravel(),
                                 bins=(40, 50), range=((-2, 2), (-r, r)))
    level = np.log1p(want2)
    image = values["grad_hist/elements_vs_params"]
    assert image.shape == (1, 160, 200, 3) and image.dtype == np.uint8      # 4x4 pixels per bin
    cells = image[0, 2::4, 2::4, 0]                                          # off the axes and frame
    np.testing.assert_allclose(cells, np.round(255 * (1 - level / level.max())), atol=3)
    # the axes: gradient 0 across (pixel row 80), parameter 0 down (column 100), blue where light
    light = image[0, 81, :, 0] >= 128
    assert (image[0, 80, light[:]] == [40, 110, 220]).all() and light.any()
    column = image[0, :, 100]
    assert ((column == [40, 110, 220]).all(axis=1) | (image[0, :, 101, 0] < 128)).all()


# --- the runs ----------------------------------------------------------------------------------

def test_a_run_with_the_economy_set_writes_alpha_at_the_step_it_describes(tmp_path):
    # calls of 5 steps: the statistics step 4 ends a call and its end point, step 5, begins
    # the next one
    config = TrainConfig(dataset="linear", model="mlp", hidden=(8,), batch_size=16, epochs=1, stats_every=4,
                         log_every=50, checkpoint_every=0, instruments=("economy",), deterministic=True,
                         steps_per_call=5, logdir=str(tmp_path))
    result = training.train(config, verbose=0)
    scalars = read_scalars(f"{result.run_dir}/train")
    measured = sorted({s for s, _ in scalars["grad_test/inner"]})
    assert measured[:3] == [0, 4, 8] and all(s % 4 == 0 for s in measured)     # on the schedule
    alpha = sorted(s for s, _ in scalars["step/alpha"])
    assert alpha == measured          # from steps t and t + 1, written at the step of the update
    loss_steps = {s for s, _ in scalars["loss"]}
    assert {1, 5, 9} <= loss_steps    # the end steps write the loss, as statistics steps do
    for tag in ("grad_test/norm", "grad_test/ortho", "step/update_size", "step/distance"):
        assert tag in scalars, tag
    assert "grad_hist/elements" in read_histograms(f"{result.run_dir}/train")


def test_presets_and_refusals_are_one_line():
    assert instruments.expand(["economy"]) == instruments.ECONOMY
    assert set(instruments.expand(["full"])) == set(instruments.ECONOMY) | {"tic_diag", "hess_trace",
                                                                             "hess_max_ev", "grad_hist_2d"}
    with pytest.raises(UserError, match="unknown instrument 'cheap'; presets: economy, business, full"):
        instruments.create(["cheap"])
    with pytest.raises(UserError, match="curvature estimator must be one of hutchinson, exact, ggn_mc"):
        instruments.HessTrace("diag")
    model, x, y = _small(dtype="float32")
    with pytest.raises(UserError, match="exact Hessian of 31 parameters is too large"):
        hessian.hessian(model, losses.crossentropy, x, y, limit=10)
    with pytest.raises(UserError, match="ggn_mc curvature samples labels"):
        hessian.sampled_labels(lambda y, z: z[:, 0], tf.zeros([2, 3]), tf.constant([0, 0]))
    with pytest.raises(UserError, match="built model"):
        Cockpit(keras.Sequential([keras.layers.Dense(2)]), losses.mse, keras.optimizers.SGD(0.1))


def test_cockpit_runs_inside_a_users_tf_function_and_trains_as_sgd():
    model, x, y = _small(dtype="float32")
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    cockpit = Cockpit(model, losses.crossentropy, keras.optimizers.SGD(0.1), instruments="business")

    @tf.function
    def loop(x, y):
        first = cockpit.step(x, y)
        second = cockpit.step(x, y)
        return first, second
    first, second = loop(x, y)
    assert np.isfinite(second["step/alpha"].numpy()) and not np.isfinite(first["step/alpha"].numpy())
    optimizer = keras.optimizers.SGD(0.1)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(losses.crossentropy(y, twin(x)))
        variables = twin.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit_compile,steps_per_execution", [(False, 1), (True, 8)],
                         ids=["plain", "xla spe=8"])
def test_fit_writes_the_economy_set_as_cockpit_steps_give_it(tmp_path, xla_allowed, jit_compile,
                                                              steps_per_execution):
    # fit every 4 steps measures steps 0 and 4, alpha's end points at 1 and 5, and writes alpha at 0, 4;
    # a Cockpit stepping every batch of the same data from the same weights is the reference.
    from tfmbgd import callbacks, fit, optimizers
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    model = fit.with_statistics(models.build("mlp", (6,), 2, hidden=(8,), seed=5))
    model.compile(optimizer=optimizers.MiniBatchSGD(0.1), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    statistics = callbacks.GradientStatistics(str(tmp_path), freq=4,
                                              more_instruments=["economy", "grad_hist_2d"])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[statistics])
    written, hists = read_scalars(tmp_path / "train"), read_histograms(tmp_path / "train")
    twin = models.build("mlp", (6,), 2, hidden=(8,), seed=5)
    cockpit = Cockpit(twin, losses.crossentropy, optimizers.MiniBatchSGD(0.1), ["economy", "grad_hist_2d"])
    for i in range(8):
        cockpit.step(x[8 * i: 8 * i + 8], y[8 * i: 8 * i + 8])
    assert [s for s, _ in written["step/alpha"]] == [0, 4]
    for tag in ("step/alpha", "grad_test/inner", "grad_test/ortho", "grad_test/norm", "step/update_size"):
        assert [s for s, _ in written[tag]] == [0, 4], tag
        for s, value in written[tag]:
            assert value == pytest.approx(cockpit.history[s][tag], rel=1e-4, abs=1e-6), (tag, s)
    for s, h in hists["grad_hist/elements"]:
        assert h.num == cockpit.history[s]["grad_hist/elements"][:, 2].sum() == 8 * (6 * 8 + 8 + 8 * 2 + 2)
    images = _images(tmp_path / "train", "grad_hist/elements_vs_params")
    assert sorted(images) == [0, 4]
    for s, image in images.items():
        np.testing.assert_array_equal(image, cockpit.history[s]["grad_hist/elements_vs_params"][0])


def _images(event_dir, tag):
    """`{step: [H, W, 3] uint8}` of an image tag, by TensorBoard's reader (PNG decoded)."""
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(event_dir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {e.step: tf.io.decode_png(tf.make_ndarray(e.tensor_proto)[2]).numpy() for e in acc.Tensors(tag)}


def test_gradient_accumulation_gives_the_whole_batchs_instruments(problem):
    # micro-batches of 4: the tests project on the whole batch's mean, the histogram counts
    # every example's elements; the same values as the batch at once
    model, loss_fn, x, y = make_problem(problem)
    x, y = tf.constant(x), tf.constant(y)
    weights = model.get_weights()
    out = {}
    for micro in (None, 4):
        model.set_weights(weights)
        s = steps.Steps(model, loss_fn, make_update("manual", model.trainable_variables, 0.1),
                        instruments=instruments.create(["economy"]), micro_batch=micro)
        out[micro] = {k: v.numpy() for k, v in s.with_stats(x, y).items()}
    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert out[4]["grad_hist/elements"][:, 2].sum() == len(x) * size
    for tag in ("grad_test/inner", "grad_test/ortho", "grad_test/norm", "step/update_size"):
        assert out[4][tag] == pytest.approx(out[None][tag], rel=1e-4), tag
    np.testing.assert_allclose(out[4]["grad_hist/elements"], out[None]["grad_hist/elements"], atol=2)


def test_instruments_that_need_the_forms_refuse_replicas_before_a_run_starts(tmp_path):
    config = TrainConfig(dataset="linear", model="linear", batch_size=8, epochs=1, strategy="mirrored",
                         cpu_devices=2, instruments=("alpha", "norm_test"), logdir=str(tmp_path))
    with pytest.raises(UserError, match="alpha: not computed across replicas yet; run on one device"):
        training.train(config, verbose=0)
    assert not any(tmp_path.iterdir())           # no run directory left behind


@pytest.mark.parametrize("fused", [False, True], ids=["joined", "fused"])
def test_the_statistics_step_families_match_numpy_in_float64(problem, fused, monkeypatch):
    # Issue 28: every family of statistics through the step train.py and fit run, in a
    # float64 model with float64 inputs, against numpy on the loop's per-example gradients:
    # norms, variances and the noise scale's terms, GSNR (ours and Cockpit's), EB, the
    # gradient tests and CABS (test above), the Hessian trace (hessian tests, float64).
    # The sums over parameters both ways: on the joined vectors, and XLA-fused per variable
    # (variance.FUSE_FROM, here lowered to 0 parameters).
    from tfmbgd.instruments import variance
    monkeypatch.setattr(variance, "FUSE_FROM", 0 if fused else variance.FUSE_FROM)
    model, loss_fn, x, y = make_problem(problem, dtype="float64")
    g = np.concatenate([o.reshape(len(x), -1) for o in oracle_per_example(model, loss_fn, x, y)], 1)
    b, mean = len(x), g.mean(0)
    var = g.var(0, ddof=1)
    trace = var.sum()
    defined = var > 1e-20
    active = instruments.default(elementwise=True) + instruments.create(["gsnr_biased", "eb"])
    values = _values(model, loss_fn, x, y, active)
    want = {"grad/norm": np.sqrt(mean @ mean), "grad_var/trace": trace, "grad_var/of_mean": trace / b,
            "grad_snr/mean_gsnr": np.mean(mean[defined] ** 2 / var[defined]),
            "grad_snr/mean_gsnr_biased": np.mean(mean ** 2 / (g.var(0) + 1e-5)),
            "early_stopping/eb": 1 - b / g.shape[1] * np.sum(mean ** 2 / (var + 1e-5))}
    for tag, value in want.items():
        assert values[tag] == pytest.approx(value, rel=1e-10), tag
