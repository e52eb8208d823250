"""Data sources: real file formats (IDX, CIFAR pickles) written small in tmp_path, the search order,
refusal of missing and truncated files, the generated sets (digits, MNIST-1D), torchvision downloads."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from metagate.data import sources
from metagate.data.sources import DataNotFoundError, load_dataset, read_idx

# --------------------------------------------------------------------------- writers of the real formats


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file: 0, 0, type code, number of dims, big-endian uint32 dims, then the data."""
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, compress: bool = True, cut: int = 0) -> Path:
    data = idx_bytes(arr)
    data = data[: len(data) - cut] if cut else data
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist_like(folder: Path, n_train: int = 20, n_test: int = 10, compress: bool = True, prefix: str = "", test_name: str = "t10k", num_classes: int = 10, label_offset: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % num_classes + label_offset).astype(np.uint8),
        f"{test_name}-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        f"{test_name}-labels-idx1-ubyte": (np.arange(n_test) % num_classes + label_offset).astype(np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / f"{prefix}{name}", arr, compress)
    return arrays


def cifar_batch(n: int, label_key: str, num_classes: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key.encode(): [int(i % num_classes) for i in range(n)],
    }


def write_cifar10(folder: Path, n: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(cifar_batch(n, "labels", 10, i), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(n, "labels", 10, 9), protocol=2))
    names = [f"name{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $METAGATE_DATA, a cache and a system data folder inside tmp_path: only what a test writes exists."""
    monkeypatch.delenv("METAGATE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    return tmp_path


# --------------------------------------------------------------------------- IDX


def test_read_idx_parses_header_type_and_dims(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    path = tmp_path / "x-idx3-int"
    path.write_bytes(idx_bytes(arr, type_code=0x0C))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.int32
    assert (out == np.arange(24).reshape(2, 3, 4)).all()


@pytest.mark.parametrize("compress", [True, False])
def test_idx_set_loads_as_float_images_and_int64_labels(isolated: Path, compress: bool) -> None:
    arrays = write_mnist_like(isolated / "data" / "fashion-mnist", compress=compress)
    data = load_dataset("fashion_mnist", root=isolated / "data")
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert torch.allclose(data.x_train[:, 0] * 255, torch.from_numpy(arrays["train-images-idx3-ubyte"]).float())
    assert data.y_test.tolist() == list(range(10))
    assert data.class_names[0] == "T-shirt/top" and data.num_classes == 10
    assert data.location == str(isolated / "data" / "fashion-mnist")


def test_truncated_idx_is_refused_with_every_place_listed(isolated: Path) -> None:
    folder = isolated / "data"
    write_mnist_like(folder)
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((20, 28, 28), np.uint8), cut=100)  # 100 bytes short
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion_mnist", root=folder)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert f"could not be read from benchmark.root={folder}" in msg and "truncated" in msg and "train-images-idx3-ubyte.gz" in msg
    for place in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "METAGATE_DATA=" in msg and "benchmark.download=true" in msg
    # Without a root, every place is searched and listed.
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion_mnist")
    msg = str(err.value)
    for place in (isolated / "xdg-cache" / "metagate", isolated / "xdg-cache" / "metagate" / "FashionMNIST" / "raw", isolated / "system" / "fashion-mnist"):
        assert str(place) in msg
    assert "$METAGATE_DATA: not set" in msg and len(err.value.places) >= 5


def test_cut_gzip_stream_is_refused(isolated: Path) -> None:
    folder = isolated / "data"
    write_mnist_like(folder)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])  # the gzip trailer and some data gone
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte.gz is truncated"):
        load_dataset("fashion_mnist", root=folder)


