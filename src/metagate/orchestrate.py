"""Planning and running many runs: a run with its reference, a comparison of methods over seeds,
choosing on validation, resume, retries. The CLI is only a face over this module: it parses arguments
and prints. Plans are typed (:mod:`metagate.plan`); their tables come from :mod:`metagate.aggregate`.

This module owns the run folder's life: it creates or opens a folder, holds its lock while a run trains,
checks once that a folder it resumes or reuses holds the same run (:mod:`metagate.identity`), and reuses
a finished reference. Every run keeps the run-folder contract (:mod:`metagate.runs`) and gets its own
per-task table (``per_task.md``). A comparison keeps going when an entry fails: the failure is recorded
in the entry's folder (``error.txt``, with the traceback) and in ``comparison.json`` / ``comparison.md``,
the other entries run, and ``--resume`` retries the failed entries (a failed attempt without a usable
checkpoint is moved aside as ``seedN.failed-K``, never deleted) and continues the interrupted ones.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from metagate import aggregate, report
from metagate.config import ConfigError, config_from_dict, load_config
from metagate.identity import describe_difference, same_run
from metagate.plan import Job, Plan, Variant, expand, parse_entries, parse_grid, plan_jobs, split_overrides
from metagate.runs import CheckpointError, RunDir, RunFolderBusy, RunFolderError, atomic_write_json, atomic_write_text, default_run_dir
from metagate.schema import ExperimentConfig
from metagate.train import Trainer, TrainingDiverged

REFERENCE_DIR = "reference"
PER_TASK = "per_task.md"

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


def check_same_run(saved: dict[str, Any], cfg: ExperimentConfig, folder: Path, what: str, advice: str) -> None:
    """The one identity check before a run folder is resumed or reused: ``saved`` (its config) must be the
    same run as ``cfg`` (:func:`metagate.identity.same_run`), else ``CheckpointError`` naming what differs."""
    if not same_run(saved, cfg.to_dict()):
        raise CheckpointError(f"{folder} holds {what} of another config ({describe_difference(saved, cfg.to_dict())}); {advice}")


def prepare(cfg: ExperimentConfig, folder: Path, resume: bool = False) -> Prepared:
    """Check everything a run needs before anything is written: the folder (with ``resume``: that it holds this
    config's run), the machine (device, memory), the data, the method's fit to the stream. Only then is a new
    folder created. The folder is locked from here until :func:`train` ends."""
    if resume:
        run = RunDir.open_for_resume(folder)
        try:
            check_same_run(run.read_config(), cfg, folder, "a run",
                           "resume with the run's own config.yaml (no overrides), or start a new run in another --out")
        except BaseException:
            run.unlock()
            raise
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
    check_same_run(RunDir(folder).read_config(), cfg, folder, "a finished run", "delete it, or use another --out, to run this one")
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


@dataclass
class RunOutcome:
    """What ``metagate run`` made: the run's results, its references' (in config order) and the per-task table."""

    results: dict[str, Any]
    references: list[dict[str, Any]]
    per_task: str


def run_config(config: str | None, overrides: list[str], out: Path | None, resume: bool) -> tuple[ExperimentConfig, Path]:
    """The config and folder of ``metagate run``. With ``resume``, the run's own ``config.yaml`` (``overrides`` on
    top) unless ``config`` names another, and a folder whose run and references all finished is refused."""
    if not resume:
        cfg = load_config(config, overrides)
        return cfg, out or default_run_dir(Path("runs"), cfg.benchmark.name, cfg.method.name, cfg.seed)
    if out is None:
        raise ConfigError("--resume needs --out DIR, the run folder to continue")
    saved = RunDir.open_for_resume(out)
    saved.unlock()  # the run itself takes the lock again
    cfg = config_from_dict(saved.read_config(), overrides) if config is None else load_config(config, overrides)
    references_done = all((out / reference_dir(i) / RunDir.RESULTS).is_file() for i in range(len(cfg.reference_configs())))
    if saved.has_results() and references_done:
        raise RunFolderError(f"{out} holds a finished run (results.json); nothing to resume")
    return cfg, out


def run_with_reference(
    cfg: ExperimentConfig, out: Path, resume: bool, echo: Echo = _quiet, on_ready: Callable[[Prepared], None] | None = None
) -> RunOutcome:
    """``metagate run``: the method into ``out``, then the config's references (if any) into
    ``out/reference``, ``out/reference-2``, ... (with ``resume``, a finished one is reused), and ``per_task.md``
    with all. ``on_ready`` sees the prepared run before it trains."""
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
    table = report.per_task_table(results, references)
    atomic_write_text(out / PER_TASK, table + "\n")
    return RunOutcome(results, references, table)


def reference_dir(i: int) -> str:
    """The folder, inside a run's, of its ``i``-th reference run: ``reference``, ``reference-2``, ..."""
    return REFERENCE_DIR if i == 0 else f"{REFERENCE_DIR}-{i + 1}"


# --------------------------------------------------------------------------- running a plan


@dataclass
class CompareOutcome:
    plan: Plan
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: dict[tuple[str, int], str] = field(default_factory=dict)
    table: str = ""


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


def _earlier_records(label: str, entry: dict[str, Any]) -> list[aggregate.RunRecord]:
    """The finished runs an earlier comparison lists for ``label`` (those still readable)."""
    records = []
    for folder in entry.get("runs") or []:
        try:
            records.append(aggregate.read_run(Path(folder), label))
        except aggregate.AggregationError:
            continue
    return records


