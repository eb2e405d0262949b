"""Train a small network by mini-batch gradient descent and watch its gradients in TensorBoard.

  python train.py                                  # digits, mlp, batch 32, ~1 minute
  python train.py --batch_size=1                   # SGD: one example per update
  python train.py --batch_size=full                # full-batch gradient descent
  python train.py --mode=compare --batch_size=16   # every gradient method side by side

One flag per field of `tfmbgd.config.TrainConfig` (`tfmbgd.cli`); `tfmbgd.launch` does the
work, as `tfmbgd.run(config)` does in a notebook. Here only what a command line needs:
TensorFlow's start-up kept off stderr, and Ctrl-C ending a run with a checkpoint.
"""

import os
import signal
import sys

from tfmbgd import cli, launch
from tfmbgd.errors import Interrupted, UserError

FLAGS = cli.define_flags()


def main(argv):
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nFlags:\n" + FLAGS.module_help(cli))
        return 0
    stop = _StopOnSignals()
    try:
        config = cli.config_from_argv(argv, FLAGS)
        dataset = launch.check(config)
        _quietly(launch.start_tensorflow, config)
        if not launch.trains(config):       # compare mode and studies stop at Ctrl-C at once
            return launch.dispatch(config, dataset=dataset)
        with stop:
            return launch.dispatch(config, should_stop=stop, dataset=dataset)
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stopped:
        resumable = stopped.run_dir or stopped.note is None     # None: the chief's directory has it
        where = stopped.run_dir or "<the chief's run directory> (on every worker)"
        print(f"\ntrain.py: {stopped}." + (f" Continue with:\n  python train.py --resume={where}"
                                            if resumable else ""), file=sys.stderr)
        return 128 + (stop.signal_number or signal.SIGINT)


def _quietly(start, config):
    """`start(config)` with stderr at /dev/null: TensorFlow's C++ start-up lines ignore
    TF_CPP_MIN_LOG_LEVEL. Errors still surface; set TF_CPP_MIN_LOG_LEVEL to see the lines."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return start(config)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            return start(config)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _StopOnSignals:
    """SIGINT or SIGTERM: stop after the current compiled call, with a checkpoint; a second
    SIGINT stops at once."""

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
