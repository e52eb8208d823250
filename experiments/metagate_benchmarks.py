"""metagate against XdG + SI, the oracle, the nearest-context lookup and baselines that see the
context (issues 5 and 12): tables and plots.

For each stream, every gated variant runs over the same seeds with the same backbone, density, SI
(same c, XdG's consolidation rule) and learning curves:

* ``composed`` (default): the composed teacher (``configs/composed-teacher.yaml``: 50 tasks, 3 numeric
  context factors, the last 10 novel, MLP 209 = the teacher's width), masks at the oracle's density
  (33 of 209 units), with ``xdg``, ``oracle`` (the teacher's masks: the ceiling), ``nearest`` (the
  nearest earlier context's mask) and ``vote`` (a vote over every equally near one), ``metagate`` (issue 13:
  the additive agent with stored-mask batches) and ``shuffled`` contexts, the same with the usage prior
  (``metagate-usage``, ``shuffled-usage``: ``prior_kind=usage``; ``metagate-repel``, ``shuffled-repel``: the usage
  weighted by how unrelated the stored task is, ``prior_kind=repel``, at its own prior; usage also on rotated and permuted, where it was
  chosen over the random prior on validation too: ``metagate tune <the metagate run's config.yaml> --methods
  metagate --grid metagate:method.prior_kind=random,usage``), issue 12's metagate as ``metagate-mlp``,
  ``shuffled-mlp`` and ``onehot-mlp``, and HyperMask / hnet with the context as the hypernetwork's input
  (``hypermask-context``, ``hnet-context``: the code's defaults, not tuned);
* ``rotated``: rotated Fashion-MNIST, 10 angles in [0, 180] with (cos, sin) contexts and 2 + 2
  held-out angles (inside / outside the range), MLP 256 (metagate and issue 12's ``-mlp`` rows, as on composed);
* ``split``: split Fashion-MNIST, 5 x 2 classes, task-incremental, 5-shot prototype contexts, MLP 256;
* ``permuted``: permuted Fashion-MNIST, 10 tasks x 6000 images, random contexts (uninformative: no
  gain expected, and no harm allowed), MLP 2 x 400 as in ``configs/xdg-small.yaml``;
* ``gated`` (on request): the issue-5 gated teacher (``configs/default.yaml``), with the ablations
  ``no-meta`` and ``no-adapt``.

Every stream also runs SI with the task's context as an input (``si-context``: concatenated;
``si-film``: FiLM conditioning of every hidden layer), the baselines that see the context without
gating, and (composed, rotated, permuted) ``dendrites``, active dendrites (Iyer et al. 2022): with the
paper's network and training and prototype contexts inferred at test on the image streams, with the
stream's context vector and the stream's student and training on the composed one (whose tasks all
share one input distribution, hence one prototype). The table says what each used at test: the
context, nothing, or the task's identity (the gated variants' stored masks).

Per stream it writes ``<out>/<stream>/`` (the ``compare`` folder) and plots: zero-shot accuracy by
task, the learning curve of a new task (mean over the later tasks), mask overlap against context
similarity (every pair of tasks, seed 0) and, on streams with oracle masks, zero-shot accuracy
against the largest overlap of a task's oracle mask with an earlier one (also as a table);
``<out>/table.md`` gathers the tables.

Hyperparameters are chosen on validation, never on the reported test figures: per stream, SI's
strength ``c`` (shared by the gated variants) is chosen for XdG + SI from ``c_grid``, then metagate's
``prior`` from ``PRIOR_GRID`` with that ``c``, then, on the streams in ``METAGATE_C_GRID`` (composed),
metagate's own ``c`` with that prior (also its shuffled control's; ``--shared-c``: XdG + SI's, as before),
and each context baseline's own ``c`` from ``c_grid``, each by mean validation accuracy over tuning seeds
1000, 1001 (``metagate tune --choose-only``, into ``<out>/<stream>-tuning-*``); the table's runs use fresh
seeds 0, 1, 2 and report test, with the ``c`` each variant used (``(own)``: chosen for it, not for XdG + SI).

Zero-shot quality ``Q = (zs - zs_xdg) / (final - zs_xdg)`` uses means over every task after the first
and, on streams longer than 11 tasks, over the last 10: ``zs`` the accuracy on a task before training
it, ``final`` the accuracy right after training it, ``zs_xdg`` XdG's zero-shot accuracy on the same
tasks and seed. ``steps to 90%``: steps until 90% of the task's final accuracy. Mask figures: the
masks' mean pairwise IoU and the correlation of context distance with mask distance, for the
zero-shot masks (before any training on the task: what the context chose) and the trained ones.

    .venv/bin/python experiments/metagate_benchmarks.py --out runs/metagate [--streams composed,rotated,split,permuted] [--seeds 3]

Finished runs in ``--out`` are reused (``compare --resume``), so an interrupted experiment continues.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metagate.config import config_from_dict  # noqa: E402
from metagate.data import build_stream  # noqa: E402
from metagate.data.composed import largest_overlap  # noqa: E402
from metagate.report import uses_at_test  # noqa: E402
from metagate.runs import RunDir  # noqa: E402

XDG = ["method.input_dropout=0.0", "method.gate_fraction=0.8"]
MLP = ["method.backbone.kind=mlp", "method.backbone.dropout=0.0"]
FMNIST = ["benchmark.dataset=fashion_mnist", "trainer.epochs=2", "trainer.batch_size=128", "trainer.curve_every=5", "trainer.device=auto"]
# Baselines that see the context without gating (issue 12.3): SI with the context appended to the input
# or conditioning every hidden layer through FiLM; each one's c is chosen on validation (it is not a gating method, so XdG's c need not suit it).
CONTEXT_BASELINES: dict[str, tuple[str, list[str]]] = {
    "si-context": ("si", ["method.context_input=concat"]),
    "si-film": ("si", ["method.context_input=film"]),
}


@dataclass
class Stream:
    title: str
    config: str
    common: list[str]
    c_grid: list[float]  # SI strengths to choose from on validation (the same c for every gated variant)
    xi: float
    variants: dict[str, tuple[str, list[str]]] = field(
        default_factory=lambda: {
            "xdg": ("xdg", XDG),
            "metagate": ("metagate", []),
            "shuffled": ("metagate", ["method.context_mode=shuffled"]),
            **CONTEXT_BASELINES,
        }
    )
    xdg: list[str] = field(default_factory=lambda: list(XDG))  # XdG's options, also used to choose c


# Active dendrites (Iyer et al. 2022) with the paper's own network and training (2 x 2048 dendritic units,
# 3 epochs, batch 256, Adam 5e-4: configs/permuted-fmnist-dendrites.yaml, nothing tuned); its context is
# each task's prototype (mean training input), inferred at test from the input alone.
DENDRITES = ("active_dendrites", ["method.backbone.hidden=[2048,2048]", "trainer.epochs=3", "trainer.batch_size=256", "trainer.lr=0.0005"])
SI_METHODS = {"xdg", "oracle", "nearest_context", "metagate", "si"}  # the variants whose SI c and xi are set here

# The composed teacher: the student's width is the teacher's (209 units), masks keep 33 of them (3 of
# 19 groups): XdG, metagate and the lookups at the oracle's density.
COMPOSED_XDG = ["method.input_dropout=0.0", "method.gate_fraction=0.842"]
# metagate as issue 13 leaves it: the additive agent (composition of factor values) and stored-mask batches (cost
# flat in the tasks); "metagate-mlp" is issue 12's metagate (the bias-free MLP agent, every stored mask each step).
# K4 (the agent updated every 4th step, 100 consolidation steps: cost per step) is in the default run, not here.
METAGATE13 = ["method.agent=additive", "method.agent_hidden=[64]", "method.reg_batch=32", "method.consolidation_batch=64"]
K4 = ["method.agent_every=4", "method.consolidation_steps=100"]
# The published hypernetwork methods with the task's context as the hypernetwork's input (issue 14, item 4): each
# with its official code's defaults (HyperMask's permuted-MNIST values, hnet's), not tuned here.
HYPERNET_CONTEXT: dict[str, tuple[str, list[str]]] = {
    "hypermask-context": ("hypermask", ["method.embedding=context"]),
    "hnet-context": ("hnet", ["method.embedding=context"]),
}

STREAMS = {
    "composed": Stream(
        "Composed teacher (domain-incremental, 50 tasks, 3 numeric context factors, the last 10 novel; MLP 209 = the teacher's)",
        "composed-teacher",
        [*MLP, "method.backbone.hidden=[209]", "trainer.curve_every=10"],
        [0.03, 0.1, 0.3, 1.0],  # as metagate's own grid (METAGATE_C_GRID): every method's grid equally wide (issue 25)
        0.01,
        {
            "xdg": ("xdg", COMPOSED_XDG),
            "oracle": ("oracle", []),
            "nearest": ("nearest_context", []),
            "vote": ("nearest_context", ["method.ties=true"]),
            "metagate": ("metagate", ["method.density=0.158", *METAGATE13]),
            "shuffled": ("metagate", ["method.density=0.158", *METAGATE13, "method.context_mode=shuffled"]),
            # the prior's non-context part on the least-used units (prior_kind=usage; at prior 0.5, chosen over the
            # random prior and over usage at 0.25 / 1.0 on validation, tuning seeds 1000-1001: see metagate's docstring)
            "metagate-usage": ("metagate", ["method.density=0.158", *METAGATE13, "method.prior_kind=usage"]),
            "shuffled-usage": ("metagate", ["method.density=0.158", *METAGATE13, "method.prior_kind=usage", "method.context_mode=shuffled"]),
            # usage weighted by how unrelated the stored task is (prior_kind=repel), at its own prior (REPEL_PRIOR)
            "metagate-repel": ("metagate", ["method.density=0.158", *METAGATE13, "method.prior_kind=repel"]),
            "shuffled-repel": ("metagate", ["method.density=0.158", *METAGATE13, "method.prior_kind=repel", "method.context_mode=shuffled"]),
            "metagate-mlp": ("metagate", ["method.density=0.158"]),
            "shuffled-mlp": ("metagate", ["method.density=0.158", "method.context_mode=shuffled"]),
            "onehot-mlp": ("metagate", ["method.density=0.158", "method.context_mode=onehot"]),
            **CONTEXT_BASELINES,
            **HYPERNET_CONTEXT,
            # every task's prototype is the same here (inputs are N(0, I) for all): the stream's context
            # vector instead, given at test; the student's width and the stream's training, as the others
            "dendrites": ("active_dendrites", ["method.context=stream", "method.test_context=given"]),
        },
        COMPOSED_XDG,
    ),
    "gated": Stream(
        "Gated teacher (domain-incremental, 10 tasks, MLP 256)",
        "default",
        [*MLP, "method.backbone.hidden=[256]"],
        [0.1, 1.0, 10.0],
        0.01,
        {
            "xdg": ("xdg", XDG),
            "metagate": ("metagate", []),
            "shuffled": ("metagate", ["method.context_mode=shuffled"]),
            "onehot": ("metagate", ["method.context_mode=onehot"]),
            "no-meta": ("metagate", ["method.meta_learning=false"]),
            "no-adapt": ("metagate", ["method.adapt=false"]),
            **CONTEXT_BASELINES,
        },
    ),
    "rotated": Stream(
        "Rotated Fashion-MNIST (10 angles in [0, 180], 2 + 2 held out, 6000 images per task, MLP 256)",
        "rotated-fmnist",
        [*FMNIST, *MLP, "method.backbone.hidden=[256]", "benchmark.train_per_task=6000", "benchmark.test_per_task=2000"],
        [3.0, 30.0, 300.0],
        0.1,
        {
            "xdg": ("xdg", XDG),
            "metagate": ("metagate", METAGATE13),
            "shuffled": ("metagate", [*METAGATE13, "method.context_mode=shuffled"]),
            "metagate-usage": ("metagate", [*METAGATE13, "method.prior_kind=usage"]),
            "metagate-mlp": ("metagate", []),
            "shuffled-mlp": ("metagate", ["method.context_mode=shuffled"]),
            **CONTEXT_BASELINES,
            "dendrites": DENDRITES,
        },
    ),
    "split": Stream(
        "Split Fashion-MNIST (5 x 2 classes, task-incremental, 5-shot prototype contexts, MLP 256)",
        "split-fmnist",
        [*FMNIST, *MLP, "method.backbone.hidden=[256]"],
        [10.0, 100.0, 1000.0],
        0.1,
    ),
    "permuted": Stream(
        "Permuted Fashion-MNIST (10 tasks x 6000 images, random contexts, MLP 2 x 400)",
        "xdg-small",
        [*FMNIST, *MLP, "method.backbone.hidden=[400,400]"],
        [3.0, 30.0, 300.0],
        0.1,
        {"xdg": ("xdg", XDG), "metagate": ("metagate", METAGATE13), "metagate-usage": ("metagate", [*METAGATE13, "method.prior_kind=usage"]),
         "metagate-mlp": ("metagate", []), **CONTEXT_BASELINES, "dendrites": DENDRITES},
    ),
}
DEFAULT_STREAMS = "composed,rotated,split,permuted"


PRIOR_GRID = [0.5, 1.0, 2.0]
# metagate's own SI strength (issue 13): on these streams c is chosen on validation for metagate itself (issue 13's
# agent, with its chosen prior) instead of taking XdG + SI's, and its shuffled control takes the same c; every other
# variant keeps the c chosen for XdG + SI. --shared-c restores the shared c (the earlier tables).
# Composed (issue 13, prior 0.5, tuning seeds 1000-1001): mean val_acc 68.2, 69.3, 67.6, 65.3% (val BWT -7.7, -3.0,
# -1.1, -0.3 pt): 0.1, XdG + SI's c, is also metagate's own.
METAGATE_C_GRID: dict[str, list[float]] = {"composed": [0.03, 0.1, 0.3, 1.0]}
OWN_C_VARIANTS = ("metagate", "shuffled", "metagate-usage", "shuffled-usage", "metagate-repel", "shuffled-repel")
# prior_kind=repel's prior, chosen on validation on the composed stream (tuning seeds 1000-1001, SI c 0.1): best of
# 0.5, 1, 2 by mean val_acc (70.46, 72.71, 67.53%; usage at its chosen 0.5: 70.87%); its shuffled control takes the same.
REPEL_PRIOR = {"metagate-repel": 1.0, "shuffled-repel": 1.0}


def metagate_cmd() -> str:
    return str(Path(sys.executable).parent / "metagate")


def edge_extension(values: list[float], chosen: float) -> list[float] | None:
    """The grid one geometric step wider on the side where ``chosen`` sits at its edge (``None``: it is inside, or
    the grid has fewer than two positive values): a choice at a grid's edge is not a choice (issue 25)."""
    grid = sorted(values)
    if len(grid) < 2 or grid[0] <= 0:
        return None
    if chosen == grid[0]:
        return [grid[0] ** 2 / grid[1], *grid]
    if chosen == grid[-1]:
        return [*grid, grid[-1] ** 2 / grid[-2]]
    return None


