"""The package's version, a leaf: `tfmbgd.__version__`, `--version` and setup.cfg read it."""

__version__ = "0.1.0"
