"""Aggregation of run folders: grouping by config, labels, mean ± std and the 95% CI, Q, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from metagate.aggregate import AggregationError, aggregate_paths, find_runs, group, stat, summarise, table


def fake_run(folder: Path, method: str, seed: int, acc: float, lr: float = 0.001, zs: list[float] | None = None, **extra: Any) -> None:
    """A finished run folder as the trainer writes one (only the keys aggregation reads)."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "benchmark": {"name": "gated_teacher", "num_tasks": 3}, "method": {"name": method},
              "trainer": {"lr": lr, "threads": 1 + seed, "device": "cpu"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"method": method, "seed": seed, "scenario": "domain", "test_time_info": "task_id", "benchmark": "gated_teacher",
               "acc_matrix": [[0.9, 0.1, 0.1], [0.8, 0.9, 0.1], [0.8, 0.8, 0.9]], "initial_acc": [0.1, 0.1, 0.1], "acc": acc, "bwt": -0.1, "fwt": 0.0,
               "forgetting": 0.1, "zero_shot_acc": zs or [0.1, 0.5, 0.5], "steps_to_90": [10, 20, None],
               "train_seconds": 2.0, "peak_memory_mb": 300.0, **extra}
    (folder / "results.json").write_text(json.dumps(results))


def test_runs_differing_only_in_seed_are_one_row_with_a_t_interval(tmp_path: Path) -> None:
    for seed, acc in [(0, 0.6), (1, 0.7), (2, 0.8)]:
        fake_run(tmp_path / "ewc" / f"seed{seed}", "ewc", seed, acc)
    summary, text = aggregate_paths([tmp_path])
    row = summary["ewc"]
    assert row["seeds"] == [0, 1, 2] and row["acc"]["n"] == 3
    assert row["acc"]["mean"] == pytest.approx(0.7) and row["acc"]["std"] == pytest.approx(0.1)
    assert row["acc"]["ci95"] == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)  # t(0.975, 2 dof)
    assert row["steps_to_90"]["mean"] == pytest.approx(20.0) and row["zero_shot"]["mean"] == pytest.approx(0.5)
    assert "| ewc | task identity | domain | 3 | 70.0 ± 10.0 [45.2, 94.8] |" in text
    assert "peak memory (MiB)" in text and "Q" not in text.splitlines()[0]  # no XdG run: no Q column


def test_rows_with_one_label_but_different_configs_are_told_apart(tmp_path: Path) -> None:
    fake_run(tmp_path / "a" / "ewc" / "seed0", "ewc", 0, 0.6, lr=0.001)
    fake_run(tmp_path / "b" / "ewc" / "seed0", "ewc", 0, 0.9, lr=0.01)
    labels = list(group(find_runs([tmp_path])))
    assert labels == ["ewc [trainer.lr=0.001]", "ewc [trainer.lr=0.01]"]