def choose(stream: Stream, out: Path, method: str, grid: str, fixed: list[str], extra: list[str], tuning_seeds: int) -> str:
    """One value chosen on validation; a numeric grid whose choice falls on an edge is extended by one step on that
    side and the choice made again (at most 3 times), so every method's grid ends with its choice inside."""
    key, _, text = grid.partition("=")
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return _choose_once(stream, out, method, grid, fixed, extra, tuning_seeds)
    for _ in range(4):
        chosen = _choose_once(stream, out, method, f"{key}={','.join(f'{v:g}' for v in values)}", fixed, extra, tuning_seeds)
        wider = edge_extension(values, float(chosen.split("=")[1]))
        if wider is None:
            return chosen
        print(f"  {method}: {chosen} is at the edge of {values}: extended to {wider}", flush=True)
        values = wider
    return chosen


def _choose_once(stream: Stream, out: Path, method: str, grid: str, fixed: list[str], extra: list[str], tuning_seeds: int) -> str:
    """One value chosen on validation (``metagate tune --choose-only``); returns the chosen override."""
    cmd = [
        metagate_cmd(), "tune", stream.config, *stream.common, "reference=null", "trainer.progress=false",
        *[f"{method}:{o}" for o in fixed], *extra, "--methods", method, "--grid", f"{method}:{grid}",
        "--tuning-seeds", str(tuning_seeds), "--choose-only", "--out", str(out), "--resume",
    ]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    chosen = json.loads((out / "tuning.json").read_text())["chosen"][method]
    return chosen[0]


