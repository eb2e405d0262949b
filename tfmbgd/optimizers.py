"""MiniBatchSGD: plain mini-batch gradient descent as a Keras 3 optimizer to subclass.

It follows the contract of Keras' own optimizers (`keras/src/optimizers/sgd.py`):
`super().__init__` first; `update_step(gradient, variable, learning_rate)` changes state
only through `self.assign*`; `get_config()` extends the parent's. Subclasses override
`update_step` (the rule), `build` (to create slot variables with
`add_optimizer_variables`) and `get_config` (their own arguments).
"""

import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfmbgd")
class MiniBatchSGD(keras.optimizers.Optimizer):
    """Mini-batch gradient descent: `w <- w - learning_rate * g`, once per batch.

    `g` is whatever gradient it is given: with the usual `reduce_mean` batch loss, the
    mean of the per-example gradients; with `reduce_sum`, B times that, which acts as a
    learning rate B times larger.

    Args:
      learning_rate: a float > 0, a `keras.optimizers.schedules.LearningRateSchedule`,
        or a callable returning the rate.
      name: the optimizer's name.
      **kwargs: the arguments every Keras optimizer takes (`clipnorm`, `weight_decay`, ...).
    """

    def __init__(self, learning_rate=0.01, name="minibatch_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if isinstance(learning_rate, numbers.Real) and not learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={learning_rate}")

    def update_step(self, gradient, variable, learning_rate):
        """Applies `variable -= learning_rate * gradient` to one variable."""
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        self.assign_sub(variable, ops.multiply(gradient, learning_rate))
