"""Configs: YAML + dotted overrides, validated before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metagate.config import ConfigError, config_from_dict, list_ready_configs, load_config, parse_overrides


def test_default_config_loads() -> None:
    cfg = load_config()
    assert (cfg.benchmark.name, cfg.method.name) == ("composed_teacher", "metagate")
    refs = cfg.reference_configs()
    assert [r.method.name for r in refs] == ["xdg", "oracle"] and all(r.reference is None for r in refs)
    xdg, oracle = refs
    assert xdg.method.backbone == cfg.method.backbone and xdg.method.c == cfg.method.c  # same net, same SI
    assert oracle.method.backbone.hidden == [209] and oracle.method.c == cfg.method.c
    for ref in refs:
        assert (ref.seed, ref.benchmark, ref.trainer) == (cfg.seed, cfg.benchmark, cfg.trainer)
    assert cfg.reference_config() == xdg


def test_a_reference_list_is_validated_item_by_item() -> None:
    raw = {"benchmark": {"name": "gated_teacher"}, "method": {"name": "si"}}
    cfg = config_from_dict({**raw, "reference": [{"name": "ewc"}, {"name": "finetune"}]})
    assert [r.method.name for r in cfg.reference_configs()] == ["ewc", "finetune"]
    with pytest.raises(ConfigError, match=r"reference\[1\]"):
        config_from_dict({**raw, "reference": [{"name": "ewc"}, {"name": "magic"}]})
    with pytest.raises(ConfigError, match="empty list"):
        config_from_dict({**raw, "reference": []})


def test_reference_switches_and_clears_like_the_method() -> None:
    cfg = load_config(None, ["reference.name=si"])  # a list of references becomes this one
    assert cfg.reference is not None and cfg.reference.name == "si" and not hasattr(cfg.reference, "gate_fraction")
    assert cfg.reference.backbone == cfg.method.backbone
    assert load_config(None, ["reference=null"]).reference is None
    own = load_config(None, ["reference.name=xdg", "reference.backbone.hidden=[32]"])
    assert own.reference is not None and own.reference.backbone.hidden == [32]


def test_ready_configs_all_validate() -> None:
    for name in list_ready_configs():
        load_config(name)


def test_overrides_are_typed(small) -> None:  # noqa: ANN001
    cfg = config_from_dict(small(), ["method.name=ewc", "method.lambda=250", "trainer.epochs=4", "seed=3"])
    assert cfg.method.name == "ewc" and cfg.method.lambda_ == 250.0
    assert cfg.trainer.epochs == 4 and cfg.seed == 3


def test_switching_method_drops_old_hyperparameters_but_keeps_backbone(small) -> None:  # noqa: ANN001
    raw = small(method={"name": "si", "c": 2.0, "backbone": {"hidden": [7]}})
    cfg = config_from_dict(raw, ["method.name=ewc"])
    assert cfg.method.name == "ewc"
    assert cfg.method.backbone.hidden == [7]


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.lamda=3", "unknown key 'method.lamda'; valid keys here: name, backbone, reset_optimizer"),
        ("trainer.epochs=two", "trainer.epochs"),
        ("trainer.epochs=0", "greater than or equal to 1"),
        ("method.name=nope", "choose one of: active_dendrites, dgr, er, ewc, "),
        ("benchmark.name=nope", "choose one of: "),
        ("benchmark.mask_density=2", "benchmark.mask_density"),
        ("model.depth=3", "unknown top-level key"),
        ("seed=abc", "seed must be an integer"),
        ("noequals", "key.sub=value"),
    ],
)
def test_bad_configs_refused_with_the_choices_named(small, override: str, message: str) -> None:  # noqa: ANN001
    raw = small(method={"name": "ewc"}) if "lamda" in override else small()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(raw, [override])


def test_unknown_ready_config_lists_the_ready_ones() -> None:
    with pytest.raises(ConfigError, match="ready configs: .*default"):
        load_config("no-such-config")


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(p))


def test_parse_overrides_reads_yaml_scalars() -> None:
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=true", "e=x"]) == [
        (["a", "b"], 1),
        (["c"], [1, 2]),
        (["d"], True),
        (["e"], "x"),
    ]


def test_resolved_config_round_trips(small) -> None:  # noqa: ANN001
    cfg = config_from_dict(small(method={"name": "ewc", "lambda": 7}))
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
