"""The critical batch size, measured: branches from one set of weights, one per batch size.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training") found that with the
learning rate tuned for each batch size B, the optimizer steps S and the examples E = B S
needed to reach a given loss trace the frontier

    (S / S_min - 1) (E / E_min - 1) = 1,   i.e.   S(B) = S_min + E_min / B,

whose critical batch size `B_crit = E_min / S_min` divides the batch sizes that buy speed
with examples (B well below B_crit: S halves when B doubles, E stays) from those that waste
examples (B well above: S barely moves). They predict it by the noise scale `B_noise =
tr(H Sigma) / G^T H G` (`noise_scale/hessian`), or by `B_simple = tr(Sigma) / |G|^2`.
Later work measures it directly by branching runs from one checkpoint (Merrill et al.
2025, "Critical Batch Size Revisited"); this module does that for any Keras model:

  * From the branch point (the model's weights as given: a fresh model, or a run's
    checkpoint), one branch per (batch size, learning rate): plain SGD on the mean loss,
    `w -= lr * g`, on batches drawn from the training set (a new random order per epoch,
    the same order for every learning rate of one batch size), until the loss on a fixed
    evaluation set (by default the training set, at most 4096 examples) reaches the target,
    or a budget of epochs is spent. The loss is evaluated after every step, so S is exact.
  * Learning rates on a grid of factors of sqrt(2) of `learning_rate`, searched per batch size:
    the search starts at the best rate of the previous (smaller) batch size and widens
    until the best rate (fewest steps; ties to the smaller rate) has a tried neighbour on
    each side that is no better. A best rate at the edge of what was tried is reported.
  * The frontier fitted by least squares on S(B) = S_min + E_min / B in relative error
    (each point weighted by 1/S), with a bootstrap interval over the batch sizes' points.
  * B_simple and B_noise measured at the branch point on `noise_examples` examples.

`probe` is the library face (`tfmbgd.critical_batch`); `run` is `train.py
--mode=critical_batch`: it writes each branch as a run of TensorBoard's HParams dashboard,
the frontier as a chart (steps to target against examples to target, with the rays E = B S
of B_crit, B_simple and B_noise) and as `frontier.svg`, and keeps every finished branch in
`branches.json`, so an interrupted probe resumes where it stopped and gives the same table.
"""

import dataclasses
import json
import math
import os
import time

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from tfmbgd import data, losses, models, stats
from tfmbgd.app import frontier_svg
from tfmbgd.engine import hessian, layerwise, moments
from tfmbgd.errors import Interrupted, UserError
from tfmbgd.instruments import Chart
from tfmbgd.loop import checkpoints, rundir, tensorboard

DEFAULT_BATCH_SIZES = (8, 16, 32, 64, 128, 256, None)      # None: the whole training set
EVAL_EXAMPLES = 4096         # the fixed evaluation set: at most this many training examples
CHUNK = 64                   # steps of the first compiled call of a branch, doubling up to
MAX_CHUNK = 1024             # this; the loss is read after each step
MAX_TRIES = 10               # learning rates tried per batch size at most
GRID = 2 ** 0.5              # ratio of neighbouring learning rates of the search
BOOTSTRAP = 2000             # resamples of the points for B_crit's interval
INTERVAL = (5, 95)           # its percentiles: a 90 % interval
RECORD = "branches.json"


@dataclasses.dataclass(frozen=True)
class Branch:
    """One branch: `steps` to the target, or None, and why it ended (`end`): "reached",
    "diverged", "stalled" (no progress above the target), "budget" (its epochs spent) or
    "slower" (stopped at the steps another rate of its batch size needed); the evaluation
    loss at its end."""

    batch_size: int
    learning_rate: float
    steps: int | None
    end: str
    final_loss: float
    seconds: float

    @property
    def examples(self):
        return None if self.steps is None else self.steps * self.batch_size


