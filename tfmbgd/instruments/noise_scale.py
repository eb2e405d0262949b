"""The gradient noise scale `B_simple = tr(Sigma) / |G|^2` (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training"), smoothed over steps: from one batch's moments,
and, with several replicas, from the mean gradients at two batch sizes; and the
Hessian-aware `B_noise = tr(H Sigma) / G^T H G` from Hessian-vector products
(`tfmbgd.engine.hessian.noise_terms`)."""

import tensorflow as tf

from tfmbgd.engine import hessian
from tfmbgd.errors import UserError
from tfmbgd.instruments.base import (
    BATCH,
    DOTS,
    REPLICA_NORMS,
    Chart,
    Instrument,
    Summary,
    batch_float,
    mean_norms_sq,
)
from tfmbgd.instruments.variance import trace_vector, traces


def noise_scale_terms(m):
    """`(tr(Sigma), |G|^2)`: numerator and denominator of the simple noise scale.

    `|G|^2 = |mean|^2 - tr(Sigma) / B` is the unbiased estimate of the squared norm of the
    true gradient (McCandlish et al. 2018, Appendix A): `E|mean|^2 = |G|^2 + tr(Sigma) / B`.
    It can be negative on a single batch.
    """
    mean_sq = mean_norms_sq(m)
    trace = tf.reduce_sum(trace_vector(m, mean_sq))
    return trace, tf.reduce_sum(mean_sq) - trace / batch_float(m, trace.dtype)


def two_batch_terms(small_sq, big_sq, small, big):
    """`(tr(Sigma), |G|^2)` from mean-gradient norms at two batch sizes (McCandlish et al.
    2018, Appendix A.1).

    With `E|G_b|^2 = |G|^2 + tr(Sigma) / b` for a batch of b, the squared norms at `small`
    (each replica's share, averaged over replicas) and `big` (the global batch) give
    `|G|^2 = (big |G_big|^2 - small |G_small|^2) / (big - small)` and
    `tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/small - 1/big)`: unbiased, and for an
    estimate of `B_simple` smoothed like `NoiseScaleEMA` does.
    """
    grad_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
    return trace, grad_sq


class NoiseScaleEMA:
    """Smoothed simple noise scale `B_simple = tr(Sigma) / |G|^2` over training steps.

    As McCandlish et al. recommend, numerator and denominator are averaged separately
    (exponential moving averages with `decay`) and the ratio is taken last; a ratio of
    single-batch estimates is far too noisy. The EMAs start at 0 without bias correction:
    the correction `1 - decay^t` is the same for both and cancels in the ratio. While the
    averaged `|G|^2` is not positive the noise hides the signal and `B_simple` is
    undefined; `update` then returns infinity.

        ema = NoiseScaleEMA(0.9)
        b_simple = ema.update(*noise_scale_terms(moments))

    Args:
      decay: weight of the past in each update, in [0, 1); 0 means no smoothing.
    """

    def __init__(self, decay=0.9, dtype=tf.float32):
        self.decay = check_decay(decay)
        self.trace = tf.Variable(tf.zeros([], dtype), trainable=False, name="noise_scale_trace")
        self.grad_sq = tf.Variable(tf.zeros([], dtype), trainable=False, name="noise_scale_grad_sq")

    def update(self, trace, grad_sq):
        """Folds in one batch's `noise_scale_terms`; returns the smoothed `B_simple`."""
        d = tf.cast(self.decay, self.trace.dtype)
        self.trace.assign(d * self.trace + (1 - d) * tf.cast(trace, self.trace.dtype))
        self.grad_sq.assign(d * self.grad_sq + (1 - d) * tf.cast(grad_sq, self.trace.dtype))
        return tf.where(self.grad_sq > 0, self.trace / self.grad_sq, float("inf"))


def check_decay(decay):
    """`decay` if it is a number in [0, 1), else a `UserError`."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise UserError(f"noise scale decay must be in [0, 1); got {decay!r}")
    return decay


_CATEGORY = "Noise scale and batch size"


class _Smoothed(Instrument):
    """An instrument whose value is a `NoiseScaleEMA` of two terms per step."""

    finite_only = True        # infinite while the averaged |G|^2 is not positive: undefined

    def __init__(self, decay=0.9):
        self.decay = check_decay(decay)        # now, not when built
        self.ema = None

    def build(self, variables):
        self.ema = NoiseScaleEMA(self.decay)

    def state(self):
        return {"trace": self.ema.trace, "grad_sq": self.ema.grad_sq}


class NoiseScale(_Smoothed):
    """`noise_scale/simple`: `B_simple` from each statistics step's own batch."""

    name = "noise_scale"
    min_batch = 2
    summaries = (Summary("noise_scale/simple", "mean B_simple", "final/mean_noise_scale"),)

    def tags(self, names):
        return {"noise_scale/simple": "smoothed B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018)"}

    def charts(self, names):
        return [Chart(_CATEGORY, "B_simple (smoothed); two_batch: from replicas vs global batch",
                      ("^noise_scale/simple$", "^noise_scale/two_batch$"))]

    def compute(self, measurement):
        _, trace = traces(measurement)
        grad_sq = tf.reduce_sum(measurement.mean_sq) - trace / measurement.b(trace.dtype)
        return {"noise_scale/simple": self.ema.update(trace, grad_sq)}


