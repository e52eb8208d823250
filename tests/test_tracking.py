"""Optional tracking: TensorBoard event files and MLflow runs hold the run's numbers, a resumed run
continues them without duplicates, tracking is not part of a run's identity, and a missing package
or a failing backend never costs the run."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import Interrupted, small_config
from metagate.config import ConfigError, config_from_dict, load_config
from metagate.identity import same_run
from metagate.methods import METHODS
from metagate.runs import RunDir
from metagate.tracking import MLFLOW_RUN_FILE, TENSORBOARD_DIR, Tracker, Tracking, TrackingWarning, open_tracker
from metagate.train import Trainer


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


needs_tensorboard = pytest.mark.skipif(not has("tensorboard"), reason="tensorboard is not installed (pip install 'metagate[tensorboard]')")
needs_mlflow = pytest.mark.skipif(not has("mlflow"), reason="mlflow is not installed (pip install 'metagate[mlflow]')")


def tiny(**tracking: Any) -> dict[str, Any]:
    """3 tasks x 2 epochs of 4 steps, losses every 3 steps."""
    return small_config(
        benchmark={"train_per_task": 240, "test_per_task": 100},
        trainer={"epochs": 2, "log_every": 3, "checkpoint": True},
        tracking=tracking,
    )


def fit(raw: dict[str, Any], folder: Path, resume: bool = False) -> dict[str, Any]:
    run = RunDir.open_for_resume(folder) if resume else RunDir.create(folder)
    try:
        return Trainer(config_from_dict(raw), run).fit(resume=resume)
    finally:
        run.unlock()


def interrupted(raw: dict[str, Any], folder: Path, monkeypatch: pytest.MonkeyPatch, after_steps: int = 14) -> None:
    """Run ``raw`` into ``folder`` and stop it, as a kill would, after ``after_steps`` optimiser steps
    (14: in the middle of task 1, after task 0's checkpoint and a few logged losses of task 1)."""
    cls = METHODS.get(raw["method"]["name"])
    original, calls = cls.train_step, []

    def step(self, batch, task):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) > after_steps:
            raise Interrupted
        return original(self, batch, task)

    with monkeypatch.context() as m:
        m.setattr(cls, "train_step", step)
        with pytest.raises(Interrupted):
            fit(raw, folder)


