"""The machine a run lands on: its device, its threads, its memory."""

from __future__ import annotations

import os

import torch

from metagate.schema import ConfigError, ExperimentConfig


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when present) as a device this machine
    has; a device it lacks raises :class:`ConfigError` saying what to use instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name} but this machine has no CUDA device; use trainer.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"trainer.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of them"
            )
    if device.type == "mps" and not (torch.backends.mps.is_available()):
        raise ConfigError(f"trainer.device={name} but this machine has no Apple GPU (MPS); use trainer.device=cpu or auto")
    return device


def configure_threads(threads: int) -> int:
    """Set torch's intra-op thread count once, at the start of a run; returns it."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def available_memory_bytes() -> int | None:
    """Memory a new allocation can take without swapping (Linux ``MemAvailable``), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, device: torch.device, what: str) -> None:
    """Refuse a run whose data alone would not fit in the memory this machine has free."""
    if need <= 0:
        return
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where = f"on {device}"
    else:
        free = available_memory_bytes()  # type: ignore[assignment]
        where = "in this machine's free memory"
    if free is not None and need > 0.9 * free:
        raise ConfigError(
            f"{what} needs about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free {where}; "
            "lower benchmark.num_tasks, benchmark.train_per_task or benchmark.test_per_task"
        )


def check_machine(cfg: ExperimentConfig) -> torch.device:
    """The device ``cfg`` runs on, once this machine is known to have it and room for the stream's data."""
    device = resolve_device(cfg.trainer.device)
    check_memory(cfg.benchmark.memory_estimate(), device if device.type == "cuda" else torch.device("cpu"), f"the {cfg.benchmark.name} stream")
    return device
