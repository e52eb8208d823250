"""``metagate`` command line: run, compare, tune, sweep, aggregate, report, list. A face only: it parses arguments and prints;
planning and running live in :mod:`metagate.orchestrate`.

torch is imported by the commands that train, never at start-up, so ``metagate --help`` and
``metagate list`` answer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from metagate.orchestrate import Prepared

app = typer.Typer(
    help="Continual learning with context-dependent gating.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)

CONFIG_HELP = "YAML file or name of a ready config (metagate list configs); none = the default experiment"
OVERRIDES_HELP = "dotted overrides, e.g. method.name=ewc method.lambda=100 trainer.epochs=2 seed=3"


def _split(config: Optional[str], overrides: Optional[list[str]]) -> tuple[Optional[str], list[str]]:
    """``metagate run method.name=si`` has no CONFIG: a first argument with '=' is an override."""
    overrides = list(overrides or [])
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


_SIGNAL_EXIT = {"code": 130}  # 130 after Ctrl-C; 143 after SIGTERM, which takes the same path


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler or ``kill``): stop as Ctrl-C does, with the same hint to resume, then exit 143."""
    _SIGNAL_EXIT["code"] = 128 + signum
    raise KeyboardInterrupt


@app.callback()
def _main() -> None:
    """Continual learning with context-dependent gating."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def _interrupted(folder: Path, checkpoint: bool, again: str, one_run: bool = False) -> NoReturn:
    """Ctrl-C: say what is kept and how to go on. ``one_run`` (``metagate run``): ``again`` resumes the run in
    ``folder`` only from a checkpoint (or a finished run, whose references it then finishes); the many-run
    commands continue anything (a run without a checkpoint is restarted, its attempt kept aside)."""
    import signal
    import threading

    from metagate.runs import RunDir

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this message short: we exit anyway
    kept = (folder / RunDir.CHECKPOINT).is_file() or (folder / RunDir.RESULTS).is_file()
    if not checkpoint:
        hint = "this run wrote no checkpoints (trainer.checkpoint=false), so it cannot be resumed; start it again"
    elif kept or (not one_run and any(folder.glob(f"*/*/{RunDir.CHECKPOINT}"))):
        hint = f"the last checkpoint is kept; continue with: {again}"
    elif one_run:
        hint = (f"no task had finished, so there is no checkpoint to resume from; start the run again "
                f"in another folder, or delete {folder} first")
    else:
        hint = f"no task had finished; {again} starts it afresh"
    typer.secho(f"interrupted: {hint}", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(code=_SIGNAL_EXIT["code"])


@app.command()
def run(
    config: Optional[str] = typer.Argument(None, help=CONFIG_HELP, show_default=False),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: runs/<time>-<benchmark>-<method>-s<seed>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out from its last checkpoint"),
) -> None:
    """Train one method on one benchmark and write a run folder."""
    from metagate import orchestrate, report

    config, overrides = _split(config, overrides)
    try:
        cfg, out = orchestrate.run_config(config, overrides, out, resume)
    except orchestrate.RunProblem as e:
        _fail(str(e))

    def announce(prepared: Prepared) -> None:
        t = prepared.trainer
        typer.echo(f"run folder: {out}")
        typer.echo(f"{cfg.method.name} on {cfg.benchmark.name}, seed {cfg.seed}, device {t.device}, {t.threads} thread(s)")
        data = t.stream.provenance
        typer.echo(f"data: {data.get('location')} ({data.get('found_via')}; sha256 {str(data.get('sha256'))[:16]}, {data.get('bytes', 0):,} bytes)")

    again = f"metagate run --resume --out {out}"
    try:
        outcome = orchestrate.run_with_reference(cfg, out, resume, typer.echo, announce)
    except KeyboardInterrupt:
        _interrupted(out, cfg.trainer.checkpoint, again, one_run=True)
    except orchestrate.RunProblem as e:
        _fail(str(e))
    typer.echo("")
    typer.echo(outcome.per_task)
    typer.echo("")
    typer.echo(f"{cfg.method.name}: {report.summary_line(outcome.results)}")
    for reference in outcome.references:
        typer.echo(f"{reference['method']}: {report.summary_line(reference)}")
    _report(out, again=f"metagate report {out}")


@app.command()
def compare(
    config: Optional[str] = typer.Argument(None, help=CONFIG_HELP, show_default=False),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    methods: str = typer.Option(
        ..., "--methods", help="comma-separated method names or label=method variants, e.g. finetune,ewc,xdg-si=xdg"
    ),
    seeds: int = typer.Option(3, "--seeds", min=1, help="seeds per method: seed, seed+1, ..."),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for all runs and comparison.json"),
    resume: bool = typer.Option(
        False, "--resume", help="reuse finished runs in --out, resume interrupted ones, retry failed ones"
    ),
    workers: int = typer.Option(0, "--workers", min=0, help="runs at a time on a local Ray, each in its own process; 0 = one at a time here"),
    address: Optional[str] = typer.Option(None, "--address", help="run on the Ray cluster at this address (auto, ray://host:10001)"),
) -> None:
    """Run several methods over several seeds; print a Markdown table of mean ± std (a sweep of methods x seeds).

    A config's reference is not run (every method here is one). A failing run is recorded and the
    others go on; the exit code is 1 when some failed. An override prefixed by a label applies to that
    entry only: si:method.c=10. An entry label=method runs a variant under its own label:
    --methods xdg,xdg-si=xdg xdg-si:method.stabilizer=si"""
    from metagate import orchestrate
    from metagate.runs import default_run_dir
    from metagate.sweep import SweepSpec, run_sweep

    config, overrides = _split(config, overrides)
    try:
        execute = _executor(workers, address, SweepSpec().resources)
        outcome = run_sweep(
            config, overrides, SweepSpec(methods=methods, seeds=seeds), out, resume, typer.echo, execute, auto_resume=False,
            default_root=lambda bench, seed: default_run_dir(Path("runs"), bench, "compare", seed),
        )
    except KeyboardInterrupt:
        command = f"metagate compare {config or ''} {' '.join(overrides)} --methods {methods} --seeds {seeds} --out {out or 'DIR'} --resume"
        _interrupted(out or Path("runs"), True, " ".join(command.split()))
    except orchestrate.RunProblem as e:
        _fail(str(e))
    assert outcome.compare is not None
    plan = outcome.compare.plan
    typer.echo("")
    typer.echo(f"{len(plan.labels)} methods x {len(plan.seeds)} seeds ({plan.root / 'comparison.json'})")
    typer.echo(outcome.compare.table)
    _report(plan.root, again=f"metagate report {plan.root}")
    _report_failures(outcome.failures, len(plan.jobs), "fix the cause and rerun the same command with --resume to retry them")


def _report_failures(failures: dict[tuple[str, int], str], total: int, advice: str) -> None:
    if failures:
        for (label, seed), line in failures.items():
            typer.secho(f"failed: {label}, seed {seed}: {line}", fg=typer.colors.RED, err=True)
        _fail(f"{len(failures)} of {total} runs failed (see error.txt in their folders); {advice}", code=1)


def _executor(workers: int | None, address: Optional[str], resources: object, inline: bool = False):  # noqa: ANN202
    """In this process one run at a time (``workers`` 0 or ``inline``), else Ray: local with
    ``workers`` runs at a time (``None``: as many as the CPUs hold), or the cluster at ``address``."""
    from metagate import orchestrate, sweep

    if inline or (workers == 0 and address is None):
        return orchestrate.run_inline
    if workers is None:
        try:
            sweep.import_ray()
        except orchestrate.ConfigError:
            typer.secho("Ray is not installed (pip install 'metagate[ray]'): running one run at a time in this process", fg=typer.colors.YELLOW, err=True)
            return orchestrate.run_inline
        import os

        workers = max(1, int((os.cpu_count() or 1) // max(1.0, resources.cpus)))  # type: ignore[attr-defined]
    return sweep.RayExecutor(address, workers, resources)  # type: ignore[arg-type]


@app.command()
def tune(
    config: Optional[str] = typer.Argument(None, help=CONFIG_HELP, show_default=False),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    methods: str = typer.Option(..., "--methods", help="comma-separated method names or label=method variants"),
    grid: list[str] = typer.Option(..., "--grid", help="label:key=v1,v2,... (repeat for more keys; the grid is their product)"),
    tuning_seeds: int = typer.Option(2, "--tuning-seeds", min=1, help="seeds per grid point for choosing (from 1000)"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="fresh seeds for the chosen settings (the config's seed, +1, ...)"),
    out: Path = typer.Option(..., "--out", help="folder for tuning/, final/ and tuning.json"),
    resume: bool = typer.Option(False, "--resume", help="reuse finished runs in --out, resume or retry the others"),
    choose_only: bool = typer.Option(False, "--choose-only", help="stop after the choice (tuning.json), without the final runs"),
    workers: int = typer.Option(0, "--workers", min=0, help="runs at a time on a local Ray, each in its own process; 0 = one at a time here"),
    address: Optional[str] = typer.Option(None, "--address", help="run on the Ray cluster at this address (auto, ray://host:10001)"),
) -> None:
    """Choose on validation, report test: every grid point on tuning seeds, the best by validation.

    Each method's best grid point is chosen by mean validation accuracy over tuning seeds (1000, ...);
    the chosen settings are rerun on fresh seeds and their test figures printed. Example:
    metagate tune gated-teacher-task --methods si,ewc --grid si:method.c=0.1,1,10 --grid ewc:method.lambda=10,100 --out runs/tune"""
    from metagate import orchestrate
    from metagate.sweep import Resources

    config, overrides = _split(config, overrides)
    try:
        execute = _executor(workers, address, Resources())
        try:
            outcome = orchestrate.run_tune(config, overrides, methods, grid, tuning_seeds, seeds, out, resume, typer.echo, choose_only, execute)
        finally:
            getattr(execute, "close", lambda: None)()
    except KeyboardInterrupt:
        _interrupted(out, True, "the same command with --resume")
    except orchestrate.RunProblem as e:
        _fail(str(e))
    typer.echo("")
    typer.echo("chosen on validation accuracy (tuning seeds):")
    for label, chosen in outcome.chosen.items():
        typer.echo(f"  {label}: {' '.join(chosen) or '(the config as it is)'}")
    if outcome.final is not None:
        typer.echo(f"test figures of the chosen settings on fresh seeds {outcome.final.plan.seeds} ({out / 'final' / 'comparison.json'}):")
        typer.echo(outcome.final.table)
    if outcome.final is not None:
        _report(out, again=f"metagate report {out}")
    failures = {**outcome.tuning.failures, **(outcome.final.failures if outcome.final else {})}
    if failures:
        _fail(f"{len(failures)} runs failed (see error.txt in their folders); rerun the same command with --resume", code=1)


@app.command()
def sweep(
    config: Optional[str] = typer.Argument(None, help=CONFIG_HELP + "; its sweep section, if any, is the sweep", show_default=False),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP + "; label:key=value for one method", show_default=False),
    out: Path = typer.Option(..., "--out", help="the sweep's folder; running again on it continues the sweep"),
    methods: Optional[str] = typer.Option(None, "--methods", help="labels = methods, as in compare (default: sweep.methods)"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="seeds per variant (default: sweep.seeds, else 1)"),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="[label:]key=v1,v2,... (repeat; the grid is the product)"),
    random: Optional[list[str]] = typer.Option(None, "--random", help="[label:]key=loguniform:a,b | uniform:a,b | int:a,b | choice:v1,v2"),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="random draws per grid point"),
    tune: bool = typer.Option(False, "--tune", help="choose each method's variant on validation (tuning seeds), report test on fresh seeds"),
    tuning_seeds: Optional[int] = typer.Option(None, "--tuning-seeds", min=1, help="seeds per variant when tuning (from 1000; default 2)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="runs at a time on the local Ray (default: CPUs / cpus per run)"),
    address: Optional[str] = typer.Option(None, "--address", help="an existing Ray cluster (auto, ray://head:10001) instead of a local Ray"),
    cpus: Optional[float] = typer.Option(None, "--cpus-per-run", help="CPUs (and torch threads) per run (default 1)"),
    gpus: Optional[float] = typer.Option(None, "--gpus-per-run", help="GPUs per run (default 0; set trainer.device=cuda too)"),
    inline: bool = typer.Option(False, "--inline", help="no Ray: one run at a time in this process"),
) -> None:
    """A grid or random search over dotted keys, methods and seeds, each run in its own process on Ray.

    Every run is a run folder OUT/<variant>/seed<N>; a failed run is recorded and the others go on;
    the same command again continues the sweep (finished runs reused, interrupted ones resumed, failed
    ones retried). Writes comparison.md, aggregate.md (mean ± std and 95% CI) and sweep.json. Example:
    metagate sweep gated-teacher-task --methods si,ewc --grid si:method.c=0.1,1 --grid ewc:method.lambda=10,100 --seeds 3 --out runs/sw"""
    from metagate import orchestrate
    from metagate.sweep import read_spec, run_sweep

    config, overrides = _split(config, overrides)
    cli = {"methods": methods, "seeds": seeds, "grid": grid, "random": random, "samples": samples, "cpus": cpus, "gpus": gpus,
           "tune": tune, "tuning_seeds": tuning_seeds}
    try:
        spec = read_spec(config, cli)
        execute = _executor(workers, address, spec.resources, inline)
        outcome = run_sweep(config, overrides, spec, out, False, typer.echo, execute)
    except KeyboardInterrupt:
        _interrupted(out, True, "the same command (it continues the sweep in --out)")
    except orchestrate.RunProblem as e:
        _fail(str(e))
    typer.echo("")
    if outcome.tune is not None:
        typer.echo("chosen on validation accuracy (tuning seeds):")
        for label, chosen in outcome.tune.chosen.items():
            typer.echo(f"  {label}: {' '.join(chosen) or '(the config as it is)'}")
        typer.echo(f"test figures of the chosen settings on fresh seeds ({out / 'final'}):")
    typer.echo(outcome.aggregate_table)
    _report(out, again=f"metagate report {out}")
    total = len(outcome.compare.plan.jobs) if outcome.compare else 0
    _report_failures(outcome.failures, total or len(outcome.failures), "run the same command again to retry them")


@app.command()
def aggregate(
    paths: list[Path] = typer.Argument(..., help="run folders, or folders holding them (a sweep, a compare, runs made by hand)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the table (Markdown) and aggregate.json here: FILE.md"),
    last: Optional[int] = typer.Option(None, "--last", min=1, help="per-task figures (zero-shot, just trained, Q, steps) over the last N tasks"),
    val: bool = typer.Option(False, "--val", help="the validation split's ACC and BWT instead of the test figures (to choose among tuning runs)"),
) -> None:
    """One table of every finished run below PATHS: mean ± std and the 95% CI over seeds.

    Runs whose configs differ only in the seed are one row; each row says what its method used at
    test time. Figures: ACC, BWT, FWT, forgetting, zero-shot, just trained, Q (against an XdG run of
    the same stream and seed, when one is among the runs), steps to 90%, training time, peak memory."""
    from metagate.aggregate import AggregationError, aggregate_paths
    from metagate.runs import RunFolderError, atomic_write_json, atomic_write_text

    if out is not None and (out.exists() or out.with_suffix(".json").exists()):
        _fail(f"{out} or {out.with_suffix('.json')} exists already; nothing was written. Choose another --out")
    try:
        summary, text = aggregate_paths(paths, last, val)
        if out is not None:
            atomic_write_text(out, text + "\n")
            atomic_write_json(out.with_suffix(".json"), summary)
    except (AggregationError, RunFolderError) as e:
        _fail(str(e))
    typer.echo(text)


def _report(folder: Path, again: str | None = None) -> None:
    """Write the folder's report and print where; after a run (``again``), a failure only warns."""
    from metagate.report_page import ReportProblem, write_report
    from metagate.runs import RunFolderError

    try:
        html, md = write_report(folder)
    except (ReportProblem, RunFolderError) as e:
        if again is None:
            _fail(str(e))
        typer.secho(f"warning: no report written ({e}); make it later with: {again}", fg=typer.colors.YELLOW, err=True)
        return
    typer.echo(f"report: {html} (and {md.name}, figures in {md.parent / 'report'})")


@app.command("report")
def report_(folder: Path = typer.Argument(..., help="a run folder, or a folder of runs (compare, tune, sweep)")) -> None:
    """Write report.html (self-contained) and report.md (figures under report/) into FOLDER.

    A run folder gets its accuracy matrix, each task over the stream, learning curves, masks and
    per-task table, next to its reference runs; a folder of runs gets bars and a table over seeds per
    method label, and one run of each label."""
    _report(folder)


@app.command("list")
def list_(what: str = typer.Argument(..., help="methods | benchmarks | configs")) -> None:
    """List registered methods, benchmarks or ready configs."""
    from metagate import catalog

    if what == "methods":
        entries = catalog.registered("METHODS")
    elif what == "benchmarks":
        entries = catalog.registered("BENCHMARKS")
    elif what == "configs":
        entries = catalog.list_ready_configs()
    else:
        _fail(f"cannot list {what!r}; choose one of: methods, benchmarks, configs")
    width = max(len(n) for n in entries) + 2
    for name, desc in entries.items():
        typer.echo(f"{name:{width}s}{desc}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
