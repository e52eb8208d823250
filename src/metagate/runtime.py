"""The machine a run lands on: its device, its threads, its memory."""

from __future__ import annotations

import os
import threading

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


class PeakMemory:
    """A run's own peak memory, not the process's running maximum (which, in ``compare``, would give
    every run after the first the largest peak so far). CUDA: torch's peak allocation since
    :meth:`start` (peak statistics reset there). CPU: the process's resident set, sampled by a
    background thread every ``interval`` seconds between :meth:`start` and :meth:`stop` (Linux
    ``/proc/self/statm``; elsewhere the process's lifetime maximum from ``getrusage``)."""

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: float | None = None

    @staticmethod
    def resident_bytes() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self.start_bytes = self.peak_bytes = self.resident_bytes() or 0
        if self.resident_bytes() is not None:
            self._thread = threading.Thread(target=self._sample, name="metagate-peak-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes() or 0)

    def stop(self) -> float:
        """The peak in MiB since :meth:`start` (the same value on every later call)."""
        if self._result is None:
            self._result = self._measure()
        return self._result

    def _measure(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes() or 0)
            return self.peak_bytes / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
