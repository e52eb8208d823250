"""Plugins and the Python API: a method and a benchmark in a package of the user's own register through entry
points and are found by every command; ``metagate.run`` and ``metagate.load_runs`` serve a notebook."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from metagate.cli import app
from metagate.data import BENCHMARKS
from metagate.methods import METHODS

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugin"
TINY_TEACHER = '''"""A benchmark plugin: the gated teacher under another name, two tasks by default."""

from typing import Literal

from metagate.data.synthetic import GatedTeacher


class TinyTeacher(GatedTeacher):
    """Two tasks of the gated teacher, from a plugin."""

    class Config(GatedTeacher.Config):
        name: Literal["tiny_teacher"] = "tiny_teacher"
        num_tasks: int = 2
'''
FAST = ["benchmark.train_per_task=200", "benchmark.test_per_task=100", "trainer.epochs=1", "trainer.progress=false",
        "method.backbone.hidden=[16]"]


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example plugin (a method) and a benchmark plugin, installed as a package is: their modules on
    ``sys.path`` with a ``.dist-info`` folder that declares their entry points. Undone after the test."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "l2_anchor.py", site / "l2_anchor.py")
    (site / "tiny_teacher_plugin.py").write_text(TINY_TEACHER)
    info = site / "metagate_test_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: metagate-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[metagate.methods]\nl2_anchor = l2_anchor:L2Anchor\n\n[metagate.benchmarks]\ntiny_teacher = tiny_teacher_plugin:TinyTeacher\n"
    )
    monkeypatch.syspath_prepend(str(site))
    for registry in (METHODS, BENCHMARKS):  # the registries as they were, once the test ends
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_loaded", set(registry._loaded))
    yield site
    for module in ("l2_anchor", "tiny_teacher_plugin"):
        sys.modules.pop(module, None)


def test_the_example_plugin_declares_its_method_as_an_entry_point() -> None:
    text = (EXAMPLE / "pyproject.toml").read_text()
    assert '[project.entry-points."metagate.methods"]' in text and 'l2_anchor = "l2_anchor:L2Anchor"' in text


def test_list_shows_installed_plugins_without_importing_them(installed: Path) -> None:
    res = runner.invoke(app, ["list", "methods"])
    assert res.exit_code == 0, res.output
    assert "l2_anchor" in res.output and "weights pulled toward the previous task's" in res.output and "(plugin, from l2_anchor)" in res.output
    assert "l2_anchor" not in sys.modules  # read from its source, as the package's own methods are
    res = runner.invoke(app, ["list", "benchmarks"])
    assert "tiny_teacher" in res.output and "Two tasks of the gated teacher, from a plugin." in res.output


def test_run_compare_sweep_and_aggregate_train_and_find_a_plugin_method_on_a_plugin_benchmark(installed: Path, tmp_path: Path) -> None:
    base = ["gated-teacher-task", "benchmark.name=tiny_teacher", "method.name=l2_anchor", "method.strength=10", *FAST]
    res = runner.invoke(app, ["run", *base, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["method"], results["benchmark"], results["num_tasks"]) == ("l2_anchor", "tiny_teacher", 2)
    assert len(results["l2_anchor_moved"]) == 2 and min(results["l2_anchor_moved"]) > 0  # its report hook's figures
    assert results["task_bytes"] == [0, 0]

    res = runner.invoke(app, ["compare", *base, "--methods", "l2_anchor,finetune", "--seeds", "1", "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "| l2_anchor |" in res.output and "| finetune |" in res.output
    res = runner.invoke(app, ["sweep", *base, "--methods", "l2_anchor", "--grid", "method.strength=1,100", "--inline", "--out", str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    assert "| l2_anchor_strength-1 |" in res.output and "| l2_anchor_strength-100 |" in res.output
    res = runner.invoke(app, ["aggregate", str(tmp_path / "cmp"), str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("| l2_anchor ")]
    # the compare's run and the single one: one config and one seed, so one row of one run (the same run counts once)
    assert len(rows) == 1 and rows[0].split(" | ")[3] == "1"


def test_a_plugin_that_cannot_be_loaded_is_named_with_what_to_do(installed: Path, tmp_path: Path) -> None:
    info = next(installed.glob("*.dist-info"))
    (info / "entry_points.txt").write_text("[metagate.methods]\nbroken = no_such_module:Nothing\n")
    res = runner.invoke(app, ["run", "gated-teacher-task", "method.name=broken", *FAST, "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "the method plugin 'broken' (no_such_module:Nothing" in res.output and "fix or uninstall the package" in res.output
    assert not (tmp_path / "r").exists()


def test_the_python_api_runs_a_config_and_loads_the_runs_back(tmp_path: Path) -> None:
    import metagate

    fast = [*FAST, "method.name=finetune"]
    in_memory = metagate.run("gated-teacher-task", overrides=[*fast, "benchmark.num_tasks=2"])
    assert len(in_memory["acc_matrix"]) == 2 and not list(tmp_path.iterdir())  # nothing written without out
    config: dict[str, Any] = {"benchmark": {"name": "gated_teacher", "num_tasks": 2}, "method": {"name": "si"}}
    results = metagate.run(config, out=tmp_path / "si", overrides=FAST)
    assert json.loads((tmp_path / "si" / "results.json").read_text())["acc_matrix"] == results["acc_matrix"]
    runs = metagate.load_runs(tmp_path)
    assert [(r.label, r.results["method"]) for r in runs] == [("si", "si")]
    row = runs[0].row()
    assert row["acc"] == results["acc"] and row["seed"] == 0 and "acc_matrix" not in row  # scalars: one table row


def test_import_metagate_stays_light() -> None:
    code = "import sys, metagate; assert callable(metagate.load_runs.__call__) if False else True; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"  # metagate.run / load_runs import torch on first use, not on import
