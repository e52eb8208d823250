"""Planning and running many runs: a run with its reference, a comparison of methods over seeds,
resume, retries. The CLI is only a face over this module: it parses arguments and prints.

Every run keeps the run-folder contract (:mod:`metagate.runs`) and gets its own per-task table
(``per_task.md``). A comparison keeps going when an entry fails: the failure is recorded in the entry's
folder (``error.txt``, with the traceback) and in ``comparison.json`` / ``comparison.md``, the other
entries run, and ``--resume`` retries the failed entries (a failed attempt without a usable checkpoint
is moved aside as ``seedN.failed-K``, never deleted) and continues the interrupted ones.
"""

from __future__ import annotations

import json
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from metagate import report
from metagate.config import ConfigError, apply_overrides, config_from_dict, find_config, read_yaml
from metagate.runs import CheckpointError, RunDir, RunFolderBusy, RunFolderError, atomic_write_json, atomic_write_text
from metagate.runtime import check_machine
from metagate.schema import ExperimentConfig
from metagate.train import Trainer, TrainingDiverged, describe_difference, same_run

REFERENCE_DIR = "reference"
PER_TASK = "per_task.md"
SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# What a run can fail with that is the user's to fix (printed as one line, not a traceback).
RunProblem = (ConfigError, RunFolderError, CheckpointError, TrainingDiverged, ValueError)

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------- one run


@dataclass
class Prepared:
    """A run whose config, machine, data and folder have all been checked: ready to train."""

    cfg: ExperimentConfig
    trainer: Trainer
    run: RunDir
    resume: bool


def prepare(cfg: ExperimentConfig, folder: Path, resume: bool = False) -> Prepared:
    """Check everything a run needs before anything is written: the folder, the machine (device,
    memory), the data, the method's fit to the stream. Only then is a new folder created (and locked)."""
    if resume:
        run = RunDir.open_for_resume(folder)
        saved = run.read_config()
        if not same_run(saved, cfg.to_dict()):
            run.unlock()
            raise CheckpointError(
                f"{folder} holds a run of another config ({describe_difference(saved, cfg.to_dict())}); "
                "resume with the run's own config.yaml (no overrides), or start a new run in another --out"
            )
    else:
        RunDir.check_new(folder)
    try:
        trainer = Trainer(cfg)  # builds the stream and the method: refuses what does not fit
    except BaseException:
        if resume:
            run.unlock()
        raise
    if not resume:
        run = RunDir.create(folder)
    trainer.run = run
    return Prepared(cfg, trainer, run, resume)


def train(prepared: Prepared) -> dict[str, Any]:
    """Train a prepared run to the end; the folder's lock is released afterwards."""
    try:
        return prepared.trainer.fit(resume=prepared.resume)
    finally:
        prepared.run.unlock()


def finished_results(cfg: ExperimentConfig, folder: Path) -> dict[str, Any]:
    """The results of a finished run in ``folder``, if it is a run of ``cfg``; else a clear error."""
    saved = RunDir(folder).read_config()
    if not same_run(saved, cfg.to_dict()):
        raise RunFolderError(
            f"{folder} holds a finished run of another config ({describe_difference(saved, cfg.to_dict())}); "
            "delete it, or use another --out, to run this one"
        )
    return RunDir(folder).read_results()


def _move_aside(folder: Path, why: str) -> Path:
    """Rename ``folder`` to the first free ``<name>.<why>-K`` beside it (nothing is deleted)."""
    k = 1
    while (aside := folder.with_name(f"{folder.name}.{why}-{k}")).exists():
        k += 1
    folder.rename(aside)
    return aside


def run_or_reuse(cfg: ExperimentConfig, folder: Path, resume: bool, echo: Echo = _quiet) -> dict[str, Any]:
    """Train ``cfg`` into ``folder``. With ``resume``: reuse a finished run of the same config, continue
    an interrupted one from its checkpoint, and retry a failed one (from its checkpoint when it has one
    of the same config, else afresh, its old folder moved aside)."""
    run = RunDir(folder)
    if resume and run.has_results():
        return finished_results(cfg, folder)
    if resume and folder.is_dir() and any(folder.iterdir()):
        failed = run.file(RunDir.ERROR).is_file()
        usable = run.checkpoint_path.is_file() and (
            not failed or same_run(run.load_checkpoint().get("config", {}), cfg.to_dict())
        )
        if usable:
            echo(f"resuming {folder} from its last checkpoint" + (" (it failed before)" if failed else ""))
            return _train_with_table(prepare(cfg, folder, resume=True))
        if failed or not run.checkpoint_path.is_file():
            RunDir(folder).lock().unlock()  # refuses a folder another process is using
            aside = _move_aside(folder, "failed" if failed else "interrupted")
            echo(f"{folder} {'had failed' if failed else 'stopped before its first checkpoint'}: kept as {aside}, running it afresh")
    return _train_with_table(prepare(cfg, folder))


