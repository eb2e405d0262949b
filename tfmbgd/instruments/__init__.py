"""Instruments: the statistics of a statistics step, one module each.

Every statistic is an `Instrument` (see `tfmbgd.instruments.base`): what it needs from
the step, its maths, its tags and charts, its study summary and its state. The built-ins:

| instrument | module | tags |
|---|---|---|
| `grad_norm` | `norms` | `grad/norm`, `grad/norm/<path>` |
| `variance` | `variance` | `grad_var/trace`, `grad_var/<path>`, `grad_var/of_mean[/<path>]` |
| `gsnr` | `gsnr` | `grad_snr/mean_gsnr` (elementwise tier) |
| `update_size` | `step` | `step/update_size[/<path>]`: norm of the update applied (not by default) |
| `distance` | `step` | `step/distance[/<path>]`: distance from the initial weights (not by default) |
| `norm_test` | `gradient_tests` | `grad_test/norm`: the norm test (not by default) |
| `cabs` | `sgd` | `batch_size/cabs`: CABS's batch size (plain SGD only; not by default) |
| `eb` | `sgd` | `early_stopping/eb`: the EB criterion (plain SGD only, elementwise; not by default) |
| `gsnr_biased` | `gsnr` | `grad_snr/mean_gsnr_biased`, Cockpit's MeanGSNR (elementwise; not by default) |
| `noise_scale` | `noise_scale` | `noise_scale/simple` |
| `two_batch` | `noise_scale` | `noise_scale/two_batch` (several replicas) |
| `per_example_norms` | `norms` | `per_example_grad_norm` (histogram) |
| `batch_size` | `batch_size` | `batch_size` |

A run uses `default(...)` plus the registered instruments named in
`TrainConfig.instruments`; `register` adds one (any class with the protocol).
"""

from tfmbgd.errors import UserError
from tfmbgd.instruments.base import (  # noqa: F401
    BATCH,
    DOTS,
    ELEMENTWISE,
    NEEDS,
    PARAMETERS,
    REPLICA_NORMS,
    Chart,
    Instrument,
    Measurement,
    Summary,
    applies,
)
from tfmbgd.instruments.batch_size import BatchSize
from tfmbgd.instruments.curvature import HessMaxEV, HessTrace, TICDiag, TICTrace
from tfmbgd.instruments.gradient_tests import InnerTest, NormTest, OrthoTest
from tfmbgd.instruments.gsnr import MeanGSNR, MeanGSNRBiased
from tfmbgd.instruments.hists import GradHist1d, GradHist2d
from tfmbgd.instruments.noise_scale import NoiseScale, TwoBatchNoiseScale
from tfmbgd.instruments.norms import GradientNorm, PerExampleNorms
from tfmbgd.instruments.sgd import CABS, EarlyStopping
from tfmbgd.instruments.step import Alpha, Distance, UpdateSize
from tfmbgd.instruments.variance import VarianceTrace

REGISTRY = {}


def register(cls):
    """Makes the instrument class `cls` available by `cls.name` (to `TrainConfig.instruments`
    and `create`); returns `cls`, so it serves as a class decorator."""
    if not cls.name or not isinstance(cls.name, str):
        raise UserError(f"instrument {cls.__name__} needs a name (a class attribute) to be registered")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise UserError(f"an instrument named {cls.name!r} is registered already "
                        f"({REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    return cls


BUILT_IN = (GradientNorm, VarianceTrace, MeanGSNR, NoiseScale, TwoBatchNoiseScale, PerExampleNorms, BatchSize,
            MeanGSNRBiased, UpdateSize, Distance, CABS, EarlyStopping, NormTest, InnerTest, OrthoTest, Alpha,
            HessTrace, HessMaxEV, TICDiag, TICTrace, GradHist1d, GradHist2d)
for _cls in BUILT_IN:
    register(_cls)

# Cockpit's three configurations (`cockpit.utils.configuration`), by the names of the
# instruments that tfmbgd adds to its defaults (which already log the loss and gradient norm).
ECONOMY = ("alpha", "distance", "grad_hist", "inner_test", "norm_test", "ortho_test", "update_size")
BUSINESS = ECONOMY + ("tic_diag", "hess_trace")
FULL = BUSINESS + ("hess_max_ev", "grad_hist_2d")
PRESETS = {"economy": ECONOMY, "business": BUSINESS, "full": FULL}


def expand(names):
    """`names` with the presets (economy, business, full) replaced by their instruments, each
    name once, in order."""
    out = []
    for name in names:
        for n in PRESETS.get(name, (name,)):
            if n not in out:
                out.append(n)
    return tuple(out)


def default(elementwise=False, noise_scale_decay=0.9):
    """The instruments of a run: norms, variances, the noise scale (from one batch, and from
    two batch sizes when the batch is split across several replicas; a run may be resumed
    on another number of them), the per-example norm histogram and the batch size; GSNR
    with `elementwise`."""
    active = [GradientNorm(), VarianceTrace()]
    if elementwise:
        active.append(MeanGSNR())
    active += [NoiseScale(noise_scale_decay), TwoBatchNoiseScale(noise_scale_decay)]
    return active + [PerExampleNorms(), BatchSize()]


def create(names, learning_rate=None, optimizer="sgd"):
    """Instances of the registered instruments `names` for a run with `learning_rate` and
    `optimizer` (each class's `for_run`).

    Raises:
      UserError: an unknown name, or an instrument defined for plain SGD in a run with
        another optimizer.
    """
    names = expand(names)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown instrument {unknown[0]!r}; presets: {', '.join(PRESETS)}; registered: "
                        f"{', '.join(sorted(REGISTRY))} (tfmbgd.instruments.register adds one)")
    out = [REGISTRY[n].for_run(learning_rate=learning_rate, optimizer=optimizer) for n in names]
    check_sgd(out, optimizer == "sgd", f"--optimizer={optimizer}")
    return out


