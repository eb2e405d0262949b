"""Data loading: bundled digits, the linear set's closed form, keras.datasets, npz files."""

import gzip
import os

import numpy as np
import pytest

from tfmbgd import data
from tfmbgd.errors import UserError


def test_digits_is_a_fixed_stratified_split_in_unit_range():
    ds = data.load("digits", seed=0)
    (x_tr, y_tr), (x_te, y_te) = ds.train, ds.test
    assert x_tr.shape == (1437, 8, 8, 1) and x_te.shape == (360, 8, 8, 1)
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    assert x_tr.min() == 0.0 and x_tr.max() == 1.0
    train_share = np.bincount(y_tr) / len(y_tr)
    test_share = np.bincount(y_te) / len(y_te)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)
    other = data.load("digits", seed=7)
    np.testing.assert_array_equal(other.test[1], y_te)


def test_linear_closed_form_matches_monte_carlo():
    truth = data.load("linear", seed=3).truth
    rng = np.random.default_rng(0)
    d = truth.kernel.size
    kernel, bias = truth.kernel + rng.normal(size=d), truth.bias - 0.7
    n = 400_000
    x = rng.normal(size=(n, d))
    y = x @ truth.kernel + truth.bias + truth.noise_std * rng.normal(size=n)
    r = x @ kernel + bias - y
    g = 2 * r[:, None] * np.hstack([x, np.ones((n, 1))])     # per-example gradient of (f - y)^2
    mean, cov = data.linear_gradient_moments(kernel, bias, truth)
    scale = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(g.mean(axis=0) - mean), 5 * scale)
    np.testing.assert_allclose(np.cov(g, rowvar=False), cov, atol=0.03 * np.abs(cov).max())
    delta, beta = kernel - truth.kernel, bias - truth.bias
    trace = 4 * ((d + 2) * delta @ delta + d * beta ** 2 + (d + 1) * truth.noise_std ** 2)
    assert np.trace(cov) == pytest.approx(trace)


def test_linear_data_follow_the_truth():
    ds = data.load("linear", seed=1)
    (x, y), truth = ds.train, ds.truth
    assert ds.num_classes == 0 and y.shape == (len(x), 1)
    residual = y[:, 0] - (x @ truth.kernel + truth.bias)
    assert residual.std() == pytest.approx(truth.noise_std, rel=0.1)
    assert not np.array_equal(data.load("linear", seed=2).train[0], x)


def _fake_get_file(keras_home, calls):
    """Stands in for keras' get_file: returns the cached file, as after a download."""
    def get_file(fname, origin=None, file_hash=None, cache_subdir="datasets", **kwargs):
        calls.append((fname, origin))
        path = os.path.join(keras_home, cache_subdir, fname)
        assert os.path.exists(path), f"the test did not write {path}"
        return path
    return get_file


def test_mnist_loads_through_keras_datasets(tmp_path, monkeypatch):
    keras_home = tmp_path / "keras"
    (keras_home / "datasets").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
                  y_train=np.arange(12, dtype=np.uint8) % 10,
                  x_test=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
                  y_test=np.arange(5, dtype=np.uint8))
    np.savez(keras_home / "datasets" / "mnist.npz", **arrays)
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    calls = []
    import keras.src.datasets.mnist as keras_mnist  # where load_data looks get_file up
    monkeypatch.setattr(keras_mnist, "get_file", _fake_get_file(str(keras_home), calls))
    ds = data.load("mnist")
    assert calls and calls[0][0] == "mnist.npz" and calls[0][1].endswith("mnist.npz")
    assert ds.train[0].shape == (12, 28, 28, 1) and ds.test[0].shape == (5, 28, 28, 1)
    np.testing.assert_allclose(ds.train[0][..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.train[1], arrays["y_train"])
    assert ds.num_classes == 10


def test_fashion_mnist_loads_through_keras_datasets(tmp_path, monkeypatch):
    folder = tmp_path / "keras" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {"train": np.arange(10, dtype=np.uint8), "t10k": np.array([9, 0, 3], np.uint8)}
    images = {k: rng.integers(0, 256, (len(v), 28, 28), dtype=np.uint8) for k, v in labels.items()}
    for split in labels:   # the idx format: 8-byte label header, 16-byte image header
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\0" * 8 + labels[split].tobytes())
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\0" * 16 + images[split].tobytes())
    import keras.src.datasets.fashion_mnist as keras_fashion
    calls = []
    monkeypatch.setattr(keras_fashion, "get_file", _fake_get_file(str(tmp_path / "keras"), calls))
    ds = data.load("fashion_mnist")
    assert len(calls) == 4
    assert ds.train[0].shape == (10, 28, 28, 1) and ds.test[0].shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(ds.test[1], labels["t10k"])
    np.testing.assert_allclose(ds.test[0][..., 0], images["t10k"] / 255.0, rtol=1e-6)


def test_keras_download_failure_is_a_user_error(monkeypatch):
    import keras.src.datasets.mnist as keras_mnist

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")
    monkeypatch.setattr(keras_mnist, "get_file", offline)
    with pytest.raises(UserError, match="could not load mnist"):
        data.load("mnist")


def _npz(tmp_path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(10, 3)), y_train=np.arange(10) % 3,
                  x_test=rng.normal(size=(4, 3)), y_test=np.array([0, 1, 2, 1]))
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_loads_a_classification_set(tmp_path):
    ds = data.load(_npz(tmp_path))
    assert ds.name == "npz:d" and ds.num_classes == 3 and ds.input_shape == (3,)
    assert ds.train[0].dtype == np.float32 and ds.train[1].dtype == np.int32


def test_npz_float_targets_make_a_regression_set(tmp_path):
    ds = data.load(_npz(tmp_path, y_train=np.linspace(0, 1, 10), y_test=np.zeros(4)))
    assert ds.num_classes == 0 and ds.train[1].shape == (10, 1)


BAD_NPZ = [
    (dict(y_train=None), "lacks y_train"),
    (dict(y_train=np.arange(9) % 3), "10 examples but y_train has 9"),
    (dict(y_train=np.array([-1] + [0] * 9)), "must be >= 0"),
    (dict(y_test=np.array([0, 1, 7, 1])), "label 7"),
    (dict(x_train=np.full((10, 3), np.nan)), "NaN"),
    (dict(x_train=np.array([["a"] * 3] * 10)), "numeric"),
    (dict(x_test=np.zeros((4, 5))), "shape"),
    (dict(y_train=np.zeros(10, int), y_test=np.zeros(4, int)), "at least 2 classes"),
]


@pytest.mark.parametrize("overrides,message", BAD_NPZ)
def test_bad_npz_is_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        data.load(_npz(tmp_path, **overrides))


def test_missing_and_corrupt_npz(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load(f"npz:{tmp_path / 'nope.npz'}")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="cannot be read"):
        data.load(f"npz:{bad}")
