"""metagate: continual learning with context-dependent gating.

The library in two names (:mod:`metagate.api`): ``metagate.run(config, out=...)`` trains an experiment and returns
its results; ``metagate.load_runs(folder)`` reads finished run folders. They are imported on first use, so
``import metagate`` (and ``metagate --help``) stays fast.
"""

from typing import Any

from metagate._version import __version__
__all__ = ["__version__", "load_runs", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "load_runs"):
        from metagate import api

        return getattr(api, name)
    raise AttributeError(f"module 'metagate' has no attribute {name!r}")
