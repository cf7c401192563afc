"""Property-based fuzzing of the parsers that take outside input: device profiles, run and service
configs, edge configs and bundle manifests. Never a crash: a valid object or a clear error.

The generators include what crashed them before issue 11: nesting deeper than the interpreter's
recursion limit, integers of thousands of digits and non-finite numbers. The last test replays
the fast seeded slice of the coverage-guided fuzzer (benchmarks/fuzz.py) for every target."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.config import ConfigError, load_config
from coordinator.service import ServiceSettings
from device_profiles import DeviceProfile, ProfileError, catalogue_profile, load_profile
from edge_sdk.agent import load_edge_config
from edge_sdk.agent.config import EdgeConfigError
from edge_sdk.runtime import ManifestError, load_manifest

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
                       | st.integers(10**19, 10**4000) | st.integers(-(10**4000), -(10**19)),  # json.dumps stops at 4,300 digits
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                       max_leaves=12)
DEPTH = st.integers(1, 3000)


def hostile_json_text(value, depth: int, as_object: bool) -> str:
    """JSON text of `value` nested `depth` deep (json.dumps recurses, so the nesting is textual),
    with a 5,000-digit integer beside it (json.dumps cannot write one)."""
    opening, closing = ('{"a":', "}") if as_object else ("[", "]")
    return opening * depth + f"[{json.dumps(value)}, {'9' * 5000}]" + closing * depth
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


@settings(max_examples=150, deadline=None)
@given(JSONISH, DEPTH, st.booleans())
def test_profile_files_of_hostile_json_raise_profile_errors(tmp_path_factory, value, depth, as_object):
    path = tmp_path_factory.mktemp("p") / "profile.json"
    path.write_text(hostile_json_text(value, depth, as_object))
    try:
        load_profile(path)
    except ProfileError:
        pass


TOML_VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                        st.booleans(), st.text(alphabet="abcdefgh:._0123456789", max_size=10).map(json.dumps),
                        st.sampled_from(["inf", "-inf", "nan", "+nan", "1e999"]),
                        st.integers(1, 6000).map(lambda n: "9" * n),
                        DEPTH.map(lambda d: "[" * d + "1" + "]" * d))


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
            load_config(None, overrides, schema=ServiceSettings)
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


@settings(max_examples=150, deadline=None)
@given(JSONISH, DEPTH, st.booleans())
def test_manifests_of_hostile_json_are_refused_cleanly(tmp_path_factory, value, depth, as_object):
    path = tmp_path_factory.mktemp("m") / "manifest.json"
    path.write_text(hostile_json_text(value, depth, as_object))
    try:
        load_manifest(path)
    except ManifestError:
        pass


TOML_FRAGMENTS = st.one_of(TOML_VALUES, DEPTH.map(lambda d: "{a = " * d + "1" + "}" * d))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["edge", "service"]), st.sampled_from(["seed", "epsilon_budget", "threads", "x"]),
       TOML_FRAGMENTS)
def test_config_files_with_hostile_values_are_refused_cleanly(tmp_path_factory, which, key, value):
    path = tmp_path_factory.mktemp("c") / "config.toml"
    path.write_text(f'device_id = "pi-7"\n{key} = {value}\n' if which == "edge" else f"{key} = {value}\n")
    try:
        if which == "edge":
            load_edge_config(path)
        else:
            load_config(path, schema=ServiceSettings)
    except (EdgeConfigError, ConfigError):
        pass


# --- the seeded slice of benchmarks/fuzz.py ------------------------------------------------------

def _load_fuzz_harness():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("fedprune_fuzz_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


FUZZ = _load_fuzz_harness()


@pytest.fixture(scope="module")
def fuzz_targets():
    workdir = FUZZ.scratch_dir("tests")
    yield FUZZ.build_targets(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("name", FUZZ.TARGET_NAMES)
def test_seeded_fuzz_slice_finds_nothing(fuzz_targets, name):
    """Seeds, the hostile corpus and 300 seeded mutations per target (atheris not needed): only
    the documented error may escape."""
    target = fuzz_targets[name]
    assert all(FUZZ.escaped(target, seed) is None for seed in target.seeds)
    findings = FUZZ.replay(target, mutations=300, seed=11)
    assert not findings, [f"{type(exc).__name__}: {str(exc)[:200]} for {data[:80]!r}"
                          for data, exc in findings[:5]]
