"""Samples per second: tfmbgd's custom loop against model.fit, with and without statistics.

    python benchmarks/fit_vs_loop.py            # about six minutes on 2 cores
    python benchmarks/fit_vs_loop.py --quick

Same model (MLP 784-256-256-10, ReLU), same synthetic data (8192 examples), batch 128,
plain mini-batch SGD. All rows are built in one process and take turns, one epoch each per
round, so that a slow spell of the shared machine hits them alike; each reports its median
epoch's samples per second, and ratios compare rows of the same run. The custom loop is
`tfmbgd.loop.runner.StepRunner` (many steps per compiled call, summaries written inside);
`fit` is Keras' own, best at a large `steps_per_execution`.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

N, BATCH = 8192, 128


def make():
    import numpy as np

    from tfmbgd import models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=N).astype(np.int32)
    return models.build("mlp", (784,), 10, hidden=(256, 256), seed=0), x, y


def fit_epoch(steps_per_execution, stats_every=None, jit_compile=False):
    """One epoch of `model.fit` per call, on a model compiled once (the first call traces)."""
    import keras

    from tfmbgd import callbacks, fit, optimizers

    model, x, y = make()
    model = fit.with_statistics(model)        # the same model class in every fit row
    model.compile(optimizer=optimizers.MiniBatchSGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    extra = [callbacks.GradientStatistics(tempfile.mkdtemp(), freq=stats_every)] if stats_every else []
    return lambda: model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0, callbacks=extra)


def loop_epoch(steps_per_call, stats_every=0, jit_compile=False):
    """One epoch of `train.py`'s loop per call (`runner.StepRunner`, summaries written;
    `XlaStepRunner` with `jit_compile`)."""
    import numpy as np
    import tensorflow as tf

    from tfmbgd import losses
    from tfmbgd.loop import runner as runner_lib
    from tfmbgd.loop import steps
    from tfmbgd.loop import tensorboard as summaries
    from tfmbgd.loop.update import make_update

    model, x, y = make()
    apply = make_update("custom", model.trainable_variables, 0.01)
    writers = summaries.RunWriters(tempfile.mkdtemp())
    the_steps = steps.Steps(model, losses.crossentropy, apply)
    if jit_compile:
        runner = runner_lib.XlaStepRunner(the_steps, writers.writer("train"), log_every=10,
                                          stats_every=stats_every, steps_per_call=steps_per_call)
    else:
        runner = runner_lib.StepRunner(the_steps, writers.writer("train"), log_every=10,
                                       stats_every=stats_every)
    x_all, y_all = tf.constant(x), tf.constant(y)
    rng = np.random.default_rng(0)
    step = [0]

    def epoch():
        for index in runner_lib.epoch_batches(rng, N, BATCH, steps_per_call):
            float(runner.run(x_all, y_all, tf.constant(index), tf.constant(step[0], tf.int64),
                             tf.constant(step[0] * BATCH, tf.int64)))
            step[0] += len(index)
    return epoch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    epochs = 3 if args.quick else 9
    rows = {
        "model.fit, steps_per_execution=1": fit_epoch(1),
        "model.fit, steps_per_execution=32": fit_epoch(32),
        "model.fit, spe=32, statistics every 16 steps": fit_epoch(32, 16),
        "model.fit, spe=32, XLA": fit_epoch(32, jit_compile=True),
        "model.fit, spe=32, XLA, statistics every 16 steps": fit_epoch(32, 16, jit_compile=True),
        "custom loop, 1 step per call": loop_epoch(1),
        "custom loop, 32 steps per call": loop_epoch(32),
        "custom loop, 32 per call, statistics every 16": loop_epoch(32, 16),
        "custom loop, 32 per call, XLA": loop_epoch(32, jit_compile=True),
        "custom loop, 32 per call, XLA, statistics every 16": loop_epoch(32, 16, jit_compile=True),
    }
    times = {name: [] for name in rows}
    for round_ in range(epochs + 1):         # round 0 traces; rows take turns epoch by epoch
        for name, epoch in rows.items():
            start = time.perf_counter()
            epoch()
            if round_:
                times[name].append(time.perf_counter() - start)
    print(f"MLP 784-256-256-10, B={BATCH}, {N} examples; median of {epochs} epochs after one warm-up, "
          "the rows taking turns epoch by epoch\n")
    print("| run | samples/s | ratio to fit (spe=32) |")
    print("|---|---|---|")
    rates = {name: N / statistics.median(t) for name, t in times.items()}
    best_fit = rates["model.fit, steps_per_execution=32"]
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / best_fit:.2f}x |")
    print("\nTime per epoch, statistics every 16 steps against none, in the same setting:")
    pairs = (("model.fit, steps_per_execution=32", "model.fit, spe=32, statistics every 16 steps"),
             ("model.fit, spe=32, XLA", "model.fit, spe=32, XLA, statistics every 16 steps"),
             ("custom loop, 32 steps per call", "custom loop, 32 per call, statistics every 16"),
             ("custom loop, 32 per call, XLA", "custom loop, 32 per call, XLA, statistics every 16"))
    for plain, stats in pairs:
        print(f"  {stats}: {rates[plain] / rates[stats]:.3f}x")
    best_loop = max(rates[k] for k in rates if k.startswith("custom loop"))
    best = max(rates[k] for k in rates if k.startswith("model.fit"))
    print(f"  the custom loop at its best against fit at its best: {best_loop / best:.2f}x the samples/s")


if __name__ == "__main__":
    main()
