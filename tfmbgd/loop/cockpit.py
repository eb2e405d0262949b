"""`Cockpit`: one training step of a user's own loop, with Cockpit's instruments.

    cockpit = tfmbgd.instruments.Cockpit(model, tfmbgd.losses.crossentropy, optimizer, "economy")
    for x, y in batches:
        values = cockpit.step(x, y)        # applies the update; {tag: value} of this step

The same statistics step as `train.py` and `fit` (`tfmbgd.loop.steps`): the batch's gradient moments, the
update of their mean with `optimizer` (any Keras optimizer), and the instruments' values.
Eagerly each call runs a compiled step; inside a caller's `tf.function` it is traced
there. A two-step instrument (`step/alpha`) returns, at step t + 1, the value that
describes step t: eagerly `history[t]` holds it under its own step, as TensorBoard would.
"""

import tensorflow as tf

from tfmbgd import losses
from tfmbgd.errors import UserError
from tfmbgd.instruments import Panel
from tfmbgd.loop.steps import Steps
from tfmbgd.loop.update import optimizer_update


class Cockpit:
    """One step at a time, with instruments.

    Args:
      model: a built Keras model.
      loss_fn: per-example loss `(y_true, y_pred) -> [B]`, unscaled (`tfmbgd.losses`).
      optimizer: a Keras optimizer (built here for the model's variables).
      instruments: a preset ("economy", "business", "full"), or a list of preset and
        instrument names (`tfmbgd.instruments.REGISTRY`), or instances; added to the
        defaults (norms, variances, noise scale).
      method: how the moments are computed (`tfmbgd.stats.gradient_moments`).
      elementwise: the elementwise tier (GSNR); on by itself when an instrument needs it.
    """

    def __init__(self, model, loss_fn, optimizer, instruments="economy", method="auto", elementwise=False):
        if not model.built or not model.trainable_variables:
            raise UserError("Cockpit needs a built model with trainable variables: call it on a batch first")
        panel = Panel.for_optimizer(optimizer, [instruments] if isinstance(instruments, str) else instruments,
                                    elementwise=elementwise)
        self.model, self.optimizer = model, optimizer
        self.steps = Steps(model, loss_fn, optimizer_update(optimizer, model.trainable_variables),
                           method=method, classification=loss_fn is losses.crossentropy, instruments=panel)
        self.iteration = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.lags = panel.lags
        self.finite_only = self.steps.finite_only
        self.history = {}
        self._compiled = tf.function(self._step)

    @property
    def instruments(self):
        return self.steps.instruments

    def _step(self, x, y):
        self.steps.at_step(self.iteration)      # a tf.function runs stateful ops in program order
        out = self.steps.stats_step(x, y)
        self.iteration.assign_add(1)
        return out

    def step(self, x, y):
        """Applies one update on the batch `(x, y)`; returns `{tag: value}` of this step (and
        the lagged values of the previous one, see the module). Eagerly, values are Python
        floats or numpy arrays, undefined ones left out."""
        if tf.inside_function():
            return self._step(x, y)
        step = int(self.iteration.numpy())
        out = {tag: v.numpy() for tag, v in self._compiled(x, y).items()}
        out = {tag: (float(v) if v.ndim == 0 else v) for tag, v in out.items()
               if not (tag in self.finite_only and v.ndim == 0 and not tf.math.is_finite(float(v)))}
        for tag, value in out.items():
            self.history.setdefault(step - self.lags.get(tag, 0), {})[tag] = value
        return out

