"""Configs: every shipped config validates; bad ones list every problem with its path."""

from pathlib import Path

import pytest
import yaml

from bitwidth.config import ConfigError, apply_overrides, config_to_yaml, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "digits_train", "rounding_study", "resnet18_cifar10"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem or cfg.name
    assert load_config(None, _flatten(yaml.safe_load(config_to_yaml(cfg)))) == cfg  # resolved form reloads


def _flatten(d, prefix=""):
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("options", "variants"):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={yaml.safe_dump(v, default_flow_style=True).strip()}")
    return out


def test_ten_line_config_gets_defaults(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text("task: {model: digits_mlp}\nmode: train\n")
    cfg = load_config(p)
    assert cfg.name == "tiny" and cfg.criterion.name == "converge"
    assert cfg.stats.kinds == cfg.search.kinds == ["weight", "activation"]
    assert str(cfg.run_dir) == "runs/tiny"


def test_all_errors_at_once_with_paths_values_and_suggestions(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "mode: qat\n"
        "train: {lr: -1, epochz: 3}\n"
        "search: {candidtes: [2, 4], family: intx, kinds: [weights]}\n"
        "task: {data: mnst}\n"
        "executor: {kind: threads}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(p)
    text = str(info.value)
    errors = info.value.errors
    assert len(errors) >= 7, text
    assert "mode: must be 'ptq', 'train' or 'adaptive' (found 'qat')" in text
    assert "train.lr: must be greater than 0 (found -1)" in text
    assert "train.epochz: unknown key; did you mean `epochs`?" in text
    assert "search.candidtes: unknown key; did you mean `candidates`?" in text
    assert "search.kinds[0]" in text and "'weights'" in text
    assert "search.family: unknown family 'intx'; allowed: int, fixed" in text
    assert "task.data: unknown data 'mnst'" in text
    assert "executor.kind" in text


def test_family_options_are_checked_with_the_real_formats():
    with pytest.raises(ConfigError, match=r"search\.options\.rounding: rounding must be one of"):
        load_config(None, ["search.options={rounding: up}"])
    with pytest.raises(ConfigError, match=r"search\.options\.frac: unknown option of family 'int'; allowed: signed"):
        load_config(None, ["search.options={frac: 3}"])


def test_overrides_are_typed_and_validated():
    cfg = load_config(None, ["search.strategy=grid", "search.candidates=[8, 2, 4]", "seeds=[0, 1]",
                             "train.master_weights=quantized"])
    assert cfg.search.strategy == "grid" and cfg.search.candidates == [2, 4, 8] and cfg.seeds == [0, 1]
    with pytest.raises(ConfigError, match="search.strategy: must be 'grid', 'bisect' or 'predict'"):
        load_config(None, ["search.strategy=random"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["search.strategy"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    p.write_text("mode: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_gradient_kind_needs_training_mode():
    with pytest.raises(ConfigError, match="search.kinds: 'gradient' exists only in mode 'train'"):
        load_config(None, ["search.kinds=[weight, gradient]"])
    assert load_config(None, ["mode=train", "search.kinds=[gradient]"]).search.kinds == ["gradient"]
