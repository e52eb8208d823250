"""Sweeps: the spec (config section and command line), its expansion into variants, a sweep that keeps
going past failures and continues on the same folder, the tuning protocol, and the same on a local Ray
with two workers (slow: a Ray start takes seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from metagate.cli import app
from metagate.config import ConfigError, find_config, load_config, read_yaml
from metagate.sweep import SweepSpec, grid_points, read_spec, run_sweep

runner = CliRunner()
FAST = [
    "benchmark.num_tasks=2", "benchmark.train_per_task=200", "benchmark.test_per_task=100", "trainer.epochs=1",
    "trainer.progress=false", "method.backbone.hidden=[16]", "benchmark.novel_tasks=0", "benchmark.min_value_tasks=0",
]


def test_the_grid_is_a_product_per_method_and_a_label_limits_a_key() -> None:
    spec = SweepSpec(grid={"si:method.c": [0.1, 1], "trainer.lr": [0.001, 0.01], "ewc:method.lambda": [10]})
    variants = grid_points(spec, {"si": "si", "ewc": "ewc", "finetune": "finetune"})
    assert variants["si"] == [
        ["method.c=0.1", "trainer.lr=0.001"], ["method.c=0.1", "trainer.lr=0.01"],
        ["method.c=1", "trainer.lr=0.001"], ["method.c=1", "trainer.lr=0.01"],
    ]
    assert variants["ewc"] == [["trainer.lr=0.001", "method.lambda=10"], ["trainer.lr=0.01", "method.lambda=10"]]
    assert variants["finetune"] == [["trainer.lr=0.001"], ["trainer.lr=0.01"]]


def test_random_draws_are_reproducible_within_bounds_and_per_grid_point() -> None:
    spec = SweepSpec.model_validate(
        {"grid": {"trainer.batch_size": [32, 64]},
         "random": {"samples": 5, "seed": 3, "space": {"method.c": "loguniform:0.01,10", "method.xi": "int:1,3"}}}
    )
    a, b = grid_points(spec, {"si": "si"}), grid_points(spec, {"si": "si"})
    assert a == b and len(a["si"]) == 10
    for point in a["si"]:
        c, xi = float(point[1].split("=")[1]), int(point[2].split("=")[1])
        assert 0.01 <= c <= 10 and 1 <= xi <= 3
    other = SweepSpec.model_validate({"random": {"samples": 5, "seed": 4, "space": {"method.c": "loguniform:0.01,10"}}})
    assert grid_points(other, {"si": "si"}) != grid_points(SweepSpec.model_validate({**other.model_dump(), "random": {**other.random.model_dump(), "seed": 3}}), {"si": "si"})


def test_a_choice_drawn_twice_is_one_variant() -> None:
    spec = SweepSpec.model_validate({"random": {"samples": 20, "space": {"method.c": "choice:0.1,1"}}})
    assert sorted(grid_points(spec, {"si": "si"})["si"]) == [["method.c=0.1"], ["method.c=1"]]


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"methods": "si", "random": ["method.c=normal:0,1"]}, "write one of uniform:a,b"),
        ({"methods": "si", "random": ["method.c=loguniform:0,1"]}, "low > 0"),
        ({"methods": "si", "grid": ["method.c"]}, "is not of the form"),
        ({"methods": "si", "seeds": 0}, "sweep.seeds"),
    ],
)
def test_a_bad_spec_is_a_one_line_error(cli: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_spec(None, cli)


def test_a_grid_naming_a_label_the_methods_lack_is_refused() -> None:
    with pytest.raises(ConfigError, match="names ewc, which the methods do not name"):
        grid_points(SweepSpec(grid={"ewc:method.lambda": [1]}), {"si": "si"})


def test_the_sweep_section_of_a_config_with_command_line_additions(tmp_path: Path) -> None:
    raw = read_yaml(find_config(None))
    raw["sweep"] = {"methods": ["si", "strong=ewc"], "seeds": 2, "grid": {"si:method.c": [0.1, 1]}, "resources": {"cpus": 2}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = read_spec(str(path), {"grid": ["strong:method.lambda=10,100"], "seeds": 3, "gpus": 0.5})
    assert spec.seeds == 3 and spec.resources.cpus == 2 and spec.resources.gpus == 0.5
    assert grid_points(spec, {"si": "si", "strong": "ewc"})["strong"] == [["method.lambda=10"], ["method.lambda=100"]]
    assert load_config(str(path)).method.name == raw["method"]["name"]  # a single run ignores the sweep section


def test_an_inline_sweep_keeps_going_and_the_same_command_continues_it(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    args = ["sweep", *FAST, "bad:trainer.lr=1e30", "--methods", "finetune,bad=finetune", "--grid", "trainer.batch_size=32,64",
            "--out", str(out), "--inline"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    status = json.loads((out / "sweep.json").read_text())["runs"]
    assert status["finetune_batch_size-32/seed0"] == {"status": "finished"}
    assert status["bad_batch_size-64/seed0"]["status"] == "failed" and "loss = nan" in status["bad_batch_size-64/seed0"]["error"]
    table = (out / "aggregate.md").read_text()
    assert "| finetune_batch_size-32 |" in table and "bad_" not in table and "[" in table
    finished = out / "finetune_batch_size-32" / "seed0" / "results.json"
    before = (finished.read_bytes(), finished.stat().st_mtime_ns)
    res = runner.invoke(app, args)  # the same command: the finished runs are reused, the failed ones retried
    assert res.exit_code == 1
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == before
    assert (out / "bad_batch_size-32" / "seed0.failed-1" / "error.txt").is_file()


def test_an_interrupted_run_of_a_sweep_is_resumed_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    args = ["sweep", *FAST, "--methods", "si", "--seeds", "1", "--out", str(out), "--inline"]
    assert runner.invoke(app, args).exit_code == 0
    run = out / "si" / "seed0"
    whole = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()  # as if killed after its last checkpoint
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "resuming" in res.output
    assert json.loads((run / "results.json").read_text())["acc_matrix"] == whole["acc_matrix"]


def test_a_tuning_sweep_chooses_on_validation_and_reports_fresh_seeds(tmp_path: Path) -> None:
    out = tmp_path / "t"
    res = runner.invoke(
        app, ["sweep", *FAST, "--methods", "finetune", "--grid", "trainer.lr=0.00001,0.01", "--tune", "--tuning-seeds", "1",
              "--seeds", "2", "--out", str(out), "--inline"],
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["chosen"] == {"finetune": ["trainer.lr=0.01"]} and saved["tuning_seeds"] == [1000] and saved["final_seeds"] == [0, 1]
    assert "| finetune |" in (out / "aggregate.md").read_text() and (out / "final" / "finetune" / "seed1" / "results.json").is_file()
    status = json.loads((out / "sweep.json").read_text())["runs"]
    assert set(status) == {"tuning/finetune_lr-1e-05/seed1000", "tuning/finetune_lr-0.01/seed1000", "final/finetune/seed0", "final/finetune/seed1"}


def test_a_bad_sweep_writes_nothing(tmp_path: Path) -> None:
    res = runner.invoke(app, ["sweep", *FAST, "--methods", "si", "--grid", "si:method.nope=1", "--out", str(tmp_path / "x"), "--inline"])
    assert res.exit_code == 2 and "nope" in res.output and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_with_two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from metagate import sweep

    real = sweep._ray_job

    def crash_or_run(config: dict, folder: str, resume: bool, threads: int) -> dict:
        if "crash" in folder:  # the worker process dies, as when the kernel kills it
            os._exit(1)
        return real(config, folder, resume, threads)

    monkeypatch.setattr(sweep, "_ray_job", crash_or_run)  # a nested function: Ray ships it by value
    out = tmp_path / "sw"
    args = ["sweep", *FAST, "bad:trainer.lr=1e30", "--methods", "finetune,si,bad=finetune,crash=finetune", "--grid",
            "si:method.c=0.1,1", "--workers", "2", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    status = json.loads((out / "sweep.json").read_text())["runs"]
    assert {k: v["status"] for k, v in status.items()} == {
        "finetune/seed0": "finished", "si_c-0.1/seed0": "finished", "si_c-1/seed0": "finished",
        "bad/seed0": "failed", "crash/seed0": "failed",
    }
    assert "loss = nan" in status["bad/seed0"]["error"] and (out / "crash" / "seed0" / "error.txt").is_file()
    assert "| si_c-1 |" in (out / "aggregate.md").read_text()
    assert (out / "si_c-1" / "seed0.log").is_file()  # what a worker's run printed
    finished = out / "si_c-1" / "seed0" / "metrics.jsonl"
    before = finished.stat().st_mtime_ns
    monkeypatch.setattr(sweep, "_ray_job", real)
    res = runner.invoke(app, args)  # continues: finished reused, the crashed one retried (and now runs)
    assert res.exit_code == 1  # 'bad' still diverges
    status = json.loads((out / "sweep.json").read_text())["runs"]
    assert status["crash/seed0"] == {"status": "finished"} and finished.stat().st_mtime_ns == before


def test_every_ready_sweep_plans_without_error(tmp_path: Path) -> None:
    from metagate.config import list_ready_configs
    from metagate.plan import expand, parse_entries, plan_jobs

    for name in list_ready_configs():
        if "sweep" not in read_yaml(find_config(name)):
            continue
        spec = read_spec(name, {})
        method_of = parse_entries(spec.method_list())
        variants = [v for vs in expand(method_of, grid_points(spec, method_of)).values() for v in vs]
        plan = plan_jobs(name, [], variants, spec.seeds, tmp_path / name, lambda b, s: tmp_path)
        assert len(plan.jobs) == len(variants) * spec.seeds


@pytest.mark.slow
def test_a_run_no_ray_node_can_hold_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = runner.invoke(app, ["sweep", *FAST, "--methods", "si", "--gpus-per-run", "1", "--workers", "1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "asks for 1 GPU(s) but the Ray cluster has 0" in res.output
    assert not (tmp_path / "x").exists()


def test_a_spec_carries_its_own_per_label_overrides_and_a_table_note(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "benchmark": {"name": "gated_teacher", "num_tasks": 2, "train_per_task": 100, "test_per_task": 50},
        "method": {"name": "finetune", "backbone": {"hidden": [8]}}, "trainer": {"epochs": 1, "progress": False},
        "sweep": {"methods": ["plain=finetune", "strong=ewc"], "overrides": ["strong:method.lambda=7", "method.backbone.hidden=[8]"],
                  "table": {"title": "t", "window": 1}},
    }))
    spec = read_spec(str(config), {})
    assert spec.table == {"title": "t", "window": 1}
    outcome = run_sweep(str(config), [], spec, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["plain", "strong"]
    strong = yaml.safe_load((tmp_path / "out" / "strong" / "seed0" / "config.yaml").read_text())
    assert strong["method"]["lambda"] == 7 and strong["method"]["backbone"]["hidden"] == [8]
    assert not outcome.failures