@dataclasses.dataclass(frozen=True)
class Frontier:
    """`S(B) = s_min + e_min / B` fitted to the best branch of each batch size; `b_crit =
    e_min / s_min` (inf when s_min <= 0: every batch size measured still scales perfectly),
    `interval` its bootstrap 90 % interval."""

    s_min: float
    e_min: float
    b_crit: float
    interval: tuple

    def steps(self, batch_size):
        return self.s_min + self.e_min / batch_size

    @property
    def bounded(self):
        """Whether both asymptotes are positive, so the frontier can be drawn."""
        return self.s_min > 0 and self.e_min > 0

    def steps_for_examples(self, examples):
        """S on the frontier at E = `examples` (> E_min): `(S/S_min - 1)(E/E_min - 1) = 1`."""
        return self.s_min * (1 + 1 / (examples / self.e_min - 1))


@dataclasses.dataclass(frozen=True)
class CriticalBatch:
    """What the probe measured. `best[B]` is the branch kept for batch size B (None: no
    learning rate reached the target), `edge[B]` whether its rate was at the edge of the
    rates tried (the search stopped at `MAX_TRIES`)."""

    target_loss: float
    start_loss: float
    train_examples: int
    branches: list
    best: dict
    edge: dict
    frontier: Frontier | None
    b_simple: float
    b_noise: float

    @property
    def b_crit(self):
        return None if self.frontier is None else self.frontier.b_crit

    def table(self):
        """A markdown table: per batch size, the kept learning rate, S and E to the target and
        the fitted S; then B_crit with its interval, B_simple and B_noise."""
        lines = ["| batch size | learning rate | rates tried | steps S | examples E | fitted S |",
                 "|---|---|---|---|---|---|"]
        for b, branch in self.best.items():
            tried = sum(1 for t in self.branches if t.batch_size == b)
            fitted = "" if self.frontier is None else f"{self.frontier.steps(b):.1f}"
            if branch is None:
                lines.append(f"| {b} | - | {tried} | not reached | - | {fitted} |")
                continue
            rate = f"{branch.learning_rate:g}" + (" (edge)" if self.edge[b] else "")
            lines.append(f"| {b} | {rate} | {tried} | {branch.steps} | {branch.examples} | {fitted} |")
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self):
        f = self.frontier
        if f is None:
            crit = "B_crit: not measured (fewer than two batch sizes reached the target)"
        else:
            lo, hi = f.interval
            crit = (f"B_crit = E_min / S_min = {_num(f.b_crit)} (90 % interval {_num(lo)} .. {_num(hi)}; "
                    f"S_min {f.s_min:.3g}, E_min {f.e_min:.4g})")
        return (f"target loss {self.target_loss:.4g} (from {self.start_loss:.4g} at the branch point)\n"
                f"{crit}\nat the branch point: B_simple = {_num(self.b_simple)}, "
                f"B_noise = {_num(self.b_noise)}")


def _num(value):
    if value is None or not math.isfinite(value):
        return "inf" if value == math.inf else "nan"
    return f"{value:.3g}"


def fit_frontier(batch_sizes, steps, seed=0):
    """Fits `S = s_min + e_min / B` to the points `(batch_sizes[i], steps[i])` in relative
    error; returns a `Frontier` with a bootstrap interval of `b_crit` over the points, or
    None for fewer than two distinct batch sizes."""
    b = np.asarray(batch_sizes, np.float64)
    s = np.asarray(steps, np.float64)
    if len(set(b.tolist())) < 2:
        return None
    s_min, e_min = _least_squares(b, s)
    rng = np.random.default_rng(seed)
    crits = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(b), len(b))
        if len(set(b[pick].tolist())) >= 2:
            crits.append(_crit(*_least_squares(b[pick], s[pick])))
    crits = np.sort(crits)              # nearest-rank percentiles: inf is a value here
    lo, hi = (crits[min(len(crits) - 1, int(p / 100 * len(crits)))] for p in INTERVAL)
    return Frontier(float(s_min), float(e_min), _crit(s_min, e_min), (float(lo), float(hi)))


