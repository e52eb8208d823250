"""The composed teacher (issue 12) and the methods that bound it: the oracle and the nearest-context lookup."""

from __future__ import annotations

import pytest
import torch

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.data.composed import ComposedTeacher, GroupTeacher, largest_overlap
from metagate.methods import create_method
from metagate.train import task_seed

SMALL = {"num_tasks": 20, "values": 4, "novel_tasks": 4, "train_per_task": 200, "test_per_task": 100, "heldout_inside": 2, "heldout_outside": 1}


def composed(**kw) -> ComposedTeacher.Config:  # noqa: ANN003
    return ComposedTeacher.Config(**{**SMALL, **kw})


def test_same_seed_same_stream() -> None:
    a, b = build_stream(composed(), 0), build_stream(composed(), 0)
    for ta, tb in zip(a.tasks + a.heldout, b.tasks + b.heldout):
        assert torch.equal(ta.x_train, tb.x_train) and torch.equal(ta.y_train, tb.y_train)
        assert torch.equal(ta.context, tb.context) and torch.equal(ta.oracle_mask[0], tb.oracle_mask[0])


@pytest.mark.parametrize("encoding", ["onehot", "numbers"])
def test_the_mask_is_the_documented_map_of_the_context(encoding: str) -> None:
    cfg = composed(encoding=encoding, shared_units=3)
    stream = build_stream(cfg, 1)
    for task in stream.tasks + stream.heldout:
        mask = task.oracle_mask[0]
        assert torch.equal(mask, ComposedTeacher.mask_from_context(cfg, task.context))
        assert mask.shape == (cfg.hidden_units,) and int(mask.sum()) == cfg.shared_units + cfg.factors * cfg.units_per_group
        assert bool(mask[: cfg.shared_units].all())


def test_the_student_sized_teacher_reproduces_the_labels_from_the_oracle_mask() -> None:
    cfg = composed()
    stream = build_stream(cfg, 2)
    gen = torch.Generator().manual_seed(2)
    teacher = GroupTeacher(cfg.input_dim, ComposedTeacher.groups(cfg), cfg.num_classes, gen)  # the builder's first draws
    for task in stream.tasks:
        assert torch.equal(teacher.label(task.x_test, task.oracle_mask[0]), task.y_test)


def test_novel_tasks_are_new_combinations_far_from_every_earlier_task() -> None:
    cfg = composed(num_tasks=30, novel_tasks=5, min_value_tasks=3)
    stream = build_stream(cfg, 0)
    combos = [task.info["combination"].split(".") for task in stream.tasks]
    assert len({tuple(c) for c in combos}) == cfg.num_tasks
    early = combos[: cfg.num_tasks - cfg.novel_tasks]
    for t in range(cfg.num_tasks - cfg.novel_tasks, cfg.num_tasks):
        assert all(sum(x != y for x, y in zip(combos[t], o)) >= 2 for o in combos[:t])
    for f in range(cfg.factors):
        assert all(sum(c[f] == str(v) for c in early) >= 2 for v in range(cfg.values))
    novel_overlap = largest_overlap([t.oracle_mask[0] for t in stream.tasks])[-cfg.novel_tasks :]
    assert all(o is not None and o <= 1 / 5 + 1e-6 for o in novel_overlap)  # at most 1 of 3 groups shared


def test_heldout_tasks_are_untrained_combinations_inside_and_outside_the_range() -> None:
    cfg = composed(encoding="numbers")
    stream = build_stream(cfg, 0)
    trained = {t.info["combination"] for t in stream.tasks}
    inside, outside = stream.heldout[: cfg.heldout_inside], stream.heldout[cfg.heldout_inside :]
    assert all(t.info["combination"] not in trained for t in stream.heldout)
    assert all(float(t.context.max()) <= 1 for t in inside) and all(float(t.context[0]) > 1 for t in outside)
    outside_group = ComposedTeacher.groups(cfg)[-1]
    assert not any(bool(t.oracle_mask[0][outside_group.start]) for t in stream.tasks)


def test_classes_are_roughly_balanced_under_any_mask() -> None:
    stream = build_stream(composed(test_per_task=2000), 0)
    shares = torch.stack([torch.bincount(t.y_test, minlength=4).float() / 2000 for t in stream.tasks]).mean(0)
    assert float(shares.min()) > 0.2


def build(method: dict, seed: int = 0, **bench):  # noqa: ANN003, ANN201
    cfg_b = composed(**bench)
    raw = {
        "seed": seed,
        "benchmark": {"name": "composed_teacher", **SMALL, **bench},
        "method": {"backbone": {"hidden": [cfg_b.hidden_units]}, **method},
        "trainer": {"progress": False},
    }
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def test_the_oracle_uses_exactly_each_tasks_oracle_mask() -> None:
    method, stream = build({"name": "oracle"})
    assert method.report().test_time_info == "task_id"
    for task in stream.tasks + stream.heldout:
        assert torch.equal(method.unit_mask(task), task.oracle_mask[0])


def test_the_oracle_refuses_a_student_whose_units_differ_from_the_teachers() -> None:
    with pytest.raises(ValueError, match="method.backbone.hidden="):
        build({"name": "oracle", "backbone": {"hidden": [64]}})