class TwoBatchNoiseScale(_Smoothed):
    """`noise_scale/two_batch`: `B_simple` from the replicas' shares and the global batch
    (several replicas with even shares only; on one device it computes nothing)."""

    name = "two_batch"
    needs = frozenset({REPLICA_NORMS})

    def tags(self, names):
        return {"noise_scale/two_batch": "smoothed B_simple from the replicas' and the global batch's "
                                         "mean gradients"}

    def compute(self, measurement):
        if measurement.small_sq is None:         # uneven shares: two batch sizes are not defined
            return {}
        m = measurement.moments
        big_sq = tf.reduce_sum(measurement.mean_sq)
        terms = two_batch_terms(measurement.small_sq, big_sq, measurement.replicas.share(m.batch_size),
                                m.batch_size)
        return {"noise_scale/two_batch": self.ema.update(*terms)}


class HessianNoiseScale(_Smoothed):
    """`noise_scale/hessian`: `B_noise = tr(H Sigma) / G^T H G`, the noise scale that predicts
    the critical batch size when the learning rate is tuned (McCandlish et al. 2018; `B_simple`
    is its version with `H` proportional to the identity), smoothed like `B_simple`; and its
    two terms per step, `noise_scale/hessian/tr_h_sigma` and `noise_scale/hessian/g_h_g`.

    Per statistics step, before the update, the Hessian from one half of the batch and the
    covariance and mean gradient from the other (on the same examples they are correlated,
    and the ratio comes out biased; see `hessian.noise_terms`): `samples` Rademacher probes,
    each one Hessian-vector product on the half, the per-example dot products `g_n . v`
    (the `DOTS` need) and one backward pass of the losses weighted by them; one more
    backward pass and one more Hessian-vector product for `G^T H G`. With `samples=1`,
    about five gradients' cost. `G^T H G` is corrected for the noise of the half's mean as
    `|G|^2` is for `B_simple`. Not defined with
    BatchNormalization in training mode (the weighted backward pass is not a sum of the
    examples' contributions there): such a run refuses it."""

    name = "hessian_noise_scale"
    needs = frozenset({BATCH, DOTS})
    before_update = True
    min_batch = 4         # the Hessian on one half of the batch, the covariance on the other
    summaries = (Summary("noise_scale/hessian", "mean B_noise", "final/mean_hessian_noise_scale"),)

    def __init__(self, decay=0.9, samples=1):
        super().__init__(decay)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise UserError(f"hessian_noise_scale samples must be a positive integer; got {samples!r}")
        self.samples = samples

    def tags(self, names):
        return {"noise_scale/hessian": "smoothed B_noise = tr(H Sigma) / G^T H G (McCandlish et al. 2018), "
                                       f"{self.samples} Rademacher probe(s) per step",
                "noise_scale/hessian/tr_h_sigma": "tr(H Sigma) of this batch (H on its first half, Sigma "
                                                  "on its second), Hutchinson's estimator",
                "noise_scale/hessian/g_h_g": "G^T H G of this batch, unbiased: m^T H m - tr(H Sigma) / b "
                                             "(m: the second half's mean gradient, b its size)"}

    def charts(self, names):
        return [Chart(_CATEGORY, "B_noise (Hessian-aware) against B_simple",
                      ("^noise_scale/hessian$", "^noise_scale/simple$"))]

    def compute(self, measurement):
        # Imported here: at the top it would lengthen the import chain past its limit.
        from tfmbgd.engine import layerwise

        model, loss_fn, x, y = measurement.require(BATCH, measurement.batch)
        mixing = layerwise.batch_norms(model)
        if mixing:
            raise UserError("hessian_noise_scale is not defined with BatchNormalization in training mode "
                            f"({', '.join(mixing)}): freeze those layers or leave it out")
        project = measurement.require(DOTS, measurement.project)
        step = measurement.step if measurement.step is not None else tf.constant(0, tf.int64)
        seed = tf.stack([tf.cast(step % 2 ** 30, tf.int32), tf.constant(13, tf.int32)])
        trace, ghg = hessian.hutchinson_noise_terms(model, loss_fn, x, y, project, self.samples, seed)
        trace, ghg = tf.cast(trace, tf.float32), tf.cast(ghg, tf.float32)
        return {"noise_scale/hessian": self.ema.update(trace, ghg),
                "noise_scale/hessian/tr_h_sigma": trace, "noise_scale/hessian/g_h_g": ghg}
