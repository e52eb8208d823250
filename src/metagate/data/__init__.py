"""Benchmarks: named builders ``(config, seed) -> Stream``."""

from __future__ import annotations

from typing import Protocol

from metagate.config import BenchmarkConfig
from metagate.data.stream import Scenario, Stream, Task
from metagate.registry import Registry


class Benchmark(Protocol):
    Config: type[BenchmarkConfig]

    @staticmethod
    def build(cfg: BenchmarkConfig, seed: int) -> Stream: ...


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")


def build_stream(cfg: BenchmarkConfig, seed: int) -> Stream:
    """The stream a benchmark config describes (deterministic in ``seed``)."""
    return BENCHMARKS.get(cfg.name).build(cfg, seed)


# Importing the modules fills the registry.
from metagate.data import synthetic  # noqa: E402,F401
from metagate.data import images  # noqa: E402,F401

__all__ = ["BENCHMARKS", "Benchmark", "Scenario", "Stream", "Task", "build_stream"]
