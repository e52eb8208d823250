"""Report pages (``metagate report``): a run's and a comparison's sections and figures, a page that loads
nothing from outside, bad folders refused in one line, and only the report's own files written."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from metagate import plots
from metagate.cli import app
from metagate.report_page import FIGURE_DIR, REPORT_HTML, REPORT_MD, write_report

runner = CliRunner()
FAST = [  # the default experiment (metagate next to XdG and the oracle), small
    "benchmark.num_tasks=3", "benchmark.novel_tasks=0", "benchmark.min_value_tasks=0", "benchmark.train_per_task=200",
    "benchmark.test_per_task=100", "trainer.epochs=1", "trainer.progress=false", "trainer.curve_every=2", "method.backbone.hidden=[16]",
]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with its two reference runs, made by ``metagate run`` (which writes the report)."""
    out = tmp_path_factory.mktemp("run") / "r"
    res = runner.invoke(app, ["run", *FAST, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"report: {out / REPORT_HTML}" in res.output
    return out


@pytest.fixture(scope="module")
def compare_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "c"
    res = runner.invoke(app, ["compare", *FAST, "--methods", "finetune,xdg", "--seeds", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def files_except_report(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` but the report's own, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (REPORT_HTML, REPORT_MD) and p.parent.name != FIGURE_DIR and p.name != ".lock"
    }


def images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', html)


def md_figures(md: str, folder: Path) -> list[Path]:
    return [folder / src for src in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)]


def test_a_run_page_has_its_sections_figures_and_references(run_folder: Path) -> None:
    html, md = (run_folder / REPORT_HTML).read_text(), (run_folder / REPORT_MD).read_text()
    results = json.loads((run_folder / "results.json").read_text())
    for section in ("Reference runs", "Accuracy", "Next to the reference runs", "Learning curves", "Masks", "Per task"):
        assert f"## {section}\n" in md and f"<h2>{section}</h2>" in html, section
    assert "uses task identity at test" in md and "test_time_info: task_id" in md and "domain-incremental" in md
    assert "- xdg (reference/):" in md and "- oracle (reference-2/):" in md
    assert "just trained (%) oracle" in md and "<th>just trained (%) oracle</th>" in html  # report.per_task_table
    figures = md_figures(md, run_folder)
    assert [f.name for f in figures] == ["acc_matrix.png", "over_stream.png", "references.png", "learning_curves.png", "masks.png"]
    assert all(f.read_bytes().startswith(PNG) for f in figures)
    assert len(images(html)) == len(figures) and all(src.startswith("data:image/png;base64,") for src in images(html))
    assert f"ACC {100 * results['acc']:.1f}%" in html


def test_a_comparison_page_has_bars_the_table_and_a_run_per_label(compare_folder: Path) -> None:
    html_path, md_path = write_report(compare_folder)
    md, html = md_path.read_text(), html_path.read_text()
    assert "# 4 runs in c\n" in md and "![" in md and "(report/summary.png)" in md
    assert "| method | uses at test |" in md and "ACC (%)" in md and "<th>ACC (%)</th>" in html  # aggregate.table
    for label in ("finetune", "xdg"):
        assert f"## {label}\n" in md and f"Representative run: {label}/seed0/ (seed 0, 2 run(s) in all)" in md
        assert (compare_folder / FIGURE_DIR / f"run-{label}.png").read_bytes().startswith(PNG)
    assert len(images(html)) == 3 == len(md_figures(md, compare_folder))


def test_a_tuned_sweep_reports_the_chosen_settings_and_the_choice(tmp_path: Path) -> None:
    out = tmp_path / "t"
    grid = ["--methods", "finetune,si", "--grid", "si:method.c=1,10", "--tuning-seeds", "1", "--seeds", "1"]
    assert runner.invoke(app, ["tune", *FAST, "benchmark.num_tasks=2", *grid, "--out", str(out)]).exit_code == 0
    chosen = json.loads((out / "tuning.json").read_text())["chosen"]["si"]
    md = write_report(out)[1].read_text()
    assert "# 2 runs in t/final: the settings chosen on validation" in md  # the test figures: final runs only
    assert "Representative run: final/si/seed0/" in md and "tuning/si_c" not in md.split("## Choice on validation")[0]
    rows = [line for line in md.split("## Choice on validation")[1].splitlines() if line.startswith("| si |")]
    assert len(rows) == 2 and [r.endswith("| chosen |") for r in rows] == [f"method.c={c}" == chosen[0] for c in (1, 10)]


def test_the_html_page_loads_nothing_from_outside(run_folder: Path, compare_folder: Path) -> None:
    write_report(compare_folder)
    for folder in (run_folder, compare_folder):
        html = (folder / REPORT_HTML).read_text()
        outside_data = re.sub(r'"data:image/png;base64,[A-Za-z0-9+/=]*"', '""', html)
        assert "http" not in outside_data and "//" not in outside_data.replace("<!DOCTYPE", "")
        assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', html))
        assert "<link" not in html and "url(" not in html and "@import" not in html and "<iframe" not in html


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_a_folder_without_results_is_refused_in_one_line(make: str, tmp_path: Path) -> None:
    folder = tmp_path / "x"
    if make == "empty":
        (folder / "sub").mkdir(parents=True)
    elif make == "file":
        folder.write_text("not a folder")
    res = runner.invoke(app, ["report", str(folder)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pass a run folder" in lines[0], res.output
    assert {"missing": "does not exist", "empty": "no results.json", "file": "is a file"}[make] in lines[0]
    assert not (tmp_path / "x" / REPORT_HTML).exists()


def test_a_damaged_results_file_is_refused_and_nothing_is_written(run_folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_folder, copy)
    (copy / "reference-2" / "results.json").write_text('{"acc_matrix": [[0.5')  # cut short
    before = {**files_except_report(copy), REPORT_HTML: (copy / REPORT_HTML).read_bytes()}
    res = runner.invoke(app, ["report", str(copy)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "reference-2/results.json cannot be read" in res.output and f"metagate run --resume --out {copy}," in res.output
    assert {**files_except_report(copy), REPORT_HTML: (copy / REPORT_HTML).read_bytes()} == before
    (copy / "reference-2" / "results.json").write_text("[]")
    res = runner.invoke(app, ["report", str(copy)])
    assert res.exit_code == 2 and "not a finished metagate run" in res.output


def test_reporting_again_rewrites_only_the_report(run_folder: Path) -> None:
    before = files_except_report(run_folder)
    (run_folder / REPORT_MD).write_text("old")
    res = runner.invoke(app, ["report", str(run_folder)])
    assert res.exit_code == 0 and f"report: {run_folder / REPORT_HTML}" in res.output
    assert files_except_report(run_folder) == before
    assert (run_folder / REPORT_MD).read_text().startswith("# metagate on composed_teacher")
    assert not list(run_folder.rglob("*.tmp"))


def test_a_generative_run_page_shows_its_sample_grids(tmp_path: Path) -> None:
    from metagate.config import config_from_dict
    from metagate.runs import RunDir
    from metagate.train import Trainer

    raw = {"benchmark": {"name": "split", "dataset": "digits", "num_tasks": 2, "classes_per_task": 2, "scenario": "class"},
           "method": {"name": "mergan", "gan": {"dim": 8, "z_dim": 16}, "evaluator_epochs": 1, "eval_samples": 20,
                      "evaluator": {"kind": "mlp", "hidden": [16]}},
           "trainer": {"iterations_per_task": 6, "batch_size": 32, "progress": False}}
    Trainer(config_from_dict(raw), RunDir.create(tmp_path / "run")).fit()
    html_path, md_path = write_report(tmp_path / "run")
    md, html = md_path.read_text(), html_path.read_text()
    assert "![samples_task1.png](samples_task1.png)" in md and "Generated-sample accuracy" in md
    grid = "data:image/png;base64," + __import__("base64").b64encode((tmp_path / "run" / "samples_task1.png").read_bytes()).decode()
    assert f'<img src="{grid}"' in html and "## Masks" not in md and "## Reference runs" not in md


# --------------------------------------------------------------------------- the figures


def lines_of(fig: Any) -> list[Any]:
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_xydata().size]


def test_a_long_stream_shows_a_few_tasks_and_the_mean() -> None:
    rng = np.random.default_rng(0)
    r = np.tril(rng.uniform(0.5, 1.0, (30, 30))) + np.triu(rng.uniform(0, 0.3, (30, 30)), 1)
    assert plots.shown_tasks(30) == [0, 7, 14, 22, 29] and plots.shown_tasks(20) == list(range(20))
    fig = plots.over_stream_figure(r)
    mean = next(line for line in lines_of(fig) if line.get_label() == "mean of trained tasks")
    assert np.allclose(mean.get_ydata(), [100 * r[i, : i + 1].mean() for i in range(30)])
    assert len(lines_of(fig)) == 5 + 4 + 1  # trained parts, not-yet-trained parts (not task 0), the mean
    curves = [[[0, 0.1], [10, 0.5]]] * 30
    assert len(lines_of(plots.learning_curves_figure(curves))) == 5
    heat = plots.acc_matrix_figure(r).axes[0].images[0].get_array()
    assert np.allclose(heat, 100 * r)


def test_the_bars_show_mean_std_and_the_confidence_interval() -> None:
    stat = lambda mean, std, ci: {"mean": mean, "std": std, "ci95": ci, "n": 3}  # noqa: E731
    summary = {
        "a": {"acc": stat(0.8, 0.05, 0.12), "bwt": stat(-0.1, 0.02, 0.05), "train_seconds": stat(3.0, 0.5, 1.2)},
        "b": {"acc": stat(0.6, 0.0, None), "bwt": stat(None, None, None), "train_seconds": stat(2.0, 0.1, 0.2)},
    }
    fig = plots.summary_bars_figure(summary)
    acc, bwt, _ = fig.axes
    assert [round(p.get_height(), 6) for p in acc.patches] == [80.0, 60.0]
    ci = [c for c in acc.collections if c.get_label() != "± std" and len(c.get_segments()) == 1]
    assert len(ci) == 1 and np.allclose(ci[0].get_segments()[0][:, 1], [68.0, 92.0])  # only a's, 80 ± 12
    assert any(t.get_text() == "n/a" for t in bwt.texts)
    assert plots.ci_bounds({"mean": 0.5, "ci95": [0.4, 0.7]}) == (0.4, 0.7) and plots.ci_bounds({"mean": 0.5, "ci95": None}) is None
    assert plots.to_png(fig).startswith(PNG)
