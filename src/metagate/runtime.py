"""The machine a run lands on: its device, its threads, its memory."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

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


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int) -> int:
    """Set torch's intra-op thread count once, at the start of a run; returns it. More threads than the
    cores available only slow a run down (and 100000 of them crash torch): capped, with a message."""
    cores = available_cores()
    if threads > cores:
        print(f"note: {threads} threads asked for (trainer.threads), {cores} cores available: using {cores}", file=sys.stderr)
        threads = cores
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


UNLIMITED = 2**60  # a cgroup or rlimit "limit" above this is no limit


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def cgroup_memory_free(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup still allows (``memory.max`` less ``memory.current`` in cgroup
    v2, ``memory.limit_in_bytes`` less ``memory.usage_in_bytes`` in v1); ``None`` without a limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    v1 = [line.split(":", 2)[2] for line in lines if line.count(":") >= 2 and "memory" in line.split(":", 2)[1].split(",")]
    places = [(root / g.lstrip("/"), "memory.max", "memory.current") for g in v2] + [(root, "memory.max", "memory.current")]
    places += [(root / "memory" / g.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes") for g in v1]
    places += [(root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit_file, usage_file in places:
        limit = _read_int(folder / limit_file)
        if limit is not None and limit < UNLIMITED:
            return max(0, limit - (_read_int(folder / usage_file) or 0))
        if (folder / limit_file).is_file():
            return None  # the process's own cgroup says: no limit
    return None


def address_space_free() -> int | None:
    """Bytes of address space left under ``ulimit -v`` (``RLIMIT_AS``) to this process; ``None`` without a limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft >= UNLIMITED:
        return None
    used = 0
    try:
        with open("/proc/self/status") as f:
            used = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
    except OSError:
        pass
    return max(0, soft - used)


def available_memory_bytes() -> int | None:
    """Memory a new allocation can take: the least of the machine's (Linux ``MemAvailable``), what this
    process's cgroup still allows (``memory.max``) and its address-space limit (``ulimit -v``); ``None``
    when none is known."""
    free: int | None = None
    try:
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    limits = [x for x in (free, cgroup_memory_free(), address_space_free()) if x is not None]
    return min(limits) if limits else None


def check_memory(need: int, device: torch.device, what: str, advice: str = "") -> None:
    """Refuse a run whose data (or model) would not fit in the memory free to it."""
    if need <= 0:
        return
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where = f"on {device}"
    else:
        free = available_memory_bytes()  # type: ignore[assignment]
        where = "to this process (the machine's free memory, its cgroup's memory.max and ulimit -v)"
    if free is not None and need > 0.9 * free:
        raise ConfigError(
            f"{what} needs about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free {where}; "
            + (advice or "lower benchmark.num_tasks, benchmark.train_per_task or benchmark.test_per_task")
        )


# per parameter: its weight, its gradient and a temporary of its size in the backward pass, Adam's two moments
# (SGD: one momentum buffer), and two copies
# a method keeps (an anchor and an importance, as EWC and SI do; masks and replay buffers are not counted)
METHOD_COPIES = 2


def model_memory_estimate(cfg: ExperimentConfig) -> tuple[int, str]:
    """A lower bound on the bytes the largest of the run's methods (its own and each reference) holds for
    its backbone's fully connected layers during training, and what it counts (for a message)."""
    best, what = 0, ""
    per_param = 4 * (3 + (2 if cfg.trainer.optimizer == "adam" else 1) + METHOD_COPIES)
    for method in [cfg.method, *[r.method for r in cfg.reference_configs()]]:
        backbone = getattr(method, "backbone", None)
        hidden = list(getattr(backbone, "hidden", []) or []) if getattr(backbone, "kind", "mlp") in ("mlp", "cnn") else []
        if not hidden:
            continue
        inputs = cfg.benchmark.input_size() if backbone.kind == "mlp" else 0  # type: ignore[union-attr]
        widths = [inputs, *hidden] if inputs else hidden
        params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
        if params * per_param > best:
            best = params * per_param
            what = f"{method.name}'s backbone (hidden {hidden}: {params:,} parameters with their gradients, optimiser state and the method's copies)"
    return best, what


def check_machine(cfg: ExperimentConfig) -> torch.device:
    """The device ``cfg`` runs on, once this machine is known to have it and room for the stream's data
    and the methods' networks (both estimated from the config, before anything is built)."""
    device = resolve_device(cfg.trainer.device)
    data_device = device if device.type == "cuda" else torch.device("cpu")
    data = cfg.benchmark.memory_estimate()
    check_memory(data, data_device, f"the {cfg.benchmark.name} stream")
    model, what = model_memory_estimate(cfg)
    if model:
        shared = data if data_device == device else 0
        check_memory(model + shared, device, what + (" with the stream's data" if shared else ""), "lower method.backbone.hidden (or reference.backbone.hidden)")
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
