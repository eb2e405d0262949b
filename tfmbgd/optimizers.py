"""MiniBatchSGD: plain mini-batch gradient descent as a Keras 3 optimizer to subclass.

It follows the contract of Keras' own optimizers (`keras/src/optimizers/sgd.py`):
`super().__init__` first; `update_step(gradient, variable, learning_rate)` changes state
only through `self.assign*`; `get_config()` extends the parent's. Subclasses override
`update_step` (the rule), `build` (to create slot variables with
`add_optimizer_variables`, found again with `self.slot`) and `get_config` (their own
arguments). `MomentumSGD`, `RMSprop`, `Adagrad` and `Adam` below are such subclasses:

    @keras.saving.register_keras_serializable(package="my_project")
    class SignSGD(MiniBatchSGD):
        def update_step(self, gradient, variable, learning_rate):
            lr = ops.cast(learning_rate, variable.dtype)
            self.assign_sub(variable, lr * ops.sign(ops.cast(gradient, variable.dtype)))
"""

import numbers

import keras
from keras import ops

from tfmbgd.errors import UserError


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

    def slot(self, slots, variable):
        """The entry of `variable` in `slots`, a list made by `add_optimizer_variables`.

        Keras' optimizers find it with `_get_variable_index`, which also maps the
        per-replica copies of a distributed variable to the same entry; Keras 3 offers no
        public equivalent, so this is the one place tfmbgd calls it.
        """
        return slots[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        """Applies `variable -= learning_rate * gradient` to one variable."""
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        self.assign_sub(variable, ops.multiply(gradient, learning_rate))


# The family below shows what a subclass overrides: `__init__` for its own arguments,
# `build` for slot variables, `update_step` for the rule, `get_config` for saving. Each
# follows the same formulas and defaults as the Keras built-in of the same name.


@keras.saving.register_keras_serializable(package="tfmbgd")
class MomentumSGD(MiniBatchSGD):
    """Mini-batch SGD with momentum: `v <- momentum * v - lr * g; w <- w + v`.

    With `nesterov=True` the step looks ahead along the velocity:
    `w <- w + momentum * v - lr * g` (Sutskever et al. 2013).
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False, name="momentum_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0 <= momentum <= 1:
            raise ValueError(f"`momentum` must be in [0, 1]. Received: momentum={momentum}")
        self.momentum, self.nesterov = momentum, nesterov

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        mu = ops.cast(self.momentum, variable.dtype)
        v = self.slot(self.velocities, variable)
        self.assign(v, ops.subtract(ops.multiply(v, mu), ops.multiply(g, lr)))
        if self.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(v, mu), ops.multiply(g, lr)))
        else:
            self.assign_add(variable, v)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


@keras.saving.register_keras_serializable(package="tfmbgd")
class RMSprop(MiniBatchSGD):
    """RMSprop (Tieleman & Hinton 2012): scale each step by a running RMS of the gradient.

    `s <- rho * s + (1 - rho) * g^2;  w <- w - lr * g / sqrt(s + epsilon)`.
    """

    def __init__(self, learning_rate=0.001, rho=0.9, epsilon=1e-7, name="rmsprop", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho, self.epsilon = rho, epsilon

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.mean_squares = self.add_optimizer_variables(variables, "mean_square")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        s = self.slot(self.mean_squares, variable)
        self.assign(s, ops.add(ops.multiply(self.rho, s), ops.multiply(1 - self.rho, ops.square(g))))
        self.assign_sub(variable, ops.divide(ops.multiply(lr, g), ops.sqrt(ops.add(s, self.epsilon))))

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfmbgd")
class Adagrad(MiniBatchSGD):
    """Adagrad (Duchi et al. 2011): steps shrink with the sum of all squared gradients.

    `a <- a + g^2;  w <- w - lr * g / sqrt(a + epsilon)`, with `a` starting at
    `initial_accumulator_value`.
    """

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7,
                 name="adagrad", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.initial_accumulator_value, self.epsilon = initial_accumulator_value, epsilon

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        start = keras.initializers.Constant(self.initial_accumulator_value)
        self.accumulators = self.add_optimizer_variables(variables, "accumulator", initializer=start)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        a = self.slot(self.accumulators, variable)
        self.assign_add(a, ops.square(g))
        self.assign_sub(variable, ops.divide(ops.multiply(lr, g), ops.sqrt(ops.add(a, self.epsilon))))

    def get_config(self):
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfmbgd")
class Adam(MiniBatchSGD):
    """Adam (Kingma & Ba 2015): momentum on the gradient, RMSprop on its square.

    `m <- m + (1 - beta_1) (g - m);  v <- v + (1 - beta_2) (g^2 - v)` and, at step t,
    `w <- w - lr_t * m / (sqrt(v) + epsilon)` with the bias correction folded into
    `lr_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)` (the paper's "efficient" form).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="adam", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.first_moments = self.add_optimizer_variables(variables, "first_moment")
        self.second_moments = self.add_optimizer_variables(variables, "second_moment")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        t = ops.cast(self.iterations + 1, variable.dtype)
        b1, b2 = ops.cast(self.beta_1, variable.dtype), ops.cast(self.beta_2, variable.dtype)
        lr_t = lr * ops.sqrt(1 - ops.power(b2, t)) / (1 - ops.power(b1, t))
        m, v = self.slot(self.first_moments, variable), self.slot(self.second_moments, variable)
        self.assign_add(m, ops.multiply(ops.subtract(g, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(g), v), 1 - self.beta_2))
        self.assign_sub(variable, ops.divide(ops.multiply(m, lr_t), ops.add(ops.sqrt(v), self.epsilon)))

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon}


def make_optimizer(name, learning_rate, rule="custom"):
    """The optimizer `name` ("sgd", "momentum", ...): tfmbgd's (`rule="custom"`) or Keras'.

    Hyperparameters other than the learning rate are the Keras defaults (momentum 0.9).
    """
    ours = {"sgd": lambda lr: MiniBatchSGD(lr),
            "momentum": lambda lr: MomentumSGD(lr, momentum=0.9),
            "nesterov": lambda lr: MomentumSGD(lr, momentum=0.9, nesterov=True),
            "rmsprop": RMSprop, "adagrad": Adagrad, "adam": Adam}
    builtin = {"sgd": lambda lr: keras.optimizers.SGD(lr),
               "momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
               "nesterov": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
               "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad,
               "adam": keras.optimizers.Adam}
    table = ours if rule == "custom" else builtin
    if name not in table:
        raise UserError(f"optimizer must be one of {', '.join(table)}; got {name!r}")
    return table[name](learning_rate)
