"""Bad input, table-driven: one line naming the problem, exit 2, no traceback, no run touched."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tree_hash, user_env

pytestmark = pytest.mark.slow     # a train.py process per case

ROOT = Path(__file__).resolve().parent.parent


def _train(*args):
    # A TF_CONFIG=... argument goes to the environment, not the flags.
    env = user_env(**dict(a.split("=", 1) for a in args if a.startswith("TF_CONFIG=")))
    args = [a for a in args if not a.startswith("TF_CONFIG=")]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A log directory with one finished run, and data files good and bad."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    good = dict(x_train=rng.normal(size=(30, 4)), y_train=np.arange(30) % 3,
                x_test=rng.normal(size=(6, 4)), y_test=np.arange(6) % 3)

    def npz(name, **changes):
        arrays = {**good, **changes}
        np.savez(root / f"{name}.npz", **{k: v for k, v in arrays.items() if v is not None})
        return f"--dataset=npz:{root / name}.npz"

    files = dict(
        good=npz("good"),
        missing_key=npz("missing_key", y_test=None),
        negative_label=npz("negative_label", y_train=np.r_[-1, np.arange(29) % 3]),
        unseen_test_label=npz("unseen", y_test=np.array([0, 1, 2, 5, 1, 0])),
        length_mismatch=npz("lengths", y_train=np.arange(29) % 3),
        text=npz("text", x_train=np.array([["a"] * 4] * 30)),
        nan=npz("nan", x_test=np.full((6, 4), np.nan)),
        one_class=npz("one_class", y_train=np.zeros(30, int), y_test=np.zeros(6, int)),
    )
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    files["corrupt"] = f"--dataset=npz:{root / 'corrupt.npz'}"
    (root / "a_file").write_text("not a directory")
    (root / "dir.npz").mkdir()
    (root / "words.npz").write_text("x_train,y_train\n1,2\n")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    (root / "started").mkdir()                            # a run killed before its first checkpoint
    (root / "started" / "config.json").write_text("{}")
    logdir = root / "logs"
    done = _train(files["good"], "--hidden=4", "--batch_size=5", "--epochs=1", f"--logdir={logdir}")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = logdir.iterdir()
    return dict(root=root, logdir=logdir, run=run, files=files)


CASES = [  # (id, args built from the world, words the one line must contain)
    ("unknown dataset", lambda w: ["--dataset=cifar"], "dataset"),
    ("unknown model", lambda w: ["--model=resnet"], "--model"),
    ("zero batch", lambda w: ["--batch_size=0"], "--batch_size"),
    ("negative batch", lambda w: ["--batch_size=-4"], "--batch_size"),
    ("zero hidden", lambda w: ["--hidden=0"], "--hidden"),
    ("zero epochs", lambda w: ["--epochs=0"], "--epochs"),
    ("zero learning rate", lambda w: ["--learning_rate=0"], "--learning_rate"),
    ("NaN learning rate", lambda w: ["--learning_rate=nan"], "--learning_rate"),
    ("missing npz", lambda w: [f"--dataset=npz:{w['root'] / 'absent.npz'}"], "does not exist"),
    ("corrupt npz", lambda w: [w["files"]["corrupt"]], "cannot be read"),
    ("wrongly keyed npz", lambda w: [w["files"]["missing_key"]], "lacks y_test"),
    ("negative label", lambda w: [w["files"]["negative_label"]], "must be >= 0"),
    ("label out of range", lambda w: [w["files"]["unseen_test_label"]], "label 5"),
    ("x and y lengths differ", lambda w: [w["files"]["length_mismatch"]], "30 examples but y_train has 29"),
    ("non-numeric data", lambda w: [w["files"]["text"]], "must be numeric"),
    ("NaN in data", lambda w: [w["files"]["nan"]], "NaN"),
    ("one class", lambda w: [w["files"]["one_class"]], "at least 2 classes"),
    ("batch larger than the training set", lambda w: [w["files"]["good"], "--batch_size=31"],
     "--batch_size=full"),
    ("accumulation larger than the training set", lambda w: [w["files"]["good"], "--batch_size=8",
                                                             "--accumulate=4"], "batch_size x accumulate"),
    ("cnn on vectors", lambda w: [w["files"]["good"], "--batch_size=5", "--model=cnn"],
     "needs images [height, width, channels]"),
    ("logdir is a file", lambda w: [w["files"]["good"], "--batch_size=5", f"--logdir={w['root'] / 'a_file'}"],
     "is a file"),
    ("logdir below a file", lambda w: [w["files"]["good"], "--batch_size=5",
                                       f"--logdir={w['root'] / 'a_file' / 'sub'}"], "cannot create logdir"),
    ("resume a directory with no run", lambda w: [f"--resume={w['root']}"], "holds no run"),
    # issue 16: messages that said something else
    ("npz that is a directory", lambda w: [f"--dataset=npz:{w['root'] / 'dir.npz'}"], "is a directory"),
    ("npz that is a text file", lambda w: [f"--dataset=npz:{w['root'] / 'words.npz'}"],
     "cannot be read: it is not a zip archive of arrays"),
    ("logdir that is a loop of links", lambda w: [w["files"]["good"], "--batch_size=5",
                                                  f"--logdir={w['root'] / 'loop_a'}"], "loop of links"),
    ("resume a run without a checkpoint", lambda w: [f"--resume={w['root'] / 'started'}"],
     "stopped before its first checkpoint"),
    ("resume with another model", lambda w: [f"--resume={w['run']}", "--model=linear"], "contradicts"),
    ("resume with another data set", lambda w: [f"--resume={w['run']}", "--dataset=digits"], "contradicts"),
    ("cpu devices without mirrored", lambda w: ["--cpu_devices=2"], "--strategy=mirrored"),
    ("accumulation across replicas", lambda w: ["--strategy=mirrored", "--accumulate=2"],
     "not supported with --strategy=mirrored"),
    ("multi_worker without TF_CONFIG", lambda w: ["--strategy=multi_worker"], "needs TF_CONFIG"),
    ("malformed TF_CONFIG", lambda w: ["--strategy=multi_worker", 'TF_CONFIG={"cluster": {}'],
     "TF_CONFIG cannot be used"),
    ("TF_CONFIG without this task", lambda w: ["--strategy=multi_worker",
                                               'TF_CONFIG={"cluster": {"worker": ["127.0.0.1:1"]}}'],
     "TF_CONFIG cannot be used"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, case):
    _, make_args, words = case
    before = tree_hash(world["logdir"])
    args = make_args(world)
    if not any(a.startswith(("--logdir", "--resume")) for a in args):
        args.append(f"--logdir={world['logdir']}")
    proc = _train(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_hash(world["logdir"]) == before, "an existing run was changed"
    assert len(list(world["logdir"].iterdir())) == 1, "a run directory was created"