def _least_squares(b, s):
    """`(s_min, e_min)` minimizing sum ((s - s_min - e_min / b) / s)^2."""
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    if abs(s_min) < 1e-9 * s.max():     # round-off of a zero
        s_min = 0.0
    return s_min, e_min


def _crit(s_min, e_min):
    if e_min <= 0:
        return 0.0
    return math.inf if s_min <= 0 else float(e_min / s_min)


class _Brancher:
    """Trains branches of one model from its weights at construction."""

    def __init__(self, model, loss_fn, x, y, x_eval, y_eval):
        self.model, self.loss_fn = model, loss_fn
        self.start = model.get_weights()
        self.x, self.y = tf.constant(x), tf.constant(y)
        self.x_eval, self.y_eval = tf.constant(x_eval), tf.constant(y_eval)
        dtype = model.trainable_variables[0].dtype
        self.rate = tf.Variable(0.0, dtype=dtype, trainable=False)
        self.chunk = tf.function(self._chunk, reduce_retracing=True)

    def eval_loss(self):
        return float(tf.reduce_mean(self.loss_fn(self.y_eval, self.model(self.x_eval, training=False))))

    def _chunk(self, indices):
        """Takes one SGD step per row of `indices` ([C, B]); returns the evaluation loss after
        each ([C])."""
        variables = self.model.trainable_variables
        losses = tf.TensorArray(tf.float32, size=tf.shape(indices)[0])
        for i in tf.range(tf.shape(indices)[0]):
            xb, yb = tf.gather(self.x, indices[i]), tf.gather(self.y, indices[i])
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(self.loss_fn(yb, self.model(xb, training=True)))
            for v, g in zip(variables, tape.gradient(loss, variables)):
                v.assign_sub(tf.cast(self.rate, v.dtype) * g)
            ev = tf.reduce_mean(self.loss_fn(self.y_eval, self.model(self.x_eval, training=False)))
            losses = losses.write(i, tf.cast(ev, tf.float32))
        return losses.stack()

    def branch(self, batch_size, learning_rate, target, max_steps, seeds, should_stop=None, curve=None):
        """Trains one branch from the start weights, once per seed of `seeds` (data orders), in
        lockstep, for at most `max_steps`; returns a `Branch` whose steps are the first at
        which the mean of their evaluation losses is at most `target` (with several orders,
        the mean curve estimates the expected loss, whose crossing the theory predicts; one
        noisy curve crosses early). A branch whose best loss has not improved by 1 % in the
        second half of its steps has stalled above the target (a noise floor) and stops.
        `curve(step, loss)` is told every mean evaluation loss."""
        began = time.perf_counter()
        self.rate.assign(learning_rate)
        n = int(self.x.shape[0])
        orders = [_Order(n, batch_size, seed) for seed in seeds]
        states = [self.start] * len(seeds)
        done, steps, end, last, size = 0, None, "budget", float("nan"), CHUNK
        best, improved = math.inf, 0
        while done < max_steps and end == "budget":
            if should_stop is not None and should_stop():
                self._load(self.start)
                raise _Stop()
            size = min(size, max_steps - done)
            curves = []
            for j, order in enumerate(orders):
                if len(orders) > 1 or done == 0:
                    self._load(states[j])
                curves.append(self.chunk(tf.constant(order.take(size), tf.int32)).numpy())
                if len(orders) > 1:
                    states[j] = [v.numpy() for v in self.model.weights]
            losses = np.mean(curves, axis=0)
            for i, value in enumerate(losses):
                if curve is not None:
                    curve(done + i + 1, value)
                last = float(value)
                if not np.isfinite(value):
                    end = "diverged"
                    break
                if value <= target:
                    steps, end = done + i + 1, "reached"
                    break
                if value < 0.99 * best:
                    best, improved = value, done + i + 1
            done += len(losses)
            if end == "budget" and done >= 2 * improved + CHUNK and done < max_steps:
                end = "stalled"
            size = min(2 * size, MAX_CHUNK)
        self._load(self.start)
        if end == "budget" and done < max_steps:
            end = "slower"
        return Branch(batch_size, float(learning_rate), steps, end, last, time.perf_counter() - began)

    def _load(self, weights):
        for v, w in zip(self.model.weights, weights):
            v.assign(w)