@dataclass
class Chosen:
    """What validation chose for one stream: SI's c for the gated variants (XdG + SI's), metagate's
    prior, and the c of each context baseline (chosen for it alone)."""

    c: float
    prior: float
    own_c: dict[str, float]
    prior_mlp: float | None = None  # issue 12's metagate (the "-mlp" variants), chosen for it alone
    prior_given: bool = False  # the prior came from the command line (--prior), not from validation
    metagate_c: float | None = None  # metagate's own c (METAGATE_C_GRID), for OWN_C_VARIANTS; None: XdG + SI's
    metagate_c_grid: list[float] = field(default_factory=list)

    def c_for(self, label: str) -> float:
        if label in OWN_C_VARIANTS and self.metagate_c is not None:
            return self.metagate_c
        return self.own_c.get(label, self.c)

    def own(self, label: str) -> bool:
        """Whether the variant's c was chosen for it (or for metagate) rather than for XdG + SI."""
        return label in self.own_c or (label in OWN_C_VARIANTS and self.metagate_c is not None)

    def prior_for(self, label: str) -> float:
        if label in REPEL_PRIOR:
            return REPEL_PRIOR[label]
        return self.prior_mlp if label.endswith("-mlp") and self.prior_mlp is not None else self.prior

    def describe(self, stream: Stream) -> str:
        own = "".join(f", {label} c = {c:g} from {stream.c_grid}" for label, c in self.own_c.items())
        mlp = "" if self.prior_mlp is None else f", metagate-mlp prior = {self.prior_mlp:g} from {PRIOR_GRID}"
        if any(label in stream.variants for label in REPEL_PRIOR):
            mlp += f", metagate-repel prior = {REPEL_PRIOR['metagate-repel']:g} (chosen on validation from 0.5, 1, 2: REPEL_PRIOR)"
        prior = f"metagate prior = {self.prior:g} given (--prior), not chosen here" if self.prior_given else f"metagate prior = {self.prior:g} from {PRIOR_GRID}"
        if self.metagate_c is None:
            return f"SI c = {self.c:g} from {stream.c_grid} (XdG + SI; every gated variant), {prior}{mlp}{own}"
        return (f"SI c = {self.c:g} from {stream.c_grid} (XdG + SI; the other gated variants), {prior} (with XdG's c), "
                f"then metagate's own c = {self.metagate_c:g} from {self.metagate_c_grid} (with that prior; also shuffled's){mlp}{own}")


