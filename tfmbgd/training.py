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

from tfmbgd import data, losses, models, optimizers, stats, summaries
from tfmbgd.errors import UserError
from tfmbgd.moments import gradient_moments


def make_optimizer(name, learning_rate, rule="custom"):
    """The optimizer `name` ("sgd", "momentum", ...): tfmbgd's (`rule="custom"`) or Keras'.

    Hyperparameters other than the learning rate are the Keras defaults (momentum 0.9).
    """
    ours = {"sgd": lambda lr: optimizers.MiniBatchSGD(lr),
            "momentum": lambda lr: optimizers.MomentumSGD(lr, momentum=0.9),
            "nesterov": lambda lr: optimizers.MomentumSGD(lr, momentum=0.9, nesterov=True),
            "rmsprop": optimizers.RMSprop, "adagrad": optimizers.Adagrad, "adam": optimizers.Adam}
    builtin = {"sgd": lambda lr: keras.optimizers.SGD(lr),
               "momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
               "nesterov": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
               "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad,
               "adam": keras.optimizers.Adam}
    table = ours if rule == "custom" else builtin
    if name not in table:
        raise UserError(f"optimizer must be one of {', '.join(table)}; got {name!r}")
    return table[name](learning_rate)


def make_update(rule, variables, learning_rate, optimizer="sgd"):
    """Returns `apply(grads)` that changes `variables` by one update of `rule`.

    Args:
      rule: "manual" (`v.assign_sub(learning_rate * g)` written out; plain SGD only),
        "custom" (tfmbgd's optimizer, `MiniBatchSGD` for sgd) or "keras" (the Keras
        built-in). For sgd all three compute `w - lr * g` and give bit-identical weights.
      variables: the variables to update, aligned with the gradients.
      learning_rate: a float > 0.
      optimizer: "sgd", "momentum", "nesterov", "rmsprop", "adagrad" or "adam".
    """
    if rule == "manual":
        if optimizer != "sgd":
            raise UserError(f"update manual writes out plain SGD only, not {optimizer}")

        def apply(grads):
            for v, g in zip(variables, grads):
                v.assign_sub(tf.cast(learning_rate, g.dtype) * g)
        return apply
    if rule not in ("custom", "keras"):
        raise UserError(f"update must be manual, custom or keras; got {rule!r}")
    opt = make_optimizer(optimizer, learning_rate, rule)
    opt.build(variables)   # slots exist before the step is traced
    return lambda grads: opt.apply_gradients(zip(grads, variables))


class Steps:
    """The two compiled train steps of a run: `plain(x, y)` and `with_stats(x, y)`.

    Both apply one update and return a dict of tensors: `loss` (the mean per-example loss
    of the batch, whatever the reduction, so runs compare), `accuracy` (classification);
    `with_stats` adds the statistics of `tfmbgd.stats.statistics` and the smoothed
    `noise_scale/simple`. `plain` computes no moments at all.

    Args:
      method: how `gradient_moments` gets per-example information ("auto", ...).
      elementwise: compute the elementwise tier too (per-parameter variance, GSNR).
      noise_scale: the `stats.NoiseScaleEMA` that smooths B_simple across steps.
    """

    def __init__(self, model, loss_fn, apply, reduction="mean", method="auto",
                 classification=True, elementwise=False, noise_scale=None):
        self.model, self.loss_fn, self.apply = model, loss_fn, apply
        self.reduction, self.method, self.classification = reduction, method, classification
        self.elementwise = elementwise
        self.noise_scale = noise_scale if noise_scale is not None else stats.NoiseScaleEMA()
        self.names = [v.path for v in model.trainable_variables]
        self.plain = tf.function(self._plain)
        self.with_stats = tf.function(self._with_stats)

    def _plain(self, x, y):
        with tf.GradientTape() as tape:
            outputs = self.model(x, training=True)
            per_example = self.loss_fn(y, outputs)
            loss = losses.reduce(per_example, self.reduction)
        self.apply(tape.gradient(loss, self.model.trainable_variables))
        return self._metrics(per_example, outputs, y)

    def _with_stats(self, x, y):
        m = gradient_moments(self.model, self.loss_fn, x, y, self.method, self.elementwise)
        grads = m.mean
        if self.reduction == "sum":
            grads = [tf.cast(m.batch_size, g.dtype) * g for g in grads]
        self.apply(grads)
        out = self._metrics(m.losses, m.outputs, y)
        out.update(stats.statistics(m, self.names))
        if "grad_var/trace" in out:      # B_simple needs a variance: not for a batch of one
            # The terms of stats.noise_scale_terms, from scalars already computed:
            # |G|^2 = |mean|^2 - tr(Sigma) / B.
            grad_sq = tf.square(out["grad/norm"]) - out["grad_var/of_mean"]
            out["noise_scale/simple"] = self.noise_scale.update(out["grad_var/trace"], grad_sq)
        return out

    def _metrics(self, per_example, outputs, y):
        out = {"loss": tf.reduce_mean(per_example)}
        if self.classification:
            correct = tf.equal(tf.argmax(outputs, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
            out["accuracy"] = tf.reduce_mean(tf.cast(correct, tf.float32))
        return out


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
