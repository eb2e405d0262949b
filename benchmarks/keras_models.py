"""The models Keras users load, measured: `keras.applications` and KerasHub backbones built
from their constructors (small inputs, random weights, nothing downloaded), each with a
`Dense(10)` head.

    python benchmarks/keras_models.py            # about five minutes on 2 cores
    python benchmarks/keras_models.py --quick    # shorter timing budgets

Per model: the variables the layer-wise rules take, the largest difference of the moments
to an independent oracle (relative to the largest value of that kind of moment), and the
cost of a statistics step (norm and elementwise tiers, `method="auto"`, with the default
instruments) as the ratio of medians to a plain step, interleaved in one process. The
oracle is the single-example loop; for a network with BatchNormalization in training mode
the loop measures something else (each example normalized by itself), so there the
contributions' mean is checked against Keras' own batch gradient (float32). Dropout is
turned off (rate 0) in EfficientNet, so that two forward passes can be compared.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))     # keras_hub_models.py
sys.path.insert(0, HERE)                                  # step_cost.py

BATCH = 8


def applications():
    import keras

    common = dict(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    return {
        "VGG16": lambda: keras.applications.VGG16(**common),
        "ConvNeXtTiny": lambda: keras.applications.ConvNeXtTiny(include_preprocessing=False, **common),
        "ResNet50": lambda: keras.applications.ResNet50(**common),
        "MobileNetV2": lambda: keras.applications.MobileNetV2(alpha=0.35, **common),
        "EfficientNetB0": lambda: keras.applications.EfficientNetB0(**common),
    }


def make(name):
    """`(model, x, y)` of the benchmark's model `name`."""
    import keras
    import keras_hub_models
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if name in applications():
        model = applications()[name]()
        for layer in model.layers:       # EfficientNet's dropout and drop-connect: off, so that
            if isinstance(layer, keras.layers.Dropout):     # two forward passes compare
                layer.rate = 0.0
        x = rng.uniform(size=(BATCH, 32, 32, 3)).astype(np.float32)
        return model, x, rng.integers(0, 10, BATCH).astype(np.int32)
    return keras_hub_models.make(name)


NAMES = ["VGG16", "ConvNeXtTiny", "ResNet50", "MobileNetV2", "EfficientNetB0",
         "gpt2", "bert", "gemma", "llama"]


def difference(model, x, y):
    """`(how, largest relative difference)` to the oracle (see the module)."""
    import keras_hub_models
    import numpy as np
    import tensorflow as tf

    from tfmbgd import losses
    from tfmbgd.engine import layerwise
    from tfmbgd.engine.moments import gradient_moments

    m = gradient_moments(model, losses.crossentropy, x, y, method="auto")
    if not layerwise.batch_norms(model):
        oracle = gradient_moments(model, losses.crossentropy, x, y, method="loop")
        return "loop", keras_hub_models.largest_difference(m, oracle)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.crossentropy(y, model(x, training=True)))
    grads = [np.asarray(tf.convert_to_tensor(g)) for g in tape.gradient(loss, model.trainable_variables)]
    scale = max(float(np.max(np.abs(g))) for g in grads)
    return "mean vs Keras' gradient", max(float(np.max(np.abs(np.asarray(a) - g))) / scale
                                          for a, g in zip(m.mean, grads))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing budgets")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per ratio")
    parser.add_argument("models", nargs="*", help=f"some of {', '.join(NAMES)}")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import step_cost
    import tensorflow as tf

    from tfmbgd.engine import layerwise

    budget = 2.0 if args.quick else args.budget
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; B={BATCH}, 32x32x3 images or 16 "
          "tokens; ratios = median statistics step / median plain step, interleaved\n")
    print("| model | variables by the rules | BatchNorm layers (training) | oracle | largest difference | "
          "plain step | norm tier | elementwise tier | rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models or NAMES:
        model, x, y = make(name)
        cover = layerwise.coverage(model, x)
        how, diff = difference(model, x, y)
        tx, ty = step_cost.as_tensors(x, y)
        plain = step_cost.steps_for(model).plain
        norm = step_cost.steps_for(model, "auto", False).with_stats
        elem = step_cost.steps_for(model, "auto", True).with_stats
        (t_plain, t_norm, t_elem), rounds = step_cost.interleaved(
            [lambda fn=fn, tx=tx, ty=ty: step_cost.call(fn, tx, ty) for fn in (plain, norm, elem)], budget)
        print(f"| {name} | {sum(w is None for w in cover.values())} of {len(cover)} | "
              f"{len(layerwise.batch_norms(model))} | {how} | {diff:.1e} | {t_plain * 1e3:.1f} ms | "
              f"{t_norm / t_plain:.2f}x | {t_elem / t_plain:.2f}x | {rounds} |", flush=True)


if __name__ == "__main__":
    main()
