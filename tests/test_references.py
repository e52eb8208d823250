"""The non-learned / closed-form references of issue 25 (factor_rule, stored_composition, ridge_context) and the
composed families whose structure is hidden (encoding=embedded, interactions=pairs)."""

from __future__ import annotations

import itertools

import pytest
import torch

from metagate.data import build_stream
from metagate.data.composed import ComposedTeacher
from metagate.methods.ridge_context import ridge_fit
from test_composed import build, composed, train_through


def test_factor_rule_masks_are_the_union_of_one_fixed_block_per_factor_value() -> None:
    method, stream = build({"name": "factor_rule", "gate_fraction": 0.8})
    assert method.report().test_time_info == "context"
    blocks = method.blocks()[0]
    for task in stream.tasks + stream.heldout:
        values = [int(v) for v in task.info["context_factors"].split(".")]
        expected = torch.zeros(stream.tasks[0].oracle_mask[0].shape[0], dtype=torch.bool)
        for f, v in enumerate(values):
            expected[blocks[(f, v)]] = True
        assert torch.equal(method.unit_mask(task), expected)
    sizes = {len(b) for b in blocks.values()}
    assert sizes == {round(0.2 * method.model.gated_widths[0] / 3)}
    # blocks are disjoint while they fit
    allunits = torch.cat(list(blocks.values()))
    assert len(set(allunits.tolist())) == len(allunits)


def test_tasks_sharing_a_factor_value_share_its_block_and_masks_do_not_depend_on_training() -> None:
    method, stream = build({"name": "factor_rule"})
    before = [method.unit_mask(t).clone() for t in stream.tasks]
    train_through(method, stream.tasks[:5])
    assert all(torch.equal(method.unit_mask(t), b) for t, b in zip(stream.tasks, before))


@pytest.mark.parametrize("name", ["factor_rule", "stored_composition"])
def test_hand_rules_refuse_a_context_that_hides_its_factors(name: str) -> None:
    with pytest.raises(ValueError, match="tuple of discrete factors"):
        build({"name": name}, encoding="embedded", distractors=2)


def test_stored_composition_rebuilds_a_novel_mask_from_stored_oracle_masks() -> None:
    method, stream = build({"name": "stored_composition"}, num_tasks=30, novel_tasks=4, min_value_tasks=3)
    assert method.report().test_time_info == "context"
    train_through(method, stream.tasks[:26])
    exact = [torch.equal(method.unit_mask(t), t.oracle_mask[0]) for t in stream.tasks[26:]]
    assert sum(exact) >= 3  # intersections of >= 3 masks sharing a value rarely keep a stray unit


def test_stored_composition_intersects_the_masks_of_tasks_sharing_each_value() -> None:
    method, stream = build({"name": "stored_composition", "train_mask": "random", "gate_fraction": 0.5})
    trained = stream.tasks[:10]
    train_through(method, trained)
    task = stream.tasks[10]
    values = [int(v) for v in task.info["context_factors"].split(".")]
    expected = torch.zeros_like(method.unit_mask(task))
    for f, v in enumerate(values):
        rows = [method.unit_mask(t) for t in trained if int(t.info["context_factors"].split(".")[f]) == v]
        if rows:
            expected |= torch.stack(rows).all(0)
        else:
            expected |= method.__class__.__mro__[1].lookup(method, task)[0]  # nearest fallback
    assert torch.equal(method.unit_mask(task), expected)


def test_stored_composition_votes_keep_the_stored_mask_size() -> None:
    method, stream = build({"name": "stored_composition", "combine": "votes"})
    train_through(method, stream.tasks[:10])
    assert int(method.unit_mask(stream.tasks[12]).sum()) == int(stream.tasks[0].oracle_mask[0].sum())


def test_ridge_fit_recovers_a_linear_map_and_chooses_lambda_by_leave_one_out() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen)
    w_true = torch.randn(3, 5, generator=gen)
    y = x @ w_true + 0.5
    w, mx, my, lam = ridge_fit(x, y, [1e-3, 10.0, 1000.0])
    assert lam == 1e-3 and torch.allclose(my + (x - mx) @ w, y, atol=1e-3)
    noise = torch.randn(40, 5, generator=gen) * 10
    _, _, _, lam = ridge_fit(x, noise, [1e-3, 10.0, 1000.0])
    assert lam == 1000.0  # pure noise: the mean predicts held-out rows best


