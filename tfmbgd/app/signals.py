"""Ctrl-C and SIGTERM for a command-line run: acknowledged at once, obeyed where it is safe.

The first SIGINT or SIGTERM asks the run to stop after its current compiled call, with a
checkpoint (`training.train` polls the object as `should_stop`; compare mode between its
computations); a second SIGINT stops now (`KeyboardInterrupt`, which `training` turns
into "stopped at once" with what was kept). The first does not raise: Python code that
catches everything (Keras has a bare `except:`) would swallow a `KeyboardInterrupt` and
go on with a wrong result; the second is for a person who will not wait.

Python runs signal handlers only between bytecodes of the main thread, so while
TensorFlow imports, traces or runs a long compiled call a handler may wait seconds. The
acknowledgement therefore comes from a thread woken through `signal.set_wakeup_fd`,
which the interpreter writes to from the C-level handler the moment a signal arrives.
No TensorFlow here: the handler is in place before TensorFlow starts.
"""

import os
import signal
import socket
import sys
import threading

TRAINING = "stopping after the current call, with a checkpoint; press Ctrl-C again to stop now"
PROBING = ("stopping after the current call; the finished branches are kept; press Ctrl-C again to "
           "stop now")
COMPARING = "stopping after the current computation; press Ctrl-C again to stop now"
_NOW = "stopping now"
FIRST = {"train": TRAINING, "critical_batch": PROBING, "compare": COMPARING}   # by --mode


class StopOnSignals:
    """A context manager; inside it, SIGINT and SIGTERM ask for a stop, said at once.

    Call the object to ask whether a stop was asked for (`should_stop`). `first`: what the
    first signal's line says will happen (`TRAINING`, or `COMPARING` in compare mode).

    Args:
      out: where the acknowledgements go; default a copy of this process's stderr (a copy,
        so that it still reaches the terminal while stderr is silenced).
    """

    def __init__(self, out=None):
        self._out = out
        self.first = TRAINING
        self.signal_number = None

    def __call__(self):
        return self.signal_number is not None

    def __enter__(self):
        self.signal_number = None
        if self._out is None:
            self._out = os.fdopen(os.dup(sys.stderr.fileno()), "w")
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._read, write = socket.socketpair()
        write.setblocking(False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._acknowledge, name="tfmbgd-signals", daemon=True)
        self._watcher.start()
        return self

    def reinstall(self):
        """Takes SIGINT and SIGTERM back once TensorFlow has started: a multi-worker strategy
        installs a SIGTERM handler of its own (a preemption notifier) over Python's."""
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def _handle(self, number, frame):
        """In the main thread, between bytecodes: remember the signal; stop now on a second
        SIGINT."""
        again = self.signal_number is not None
        self.signal_number = self.signal_number or number
        if number == signal.SIGINT and again:
            raise KeyboardInterrupt

    def _acknowledge(self):
        """In a thread: one line per signal, the moment it arrives."""
        seen = 0
        while True:
            try:
                data = self._read.recv(16)
            except OSError:
                return
            if not data:
                return
            for number in data:
                seen += 1
                now = number == signal.SIGINT and seen > 1
                name = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
                try:
                    self._out.write(f"\n{name}: {_NOW if now else self.first}\n")
                    self._out.flush()
                except (OSError, ValueError):
                    return

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._write.close()           # the watcher's recv returns b"" and it ends
        self._watcher.join(timeout=1)
        self._read.close()
