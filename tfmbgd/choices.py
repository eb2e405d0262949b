"""The vocabulary of tfmbgd's settings: methods, reductions, strategies, ...

Shared by `TrainConfig` (which validates a run's settings before TensorFlow starts) and
the library that acts on them (`tfmbgd.engine`, `tfmbgd.loop`), so that neither imports
the other for a word. No imports: a leaf.
"""

DATASETS = ("digits", "linear", "mnist", "fashion_mnist")  # plus "npz:PATH"
MODELS = ("linear", "mlp", "cnn")
REDUCTIONS = ("mean", "sum")
UPDATES = ("manual", "custom", "keras")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam")
GRAD_METHODS = ("auto", "layerwise", "vectorized", "jacobian", "loop")
MODES = ("train", "compare", "critical_batch")
LR_SCALINGS = ("none", "linear", "sqrt")
STRATEGIES = ("default", "mirrored", "multi_worker")
PRECISIONS = ("none", "mixed_bfloat16", "mixed_float16")      # Keras dtype policies
ON_NONFINITE = ("stop", "skip")
