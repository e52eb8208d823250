"""Sweeps: a grid or random search over dotted config keys, methods and seeds, each run in its own
process on Ray (a local Ray by default, a cluster by address), or one after another in this process.

A sweep is written in a config's ``sweep`` section or on the command line (which adds to it)::

    sweep:
      methods: [finetune, si, strong=ewc]   # labels (folder names) = methods, as in ``compare --methods``
      seeds: 3                              # the config's seed, +1, ...
      grid:                                 # the product of every axis; "label:" limits a key to one entry
        "si:method.c": [0.1, 1, 10]
        trainer.lr: [0.001, 0.01]
      random:                               # ``samples`` draws per grid point (numbers, reproducible by ``seed``)
        samples: 4
        seed: 0
        space: {"strong:method.lambda": "loguniform:1,1000", "si:method.xi": "choice:0.01,0.1"}
      resources: {cpus: 1, gpus: 0}         # per run (Ray); a run uses that many torch threads
      tune: {tuning_seeds: 2}               # choose on validation, report test (below)

Every (variant, seed) is a run folder ``<out>/<variant>/seed<N>`` with the contract of ``metagate run``.
A failed run (an exception, or its worker process killed) is recorded in its folder (``error.txt``)
and in ``comparison.json``; the others go on. Starting the sweep again on the same folder reuses the
finished runs, resumes the interrupted ones from their checkpoints and retries the failed ones (their
old attempt moved aside, never deleted). At the end: ``comparison.md`` (as ``compare``),
``aggregate.md`` (mean ± std and 95% CI of every figure, :mod:`metagate.aggregate`) and ``sweep.json``
(each run's status).

With ``tune``, the protocol of "choose on validation, report test" runs in one command: every variant on
the tuning seeds (1000, 1001, ...; into ``<out>/tuning``), per method the variant with the best mean
validation accuracy, then the chosen ones on ``seeds`` fresh seeds (into ``<out>/final``), whose test
figures are reported; ``tuning.json`` records the candidates, their validation scores and the choice.

On Ray every run is a Ray task with ``max_calls=1``: its own worker process, which exits after it, so
one run's memory or crash does not touch another; what it prints goes to ``<variant>/seed<N>.log``. ``address=None`` starts a local Ray with ``workers`` x
``cpus`` CPUs; an address (``auto``, ``ray://head:10001``) joins an existing cluster, whose nodes must
have metagate installed and see ``--out`` (a shared file system).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import yaml
from pydantic import Field, ValidationError

from metagate import orchestrate
from metagate.config import ConfigError, find_config, read_yaml
from metagate.orchestrate import Echo, Executor, run_inline
from metagate.plan import Job, expand, grid_values, parse_entries, plan_jobs, split_overrides
from metagate.runs import RunFolderError, atomic_write_json, atomic_write_text
from metagate.schema import Section, dump_yaml

SPEC_FILE = "sweep.yaml"
STATUS_FILE = "sweep.json"
AGGREGATE_FILE = "aggregate.md"
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


class Resources(Section):
    cpus: float = Field(1.0, gt=0, description="CPUs per run (Ray); also the run's torch threads (at least 1)")
    gpus: float = Field(0.0, ge=0, description="GPUs per run (Ray); set trainer.device=cuda too")


class RandomSearch(Section):
    samples: int = Field(1, ge=1, description="random draws per grid point")
    seed: int = Field(0, description="seed of the draws (the same seed draws the same points)")
    space: dict[str, Union[str, list[Any]]] = Field(
        default_factory=dict, description="[label:]key -> 'uniform:a,b' | 'loguniform:a,b' | 'int:a,b' | 'choice:v1,v2' | [v1, v2]"
    )


class Tuning(Section):
    tuning_seeds: int = Field(2, ge=1, description="seeds per variant for choosing (1000, 1001, ...)")


class SweepSpec(Section):
    """The ``sweep`` section (and what the command line adds to it)."""

    methods: Union[str, list[str], None] = None
    seeds: int = Field(1, ge=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    random: RandomSearch = Field(default_factory=RandomSearch)
    resources: Resources = Field(default_factory=Resources)
    tune: Union[Tuning, None] = None
    overrides: list[str] = Field(
        default_factory=list, description="[label:]key=value overrides of the spec itself (a label's own settings), before the command line's"
    )
    table: dict[str, Any] = Field(
        default_factory=dict, description="how a results table shows this sweep (title, window: last N tasks); read by docs generators, not by the sweep"
    )

    def method_list(self) -> str:
        if not self.methods:
            raise ConfigError("the sweep names no methods; give sweep.methods in the config or --methods")
        return self.methods if isinstance(self.methods, str) else ",".join(self.methods)


# --------------------------------------------------------------------------- the spec


def read_spec(config: str | None, cli: dict[str, Any]) -> SweepSpec:
    """The config's ``sweep`` section with the command line's additions (``cli``: methods, seeds,
    grid / random items as ``[label:]key=...`` strings, samples, tune, tuning_seeds, cpus, gpus)."""
    raw = read_yaml(find_config(config)).get("sweep") or {}
    if not isinstance(raw, dict):
        raise ConfigError("the config's sweep section must be a mapping (methods, seeds, grid, random, resources, tune)")
    raw = json.loads(json.dumps(raw))  # a private copy
    if cli.get("methods"):
        raw["methods"] = cli["methods"]
    if cli.get("seeds") is not None:
        raw["seeds"] = cli["seeds"]
    for item in cli.get("grid") or []:
        key, values = _split_item(item, "--grid", "si:method.c=0.1,1,10")
        raw.setdefault("grid", {})[key] = [yaml.safe_load(v) for v in grid_values(item, values)]
    random = raw.setdefault("random", {}) if (cli.get("random") or cli.get("samples") is not None) else raw.get("random") or {}
    for item in cli.get("random") or []:
        key, dist = _split_item(item, "--random", "si:method.c=loguniform:0.01,10")
        random.setdefault("space", {})[key] = dist
    if cli.get("samples") is not None:
        random["samples"] = cli["samples"]
    if cli.get("tune") or cli.get("tuning_seeds"):
        raw["tune"] = {**(raw.get("tune") or {}), **({"tuning_seeds": cli["tuning_seeds"]} if cli.get("tuning_seeds") else {})}
    for name in ("cpus", "gpus"):
        if cli.get(name) is not None:
            raw.setdefault("resources", {})[name] = cli[name]
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"sweep.{where}: {first['msg']}") from None
    for key, dist in spec.random.space.items():
        _check_distribution(key, dist)
    return spec


def _split_item(item: str, option: str, example: str) -> tuple[str, str]:
    key, eq, values = item.partition("=")
    if not eq or not key.strip() or not values.strip():
        raise ConfigError(f"{option} {item!r} is not of the form [label:]key=values (e.g. {example})")
    return key.strip(), values.strip()


def _check_distribution(key: str, dist: str | list[Any]) -> None:
    if isinstance(dist, list):
        if not dist:
            raise ConfigError(f"sweep.random.space.{key}: an empty list of choices")
        return
    kind, _, args = dist.partition(":")
    values = [a for a in args.split(",") if a.strip()]
    if kind not in DISTRIBUTIONS or not values:
        raise ConfigError(f"sweep.random.space.{key}: {dist!r}; write one of uniform:a,b  loguniform:a,b  int:a,b  choice:v1,v2")
    if kind != "choice":
        try:
            lo, hi = (float(v) for v in values)
        except ValueError:
            raise ConfigError(f"sweep.random.space.{key}: {dist!r} needs two numbers, low and high (e.g. {kind}:1,10)") from None
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise ConfigError(f"sweep.random.space.{key}: {dist!r} needs low < high" + (" and low > 0" if kind == "loguniform" else ""))


def _draw(dist: str | list[Any], rng: np.random.Generator) -> Any:
    if isinstance(dist, list):
        return dist[int(rng.integers(len(dist)))]
    kind, _, args = dist.partition(":")
    values = [a.strip() for a in args.split(",") if a.strip()]
    if kind == "choice":
        return yaml.safe_load(values[int(rng.integers(len(values)))])
    lo, hi = float(values[0]), float(values[1])
    if kind == "int":
        return int(rng.integers(math.ceil(lo), math.floor(hi) + 1))
    x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if kind == "loguniform" else rng.uniform(lo, hi)
    return float(f"{x:.4g}")  # 4 significant digits: the folder name and the config say the same value


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _applies(key: str, label: str) -> str | None:
    """``si:method.c`` applies to ``si`` (as ``method.c``); ``trainer.lr`` to every label."""
    head, sep, rest = key.partition(":")
    if not sep:
        return key
    return rest if head == label else None


def grid_points(spec: SweepSpec, method_of: dict[str, str]) -> dict[str, list[list[str]]]:
    """Per method label, every point of the search as a list of overrides: the grid's product, times
    ``random.samples`` draws of the random axes (none without random axes); duplicates dropped."""
    labelled = {k.partition(":")[0] for k in [*spec.grid, *spec.random.space] if ":" in k}
    unknown = sorted(labelled - set(method_of))
    if unknown:
        raise ConfigError(f"the sweep's grid or random space names {', '.join(unknown)}, which the methods do not name")
    rng = np.random.default_rng(spec.random.seed)
    variants: dict[str, list[list[str]]] = {}
    for label in method_of:
        axes = [(k2, values) for k, values in spec.grid.items() if (k2 := _applies(k, label))]
        space = [(k2, dist) for k, dist in spec.random.space.items() if (k2 := _applies(k, label))]
        points: list[list[str]] = []
        for combo in itertools.product(*(values for _, values in axes)):
            fixed = [f"{key}={_value(v)}" for (key, _), v in zip(axes, combo)]
            for _ in range(spec.random.samples if space else 1):
                point = fixed + [f"{key}={_value(_draw(dist, rng))}" for key, dist in space]
                if point not in points:
                    points.append(point)
        variants[label] = points
    return variants


# --------------------------------------------------------------------------- running


@dataclass
class SweepOutcome:
    spec: SweepSpec
    compare: orchestrate.CompareOutcome | None  # without tune
    tune: orchestrate.TuneOutcome | None  # with tune
    aggregate_table: str

    @property
    def failures(self) -> dict[tuple[str, int], str]:
        if self.tune is not None:
            return {**self.tune.tuning.failures, **(self.tune.final.failures if self.tune.final else {})}
        return self.compare.failures if self.compare else {}


def _save_spec(out: Path, spec: dict[str, Any]) -> None:
    """``sweep.yaml``: this sweep's spec; a different spec started on the same folder is kept beside
    it (``sweep-2.yaml``, ...), never written over."""
    text = dump_yaml(spec)  # every value written out: read back without aliases
    path, k = out / SPEC_FILE, 1
    while path.is_file() and path.read_text() != text:
        k += 1
        path = out / f"sweep-{k}.yaml"
    if not path.is_file():
        atomic_write_text(path, text)


def run_sweep(
    config: str | None, overrides: list[str], spec: SweepSpec, out: Path | None, resume: bool = False,
    echo: Echo = orchestrate._quiet, execute: Executor = run_inline, auto_resume: bool = True,
    default_root: Callable[[str, int], Path] | None = None,
) -> SweepOutcome:
    """Plan every run (validated before anything is written), run them with ``execute``, aggregate.

    With ``auto_resume`` (``metagate sweep``), a folder that already holds a sweep (``sweep.yaml``)
    continues it: finished runs reused, interrupted ones resumed, failed ones retried; any other
    non-empty folder is refused unless ``resume``. ``out=None``: ``default_root(benchmark, seed)``."""
    try:
        return _run_sweep(config, overrides, spec, out, resume, echo, execute, auto_resume, default_root)
    finally:
        getattr(execute, "close", lambda: None)()


def _prepare(execute: Executor) -> None:
    """Start (or join) the executor's Ray and check its resources, before anything is written."""
    getattr(execute, "prepare", lambda: None)()