class _Stop(Exception):
    pass


class _Order:
    """Batches of indices: epochs in a random order from `seed`, read `batch` at a time
    (a batch may span two epochs); the whole set in order when `batch` is all of it."""

    def __init__(self, n, batch, seed):
        self.n, self.batch = n, batch
        self.rng = np.random.default_rng(seed)
        self.buffer = np.zeros([0], np.int64)

    def take(self, steps):
        if self.batch == self.n:
            return np.tile(np.arange(self.n), (steps, 1))
        need = steps * self.batch
        while len(self.buffer) < need:
            self.buffer = np.concatenate([self.buffer, self.rng.permutation(self.n)])
        out, self.buffer = self.buffer[:need], self.buffer[need:]
        return out.reshape(steps, self.batch)


def noise_scales(model, loss_fn, x, y, probes=32, seed=0):
    """`(B_simple, B_noise)` at the model's weights, on the examples `(x, y)`: `tr(Sigma) /
    |G|^2` with the unbiased `|G|^2`, and `tr(H Sigma) / G^T H G` from `probes` Rademacher
    probes (`tfmbgd.curvature.noise_terms`). NaN where a term is not positive, and B_noise
    NaN for a model with BatchNormalization in training mode (its examples mix; the
    `hessian_noise_scale` instrument refuses it for the same reason)."""
    m, project = moments.measured_moments(model, loss_fn, x, y, elementwise=False)
    trace, g_sq = (float(t) for t in stats.noise_scale_terms(m))
    ratio = lambda a, c: a / c if c > 0 and a > 0 else float("nan")
    if layerwise.batch_norms(model):
        return ratio(trace, g_sq), float("nan")
    tr_h_sigma, ghg = hessian.hutchinson_noise_terms(model, loss_fn, x, y, project, samples=probes,
                                                     seed=(seed, 7))
    return ratio(trace, g_sq), ratio(float(tr_h_sigma), float(ghg))


