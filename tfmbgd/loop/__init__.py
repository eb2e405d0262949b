"""The loop: statistics steps and the runs that take them.

`steps` (the one statistics step and its schedule, the plain step), `update` (the update
rules and the non-finite guard), `runner` (many steps per compiled call), `buffer`
(statistics that compile, written after the call), `tensorboard` (writers, histograms,
the custom-scalars layout), `rundir` (a run directory; no TensorFlow), `checkpoints`,
`progress`, `training` (a run of train.py) and `cockpit` (one step of a user's loop).
"""