def run_compare(plan: Plan, resume: bool, echo: Echo = _quiet, execute: Executor = run_inline) -> CompareOutcome:
    """Run every job (with ``execute``: in this process by default, or on Ray, :mod:`metagate.sweep`);
    a failing one is recorded and the others go on. Writes ``comparison.json`` (per label, the statistics of
    :func:`metagate.aggregate.summarise`, its runs and its failures) and ``comparison.md`` (the table of
    :func:`metagate.aggregate.table`, and the failed runs); labels of an earlier comparison in the folder (on the
    same benchmark) that this one does not run are kept in both, as they were."""
    plan.root.mkdir(parents=True, exist_ok=True)
    outcome = CompareOutcome(plan, {label: [] for label in plan.labels})
    ended: dict[tuple[str, int], dict[str, Any]] = {}
    for key, result in execute(plan.jobs, resume, echo):
        ended[key] = result
        if result["status"] == "failed":
            outcome.failures[key] = result["error"]
            echo(f"   failed: {key[0]}, seed {key[1]}: {result['error']}")
    groups: dict[str, list[aggregate.RunRecord]] = {label: [] for label in plan.labels}
    for job in plan.jobs:  # results in plan order, whatever order they ended in
        if job.key in ended and ended[job.key]["status"] == "finished":
            results = ended[job.key]["results"]
            outcome.results[job.variant.label].append(results)
            groups[job.variant.label].append(aggregate.RunRecord(job.folder, job.variant.label, job.cfg.to_dict(), results))
    benchmark = plan.jobs[0].cfg.benchmark.name
    # labels an earlier comparison in this folder ran (--resume with another method set) stay in it
    earlier = {label: entry for label, entry in _earlier_comparison(plan.root, benchmark).items() if label not in groups}
    summary = aggregate.summarise({**{label: _earlier_records(label, e) for label, e in earlier.items()}, **groups})
    methods = {
        label: {
            "summary": summary[label],
            "seeds": plan.seeds,
            "runs": [str(plan.folder(label, r["seed"])) for r in outcome.results[label]],
            "failed": {str(s): line for (lab, s), line in outcome.failures.items() if lab == label},
        }
        for label in plan.labels
    }
    methods = {**earlier, **methods}
    atomic_write_json(plan.root / "comparison.json", {"benchmark": benchmark, "seeds": plan.seeds, "methods": methods})
    outcome.table = aggregate.table(summary)
    failed = [f"{label} (seed {seed})" for label, e in methods.items() for seed in e.get("failed", {})]
    if failed:
        outcome.table += f"\n\nfailed runs, not in the figures above (see error.txt in their folders): {', '.join(failed)}."
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


def choose_on_validation(results: dict[str, list[dict[str, Any]]], candidates: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, Any]]:
    """Per method, the variant with the highest mean validation accuracy (``val_acc``) over its tuning
    runs. Reads nothing but validation figures: test accuracy never takes part in the choice."""
    scores = {v: aggregate.stat([r.get("val_acc") for r in runs]) for v, runs in results.items()}
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
    return tune_variants(config, overrides, method_of, parse_grid(grid, list(method_of)), tuning_seeds, seeds, out, resume, echo,
                         choose_only, execute)


def tune_variants(
    config: str | None, overrides: list[str], method_of: dict[str, str], points: dict[str, list[list[str]]],
    tuning_seeds: int, seeds: int, out: Path, resume: bool, echo: Echo = _quiet, choose_only: bool = False,
    execute: Executor = run_inline, on_planned: Callable[[], None] | None = None,
) -> TuneOutcome:
    """The protocol in one command: every variant (``points``: per method label, lists of overrides) on
    ``tuning_seeds`` seeds from :data:`TUNING_SEED_BASE` (into ``out/tuning``), the best per method chosen
    on validation accuracy, then the chosen ones on ``seeds`` fresh seeds (into ``out/final``), whose test
    figures are reported (``choose_only``: stop after the choice, for experiments that run the chosen
    settings themselves). ``on_planned`` is called once the tuning runs are validated, before any is written."""
    general, own = split_overrides(overrides, list(method_of))
    candidates = expand(method_of, points, own)
    variants = [v for vs in candidates.values() for v in vs]
    tuning_plan = plan_jobs(config, general, variants, tuning_seeds, out / "tuning", resume, lambda b, s: out / "tuning",
                            first_seed=TUNING_SEED_BASE)
    if on_planned is not None:  # every tuning config validated, nothing written yet
        on_planned()
    echo(f"tuning: {len(variants)} variants x {tuning_seeds} seeds (from {TUNING_SEED_BASE}), chosen on validation accuracy")
    tuning = run_compare(tuning_plan, resume, echo, execute)
    labels = {label: [v.label for v in vs] for label, vs in candidates.items()}
    picked, scores = choose_on_validation(tuning.results, labels)
    chosen = {label: points[label][labels[label].index(v)] for label, v in picked.items()}
    record = {
        "protocol": "each variant on tuning seeds, chosen by mean val_acc; chosen variants rerun on fresh seeds, test reported",
        "tuning_seeds": tuning_plan.seeds,
        "final_seeds": None,
        "candidates": {label: dict(zip(labels[label], points[label])) for label in candidates},
        "validation": {v: {k: s[k] for k in ("mean", "std", "ci95", "n")} for v, s in scores.items()},
        "chosen": chosen,
    }
    atomic_write_json(out / "tuning.json", record)
    if choose_only:
        return TuneOutcome(chosen, tuning, None, scores)
    final = [Variant(label, method, (*chosen[label], *own.get(label, []))) for label, method in method_of.items()]
    final_plan = plan_jobs(config, general, final, seeds, out / "final", resume, lambda b, s: out / "final")
    echo(f"final: the chosen variants on {seeds} fresh seeds; test figures reported")
    finished = run_compare(final_plan, resume, echo, execute)
    atomic_write_json(out / "tuning.json", {**record, "final_seeds": final_plan.seeds})
    return TuneOutcome(chosen, tuning, finished, scores)
