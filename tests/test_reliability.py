"""The second reliability trial (issue 29): each bad input is a one-line error before any work, and no
wrong figure is written without a word. One test per failure the trial found outside orchestration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from metagate.cli import app
from metagate.config import ConfigError, config_from_dict, load_config

runner = CliRunner()


def one_line_error(result: Any) -> str:
    """The CLI's error: exit code 2, one line, no traceback."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in text, text
    return text


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("overrides", [["benchmark.num_tasks=6"], ["benchmark.num_tasks=10"], ["benchmark.classes_per_task=1"]])
def test_one_class_tasks_under_label_masking_are_refused_naming_the_keys(overrides: list[str], tmp_path: Path) -> None:
    # a one-class task scores 100% under label masking whatever the model learns (issue 29, item 2)
    text = one_line_error(runner.invoke(app, ["run", "digits-split", *overrides, "--out", str(tmp_path / "r")]))
    assert "one class" in text and "benchmark.num_tasks" in text and "benchmark.classes_per_task" in text
    assert not (tmp_path / "r").exists()
    # one class per task is fine where a single head answers among every class seen (class-incremental)
    load_config("digits-split", [*overrides, "benchmark.scenario=class"])


def test_more_tasks_than_classes_is_refused_with_a_plain_message() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("digits-split", ["benchmark.num_tasks=1000000"])
    assert "x 0 classes" not in str(e.value) and "num_tasks=1000000 is more tasks than digits's 10 classes" in str(e.value)
    assert "{" not in str(e.value)  # the section's whole input is not printed after a section-wide problem


@pytest.mark.parametrize("root", ["''", "' '"])
def test_an_empty_data_root_is_refused_not_replaced_by_the_system_copy(root: str) -> None:
    # config.yaml would record root: '' while the data came from elsewhere (item 8)
    with pytest.raises(ConfigError, match="benchmark.root: is empty"):
        load_config("digits-split", [f"benchmark.root={root}"])


def alias_bomb(depth: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth + 1)]
    return "seed: 0\nbenchmark: {name: split, dataset: digits}\nmethod:\n  name: si\n  c:\n" + "\n".join("    " + x for x in lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_without_expanding_or_printing_it(tmp_path: Path) -> None:
    # depth 9 took 68 s and 2.1 GB before a MemoryError; depth 5 printed 4.3 MB (item 11)
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))
    text = one_line_error(runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "r")]))
    assert "alias" in text and str(path) in text and len(text) < 300 and "lol" not in text


def test_an_alias_in_an_override_is_not_expanded() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("digits-split", ["method.backbone.hidden=[&a [1, 1], *a, *a]"])
    assert len(str(e.value)) < 400


def test_a_run_folders_config_with_an_alias_is_refused(tmp_path: Path) -> None:
    from metagate.runs import RunDir, RunFolderError

    tmp_path.joinpath("config.yaml").write_text(alias_bomb(9))
    with pytest.raises(RunFolderError, match="cannot be read"):
        RunDir(tmp_path).read_config()


@pytest.mark.parametrize(
    "override, key",
    [("trainer.epochs=true", "trainer.epochs"), ("method.c=true", "method.c"), ("trainer.lr=false", "trainer.lr"),
     ("method.backbone.hidden=[true, 8]", "method.backbone.hidden"), ("benchmark.num_tasks=true", "benchmark.num_tasks"),
     ("benchmark.val_fraction=true", "benchmark.val_fraction")],
)
def test_booleans_are_refused_where_numbers_are_expected(override: str, key: str) -> None:
    # true was read as 1 (item 21), while seed=true was refused
    with pytest.raises(ConfigError, match=f"{key}: must be a number"):
        load_config("digits-split", ["method.name=si", override])


def test_booleans_still_set_switches() -> None:
    cfg = load_config("digits-split", ["trainer.progress=false", "benchmark.normalize=false"])
    assert cfg.trainer.progress is False and cfg.benchmark.normalize is False  # type: ignore[attr-defined]


def test_a_seed_out_of_range_names_the_key() -> None:
    # was "Overflow when unpacking long long" from torch, no key named (item 22)
    with pytest.raises(ConfigError, match=r"seed=99999999999999999999 is out of range"):
        config_from_dict({"benchmark": {"name": "gated_teacher"}, "method": {"name": "finetune"}}, ["seed=99999999999999999999"])


