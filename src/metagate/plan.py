"""Plans: what a compare, a tune or a sweep runs, as typed objects, validated before anything runs.

A plan is variants x seeds -> jobs. A :class:`Variant` is one labelled setting: a method and the dotted
overrides of that variant alone. :func:`expand` is the one expansion of method labels and grid points into
variants (``compare``: one point, the label's own; ``tune`` and ``sweep``: the grid's points, and a sweep's
random draws), and :func:`plan_jobs` the one function that turns variants and seeds into jobs, each with
its validated config and its folder ``<root>/<variant>/seed<N>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metagate.config import ConfigError, apply_overrides, config_from_dict, find_config, read_yaml
from metagate.runtime import check_machine
from metagate.schema import ExperimentConfig

SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Variant:
    """One labelled setting of a plan: ``method`` with ``overrides`` (dotted ``key=value``, applied after the
    plan's own); ``label`` is its folder name and its row in the tables."""

    label: str
    method: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """One run of a plan: a variant on a seed, its validated config and its folder."""

    variant: Variant
    seed: int
    cfg: ExperimentConfig
    folder: Path

    @property
    def key(self) -> tuple[str, int]:
        return (self.variant.label, self.seed)


@dataclass
class Plan:
    """Every job of a compare, a tune stage or a sweep, in order: each variant on each seed."""

    root: Path
    variants: list[Variant]
    seeds: list[int]
    jobs: list[Job]

    @property
    def labels(self) -> list[str]:
        return [v.label for v in self.variants]

    @property
    def configs(self) -> dict[tuple[str, int], ExperimentConfig]:
        return {job.key: job.cfg for job in self.jobs}

    def folder(self, label: str, seed: int) -> Path:
        return self.root / label / f"seed{seed}"


# --------------------------------------------------------------------------- parsing the command line


def parse_entries(methods: str) -> dict[str, str]:
    """``"finetune,strong=ewc"`` -> ``{"finetune": "finetune", "strong": "ewc"}``; labels become folder
    names, so only letters, digits, '.', '_' and '-' (not first) are allowed."""
    entries = [m.strip() for m in methods.split(",") if m.strip()]
    if not entries:
        raise ConfigError("--methods is empty; name at least one method, e.g. --methods finetune,ewc")
    method_of: dict[str, str] = {}
    for entry in entries:
        label, _, method = entry.partition("=")
        label, method = label.strip(), (method.strip() or label.strip())
        if not SAFE_LABEL.fullmatch(label) or label in (".", ".."):
            raise ConfigError(
                f"label {label!r} in --methods is not a safe folder name; use letters, digits, '.', '_' and '-' "
                f"(e.g. {re.sub(r'[^A-Za-z0-9._-]+', '-', label).strip('.-') or 'variant'}={method})"
            )
        if label in method_of:
            raise ConfigError(f"--methods names the label {label!r} twice")
        method_of[label] = method
    return method_of


def split_overrides(overrides: list[str], labels: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The overrides for every entry, and per label those written ``label:key=value`` (without the
    label); a label that ``--methods`` does not name is refused."""
    general = [o for o in overrides if ":" not in o.split("=", 1)[0]]
    specific: dict[str, list[str]] = {}
    for o in overrides:
        if o not in general:
            label, _, rest = o.partition(":")
            specific.setdefault(label, []).append(rest)
    unknown = sorted(set(specific) - set(labels))
    if unknown:
        raise ConfigError(f"overrides for {', '.join(unknown)}, which --methods does not name")
    return general, specific


def grid_values(item: str, values: str) -> list[str]:
    """``1,10,100`` -> its values; an empty one (``1,,2``, a trailing comma) is refused, not dropped."""
    parts = [v.strip() for v in values.split(",")]
    if not all(parts):
        raise ConfigError(f"--grid {item!r} has an empty value (two commas in a row, or one at an end); write each value out")
    return parts


def parse_grid(grid: list[str], labels: list[str]) -> dict[str, list[list[str]]]:
    """``["si:method.c=0.1,1", "si:method.xi=0.01,0.1"]`` -> per label, every combination as overrides."""
    axes: dict[str, list[list[str]]] = {label: [] for label in labels}
    for item in grid:
        label, sep, rest = item.partition(":")
        key, eq, values = rest.partition("=")
        if not sep or not eq or not key or not values:
            raise ConfigError(f"--grid {item!r} is not of the form label:key=v1,v2,... (e.g. si:method.c=0.1,1,10)")
        if label not in axes:
            raise ConfigError(f"--grid {item!r} names {label!r}, which --methods does not name")
        axes[label].append([f"{key}={v}" for v in grid_values(item, values)])
    combos: dict[str, list[list[str]]] = {}
    for label, lists in axes.items():
        out: list[list[str]] = [[]]
        for values in lists:
            out = [[*prefix, v] for prefix in out for v in values]
        combos[label] = out
    return combos


# --------------------------------------------------------------------------- variants and jobs


def variant_label(label: str, overrides: list[str]) -> str:
    """A safe folder name for a grid point: ``si`` + ``method.c=0.1`` -> ``si_c-0.1``."""
    parts = [o.split("=", 1)[0].split(".")[-1] + "-" + o.split("=", 1)[1] for o in overrides]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join([label, *parts]))


def expand(
    method_of: dict[str, str], points: dict[str, list[list[str]]] | None = None, own: dict[str, list[str]] | None = None
) -> dict[str, list[Variant]]:
    """Per method label, its variants: one per grid point (``points``: per label, lists of overrides; none given:
    the label alone), labelled by :func:`variant_label`, with the point's overrides, then the label's ``own``
    (``label:key=value`` on the command line, for each of its variants)."""
    variants: dict[str, list[Variant]] = {}
    seen: set[str] = set()
    for label, method in method_of.items():
        variants[label] = []
        for point in (points or {}).get(label, [[]]):
            v = Variant(variant_label(label, point), method, (*point, *(own or {}).get(label, [])))
            if v.label in seen:
                raise ConfigError(f"two variants are both labelled {v.label!r}; give their methods labels apart (label=method)")
            seen.add(v.label)
            variants[label].append(v)
    return variants


def plan_jobs(
    config: str | None, overrides: list[str], variants: list[Variant], seeds: int, root: Path | None,
    default_root: Callable[[str, int], Path], first_seed: int | None = None,
) -> Plan:
    """Every variant on ``seeds`` seeds (from ``first_seed``, default the config's own seed), each job's config
    validated and checked against this machine before anything is trained or written (the folders are
    orchestration's to check: :func:`metagate.orchestrate.check_folders`). ``root=None``: ``default_root(benchmark,
    first seed)``."""
    base = apply_overrides(read_yaml(find_config(config)), overrides)
    base_seed = config_from_dict(base).seed
    start = base_seed if first_seed is None else first_seed
    seed_list = [start + k for k in range(seeds)]
    configs = [
        (v, seed, config_from_dict(base, [f"method.name={v.method}", f"seed={seed}", "reference=null", *v.overrides]))
        for v in variants
        for seed in seed_list
    ]
    for _, _, cfg in configs:
        check_machine(cfg)
    root = root or default_root(configs[0][2].benchmark.name, start)
    jobs = [Job(v, seed, cfg, root / v.label / f"seed{seed}") for v, seed, cfg in configs]
    return Plan(root, list(variants), seed_list, jobs)
