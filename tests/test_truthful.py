"""Runs that say truthfully how they went (issue 16): resumable from the first moment,
a finished run left alone, skipped updates counted, a diverging loss named, settings that
do nothing named, library calls that check what they are given, charts of one quantity.
The interrupts of a real process are in test_interrupts.py."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import zoo
from conftest import make_problem, oracle_per_example, read_scalars, tree_hash
from tfmbgd import fit, instruments, losses, models
from tfmbgd.app import compare
from tfmbgd.config import TrainConfig, ignored
from tfmbgd.engine import gradients
from tfmbgd.engine.moments import gradient_moments
from tfmbgd.errors import UserError
from tfmbgd.loop import rundir, tensorboard, training
from tfmbgd.loop.rundir import CHECKPOINTS, resume_config

SMALL = dict(dataset="linear", model="linear", batch_size=16, stats_every=5, log_every=5)


def test_config_and_a_checkpoint_exist_before_the_first_step(tmp_path, monkeypatch):
    seen = {}
    real = training.StepRunner.run

    def spy(self, *args):
        if "dir" not in seen:        # the first real call: what the directory holds now
            run_dir = next(p for p in tmp_path.iterdir())
            seen["dir"] = sorted(os.listdir(run_dir))
            seen["checkpoint"] = tf.train.latest_checkpoint(str(run_dir / CHECKPOINTS))
        return real(self, *args)
    monkeypatch.setattr(training.StepRunner, "run", spy)
    training.train(TrainConfig(**SMALL, epochs=1, logdir=str(tmp_path)), verbose=0)
    assert "config.json" in seen["dir"] and seen["checkpoint"].endswith("ckpt-0")


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path):
    done = training.train(TrainConfig(**SMALL, epochs=1, logdir=str(tmp_path)), verbose=0)
    before = tree_hash(tmp_path)
    with pytest.raises(UserError, match="has finished its 1 epochs; nothing was changed. Pass --epochs=2"):
        training.train(resume_config(done.run_dir, {"epochs": 1}), verbose=0)
    assert tree_hash(tmp_path) == before


def test_skipped_updates_are_counted_and_the_bar_shows_the_non_finite_loss(tmp_path, capsys):
    # Step 0 is finite and applied; its update makes every later loss overflow.
    run = training.train(TrainConfig(**SMALL, epochs=1, learning_rate=1e30, on_nonfinite="skip",
                                     logdir=str(tmp_path)), verbose=1)
    out = capsys.readouterr().out
    skipped = run.steps - 1
    assert f"{skipped} updates skipped as non-finite in this epoch" in out
    assert f"{skipped} of {run.steps} updates were skipped as non-finite" in out
    assert "loss: nan" in out.lower() or "loss: inf" in out.lower()


def test_a_run_whose_every_update_was_skipped_is_an_error():
    class AllSkipped:
        diverged = False

        def skipped_in_run(self):
            return 7
    result = training.RunResult("logs/run", 7, 1, {})
    with pytest.raises(UserError, match=r"every update of the run \(7\) was skipped"):
        training._report_end(AllSkipped(), result, TrainConfig(), 0, updates=7)
    training._report_end(AllSkipped(), result, TrainConfig(), 0, updates=8)    # one was applied


def test_a_diverging_loss_is_named_once(tmp_path, capsys):
    training.train(TrainConfig(**SMALL, epochs=3, learning_rate=1.2, on_nonfinite="skip",
                               logdir=str(tmp_path)), verbose=1)
    assert capsys.readouterr().out.count("the run is diverging") == 1


def test_batch_size_is_also_written_at_the_last_step(tmp_path):
    run = training.train(TrainConfig(**{**SMALL, "batch_size": None}, epochs=1, logdir=str(tmp_path)),
                         verbose=0)
    points = read_scalars(f"{run.run_dir}/train")["batch_size"]
    assert [s for s, _ in points] == [0, 1] and np.allclose([v for _, v in points], points[0][1])


def test_a_new_run_appears_under_its_name_with_config_and_first_checkpoint(tmp_path, monkeypatch):
    seen = {}
    real = rundir.publish

    def spy(staged, path):
        seen["logdir before"] = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
        seen["staged"] = sorted(os.listdir(staged))
        seen["checkpoint"] = tf.train.latest_checkpoint(os.path.join(staged, CHECKPOINTS))
        return real(staged, path)
    monkeypatch.setattr(rundir, "publish", spy)
    run = training.train(TrainConfig(**SMALL, epochs=1, logdir=str(tmp_path)), verbose=0)
    assert seen["logdir before"] == []                 # no directory under the run's name until then
    assert seen["staged"] == ["checkpoints", "config.json"]     # no event file before the checkpoint
    assert seen["checkpoint"].endswith("ckpt-0")
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(run.run_dir)]    # staging removed
    assert tf.train.latest_checkpoint(os.path.join(run.run_dir, CHECKPOINTS)).endswith(f"ckpt-{run.steps}")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(run.run_dir).st_mode & 0o777 == 0o777 & ~umask     # as mkdir makes it, not 0700


def test_a_run_interrupted_while_it_compiles_takes_no_step(tmp_path):
    asked = iter([False, True])          # no when it starts, yes once the first call has compiled
    with pytest.raises(training.Interrupted) as stopped:
        training.train(TrainConfig(**SMALL, epochs=1, logdir=str(tmp_path)), verbose=0,
                       should_stop=lambda: next(asked, True))
    assert stopped.value.step == 0 and stopped.value.run_dir
    assert tf.train.latest_checkpoint(os.path.join(stopped.value.run_dir, CHECKPOINTS)).endswith("ckpt-0")


IGNORED = [  # (settings, the names `ignored` must give)
    (dict(mode="compare"), []),
    (dict(mode="compare", epochs=3, stats_every=4, logdir="elsewhere"), ["epochs", "stats_every", "logdir"]),
    (dict(mode="compare", optimizer="adam", reduction="sum"), ["optimizer", "reduction"]),
    (dict(stats_every=0, elementwise_stats=True, grad_method="loop"), ["elementwise_stats", "grad_method"]),
    (dict(stats_every=0, epochs=2), []),
    (dict(stats_every=5, elementwise_stats=True, epochs=2), []),
]


@pytest.mark.parametrize("settings,names", IGNORED, ids=[str(s) for s, _ in IGNORED])
def test_settings_that_do_nothing_are_named(settings, names):
    assert ignored(TrainConfig(**settings)) == names


@pytest.mark.parametrize("settings,words", [
    (dict(lr_scaling="sqrt"), "lr_scaling scales the learning rate across the batch sizes of a study"),
    (dict(mode="compare", batch_sizes=(1, 2)), "batch_sizes is a study of training runs"),
], ids=["lr_scaling without a study", "compare with a study"])
def test_settings_that_would_be_dropped_are_errors(settings, words):
    with pytest.raises(UserError, match=words):
        TrainConfig(**settings)


def _mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(4, activation="tanh")(inputs)))


class _Unbuilt(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


X = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
Y = np.arange(6, dtype=np.int32) % 3
CE = losses.per_example("crossentropy")
REDUCED = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
FROZEN = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, trainable=False)])


def _siamese_with_a_short_input():
    model, x, y = zoo.make("siamese", batch=4)
    return model, {**x, "right": x["right"][:3]}, y


LIBRARY_CASES = [  # (id, the call, words of the UserError)
    ("no trainable variables", lambda: gradient_moments(FROZEN, CE, X, Y), "has no trainable variables"),
    ("a subclassed model not built yet", lambda: gradient_moments(_Unbuilt(), CE, X, Y),
     "a subclassed model is built by calling it once"),
    ("a reduced Keras loss, moments", lambda: gradient_moments(_mlp(), REDUCED, X, Y),
     r"SparseCategoricalCrossentropy\(reduction=None\)"),
    ("a reduced Keras loss, batch gradients", lambda: gradients.batch_gradients(_mlp(), REDUCED, X, Y),
     "returns one number for the whole batch"),
    ("a reduced Keras loss, per-example gradients",
     lambda: gradients.per_example_gradients(_mlp(), keras.losses.MeanSquaredError(), X, Y),
     r"MeanSquaredError\(reduction=None\)"),
    *[(f"x and y of different lengths, {method}", lambda method=method: gradient_moments(
        _mlp(), CE, X, Y[:4], method), "x has 6 examples but y has 4")
      for method in ("auto", "layerwise", "vectorized", "jacobian", "loop")],
    ("x and y of different lengths, batch gradients",
     lambda: gradients.batch_gradients(_mlp(), CE, X[:5], Y), "x has 5 examples but y has 6"),
    ("inputs of different lengths", lambda: gradient_moments(*_siamese_with_a_short_input()[:1], CE,
                                                             *_siamese_with_a_short_input()[1:]),
     "the inputs in x have different batch sizes"),
    ("an empty batch, moments", lambda: gradient_moments(_mlp(), CE, X[:0], Y[:0]), "the batch is empty"),
    ("an empty batch, per-example gradients",
     lambda: gradients.per_example_gradients(_mlp(), CE, X[:0], Y[:0], "jacobian"), "the batch is empty"),
    ("an unknown method", lambda: gradient_moments(_mlp(), CE, X, Y, "magic"), "must be one of"),
    ("a subclassed model given to with_statistics", lambda: fit.with_statistics(_Unbuilt()),
     "subclassed model"),
]


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_calls_name_what_is_wrong(case):
    _, call, words = case
    with pytest.raises(UserError, match=words):
        call()


def test_a_keras_loss_without_reduction_gives_the_oracles_moments():
    model, _, x, y = make_problem(dict(id="mlp", layers=[4], inputs=5, outputs=3, loss="crossentropy",
                                       batch=6))
    m = gradient_moments(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
                         x, y, "auto")
    per_example = oracle_per_example(model, losses.per_example("crossentropy"), x, y)
    for mean, sum_sq, g in zip(m.mean, m.sum_sq, per_example):
        np.testing.assert_allclose(mean, g.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sum_sq, (g ** 2).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["functional mlp", "siamese", "every_rule"])
def test_tfmbgds_own_calls_print_no_warning_on_a_correct_model(name):
    if name == "functional mlp":
        model = models.build("mlp", (5,), 3, hidden=(4,), seed=0)
        x, y = X, Y
    else:
        model, x, y = zoo.make(name, batch=4)
    # (vectorized_map on the zoo's larger models has crashed TensorFlow eagerly now and then:
    # the fallback is exercised on the MLP only)
    methods = ("auto", "vectorized") if name == "functional mlp" else ("auto",)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in methods:
            gradient_moments(model, CE, x, y, method)
        gradients.batch_gradients(model, CE, x, y)
        fit.with_statistics(model)(x)          # the same model, for fit: takes x as the model does
    assert [str(w.message) for w in caught] == []


def test_compare_says_what_a_batch_of_one_is():
    model, loss_fn, x, y = make_problem(dict(id="mlp", layers=[4], inputs=5, outputs=3,
                                             loss="crossentropy", batch=6))
    one = compare.describe_batch(model, loss_fn, x[:1], y[:1])
    assert "one example: the mean gradient is its gradient" in one[2] and "cancel" not in " ".join(one)
    several = compare.describe_batch(model, loss_fn, x, y)
    assert "partly cancel" in several[2]


def test_each_chart_shows_one_quantity():
    # One tag per chart, so that the runs of a study are its only lines (B_simple's two
    # estimators, one of them only written under replicas, share one chart).
    charts = instruments.Panel(instruments.default()).charts(["dense/kernel", "dense/bias"])
    layout = tensorboard.layout(charts)
    for category in layout.category:
        for chart in category.chart:
            tags = list(chart.multiline.tag)
            assert len(tags) == 1 or tags == ["^noise_scale/simple$", "^noise_scale/two_batch$"], (
                category.title, chart.title, tags)
    per_variable = {c.title: [ch.title for ch in c.chart] for c in layout.category}
    assert per_variable["Norm of the mean gradient"] == ["all variables", "dense/kernel", "dense/bias"]
    assert per_variable["Variance of the mean gradient, tr(Sigma)/B"] == ["all variables", "dense/kernel",
                                                                          "dense/bias"]
