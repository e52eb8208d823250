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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from metagate import aggregate, report
from metagate.config import ConfigError, config_from_dict, load_config
from metagate.identity import describe_difference, same_run
from metagate.plan import Job, Plan, Variant, expand, parse_entries, parse_grid, plan_jobs, split_overrides
from metagate.runs import (
    CheckpointError, RunDir, RunFolderBusy, RunFolderError, atomic_write_json, atomic_write_text, default_run_dir, write_problem,
)
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
    check_references(cfg)  # a reference that cannot run is refused before the method trains (not after)
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


def check_references(cfg: ExperimentConfig) -> None:
    """Build every reference of ``cfg`` on its stream (nothing trains, nothing is written) so that one that does
    not fit (an oracle whose masks cover another width, ...) is refused now, in one line that names the
    reference's own keys, instead of after the method and the earlier references trained."""
    many = isinstance(cfg.reference, list)
    for i, ref_cfg in enumerate(cfg.reference_configs()):
        where = f"reference[{i}]" if many else "reference"
        try:
            Trainer(ref_cfg)
        except (ConfigError, ValueError) as e:
            how = "in the config file's reference list" if many else "as overrides"
            text = str(e).replace("method.", f"{where}.")
            raise ConfigError(f"{where} ({ref_cfg.method.name}) cannot run on this stream: {text} ({how}); nothing was trained") from None


def reference_dir(i: int) -> str:
    """The folder, inside a run's, of its ``i``-th reference run: ``reference``, ``reference-2``, ..."""
    return REFERENCE_DIR if i == 0 else f"{REFERENCE_DIR}-{i + 1}"


# --------------------------------------------------------------------------- folders of many runs


COMPARISON_JSON, COMPARISON_MD = "comparison.json", "comparison.md"
_held: dict[Path, list[Any]] = {}  # folders this process holds: resolved path -> [its RunDir, made by it, depth]


def check_out(root: Path) -> None:
    """A folder for many runs that can be made (or used): refused in one line when it is a file or under one."""
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"{root} is a file, not a folder; nothing was written. Choose another --out.")
    above = next((p for p in root.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise RunFolderError(f"{above} is a file, so no folder can be made under it; nothing was written. Choose another --out.")


def holds_files(root: Path) -> bool:
    """Whether ``root`` is a folder with anything in it besides its lock."""
    return root.is_dir() and any(p.name != RunDir.LOCK for p in root.iterdir())


def check_folders(plan: Plan, resume: bool) -> None:
    """Everything about a plan's folders, before anything in them is touched: the folder can be made; without
    ``resume`` it is empty; with ``resume`` it is a comparison's folder of the same benchmark (its summaries are
    ours to rewrite), and every run in it that would be reused or resumed is a run of its job's config (a
    failed run is retried whatever its config: its attempt is moved aside)."""
    root = plan.root
    check_out(root)
    if not holds_files(root):
        return
    if not resume:
        raise RunFolderError(f"{root} already exists and is not empty; nothing was written. Pass --resume or another --out.")
    benchmark = plan.jobs[0].cfg.benchmark.name
    if (root / COMPARISON_JSON).exists() or (root / COMPARISON_MD).exists():
        try:
            record = json.loads((root / COMPARISON_JSON).read_text())
            methods, earlier = record.get("methods"), record.get("benchmark")
        except (OSError, ValueError, AttributeError):
            methods = earlier = None
        if not isinstance(methods, dict):
            raise RunFolderError(
                f"{root} is not the folder of a comparison (it holds a {COMPARISON_MD} or {COMPARISON_JSON} that metagate did not "
                "write), so continuing here would write over them; nothing was written. Choose another --out."
            )
        if earlier != benchmark:
            raise RunFolderError(
                f"{root} holds a comparison on {earlier}, not {benchmark}; continuing here would write over its record; "
                "nothing was written. Choose another --out."
            )
    for job in plan.jobs:
        run = RunDir(job.folder)
        kept = run.has_results() or (run.checkpoint_path.is_file() and not run.file(RunDir.ERROR).is_file())
        if kept and not same_run(saved := run.read_config(), job.cfg.to_dict()):
            raise RunFolderError(
                f"{job.folder} holds a run of another config ({describe_difference(saved, job.cfg.to_dict())}); nothing was "
                "written. Rerun with the settings it was made with, or choose another --out."
            )


@contextmanager
def holding(folder: Path) -> Iterator[None]:
    """Hold the folder of a compare, tune or sweep while it runs (its ``.lock``, as a run folder's): a second
    command on it is refused at once, naming the holder. The folder is made here (a one-line error where it
    cannot be), and removed again if nothing was written into it (a command refused once it held it, such as a
    Ray cluster without the resources asked for). Re-entrant within this process: a tuned sweep holds its
    folder while its stages run."""
    key = folder.resolve()
    if key in _held:
        _held[key][2] += 1
    else:
        made = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_problem(folder, e) from None
        try:
            _held[key] = [RunDir(folder).lock(), made, 1]
        except RunFolderError:
            if made:
                folder.rmdir()
            raise
    try:
        yield
    finally:
        _held[key][2] -= 1
        if _held[key][2] == 0:
            run, made, _ = _held.pop(key)
            run.unlock()
            if made and not holds_files(folder):
                (folder / RunDir.LOCK).unlink(missing_ok=True)
                folder.rmdir()


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
    with holding(plan.root):
        return _run_compare(plan, resume, echo, execute)


def _run_compare(plan: Plan, resume: bool, echo: Echo, execute: Executor) -> CompareOutcome:
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
    tuning_plan = plan_jobs(config, general, variants, tuning_seeds, out / "tuning", lambda b, s: out / "tuning", first_seed=TUNING_SEED_BASE)
    check_out(out)
    check_folders(tuning_plan, resume)
    if any(job.cfg.benchmark.val_fraction == 0 for job in tuning_plan.jobs):
        raise ConfigError(
            "tune chooses on validation accuracy, but benchmark.val_fraction=0 leaves no validation split to choose on; "
            "set benchmark.val_fraction (e.g. 0.1); nothing was run"
        )
    with holding(out):  # tuning/, final/ and tuning.json: one writer
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
        final_plan = plan_jobs(config, general, final, seeds, out / "final", lambda b, s: out / "final")
        check_folders(final_plan, resume)
        echo(f"final: the chosen variants on {seeds} fresh seeds; test figures reported")
        finished = run_compare(final_plan, resume, echo, execute)
        atomic_write_json(out / "tuning.json", {**record, "final_seeds": final_plan.seeds})
        return TuneOutcome(chosen, tuning, finished, scores)
