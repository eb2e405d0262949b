"""The instrument protocol: one statistic (or a family of tags) of a statistics step.

An instrument says what it needs from the step, computes its values from one
`Measurement` (the step's gradient moments and what is derived from them once), and
carries its own display: its tags, its custom-scalars charts, how a study summarises it,
and the state it keeps across steps (saved and restored with the run's checkpoint). The
step computes the union of what the active instruments need and nothing more (the shape of
Cockpit's quantities, each declaring its `extensions(step)`, Schneider et al. 2021).

    class UpdateCount(Instrument):
        name = "update_count"
        def build(self, variables):
            self.count = tf.Variable(0.0, trainable=False)
        def state(self):
            return {"count": self.count}
        def tags(self, names):
            return {"update_count": "statistics steps so far"}
        def compute(self, measurement):
            return {"update_count": self.count.assign_add(1.0)}

    tfmbgd.instruments.register(UpdateCount)     # then TrainConfig(instruments=("update_count",))
"""

import functools
from typing import NamedTuple

import tensorflow as tf

from tfmbgd.errors import UserError

# What an instrument can need from the step (`Instrument.needs`), beyond the mean gradient
# and the per-example norms that every statistics step computes.
ELEMENTWISE = "elementwise"        # GradientMoments.sum_sq: one more matmul per layer
REPLICA_NORMS = "replica norms"    # the replicas' mean |G_share|^2: one scalar all-reduce
PARAMETERS = "parameters"          # the variables' values before the step's update: one copy
DOTS = "dots"                      # per-example gradients kept in their forms (`forms.Projector`):
                                   # dot products g_n . v with vectors known later, element histograms
BATCH = "batch"                    # the model, loss and batch, to evaluate more (Hessian-vector
                                   # products) at the weights before the update
NEEDS = (ELEMENTWISE, REPLICA_NORMS, PARAMETERS, DOTS, BATCH)


class Chart(NamedTuple):
    """One custom-scalars chart: the tags matching `patterns` (regular expressions) overlaid,
    in the category titled `category`."""

    category: str
    title: str
    patterns: tuple


class Summary(NamedTuple):
    """A tag that a study averages over a run's statistics steps: its column `title` in the
    study's table, and `metric`, the HParams metric tag of the mean (None: table only)."""

    tag: str
    title: str
    metric: str | None = None


class Instrument:
    """Base class of instruments; subclasses set the class attributes and override `compute`.

    Attributes:
      name: the key of `register` and `TrainConfig.instruments`.
      needs: a frozenset of `NEEDS` entries.
      min_batch: the smallest batch the values are defined for (2 for variances): with a
        static batch size below it the instrument is not computed.
      finite_only: values that are not finite are not written (undefined, not diverged).
      summaries: `Summary` entries of the tags a study averages.
      sgd_only: defined for plain SGD only (Cockpit's CABS and EB): a run with another
        optimizer refuses the instrument.
      histograms: the tags whose values are vectors, written as histograms (the others
        are scalars). A compiled step keeps both kinds in buffers of fixed shapes until
        Python writes them (`tfmbgd.loop.buffer`), so it needs to know which is which.
      bins: `{tag: bins}` of the histogram tags whose values are already TensorBoard's
        `[bins, 3]` rows (fixed bins), not vectors to bucket.
      images: `{tag: shape}` of the tags whose values are `[1, H, W, 3]` uint8 images
        (written as images; the shape, for a compiled step's buffer).
      before_update: `compute` runs before the step's update, at the weights that measured
        the batch (curvature); otherwise after it.
      two_step: the values describe the previous step too (Cockpit's alpha): the step after
        each statistics step is an end step, where only the two-step instruments run.
      lags: `{tag: k}`: the value a step returns for `tag` describes the step k steps back,
        and is written there.
    """

    name = None
    needs = frozenset()
    min_batch = 1
    finite_only = False
    summaries = ()
    histograms = frozenset()
    bins = {}
    images = {}
    sgd_only = False
    before_update = False
    two_step = False
    lags = {}

    @classmethod
    def for_run(cls, learning_rate=None, optimizer=None):
        """The instrument for a run of `train.py` (`--instruments=name`), which knows its
        learning rate and optimizer; by default made without arguments."""
        return cls()

    def build(self, variables):
        """Makes the instrument's state (tf.Variables), once, under the run's strategy scope."""

    def state(self):
        """`{name: tf.Variable}` of the state kept across steps; saved by the checkpoint."""
        return {}

    def tags(self, names):
        """`{tag: description}` of every tag `compute` can return; `names` are the variables'
        paths."""
        raise NotImplementedError

    def charts(self, names):
        """The `Chart`s that show the instrument's tags."""
        return []

    def compute(self, measurement):
        """`{tag: tensor}` of one statistics step (scalars; vectors are written as histograms).
        Runs inside the step's `tf.function`."""
        raise NotImplementedError


