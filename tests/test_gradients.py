"""Per-example and batch gradients against hand-derived numpy and finite differences."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import PROBLEMS, make_problem, oracle_per_example
from tfmbgd.engine import gradients

METHODS = gradients.METHODS


def numpy_per_example(model, x, y, loss):
    """Hand-derived per-example gradients of a tanh MLP (any depth, incl. none) in numpy.

    Forward: h_0 = x, h_k = tanh(h_{k-1} W_k + b_k), z = h_L W + b.
    Cross-entropy: dl/dz = softmax(z) - onehot(y). MSE with one output: dl/dz = 2 (z - y).
    Backward: dl/dh_{k-1} = delta_k W_k^T, delta_{k-1} = dl/dh_{k-1} * (1 - h_{k-1}^2);
    per example dl/dW_k = outer(h_{k-1}, delta_k), dl/db_k = delta_k.
    """
    params = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    kernels, biases = params[0::2], params[1::2]
    hs = [np.asarray(x, np.float64)]
    for w, b in zip(kernels[:-1], biases[:-1]):
        hs.append(np.tanh(hs[-1] @ w + b))
    z = hs[-1] @ kernels[-1] + biases[-1]
    if loss == "crossentropy":
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        delta = p - np.eye(z.shape[1])[np.asarray(y)]
    else:
        delta = 2.0 * (z - np.asarray(y, np.float64))
    grads = []
    for k in range(len(kernels) - 1, -1, -1):
        grads = [np.einsum("ni,nj->nij", hs[k], delta), delta] + grads
        if k:
            delta = (delta @ kernels[k].T) * (1.0 - hs[k] ** 2)
    return grads


def finite_differences(model, loss_fn, x, y, eps=1e-6):
    """Central differences of each per-example loss w.r.t. each parameter (float64 model)."""
    out = []
    for v in model.trainable_variables:
        base = v.numpy()
        grad = np.zeros((len(x),) + base.shape)
        for idx in np.ndindex(base.shape):
            for sign in (1, -1):
                w = base.copy()
                w[idx] += sign * eps
                v.assign(w)
                grad[(slice(None),) + idx] += sign * loss_fn(y, model(x)).numpy() / (2 * eps)
        v.assign(base)
        out.append(grad)
    return out


def assert_lists_close(actual, expected, rtol, atol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("method", METHODS)
def test_per_example_matches_hand_derived_numpy(problem, method):
    model, loss_fn, x, y = make_problem(problem)
    got = gradients.per_example_gradients(model, loss_fn, x, y, method=method)
    assert [g.shape for g in got] == [(len(x),) + tuple(v.shape) for v in model.trainable_variables]
    assert_lists_close(got, numpy_per_example(model, x, y, problem["loss"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_float64_per_example_matches_numpy_tightly(method):
    model, loss_fn, x, y = make_problem(PROBLEMS[1], dtype="float64")
    got = gradients.per_example_gradients(model, loss_fn, x, y, method=method)
    assert all(g.dtype == tf.float64 for g in got)
    assert_lists_close(got, numpy_per_example(model, x, y, "crossentropy"), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_per_example_matches_finite_differences(method):
    model, loss_fn, x, y = make_problem(PROBLEMS[1], dtype="float64")
    got = gradients.per_example_gradients(model, loss_fn, x, y, method=method)
    assert_lists_close(got, finite_differences(model, loss_fn, x, y), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_per_example_inside_tf_function(method):
    model, loss_fn, x, y = make_problem(PROBLEMS[1])
    fn = tf.function(lambda a, b: gradients.per_example_gradients(model, loss_fn, a, b, method))
    assert_lists_close(fn(x, y), oracle_per_example(model, loss_fn, x, y), rtol=1e-5, atol=1e-6)


def test_mean_loss_gradient_is_mean_of_per_example(problem):
    model, loss_fn, x, y = make_problem(problem)
    _, grads = gradients.batch_gradients(model, loss_fn, x, y, reduction="mean")
    oracle = oracle_per_example(model, loss_fn, x, y)
    assert_lists_close(grads, [o.mean(axis=0) for o in oracle], rtol=1e-5, atol=1e-7)


def test_sum_loss_gradient_is_b_times_mean(problem):
    model, loss_fn, x, y = make_problem(problem)
    loss_sum, g_sum = gradients.batch_gradients(model, loss_fn, x, y, reduction="sum")
    loss_mean, g_mean = gradients.batch_gradients(model, loss_fn, x, y, reduction="mean")
    b = len(x)
    np.testing.assert_allclose(loss_sum.numpy(), b * loss_mean.numpy(), rtol=1e-6)
    assert_lists_close(g_sum, [b * g.numpy() for g in g_mean], rtol=1e-5, atol=1e-6)


def test_single_example_backprops_accumulate_to_batch_gradient(problem):
    model, loss_fn, x, y = make_problem(problem)
    total = None
    for n in range(len(x)):
        _, _, grads = gradients.example_gradients(model, loss_fn, x[n], y[n])
        total = [g.numpy() for g in grads] if total is None else [t + g.numpy() for t, g in zip(total, grads)]
    _, g_sum = gradients.batch_gradients(model, loss_fn, x, y, reduction="sum")
    assert_lists_close(total, [g.numpy() for g in g_sum], rtol=1e-5, atol=1e-6)


def test_per_example_losses_and_outputs_are_returned(problem):
    model, loss_fn, x, y = make_problem(problem)
    expected_out = model(x).numpy()
    for method in METHODS:
        pe = gradients.per_example(model, loss_fn, x, y, method)
        np.testing.assert_allclose(pe.outputs.numpy(), expected_out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pe.losses.numpy(), loss_fn(y, expected_out).numpy(), rtol=1e-5, atol=1e-6)


def test_variable_that_does_not_affect_loss_gets_zeros():
    import keras
    model, loss_fn, x, y = make_problem(PROBLEMS[0])
    unused = keras.layers.Dense(2)
    unused.build((None, 5))
    inputs = model.inputs[0]
    side = keras.Model(inputs, [model.outputs[0], unused(inputs)])
    wrapped = keras.Model(inputs, side(inputs)[0])
    assert len(wrapped.trainable_variables) == 4
    for method in METHODS:
        got = gradients.per_example_gradients(wrapped, loss_fn, x, y, method)
        assert not np.any(got[2].numpy()) and not np.any(got[3].numpy())


def test_unknown_method_is_a_clear_error():
    model, loss_fn, x, y = make_problem(PROBLEMS[0])
    with pytest.raises(ValueError, match="per-example method must be one of"):
        gradients.per_example_gradients(model, loss_fn, x, y, method="magic")
