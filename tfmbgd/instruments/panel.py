"""`Panel`: the active instruments of a run or a `fit`, as one object.

Every driver of a statistics step (the custom loop, the XLA runner, `fit`, `Cockpit`)
asks the same questions of its instruments: what the step must compute (`needs`), which
tags they write and of what kind (`buffer_spec`), which are written late (`lags`) or only
when finite (`finite_only`), whether the step after a statistics step measures too
(`width`), their state for the checkpoint, their charts and study columns. The Panel
answers them once, made once per run (`for_run`) or per fit (`for_optimizer`), and
`compute` runs the instruments on a `Measurement`.
"""

import keras

from tfmbgd.errors import UserError
from tfmbgd.instruments import registry
from tfmbgd.instruments.base import BATCH, DOTS, applies
from tfmbgd.optimizers import MiniBatchSGD

# What the step provides on one device only: the per-example forms and the batch itself are
# not merged across replicas yet.
ONE_DEVICE = frozenset({DOTS, BATCH})


def refuse_on_replicas(names):
    """A `UserError` naming what is not computed across replicas yet (`names`), if any."""
    if names:
        raise UserError(f"{', '.join(names)}: not computed across replicas yet; run on one device "
                        "(norm_test, update_size and distance work across replicas)")


class Panel:
    """The instruments `active` (instances of `tfmbgd.instruments.Instrument`), built for
    the model's variables by `build`. Iterating gives the instruments in order."""

    def __init__(self, active=()):
        self.active = list(active)
        self.paths = None            # the variables' paths, once built

    @classmethod
    def for_run(cls, names=(), *, elementwise=False, noise_scale_decay=0.9, learning_rate=None,
                optimizer="sgd"):
        """The instruments of a `train.py` run: the defaults (`registry.default`) and the
        registered instruments `names` (presets expanded), made for its `learning_rate` and
        `optimizer` (a name of `TrainConfig.optimizer`).

        Raises:
          UserError: an unknown name, or an instrument defined for plain SGD in a run with
            another optimizer.
        """
        active = registry.default(elementwise, noise_scale_decay) + registry.create(
            names, learning_rate, optimizer)
        return cls(active)._sgd_checked(optimizer == "sgd", f"--optimizer={optimizer}")

    @classmethod
    def for_optimizer(cls, optimizer, more=(), *, elementwise=False, noise_scale_decay=0.9):
        """The instruments of a `fit` or a `Cockpit` with the Keras `optimizer`: the
        defaults, then `more` (names, presets and instances), each name made for the
        optimizer's learning rate.

        Raises:
          UserError: as `for_run`; the optimizer's class names it.
        """
        sgd, what = _plain_sgd(optimizer), type(optimizer).__name__
        named = [n for n in more if isinstance(n, str)]
        active = (registry.default(elementwise, noise_scale_decay)
                  + registry.create(named, _learning_rate(optimizer), "sgd" if sgd else what)
                  + [i for i in more if not isinstance(i, str)])
        return cls(active)._sgd_checked(sgd, what)

    def _sgd_checked(self, plain_sgd, what):
        for instrument in self.active:
            if instrument.sgd_only and not plain_sgd:
                raise UserError(f"instrument {instrument.name} is defined for plain SGD only (as in "
                                f"Cockpit); the run has {what}: use SGD without momentum, or drop the "
                                "instrument")
        return self

    def __iter__(self):
        return iter(self.active)

    def __len__(self):
        return len(self.active)

    def build(self, variables):
        """Builds every instrument's state for `variables` (under the run's strategy scope);
        returns the panel. Names must be unique: they key the checkpointed state."""
        names = [i.name for i in self.active]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"instrument {repeated[0]!r} is on twice")
        for instrument in self.active:
            instrument.build(variables)
        self.paths = [v.path for v in variables]
        return self

    def refuse_replicas(self, on_replicas):
        """A `UserError` naming the instruments that need what the step has on one device only
        (`ONE_DEVICE`), when the run is `on_replicas`."""
        if on_replicas:
            refuse_on_replicas([i.name for i in self.active if i.needs & ONE_DEVICE])

    @property
    def needs(self):
        """The union of what the instruments need from the step (a frozenset of `NEEDS`)."""
        return frozenset().union(*(i.needs for i in self.active))

    @property
    def width(self):
        """Consecutive statistics steps per schedule period: 2 when an instrument is two-step."""
        return 2 if any(i.two_step for i in self.active) else 1

    def two_step(self):
        """The panel of the two-step instruments alone (the same instances): what an end step,
        the one after a statistics step, computes."""
        part = Panel([i for i in self.active if i.two_step])
        part.paths = self.paths
        return part

    def compute(self, measurement, before_update=False):
        """`{tag: tensor}` of the instruments that apply to the measured batch and run
        `before_update` (curvature, at the weights measured) or after it (the others)."""
        out = {}
        for instrument in self.active:
            if instrument.before_update == before_update and applies(instrument,
                                                                     measurement.moments.batch_size):
                out.update(instrument.compute(measurement))
        return out

    def compute_all(self, measurement):
        """`{tag: tensor}` of every instrument that applies, whenever it runs (for statistics
        of moments alone, with no update between)."""
        return {**self.compute(measurement, True), **self.compute(measurement, False)}

    def _tags(self):
        if self.paths is None:
            raise UserError("the instruments' tags are known once the panel is built for the variables")
        return [(i, tag) for i in self.active for tag in i.tags(self.paths)]

    @property
    def descriptions(self):
        """`{tag: text}`: what each tag of the instruments measures (their `tags()`), written
        as TensorBoard's description beside each chart."""
        return {tag: text for i in self.active for tag, text in i.tags(self.paths).items() if text}

    @property
    def finite_only(self):
        """The tags that are written only when finite."""
        return frozenset(tag for i, tag in self._tags() if i.finite_only)

    @property
    def lags(self):
        """`{tag: k}`: tags written k steps before the step that computed them."""
        return {tag: k for i in self.active for tag, k in i.lags.items()}

    def buffer_spec(self):
        """What a `StatisticsBuffer` needs to hold the instruments' values: `scalar_tags`,
        `histogram_tags` (each in order), `widths` (`{tag: bins}` of fixed-bin histograms)
        and `images` (`{tag: shape}`)."""
        scalars, histograms = [], []
        for i, tag in self._tags():
            if tag not in i.images:
                (histograms if tag in i.histograms else scalars).append(tag)
        return dict(scalar_tags=scalars, histogram_tags=histograms,
                    widths={tag: bins for i in self.active for tag, bins in i.bins.items()},
                    images={tag: shape for i in self.active for tag, shape in i.images.items()})

    def summaries(self):
        """The `Summary` entries of all instruments (a study's columns), in order."""
        return [s for i in self.active for s in i.summaries]

    def charts(self, paths=None):
        """The `Chart`s of all instruments, in order, for the variables' `paths` (default the
        built panel's)."""
        paths = self.paths if paths is None else paths
        return [c for i in self.active for c in i.charts(paths)]

    def state(self):
        """`{instrument name: {state name: tf.Variable}}` for the checkpoint."""
        return {i.name: dict(i.state()) for i in self.active if i.state()}


def _learning_rate(optimizer):
    """The Keras optimizer's learning rate as a float, or None (a schedule)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except (TypeError, ValueError):
        return None


def _plain_sgd(optimizer):
    """Whether `optimizer` is plain SGD: tfmbgd's MiniBatchSGD itself, or Keras' SGD without
    momentum (a LossScaleOptimizer is looked through)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if type(optimizer) is MiniBatchSGD:
        return True
    return type(optimizer) is keras.optimizers.SGD and not optimizer.momentum and not optimizer.nesterov
