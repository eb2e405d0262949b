"""The Panel (`tfmbgd.instruments.panel`): a run's active instruments as one object. Each
answer is checked against what the instruments themselves declare, read here one by one."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import PROBLEMS, make_problem
from tfmbgd import instruments, optimizers
from tfmbgd.errors import UserError
from tfmbgd.instruments import Panel
from tfmbgd.loop import steps


def _built(names, problem=None):
    model, loss_fn, x, y = make_problem(problem or PROBLEMS[1])
    panel = Panel.for_run(names).build(model.trainable_variables)
    return panel, model, loss_fn, tf.constant(x), tf.constant(y)


def test_for_run_is_the_defaults_then_the_named_ones_in_order():
    panel = Panel.for_run(["economy", "hess_trace"], elementwise=True, learning_rate=0.05)
    want = [i.name for i in instruments.default(True)] + list(instruments.ECONOMY) + ["hess_trace"]
    assert [i.name for i in panel] == want
    cabs = next(i for i in Panel.for_run(["cabs"], learning_rate=0.05) if i.name == "cabs")
    assert cabs.learning_rate == 0.05
    with pytest.raises(UserError, match="cabs is defined for plain SGD only.*--optimizer=adam"):
        Panel.for_run(["cabs"], learning_rate=0.1, optimizer="adam")


@pytest.mark.parametrize("optimizer, plain", [
    (lambda: optimizers.MiniBatchSGD(0.1), True),
    (lambda: keras.optimizers.SGD(0.1), True),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9), False),
    (lambda: keras.optimizers.Adam(0.1), False),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), True),
], ids=["minibatch_sgd", "keras_sgd", "momentum", "adam", "loss_scale_sgd"])
def test_for_optimizer_takes_the_learning_rate_and_refuses_sgd_only_instruments(optimizer, plain):
    if plain:
        panel = Panel.for_optimizer(optimizer(), ["cabs", instruments.NormTest()])
        assert [i.name for i in panel][-2:] == ["cabs", "norm_test"]
        assert next(i for i in panel if i.name == "cabs").learning_rate == pytest.approx(0.1)
    else:
        with pytest.raises(UserError, match="cabs is defined for plain SGD only"):
            Panel.for_optimizer(optimizer(), ["cabs"])


def test_needs_width_lags_and_two_step_are_the_instruments_own():
    panel, *_ = _built(["full"])
    active = list(panel)
    union = set()
    for i in active:
        union |= set(i.needs)
    assert panel.needs == frozenset(union)
    assert panel.width == 2 and any(i.two_step for i in active)
    assert Panel.for_run().width == 1
    assert panel.lags == {"step/alpha": 1}
    ends = panel.two_step()
    assert [i.name for i in ends] == [i.name for i in active if i.two_step] == ["alpha"]
    assert ends.active[0] is next(i for i in active if i.name == "alpha") and ends.paths == panel.paths


def test_buffer_spec_sorts_every_declared_tag_by_its_kind():
    panel, model, *_ = _built(["full"])
    paths = [v.path for v in model.trainable_variables]
    spec = panel.buffer_spec()
    for i in panel:
        for tag in i.tags(paths):
            kind = ("images" if tag in i.images else
                    "histogram_tags" if tag in i.histograms else "scalar_tags")
            assert tag in spec[kind], (i.name, tag)
    assert spec["widths"] == {"grad_hist/elements": 100}
    assert spec["images"] == {"grad_hist/elements_vs_params": (1, 160, 200, 3)}
    assert set(spec["scalar_tags"]).isdisjoint(spec["histogram_tags"])
    assert panel.finite_only == {tag for i in panel if i.finite_only for tag in i.tags(paths)}
    with pytest.raises(UserError, match="once the panel is built"):
        Panel.for_run().buffer_spec()


def test_compute_splits_before_and_after_the_update():
    panel, model, loss_fn, x, y = _built(["hess_trace", "norm_test"])
    measured = steps.measure(model, loss_fn, x, y, needs=panel.needs)
    measurement = steps.measurement(measured, model.trainable_variables, step=tf.constant(0, tf.int64),
                                    batch=(model, loss_fn, x, y))
    early = panel.compute(measurement, before_update=True)
    late = panel.compute(measurement)
    assert set(early) == {t for t in early if t.startswith("curvature/hess_trace")} and early
    assert "grad_test/norm" in late and "grad/norm" in late and not set(early) & set(late)
    both = panel.compute_all(measurement)
    assert set(both) == set(early) | set(late)
    np.testing.assert_allclose(float(both["grad/norm"]), float(late["grad/norm"]), rtol=1e-6)


def test_refuse_replicas_names_the_one_device_instruments():
    panel = Panel.for_run(["alpha", "norm_test", "hess_trace"])
    panel.refuse_replicas(False)
    with pytest.raises(UserError, match="^alpha, hess_trace: not computed across replicas yet"):
        panel.refuse_replicas(True)
    Panel.for_run(["norm_test", "update_size", "distance"]).refuse_replicas(True)
