"""Instruments: the statistics of a statistics step, one module each.

Every statistic is an `Instrument` (see `tfmbgd.instruments.base`): what it needs from
the step, its maths, its tags and charts, its study summary and its state. A run's or a
fit's active set is one `Panel` (`panel.py`); `registry.py` knows them by name. The
built-ins (the first seven are on by default; the rest by name or preset):

| instrument | module | tags |
|---|---|---|
| `grad_norm` | `norms` | `grad/norm`, `grad/norm/<path>` |
| `variance` | `variance` | `grad_var/trace`, `grad_var/<path>`, `grad_var/of_mean[/<path>]` |
| `gsnr` | `gsnr` | `grad_snr/mean_gsnr` (with the elementwise tier) |
| `noise_scale` | `noise_scale` | `noise_scale/simple` |
| `two_batch` | `noise_scale` | `noise_scale/two_batch` (several replicas) |
| `per_example_norms` | `norms` | `per_example_grad_norm` (histogram) |
| `batch_size` | `batch_size` | `batch_size` |
| `gsnr_biased` | `gsnr` | `grad_snr/mean_gsnr_biased`, Cockpit's MeanGSNR (elementwise) |
| `update_size` | `trajectory` | `step/update_size[/<path>]`: norm of the update applied |
| `distance` | `trajectory` | `step/distance[/<path>]`: distance from the initial weights |
| `alpha` | `trajectory` | `step/alpha`: Cockpit's noise-aware quadratic fit (two-step) |
| `norm_test` | `gradient_tests` | `grad_test/norm` |
| `inner_test` | `gradient_tests` | `grad_test/inner` |
| `ortho_test` | `gradient_tests` | `grad_test/ortho` |
| `cabs` | `sgd` | `batch_size/cabs`: CABS's batch size (plain SGD only) |
| `eb` | `sgd` | `early_stopping/eb`: the EB criterion (plain SGD only, elementwise) |
| `hess_trace` | `curvature` | `curvature/hess_trace[/<path>]` (Hutchinson, MC-GGN or exact) |
| `hess_max_ev` | `curvature` | `curvature/hess_max_ev` (Lanczos) |
| `tic_diag` | `curvature` | `curvature/tic_diag` |
| `tic_trace` | `curvature` | `curvature/tic_trace` |
| `grad_hist` | `hists` | `grad_hist/elements` (fixed-bin histogram) |
| `grad_hist_2d` | `hists` | `grad_hist/elements_vs_params` (an image) |

Presets: `economy`, `business`, `full` (Cockpit's configurations). `register` adds an
instrument (any class with the protocol). `Cockpit`, the driver of one step of a user's
own loop, lives with the loop (`tfmbgd.loop.cockpit`) and is reachable here by its public
name.
"""

import importlib

from tfmbgd.choices import BUSINESS, ECONOMY, FULL, PRESETS  # noqa: F401
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
from tfmbgd.instruments.batch_size import BatchSize  # noqa: F401
from tfmbgd.instruments.curvature import HessMaxEV, HessTrace, TICDiag, TICTrace  # noqa: F401
from tfmbgd.instruments.gradient_tests import InnerTest, NormTest, OrthoTest  # noqa: F401
from tfmbgd.instruments.gsnr import MeanGSNR, MeanGSNRBiased  # noqa: F401
from tfmbgd.instruments.hists import GradHist1d, GradHist2d  # noqa: F401
from tfmbgd.instruments.noise_scale import NoiseScale, TwoBatchNoiseScale  # noqa: F401
from tfmbgd.instruments.norms import GradientNorm, PerExampleNorms  # noqa: F401
from tfmbgd.instruments.panel import ONE_DEVICE, Panel  # noqa: F401
from tfmbgd.instruments.registry import (  # noqa: F401
    BUILT_IN,
    REGISTRY,
    create,
    default,
    expand,
    register,
)
from tfmbgd.instruments.sgd import CABS, EarlyStopping  # noqa: F401
from tfmbgd.instruments.trajectory import Alpha, Distance, UpdateSize  # noqa: F401
from tfmbgd.instruments.variance import VarianceTrace  # noqa: F401


def __getattr__(name):
    # `tfmbgd.instruments.Cockpit`, the public name of the loop's driver: looked up when
    # used, so that the instruments never import the loop that drives them.
    if name == "Cockpit":
        return importlib.import_module("tfmbgd.loop.cockpit").Cockpit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
