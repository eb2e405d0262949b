"""Train a small network by mini-batch gradient descent and watch its gradients in TensorBoard.

  python train.py                                  # digits, mlp, batch 32, ~1 minute
  python train.py --batch_size=1                   # SGD: one example per update
  python train.py --batch_size=full                # full-batch gradient descent
  python train.py --mode=compare --batch_size=16   # every gradient method side by side

Flags are read here only: they become one `tfmbgd.config.TrainConfig`, and one call into
the library does the work.
"""

import dataclasses
import os
import signal
import sys

from absl import flags

from tfmbgd import config as cfg
from tfmbgd import launch
from tfmbgd.errors import Interrupted, UserError

_D = cfg.TrainConfig()
flags.DEFINE_string("dataset", _D.dataset,
                    f"{' | '.join(cfg.DATASETS)} | npz:PATH (x_train, y_train, x_test, y_test).")
flags.DEFINE_enum("model", _D.model, cfg.MODELS, "Network to train.")
flags.DEFINE_list("hidden", [str(h) for h in _D.hidden], "Hidden layer widths of the mlp, e.g. 128,64.")
flags.DEFINE_string("batch_size", str(_D.batch_size),
                    "Examples per update: 1 (SGD) ... N, or 'full' (whole training set).")
flags.DEFINE_list("batch_sizes", [], "A study: one run per batch size, e.g. 1,8,32,128,full, "
                  "same data and initial weights, compared in TensorBoard's HParams dashboard.")
flags.DEFINE_enum("lr_scaling", _D.lr_scaling, cfg.LR_SCALINGS,
                  "Study: the learning rate is fixed (none) or scaled with batch / --batch_size "
                  "(linear, sqrt).")
flags.DEFINE_integer("accumulate", _D.accumulate,
                     "Gradient accumulation: sum K micro-batches of batch_size into one update.",
                     lower_bound=1)
flags.DEFINE_integer("epochs", _D.epochs, "Passes over the training set.", lower_bound=1)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Step size, > 0.")
flags.DEFINE_enum("reduction", _D.reduction, cfg.REDUCTIONS,
                  "Batch loss = mean or sum of the per-example losses.")
flags.DEFINE_enum("update", _D.update, cfg.UPDATES,
                  "Who applies the update: manual w -= lr*g (sgd only), custom (tfmbgd's optimizer), "
                  "keras (the Keras built-in of the same name).")
flags.DEFINE_enum("optimizer", _D.optimizer, cfg.OPTIMIZERS,
                  "Update rule; other hyperparameters at the Keras defaults (momentum 0.9).")
flags.DEFINE_enum("grad_method", _D.grad_method, cfg.GRAD_METHODS,
                  "How gradient moments are computed: auto (layer-wise rules, exact fallback), "
                  "layerwise, vectorized, jacobian, loop.")
flags.DEFINE_integer("log_every", _D.log_every, "Write the mini-batch loss every N steps.", lower_bound=1)
flags.DEFINE_integer("steps_per_call", _D.steps_per_call,
                     "Train steps per compiled call; Python sees the loss only between calls.", lower_bound=1)
flags.DEFINE_integer("stats_every", _D.stats_every, "Gradient statistics every N steps; 0 = never.",
                     lower_bound=0)
flags.DEFINE_bool("elementwise_stats", _D.elementwise_stats,
                  "Also per-parameter variance and grad_snr/mean_gsnr (one more matmul per layer).")
flags.DEFINE_float("noise_scale_decay", _D.noise_scale_decay,
                   "EMA decay in [0, 1) of B_simple's numerator and denominator, per statistics step.")
flags.DEFINE_string("logdir", _D.logdir, "Runs are written to LOGDIR/<run-name>/{train,test}.")
flags.DEFINE_integer("seed", _D.seed, "Seed of initial weights, shuffling and synthetic data.",
                     lower_bound=0)
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every,
                     "Save a checkpoint every N steps (and after every epoch); 0 = after epochs only.",
                     lower_bound=0)
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints to keep.", lower_bound=1)
flags.DEFINE_string("resume", None, "Continue the run in this directory from its last checkpoint; "
                    "other flags may only change epochs, log_every, steps_per_call, checkpointing, "
                    "deterministic, on_nonfinite, strategy and cpu_devices.")
flags.DEFINE_bool("deterministic", _D.deterministic,
                  "TensorFlow op determinism: reruns and resumed runs give bit-identical weights.")