def test_a_config_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 0\nbenchmark: {name: split, dataset: digits}\nmethod: {name: si}\n# caf\xe9\n".encode("latin-1"))
    text = one_line_error(runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "r")]))
    assert str(path) in text and "UTF-8" in text


def test_too_few_training_images_points_at_val_fraction(tmp_path: Path) -> None:
    # was "raise train_per_task", which cannot help when val_fraction takes almost every image (item 22)
    text = one_line_error(runner.invoke(app, ["run", "digits-split", "benchmark.val_fraction=0.99", "--out", str(tmp_path / "r")]))
    assert "benchmark.val_fraction" in text


def test_a_grid_with_an_empty_value_is_refused_not_dropped(tmp_path: Path) -> None:
    text = one_line_error(runner.invoke(app, ["sweep", "digits-split", "--grid", "method.c=1,,2", "--inline", "--out", str(tmp_path / "s")]))
    assert "empty value" in text and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- data fingerprint


def test_the_data_fingerprint_is_the_full_sha256_and_an_older_prefix_still_matches() -> None:
    import hashlib

    import torch

    from metagate.data.provenance import fingerprint_tensors, same_data

    digest = fingerprint_tensors([torch.zeros(3)])["sha256"]
    assert len(digest) == 64 and digest == hashlib.sha256(b"torch.float32(3,)" + bytes(12)).hexdigest()
    assert same_data(digest[:16], digest) and same_data(digest, digest)
    assert not same_data(digest[:16], "0" * 64) and not same_data(digest[:8], digest)  # too short a prefix proves nothing


# --------------------------------------------------------------------------- results files


def finished_results() -> dict[str, Any]:
    return {"method": "si", "seed": 0, "task_names": ["t0", "t1"], "acc_matrix": [[0.9, 0.1], [0.8, 0.9]], "initial_acc": [0.1, 0.1],
            "acc": 0.85, "bwt": -0.1, "fwt": 0.0, "forgetting": 0.1, "zero_shot_acc": [0.1, 0.1], "train_seconds": 1.0}


BROKEN = {
    "ragged": lambda r: r.update(acc_matrix=[[0.9, 0.1], [0.8]]),
    "strings": lambda r: r.update(acc_matrix=[["a", "b"], ["c", "d"]]),
    "missing acc": lambda r: r.pop("acc"),
    "extra row": lambda r: r.update(acc_matrix=[[0.9, 0.1], [0.8, 0.9], [0.7, 0.8]]),
    "string acc": lambda r: r.update(acc="high"),
    "not a list": lambda r: r.update(acc_matrix={"0": 1}),
}


@pytest.mark.parametrize("damage", list(BROKEN))
@pytest.mark.parametrize("command", ["aggregate", "report"])
def test_a_results_file_of_the_wrong_shape_is_a_one_line_error_naming_it(damage: str, command: str, tmp_path: Path) -> None:
    # ValueError, KeyError and IndexError tracebacks before (item 12)
    run = tmp_path / "si" / "seed0"
    run.mkdir(parents=True)
    results = finished_results()
    BROKEN[damage](results)
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.yaml").write_text("seed: 0\nbenchmark: {name: gated_teacher}\nmethod: {name: si}\n")
    text = one_line_error(runner.invoke(app, [command, str(tmp_path)]))
    assert str(run / "results.json") in text and "not a finished metagate run's results" in text


def test_a_well_formed_results_file_passes_the_check(tmp_path: Path) -> None:
    from metagate.runs import check_results

    assert check_results(finished_results(), tmp_path / "results.json")["acc"] == 0.85


# --------------------------------------------------------------------------- the machine


def test_a_model_too_large_for_memory_is_refused_before_work(tmp_path: Path) -> None:
    # an allocation traceback before: only the data's size was estimated (item 13)
    from metagate.runtime import check_machine

    cfg = load_config("digits-split", ["method.name=si", "method.backbone.hidden=[100000, 100000]"])
    with pytest.raises(ConfigError, match=r"10,006,600,000 parameters .* lower method.backbone.hidden"):
        check_machine(cfg)
    text = one_line_error(runner.invoke(app, ["run", "digits-split", "method.backbone.hidden=[100000,100000]", "--out", str(tmp_path / "r")]))
    assert "GiB" in text and not (tmp_path / "r").exists()
    check_machine(load_config("digits-split", ["method.name=si"]))  # a usual model passes