def _run_sweep(
    config: str | None, overrides: list[str], spec: SweepSpec, out: Path | None, resume: bool, echo: Echo,
    execute: Executor, auto_resume: bool, default_root: Callable[[str, int], Path] | None,
) -> SweepOutcome:
    if out is not None:
        orchestrate.check_out(out)
    resume = resume or (auto_resume and out is not None and (out / SPEC_FILE).is_file())
    overrides = [*spec.overrides, *overrides]  # the spec's own label:key=value settings first, the command line's after
    method_of = parse_entries(spec.method_list())
    points = grid_points(spec, method_of)
    record = {"config": config, "overrides": overrides, **spec.model_dump(mode="json")}
    if spec.tune is not None:
        if out is None:
            raise ConfigError("a sweep with tune needs --out, the folder for tuning/, final/ and tuning.json")
        if orchestrate.holds_files(out) and not resume:
            raise RunFolderError(f"{out} already exists and is not empty; nothing was written. Pass --resume or another --out.")
        root = out
        tuned = orchestrate.tune_variants(
            config, overrides, method_of, points, spec.tune.tuning_seeds, spec.seeds, out, resume, echo, False, execute,
            on_planned=lambda: (_prepare(execute), _save_spec(root, record)),
        )
        assert tuned.final is not None
        with orchestrate.holding(out):
            return SweepOutcome(spec, None, tuned, _finish(out / "final", tuned.final, out, {"tuning": tuned.tuning}))
    general, own = split_overrides(overrides, list(method_of))
    variants = [v for vs in expand(method_of, points, own).values() for v in vs]
    plan = plan_jobs(config, general, variants, spec.seeds, out, default_root or (lambda b, s: Path("runs") / f"sweep-{b}"))
    orchestrate.check_folders(plan, resume)
    _prepare(execute)  # Ray reached (or refused in one line) before the folder is made or locked
    with orchestrate.holding(plan.root):
        _save_spec(plan.root, record)
        echo(f"{len(variants)} variants x {spec.seeds} seeds = {len(plan.jobs)} runs -> {plan.root}")
        compared = orchestrate.run_compare(plan, resume, echo, execute)
        return SweepOutcome(spec, compared, None, _finish(plan.root, compared, plan.root))


