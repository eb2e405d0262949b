"""The custom mini-batch training loop: a `tf.function` step, a Python loop that logs.

One step takes a mini-batch, computes the batch gradient and applies it once — one update
per batch, never per example. The gradient is that of the `reduce_mean` (or `reduce_sum`)
of the unscaled per-example losses. On statistics steps it comes from the gradient
moments instead: their `mean` *is* the gradient of the mean loss, so the update is the
same and the statistics are of the very batch that was applied.
"""

import dataclasses
import math
import time

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
    means: dict = dataclasses.field(default_factory=dict)   # StepRunner.means(): mean B_simple, ...


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
    """The model, per-example loss, examples per update, and micro-batch size of a run.

    Without accumulation the micro-batch size is None and an update takes `batch_size`
    examples (None = the whole training set). With `accumulate=K` an update takes K
    micro-batches of `batch_size` (for the full set: K micro-batches that split it).
    """
    n = len(ds.train[0])
    k = config.accumulate
    if config.batch_size is None:
        update, micro = n, -(-n // k)
    else:
        update, micro = config.batch_size * k, config.batch_size
    if update > n:
        raise UserError(f"an update of {update} examples (batch_size x accumulate) is more than the {n} "
                        f"training examples of {ds.name}; use --batch_size=full for full-batch "
                        "gradient descent")
    model = models.build(config.model, ds.input_shape, ds.num_classes, config.hidden, config.seed)
    return model, losses.per_example(losses.for_task(ds.num_classes)), update, (micro if k > 1 else None)


class StepRunner:
    """Runs many train steps per `tf.function` call and writes their summaries from inside.

    Coming back to Python after every step costs more than a small step itself (and a
    sync per step); `model.fit` avoids it with `steps_per_execution`, and so does this.
    Batches are gathered from the training set held as tensors, by indices drawn in
    Python, so every batch of a call has the same static size: a batch of one is known to
    have no variance, and an epoch's remainder batch runs in a call of its own.

    Besides the step's own values it writes, on log steps, `loss_by/examples_seen` (the
    x-axis is the number of examples used so far) and `loss_by/milliseconds` (time since
    training began), so runs with different batch sizes compare on one chart; and on
    statistics steps `batch_size`. It keeps the running sums of the finite values of
    `AVERAGED` tags, for `means()`.
    """

    AVERAGED = ("noise_scale/simple", "grad_var/trace", "grad_var/of_mean")

    def __init__(self, steps, writer, log_every, stats_every):
        self.steps, self.writer = steps, writer
        self.log_every, self.stats_every = log_every, stats_every
        self._sums = {tag: (tf.Variable(0.0, trainable=False, dtype=tf.float64),
                            tf.Variable(0, trainable=False, dtype=tf.int64)) for tag in self.AVERAGED}
        self.run = tf.function(self._run)

    def means(self):
        """Mean of each `AVERAGED` tag over the steps that wrote it (NaN if none)."""
        return {tag: float(total.numpy()) / int(count.numpy()) if int(count.numpy()) else float("nan")
                for tag, (total, count) in self._sums.items()}

    def _run(self, x_all, y_all, index, first_step, first_example, start_time):
        """Steps `first_step, first_step + 1, ...` on batches `x_all[index[i]]`; returns the
        sum of their mean losses (float32). `start_time`: `time.time()` when training began."""
        total = tf.constant(0.0)
        batch = tf.cast(tf.shape(index)[1], tf.int64)
        for i in tf.range(tf.shape(index)[0]):
            i64 = tf.cast(i, tf.int64)
            where = (first_step + i64, first_example + i64 * batch, start_time)
            loss = self._step(tf.gather(x_all, index[i]), tf.gather(y_all, index[i]), where)
            total += tf.cast(loss, tf.float32)
        return total

    def _step(self, x, y, where):
        if not self.stats_every:
            return self._plain(x, y, where)
        return tf.cond(where[0] % self.stats_every == 0, lambda: self._with_stats(x, y, where),
                       lambda: self._plain(x, y, where))

    def _plain(self, x, y, where):
        out = self.steps._plain(x, y)
        tf.cond(where[0] % self.log_every == 0, lambda: self._write(out, where),
                lambda: tf.constant(False))
        return out["loss"]

    def _with_stats(self, x, y, where):
        out = self.steps._with_stats(x, y)
        out["batch_size"] = tf.cast(tf.shape(x)[0], tf.float32)
        for tag, (total, count) in self._sums.items():
            if tag in out:
                value = tf.cast(out[tag], tf.float64)
                finite = tf.math.is_finite(value)
                total.assign_add(tf.where(finite, value, tf.zeros_like(value)))
                count.assign_add(tf.cast(finite, tf.int64))
        self._write(out, where)
        return out["loss"]

    def _write(self, values, where):
        step, examples, start_time = where
        summaries.write_in_graph(self.writer, values, step)
        # tf.timestamp is refused under op determinism; the host clock through py_function is not.
        now = tf.py_function(time.time, [], tf.float64)
        elapsed_ms = tf.cast((now - start_time) * 1000.0, tf.int64)
        summaries.write_in_graph(self.writer, {"loss_by/examples_seen": values["loss"]}, examples)
        summaries.write_in_graph(self.writer, {"loss_by/milliseconds": values["loss"]}, elapsed_ms)
        return tf.constant(True)


def epoch_batches(rng, n, batch, steps_per_call):
    """Index arrays for one epoch: calls of up to `steps_per_call` full batches, then the
    remainder batch (if any) alone. Every example once, in a fresh random order."""
    order = rng.permutation(n).astype(np.int32)
    full = n // batch * batch
    chunks = order[:full].reshape(-1, batch)
    calls = [chunks[i:i + steps_per_call] for i in range(0, len(chunks), steps_per_call)]
    if full < n:
        calls.append(order[full:][None])
    return calls


def train(config, verbose=1, run_dir=None):
    """Runs the training of `config` and logs it to TensorBoard; returns a `RunResult`.

    `run_dir`: an existing, empty directory to write to; default a new one named by
    `summaries.run_name` under `config.logdir`.

    Steps count from 0: the statistics logged at step s are those of the weights after s
    updates, computed on the batch of update s + 1.

    Raises:
      UserError: a data set, model or logdir that cannot be used, or a loss that stops
        being finite.
    """
    keras.utils.set_random_seed(config.seed)
    ds = data.load(config.dataset, config.seed)
    model, loss_fn, batch, micro = setup(config, ds)
    classification = ds.num_classes > 0
    apply = make_update(config.update, model.trainable_variables, config.learning_rate, config.optimizer)
    steps = Steps(model, loss_fn, apply, config.reduction, config.grad_method, classification,
                  config.elementwise_stats, stats.NoiseScaleEMA(config.noise_scale_decay), micro)
    run_dir = run_dir or summaries.new_run_dir(config.logdir, summaries.run_name(config))
    x_all, y_all = tf.constant(ds.train[0]), tf.constant(ds.train[1])
    rng = np.random.default_rng(config.seed)
    per_epoch = math.ceil(len(ds.train[0]) / batch)
    result = RunResult(run_dir, 0, 0, {})
    examples, start_time = 0, tf.constant(time.time(), tf.float64)
    with summaries.RunWriters(run_dir) as writers:
        runner = StepRunner(steps, writers.writer("train"), config.log_every, config.stats_every)
        summaries.write_layout(writers.writer("train"), [v.path for v in model.trainable_variables])
        for epoch in range(config.epochs):
            bar = keras.utils.Progbar(per_epoch, verbose=verbose, unit_name="batch")
            if verbose:
                print(f"Epoch {epoch + 1}/{config.epochs}")
            loss_sum, done = 0.0, 0
            for index in epoch_batches(rng, len(ds.train[0]), batch, config.steps_per_call):
                first = tf.constant(result.steps, tf.int64)
                total = float(runner.run(x_all, y_all, tf.constant(index), first,
                                         tf.constant(examples, tf.int64), start_time))
                if not math.isfinite(total):
                    raise UserError(f"the loss became {total} between steps {result.steps} and "
                                    f"{result.steps + len(index) - 1}; lower --learning_rate or "
                                    "check the data for extreme values")
                result.steps += len(index)
                examples += index.size
                loss_sum, done = loss_sum + total, done + len(index)
                bar.update(done, [("loss", total / len(index))])
            result.epochs = epoch + 1
            result.train_history.append(loss_sum / done)
            result.test = evaluate(model, loss_fn, *ds.test, classification)
            writers.write("test", result.test, result.steps)
            if verbose:
                print("  test " + "  ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
        result.means = runner.means()
    if verbose:
        print(f"Run written to {run_dir}\nSee it with:  tensorboard --logdir {config.logdir}")
    return result
