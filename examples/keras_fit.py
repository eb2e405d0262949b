"""A Keras user's model, trained with model.fit and a subclassed optimizer, with gradient
variance in TensorBoard.

    python examples/keras_fit.py      # a new run each time: logs/keras-fit-example-<time>/
    tensorboard --logdir logs

Copy what you need: the optimizer subclass (a few lines), `with_statistics` (or the mixin
for a subclassed model) and the `GradientStatistics` callback beside Keras' TensorBoard
callback. The compile is Keras' default (`jit_compile="auto"`: XLA on a GPU).
"""

import time

import keras
from keras import ops

import tfmbgd
from tfmbgd.loop import rundir


@keras.saving.register_keras_serializable(package="example")
class ClippedSGD(tfmbgd.optimizers.MiniBatchSGD):
    """Plain mini-batch SGD whose every coordinate moves by at most `max_step`."""

    def __init__(self, learning_rate=0.05, max_step=0.01, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.max_step = max_step

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        step = ops.clip(lr * ops.cast(gradient, variable.dtype), -self.max_step, self.max_step)
        self.assign_sub(variable, step)

    def get_config(self):
        return {**super().get_config(), "max_step": self.max_step}


def main(logdir="logs", epochs=5):
    """Trains the example model in a new run directory under `logdir`; returns the model
    and that directory."""
    run_dir = rundir.new_run_dir(logdir, time.strftime("keras-fit-example-%Y%m%d-%H%M%S"))
    data = tfmbgd.data.load("digits")
    (x, y), (x_test, y_test) = data.train, data.test

    # Your own model: any functional or Sequential model built with an Input.
    model = keras.Sequential([
        keras.Input(data.input_shape),
        keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="tanh"),
        keras.layers.Dense(data.num_classes),
    ])
    model = tfmbgd.fit.with_statistics(model)          # same layers, statistics in fit
    model.compile(optimizer=ClippedSGD(learning_rate=0.1, max_step=0.02),     # jit_compile="auto"
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], steps_per_execution=8)
    model.fit(x, y, batch_size=32, epochs=epochs, validation_data=(x_test, y_test), verbose=2,
              callbacks=[tfmbgd.callbacks.GradientStatistics(run_dir, freq=5, elementwise=True),
                         keras.callbacks.TensorBoard(run_dir)])
    print(f"Run written to {run_dir}\nSee it with:  tensorboard --logdir {logdir}")
    return model, run_dir


if __name__ == "__main__":
    main()