def chosen_values(stream: Stream, name: str, root: Path, extra: list[str], tuning_seeds: int, given_prior: float | None = None,
                  shared_c: bool = False) -> Chosen:
    """SI's c (for XdG + SI), then metagate's prior with that c, then (streams in METAGATE_C_GRID, unless
    ``shared_c``) metagate's own c with that prior, then each context baseline's c, all chosen on validation."""
    c_grid = ",".join(str(c) for c in stream.c_grid)
    c = float(choose(stream, root / f"{name}-tuning-c", "xdg", f"method.c={c_grid}", [*stream.xdg, f"method.xi={stream.xi}"], extra, tuning_seeds).split("=")[1])
    prior_grid = ",".join(str(p) for p in PRIOR_GRID)
    fixed = [*stream.variants["metagate"][1], f"method.c={c}", f"method.xi={stream.xi}"]
    # issue 13's metagate (additive agent) has its own folder; issue 12's (kept as "-mlp") keeps the old one
    folder = root / (f"{name}-tuning-prior-13" if "metagate-mlp" in stream.variants else f"{name}-tuning-prior")
    if given_prior is None:
        prior = float(choose(stream, folder, "metagate", f"method.prior={prior_grid}", fixed, extra, tuning_seeds).split("=")[1])
    else:
        prior = given_prior
    metagate_c = None
    if name in METAGATE_C_GRID and not shared_c:
        grid = ",".join(str(v) for v in METAGATE_C_GRID[name])
        fixed = [*stream.variants["metagate"][1], f"method.prior={prior}", f"method.xi={stream.xi}"]  # no method.c: it would override the grid
        metagate_c = float(choose(stream, root / f"{name}-tuning-c-metagate", "metagate", f"method.c={grid}", fixed, extra, tuning_seeds).split("=")[1])
    prior_mlp = None
    if "metagate-mlp" in stream.variants:
        fixed = [*stream.variants["metagate-mlp"][1], f"method.c={c}", f"method.xi={stream.xi}"]
        prior_mlp = float(choose(stream, root / f"{name}-tuning-prior", "metagate", f"method.prior={prior_grid}", fixed, extra, tuning_seeds).split("=")[1])
    own = {}
    for label, (method, opts) in stream.variants.items():
        if label in CONTEXT_BASELINES:
            folder = root / f"{name}-tuning-{label}"
            own[label] = float(choose(stream, folder, method, f"method.c={c_grid}", [*opts, f"method.xi={stream.xi}"], extra, tuning_seeds).split("=")[1])
    return Chosen(c, prior, own, prior_mlp, metagate_c=metagate_c, metagate_c_grid=METAGATE_C_GRID.get(name, []) if metagate_c is not None else [])