def test_missing_set_lists_places_and_how_to_get_it(isolated: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("mnist", root=isolated / "nowhere")
    msg = str(err.value)
    assert f"MNIST was not found in benchmark.root={isolated / 'nowhere'} (that folder does not exist)" in msg
    assert "train-images-idx3-ubyte[.gz]" in msg and "benchmark.download=true" in msg


def test_mismatched_image_and_label_counts_are_refused(isolated: Path) -> None:
    write_mnist_like(isolated / "d")
    write_idx(isolated / "d" / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(DataNotFoundError, match="20 images but train-labels-idx1-ubyte.gz has 19 labels"):
        load_dataset("fashion_mnist", root=isolated / "d")


def test_without_a_root_the_search_goes_env_then_cache_then_torchvision_then_system(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    places = {
        "env": isolated / "env",
        "cache": isolated / "xdg-cache" / "metagate" / "kmnist",
        "torchvision": isolated / "env" / "KMNIST" / "raw",
        "system": isolated / "system" / "kmnist",
    }
    for n, folder in enumerate(places.values()):
        write_mnist_like(folder, n_train=10 + n)
    monkeypatch.setenv("METAGATE_DATA", str(places["env"]))
    found = []
    for folder in places.values():
        data = load_dataset("kmnist")
        found.append((data.location, data.found_via))
        for f in folder.iterdir():
            if f.is_file():
                f.unlink()
    assert [loc for loc, _ in found] == [str(p) for p in places.values()]
    assert [via.split(",")[0] for _, via in found] == ["$METAGATE_DATA", "user cache", "$METAGATE_DATA", "system data folder"]


def test_a_root_that_is_set_is_used_or_refused_never_replaced(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_like(isolated / "system" / "fashion-mnist")  # a good copy the search would find
    monkeypatch.setenv("METAGATE_DATA", str(isolated / "system" / "fashion-mnist"))
    for root in (isolated / "missing", isolated / "empty"):
        (isolated / "empty").mkdir(exist_ok=True)
        with pytest.raises(DataNotFoundError, match=f"was not found in benchmark.root={root}"):
            load_dataset("fashion_mnist", root=root)
    write_mnist_like(isolated / "root", n_train=12)
    data = load_dataset("fashion_mnist", root=isolated / "root")
    assert (data.location, data.found_via, data.x_train.shape[0]) == (str(isolated / "root"), "benchmark.root", 12)
    assert [p.name for p in data.files] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_a_broken_copy_in_a_set_root_is_refused_but_does_not_hide_a_good_one_in_the_search(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_like(isolated / "root")
    write_idx(isolated / "root" / "train-images-idx3-ubyte", np.zeros((20, 28, 28), np.uint8), cut=5)
    write_mnist_like(isolated / "system" / "fashion-mnist")
    with pytest.raises(DataNotFoundError, match="could not be read from benchmark.root"):
        load_dataset("fashion_mnist", root=isolated / "root")
    monkeypatch.setenv("METAGATE_DATA", str(isolated / "root"))
    data = load_dataset("fashion_mnist")
    assert data.location == str(isolated / "system" / "fashion-mnist") and data.found_via.startswith("system data folder")


def test_emnist_is_transposed_upright_and_letters_start_at_zero(isolated: Path) -> None:
    arrays = write_mnist_like(isolated / "d" / "emnist", prefix="emnist-letters-", test_name="test", num_classes=26, label_offset=1)
    data = load_dataset("emnist", root=isolated / "d", emnist_split="letters")
    assert data.name == "emnist_letters" and data.num_classes == 26
    assert data.y_train.min() == 0 and data.y_train.max() == 19  # 20 samples, labels 1..20 in the file
    stored = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255
    assert torch.allclose(data.x_train[:, 0], stored.transpose(1, 2))


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_batches_load_with_label_names(isolated: Path) -> None:
    write_cifar10(isolated / "d" / "cifar-10-batches-py")
    data = load_dataset("cifar10", root=isolated / "d")
    assert data.x_train.shape == (30, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert 0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1
    assert data.class_names == tuple(f"name{i}" for i in range(10))
    raw = pickle.loads((isolated / "d" / "cifar-10-batches-py" / "data_batch_1").read_bytes())[b"data"]
    assert torch.allclose(data.x_train[0] * 255, torch.from_numpy(raw[0].reshape(3, 32, 32)).float())


def test_cifar10_loads_from_the_published_archive(isolated: Path) -> None:
    write_cifar10(isolated / "build" / "cifar-10-batches-py")
    with tarfile.open(isolated / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(isolated / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = load_dataset("cifar10", root=isolated)
    assert data.x_train.shape == (30, 3, 32, 32) and data.location == str(isolated)


def test_cifar100_uses_fine_labels(isolated: Path) -> None:
    folder = isolated / "d" / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", 200), ("test", 100)):
        batch = cifar_batch(n, "fine_labels", 100, 1)
        batch[b"coarse_labels"] = [0] * n
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    data = load_dataset("cifar100", root=isolated / "d")
    assert data.num_classes == 100 and data.y_train.max() == 99 and data.x_test.shape == (100, 3, 32, 32)


def test_truncated_cifar_pickle_is_refused(isolated: Path) -> None:
    folder = isolated / "d" / "cifar-10-batches-py"
    write_cifar10(folder)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataNotFoundError, match="data_batch_3 is truncated"):
        load_dataset("cifar10", root=isolated / "d")


def test_a_pickle_that_would_run_code_is_refused(isolated: Path) -> None:
    folder = isolated / "d" / "cifar-10-batches-py"
    write_cifar10(folder)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataNotFoundError, match="refusing to load"):
        load_dataset("cifar10", root=isolated / "d")


# --------------------------------------------------------------------------- generated sets


def test_digits_fixed_stratified_split() -> None:
    pytest.importorskip("sklearn")
    data = load_dataset("digits")
    assert data.x_train.shape == (1433, 1, 8, 8) and data.x_test.shape == (364, 1, 8, 8)
    assert 0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1
    assert data.y_test.bincount().min() >= 35
    again = load_dataset("digits")
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)


def test_mnist1d_generated_offline_leaves_global_rng_alone() -> None:
    pytest.importorskip("mnist1d")
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    data = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == expected
    assert data.x_train.shape == (4000, 1, 1, 40) and data.x_test.shape == (1000, 1, 1, 40)
    assert set(data.y_train.unique().tolist()) == set(range(10))


# --------------------------------------------------------------------------- downloads


def test_download_without_torchvision_says_how_to_install_it(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DataNotFoundError, match="needs torchvision, which is not installed: pip install torchvision"):
        load_dataset("fashion_mnist", root=isolated / "d", download_missing=True)


def test_download_uses_torchvision_layout_under_the_first_root(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeFashionMNIST:  # writes what torchvision's downloader leaves: <root>/FashionMNIST/raw/*
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            if train:
                write_mnist_like(Path(root) / "FashionMNIST" / "raw", compress=False)

    datasets = types.ModuleType("torchvision.datasets")
    datasets.FashionMNIST = FakeFashionMNIST  # type: ignore[attr-defined]
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    data = load_dataset("fashion_mnist", root=isolated / "d", download_missing=True)
    assert calls == [(str(isolated / "d"), True, True), (str(isolated / "d"), False, True)]
    assert data.location == str(isolated / "d" / "FashionMNIST" / "raw") and data.x_train.shape[0] == 20


def test_data_not_found_is_a_clear_cli_error(isolated: Path) -> None:
    from typer.testing import CliRunner

    from metagate.cli import app

    result = CliRunner().invoke(app, ["run", "permuted-fmnist", f"benchmark.root={isolated / 'none'}", "--out", str(isolated / "run")])
    assert result.exit_code == 2
    out = result.output
    assert "Fashion-MNIST was not found in benchmark.root=" in out and "apt-get install dataset-fashion-mnist" in out
