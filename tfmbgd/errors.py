"""The one error type that means "the user asked for something wrong"."""


class UserError(ValueError):
    """A mistake in what the user asked for: a bad setting, a missing or malformed file.

    Its message is one line that says what was wrong and what to do. `train.py` prints it
    without a traceback and exits with status 2; library callers can catch it as a
    `ValueError`.
    """
