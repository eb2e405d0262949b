"""A run of `train.py`: build it, train it epoch by epoch, checkpoint, evaluate, report.

`train(config)` makes the data, the model, the update rule and the `Steps` (`tfmbgd.loop.
steps`) of a `TrainConfig`, then drives the compiled calls of a `runner` over each epoch's
batches. It owns the run's life: a new run directory set up hidden and published with its
first checkpoint (`rundir`), resume from the last checkpoint (`checkpoints`), the test set
after every epoch, Ctrl-C and non-finite losses stopped with what is kept said, and the
progress bar (`progress`).
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tfmbgd import config as config_lib
from tfmbgd import data, distribute, losses, models
from tfmbgd.engine import layerwise
from tfmbgd.engine.replicas import Replicas
from tfmbgd.errors import Interrupted, UserError
from tfmbgd.instruments import Panel
from tfmbgd.loop import checkpoints, rundir, tensorboard
from tfmbgd.loop.progress import RunProgress
from tfmbgd.loop.runner import StepRunner, XlaStepRunner, epoch_batches
from tfmbgd.loop.steps import Steps
from tfmbgd.loop.update import NonFiniteGuard, make_update, optimizer_update
from tfmbgd.optimizers import make_optimizer

FINAL_WEIGHTS = "final.weights.h5"


@dataclasses.dataclass
class RunResult:
    run_dir: str
    steps: int                    # optimizer steps taken
    epochs: int
    test: dict                    # final test metrics
    train_history: list = dataclasses.field(default_factory=list)   # mean train loss per epoch
    means: dict = dataclasses.field(default_factory=dict)   # StepRunner.means(): mean B_simple, ...
    diverged: bool = False        # a call's mean loss went non-finite or far above the initial one


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
    config_lib.check_update_size(config.batch_size, k, n, ds.name)
    if config.batch_size is None:
        update, micro = n, -(-n // k)
    else:
        update, micro = config.batch_size * k, config.batch_size
    with _policy(config.mixed_precision):
        model = models.build(config.model, ds.input_shape, ds.num_classes, config.hidden, config.seed)
    return model, losses.per_example(losses.for_task(ds.num_classes)), update, (micro if k > 1 else None)


@contextlib.contextmanager
def _policy(name):
    """Keras' global dtype policy `name` ("none": as it is) while a model is built; its
    layers keep it."""
    if name == "none":
        yield
        return
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def train(config, verbose=1, run_dir=None, should_stop=None, dataset=None):
    """Runs the training of `config` and logs it to TensorBoard; returns a `RunResult`.

    Args:
      run_dir: where to write: a path that does not exist yet, or by default a new name
        (`rundir.run_name`) under `config.logdir`; the directory appears there, renamed
        from a hidden one, once it holds config.json and the first checkpoint (`-2`, `-3`,
        ... is added to a name taken meanwhile). An existing empty directory is written
        directly. With `config.resume` the run continues in that directory from its last
        checkpoint.
      should_stop: polled between compiled calls; when it returns True the run saves a
        checkpoint and raises `Interrupted` (train.py sets it on SIGINT / SIGTERM).
      dataset: `data.load(config.dataset, config.seed)` if the caller has it already.

    Steps count from 0: the statistics logged at step s are those of the weights after s
    updates, computed on the batch of update s + 1.

    Under `config.strategy` "mirrored" or "multi_worker" the batch size is the global
    batch, split across the replicas (see `tfmbgd.engine.replicas`). Only the chief writes the
    run; every other worker writes its summaries and checkpoints (which tf.distribute
    needs every worker to make) to a temporary directory that it removes at the end.

    Raises:
      UserError: a data set, model or logdir that cannot be used, a loss that stops
        being finite, or another worker of a multi-worker run that stopped.
      Interrupted: `should_stop` asked for it.
    """
    strategy = distribute.make_strategy(config.strategy, config.cpu_devices)
    chief = distribute.is_chief(strategy)
    with contextlib.ExitStack() as stack:
        if not chief:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfmbgd-worker-"))
            verbose = 0
        try:
            return _train(config, verbose, run_dir, should_stop, strategy, dataset)
        except Interrupted as stopped:
            if chief:
                raise
            raise Interrupted(None, stopped.step) from None     # its directory is gone
        except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError) as err:
            if config.strategy != "multi_worker":
                raise
            # Collectives fail on every worker when one of them stops or is unreachable.
            raise UserError(f"another worker of the cluster stopped or cannot be reached "
                            f"({type(err).__name__}); restart every worker with "
                            "--resume=<the chief's run directory>") from None


def _train(config, verbose, run_dir, should_stop, strategy, dataset):
    if config.resume:
        _check_unfinished(config)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():      # model, optimizer and the steps' variables: one copy per replica
        parts = _build(config, strategy, dataset)
    if should_stop is not None and should_stop():
        raise Interrupted(None, 0, "before training began; nothing was written")
    new = not config.resume
    if not new:
        run_dir = config.resume
    # A new run is set up in a hidden directory and renamed to its own name once it holds
    # config.json and its first checkpoint: a run directory is resumable from the moment it
    # exists. (A worker's temporary directory, which exists already, is written directly.)
    staged = None
    if new and (run_dir is None or not os.path.exists(run_dir)):
        staged = rundir.staging_dir(config.logdir if run_dir is None else os.path.dirname(run_dir))
        run_dir = run_dir or os.path.join(config.logdir, rundir.run_name(config))
    where = _Where(run_dir, staged)
    try:
        return _train_in(config, verbose, where, should_stop, strategy, parts, new)
    except KeyboardInterrupt:        # a second Ctrl-C: at once, keeping the last checkpoint
        raise _stopped_at_once(where) from None
    finally:
        if staged is not None and os.path.exists(staged):       # never published: nothing to keep
            shutil.rmtree(staged, ignore_errors=True)


class _Where:
    """Where a run is written: `staged` (a hidden directory, until `publish`), then `run_dir`."""

    def __init__(self, run_dir, staged):
        self.run_dir, self.staged, self.published = run_dir, staged, staged is None

    def publish(self):
        if not self.published:
            self.run_dir, self.published = rundir.publish(self.staged, self.run_dir), True
        return self.run_dir


def _stopped_at_once(where):
    """The `Interrupted` of a run stopped between two checkpoints: what is kept."""
    if not where.published:
        return Interrupted(None, 0, "at once, before the run had its first checkpoint; nothing was kept")
    latest = checkpoints.latest(where.run_dir)
    if latest is None:
        return Interrupted(None, 0, f"at once; {where.run_dir} holds no checkpoint yet")
    step = checkpoints.step_of(latest)
    return Interrupted(where.run_dir, step, f"at once; the checkpoint of step {step} in {where.run_dir} "
                       "is kept")


def _check_unfinished(config):
    """A `UserError` if the run to resume has done all of `config.epochs` already."""
    latest = checkpoints.latest(config.resume)
    if latest is None:
        raise UserError(f"no checkpoint in {config.resume}; nothing to resume")
    rundir.refuse_finished(config.resume, checkpoints.epochs_done(latest), config.epochs)


def _train_in(config, verbose, where, should_stop, strategy, parts, new):
    """The run `where` says (made, or resumed): config.json and a first checkpoint before
    the first step, so that the directory can be resumed from the moment it holds a run."""
    home = where.staged or where.run_dir
    if new:
        rundir.save_config(home, config)
    rng = np.random.default_rng(config.seed)
    with tensorboard.RunWriters(where.run_dir) as writers:
        with strategy.scope():          # the writer is made once the directory has its name
            train_writer = lambda: writers.writer("train")
            runner = (XlaStepRunner(parts.steps, train_writer, config.log_every, config.stats_every,
                                    config.steps_per_call) if config.jit_compile else
                      StepRunner(parts.steps, train_writer, config.log_every, config.stats_every))
        # The run's counters are this process's own (outside the strategy's scope: a
        # multi-worker strategy cannot broadcast the string that holds the rng state).
        state = checkpoints.RunState(home, parts.model, parts.optimizer, runner.variables(),
                                     config.keep_checkpoints, parts.steps.panel.state())
        if new:
            state.remember_rng(rng)
            state.save()
            writers.run_dir = where.publish()
            state.moved_to(where.run_dir)
            tensorboard.write_layout(writers.writer("train"), parts.steps.panel.charts())
        else:
            latest = state.restore(config.resume)
            if verbose:
                print(f"Resuming {where.run_dir} from {os.path.basename(latest)} "
                      f"(step {int(state.step.numpy())})")
        run_dir = where.run_dir
        result = RunResult(run_dir, 0, 0, {})
        _describe(config, parts, verbose)
        progress, first_step = RunProgress(verbose, parts.steps.skipped()), int(state.step.numpy())
        if first_step == 0:
            x, y = parts.ds.train
            progress.initial(evaluate(parts.model, parts.loss_fn, x[:parts.batch], y[:parts.batch],
                                      parts.ds.num_classes > 0)["loss"])
        for epoch in range(int(state.epoch.numpy()), config.epochs):
            progress.epoch(epoch + 1, config.epochs)
            with strategy.scope():
                loss = _train_epoch(config, parts, runner, state, rng, progress, should_stop)
            result.train_history.append(loss)
            state.epoch.assign_add(1)
            state.in_epoch.assign(0)
            state.remember_rng(rng)
            result.epochs = epoch + 1
            result.test = evaluate(parts.model, parts.loss_fn, *parts.ds.test, parts.ds.num_classes > 0)
            writers.write("test", result.test, int(state.step.numpy()))
            state.save()
            progress.end_epoch()
            if verbose:
                print("  test " + "  ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
        result.steps = int(state.step.numpy())
        result.means = runner.means()
        # The batch size also at the last step: a run with one statistics step still draws a line.
        writers.write("train", {"batch_size": float(parts.batch)}, result.steps)
    parts.model.save_weights(os.path.join(run_dir, FINAL_WEIGHTS))
    rundir.mark_finished(run_dir, result.epochs)
    _report_end(progress, result, config, verbose, result.steps - first_step)
    return result


def _describe(config, parts, verbose):
    if verbose and parts.steps.replicas is not None:
        print(_replicas_line(parts.steps.replicas, parts.batch))
    if verbose and config.stats_every and config.grad_method in ("auto", "layerwise"):
        print(layerwise.describe(layerwise.coverage(parts.model, parts.ds.train[0][:2]),
                                 layerwise.batch_norms(parts.model)))


def _report_end(progress, result, config, verbose, updates):
    """The last lines of a run; a `UserError` if every one of its `updates` was skipped."""
    skipped = progress.skipped_in_run()
    result.diverged = progress.diverged
    if verbose:
        if skipped:
            print(f"{skipped} of {updates} updates were skipped as non-finite (nonfinite/skipped in "
                  "TensorBoard)")
        if progress.diverged:
            print(progress.verdict())
        print(f"Run written to {result.run_dir}")
        if os.path.dirname(os.path.normpath(result.run_dir)) == os.path.normpath(config.logdir):
            # (a study's runs sit in its directory, which it names once at its end)
            print(f"See it with:  tensorboard --logdir {config.logdir}")
    if skipped and skipped >= updates:
        raise UserError(f"every update of the run ({skipped}) was skipped as non-finite: the weights did "
                        "not change. Lower --learning_rate or check the data")


def _replicas_line(replicas, batch):
    if replicas.count == 1:
        return "1 replica (a strategy over one device) takes each whole batch"
    share = replicas.share(batch)
    split = (f"{share} examples each" if batch % replicas.count == 0 else
             f"up to {share} examples each (the last share is padded with weight-0 examples)")
    return f"{replicas.count} replicas share each global batch of {batch}: {split}"


class _Parts(NamedTuple):
    ds: data.Dataset
    x_all: tf.Tensor            # the training set as tensors, gathered from by index
    y_all: tf.Tensor
    model: keras.Model
    loss_fn: object
    batch: int                  # examples per update
    optimizer: object           # None for the manual rule
    guard: NonFiniteGuard
    steps: Steps


def _build(config, strategy, dataset=None):
    """Data, model, update rule and steps of a run (under `strategy.scope()`)."""
    ds = dataset if dataset is not None else data.load(config.dataset, config.seed)
    model, loss_fn, batch, micro = setup(config, ds)
    optimizer = None
    if config.update == "manual":
        apply = make_update("manual", model.trainable_variables, config.learning_rate, config.optimizer)
    else:
        optimizer = make_optimizer(config.optimizer, config.learning_rate, config.update)
        apply = optimizer_update(optimizer, model.trainable_variables)
    guard = NonFiniteGuard(apply, config.on_nonfinite)
    replicas = None if config.strategy == "default" else Replicas(strategy)
    steps = Steps(model, loss_fn, apply, reduction=config.reduction, method=config.grad_method,
                  classification=ds.num_classes > 0, instruments=run_panel(config),
                  micro_batch=micro, guard=guard, replicas=replicas)
    x_all, y_all = tf.constant(ds.train[0]), tf.constant(ds.train[1])
    return _Parts(ds, x_all, y_all, model, loss_fn, batch, optimizer, guard, steps)


def run_panel(config):
    """The instruments of a run of `config` (unbuilt): the defaults for its settings, then
    the registered ones that `config.instruments` names (`Panel.for_run`)."""
    return Panel.for_run(config.instruments, elementwise=config.elementwise_stats,
                         noise_scale_decay=config.noise_scale_decay, learning_rate=config.learning_rate,
                         optimizer=config.optimizer)


def _train_epoch(config, parts, runner, state, rng, progress, should_stop):
    """Trains the rest of the current epoch (all of it, unless resumed mid-epoch); returns
    its mean train loss. Saves checkpoints on the way."""
    n = len(parts.ds.train[0])
    state.recall_rng(rng)
    done = int(state.in_epoch.numpy())
    calls = epoch_batches(rng, n, parts.batch, config.steps_per_call, skip=done,
                          drop_remainder=config.drop_remainder,
                          checkpoint_every=config.checkpoint_every, first_step=int(state.step.numpy()))
    for batch in dict.fromkeys(index.shape[1] for index in calls):     # each size once, in order
        if runner.compiles(batch):
            progress.compiling(batch, remainder=batch < parts.batch)
            began = time.perf_counter()
            runner.compile(parts.x_all, parts.y_all, batch)
            progress.compiled(time.perf_counter() - began)
            if config.strategy != "multi_worker":   # workers stop in step, after a call
                _stop_if_asked(state, should_stop)  # Ctrl-C while it compiled: no step taken
    progress.start_bar(done + sum(len(index) for index in calls))     # the epoch's batches
    loss_sum, counted = 0.0, 0
    for index in calls:
        total = float(runner.run(parts.x_all, parts.y_all, tf.constant(index),
                                 tf.constant(int(state.step.numpy()), tf.int64),
                                 tf.constant(int(state.examples.numpy()), tf.int64)))
        if bool(parts.guard.tripped.numpy()):
            raise UserError(_nonfinite_message(parts.guard, parts.model, state.manager.latest_checkpoint))
        state.step.assign_add(len(index))
        state.in_epoch.assign_add(len(index))
        state.examples.assign_add(index.size)
        loss_sum, counted, done = loss_sum + total, counted + len(index), done + len(index)
        progress.update(done, len(index), total)
        if config.checkpoint_every and int(state.step.numpy()) % config.checkpoint_every == 0:
            state.save()
        _stop_if_asked(state, should_stop)
    return loss_sum / max(counted, 1)


def _stop_if_asked(state, should_stop):
    """Saves a checkpoint and raises `Interrupted` if `should_stop` says so."""
    if should_stop is not None and should_stop():
        state.save()
        raise Interrupted(state.run_dir, int(state.step.numpy()))


def _nonfinite_message(guard, model, latest):
    which = int(guard.first_bad_variable.numpy())
    what = "the loss" if which < 0 else f"the gradient of {model.trainable_variables[which].path}"
    kept = (f"the last good checkpoint (step {checkpoints.step_of(latest)}) is kept" if latest
            else "no checkpoint was written")
    return (f"{what} was not finite at step {int(guard.first_bad_step.numpy())}; the update was "
            f"not applied and {kept}. Lower --learning_rate, check the data, or pass --on_nonfinite=skip")
