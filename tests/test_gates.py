"""Masks: compact storage, straight-through gradients, per-weight masks without weight copies."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metagate.nn.gates import BitMask, binarize_ste, iou, masked_linear, pack_bits, random_unit_masks, unpack_bits


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_bits_round_trip(shape: list[int], seed: int) -> None:
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    assert torch.equal(unpack_bits(pack_bits(mask), shape), mask)


def test_bitmask_is_eight_times_smaller_than_bytes_and_checkpoints() -> None:
    mask = torch.rand(2000) < 0.2
    bm = BitMask(mask)
    assert bm.nbytes == 250
    fresh = BitMask(torch.zeros(2000, dtype=torch.bool))
    fresh.load_state_dict(bm.state_dict())
    assert torch.equal(fresh.bool(), mask)
    assert abs(fresh.density() - mask.float().mean().item()) < 1e-6


def test_straight_through_gradient() -> None:
    scores = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    hard = binarize_ste(scores, 0.0)
    assert hard.tolist() == [0.0, 1.0, 1.0]
    (hard * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0]


def test_masked_linear_leaves_the_weights_untouched_and_gives_masked_weights_no_gradient() -> None:
    lin = torch.nn.Linear(4, 3)
    before = lin.weight.detach().clone()
    mask = torch.tensor([[1, 0, 1, 0]] * 3, dtype=torch.float32)
    out = masked_linear(torch.randn(5, 4), lin.weight, lin.bias, mask)
    out.sum().backward()
    assert torch.equal(lin.weight.detach(), before)
    assert torch.all(lin.weight.grad[:, [1, 3]] == 0) and torch.all(lin.weight.grad[:, [0, 2]] != 0)


def test_random_unit_masks_keep_fraction_and_iou() -> None:
    masks = random_unit_masks([5000, 5000], 0.2, torch.Generator().manual_seed(0))
    for m in masks:
        assert abs(m.float().mean().item() - 0.2) < 4 * (0.2 * 0.8 / 5000) ** 0.5
    # two independent masks at density p overlap with IoU about p^2 / (2p - p^2)
    assert abs(iou(masks[0], masks[1]) - 0.04 / 0.36) < 0.02
    assert iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