def _status(compared: orchestrate.CompareOutcome, prefix: str = "") -> dict[str, dict[str, str]]:
    return {
        f"{prefix}{label}/seed{seed}": {"status": "failed", "error": compared.failures[(label, seed)]}
        if (label, seed) in compared.failures else {"status": "finished"}
        for (label, seed) in (job.key for job in compared.plan.jobs)
    }


def _finish(root: Path, compared: orchestrate.CompareOutcome, out: Path, before: dict[str, orchestrate.CompareOutcome] | None = None) -> str:
    """``sweep.json`` (each run's status, with the stages ``before``: a tuned sweep's tuning runs) and
    ``aggregate.md`` over the finished runs of ``root``."""
    from metagate.aggregate import AggregationError, aggregate_paths

    plan = compared.plan
    status: dict[str, dict[str, str]] = {}
    for stage, earlier in (before or {}).items():
        status.update(_status(earlier, f"{stage}/"))
    status.update(_status(compared, f"{root.relative_to(out)}/" if root != out else ""))
    atomic_write_json(out / STATUS_FILE, {"root": str(root), "runs": status})
    folders = [job.folder for job in plan.jobs if job.key not in compared.failures]
    try:
        _, table = aggregate_paths(folders) if folders else ({}, "no run finished")
    except AggregationError as e:
        table = f"not aggregated: {e}"
    atomic_write_text(out / AGGREGATE_FILE, table + "\n")
    return table


