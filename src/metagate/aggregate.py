"""Aggregation of finished run folders, wherever they came from (a sweep, a compare, runs made by hand).

Runs are found by their ``results.json`` (reference runs inside a run folder included; the tuning runs
of a tuned folder left out, see :func:`_tuning_run`) and grouped by
their config without the seed: runs that differ only in the seed are the seeds of one row. A row's
label is the folder name the runs sit in (``<label>/seed<N>``, as ``compare`` and ``sweep`` write
them), else the method's name; two rows with the same label get the config keys that tell them apart.

Per row: mean, sample standard deviation and the 95% confidence interval of the mean (Student's t
over the seeds) of ACC, BWT, FWT, forgetting, zero-shot accuracy (before training a task), accuracy
just after training it, zero-shot quality Q, steps to 90% (these four: means over every task after the
first, or over the last N with ``last``), training time and
peak memory (each run's own peak, measured by the trainer), with what the runs used at test time
and the scenario. Q = (zs - zs_xdg) / (just trained - zs_xdg) over the tasks after the first, where
``zs_xdg`` is the zero-shot accuracy of an XdG run on the same stream and seed found among the
aggregated runs: 0 means the method's fresh masks are no better than XdG's random ones, 1 means a new
task is as good before training as after (``n/a`` without such an XdG run, and for methods without
task masks). Runs with a few-shot measurement (``few_shot_acc``: a task's accuracy before training it
with what a few labelled examples of it gave) add its mean over the same tasks and ``Q few-shot``, the
same Q with the few-shot accuracy in place of zs; other runs leave both columns out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from metagate.identity import differing_keys, row_identity, with_current_defaults
from metagate.report import markdown_table, uses_at_test
from metagate.runs import RunDir, check_results
from metagate.schema import NoAliasLoader

SEED_FOLDER = re.compile(r"seed\d+")
IDENTIFYING = ("benchmark.name", "benchmark.dataset", "method.name")  # named in a row's label whenever they differ


class AggregationError(ValueError):
    """Nothing to aggregate, or a results file that cannot be read; the message says what to do."""


@dataclass
class RunRecord:
    """One finished run: its folder, its label (row), its config and its results."""

    folder: Path
    label: str
    config: dict[str, Any]
    results: dict[str, Any]
    identity: str = field(default="", repr=False)  # the config without the seed, as canonical JSON
    duplicates: list[Path] = field(default_factory=list)  # folders of the same run (config and seed), not counted

    def row(self) -> dict[str, Any]:
        """The run as one flat row of a table: its label and folder, then every scalar figure of its results
        (method, benchmark, seed, acc, bwt, fwt, forgetting, val_acc, train_seconds, ...)."""
        scalars = {k: v for k, v in self.results.items() if v is None or isinstance(v, (bool, int, float, str))}
        return {"label": self.label, "folder": str(self.folder), **scalars}


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        results = json.loads((folder / RunDir.RESULTS).read_text())
        config = yaml.load((folder / RunDir.CONFIG).read_text(), Loader=NoAliasLoader) if (folder / RunDir.CONFIG).is_file() else {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise AggregationError(f"cannot read the run in {folder} ({e}); move that folder away or rerun it") from None
    check_results(results, folder / RunDir.RESULTS)  # a ragged matrix or a missing figure: one line naming the file
    config = dict(config or {})
    config.pop("provenance", None)
    return with_current_defaults(config), results  # a field added since the run was made takes its default


def find_runs(paths: Sequence[Path]) -> list[RunRecord]:
    """Every finished run at or below ``paths`` (a folder holding ``results.json``), in path order."""
    folders: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise AggregationError(f"{path} does not exist; name run folders or folders that hold them")
        found = _ordered(path, [p.parent for p in path.rglob(RunDir.RESULTS)]) if path.is_dir() else []
        found = [f for f in found if not _tuning_run(f, path)]
        if not found:
            raise AggregationError(f"no finished run (results.json) at or below {path}")
        folders += [f for f in found if f not in folders]
    records = []
    for folder in folders:
        config, results = _read(folder)
        records.append(RunRecord(folder, "", config, results, row_identity(config)))
    records = _count_once(records)
    _label(records)
    return records


def read_run(folder: Path, label: str) -> RunRecord:
    """The finished run in ``folder`` as a record labelled ``label``."""
    config, results = _read(folder)
    return RunRecord(folder, label, config, results, row_identity(config))


def _count_once(records: list[RunRecord]) -> list[RunRecord]:
    """One record per (config, seed): a run copied, or made again by a second sweep, is the same run, not
    another seed (counted twice it would narrow the confidence interval). The first in path order is
    kept; the others are named in its ``duplicates``."""
    kept: dict[tuple[str, Any], RunRecord] = {}
    for r in records:
        first = kept.setdefault((r.identity, r.results.get("seed")), r)
        if first is not r:
            first.duplicates.append(r.folder)
    return list(kept.values())


def _ordered(root: Path, folders: list[Path]) -> list[Path]:
    """Path order, but the labels of a compare / sweep folder in the order of its ``comparison.json``."""
    order: list[str] = []
    for comparison in [root / "comparison.json", root / "final" / "comparison.json"]:
        try:
            order = list(json.loads(comparison.read_text()).get("methods", {}))
            break
        except (OSError, ValueError, AttributeError):
            continue
    rank = {label: i for i, label in enumerate(order)}
    return sorted(folders, key=lambda f: (rank.get(f.parent.name, len(rank)), str(f)))


def _tuning_run(folder: Path, root: Path) -> bool:
    """A run in the ``tuning/`` folder of a tuned folder (``tuning.json`` beside it) below ``root``: its
    seeds chose the settings, so it is never mixed into the rows of test figures. Aggregating that
    ``tuning/`` folder itself (or a folder inside it) keeps its runs."""
    return any(t.name == "tuning" and root in t.parents and (t.parent / "tuning.json").is_file() for t in folder.parents)


def _base_label(folder: Path, results: dict[str, Any]) -> str:
    if SEED_FOLDER.fullmatch(folder.name):
        return folder.parent.name
    if folder.name.startswith("reference"):
        return f"{results.get('method')} (reference)"
    return str(results.get("method"))


def _label(records: list[RunRecord]) -> None:
    """Give each identity one label; labels shared by different identities get the keys that tell them apart."""
    base: dict[str, str] = {}
    for r in records:
        base.setdefault(r.identity, _base_label(r.folder, r.results))
    by_label: dict[str, list[str]] = {}
    for ident, label in base.items():
        by_label.setdefault(label, []).append(ident)
    final: dict[str, str] = {}
    for label, idents in by_label.items():
        if len(idents) == 1:
            final[idents[0]] = label
            continue
        configs = [json.loads(i) for i in idents]
        keys = _telling_keys(configs)
        for ident, cfg in zip(idents, configs):
            final[ident] = f"{label} [" + ", ".join(f"{k}={_get(cfg, k)}" for k in keys) + "]"
    seen: dict[str, int] = {}
    for ident in list(final):  # never two rows under one label (the keys above tell every pair apart)
        seen[final[ident]] = seen.get(final[ident], 0) + 1
        if seen[final[ident]] > 1:
            final[ident] += f" #{seen[final[ident]]}"
    for r in records:
        r.label = final[r.identity]


def _telling_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Few config keys whose values tell every config apart: greedily the key that splits them into the
    most groups, until each config has its own values (among equals a ``.name``, then alphabetical)."""
    candidates = sorted({k for a in configs for b in configs if a is not b for k in differing_keys(a, b)})
    chosen: list[str] = []
    while candidates:
        def groups(keys: list[str]) -> int:
            return len({json.dumps([_get(c, k) for k in keys], sort_keys=True, default=str) for c in configs})

        if groups(chosen) == len(configs):
            break
        best = max(candidates, key=lambda k: (groups([*chosen, k]), k.endswith(".name"), -candidates.index(k)))
        chosen.append(best)
        candidates.remove(best)
    # what the runs are (benchmark, data set, method) is always named when it differs, whatever else tells them apart
    return [k for k in IDENTIFYING if k in candidates] + chosen


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part, "-") if isinstance(config, dict) else "-"
    return config


