"""Image benchmarks (permuted, rotated, split), the image backbones, and end-to-end runs on digits.

Most tests use scikit-learn's digits (shipped with scikit-learn, no download). The real
Fashion-MNIST test is marked ``fmnist`` and skips when Debian's dataset-fashion-mnist is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from metagate.config import ConfigError, config_from_dict, load_config
from metagate.data import BENCHMARKS, build_stream
from metagate.data.images import Permuted, Rotated, rotate
from metagate.nn.backbones import CNN, MLP, BackboneConfig, ResNet18, build_backbone

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NEW_CONFIGS = ["permuted-fmnist", "rotated-fmnist", "split-fmnist", "split-cifar100-10", "split-cifar100-20", "digits-permuted", "digits-rotated", "digits-split"]


@pytest.fixture(scope="module")
def sklearn() -> None:
    pytest.importorskip("sklearn")


def stream(name: str, seed: int = 0, **fields: object):  # type: ignore[no-untyped-def]
    return BENCHMARKS.get(name).build(BENCHMARKS.get(name).Config(**fields), seed)


# --------------------------------------------------------------------------- permuted


def test_each_permutation_is_a_bijection_and_task_zero_is_identity() -> None:
    perms = Permuted.permutations(Permuted.Config(num_tasks=4), seed=0, num_pixels=784)
    assert torch.equal(perms[0], torch.arange(784))
    for p in perms:
        assert torch.equal(p.sort().values, torch.arange(784))
    assert len({tuple(p.tolist()) for p in perms}) == 4
    shuffled = Permuted.permutations(Permuted.Config(num_tasks=2, identity_first=False), seed=0, num_pixels=784)
    assert not torch.equal(shuffled[0], torch.arange(784))


def test_permuted_tasks_are_the_same_images_permuted(sklearn: None) -> None:
    s = stream("permuted", dataset="digits", num_tasks=3)
    perms = Permuted.permutations(Permuted.Config(num_tasks=3), 0, 64)
    assert s.scenario == "domain" and s.num_outputs == 10 and s.input_shape == (1, 8, 8)
    base = s.tasks[0].x_train.flatten(1)
    for task, perm in zip(s.tasks, perms):
        assert torch.equal(task.x_train.flatten(1), base[:, perm])
        assert torch.equal(task.y_train, s.tasks[0].y_train) and task.classes == tuple(range(10))
    assert abs(float(base.mean())) < 1e-4 and abs(float(base.std()) - 1) < 1e-2  # standardised


def test_permuted_contexts_deterministic_per_seed_and_differ_across_seeds(sklearn: None) -> None:
    a, b, c = (stream("permuted", seed, dataset="digits", num_tasks=3) for seed in (0, 0, 1))
    assert torch.equal(a.contexts(), b.contexts()) and not torch.equal(a.contexts(), c.contexts())
    assert torch.equal(a.tasks[1].x_train, b.tasks[1].x_train) and not torch.equal(a.tasks[1].x_train, c.tasks[1].x_train)
    onehot = stream("permuted", dataset="digits", num_tasks=3, context="onehot")
    assert torch.equal(onehot.contexts(), torch.eye(3)) and onehot.context_dim == 3


def test_caps_limit_samples_without_changing_permutations(sklearn: None) -> None:
    full = stream("permuted", dataset="digits", num_tasks=2)
    capped = stream("permuted", dataset="digits", num_tasks=2, train_per_task=100, test_per_task=50)
    assert [t.num_train for t in capped.tasks] == [90, 90] and [t.num_test for t in capped.tasks] == [50, 50]
    assert [t.num_val for t in capped.tasks] == [10, 10]
    perm = Permuted.permutations(Permuted.Config(num_tasks=2), 0, 64)[1]
    # the capped task-1 images are a subset of the full task-1 images, with the same permutation
    first = capped.tasks[1].x_train[0].flatten()
    assert any(torch.equal(first, row) for row in full.tasks[1].x_train.flatten(1))
    assert torch.equal(Permuted.permutations(Permuted.Config(num_tasks=2, train_per_task=5), 0, 64)[1], perm)


# --------------------------------------------------------------------------- rotated


def test_rotate_by_90_degrees_is_rot90_counter_clockwise() -> None:
    x = torch.rand(3, 2, 8, 8)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(rotate(x, 180), torch.rot90(x, 2, dims=(2, 3)), atol=1e-5)
    assert torch.equal(rotate(x, 0), x)


def test_rotated_angles_contexts_and_heldout(sklearn: None) -> None:
    s = stream("rotated", dataset="digits", num_tasks=5, max_angle=120, heldout_inside=2, heldout_outside=2)
    angles = [t.info["angle"] for t in s.tasks]
    assert angles == [0, 30, 60, 90, 120] and s.context_dim == 2 and s.scenario == "domain"
    for t in s.tasks + s.heldout:
        a = torch.deg2rad(torch.tensor(float(t.info["angle"])))
        assert torch.allclose(t.context, torch.stack([a.cos(), a.sin()]), atol=1e-6)
    held = [t.info["angle"] for t in s.heldout]
    assert held[:2] == [15, 105] and held[2:] == [135, 150]  # inside (midpoints) and beyond max_angle
    assert all(t.num_train == 0 and t.num_test == 364 for t in s.heldout)
    assert [t.index for t in s.heldout] == [5, 6, 7, 8]
    assert not torch.allclose(s.tasks[0].x_test, s.tasks[1].x_test)


def test_rotated_order_shuffled_by_seed_and_mnist1d_refused() -> None:
    cfg = Rotated.Config(num_tasks=6, shuffle_order=True)
    a, b = Rotated.angles(cfg, 0)[0], Rotated.angles(cfg, 1)[0]
    assert sorted(a) == sorted(b) and a != b and a == Rotated.angles(cfg, 0)[0]
    with pytest.raises(ConfigError, match="square images"):
        config_from_dict({"benchmark": {"name": "rotated", "dataset": "mnist1d"}, "method": {"name": "finetune"}})


# --------------------------------------------------------------------------- split


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_split_tasks_are_disjoint_and_cover_the_classes(sklearn: None, scenario: str) -> None:
    s = stream("split", dataset="digits", num_tasks=5, scenario=scenario)
    assert s.scenario == scenario and s.num_outputs == 10
    groups = [[int(c) for c in t.info["labels"].split(",")] for t in s.tasks]  # type: ignore[union-attr]
    assert sorted(c for g in groups for c in g) == list(range(10))
    mask = s.class_mask()
    assert (mask.sum(0) == 1).all()  # every output unit belongs to exactly one task
    for t in s.tasks:
        assert t.classes == (2 * t.index, 2 * t.index + 1)
        assert set(t.y_train.unique().tolist()) == set(t.classes) == set(t.y_test.unique().tolist())
    assert sum(t.num_train + t.num_val for t in s.tasks) == 1433 and sum(t.num_test for t in s.tasks) == 364
    assert sum(t.num_val for t in s.tasks) == round(0.1 * 1433)


def test_split_class_order_and_prototype_contexts_fixed_by_seed(sklearn: None) -> None:
    a, b, c = (stream("split", seed, dataset="digits") for seed in (0, 0, 1))
    assert [t.info["labels"] for t in a.tasks] == [t.info["labels"] for t in b.tasks]
    assert [t.info["labels"] for t in a.tasks] != [t.info["labels"] for t in c.tasks]
    assert torch.equal(a.contexts(), b.contexts()) and not torch.equal(a.contexts(), c.contexts())
    assert a.context_dim == 2 * 8 and torch.isfinite(a.contexts()).all()
    ordered = stream("split", dataset="digits", shuffle_classes=False, prototype_dim=4)
    assert [t.info["labels"] for t in ordered.tasks] == ["0,1", "2,3", "4,5", "6,7", "8,9"]
    assert ordered.context_dim == 8


def test_split_prototypes_are_projected_class_means(sklearn: None) -> None:
    """With at least as many shots as images, a class prototype is the mean of all its training images
    (standardised, flattened) times the documented projection P ~ N(0, 1/D), concatenated per class."""
    import math

    from metagate.data.images import generator

    s = stream("split", 3, dataset="digits", prototype_shots=10_000, prototype_dim=4)
    projection = torch.randn(64, 4, generator=generator(3, "prototype-projection")) / math.sqrt(64)
    for t in s.tasks:
        x = t.x_train.flatten(1)
        expected = torch.cat([x[t.y_train == u].mean(0) @ projection for u in t.classes])
        assert torch.allclose(t.context, expected, atol=1e-5)


def test_split_refuses_more_classes_than_the_data_set_has() -> None:
    with pytest.raises(ConfigError, match="num_tasks=6 x classes_per_task=2 need 12 classes, digits has 10"):
        config_from_dict({"benchmark": {"name": "split", "dataset": "digits", "num_tasks": 6, "classes_per_task": 2}, "method": {"name": "finetune"}})


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (1, 1, 40)])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet18"])
def test_backbones_take_any_image_shape_and_unit_masks(kind: str, shape: tuple[int, ...]) -> None:
    cfg = BackboneConfig(kind=kind, hidden=[16], channels=[4, 8], nf=4)
    net = build_backbone(cfg, shape, 5).eval()
    x = torch.randn(3, *shape)
    assert net(x).shape == (3, 5)
    ones = [torch.ones(w) for w in net.gated_widths]
    assert torch.allclose(net(x, ones), net(x), atol=1e-6)
    zeros = [torch.ones(w) for w in net.gated_widths[:-1]] + [torch.zeros(3, net.gated_widths[-1])]  # per-sample mask
    assert torch.allclose(net(x, zeros), net.head.bias.expand(3, 5))
    partly = list(ones)
    partly[0] = torch.zeros(net.gated_widths[0])
    partly[0][0] = 1
    assert not torch.allclose(net(x, partly), net(x))
    with pytest.raises(ValueError, match="gated layers"):
        net(x, ones[:-1])


def test_gated_widths_of_each_backbone() -> None:
    assert MLP(64, [32, 16], 10).gated_widths == [32, 16]
    assert CNN((1, 28, 28), [32, 64], [128], 10).gated_widths == [32, 64, 128]
    assert ResNet18((3, 32, 32), 100).gated_widths == [20, 20, 20, 40, 40, 80, 80, 160, 160]


def test_resnet18_matches_gems_reduced_resnet() -> None:
    net = ResNet18((3, 32, 32), 100, nf=20)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, two per block, three 1x1 shortcuts
    assert net.head.in_features == 160
    assert 1.0e6 < sum(p.numel() for p in net.parameters()) < 1.2e6


def test_maskable_weights_hook_applies_per_weight_masks() -> None:
    net = CNN((1, 8, 8), [4], [8], 3).eval()
    weights = net.maskable_weights()
    assert list(weights) == ["convs.0.weight", "hidden.0.weight", "head.weight"]
    x = torch.randn(2, 1, 8, 8)
    same = functional_call(net, {n: w * torch.ones_like(w) for n, w in weights.items()}, (x,))
    assert torch.allclose(same, net(x))
    cut = functional_call(net, {"head.weight": torch.zeros_like(weights["head.weight"])}, (x,))
    assert torch.allclose(cut, net.head.bias.expand(2, 3))


def test_mlp_stays_the_default_backbone() -> None:
    net = build_backbone(BackboneConfig(), (16,), 4)
    assert isinstance(net, MLP) and net.gated_widths == [128, 128]
    with pytest.raises(ValueError, match="needs inputs"):
        build_backbone(BackboneConfig(kind="cnn"), (16,), 4)


# --------------------------------------------------------------------------- configs and training


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_ready_configs_validate(name: str) -> None:
    cfg = load_config(name)
    assert cfg.benchmark.name in ("permuted", "rotated", "split")
    first = (Path(__file__).parents[1] / "src" / "metagate" / "configs" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ")


@pytest.mark.parametrize(
    ("config", "chance"),
    [("digits-permuted", 0.1), ("digits-rotated", 0.1), ("digits-split", 0.5)],
)
def test_digits_configs_train_end_to_end(sklearn: None, config: str, chance: float) -> None:
    from metagate.train import Trainer

    cfg = load_config(config, ["trainer.epochs=2", "trainer.progress=false", "benchmark.num_tasks=3"])
    results = Trainer(cfg).fit()
    assert len(results["acc_matrix"]) == 3
    assert results["acc_matrix"][0][0] > chance + 0.3  # learnt its first task
    assert results["acc"] > chance
    if config == "digits-rotated":
        assert len(results["heldout_acc_matrix"][-1]) == 4


def test_joint_beats_finetune_on_split_digits_class_incremental(sklearn: None) -> None:
    from metagate.train import Trainer

    accs = {}
    for method in ("finetune", "joint"):
        cfg = load_config("digits-split", [f"method.name={method}", "benchmark.scenario=class", "benchmark.num_tasks=3", "benchmark.classes_per_task=2", "trainer.epochs=3", "trainer.progress=false"])
        accs[method] = Trainer(cfg).fit()["acc"]
    assert accs["finetune"] < 0.5 < accs["joint"]  # class-incremental finetuning forgets the old classes


@pytest.mark.fmnist
@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    from metagate.data.sources import load_dataset

    monkeypatch.delenv("METAGATE_DATA", raising=False)
    data = load_dataset("fashion_mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.y_train.bincount().tolist() == [6000] * 10 and data.y_test.bincount().tolist() == [1000] * 10
    split = build_stream(load_config("split-fmnist").benchmark, 0)
    assert sum(t.num_train for t in split.tasks) == 54000 and [t.num_test for t in split.tasks] == [2000] * 5
    assert sum(t.num_val for t in split.tasks) == 6000
    perm = build_stream(load_config("permuted-fmnist", ["benchmark.num_tasks=2", "benchmark.train_per_task=1000"]).benchmark, 0)
    assert perm.input_shape == (1, 28, 28) and perm.tasks[1].num_train == 900 and perm.tasks[1].num_test == 10000


# --------------------------------------------------------------------------- validation split


@pytest.mark.parametrize("name", ["permuted", "rotated", "split"])
def test_validation_images_are_never_trained_on_in_any_task(sklearn: None, name: str) -> None:
    fields = {"permuted": {"identity_first": True}, "rotated": {"num_tasks": 3, "heldout_inside": 0, "heldout_outside": 0}, "split": {}}[name]
    s = stream(name, dataset="digits", normalize=False, **fields)
    # undo each task's transform by matching raw rows: a validation image must not equal any training image
    raw = lambda x: {tuple(r.tolist()) for r in x.flatten(1).sort(dim=1).values}  # noqa: E731  (sorted pixels: permutation-proof)
    train = set().union(*(raw(t.x_train) for t in s.tasks)) if name != "rotated" else raw(s.tasks[0].x_train)
    val = set().union(*(raw(t.x_val) for t in s.tasks)) if name != "rotated" else raw(s.tasks[0].x_val)
    assert val and not (val & train)
    assert all(t.num_val > 0 for t in s.tasks)
    again, other = stream(name, dataset="digits", normalize=False, **fields), stream(name, 1, dataset="digits", normalize=False, **fields)
    assert torch.equal(again.tasks[0].x_val, s.tasks[0].x_val) and not torch.equal(other.tasks[0].x_val, s.tasks[0].x_val)


def test_val_fraction_sets_the_validation_size_and_zero_turns_it_off(sklearn: None) -> None:
    s = stream("permuted", dataset="digits", num_tasks=2, train_per_task=200, val_fraction=0.25)
    assert [(t.num_train, t.num_val) for t in s.tasks] == [(150, 50), (150, 50)]
    assert [t.num_val for t in stream("permuted", dataset="digits", num_tasks=2, val_fraction=0).tasks] == [0, 0]
