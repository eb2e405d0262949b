"""`python -m tfmbgd`: the main job, as `train.py` runs it (`tfmbgd.app.main`)."""

import sys

from tfmbgd.app.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
