"""What Cockpit's instrument sets cost per train step, as ratios to a plain step.

    python benchmarks/cockpit_cost.py            # a few minutes on 2 cores
    python benchmarks/cockpit_cost.py --quick    # shorter budgets

Ratios of medians of steps timed in alternation in one process (see `step_cost.py`): the
plain step (forward, backward, SGD update) against the statistics step with tfmbgd's
defaults plus Cockpit's economy, business or full set (`--instruments=economy`, ...),
every step; and train.py's loop with the full set every 16 steps against no statistics.
The "economy without grad_hist" row shows what the one instrument that reads every
per-example gradient element costs: its B x P numbers are an arithmetic floor no form can
avoid (the plain step's matrix products touch B x P products too, once forward and twice
backward, so counting them once more and binning them is of the order of a backward pass).
Peak memory: as `step_cost.py`, in a child process with the BFC allocator.

Cockpit's published figures (Schneider et al. 2021, CIFAR-10 3C3D on a GPU), per step
against a plain step: economy 1.5x, business 2.0x, full 21x every step and 2.2x every 16
steps. Measured here with cockpit-for-pytorch 1.0.2 on this CPU (ARCHITECTURE.md), MLP
784-256-256-10 at B=128: economy 182x, business 181x, full 685x. tfmbgd's figures below
are CPU figures.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from step_cost import as_tensors, call, interleaved, make

SETS = {
    "economy": ["economy"],
    "economy without grad_hist": ["alpha", "distance", "inner_test", "norm_test", "ortho_test",
                                  "update_size"],
    "business": ["business"],
    "full": ["full"],
}
COCKPIT = {"economy": "1.5x", "business": "2.0x", "full": "21x", "full, every 16": "2.2x"}


def steps_for(model, names):
    from tfmbgd import instruments, losses
    from tfmbgd.loop import steps
    from tfmbgd.loop.update import make_update

    apply = make_update("manual", model.trainable_variables, 1e-4)
    return steps.Steps(model, losses.crossentropy, apply,
                       instruments=instruments.default() + instruments.create(names, 1e-4))


def every_step(model_name, batch, names, budget):
    model, x, y = make(model_name, batch)
    x, y = as_tensors(x, y)
    plain, stats = steps_for(model, []).plain, steps_for(model, names).with_stats
    (t_plain, t_stats), rounds = interleaved([lambda: call(plain, x, y), lambda: call(stats, x, y)], budget)
    return t_plain, t_stats / t_plain, rounds


def materialized(model_name, batch, budget):
    """The floor of any histogram of the per-example gradient elements: the step's moments
    and forms, then every per-example gradient built (variable by variable, the whole batch)
    and summed, nothing binned; against the plain step."""
    import tensorflow as tf

    from tfmbgd import losses
    from tfmbgd.engine.moments import measured_moments

    model, x, y = make(model_name, batch)
    x, y = as_tensors(x, y)
    variables = model.trainable_variables

    @tf.function
    def build(x, y):
        _, project = measured_moments(model, losses.crossentropy, x, y, elementwise=False)
        total = tf.add_n([tf.reduce_sum(project.explicit(i, tuple(v.shape)))
                          for i, v in enumerate(variables)])
        return {"loss": total}
    plain = steps_for(model, []).plain
    (t_plain, t_built), rounds = interleaved([lambda: call(plain, x, y), lambda: call(build, x, y)], budget)
    return t_built / t_plain, rounds


def in_the_loop(model_name, batch, names, every, budget, steps_per_call=64):
    """train.py's loop (`runner.StepRunner`, summaries written) with `names` every `every`
    steps, against the same loop without statistics."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    from tfmbgd.loop import runner

    model, x, y = make(model_name, batch)
    x_all, y_all = tf.constant(np.concatenate([x] * 8)), tf.constant(np.concatenate([y] * 8))
    rng = np.random.default_rng(0)
    index = np.stack([rng.permutation(batch * 8)[:batch] for _ in range(steps_per_call)]).astype(np.int32)
    with tempfile.TemporaryDirectory() as logdir:
        writer = tf.summary.create_file_writer(logdir)
        fns = []
        for stats_every, chosen in ((0, []), (every, names)):
            loop = runner.StepRunner(steps_for(model, chosen), writer, 16, stats_every)
            fns.append(lambda loop=loop: float(loop.run(x_all, y_all, index, tf.constant(1, tf.int64),
                                                        tf.constant(0, tf.int64))))
        (t_plain, t_mixed), rounds = interleaved(fns, budget)
        writer.close()
    return t_mixed / t_plain, rounds


def peak(model_name, batch, names):
    import tensorflow as tf

    model, x, y = make(model_name, batch)
    x, y = as_tensors(x, y)
    s = steps_for(model, names or [])
    fn = s.plain if names is None else s.with_stats
    call(fn, x, y)
    tf.config.experimental.reset_memory_stats("CPU:0")
    call(fn, x, y)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"]


def peak_in_child(model_name, batch, preset):
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, __file__, "--memory", model_name, str(batch), preset], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter budgets")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per ratio")
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)      # child: MODEL BATCH SET|plain
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.memory:
        model_name, batch, preset = args.memory
        print(json.dumps({"peak": peak(model_name, int(batch), None if preset == "plain" else SETS[preset])}))
        return
    import tensorflow as tf

    budget = 1.5 if args.quick else args.budget
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; ratio = median statistics step / median "
          "plain step, interleaved in one process (CPU figures)\n")
    print("| model | B | set | schedule | plain step | ratio | target | Cockpit (GPU, paper) | rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    targets = {("mlp", "economy"): "<= 1.3x", ("mlp", "business"): "<= 1.6x", ("cnn", "economy"): "<= 1.6x"}
    for model_name, preset in [("mlp", "economy"), ("mlp", "economy without grad_hist"), ("mlp", "business"),
                               ("mlp", "full"), ("cnn", "economy"), ("cnn", "economy without grad_hist")]:
        t_plain, ratio, rounds = every_step(model_name, 128, SETS[preset], budget)
        print(f"| {model_name} | 128 | {preset} | every step | {t_plain * 1e3:.2f} ms | {ratio:.2f}x | "
              f"{targets.get((model_name, preset), '')} | {COCKPIT.get(preset, '')} | {rounds} |", flush=True)
    ratio, rounds = materialized("mlp", 128, budget)
    print(f"| mlp | 128 | (floor of grad_hist: B x P per-example gradient elements built, not binned) | "
          f"every step | | {ratio:.2f}x | | | {rounds} |", flush=True)
    ratio, rounds = in_the_loop("mlp", 128, SETS["full"], 16, budget * 4)
    print(f"| mlp | 128 | full | every 16 steps, train.py's loop | | {ratio:.2f}x | <= 1.5x | "
          f"{COCKPIT['full, every 16']} | {rounds} |", flush=True)
    plain = peak_in_child("mlp", 512, "plain")
    print("\nPeak memory of one step at B=512 (MLP), bytes allocated by tensors (target: economy <= 1.5x):\n")
    print("| step | peak | ratio to plain |")
    print("|---|---|---|")
    print(f"| plain | {plain / 2**20:.1f} MiB | 1.00x |")
    for preset in ("economy", "economy without grad_hist"):
        found = peak_in_child("mlp", 512, preset)
        print(f"| {preset} | {found / 2**20:.1f} MiB | {found / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
