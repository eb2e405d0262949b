"""Runs tell the truth about themselves (issue 28): a run that diverges in its first call is
named as diverged, a run whose every later update is skipped too, and progress written to a
pipe is plain text."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import user_env
from tfmbgd.config import TrainConfig
from tfmbgd.loop import training

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow     # the command, in a train.py process whose stdout is a pipe
def test_a_run_that_diverges_at_once_is_told_and_its_log_has_no_escapes(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), "--learning_rate=1e9", "--epochs=2",
               f"--logdir={tmp_path}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=user_env())
    assert proc.returncode == 0, proc.stderr          # it did finish
    assert "warning: this run diverged: the training loss rose from 2.29" in proc.stdout
    assert "(before the first update)" in proc.stdout
    assert "\x1b" not in proc.stdout and "\x1b" not in proc.stderr
    # one plain line per epoch, as Keras' verbose=2
    bars = [line for line in proc.stdout.splitlines() if line.startswith("45/45 - ")]
    assert len(bars) == 2, proc.stdout


def test_a_sane_run_is_not_called_diverged(tmp_path, capsys):
    result = training.train(TrainConfig(epochs=1, logdir=str(tmp_path), stats_every=0))
    assert not result.diverged and "diverged" not in capsys.readouterr().out


def test_a_dead_run_with_skipped_updates_is_told(tmp_path, capsys):
    # --on_nonfinite=skip: the first update blows the weights up, every later one is skipped
    config = TrainConfig(epochs=2, learning_rate=1e30, on_nonfinite="skip", logdir=str(tmp_path),
                         stats_every=0)
    result = training.train(config)
    out = capsys.readouterr().out
    assert result.diverged
    assert "of 90 updates were skipped as non-finite" in out
    assert "warning: this run diverged" in out


def test_a_sequential_without_input_gets_the_right_advice():
    import keras

    from tfmbgd import fit
    from tfmbgd.errors import UserError
    model = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(10)])
    with pytest.raises(UserError, match=r"has no Input yet.*keras\.Input\(shape=\.\.\.\)"):
        fit.with_statistics(model)


def test_checks_that_need_no_tensorflow_come_before_it(tmp_path):
    # an unknown instrument and a finished run are reported in well under TensorFlow's start-up
    import time
    for flags in (["--instruments=economyy"],):
        began = time.monotonic()
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, f"--logdir={tmp_path}"],
                              capture_output=True, text=True, timeout=120, env=user_env())
        assert proc.returncode == 2 and "unknown instrument 'economyy'" in proc.stderr
        assert "starting TensorFlow" not in proc.stdout
        assert time.monotonic() - began < 5


def test_paths_with_a_tilde_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = TrainConfig(logdir="~/runs", dataset="npz:~/data.npz")
    assert config.logdir == str(tmp_path / "runs") and config.dataset == f"npz:{tmp_path}/data.npz"


def test_version_and_the_module_entry_point():
    from tfmbgd import __version__
    for command in ([sys.executable, "-m", "tfmbgd", "--version"], [sys.executable, str(ROOT / "train.py"),
                                                                    "--version"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=user_env(), cwd="/")
        assert proc.stdout.strip() == f"tfmbgd {__version__}", proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "tfmbgd", "--help"], capture_output=True, text=True,
                               timeout=60, env=user_env(), cwd="/").stdout
    assert help_text.startswith("Train a small network") and "python -m tfmbgd --batch_size=1" in help_text
    assert "hessian_noise_scale" in help_text and "economy, business, full" in help_text


def test_the_names_checked_before_tensorflow_are_the_registrys():
    from tfmbgd import choices
    from tfmbgd.instruments import registry
    assert set(choices.INSTRUMENTS) == {cls.name for cls in registry.BUILT_IN}


def _descriptions(event_dir):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(event_dir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: acc.SummaryMetadata(tag).summary_description for tag in acc.Tags()["tensors"]}


def test_tensorboard_says_what_each_tag_is_in_train_py_and_fit_runs(tmp_path):
    import keras
    from test_instruments import _layout

    from tfmbgd import callbacks, data, fit, instruments, models
    config = TrainConfig(epochs=1, instruments=("hess_trace",), stats_every=5, logdir=str(tmp_path / "loop"))
    run = training.train(config, verbose=0)
    written = _descriptions(f"{run.run_dir}/train")
    panel = instruments.Panel(instruments.default() + instruments.create(["hess_trace"])).build(
        models.build("mlp", (8, 8, 1), 10).trainable_variables)
    for tag, text in panel.descriptions.items():        # the instruments' own words, each tag
        if tag in written:
            assert written[tag] == text, tag
    assert "Hutchinson" in written["curvature/hess_trace"]
    assert written["loss"].startswith("mean per-example loss") and written["grad/norm"]
    assert not [tag for tag, text in written.items() if not text and tag != "custom_scalars__config__"]
    # model.fit: the same descriptions, and the custom-scalars layout a train.py run gets
    keras.utils.set_random_seed(0)
    ds = data.load("digits")
    model = fit.with_statistics(models.build("mlp", ds.input_shape, ds.num_classes))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*ds.train, batch_size=32, epochs=1, verbose=0,
              callbacks=[callbacks.GradientStatistics(str(tmp_path / "fit"), freq=5,
                                                      more_instruments=("hess_trace",))])
    fitted = _descriptions(tmp_path / "fit" / "train")
    assert fitted["curvature/hess_trace"] == written["curvature/hess_trace"]
    charts = {c.title for category in _layout(tmp_path / "fit" / "train").category for c in category.chart}
    loop_charts = {c.title for category in _layout(f"{run.run_dir}/train").category for c in category.chart}
    assert charts == loop_charts and len(charts) > 5


def _npz(path, x, y):
    import numpy as np
    np.savez(path, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    return f"npz:{path}"


def test_common_npz_data_gets_the_right_words(tmp_path):
    import numpy as np

    from tfmbgd import data
    from tfmbgd.app import launch
    from tfmbgd.errors import UserError
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 50)
    labels[:10] = np.arange(10)
    pixels = rng.integers(0, 256, (50, 6, 6)).astype(np.uint8)
    # one-hot labels are classes, not regression targets; raw pixels are used, with a warning
    name = _npz(tmp_path / "onehot.npz", pixels, np.eye(10, dtype=np.float32)[labels])
    with pytest.warns(data.DataWarning, match=r"integers up to 255 \(uint8\).*x / 255\.0"):
        ds = data.load(name)
    assert ds.num_classes == 10 and np.array_equal(ds.train[1], labels[:40])
    # (N, 28, 28) images and the cnn: a channel axis, said before TensorFlow starts
    hint = r"without a channel axis: save x\[\.\.\., None\] \(shape \(6, 6, 1\)\)"
    with pytest.warns(data.DataWarning), pytest.raises(UserError, match=hint):
        launch.check(TrainConfig(dataset=name, model="cnn", logdir=str(tmp_path / "logs")))
    scaled = _npz(tmp_path / "scaled.npz", pixels / 255.0, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.load(scaled).num_classes == 10


def test_a_finished_run_is_refused_before_tensorflow(tmp_path):
    from tfmbgd.app import launch
    from tfmbgd.errors import UserError
    from tfmbgd.loop import rundir
    run = training.train(TrainConfig(epochs=1, stats_every=0, logdir=str(tmp_path)), verbose=0)
    with pytest.raises(UserError, match="has finished its 1 epochs; nothing was changed. Pass --epochs=2"):
        launch.check(rundir.resume_config(run.run_dir, {}))
    launch.check(rundir.resume_config(run.run_dir, {"epochs": 2}))     # more epochs: fine


def test_the_remainder_batch_is_compiled_once_and_said_or_dropped(tmp_path, capsys):
    import numpy as np

    from tfmbgd.loop.runner import epoch_batches
    calls = epoch_batches(np.random.default_rng(0), 45, 8, steps_per_call=4, drop_remainder=True)
    steps = np.concatenate(calls)
    assert steps.shape == (5, 8) and len(set(steps.ravel())) == 40        # 45 // 8 full batches
    kept = np.concatenate([c.ravel() for c in epoch_batches(np.random.default_rng(0), 45, 8, 4)])
    assert sorted(kept) == list(range(45))                                 # by default every example
    run = training.train(TrainConfig(epochs=2, stats_every=0, logdir=str(tmp_path), drop_remainder=True))
    out = capsys.readouterr().out
    assert run.steps == 2 * (1437 // 32) and "batches of 29" not in out
    assert out.count("compiling the train step for batches of 32 (once per batch size) ... ") == 1
    assert " s\n" in out.split("compiling the train step")[1]             # the compile's time, said


def test_an_accumulated_run_is_named_apart_and_a_study_names_tensorboard_once(tmp_path, capsys):
    from tfmbgd.app import study
    from tfmbgd.loop import rundir
    assert "-b32x4-" in rundir.run_name(TrainConfig(accumulate=4))
    assert "-b32-" in rundir.run_name(TrainConfig())
    study.run(TrainConfig(batch_sizes=(64, 256), epochs=1, stats_every=0, logdir=str(tmp_path)))
    out = capsys.readouterr().out
    assert out.count("See it with:") == 1 and out.count("Run written to") == 2
