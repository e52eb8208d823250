"""The Trainer and run folders: reproducible, resumable, and careful with what is on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metagate.config import config_from_dict
from metagate.methods.base import Method
from metagate.runs import CheckpointError, RunDir, RunFolderError
from metagate.train import Trainer, TrainingDiverged

NUMBERS = ("acc_matrix", "initial_acc", "acc", "bwt", "fwt", "forgetting", "heldout_acc_matrix", "train_steps")


def fit(raw: dict, run: RunDir | None = None, resume: bool = False) -> dict:
    """Train ``raw`` into ``run`` (locked by the caller, as orchestration does), releasing the folder after."""
    try:
        return Trainer(config_from_dict(raw), run).fit(resume=resume)
    finally:
        if run is not None:
            run.unlock()


@pytest.mark.parametrize("method", ["finetune", "ewc", "si"])
def test_same_seed_same_numbers(small, method: str) -> None:  # noqa: ANN001
    raw = small(method={"name": method}, trainer={"epochs": 1})
    a, b = fit(raw), fit(raw)
    assert {k: a[k] for k in NUMBERS} == {k: b[k] for k in NUMBERS}
    c = fit({**raw, "seed": 1})
    assert c["acc_matrix"] != a["acc_matrix"]


def test_results_contract(small, tmp_path: Path) -> None:  # noqa: ANN001
    run = RunDir.create(tmp_path / "run")
    fit(small(), run)
    for name in ("config.yaml", "results.json", "metrics.jsonl", "env.json", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("method", "benchmark", "seed", "num_tasks", "acc_matrix", "acc", "bwt", "fwt", "forgetting",
                "train_seconds", "train_samples_per_second", "peak_memory_mb"):
        assert key in res, key
    t = res["num_tasks"]
    assert len(res["acc_matrix"]) == t and all(len(row) == t for row in res["acc_matrix"])
    assert all(0 <= a <= 1 for row in res["acc_matrix"] for a in row)
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert {"torch", "python", "device", "git_revision"} <= set(env)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records if r["type"] == "eval"] == list(range(t))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "method",
    [
        {"name": "finetune", "reset_optimizer": False},
        {"name": "ewc"},
        {"name": "si"},
        {"name": "joint"},
        {"name": "online_ewc"},
        {"name": "xdg", "stabilizer": "si"},
        {"name": "xdg", "stabilizer": "ewc", "fisher_samples": 100},
        {"name": "metagate", "consolidation_steps": 20},
        {"name": "metagate", "meta_learning": False, "consolidation_steps": 20},
    ],
)
def test_resume_equals_uninterrupted(small, tmp_path: Path, monkeypatch, method: dict) -> None:  # noqa: ANN001
    raw = small(method=method, trainer={"epochs": 1}, benchmark={"num_tasks": 3, "train_per_task": 300})
    whole = fit(raw, RunDir.create(tmp_path / "whole"))

    original = Method.before_task

    def stop_at_task_2(self, task):  # noqa: ANN001, ANN202
        if task.index == 2:
            raise Interrupt
        return original(self, task)

    run = RunDir.create(tmp_path / "cut")
    with monkeypatch.context() as m:
        m.setattr(Method, "before_task", stop_at_task_2)
        with pytest.raises(Interrupt):
            fit(raw, run)
    assert not run.has_results()
    resumed = fit(raw, RunDir.open_for_resume(tmp_path / "cut"), resume=True)
    assert {k: resumed[k] for k in NUMBERS} == {k: whole[k] for k in NUMBERS}
    # metrics.jsonl holds each record once, as in the uninterrupted run
    read = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(line).items()} for line in (p / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["type"], r["task"]) for r in read(tmp_path / "cut")] == [(r["type"], r["task"]) for r in read(tmp_path / "whole")]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    original = Method.train_step

    def nan_in_task_1(self, batch, task):  # noqa: ANN001, ANN202
        out = original(self, batch, task)
        return {"loss": out["loss"] * float("nan")} if task.index == 1 else out

    monkeypatch.setattr(Method, "train_step", nan_in_task_1)
    run = RunDir.create(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="loss = nan in task 1.*checkpoint after task 0 is kept"):
        fit(small(), run)
    ckpt = run.load_checkpoint()
    assert ckpt["trainer_state"]["next_task"] == 1
    assert not run.has_results()


def test_corrupt_checkpoint_refused(small, tmp_path: Path) -> None:  # noqa: ANN001
    raw = small()
    run = RunDir.create(tmp_path / "run")
    fit(raw, run)
    run.file("results.json").unlink()
    run.checkpoint_path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(raw, RunDir.open_for_resume(tmp_path / "run"), resume=True)
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:10])
    with pytest.raises(CheckpointError):
        fit(raw, RunDir.open_for_resume(tmp_path / "run"), resume=True)


def test_resuming_a_run_of_another_config_is_refused_and_leaves_the_folder_free(small, tmp_path: Path) -> None:  # noqa: ANN001
    from metagate.orchestrate import prepare

    raw = small()
    run = RunDir.create(tmp_path / "run")
    fit(raw, run)
    with pytest.raises(CheckpointError, match=r"another config \(seed: 0 there vs 5 here\)"):
        prepare(config_from_dict({**raw, "seed": 5}), tmp_path / "run", resume=True)
    RunDir(tmp_path / "run").lock().unlock()  # the refusal released the folder


def test_checkpoint_of_another_shape_refused(small, tmp_path: Path) -> None:  # noqa: ANN001
    raw = small()
    run = RunDir.create(tmp_path / "run")
    fit(raw, run)
    ckpt = run.load_checkpoint()
    ckpt["method_state"]["model.head.weight"] = torch.zeros(3, 3)
    run.save_checkpoint({k: v for k, v in ckpt.items() if k != "format"})
    with pytest.raises(CheckpointError, match="does not fit method"):
        fit(raw, RunDir.open_for_resume(tmp_path / "run"), resume=True)


def test_existing_run_folder_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        RunDir.create(tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_cuda_requested_without_cuda_is_refused(small) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        Trainer(config_from_dict(small(trainer={"device": "cuda"})))
    with pytest.raises(ValueError, match="no Apple GPU"):
        Trainer(config_from_dict(small(trainer={"device": "mps"})))


def test_learning_curves_and_steps_to_90(small) -> None:  # noqa: ANN001
    res = fit(small(trainer={"epochs": 2, "curve_every": 5}, benchmark={"train_per_task": 320}))
    steps_per_task = 2 * 320 // 64
    for t, curve in enumerate(res["learning_curves"]):
        assert [s for s, _ in curve] == list(range(0, steps_per_task + 1, 5))
        assert curve[-1][1] == pytest.approx(res["acc_matrix"][t][t])  # last point: the task just trained
        assert 0 <= res["steps_to_90"][t] <= steps_per_task
    assert res["zero_shot_acc"][1:] == [res["acc_matrix"][t - 1][t] for t in range(1, res["num_tasks"])]
    plain = fit(small(trainer={"epochs": 2}, benchmark={"train_per_task": 320}))
    assert plain["acc_matrix"] == res["acc_matrix"]  # measuring does not change training


def test_iterations_per_task(small) -> None:  # noqa: ANN001
    """trainer.iterations_per_task: exactly that many steps per task, over reshuffled passes; a whole number
    of passes trains exactly as trainer.epochs does (the same batches)."""
    bench = {"train_per_task": 320}  # 288 training samples: 5 batches of 64 per pass
    by_epochs = fit(small(trainer={"epochs": 2}, benchmark=bench))
    by_steps = fit(small(trainer={"epochs": 1, "iterations_per_task": 10}, benchmark=bench))
    assert by_steps["acc_matrix"] == by_epochs["acc_matrix"]
    assert by_steps["train_steps"] == by_epochs["train_steps"] == 10 * by_steps["num_tasks"]
    cut = fit(small(trainer={"epochs": 5, "iterations_per_task": 7, "curve_every": 1}, benchmark=bench))
    assert cut["train_steps"] == 7 * cut["num_tasks"]
    assert [s for s, _ in cut["learning_curves"][0]] == list(range(8))


def test_run_files_are_readable_by_others_like_any_file(small, tmp_path: Path) -> None:  # noqa: ANN001
    import os
    import stat

    fit(small(benchmark={"num_tasks": 1}), RunDir.create(tmp_path / "run"))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "results.json", "env.json", "checkpoints/last.pt"):
        mode = stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


# --------------------------------------------------------------------------- runs you can trust


def test_a_checkpoint_with_flipped_bytes_is_refused_not_resumed(small, tmp_path: Path) -> None:  # noqa: ANN001
    raw = small()
    run = RunDir.create(tmp_path / "run")
    fit(raw, run)
    run.file("results.json").unlink()
    data = bytearray(run.checkpoint_path.read_bytes())
    middle = len(data) // 2  # inside the tensor data, where torch.load alone would not notice
    data[middle] ^= 0xFF
    run.checkpoint_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        fit(raw, RunDir.open_for_resume(tmp_path / "run"), resume=True)


def test_torchs_weights_only_advice_is_never_passed_on(small, tmp_path: Path) -> None:  # noqa: ANN001
    import hashlib
    import io

    from metagate.runs import CHECKPOINT_MAGIC

    run = RunDir.create(tmp_path / "run")
    buf = io.BytesIO()
    torch.save({"format": 2, "evil": Interrupt()}, buf)  # an object weights_only refuses
    payload = buf.getvalue()
    run.checkpoint_path.parent.mkdir(parents=True)
    run.checkpoint_path.write_bytes(CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CheckpointError) as err:
        run.load_checkpoint()
    assert "weights_only=False" not in str(err.value) and "was not loaded" in str(err.value)


def test_a_second_process_on_the_same_run_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    RunDir.create(tmp_path / "run").unlock()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metagate.runs import RunDir; RunDir(sys.argv[1]).lock(); print('ok', flush=True); time.sleep(60)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        with pytest.raises(RunFolderError, match=f"in use by another metagate process \\(PID {holder.pid}\\)"):
            RunDir.open_for_resume(tmp_path / "run") if (tmp_path / "run" / "config.yaml").exists() else RunDir(tmp_path / "run").lock()
    finally:
        holder.kill()
        holder.wait()
    RunDir(tmp_path / "run").lock().unlock()  # free again once the holder is gone
    assert os.getpid() > 0


def test_a_loss_grown_by_orders_of_magnitude_is_divergence(small, tmp_path: Path) -> None:  # noqa: ANN001
    raw = small(trainer={"lr": 1e8})  # Adam: the loss grows to ~1e17 but stays finite
    with pytest.raises(TrainingDiverged, match="over 10000 x the first loss"):
        fit(raw, RunDir.create(tmp_path / "run"))
    # a loss that merely wobbles is not divergence
    assert fit(small(trainer={"divergence_factor": 10}))["acc"] > 0


def test_without_checkpoints_the_divergence_message_does_not_promise_one(small, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    original = Method.train_step
    monkeypatch.setattr(
        Method, "train_step", lambda self, b, t: {"loss": original(self, b, t)["loss"] * (float("nan") if t.index == 1 else 1)}
    )
    with pytest.raises(TrainingDiverged, match="trainer.checkpoint=false, so it cannot be resumed"):
        fit(small(trainer={"checkpoint": False}), RunDir.create(tmp_path / "run"))


def test_threads_are_set_once_and_recorded(small) -> None:  # noqa: ANN001
    from metagate.schema import default_threads

    before = torch.get_num_threads()
    try:
        res = fit(small(benchmark={"num_tasks": 1}, trainer={"threads": 1}))
        assert res["threads"] == 1 and torch.get_num_threads() == 1
        assert fit(small(benchmark={"num_tasks": 1}))["threads"] == default_threads()
    finally:
        torch.set_num_threads(before)


def test_results_and_config_record_where_the_data_came_from(small, tmp_path: Path) -> None:  # noqa: ANN001
    import yaml

    run = RunDir.create(tmp_path / "run")
    res = fit(small(), run)
    assert res["data"]["location"] == "generated by gated_teacher (seed 0)" and len(res["data"]["sha256"]) == 64
    saved = yaml.safe_load(run.file("config.yaml").read_text())
    assert saved["provenance"] == res["data"] and "provenance" not in run.read_config()
    assert fit({**small(), "seed": 1})["data"]["sha256"] != res["data"]["sha256"]


def test_off_a_terminal_progress_is_one_line_per_epoch_without_carriage_returns(small, capsys) -> None:  # noqa: ANN001
    fit(small(trainer={"progress": True, "epochs": 2}, benchmark={"num_tasks": 2}))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split("  ")[0] for line in err.splitlines() if "epoch" in line] == ["task 1/2", "task 1/2", "task 2/2", "task 2/2"]


def test_a_stream_larger_than_free_memory_is_refused_before_it_is_built(small, monkeypatch) -> None:  # noqa: ANN001
    from metagate import runtime
    from metagate.schema import ConfigError

    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 10 * 2**20)  # 10 MiB free
    with pytest.raises(ConfigError, match="needs about .* GiB, more than the 0.0 GiB free.*lower benchmark.num_tasks"):
        Trainer(config_from_dict(small(benchmark={"num_tasks": 50, "train_per_task": 20000})))


def test_the_trainer_fills_a_validation_matrix_beside_the_test_matrix(small) -> None:  # noqa: ANN001
    res = fit(small())
    t = res["num_tasks"]
    assert len(res["val_acc_matrix"]) == t and all(len(row) == t for row in res["val_acc_matrix"])
    assert res["val_acc"] == pytest.approx(sum(res["val_acc_matrix"][-1]) / t) and res["val_acc_matrix"] != res["acc_matrix"]
    off = fit(small(benchmark={"val_fraction": 0}))
    assert off["val_acc_matrix"][0] == [None] * t and "val_acc" not in off


def test_peak_memory_is_each_runs_own_not_the_process_maximum() -> None:
    from metagate.runtime import PeakMemory

    big = PeakMemory(torch.device("cpu"), interval=0.001).start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    block += 1
    import time

    time.sleep(0.05)
    big_peak = big.stop()
    del block
    small = PeakMemory(torch.device("cpu"), interval=0.001).start()
    time.sleep(0.02)
    small_peak = small.stop()
    assert big_peak - small_peak > 32 and small.stop() == small_peak
