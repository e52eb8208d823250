"""Folders of many runs (compare, tune, sweep): one writer at a time, and what cannot be done is refused in one
line before anything in the folder is touched (issue 29's trial: items 3, 4, 5, 9, 19 and 20)."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metagate.cli import app
from metagate.runs import RunDir

runner = CliRunner()
FAST = ["benchmark.num_tasks=2", "benchmark.train_per_task=200", "benchmark.test_per_task=100", "trainer.epochs=1",
        "trainer.progress=false", "method.backbone.hidden=[16]", "benchmark.novel_tasks=0", "benchmark.min_value_tasks=0"]


def many(kind: str, out: Path, *extra: str) -> list[str]:
    """A compare, tune or sweep of SI on the default stream, cut short, into ``out``."""
    if kind == "compare":
        return ["compare", *FAST, *extra, "--methods", "si", "--seeds", "1", "--out", str(out)]
    if kind == "tune":
        return ["tune", *FAST, *extra, "--methods", "si", "--grid", "si:method.c=0.1,1", "--tuning-seeds", "1", "--seeds", "1", "--out", str(out)]
    return ["sweep", *FAST, *extra, "--methods", "si", "--inline", "--out", str(out)]


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("kind", ["compare", "tune", "sweep"])
def test_a_folder_another_process_runs_in_is_refused_and_left_as_it_was(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metagate.runs import RunDir; RunDir(sys.argv[1]).lock(); print('ok', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        res = runner.invoke(app, [*many(kind, out), "--resume"] if kind != "sweep" else many(kind, out))
        assert res.exit_code == 2, res.output
        assert f"{out} is in use by another metagate process (PID {holder.pid})" in res.output
        assert contents(out) == {}  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_is_free_again_once_its_command_ends(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert runner.invoke(app, many("sweep", out)).exit_code == 0
    RunDir(out).lock().unlock()  # no lock left behind


@pytest.mark.parametrize("kind", ["compare", "sweep"])
def test_rerunning_with_a_changed_config_is_refused_before_the_summaries_are_touched(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert runner.invoke(app, many(kind, out)).exit_code == 0
    before = contents(out)
    res = runner.invoke(app, [*many(kind, out, "trainer.lr=0.01"), *(["--resume"] if kind == "compare" else [])])
    assert res.exit_code == 2, res.output
    assert "holds a run of another config (trainer.lr: 0.001 there vs 0.01 here); nothing was written" in res.output
    assert contents(out) == before  # comparison.md, aggregate.md, sweep.json, report: as they were


def test_compare_resume_into_a_folder_that_is_not_a_comparison_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "comparison.md").write_text("my own notes\n")
    res = runner.invoke(app, [*many("compare", out), "--resume"])
    assert res.exit_code == 2, res.output
    assert "is not the folder of a comparison" in res.output
    assert (out / "comparison.md").read_text() == "my own notes\n" and contents(out) == {"comparison.md": b"my own notes\n"}


@pytest.mark.parametrize("kind", ["compare", "tune", "sweep"])
def test_an_out_folder_under_a_file_is_a_one_line_error(kind: str, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, many(kind, tmp_path / "afile" / "sub"))
    assert res.exit_code == 2, res.output
    assert "afile is a file, so no folder can be made under it; nothing was written. Choose another --out" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("kind", ["compare", "tune", "sweep"])
def test_an_out_folder_on_a_read_only_file_system_is_a_one_line_error(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.mkdir

    def read_only(self: Path, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if tmp_path in (self, *self.parents):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    res = runner.invoke(app, many(kind, tmp_path / "out"))
    assert res.exit_code == 2, res.output
    assert f"cannot write {tmp_path / 'out'}: it is not writable" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_tune_without_a_validation_split_is_refused_before_any_run(tmp_path: Path) -> None:
    res = runner.invoke(app, many("tune", tmp_path / "t", "benchmark.val_fraction=0"))
    assert res.exit_code == 2, res.output
    assert "benchmark.val_fraction=0 leaves no validation split to choose on" in res.output
    assert not (tmp_path / "t").exists()


def test_ctrl_c_before_the_first_checkpoint_gives_no_resume_command_that_would_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metagate.methods.base import Method

    def interrupt(self, task):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(Method, "before_task", interrupt)
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(out)])
    assert res.exit_code == 130
    assert "--resume" not in res.output and "no task had finished, so there is no checkpoint to resume from" in res.output
    monkeypatch.undo()
    # what it says to do works
    assert runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(tmp_path / "again")]).exit_code == 0


def test_a_command_refused_once_it_held_its_new_folder_leaves_no_folder_behind(tmp_path: Path) -> None:
    from metagate.orchestrate import holding

    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with holding(out):
            assert (out / ".lock").is_file()
            raise RuntimeError("refused after the folder was made (say, by the Ray cluster)")
    assert not out.exists()
    with holding(tmp_path / "kept"):
        (tmp_path / "kept" / "comparison.json").write_text("{}")
    assert (tmp_path / "kept" / "comparison.json").is_file()  # a folder with something in it stays