def test_runs_made_by_hand_and_their_references(tmp_path: Path) -> None:
    fake_run(tmp_path / "run-a", "metagate", 0, 0.7, zs=[0.1, 0.6, 0.6], mask_density=[0.2] * 3)
    fake_run(tmp_path / "run-a" / "reference", "xdg", 0, 0.5, zs=[0.1, 0.3, 0.3])
    fake_run(tmp_path / "run-b", "metagate", 1, 0.7, zs=[0.1, 0.5, 0.5], mask_density=[0.2] * 3)
    fake_run(tmp_path / "run-c", "si", 1, 0.7, zs=[0.1, 0.5, 0.5])
    fake_run(tmp_path / "run-c" / "reference", "xdg", 1, 0.5, zs=[0.1, 0.3, 0.3])
    fake_run(tmp_path / "run-b" / "reference", "xdg", 1, 0.5, zs=[0.1, 0.3, 0.3])
    summary = summarise(group(find_runs([tmp_path])))
    assert set(summary) == {"metagate", "si", "xdg (reference)"}
    assert summary["si"]["q"]["mean"] is None  # no task masks: no mask quality
    # Q = (zs - zs_xdg) / (just trained - zs_xdg) over tasks 1, 2: (0.6 - 0.3) / (0.9 - 0.3), (0.5 - 0.3) / 0.6
    assert summary["metagate"]["q"]["mean"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert summary["xdg (reference)"]["q"]["mean"] is None


def test_methods_using_different_information_at_test_are_flagged(tmp_path: Path) -> None:
    fake_run(tmp_path / "si" / "seed0", "si", 0, 0.6, test_time_info="none")
    fake_run(tmp_path / "xdg" / "seed0", "xdg", 0, 0.6)
    assert "Not like for like" in table(summarise(group(find_runs([tmp_path]))))


def test_one_seed_has_no_interval_and_missing_figures_say_n_a() -> None:
    assert stat([0.5, None]) == {"mean": 0.5, "std": 0.0, "ci95": None, "n": 1}
    assert stat([None])["mean"] is None


def test_nothing_to_aggregate_or_a_corrupt_results_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(AggregationError, match="no finished run"):
        find_runs([tmp_path])
    with pytest.raises(AggregationError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    fake_run(tmp_path / "x" / "seed0", "si", 0, 0.6)
    (tmp_path / "x" / "seed0" / "results.json").write_text("{not json")
    with pytest.raises(AggregationError, match="move that folder away or rerun it"):
        find_runs([tmp_path])


def test_the_aggregate_command_prints_the_table_and_never_overwrites(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from metagate.cli import app

    fake_run(tmp_path / "runs" / "si" / "seed0", "si", 0, 0.6)
    res = CliRunner().invoke(app, ["aggregate", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")])
    assert res.exit_code == 0 and "| si | task identity |" in res.output
    assert json.loads((tmp_path / "t.json").read_text())["si"]["acc"]["mean"] == 0.6
    res = CliRunner().invoke(app, ["aggregate", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")])
    assert res.exit_code == 2 and "exists already" in res.output
    res = CliRunner().invoke(app, ["aggregate", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_a_tuned_folder_gives_its_final_runs_in_method_order_and_never_its_tuning_runs(tmp_path: Path) -> None:
    (tmp_path / "tuning.json").write_text("{}")
    fake_run(tmp_path / "tuning" / "si_c-1" / "seed1000", "si", 1000, 0.9)
    for label, method in [("zeta", "si"), ("alpha", "ewc")]:
        fake_run(tmp_path / "final" / label / "seed0", method, 0, 0.6)
    (tmp_path / "final" / "comparison.json").write_text(json.dumps({"methods": {"zeta": {}, "alpha": {}}}))
    assert list(group(find_runs([tmp_path]))) == ["zeta", "alpha"]
    assert list(group(find_runs([tmp_path / "tuning"]))) == ["si_c-1"]  # asked for by name: kept


def test_per_task_figures_over_the_last_tasks(tmp_path: Path) -> None:
    fake_run(tmp_path / "m" / "seed0", "metagate", 0, 0.7, zs=[0.1, 0.2, 0.6], mask_density=[0.2] * 3)
    fake_run(tmp_path / "xdg" / "seed0", "xdg", 0, 0.5, zs=[0.1, 0.2, 0.3])
    summary, text = aggregate_paths([tmp_path], last=1)
    row = summary["m"]
    assert row["zero_shot"]["mean"] == pytest.approx(0.6) and row["just_trained"]["mean"] == pytest.approx(0.9)
    assert row["q"]["mean"] == pytest.approx((0.6 - 0.3) / (0.9 - 0.3)) and row["steps_to_90"]["mean"] is None
    assert "over the last 1 task." in text
    assert aggregate_paths([tmp_path])[0]["m"]["zero_shot"]["mean"] == pytest.approx(0.4)


def test_labels_name_the_keys_that_tell_configs_apart_and_never_merge_two_configs(tmp_path: Path) -> None:
    for bench in ("b1", "b2"):
        for lr in (0.001, 0.01):
            folder = tmp_path / bench / str(lr) / "ewc" / "seed0"
            fake_run(folder, "ewc", 0, 0.6)
            cfg = yaml.safe_load((folder / "config.yaml").read_text())
            cfg["benchmark"].update(name=bench, a=1 if bench == "b1" else 2, b=3 if bench == "b1" else 4, c=5 if bench == "b1" else 6)
            cfg["trainer"]["lr"] = lr
            (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    labels = list(group(find_runs([tmp_path])))
    assert len(labels) == 4 and all(len(runs) == 1 for runs in group(find_runs([tmp_path])).values())
    assert "ewc [benchmark.name=b1, trainer.lr=0.001]" in labels  # two keys tell the four apart, a name first


def test_validation_columns_are_shown_on_request_and_named_as_validation(tmp_path: Path) -> None:
    for seed, val in [(1000, 0.7), (1001, 0.8)]:
        fake_run(tmp_path / "a" / f"seed{seed}", "metagate", seed, 0.5, val_acc=val, val_bwt=-0.02)
    summary, text = aggregate_paths([tmp_path])
    assert "val ACC" not in text and summary["a"]["val_acc"]["mean"] == pytest.approx(0.75)
    _, text = aggregate_paths([tmp_path], validation=True)
    header = text.splitlines()[0]
    assert header.index("val ACC (%)") < header.index("val BWT (pt)") and "| ACC (%)" not in header and "zero-shot" not in header
    assert "steps to 90%" in header and "| 75.0 ± 7.1" in text and "-2.0 ± 0.0" in text
    assert "validation figures (choose on these; test figures not shown)" in text


def test_few_shot_columns_appear_only_with_a_few_shot_measurement(tmp_path: Path) -> None:
    fake_run(tmp_path / "xdg" / "seed0", "xdg", 0, 0.5, zs=[0.1, 0.3, 0.3], mask_density=[0.2] * 3)
    fake_run(tmp_path / "metagate" / "seed0", "metagate", 0, 0.7, zs=[0.1, 0.6, 0.6], mask_density=[0.2] * 3)
    _, text = aggregate_paths([tmp_path])
    assert "few-shot" not in text
    fake_run(tmp_path / "fewshot" / "seed0", "metagate", 0, 0.7, lr=0.01, zs=[0.1, 0.6, 0.6], mask_density=[0.2] * 3,
             few_shot_acc=[0.2, 0.7, 0.8])
    summary, text = aggregate_paths([tmp_path])
    assert "| few-shot (%) |" in text and "| Q few-shot |" in text and "zero-shot, few-shot, just trained" in text
    row = summary["fewshot"]
    assert row["few_shot"]["mean"] == pytest.approx(0.75) and row["zero_shot"]["mean"] == pytest.approx(0.6)
    # the same normalisation as Q: (fs - zs_xdg) / (just trained - zs_xdg), just trained 0.9, zs_xdg 0.3
    assert row["q_few_shot"]["mean"] == pytest.approx((0.75 - 0.3) / 0.6) and row["q"]["mean"] == pytest.approx(0.5)
    assert summary["metagate"]["few_shot"]["mean"] is None and summary["metagate"]["q_few_shot"]["mean"] is None
    assert summary["xdg"]["q_few_shot"]["mean"] is None


def test_q_takes_the_xdg_run_matched_on_strength_and_flags_a_row_without_one(tmp_path: Path) -> None:
    def run(folder: Path, method: str, c: float, zs: list[float], **extra: Any) -> None:
        fake_run(folder, method, 0, 0.7, zs=zs, **extra)
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        cfg["method"].update({"c": c, "backbone": {"hidden": [8]}})
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg))

    run(tmp_path / "xdg-strong" / "seed0", "xdg", 1.0, [0.1, 0.1, 0.1], mask_density=[0.2] * 3)
    run(tmp_path / "xdg-weak" / "seed0", "xdg", 0.1, [0.1, 0.3, 0.3], mask_density=[0.2] * 3)
    run(tmp_path / "ref" / "seed0", "factor_rule", 0.1, [0.1, 0.6, 0.6], mask_density=[0.2] * 3)
    run(tmp_path / "odd" / "seed0", "factor_rule", 10.0, [0.1, 0.6, 0.6], mask_density=[0.2] * 3)
    summary, text = aggregate_paths([tmp_path], last=1)
    row = summary["ref"]
    assert row["zs_gain"]["mean"] == pytest.approx(0.3)  # against xdg-weak (c 0.1), not the first XdG run
    assert row["q"]["mean"] == pytest.approx(0.3 / 0.6) and row["q_all"]["mean"] == pytest.approx(0.3 / 0.6)
    assert row["q_baseline_unmatched"] is None and summary["odd"]["q_baseline_unmatched"] == "c 10.0 vs XdG's 0.1"
    assert "zero-shot gain over XdG + SI (pt)" in text and "Q (all tasks)" in text and "Flagged: odd's Q" in text
