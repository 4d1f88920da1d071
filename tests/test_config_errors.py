"""Config errors from an adversarial review: every problem at once, each with its path, the
value found and what is allowed; never a traceback, never only the first of several."""

import json

import pytest

from bitwidth.cli import main
from bitwidth.config import MAX_SEED, Config, ConfigError, load_config, variant_configs


def errors_of(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert isinstance(info.value, ValueError)
    return info.value.errors


# ----------------------------------------------------------------------------- family options


def test_every_bad_option_is_reported_with_what_the_family_allows():
    errors = errors_of(["search.options={frob: 1, zap: 2, roundin: nearest, rounding: up, granularity: row}"])
    allowed = "allowed: signed, symmetric, granularity, scale, rounding, percentile"
    assert f"search.options.frob: unknown option of family 'int'; {allowed}" in errors
    assert f"search.options.zap: unknown option of family 'int'; {allowed}" in errors
    assert f"search.options.roundin: unknown option of family 'int'; did you mean `rounding`? {allowed}" in errors
    assert any(e.startswith("search.options.rounding: rounding must be one of") and "'up'" in e for e in errors)
    assert any(e.startswith("search.options.granularity: ") and "'row'" in e for e in errors)
    assert len(errors) == 5, errors


@pytest.mark.parametrize(("family", "options", "allowed"), [
    ("fixed", "{frac: 3}", "allowed: rounding"),
    ("fixed_frac", "{wrd: 12}", "did you mean `word`? allowed: word, rounding"),
    ("float", "{man: 3}", "allowed: exp, max_value, subnormals, rounding"),
    ("float_exp", "{exp: 3}", "allowed: man, max_value, subnormals, rounding"),
], ids=["fixed", "fixed_frac", "float", "float_exp"])
def test_each_family_names_its_own_options(family, options, allowed):
    mode = ["mode=train"] if family == "fixed_frac" else []
    errors = errors_of([f"search.family={family}", f"search.options={options}", "search.candidates=[2, 4]", *mode])
    assert len(errors) == 1 and errors[0].endswith(allowed), errors


def test_bad_option_values_and_widths_are_each_reported():
    errors = errors_of(["search.family=float", "search.options={exp: 9, max_value: -1}",
                        "search.candidates=[2, 3]"])
    assert [e.split(":")[0] for e in errors] == ["search.options.exp", "search.options.max_value"], errors
    errors = errors_of(["search.candidates=[1, 2, 1]"])  # signed int needs 2 bits
    assert [e.split(":")[0] for e in errors] == ["search.candidates[0]", "search.candidates[2]"], errors
    assert load_config(None, ["search.candidates=[1, 2]", "search.options={signed: false}"]).search.candidates == [1, 2]


# ----------------------------------------------------------------------------- keys into values


def test_a_variant_that_writes_into_a_value_is_one_error_among_the_others():
    errors = errors_of(["train.lr=-1", "search.strategy=grid",
                        "variants={a: {search.candidates.x: 1, search.strategy.deep: 2, search.family: intx},"
                        " b: {mode.x: 1}}"])
    assert "train.lr: must be greater than 0 (found -1)" in errors
    assert ("variants.a: search.candidates.x: search.candidates is a value, not a section, so it has no key "
            "'x'; set search.candidates itself") in errors
    assert ("variants.a: search.strategy.deep: search.strategy is a value ('grid'), not a section, so it has "
            "no key 'deep'; set search.strategy itself") in errors
    assert any(e.startswith("variants.a: search.family: unknown family 'intx'") for e in errors)
    assert any(e.startswith("variants.b: mode.x: mode is a value") for e in errors)
    assert len(errors) == 5, errors  # the config's own error is listed once, not again per variant


def test_an_override_into_a_value_is_collected_with_the_config_errors():
    errors = errors_of(["seeds.x=1", "search.options.rounding=up", "executor.kind=threads", "search..x=1"])
    assert errors[0].startswith("--set seeds.x: seeds is a value")
    assert errors[1].startswith("--set 'search..x': a key is names joined by dots")
    assert any(e.startswith("search.options.rounding: ") for e in errors)
    assert any(e.startswith("executor.kind: ") for e in errors)


# ----------------------------------------------------------------------------- integers


@pytest.mark.parametrize("value", ["1.0e+23", str(2**63), str(MAX_SEED + 1), "-1", "2.5", "3.0", "true", "'7'"],
                         ids=["1e23", "2**63", "2**32", "negative", "fraction", "integral-float", "bool", "string"])
def test_a_seed_outside_the_generator_range_is_a_clean_error(value):
    errors = errors_of([f"seeds=[0, {value}]"])
    assert len(errors) == 1 and errors[0].startswith("seeds[1]: must be an integer in 0..2**32 - 1 (found "), errors


def test_the_largest_seed_is_accepted():
    assert load_config(None, [f"seeds=[{MAX_SEED}, 0]"]).seeds == [MAX_SEED, 0]
    assert "seeds: needs one or more seeds" in errors_of(["seeds=[]"])[0]


@pytest.mark.parametrize(("key", "allowed"), [
    ("train.epochs", "1..2**31 - 1"), ("train.batch_size", "1..2**31 - 1"),
    ("train.calib_batches", "0..2**31 - 1"), ("executor.workers", "1..2**31 - 1 or null"),
    ("executor.threads", "1..2**31 - 1"), ("stats.batches", "1..2**31 - 1"),
])
@pytest.mark.parametrize(("value", "found"), [(str(10**30), str(10**30)), ("1.0e+30", "1e+30"), ("2.0", "2.0")],
                         ids=["giant", "giant-float", "float"])
def test_giant_integers_are_clean_errors_with_their_path(key, allowed, value, found):
    assert errors_of([f"{key}={value}"]) == [f"{key}: must be an integer in {allowed} (found {found})"]


def test_giant_candidates_are_clean_errors():
    errors = errors_of([f"search.candidates=[4, {10**30}, 1.0e+30]"])
    assert errors == [f"search.candidates[1]: must be an integer in 0..32 (found {10**30})",
                      "search.candidates[2]: must be an integer in 0..32 (found 1e+30)"]
    assert errors_of(["search.candidates=[0, 4]"]) == [
        "search.candidates[0]: int bits must be an integer in 2..32, got 0 (family 'int')"]


def test_cli_validate_prints_every_error_and_exits_2(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("seeds: [1.0e+23]\ntrain: {epochs: 100000000000000000000000}\n"
                 "search: {options: {frob: 1, zap: 2}}\nvariants: {'../up': {search.candidates.x: 1}}\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    for line in ("seeds[0]: must be an integer in 0..2**32 - 1 (found 1e+23)",
                 "train.epochs: must be an integer in 1..2**31 - 1", "search.options.frob", "search.options.zap",
                 "variants['../up']: must be a plain directory name", "variants['../up']: search.candidates.x"):
        assert line in err, err
    assert "Traceback" not in err and "6 problems" in err


# ----------------------------------------------------------------------------- names


BAD_NAMES = {"parent": "../x", "slash": "a/b", "backslash": "a\\b", "absolute": "/abs", "dot": ".hidden",
             "dotdot": "..", "inner-dotdot": "a..b", "tab": "a\tb", "nul": "a\x00b", "empty": "",
             "space": "a b", "long": "x" * 256}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_names_that_are_not_plain_directory_names_are_rejected(name):
    quoted = json.dumps(name)  # a YAML string with escapes
    errors = errors_of([f"name={quoted}", f"variants={{{quoted}: {{search.strategy: grid}}}}"])
    rule = "must be a plain directory name: ASCII letters, digits, '-', '_' and '.', not starting with '.'"
    found = f"(found {name!r}"[:60]  # long values are cut short
    assert errors[0].startswith(f"name: {rule}") and found in errors[0], errors
    assert errors[1].startswith("variants") and f": {rule}" in errors[1] and found in errors[1], errors
    assert len(errors) == 2, errors
    with pytest.raises(ValueError, match="plain directory name"):  # the model itself refuses it too
        Config(name=name)


def test_plain_names_are_accepted_and_make_run_directories():
    cfg = load_config(None, ["name=study-1.2_b", "variants={v1.0_a-b: {search.strategy: grid}}"])
    assert str(variant_configs(cfg)["v1.0_a-b"].run_dir) == "runs/study-1.2_b/v1.0_a-b"


def test_a_file_name_that_is_no_plain_name_gives_a_sanitised_default(tmp_path):
    p = tmp_path / "my study (v2).yaml"
    p.write_text("mode: ptq\n")
    assert load_config(p).name == "my_study__v2_"


# ----------------------------------------------------------------------------- relative paths


def test_a_relative_model_file_is_resolved_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "net.py").write_text("def build():\n    pass\n")
    p = tmp_path / "cfg" / "user.yaml"
    p.write_text("task: {model: net.py:build}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder: the file is not found
    (error,) = errors_of([], p)
    assert error.startswith(f"task.model: no file {str(tmp_path / 'net.py')!r} (found 'net.py:build')")
    assert f"resolved from the current directory ({tmp_path})" in error
    monkeypatch.chdir(tmp_path / "cfg")
    assert load_config(p).task.model == "net.py:build"
