"""Train a small network by mini-batch gradient descent and watch its gradients in TensorBoard.

The same as `python -m tfmbgd` (and the `tfmbgd` command an installed package has): this
file is kept so that the README's `python train.py` works in a clone. See `--help`.
"""

import sys

from tfmbgd.app.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