def check_sgd(active, plain_sgd, what):
    """A `UserError` if an instrument of `active` is defined for plain SGD only and the run's
    optimizer (`what`) is not plain SGD."""
    for instrument in active:
        if instrument.sgd_only and not plain_sgd:
            raise UserError(f"instrument {instrument.name} is defined for plain SGD only (as in Cockpit); "
                            f"the run has {what}: use SGD without momentum, or drop the instrument")


# What the step provides on one device only: the per-example forms and the batch itself are
# not merged across replicas yet.
ONE_DEVICE = frozenset({DOTS, BATCH})


def refuse_replicas(active, on_replicas):
    """A `UserError` naming the instruments of `active` that need `ONE_DEVICE`, when the run
    is `on_replicas`."""
    names = [i.name for i in active if i.needs & ONE_DEVICE]
    if on_replicas and names:
        raise UserError(f"{', '.join(names)}: not computed across replicas yet; run on one device "
                        "(norm_test, update_size and distance work across replicas)")


def build(active, variables):
    """Builds every instrument (their state) for `variables`; returns `active`. Names must be
    unique: they key the checkpointed state."""
    names = [i.name for i in active]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"instrument {repeated[0]!r} is on twice")
    for instrument in active:
        instrument.build(variables)
    return active


def needs(active):
    """The union of what the instruments need from the step (a frozenset of `NEEDS`)."""
    out = frozenset()
    for instrument in active:
        out |= instrument.needs
    return out


def compute(active, measurement):
    """`{tag: tensor}` of all instruments that apply to the measured batch."""
    out = {}
    for instrument in active:
        if applies(instrument, measurement.moments.batch_size):
            out.update(instrument.compute(measurement))
    return out


def finite_only(active, names):
    """The tags that are written only when finite."""
    return frozenset(tag for i in active if i.finite_only for tag in i.tags(names))


def tag_kinds(active, names):
    """`(scalar tags, histogram tags)` that the instruments can write, each in order (image
    tags are in neither: see `images`)."""
    scalars, histograms = [], []
    for instrument in active:
        for tag in instrument.tags(names):
            if tag not in instrument.images:
                (histograms if tag in instrument.histograms else scalars).append(tag)
    return scalars, histograms


def images(active):
    """`{tag: shape}` of the instruments' image tags."""
    return {tag: shape for i in active for tag, shape in i.images.items()}


def histogram_bins(active):
    """`{tag: bins}` of the histograms the instruments give as rows of fixed bins."""
    return {tag: bins for i in active for tag, bins in i.bins.items()}


def lags(active):
    """`{tag: k}`: tags written k steps before the step that computed them."""
    return {tag: k for i in active for tag, k in i.lags.items()}


def width(active):
    """Consecutive statistics steps per schedule period: 2 when an instrument is two-step."""
    return 2 if any(i.two_step for i in active) else 1


def summaries(active):
    """The `Summary` entries of all instruments, in order."""
    return [s for instrument in active for s in instrument.summaries]


def charts(active, names):
    """The `Chart`s of all instruments, in order."""
    return [c for instrument in active for c in instrument.charts(names)]


def state(active):
    """`{instrument name: {state name: tf.Variable}}` for the checkpoint."""
    return {i.name: dict(i.state()) for i in active if i.state()}


from tfmbgd.instruments.cockpit import Cockpit  # noqa: E402,F401  (uses this module)