def test_a_reference_too_large_for_memory_is_refused_too() -> None:
    from metagate.runtime import check_machine

    cfg = load_config("digits-split", ["reference.name=xdg", "reference.backbone.hidden=[100000, 100000]"])
    with pytest.raises(ConfigError, match="xdg's backbone"):
        check_machine(cfg)


def test_ulimit_v_bounds_the_memory_estimate() -> None:
    # under ulimit -v the estimate read MemAvailable only, then an allocation traceback (item 14)
    import subprocess
    import sys

    code = (
        "import resource; from metagate.runtime import available_memory_bytes, address_space_free\n"
        "used = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
        "print(available_memory_bytes(), address_space_free())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**__import__("os").environ}).stdout.split()
    free, left = int(out[0]), int(out[1])
    assert free <= left <= 2**30 and left > 2**29


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_memory_limit_bounds_the_memory_estimate(version: str, tmp_path: Path) -> None:
    from metagate.runtime import cgroup_memory_free

    membership = tmp_path / "cgroup"
    if version == "v2":
        membership.write_text("0::/job/42\n")
        folder = tmp_path / "fs" / "job" / "42"
        folder.mkdir(parents=True)
        (folder / "memory.max").write_text(f"{3 * 2**30}\n")
        (folder / "memory.current").write_text(f"{2**30}\n")
    else:
        membership.write_text("4:memory:/job/42\n1:cpu:/\n")
        folder = tmp_path / "fs" / "memory" / "job" / "42"
        folder.mkdir(parents=True)
        (folder / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
        (folder / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert cgroup_memory_free(tmp_path / "fs", membership) == 2 * 2**30
    (folder / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text("max\n" if version == "v2" else f"{2**63 - 4096}\n")
    assert cgroup_memory_free(tmp_path / "fs", membership) is None


def test_thread_counts_are_capped_at_the_cores_available_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    # trainer.threads=100000 crashed torch (exit 139); 5000 crawled (item 15)
    import torch

    from metagate.runtime import available_cores, configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(100000) == available_cores()
        assert "100000 threads asked for (trainer.threads)" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- weights files


@pytest.mark.parametrize("content", ["garbage", "pickle", "not a state_dict", "wrong shapes"])
def test_a_bad_weights_file_is_a_one_line_error_without_torchs_advice(content: str, tmp_path: Path) -> None:
    # an UnpicklingError traceback recommending weights_only=False before (item 16)
    import torch

    path = tmp_path / "backbone.pt"
    if content == "garbage":
        path.write_bytes(b"\x80\x04not a torch file at all" * 10)
    elif content == "pickle":
        torch.save({"w": __import__("pathlib").PurePosixPath("x")}, path)  # a class weights_only refuses to unpickle
    elif content == "not a state_dict":
        torch.save([torch.zeros(2)], path)
    else:
        torch.save({"hidden.0.weight": torch.zeros(3, 3)}, path)
    args = ["run", "digits-split", "method.name=piggyback", "method.pretrain=file", f"method.weights={path}", "trainer.epochs=1"]
    text = one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "r")]))
    assert str(path) in text and "weights_only" not in text


# --------------------------------------------------------------------------- Ray


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_unreachable_ray_address_is_a_prompt_one_line_error(scheme: str, tmp_path: Path) -> None:
    # ray://127.0.0.1:1: a traceback after 33 s; 127.0.0.1:1 hung (item 17)
    import time

    pytest.importorskip("ray")
    address = f"{scheme}127.0.0.1:{closed_port()}"
    start = time.perf_counter()
    text = one_line_error(runner.invoke(app, ["sweep", "digits-split", "--methods", "si", "--address", address, "--out", str(tmp_path / "s")]))
    assert time.perf_counter() - start < 20 and address in text and "connection refused" in text
    assert not (tmp_path / "s").exists()


def test_a_ray_address_that_never_answers_is_given_up_after_a_bounded_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from metagate import sweep

    seen = {}

    def silent(address: tuple[str, int], timeout: float) -> None:
        seen["timeout"] = timeout
        raise TimeoutError

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(ConfigError, match=r"cannot reach the Ray cluster at --address 10.0.0.1:6379 \(no answer within 5 s\)"):
        sweep.check_reachable("10.0.0.1:6379")
    assert seen["timeout"] == sweep.CONNECT_TIMEOUT_S
    sweep.check_reachable("auto")  # other forms are Ray's to resolve