def run_compare(stream: Stream, out: Path, seeds: int, extra: list[str], chosen: Chosen) -> list[str]:
    entries = ",".join(f"{k}={m}" for k, (m, _) in stream.variants.items())
    specific = [
        f"{k}:{o}"
        for k, (m, opts) in stream.variants.items()
        for o in [*opts, *([f"method.c={chosen.c_for(k)}", f"method.xi={stream.xi}"] if m in SI_METHODS else []),
                  *([f"method.prior={chosen.prior_for(k)}"] if m == "metagate" else [])]
    ]
    cmd = [
        str(Path(sys.executable).parent / "metagate"), "compare", stream.config, *stream.common, "reference=null",
        "trainer.progress=false", *specific, *extra, "--methods", entries, "--seeds", str(seeds), "--out", str(out), "--resume",
    ]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return cmd


def load_runs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    comp = json.loads((out / "comparison.json").read_text())
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for label, entry in comp["methods"].items():
        for folder in entry["runs"]:
            r = json.loads((Path(folder) / "results.json").read_text())
            r["folder"] = folder
            runs.setdefault(label, {})[r["seed"]] = r
    return runs


def just_trained(r: dict[str, Any]) -> list[float]:
    return [r["acc_matrix"][t][t] for t in range(r["num_tasks"])]


