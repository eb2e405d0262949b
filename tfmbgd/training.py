"""The custom mini-batch training loop: a `tf.function` step, a Python loop that logs.

One step takes a mini-batch, computes the batch gradient and applies it once — one update
per batch, never per example. The gradient is that of the `reduce_mean` (or `reduce_sum`)
of the unscaled per-example losses. On statistics steps it comes from the gradient
moments instead: their `mean` *is* the gradient of the mean loss, so the update is the
same and the statistics are of the very batch that was applied.
"""

import dataclasses
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfmbgd import checkpoints, data, losses, models, stats, summaries
from tfmbgd import config as config_lib
from tfmbgd.errors import UserError
from tfmbgd.steps import NonFiniteGuard, Steps, make_optimizer, make_update

FINAL_WEIGHTS = "final.weights.h5"


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
        what = (f"batch_size {update}" if k == 1
                else f"an update of {update} examples (batch_size x accumulate)")
        raise UserError(f"{what} is more than the {n} training examples of {ds.name}; use "
                        "--batch_size=full for full-batch gradient descent")
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
        self._compiled = {}

    def run(self, x_all, y_all, index, first_step, first_example, start_time):
        """Runs `len(index)` steps in one call: one compiled function per batch size, for
        any number of steps (checkpoints and epoch ends cut calls short)."""
        batch = int(index.shape[1])
        if batch not in self._compiled:
            spec = lambda t: tf.TensorSpec(t.shape, t.dtype)
            self._compiled[batch] = tf.function(self._run, input_signature=[
                spec(x_all), spec(y_all), tf.TensorSpec([None, batch], tf.int32),
                tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.float64)])
        return self._compiled[batch](x_all, y_all, index, first_step, first_example, start_time)

    def variables(self):
        """The running sums behind `means()` (checkpointed with the run)."""
        return [v for pair in self._sums.values() for v in pair]

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
            finite = tf.math.is_finite(loss)
            total += tf.cast(tf.where(finite, loss, tf.zeros_like(loss)), tf.float32)
        return total

    def _step(self, x, y, where):
        if self.steps.guard is not None:
            self.steps.guard.current_step.assign(where[0])
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
        if self.steps.guard is not None and self.steps.guard.mode == "skip":
            values = {**values, "nonfinite/skipped": self.steps.guard.skipped}
        summaries.write_in_graph(self.writer, values, step)
        # tf.timestamp is refused under op determinism; the host clock through py_function is not.
        now = tf.py_function(time.time, [], tf.float64)
        elapsed_ms = tf.cast((now - start_time) * 1000.0, tf.int64)
        summaries.write_in_graph(self.writer, {"loss_by/examples_seen": values["loss"]}, examples)
        summaries.write_in_graph(self.writer, {"loss_by/milliseconds": values["loss"]}, elapsed_ms)
        return tf.constant(True)


def epoch_batches(rng, n, batch, steps_per_call, skip=0, checkpoint_every=0, first_step=0):
    """Index arrays for one epoch, one array `[steps, batch]` per compiled call.

    The epoch's order is drawn from `rng` (every example once); full batches first, then
    the remainder batch alone. The first `skip` steps are left out (a resumed epoch), and
    calls end at multiples of `checkpoint_every` (counted from `first_step`, the step of the
    first batch returned) so that checkpoints fall between calls.
    """
    order = rng.permutation(n).astype(np.int32)
    full = n // batch * batch
    batches = list(order[:full].reshape(-1, batch))
    if full < n:
        batches.append(order[full:])
    batches = batches[skip:]
    calls, step = [], first_step
    while batches:
        size = len(batches[0])
        limit = steps_per_call
        if checkpoint_every:
            limit = min(limit, checkpoint_every - step % checkpoint_every)
        take = 1
        while take < min(limit, len(batches)) and len(batches[take]) == size:
            take += 1
        calls.append(np.stack(batches[:take]))
        batches, step = batches[take:], step + take
    return calls


