"""The config loader: YAML files plus dotted ``key=value`` overrides, validated against the schema.

Sits above the registries: ``method.name`` and ``benchmark.name`` are resolved through them, so each
benchmark's and method's own pydantic model checks its section, and unknown keys, wrong types and
unknown names are refused before any training, with the valid choices named. Besides the schema, a
config is checked for what the schema alone cannot see: backbone widths a method can gate, devices
this machine has (:func:`check_runnable`), and the packages of the tracking backends switched on.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from metagate.catalog import CONFIG_DIR, DEFAULT_CONFIG, list_ready_configs
from metagate.data import BENCHMARKS
from metagate.methods import METHODS
from metagate.methods.base import BaseMethodConfig
from metagate.registry import UnknownNameError
from metagate.schema import ConfigError, ExperimentConfig, NoAliasLoader, TrackingConfig, TrainerConfig, load_yaml
from metagate.tracking import check_tracking

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "ExperimentConfig",
    "apply_overrides",
    "build_config",
    "config_from_dict",
    "find_config",
    "list_ready_configs",
    "load_config",
    "parse_overrides",
    "read_yaml",
]

# --------------------------------------------------------------------------- loading


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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from None
    data = load_yaml(text, str(path))
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
            value = yaml.load(raw, Loader=NoAliasLoader) if raw != "" else ""  # noqa: S506  (a SafeLoader)
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys. Changing ``method.name`` or ``benchmark.name`` starts that section afresh, so
    the old method's hyperparameters do not leak into the new one; only the keys every method shares
    (``backbone``, ``reset_optimizer``) are kept."""
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
        if not e["loc"] and isinstance(e.get("input"), dict):  # the section's own check of keys that depend on each other
            lines.append(_dependent_keys_error(section, e, model))
        elif e["type"] == "extra_forbidden":
            valid = ", ".join(f.alias or n for n, f in model.model_fields.items())
            lines.append(f"unknown key {loc!r}; valid keys here: {valid}")
        elif not e["loc"]:  # the section as a whole (a model validator): its message says what to change
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
        else:
            got = repr(e.get("input"))
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')} (got {got if len(got) <= 200 else got[:200] + '...'})")
    return "; ".join(lines)


def _dependent_keys_error(section: str, e: Any, model: type[BaseModel]) -> str:
    """A section's own check failed (keys that depend on each other, e.g. ``novel_tasks`` < ``num_tasks``): its
    message, then the keys it names as dotted overrides with their values now, so the user knows what to set."""
    message = str(e["msg"]).removeprefix("Value error, ")
    named = [k for k in model.model_fields if re.search(rf"\b{re.escape(k)}\b", message)]
    keys = [f"{section}.{k}={e['input'].get(k, model.model_fields[k].default)!r}" for k in named]
    advice = f". Now {' '.join(keys)}: set the ones to change as overrides (key=value after the config)" if keys else ""
    return f"{section}: {message}{advice}"


def validate_section(section: str, model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping, got {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(section, e, model)) from None


def _check_method(method_cls: Any, section: Any, where: str) -> None:
    problem = method_cls.config_problem(section)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw dict into an :class:`ExperimentConfig`, section by section. A ``sweep`` section
    belongs to ``metagate sweep`` (:mod:`metagate.sweep`): a single run ignores it, as it ignores a run
    folder's ``provenance`` record (so a run's ``config.yaml`` runs again as it is)."""
    raw = {k: v for k, v in raw.items() if k not in ("sweep", "provenance")}
    allowed = {"seed", "benchmark", "method", "trainer", "reference", "tracking"}
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
    _check_method(METHODS.get(sections["method"].name), sections["method"], "method")
    reference = raw.get("reference")
    if reference is not None:
        # one method section, or a list of them (several references, each run on the same stream and seed)
        many = isinstance(reference, list)
        if many and not reference:
            raise ConfigError("reference is an empty list; give one method section, a list of them, or null")
        refs = []
        for i, ref in enumerate(reference if many else [reference]):
            where = f"reference[{i}]" if many else "reference"
            entry = entry_for(where, METHODS, ref, "reference is a method section (e.g. reference.name=xdg), a list of them, or null")
            # A reference runs on the method's backbone unless it names its own.
            ref = {"backbone": sections["method"].backbone.model_dump(mode="json"), **ref}
            refs.append(validate_section(where, entry.Config, ref))
            _check_method(entry, refs[-1], where)
        sections["reference"] = refs if many else refs[0]
    trainer = validate_section("trainer", TrainerConfig, raw.get("trainer") or {})
    tracking = validate_section("tracking", TrackingConfig, raw.get("tracking") or {})
    check_tracking(tracking)  # a backend switched on without its package: refused before anything runs
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} is out of range: choose an integer from 0 to {2**32 - 1}")
    return ExperimentConfig(
        seed=seed,
        benchmark=sections["benchmark"],
        method=sections["method"],
        trainer=trainer,
        reference=sections.get("reference"),
        tracking=tracking,
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (or ready config), apply dotted overrides, validate."""
    raw = read_yaml(find_config(name_or_path))
    return build_config(apply_overrides(raw, overrides or []))


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    return build_config(apply_overrides(raw, overrides or []))