def _train_with_table(prepared: Prepared) -> dict[str, Any]:
    results = train(prepared)
    atomic_write_text(prepared.run.file(PER_TASK), report.per_task_table(results) + "\n")
    return results


def run_with_reference(
    cfg: ExperimentConfig, out: Path, resume: bool, echo: Echo = _quiet, on_ready: Callable[[Prepared], None] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``metagate run``: the method into ``out``, then the config's references (if any) into
    ``out/reference``, ``out/reference-2``, ..., and ``per_task.md`` with all. ``on_ready`` sees the prepared run before it trains."""
    run = RunDir(out)
    if resume and run.has_results():
        results = finished_results(cfg, out)
    else:
        prepared = prepare(cfg, out, resume)
        if on_ready is not None:
            on_ready(prepared)
        results = train(prepared)
    references = []
    for i, ref_cfg in enumerate(cfg.reference_configs()):
        folder = out / reference_dir(i)
        echo(f"reference: {ref_cfg.method.name} on the same stream and seed -> {folder}")
        references.append(run_or_reuse(ref_cfg, folder, resume, echo))
    atomic_write_text(out / PER_TASK, report.per_task_table(results, references) + "\n")
    return results, references


def reference_dir(i: int) -> str:
    """The folder, inside a run's, of its ``i``-th reference run: ``reference``, ``reference-2``, ..."""
    return REFERENCE_DIR if i == 0 else f"{REFERENCE_DIR}-{i + 1}"


# --------------------------------------------------------------------------- comparisons


@dataclass
class ComparePlan:
    """Every (label, seed) config of a comparison, validated before anything runs."""

    root: Path
    labels: list[str]
    seeds: list[int]
    configs: dict[tuple[str, int], ExperimentConfig]

    def folder(self, label: str, seed: int) -> Path:
        return self.root / label / f"seed{seed}"


@dataclass
class CompareOutcome:
    plan: ComparePlan
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: dict[tuple[str, int], str] = field(default_factory=dict)
    table: str = ""


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


def plan_compare(
    config: str | None, overrides: list[str], methods: str, seeds: int, out: Path | None, resume: bool, default_root: Callable[[str, int], Path]
) -> ComparePlan:
    """Validate every (label, seed) config before anything is trained or written."""
    method_of = parse_entries(methods)
    general, specific = split_overrides(overrides, list(method_of))
    base = apply_overrides(read_yaml(find_config(config)), general)
    base_seed = config_from_dict(base).seed
    seed_list = [base_seed + k for k in range(seeds)]
    configs = {
        (label, seed): config_from_dict(
            base, [f"method.name={method}", f"seed={seed}", "reference=null", *specific.get(label, [])]
        )
        for label, method in method_of.items()
        for seed in seed_list
    }
    for cfg in configs.values():
        check_machine(cfg)
    first = configs[(next(iter(method_of)), base_seed)]
    root = out or default_root(first.benchmark.name, base_seed)
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"{root} is a file, not a folder; nothing was written. Choose another --out.")
    if root.exists() and any(root.iterdir()) and not resume:
        raise RunFolderError(f"{root} already exists and is not empty; nothing was written. Pass --resume or another --out.")
    return ComparePlan(root, list(method_of), seed_list, configs)


def _record_failure(folder: Path, error: BaseException) -> str:
    """Write ``error.txt`` (message and traceback) into the entry's folder; returns the one-line message."""
    text = str(error) if isinstance(error, RunProblem) else f"{type(error).__name__}: {error}"
    line = (text.strip().splitlines() or [type(error).__name__])[0]
    # never write into a folder another process holds, nor into a finished run
    if not isinstance(error, RunFolderBusy) and not RunDir(folder).has_results():
        text = f"{line}\n\n{''.join(traceback.format_exception(type(error), error, error.__traceback__))}"
        try:
            atomic_write_text(folder / RunDir.ERROR, text)
        except RunFolderError:
            pass
    return line


@dataclass
class Job:
    """One run of a plan: its (label, seed), config and folder."""

    key: tuple[str, int]
    cfg: ExperimentConfig
    folder: Path


# An executor runs jobs and yields (key, outcome) as each ends, in any order; an outcome is
# {"status": "finished", "results": {...}} or {"status": "failed", "error": "one line"}.
Executor = Callable[[list[Job], bool, Echo], Iterator[tuple[tuple[str, int], dict[str, Any]]]]


