"""The batch-size study: one run per batch size, compared in TensorBoard.

`python train.py --batch_sizes=1,8,32,128,full` trains the same model from the same
initial weights on the same data once per batch size, into one study directory:

    logs/<study>/b1/{train,test}, logs/<study>/b8/..., ...

Each run records its settings and final results with TensorBoard's HParams plugin (hparams:
batch size, learning rate, reduction, gradient method; metrics: final test loss and
accuracy, and the means its instruments' `summaries` name, such as the mean smoothed
B_simple). Every run, in a study or not, also carries the
custom-scalars layout of `tfmbgd.loop.tensorboard.layout`.
"""

import dataclasses
import math
import os

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from tfmbgd import config as config_lib
from tfmbgd import data
from tfmbgd.errors import Interrupted, UserError
from tfmbgd.loop import rundir, training

HPARAMS = {
    "batch_size": hp.HParam("batch_size", hp.IntInterval(1, 2 ** 31 - 1), "examples per update"),
    "learning_rate": hp.HParam("learning_rate", hp.RealInterval(0.0, float("inf")), "step size"),
    "reduction": hp.HParam("reduction", hp.Discrete(list(config_lib.REDUCTIONS))),
    "grad_method": hp.HParam("grad_method", hp.Discrete(list(config_lib.GRAD_METHODS))),
}
FINAL = [
    hp.Metric("final/test_loss", display_name="test loss"),
    hp.Metric("final/test_accuracy", display_name="test accuracy"),
]


def metrics(averaged):
    """The HParams metrics: final test loss and accuracy, and the means of the `averaged`
    tags (`tfmbgd.instruments.Summary`) that name a metric."""
    return FINAL + [hp.Metric(s.metric, display_name=s.title) for s in averaged if s.metric]


def scaled_learning_rate(learning_rate, batch, reference, rule):
    """The learning rate for `batch` examples per update, given `learning_rate` at `reference`.

    rule "none": the same rate for every batch size; "linear": times batch / reference (Goyal
    et al. 2017); "sqrt": times sqrt(batch / reference) (Krizhevsky 2014).
    """
    if rule == "none":
        return learning_rate
    ratio = batch / reference
    if rule == "linear":
        return learning_rate * ratio
    if rule == "sqrt":
        return learning_rate * math.sqrt(ratio)
    raise UserError(f"lr_scaling must be none, linear or sqrt; got {rule!r}")


def run(config, verbose=1, should_stop=None):
    """Trains one run per batch size of `config.batch_sizes`; returns `{name: RunResult}`.

    Raises:
      tfmbgd.errors.Interrupted: `should_stop` said so (see `training.train`); the run of
        the batch size in progress can be resumed on its own, the finished ones are kept.
    """
    ds = data.load(config.dataset, config.seed)     # read once, shared by every run
    n = len(ds.train[0])
    reference = n if config.batch_size is None else config.batch_size
    name = f"study-{config.lr_scaling}-" + rundir.run_name(config, with_batch=False)
    study_dir = rundir.new_run_dir(config.logdir, name)
    averaged = training.run_panel(config).summaries()
    with tf.summary.create_file_writer(study_dir).as_default():
        hp.hparams_config(hparams=list(HPARAMS.values()), metrics=metrics(averaged))
    results = {}
    for batch_size in config.batch_sizes:
        batch = n if batch_size is None else batch_size
        lr = scaled_learning_rate(config.learning_rate, batch, reference, config.lr_scaling)
        one = dataclasses.replace(config, batch_size=batch_size, learning_rate=lr, batch_sizes=(),
                                  lr_scaling="none")     # the run's rate is scaled already
        name = "bfull" if batch_size is None else f"b{batch_size}"
        if should_stop is not None and should_stop():
            raise Interrupted(None, 0, f"between the runs of the study; the finished ones are in {study_dir}")
        run_dir = os.path.join(study_dir, name)        # made once it holds its first checkpoint
        if verbose:
            print(f"== batch size {batch} (learning rate {lr:g}) -> {run_dir}")
        results[name] = result = training.train(one, verbose=verbose, run_dir=run_dir, dataset=ds,
                                                 should_stop=should_stop)
        run_dir = result.run_dir
        _write_session(run_dir, one, batch, result, averaged)
    if verbose:
        print(table(results, averaged))
        print(f"Study written to {study_dir}\nSee it with:  tensorboard --logdir {study_dir}")
    return results


def table(results, averaged):
    """A markdown table of a study: per batch size, updates, final test metrics, and the
    mean over its statistics steps of each `averaged` tag (`tfmbgd.instruments.Summary`)."""
    lines = ["| run | updates | test loss | test accuracy | " + " | ".join(s.title for s in averaged) + " |",
             "|---|---|---|---|" + "---|" * len(averaged)]
    for name, r in results.items():
        acc = r.test.get("accuracy", float("nan"))
        means = " | ".join(f"{r.means.get(s.tag, float('nan')):.3g}" for s in averaged)
        lines.append(f"| {name} | {r.steps} | {r.test['loss']:.4f} | {acc:.4f} | {means} |")
    return "\n".join(lines)


def _write_session(run_dir, config, batch, result, averaged):
    """HParams session of one run: its settings, its final metrics, and the layout."""
    with tf.summary.create_file_writer(run_dir).as_default():
        hp.hparams({HPARAMS["batch_size"]: batch, HPARAMS["learning_rate"]: config.learning_rate,
                    HPARAMS["reduction"]: config.reduction, HPARAMS["grad_method"]: config.grad_method})
        tf.summary.scalar("final/test_loss", result.test["loss"], step=result.steps)
        if "accuracy" in result.test:
            tf.summary.scalar("final/test_accuracy", result.test["accuracy"], step=result.steps)
        for s in averaged:
            value = result.means.get(s.tag, float("nan"))
            if s.metric and math.isfinite(value):
                tf.summary.scalar(s.metric, value, step=result.steps)
