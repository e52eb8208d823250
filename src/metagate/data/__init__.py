"""Benchmarks, one module per family, registered by name (the interface and registry: :mod:`metagate.data.base`)."""

from metagate.data.base import BENCHMARKS, Benchmark, build_stream
from metagate.data.stream import Scenario, Stream, Task
from metagate.data import composed, images, pairs, synthetic  # noqa: F401  (fill the registry)

__all__ = ["BENCHMARKS", "Benchmark", "Scenario", "Stream", "Task", "build_stream", "list_benchmarks"]


def list_benchmarks(pattern: str = "*") -> list[str]:
    return BENCHMARKS.names(pattern)
