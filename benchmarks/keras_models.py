"""The models Keras users load, measured: `keras.applications` networks and KerasHub backbones
built from their constructors (small inputs, random weights, nothing downloaded;
`tests/applications.py`, `tests/keras_hub_models.py`), each with a 10-way head.

    python benchmarks/keras_models.py              # about ten minutes on 2 cores
    python benchmarks/keras_models.py --quick      # shorter timing budgets
    python benchmarks/keras_models.py --no-memory ConvNeXtTiny gpt2
    python benchmarks/keras_models.py --batch 32       # the next issue's batch size
    python benchmarks/keras_models.py --verbose VGG16  # and how each variable is measured, and why

Per model: the variables the layer-wise rules take, the largest difference of the moments
to an independent oracle (relative to the largest value of that kind of moment), the cost
of a statistics step (norm and elementwise tiers, `method="auto"`, with the default
instruments) as the ratio of medians to a plain step, interleaved in one process, two
floors (what the extra ops cost to dispatch, whatever they compute; what one pass over
the per-example values the elementwise tier must build costs, whatever else), and the
peak memory of a norm-tier statistics step over a plain step's (each in a child process
with TensorFlow's BFC allocator on the CPU, as `step_cost.py` measures it). The oracle is
the single-example loop; for a network with BatchNormalization in training mode, the model
with a copy of every variable per example (`tests/applications.py`), float32 throughout, on
a batch of at most `ORACLE_BATCH` examples.
Dropout is turned off (rate 0) in EfficientNet, so that two forward passes can be compared.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))     # applications.py, keras_hub_models.py
sys.path.insert(0, HERE)                                  # step_cost.py

BATCH = 8     # --batch
ORACLE_BATCH = 8     # the oracles' batch, at most (the per-example copies of ResNet50 at B=32 need 24 GiB)


def make(name, batch=BATCH):
    """`(model, x, y)` of the benchmark's model `name`, `batch` examples."""
    import applications
    import keras_hub_models

    if name in applications.NAMES:
        return applications.make(name, batch=batch)
    return keras_hub_models.make(name, batch=batch)


NAMES = ["VGG16", "ConvNeXtTiny", "ResNet50", "MobileNetV2", "EfficientNetB0",
         "gpt2", "bert", "gemma", "llama"]


def difference(model, x, y):
    """`(oracle, largest relative difference)` (see the module)."""
    import applications
    import keras_hub_models

    from tfmbgd import losses
    from tfmbgd.engine import layerwise
    from tfmbgd.engine.moments import gradient_moments

    m = gradient_moments(model, losses.crossentropy, x, y, method="auto")
    if layerwise.batch_norms(model):
        return "copies", keras_hub_models.largest_difference(
            m, applications.contributions(model, x, y, losses.crossentropy)[1])
    oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
    return "loop", keras_hub_models.largest_difference(m, oracle)


def built(model, x):
    """Parameters whose per-example gradients the elementwise tier builds: all but those of
    an outer product of one position, gathered rows, and a few positions' cross terms."""
    from tfmbgd.engine import layerwise

    said = layerwise.choices(model, x, elementwise=True)
    cheap = ("outer product a_n^T d_n", "gathered rows", "ghost norm")
    return sum(int(v.numpy().size) for v in model.trainable_variables
               if not any(c in said[v.path].split(" (")[0] for c in cheap))


