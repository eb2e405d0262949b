"""The instruments known by name: the registry, the defaults of a run, Cockpit's presets."""

from tfmbgd.choices import PRESETS
from tfmbgd.errors import UserError
from tfmbgd.instruments.batch_size import BatchSize
from tfmbgd.instruments.curvature import HessMaxEV, HessTrace, TICDiag, TICTrace
from tfmbgd.instruments.gradient_tests import InnerTest, NormTest, OrthoTest
from tfmbgd.instruments.gsnr import MeanGSNR, MeanGSNRBiased
from tfmbgd.instruments.hists import GradHist1d, GradHist2d
from tfmbgd.instruments.noise_scale import HessianNoiseScale, NoiseScale, TwoBatchNoiseScale
from tfmbgd.instruments.norms import GradientNorm, PerExampleNorms
from tfmbgd.instruments.sgd import CABS, EarlyStopping
from tfmbgd.instruments.trajectory import Alpha, Distance, UpdateSize
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
            HessTrace, HessMaxEV, TICDiag, TICTrace, GradHist1d, GradHist2d, HessianNoiseScale)
for _cls in BUILT_IN:
    register(_cls)

# Cockpit's three configurations are in `tfmbgd.choices` (BUSINESS, ECONOMY, FULL, PRESETS),
# where train.py reads them before TensorFlow starts.


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
    """Instances of the registered instruments `names` (presets expanded) for a run with
    `learning_rate` and `optimizer` (each class's `for_run`); `Panel.for_run` checks them
    against the optimizer.

    Raises:
      UserError: an unknown name.
    """
    names = expand(names)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown instrument {unknown[0]!r}; presets: {', '.join(PRESETS)}; registered: "
                        f"{', '.join(sorted(REGISTRY))} (tfmbgd.instruments.register adds one)")
    return [REGISTRY[n].for_run(learning_rate=learning_rate, optimizer=optimizer) for n in names]
