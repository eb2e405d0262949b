"""The batch size of every statistics step, for the study's and the noise scale's charts."""

import tensorflow as tf

from tfmbgd.instruments.base import Chart, Instrument


class BatchSize(Instrument):
    """`batch_size`: the examples of the update (the global batch under replicas)."""

    name = "batch_size"

    def tags(self, names):
        return {"batch_size": "examples per update"}

    def charts(self, names):
        return [Chart("Noise scale and batch size", "batch size", ("^batch_size$",))]

    def compute(self, measurement):
        return {"batch_size": tf.cast(measurement.moments.batch_size, tf.float32)}
