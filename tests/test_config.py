"""Config: YAML key for key, overrides with coercion, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses

import pytest

from scaling.config import RunConfig, apply_overrides, dump_yaml, load_run_config, run_id
from scaling.config_schema import ConfigError
from tests.conftest import run_cli

BASE = {"model": {"name": "wukong", "size": "s"}, "train": {"steps": 100}}


def _error(data, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_run_config(None, overrides, data=data)
    return info.value


def test_yaml_maps_key_for_key_and_roundtrips(tmp_path):
    config = load_run_config(None, ["optimizer.dense.learning_rate=3e-3"], data=BASE)
    assert isinstance(config, RunConfig)
    assert config.train.steps == 100
    assert config.optimizer.dense.learning_rate == pytest.approx(3e-3)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config))
    again = load_run_config(str(path))
    assert again == config
    assert run_id(again) == run_id(config)


def test_override_coercion_and_size_preset():
    config = load_run_config(None, ["model.num_layers=3", "train.batch_size=256", "logging.progress=false",
                                    "logging.wandb.tags=[a,b]"], data=BASE)
    assert config.model.num_layers == 3 and isinstance(config.model.num_layers, int)
    assert config.train.batch_size == 256
    assert config.logging.progress is False
    assert config.logging.wandb.tags == ("a", "b")
    # the preset fills what the YAML does not set
    preset = load_run_config(None, data=BASE).model
    assert preset.embed_dim == config.model.embed_dim


def test_pyyaml_exponent_strings_are_numbers():
    config = load_run_config(None, data={**BASE, "optimizer": {"dense": {"learning_rate": "1e-3"}}})
    assert config.optimizer.dense.learning_rate == pytest.approx(1e-3)


def test_unknown_key_suggests_close_match():
    err = _error({**BASE, "train": {"stepz": 10}})
    assert err.path == "train.stepz"
    assert "did you mean 'steps'" in str(err)


def test_wrong_type_names_key_and_expectation():
    err = _error(BASE, ["train.steps=many"])
    assert err.path == "train.steps" and "integer" in str(err)


def test_out_of_range_value():
    err = _error(BASE, ["train.steps=0"])
    assert err.path == "train.steps" and ">= 1" in str(err)


def test_unknown_model_name_lists_choices():
    err = _error({"model": {"name": "wukon"}})
    assert err.path == "model.name" and "did you mean 'wukong'" in str(err) and "dlrm" in str(err)


def test_model_is_required():
    err = _error({})
    assert err.path == "model.name"


def test_unknown_size_and_bad_literal():
    assert _error({"model": {"name": "wukong", "size": "huge"}}).path == "model.size"
    err = _error(BASE, ["optimizer.dense.name=adamx"])
    assert err.path == "optimizer.dense.name" and "adamw" in str(err)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_run_id_changes_with_semantics_only():
    a = load_run_config(None, data=BASE)
    b = load_run_config(None, ["logging.progress=false", "train.output_dir=/elsewhere"], data=BASE)
    c = load_run_config(None, ["seed=1"], data=BASE)
    assert run_id(a) == run_id(b) != run_id(c)
    assert dataclasses.is_dataclass(a) and a.__dataclass_params__.frozen


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "does/not/exist.yaml"], "does/not/exist.yaml: no such file"),
        (["flops", "sweeps/quickstart.yaml", "--set", "model.nm_layers=2"], "model.nm_layers"),
        (["flops", "sweeps/quickstart.yaml", "--set", "train.batch_size=-5"], "train.batch_size"),
        (["flops", "sweeps/quickstart.yaml", "--set", "model.name=nope"], "model.name"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: wukong\n  size: [s\n")
    proc = run_cli("flops", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:" in proc.stderr and "invalid YAML" in proc.stderr