def probe(model, loss_fn, train, batch_sizes=DEFAULT_BATCH_SIZES, learning_rate=0.1, target_loss=None,
          budget_epochs=100, repeats=1, eval_data=None, seed=0, noise_examples=1024, probes=32, verbose=1,
          should_stop=None, record=None, on_branch=None):
    """Measures the critical batch size of `model` from its current weights (module docstring).

    Args:
      model: a built Keras model; its weights are the branch point, and are restored at the end.
      loss_fn: `(y_true, y_pred) -> [B]` per-example losses (`tfmbgd.losses.per_example`).
      train: `(x, y)` numpy arrays the branches draw their batches from.
      batch_sizes: the batch sizes, None meaning the whole training set.
      learning_rate: where the learning-rate search of the smallest batch size starts.
      target_loss: the evaluation loss each branch trains to; default a fifth of the loss
        at the branch point.
      budget_epochs: a branch that has not reached the target after this many epochs'
        worth of examples stops, not reached.
      repeats: data orders per branch (the same for every rate of a batch size), trained in
        lockstep; a branch reaches the target when the mean of their losses does.
      eval_data: `(x, y)` of the evaluation set; default at most `EVAL_EXAMPLES` examples of
        `train`, chosen by `seed`.
      noise_examples, probes: B_simple and B_noise are measured on that many training
        examples, B_noise with that many probes.
      should_stop: `() -> bool`, asked between compiled calls; True raises `Interrupted`.
      record: a JSON file that keeps every finished branch (and the branch point's
        measurements); a probe given the record of an interrupted one reuses them.
      on_branch: `(Branch, curve)` called after each new branch, `curve` its `(step, loss)` list.

    Returns:
      A `CriticalBatch`. Raises `UserError` for batch sizes larger than the training set or
      a target the branch point has reached already; `Interrupted` as said.
    """
    x, y = train
    n = len(x)
    sizes = [n if b is None else int(b) for b in batch_sizes]
    if any(b > n for b in sizes):
        raise UserError(f"batch size {max(sizes)} is more than the {n} training examples; use full")
    sizes = sorted(set(sizes))
    rng = np.random.default_rng(seed)
    if eval_data is None:
        pick = np.sort(rng.permutation(n)[:EVAL_EXAMPLES])
        eval_data = (x[pick], y[pick])
    saved = _load(record)
    brancher = _Brancher(model, loss_fn, x, y, *eval_data)
    start_loss = brancher.eval_loss()
    target = float(start_loss / 5 if target_loss is None else target_loss)
    if target >= start_loss:
        raise UserError(f"the target loss {target:g} is reached at the branch point already (loss "
                        f"{start_loss:.4g}); pass a lower target")
    settings = dict(target=target, learning_rate=learning_rate, budget_epochs=budget_epochs, repeats=repeats,
                    seed=seed, train_examples=n)
    if saved and saved.get("settings") != settings:
        raise UserError(f"the record {record} was made with {saved.get('settings')}, not {settings}; "
                        "give the same settings, or start a new probe")
    if "b_simple" in saved:
        b_simple, b_noise = saved["b_simple"], saved["b_noise"]
    else:
        pick = rng.permutation(n)[:noise_examples]
        b_simple, b_noise = noise_scales(model, loss_fn, x[pick], y[pick], probes, seed)
        saved.update(settings=settings, b_simple=b_simple, b_noise=b_noise, branches=[])
        _save(record, saved)
    done = {(b["batch_size"], b["learning_rate"]): Branch(**b) for b in saved.get("branches", [])}
    branches, best, edge = {}, {}, {}
    k_start = 0
    try:
        for size in sizes:
            max_steps = max(1, math.ceil(budget_epochs * n / size))

            def run(k, size=size, max_steps=max_steps):
                rate = float(learning_rate * GRID ** k)
                key = (size, rate)
                if key not in done:
                    reached = [t.steps for (b, _), t in done.items() if b == size and t.steps is not None]
                    max_steps = min([max_steps] + reached)
                    curve = []
                    seeds = [[seed, size, i] for i in range(repeats)]
                    done[key] = brancher.branch(size, rate, target, max_steps, seeds,
                                                should_stop=should_stop,
                                                curve=lambda s, v: curve.append((s, float(v))))
                    saved.setdefault("branches", []).append(dataclasses.asdict(done[key]))
                    _save(record, saved)
                    if on_branch is not None:
                        on_branch(done[key], curve)
                    if verbose:
                        _say(done[key], target)
                branches[key] = done[key]
                return done[key]

            k_best, at_edge = _search(run, k_start)
            best[size] = None if k_best is None else run(k_best)
            edge[size] = at_edge
            if k_best is not None:
                k_start = k_best
    except _Stop:
        raise Interrupted(None, 0, f"after {len(saved.get('branches', []))} branches") from None
    finally:
        model.set_weights(brancher.start)
    reached = [(b, best[b].steps) for b in sizes if best[b] is not None]
    frontier = fit_frontier(*zip(*reached), seed=seed) if len(reached) >= 2 else None
    return CriticalBatch(target, start_loss, n, list(branches.values()), best, edge, frontier, b_simple,
                         b_noise)


