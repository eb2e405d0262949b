"""`train.py --mode=compare`: every gradient method and update rule on one mini-batch.

Each row contrasts two ways of computing the same thing and reports the largest absolute
difference, the relative difference (largest absolute difference over the largest
magnitude of the reference) and PASS when the relative difference is within float32
round-off (`TOLERANCE`, or `TOLERANCE_FLOAT64` for float64 models).
"""

import dataclasses
import functools
import statistics as pystats
import time

import numpy as np
import tensorflow as tf

from tfmbgd import data
from tfmbgd.engine import gradients
from tfmbgd.engine.moments import METHODS, gradient_moments
from tfmbgd.errors import Interrupted
from tfmbgd.loop import training
from tfmbgd.loop.update import make_update
from tfmbgd.stats import variance, variance_traces

TOLERANCE = 1e-5          # float32: ~100 ulps of the largest gradient entry
TOLERANCE_FLOAT64 = 1e-12
TIMING_CALLS = 5


@dataclasses.dataclass
class Row:
    what: str
    reference: str
    max_abs: float
    relative: float
    seconds: float | None  # None: derived from rows above, not timed
    passed: bool


def difference(a, b):
    """(max |a - b|, max |a - b| / max |b|) over lists of arrays."""
    a = np.concatenate([np.ravel(t) for t in a]).astype(np.float64)
    b = np.concatenate([np.ravel(t) for t in b]).astype(np.float64)
    max_abs = float(np.max(np.abs(a - b)))
    return max_abs, max_abs / max(float(np.max(np.abs(b))), np.finfo(np.float64).tiny)


def timed(fn, calls=TIMING_CALLS):
    """`(result, median seconds)` of `calls` calls of `tf.function(fn)` after one warm-up."""
    compiled = tf.function(fn)
    result = compiled()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        result = tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, compiled())
        times.append(time.perf_counter() - start)
    return result, pystats.median(times)


def accumulate_single_examples(model, loss_fn, x, y):
    """The sum of B single-example gradients, by a plain Python loop of B backprops."""
    total = None
    for n in range(len(x)):
        _, _, grads = gradients.example_gradients(model, loss_fn, x[n], y[n])
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
    return total


def contrast(model, loss_fn, x, y, learning_rate, note=lambda what: None):
    """All rows of the comparison for the batch `(x, y)`; leaves the weights unchanged.
    `note(what)` is called before each computation (`run` prints it: tracing makes some
    take seconds)."""
    variables = model.trainable_variables
    tol = TOLERANCE_FLOAT64 if variables[0].dtype == "float64" else TOLERANCE
    b = len(x)
    rows = []

    def row(what, reference, a, ref, seconds):
        max_abs, rel = difference(a, ref)
        rows.append(Row(what, reference, max_abs, rel, seconds, rel <= tol))

    note("the gradient of the mean loss")
    (_, g_mean), t_mean = timed(lambda: gradients.batch_gradients(model, loss_fn, x, y, "mean"))
    moments = {}
    for method in METHODS:
        note(f"the gradient moments by {method}")
        moments[method], t = timed(lambda method=method: gradient_moments(model, loss_fn, x, y, method))
        row(f"mean of per-example gradients ({method})", "gradient of the mean loss",
            moments[method].mean, g_mean, t)
    fast, slow = moments["auto"], moments["loop"]
    row("per-example squared gradient norms (auto)", "the same from the loop", [fast.norms_sq],
        [slow.norms_sq], None)
    if b > 1:
        row("per-parameter gradient variance (auto)", "the same from the loop", variance(fast),
            variance(slow), None)
    note("the gradient of the sum loss")
    (_, g_sum), t_sum = timed(lambda: gradients.batch_gradients(model, loss_fn, x, y, "sum"))
    row("gradient of the sum loss", f"B x gradient of the mean loss (B={b})",
        g_sum, [b * g for g in g_mean], t_sum)
    note(f"{b} single-example backprops")
    start = time.perf_counter()
    acc = accumulate_single_examples(model, loss_fn, x, y)
    row(f"{b} single-example backprops, summed (eager loop)", "gradient of the sum loss",
        acc, g_sum, time.perf_counter() - start)
    row("the same, divided by B", "gradient of the mean loss", [a / b for a in acc], g_mean, None)

    initial = [v.numpy() for v in variables]
    after = {}
    for rule in ("manual", "custom", "keras"):
        note(f"one update by the {rule} rule")
        for v, w in zip(variables, initial):
            v.assign(w)
        start = time.perf_counter()
        make_update(rule, variables, learning_rate)(g_mean)
        after[rule] = ([v.numpy() for v in variables], time.perf_counter() - start)
    for v, w in zip(variables, initial):
        v.assign(w)
    row("weights after one update: custom MiniBatchSGD", "manual w -= lr * g", after["custom"][0],
        after["manual"][0], after["custom"][1])
    row("weights after one update: keras.optimizers.SGD", "manual w -= lr * g", after["keras"][0],
        after["manual"][0], after["keras"][1])
    return rows, tol, t_mean


