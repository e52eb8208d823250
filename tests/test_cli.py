"""The command line: run, compare, list; bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from metagate.cli import app

runner = CliRunner()
FAST_ANY = [  # any benchmark
    "benchmark.num_tasks=2",
    "benchmark.train_per_task=200",
    "benchmark.test_per_task=100",
    "trainer.epochs=1",
    "trainer.progress=false",
    "method.backbone.hidden=[16]",
]
FAST = [*FAST_ANY, "benchmark.novel_tasks=0", "benchmark.min_value_tasks=0"]  # the default's composed teacher


def test_run_prints_the_per_task_table_and_summary(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "| task |" in res.output and "ACC" in res.output and "BWT" in res.output and "FWT" in res.output
    assert "zero-shot (%) |" in res.output and not (tmp_path / "r" / "reference").exists()
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["trainer"]["epochs"] == 1 and saved["benchmark"]["num_tasks"] == 2


def test_default_run_is_metagate_next_to_xdg_and_the_oracle(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", *FAST, "trainer.curve_every=2", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    main = json.loads((tmp_path / "r" / "results.json").read_text())
    ref = json.loads((tmp_path / "r" / "reference" / "results.json").read_text())
    oracle = json.loads((tmp_path / "r" / "reference-2" / "results.json").read_text())
    assert (main["method"], ref["method"], oracle["method"]) == ("metagate", "xdg", "oracle")
    assert ref["task_names"] == main["task_names"] == oracle["task_names"] and ref["seed"] == main["seed"] == oracle["seed"]
    ref_cfg = yaml.safe_load((tmp_path / "r" / "reference" / "config.yaml").read_text())
    assert ref_cfg["method"]["backbone"]["hidden"] == [16]  # the method's backbone, as no other was named
    oracle_cfg = yaml.safe_load((tmp_path / "r" / "reference-2" / "config.yaml").read_text())
    assert oracle_cfg["method"]["backbone"]["hidden"] == [209]  # its own: the teacher's width
    header = res.output.split("| task |")[1].splitlines()[0]
    for figure in ("zero-shot (%)", "final (%)", "steps to 90%"):
        assert all(f"{figure} {m}" in header for m in ("metagate", "xdg", "oracle"))
    assert (tmp_path / "r" / "per_task.md").read_text().startswith("| task |")
    # The table's zero-shot and steps figures are the runs' own.
    row = next(line for line in res.output.splitlines() if line.startswith("| 1 |")).strip("| ").split(" | ")
    assert row[2:5] == [f"{100 * r['zero_shot_acc'][1]:.1f}" for r in (main, ref, oracle)]
    assert row[11:14] == [str(r["steps_to_90"][1]) for r in (main, ref, oracle)]
    assert "oracle: [domain-incremental" in res.output  # a summary line per reference


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
    res = runner.invoke(app, ["run", str(cfg), *FAST_ANY, "--out", str(tmp_path / "r")])
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


def test_compare_writes_comparison_and_the_aggregate_table(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compare", *FAST, "--methods", "finetune,ewc", "--seeds", "2", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "| method | uses at test | scenario | seeds | ACC (%) | BWT (pt) | FWT (pt) | forgetting (pt) |" in res.output
    assert "| ewc | nothing | domain | 2 |" in res.output and "Not like for like" not in res.output
    comp = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert set(comp["methods"]) == {"finetune", "ewc"} and comp["seeds"] == [0, 1]
    acc = comp["methods"]["ewc"]["summary"]["acc"]
    assert acc["n"] == 2 and acc["std"] >= 0 and acc["ci95"] > 0
    # the same table as metagate aggregate makes of the folder (one statistics and table stack)
    assert (tmp_path / "c" / "comparison.md").read_text().strip() == runner.invoke(app, ["aggregate", str(tmp_path / "c")]).output.strip()
    assert (tmp_path / "c" / "ewc" / "seed1" / "results.json").is_file()


def test_compare_resume_with_another_method_set_keeps_the_earlier_methods(tmp_path: Path) -> None:
    out = str(tmp_path / "c")
    assert runner.invoke(app, ["compare", *FAST, "--methods", "finetune", "--seeds", "1", "--out", out]).exit_code == 0
    before = json.loads((tmp_path / "c" / "comparison.json").read_text())["methods"]["finetune"]
    res = runner.invoke(app, ["compare", *FAST, "--methods", "ewc", "--seeds", "1", "--out", out, "--resume"])
    assert res.exit_code == 0, res.output
    comp = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert list(comp["methods"]) == ["finetune", "ewc"] and comp["methods"]["finetune"]["summary"] == before["summary"]
    table = (tmp_path / "c" / "comparison.md").read_text()
    assert "| finetune | nothing |" in table and "| ewc | nothing |" in table


def test_compare_resume_reuses_finished_runs_only_of_the_same_config(tmp_path: Path) -> None:
    out = str(tmp_path / "c")
    assert runner.invoke(app, ["compare", *FAST, "--methods", "finetune", "--seeds", "1", "--out", out]).exit_code == 0
    first = json.loads((tmp_path / "c" / "finetune" / "seed0" / "results.json").read_text())
    res = runner.invoke(app, ["compare", *FAST, "--methods", "finetune", "--seeds", "1", "--out", out, "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "finetune" / "seed0" / "results.json").read_text()) == first
    res = runner.invoke(app, ["compare", *FAST, "trainer.lr=0.01", "--methods", "finetune", "--seeds", "1", "--out", out, "--resume"])
    assert res.exit_code == 2 and "another config (trainer.lr: 0.001 there vs 0.01 here); nothing was written" in res.output
    assert not (tmp_path / "c" / "finetune" / "seed0" / "error.txt").exists()  # a finished run is left as it was


def test_a_finished_run_written_before_a_field_existed_is_reused_when_the_field_keeps_its_default(tmp_path: Path) -> None:
    """Runs made before ``trainer.iterations_per_task`` existed (their config.yaml lacks it) are the same
    runs as today's with its default; an explicit other value is still another config."""
    out = str(tmp_path / "c")
    assert runner.invoke(app, ["compare", *FAST, "--methods", "finetune", "--seeds", "1", "--out", out]).exit_code == 0
    path = tmp_path / "c" / "finetune" / "seed0" / "config.yaml"
    text = path.read_text()
    assert "iterations_per_task: 0\n" in text
    path.write_text(text.replace("  iterations_per_task: 0\n", ""))
    first = json.loads((tmp_path / "c" / "finetune" / "seed0" / "results.json").read_text())
    res = runner.invoke(app, ["compare", *FAST, "--methods", "finetune", "--seeds", "1", "--out", out, "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "finetune" / "seed0" / "results.json").read_text()) == first
    res = runner.invoke(app, ["compare", *FAST, "trainer.iterations_per_task=5", "--methods", "finetune", "--seeds", "1", "--out", out, "--resume"])
    assert res.exit_code == 2 and "another config (trainer.iterations_per_task: 0 there vs 5 here)" in res.output


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


# --------------------------------------------------------------------------- runs you can trust


def test_compare_keeps_going_records_the_failure_and_resume_retries_it(tmp_path: Path) -> None:
    out = tmp_path / "c"
    args = ["compare", *FAST, "--methods", "bad=finetune,si", "--seeds", "1", "--out", str(out)]
    res = runner.invoke(app, [*args, "bad:trainer.lr=1e30"])
    assert res.exit_code == 1, res.output
    assert "failed: bad, seed 0: loss = nan" in res.output and "--resume" in res.output
    assert (out / "si" / "seed0" / "results.json").is_file() and (out / "si" / "seed0" / "per_task.md").is_file()
    error = (out / "bad" / "seed0" / "error.txt").read_text()
    assert error.startswith("loss = nan") and "Traceback" in error
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["methods"]["bad"]["failed"] == {"0": error.splitlines()[0]} and comp["methods"]["bad"]["summary"]["acc"]["n"] == 0
    assert "| bad | n/a | n/a | 0 |" in (out / "comparison.md").read_text()
    assert "failed runs, not in the figures above (see error.txt in their folders): bad (seed 0)" in (out / "comparison.md").read_text()
    # the cause fixed, --resume retries the failed entry, keeps its old attempt, reuses the finished one
    si_before = (out / "si" / "seed0" / "results.json").read_bytes()
    res = runner.invoke(app, [*args, "bad:trainer.lr=0.001", "--resume"])
    assert res.exit_code == 0, res.output
    assert (out / "bad" / "seed0" / "results.json").is_file() and (out / "bad" / "seed0.failed-1" / "error.txt").is_file()
    assert (out / "si" / "seed0" / "results.json").read_bytes() == si_before
    assert "failed runs" not in (out / "comparison.md").read_text()


def test_compare_labels_cannot_escape_the_output_folder(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compare", *FAST, "--methods", "../escaped=si", "--seeds", "1", "--out", str(tmp_path / "c" / "out")])
    assert res.exit_code == 2 and "not a safe folder name" in res.output
    assert not (tmp_path / "c").exists()


def test_an_impossible_backbone_is_refused_before_training(tmp_path: Path) -> None:
    for method in ("xdg", "metagate"):
        res = runner.invoke(app, ["run", *FAST, f"method.name={method}", "method.backbone.hidden=[]", "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and "has no hidden layer" in res.output, res.output
    res = runner.invoke(app, ["run", *FAST, "method.backbone.hidden=[0]", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "method.backbone.hidden.0" in res.output
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_or_read_only_is_a_one_line_error(tmp_path: Path) -> None:
    import os

    (tmp_path / "afile").write_text("mine")
    res = runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is a file, not a folder" in res.output and "Traceback" not in res.output
    assert (tmp_path / "afile").read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        res = runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(tmp_path / "ro" / "r")])
        assert res.exit_code == 2 and "not writable" in res.output


def test_a_full_disk_is_a_one_line_error_and_the_checkpoint_survives(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import errno
    import os

    from metagate import runs

    out = tmp_path / "r"
    assert runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(out)]).exit_code == 0
    (out / "results.json").unlink()
    good = (out / "checkpoints" / "last.pt").read_bytes()

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "fsync", full)
    res = runner.invoke(app, ["run", "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "the disk is full" in res.output and "Traceback" not in res.output
    assert (out / "checkpoints" / "last.pt").read_bytes() == good
    assert not [p for p in out.rglob("*.tmp")]
    assert os.path.exists(out / "config.yaml")


def test_resume_with_another_config_names_the_keys_that_differ(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(out)]).exit_code == 0
    (out / "results.json").unlink()
    res = runner.invoke(app, ["run", "--out", str(out), "--resume", "trainer.lr=0.5", "method.c=2"])
    assert res.exit_code == 2 and "run folder:" not in res.output
    assert "another config (method.c: 0.1 there vs 2.0 here; trainer.lr: 0.001 there vs 0.5 here)" in res.output


def test_ctrl_c_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from metagate.methods.base import Method

    original = Method.before_task

    def interrupt_at_task_1(self, task):  # noqa: ANN001, ANN202
        if task.index == 1:
            raise KeyboardInterrupt
        return original(self, task)

    monkeypatch.setattr(Method, "before_task", interrupt_at_task_1)
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(out)])
    assert res.exit_code == 130 and f"continue with: metagate run --resume --out {out}" in res.output
    res = runner.invoke(app, ["run", *FAST, "reference=null", "trainer.checkpoint=false", "--out", str(tmp_path / "n")])
    assert res.exit_code == 130 and "cannot be resumed" in res.output


def test_run_prints_the_device_chosen_and_the_data_after_validation(tmp_path: Path) -> None:
    import torch

    res = runner.invoke(app, ["run", *FAST, "reference=null", "trainer.device=auto", "--out", str(tmp_path / "r")])
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    assert res.exit_code == 0 and f"device {chosen}," in res.output and "device auto" not in res.output
    assert "data: generated by composed_teacher (seed 0)" in res.output
    res = runner.invoke(app, ["run", "split-fmnist", "benchmark.dataset=digits", "method.name=xdg", "benchmark.scenario=class", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "not 'class'" in res.output and "run folder:" not in res.output  # refused before announced
    assert not (tmp_path / "s").exists()


def test_one_figure_without_a_value_has_no_unit() -> None:
    from metagate.report import summary_line

    line = summary_line({"acc": 0.5, "bwt": None, "fwt": None, "forgetting": None, "train_seconds": 1.0, "train_samples_per_second": None})
    assert "BWT n/a  FWT n/a" in line and "n/a pt" not in line


def test_list_shows_plain_first_sentences_matching_the_registries() -> None:
    from metagate import catalog
    from metagate.data import BENCHMARKS
    from metagate.methods import METHODS

    assert list(catalog.registered("METHODS")) == METHODS.names()
    assert list(catalog.registered("BENCHMARKS")) == BENCHMARKS.names()
    res = runner.invoke(app, ["list", "methods"])
    assert res.exit_code == 0 and "``" not in res.output and ":class:" not in res.output
    assert catalog.first_sentence("Uses ``x`` and :class:`Foo`. More here.") == "Uses x and Foo."


def test_the_cli_starts_without_importing_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from metagate.cli import app; from metagate import catalog; catalog.registered('METHODS'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_table_mixing_task_aware_and_task_agnostic_methods_says_so(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["compare", *FAST, "multi:method.heads=per_task", "--methods", "si,multi=si,xdg", "--seeds", "1", "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 0, res.output
    assert "| si | nothing | domain |" in res.output and "| multi | task identity | domain |" in res.output
    assert "| xdg | task identity | domain |" in res.output and "Not like for like" in res.output
    saved = json.loads((tmp_path / "c" / "multi" / "seed0" / "results.json").read_text())
    assert (saved["test_time_info"], saved["scenario"]) == ("task_id", "domain")


def test_tune_chooses_on_validation_and_reports_fresh_seeds(tmp_path: Path) -> None:
    out = tmp_path / "t"
    res = runner.invoke(
        app,
        ["tune", *FAST, "--methods", "finetune", "--grid", "finetune:trainer.lr=0.00001,0.01", "--tuning-seeds", "1", "--seeds", "2", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["chosen"] == {"finetune": ["trainer.lr=0.01"]} and saved["tuning_seeds"] == [1000] and saved["final_seeds"] == [0, 1]
    final = yaml.safe_load((out / "final" / "finetune" / "seed1" / "config.yaml").read_text())
    assert final["trainer"]["lr"] == 0.01 and final["seed"] == 1


def test_the_choice_never_reads_test_accuracy() -> None:
    from metagate.orchestrate import choose_on_validation

    runs = {"a": [{"val_acc": 0.9, "acc": 0.1}], "b": [{"val_acc": 0.5, "acc": 0.99}]}
    assert choose_on_validation(runs, {"m": ["a", "b"]})[0] == {"m": "a"}
    runs["a"][0]["acc"] = 0.0  # test accuracy changes nothing
    assert choose_on_validation(runs, {"m": ["a", "b"]})[0] == {"m": "a"}


def test_the_per_task_table_says_when_method_and_reference_use_different_information(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", *FAST, "reference.name=si", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "Not like for like: metagate uses task identity at test, si uses nothing." in (tmp_path / "r" / "per_task.md").read_text()
    res = runner.invoke(app, ["run", *FAST, "--out", str(tmp_path / "x")])  # xdg: task identity, like metagate
    assert "Not like for like" not in (tmp_path / "x" / "per_task.md").read_text()


def test_a_run_folders_config_yaml_runs_again_as_it_is(tmp_path: Path) -> None:
    first = tmp_path / "a"
    assert runner.invoke(app, ["run", *FAST, "reference=null", "--out", str(first)]).exit_code == 0
    assert "provenance" in yaml.safe_load((first / "config.yaml").read_text())
    res = runner.invoke(app, ["run", str(first / "config.yaml"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert a["acc_matrix"] == b["acc_matrix"]
