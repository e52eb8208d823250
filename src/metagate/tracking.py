"""Optional experiment tracking: a run's losses and accuracies sent to TensorBoard and/or MLflow as it
trains, switched on in the config's ``tracking`` section (off by default).

The trainer hands a :class:`Tracker` only numbers it already has on the host (those it writes to
``metrics.jsonl``), so tracking adds no synchronisation to a training step. Names:

* ``train/<loss>``: the losses every ``trainer.log_every`` steps (step = the run's optimiser steps);
* ``epoch/<loss>``: each epoch's mean losses (step = optimiser steps at the epoch's end);
* ``task/...`` after each task's evaluation (step = task index, 0-based as in ``metrics.jsonl``):
  ``acc`` (mean over the tasks trained so far: ACC so far), ``acc_all`` (mean of the accuracy row,
  untrained tasks too), ``acc_just_trained``, ``val_acc`` / ``val_acc_just_trained`` (validation
  split, when the stream has one), ``heldout_acc`` (held-out tasks, when any), ``train_seconds``;
* ``final/...`` once at the end (step 0): ``acc``, ``bwt``, ``fwt``, ``forgetting``, ``val_acc``,
  ``train_seconds``, ``peak_memory_mb``, as in ``results.json``.

TensorBoard writes event files into ``<run>/tensorboard/``; a resumed run appends there and hides
what the interrupted process logged after the checkpoint (``purge_step``). MLflow logs into
``tracking.mlflow_uri`` (default: the SQLite store ``mlflow.db`` in the run folder's parent), names
its run in ``<run>/mlflow_run.json``, and a resumed run continues that MLflow run, skipping the
points the interrupted process had already sent (a resumed run recomputes them identically).

Tracking never stops a run: a backend that fails (server down, disk full) is warned about once
(:class:`TrackingWarning`) and dropped, and the run goes on; ``metrics.jsonl`` and ``results.json``
hold every number anyway. A backend switched on without its package is refused when the config is
checked (:func:`check_tracking`), before anything is written or trained.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from metagate.schema import ConfigError, ExperimentConfig, TrackingConfig

__all__ = [
    "MLFLOW_RUN_FILE",
    "TENSORBOARD_DIR",
    "MlflowTracker",
    "TensorBoardTracker",
    "Tracker",
    "Tracking",
    "TrackingWarning",
    "check_tracking",
    "default_mlflow_uri",
    "open_tracker",
    "summary_figures",
    "task_figures",
]

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_DB = "mlflow.db"
INSTALL = {"tensorboard": "pip install 'metagate[tensorboard]'", "mlflow": "pip install 'metagate[mlflow]'"}
SUMMARY_KEYS = ("acc", "bwt", "fwt", "forgetting", "val_acc", "train_seconds", "peak_memory_mb")
PARAM_LENGTH = 500  # the shortest param value every MLflow version accepts


class TrackingWarning(UserWarning):
    """A tracking backend failed and was dropped; the run goes on without it."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def _uses_sqlite(tc: TrackingConfig) -> bool:
    return tc.mlflow_uri is None or tc.mlflow_uri.startswith("sqlite:")


def check_tracking(tc: TrackingConfig) -> None:
    """Refuse, in one line naming the extra to install, a backend switched on without its package."""
    if tc.tensorboard and not _installed("tensorboard"):
        raise ConfigError(f"tracking.tensorboard=true needs the tensorboard package: {INSTALL['tensorboard']}")
    if tc.mlflow and not _installed("mlflow"):
        raise ConfigError(f"tracking.mlflow=true needs MLflow (mlflow-skinny): {INSTALL['mlflow']}")
    if tc.mlflow and _uses_sqlite(tc) and not (_installed("sqlalchemy") and _installed("alembic")):
        raise ConfigError(
            "tracking.mlflow=true with a SQLite store (the default when tracking.mlflow_uri is null) needs sqlalchemy "
            f"and alembic: {INSTALL['mlflow']}, or set tracking.mlflow_uri to a tracking server (http://host:5000)"
        )


def default_mlflow_uri(folder: Path) -> str:
    """The store of a run whose config names none: ``mlflow.db`` beside the run folder (``runs/mlflow.db``
    for the default ``runs/<name>``), so that the runs of one folder share it. A reference's folder lies
    inside its run's (``<run>/reference``): it shares that run's store."""
    folder = Path(folder).resolve()
    while (folder.parent / "config.yaml").is_file():  # the folder of a run holding this one
        folder = folder.parent
    return f"sqlite:///{folder.parent / MLFLOW_DB}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"method": {"name": "ewc"}}`` -> ``{"method.name": "ewc"}``; lists as JSON, values cut to 500 characters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text if len(text) <= PARAM_LENGTH else text[: PARAM_LENGTH - 3] + "..."
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def task_figures(
    t: int, row: Sequence[float], val: Sequence[float | None], heldout: Sequence[float | None], seconds: float | None
) -> dict[str, float | None]:
    """The figures logged after task ``t``'s evaluation (``None`` = not available, not logged)."""
    return {
        "task/acc": _mean(row[: t + 1]),
        "task/acc_all": _mean(row),
        "task/acc_just_trained": row[t],
        "task/val_acc": _mean(val[: t + 1]),
        "task/val_acc_just_trained": val[t] if len(val) > t else None,
        "task/heldout_acc": _mean(heldout),
        "task/train_seconds": seconds,
    }