def records(folder: Path, kind: str) -> list[dict[str, Any]]:
    lines = (folder / RunDir.METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------- config


def test_tracking_is_off_by_default_and_not_part_of_the_run() -> None:
    cfg = load_config()
    assert not cfg.tracking.tensorboard and not cfg.tracking.mlflow and not cfg.tracking.enabled
    saved = cfg.to_dict()
    del saved["tracking"]  # a config.yaml written before the section existed
    assert same_run(saved, cfg.to_dict())
    on = config_from_dict(cfg.to_dict(), ["tracking.mlflow_uri=http://host:5000", "tracking.experiment=x"]).to_dict()
    assert same_run(saved, on) and same_run(on, cfg.to_dict())
    assert not same_run(saved, config_from_dict(cfg.to_dict(), ["seed=5"]).to_dict())


def test_a_store_that_is_not_a_uri_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri.*must be a URI"):
        config_from_dict(small_config(tracking={"mlflow_uri": "runs/mlflow.db"}))
    with pytest.raises(ConfigError, match=r"unknown key 'tracking\.tensorbord'"):
        config_from_dict(small_config(tracking={"tensorbord": True}))


@pytest.mark.parametrize(
    ("tracking", "missing", "extra"),
    [
        ({"tensorboard": True}, "tensorboard", "metagate[tensorboard]"),
        ({"mlflow": True}, "mlflow", "metagate[mlflow]"),
        ({"mlflow": True}, "sqlalchemy", "metagate[mlflow]"),  # the default store is SQLite
        ({"mlflow": True, "mlflow_uri": "sqlite:///x.db"}, "alembic", "metagate[mlflow]"),
    ],
)
def test_a_backend_without_its_package_is_one_line_naming_the_extra(
    tracking: dict[str, Any], missing: str, extra: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: its import fails
    with pytest.raises(ConfigError) as err:
        config_from_dict(small_config(tracking=tracking))
    assert f"pip install '{extra}'" in str(err.value) and "\n" not in str(err.value)
    # through the command line: refused before anything is written
    from metagate.cli import app

    out = tmp_path / "r"
    flags = [f"tracking.{k}={'true' if v is True else v}" for k, v in tracking.items()]
    res = CliRunner().invoke(app, ["run", "gated-teacher-task", *flags, "trainer.epochs=1", "--out", str(out)])
    assert res.exit_code == 2 and f"pip install '{extra}'" in res.output and not out.exists()


def test_a_tracking_server_needs_no_sqlite_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    if not has("mlflow"):
        pytest.skip("mlflow is not installed")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    assert config_from_dict(small_config(tracking={"mlflow": True, "mlflow_uri": "http://127.0.0.1:5000"})).tracking.mlflow


# --------------------------------------------------------------------------- failures never cost the run


class Failing(Tracker):
    def __init__(self) -> None:
        self.calls = 0

    def log_step(self, step: int, values: Any) -> None:
        self.calls += 1
        raise OSError("disk full")


class Recording(Tracker):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.closed = ""

    def log_step(self, step: int, values: Any) -> None:
        self.steps.append(step)

    def close(self, status: str = "FINISHED") -> None:
        self.closed = status


def test_a_failing_backend_is_warned_about_once_and_dropped_and_the_others_go_on() -> None:
    failing, recording = Failing(), Recording()
    tracking = Tracking({"bad": failing, "good": recording})
    with pytest.warns(TrackingWarning, match=r"tracking: bad failed \(OSError: disk full\); the run goes on") as caught:
        for step in range(3):
            tracking.log_step(step, {"train/loss": 1.0})
    assert len(caught) == 1 and failing.calls == 1 and recording.steps == [0, 1, 2]
    tracking.close()
    assert recording.closed == "FINISHED"


def test_a_run_without_tracking_opens_the_null_tracker(tmp_path: Path) -> None:
    cfg = config_from_dict(small_config())
    assert type(open_tracker(cfg, tmp_path)) is Tracker


@needs_mlflow
def test_a_tracking_server_that_is_down_is_a_warning_and_the_run_finishes(tmp_path: Path) -> None:
    raw = tiny(mlflow=True, mlflow_uri="http://127.0.0.1:9")  # nothing listens there
    with pytest.warns(TrackingWarning, match=r"mlflow \(http://127\.0\.0\.1:9\) failed") as caught:
        results = fit(raw, tmp_path / "run")
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert (tmp_path / "run" / RunDir.RESULTS).is_file() and results["acc"] > 0
    assert not (tmp_path / "run" / MLFLOW_RUN_FILE).exists()


@needs_tensorboard
def test_a_backend_failing_mid_run_is_dropped_and_the_run_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metagate.tracking import TensorBoardTracker

    calls = []

    def fail(self, task_index, values):  # noqa: ANN001, ANN202
        calls.append(task_index)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "log_task", fail)
    with pytest.warns(TrackingWarning, match=r"tensorboard failed \(OSError: .*No space left") as caught:
        results = fit(tiny(tensorboard=True), tmp_path / "run")
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1 and calls == [0]
    assert json.loads((tmp_path / "run" / RunDir.RESULTS).read_text())["acc"] == results["acc"]
    assert [p[0] for p in scalars(tmp_path / "run")["train/loss"]] == [3, 6]  # what was logged before the failure


# --------------------------------------------------------------------------- TensorBoard


@needs_tensorboard
def test_tensorboard_holds_the_step_losses_task_figures_and_summary(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        results = fit(tiny(tensorboard=True), folder)
    s = scalars(folder)
    steps = records(folder, "step")
    assert [p[0] for p in s["train/loss"]] == [r["step"] for r in steps] == list(range(3, 25, 3))
    assert [v for _, v in s["train/loss"]] == pytest.approx([r["loss"] for r in steps])
    assert [p[0] for p in s["epoch/loss"]] == [r["step"] for r in records(folder, "epoch")] == list(range(4, 25, 4))
    rows = results["acc_matrix"]
    assert s["task/acc"] == [(t, pytest.approx(sum(rows[t][: t + 1]) / (t + 1))) for t in range(3)]
    assert s["task/acc_just_trained"] == [(t, pytest.approx(rows[t][t])) for t in range(3)]
    assert s["task/val_acc_just_trained"] == [(t, pytest.approx(results["val_acc_matrix"][t][t])) for t in range(3)]
    assert s["final/acc"] == [(0, pytest.approx(results["acc"]))]
    assert s["final/bwt"] == [(0, pytest.approx(results["bwt"]))]
    assert len(s["final/peak_memory_mb"]) == 1 and len(s["final/train_seconds"]) == 1


@needs_tensorboard
def test_tensorboard_of_a_resumed_run_has_each_point_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, folder = tiny(tensorboard=True), tmp_path / "run"
    interrupted(raw, folder, monkeypatch)  # task 1's losses at steps 9 and 12 written, then a stop at step 15
    assert (folder / RunDir.CHECKPOINT).is_file() and not (folder / RunDir.RESULTS).exists()
    results = fit(raw, folder, resume=True)
    s = scalars(folder)
    assert [p[0] for p in s["train/loss"]] == list(range(3, 25, 3))  # the orphaned 9 and 12 hidden, not doubled
    assert [p[0] for p in s["task/acc"]] == [0, 1, 2]
    assert s["final/acc"] == [(0, pytest.approx(results["acc"]))]
    assert len(list((folder / TENSORBOARD_DIR).iterdir())) == 2  # appended to the same folder


@needs_tensorboard
def test_switching_tracking_on_for_a_resume_is_the_same_run(tmp_path: Path) -> None:
    from metagate.cli import app

    out = tmp_path / "r"
    fast = ["gated-teacher-task", "trainer.epochs=1", "benchmark.train_per_task=200", "benchmark.num_tasks=3", "trainer.progress=false"]
    assert CliRunner().invoke(app, ["run", *fast, "--out", str(out)]).exit_code == 0
    whole = json.loads((out / RunDir.RESULTS).read_text())
    (out / RunDir.RESULTS).unlink()  # as if stopped after the last checkpoint
    res = CliRunner().invoke(app, ["run", "--out", str(out), "--resume", "tracking.tensorboard=true"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / RunDir.RESULTS).read_text())["acc_matrix"] == whole["acc_matrix"]
    assert scalars(out)["final/acc"] == [(0, pytest.approx(whole["acc"]))]


# --------------------------------------------------------------------------- MLflow


@pytest.fixture(params=["sqlite", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tracking section of an MLflow store in ``tmp_path``: the default (SQLite beside the run
    folder) or a file store (which MLflow 3 accepts only when asked to)."""
    if not has("mlflow"):
        pytest.skip("mlflow is not installed (pip install 'metagate[mlflow]')")
    if request.param == "sqlite":
        if not (has("sqlalchemy") and has("alembic")):
            pytest.skip("sqlalchemy / alembic are not installed (pip install 'metagate[mlflow]')")
        return {"mlflow": True}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return {"mlflow": True, "mlflow_uri": (tmp_path / "mlruns").as_uri(), "experiment": "tests", "run_name": "tiny"}


def mlflow_run(folder: Path) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    saved = json.loads((folder / MLFLOW_RUN_FILE).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy's, about MLflow's models
        client = MlflowClient(tracking_uri=saved["tracking_uri"])
    return client, client.get_run(saved["run_id"])


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_holds_the_params_and_metrics_of_results_json(store: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        results = fit(tiny(**store), folder)
    client, run = mlflow_run(folder)
    if "mlflow_uri" not in store:
        assert json.loads((folder / MLFLOW_RUN_FILE).read_text())["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert run.info.status == "FINISHED"
    assert run.info.run_name == store.get("run_name", str(folder.resolve()))  # the folder's path (absolute: outside the cwd)
    assert client.get_experiment(run.info.experiment_id).name == store.get("experiment", "gated_teacher")
    params = run.data.params
    assert params["method.name"] == "finetune" and params["trainer.epochs"] == "2" and params["method.backbone.hidden"] == "[32, 32]"
    assert run.data.metrics["final/acc"] == pytest.approx(results["acc"])
    assert run.data.metrics["final/forgetting"] == pytest.approx(results["forgetting"])
    rows = results["acc_matrix"]
    assert history(client, run.info.run_id, "task/acc") == [(t, pytest.approx(sum(rows[t][: t + 1]) / (t + 1))) for t in range(3)]
    steps = records(folder, "step")
    assert history(client, run.info.run_id, "train/loss") == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert [s for s, _ in history(client, run.info.run_id, "epoch/loss")] == list(range(4, 25, 4))


def test_a_resumed_run_continues_its_mlflow_run_without_duplicates(
    store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    interrupted(tiny(**store), folder, monkeypatch)
    client, run = mlflow_run(folder)
    assert run.info.status == "FAILED"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [3, 6, 9, 12]  # sent as the run stopped
    results = fit(tiny(**store), folder, resume=True)
    client, resumed = mlflow_run(folder)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "task/acc")] == [0, 1, 2]
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(3, 25, 3))
    assert [s for s, _ in history(client, run.info.run_id, "final/acc")] == [0]
    assert resumed.data.metrics["final/acc"] == pytest.approx(results["acc"])
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_switching_mlflow_on_for_a_resume_starts_its_run_there(store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    interrupted(tiny(), folder, monkeypatch)
    results = fit(tiny(**store), folder, resume=True)
    client, run = mlflow_run(folder)
    assert [s for s, _ in history(client, run.info.run_id, "task/acc")] == [1, 2]  # the tasks trained since
    assert run.data.metrics["final/acc"] == pytest.approx(results["acc"])
    assert run.data.params["method.name"] == "finetune"


def test_a_reference_shares_its_runs_store_and_is_nested_under_it(store: dict[str, Any], tmp_path: Path) -> None:
    from metagate.orchestrate import run_with_reference

    cfg = config_from_dict(tiny(**store) | {"reference": {"name": "joint"}})
    outcome = run_with_reference(cfg, tmp_path / "run", resume=False)
    results, (reference,) = outcome.results, outcome.references
    client, run = mlflow_run(tmp_path / "run")
    ref_client, ref = mlflow_run(tmp_path / "run" / "reference")
    assert ref_client.tracking_uri == client.tracking_uri  # the default store: tmp_path/mlflow.db for both
    assert ref.data.tags["mlflow.parentRunId"] == run.info.run_id and ref.data.tags["metagate.method"] == "joint"
    assert ref.data.metrics["final/acc"] == pytest.approx(reference["acc"]) and run.data.metrics["final/acc"] == pytest.approx(results["acc"])


PARALLEL_RUN = """
import sys
from pathlib import Path
from metagate.config import config_from_dict
from metagate.tracking import MlflowTracker

cfg = config_from_dict({"benchmark": {"name": "gated_teacher"}, "method": {"name": "finetune"}, "tracking": {"mlflow": True}})
folder = Path(sys.argv[1])
folder.mkdir()
tracker = MlflowTracker(cfg, folder)  # unguarded: a failure is this process's exit code
tracker.log_task(0, {"task/acc": 0.5})
tracker.close()
"""


@pytest.mark.slow
def test_runs_in_parallel_create_and_share_one_sqlite_store(tmp_path: Path) -> None:
    import os
    import subprocess

    if not (has("mlflow") and has("sqlalchemy") and has("alembic")):
        pytest.skip("mlflow, sqlalchemy and alembic are needed (pip install 'metagate[mlflow]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", PARALLEL_RUN, str(tmp_path / f"seed{i}")], env=env, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    client, run = mlflow_run(tmp_path / "seed0")
    runs = client.search_runs([run.info.experiment_id])
    assert sorted(r.data.tags["metagate.run_folder"] for r in runs) == [str((tmp_path / f"seed{i}").resolve()) for i in range(3)]
    assert all(r.data.metrics["task/acc"] == 0.5 and r.info.status == "FINISHED" for r in runs)
