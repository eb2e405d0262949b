"""KerasHub transformers built from their constructors, small and without dropout (nothing
downloaded), each with a `Dense(10)` head on its first token: for the tests of the
fallback, which run them in a child process (`python tests/keras_hub_models.py`).

Run as a script, it computes every model's moments by method "auto", by "auto" with every
variable forced onto the fallback (no rule at all), eagerly and in `tf.function`, and by
the single-example loop (the oracle), and prints one JSON line per model with the largest
relative difference to the oracle, and whether method "vectorized" was refused (it has
crashed the process on these models). A crash is a non-zero exit.
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf

SEQUENCE, VOCABULARY, BATCH = 16, 50, 8


def backbones():
    import keras_hub
    return {
        "gpt2": lambda: keras_hub.models.GPT2Backbone(
            vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
            max_sequence_length=SEQUENCE, dropout=0.0),
        "bert": lambda: keras_hub.models.BertBackbone(
            vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
            max_sequence_length=SEQUENCE, dropout=0.0),
        "gemma": lambda: keras_hub.models.GemmaBackbone(
            vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=16, intermediate_dim=32, head_dim=8),
        "llama": lambda: keras_hub.models.LlamaBackbone(
            vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=16, intermediate_dim=32),
    }


def make(name, seed=0, batch=BATCH):
    """`(model, x, y)`: the backbone `name` with a Dense(10) head, and `batch` sequences of token
    ids."""
    keras.utils.set_random_seed(seed)
    backbone = backbones()[name]()
    inputs = {key: keras.Input((SEQUENCE,), dtype="int32", name=key) for key in backbone.input}
    hidden = backbone(inputs)
    hidden = hidden["sequence_output"] if isinstance(hidden, dict) else hidden
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden[:, 0]))
    rng = np.random.default_rng(seed)
    x = {key: (rng.integers(0, VOCABULARY, (batch, SEQUENCE)) if key == "token_ids"
               else np.ones((batch, SEQUENCE)) if key == "padding_mask"
               else np.zeros((batch, SEQUENCE))).astype(np.int32) for key in inputs}
    return model, x, rng.integers(0, 10, batch).astype(np.int32)


def largest_difference(m, oracle):
    """The largest difference of any moment to the oracle's, relative to the largest value of
    that kind of moment (mean, sum of squares, per-example norms) over all variables: some
    are zero up to round-off (attention's key bias: softmax ignores a shift shared by all
    logits), so each tensor's own scale would be noise."""
    out = 0.0
    kinds = ((m.mean, oracle.mean), (m.sum_sq, oracle.sum_sq), (m.var_norms_sq, oracle.var_norms_sq))
    for got, want in kinds:
        scale = max(float(np.max(np.abs(np.asarray(w)))) for w in want) or 1.0
        out = max([out] + [float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) / scale
                           for g, w in zip(got, want)])
    return out


def check(name):
    """The JSON row of one model (see the module)."""
    from tfmbgd import losses, stats
    from tfmbgd.engine import layerwise, rules
    from tfmbgd.errors import UserError

    loss_fn = losses.crossentropy
    model, x, y = make(name)
    oracle = stats.gradient_moments(model, loss_fn, x, y, method="loop")
    fallback = [p for p, why in layerwise.coverage(model, x).items() if why]
    row = dict(model=name, variables=len(model.trainable_variables), fallback=fallback)
    row["auto"] = largest_difference(stats.gradient_moments(model, loss_fn, x, y, method="auto"), oracle)
    traced = tf.function(lambda x, y: stats.gradient_moments(model, loss_fn, x, y, method="auto"))
    row["auto in tf.function"] = largest_difference(traced(x, y), oracle)
    try:                               # refused before TensorFlow's pfor can take the process down
        stats.gradient_moments(model, loss_fn, x, y, method="vectorized")
        row["vectorized"] = "ran"
    except UserError as e:
        row["vectorized"] = f"refused: {e}"
    saved = dict(rules.RULES)
    rules.RULES.clear()                # every variable on the fallback
    try:
        forced = tf.function(lambda x, y: stats.gradient_moments(model, loss_fn, x, y, method="auto"))
        row["forced fallback"] = largest_difference(forced(x, y), oracle)
    finally:
        rules.RULES.update(saved)
    return row


if __name__ == "__main__":
    for name in sys.argv[1:] or list(backbones()):
        print(json.dumps(check(name)), flush=True)
