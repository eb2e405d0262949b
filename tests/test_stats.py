"""Moments and statistics against numpy on the oracle's per-example gradients."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import PROBLEMS, make_problem, oracle_per_example
from tfmbgd import stats
from tfmbgd.engine.moments import gradient_moments

METHODS = ("jacobian", "vectorized", "loop")


@pytest.mark.parametrize("method", METHODS)
def test_moments_match_numpy_on_oracle(problem, method):
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    m = gradient_moments(model, loss_fn, x, y, method=method, elementwise=True)
    assert m.batch_size == len(x)
    for got, o in zip(m.mean, oracle):
        np.testing.assert_allclose(got.numpy(), o.mean(axis=0), rtol=1e-5, atol=1e-7)
    for got, o in zip(m.sum_sq, oracle):
        np.testing.assert_allclose(got.numpy(), (o ** 2).sum(axis=0), rtol=1e-5, atol=1e-7)
    for got, o in zip(m.var_norms_sq, oracle):
        np.testing.assert_allclose(got.numpy(), (o.reshape(len(x), -1) ** 2).sum(axis=1), rtol=1e-5)
    total = sum((o.reshape(len(x), -1) ** 2).sum(axis=1) for o in oracle)
    np.testing.assert_allclose(m.norms_sq.numpy(), total, rtol=1e-5)


def test_variance_matches_numpy_var_ddof1(problem):
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    m = gradient_moments(model, loss_fn, x, y, method="vectorized")
    for got, o in zip(stats.variance(m), oracle):
        np.testing.assert_allclose(got.numpy(), np.var(o, axis=0, ddof=1), rtol=1e-4, atol=1e-6)


def test_variance_float64_is_tight():
    model, loss_fn, x, y = make_problem(PROBLEMS[1], dtype="float64")
    oracle = oracle_per_example(model, loss_fn, x, y)
    m = gradient_moments(model, loss_fn, x, y, method="loop")
    for got, o in zip(stats.variance(m), oracle):
        np.testing.assert_allclose(got.numpy(), np.var(o, axis=0, ddof=1), rtol=1e-10, atol=1e-14)


def test_traces_norms_and_variance_of_mean_match_numpy(problem):
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    m = gradient_moments(model, loss_fn, x, y, method="jacobian", elementwise=False)
    names = [v.path for v in model.trainable_variables]
    got = stats.summarize(m, model.trainable_variables)
    b = len(x)
    var_traces = [np.var(o, axis=0, ddof=1).sum() for o in oracle]
    mean_norms = [np.linalg.norm(o.mean(axis=0)) for o in oracle]
    for name, trace, norm in zip(names, var_traces, mean_norms):
        assert got[f"grad_var/{name}"] == pytest.approx(trace, rel=1e-4)
        assert got[f"grad/norm/{name}"] == pytest.approx(norm, rel=1e-5)
    assert got["grad_var/trace"] == pytest.approx(sum(var_traces), rel=1e-4)
    assert got["grad_var/of_mean"] == pytest.approx(sum(var_traces) / b, rel=1e-4)
    assert got["grad/norm"] == pytest.approx(np.sqrt(sum(n ** 2 for n in mean_norms)), rel=1e-5)


def test_batch_of_one_reports_no_variance():
    model, loss_fn, x, y = make_problem(PROBLEMS[1])
    m = gradient_moments(model, loss_fn, x[:1], y[:1], method="vectorized")
    got = stats.summarize(m, model.trainable_variables)
    assert "grad/norm" in got
    assert not [tag for tag in got if tag.startswith("grad_var")]


def test_variance_without_elementwise_moments_is_a_clear_error():
    model, loss_fn, x, y = make_problem(PROBLEMS[0])
    m = gradient_moments(model, loss_fn, x, y, method="vectorized", elementwise=False)
    assert m.sum_sq is None
    with pytest.raises(ValueError, match="elementwise=True"):
        stats.variance(m)


def test_mean_gsnr_matches_numpy(problem):
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    m = gradient_moments(model, loss_fn, x, y, method="auto", elementwise=True)
    mean = np.concatenate([o.mean(axis=0).ravel() for o in oracle])
    var = np.concatenate([np.var(o, axis=0, ddof=1).ravel() for o in oracle])
    defined = var > 1e-20
    want = np.mean(mean[defined] ** 2 / var[defined])
    got = stats.summarize(m, model.trainable_variables)
    # float32 moments; a parameter with a small variance divides its round-off by it.
    assert got["grad_snr/mean_gsnr"] == pytest.approx(want, rel=1e-3)
    assert "grad_snr/mean_gsnr" not in stats.summarize(
        gradient_moments(model, loss_fn, x, y, elementwise=False), model.trainable_variables)


def _xla_calls(graph):
    """Calls of XLA-compiled functions in `graph`."""
    return sum(1 for op in graph.get_operations()
               if op.type.endswith("PartitionedCall") and op.node_def.attr["_XlaMustCompile"].b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("above", [False, True], ids=["joined", "fused"])
def test_the_sums_over_parameters_are_fused_from_the_threshold_and_match_numpy(above, dtype):
    # GSNR (ours and Cockpit's) and EB sum a term over every parameter. From
    # variance.FUSE_FROM parameters the sums are one XLA-compiled function (fused loops per
    # variable); one parameter fewer, ops on the variables joined into vectors. Moments made
    # up in numpy, three variables, B = 6, a dead parameter (no spread) in each; numpy
    # computes the statistics from the definitions.
    from tfmbgd.engine.fields import GradientMoments
    from tfmbgd.instruments import gsnr, sgd, variance

    rng = np.random.default_rng(1)
    b, size = 6, variance.FUSE_FROM - (0 if above else 1)
    shapes = [(size // 2 - 3,), (3,), (size - size // 2,)]
    means = [rng.normal(size=s).astype(dtype) for s in shapes]
    sums = [(b * m.astype(np.float64) ** 2 + 0.5 + rng.exponential(size=m.shape)).astype(dtype)
            for m in means]
    for m, q in zip(means, sums):
        m[0] = q[0] = 0.0                     # a dead parameter: no spread, no ratio
    mean, sum_sq = np.concatenate(means).astype(np.float64), np.concatenate(sums).astype(np.float64)
    spread = sum_sq - b * mean ** 2
    var = spread / (b - 1)
    defined = spread > 0
    want = (np.mean(mean[defined] ** 2 / var[defined]),
            np.mean(mean ** 2 / (sum_sq / b - mean ** 2 + 1e-5)),
            1 - b * np.mean(mean ** 2 / (var + 1e-5)))

    def statistics(means, sums):
        m = GradientMoments(means, sums, None, None, None, b)
        eb = sgd._eb_terms
        total, = variance.parameter_sums(m, eb, sgd.EPSILON)
        return gsnr.mean_gsnr(m), gsnr.mean_gsnr_biased(m), 1 - b * total / size

    args = [[tf.constant(t) for t in ts] for ts in (means, sums)]
    got = tf.function(statistics)(*args)
    rel = 1e-10 if dtype == "float64" else 1e-4
    for g, w in zip(got, want):
        assert float(g) == pytest.approx(w, rel=rel)
    graph = tf.function(statistics).get_concrete_function(*args).graph
    assert _xla_calls(graph) == (3 if above else 0)
    assert defined.sum() == size - 3


def test_per_example_grad_norm_is_the_histogram_of_oracle_norms(problem):
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    want = np.sqrt(sum((o.reshape(len(x), -1) ** 2).sum(axis=1) for o in oracle))
    m = gradient_moments(model, loss_fn, x, y)
    got = stats.statistics(m, [v.path for v in model.trainable_variables])["per_example_grad_norm"]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert "per_example_grad_norm" not in stats.summarize(m, model.trainable_variables)
    assert all(isinstance(v, float) for v in stats.summarize(m, model.trainable_variables).values())


def test_noise_scale_terms_match_numpy(problem):
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    b = len(x)
    trace = sum(np.var(o, axis=0, ddof=1).sum() for o in oracle)
    mean_sq = sum((o.mean(axis=0) ** 2).sum() for o in oracle)
    got_trace, got_grad_sq = stats.noise_scale_terms(gradient_moments(model, loss_fn, x, y))
    assert float(got_trace) == pytest.approx(trace, rel=1e-4)
    # |mean|^2 - tr(Sigma) / B: a difference of two float32 terms of similar size cancels digits.
    assert float(got_grad_sq) == pytest.approx(mean_sq - trace / b, rel=1e-3, abs=1e-6)


def test_noise_scale_ema_smooths_numerator_and_denominator_separately():
    class Fake:   # moments reduced to what noise_scale_terms reads: B=2, known values
        def __init__(self, g1, g2):
            self.mean = [tf.constant([(g1 + g2) / 2])]
            self.var_norms_sq = [tf.constant([g1 ** 2, g2 ** 2])]
            self.batch_size = 2
    ema = stats.NoiseScaleEMA(decay=0.5)
    # batch (1, 3): mean 2, trace = (1 + 9 - 2 * 4) / 1 = 2, |G|^2 = 4 - 2/2 = 3
    # batch (0, 4): mean 2, trace = (0 + 16 - 8) = 8,       |G|^2 = 4 - 8/2 = 0
    first = float(ema.update(*stats.noise_scale_terms(Fake(1.0, 3.0))))
    second = float(ema.update(*stats.noise_scale_terms(Fake(0.0, 4.0))))
    assert first == pytest.approx(2 / 3)
    # EMAs: trace 0.25*2 + 0.5*8 = 4.5, |G|^2 0.25*3 + 0.5*0 = 0.75 -> 6, not mean(2/3, 8/0)
    assert second == pytest.approx(4.5 / 0.75)


def test_noise_scale_is_infinite_while_noise_hides_the_signal():
    class Fake:
        mean = [tf.constant([0.0])]
        var_norms_sq = [tf.constant([1.0, 1.0])]
        batch_size = 2
    assert np.isinf(float(stats.NoiseScaleEMA(decay=0.0).update(*stats.noise_scale_terms(Fake()))))


def test_cockpits_biased_mean_gsnr_matches_numpy(problem):
    # Cockpit's MeanGSNR (cockpit-for-pytorch 1.0.2) from BackPACK's 1/B-scaled gradients:
    # grad^2 / (B * sum((g_n / B)^2) - grad^2 + 1e-5), averaged over every parameter.
    from tfmbgd.instruments import gsnr
    model, loss_fn, x, y = make_problem(problem)
    oracle = oracle_per_example(model, loss_fn, x, y)
    b = len(x)
    grad = np.concatenate([o.mean(axis=0).ravel() for o in oracle])
    backpack_sgs = np.concatenate([((o / b) ** 2).sum(axis=0).ravel() for o in oracle])
    want = np.mean(grad ** 2 / (b * backpack_sgs - grad ** 2 + 1e-5))
    m = gradient_moments(model, loss_fn, x, y, method="auto", elementwise=True)
    got = float(gsnr.mean_gsnr_biased(m))
    assert got == pytest.approx(want, rel=1e-3)     # float32 moments, as mean_gsnr's test
    assert got != pytest.approx(float(stats.summarize(m, model.trainable_variables)["grad_snr/mean_gsnr"]),
                                rel=1e-2)           # not our unbiased GSNR