def _search(run, k):
    """The best grid index around `k`: fewest steps, ties to the smaller rate; widened until
    the best has a tried neighbour on each side. Returns `(index or None, at_edge)`."""
    tried = {}
    for j in (k - 1, k, k + 1):
        tried[j] = run(j)
    while len(tried) < MAX_TRIES:
        cost = {j: (math.inf if t.steps is None else t.steps) for j, t in tried.items()}
        low, high = min(tried), max(tried)
        if all(c == math.inf for c in cost.values()):
            # none reached: a budget spent too slowly says go higher; divergence, or a
            # noise floor above the target (which falls with the rate), lower
            nxt = high + 1 if tried[high].end == "budget" else low - 1
        else:
            best = min(sorted(cost), key=lambda j: cost[j])
            if best == low:
                nxt = low - 1
            elif best == high:
                nxt = high + 1
            else:
                return best, False
        tried[nxt] = run(nxt)
    cost = {j: (math.inf if t.steps is None else t.steps) for j, t in tried.items()}
    best = min(sorted(cost), key=lambda j: cost[j])
    if cost[best] == math.inf:
        return None, True
    return best, best in (min(tried), max(tried))


def _say(branch, target):
    if branch.steps is not None:
        what = f"{branch.steps} steps ({branch.examples} examples) to loss {target:.4g}"
    else:
        what = {"diverged": "diverged", "stalled": f"stalled at loss {branch.final_loss:.4g}",
                "budget": f"not reached in the budget (loss {branch.final_loss:.4g})",
                "slower": "stopped: slower than a rate tried before"}[branch.end]
    print(f"  batch {branch.batch_size:>5}  lr {branch.learning_rate:<9.4g} {what}  "
          f"[{branch.seconds:.1f} s]", flush=True)


def _load(record):
    if record is None or not os.path.exists(record):
        return {}
    try:
        with open(record) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{record} cannot be read as a probe's record ({err}); start a new probe") from None


def _save(record, saved):
    if record is None:
        return
    part = record + ".part"
    with open(part, "w") as f:
        json.dump(saved, f, indent=1)
    os.replace(part, record)       # atomic: an interrupted write leaves the last whole record


def run(config, should_stop=None, verbose=1):
    """`train.py --mode=critical_batch`: the probe on `config`'s data and model, written to a
    probe directory under `config.logdir` (or continued in `config.resume`). Returns the
    `CriticalBatch`."""
    ds = data.load(config.dataset, config.seed)
    model = models.build(config.model, ds.input_shape, ds.num_classes, config.hidden, config.seed)
    if config.branch_from:
        _restore(model, config.branch_from)
    loss_fn = losses.per_example(losses.for_task(ds.num_classes))
    if config.resume:
        probe_dir = config.resume
    else:
        probe_dir = rundir.new_run_dir(config.logdir, "critical-" + rundir.run_name(config, with_batch=False))
        rundir.save_config(probe_dir, config)
    if verbose:
        print(f"critical batch size probe -> {probe_dir}", flush=True)
    board = _Board(probe_dir)
    try:
        result = probe(model, loss_fn, ds.train, batch_sizes=config.batch_sizes or DEFAULT_BATCH_SIZES,
                       learning_rate=config.learning_rate, target_loss=config.target_loss,
                       budget_epochs=config.budget_epochs, repeats=config.repeats, seed=config.seed,
                       verbose=verbose, should_stop=should_stop, record=os.path.join(probe_dir, RECORD),
                       on_branch=board.branch)
    except Interrupted as stopped:
        raise Interrupted(probe_dir, 0, f"{stopped.note}; {probe_dir} keeps them") from None
    board.frontier(result)
    with open(os.path.join(probe_dir, "frontier.svg"), "w") as f:
        f.write(frontier_svg.draw(result))
    with open(os.path.join(probe_dir, "table.md"), "w") as f:
        f.write(result.table() + "\n")
    if verbose:
        print(result.table())
        print(f"Probe written to {probe_dir}\nSee it with:  tensorboard --logdir {probe_dir}")
    return result


