"""Typed, validated experiment configs: YAML files plus dotted ``key=value`` overrides.

A config has four sections: ``seed``, ``benchmark`` (``name`` + the benchmark's fields), ``method``
(``name`` + its hyperparameters) and ``trainer``, and optionally ``reference``: a second method (same
form as ``method``; its backbone defaults to the method's) that ``metagate run`` also trains on the
same stream and seed and prints next to the method, task by task. Each benchmark and method declares its own
pydantic model, so unknown keys, wrong types and unknown names are refused before any training,
with the valid choices named.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "default"


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


class Section(BaseModel):
    """Base of every config section: strict about unknown keys, checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class BenchmarkConfig(Section):
    name: str


class MethodConfig(Section):
    name: str


class TrainerConfig(Section):
    epochs: int = Field(3, ge=1, description="passes over each task's training data")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (cuda when available)")
    eval_batch_size: int = Field(2048, ge=1)
    log_every: int = Field(0, ge=0, description="steps between loss records in metrics.jsonl; 0 = once per epoch")
    curve_every: int = Field(
        0, ge=0, description="steps between evaluations of the current task (learning curves, steps_to_90); 0 = off"
    )
    progress: bool = Field(True, description="show progress bars")
    checkpoint: bool = Field(True, description="write a checkpoint after every task")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be cpu, cuda, cuda:N, mps or auto")
        return value


class ExperimentConfig(Section):
    seed: int = 0
    benchmark: SerializeAsAny[BenchmarkConfig]
    method: SerializeAsAny[MethodConfig]
    trainer: TrainerConfig = TrainerConfig()
    reference: SerializeAsAny[MethodConfig] | None = None

    def reference_config(self) -> "ExperimentConfig | None":
        """The config of the reference run: this one with ``reference`` as its method."""
        if self.reference is None:
            return None
        return self.model_copy(update={"method": self.reference, "reference": None})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# --------------------------------------------------------------------------- loading


def list_ready_configs() -> dict[str, str]:
    """Ready configs shipped in ``configs/``: name -> its one-line description (first comment)."""
    out: dict[str, str] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        desc = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        out[path.stem] = desc
    return out


def find_config(name_or_path: str | None) -> Path:
    """A YAML path, or the name of a ready config; ``None`` is the default experiment."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    ready = CONFIG_DIR / f"{name_or_path}.yaml"
    if ready.is_file():
        return ready
    raise ConfigError(
        f"no config file or ready config named {name_or_path!r}; "
        f"ready configs: {', '.join(list_ready_configs())}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping (seed, benchmark, method, trainer), not {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``a.b=value`` strings -> (key path, value); values are read as YAML scalars (``3`` is an int)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. method.name=ewc)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys. Changing ``method.name`` or ``benchmark.name`` starts that section afresh, so
    the old method's hyperparameters do not leak into the new one; only the keys every method shares
    (``backbone``, ``reset_optimizer``) are kept."""
    from metagate.methods.base import BaseMethodConfig

    method_keys = set(BaseMethodConfig.model_fields) - {"name"}
    shared = {"method": method_keys, "reference": method_keys, "benchmark": set()}
    raw = copy.deepcopy(raw)
    parsed = parse_overrides(overrides)
    for path, value in parsed:
        if len(path) == 2 and path[1] == "name" and path[0] in shared:
            section = raw.get(path[0])
            if not isinstance(section, dict) or section.get("name") != value:
                kept = {k: v for k, v in (section or {}).items() if k in shared[path[0]]} if isinstance(section, dict) else {}
                raw[path[0]] = {"name": value, **kept}
    for path, value in parsed:
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def _format_validation_error(section: str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (section, *e["loc"]))
        if e["type"] == "extra_forbidden":
            valid = ", ".join(f.alias or n for n, f in model.model_fields.items())
            lines.append(f"unknown key {loc!r}; valid keys here: {valid}")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def validate_section(section: str, model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping, got {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(section, e, model)) from None


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw dict into an :class:`ExperimentConfig`, section by section."""
    from metagate.data import BENCHMARKS
    from metagate.methods import METHODS
    from metagate.registry import UnknownNameError

    allowed = {"seed", "benchmark", "method", "trainer", "reference"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ConfigError(f"unknown top-level key(s) {', '.join(map(repr, extra))}; valid keys: {', '.join(sorted(allowed))}")
    def entry_for(name: str, registry: Any, data: Any, hint: str) -> Any:
        if not isinstance(data, dict) or "name" not in data:
            raise ConfigError(f"{name}.name is missing; {hint}")
        try:
            return registry.get(str(data["name"]))
        except UnknownNameError as e:
            raise ConfigError(f"{name}.name: {e}") from None

    sections: dict[str, Any] = {}
    for name, registry in (("benchmark", BENCHMARKS), ("method", METHODS)):
        entry = entry_for(name, registry, raw.get(name), f"choose one of: {', '.join(registry.names())}")
        sections[name] = validate_section(name, entry.Config, raw[name])
    reference = raw.get("reference")
    if reference is not None:
        entry = entry_for("reference", METHODS, reference, "reference is a method section (e.g. reference.name=xdg), or null")
        # The reference runs on the method's backbone unless it names its own.
        reference = {"backbone": sections["method"].backbone.model_dump(mode="json"), **reference}
        sections["reference"] = validate_section("reference", entry.Config, reference)
    trainer = validate_section("trainer", TrainerConfig, raw.get("trainer") or {})
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return ExperimentConfig(
        seed=seed, benchmark=sections["benchmark"], method=sections["method"], trainer=trainer, reference=sections.get("reference")
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (or ready config), apply dotted overrides, validate."""
    raw = read_yaml(find_config(name_or_path))
    return build_config(apply_overrides(raw, overrides or []))


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    return build_config(apply_overrides(raw, overrides or []))