def train_through(method, tasks) -> None:  # noqa: ANN001
    for task in tasks:
        method.before_task(task)
        method.after_task(task)


def test_nearest_context_gives_a_new_task_the_mask_of_the_nearest_trained_context() -> None:
    method, stream = build({"name": "nearest_context"})
    assert method.report().test_time_info == "task_id"
    trained, rest = stream.tasks[:10], stream.tasks[10:] + stream.heldout
    train_through(method, trained)
    ctx = torch.stack([t.context for t in trained])
    for task in rest:
        d = (ctx - task.context).norm(dim=1)
        nearest = max(i for i in range(len(trained)) if d[i] <= d.min() + 1e-6)  # ties: the latest
        assert torch.equal(method.unit_mask(task), trained[nearest].oracle_mask[0])


def test_nearest_context_records_the_zero_shot_mask_and_then_trains_with_the_oracle_mask() -> None:
    method, stream = build({"name": "nearest_context"})
    train_through(method, stream.tasks[:10])
    task = stream.tasks[10]
    zero_shot = method.unit_mask(task)
    train_through(method, [task])
    assert torch.equal(method.zero_shot_masks[10], zero_shot)
    assert torch.equal(method.unit_mask(task), task.oracle_mask[0])
    recall = method.report().figures["zero_shot_oracle_recall"][10]
    assert recall == pytest.approx(float((zero_shot & task.oracle_mask[0]).sum() / task.oracle_mask[0].sum()))


def test_the_vote_keeps_the_units_most_neighbours_share() -> None:
    method, stream = build({"name": "nearest_context", "neighbours": 3})
    trained = stream.tasks[:12]
    train_through(method, trained)
    task = stream.tasks[12]
    d = torch.stack([(t.context - task.context).norm() for t in trained])
    order = sorted(range(12), key=lambda i: (float(d[i]), -i))[:3]
    w = 1 / (d[order] + 1e-6)
    score = sum(wi * trained[i].oracle_mask[0].float() for wi, i in zip(w, order))
    mask = method.unit_mask(task)
    assert int(mask.sum()) == int(trained[0].oracle_mask[0].sum())  # the neighbours' mask size
    assert float(score[mask].min()) >= float(score[~mask].max()) - 1e-9  # the top-scoring units
    assert float(score[mask].min()) > 0


def test_ties_let_every_equally_near_task_vote() -> None:
    method, stream = build({"name": "nearest_context", "ties": True})
    trained = stream.tasks[:12]
    train_through(method, trained)
    task = stream.tasks[12]
    d = torch.stack([(t.context - task.context).norm() for t in trained])
    tied = [i for i in range(12) if d[i] <= d.min() + 1e-6]
    votes = sum(trained[i].oracle_mask[0].float() for i in tied)
    mask = method.unit_mask(task)
    assert float(votes[mask].min()) >= float(votes[~mask].max())


def test_lookup_training_stores_the_looked_up_mask() -> None:
    method, stream = build({"name": "nearest_context", "train_mask": "lookup", "gate_fraction": 0.5})
    first = method.unit_mask(stream.tasks[0])
    train_through(method, stream.tasks[:2])
    assert torch.equal(method.unit_mask(stream.tasks[1]), first)  # the only trained task's mask, kept while it trains


def _nearest_recall(encoding: str, seed: int) -> float:
    """Mean share of a novel task's oracle units that the nearest earlier context's mask holds
    (the default stream's sizes, data kept small: only contexts and masks matter here)."""
    stream = build_stream(ComposedTeacher.Config(encoding=encoding, train_per_task=20, test_per_task=10), seed)
    tasks = stream.tasks
    shares = []
    for t in range(len(tasks) - 10, len(tasks)):
        ctx = torch.stack([u.context for u in tasks[:t]])
        d = (ctx - tasks[t].context).norm(dim=1)
        near = int(torch.nonzero(d <= d.min() + 1e-6).max())
        a, b = tasks[t].oracle_mask[0], tasks[near].oracle_mask[0]
        shares.append(float((a & b).sum() / a.sum()))
    return sum(shares) / len(shares)


def test_with_numbers_near_contexts_select_other_groups_so_a_lookup_recovers_little() -> None:
    """The default numeric code: one value step is a small move of the context but another unit group
    (the step function), so the nearest earlier context's mask holds about a third of a novel task's
    units (only groups of exactly equal values are shared), though each of its groups was trained."""
    cfg = ComposedTeacher.Config()
    assert cfg.encoding == "numbers"
    a, b = ComposedTeacher.encode(cfg, [2, 3, 1]), ComposedTeacher.encode(cfg, [3, 3, 1])
    assert float((a - b).norm()) == pytest.approx(1 / (cfg.values - 1))
    ma, mb = ComposedTeacher.mask_from_context(cfg, a), ComposedTeacher.mask_from_context(cfg, b)
    assert int((ma & mb).sum()) == 2 * cfg.units_per_group  # factors 1 and 2 shared, factor 0's groups disjoint
    assert max(_nearest_recall("numbers", s) for s in range(3)) < 0.45
