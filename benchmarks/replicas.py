"""Steps per second on one device against two logical CPU devices (tf.distribute).

    python benchmarks/replicas.py            # about two minutes on 2 cores
    python benchmarks/replicas.py --quick

The CPU is split into two logical devices before TensorFlow starts. Each row trains the
same model on the same synthetic data with the same *global* batch through
`tfmbgd.loop.runner.StepRunner` (32 steps per compiled call) and reports the median steps per
second over many calls; the settings take turns, call by call, so that the noise of a
shared machine falls on all of them alike. Rows:

- `default`: no strategy, one device (the plain path of `train.py`);
- `mirrored x1`: MirroredStrategy with one replica (the cost of the distributed code path);
- `mirrored x2`: MirroredStrategy with two replicas, each on half of every batch.

Two logical devices share the same two cores, so this measures the overhead of
replication and of the cross-replica merge, not a speed-up: on real GPUs each replica
has its own device.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

N = 8192


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke test")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tfmbgd import distribute
    distribute.split_cpu(2)                 # before TensorFlow runs anything

    import numpy as np
    import tensorflow as tf

    from tfmbgd import config as cfg
    from tfmbgd.loop import training
    from tfmbgd.loop.runner import StepRunner

    rng = np.random.default_rng(0)
    data = os.path.join(tempfile.mkdtemp(), "synthetic.npz")
    np.savez(data, x_train=rng.normal(size=(N, 784)).astype(np.float32),
             y_train=rng.integers(0, 10, size=N), x_test=rng.normal(size=(64, 784)).astype(np.float32),
             y_test=np.arange(64) % 10)
    calls = 4 if args.quick else 25
    print(f"MLP 784-256-256-10, SGD, synthetic data, 32 steps per call; median of {calls} calls\n")
    print(f"{'batch':>5}  {'statistics':<12} {'setting':<12} {'steps/s':>8}  {'vs default':>10}")
    for batch in (32, 128, 512):
        for stats_every in (0, 1):
            rows = {}
            for strategy, devices in (("default", 1), ("mirrored", 1), ("mirrored", 2)):
                config = cfg.TrainConfig(dataset=f"npz:{data}", hidden=(256, 256), batch_size=batch,
                                         learning_rate=0.01, stats_every=stats_every, strategy=strategy,
                                         cpu_devices=devices, log_every=10 ** 9)
                s = distribute.make_strategy(strategy, devices)
                with s.scope():
                    parts = training._build(config, s)
                    runner = StepRunner(parts.steps, tf.summary.create_noop_writer(), config.log_every,
                                        stats_every)
                name = "default" if strategy == "default" else f"mirrored x{devices}"
                rows[name] = (s, parts, runner, [])
            index = tf.constant(rng.integers(0, N, size=(32, batch)), tf.int32)
            zero = tf.constant(0, tf.int64)
            for call in range(calls + 1):
                for s, parts, runner, times in rows.values():
                    with s.scope():
                        start = time.perf_counter()
                        float(runner.run(parts.x_all, parts.y_all, index, zero, zero))
                        if call:                    # the first call traces
                            times.append(time.perf_counter() - start)
            base = 32 / statistics.median(rows["default"][3])
            label = "every step" if stats_every else "none"
            for name, (_, _, _, times) in rows.items():
                rate = 32 / statistics.median(times)
                print(f"{batch:>5}  {label:<12} {name:<12} {rate:>8.0f}  {rate / base:>9.2f}x")


if __name__ == "__main__":
    main()
