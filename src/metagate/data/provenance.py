"""Where a stream's data came from, and a fingerprint of it, so two runs can be compared knowingly.

A fingerprint is the total size and the SHA-256 (all 64 hex digits; messages show the first
:data:`SHOWN` of them) of the bytes that made the data: the files read for a data set on disk, or the
generated tensors for synthetic and generated sets. Runs recorded before the full digest was kept hold
its first 16 digits; :func:`same_data` compares such a prefix with a full digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor


SHOWN = 16  # hex digits of the SHA-256 a message shows


def same_data(a: str, b: str) -> bool:
    """Whether two recorded SHA-256 digests agree (one may be an older run's 16-digit prefix)."""
    n = min(len(a), len(b))
    return n >= SHOWN and a[:n] == b[:n]


def fingerprint_files(paths: Iterable[Path]) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` over the files' names and contents, in the order given."""
    digest, total = hashlib.sha256(), 0
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                total += len(block)
    return {"bytes": total, "sha256": digest.hexdigest()}


def fingerprint_tensors(tensors: Iterable[Tensor]) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` over the tensors' dtypes, shapes and values (on the CPU)."""
    digest, total = hashlib.sha256(), 0
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        data = t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        digest.update(data.tobytes())
        total += t.numel() * t.element_size()
    return {"bytes": total, "sha256": digest.hexdigest()}