def _restore(model, run_dir):
    """Loads the model's weights from the last checkpoint of the training run in `run_dir`."""
    path = checkpoints.latest(run_dir) if os.path.isdir(run_dir) else None
    if path is None:
        raise UserError(f"--branch_from={run_dir}: no checkpoint there; pass a run directory train.py wrote")
    status = tf.train.Checkpoint(model=model).read(path)
    try:
        status.expect_partial().assert_existing_objects_matched()
    except AssertionError as err:
        raise UserError(f"--branch_from={run_dir}: its checkpoint does not fit this model ({err}); "
                        "give the run's --model, --hidden and --dataset") from None


class _Board:
    """The probe in TensorBoard: one HParams run per branch, the frontier as a chart."""

    def __init__(self, probe_dir):
        self.dir = probe_dir
        self.hparams = [hp.HParam("batch_size", hp.IntInterval(1, 2 ** 31 - 1)),
                        hp.HParam("learning_rate", hp.RealInterval(0.0, float("inf")))]
        metrics = [hp.Metric("steps_to_target", display_name="steps to target"),
                   hp.Metric("examples_to_target", display_name="examples to target"),
                   hp.Metric("final_loss", display_name="loss at the end")]
        with tf.summary.create_file_writer(probe_dir).as_default():
            hp.hparams_config(hparams=self.hparams, metrics=metrics)

    def branch(self, branch, curve):
        name = f"b{branch.batch_size}-lr{branch.learning_rate:g}"
        with tf.summary.create_file_writer(os.path.join(self.dir, "branches", name)).as_default():
            hp.hparams({self.hparams[0]: branch.batch_size, self.hparams[1]: branch.learning_rate})
            for step, value in curve:
                if math.isfinite(value):
                    tf.summary.scalar("loss", value, step=step)
            end = curve[-1][0] if curve else 0
            if branch.steps is not None:
                tf.summary.scalar("steps_to_target", branch.steps, step=end)
                tf.summary.scalar("examples_to_target", branch.examples, step=end)
            if math.isfinite(branch.final_loss):
                tf.summary.scalar("final_loss", branch.final_loss, step=end)

    def frontier(self, result):
        """Steps to the target against examples to the target (the x axis is the step), the
        fitted frontier, and the rays S = E / B of B_crit, B_simple and B_noise."""
        points = [b for b in result.best.values() if b is not None]
        if not points:
            return
        e_hi = max(b.examples for b in points) * 2
        grid = np.unique(np.geomspace(1, e_hi, 200).astype(np.int64))
        writer = tf.summary.create_file_writer(os.path.join(self.dir, "frontier"))
        with writer.as_default():
            for b in points:
                tf.summary.scalar("critical_batch/measured", b.steps, step=b.examples,
                                  description="steps to the target loss at the step = examples to it; "
                                              "one point per batch size, its best learning rate")
            f = result.frontier
            if f is not None and f.bounded:
                for e in grid[grid > f.e_min]:
                    tf.summary.scalar("critical_batch/frontier", f.steps_for_examples(e), step=int(e),
                                      description="fitted (S/S_min - 1)(E/E_min - 1) = 1")
            for name, value in (("B_crit", result.b_crit), ("B_simple", result.b_simple),
                                ("B_noise", result.b_noise)):
                if value is not None and math.isfinite(value) and value > 0:
                    for e in grid:
                        tf.summary.scalar(f"critical_batch/ray_{name}", e / value, step=int(e),
                                          description=f"the batch size {name} = {value:.3g}: S = E / {name}")
            tf.summary.text("critical_batch/table", result.table(), step=0)
        chart = Chart("Critical batch size", "steps to target vs examples to target (x axis)",
                      (r"critical_batch/.*",))
        tensorboard.write_layout(writer, [chart], loss_charts=False)

