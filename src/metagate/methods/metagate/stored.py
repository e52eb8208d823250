"""metagate's stored masks: each trained task's final mask, kept exactly, and what a step reads of them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagate.nn.gates import BitMask

Stored = tuple[Tensor, Tensor]  # stored tasks' slots [stored] (rows of the contexts) and their masks [stored, units]


class StoredMasks(nn.Module):
    """The final mask of each training task as packed bits (checkpointed) and which tasks are trained, with
    host-side caches rebuilt whenever they change (:meth:`store`, and after a state dict is loaded): each trained
    task's unpacked mask and the stored (slots, masks) the regulariser and the consolidation fit, so that a training
    step neither unpacks bits nor reads ``trained`` back from the device."""

    def __init__(self, slots: Tensor, units: int, device: torch.device) -> None:
        """``slots``: each training task's row of the contexts, by task index (on the device)."""
        super().__init__()
        self.device = device
        self.bits = nn.ModuleList(BitMask(torch.zeros(units, dtype=torch.bool)).to(device) for _ in range(len(slots)))
        self.register_buffer("trained", torch.zeros(len(slots), dtype=torch.bool))
        self.register_buffer("slots", slots, persistent=False)
        self.dense: dict[int, Tensor] = {}  # each trained task's unpacked mask
        self.targets: Stored | None = None  # the trained tasks' (slots, masks); None before any
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    def __getitem__(self, index: int) -> BitMask:
        return self.bits[index]  # type: ignore[return-value]

    def store(self, index: int, mask: Tensor) -> None:
        """Task ``index``'s final (bool) mask; the caches follow (one device read, never inside a step)."""
        self.bits[index] = BitMask(mask).to(self.device)
        self.trained[index] = True
        self.refresh()

    def trained_rows(self, rows: int) -> Tensor:
        """Which of ``rows`` context rows (training tasks first, by index) are trained tasks', on the device."""
        out = torch.zeros(rows, dtype=torch.bool, device=self.device)
        out[: len(self.bits)] = self.trained.to(self.device)
        return out

    def refresh(self) -> None:
        """Rebuild the caches from ``trained`` and the bits (one device read)."""
        trained = [i for i, done in enumerate(self.trained.tolist()) if done]
        self.dense = {i: self.bits[i].float() for i in trained}  # type: ignore[operator]
        self.targets = (self.slots[trained], torch.stack([self.dense[i] for i in trained])) if trained else None

    def batch(self, k: int) -> Stored | None:
        """The stored tasks' (slots, masks): all of them (``k = 0``), or ``k`` drawn uniformly with replacement on
        the device (an unbiased estimate of the mean over all, at a cost that does not grow with the tasks)."""
        if self.targets is None:
            return None
        slots, targets = self.targets
        if k <= 0:
            return slots, targets
        pick = torch.randint(slots.shape[0], (k,), device=slots.device)
        return slots[pick], targets[pick]
