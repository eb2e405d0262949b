"""`train.py`'s flags, made from `TrainConfig`'s fields: one flag per field, named like it,
with the help text, choices and default the field declares (`tfmbgd.config._setting`).

Flags are parsed as text and turned into values here; `TrainConfig` validates them, so a
bad value gets the same message from the command line as from Python, with the flag named
as it was typed (`--epochs=1.5: must be an integer`). Imports absl and no TensorFlow:
`--help` and flag errors come before TensorFlow starts.
"""

import dataclasses

from absl import flags

from tfmbgd import config as cfg
from tfmbgd.errors import SettingError, UserError
from tfmbgd.loop import rundir


def define_flags(flag_values=flags.FLAGS):
    """Defines one flag per `TrainConfig` field in `flag_values`; returns it."""
    for field in dataclasses.fields(cfg.TrainConfig):
        meta, default = field.metadata, field.default
        help_text = meta["help"]
        if meta["choices"] is not None:
            help_text += f" One of: {' | '.join(meta['choices'])}."
        if isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(field.name, None if default is None else _text(default), help_text,
                                flag_values=flag_values)
    return flag_values


def _text(value):
    """A default as a flag's text: tuples joined by commas, None in a tuple as 'full'."""
    if isinstance(value, tuple):
        return ",".join("full" if v is None else str(v) for v in value)
    return str(value)


def config_from_argv(argv, flag_values=flags.FLAGS):
    """Parses `argv` (`argv[0]` is the program) into a `TrainConfig`.

    Every field comes from its flag. With `--resume`, the run's saved settings, changed only
    by the flags given on the command line that may change (`config.resume`).

    Raises:
      UserError: one line naming the flag as typed and what is wrong with it.
    """
    try:
        extra = flag_values(argv)[1:]
    except flags.Error as err:
        raise UserError(str(err)) from None
    if extra:
        raise UserError(f"unexpected argument {extra[0]!r}; flags look like --name=value (see --help)")
    try:
        values, given = {}, {}
        for field in dataclasses.fields(cfg.TrainConfig):
            flag = flag_values[field.name]
            values[field.name] = _value(field, flag.value)
            if flag.present and field.name != "resume":
                given[field.name] = values[field.name]
        if values["resume"] is None:
            return cfg.TrainConfig(**values)
        return rundir.resume_config(values["resume"], given)
    except SettingError as err:
        flag = flag_values[err.setting]
        if not flag.present:
            raise
        raise UserError(f"--{err.setting}={flag.value}: {err.problem}") from None


def _value(field, text):
    """The value of `field` from its flag's `text` (bools arrive parsed)."""
    if text is None or isinstance(text, bool):
        return text
    parse = field.metadata["parse"] or type(field.default)          # else int, float or str
    try:
        return parse(text)
    except ValueError:
        form = field.metadata["form"] or {int: "an integer", float: "a number"}[parse]
        raise SettingError(field.name, f"must be {form}", text) from None