# --------------------------------------------------------------------------- Ray


def _ray_job(config: dict[str, Any], folder: str, resume: bool, threads: int) -> dict[str, Any]:
    """One run inside a Ray worker process (the worker exits after it: ``max_calls=1``). What the run
    prints (progress, warnings) goes to ``<folder>.log`` beside its folder, appended on each attempt."""
    import contextlib
    import warnings

    os.environ["METAGATE_THREADS"] = str(threads)
    from metagate.config import config_from_dict

    log = Path(folder).with_name(Path(folder).name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), warnings.catch_warnings():
        warnings.simplefilter("default")
        return orchestrate.run_job(config_from_dict(config), Path(folder), resume, lambda line: print(line, file=f))


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("Ray is not installed: pip install 'metagate[ray]' (or run without --workers / --address, one run at a time)") from None
    return ray


CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a Ray address (``host:port`` or ``ray://host:port``) nothing answers on within ``timeout``
    seconds, in one line: Ray itself waits 30 s and more, or for ever, before it gives up. ``auto`` and
    other forms are left to Ray."""
    import socket

    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise ConfigError(
            f"cannot reach the Ray cluster at --address {address} ({why}); "
            "start it (ray start --head), check the address, or leave --address out to run on this machine"
        ) from None


class RayExecutor:
    """Run jobs as Ray tasks: on a local Ray with ``workers`` runs at a time, or on the cluster at
    ``address``; ``resources`` per run. :meth:`prepare` starts (or joins) Ray and refuses runs no node
    can hold, before anything is written; :meth:`close` stops a Ray it started."""

    def __init__(self, address: str | None, workers: int, resources: Resources) -> None:
        self.ray = import_ray()
        self.address, self.workers, self.resources = address, workers, resources
        self.started = False

    def prepare(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            if self.address is None:
                ray.init(
                    num_cpus=self.workers * self.resources.cpus, include_dashboard=False, log_to_driver=False,
                    logging_level=logging.WARNING, object_store_memory=128 * 1024**2,
                )
            else:
                check_reachable(self.address)
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
                except Exception as e:  # noqa: BLE001  (Ray raises many kinds: ConnectionError, RuntimeError, gRPC errors)
                    line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    raise ConfigError(f"cannot join the Ray cluster at --address {self.address} ({line}); check the address, or leave --address out") from None
            self.started = True
        try:
            _check_resources(ray, self.resources)
        except ConfigError:
            self.close()
            raise

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __call__(self, jobs: list[Job], resume: bool, echo: Echo) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
        ray, resources = self.ray, self.resources
        self.prepare()
        remote = ray.remote(max_calls=1, max_retries=0)(_ray_job)
        threads = max(1, int(resources.cpus))
        refs = {
            remote.options(num_cpus=resources.cpus, num_gpus=resources.gpus).remote(job.cfg.to_dict(), str(job.folder), resume, threads): job
            for job in jobs
        }
        where = self.address or f"local, {self.workers} at a time"
        echo(f"{len(jobs)} runs on Ray ({where}; {resources.cpus:g} CPU, {resources.gpus:g} GPU each)")
        pending, done_count = list(refs), 0
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    job = refs[ref]
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died (killed, out of memory) or was cancelled
                        outcome = {"status": "failed", "error": orchestrate._record_failure(job.folder, e)}
                    done_count += 1
                    echo(f"== {job.key[0]}, seed {job.key[1]}: {outcome['status']} ({done_count}/{len(jobs)}) -> {job.folder}")
                    yield job.key, outcome
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            self.close()
            raise


def _check_resources(ray: Any, resources: Resources) -> None:
    """Refuse a run no node can hold (Ray would wait for it forever)."""
    have = ray.cluster_resources()
    for name, need in (("CPU", resources.cpus), ("GPU", resources.gpus)):
        if need > have.get(name, 0):
            raise ConfigError(
                f"each run asks for {need:g} {name}(s) but the Ray cluster has {have.get(name, 0):g}; "
                f"lower --{name.lower()}s-per-run (sweep.resources.{name.lower()}s)"
            )
