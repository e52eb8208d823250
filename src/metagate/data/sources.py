"""Real image data sets, read from the files their publishers ship.

Formats:

* **IDX** (LeCun et al.'s MNIST format; ``*-ubyte.gz`` or uncompressed ``*-ubyte``): MNIST,
  Fashion-MNIST (Xiao et al. 2017), KMNIST (Clanuwat et al. 2018), EMNIST (Cohen et al. 2017, files
  ``emnist-<split>-train-images-idx3-ubyte[.gz]``). The header (magic, element type, dimensions) is
  parsed and the byte count checked, so a truncated file is refused.
* **CIFAR python pickles** (Krizhevsky 2009): ``cifar-10-batches-py/data_batch_1..5, test_batch``
  and ``cifar-100-python/train, test`` (fine labels), as folders or inside the ``*.tar.gz`` archives.
* **scikit-learn's handwritten digits** (8x8, 1797 images, shipped inside scikit-learn).
* **MNIST-1D** (Greydanus 2020) from the ``mnist1d`` package's procedural generator (offline).

Every loader returns an :class:`ImageData`: images ``[N, C, H, W]`` float32 in [0, 1] (MNIST-1D:
the generator's standardised signals, ``[N, 1, 1, 40]``) and int64 labels.

Where files are looked for:

* With ``benchmark.root`` set, only there: ``<root>/<folder>``, ``<root>`` itself and torchvision's
  layout under it (``<root>/FashionMNIST/raw``, ``<root>/cifar-10-batches-py``, ...). A root that does
  not exist or holds no readable copy is refused with an error naming it: the data a user pointed at
  is used or the run does not start, never silently replaced by another copy.
* Without it, in order (first complete, readable set wins): 1. ``$METAGATE_DATA``, 2. the user cache
  folder ``${XDG_CACHE_HOME:-~/.cache}/metagate`` (each as ``<root>/<folder>``, ``<root>`` and
  torchvision's layout), 3. the system data folder ``/usr/share/datasets/<folder>`` (Debian's
  ``dataset-fashion-mnist`` installs Fashion-MNIST there). :attr:`ImageData.found_via` says which.

Every loaded set records the files it was read from; :func:`metagate.data.provenance.fingerprint_files`
turns them into the size and hash that run folders keep.

MNIST, Fashion-MNIST and KMNIST ship files of the same names: keep each in its own sub-folder
(``<root>/mnist``, ``<root>/fashion-mnist``, ``<root>/kmnist``), since files lying in ``<root>``
itself serve whichever of them is asked for.

With ``download=True`` a missing set is fetched by torchvision (an optional dependency) into the
given root (else ``$METAGATE_DATA``, else the user cache). A set that is missing or unreadable raises :class:`DataNotFoundError`, which lists
every place looked and how to get the data.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

DatasetName = Literal["fashion_mnist", "mnist", "kmnist", "emnist", "digits", "cifar10", "cifar100", "mnist1d"]
EmnistSplit = Literal["balanced", "byclass", "bymerge", "digits", "letters", "mnist"]

ENV_VAR = "METAGATE_DATA"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")


class DataNotFoundError(ValueError):
    """A data set that is missing or unreadable; the message lists every place looked and how to get it."""

    def __init__(self, message: str, places: list[tuple[Path | None, str, str]] | None = None) -> None:
        super().__init__(message)
        self.places = places or []  # (folder, why it was searched, what was found there)


class DataFormatError(ValueError):
    """A file that is not a complete file of the expected format (truncated, wrong header or shape)."""


# --------------------------------------------------------------------------- the loaded data


@dataclass
class ImageData:
    """A data set's train and test split: images ``[N, C, H, W]`` float32, labels int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    class_names: tuple[str, ...]
    location: str  # where it was read from (folder, archive or generator)
    files: tuple[Path, ...] = ()  # the files read (empty for generated sets)
    found_via: str = ""  # why that place was searched (benchmark.root, $METAGATE_DATA, ...)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.shape[0] != y.shape[0]:
                raise DataFormatError(
                    f"{self.name} ({self.location}): {split} images of shape {tuple(x.shape)} do not match "
                    f"{y.shape[0]} labels as [N, C, H, W]"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataFormatError(
                    f"{self.name} ({self.location}): {split} labels span {int(y.min())}..{int(y.max())}, "
                    f"expected 0..{self.num_classes - 1}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------- IDX

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it ends in ``.gz``; a truncated gzip stream is refused."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise DataFormatError(f"{path} is truncated (the gzip stream ends early)") from None
    except (OSError, gzip.BadGzipFile) as e:
        raise DataFormatError(f"{path} is not a readable gzip file: {e}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``.gz`` or not) as a numpy array of the dimensions its header gives.

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``d``, then ``d``
    big-endian uint32 sizes; the data (row-major) must be exactly ``prod(sizes)`` elements long.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataFormatError(f"{path} is not an IDX file (magic number {data[:4].hex() or 'missing'})")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path} is truncated (its header needs {header} bytes, the file has {len(data)})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataFormatError(
            f"{path} is {what}: shape {shape} of {dtype} needs {expected} data bytes, the file has {found}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_images(path: Path) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != 3:
        raise DataFormatError(f"{path}: expected images [N, H, W], the IDX header gives shape {arr.shape}")
    return arr


def _idx_labels(path: Path) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != 1:
        raise DataFormatError(f"{path}: expected labels [N], the IDX header gives shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------- CIFAR pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file cannot run code."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataFormatError(f"{where} is truncated or not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where} holds a {type(obj).__name__}, not a CIFAR batch dictionary")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(raw: bytes, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(raw, where)
    if "data" not in batch or label_key not in batch:
        raise DataFormatError(f"{where} lacks the keys 'data' and {label_key!r} of a CIFAR batch (has {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{where}: expected uint8 data [N, 3072] and N labels, found {data.dtype} {data.shape} and {labels.shape[0]} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _label_names(raw: bytes | None, where: str, key: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return fallback
    meta = _unpickle(raw, where)
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != len(fallback):
        return fallback
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


# --------------------------------------------------------------------------- class names

_DIGITS = tuple(str(i) for i in range(10))
_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_KMNIST = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
_UPPER = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
_LOWER = tuple(chr(c) for c in range(ord("a"), ord("z") + 1))
_EMNIST_MERGED = _DIGITS + _UPPER + tuple("abdefghnqrt")
EMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "balanced": _EMNIST_MERGED,
    "bymerge": _EMNIST_MERGED,
    "byclass": _DIGITS + _UPPER + _LOWER,
    "digits": _DIGITS,
    "mnist": _DIGITS,
    "letters": _LOWER,  # labels 1..26 in the files (upper and lower case merged), shifted to 0..25
}
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# (train images, test images, values per image) of each set, for memory estimates before loading
_SIZES: dict[str, tuple[int, int, int]] = {
    "fashion_mnist": (60000, 10000, 784), "mnist": (60000, 10000, 784), "kmnist": (60000, 10000, 784),
    "cifar10": (50000, 10000, 3072), "cifar100": (50000, 10000, 3072), "digits": (1433, 364, 64), "mnist1d": (4000, 1000, 40),
}
_EMNIST_SIZES = {
    "balanced": (112800, 18800), "byclass": (697932, 116323), "bymerge": (697932, 116323),
    "digits": (240000, 40000), "letters": (124800, 20800), "mnist": (60000, 10000),
}


def data_set_size(dataset: str, emnist_split: str = "balanced") -> tuple[int, int, int]:
    """(train images, test images, values per image) of a data set, known without reading it."""
    if dataset == "emnist":
        return (*_EMNIST_SIZES[emnist_split], 784)
    return _SIZES[dataset]


def num_classes(dataset: DatasetName, emnist_split: EmnistSplit = "balanced") -> int:
    """Number of classes of a data set, known without reading it."""
    if dataset == "emnist":
        return len(EMNIST_CLASSES[emnist_split])
    return 100 if dataset == "cifar100" else 10


# --------------------------------------------------------------------------- search places


@dataclass(frozen=True)
class _Spec:
    """How one data set is found on disk."""

    title: str
    folders: tuple[str, ...]  # sub-folders of a root (besides the root itself)
    torchvision_folders: tuple[str, ...]  # torchvision's layout under a root
    torchvision_class: str
    system_folder: str
    debian_package: str | None
    files: tuple[str, ...]  # what a complete set holds, for the error message


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

_SPECS: dict[str, _Spec] = {
    "fashion_mnist": _Spec(
        "Fashion-MNIST", ("fashion-mnist", "fashion_mnist"), ("FashionMNIST/raw",), "FashionMNIST",
        "fashion-mnist", "dataset-fashion-mnist", tuple(f + "[.gz]" for f in _IDX_FILES),
    ),
    "mnist": _Spec("MNIST", ("mnist",), ("MNIST/raw",), "MNIST", "mnist", None, tuple(f + "[.gz]" for f in _IDX_FILES)),
    "kmnist": _Spec("KMNIST", ("kmnist",), ("KMNIST/raw",), "KMNIST", "kmnist", None, tuple(f + "[.gz]" for f in _IDX_FILES)),
    "emnist": _Spec(
        "EMNIST", ("emnist", "emnist/gzip", "gzip"), ("EMNIST/raw",), "EMNIST", "emnist", None,
        tuple(f"emnist-<split>-{s}[.gz]" for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "test-images-idx3-ubyte", "test-labels-idx1-ubyte")),
    ),
    "cifar10": _Spec(
        "CIFAR-10", ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"), ("cifar-10-batches-py",), "CIFAR10",
        "cifar10", None, ("cifar-10-batches-py/data_batch_1..5, test_batch", "or cifar-10-python.tar.gz"),
    ),
    "cifar100": _Spec(
        "CIFAR-100", ("cifar-100-python", "cifar100/cifar-100-python", "cifar100"), ("cifar-100-python",), "CIFAR100",
        "cifar100", None, ("cifar-100-python/train, test", "or cifar-100-python.tar.gz"),
    ),
}


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/metagate``, by default ``~/.cache/metagate``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "metagate"


def data_roots(root: str | Path | None = None) -> list[tuple[Path | None, str]]:
    """The roots searched, in order, with why: the config's alone when it is set, else
    ``$METAGATE_DATA``'s and the user cache."""
    if root:
        return [(Path(root).expanduser(), "benchmark.root")]
    env = os.environ.get(ENV_VAR)
    return [(Path(env).expanduser() if env else None, f"${ENV_VAR}"), (user_cache_dir(), "user cache")]


def search_places(dataset: str, root: str | Path | None = None) -> list[tuple[Path | None, str]]:
    """Every folder searched for ``dataset``, in order, with why it is searched (``None``: root unset)."""
    spec = _SPECS[dataset]
    roots = data_roots(root)
    places: list[tuple[Path | None, str]] = []
    for base, why in roots:
        if base is None:
            places.append((None, why))
            continue
        places += [(base / sub, why) for sub in spec.folders] + [(base, why)]
    for base, why in roots:
        if base is not None:
            places += [(base / sub, f"{why}, torchvision layout") for sub in spec.torchvision_folders]
    if not root:
        package = f", Debian package {spec.debian_package}" if spec.debian_package else ""
        places.append((SYSTEM_DATA_DIR / spec.system_folder, f"system data folder{package}"))
    seen: set[Path] = set()
    unique = []
    for path, why in places:
        if path is None or path.resolve() not in seen:
            unique.append((path, why))
            if path is not None:
                seen.add(path.resolve())
    return unique


# --------------------------------------------------------------------------- readers per folder


class _Absent(Exception):
    """The folder does not hold the set (as opposed to holding a broken copy of it)."""


def _find_file(folder: Path, stem: str) -> Path:
    """``stem``, ``stem.gz`` or the variant with a dot (``train-images.idx3-ubyte``) in ``folder``."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise _Absent(f"no {stem}[.gz]")


def _read_idx_folder(folder: Path, prefix: str, test_name: str) -> tuple[tuple[np.ndarray, ...], tuple[Path, ...]]:
    names = [f"{prefix}{split}-{kind}" for split in ("train", test_name) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    missing = []
    paths = []
    for n in names:
        try:
            paths.append(_find_file(folder, n))
        except _Absent:
            missing.append(n + "[.gz]")
    if missing:
        raise _Absent(f"lacks {', '.join(missing)}")
    x_tr, y_tr, x_te, y_te = _idx_images(paths[0]), _idx_labels(paths[1]), _idx_images(paths[2]), _idx_labels(paths[3])
    for x, y, px, py in ((x_tr, y_tr, paths[0], paths[1]), (x_te, y_te, paths[2], paths[3])):
        if x.shape[0] != y.shape[0]:
            raise DataFormatError(f"{px.name} has {x.shape[0]} images but {py.name} has {y.shape[0]} labels")
    return (x_tr, y_tr, x_te, y_te), tuple(paths)


def _cifar_members(folder: Path, dataset: str, read_from: list[Path]) -> Callable[[str], bytes | None]:
    """A reader of the set's files by name, from the extracted folder or from the ``.tar.gz`` archive."""
    inner = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    archive = folder / ("cifar-10-python.tar.gz" if dataset == "cifar10" else "cifar-100-python.tar.gz")
    probe = "data_batch_1" if dataset == "cifar10" else "train"
    if (folder / probe).is_file():
        return lambda name: (folder / name).read_bytes() if (folder / name).is_file() else None
    if archive.is_file():
        read_from.append(archive)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {
                    Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers()
                    if m.isfile() and Path(m.name).parent.name == inner
                }
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataFormatError(f"{archive} is truncated or not a tar.gz archive ({e})") from None
        return lambda name: members.get(name)
    raise _Absent(f"no {probe} and no {archive.name}")


def _read_cifar(folder: Path, dataset: str) -> tuple[tuple[np.ndarray, ...], tuple[str, ...], tuple[Path, ...]]:
    archive: list[Path] = []
    read = _cifar_members(folder, dataset, archive)
    if dataset == "cifar10":
        names, label_key, meta, meta_key, fallback = [f"data_batch_{i}" for i in range(1, 6)], "labels", "batches.meta", "label_names", _CIFAR10
        test_name = "test_batch"
    else:
        names, label_key, meta, meta_key, fallback = ["train"], "fine_labels", "meta", "fine_label_names", tuple(f"class{i}" for i in range(100))
        test_name = "test"
    missing = [n for n in (*names, test_name) if read(n) is None]
    if missing:
        raise DataFormatError(f"{folder}: the {_SPECS[dataset].title} files are incomplete, missing {', '.join(missing)}")
    train = [_cifar_batch(read(n), str(folder / n), label_key) for n in names]  # type: ignore[arg-type]
    x_te, y_te = _cifar_batch(read(test_name), str(folder / test_name), label_key)  # type: ignore[arg-type]
    classes = _label_names(read(meta), str(folder / meta), meta_key, fallback)
    arrays = (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_te, y_te)
    files = tuple(archive) or tuple(folder / n for n in (*names, test_name, meta) if (folder / n).is_file())
    return arrays, classes, files


def _to_tensors(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> tuple[Tensor, ...]:
    """uint8 images -> float32 in [0, 1] with a channel axis; labels -> int64."""

    def images(x: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.ndim == 3:
            t = t.unsqueeze(1)
        return t.float().div_(255.0)

    return images(x_tr), torch.from_numpy(y_tr.astype(np.int64)), images(x_te), torch.from_numpy(y_te.astype(np.int64))


# --------------------------------------------------------------------------- loaders


def _load_files(dataset: str, root: str | Path | None, emnist_split: str) -> ImageData:
    """Search every place in order; the first that holds a complete readable set wins."""
    report: list[tuple[Path | None, str, str]] = []
    for folder, why in search_places(dataset, root):
        if folder is None:
            report.append((None, why, "not set"))
            continue
        if not folder.is_dir():
            report.append((folder, why, "does not exist"))
            continue
        try:
            if dataset in ("cifar10", "cifar100"):
                arrays, classes, files = _read_cifar(folder, dataset)
            elif dataset == "emnist":
                arrays, files = _read_idx_folder(folder, f"emnist-{emnist_split}-", "test")
                # EMNIST stores images transposed relative to MNIST: transpose to show them upright.
                arrays = (arrays[0].transpose(0, 2, 1), arrays[1], arrays[2].transpose(0, 2, 1), arrays[3])
                if emnist_split == "letters":
                    arrays = (arrays[0], arrays[1] - 1, arrays[2], arrays[3] - 1)
                classes = EMNIST_CLASSES[emnist_split]
            else:
                arrays, files = _read_idx_folder(folder, "", "t10k")
                classes = {"fashion_mnist": _FASHION, "mnist": _DIGITS, "kmnist": _KMNIST}[dataset]
        except _Absent as e:
            report.append((folder, why, str(e)))
            continue
        except DataFormatError as e:
            report.append((folder, why, f"UNREADABLE: {e}"))
            continue
        x_tr, y_tr, x_te, y_te = _to_tensors(*arrays)
        try:
            name = dataset if dataset != "emnist" else f"emnist_{emnist_split}"
            return ImageData(name, x_tr, y_tr, x_te, y_te, classes, str(folder), files, why)
        except DataFormatError as e:
            report.append((folder, why, f"UNREADABLE: {e}"))
    raise DataNotFoundError(_not_found_message(dataset, report, emnist_split, download_root(root), root), report)


def _not_found_message(
    dataset: str, report: list[tuple[Path | None, str, str]], emnist_split: str, target: Path, root: str | Path | None = None
) -> str:
    spec = _SPECS[dataset]
    broken = any(found.startswith("UNREADABLE") for _, _, found in report)
    title = spec.title + (f" ({emnist_split} split)" if dataset == "emnist" else "")
    if root:
        missing = "" if Path(root).expanduser().exists() else " (that folder does not exist)"
        lines = [
            f"{title} {'could not be read from' if broken else 'was not found in'} benchmark.root={root}{missing}; "
            "a root you set is used or refused, never replaced by another copy (unset benchmark.root to search "
            f"${ENV_VAR}, the user cache and the system data folder). Looked in:"
        ]
    else:
        lines = [f"{title} {'could not be read' if broken else 'was not found'}. Looked in, in order:"]
    for folder, why, found in report:
        lines.append(f"  - {why}: not set" if folder is None else f"  - {folder} [{why}]: {found}")
    files = ", ".join(f.replace("<split>", emnist_split) for f in spec.files)
    lines.append("To get it:")
    if spec.debian_package:
        lines.append(f"  - on Debian/Ubuntu: apt-get install {spec.debian_package} (installs into {SYSTEM_DATA_DIR / spec.system_folder});")
    lines.append(
        f"  - {'or ' if spec.debian_package else ''}put its files ({files}) in a folder and set {ENV_VAR}=<folder> or benchmark.root=<folder> "
        f"(a sub-folder '{spec.folders[0]}' or torchvision's layout '{spec.torchvision_folders[0]}' works too);"
    )
    lines.append(
        "  - or set benchmark.download=true to fetch it with torchvision (optional: pip install torchvision) "
        f"into {target}."
    )
    if broken:
        lines.append("A file marked UNREADABLE is truncated or damaged: delete it and fetch it again.")
    return "\n".join(lines)


def download_root(root: str | Path | None) -> Path:
    """Where ``download=True`` puts a data set: the config's root, else ``$METAGATE_DATA``, else the user cache."""
    for base, _ in data_roots(root):
        if base is not None:
            return base
    return user_cache_dir()  # pragma: no cover - the cache is always set


def download(dataset: str, root: str | Path | None = None, emnist_split: str = "balanced") -> Path:
    """Fetch ``dataset`` with torchvision's downloader into torchvision's layout under :func:`download_root`."""
    spec = _SPECS[dataset]
    target = download_root(root)
    try:
        import torchvision.datasets as tvd  # optional: imported only when a download is asked for
    except ImportError:
        raise DataNotFoundError(
            f"benchmark.download=true needs torchvision, which is not installed: pip install torchvision "
            f"(or pip install 'metagate[vision]'); or get {spec.title} by hand (see the data section of the README)"
        ) from None
    cls = getattr(tvd, spec.torchvision_class)
    kwargs: dict[str, object] = {"split": emnist_split} if dataset == "emnist" else {}
    target.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(str(target), train=train, download=True, **kwargs)
    except Exception as e:  # network, checksum, disk: all end as "could not get the data"
        raise DataNotFoundError(f"downloading {spec.title} into {target} with torchvision failed: {type(e).__name__}: {e}") from e
    return target


def load_digits_data() -> ImageData:
    """scikit-learn's handwritten digits (UCI optdigits test set: 1797 8x8 images, values 0..16).

    Fixed split, the same for every seed, stratified by class: within each class, the 1st, 6th, 11th,
    ... image in the file's order is a test image (every fifth: 364 test, 1433 train, 35 to 37 test
    images per class). Pixels are divided by 16 to lie in [0, 1].
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataNotFoundError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    rank = torch.zeros_like(y)  # position of each image among the images of its class
    for c in range(10):
        members = (y == c).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    test = rank % 5 == 0
    return ImageData("digits", x[~test], y[~test], x[test], y[test], _DIGITS, "sklearn.datasets.load_digits", found_via="generated")


def load_mnist1d_data() -> ImageData:
    """MNIST-1D (Greydanus 2020) from the ``mnist1d`` package's generator with its default arguments
    (5000 signals of length 40, generator seed 42, the first 4000 train, the last 1000 test), as the
    published data set. Works offline (``make_dataset``; ``get_dataset`` would try a download).
    Signals are standardised by the generator (mean 0, std 1), not scaled to [0, 1]. Shape ``[N, 1, 1, 40]``.
    """
    try:
        import mnist1d.data
    except ImportError:
        raise DataNotFoundError("the mnist1d data set needs the mnist1d package: pip install mnist1d") from None
    # the generator reseeds Python's and numpy's global generators: keep the caller's streams intact
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def signals(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(len(x), 1, 1, -1)

    def labels(y: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(y, dtype=np.int64))

    x_tr, y_tr, x_te, y_te = signals(ds["x"]), labels(ds["y"]), signals(ds["x_test"]), labels(ds["y_test"])
    return ImageData("mnist1d", x_tr, y_tr, x_te, y_te, _DIGITS, "mnist1d.data.make_dataset", found_via="generated")


def load_dataset(
    dataset: DatasetName,
    root: str | Path | None = None,
    download_missing: bool = False,
    emnist_split: EmnistSplit = "balanced",
) -> ImageData:
    """Load ``dataset``: from the places in the module docstring, or generated (digits, mnist1d).

    With ``download_missing`` a set found nowhere is fetched by torchvision and read again.
    """
    if dataset == "digits":
        return load_digits_data()
    if dataset == "mnist1d":
        return load_mnist1d_data()
    if dataset not in _SPECS:
        raise ValueError(f"unknown data set {dataset!r}; choose one of: {', '.join(sorted([*_SPECS, 'digits', 'mnist1d']))}")
    try:
        return _load_files(dataset, root, emnist_split)
    except DataNotFoundError as first:
        if not download_missing:
            raise
        download(dataset, root, emnist_split)
        try:
            return _load_files(dataset, root, emnist_split)
        except DataNotFoundError as e:
            raise DataNotFoundError(f"after downloading:\n{e}", e.places) from first
