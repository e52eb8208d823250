"""experiments/metagate_benchmarks.py's choice on validation: metagate's own SI c (METAGATE_C_GRID) and --shared-c."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("metagate_benchmarks", ROOT / "experiments" / "metagate_benchmarks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_choose(calls: list[tuple[str, str, str, list[str]]]):  # noqa: ANN202
    """Records each ``choose`` call and picks a fixed value per tuning folder instead of training."""
    picks = {"composed-tuning-c": "method.c=0.1", "composed-tuning-prior-13": "method.prior=0.5",
             "composed-tuning-c-metagate": "method.c=1.0", "composed-tuning-prior": "method.prior=1.0"}

    def choose(stream, out: Path, method: str, grid: str, fixed: list[str], extra: list[str], tuning_seeds: int) -> str:  # noqa: ANN001
        calls.append((out.name, method, grid, fixed))
        return picks.get(out.name, "method.c=10.0")

    return choose


def test_metagate_and_its_shuffled_control_take_their_own_c_the_others_xdgs(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str, list[str]]] = []
    monkeypatch.setattr(bench, "choose", fake_choose(calls))
    chosen = bench.chosen_values(bench.STREAMS["composed"], "composed", Path("/nowhere"), [], 2)
    own = [c for c in calls if c[0] == "composed-tuning-c-metagate"]
    assert len(own) == 1
    _, method, grid, fixed = own[0]
    assert method == "metagate" and grid == "method.c=" + ",".join(str(v) for v in bench.METAGATE_C_GRID["composed"])
    assert "method.prior=0.5" in fixed  # with the prior chosen before it
    assert not any(o.startswith("method.c=") for o in fixed)  # a fixed c would override the grid (label:key=value comes last)
    order = [c[0] for c in calls]
    assert order.index("composed-tuning-prior-13") < order.index("composed-tuning-c-metagate")
    assert chosen.c_for("metagate") == chosen.c_for("shuffled") == 1.0
    assert all(chosen.c_for(label) == 0.1 for label in ("xdg", "oracle", "nearest", "vote", "metagate-mlp", "shuffled-mlp"))
    assert chosen.own("metagate") and chosen.own("si-context") and not chosen.own("xdg")
    assert "metagate's own c = 1" in chosen.describe(bench.STREAMS["composed"])


def test_shared_c_keeps_the_earlier_protocol(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str, list[str]]] = []
    monkeypatch.setattr(bench, "choose", fake_choose(calls))
    chosen = bench.chosen_values(bench.STREAMS["composed"], "composed", Path("/nowhere"), [], 2, shared_c=True)
    assert "composed-tuning-c-metagate" not in [c[0] for c in calls]
    assert chosen.metagate_c is None and chosen.c_for("metagate") == chosen.c_for("shuffled") == chosen.c_for("xdg") == 0.1
    assert "every gated variant" in chosen.describe(bench.STREAMS["composed"])
    # a stream without a METAGATE_C_GRID entry keeps the shared c without --shared-c
    calls.clear()
    chosen = bench.chosen_values(bench.STREAMS["rotated"], "rotated", Path("/nowhere"), [], 2)
    assert not any(c[0].endswith("-c-metagate") for c in calls) and chosen.metagate_c is None
