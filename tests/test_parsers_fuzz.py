"""Property-based fuzzing of the parsers that take outside input: device profiles, run and service
configs, edge configs and bundle manifests. Never a crash: a valid object or a clear error."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.config import ConfigError, load_config
from coordinator.service import ServiceConfig
from device_profiles import DeviceProfile, ProfileError, catalogue_profile, load_profile
from edge_sdk.agent import load_edge_config
from edge_sdk.agent.config import EdgeConfigError
from edge_sdk.runtime import ManifestError, load_manifest

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                       max_leaves=12)
VALID_PROFILE = catalogue_profile("rpi4-2gb").model_dump(mode="json")


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(VALID_PROFILE)), JSONISH)
def test_a_profile_with_any_field_replaced_is_valid_or_refused_cleanly(field, value):
    data = {**VALID_PROFILE, field: value}
    try:
        DeviceProfile.model_validate(data)
    except ValidationError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_profile_files_of_arbitrary_bytes_raise_profile_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "profile.json"
    path.write_bytes(data)
    try:
        load_profile(path)
    except ProfileError:
        pass


TOML_VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                        st.booleans(), st.text(alphabet="abcdefgh:._0123456789", max_size=10).map(json.dumps))


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["strategy", "clients", "rounds", "partition", "fraction",
                                            "train.lr", "train.batch_size", "dp.delta",
                                            "dp.target_epsilon", "aggregator.rule", "aggregator.trim",
                                            "byzantine.fraction", "width_levels", "fedp3.selection",
                                            "rounds.total", "broker.url", "nonsense"]),
                          TOML_VALUES), max_size=5),
       st.sampled_from(["simulate", "service"]))
def test_config_overrides_are_valid_or_refused_with_the_key_named(pairs, schema):
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        if schema == "simulate":
            load_config(None, overrides)
        else:
            load_config(None, overrides, schema=ServiceConfig)
    except ConfigError as exc:
        assert "invalid configuration" in str(exc) or "--set" in str(exc) or "section" in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_edge_config_text_is_valid_or_refused_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("e") / "edge.toml"
    path.write_text(text)
    try:
        load_edge_config(path)
    except EdgeConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(JSONISH)
def test_manifests_of_any_json_are_valid_or_refused_cleanly(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("m") / "manifest.json"
    path.write_text(json.dumps(value))
    try:
        load_manifest(path)
    except ManifestError:
        pass
