"""The Keras example runs as a user would run it and writes gradient variance."""

import importlib.util
from pathlib import Path

import keras

from conftest import read_scalars

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "keras_fit.py"


def test_keras_fit_example_logs_gradient_variance(tmp_path):
    keras.utils.set_random_seed(0)
    spec = importlib.util.spec_from_file_location("keras_fit_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, run_dir = example.main(logdir=str(tmp_path), epochs=1)
    assert isinstance(model.optimizer, example.ClippedSGD)
    assert [p.name for p in tmp_path.iterdir()] == [Path(run_dir).name]
    written = read_scalars(Path(run_dir) / "train")
    assert {"grad_var/trace", "grad_snr/mean_gsnr", "epoch_loss"} <= set(written)
    assert [s for s, _ in written["grad_var/trace"]] == list(range(0, 45, 5))
    _, again = example.main(logdir=str(tmp_path), epochs=1)      # a second run: a directory of its own
    assert again != run_dir and len(list(tmp_path.iterdir())) == 2
    assert [s for s, _ in read_scalars(Path(run_dir) / "train")["grad_var/trace"]] == list(range(0, 45, 5))
