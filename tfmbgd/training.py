"""The custom mini-batch training loop: a `tf.function` step, a Python loop that logs.

One step takes a mini-batch, computes the batch gradient and applies it once — one update
per batch, never per example. The gradient is that of the `reduce_mean` (or `reduce_sum`)
of the unscaled per-example losses. On statistics steps it comes from the gradient
moments instead: their `mean` *is* the gradient of the mean loss, so the update is the
same and the statistics are of the very batch that was applied.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from tfmbgd import data, losses, models, stats, summaries
from tfmbgd.errors import UserError
from tfmbgd.steps import Steps, make_update


@dataclasses.dataclass
class RunResult:
    run_dir: str
    steps: int                    # optimizer steps taken
    epochs: int
    test: dict                    # final test metrics
    train_history: list = dataclasses.field(default_factory=list)   # mean train loss per epoch


def evaluate(model, loss_fn, x, y, classification, batch_size=1024):
    """Mean per-example loss (and accuracy) over a whole split."""
    total, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        outputs = model(xb, training=False)
        total += float(tf.reduce_sum(loss_fn(yb, outputs)))
        if classification:
            correct += int(np.sum(np.argmax(outputs, axis=-1) == yb))
    out = {"loss": total / len(x)}
    if classification:
        out["accuracy"] = correct / len(x)
    return out


def setup(config, ds):
    """The model, per-example loss and batch size of a run (batch_size None = full set)."""
    n = len(ds.train[0])
    batch = n if config.batch_size is None else config.batch_size
    if batch > n:
        raise UserError(f"batch_size {batch} is larger than the {n} training examples of "
                        f"{ds.name}; use --batch_size=full for full-batch gradient descent")
    model = models.build(config.model, ds.input_shape, ds.num_classes, config.hidden, config.seed)
    return model, losses.per_example(losses.for_task(ds.num_classes)), batch


def train(config, verbose=1):
    """Runs the training of `config` and logs it to TensorBoard; returns a `RunResult`.

    Raises:
      UserError: a data set, model or logdir that cannot be used, or a loss that stops
        being finite.
    """
    keras.utils.set_random_seed(config.seed)
    ds = data.load(config.dataset, config.seed)
    model, loss_fn, batch = setup(config, ds)
    classification = ds.num_classes > 0
    apply = make_update(config.update, model.trainable_variables, config.learning_rate, config.optimizer)
    steps = Steps(model, loss_fn, apply, config.reduction, config.grad_method, classification,
                  config.elementwise_stats, stats.NoiseScaleEMA(config.noise_scale_decay))
    run_dir = summaries.new_run_dir(config.logdir, summaries.run_name(config))
    pipeline = data.batches(*ds.train, batch, config.seed)
    per_epoch = math.ceil(len(ds.train[0]) / batch)
    result = RunResult(run_dir, 0, 0, {})
    with summaries.RunWriters(run_dir) as writers:
        for epoch in range(config.epochs):
            bar = keras.utils.Progbar(per_epoch, verbose=verbose, unit_name="batch")
            if verbose:
                print(f"Epoch {epoch + 1}/{config.epochs}")
            epoch_losses = []
            for x, y in pipeline:
                epoch_losses.append(_one_step(config, steps, writers, x, y, result.steps))
                result.steps += 1
                bar.update(len(epoch_losses), [("loss", epoch_losses[-1])])
            result.epochs = epoch + 1
            result.train_history.append(float(np.mean(epoch_losses)))
            result.test = evaluate(model, loss_fn, *ds.test, classification)
            writers.write("test", result.test, result.steps)
            if verbose:
                print("  test " + "  ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
    if verbose:
        print(f"Run written to {run_dir}\nSee it with:  tensorboard --logdir {config.logdir}")
    return result


def _one_step(config, steps, writers, x, y, step):
    """Runs step number `step`, logs what is due, and returns the batch's mean loss.

    Steps count from 0, so the statistics logged at step s are those of the weights
    after s updates, computed on the batch of update s + 1.
    """
    want_stats = config.stats_every > 0 and step % config.stats_every == 0
    out = steps.with_stats(x, y) if want_stats else steps.plain(x, y)
    loss = float(out["loss"])
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss} at step {step}; "
                        "lower --learning_rate or check the data for extreme values")
    if want_stats or step % config.log_every == 0:
        values = {k: v.numpy() for k, v in out.items()}
        if not np.isfinite(values.get("noise_scale/simple", 0.0)):
            del values["noise_scale/simple"]     # undefined while noise hides the signal
        writers.write("train", values, step)
    return loss
