"""What gradient statistics cost per train step, as ratios to a plain step.

    python benchmarks/step_cost.py            # full table, a few minutes on 2 cores
    python benchmarks/step_cost.py --quick    # fewer cases and iterations
    python benchmarks/step_cost.py --zoo      # only the models users bring (tests/zoo.py)
    python benchmarks/step_cost.py --zoo --zoo-batch 32
    python benchmarks/step_cost.py --depthwise   # per-example depthwise kernels, by formulation
    python benchmarks/step_cost.py --outer       # matrix products over T positions, by formulation
    python benchmarks/step_cost.py --gram        # the ghost norm's Gram matrices, two ways

Every ratio compares two steps measured in the same process, interleaved call by call, as
a ratio of medians: the machine is shared and noisy, absolute times mean little. A "plain"
step is forward + backward + update (`steps.Steps.plain`); a statistics step
(`Steps.with_stats`) also computes the gradient moments by the given method and tier and
every statistic from them (traces, norms, noise scale, histogram; GSNR with the
elementwise tier). Models: the MLP 784-256-256-10 (ReLU) and the small CNN of
`tfmbgd.models` (28x28x1, two 3x3 convolutions with pooling, dense), synthetic data.

Peak memory: each case runs in a child process with TensorFlow's BFC allocator on the CPU
(`TF_CPU_ALLOCATOR_USE_BFC`), which makes `tf.config.experimental.get_memory_info`
report the peak bytes allocated by tensors during one step (model, batch and
intermediates).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# The models users bring live with the tests that check them (tests/zoo.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

CASES = [("mlp", 32), ("mlp", 128), ("mlp", 512), ("cnn", 32), ("cnn", 128)]
METHODS = [  # (label, method, elementwise)
    ("auto, norm tier", "auto", False),
    ("auto, elementwise tier", "auto", True),
    ("vectorized", "vectorized", False),
    ("jacobian", "jacobian", False),
    ("loop", "loop", False),
]


def make(model_name, batch):
    import numpy as np

    import zoo  # tests/zoo.py: the models users bring
    from tfmbgd import models

    if model_name in zoo.NAMES:
        model, x, y = zoo.make(model_name, batch, size="bench")
        return model, x, y
    rng = np.random.default_rng(0)
    if model_name == "mlp":
        model = models.build("mlp", (784,), 10, hidden=(256, 256), seed=0)
        x = rng.normal(size=(batch, 784)).astype(np.float32)
    else:
        model = models.build("cnn", (28, 28, 1), 10, seed=0)
        x = rng.uniform(size=(batch, 28, 28, 1)).astype(np.float32)
    return model, x, rng.integers(0, 10, size=batch).astype(np.int32)


def steps_for(model, method="auto", elementwise=False):
    from tfmbgd import instruments, losses
    from tfmbgd.loop import steps
    from tfmbgd.loop.update import make_update

    apply = make_update("manual", model.trainable_variables, 1e-4)
    return steps.Steps(model, losses.crossentropy, apply, method=method,
                       instruments=instruments.default(elementwise))


def as_tensors(x, y):
    import tensorflow as tf

    return tf.nest.map_structure(tf.constant, x), tf.constant(y)


def call(fn, x, y):
    fn(x, y)["loss"].numpy()      # .numpy(): wait for the step to finish


def kept_in_graph(step):
    """`step` as a `tf.function` whose outputs stay in the graph, as in `train.py`'s loop (which
    records them into buffers inside the compiled call): every output is summed into one
    scalar, so none is pruned and one tensor comes back. A statistics step hands about 26
    tensors back to Python, and on a step of half a millisecond that is visible."""
    import tensorflow as tf

    def fn(x, y):
        return tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in tf.nest.flatten(step(x, y))])
    return tf.function(fn, autograph=False)


def handback_cost(n, budget_s=2.0):
    """Seconds that a `tf.function` returning `n` more scalars takes beyond one returning one."""
    import tensorflow as tf

    x = tf.constant(1.0)
    many = tf.function(lambda x: {f"v{i}": x + i for i in range(n + 1)})
    one = tf.function(lambda x: tf.add_n([x + i for i in range(n + 1)]))
    (t_many, t_one), _ = interleaved([lambda: many(x)["v0"].numpy(), lambda: one(x).numpy()], budget_s)
    return t_many - t_one


def interleaved(fns, budget_s, min_rounds=5, max_rounds=300):
    """Median seconds of each zero-argument fn, timed in alternation within a budget."""
    for fn in fns:             # trace and warm up
        fn(), fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_rounds and (len(times[0]) < min_rounds
                                          or time.perf_counter() - start < budget_s):
        for fn, acc in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], len(times[0])


def time_case(model_name, batch, budget_s, methods):

    model, x, y = make(model_name, batch)
    x, y = as_tensors(x, y)
    plain = steps_for(model).plain
    rows = []
    for label, method, elementwise in methods:
        stats_step = steps_for(model, method, elementwise).with_stats
        (t_plain, t_stats), rounds = interleaved(
            [lambda: call(plain, x, y), lambda s=stats_step: call(s, x, y)], budget_s)
        rows.append((label, t_plain, t_stats, rounds))
    return rows


def time_amortised(model_name, batch, every, budget_s, steps_per_call=64):
    """Ratio of `train.py`'s loop with statistics every `every` steps to the same loop with
    none (`--stats_every=0`).

    Both run `runner.StepRunner` as `train.py` does: `steps_per_call` steps per compiled
    call on batches gathered from the training set, summaries to a scratch directory with
    `--log_every=16`, statistics (about 30 scalars and a histogram for the MLP) written on
    their steps. With `every=1` this is the whole price of `--stats_every=1`, writes
    included.
    """
    import tempfile

    import numpy as np
    import tensorflow as tf

    from tfmbgd.loop import runner

    model, x, y = make(model_name, batch)
    reps = 8
    x_all, y_all = tf.constant(np.concatenate([x] * reps)), tf.constant(np.concatenate([y] * reps))
    rng = np.random.default_rng(0)
    index = np.stack([rng.permutation(batch * reps)[:batch] for _ in range(steps_per_call)]).astype(np.int32)
    steps = steps_for(model)
    with tempfile.TemporaryDirectory() as logdir:
        writer = tf.summary.create_file_writer(logdir)
        fns = []
        for stats_every in (0, every):
            loop = runner.StepRunner(steps, writer, 16, stats_every)
            fns.append(lambda loop=loop: float(loop.run(x_all, y_all, index, tf.constant(1, tf.int64),
                                                        tf.constant(0, tf.int64))))
        (t_plain, t_mixed), rounds = interleaved(fns, budget_s)
        writer.close()
    return t_mixed / t_plain, rounds


def peak_memory(model_name, batch, method, elementwise):
    """Child process: peak bytes allocated during one step (`method` None = plain)."""
    return peak_of_step(*make(model_name, batch), method, elementwise)


def peak_of_step(model, x, y, method, elementwise):
    """Peak bytes allocated by tensors during one step of `model` on `(x, y)`: a plain step
    (`method` None) or a statistics step (needs the BFC allocator, see the module)."""
    import tensorflow as tf

    x, y = as_tensors(x, y)
    steps = steps_for(model, method or "auto", elementwise)
    fn = steps.plain if method is None else steps.with_stats
    call(fn, x, y)                                  # trace and allocate once
    tf.config.experimental.reset_memory_stats("CPU:0")
    call(fn, x, y)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"]


def measure_memory_in_child(model_name, batch, method, elementwise=False):
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="3")
    args = [sys.executable, __file__, "--memory", model_name, str(batch), method or "plain",
            str(int(elementwise))]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def op_count(fn, x, y):
    """Ops in the graph `fn` (a `tf.function`) runs, less plumbing that costs nothing."""
    free = {"Const", "Identity", "NoOp", "Placeholder", "ReadVariableOp"}
    return sum(op.type not in free for op in fn.get_concrete_function(x, y).graph.get_operations())


def dispatch_floor(plain, stats, x, y, per_op, t_plain):
    """`(ops of the plain step, ops of the statistics step, 1 + their difference x per_op / t_plain)`:
    what launching the extra ops costs, whatever they compute (`op_overhead` per op)."""
    ops = [op_count(fn, x, y) for fn in (plain, stats)]
    return ops[0], ops[1], 1 + (ops[1] - ops[0]) * per_op / t_plain


def op_overhead(n=400):
    """Seconds per op of a chain of `n` tiny ops in one `tf.function` (the executor's dispatch)."""
    import tensorflow as tf

    @tf.function
    def chain(t):
        for _ in range(n):
            t = t * 1.0001
        return t

    t = tf.ones([8])
    (seconds,), _ = interleaved([lambda: chain(t).numpy()], 1.0)
    return seconds / n


def zoo_tables(budget, quick, batch=64):
    """The models users bring (`tests/zoo.py`, bench sizes) at B=`batch`: both tiers, the share
    of variables on the fast path, both tiers with their outputs kept in the graph
    (`kept_in_graph`), the dispatch floor and the hand-back floor (the norm tier's tensors
    handed back to Python, `handback_cost`), statistics every 16 steps in train.py's loop,
    and the transformer's peak memory at B=256."""
    import zoo
    from tfmbgd import layerwise

    per_op = op_overhead()
    print(f"\nThe models users bring (tests/zoo.py, bench sizes), B={batch}, auto. Ops: in the traced "
          f"plain and norm-tier steps; dispatch floor: 1 + (their difference x {per_op * 1e6:.1f} us, the "
          "measured cost of one small op) / plain step\n")
    print("| model | variables by the rules | plain step | norm tier | elementwise tier | rounds | "
          "norm tier, kept in the graph | elementwise, kept in the graph | ops, plain | ops, norm tier | "
          "dispatch floor | tensors handed back, beyond the plain step's | hand-back floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in zoo.NAMES:
        model, x, y = make(name, batch)
        cover = layerwise.coverage(model, x)
        fast = sum(why is None for why in cover.values())
        rows = time_case(name, batch, budget, [m for m in METHODS[:2]])
        (_, t_plain, t_norm, rounds), (_, _, t_elem, _) = rows
        both, tx, ty = steps_for(model), *as_tensors(x, y)
        kept = [kept_in_graph(steps_for(model, "auto", tier).with_stats) for tier in (False, True)]
        (t_alone, *t_kept), _ = interleaved([lambda p=both.plain, x=tx, y=ty: call(p, x, y)] + [
            lambda k=k, x=tx, y=ty: k(x, y).numpy() for k in kept], budget)
        ops_plain, ops_stats, floor = dispatch_floor(both.plain, both.with_stats, tx, ty, per_op, t_plain)
        returned = len(both.with_stats(tx, ty)) - len(both.plain(tx, ty))
        print(f"| {name} | {fast} of {len(cover)} | {t_plain * 1e3:.2f} ms | {t_norm / t_plain:.2f}x | "
              f"{t_elem / t_plain:.2f}x | {rounds} | "
              + " | ".join(f"{t / t_alone:.2f}x" for t in t_kept)
              + f" | {ops_plain} | {ops_stats} | {floor:.2f}x | {returned} | "
              f"{1 + handback_cost(returned, budget) / t_plain:.2f}x |", flush=True)
    print(f"\nStatistics every 16 steps in train.py's loop (norm tier), against none, B={batch}:\n")
    print("| model | ratio | rounds |")
    print("|---|---|---|")
    for name in ("subclassed_mlp", "mlp_gelu_silu", "transformer", "conv1d", "residual_cnn"):
        ratio, rounds = time_amortised(name, batch, 16, budget * (3 if quick else 10))
        print(f"| {name} | {ratio:.3f}x | {rounds} |", flush=True)
    plain = measure_memory_in_child("transformer", 256, None)
    peak = measure_memory_in_child("transformer", 256, "auto", False)
    print(f"\nPeak memory, transformer at B=256: plain {plain / 2**20:.1f} MiB, norm tier "
          f"{peak / 2**20:.1f} MiB ({peak / plain:.2f}x)")


# MobileNetV2's depthwise layers on 32x32 inputs (size, channels, stride), and a 5x5 of EfficientNet's.
DEPTHWISE = [(16, 32, 1, 3), (16, 96, 2, 3), (8, 144, 1, 3), (8, 144, 2, 3), (4, 192, 1, 3), (2, 576, 1, 3),
             (8, 240, 2, 5)]


def depthwise_table(budget, batch=32):
    """The per-example gradients of a depthwise convolution's kernel, three ways, against the
    batch's filter gradient (`DepthwiseConv2dNativeBackpropFilter`, what a plain step
    computes): a TensorFlow einsum per kernel offset (before), a product and a sum per
    offset (`rules.conv.depthwise_grads`, XLA-compiled), the same in TensorFlow's kernels."""
    import tensorflow as tf

    from tfmbgd.engine.rules import conv

    def by_offset(x, dz, k, s, pads, einsum):
        d4 = tf.reshape(dz, [batch, -1, x.shape[-1], 1])
        windows = conv._windows(x, dz.shape[1:-1], (k, k), (s, s), (1, 1), pads)
        if einsum:
            return tf.stack([tf.einsum("bpc,bpcm->bcm", w, d4) for w in windows], axis=1)
        return tf.stack([tf.reduce_sum(w[..., None] * d4, axis=1) for w in windows], axis=1)

    print(f"\nPer-example depthwise kernels, B={batch}, 'same' padding: milliseconds (median, interleaved)\n")
    print("| input | channels | kernel, stride | batch filter gradient | einsum per offset (before) | "
          "product and sum per offset | the same, XLA (tfmbgd) |")
    print("|---|---|---|---|---|---|---|")
    for size, c, s, k in DEPTHWISE:
        times = _depthwise_row(batch, size, c, s, k, by_offset, conv.depthwise_grads, budget)
        print(f"| {size}x{size} | {c} | {k}x{k}, {s} | " + " | ".join(f"{t * 1e3:.2f}" for t in times) + " |",
              flush=True)


def _depthwise_row(batch, size, c, s, k, by_offset, depthwise_grads, budget):
    import tensorflow as tf

    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    pads = [(total // 2, total - total // 2)] * 2
    x, dz = tf.random.normal([batch, size, size, c]), tf.random.normal([batch, out, out, c])
    batch_gradient = lambda x, dz: tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
        input=x, filter_sizes=[k, k, c, 1], out_backprop=dz, strides=[1, s, s, 1], padding="SAME")
    fns = [tf.function(batch_gradient),
           tf.function(lambda x, dz: by_offset(x, dz, k, s, pads, True)),
           tf.function(lambda x, dz: by_offset(x, dz, k, s, pads, False)),
           tf.function(lambda x, dz: depthwise_grads(x, dz, (k, k), (s, s), (1, 1), pads, 1))]
    return interleaved([lambda f=f: f(x, dz).numpy() for f in fns], budget)[0]


# (T, K, C): ConvNeXt's pointwise layers, transformer projections, VGG16's last convolutions;
# a few positions around forms.CROSS_JOINED
OUTER = [(64, 96, 384), (16, 128, 128), (16, 192, 768), (16, 2304, 512), (4, 4608, 512), (2, 4608, 512),
         (4, 256, 256), (4, 512, 512)]


def outer_table(budget, batch=32):
    """A matrix product over T positions per example (`forms.Outer`, a Dense on sequences or an
    unfolded convolution), `[B, T, K] x [B, T, C]`: the batch's weight gradient (a plain
    step's) against each way to the norms (the ghost norm's Gram matrices, plus the weight
    gradient; building the per-example gradients, which replace it) and to the elementwise
    sums (cross terms, a product per pair of positions or one for all, plus the weight
    gradient; building, then squaring and summing, or one pass per sum as `forms` does)."""
    from tfmbgd.engine import forms

    print(f"\nMatrix products over T positions, B={batch}: the weight gradient in ms, the rest as its "
          "multiple (median, interleaved)\n")
    print("| T | K | C | weight gradient | norms: ghost norm | norms: built | sums: cross terms, a product "
          "per pair | sums: cross terms, one product | sums: built, squared and summed | sums: built, "
          "one pass (forms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, k, c in OUTER:
        times = _outer_row(batch, t, k, c, forms, budget)
        print(f"| {t} | {k} | {c} | {times[0] * 1e3:.2f} | "
              + " | ".join(f"{x / times[0]:.2f}x" for x in times[1:]) + " |", flush=True)


def _outer_row(batch, t, k, c, forms, budget):
    import tensorflow as tf

    a, d = tf.random.normal([batch, t, k]), tf.random.normal([batch, t, c])
    weight = lambda a, d: tf.matmul(tf.reshape(a, [-1, k]), tf.reshape(d, [-1, c]), transpose_a=True)

    def squared(a, d):       # the squares written, then read by each sum
        g = tf.matmul(a, d, transpose_a=True)
        q = tf.square(g)
        return tf.reduce_sum(q, [1, 2]), tf.reduce_sum(g, 0), tf.reduce_sum(q, 0)

    def built(a, d, elementwise):
        g = tf.matmul(a, d, transpose_a=True)
        sums = forms.sum_of_squares(g, 0) if elementwise else 0.0
        return forms.sum_of_squares(g, [1, 2]), tf.reduce_sum(g, 0), sums

    fns = [weight,
           lambda a, d: (tf.reduce_sum(forms._gram(a) * forms._gram(d), [1, 2]), weight(a, d)),
           lambda a, d: built(a, d, False),
           lambda a, d: (forms.cross_terms(a, d, joined=False), weight(a, d)),
           lambda a, d: (forms.cross_terms(a, d, joined=True), weight(a, d)),
           squared,
           lambda a, d: built(a, d, True)]
    fns = [tf.function(f) for f in fns]
    return interleaved([lambda f=f: [v.numpy() for v in tf.nest.flatten(f(a, d))] for f in fns], budget)[0]


# (T, K): a layer called twice (T=2), a few positions, short sequences; around T^2 K = 1024
GRAM = [(2, 64), (2, 256), (4, 64), (4, 128), (4, 512), (8, 32), (16, 32), (16, 128), (64, 64)]


def gram_table(budget, batch=32, repeats=20):
    """The Gram matrices `x_n x_n^T` of the ghost norm, `[B, T, K]`, two ways: one batched
    matrix product, or a broadcast product summed over K. Each is called `repeats` times on
    different inputs in one function, and the time of as many plain sums is taken off, so the
    figure is the op's own, in microseconds."""
    import tensorflow as tf

    from tfmbgd.engine import forms

    print(f"\nGram matrices of T positions of K values, B={batch}, microseconds per matrix (median, "
          f"interleaved); forms takes the broadcast sum up to T^2 K = {forms.GRAM_BY_BROADCAST:,}\n")
    print("| T | K | T^2 K | batched product | broadcast sum | forms takes |")
    print("|---|---|---|---|---|---|")
    for t, k in GRAM:
        xs = [tf.random.normal([batch, t, k]) for _ in range(repeats)]
        ways = [forms.gram_by_product, forms.gram_by_sum, lambda x: x]
        fns = [tf.function(lambda xs, g=g: tf.add_n([tf.reduce_sum(g(x)) for x in xs])) for g in ways]
        (product, broadcast, base), _ = interleaved([lambda f=f, xs=xs: f(xs).numpy() for f in fns], budget)
        product, broadcast = ((s - base) / repeats * 1e6 for s in (product, broadcast))
        takes = "broadcast sum" if forms.gram_by_broadcast(t, k) else "batched product"
        print(f"| {t} | {k} | {t * t * k:,} | {product:.1f} | {broadcast:.1f} | {takes} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter budgets")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per ratio")
    parser.add_argument("--zoo", action="store_true", help="only the zoo tables (the models users bring)")
    parser.add_argument("--depthwise", action="store_true", help="only the depthwise kernels' table")
    parser.add_argument("--outer", action="store_true", help="only the matrix products' table")
    parser.add_argument("--gram", action="store_true", help="only the Gram matrices' table")
    parser.add_argument("--zoo-batch", type=int, default=64, help="the zoo tables' batch size (default 64)")
    parser.add_argument("--memory", nargs=4, help=argparse.SUPPRESS)   # child: MODEL BATCH METHOD 0|1
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.memory:
        model_name, batch, method, elementwise = args.memory
        method = None if method == "plain" else method
        print(json.dumps({"peak": peak_memory(model_name, int(batch), method, elementwise == "1")}))
        return
    import tensorflow as tf

    budget = 1.0 if args.quick else args.budget
    cases = CASES[1:2] + CASES[4:] if args.quick else CASES
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; ratios = median statistics step / "
          "median plain step, interleaved in one process\n")
    if args.zoo:
        zoo_tables(budget, args.quick, args.zoo_batch)
        return
    if args.depthwise:
        depthwise_table(budget)
        return
    if args.outer:
        outer_table(budget)
        return
    if args.gram:
        gram_table(budget)
        return
    print("| model | B | plain step | method, tier | ratio | rounds |")
    print("|---|---|---|---|---|---|")
    for model_name, batch in cases:
        methods = METHODS if batch <= 128 or not args.quick else METHODS[:3]
        for label, t_plain, t_stats, rounds in time_case(model_name, batch, budget, methods):
            print(f"| {model_name} | {batch} | {t_plain * 1e3:.2f} ms | {label} | "
                  f"{t_stats / t_plain:.2f}x | {rounds} |", flush=True)
    print("\nIn train.py's loop (auto, norm tier), 64 steps per call, --log_every=16, against "
          "--stats_every=0:\n")
    print("| model | B | --stats_every | ratio to no statistics | rounds |")
    print("|---|---|---|---|---|")
    for every in (16, 1):
        for model_name, batch in [("mlp", 128), ("cnn", 128)]:
            # Every 16 steps the ratio is within a few percent of 1: it needs more rounds.
            ratio, rounds = time_amortised(model_name, batch, every, budget * (10 if every > 1 else 3))
            print(f"| {model_name} | {batch} | {every} | {ratio:.3f}x | {rounds} |", flush=True)
    print("\nPeak memory of one step at B=512 (MLP), bytes allocated by tensors:\n")
    print("| step | peak | ratio to plain |")
    print("|---|---|---|")
    plain = measure_memory_in_child("mlp", 512, None)
    print(f"| plain | {plain / 2**20:.1f} MiB | 1.00x |", flush=True)
    for label, method, elementwise in METHODS[:4]:
        peak = measure_memory_in_child("mlp", 512, method, elementwise)
        print(f"| {label} | {peak / 2**20:.1f} MiB | {peak / plain:.2f}x |", flush=True)
    zoo_tables(budget, args.quick, args.zoo_batch)


if __name__ == "__main__":
    main()