def run_job(cfg: ExperimentConfig, folder: Path, resume: bool, echo: Echo = _quiet) -> dict[str, Any]:
    """One run of a plan, its failure recorded in its folder (``error.txt``) instead of raised."""
    try:
        return {"status": "finished", "results": run_or_reuse(cfg, folder, resume, echo)}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  (any failure of one run must not stop the others)
        return {"status": "failed", "error": _record_failure(folder, e)}


def run_inline(jobs: list[Job], resume: bool, echo: Echo = _quiet) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
    """The jobs one after another in this process (the default of ``compare`` and ``tune``)."""
    for job in jobs:
        echo(f"== {job.key[0]}, seed {job.key[1]} -> {job.folder}")
        yield job.key, run_job(job.cfg, job.folder, resume, echo)


def _earlier_comparison(root: Path, benchmark: str) -> dict[str, dict[str, Any]]:
    """The methods of a ``comparison.json`` already in ``root`` on the same benchmark (none if absent or unreadable)."""
    try:
        old = json.loads((root / "comparison.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("benchmark") != benchmark or not isinstance(old.get("methods"), dict):
        return {}
    return {label: {"seeds": old.get("seeds"), **entry} for label, entry in old["methods"].items() if isinstance(entry, dict) and "summary" in entry}


def run_compare(plan: ComparePlan, resume: bool, echo: Echo = _quiet, execute: Executor = run_inline) -> CompareOutcome:
    """Run every entry (with ``execute``: in this process by default, or on Ray, :mod:`metagate.sweep`);
    a failing entry is recorded and the others go on. Writes ``comparison.json`` and ``comparison.md``
    for what finished (failed entries marked as such); methods of an earlier comparison in the folder (on the
    same benchmark) that this one does not run are kept in both, as they were."""
    plan.root.mkdir(parents=True, exist_ok=True)
    outcome = CompareOutcome(plan, {label: [] for label in plan.labels})
    jobs = [Job(key, cfg, plan.folder(*key)) for key, cfg in plan.configs.items()]
    ended: dict[tuple[str, int], dict[str, Any]] = {}
    for key, result in execute(jobs, resume, echo):
        ended[key] = result
        if result["status"] == "failed":
            outcome.failures[key] = result["error"]
            echo(f"   failed: {key[0]}, seed {key[1]}: {result['error']}")
    for key in plan.configs:  # results in plan order, whatever order they ended in
        if key in ended and ended[key]["status"] == "finished":
            outcome.results[key[0]].append(ended[key]["results"])
    summary = {label: report.aggregate(outcome.results[label], len(plan.seeds)) for label in plan.labels}
    failed = {label: [s for (lab, s) in outcome.failures if lab == label] for label in plan.labels}
    benchmark = next(iter(plan.configs.values())).benchmark.name
    methods = {
        label: {
            "summary": summary[label],
            "seeds": plan.seeds,
            "runs": [str(plan.folder(label, r["seed"])) for r in outcome.results[label]],
            "failed": {str(s): outcome.failures[(label, s)] for s in failed[label]},
        }
        for label in plan.labels
    }
    # methods an earlier comparison in this folder ran (--resume with another method set) stay in it
    earlier = {label: entry for label, entry in _earlier_comparison(plan.root, benchmark).items() if label not in methods}
    methods = {**earlier, **methods}
    atomic_write_json(plan.root / "comparison.json", {"benchmark": benchmark, "seeds": plan.seeds, "methods": methods})
    outcome.table = report.comparison_table({label: e["summary"] for label, e in methods.items()},
                                            {label: len(e.get("failed", {})) for label, e in methods.items()})
    atomic_write_text(plan.root / "comparison.md", outcome.table + "\n")
    return outcome


# --------------------------------------------------------------------------- choose on validation, report test


TUNING_SEED_BASE = 1000  # tuning seeds never overlap the reporting seeds (0, 1, 2, ...)


@dataclass
class TuneOutcome:
    chosen: dict[str, list[str]]  # method label -> the overrides chosen on validation
    tuning: CompareOutcome
    final: CompareOutcome | None  # None with choose_only
    scores: dict[str, dict[str, Any]]  # variant label -> its validation figures


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
        axes[label].append([f"{key}={v.strip()}" for v in values.split(",") if v.strip()])
    combos: dict[str, list[list[str]]] = {}
    for label, lists in axes.items():
        out: list[list[str]] = [[]]
        for values in lists:
            out = [[*prefix, v] for prefix in out for v in values]
        combos[label] = out
    return combos


def variant_label(label: str, overrides: list[str]) -> str:
    """A safe folder name for a grid point: ``si`` + ``method.c=0.1`` -> ``si_c-0.1``."""
    parts = [o.split("=", 1)[0].split(".")[-1] + "-" + o.split("=", 1)[1] for o in overrides]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join([label, *parts]))


def choose_on_validation(results: dict[str, list[dict[str, Any]]], candidates: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, Any]]:
    """Per method, the variant with the highest mean validation accuracy (``val_acc``) over its tuning
    runs. Reads nothing but validation figures: test accuracy never takes part in the choice."""
    scores = {v: report.mean_std([r.get("val_acc") for r in runs]) for v, runs in results.items()}
    chosen = {}
    for method, variants in candidates.items():
        scored = [(scores[v]["mean"], v) for v in variants if scores[v]["mean"] is not None]
        if not scored:
            raise RunFolderError(f"no tuning run of {method} finished with a validation accuracy; nothing to choose from")
        chosen[method] = max(scored)[1]
    return chosen, scores