def q_over(r: dict[str, Any], x: dict[str, Any], tasks: list[int]) -> float:
    """``Q = (zs - zs_xdg) / (final - zs_xdg)`` with means over ``tasks`` (``x``: XdG's run, same seed)."""
    zs, zs_x = np.mean([r["zero_shot_acc"][t] for t in tasks]), np.mean([x["zero_shot_acc"][t] for t in tasks])
    fin = np.mean([just_trained(r)[t] for t in tasks])
    return float((zs - zs_x) / (fin - zs_x)) if fin != zs_x else float("nan")


def windows(num_tasks: int) -> dict[str, list[int]]:
    """The task sets Q and the per-task means are taken over: every task after the first, and the
    last 10 (the composed stream's novel tasks) when the stream is longer than 11 tasks."""
    out = {"all": list(range(1, num_tasks))}
    if num_tasks > 11:
        out["last 10"] = list(range(num_tasks - 10, num_tasks))
    return out


def figures(r: dict[str, Any], x: dict[str, Any]) -> dict[str, float]:
    """One run's figures against XdG's run ``x`` on the same seed; zero-shot, just trained and steps
    over every task after the first (``_last``: over the last 10, on long streams)."""
    nan = float("nan")
    out: dict[str, float] = {"acc": r["acc"], "bwt": r["bwt"]}
    for key, tasks in windows(r["num_tasks"]).items():
        suffix = "" if key == "all" else "_last"
        s90 = [r["steps_to_90"][t] for t in tasks if r["steps_to_90"][t] is not None]
        s90x = [x["steps_to_90"][t] for t in tasks if x["steps_to_90"][t] is not None]
        out |= {
            f"zs{suffix}": float(np.mean([r["zero_shot_acc"][t] for t in tasks])),
            f"final{suffix}": float(np.mean([just_trained(r)[t] for t in tasks])),
            f"q{suffix}": q_over(r, x, tasks),
            f"s90{suffix}": float(np.mean(s90)) if s90 else nan,
            f"ratio{suffix}": float(np.mean(s90x) / np.mean(s90)) if s90 and s90x else nan,
        }
    held = r["heldout_acc_matrix"][-1] if r.get("heldout_acc_matrix") else []
    get = lambda key: nan if r.get(key) is None else float(r[key])  # noqa: E731
    out |= {
        "iou": get("mask_overlap_mean"), "ctx_r": get("context_mask_correlation"),
        "zs_iou": get("zero_shot_mask_overlap_mean"), "zs_ctx_r": get("zero_shot_context_mask_correlation"),
        "held": float(np.mean(held)) if held else nan,
    }
    return out


def si_c(r: dict[str, Any]) -> float | None:
    """The SI strength the run used (from its config.yaml; None for a method without one)."""
    c = RunDir(Path(r["folder"])).read_config()["method"].get("c")
    return None if c is None else float(c)