def group(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Label -> its runs (the seeds of one row: one config), in the order the labels first appear."""
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.label, []).append(r)
    return out


# --------------------------------------------------------------------------- per-run figures


def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def window(results: dict[str, Any], last: int | None = None) -> list[int]:
    """The tasks per-task figures are averaged over: every task after the first, or the last ``last``
    of them (a long stream's later tasks, such as its novel ones)."""
    tasks = list(range(1, len(results["acc_matrix"])))
    return tasks if last is None else tasks[-last:]


def zero_shot_mean(results: dict[str, Any], last: int | None = None, key: str = "zero_shot_acc") -> float | None:
    """Mean accuracy of the window's tasks before training them (``key="few_shot_acc"``: with the few-shot mask)."""
    zs = results.get(key) or []
    return _mean([zs[j] for j in window(results, last) if j < len(zs)])


def few_shot_mean(results: dict[str, Any], last: int | None = None) -> float | None:
    """Mean accuracy of the window's tasks before training them, with what a few labelled examples gave (methods
    with a few-shot measurement, ``few_shot_acc``; else ``None``)."""
    return zero_shot_mean(results, last, "few_shot_acc")


def just_trained_mean(results: dict[str, Any], last: int | None = None) -> float | None:
    """Mean accuracy of the window's tasks right after training each."""
    r = results["acc_matrix"]
    return _mean([r[j][j] for j in window(results, last)])


def zero_shot_quality(results: dict[str, Any], xdg: dict[str, Any], last: int | None = None, key: str = "zero_shot_acc") -> float | None:
    """Q = (zs - zs_xdg) / (just trained - zs_xdg), means over the window's tasks (``key="few_shot_acc"``: the
    few-shot accuracy in place of zs, the same normalisation)."""
    zs, zx = results.get(key) or [], xdg.get("zero_shot_acc") or []
    if len(zs) < 2 or len(zs) != len(zx):
        return None
    m_zs, m_zx, m_jt = zero_shot_mean(results, last, key), zero_shot_mean(xdg, last), just_trained_mean(results, last)
    if m_zs is None or m_zx is None or m_jt is None or abs(m_jt - m_zx) < 1e-9:
        return None
    return (m_zs - m_zx) / (m_jt - m_zx)


def _steps(results: dict[str, Any], last: int | None = None) -> float | None:
    steps = results.get("steps_to_90") or []
    return _mean([steps[j] for j in window(results, last) if j < len(steps)])


# figure -> (results, last) -> value; per-task figures over window(), the others over the run
PER_RUN: dict[str, Callable[[dict[str, Any], int | None], float | None]] = {
    "acc": lambda r, _: r.get("acc"),
    "bwt": lambda r, _: r.get("bwt"),
    "fwt": lambda r, _: r.get("fwt"),
    "forgetting": lambda r, _: r.get("forgetting"),
    "zero_shot": zero_shot_mean,
    "few_shot": few_shot_mean,
    "just_trained": just_trained_mean,
    "steps_to_90": _steps,
    "train_seconds": lambda r, _: r.get("train_seconds"),
    "peak_memory_mb": lambda r, _: r.get("peak_memory_mb"),
    "bytes_per_task": lambda r, _: r.get("bytes_per_task"),
    "val_acc": lambda r, _: r.get("val_acc"),
    "val_bwt": lambda r, _: r.get("val_bwt"),
}


def _xdg_baselines(records: Sequence[RunRecord]) -> dict[tuple[str, int], dict[str, Any]]:
    """(benchmark section as JSON, seed) -> an XdG run's results on that stream."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        if r.results.get("method") == "xdg":
            key = (json.dumps(r.config.get("benchmark"), sort_keys=True), int(r.results.get("seed", -1)))
            out.setdefault(key, r.results)
    return out


def _xdg_candidates(records: Sequence[RunRecord]) -> dict[tuple[str, int], list[RunRecord]]:
    """(benchmark section as JSON, seed) -> every XdG run on that stream (Q's baseline is chosen among them)."""
    out: dict[tuple[str, int], list[RunRecord]] = {}
    for r in records:
        if r.results.get("method") == "xdg":
            out.setdefault((json.dumps(r.config.get("benchmark"), sort_keys=True), int(r.results.get("seed", -1))), []).append(r)
    return out


def _density(results: dict[str, Any]) -> float | None:
    return _mean(results.get("mask_density") or [])


def matched_xdg(record: RunRecord, candidates: dict[tuple[str, int], list[RunRecord]]) -> tuple[dict[str, Any] | None, str | None]:
    """Q's XdG + SI baseline for a gating run: the first XdG run of the same stream and seed that matches it on
    density, stabiliser strength and backbone (:func:`metagate.metrics.baseline_mismatch`); where none matches,
    the first one and why it does not (the table flags the row). Methods without masks take the first XdG run
    (no Q; the gain only)."""
    from metagate.metrics import baseline_mismatch

    runs = candidates.get((json.dumps(record.config.get("benchmark"), sort_keys=True), int(record.results.get("seed", -1))), [])
    if not runs:
        return None, None
    if record.results.get("mask_density") is None:
        return runs[0].results, None
    why: list[str] = []
    for x in runs:
        why = baseline_mismatch(record.config.get("method") or {}, _density(record.results), x.config.get("method") or {}, _density(x.results))
        if not why:
            return x.results, None
    return runs[0].results, "; ".join(why)


def zero_shot_gain(results: dict[str, Any], xdg: dict[str, Any], last: int | None = None) -> float | None:
    """Mean zero-shot accuracy of the window's tasks minus XdG + SI's on the same tasks (a fraction)."""
    a, b = zero_shot_mean(results, last), zero_shot_mean(xdg, last)
    if len(results.get("zero_shot_acc") or []) != len(xdg.get("zero_shot_acc") or []) or a is None or b is None:
        return None
    return a - b


def run_figures(record: RunRecord, baselines: dict[tuple[str, int], dict[str, Any]], last: int | None = None,
                candidates: dict[tuple[str, int], list[RunRecord]] | None = None) -> dict[str, float | None]:
    """The per-run figures aggregated over seeds (fractions, seconds, MiB, steps); per-task ones over
    the tasks after the first, or the last ``last`` (``q_all``: Q over every task after the first). With
    ``candidates``, Q's XdG run is the one matched on density, stabiliser and backbone (:func:`matched_xdg`)."""
    out = {k: f(record.results, last) for k, f in PER_RUN.items()}
    if candidates is not None:
        xdg, _ = matched_xdg(record, candidates)
    else:
        xdg = baselines.get((json.dumps(record.config.get("benchmark"), sort_keys=True), int(record.results.get("seed", -1))))
    gating = record.results.get("mask_density") is not None  # Q rates masks: gating methods only
    rated = xdg is not None and gating and record.results.get("method") != "xdg"
    out["q"] = zero_shot_quality(record.results, xdg, last) if rated else None
    out["q_all"] = zero_shot_quality(record.results, xdg, None) if rated else None
    out["q_few_shot"] = zero_shot_quality(record.results, xdg, last, "few_shot_acc") if rated else None
    out["zs_gain"] = zero_shot_gain(record.results, xdg, last) if xdg is not None and record.results.get("method") != "xdg" else None
    return out


# --------------------------------------------------------------------------- over seeds


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std and the half-width of the 95% confidence interval of the mean (Student's t)."""
    vals = [float(v) for v in values if v is not None]
    out: dict[str, Any] = {"mean": None, "std": None, "ci95": None, "n": len(vals)}
    if vals:
        arr = np.asarray(vals)
        out["mean"] = float(arr.mean())
        out["std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        if len(arr) > 1:
            from scipy.stats import t

            out["ci95"] = float(t.ppf(0.975, len(arr) - 1) * out["std"] / math.sqrt(len(arr)))
    return out


def summarise(
    groups: dict[str, list[RunRecord]], records: Sequence[RunRecord] | None = None, last: int | None = None
) -> dict[str, dict[str, Any]]:
    """Label -> {figure: stat, ...} with ``test_time_info``, ``scenario``, ``benchmark``, ``seeds`` and
    ``folders``. Q's XdG runs are looked for among ``records`` (default: every grouped run)."""
    everything = list(records) if records is not None else [r for runs in groups.values() for r in runs]
    baselines = _xdg_baselines(everything)
    candidates = _xdg_candidates(everything)
    out: dict[str, dict[str, Any]] = {}
    for label, runs in groups.items():
        figures = [run_figures(r, baselines, last, candidates) for r in runs]
        row: dict[str, Any] = {k: stat([f[k] for f in figures]) for k in [*PER_RUN, "q", "q_all", "q_few_shot", "zs_gain"]}
        unmatched = sorted({why for r in runs if (why := matched_xdg(r, candidates)[1])})
        row["q_baseline_unmatched"] = "; ".join(unmatched) or None
        for key in ("test_time_info", "scenario", "benchmark", "method"):
            values = sorted({str(r.results.get(key)) for r in runs if r.results.get(key) is not None})
            row[key] = "/".join(values) if values else None
        row["seeds"] = sorted(int(r.results.get("seed", -1)) for r in runs)
        row["folders"] = [str(r.folder) for r in runs]
        row["duplicates"] = {str(r.folder): [str(d) for d in r.duplicates] for r in runs if r.duplicates}
        out[label] = row
    return out


COLUMNS: list[tuple[str, str, float, int]] = [  # (figure, header, scale, digits)
    ("acc", "ACC (%)", 100.0, 1),
    ("bwt", "BWT (pt)", 100.0, 1),
    ("fwt", "FWT (pt)", 100.0, 1),
    ("forgetting", "forgetting (pt)", 100.0, 1),
    ("zero_shot", "zero-shot (%)", 100.0, 1),
    ("zs_gain", "zero-shot gain over XdG + SI (pt)", 100.0, 1),
    ("few_shot", "few-shot (%)", 100.0, 1),
    ("just_trained", "just trained (%)", 100.0, 1),
    ("q", "Q", 1.0, 2),
    ("q_all", "Q (all tasks)", 1.0, 2),
    ("q_few_shot", "Q few-shot", 1.0, 2),
    ("steps_to_90", "steps to 90%", 1.0, 0),
    ("train_seconds", "time (s)", 1.0, 1),
    ("peak_memory_mb", "peak memory (MiB)", 1.0, 0),
    ("bytes_per_task", "bytes / task", 1.0, 0),
]
# with ``validation``: the figures hyperparameters are chosen on (tuning seeds), in place of the test figures (a
# tuning run's test accuracy is never shown next to them); the columns that are no accuracy stay
NOT_ACCURACY = {"steps_to_90", "train_seconds", "peak_memory_mb", "bytes_per_task"}
VAL_COLUMNS: list[tuple[str, str, float, int]] = [("val_acc", "val ACC (%)", 100.0, 1), ("val_bwt", "val BWT (pt)", 100.0, 1)]


def fmt(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std [lo, hi]`` (the 95% CI of the mean), or ``n/a``."""
    if s["mean"] is None:
        return "n/a"
    text = f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
    if s.get("ci95") is not None:
        lo, hi = scale * (s["mean"] - s["ci95"]), scale * (s["mean"] + s["ci95"])
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def table(summary: dict[str, dict[str, Any]], last: int | None = None, validation: bool = False) -> str:
    """One row per label: mean ± std [95% CI] over seeds; columns without any value are left out; with
    ``validation``, the validation split's ACC and BWT instead of the test figures (what a choice among
    tuning runs is made on)."""
    shown = [*VAL_COLUMNS, *(c for c in COLUMNS if c[0] in NOT_ACCURACY)] if validation else COLUMNS
    cols = [c for c in shown if any(row[c[0]]["mean"] is not None for row in summary.values())]
    header = ["method", "uses at test", "scenario", "seeds", *(c[1] for c in cols)]
    rows = [
        [label, uses_at_test(row.get("test_time_info")), row.get("scenario") or "n/a", str(len(row["seeds"])),
         *(fmt(row[k], scale, digits) for k, _, scale, digits in cols)]
        for label, row in summary.items()
    ]
    text = markdown_table(header, rows)
    text += "\n\nmean ± std [95% confidence interval of the mean, Student's t] over the seeds of each row; "
    text += "validation figures (choose on these; test figures not shown)" if validation else "test figures"
    over = f"the last {last} task{'s' if last > 1 else ''}" if last else "every task after the first"
    few = " few-shot," if any(c[0] == "few_shot" for c in cols) else ""
    text += f"; steps to 90% over {over}." if validation else f"; zero-shot,{few} just trained, Q and steps to 90% over {over}."
    if not validation and any(row["q"]["mean"] is not None for row in summary.values()):
        text += " Q against the XdG run of the same stream and seed."
    text += baseline_notes(summary, last, validation)
    infos = {row.get("test_time_info") for row in summary.values() if row.get("test_time_info")}
    if len(infos) > 1:
        text += (
            "\n\nNot like for like: these methods use different information at test time "
            f"({', '.join(sorted(uses_at_test(i) for i in infos))}); compare within the same 'uses at test'."
        )
    benches = {row.get("benchmark") for row in summary.values()}
    if len(benches) > 1:
        text += f"\n\nThe rows come from different benchmarks ({', '.join(sorted(str(b) for b in benches))})."
    return text


def baseline_notes(summary: dict[str, dict[str, Any]], last: int | None = None, validation: bool = False) -> str:
    """What the table says about Q's baseline: matched on density, stabiliser strength and backbone, Q (all tasks)
    over every task after the first, and the rows whose XdG run did not match (their Q and gain refused)."""
    if validation or not any(row.get("q", {}).get("mean") is not None or row.get("q_baseline_unmatched") for row in summary.values()):
        return ""
    text = " Q's XdG + SI run matches each row on mask density, stabiliser strength and backbone; the zero-shot gain is in points"
    text += ", Q (all tasks) over every task after the first." if last else "."
    for label, row in summary.items():
        if row.get("q_baseline_unmatched"):
            text += f"\n\nFlagged: {label}'s Q and gain are against an XdG run that does not match it ({row['q_baseline_unmatched']})."
    return text


def aggregate_paths(paths: Sequence[Path], last: int | None = None, validation: bool = False) -> tuple[dict[str, dict[str, Any]], str]:
    """Find, group and summarise the runs at or below ``paths``: (summary, Markdown table); per-task
    figures over the last ``last`` tasks (default: every task after the first); ``validation``: the
    validation split's ACC and BWT in place of the test figures."""
    records = find_runs(paths)
    summary = summarise(group(records), records, last)
    text = table(summary, last, validation)
    same = [f"{', '.join(d)} (as {k})" for row in summary.values() for k, d in row["duplicates"].items()]
    if same:
        text += f"\n\nCounted once (the same config and seed as an earlier folder): {'; '.join(same)}."
    return summary, text
