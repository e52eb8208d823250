"""The package version, read by run folders (env.json) and exported as ``metagate.__version__``."""

__version__ = "0.1.0"
