"""The command line: `python -m tfmbgd`, the `tfmbgd` console script, and `train.py`.

One flag per field of `tfmbgd.config.TrainConfig` (`tfmbgd.app.cli`); `tfmbgd.app.launch`
does the work, as `tfmbgd.run(config)` does in a notebook. Here only what a command line
needs: the help, TensorFlow's start-up kept off stderr, and Ctrl-C (`tfmbgd.app.signals`)
ending a run cleanly. Imports no TensorFlow until a run starts.
"""

import os
import signal
import sys
import textwrap
import warnings

from tfmbgd._version import __version__
from tfmbgd.app import cli, launch, signals
from tfmbgd.app.signals import StopOnSignals
from tfmbgd.choices import INSTRUMENTS, PRESETS
from tfmbgd.errors import Interrupted, UserError

FLAGS = cli.define_flags()

HELP = """Train a small network by mini-batch gradient descent and watch its gradients in TensorBoard.

  {prog}                                  # digits, mlp, batch 32, about 15 seconds
  {prog} --batch_size=1                   # SGD: one example per update
  {prog} --batch_size=full                # full-batch gradient descent
  {prog} --batch_sizes=1,8,32,128,full    # a study: one run per batch size
  {prog} --instruments=economy            # Cockpit's instruments as well
  {prog} --mode=compare --batch_size=16   # every gradient method side by side
  {prog} --mode=critical_batch            # the critical batch size, branch by branch
  tensorboard --logdir logs                  # then see the runs

Instruments (--instruments, comma-separated): the sets {presets}, or by name:
{names}

Flags:
"""


def main(argv):
    """The command line of `python -m tfmbgd`, the `tfmbgd` console script and `train.py`:
    returns the exit status (0; 2 for bad input; 128 + the signal for an interrupted run)."""
    prog = _program(argv[0])
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(_help(prog) + FLAGS.module_help(cli))
        return 0
    if "--version" in argv[1:]:
        print(f"tfmbgd {__version__}")
        return 0
    _one_line_warnings()
    with StopOnSignals() as stop:       # from the first moment: Ctrl-C is answered at once
        status, last_words = _main(argv, stop, prog)
    if last_words:                      # after the acknowledgements of any signals
        print(last_words, file=sys.stderr)
    return status


def _one_line_warnings():
    """tfmbgd's own warnings (`tfmbgd.data.DataWarning`) as one line on stderr."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if getattr(category, "__module__", "").startswith("tfmbgd"):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def console():
    """The `tfmbgd` console script."""
    sys.exit(main(sys.argv))


def _program(argv0):
    """How the user ran it: `train.py`, `python -m tfmbgd` or the `tfmbgd` script."""
    name = os.path.basename(argv0 or "")
    if name == "__main__.py":
        return "python -m tfmbgd"
    return "python train.py" if name.endswith(".py") else "tfmbgd"


def _help(prog):
    names = textwrap.fill(", ".join(sorted(INSTRUMENTS)), 88, initial_indent="  ", subsequent_indent="  ")
    return HELP.format(prog=prog, presets=", ".join(PRESETS), names=names)


def _main(argv, stop, prog="python train.py"):
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
        return 2, f"{_short(prog)}: error: {err}"
    except Interrupted as stopped:
        resumable = stopped.run_dir or stopped.note is None     # None: the chief's directory has it
        where = stopped.run_dir or "<the chief's run directory> (on every worker)"
        return _stopped(stop), (f"\n{_short(prog)}: {stopped}." + (
            f" Continue with:\n  {prog} --resume={where}" if resumable else ""))
    except KeyboardInterrupt:           # before a run directory existed, or in compare mode
        return _stopped(stop), f"\n{_short(prog)}: stopped at once; nothing was written."


def _short(prog):
    return prog.split()[-1]


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


