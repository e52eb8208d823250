"""metagate: continual learning with context-dependent gating."""

__version__ = "0.1.0"