class Measurement:
    """What instruments read of one statistics step.

    Attributes:
      moments: the step's `GradientMoments` (unscaled per-example gradients; see
        `tfmbgd.engine.moments`).
      names: the trainable variables' paths, the per-variable tags' suffixes.
      small_sq: the replicas' mean squared norm of their shares' mean gradients (the
        `REPLICA_NORMS` need), or None.
      replicas: the `distribute.Replicas` the batch was split across, or None.
      before: the variables' values before the step's update (the `PARAMETERS` need), or
        None; `variables`: the variables themselves, read after the update.
      project: the step's `forms.Projector` (the `DOTS` need), or None: `project(vectors)`
        is `[g_n . vectors]_n`.
      batch: `(model, loss_fn, x, y)` of the step (the `BATCH` need), or None.
      step: the step's number (int64 tensor), or None.

    Quantities several instruments use are derived once per step: `mean_sq`, `example_sq`,
    and any other through `cached`.
    """

    def __init__(self, moments, names, small_sq=None, replicas=None, before=None, variables=None,
                 project=None, batch=None, step=None):
        self.moments, self.names = moments, list(names)
        self.small_sq, self.replicas = small_sq, replicas
        self.before, self.variables = before, variables
        self.project, self.batch, self.step = project, batch, step
        self._cache = {}

    def cached(self, key, make):
        """`make()`, computed once per step for `key`."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @functools.cached_property
    def mean_sq(self):
        """`[V]`: the squared norm of each variable's mean gradient."""
        return mean_norms_sq(self.moments)

    @functools.cached_property
    def example_sq(self):
        """`[V, B]`: each variable's per-example squared gradient norms."""
        return tf.stack(self.moments.var_norms_sq)

    @functools.cached_property
    def dots(self):
        """`[B]`: `P_n = g_n . mean`, each example's gradient dotted with the batch's mean
        gradient over all variables (the `DOTS` need)."""
        return tf.cast(self.require(DOTS, self.project)(self.moments.mean), self.dtype)

    @functools.cached_property
    def dtype(self):
        """The dtype the statistics are computed in: float64 when the moments are (a float64
        model, the way to check numerics against an oracle), else float32."""
        return tf.float64 if any(m.dtype == tf.float64 for m in self.moments.mean) else tf.float32

    def require(self, need, value):
        """`value`, or a clear error when the step did not provide the `need`."""
        if value is None:
            raise UserError(f"an instrument needs {need!r} from the step, which did not provide it "
                            "(steps.measure and steps.statistics_step provide it when the needs say so)")
        return value

    def b(self, dtype):
        """B as a number of `dtype`; a Python float when the batch size is static (no op)."""
        return batch_float(self.moments, dtype)


def batch_float(m, dtype):
    """B of the moments `m` as a number of `dtype`; a Python float when it is static."""
    if isinstance(m.batch_size, int):
        return float(m.batch_size)
    return tf.cast(m.batch_size, dtype)


def mean_norms_sq(m):
    """`[V]`: squared norm of the mean gradient of each variable."""
    return 2 * tf.stack([tf.nn.l2_loss(mean) for mean in m.mean])    # l2_loss: one fused pass


def per_variable(prefix, vector, names):
    """`{prefix/name: vector[i]}`: a `[V]` vector as one scalar tag per variable (one unstack:
    on a CPU every op costs microseconds whatever its size)."""
    return dict(zip((f"{prefix}/{name}" for name in names), tf.unstack(vector)))


def applies(instrument, batch_size):
    """Whether `instrument` is computed for a batch of `batch_size` (a tensor: unknown until
    run time, so it is)."""
    return not (isinstance(batch_size, int) and batch_size < instrument.min_batch)