def test_ridge_context_predicts_stored_masks_from_contexts() -> None:
    method, stream = build({"name": "ridge_context"}, encoding="onehot")
    assert method.report().test_time_info == "context"
    train_through(method, stream.tasks[:14])
    task = stream.tasks[15]
    mask = method.unit_mask(task)
    assert int(mask.sum()) == int(task.oracle_mask[0].sum())
    # onehot codes: a value's group is a linear function of its code, so most novel units are recovered
    recall = float((mask & task.oracle_mask[0]).sum() / task.oracle_mask[0].sum())
    assert recall > 0.6
    assert method.report().figures["ridge_lambda"][15] is not None


def test_ridge_context_refuses_a_stream_whose_contexts_are_all_equal() -> None:
    from test_composed import SMALL
    from metagate.config import config_from_dict
    from metagate.methods import create_method

    cfg = config_from_dict({"benchmark": {"name": "composed_teacher", **SMALL}, "method": {"name": "ridge_context", "backbone": {"hidden": [composed().hidden_units]}}})
    stream = build_stream(cfg.benchmark, 0)
    for t in stream.tasks + stream.heldout:
        t.context = torch.zeros_like(t.context)
    with pytest.raises(ValueError, match="same context"):
        create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))


# ---------------------------------------------------------------- families that hide their structure


def test_embedded_contexts_are_sums_of_fixed_value_vectors_plus_fresh_distractors() -> None:
    cfg = composed(encoding="embedded", distractors=3, embed_dim=5)
    stream = build_stream(cfg, 0)
    table = ComposedTeacher.embeddings(cfg, 0)
    distractors = []
    for task in stream.tasks + stream.heldout:
        combo = [int(v) for v in task.info["combination"].split(".")]
        assert task.context.shape == (8,) and "context_factors" not in task.info
        assert torch.allclose(task.context[:5], sum(table[f, v] for f, v in enumerate(combo)))
        assert torch.equal(task.oracle_mask[0], ComposedTeacher.mask_from_combination(cfg, combo))
        distractors.append(task.context[5:])
    assert len({tuple(d.tolist()) for d in distractors}) == len(distractors)  # drawn afresh per task
    with pytest.raises(ValueError, match="no per-number decoding"):
        ComposedTeacher.mask_from_context(cfg, stream.tasks[0].context)


def test_other_encodings_are_unchanged_by_the_embedded_option() -> None:
    a = build_stream(composed(), 3)
    b = build_stream(composed(embed_dim=7, distractors=2), 3)  # options of embedded only
    assert all(torch.equal(x.context, y.context) and torch.equal(x.x_train, y.x_train) for x, y in zip(a.tasks, b.tasks))


def test_pair_interactions_mask_is_a_group_per_value_pair_and_novel_pairs_were_all_seen() -> None:
    cfg = composed(interactions="pairs", heldout_outside=0, novel_min_differing=1, units_per_group=3, min_value_tasks=1)
    assert cfg.num_groups == 3 * 16 and cfg.hidden_units == 3 * 16 * 3
    stream = build_stream(cfg, 0)
    combos = [[int(v) for v in t.info["combination"].split(".")] for t in stream.tasks]
    assert len({tuple(c) for c in combos}) == cfg.num_tasks
    early = combos[: cfg.num_tasks - cfg.novel_tasks]
    pairs = list(itertools.combinations(range(3), 2))
    for t, c in zip(stream.tasks, combos):
        assert int(t.oracle_mask[0].sum()) == 3 * cfg.units_per_group
    for c in combos[-cfg.novel_tasks :]:
        for i, j in pairs:
            assert sum(e[i] == c[i] and e[j] == c[j] for e in early) >= cfg.min_value_tasks
    # no union over single factor values composes a pair mask: tasks sharing one value share no units
    a, b = ComposedTeacher.mask_from_combination(cfg, [0, 1, 2]), ComposedTeacher.mask_from_combination(cfg, [0, 2, 3])
    assert int((a & b).sum()) == 0
    assert int((a & ComposedTeacher.mask_from_combination(cfg, [0, 1, 3])).sum()) == cfg.units_per_group  # one pair shared


def test_pair_interactions_refuse_an_outside_value_and_too_distant_novel_tasks() -> None:
    with pytest.raises(ValueError, match="heldout_outside=0"):
        composed(interactions="pairs")
    with pytest.raises(ValueError, match="novel_min_differing"):
        composed(interactions="pairs", heldout_outside=0)


def test_the_embedded_family_has_the_numeric_familys_tasks_and_masks_with_other_contexts() -> None:
    a = build_stream(composed(), 4)
    b = build_stream(composed(encoding="embedded", distractors=2), 4)
    for x, y in zip(a.tasks + a.heldout, b.tasks + b.heldout):
        assert torch.equal(x.x_train, y.x_train) and torch.equal(x.y_test, y.y_test) and torch.equal(x.oracle_mask[0], y.oracle_mask[0])
        assert x.context.shape != y.context.shape
