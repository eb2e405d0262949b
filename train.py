"""Train a small network by mini-batch gradient descent and watch its gradients in TensorBoard.

  python train.py                                  # digits, mlp, batch 32, about 20 seconds
  python train.py --batch_size=1                   # SGD: one example per update
  python train.py --batch_size=full                # full-batch gradient descent
  python train.py --mode=compare --batch_size=16   # every gradient method side by side
  python train.py --mode=critical_batch            # the critical batch size, branch by branch

One flag per field of `tfmbgd.config.TrainConfig` (`tfmbgd.app.cli`); `tfmbgd.app.launch` does
the work, as `tfmbgd.run(config)` does in a notebook. Here only what a command line needs:
TensorFlow's start-up kept off stderr, and Ctrl-C (`tfmbgd.app.signals`) ending a run cleanly.
"""

import os
import signal
import sys

from tfmbgd.app import cli, launch, signals
from tfmbgd.app.signals import StopOnSignals
from tfmbgd.errors import Interrupted, UserError

FLAGS = cli.define_flags()


def main(argv):
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nFlags:\n" + FLAGS.module_help(cli))
        return 0
    with StopOnSignals() as stop:       # from the first moment: Ctrl-C is answered at once
        status, last_words = _main(argv, stop)
    if last_words:                      # after the acknowledgements of any signals
        print(last_words, file=sys.stderr)
    return status


def _main(argv, stop):
    """`(exit status, the line for stderr or None)` of the run `argv` asks for."""
    try:
        config = cli.config_from_argv(argv, FLAGS)
        stop.first = signals.FIRST[config.mode]
        dataset = launch.check(config)
        if launch.reports(config):
            print("starting TensorFlow ...", flush=True)
        _quietly(launch.start_tensorflow, config)
        stop.reinstall()
        return launch.dispatch(config, should_stop=stop, dataset=dataset), None
    except UserError as err:
        return 2, f"train.py: error: {err}"
    except Interrupted as stopped:
        resumable = stopped.run_dir or stopped.note is None     # None: the chief's directory has it
        where = stopped.run_dir or "<the chief's run directory> (on every worker)"
        return _stopped(stop), (f"\ntrain.py: {stopped}." + (
            f" Continue with:\n  python train.py --resume={where}" if resumable else ""))
    except KeyboardInterrupt:           # before a run directory existed, or in compare mode
        return _stopped(stop), "\ntrain.py: stopped at once; nothing was written."


def _stopped(stop):
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
