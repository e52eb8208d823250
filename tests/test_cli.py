"""The command line: run, compare, list; bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from metagate.cli import app

runner = CliRunner()
FAST = [
    "benchmark.num_tasks=2",
    "benchmark.train_per_task=200",
    "benchmark.test_per_task=100",
    "trainer.epochs=1",
    "trainer.progress=false",
    "method.backbone.hidden=[16]",
]


def test_run_prints_the_per_task_table_and_summary(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "| task |" in res.output and "ACC" in res.output and "BWT" in res.output and "FWT" in res.output
    assert "zero-shot (%) |" in res.output and not (tmp_path / "r" / "reference").exists()
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["trainer"]["epochs"] == 1 and saved["benchmark"]["num_tasks"] == 2


def test_default_run_is_metagate_next_to_its_xdg_reference(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", *FAST, "trainer.curve_every=2", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    main = json.loads((tmp_path / "r" / "results.json").read_text())
    ref = json.loads((tmp_path / "r" / "reference" / "results.json").read_text())
    assert (main["method"], ref["method"]) == ("metagate", "xdg")
    assert ref["task_names"] == main["task_names"] and ref["seed"] == main["seed"]
    ref_cfg = yaml.safe_load((tmp_path / "r" / "reference" / "config.yaml").read_text())
    assert ref_cfg["method"]["backbone"]["hidden"] == [16]  # the method's backbone, as no other was named
    header = res.output.split("| task |")[1].splitlines()[0]
    for figure in ("zero-shot (%)", "final (%)", "steps to 90%"):
        assert f"{figure} metagate" in header and f"{figure} xdg" in header
    assert (tmp_path / "r" / "per_task.md").read_text().startswith("| task |")
    # The table's zero-shot and steps figures are the runs' own.
    row = next(line for line in res.output.splitlines() if line.startswith("| 1 |")).strip("| ").split(" | ")
    assert row[2] == f"{100 * main['zero_shot_acc'][1]:.1f}" and row[3] == f"{100 * ref['zero_shot_acc'][1]:.1f}"
    assert row[8:10] == [str(main["steps_to_90"][1]), str(ref["steps_to_90"][1])]


def test_resume_finishes_an_interrupted_reference_run(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert runner.invoke(app, ["run", *FAST, "--out", str(out)]).exit_code == 0
    done = json.loads((out / "reference" / "results.json").read_text())
    (out / "reference" / "results.json").unlink()  # as if stopped after its last checkpoint
    res = runner.invoke(app, ["run", "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    again = json.loads((out / "reference" / "results.json").read_text())
    assert again["acc_matrix"] == done["acc_matrix"]
    res = runner.invoke(app, ["run", "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "finished run" in res.output


def test_a_bad_reference_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    for bad, message in (("reference.name=magic", "reference.name"), ("reference.c=-1", "reference.c"), ("reference=3", "reference")):
        res = runner.invoke(app, ["run", *FAST, bad, "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and message in res.output, (bad, res.output)
        assert not (tmp_path / "r").exists()


def test_run_with_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 4, "benchmark": {"name": "rotated_teacher"}, "method": {"name": "ewc"}}))
    res = runner.invoke(app, ["run", str(cfg), *FAST, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "r" / "results.json").read_text())
    assert (out["method"], out["benchmark"], out["seed"]) == ("ewc", "rotated_teacher", 4)


def test_bad_config_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    for bad in (["method.name=magic"], ["trainer.epochs=many"], ["method.foo=1"]):
        res = runner.invoke(app, ["run", *FAST, *bad, "--out", str(tmp_path / "r")])
        assert res.exit_code == 2
        assert "error:" in res.output
        assert not (tmp_path / "r").exists()
    res = runner.invoke(app, ["run", *FAST, "method.name=magic", "--out", str(tmp_path / "r")])
    from metagate.methods import METHODS

    assert "choose one of: " + ", ".join(METHODS.names()) in res.output


def test_existing_run_is_not_overwritten_and_resume_of_finished_run_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert runner.invoke(app, ["run", *FAST, "--out", str(out)]).exit_code == 0
    before = (out / "results.json").read_bytes()
    res = runner.invoke(app, ["run", *FAST, "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["run", "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "finished run" in res.output
    assert (out / "results.json").read_bytes() == before


def test_resume_of_an_interrupted_run_from_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert runner.invoke(app, ["run", *FAST, "--out", str(out)]).exit_code == 0
    whole = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()  # as if stopped after the last checkpoint
    res = runner.invoke(app, ["run", "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "results.json").read_text())["acc_matrix"] == whole["acc_matrix"]


def test_compare_writes_comparison_and_a_markdown_table(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compare", *FAST, "--methods", "finetune,ewc", "--seeds", "2", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "| method | ACC (%) | BWT (pt) | FWT (pt) | forgetting (pt) | time (s) |" in res.output
    comp = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert set(comp["methods"]) == {"finetune", "ewc"} and comp["seeds"] == [0, 1]
    acc = comp["methods"]["ewc"]["summary"]["acc"]
    assert len(acc["values"]) == 2 and acc["std"] >= 0
    assert (tmp_path / "c" / "ewc" / "seed1" / "results.json").is_file()


def test_compare_resume_reuses_finished_runs_only_of_the_same_config(tmp_path: Path) -> None:
    out = str(tmp_path / "c")
    assert runner.invoke(app, ["compare", *FAST, "--methods", "finetune", "--seeds", "1", "--out", out]).exit_code == 0
    first = json.loads((tmp_path / "c" / "finetune" / "seed0" / "results.json").read_text())
    res = runner.invoke(app, ["compare", *FAST, "--methods", "finetune", "--seeds", "1", "--out", out, "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "finetune" / "seed0" / "results.json").read_text()) == first
    res = runner.invoke(app, ["compare", *FAST, "trainer.lr=0.01", "--methods", "finetune", "--seeds", "1", "--out", out, "--resume"])
    assert res.exit_code == 1 and "another config (trainer.lr: 0.001 there vs 0.01 here)" in res.output
    assert not (tmp_path / "c" / "finetune" / "seed0" / "error.txt").exists()  # a finished run is left as it was


def test_compare_method_specific_overrides(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["compare", *FAST, "ewc:method.lambda=7", "--methods", "finetune,ewc", "--seeds", "1", "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "c" / "ewc" / "seed0" / "config.yaml").read_text())["method"]["lambda"] == 7
    res = runner.invoke(app, ["compare", *FAST, "si:method.c=1", "--methods", "finetune", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "which --methods does not name" in res.output


def test_compare_runs_labelled_variants(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        ["compare", *FAST, "strong:method.lambda=1000", "--methods", "ewc,strong=ewc", "--seeds", "1", "--out", str(tmp_path / "c")],
    )
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((tmp_path / "c" / "strong" / "seed0" / "config.yaml").read_text())
    assert cfg["method"]["name"] == "ewc" and cfg["method"]["lambda"] == 1000
    assert "| strong |" in res.output and "| ewc |" in res.output


def test_compare_refuses_unknown_method_before_training(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compare", *FAST, "--methods", "finetune,nope", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output
    assert not (tmp_path / "c").exists()


def test_list() -> None:
    for what, expected in (("methods", "online_ewc"), ("benchmarks", "gated_teacher"), ("configs", "default")):
        res = runner.invoke(app, ["list", what])
        assert res.exit_code == 0 and expected in res.output
    assert runner.invoke(app, ["list", "things"]).exit_code == 2


def test_device_this_machine_lacks_is_refused_before_writing(tmp_path: Path) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = runner.invoke(app, ["run", *FAST, "trainer.device=cuda", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no CUDA device" in res.output
    res = runner.invoke(app, ["run", *FAST, "trainer.device=gpu", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "trainer.device" in res.output
    assert not (tmp_path / "r").exists()
