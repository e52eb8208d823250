"""Run folders: resolved config, results, per-step metrics, environment and checkpoints.

Every write is atomic (temporary file, then rename), and a folder that already holds a run is never
overwritten silently.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from metagate import __version__

CHECKPOINT_FORMAT = 1


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (exists already, nothing to resume, ...)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt or belongs to another experiment."""


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path`` (readers never see a
    half-written file). The file gets the usual permissions (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def default_run_dir(root: Path, benchmark: str, method: str, seed: int) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{benchmark}-{method}-s{seed}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import numpy

    env: dict[str, Any] = {
        "metagate": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git_revision": git_revision(),
        "command": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


class RunDir:
    """One run's folder. ``RunDir.create`` refuses a folder that already holds files;
    ``RunDir.open_for_resume`` requires a checkpoint in it."""

    CONFIG = "config.yaml"
    RESULTS = "results.json"
    METRICS = "metrics.jsonl"
    ENV = "env.json"
    CHECKPOINT = "checkpoints/last.pt"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path) -> "RunDir":
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunFolderError(
                f"{path} already exists and is not empty; nothing was written. "
                "Pass --resume to continue the run in it, or choose another --out."
            )
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open_for_resume(cls, path: Path) -> "RunDir":
        run = cls(Path(path))
        if not run.path.is_dir():
            raise RunFolderError(f"cannot resume: {run.path} does not exist")
        if not (run.path / cls.CONFIG).is_file():
            raise RunFolderError(f"cannot resume: {run.path} holds no {cls.CONFIG}, so it is not a metagate run")
        return run

    # ----------------------------------------------------------------- files

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.file(self.CONFIG), yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        data = yaml.safe_load(self.file(self.CONFIG).read_text())
        if not isinstance(data, dict):
            raise RunFolderError(f"{self.file(self.CONFIG)} is not a config mapping")
        return data

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.file(self.ENV), env)

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_json(self.file(self.RESULTS), results)

    def read_results(self) -> dict[str, Any]:
        return json.loads(self.file(self.RESULTS).read_text())

    def has_results(self) -> bool:
        return self.file(self.RESULTS).is_file()

    def metrics_size(self) -> int:
        p = self.file(self.METRICS)
        return p.stat().st_size if p.exists() else 0

    def truncate_metrics(self, size: int) -> None:
        """Drop records written after a checkpoint (a resumed run writes them again)."""
        p = self.file(self.METRICS)
        if p.exists() and p.stat().st_size > size:
            with open(p, "r+b") as f:
                f.truncate(size)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.file(self.METRICS), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.file(self.CHECKPOINT)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self, map_location: torch.device | str = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path, map_location)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, corrupt or foreign file raises :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: the run stopped before its first task ended; delete {path.parent.parent} "
            "and start it again without --resume"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged file)
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a metagate checkpoint ({type(e).__name__}: {e}); "
            "delete it to start the run afresh in a new folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a metagate checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found {state.get('format') if isinstance(state, dict) else type(state).__name__})"
        )
    return state
