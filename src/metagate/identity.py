"""Run identity: what makes two configs the same run, and what makes runs the seeds of one row.

One owner for both questions. Orchestration (:mod:`metagate.orchestrate`) asks :func:`same_run` once
before it resumes or reuses a run folder; :mod:`metagate.aggregate` groups finished runs by
:func:`row_identity`. A saved config is read through today's schema first (:func:`with_current_defaults`),
so a run written before a field existed stays the same run while that field keeps its default.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from metagate.config import config_from_dict

# Trainer fields that may differ between a run and its resumption (they do not change the numbers).
RESUME_FREE_KEYS = ("device", "progress", "eval_batch_size", "checkpoint")
# Top-level sections that are not part of a run: another run (reference), where its numbers are sent (tracking).
NOT_THE_RUN = ("reference", "tracking")
# What never makes two finished runs different rows of a table: besides the above, the seed (a row's runs are
# its seeds) and the trainer's threads and logging interval (they do not change the numbers either).
NOT_THE_ROW = ("seed", *NOT_THE_RUN)
NOT_THE_ROW_TRAINER = (*RESUME_FREE_KEYS, "threads", "log_every")


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two configs the same run: all but the keys a resumed run may change, the
    ``reference`` (another run) and ``tracking`` (where the numbers are sent)."""
    trainer = {k: v for k, v in config.get("trainer", {}).items() if k not in RESUME_FREE_KEYS}
    return {**{k: v for k, v in config.items() if k not in NOT_THE_RUN}, "trainer": trainer}


def row_identity(config: dict[str, Any]) -> str:
    """What makes finished runs the seeds of one table row: the config without the seed (nor the keys that
    do not change the numbers), as canonical JSON."""
    trimmed = {k: v for k, v in config.items() if k not in NOT_THE_ROW}
    trimmed["trainer"] = {k: v for k, v in (config.get("trainer") or {}).items() if k not in NOT_THE_ROW_TRAINER}
    return json.dumps(trimmed, sort_keys=True, default=str)


def with_current_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config read through today's schema: a field added since the run was written takes its
    default, which reproduces the behaviour from before the field existed (new fields are added that
    way here), so a finished run stays reusable. Explicit values are kept as written; a config that no
    longer parses is returned unchanged (and then differs). ``tracking`` is read as off: it is not part
    of the run, and comparing must not need a tracking backend's package."""
    try:
        return config_from_dict(copy.deepcopy({k: v for k, v in saved.items() if k != "tracking"})).to_dict()
    except Exception:  # noqa: BLE001 - any parse failure means "not the same run"; the caller says what differs
        return saved


def same_run(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a saved config and the current one are the same run (see :func:`run_identity`)."""
    return run_identity(with_current_defaults(saved)) == run_identity(current)


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (missing counts as differing)."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb, name = a.get(key), b.get(key), f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, f"{name}.")
        elif va != vb or (key in a) != (key in b):
            out.append(name)
    return out


def describe_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """``method.c: 0.1 there vs 1.0 here; ...`` (saved vs current) for the first few differing keys."""

    def get(d: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            d = d.get(part, "<absent>") if isinstance(d, dict) else "<absent>"
        return d

    saved = with_current_defaults(saved)
    keys = differing_keys(run_identity(saved), run_identity(current))
    shown = [f"{k}: {get(saved, k)!r} there vs {get(current, k)!r} here" for k in keys[:6]]
    return "; ".join(shown) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")
