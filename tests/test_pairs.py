"""The pair stream (issue 25): ordered class pairs of real images, one shared 2-way head, novel pairs last."""

from __future__ import annotations

import math

import pytest
import torch

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.data.images import generator
from metagate.data.pairs import Pairs
from metagate.methods import create_method
from metagate.train import task_seed

SMALL = {"dataset": "digits", "num_tasks": 20, "novel_tasks": 5, "train_per_class": 60, "test_per_class": 30}


@pytest.fixture(scope="module")
def given():  # noqa: ANN201
    return build_stream(Pairs.Config(**SMALL), 0)


def test_novel_pairs_are_untrained_and_their_classes_were_trained_in_both_positions(given) -> None:  # noqa: ANN001
    pairs = [tuple(int(v) for v in t.info["context_factors"].split(".")) for t in given.tasks]
    assert len(set(pairs)) == len(pairs) and all(a != b for a, b in pairs)
    early, novel = pairs[:15], pairs[15:]
    for pair in novel:
        assert pair not in early
        for k in pair:
            assert any(p[0] == k for p in early) and any(p[1] == k for p in early)
            assert sum(k in p for p in early) >= 2
    assert [t.info["novel"] for t in given.tasks] == [0] * 15 + [1] * 5


def test_class_a_is_labelled_0_and_class_b_1_by_one_shared_head(given) -> None:  # noqa: ANN001
    assert given.scenario == "domain" and given.num_outputs == 2
    digits = build_stream(Pairs.Config(**SMALL), 0)  # same seed, same stream
    for t, u in zip(given.tasks, digits.tasks):
        assert torch.equal(t.x_train, u.x_train) and torch.equal(t.context, u.context)
        assert set(t.y_train.tolist()) == {0, 1} and t.classes == (0, 1)
        assert int((t.y_train == 0).sum()) == 60 and int((t.y_test == 1).sum()) == 30 and t.num_val > 0
    # the given context: onehot(a) ++ onehot(b)
    t = given.tasks[3]
    a, b = (int(v) for v in t.info["context_factors"].split("."))
    expected = torch.zeros(20)
    expected[a], expected[10 + b] = 1, 1
    assert torch.equal(t.context, expected)


def test_a_pair_and_its_reverse_conflict() -> None:
    stream = build_stream(Pairs.Config(**{**SMALL, "num_tasks": 90, "novel_tasks": 0}), 1)  # every ordered pair
    by_pair = {t.info["context_factors"]: t for t in stream.tasks}
    ab, ba = by_pair["0.1"], by_pair["1.0"]
    # the same images of class 0 carry label 0 in (0, 1) and label 1 in (1, 0)
    assert set(ab.y_train[: 60].tolist()) == {0} and set(ba.y_train[60:].tolist()) == {1}


def test_prototype_contexts_are_projected_means_of_five_labelled_images_per_class() -> None:
    stream = build_stream(Pairs.Config(**SMALL, context="prototypes"), 0)
    assert stream.context_dim == 16 and all("context_factors" not in t.info for t in stream.tasks)
    projection = torch.randn(64, 8, generator=generator(0, "prototype-projection")) / math.sqrt(64)
    t = stream.tasks[2]
    own = (t.y_train == 0).nonzero().squeeze(1)
    shots = own[torch.randperm(len(own), generator=generator(0, "prototype-shots", 4))[:5]]
    assert torch.allclose(t.context[:8], t.x_train[shots].mean(0).flatten() @ projection, atol=1e-5)


def test_task_scenario_gives_each_class_its_own_output() -> None:
    stream = build_stream(Pairs.Config(**SMALL, scenario="task"), 0)
    assert stream.num_outputs == 10
    for t in stream.tasks:
        assert set(t.y_train.tolist()) == set(t.classes) and len(t.classes) == 2


def test_the_hand_rules_apply_to_given_contexts_and_refuse_prototypes() -> None:
    for context, ok in (("given", True), ("prototypes", False)):
        cfg = config_from_dict({"benchmark": {"name": "pairs", **SMALL, "context": context},
                                "method": {"name": "factor_rule", "backbone": {"hidden": [32]}}, "trainer": {"progress": False}})
        stream = build_stream(cfg.benchmark, 0)
        torch.manual_seed(task_seed(0, -1))
        if ok:
            method = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
            assert method.unit_mask(stream.tasks[0]).shape == (32,)
        else:
            with pytest.raises(ValueError, match="tuple of discrete factors"):
                create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))


def test_too_few_classes_for_the_pairs_asked_is_refused() -> None:
    with pytest.raises(ValueError, match="ordered pairs needed"):
        Pairs.Config(dataset="digits", classes=4, num_tasks=20)
