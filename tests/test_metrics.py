"""Metrics on hand-made accuracy matrices, and properties that hold for any matrix."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from metagate.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, summary

R = [
    [0.9, 0.2, 0.1],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.95],
]
B = [0.1, 0.25, 0.2]


def test_acc_is_mean_of_last_row() -> None:
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_bwt_lopez_paz() -> None:
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_fwt_uses_untrained_accuracy() -> None:
    assert forward_transfer(R, B) == pytest.approx(((0.2 - 0.25) + (0.3 - 0.2)) / 2)


def test_forgetting_uses_best_earlier_accuracy() -> None:
    r = [[0.6, 0.0, 0.0], [0.9, 0.7, 0.0], [0.4, 0.75, 0.8]]
    # task 0: best 0.9 (after task 1) -> 0.4 ; task 1: best 0.7 -> 0.75 (negative forgetting)
    assert forgetting(r) == pytest.approx(((0.9 - 0.4) + (0.7 - 0.75)) / 2)


def test_forgetting_ignores_rows_before_the_task_was_trained() -> None:
    r = [[0.5, 0.9], [0.5, 0.6]]  # task 1 was at 0.9 *before* training it: not forgetting
    assert forgetting(r) == pytest.approx(0.0)


def test_single_task_has_no_transfer() -> None:
    s = summary([[0.8]], [0.1])
    assert s == {"acc": pytest.approx(0.8), "bwt": None, "fwt": None, "forgetting": None}


def test_bad_shapes_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="length"):
        forward_transfer(R, [0.1])


matrices = st.integers(2, 6).flatmap(
    lambda t: arrays(np.float64, (t, t), elements=st.floats(0, 1, allow_nan=False))
)


@settings(max_examples=200, deadline=None)
@given(matrices)
def test_forgetting_bounds_minus_bwt(r: np.ndarray) -> None:
    # forgetting_j = max_l R[l,j] - R[T-1,j] >= R[j,j] - R[T-1,j] = -bwt_j
    assert forgetting(r) >= -backward_transfer(r) - 1e-12


@settings(max_examples=200, deadline=None)
@given(matrices)
def test_metrics_are_bounded(r: np.ndarray) -> None:
    assert 0 <= average_accuracy(r) <= 1
    assert -1 <= backward_transfer(r) <= 1
    assert -1 <= forgetting(r) <= 1
    assert forward_transfer(r, np.zeros(len(r))) >= 0


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 6), st.floats(0, 1))
def test_perfect_retention_means_no_forgetting(t: int, a: float) -> None:
    r = np.triu(np.full((t, t), a)) + np.tril(np.full((t, t), a), -1)
    assert backward_transfer(r) == pytest.approx(0.0)
    assert forgetting(r) == pytest.approx(0.0)


def test_zero_shot_is_the_row_before_each_task() -> None:
    from metagate.metrics import zero_shot

    assert zero_shot(R, B) == [0.1, 0.2, 0.3]


def test_steps_to_ninety_percent_of_final() -> None:
    from metagate.metrics import steps_to_fraction

    curve = [(0, 0.1), (10, 0.5), (20, 0.85), (30, 0.95), (40, 0.9)]
    assert steps_to_fraction(curve, 0.9) == 20  # target 0.9 * 0.9 = 0.81, first reached by 0.85 at step 20
    assert steps_to_fraction([], 0.9) is None


def test_mask_summary_on_hand_made_masks() -> None:
    import torch

    from metagate.metrics import mask_summary

    masks = [torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1])]
    ctx = torch.tensor([[0.0], [1.0], [3.0]])
    out = mask_summary(masks, ctx)
    assert out["mask_density"] == [0.5, 0.5, 0.5]
    assert out["mask_overlap"][0][1] == pytest.approx(1 / 3) and out["mask_overlap"][0][2] == 0.0
    assert out["mask_overlap_mean"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert out["context_mask_correlation"] == pytest.approx(0.866, abs=1e-3)  # farther contexts, less overlap


def test_zero_shot_gain_and_q_read_the_same_window_and_q_alone_hides_a_low_just_trained_accuracy() -> None:
    from metagate.metrics import just_trained, zero_shot_gain, zero_shot_quality

    xdg = [[0.9, 0.5, 0.5], [0.9, 0.9, 0.5], [0.9, 0.9, 0.9]]
    good = [[0.9, 0.7, 0.7], [0.9, 0.9, 0.7], [0.9, 0.9, 0.9]]  # +20 pt zero-shot at 90% just trained
    weak = [[0.6, 0.55, 0.55], [0.6, 0.6, 0.55], [0.6, 0.6, 0.6]]  # +5 pt at 60%: Q 0.5 as well
    init = [0.5, 0.5, 0.5]
    assert zero_shot_gain(good, init, xdg, init) == pytest.approx(0.2)
    assert zero_shot_quality(good, init, xdg, init) == pytest.approx(0.5)
    assert zero_shot_quality(weak, init, xdg, init) == pytest.approx(0.5)
    assert zero_shot_gain(weak, init, xdg, init) == pytest.approx(0.05)
    assert just_trained(weak) == pytest.approx(0.6)
    assert zero_shot_gain(good, init, xdg, init, last=1) == pytest.approx(0.2)
    assert zero_shot_gain(good, init, [[0.5]], [0.5]) is None  # another stream length


def test_a_baseline_of_another_density_strength_or_backbone_is_named_as_unmatched() -> None:
    from metagate.metrics import baseline_mismatch

    cfg = {"c": 0.1, "xi": 0.01, "backbone": {"hidden": [209]}}
    assert baseline_mismatch(cfg, 0.16, dict(cfg), 0.158) == []
    assert baseline_mismatch(cfg, 0.16, {**cfg, "c": 1.0}, 0.16) == ["c 0.1 vs XdG's 1.0"]
    assert baseline_mismatch(cfg, 0.5, cfg, 0.16)[0].startswith("density")
    assert baseline_mismatch(cfg, 0.16, {**cfg, "backbone": {"hidden": [256]}}, 0.16) == ["backbone differs"]