# --------------------------------------------------------------------------- aggregate and reports


def fake_run(folder: Path, seed: int = 0, acc: float = 0.85, **benchmark: Any) -> None:
    import yaml

    folder.mkdir(parents=True)
    config = {"seed": seed, "benchmark": {"name": "split", "dataset": "digits", "num_tasks": 2, **benchmark},
              "method": {"name": "si"}, "trainer": {"lr": 0.001}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "results.json").write_text(json.dumps({**finished_results(), "seed": seed, "acc": acc}))


def test_aggregate_rows_always_name_the_data_set_when_it_differs(tmp_path: Path) -> None:
    # digits and Fashion-MNIST runs were labelled [classes_per_task=None, num_tasks=5]: the data set never appeared (item 23)
    from metagate.aggregate import find_runs, group

    for i, (dataset, tasks) in enumerate([("digits", 5), ("fashion_mnist", 2), ("fashion_mnist", 3), ("digits", 4)]):
        fake_run(tmp_path / f"run{i}", dataset=dataset, num_tasks=tasks)
    labels = list(group(find_runs([tmp_path])))
    assert "si [benchmark.dataset=digits, benchmark.num_tasks=5]" in labels and len(labels) == 4


def test_folder_names_are_escaped_in_report_md_and_aggregate_md(tmp_path: Path) -> None:
    # <img src=x onerror=...> rendered in Markdown viewers and a|b broke the table (item 24)
    evil, bar = "<img src=x onerror=alert(1)>", "a|b"
    runs = tmp_path / "runs"
    fake_run(runs / evil / "seed0")
    fake_run(runs / bar / "seed0", num_tasks=3)
    result = runner.invoke(app, ["aggregate", str(runs), "--out", str(tmp_path / "aggregate.md")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["report", str(runs)]).exit_code == 0
    for md in (tmp_path / "aggregate.md", runs / "report.md"):
        text = md.read_text()
        assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text and "a&#124;b" in text
        rows = [line for line in text.splitlines() if line.startswith("| ")]
        assert len({line.count("|") for line in rows if line.count("|") > 2}) == 1, rows  # every row as many cells as the header
    page = (runs / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page and "&amp;lt;" not in page
    assert "<td>a|b</td>" in page


# --------------------------------------------------------------------------- run folders


def test_a_full_disk_while_writing_the_lock_leaves_nothing_that_blocks_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a traceback, then an empty .lock after which a fresh run and --resume both refused the folder (item 10)
    import errno
    import os

    from metagate.runs import RunDir, RunFolderError

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        with pytest.raises(RunFolderError, match="the disk is full"):
            RunDir.create(tmp_path / "new" / "run")
        assert not (tmp_path / "new").exists()  # the folders it made are gone
        (tmp_path / "mine").mkdir()
        with pytest.raises(RunFolderError, match="the disk is full"):
            RunDir.create(tmp_path / "mine")
        assert list((tmp_path / "mine").iterdir()) == []  # a folder the user made is kept, empty
        text = one_line_error(runner.invoke(app, ["run", "digits-split", "--out", str(tmp_path / "cli")]))
        assert "disk is full" in text
    RunDir.create(tmp_path / "mine").unlock()  # space again: the folder is usable


def test_an_empty_lock_left_by_an_older_version_does_not_block_a_new_run(tmp_path: Path) -> None:
    from metagate.runs import RunDir, RunFolderError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("")
    RunDir.create(tmp_path / "run").unlock()
    held = RunDir.create(tmp_path / "other")  # a lock a live process holds still keeps the folder
    with pytest.raises(RunFolderError, match="not empty"):
        RunDir.create(tmp_path / "other")
    held.unlock()


def test_a_run_folder_deleted_and_recreated_mid_run_gets_no_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: Any) -> None:
    # the run finished into a folder without config.yaml, env.json or .lock, and aggregate accepted it (item 6)
    import shutil

    from metagate.methods import METHODS
    from metagate.runs import RunDir, RunFolderError
    from metagate.train import Trainer

    folder = tmp_path / "run"
    cls = METHODS.get("finetune")
    original = cls.after_task

    def replace_folder(self: Any, task: Any) -> Any:
        if task.index == 1:
            shutil.rmtree(folder)
            folder.mkdir()
        return original(self, task)

    monkeypatch.setattr(cls, "after_task", replace_folder)
    with pytest.raises(RunFolderError, match="deleted or replaced while this run wrote it"):
        Trainer(config_from_dict(small()), RunDir.create(folder)).fit()
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("damage", ["cut short", "deleted", "cut mid-record"])
def test_resume_over_a_damaged_metrics_file_is_refused(damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: Any) -> None:
    # resume went on silently, leaving an unparseable line and the lost records lost (item 7)
    from metagate.methods import METHODS
    from metagate.runs import RunDir, RunFolderError
    from metagate.train import Trainer

    class Stop(Exception):
        pass

    cls = METHODS.get("finetune")
    original = cls.before_task

    def stop(self: Any, task: Any) -> Any:
        if task.index == 2:
            raise Stop
        return original(self, task)

    raw = small()
    with monkeypatch.context() as m:
        m.setattr(cls, "before_task", stop)
        run = RunDir.create(tmp_path / "run")
        with pytest.raises(Stop):
            Trainer(config_from_dict(raw), run).fit()
        run.unlock()  # the lock is orchestration's to release (as orchestrate.train does when a run stops)
    metrics = tmp_path / "run" / "metrics.jsonl"
    data = metrics.read_bytes()
    if damage == "deleted":
        metrics.unlink()
    elif damage == "cut short":
        metrics.write_bytes(data[: len(data) // 2])
    else:  # as long as before, but a record broken where the checkpoint ends
        metrics.write_bytes(data.replace(b"\n", b" ", data.count(b"\n")))
    with pytest.raises(RunFolderError, match="cannot resume: .*metrics.jsonl"):
        Trainer(config_from_dict(raw), RunDir.open_for_resume(tmp_path / "run")).fit(resume=True)


def test_the_same_run_found_twice_counts_once_and_both_folders_are_named(tmp_path: Path) -> None:
    # two sweeps of one config and seeds 0-1 gave 4 seeds and a CI of [93.0, 98.1] where n = 2 gives [77.9, 113.3] (item 1)
    import shutil

    from metagate.aggregate import aggregate_paths

    for sweep_dir in ("A", "B"):
        for seed, acc in [(0, 0.90), (1, 0.96)]:
            fake_run(tmp_path / sweep_dir / "si_c-1" / f"seed{seed}", seed=seed, acc=acc)
    shutil.copytree(tmp_path / "A" / "si_c-1" / "seed0", tmp_path / "copy")
    summary, text = aggregate_paths([tmp_path / "A" / "si_c-1", tmp_path / "B" / "si_c-1", tmp_path / "copy"])
    row = summary["si_c-1"]
    assert row["seeds"] == [0, 1] and row["acc"]["n"] == 2
    assert "| 2 | 93.0 ± 4.2 [54.9, 131.1] |" in text
    named = row["duplicates"][str(tmp_path / "A" / "si_c-1" / "seed0")]
    assert named == [str(tmp_path / "B" / "si_c-1" / "seed0"), str(tmp_path / "copy")]
    assert "Counted once" in text and str(tmp_path / "copy") in text


def test_a_deleted_checkpoint_is_not_called_a_run_that_never_finished_a_task(tmp_path: Path) -> None:
    # "stopped before its first task ended" after 8 tasks (item 22)
    out = tmp_path / "r"
    fast = ["benchmark.name=gated_teacher", "benchmark.num_tasks=2", "benchmark.train_per_task=200", "benchmark.test_per_task=100",
            "method.name=finetune", "trainer.epochs=1", "reference=null", "trainer.progress=false"]
    assert runner.invoke(app, ["run", *fast, "--out", str(out)]).exit_code == 0
    (out / "results.json").unlink()
    (out / "checkpoints" / "last.pt").unlink()
    result = runner.invoke(app, ["run", "--resume", "--out", str(out)])
    text = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and text.startswith("error:") and "Traceback" not in result.output
    assert "records finished tasks" in text and "before its first task ended" not in text


def test_out_below_a_file_names_the_file(tmp_path: Path) -> None:
    # "afile is not writable" (item 22)
    (tmp_path / "afile").write_text("")
    text = one_line_error(runner.invoke(app, ["run", "digits-split", "--out", str(tmp_path / "afile" / "sub")]))
    assert "afile is a file, not a folder" in text


def test_a_full_disk_while_writing_a_finished_runs_report_does_not_say_resume(tmp_path: Path) -> None:
    # "resume with --resume" for a run that had finished (item 22)
    import errno

    from metagate.runs import write_problem

    (tmp_path / "results.json").write_text("{}")
    line = str(write_problem(tmp_path / "report" / "acc.png", OSError(errno.ENOSPC, "full")))
    assert "disk is full" in line and "--resume" not in line and "finished run is kept" in line
    assert "--resume" in str(write_problem(tmp_path / "other" / "checkpoints" / "last.pt", OSError(errno.ENOSPC, "full")))


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_numbers(tmp_path: Path) -> None:
    """A real ``kill -9`` of a run process mid-task (no exception handler runs): ``--resume`` finishes it
    with the numbers of an uninterrupted run, and its metrics hold each record once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fast = ["benchmark.name=gated_teacher", "benchmark.num_tasks=4", "benchmark.train_per_task=3000", "benchmark.test_per_task=300",
            "method.name=si", "trainer.epochs=3", "reference=null", "trainer.progress=false", "trainer.threads=1"]
    cli = [sys.executable, "-m", "metagate.cli", "run", *fast]
    subprocess.run([*cli, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cli, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (cut / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(0.2)  # into the next task
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (cut / "results.json").exists()
    subprocess.run([*cli[:4], "--resume", "--out", str(cut)], check=True, capture_output=True)
    whole, resumed = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("whole", "cut"))
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["initial_acc"] == whole["initial_acc"]
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    evals = [r["task"] for r in records if r["type"] == "eval"]
    assert evals == [0, 1, 2, 3]


def test_what_metagate_writes_as_yaml_it_reads_back_without_aliases(tmp_path: Path) -> None:
    from metagate.runs import RunDir

    shared = [64, 64]
    RunDir(tmp_path).write_config({"seed": 0, "method": {"backbone": {"hidden": shared}}, "reference": {"backbone": {"hidden": shared}}})
    assert "&" not in (tmp_path / "config.yaml").read_text()
    assert RunDir(tmp_path).read_config()["reference"]["backbone"]["hidden"] == [64, 64]


def test_a_reference_that_cannot_run_is_refused_before_the_method_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the oracle reference was refused only after the main run and the XdG reference trained, and its advice named
    # the main method's `hidden`, not the reference's (item 18)
    from metagate.methods import METHODS

    trained: list[str] = []
    for name in ("metagate", "xdg", "oracle"):
        cls = METHODS.get(name)
        original = cls.before_task
        monkeypatch.setattr(cls, "before_task", lambda self, task, _o=original, _n=name: (trained.append(_n), _o(self, task))[1])
    res = runner.invoke(app, ["run", "benchmark.units_per_group=5", "trainer.epochs=1", "trainer.progress=false", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0
    assert "reference[1] (oracle) cannot run" in res.output and "reference[1].backbone.hidden=[95]" in res.output
    assert "method.backbone.hidden" not in res.output
    assert trained == [] and not (tmp_path / "r").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does_with_the_resume_hint_and_exit_143(tmp_path: Path) -> None:
    # SIGTERM exited 143 with no resume hint (item 22)
    import signal
    import subprocess
    import sys
    import time

    fast = ["benchmark.name=gated_teacher", "benchmark.num_tasks=3", "benchmark.train_per_task=3000", "benchmark.test_per_task=300",
            "method.name=si", "trainer.epochs=3", "reference=null", "trainer.progress=false", "trainer.threads=1"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "metagate.cli", "run", *fast, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (cut / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert f"continue with: metagate run --resume --out {cut}" in err
    resumed = subprocess.run([sys.executable, "-m", "metagate.cli", "run", "--resume", "--out", str(cut)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((cut / "results.json").read_text())["acc_matrix"]) == 3


def test_a_second_ctrl_c_cannot_cut_the_interrupted_message_short(tmp_path: Path) -> None:
    # a double Ctrl-C in compare printed nothing (item 22): once the first is being handled, SIGINT is ignored
    import signal

    import typer

    from metagate import cli

    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(typer.Exit):
            cli._interrupted(tmp_path, True, "metagate compare --resume")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_tune_grid_with_an_empty_value_is_refused_not_dropped(tmp_path: Path) -> None:
    # `--grid method.c=1,,2` dropped the empty value silently in tune as it did in sweep (item 22)
    res = runner.invoke(app, ["tune", "gated-teacher-task", "--methods", "si", "--grid", "si:method.c=1,,2", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and "has an empty value" in res.output
    assert not (tmp_path / "t").exists()