def table(stream: Stream, runs: dict[str, dict[int, dict[str, Any]]], chosen: Chosen | None = None) -> str:
    """The stream's table; the "SI c" column gives each variant's c as its runs used it, "(own)" where it was
    chosen for the variant (or for metagate) rather than for XdG + SI."""
    first = next(iter(next(iter(runs.values())).values()))
    has_held = bool(first.get("heldout_names"))
    long = "last 10" in windows(first["num_tasks"])
    cols = ["variant", "uses at test", "SI c", "ACC (%)", "BWT (pt)", "zero-shot (%)", "just trained (%)", "Q"]
    cols += ["zero-shot, last 10 (%)", "just trained, last 10 (%)", "Q, last 10"] if long else []
    cols += ["steps to 90%", "XdG steps / these", "zero-shot mask IoU", "r(context dist, zero-shot mask dist)",
             "mask IoU", "r(context dist, mask dist)"]
    cols += ["held-out at end (%)"] if has_held else []
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label in stream.variants:
        if label not in runs:
            continue
        f = [figures(r, runs["xdg"][seed]) for seed, r in sorted(runs[label].items())]

        def ms(key: str, scale: float = 100.0, digits: int = 1) -> str:
            v = np.array([x[key] for x in f], dtype=float)
            if np.isnan(v).all():
                return "n/a"
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            return f"{scale * v.mean():.{digits}f} ± {scale * sd:.{digits}f}"

        def mean(key: str, digits: int = 2) -> str:
            v = np.array([x[key] for x in f], dtype=float)
            return "n/a" if np.isnan(v).all() else f"{np.nanmean(v):.{digits}f}"

        info = next(iter(runs[label].values())).get("test_time_info")
        cs = {si_c(r) for r in runs[label].values()}
        c_cell = "n/a" if cs == {None} else ", ".join(f"{c:g}" for c in sorted(c for c in cs if c is not None))
        c_cell += " (own)" if chosen is not None and chosen.own(label) and c_cell != "n/a" else ""
        cells = [label, uses_at_test(info), c_cell, ms("acc"), ms("bwt"), ms("zs"), ms("final"), "n/a" if label == "xdg" else ms("q", 1.0, 2)]
        if long:
            cells += [ms("zs_last"), ms("final_last"), "n/a" if label == "xdg" else ms("q_last", 1.0, 2)]
        cells += [mean("s90", 0), mean("ratio"), mean("zs_iou"), mean("zs_ctx_r"), mean("iou"), mean("ctx_r")]
        cells += [ms("held")] if has_held else []
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def save(fig: plt.Figure, ax: plt.Axes, path: Path, **labels: str) -> None:
    ax.set(**labels)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_zero_shot(runs: dict[str, dict[int, dict[str, Any]]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, by_seed in runs.items():
        zs = np.array([r["zero_shot_acc"] for r in by_seed.values()])
        ax.plot(range(zs.shape[1]), 100 * zs.mean(0), marker="o", ms=3, label=label)
    final = np.array([just_trained(r) for r in runs["metagate"].values()])
    ax.plot(range(final.shape[1]), 100 * final.mean(0), "k--", lw=1, label="metagate, just trained")
    save(fig, ax, path, xlabel="task", ylabel="accuracy before training it (%)", title=title)


def plot_curves(runs: dict[str, dict[int, dict[str, Any]]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, by_seed in runs.items():
        curves = []
        for r in by_seed.values():
            k = r["num_tasks"] // 2
            curves += [c for c in r["learning_curves"][k:] if c]
        n = min(len(c) for c in curves)
        steps = [p[0] for p in curves[0][:n]]
        acc = np.array([[p[1] for p in c[:n]] for c in curves])
        ax.plot(steps, 100 * acc.mean(0), label=label)
    save(fig, ax, path, xlabel="steps on the new task", ylabel="accuracy on it (%)", title=title)


def plot_overlap(runs: dict[str, dict[int, dict[str, Any]]], title: str, path: Path) -> None:
    seed = min(next(iter(runs.values())))
    cfg = config_from_dict(RunDir(Path(runs["xdg"][seed]["folder"])).read_config())  # the config without its provenance record
    ctx = build_stream(cfg.benchmark, seed).contexts().float()
    ctx = ctx / ctx.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (ctx @ ctx.T).numpy()
    i, j = np.triu_indices(len(sim), 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label in [lb for lb in ("xdg", "metagate", "shuffled") if lb in runs]:
        iou = np.array(runs[label][seed]["mask_overlap"])
        ax.scatter(sim[i, j], iou[i, j], s=10, alpha=0.7, label=label)
    save(fig, ax, path, xlabel="context cosine similarity", ylabel="mask IoU", title=title)


def overlap_groups(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[float, list[tuple[int, int]]]:
    """(seed, task) pairs of every task after the first, grouped by the largest IoU of the task's
    oracle mask with an earlier task's (streams with oracle masks; empty otherwise)."""
    out: dict[float, list[tuple[int, int]]] = {}
    for seed, r in runs["xdg"].items():
        cfg = config_from_dict(RunDir(Path(r["folder"])).read_config())
        stream = build_stream(cfg.benchmark, seed)
        if any(t.oracle_mask is None for t in stream.tasks):
            return {}
        lo = largest_overlap([torch.cat([m.bool() for m in t.oracle_mask]) for t in stream.tasks])  # type: ignore[union-attr]
        for t in range(1, len(lo)):
            out.setdefault(round(float(lo[t]), 2), []).append((seed, t))  # type: ignore[arg-type]
    return dict(sorted(out.items()))


def overlap_table(runs: dict[str, dict[int, dict[str, Any]]], groups: dict[float, list[tuple[int, int]]]) -> str:
    """Zero-shot accuracy by the task's largest oracle-mask overlap with an earlier task."""
    labels = list(runs)
    rows = ["| largest IoU with an earlier oracle mask | (seed, task) pairs | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for iou, pairs in groups.items():
        cells = [f"{100 * np.mean([runs[k][s]['zero_shot_acc'][t] for s, t in pairs]):.1f}" for k in labels]
        rows.append(f"| {iou:.2f} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_zero_shot_vs_overlap(runs: dict[str, dict[int, dict[str, Any]]], groups: dict[float, list[tuple[int, int]]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = list(groups)
    for label in runs:
        ax.plot(x, [100 * np.mean([runs[label][s]["zero_shot_acc"][t] for s, t in groups[i]]) for i in x], marker="o", label=label)
    save(fig, ax, path, xlabel="largest IoU of the task's oracle mask with an earlier one", ylabel="zero-shot accuracy (%)", title=title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--streams", default=DEFAULT_STREAMS, help=f"comma-separated, of {', '.join(STREAMS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tuning-seeds", type=int, default=2)
    p.add_argument("--prior", type=float, default=None, help="metagate's prior as given, instead of choosing it on validation "
                   "(the table then says so)")
    p.add_argument("--shared-c", action="store_true", help="metagate and its shuffled control take XdG + SI's c (as in the "
                   "earlier tables) instead of their own, chosen on validation from METAGATE_C_GRID")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args()
    names = [s.strip() for s in args.streams.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STREAMS))
    if unknown:
        p.error(f"unknown stream(s) {', '.join(unknown)}; choose from {', '.join(STREAMS)}")
    for name in names:
        stream, out = STREAMS[name], args.out / name
        chosen = chosen_values(stream, name, args.out, args.overrides, args.tuning_seeds, args.prior, args.shared_c)
        chosen.prior_given = args.prior is not None
        cmd = run_compare(stream, out, args.seeds, args.overrides, chosen)
        runs = load_runs(out)
        short = stream.title.split(" (")[0]
        plot_zero_shot(runs, f"{short}: zero-shot accuracy", out / "zero_shot.png")
        plot_curves(runs, f"{short}: learning curve of a new task", out / "learning_curves.png")
        plot_overlap(runs, f"{short}: mask overlap vs context", out / "overlap_vs_context.png")
        groups = overlap_groups(runs)
        extra = ""
        if groups:
            plot_zero_shot_vs_overlap(runs, groups, f"{short}: zero-shot vs largest overlap", out / "zero_shot_vs_overlap.png")
            extra = ("\nZero-shot accuracy (%, test, mean over the seeds' tasks) by how much a task's oracle mask overlaps the "
                     f"most similar earlier one:\n\n{overlap_table(runs, groups)}\n")
        n = next(iter(runs["xdg"].values()))["num_tasks"]
        over = "tasks 1..T-1" + (", and over the last 10 (tasks T-10..T-1)" if "last 10" in windows(n) else "")
        text = (f"### {stream.title}\n\n'uses at test': what a method needs besides the input to predict a task (gating methods "
                f"and task-incremental label masking: the task's identity; `context_input`: the task's context vector). "
                f"Test figures over seeds {sorted(runs['xdg'])}; zero-shot, just trained, Q and steps over {over}. "
                f"Chosen on validation (tuning seeds 1000-{999 + args.tuning_seeds}): {chosen.describe(stream)}.\n\n"
                f"    {shlex.join(['metagate', *cmd[1:]])}\n\n{table(stream, runs, chosen)}\n{extra}")
        (out / "table.md").write_text(text)
        print(text, flush=True)
    # The gathered table holds every stream finished in --out, also by earlier calls.
    sections = [(args.out / n / "table.md").read_text() for n in STREAMS if (args.out / n / "table.md").is_file()]
    (args.out / "table.md").write_text(
        f"Made by `python experiments/metagate_benchmarks.py --out {args.out} --streams ...`, one call per stream or all at once.\n\n"
        + "\n".join(sections)
    )


if __name__ == "__main__":
    main()
