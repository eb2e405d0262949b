"""What a training run prints while it runs, truthfully: a line while the step compiles,
an epoch bar started after it (its time per batch and ETA are those of steady steps), the
loss of the steps it names (NaN when it is NaN), the updates skipped as non-finite, and
once, a loss that diverges."""

import math
import sys

import keras

DIVERGING = 1e3        # a mean loss this many times the reference loss: diverging


class RunProgress:
    """The console of one training run.

    Args:
      verbose: 0 prints nothing (the skipped counts are still kept).
      skipped: the variable counting the updates skipped (`on_nonfinite="skip"`), or None.
    """

    def __init__(self, verbose, skipped=None):
        self.verbose, self._skipped = verbose, skipped
        self.first_loss, self.warned = None, False
        self.best, self.worst = math.inf, None
        self.at_start = self.skipped()
        self._bar, self._epoch_start = None, 0

    def skipped(self):
        """Updates skipped as non-finite since the process started (0 if none are skipped)."""
        return int(self._skipped.numpy()) if self._skipped is not None else 0

    def epoch(self, number, epochs):
        """Before epoch `number` (from 1) of `epochs`."""
        if self.verbose:
            print(f"Epoch {number}/{epochs}")
        self._epoch_start = self.skipped()

    def start_bar(self, batches):
        """Starts the epoch's bar of `batches` steps, once its calls are compiled: the time
        per batch and the ETA are those of steady steps."""
        # A terminal gets Keras' live bar; a pipe or a file (CI, nohup, a notebook's captured
        # output) one plain line per epoch, as Keras' verbose=2: no terminal escapes.
        verbose = self.verbose if not self.verbose or _terminal() else 2
        self._bar = keras.utils.Progbar(batches, verbose=verbose, unit_name="batch")

    def compiling(self, batch, remainder=False):
        """Before a call that traces and compiles the step for batches of `batch` examples
        (`remainder`: the epoch's last, smaller batch)."""
        if self.verbose:
            why = ("the epoch's last batch; --drop_remainder leaves it out" if remainder
                   else "once per batch size")
            print(f"  compiling the train step for batches of {batch} ({why}) ...", end="", flush=True)

    def compiled(self, seconds):
        """After the compile `compiling` announced, which took `seconds`."""
        if self.verbose:
            print(f" {seconds:.1f} s", flush=True)

    def initial(self, loss):
        """The loss of the initial weights on a first batch, before any update: the reference
        a diverging run is judged against (a run that diverges in its first call has no
        sane loss of its own to compare with)."""
        self.first_loss = loss
        if math.isfinite(loss):
            self.best = min(self.best, abs(loss))

    @property
    def diverged(self):
        """Whether the mean loss of a call went non-finite, or above `DIVERGING` times the
        smallest of the reference and the best so far."""
        return self.worst is not None

    def update(self, done, steps, total):
        """After a call of `steps` steps whose mean losses add up to `total`; `done` steps of
        the epoch so far."""
        mean = total / steps
        if self.first_loss is None and math.isfinite(mean):
            self.first_loss = mean
        self._bar.update(done, [("loss", mean)])
        if not math.isfinite(mean) or (self.best < math.inf and abs(mean) > DIVERGING * self.best):
            if self.worst is None or not math.isfinite(mean) or abs(mean) > abs(self.worst):
                self.worst = mean
            if not self.warned:
                self.warned = True
                if self.verbose:
                    print(f"\n  warning: the loss grew from {self.first_loss:.4g} to {mean:.4g}: the run "
                          "is diverging; lower --learning_rate (e.g. by 10x) or use --reduction=mean",
                          flush=True)
        elif math.isfinite(mean):
            self.best = min(self.best, abs(mean))

    def verdict(self):
        """The end-of-run line for a run that diverged, or None."""
        if not self.diverged:
            return None
        went = (f"rose from {self.first_loss:.4g} (before the first update) to as much as {self.worst:.4g}"
                if math.isfinite(self.worst) else
                f"went from {self.first_loss:.4g} (before the first update) to {self.worst}")
        return (f"warning: this run diverged: the training loss {went}; its weights and test metrics are "
                "those of a diverged run. Lower --learning_rate (e.g. by 10x)")

    def end_epoch(self):
        """A line with the updates skipped in the epoch, if any."""
        now = self.skipped()
        if self.verbose and now > self._epoch_start:
            print(f"  {now - self._epoch_start} updates skipped as non-finite in this epoch "
                  f"({now - self.at_start} in this run)")

    def skipped_in_run(self):
        return self.skipped() - self.at_start


def _terminal():
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):     # replaced or closed
        return False
