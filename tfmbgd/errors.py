"""The error that means "the user asked for something wrong", and a run stopped on request.

No TensorFlow here: `train.py` catches both before TensorFlow has started.
"""


class UserError(ValueError):
    """A mistake in what the user asked for: a bad setting, a missing or malformed file.

    Its message is one line that says what was wrong and what to do. `train.py` prints it
    without a traceback and exits with status 2; library callers can catch it as a
    `ValueError`.
    """


class SettingError(UserError):
    """A setting with a value it cannot take: `setting` (a `TrainConfig` field), what is
    wrong with it (`problem`), and the `value`. `train.py` names the flag as it was typed."""

    def __init__(self, setting, problem, value):
        super().__init__(f"{setting} {problem}; got {value!r}")
        self.setting, self.problem, self.value = setting, problem, value


class Interrupted(Exception):
    """A run stopped on request after saving a checkpoint; `resume` continues it.

    `run_dir`: the run to resume, or None: on a worker that is not the chief (the chief's
    directory holds the run), or when nothing can be resumed (`note` then says why).
    `step`: the step the resumed run starts from. `note`: how it stopped, when not after a
    compiled call with a new checkpoint.
    """

    def __init__(self, run_dir, step, note=None):
        if note is None:
            where = (f"checkpoint saved in {run_dir}" if run_dir
                     else "the chief's run directory holds the checkpoints")
            note = f"at step {step}; {where}"
        super().__init__(f"stopped {note}")
        self.run_dir, self.step, self.note = run_dir, step, note


# A check shared by train.py before TensorFlow starts and by the model builder.

def check_images(input_shape):
    """A `UserError` if examples of `input_shape` are not images `[height, width, channels]`
    for the cnn; examples `[height, width]` are told to add a channel axis."""
    if len(input_shape) == 3:
        return
    if len(input_shape) == 2:
        raise UserError(f"model cnn needs images [height, width, channels]; these examples are "
                        f"{tuple(input_shape)}, without a channel axis: save x[..., None] "
                        f"(shape {(*input_shape, 1)}) in the npz, or use --model=mlp")
    raise UserError(f"model cnn needs images [height, width, channels]; these examples have shape "
                    f"{tuple(input_shape)}: use --model=mlp")