def describe_batch(model, loss_fn, x, y):
    """Lines that show what one batch looks like to the optimizer."""
    m = gradient_moments(model, loss_fn, x, y, "auto", elementwise=False)
    losses = m.losses.numpy()
    norms = np.sqrt(m.norms_sq.numpy())
    mean_norm = float(np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in m.mean)))
    spread = lambda a: f"min {a.min():.4f}  mean {a.mean():.4f}  max {a.max():.4f}"
    ratio = mean_norm / norms.mean()
    if len(x) == 1:
        why = "one example: the mean gradient is its gradient"
    elif ratio < 0.995:        # the triangle inequality: equal only when all point one way
        why = f"{ratio:.2f} x the mean per-example norm: the examples' gradients partly cancel"
    else:
        why = f"{ratio:.2f} x the mean per-example norm: the examples' gradients point the same way"
    lines = [
        f"per-example losses:          {spread(losses)}",
        f"per-example gradient norms:  {spread(norms)}",
        f"norm of the mean gradient:   {mean_norm:.4f}  ({why})",
    ]
    if len(x) > 1:
        trace = float(tf.add_n(variance_traces(m)))
        lines.append(f"gradient variance tr(Sigma): {trace:.4f}; variance of this mean over "
                     f"B={len(x)} examples: {trace / len(x):.4f}")
    return lines


STEPS = 3 + len(METHODS) + 3     # the computations `contrast` notes, for the progress lines


def run(config, out=None, should_stop=None):
    """Prints the comparison for the first batch of `config` (through `out`, default a
    flushed print); True if every row passed.

    Raises:
      tfmbgd.errors.Interrupted: `should_stop` said so, asked before each computation.
    """
    out = out or functools.partial(print, flush=True)
    ds = data.load(config.dataset, config.seed)
    # float32 whatever --mixed_precision says: the rows compare to float32 round-off
    model, loss_fn, batch, _ = training.setup(dataclasses.replace(config, mixed_precision="none"), ds)
    x, y = next(iter(data.batches(*ds.train, batch, config.seed)))
    tol = TOLERANCE_FLOAT64 if model.trainable_variables[0].dtype == "float64" else TOLERANCE
    out(f"One mini-batch of {ds.name}: model {config.model}, B={len(x)}, "
        f"{model.trainable_variables[0].dtype}; PASS when relative difference <= {tol:g}")
    done = [0]

    def note(what):
        if should_stop is not None and should_stop():
            raise Interrupted(None, 0, "in compare mode; nothing was written")
        done[0] += 1
        out(f"  [{done[0]}/{STEPS}] {what} ...")
    rows, tol, t_plain = contrast(model, loss_fn, x, y, config.learning_rate, note)
    out(f"times: median of {TIMING_CALLS} calls of a tf.function after tracing "
        f"(one plain backprop took {t_plain * 1e3:.2f} ms); the eager loop and updates once")
    for line in describe_batch(model, loss_fn, x, y):
        out(line)
    out("")
    out(format_rows(rows))
    failed = [r for r in rows if not r.passed]
    out("")
    out(f"{len(rows) - len(failed)} of {len(rows)} rows PASS" + (f"; FAIL: {len(failed)}" if failed else ""))
    return not failed


def _ms(seconds):
    return "      --" if seconds is None else f"{seconds * 1e3:7.2f}ms"


def format_rows(rows):
    what_w = max(len(r.what) for r in rows)
    ref_w = max(len(r.reference) for r in rows)
    head = (f"{'computed':<{what_w}}  {'vs':<{ref_w}}  {'max abs':>9}  {'relative':>9}  "
            f"result  {'time':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.what:<{what_w}}  {r.reference:<{ref_w}}  {r.max_abs:9.2e}  {r.relative:9.2e}  "
                     f"{'PASS' if r.passed else 'FAIL':<6}  {_ms(r.seconds)}")
    return "\n".join(lines)
