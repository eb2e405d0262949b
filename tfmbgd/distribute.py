"""Strategies: one device, several devices of one machine, several machines (tf.distribute).

`make_strategy` makes them (and splits the CPU into logical devices for tests); the
mini-batch semantics across replicas — the global batch, its shares, the merged moments —
are `tfmbgd.engine.replicas`.
"""

import os

import tensorflow as tf

from tfmbgd.config import STRATEGIES, check_tf_config
from tfmbgd.errors import UserError


def split_cpu(count):
    """Splits the host CPU into `count` logical devices (to simulate replicas on one machine).

    TensorFlow fixes its devices when it first runs an op, so this must come first; called
    later it only checks that the devices are already split that way.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError:    # already initialised
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise UserError(f"cpu_devices={count}, but TensorFlow already started with {have} CPU "
                            "device(s); the CPU can only be split before anything else runs") from None


_STRATEGIES = {}


def make_strategy(name="default", cpu_devices=1):
    """The `tf.distribute.Strategy` called `name`, created once per process and kept.

    "default": no distribution (one device). "mirrored": one replica per local GPU, or,
    with no GPU, per logical CPU device (the first `cpu_devices`). "multi_worker": one
    replica per worker process of the cluster that `TF_CONFIG` describes; it has to be made
    before TensorFlow runs any op.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    key = (name, cpu_devices)
    if key not in _STRATEGIES:
        if name == "mirrored":
            gpus = tf.config.list_logical_devices("GPU")
            cpus = tf.config.list_logical_devices("CPU")
            if not gpus and len(cpus) < cpu_devices:
                raise UserError(f"cpu_devices={cpu_devices} but TensorFlow has {len(cpus)} CPU device(s)")
            devices = [d.name for d in gpus] or [d.name for d in cpus[:cpu_devices]]
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(devices)
        elif name == "multi_worker":
            check_tf_config(os.environ.get("TF_CONFIG"))
            _STRATEGIES[key] = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            raise UserError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    return _STRATEGIES[key]


def is_chief(strategy):
    """Whether this process writes the run: the chief, or worker 0 of a cluster without one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()
