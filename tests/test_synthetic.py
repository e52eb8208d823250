"""Synthetic context families: deterministic, context-driven, as documented."""

from __future__ import annotations

import math

import torch

from metagate.data import build_stream
from metagate.data.synthetic import GatedTeacher, RotatedTeacher, Teacher


def gated(**kw) -> GatedTeacher.Config:  # noqa: ANN003
    return GatedTeacher.Config(**{"num_tasks": 6, "train_per_task": 200, "test_per_task": 100, **kw})


def test_same_seed_same_stream_and_other_seed_differs() -> None:
    a, b, c = (build_stream(gated(), s) for s in (0, 0, 1))
    for ta, tb in zip(a.tasks, b.tasks):
        assert torch.equal(ta.x_train, tb.x_train) and torch.equal(ta.y_train, tb.y_train)
        assert torch.equal(ta.context, tb.context) and torch.equal(ta.oracle_mask[0], tb.oracle_mask[0])
    assert not torch.equal(a.tasks[0].x_train, c.tasks[0].x_train)


def test_oracle_mask_has_the_configured_density() -> None:
    stream = build_stream(gated(hidden_units=80, mask_density=0.25), 0)
    assert all(int(t.oracle_mask[0].sum()) == 20 for t in stream.tasks)


def test_the_oracle_mask_alone_reproduces_the_labels() -> None:
    cfg = gated()
    stream = build_stream(cfg, 3)
    gen = torch.Generator().manual_seed(3)
    teacher = Teacher(cfg.input_dim, cfg.hidden_units, cfg.num_classes, gen)  # same draws as the builder
    for task in stream.tasks:
        assert torch.equal(teacher.label(task.x_test, task.oracle_mask[0]), task.y_test)


def test_nearby_contexts_share_units() -> None:
    stream = build_stream(gated(num_tasks=30), 0)
    ctx = stream.contexts()
    masks = torch.stack([t.oracle_mask[0].float() for t in stream.tasks])
    i, j = torch.triu_indices(30, 30, 1)
    cos = (ctx[i] * ctx[j]).sum(1)
    overlap = (masks[i] * masks[j]).sum(1) / masks[i].sum(1)
    assert torch.corrcoef(torch.stack([cos, overlap]))[0, 1] > 0.7


def test_different_contexts_give_conflicting_labels_in_one_head() -> None:
    stream = build_stream(gated(num_tasks=2), 0)
    assert stream.scenario == "domain" and stream.num_outputs == 4
    cfg = gated(num_tasks=2)
    teacher = Teacher(cfg.input_dim, cfg.hidden_units, cfg.num_classes, torch.Generator().manual_seed(0))
    x = stream.tasks[0].x_test
    agree = (teacher.label(x, stream.tasks[0].oracle_mask[0]) == teacher.label(x, stream.tasks[1].oracle_mask[0]))
    assert agree.float().mean() < 0.8


def test_task_incremental_variant_gives_each_task_its_own_labels() -> None:
    stream = build_stream(gated(num_tasks=3, scenario="task"), 0)
    assert stream.scenario == "task" and stream.num_outputs == 12
    for t in stream.tasks:
        assert set(t.y_train.unique().tolist()) <= set(t.classes)
    assert stream.class_mask().sum(1).tolist() == [4, 4, 4]


def test_rotated_contexts_are_cos_sin_and_heldout_angles_lie_inside_and_outside() -> None:
    cfg = RotatedTeacher.Config(num_tasks=5, max_angle=120, heldout_inside=2, heldout_outside=2, train_per_task=50, test_per_task=50)
    stream = build_stream(cfg, 0)
    angles = [t.info["angle"] for t in stream.tasks]
    assert angles == [0, 30, 60, 90, 120]
    held = [t.info["angle"] for t in stream.heldout]
    assert sum(0 < a < 120 and a not in angles for a in held) == 2
    assert sum(a > 120 for a in held) == 2
    for t in stream.tasks + stream.heldout:
        rad = math.radians(t.info["angle"])
        assert torch.allclose(t.context, torch.tensor([math.cos(rad), math.sin(rad)]))


def test_rotation_changes_inputs_not_labels_of_the_base_problem() -> None:
    cfg = RotatedTeacher.Config(num_tasks=3, train_per_task=500, test_per_task=100)
    stream = build_stream(cfg, 0)
    # same label marginals (one base problem), different input subspaces
    counts = [torch.bincount(t.y_train, minlength=4).float() / 500 for t in stream.tasks]
    assert all((c - counts[0]).abs().max() < 0.1 for c in counts)
    x0, x2 = stream.tasks[0].x_train, stream.tasks[2].x_train
    # projection of task 2's inputs on task 0's principal subspace loses energy
    u = torch.linalg.svd(x0, full_matrices=False).Vh[: cfg.latent_dim]
    kept = (x2 @ u.T).pow(2).sum() / x2.pow(2).sum()
    assert kept < 0.9
