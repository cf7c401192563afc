"""Configuration layering and its error messages."""

from __future__ import annotations

import pytest

from coordinator.config import ConfigError, load_config, parse_override


def test_toml_file_then_flags_then_set_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('strategy = "fedp3"\nclients = 20\nrounds = 7\n'
                    '[fedp3]\nselection = "opu3"\nglobal_keep = 0.7\n'
                    '[dp]\ntarget_epsilon = 8.0\n')
    config = load_config(path, ["fedp3.global_keep=0.5", "train.lr=0.05"], rounds=2)
    assert config.strategy == "fedp3" and config.clients == 20
    assert config.rounds == 2                      # explicit flag beats the file
    assert config.fedp3.selection == "opu3"        # file beats defaults
    assert config.fedp3.global_keep == 0.5         # --set beats everything
    assert config.train.lr == 0.05
    assert config.dp.enabled and config.dp.target_epsilon == 8.0 and config.dp.delta == 1e-5


def test_defaults_have_dp_off():
    config = load_config()
    assert not config.dp.enabled
    assert config.strategy == "fedavg" and config.partition == "classes:5"


@pytest.mark.parametrize("item, keys, value", [
    ("fedp3.selection=opu3", ["fedp3", "selection"], "opu3"),
    ("dp.delta=1e-5", ["dp", "delta"], 1e-5),
    ("fedp3.personal_head=false", ["fedp3", "personal_head"], False),
    ('partition="dirichlet:0.5"', ["partition"], "dirichlet:0.5"),
    ("partition=dirichlet:0.5", ["partition"], "dirichlet:0.5"),
    ("rounds=3", ["rounds"], 3),
])
def test_override_values_are_read_as_toml_literals(item, keys, value):
    assert parse_override(item) == (keys, value)


@pytest.mark.parametrize("overrides, message", [
    (["fedp3.global_keep=0"], "fedp3.global_keep: Input should be greater than 0"),
    (["fedp3.aggregation=median"], "fedp3.aggregation"),
    (["dp.noise_multiplier=1.0", "dp.target_epsilon=2"], "not both"),
    (["nosuchkey=1"], "nosuchkey: not a setting; the settings are strategy, dataset"),
    (["rounds"], "expected key=value"),
    (["rounds.x=1"], "rounds: Input should be a valid integer"),
    (["rounds=3", "rounds.x=1"], "rounds is a value, not a section"),
])
def test_bad_configuration_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
