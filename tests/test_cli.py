"""train.py end to end: event files read back with TensorBoard's reader, compare mode, bad flags."""

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_histograms, read_scalars, user_env
from tfmbgd.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def run_train(*args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=user_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow     # a train.py process
def test_train_writes_the_documented_tags(tmp_path):
    logdir = tmp_path / "logs"
    before = time.time()
    proc = run_train("--epochs=2", "--batch_size=64", "--log_every=4", "--stats_every=5",
                     "--elementwise_stats", f"--logdir={logdir}")
    wall_ms = (time.time() - before) * 1000
    assert proc.returncode == 0, proc.stderr
    assert f"tensorboard --logdir {logdir}" in proc.stdout
    assert proc.stdout.startswith("starting TensorFlow ...\n"
                                  "gradient statistics: 4 of 4 variables by the layer-wise rules\n")
    assert "compiling the train step for batches of 64" in proc.stdout
    assert "Traceback" not in proc.stderr
    (run_dir,) = logdir.iterdir()
    train, test = read_scalars(run_dir / "train"), read_scalars(run_dir / "test")
    names = ["hidden_1/kernel", "hidden_1/bias", "output/kernel", "output/bias"]
    expected = {"loss", "accuracy", "grad/norm", "grad_var/trace", "grad_var/of_mean",
                "grad_snr/mean_gsnr", "noise_scale/simple"}
    expected |= {f"grad/norm/{n}" for n in names} | {f"grad_var/{n}" for n in names}
    assert expected <= set(train), sorted(expected - set(train))
    for tag, points in train.items():
        assert all(math.isfinite(v) for _, v in points), tag
    assert all(v > 0 for _, v in train["grad_var/trace"])
    # 1437 examples / 64 = 23 steps per epoch, 46 in all: statistics at 0, 5, ..., 45.
    assert [s for s, _ in train["grad_var/trace"]] == list(range(0, 46, 5))
    assert {s for s, _ in train["loss"]} == set(range(0, 46, 4)) | set(range(0, 46, 5))
    # The milliseconds axis (tf.timestamp, as without --deterministic): one point per logged
    # loss, in order, within the process's wall time.
    ms = [s for s, _ in train["loss_by/milliseconds"]]
    assert "compile the train step is left out" in _description(run_dir / "train", "loss_by/milliseconds")
    assert len(ms) == len(train["loss"]) and ms == sorted(ms) and 0 <= ms[0] < ms[-1] <= wall_ms
    trace = dict(train["grad_var/trace"])
    of_mean = dict(train["grad_var/of_mean"])
    batch = {s: 1437 - 22 * 64 if s % 23 == 22 else 64 for s in trace}   # last batch: 29
    assert all(of_mean[s] == pytest.approx(trace[s] / batch[s], rel=1e-5) for s in trace)
    assert [s for s, _ in test["loss"]] == [23, 46]
    histograms = read_histograms(run_dir / "train")["per_example_grad_norm"]
    assert [s for s, _ in histograms] == list(range(0, 46, 5))
    assert all(h.num == (29 if s == 45 else 64) and h.min > 0 for s, h in histograms)
    assert 0.5 < test["accuracy"][-1][1] <= 1.0


def _description(event_dir, tag):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(event_dir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc.SummaryMetadata(tag).summary_description


@pytest.mark.slow     # a train.py process
def test_mirrored_on_two_cpu_devices_from_the_command_line(tmp_path):
    """The README's local simulation: the CPU is split before TensorFlow starts."""
    logdir = tmp_path / "logs"
    proc = run_train("--strategy=mirrored", "--cpu_devices=2", "--epochs=1", "--batch_size=47",
                     "--stats_every=5", f"--logdir={logdir}")
    assert proc.returncode == 0, proc.stderr
    assert "2 replicas share each global batch of 47: up to 24 examples each" in proc.stdout
    (run_dir,) = logdir.iterdir()
    train = read_scalars(run_dir / "train")
    # 1437 = 30 x 47 + 27: 31 steps, statistics at 0, 5, ..., 30; shares of 24 and 23 (+1
    # padding) give no two-batch estimate.
    assert [s for s, _ in train["grad_var/trace"]] == list(range(0, 31, 5))
    assert "noise_scale/two_batch" not in train


@pytest.mark.slow     # a train.py process
def test_compare_mode_passes_every_row():
    # --epochs does nothing in compare mode: one warning line says so (issue 16)
    proc = run_train("--mode=compare", "--batch_size=8", "--model=cnn", "--epochs=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("warning: --epochs has no effect with --mode=compare (one batch, "
                                   "nothing trained or written); ignored")
    out = proc.stdout
    # progress while it traces: one line per computation, before the table
    assert "  [1/11] the gradient of the mean loss ..." in out and "  [11/11] one update by the keras" in out
    assert out.index("[11/11]") < out.index("computed ")
    for row in ("mean of per-example gradients (jacobian)", "mean of per-example gradients (loop)",
                "mean of per-example gradients (auto)", "per-parameter gradient variance (auto)",
                "B x gradient of the mean loss (B=8)", "8 single-example backprops, summed",
                "weights after one update: keras.optimizers.SGD"):
        assert row in out
    assert "FAIL" not in out and "12 of 12 rows PASS" in out


def test_help_is_fast_and_lists_flags():
    proc = run_train("--help", timeout=30)
    assert proc.returncode == 0
    for flag in ("--batch_size", "--reduction", "--update", "--grad_method", "--stats_every"):
        assert flag in proc.stdout
    assert "I0000" not in proc.stderr and proc.stderr == ""


BAD_FLAGS = [
    (["--batch_size=0"], "--batch_size"),
    (["--batch_size=abc"], "--batch_size"),
    (["--batch_size=-3"], "--batch_size"),
    (["--epochs=0"], "--epochs"),
    (["--learning_rate=0"], "--learning_rate"),
    (["--learning_rate=-0.1"], "--learning_rate"),
    (["--learning_rate=nan"], "--learning_rate"),
    (["--learning_rate=inf"], "--learning_rate"),
    (["--model=resnet"], "--model"),
    (["--reduction=median"], "--reduction"),
    (["--update=adam"], "--update"),
    (["--grad_method=magic"], "--grad_method"),
    (["--hidden=0"], "--hidden"),
    (["--hidden=a,b"], "--hidden"),
    (["--log_every=0"], "--log_every"),
    (["--stats_every=-1"], "--stats_every"),
    (["--seed=-1"], "--seed"),
    (["--mode=serve"], "--mode"),
    (["--dataset=cifar"], "dataset"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["stray"], "unexpected argument"),
    (["--optimizer=lion"], "--optimizer"),
    (["--update=manual", "--optimizer=adam"], "plain SGD only"),
    (["--noise_scale_decay=1"], "--noise_scale_decay"),
    (["--batch_sizes=0,8"], "--batch_sizes"),
    (["--batch_sizes=8,eight"], "--batch_sizes"),
    (["--batch_sizes=8,8"], "repeats"),
    (["--lr_scaling=cubic"], "--lr_scaling"),
    (["--accumulate=0"], "--accumulate"),
    (["--steps_per_call=0"], "--steps_per_call"),
    # issue 16: flags that would do nothing, and the flag shown as typed
    (["--lr_scaling=linear"], "--lr_scaling=linear: scales the learning rate across the batch sizes"),
    (["--mode=compare", "--batch_sizes=1,2"], "--batch_sizes=1,2: is a study of training runs"),
    (["--epochs=1.5"], "--epochs=1.5: must be an integer"),
    (["--hidden=64,,32"], "--hidden=64,,32: must be positive integers"),
    # issue 17: what the loop cannot do, said
    (["--mixed_precision=mixed_float16"], "--mixed_precision=mixed_float16: needs loss scaling"),
    (["--jit_compile", "--strategy=mirrored"], "jit_compile compiles the calls of one device"),
]


@pytest.mark.parametrize("args,names", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_without_traceback(args, names):
    proc = run_train(*args, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and lines[0].startswith("train.py: error:")
    assert proc.stdout == ""


def test_bad_data_and_logdir_are_one_line_errors(tmp_path):
    missing = run_train(f"--dataset=npz:{tmp_path / 'none.npz'}", f"--logdir={tmp_path}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    blocked = run_train("--epochs=1", f"--logdir={a_file}")
    assert blocked.returncode == 2 and "is a file" in blocked.stderr
    assert "Traceback" not in blocked.stderr and a_file.read_text() == "keep me"


def test_flags_become_the_config():
    from absl import flags

    from tfmbgd.app import cli
    config = cli.config_from_argv(["train.py", "--batch_sizes=4,full", "--lr_scaling=sqrt", "--hidden=16,8",
                                   "--batch_size=full", "--accumulate=2", "--optimizer=adam",
                                   "--elementwise_stats", "--instruments=a,b"],
                                  cli.define_flags(flags.FlagValues()))
    assert config.instruments == ("a", "b")
    assert config.batch_sizes == (4, None) and config.batch_size is None
    assert config.hidden == (16, 8) and config.lr_scaling == "sqrt" and config.accumulate == 2
    assert config.optimizer == "adam" and config.elementwise_stats is True


def test_every_setting_is_a_flag_whose_default_is_the_settings_default():
    import dataclasses

    from absl import flags

    from tfmbgd.app import cli
    from tfmbgd.config import TrainConfig
    flag_values = cli.define_flags(flags.FlagValues())
    assert sorted(flag_values) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert cli.config_from_argv(["train.py"], flag_values) == TrainConfig()


def test_a_flag_error_shows_the_flag_as_typed():
    from absl import flags

    from tfmbgd.app import cli
    for args, line in [(["--epochs=1.5"], "--epochs=1.5: must be an integer"),
                       (["--hidden=64,,32"], "--hidden=64,,32: must be positive integers separated by"),
                       (["--batch_size=0"], "--batch_size=0: must be a positive integer, or full")]:
        with pytest.raises(UserError) as err:
            cli.config_from_argv(["train.py", *args], cli.define_flags(flags.FlagValues()))
        assert str(err.value).startswith(line)
