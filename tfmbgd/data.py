"""Data sets as validated numpy arrays, and the tf.data pipeline that batches them.

`load(name, seed)` returns a `Dataset` whose `train` and `test` are `(x, y)` numpy pairs:
`x` float32 `[N, *input_shape]`; `y` int32 `[N]` class labels (classification) or float32
`[N, 1]` targets (regression, `num_classes == 0`).

| name            | what                                                   | download |
|-----------------|--------------------------------------------------------|----------|
| `digits`        | scikit-learn's bundled 8x8 digits, 1437 train / 360 test | no     |
| `linear`        | synthetic regression with closed-form gradient moments | no       |
| `mnist`         | `keras.datasets.mnist`, 28x28x1                        | yes      |
| `fashion_mnist` | `keras.datasets.fashion_mnist`, 28x28x1                | yes      |
| `npz:PATH`      | a file holding `x_train, y_train, x_test, y_test`      | no       |
"""

import dataclasses
import os
import warnings
import zipfile

import numpy as np

from tfmbgd.errors import UserError

LINEAR_DIM = 8          # input features of the `linear` data set
LINEAR_TRAIN = 2048
LINEAR_TEST = 512
LINEAR_NOISE_STD = 0.5
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataWarning(UserWarning):
    """Data that loads but is probably not what the user meant (`train.py` prints it as one
    line on stderr)."""


@dataclasses.dataclass(frozen=True)
class LinearTruth:
    """The generating parameters of the `linear` data set: y = x . kernel + bias + noise."""

    kernel: np.ndarray     # [d]
    bias: float
    noise_std: float


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: tuple           # (x [N, *input_shape] float32, y)
    test: tuple
    num_classes: int       # 0 = regression with one float target per example
    truth: LinearTruth | None = None   # only for `linear`

    @property
    def input_shape(self):
        return tuple(self.train[0].shape[1:])


def load(name="digits", seed=0):
    """Loads a data set by name (see the module docstring); raises `UserError` if unusable."""
    if name == "digits":
        return _digits()
    if name == "linear":
        return _linear(seed)
    if name in ("mnist", "fashion_mnist"):
        return _keras_images(name)
    if isinstance(name, str) and name.startswith("npz:"):
        return _npz(name[4:])
    raise UserError(f"unknown data set {name!r}: use digits, linear, mnist, fashion_mnist or npz:PATH")


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]     # [1797, 8, 8, 1] in [0, 1]
    y = bunch.target.astype(np.int32)
    # A fixed, stratified split: every run and every seed sees the same test set.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return _validated("digits", x_tr, y_tr, x_te, y_te)


def _linear(seed):
    rng = np.random.default_rng(seed)
    truth = LinearTruth(kernel=rng.normal(size=LINEAR_DIM), bias=float(rng.normal()),
                        noise_std=LINEAR_NOISE_STD)

    def sample(n):
        x = rng.normal(size=(n, LINEAR_DIM))
        y = x @ truth.kernel + truth.bias + truth.noise_std * rng.normal(size=n)
        return x.astype(np.float32), y[:, None].astype(np.float32)

    (x_tr, y_tr), (x_te, y_te) = sample(LINEAR_TRAIN), sample(LINEAR_TEST)
    ds = _validated("linear", x_tr, y_tr, x_te, y_te)
    return dataclasses.replace(ds, truth=truth)


def linear_gradient_moments(kernel, bias, truth):
    """Exact mean and covariance of the per-example gradient on the `linear` data set.

    The model is `f(x) = x . w + b` with the unscaled per-example loss
    `l = (f(x) - y)^2`, where `x ~ N(0, I_d)` and `y = x . w* + b* + eps`,
    `eps ~ N(0, s^2)`. With `delta = w - w*`, `beta = b - b*` and the residual
    `r = x . delta + beta - eps`, the gradient is `g = 2 r (x, 1)`. Gaussian moments
    (Isserlis: `E[(x.delta)^2 x x^T] = |delta|^2 I + 2 delta delta^T`) give

        E[g]  = 2 (delta, beta)
        Sigma = 4 [[ q I + delta delta^T,  beta delta ],
                   [ beta delta^T,         q - beta^2 ]],   q = |delta|^2 + beta^2 + s^2
        tr(Sigma) = 4 [(d + 2) |delta|^2 + d beta^2 + (d + 1) s^2]

    Args:
      kernel: the model's weights, shape `[d]` or `[d, 1]`.
      bias: the model's bias, a scalar or shape `[1]`.
      truth: the data set's `LinearTruth`.

    Returns:
      `(mean, covariance)`: float64 arrays of shape `[d + 1]` and `[d + 1, d + 1]`, with
      the parameters ordered `(kernel..., bias)`. `Sigma` is the population covariance of
      one example's gradient; a mini-batch mean of B examples has covariance `Sigma / B`.
    """
    delta = np.asarray(kernel, np.float64).reshape(-1) - truth.kernel
    beta = float(np.asarray(bias, np.float64).reshape(())) - truth.bias
    q = delta @ delta + beta ** 2 + truth.noise_std ** 2
    d = delta.size
    cov = np.empty((d + 1, d + 1))
    cov[:d, :d] = q * np.eye(d) + np.outer(delta, delta)
    cov[:d, d] = cov[d, :d] = beta * delta
    cov[d, d] = q - beta ** 2
    return 2.0 * np.append(delta, beta), 4.0 * cov


