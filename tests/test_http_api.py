"""The coordinator's HTTP API (coordinator/service/http_api.py) over a store that a real round
engine filled with real edge agents (tests/harness/fleet.py): three devices, two committed rounds,
one device refusing round 1 for its privacy budget.

The schema test runs schemathesis against the app's own OpenAPI schema in process; the token and
CLI tests use the real uvicorn server on a real socket.
"""

from __future__ import annotations

import secrets

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic import SecretStr

from coordinator.cli import main
from coordinator.config import ConfigError
from coordinator.service import CoordinatorService
from coordinator.service.config import HTTP_TOKEN_VARIABLE, ServiceSettings
from coordinator.service.http_api import ApiServer, build_app
from coordinator.service.store import TaskRow, UpdateRow
from harness.fleet import Harness

TOKEN = secrets.token_hex(16)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two committed rounds: dev-0 and dev-1 train both (DP, so each spends ε); dev-2's budget
    is too small, so it refuses round 1 and is exhausted, and round 2 runs without it."""
    tmp = tmp_path_factory.mktemp("http_api")
    h = Harness(tmp, f"sqlite:///{tmp / 'coordinator.db'}", devices=3, samples=60, model="mlp",
                dp={"noise_multiplier": 1.0}, budgets={0: 50.0, 2: 0.01},
                rounds={"min_devices": 2})
    h.register_all()
    for number in (1, 2):
        h.engine.tick()
        assert h.engine.round is not None and h.engine.round.number == number
        h.deliver_to_devices("task")
        h.deliver_to_coordinator("refusal")
        h.deliver_to_coordinator("update")
        for device in h.agents:
            h.deliver_acks(device)
        h.engine.tick()
        assert h.engine.round is None
    assert h.engine.committed_rounds() == 2
    return h


@pytest.fixture(scope="module")
def guarded_app(fleet):
    # schemathesis calls the app in process as http://testserver: a name it answers to here.
    config = fleet.config.model_copy(update={"http_token": SecretStr(TOKEN),
                                             "http_allowed_hosts": ["testserver"]})
    return build_app(fleet.store, config, fleet.engine.status)


@pytest.fixture(scope="module")
def api_schema(guarded_app):
    return schemathesis.openapi.from_asgi("/openapi.json", guarded_app,
                                          headers={"Authorization": f"Bearer {TOKEN}"})


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_schema_and_none_is_a_server_error(case):
    """schemathesis's default checks: no 5xx; status codes, content types, headers and bodies as
    the schema says; invalid input (a round number that is not an integer) refused with 422."""
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})


def test_devices_and_rounds_agree_with_the_store(fleet):
    from fastapi.testclient import TestClient

    client = TestClient(build_app(fleet.store, fleet.config, fleet.engine.status),
                        base_url="http://127.0.0.1")  # the API answers to loopback names only
    devices = {d["device_id"]: d for d in client.get("/devices").json()["devices"]}
    assert set(devices) == {"dev-0", "dev-1", "dev-2"}
    for row in fleet.store.devices():
        view = devices[row.id]
        assert view["plan"]["width_ratio"] == row.width_ratio == row.plan["width_ratio"]
        assert view["plan"]["predicted_peak_bytes"] == row.plan["predicted_peak_bytes"]
        assert view["epsilon_spent"] == row.epsilon and view["epsilon_budget"] == row.epsilon_budget
        assert view["device_class"] == row.profile["name"] == "rpi4-4gb"
        assert view["memory_available_bytes"] == row.profile["memory_available_bytes"]
        assert view["last_seen"] == row.last_seen
    assert [devices[d]["state"] for d in ("dev-0", "dev-1", "dev-2")] == ["online", "online", "exhausted"]
    assert [devices[d]["rounds_participated"] for d in ("dev-0", "dev-1", "dev-2")] == [2, 2, 0]
    assert devices["dev-0"]["epsilon_budget"] == 50.0 and devices["dev-0"]["epsilon_spent"] > 0
    with fleet.store.session() as s:  # each device's bytes over every round, as the store has them
        sent, kept = list(s.query(TaskRow)), list(s.query(UpdateRow))
    for device, view in devices.items():
        assert view["bytes_down"] == sum(t.bytes_down for t in sent if t.device == device) > 0
        assert view["bytes_up"] == sum(u.bytes for u in kept if u.device == device)
        assert view["plan"]["upload_bytes"] == fleet.store.device(device).plan["upload_bytes"]
    assert devices["dev-0"]["bytes_up"] > 0 and devices["dev-2"]["bytes_up"] == 0  # refused

    rounds = client.get("/rounds").json()["rounds"]
    assert [(r["number"], r["state"], r["selected"], r["accepted"], r["refused"]) for r in rounds] \
        == [(1, "committed", 3, 2, 1), (2, "committed", 2, 2, 0)]
    assert rounds[0]["refused_by_reason"] == {"privacy_budget": 1}
    for summary in rounds:
        number = summary["number"]
        detail = client.get(f"/rounds/{number}").json()
        assert {k: v for k, v in detail.items() if k != "tasks"} == summary
        tasks = fleet.store.tasks(number)
        with fleet.store.session() as s:
            updates = {u.device: u for u in s.query(UpdateRow).filter(UpdateRow.round == number)}
        assert {t["device_id"] for t in detail["tasks"]} == set(tasks)
        for task in detail["tasks"]:
            row, update = tasks[task["device_id"]], updates.get(task["device_id"])
            assert (task["state"], task["width_ratio"], task["bytes_down"]) == \
                (row.state, row.width_ratio, row.bytes_down)
            assert task["epsilon"] == (update.epsilon if update else None)
            assert task["bytes_up"] == (update.bytes if update else None)
        assert summary["accepted"] == len(updates) == fleet.store.update_count(number)
        assert summary["bytes_up"] == sum(u.bytes for u in updates.values())
        assert summary["epsilon_max"] == max(u.epsilon for u in updates.values())
    # ε grows from round to round, and a device's last update carries what it reports spent.
    assert detail["tasks"][0]["epsilon"] == devices["dev-0"]["epsilon_spent"]
    assert rounds[1]["epsilon_max"] > rounds[0]["epsilon_max"]

    missing = client.get("/rounds/99")
    assert missing.status_code == 404 and missing.json() == {"detail": "round 99 does not exist"}
    assert client.get("/rounds/two").status_code == 422
    assert client.get("/rounds/99999999999999999999999").status_code == 404


def test_each_device_has_its_last_outcome_and_the_events_say_what_happened(fleet):
    """/devices gives each device's newest task and what came of it; /events the registrations,
    rounds and refusals from the store, newest first; /docs lists every endpoint without a token."""
    from fastapi.testclient import TestClient

    config = fleet.config.model_copy(update={"http_token": SecretStr(TOKEN)})
    client = TestClient(build_app(fleet.store, config, fleet.engine.status), base_url="http://127.0.0.1")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    devices = {d["device_id"]: d for d in client.get("/devices", headers=auth).json()["devices"]}
    last = {device: view["last_task"] for device, view in devices.items()}
    assert [(last[d]["round"], last[d]["outcome"]) for d in ("dev-0", "dev-1", "dev-2")] \
        == [(2, "accepted"), (2, "accepted"), (1, "refused")]
    assert last["dev-2"]["reason"].startswith("privacy_budget: ") and last["dev-2"]["bytes_up"] is None
    detail = {t["device_id"]: t for t in client.get("/rounds/2", headers=auth).json()["tasks"]}
    assert last["dev-0"]["bytes_up"] == detail["dev-0"]["bytes_up"] > 0
    assert last["dev-0"]["local_accuracy"] == detail["dev-0"]["local_accuracy"]

    events = client.get("/events", headers=auth).json()["events"]
    assert [e["at"] for e in events] == sorted((e["at"] for e in events), reverse=True)
    kinds = [(e["kind"], e["round"], e["device"]) for e in events]
    assert sorted(kinds, key=str) == sorted(
        [("registered", None, f"dev-{i}") for i in range(3)]
        + [("round_opened", 1, None), ("round_committed", 1, None), ("refused", 1, "dev-2"),
           ("round_opened", 2, None), ("round_committed", 2, None)], key=str)
    by_kind = {(e["kind"], e["round"]): e["text"] for e in events}
    assert by_kind[("round_committed", 1)] == "round 1 committed: 2 of 3 accepted (1 refused)"
    assert by_kind[("refused", 1)].startswith("dev-2 refused its task of round 1: privacy_budget: ")
    assert len(client.get("/events?limit=2", headers=auth).json()["events"]) == 2
    assert client.get("/events?limit=0", headers=auth).status_code == 422
    assert client.get("/events").status_code == 401

    docs = client.get("/docs")  # no token: the page holds no data
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    for path in ("/healthz", "/status", "/devices", "/rounds", "/rounds/{number}", "/events", "/metrics"):
        assert f'data-path="{path}"' in docs.text, path
    assert "LastTaskView" in docs.text and "cdn" not in docs.text.lower()


def test_a_device_that_spent_its_budget_is_exhausted():
    """The engine marks a device exhausted when it refuses for its budget; one that spent it in
    the run's last round (to within Opacus's calibration tolerance) never refuses, but is spent."""
    from coordinator.service.http_api import budget_spent

    assert budget_spent(7.995, 8.0) and budget_spent(8.0, 8.0) and budget_spent(8.04, 8.0)
    assert not budget_spent(7.98, 8.0) and not budget_spent(None, 8.0) and not budget_spent(8.0, None)


def test_off_loopback_the_service_needs_a_token(fleet, monkeypatch, capsys):
    monkeypatch.delenv(HTTP_TOKEN_VARIABLE, raising=False)
    monkeypatch.setattr(CoordinatorService, "run", lambda self: pytest.fail("the service started"))
    # The service refuses to start: `fedprune coordinator serve` names the key and the variable.
    assert main(["coordinator", "serve", "--set", "http_host=0.0.0.0", "--set", "http_port=0"]) == 2
    error = capsys.readouterr().err
    assert "http_host '0.0.0.0' is not a loopback address" in error
    assert "http_token" in error and HTTP_TOKEN_VARIABLE in error
    # ... and so does the server itself, whatever built its settings.
    with pytest.raises(ConfigError, match="not a loopback address"):
        ApiServer(build_app(fleet.store, fleet.config, fleet.engine.status), "0.0.0.0", 0)

    monkeypatch.setenv(HTTP_TOKEN_VARIABLE, TOKEN)
    config = ServiceSettings.model_validate({**fleet.config.model_dump(exclude={"http_token"}),
                                             "http_host": "0.0.0.0", "http_port": 0})
    assert config.http_token.get_secret_value() == TOKEN
    server = ApiServer(build_app(fleet.store, config, fleet.engine.status), config.http_host,
                       config.http_port, config.http_token).start()
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/healthz").json() == {"ok": True}
            for path in ("/status", "/devices", "/rounds", "/rounds/1", "/events", "/metrics",
                         "/openapi.json"):
                refused = http.get(path)
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"] == "Bearer"
                wrong = http.get(path, headers={"Authorization": f"Bearer {TOKEN[:-1]}x"})
                assert wrong.status_code == 401, path
                assert http.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert metrics.headers["content-type"].startswith("text/plain")
            assert 'fedprune_rounds_total{outcome="committed"} 2.0' in metrics.text
            # The dashboard's static files hold no data: the page itself loads without the token,
            # and so does /docs (the endpoints and their fields, as the dashboard's script has them).
            assert http.get("/").status_code == http.get("/docs").status_code == 200
    finally:
        server.stop()


def test_the_cli_prints_status_and_devices_as_tables(fleet, monkeypatch, capsys):
    monkeypatch.delenv(HTTP_TOKEN_VARIABLE, raising=False)
    config = fleet.config.model_copy(update={"http_token": SecretStr(TOKEN)})
    server = ApiServer(build_app(fleet.store, config, fleet.engine.status), "127.0.0.1", 0,
                       config.http_token).start()
    try:
        assert main(["status", "--url", server.url, "--token", TOKEN]) == 0
        out = capsys.readouterr().out
        assert "fleet test: 2 of 2 rounds committed, 3 devices registered" in out
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["round", "state", "selected"])
        assert lines[header + 2].split()[:6] == ["1", "committed", "3", "2", "0", "1"]
        assert lines[header + 3].split()[:6] == ["2", "committed", "2", "2", "0", "0"]

        assert main(["devices", "--url", server.url, "--token", TOKEN]) == 0
        out = capsys.readouterr().out
        rows = {line.split()[0]: line.split() for line in out.splitlines()
                if line.startswith("dev-")}
        assert set(rows) == {"dev-0", "dev-1", "dev-2"}
        assert rows["dev-2"][1:3] == ["rpi4-4gb", "exhausted"]
        assert rows["dev-0"][1:4] == ["rpi4-4gb", "online", "1"]  # class, state, width

        # Without the token: a clear error, not a traceback.
        assert main(["devices", "--url", server.url]) == 2
        assert "401" in capsys.readouterr().err
    finally:
        server.stop()
    assert main(["status", "--url", server.url]) == 2  # nothing listens there now
    assert "cannot reach" in capsys.readouterr().err


def test_only_requests_naming_an_allowed_host_are_served_and_every_answer_is_unframeable(fleet):
    """DNS rebinding: a web page points a name of its own at 127.0.0.1 and reads the API from the
    browser; the browser then sends that name as Host, which the API refuses. Every answer, the
    refusal, a 404 and the dashboard's files included, forbids framing and loading from elsewhere."""
    config = fleet.config.model_copy(update={"http_allowed_hosts": ["coordinator.lan"]})
    server = ApiServer(build_app(fleet.store, config, fleet.engine.status), "127.0.0.1", 0).start()
    port = server.port
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}",
                         f"coordinator.lan:{port}"):
                assert http.get("/devices", headers={"Host": host}).status_code == 200, host
            answers = {}
            for host in (f"rebound.attacker.example:{port}", "127.0.0.1.attacker.example",
                         "coordinator.lan.attacker.example", "", "a b"):
                answers[host] = refused = http.get("/devices", headers={"Host": host})
                assert refused.status_code == 400, host
                detail = refused.json()["detail"]
                assert "does not answer to the Host" in detail and "http_allowed_hosts" in detail
                assert "127.0.0.1, localhost, [::1], coordinator.lan" in detail
            answers["ok"] = http.get("/devices")
            answers["404"] = http.get("/rounds/99")
            answers["index"] = http.get("/")
            answers["asset"] = http.get("/assets/app.js")
            answers["metrics"] = http.get("/metrics")
            for name, answer in answers.items():
                assert answer.headers["x-frame-options"] == "DENY", name
                csp = answer.headers["content-security-policy"]
                assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, name
                assert "script-src 'self'" in csp and "connect-src 'self'" in csp, name
            assert answers["index"].status_code == answers["asset"].status_code == 200
    finally:
        server.stop()


def test_any_host_only_with_a_token(monkeypatch):
    monkeypatch.delenv(HTTP_TOKEN_VARIABLE, raising=False)
    with pytest.raises(ValueError, match="any web page could read the API"):
        ServiceSettings(http_allowed_hosts=["*"])
    with pytest.raises(ValueError, match="is not a host name"):
        ServiceSettings(http_allowed_hosts=["coordinator.*"])
    assert ServiceSettings(http_allowed_hosts=["*"], http_token=TOKEN).http_allowed_hosts == ["*"]