def summary_figures(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The final figures logged once a run has its results."""
    return {f"final/{k}": results.get(k) for k in SUMMARY_KEYS}


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and not isinstance(v, bool)}


class Tracker:
    """Where a run's numbers go besides its folder. This base class is the null tracker (tracking off):
    every call does nothing."""

    def log_params(self, config: Mapping[str, Any]) -> None:
        """The run's config, once, when the tracked run starts (not again on resume)."""

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """Scalars at the run's optimiser step ``step`` (losses)."""

    def log_task(self, task_index: int, values: Mapping[str, float | None]) -> None:
        """Scalars after task ``task_index``'s evaluation; ``None`` values are skipped."""

    def log_summary(self, values: Mapping[str, float | None]) -> None:
        """The run's final figures; ``None`` values are skipped."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and release; ``status`` is ``FINISHED``, ``FAILED`` or ``KILLED`` (interrupted)."""

    def discard(self) -> None:
        """Release local resources without sending anything more (after a failure)."""


class TensorBoardTracker(Tracker):
    """Event files in ``<run>/tensorboard/`` through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, folder: Path, resume: bool = False, step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(folder) / TENSORBOARD_DIR
        self.fresh = not (self.dir.is_dir() and any(self.dir.iterdir()))
        # a resumed run hides what the interrupted process wrote after the checkpoint's step
        self.writer = SummaryWriter(str(self.dir), purge_step=step + 1 if resume else None, flush_secs=30)

    def log_params(self, config: Mapping[str, Any]) -> None:
        if self.fresh:
            text = "\n".join(f"    {k}: {v}" for k, v in flatten(config).items())  # indented: a code block in markdown
            self.writer.add_text("config", text, 0)

    def _scalars(self, step: int, values: Mapping[str, Any]) -> None:
        for key, value in _numbers(values).items():
            self.writer.add_scalar(key, value, step)

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        self._scalars(step, values)

    def log_task(self, task_index: int, values: Mapping[str, float | None]) -> None:
        self._scalars(task_index, values)

    def log_summary(self, values: Mapping[str, float | None]) -> None:
        self._scalars(0, values)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()

    def discard(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow run, through ``MlflowClient`` (never MLflow's global active run). Points are buffered
    and sent in batches: at most every ``FLUSH_SECONDS`` while training, and after every task.

    Runs in parallel (a sweep's Ray workers) share a SQLite store: each use of it holds an exclusive
    lock on ``<store>.lock``, so that two processes never create (migrate) the same new store at once,
    which leaves it broken, nor wait on SQLite's own lock."""

    FLUSH_SECONDS = 5.0
    BATCH = 1000  # metrics per log_batch request, MLflow's limit

    def __init__(self, cfg: ExperimentConfig, folder: Path, resume: bool = False) -> None:
        self.folder = Path(folder)
        self.uri = cfg.tracking.mlflow_uri or default_mlflow_uri(self.folder)
        path = self.uri[len("sqlite:///") :] if self.uri.startswith("sqlite:///") else ""
        self.lock_path = Path(f"{path}.lock") if path and path != ":memory:" else None
        self.pending: list[Any] = []
        self.flushed_at = time.monotonic()
        self.last_step: dict[str, int] = {}  # per metric, the last step the MLflow run already holds
        with self._store():
            self.client = self._client()
            run_id = self._continued() if resume else None
            self.fresh = run_id is None
            self.run_id = run_id if run_id is not None else self._new_run(cfg)

    @contextlib.contextmanager
    def _store(self) -> Iterator[None]:
        """Hold the SQLite store's lock (other stores: nothing to hold)."""
        if self.lock_path is None:
            yield
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        if self.uri.startswith(("http://", "https://")):
            import requests

            # fail in seconds when the server is down, not after MLflow's minutes of retries
            requests.get(self.uri.rstrip("/") + "/health", timeout=5)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy's, about MLflow's models
            return MlflowClient(tracking_uri=self.uri)

    def _continued(self) -> str | None:
        """The MLflow run the run folder names, if it lives in this store (set running again), else ``None``."""
        from mlflow.exceptions import MlflowException

        try:
            saved = json.loads((self.folder / MLFLOW_RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.uri:
            warnings.warn(
                f"tracking: {self.folder} was tracked in {saved.get('tracking_uri')}, now {self.uri}: a new MLflow run starts there",
                TrackingWarning,
                stacklevel=2,
            )
            return None
        run_id = saved.get("run_id")
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            warnings.warn(f"tracking: MLflow run {run_id} is not in {self.uri}: a new one starts", TrackingWarning, stacklevel=2)
            return None
        self.client.update_run(run_id, status="RUNNING")
        for key in run.data.metrics:
            self.last_step[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        return run_id

    def _new_run(self, cfg: ExperimentConfig) -> str:
        from mlflow.exceptions import MlflowException

        from metagate.runs import atomic_write_json

        tc = cfg.tracking
        name = tc.experiment or cfg.benchmark.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if self.uri.startswith("sqlite:///"):  # beside the store, not in whatever folder the run was started from
                artifacts = (Path(self.uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
            except MlflowException:  # created meanwhile by another run
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        rel = os.path.relpath(self.folder.resolve())
        tags = {
            "metagate.run_folder": str(self.folder.resolve()),
            "metagate.method": cfg.method.name,
            "metagate.benchmark": cfg.benchmark.name,
            "metagate.seed": str(cfg.seed),
        }
        try:  # a reference: shown nested under the run whose folder holds it, when both are in this store
            outer = json.loads((self.folder.parent / MLFLOW_RUN_FILE).read_text())
            if outer.get("tracking_uri") == self.uri and outer.get("run_id"):
                tags["mlflow.parentRunId"] = outer["run_id"]
        except (OSError, ValueError):
            pass
        run = self.client.create_run(
            experiment_id, run_name=tc.run_name or (rel if not rel.startswith("..") else str(self.folder.resolve())), tags=tags
        )
        run_id = run.info.run_id
        atomic_write_json(self.folder / MLFLOW_RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": self.uri})
        return run_id

    def log_params(self, config: Mapping[str, Any]) -> None:
        if not self.fresh:
            return  # MLflow params cannot change, and the resumed run already has them
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(config).items()]
        with self._store():
            for i in range(0, len(params), 100):  # MLflow's limit per request
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _add(self, step: int, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in _numbers(values).items():
            if step > self.last_step.get(key, -1):
                self.pending.append(Metric(key, value, now, step))

    def flush(self) -> None:
        if self.pending:
            with self._store():
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[: self.BATCH])
                    del self.pending[: self.BATCH]
        self.flushed_at = time.monotonic()

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        self._add(step, values)
        if len(self.pending) >= self.BATCH or time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def log_task(self, task_index: int, values: Mapping[str, float | None]) -> None:
        self._add(task_index, values)
        self.flush()

    def log_summary(self, values: Mapping[str, float | None]) -> None:
        self._add(0, values)
        self.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        with self._store():
            self.client.set_terminated(self.run_id, status)


def _warn(name: str, error: BaseException) -> None:
    message = (str(error).strip().splitlines() or [""])[0][:300]
    warnings.warn(
        f"tracking: {name} failed ({type(error).__name__}: {message}); the run goes on without it "
        "(metrics.jsonl and results.json have every number)",
        TrackingWarning,
        stacklevel=3,
    )


class Tracking(Tracker):
    """The backends switched on, each guarded: the first failure of one is warned about and drops it."""

    def __init__(self, backends: Mapping[str, Tracker]) -> None:
        self.backends = dict(backends)

    def _each(self, call: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, call)(*args)
            except Exception as e:  # noqa: BLE001 - tracking must never stop a run
                del self.backends[name]
                _warn(name, e)
                try:
                    backend.discard()  # nothing more is sent: a server that failed may fail slowly again
                except Exception:  # noqa: BLE001 - already warned about this backend
                    pass

    def log_params(self, config: Mapping[str, Any]) -> None:
        self._each("log_params", config)

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        self._each("log_step", step, values)

    def log_task(self, task_index: int, values: Mapping[str, float | None]) -> None:
        self._each("log_task", task_index, values)

    def log_summary(self, values: Mapping[str, float | None]) -> None:
        self._each("log_summary", values)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.backends.clear()


def open_tracker(cfg: ExperimentConfig, folder: Path | None, resume: bool = False, step: int = 0) -> Tracker:
    """The tracker for a run of ``cfg`` in ``folder`` (resumed at optimiser step ``step``); the null
    tracker when tracking is off. A backend that cannot start is warned about and left out."""
    tc = cfg.tracking
    if not tc.enabled:
        return Tracker()
    if folder is None:
        warnings.warn("tracking: a run without a run folder is not tracked", TrackingWarning, stacklevel=2)
        return Tracker()
    backends: dict[str, Tracker] = {}
    if tc.tensorboard:
        try:
            backends["tensorboard"] = TensorBoardTracker(folder, resume, step)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a run
            _warn("tensorboard", e)
    if tc.mlflow:
        try:
            backends["mlflow"] = MlflowTracker(cfg, folder, resume)
        except Exception as e:  # noqa: BLE001
            _warn(f"mlflow ({tc.mlflow_uri or default_mlflow_uri(folder)})", e)
    return Tracking(backends)
