"""The config schema: typed sections every other module builds on (a leaf: imports no registry).

A config has ``seed``, ``benchmark`` (``name`` + the benchmark's fields), ``method`` (``name`` + its
hyperparameters), ``trainer``, optionally ``reference`` (a second method, run on the same stream and
seed) and ``tracking`` (TensorBoard / MLflow logging, off by default; not part of what a run is). Benchmarks and methods subclass :class:`BenchmarkConfig` / :class:`MethodConfig` next to their
code; :mod:`metagate.config` (the loader) resolves ``name`` through the registries and validates.
"""

from __future__ import annotations

import os
import re
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


def _numeric_not_bool(annotation: Any) -> bool:
    """Whether a field's type holds numbers (``int``, ``float`` anywhere in it) but never a ``bool``."""
    def find(a: Any, kinds: tuple[Any, ...]) -> bool:
        return a in kinds or any(find(b, kinds) for b in typing.get_args(a))

    return find(annotation, (int, float)) and not find(annotation, (bool, Any))


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_bool(v) for v in value)
    return False


class Section(BaseModel):
    """Base of every config section: strict about unknown keys, checked on assignment too. A boolean is
    never read as a number (pydantic's lax mode takes ``true`` for 1): ``trainer.epochs=true`` is refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if _has_bool(value) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _numeric_not_bool(field.annotation):
                raise ValueError("must be a number (or a list of numbers), not true/false")
        return value


class NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``): an alias bomb (a few lines that expand to
    gigabytes) cannot reach validation or an error message; a config writes its values out."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"found the alias *{event.anchor}: aliases are not accepted in a metagate config, write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


class NoAliasDumper(yaml.SafeDumper):
    """YAML's safe dumper writing every value out (no ``&id001`` / ``*id001`` for an object met twice), so
    what metagate writes :class:`NoAliasLoader` reads back."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=NoAliasDumper, sort_keys=False)


def load_yaml(text: str, where: str) -> Any:
    """``text`` as YAML (safe, without aliases); a problem is a one-line :class:`ConfigError` naming ``where``."""
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}") from None


class BenchmarkConfig(Section):
    name: str
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of each task's training data held out as its validation split (fixed by the seed)"
    )

    def memory_estimate(self) -> int:
        """Bytes the built stream holds in memory (an estimate made before building it; 0 = unknown)."""
        return 0

    def input_size(self) -> int:
        """Numbers in one input (its flattened size), known before building the stream; 0 = unknown."""
        return int(getattr(self, "input_dim", 0) or 0)


class MethodConfig(Section):
    name: str


def default_threads() -> int:
    """Torch intra-op threads for small models: half the cores, at most 4, at least 1. Small MLPs gain
    little from more threads, and a thread per core slows to a crawl when another process is busy
    (the default run: 16 s with 1 thread, 375-428 s with torch's default 2 on a loaded 2-core machine).
    ``METAGATE_THREADS`` in the environment wins: a sweep sets it to the CPUs each run was given."""
    given = os.environ.get("METAGATE_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, min(4, (os.cpu_count() or 1) // 2))


class TrainerConfig(Section):
    epochs: int = Field(3, ge=1, description="passes over each task's training data")
    iterations_per_task: int = Field(
        0,
        ge=0,
        description="optimiser steps per task, over reshuffled passes of the task's data (the last pass cut short); "
        "0 = trainer.epochs full passes. For methods whose papers count iterations (HyperMask, hnet)",
    )
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (cuda when available)")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads, set once at the start of a run; none = half the cores, at most 4"
    )
    eval_batch_size: int = Field(2048, ge=1)
    log_every: int = Field(0, ge=0, description="steps between loss records in metrics.jsonl; 0 = once per epoch")
    curve_every: int = Field(
        0, ge=0, description="steps between evaluations of the current task (learning curves, steps_to_90); 0 = off"
    )
    progress: bool = Field(True, description="report progress: bars on a terminal, one line per epoch in a log")
    checkpoint: bool = Field(True, description="write a checkpoint after every task")
    compile: bool = Field(
        False,
        description="torch.compile the method's training step (compiled where it traces, eager elsewhere; the same "
        "numbers up to float rounding). Compiling costs tens of seconds on CPU at the start and at each new task: "
        "it pays only for long tasks (docs/speed.md)",
    )
    divergence_factor: float = Field(
        1e4, gt=1, description="stop as diverged when an epoch's mean loss exceeds this multiple of the run's first loss"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be cpu, cuda, cuda:N, mps or auto")
        return value

    def resolved_threads(self) -> int:
        return self.threads if self.threads is not None else default_threads()


URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


class TrackingConfig(Section):
    """Optional experiment tracking (extras ``metagate[tensorboard]``, ``metagate[mlflow]``). Where the
    numbers are sent, not what they are: a run resumed with other tracking settings is the same run."""

    tensorboard: bool = Field(False, description="TensorBoard event files in <run>/tensorboard/")
    mlflow: bool = Field(False, description="log params and metrics to MLflow")
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (sqlite:///path/mlflow.db, http://host:5000, ...); "
        "none = sqlite:///<the run folder's parent>/mlflow.db",
    )
    experiment: str | None = Field(None, description="MLflow experiment; none = the benchmark's name")
    run_name: str | None = Field(None, description="MLflow run name; none = the run folder's path")

    @field_validator("mlflow_uri")
    @classmethod
    def _is_uri(cls, value: str | None) -> str | None:
        if value is not None and not URI_SCHEME.match(value) and value != "databricks":
            raise ValueError("must be a URI such as sqlite:///runs/mlflow.db or http://host:5000 (null = the default store)")
        return value

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow


class ExperimentConfig(Section):
    seed: int = 0
    benchmark: SerializeAsAny[BenchmarkConfig]
    method: SerializeAsAny[MethodConfig]
    trainer: TrainerConfig = TrainerConfig()
    reference: SerializeAsAny[MethodConfig] | list[SerializeAsAny[MethodConfig]] | None = None
    tracking: TrackingConfig = TrackingConfig()

    def reference_config(self) -> "ExperimentConfig | None":
        """The config of the (first) reference run: this one with ``reference`` as its method."""
        refs = self.reference_configs()
        return refs[0] if refs else None

    def reference_configs(self) -> "list[ExperimentConfig]":
        """The configs of every reference run (``reference`` is one method section or a list of them)."""
        refs = [] if self.reference is None else self.reference if isinstance(self.reference, list) else [self.reference]
        return [self.model_copy(update={"method": r, "reference": None}) for r in refs]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
