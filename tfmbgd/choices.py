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

# The built-in instruments by name (`tfmbgd.instruments.registry` registers their classes;
# a test checks the two agree), and Cockpit's three configurations
# (`cockpit.utils.configuration`) by the names tfmbgd adds to its defaults, which already
# log the loss and the gradient norm. Here so that train.py checks --instruments and
# prints them in --help before TensorFlow starts.
INSTRUMENTS = ("alpha", "batch_size", "cabs", "distance", "eb", "grad_hist", "grad_hist_2d", "grad_norm",
               "gsnr", "gsnr_biased", "hess_max_ev", "hess_trace", "hessian_noise_scale", "inner_test",
               "noise_scale", "norm_test", "ortho_test", "per_example_norms", "tic_diag", "tic_trace",
               "two_batch", "update_size", "variance")
ECONOMY = ("alpha", "distance", "grad_hist", "inner_test", "norm_test", "ortho_test", "update_size")
BUSINESS = ECONOMY + ("tic_diag", "hess_trace")
FULL = BUSINESS + ("hess_max_ev", "grad_hist_2d")
PRESETS = {"economy": ECONOMY, "business": BUSINESS, "full": FULL}
