"""``metagate`` command line: run, compare, list."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from metagate.config import ConfigError, ExperimentConfig, config_from_dict, list_ready_configs, load_config
from metagate.runs import CheckpointError, RunDir, RunFolderError, atomic_write_json, atomic_write_text, default_run_dir

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


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def check_device(cfg: ExperimentConfig) -> None:
    """Refuse a device this machine lacks before anything is written."""
    from metagate.train import resolve_device

    try:
        resolve_device(cfg.trainer.device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None


def execute(cfg: ExperimentConfig, run: RunDir | Path, resume: bool = False) -> dict[str, Any]:
    """Train one config into a run folder (created here unless resuming, once the method and
    stream are built, so a config they refuse leaves nothing behind); errors become CLI errors."""
    from metagate.train import Trainer, TrainingDiverged

    try:
        trainer = Trainer(cfg)
    except ValueError as e:  # e.g. a scenario the method does not support
        _fail(str(e))
    try:
        trainer.run = run if isinstance(run, RunDir) else RunDir.create(run)
        return trainer.fit(resume=resume)
    except (CheckpointError, TrainingDiverged, RunFolderError) as e:
        _fail(str(e))
    raise AssertionError("unreachable")


@app.command()
def run(
    config: Optional[str] = typer.Argument(None, help=CONFIG_HELP, show_default=False),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: runs/<time>-<benchmark>-<method>-s<seed>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out from its last checkpoint"),
) -> None:
    """Train one method on one benchmark and write a run folder."""
    from metagate import report

    config, overrides = _split(config, overrides)
    try:
        if resume:
            if out is None:
                _fail("--resume needs --out DIR, the run folder to continue")
            assert out is not None
            run_dir = RunDir.open_for_resume(out)
            saved = run_dir.read_config()
            cfg = config_from_dict(saved, overrides) if config is None else load_config(config, overrides)
            reference_done = cfg.reference is None or (out / REFERENCE_DIR / RunDir.RESULTS).is_file()
            if run_dir.has_results() and reference_done:
                _fail(f"{out} holds a finished run (results.json); nothing to resume")
            target: RunDir | Path = run_dir
        else:
            cfg = load_config(config, overrides)
            target = out or default_run_dir(Path("runs"), cfg.benchmark.name, cfg.method.name, cfg.seed)
            if target.exists() and any(target.iterdir()):
                RunDir.create(target)  # raises the clear "already exists" error
        check_device(cfg)
    except (ConfigError, RunFolderError) as e:
        _fail(str(e))
    typer.echo(f"run folder: {target if isinstance(target, Path) else target.path}")
    typer.echo(f"{cfg.method.name} on {cfg.benchmark.name}, seed {cfg.seed}, device {cfg.trainer.device}")
    finished = isinstance(target, RunDir) and target.has_results()  # resuming only the reference
    results = target.read_results() if isinstance(target, RunDir) and finished else execute(cfg, target, resume)
    folder = target if isinstance(target, Path) else target.path
    reference = None
    ref_cfg = cfg.reference_config()
    if ref_cfg is not None:
        typer.echo(f"reference: {ref_cfg.method.name} on the same stream and seed -> {folder / REFERENCE_DIR}")
        reference = _run_or_reuse(ref_cfg, folder / REFERENCE_DIR, resume)
    table = report.per_task_table(results, reference)
    atomic_write_text(folder / "per_task.md", table + "\n")
    typer.echo("")
    typer.echo(table)
    typer.echo("")
    typer.echo(f"{cfg.method.name}: {report.summary_line(results)}")
    if reference is not None:
        typer.echo(f"{reference['method']}: {report.summary_line(reference)}")


REFERENCE_DIR = "reference"


def _run_or_reuse(cfg: ExperimentConfig, folder: Path, resume: bool) -> dict[str, Any]:
    """Train ``cfg`` into ``folder``; with ``resume``, reuse its results or continue its checkpoint."""
    if resume and (folder / RunDir.RESULTS).is_file():
        from metagate.train import run_identity

        saved = RunDir(folder).read_config()
        if run_identity(saved) != run_identity(cfg.to_dict()):
            _fail(f"{folder} holds a finished run of another config; delete it, or use another --out, to run this one")
        return RunDir(folder).read_results()
    if resume and (folder / RunDir.CHECKPOINT).is_file():
        return execute(cfg, RunDir.open_for_resume(folder), resume=True)
    if resume and folder.exists() and any(folder.iterdir()):
        _fail(f"{folder} holds a run that stopped before its first checkpoint; delete that folder and run again")
    return execute(cfg, folder)


@app.command()
def compare(
    config: Optional[str] = typer.Argument(None, help=CONFIG_HELP, show_default=False),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    methods: str = typer.Option(
        ..., "--methods", help="comma-separated method names or label=method variants, e.g. finetune,ewc,xdg-si=xdg"
    ),
    seeds: int = typer.Option(3, "--seeds", min=1, help="seeds per method: seed, seed+1, ..."),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for all runs and comparison.json"),
    resume: bool = typer.Option(False, "--resume", help="reuse finished runs in --out and resume interrupted ones"),
) -> None:
    """Run several methods over several seeds; print a Markdown table of mean ± std (a config's
    ``reference`` is not run: every method here is one).

    An override prefixed by a label applies to that entry only: ``si:method.c=10``. An entry
    ``label=method`` runs a variant under its own label: ``--methods xdg,xdg-si=xdg xdg-si:method.stabilizer=si``."""
    from metagate import report
    from metagate.config import apply_overrides, find_config, read_yaml

    config, overrides = _split(config, overrides)
    entries = [m.strip() for m in methods.split(",") if m.strip()]
    method_of = {e.partition("=")[0]: (e.partition("=")[2] or e) for e in entries}
    names = list(method_of)
    general = [o for o in overrides if ":" not in o.split("=", 1)[0]]
    specific: dict[str, list[str]] = {}
    for o in overrides:
        if o not in general:
            m, _, rest = o.partition(":")
            specific.setdefault(m, []).append(rest)
    try:
        if len(set(names)) != len(entries):
            raise ConfigError("--methods names a label twice")
        unknown = sorted(set(specific) - set(names))
        if unknown:
            raise ConfigError(f"overrides for {', '.join(unknown)}, which --methods does not name")
        base = apply_overrides(read_yaml(find_config(config)), general)
        base_seed = config_from_dict(base).seed
        # Validate every (method, seed) config before any training.
        plan = {
            (m, base_seed + k): config_from_dict(
                base, [f"method.name={method_of[m]}", f"seed={base_seed + k}", "reference=null", *specific.get(m, [])]
            )
            for m in names
            for k in range(seeds)
        }
        for cfg in plan.values():
            check_device(cfg)
        root = out or default_run_dir(Path("runs"), plan[(names[0], base_seed)].benchmark.name, "compare", base_seed)
        if root.exists() and any(root.iterdir()) and not resume:
            raise RunFolderError(f"{root} already exists and is not empty; nothing was written. Pass --resume or another --out.")
    except (ConfigError, RunFolderError) as e:
        _fail(str(e))
    if not names:
        _fail("--methods is empty")
    root.mkdir(parents=True, exist_ok=True)
    per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    for (m, seed), cfg in plan.items():
        folder = root / m / f"seed{seed}"
        typer.echo(f"== {m}, seed {seed} -> {folder}")
        per_method[m].append(_run_or_reuse(cfg, folder, resume))
    summary = {m: report.aggregate(rs) for m, rs in per_method.items()}
    atomic_write_json(
        root / "comparison.json",
        {
            "benchmark": plan[(names[0], base_seed)].benchmark.name,
            "seeds": [base_seed + k for k in range(seeds)],
            "methods": {m: {"summary": summary[m], "runs": [str(root / m / f"seed{r['seed']}") for r in per_method[m]]} for m in names},
        },
    )
    table = report.comparison_table(summary)
    (root / "comparison.md").write_text(table + "\n")
    typer.echo("")
    typer.echo(f"{len(names)} methods x {seeds} seeds, mean ± std ({root / 'comparison.json'})")
    typer.echo(table)


@app.command("list")
def list_(what: str = typer.Argument(..., help="methods | benchmarks | configs")) -> None:
    """List registered methods, benchmarks or ready configs."""
    from metagate.data import BENCHMARKS
    from metagate.methods import METHODS

    if what == "methods":
        for name in METHODS.names():
            doc = (METHODS.get(name).__doc__ or "").strip().splitlines()
            typer.echo(f"{name:14s} {doc[0] if doc else ''}")
    elif what == "benchmarks":
        for name in BENCHMARKS.names():
            doc = (BENCHMARKS.get(name).__doc__ or "").strip().splitlines()
            typer.echo(f"{name:18s} {doc[0] if doc else ''}")
    elif what == "configs":
        for name, desc in list_ready_configs().items():
            typer.echo(f"{name:22s} {desc}")
    else:
        _fail(f"cannot list {what!r}; choose one of: methods, benchmarks, configs")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
