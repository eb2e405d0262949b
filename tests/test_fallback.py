"""The layer-wise method's fallback never takes the process down (`gradients.unvectorized`):
KerasHub's transformers, on which `tf.vectorized_map` killed the process (SIGSEGV), run
their statistics in a child process — by "auto", and with every variable forced onto the
fallback — exit 0, and give the moments of the single-example loop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import user_env

pytest.importorskip("keras_hub")
HERE = Path(__file__).resolve().parent


@pytest.mark.slow     # a child process per run, so that a crash is an exit code, not a dead suite
def test_keras_hub_transformers_take_the_fallback_and_live():
    names = ["gpt2", "bert", "gemma", "llama"]
    done = subprocess.run([sys.executable, str(HERE / "keras_hub_models.py"), *names],
                          env=user_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["model"]: row for row in map(json.loads, done.stdout.strip().splitlines())}
    assert set(rows) == set(names)
    # every variable takes the rules (position embeddings: Slice and BroadcastTo; Gemma's
    # attention kernels: Transpose before the product, its norms' 1 + scale); the forced
    # run puts them all on the fallback
    assert all(row["fallback"] == [] for row in rows.values())
    for name, row in rows.items():
        assert row["vectorized"].startswith("refused: ") and "method vectorized" in row["vectorized"], name
        for how in ("auto", "auto in tf.function", "forced fallback"):
            assert row[how] < 1e-5, (name, how, row[how])       # float32 round-off


def test_the_fallback_is_not_vectorized(monkeypatch):
    # The fallback must not reach tf.vectorized_map (pfor) at all.
    import keras
    import tensorflow as tf
    from test_layerwise import FALLBACK, make

    from tfmbgd.engine import layerwise
    from tfmbgd.engine.moments import gradient_moments

    def refuse(*args, **kwargs):
        raise AssertionError("tf.vectorized_map was called")
    monkeypatch.setattr(tf, "vectorized_map", refuse)
    model, loss_fn, x, y = make(FALLBACK[0])         # a Dense scaled by exp(w): no rule for Exp
    assert any(layerwise.coverage(model).values())
    oracle = gradient_moments(model, loss_fn, x, y, method="loop")
    got = gradient_moments(model, loss_fn, x, y, method="auto")
    for a, b in zip(got.var_norms_sq + got.sum_sq, oracle.var_norms_sq + oracle.sum_sq):
        assert abs(float(tf.reduce_max(tf.abs(a - b)))) <= 1e-10 * max(1.0, float(tf.reduce_max(tf.abs(b))))
    keras.backend.clear_session()       # layer names count from zero again for test_layerwise's checks



def test_method_vectorized_is_refused_on_attention_layers_and_jacobian_matches_the_loop():
    # tf.vectorized_map has killed the process on Keras' MultiHeadAttention and on every
    # KerasHub transformer tried: the method is refused with one line before any pfor runs.
    import keras
    from keras_hub_models import largest_difference  # scaled per kind: the key bias's gradient is 0
    from test_layerwise import make

    from tfmbgd.engine.moments import gradient_moments
    from tfmbgd.errors import UserError

    def build():
        inputs = keras.Input((4, 3))
        h = keras.layers.MultiHeadAttention(2, 2)(inputs, inputs)
        return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    model, loss_fn, x, y = make(dict(build=build, loss="crossentropy"))
    with pytest.raises(UserError, match="multi_head_attention.*: method vectorized .* use method auto"):
        gradient_moments(model, loss_fn, x, y, method="vectorized")
    oracle = gradient_moments(model, loss_fn, x, y, method="loop")
    assert largest_difference(gradient_moments(model, loss_fn, x, y, method="jacobian"), oracle) < 1e-10
    assert largest_difference(gradient_moments(model, loss_fn, x, y, method="auto"), oracle) < 1e-10