flags.DEFINE_enum("on_nonfinite", _D.on_nonfinite, cfg.ON_NONFINITE,
                  "A non-finite loss or gradient: stop (keep the last good checkpoint, exit 2) or "
                  "skip that update and count it in nonfinite/skipped.")
flags.DEFINE_enum("strategy", _D.strategy, cfg.STRATEGIES,
                  "default: one device. mirrored: one replica per local GPU (or per --cpu_devices). "
                  "multi_worker: one replica per process of the TF_CONFIG cluster. --batch_size "
                  "is the global batch, split across replicas.")
flags.DEFINE_integer("cpu_devices", _D.cpu_devices,
                     "Split the CPU into N logical devices, the replicas of --strategy=mirrored on a "
                     "machine without GPUs (a local simulation of several devices).", lower_bound=1)
flags.DEFINE_enum("mode", _D.mode, cfg.MODES,
                  "train, or compare: contrast every gradient method and update rule on one batch.")

flags.register_validator("batch_size", lambda v: v == "full" or (v.isdigit() and int(v) >= 1),
                         message="must be a positive integer or 'full'")
flags.register_validator("batch_sizes",
                         lambda v: all(b == "full" or (b.isdigit() and int(b) >= 1) for b in v),
                         message="must be positive integers or 'full', separated by commas")
flags.register_validator("hidden", lambda v: bool(v) and all(h.isdigit() and int(h) >= 1 for h in v),
                         message="must be positive integers separated by commas, e.g. 128,64")
flags.register_validator("noise_scale_decay", lambda v: 0 <= v < 1, message="must be in [0, 1)")
flags.register_validator("learning_rate", lambda v: v > 0 and v != float("inf"),
                         message="must be a finite number > 0")

FLAGS = flags.FLAGS


def config_from_flags():
    """Every TrainConfig field has a flag of the same name. With --resume, the run's saved
    settings, changed only by the flags given on the command line that may change."""
    values = {field.name: getattr(FLAGS, field.name) for field in dataclasses.fields(cfg.TrainConfig)}
    values["hidden"] = tuple(int(h) for h in FLAGS.hidden)
    values["batch_size"] = None if FLAGS.batch_size == "full" else int(FLAGS.batch_size)
    values["batch_sizes"] = tuple(None if b == "full" else int(b) for b in FLAGS.batch_sizes)
    if FLAGS.resume is None:
        return cfg.TrainConfig(**values)
    given = {name: values[name] for name in values if FLAGS[name].present and name != "resume"}
    return cfg.resume(FLAGS.resume, given)


def _start_tensorflow_quietly(config):
    """Imports TensorFlow and initialises its devices with stderr sent to /dev/null.

    TensorFlow's C++ start-up lines (oneDNN, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL in
    recent releases and print before absl logging is set up. Python errors still surface:
    stderr is restored before anything is raised. Set TF_CPP_MIN_LOG_LEVEL to see them.
    The CPU split and a multi-worker strategy must exist before TensorFlow runs any op,
    so they are made here.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        launch.start_tensorflow(config)
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            launch.start_tensorflow(config)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv):
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nFlags:\n" + FLAGS.main_module_help())
        return 0
    try:
        extra = FLAGS(argv)[1:]
        if extra:
            raise UserError(f"unexpected argument {extra[0]!r}; flags look like --name=value (see --help)")
        config = config_from_flags()
    except (flags.Error, UserError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    stop = _stop_on_signals()
    try:
        dataset = launch.check(config)
        _start_tensorflow_quietly(config)
        if not launch.trains(config):       # compare mode and studies stop at Ctrl-C at once
            return launch.dispatch(config, dataset=dataset)
        with stop:
            return launch.dispatch(config, should_stop=stop, dataset=dataset)
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stopped:
        where = stopped.run_dir or "<the chief's run directory> (on every worker)"
        print(f"\ntrain.py: {stopped}. Continue with:\n  python train.py --resume={where}", file=sys.stderr)
        return 128 + stop.signal_number


class _stop_on_signals:
    """SIGINT and SIGTERM ask the run to stop after the current compiled call (it then saves
    a checkpoint); a second SIGINT stops at once."""

    def __enter__(self):
        self.signal_number = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, number, frame):
        if self.signal_number == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number

    def __call__(self):
        return self.signal_number is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
