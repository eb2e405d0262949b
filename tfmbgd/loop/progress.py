"""What a training run prints while it runs, truthfully: a line while the step compiles,
an epoch bar started after it (its time per batch and ETA are those of steady steps), the
loss of the steps it names (NaN when it is NaN), the updates skipped as non-finite, and
once, a loss that diverges."""

import math

import keras

DIVERGING = 1e3        # a mean loss this many times the run's first one: diverging


class RunProgress:
    """The console of one training run.

    Args:
      verbose: 0 prints nothing (the skipped counts are still kept).
      skipped: the variable counting the updates skipped (`on_nonfinite="skip"`), or None.
    """

    def __init__(self, verbose, skipped=None):
        self.verbose, self._skipped = verbose, skipped
        self.first_loss, self.warned = None, False
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
        self._bar = keras.utils.Progbar(batches, verbose=self.verbose, unit_name="batch")

    def compiling(self, batch):
        """Before a call that traces and compiles the step for batches of `batch` examples."""
        if self.verbose:
            print(f"  compiling the train step for batches of {batch} (once per batch size) ...", flush=True)

    def update(self, done, steps, total):
        """After a call of `steps` steps whose mean losses add up to `total`; `done` steps of
        the epoch so far."""
        mean = total / steps
        if self.first_loss is None and math.isfinite(mean):
            self.first_loss = mean
        self._bar.update(done, [("loss", mean)])
        if (not self.warned and self.first_loss and math.isfinite(mean)
                and abs(mean) > DIVERGING * abs(self.first_loss)):
            self.warned = True
            if self.verbose:
                print(f"\n  warning: the loss grew from {self.first_loss:.4g} to {mean:.4g}: the run is "
                      "diverging; lower --learning_rate (e.g. by 10x) or use --reduction=mean", flush=True)

    def end_epoch(self):
        """A line with the updates skipped in the epoch, if any."""
        now = self.skipped()
        if self.verbose and now > self._epoch_start:
            print(f"  {now - self._epoch_start} updates skipped as non-finite in this epoch "
                  f"({now - self.at_start} in this run)")

    def skipped_in_run(self):
        return self.skipped() - self.at_start
