"""Each coordinator's MQTT client id (issue 24): two coordinators on one broker once both connected
as `fedprune-coordinator` and evicted each other all round. The id a coordinator makes is kept in
its state_dir, so a restart resumes its persistent session; the broker-level proof (a demo beside
`serve` on one broker, neither reconnecting) is tests/test_readme_commands.py::test_the_tour."""

import pytest

from coordinator.config import ConfigError
from coordinator.service.config import ServiceSettings
from coordinator.service.service import CLIENT_ID_FILE, coordinator_client_id


def test_a_coordinator_keeps_its_own_id_across_restarts_and_another_gets_another(tmp_path):
    first = ServiceSettings(state_dir=str(tmp_path / "a"))
    made = coordinator_client_id(first)
    assert made.startswith("fedprune-coordinator-")
    assert (tmp_path / "a" / CLIENT_ID_FILE).read_text() == made
    assert coordinator_client_id(ServiceSettings(state_dir=str(tmp_path / "a"))) == made
    assert coordinator_client_id(ServiceSettings(state_dir=str(tmp_path / "b"))) != made


def test_a_configured_id_a_user_name_and_a_cluster_node_win_over_the_kept_one(tmp_path):
    state = str(tmp_path)
    assert coordinator_client_id(ServiceSettings(
        state_dir=state, broker={"client_id": "coord-a"})) == "coord-a"
    assert coordinator_client_id(ServiceSettings(
        state_dir=state, broker={"username": "coord-user"})) == "coord-user"
    assert coordinator_client_id(ServiceSettings(
        state_dir=state, cluster={"enabled": True, "node": "n1"},
        database="postgresql+psycopg://127.0.0.1/test")) == "fedprune-coordinator-n1"
    assert not (tmp_path / CLIENT_ID_FILE).exists()


def test_a_kept_id_that_is_not_one_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / CLIENT_ID_FILE).write_text("a b/c\n")
    with pytest.raises(ConfigError, match=CLIENT_ID_FILE):
        coordinator_client_id(ServiceSettings(state_dir=str(tmp_path)))
