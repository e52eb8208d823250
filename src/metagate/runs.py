"""Run folders: resolved config, results, per-step metrics, environment and checkpoints.

Every write is atomic (temporary file, then rename), and a folder that already holds a run is never
overwritten silently. One process at a time writes a run folder: :meth:`RunDir.lock` holds an
exclusive ``fcntl`` lock on ``<run>/.lock`` (which names the holder's PID) for the life of a run.
A checkpoint carries the SHA-256 of its payload in its header, so a damaged file is refused instead
of resuming into different numbers.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from metagate._version import __version__
from metagate.schema import NoAliasLoader, dump_yaml

CHECKPOINT_FORMAT = 2
CHECKPOINT_MAGIC = b"METAGATE-CHECKPOINT\n"  # then 64 hex digits of the payload's SHA-256, a newline, the payload
PROVENANCE_KEY = "provenance"  # config.yaml's record of the data (not part of the config)


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (exists already, nothing to resume, ...)."""


class RunFolderBusy(RunFolderError):
    """A run folder another process holds (its lock)."""


class ResultsFileError(RunFolderError, ValueError):
    """A ``results.json`` that is valid JSON but not a finished run's results (see :func:`check_results`)."""


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _results_problem(data: Any) -> str | None:
    """What is wrong with ``data`` as a finished run's results, or ``None``."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not a mapping"
    matrix = data.get("acc_matrix")
    if not isinstance(matrix, list) or not matrix:
        return "acc_matrix is missing or empty"
    n = len(matrix)

    def accuracies(values: Any, key: str, length: int | None = n) -> str | None:
        if not isinstance(values, list) or (length is not None and len(values) != length) or (length is None and len(values) > n):
            return f"{key} is not a list of {length if length is not None else f'at most {n}'} values (one per task)"
        if not all(v is None or (_number(v) and 0 <= v <= 1) for v in values):
            return f"{key} holds a value that is not an accuracy in [0, 1] (or null)"
        return None

    for i, row in enumerate(matrix):
        if (problem := accuracies(row, f"acc_matrix row {i}")) is not None:
            return problem + f" (the matrix has {n} rows: one per task, each with every task's accuracy)"
    if "task_names" in data and (not isinstance(data["task_names"], list) or len(data["task_names"]) != n):
        return f"task_names does not name the acc_matrix's {n} tasks"
    if (problem := accuracies(data.get("initial_acc"), "initial_acc")) is not None:
        return problem
    for key in ("zero_shot_acc", "few_shot_acc"):
        if data.get(key) is not None and (problem := accuracies(data[key], key, None)) is not None:
            return problem
    for key in ("acc", "bwt", "fwt", "forgetting"):
        if key not in data:
            return f"{key} is missing"
        if data[key] is not None and not _number(data[key]):
            return f"{key} is {data[key]!r}, not a number"
    for key in ("train_seconds", "peak_memory_mb"):
        if data.get(key) is not None and not _number(data[key]):
            return f"{key} is {data[key]!r}, not a number"
    if "seed" in data and (isinstance(data["seed"], bool) or not isinstance(data["seed"], int)):
        return f"seed is {data['seed']!r}, not an integer"
    if "method" in data and not isinstance(data["method"], str):
        return f"method is {data['method']!r}, not a name"
    steps = data.get("steps_to_90")
    if steps is not None and (not isinstance(steps, list) or len(steps) > n or not all(s is None or _number(s) for s in steps)):
        return "steps_to_90 is not a list of step counts (one per task)"
    return None


def check_results(data: Any, path: Path) -> dict[str, Any]:
    """``data`` (read from ``path``) if it has the shape of a finished run's ``results.json`` (a square
    accuracy matrix of accuracies, its summary figures, ...); else :class:`ResultsFileError`, one line
    naming the file: tables and reports never meet a ragged matrix or a missing figure."""
    problem = _results_problem(data)
    if problem is not None:
        raise ResultsFileError(f"{path} is not a finished metagate run's results: {problem}; move that run folder away or rerun it")
    return data


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt or belongs to another experiment."""


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_problem(path: Path, e: OSError) -> RunFolderError:
    """An ``OSError`` met writing ``path`` as one line that says what to do."""
    if e.errno == errno.ENOSPC:
        # a finished run (its report, a figure) has nothing to resume: it is kept as it is
        finished = any((p / "results.json").is_file() for p in (path.parent, path.parent.parent))
        what = "the disk is full: free some space" + (" (the finished run is kept)" if finished else ", then resume the run with --resume")
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "it is not writable: choose a folder you can write to with --out"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        what = "a file stands where a folder is needed: choose another --out"
    else:
        what = e.strerror or str(e)
    return RunFolderError(f"cannot write {path}: {what}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path`` (readers never see a
    half-written file). The file gets the usual permissions (0666 less the umask). A failed write
    (full disk, read-only folder) leaves the old file as it was and raises :class:`RunFolderError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_problem(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_problem(path, e) from None
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
    ERROR = "error.txt"

    LOCK = ".lock"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._lock_id: tuple[int, int] | None = None

    @classmethod
    def check_new(cls, path: Path) -> None:
        """Refuse a path that cannot become a new run folder (a file, a folder with files in it)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a folder; nothing was written. Choose another --out.")
        if path.exists() and any(p.name != cls.LOCK or not cls._stale_lock(p) for p in path.iterdir()):
            raise RunFolderError(
                f"{path} already exists and is not empty; nothing was written. "
                "Pass --resume to continue the run in it, or choose another --out."
            )
        parent = next((p for p in (path, *path.parents) if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise RunFolderError(f"cannot make {path}: {parent} is a file, not a folder; choose another --out")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise RunFolderError(f"cannot write {path}: {parent} is not writable; choose a folder you can write to with --out")

    @staticmethod
    def _stale_lock(path: Path) -> bool:
        """An empty ``.lock`` no process holds: left by a start that failed before writing its PID (a full
        disk), so the folder is still new."""
        try:
            if path.stat().st_size:
                return False
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # closing releases the probe's lock

    @classmethod
    def create(cls, path: Path) -> "RunDir":
        """A new, empty run folder, locked by this process. A start that fails (a full disk while writing
        the lock) leaves nothing behind: not the folder it made, not an empty lock."""
        cls.check_new(path)
        made = [p for p in (Path(path), *Path(path).parents) if not p.exists()]
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_problem(Path(path), e) from None
        run = cls(path)
        try:
            run.lock()
        except RunFolderError:
            for folder in made:  # innermost first; only the folders this call made, and only when empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
        return run

    def lock(self) -> "RunDir":
        """Take the folder's exclusive lock for the life of this process (or until :meth:`unlock`);
        a folder another process holds is refused at once, naming its PID."""
        if self._lock_fd is not None:
            return self
        lock_path = self.path / self.LOCK
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            raise write_problem(lock_path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path} is in use by another metagate process (PID {holder}); wait for it to finish, "
                "or stop it, before running or resuming this folder"
            ) from None
        try:
            os.ftruncate(fd, 0)
            if os.pwrite(fd, f"{os.getpid()}\n".encode(), 0) == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:  # a full disk: no lock is held, and none is left empty to block the folder
            if os.fstat(fd).st_size == 0:
                lock_path.unlink(missing_ok=True)  # still holding it, so no other process has it
            os.close(fd)
            raise write_problem(lock_path, e) from None
        self._lock_fd = fd
        self._lock_id = os.fstat(fd)[1:3]  # (inode, device): the folder this run locked
        return self

    def check_still_ours(self) -> None:
        """Refuse to write into a folder that was deleted or replaced while this run held it (its lock file
        is gone or another): the run's records would land in a folder without its config and lock."""
        if self._lock_fd is None:
            return
        try:
            same = os.stat(self.path / self.LOCK)[1:3] == self._lock_id
        except OSError:
            same = False
        if not same:
            raise RunFolderError(
                f"{self.path} was deleted or replaced while this run wrote it (its {self.LOCK} is gone): nothing more is "
                "written there; start the run again in a new folder"
            )

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @classmethod
    def open_for_resume(cls, path: Path) -> "RunDir":
        run = cls(Path(path))
        if not run.path.is_dir():
            raise RunFolderError(f"cannot resume: {run.path} does not exist")
        if not (run.path / cls.CONFIG).is_file():
            raise RunFolderError(f"cannot resume: {run.path} holds no {cls.CONFIG}, so it is not a metagate run")
        return run.lock()

    # ----------------------------------------------------------------- files

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any], provenance: dict[str, Any] | None = None) -> None:
        """The resolved config, with the data's provenance (location, fingerprint) as a last section
        that :meth:`read_config` leaves out (it is a record, not a setting)."""
        text = dump_yaml(config)
        if provenance:
            text += "# where the data came from (a record; ignored when this file is read as a config)\n"
            text += dump_yaml({PROVENANCE_KEY: provenance})
        atomic_write_text(self.file(self.CONFIG), text)

    def read_config(self) -> dict[str, Any]:
        try:
            data = yaml.load(self.file(self.CONFIG).read_text(), Loader=NoAliasLoader)  # noqa: S506  (a SafeLoader)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise RunFolderError(f"{self.file(self.CONFIG)} cannot be read ({type(e).__name__}); it is not a usable run folder") from None
        if not isinstance(data, dict):
            raise RunFolderError(f"{self.file(self.CONFIG)} is not a config mapping")
        data.pop(PROVENANCE_KEY, None)
        return data

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.file(self.ENV), env)

    def write_results(self, results: dict[str, Any]) -> None:
        self.check_still_ours()
        atomic_write_json(self.file(self.RESULTS), results)

    def write_image(self, name: str, image: torch.Tensor) -> None:
        """``image`` (``[C, H, W]`` or ``[H, W]``, values in ``[0, 1]``) as the PNG ``<run>/<name>``, atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        array = image.detach().float().cpu().clamp(0, 1)
        if array.ndim == 3:
            array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
        buffer = io.BytesIO()
        plt.imsave(buffer, array.numpy(), cmap="gray", vmin=0, vmax=1, format="png")
        atomic_write_bytes(self.path / name, buffer.getvalue())

    def read_results(self) -> dict[str, Any]:
        return check_results(json.loads(self.file(self.RESULTS).read_text()), self.file(self.RESULTS))

    def has_results(self) -> bool:
        return self.file(self.RESULTS).is_file()

    def metrics_size(self) -> int:
        p = self.file(self.METRICS)
        return p.stat().st_size if p.exists() else 0

    def truncate_metrics(self, size: int) -> None:
        """Drop records written after a checkpoint (a resumed run writes them again). A file shorter than
        at the checkpoint (cut short, deleted) or not ending a record there is refused: its lost records
        cannot be written again, and a resumed run would go on after a broken line."""
        p = self.file(self.METRICS)
        have = p.stat().st_size if p.exists() else 0
        ends_a_record = size == 0 or (have >= size and _byte_at(p, size - 1) == b"\n")
        if have < size or not ends_a_record:
            found = f"holds {have:,} bytes" if p.exists() else "is missing"
            raise RunFolderError(
                f"cannot resume: {p} {found} where the last checkpoint recorded {size:,} bytes of whole records "
                "(it was cut short, deleted or changed); its lost records cannot be written again: start the run afresh in a new folder"
            )
        if have > size:
            with open(p, "r+b") as f:
                f.truncate(size)

    def log(self, record: dict[str, Any]) -> None:
        self.check_still_ours()
        try:
            with open(self.file(self.METRICS), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_problem(self.file(self.METRICS), e) from None

    # ----------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.file(self.CHECKPOINT)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """``state`` behind a header with the payload's SHA-256, in one atomic write."""
        self.check_still_ours()
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
        payload = buf.getvalue()
        digest = hashlib.sha256(payload).hexdigest().encode()
        atomic_write_bytes(self.checkpoint_path, CHECKPOINT_MAGIC + digest + b"\n" + payload)

    def load_checkpoint(self, map_location: torch.device | str = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path, map_location)


def _byte_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, corrupt or foreign file raises :class:`CheckpointError`."""
    if not path.is_file():
        metrics = path.parent.parent / RunDir.METRICS
        if metrics.is_file() and b'"type": "eval"' in metrics.read_bytes():  # a task ended (and was evaluated): it had a checkpoint
            raise CheckpointError(
                f"no checkpoint at {path}, though {metrics.name} records finished tasks: the checkpoint was deleted or never written "
                f"(trainer.checkpoint=false), so the run cannot go on; start it afresh in a new folder (or delete {path.parent.parent})"
            )
        raise CheckpointError(
            f"no checkpoint at {path}: the run stopped before its first task ended; delete {path.parent.parent} "
            "and start it again without --resume"
        )
    fresh = f"start the run afresh in a new folder (or delete {path.parent.parent} and run it again)"
    raw = path.read_bytes()
    head = len(CHECKPOINT_MAGIC) + 65
    if not raw.startswith(CHECKPOINT_MAGIC) or len(raw) < head or raw[head - 1 : head] != b"\n":
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a metagate checkpoint of format {CHECKPOINT_FORMAT} (no checksum header); {fresh}"
        )
    payload = raw[head:]
    if hashlib.sha256(payload).hexdigest().encode() != raw[len(CHECKPOINT_MAGIC) : head - 1]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the SHA-256 written with it "
            f"(the file was damaged or changed after it was written); {fresh}"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged or foreign file)
        # torch's own text may advise weights_only=False, which would run arbitrary code: not passed on.
        raise CheckpointError(
            f"checkpoint {path} holds data a metagate checkpoint may not hold ({type(e).__name__}); "
            f"it was not loaded. {fresh}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a metagate checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found {state.get('format') if isinstance(state, dict) else type(state).__name__})"
        )
    return state