def pass_cost(values=2 ** 25):
    """Seconds per float32 value of one pass over a large array: its sum of squares over the
    batch axis as `forms` takes it (`forms.sum_of_squares`)."""
    import step_cost
    import tensorflow as tf

    from tfmbgd.engine import forms

    g = tf.random.normal([32, values // 32])
    fn = tf.function(lambda g: forms.sum_of_squares(g, 0))
    (seconds,), _ = step_cost.interleaved([lambda: fn(g).numpy()], 2.0)
    return seconds / values


def peak_memory(name, stats, batch):
    """Child process: peak bytes allocated by tensors during one step of `name` (a plain step,
    or with `stats` the norm tier's statistics step), as `step_cost.peak_memory` measures."""
    import step_cost

    return step_cost.peak_of_step(*make(name, batch), "auto" if stats else None, False)


def memory_ratio(name, batch):
    """Peak memory of the norm tier's statistics step over a plain step's, each in a child
    process with TensorFlow's BFC allocator on the CPU."""
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="3")
    peaks = []
    for stats in ("0", "1"):
        out = subprocess.run([sys.executable, __file__, "--memory", name, stats, str(batch)], env=env,
                             capture_output=True, text=True, timeout=900, check=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak"])
    return peaks[1] / peaks[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing budgets")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per ratio")
    parser.add_argument("--no-memory", action="store_true", help="leave out the peak-memory column")
    parser.add_argument("--batch", type=int, default=BATCH, help="examples per batch (default %(default)s)")
    parser.add_argument("--verbose", action="store_true",
                        help="after the table, each variable's form and why (layerwise.choices)")
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)     # child: MODEL 0|1 BATCH
    parser.add_argument("models", nargs="*", help=f"some of {', '.join(NAMES)}")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.memory:
        print(json.dumps({"peak": peak_memory(args.memory[0], args.memory[1] == "1", int(args.memory[2]))}))
        return
    import step_cost
    import tensorflow as tf

    from tfmbgd.engine import layerwise

    budget = 2.0 if args.quick else args.budget
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; B={args.batch}, 32x32x3 images or 16 "
          "tokens; ratios = median statistics step / median plain step, interleaved\n")
    per_float, per_op = pass_cost(), step_cost.op_overhead()
    print(f"Dispatch floor: 1 + (ops of the norm tier's step - ops of the plain step) x "
          f"{per_op * 1e6:.1f} us (the measured cost of one small op) / plain step. Elementwise floor: "
          "the norm tier plus one pass over the B x P values that the elementwise tier builds per example "
          f"({per_float * 1e9:.2f} ns per value, measured: a sum of squares over a large array); P: the "
          "parameters of the variables it builds them for (layerwise.choices)\n")
    print("| model | variables by the rules | BatchNorm layers (training) | oracle | largest difference | "
          "plain step | norm tier | dispatch floor | elementwise tier | elementwise floor | rounds | "
          "peak memory, norm tier |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    chosen = {}
    for name in args.models or NAMES:
        model, x, y = make(name, args.batch)
        cover = layerwise.coverage(model, x)
        if args.verbose:
            chosen[name] = layerwise.choices(model, x)
        how, diff = difference(*make(name, min(args.batch, ORACLE_BATCH)))
        tx, ty = step_cost.as_tensors(x, y)
        plain = step_cost.steps_for(model).plain
        norm = step_cost.steps_for(model, "auto", False).with_stats
        elem = step_cost.steps_for(model, "auto", True).with_stats
        (t_plain, t_norm, t_elem), rounds = step_cost.interleaved(
            [lambda fn=fn, tx=tx, ty=ty: step_cost.call(fn, tx, ty) for fn in (plain, norm, elem)], budget)
        floor = (t_norm + args.batch * built(model, x) * per_float) / t_plain
        dispatch = step_cost.dispatch_floor(plain, norm, tx, ty, per_op, t_plain)[2]
        print(f"| {name} | {sum(w is None for w in cover.values())} of {len(cover)} | "
              f"{len(layerwise.batch_norms(model))} | {how} | {diff:.1e} | {t_plain * 1e3:.1f} ms | "
              f"{t_norm / t_plain:.2f}x | {dispatch:.2f}x | "
              f"{t_elem / t_plain:.2f}x | {floor:.2f}x | {rounds} | "
              f"{'-' if args.no_memory else f'{memory_ratio(name, args.batch):.2f}x'} |", flush=True)
    for name, said in chosen.items():
        print(f"\n{name}, norm tier, B={args.batch}: how each variable is measured (layerwise.choices)\n")
        print("| variable | op: form (why) |")
        print("|---|---|")
        for path, line in said.items():
            print(f"| {path} | {line} |")


if __name__ == "__main__":
    main()