def train(config, verbose=1, run_dir=None, should_stop=None):
    """Runs the training of `config` and logs it to TensorBoard; returns a `RunResult`.

    Args:
      run_dir: an existing, empty directory to write to; default a new one named by
        `summaries.run_name` under `config.logdir`. With `config.resume` the run continues
        in that directory from its last checkpoint.
      should_stop: polled between compiled calls; when it returns True the run saves a
        checkpoint and raises `Interrupted` (train.py sets it on SIGINT / SIGTERM).

    Steps count from 0: the statistics logged at step s are those of the weights after s
    updates, computed on the batch of update s + 1.

    Raises:
      UserError: a data set, model or logdir that cannot be used, or a loss that stops
        being finite. Interrupted: `should_stop` asked for it.
    """
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    ds = data.load(config.dataset, config.seed)
    model, loss_fn, batch, micro = setup(config, ds)
    classification = ds.num_classes > 0
    optimizer = None
    if config.update == "manual":
        apply = make_update("manual", model.trainable_variables, config.learning_rate, config.optimizer)
    else:
        optimizer = make_optimizer(config.optimizer, config.learning_rate, config.update)
        optimizer.build(model.trainable_variables)
        apply = lambda grads: optimizer.apply_gradients(zip(grads, model.trainable_variables))
    noise_scale = stats.NoiseScaleEMA(config.noise_scale_decay)
    guard = NonFiniteGuard(apply, config.on_nonfinite)
    steps = Steps(model, loss_fn, apply, config.reduction, config.grad_method, classification,
                  config.elementwise_stats, noise_scale, micro, guard)
    if config.resume:
        run_dir = config.resume
    else:
        run_dir = run_dir or summaries.new_run_dir(config.logdir, summaries.run_name(config))
        config_lib.save(run_dir, config)
    x_all, y_all = tf.constant(ds.train[0]), tf.constant(ds.train[1])
    rng = np.random.default_rng(config.seed)
    per_epoch = math.ceil(len(ds.train[0]) / batch)
    result = RunResult(run_dir, 0, 0, {})
    start_time = tf.constant(time.time(), tf.float64)
    with summaries.RunWriters(run_dir) as writers:
        runner = StepRunner(steps, writers.writer("train"), config.log_every, config.stats_every)
        state = checkpoints.RunState(run_dir, model, optimizer,
                                     [noise_scale.trace, noise_scale.grad_sq, *runner.variables()],
                                     config.keep_checkpoints)
        if config.resume:
            latest = state.restore()
            if verbose:
                print(f"Resuming {run_dir} from {os.path.basename(latest)} (step {int(state.step.numpy())})")
        else:
            state.remember_rng(rng)
            summaries.write_layout(writers.writer("train"), [v.path for v in model.trainable_variables])
        for epoch in range(int(state.epoch.numpy()), config.epochs):
            state.recall_rng(rng)
            done = int(state.in_epoch.numpy())
            bar = keras.utils.Progbar(per_epoch, verbose=verbose, unit_name="batch")
            if verbose:
                print(f"Epoch {epoch + 1}/{config.epochs}")
            loss_sum = 0.0
            for index in epoch_batches(rng, len(ds.train[0]), batch, config.steps_per_call, skip=done,
                                       checkpoint_every=config.checkpoint_every,
                                       first_step=int(state.step.numpy())):
                total = float(runner.run(x_all, y_all, tf.constant(index), tf.constant(state.step),
                                         tf.constant(state.examples), start_time))
                if bool(guard.tripped.numpy()):
                    raise UserError(_nonfinite_message(guard, model))
                state.step.assign_add(len(index))
                state.in_epoch.assign_add(len(index))
                state.examples.assign_add(index.size)
                loss_sum, done = loss_sum + total, done + len(index)
                bar.update(done, [("loss", total / len(index))])
                if config.checkpoint_every and int(state.step.numpy()) % config.checkpoint_every == 0:
                    state.save()
                if should_stop is not None and should_stop():
                    state.save()
                    writers.close()
                    raise Interrupted(run_dir, int(state.step.numpy()))
            state.epoch.assign_add(1)
            state.in_epoch.assign(0)
            state.remember_rng(rng)
            result.epochs = epoch + 1
            result.train_history.append(loss_sum / max(done, 1))
            result.test = evaluate(model, loss_fn, *ds.test, classification)
            writers.write("test", result.test, int(state.step.numpy()))
            state.save()
            if verbose:
                print("  test " + "  ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
        result.steps = int(state.step.numpy())
        result.means = runner.means()
    model.save_weights(os.path.join(run_dir, FINAL_WEIGHTS))
    if verbose:
        print(f"Run written to {run_dir}\nSee it with:  tensorboard --logdir {config.logdir}")
    return result


def _nonfinite_message(guard, model):
    which = int(guard.first_bad_variable.numpy())
    what = "the loss" if which < 0 else f"the gradient of {model.trainable_variables[which].path}"
    return (f"{what} was not finite at step {int(guard.first_bad_step.numpy())}; the update was "
            "not applied and the last good checkpoint is kept. Lower "
            "--learning_rate, check the data, or pass --on_nonfinite=skip")


class Interrupted(Exception):
    """A run stopped on request after saving a checkpoint; `resume` continues it."""

    def __init__(self, run_dir, step):
        super().__init__(f"stopped at step {step}; checkpoint saved in {run_dir}")
        self.run_dir, self.step = run_dir, step