def _keras_images(name):
    import keras

    module = keras.datasets.mnist if name == "mnist" else keras.datasets.fashion_mnist
    try:
        (x_tr, y_tr), (x_te, y_te) = module.load_data()
    except Exception as err:  # network or cache failures surface as many exception types
        raise UserError(f"could not load {name} through keras.datasets ({err}); "
                        "check the network or the cache under $KERAS_HOME/datasets") from err
    scale = lambda x: (np.asarray(x, np.float32) / 255.0)[..., None]
    return _validated(name, scale(x_tr), y_tr, scale(x_te), y_te)


def _npz(path):
    if os.path.isdir(path):
        raise UserError(f"npz file {path!r} is a directory; pass --dataset=npz:PATH with a file")
    if not os.path.isfile(path):
        raise UserError(f"npz file {path!r} does not exist; pass --dataset=npz:PATH with an existing file")
    if not zipfile.is_zipfile(path):        # else numpy takes it for a pickle and advises allow_pickle
        raise UserError(f"npz file {path!r} cannot be read: it is not a zip archive of arrays; "
                        "write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise UserError(f"npz file {path!r} lacks {', '.join(missing)}; "
                                f"it must hold {', '.join(NPZ_KEYS)}")
            arrays = [f[k] for k in NPZ_KEYS]
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"npz file {path!r} cannot be read ({err}); write it with numpy.savez") from err
    stem = os.path.splitext(os.path.basename(path))[0]
    return _validated(f"npz:{stem}", *arrays)


def _validated(name, x_train, y_train, x_test, y_test):
    """Checks shapes, dtypes, finiteness and labels; returns a Dataset of clean arrays."""
    xs = [_check_x(name, split, x) for split, x in (("train", x_train), ("test", x_test))]
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise UserError(f"{name}: x_train examples have shape {xs[0].shape[1:]} "
                        f"but x_test examples {xs[1].shape[1:]}")
    ys = [np.asarray(y) for y in (y_train, y_test)]
    for split, x, y in (("train", xs[0], ys[0]), ("test", xs[1], ys[1])):
        if y.shape[:1] != x.shape[:1]:
            raise UserError(f"{name}: x_{split} has {len(x)} examples but y_{split} "
                            f"has {y.shape[0] if y.ndim else 'no'} labels")
    if all(_one_hot(y) for y in ys) and ys[0].shape[1] == ys[1].shape[1]:
        ys = [np.argmax(y, axis=1) for y in ys]        # one-hot rows: the classes of their 1s
    kinds = {y.dtype.kind for y in ys}
    if kinds <= {"i", "u"}:
        return _classification(name, xs, ys)
    if kinds <= {"i", "u", "f"}:
        return _regression(name, xs, ys)
    raise UserError(f"{name}: labels must be integer classes or float targets; "
                    f"got dtypes {ys[0].dtype} and {ys[1].dtype}")


def _one_hot(y):
    """Whether `y` is `[N, K]`, K >= 2, each row one 1 and otherwise 0s (Keras'
    `to_categorical` labels)."""
    return (y.ndim == 2 and y.shape[1] >= 2 and y.dtype.kind in "iuf" and len(y) > 0
            and bool(np.all((y == 0) | (y == 1))) and bool(np.all(y.sum(axis=1) == 1)))


def _check_x(name, split, x):
    x = np.asarray(x)
    if x.dtype.kind not in "iuf":
        raise UserError(f"{name}: x_{split} must be numeric; got dtype {x.dtype}")
    if split == "train" and x.dtype.kind in "iu" and x.size and int(x.max()) > 1:
        warnings.warn(DataWarning(
            f"{name}: x_train holds integers up to {int(x.max())} ({x.dtype}), raw pixels perhaps; they "
            "are used as given, and a network trains badly on inputs that large: divide them by their "
            "maximum (e.g. x / 255.0) before saving"), stacklevel=3)
    if x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"{name}: x_{split} must be [examples, features...] with at least "
                        f"one example; got shape {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{name}: x_{split} holds NaN or infinite values; clean the data first")
    return x


def _classification(name, xs, ys):
    ys = [y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y for y in ys]
    if any(y.ndim != 1 for y in ys):
        raise UserError(f"{name}: class labels must be one integer per example (shape [N])")
    low = min(int(y.min()) for y in ys)
    num_classes = max(int(y.max()) for y in ys) + 1
    if low < 0:
        raise UserError(f"{name}: class labels must be >= 0; found {low}")
    if num_classes < 2:
        raise UserError(f"{name}: classification needs at least 2 classes; labels are all 0")
    if int(ys[1].max()) >= int(ys[0].max()) + 1:
        raise UserError(f"{name}: y_test has label {int(ys[1].max())}, which no training "
                        f"example has (train labels are 0..{int(ys[0].max())})")
    ys = [y.astype(np.int32) for y in ys]
    return Dataset(name, (xs[0], ys[0]), (xs[1], ys[1]), num_classes)


def _regression(name, xs, ys):
    ys = [y.reshape(-1, 1) if y.ndim == 1 else y for y in ys]
    if any(y.ndim != 2 or y.shape[1] != 1 for y in ys):
        raise UserError(f"{name}: regression targets must be one float per example (shape [N] or [N, 1])")
    ys = [y.astype(np.float32) for y in ys]
    if not all(np.isfinite(y).all() for y in ys):
        raise UserError(f"{name}: regression targets hold NaN or infinite values")
    return Dataset(name, (xs[0], ys[0]), (xs[1], ys[1]), 0)


def batches(x, y, batch_size, seed, shuffle=True):
    """A tf.data pipeline of `(x, y)` mini-batches, reshuffled every epoch with `seed`.

    The last batch keeps the remainder (it is not dropped), so every example counts once
    per epoch; the batch loss is always the reduction over the examples actually present.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