def run_tune(
    config: str | None, overrides: list[str], methods: str, grid: list[str], tuning_seeds: int, seeds: int,
    out: Path, resume: bool, echo: Echo = _quiet, choose_only: bool = False, execute: Executor = run_inline,
) -> TuneOutcome:
    """``metagate tune``: :func:`tune_variants` over the product of ``--grid`` values per method."""
    method_of = parse_entries(methods)
    combos = parse_grid(grid, list(method_of))
    return tune_variants(config, overrides, method_of, combos, tuning_seeds, seeds, out, resume, echo, choose_only, execute)


def tune_variants(
    config: str | None, overrides: list[str], method_of: dict[str, str], combos: dict[str, list[list[str]]],
    tuning_seeds: int, seeds: int, out: Path, resume: bool, echo: Echo = _quiet, choose_only: bool = False,
    execute: Executor = run_inline, on_planned: Callable[[], None] | None = None,
) -> TuneOutcome:
    """The protocol in one command: every variant (``combos``: per method label, lists of overrides) on
    ``tuning_seeds`` seeds from :data:`TUNING_SEED_BASE` (into ``out/tuning``), the best per method chosen
    on validation accuracy, then the chosen ones on ``seeds`` fresh seeds (into ``out/final``), whose test
    figures are reported (``choose_only``: stop after the choice, for experiments that run the chosen
    settings themselves). ``on_planned`` is called once the tuning runs are validated, before any is written."""
    general, per_label = split_overrides(overrides, list(method_of))
    entries, specific, candidates = [], [], {}
    for label, points in combos.items():
        candidates[label] = []
        for point in points:
            v = variant_label(label, point)
            candidates[label].append(v)
            entries.append(f"{v}={method_of[label]}")
            specific += [f"{v}:{o}" for o in point]
    for label, rests in per_label.items():  # label:key=value applies to each of that method's variants
        specific += [f"{v}:{rest}" for v in candidates[label] for rest in rests]
    tuning_plan = plan_compare(
        config, [*general, f"seed={TUNING_SEED_BASE}", *specific], ",".join(entries), tuning_seeds, out / "tuning", resume,
        lambda b, s: out / "tuning",
    )
    if on_planned is not None:  # every tuning config validated, nothing written yet
        on_planned()
    echo(f"tuning: {len(entries)} variants x {tuning_seeds} seeds (from {TUNING_SEED_BASE}), chosen on validation accuracy")
    tuning = run_compare(tuning_plan, resume, echo, execute)
    picked, scores = choose_on_validation(tuning.results, candidates)
    chosen = {label: combos[label][candidates[label].index(v)] for label, v in picked.items()}
    record = {
        "protocol": "each variant on tuning seeds, chosen by mean val_acc; chosen variants rerun on fresh seeds, test reported",
        "tuning_seeds": tuning_plan.seeds,
        "final_seeds": None,
        "candidates": {label: dict(zip(candidates[label], combos[label])) for label in candidates},
        "validation": {v: {"mean": s["mean"], "std": s["std"], "n": s["n"]} for v, s in scores.items()},
        "chosen": chosen,
    }
    atomic_write_json(out / "tuning.json", record)
    if choose_only:
        return TuneOutcome(chosen, tuning, None, scores)
    final_specific = [f"{label}:{o}" for label, ovs in chosen.items() for o in ovs]
    final_specific += [f"{label}:{rest}" for label, rests in per_label.items() for rest in rests]
    methods = ",".join(f"{label}={method}" for label, method in method_of.items())
    final_plan = plan_compare(
        config, [*general, *final_specific], methods, seeds, out / "final", resume, lambda b, s: out / "final"
    )
    echo(f"final: the chosen variants on {seeds} fresh seeds; test figures reported")
    final = run_compare(final_plan, resume, echo, execute)
    atomic_write_json(out / "tuning.json", {**record, "final_seeds": final_plan.seeds})
    return TuneOutcome(chosen, tuning, final, scores)
