"""The fleet dashboard in a real browser: a running coordinator (its HTTP API on a free loopback
port), real edge agents (`fedprune-edge run` processes) over a real Mosquitto, and Debian's
headless Chromium driven by Playwright. After round 1 commits, the page must show a row for every
device with the width, ε, state and last-round outcome the API gives, charts with the round's data
points drawn, one ε line per device that trained, legends that name every series with its value
(uPlot's own showed "--"), the broker's state, and the event log. At 800 px nothing overflows the
page. The coordinator requires a token: the page takes it from its URL fragment (`#token=...`),
and without it shows the token form and no data; /docs lists the endpoints without one.

The fleet makes the table worth reading: a roomy device trains at full width and spends all of
its budget (ε 8 of 8: exhausted, though it never refused), one whose memory the planner fits at
width 0.5 trains narrower (ε 8 of 16: online), a 512 MB gateway that no width fits registers but
is never selected (unfit, no ε), and a device with a tiny budget refuses its task (exhausted).

The screenshots (1400 and 800 px wide, and /docs) are left in the test's tmp folder for a person
to look at; the test prints where.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from pathlib import Path

import pytest

from coordinator.planning.memory import MemoryCoefficients, predict_peak_bytes
from coordinator.service import CoordinatorService, ServiceSettings
from device_profiles import catalogue_profile
from edge_sdk.agent import EdgeSettings
from edge_sdk.models import model_spec
from edge_sdk.slicing import width_spec
from harness.devices import start_edge_agent
from harness.processes import stop_processes
from harness.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SAMPLES = 300  # training samples per device
TOKEN = "dashboard-test-token-0123456789"
NARROW = 0.5   # the width the tight device's memory allows
TARGET_EPSILON = 8.0
# Per device: dev-0 spends all of its budget in the one round, dev-1 half, dev-2 is never
# selected, dev-3's cannot pay for a task.
BUDGETS = [TARGET_EPSILON, 2 * TARGET_EPSILON, TARGET_EPSILON, 0.5]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium; "
           "scripts/test.sh installs it)")


def _settings(tmp_path: Path, broker_url: str, fleet: str) -> ServiceSettings:
    return ServiceSettings.model_validate({
        "strategy": "fedp3", "state_dir": str(tmp_path / "coordinator"), "http_port": 0,
        "http_token": TOKEN,  # the page takes it from its URL fragment
        # The API keeps serving after the last round: the browser opens the page then.
        "exit_when_done": False,
        "broker": {"url": broker_url, "fleet": fleet, "client_id": f"coordinator-{fleet}"},
        "rounds": {"total": 1, "devices_per_round": 3, "min_devices": 3, "deadline_seconds": 90,
                   "registration_grace_seconds": 0},
        "export": {"enabled": False}, "train": {"lr": 0.05}, "dp": {"target_epsilon": TARGET_EPSILON}})


def _fleet(config: ServiceSettings) -> list:
    """Profiles: full width, width NARROW (the memory the planner needs for it at the configured
    batch, as the planner's own prediction gives it), nothing fits, and full width again."""
    roomy = catalogue_profile("rpi4-4gb")
    spec = model_spec(config.model, (1, 28, 28), 10)
    need = predict_peak_bytes(width_spec(spec, NARROW), config.train.batch_size, SAMPLES,
                              MemoryCoefficients.load())
    tight = roomy.model_copy(update={"name": "tight-4gb",
                                     "memory_available_bytes": math.ceil((need + 2) / 0.9)})
    return [roomy, tight, catalogue_profile("gateway-512mb"), roomy]


def _get(url: str, token: str | None = TOKEN):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        body = reply.read()
        return json.loads(body) if reply.headers.get_content_type() == "application/json" else body.decode()


# Pixels of the canvas within a small distance of an #rrggbb colour: the series' strokes and points.
COLOURED_PIXELS = """([canvasId, hex]) => {
  const canvas = document.getElementById(canvasId);
  const {data} = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 200 && Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 40) n++;
  }
  return n;
}"""


def test_the_dashboard_shows_every_device_and_the_committed_round(tmp_path, broker):
    from playwright.sync_api import sync_playwright

    fleet = "dashboard"
    config = _settings(tmp_path, broker.url, fleet)
    profiles = _fleet(config)
    service = CoordinatorService(config)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    devices = []
    try:
        for i, profile in enumerate(profiles):
            profile.save(tmp_path / f"{profile.name}.json")
            devices.append(start_edge_agent(EdgeSettings(
                device_id=f"dev-{i}", broker=broker.url, fleet=fleet,
                state_dir=str(tmp_path / f"dev-{i}"), profile=str(tmp_path / f"{profile.name}.json"),
                max_samples=SAMPLES, epsilon_budget=BUDGETS[i],
                data={"clients": len(profiles), "device_index": i}), tmp_path))
        wait_until(lambda: service.store.last_committed() is not None, 150, "round 1 to commit",
                   watch=devices)
        wait_until(lambda: len(service.store.devices()) == len(profiles), 30,
                   "every device to register", watch=devices)
        base = service.http_url
        api_devices = {d["device_id"]: d for d in _get(f"{base}/devices")["devices"]}
        api_round = _get(f"{base}/rounds/1")
        assert api_round["state"] == "committed" and api_round["accepted"] == 2
        assert api_round["refused_by_reason"] == {"privacy_budget": 1}
        widths = {d: v["plan"]["width_ratio"] for d, v in api_devices.items()}
        assert widths["dev-0"] == 1.0 and widths["dev-1"] == NARROW, widths
        assert api_devices["dev-2"]["state"] == "unfit" and api_devices["dev-2"]["epsilon_spent"] is None
        # dev-0 spent its budget to within the calibration's tolerance and never refused: exhausted
        # all the same; dev-3 refused for its budget.
        assert api_devices["dev-0"]["epsilon_spent"] == pytest.approx(TARGET_EPSILON, abs=0.01)
        assert {d: v["state"] for d, v in api_devices.items()} == {
            "dev-0": "exhausted", "dev-1": "online", "dev-2": "unfit", "dev-3": "exhausted"}
        outcomes = {d: (v["last_task"] or {}).get("outcome") for d, v in api_devices.items()}
        assert outcomes == {"dev-0": "accepted", "dev-1": "accepted", "dev-2": None, "dev-3": "refused"}
        api_status = _get(f"{base}/status")
        api_events = _get(f"{base}/events")["events"]

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                outside: list[str] = []  # nothing may be fetched from any other host
                page.on("request", lambda request: None if request.url.startswith(base)
                        else outside.append(request.url))
                # The API's Content-Security-Policy must let the page do all it does: any
                # violation is reported by the browser as an event (and a console error).
                page.add_init_script("""window.cspViolations = [];
                    document.addEventListener('securitypolicyviolation',
                        (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));""")
                console: list[str] = []
                page.on("console", lambda message: console.append(message.text)
                        if message.type == "error" else None)
                loaded = page.goto(f"{base}/?interval=1#token={TOKEN}")
                assert "default-src 'none'" in loaded.headers["content-security-policy"]
                assert loaded.headers["x-frame-options"] == "DENY"
                page.wait_for_function(
                    "n => document.querySelectorAll('tr[data-device-id]').length === n"
                    " && Number(document.getElementById('chart-epsilon').dataset.points) > 0"
                    " && document.querySelectorAll('#event-list li').length > 0",
                    arg=len(profiles), timeout=20_000)
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

                rows = page.eval_on_selector_all("tr[data-device-id]", """rows => rows.map(r => ({
                    id: r.dataset.deviceId, state: r.dataset.state,
                    width: r.querySelector('td.width').textContent,
                    widthValue: Number(r.querySelector('td.width').dataset.value),
                    epsilon: r.querySelector('td.epsilon .gauge-text').textContent,
                    spent: r.querySelector('td.epsilon').dataset.spent}))""")
                assert sorted(r["id"] for r in rows) == sorted(api_devices)
                for row in rows:
                    device = api_devices[row["id"]]
                    plan = device["plan"]
                    assert row["state"] == device["state"]
                    assert row["widthValue"] == plan["width_ratio"]
                    assert row["width"] == (f"{plan['width_ratio']:.3f}" if plan["fits"] else "does not fit")
                    spent, budget = device["epsilon_spent"], device["epsilon_budget"]
                    assert row["epsilon"] == f"{'–' if spent is None else f'{spent:.2f}'} / {budget:.2f}"
                    assert (row["spent"] == "") if spent is None else float(row["spent"]) == spent

                # States: the badge says the API's state, and exhausted looks like neither online
                # nor unfit; why a device does not train is written under it, not in a hover.
                look = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
                    'tr[data-device-id]')].map(r => {
                      const badge = r.querySelector('td.state .badge');
                      const note = document.querySelector(`tr[data-note-for="${r.dataset.deviceId}"]`);
                      return [r.dataset.deviceId, {badge: badge.textContent,
                        colour: getComputedStyle(badge).backgroundColor,
                        outcome: r.querySelector('td.last').dataset.outcome,
                        note: note ? note.textContent : null}]; }))""")
                assert {d: v["badge"] for d, v in look.items()} == {d: v["state"] for d, v in api_devices.items()}
                assert look["dev-0"]["colour"] == look["dev-3"]["colour"]
                assert len({look[d]["colour"] for d in ("dev-0", "dev-1", "dev-2")}) == 3
                assert {d: v["outcome"] or None for d, v in look.items()} == outcomes
                assert look["dev-1"]["note"] is None
                assert "privacy budget is spent" in look["dev-0"]["note"]
                assert f"{api_devices['dev-0']['epsilon_spent']:.2f} of 8.00" in look["dev-0"]["note"]
                assert "refused round 1: privacy_budget:" in look["dev-3"]["note"]
                reasons = api_devices["dev-2"]["plan"]["reasons"]
                assert reasons and all(reason in look["dev-2"]["note"] for reason in reasons)

                # Legends: drawn by the page, every series named with its latest value; uPlot's own
                # (which showed "--" until the pointer was over the chart) is not drawn.
                legends = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
                    'figure.chart')].map(f => [f.id, [...f.querySelectorAll('.legend li')].map(
                      li => [li.dataset.series, li.textContent])]))""")
                assert page.evaluate("document.querySelectorAll('.u-legend').length") == 0
                for chart, items in legends.items():
                    assert items, chart
                    for name, text in items:
                        assert "--" not in text and text.startswith(name) and text != name, (chart, text)
                assert [name for name, _ in legends["chart-accuracy"]] == ["global model", "personalized, device mean"]
                assert legends["chart-accuracy"][0][1] == f"global model{api_round['global_accuracy']:.3f}"

                # ε: one line per device that trained, each in a style of its own.
                drawn_series = page.evaluate(
                    "() => window.fedpruneDashboard.charts.epsilon.series.slice(1).map(s => s.label)")
                styles = page.evaluate("""() => window.fedpruneDashboard.charts.epsilon.specs.map(
                    s => [s.stroke, s.dash.join(','), s.points.size])""")
                trained = sorted(t["device_id"] for t in api_round["tasks"] if t["epsilon"] is not None)
                assert drawn_series == trained == ["dev-0", "dev-1"]
                assert [name for name, _ in legends["chart-epsilon"]] == trained
                assert len({tuple(style) for style in styles}) == len(trained)

                charts = page.evaluate("""() => Object.fromEntries(Object.entries(
                    window.fedpruneDashboard.charts).map(([name, chart]) => [name, chart.data]))""")
                x, global_accuracy, personalized = charts["accuracy"]
                assert x == [1]
                assert global_accuracy == [pytest.approx(api_round["global_accuracy"])]
                assert personalized == [pytest.approx(api_round["personalized_accuracy"])]
                assert charts["bytes"] == [[1], [api_round["bytes_down"]], [api_round["bytes_up"]]]
                tasks = {t["device_id"]: t["epsilon"] for t in api_round["tasks"]}
                epsilon_x, *per_device = charts["epsilon"]
                assert epsilon_x == [1]
                drawn = [points[0] for points in per_device if points[0] is not None]
                assert sorted(drawn) == pytest.approx(sorted(e for e in tasks.values() if e is not None))
                assert len(drawn) == 2
                # The points are drawn, not only held: the personalized series' green is on the canvas.
                assert page.evaluate(COLOURED_PIXELS, ["chart-accuracy-canvas", "#16a34a"]) > 20

                # Sorting: clicking the ε header orders the rows by ε spent, then reverses them.
                page.click("th[data-sort='epsilon'] button")
                order = page.eval_on_selector_all("tr[data-device-id]", "rs => rs.map(r => r.dataset.deviceId)")
                by_epsilon = sorted(api_devices, key=lambda d: (
                    -1 if api_devices[d]["epsilon_spent"] is None else api_devices[d]["epsilon_spent"], d))
                assert order == by_epsilon
                page.click("th[data-sort='epsilon'] button")
                assert page.eval_on_selector_all(
                    "tr[data-device-id]", "rs => rs.map(r => r.dataset.deviceId)") == by_epsilon[::-1]
                # The broker's state as /status gives it ("unknown" from a coordinator without it).
                broker_state = (api_status.get("broker") or {}).get("state")
                broker_text = page.text_content("#broker")
                assert broker_text.startswith(f"broker: {broker_state or 'unknown'}"), broker_text
                # The event log: what /events says, newest first.
                shown = page.eval_on_selector_all(
                    "#event-list li", "ls => ls.map(l => [l.dataset.kind, l.querySelector('.event-text').textContent])")
                assert shown == [[e["kind"], e["text"]] for e in api_events][:len(shown)]
                kinds = [kind for kind, _ in shown]
                assert kinds.count("registered") == len(profiles)
                assert {"round_opened", "round_committed", "refused"} <= set(kinds)

                # 800 px wide: the charts follow the window, and nothing overflows the page.
                # (A full-page screenshot resizes the window too: wait for a resize after this one.)
                resizes = page.evaluate("window.fedpruneDashboard.state.resizes")
                page.set_viewport_size({"width": 800, "height": 1000})
                page.wait_for_function("n => window.fedpruneDashboard.state.resizes > n", arg=resizes,
                                       timeout=10_000)
                page.screenshot(path=str(tmp_path / "dashboard-800.png"), full_page=True)
                assert page.evaluate("document.documentElement.scrollWidth") <= 800
                overflowing = page.evaluate("""() => Object.entries(window.fedpruneDashboard.charts)
                    .filter(([name, c]) => c.width > document.getElementById(`chart-${name}`).clientWidth)
                    .map(([name]) => name)""")
                assert overflowing == []
                table = page.evaluate("""() => { const w = document.querySelector('.table-wrap');
                    return [w.scrollWidth, w.clientWidth]; }""")
                assert table[0] <= table[1], table  # the device table fits without its scrollbar

                # /docs: every endpoint, without the token.
                docs = page.goto(f"{base}/docs")
                assert docs.status == 200
                documented = page.eval_on_selector_all("section.endpoint", "ss => ss.map(s => s.dataset.path)")
                assert set(documented) >= {"/healthz", "/status", "/devices", "/rounds",
                                           "/rounds/{number}", "/events", "/metrics"}
                page.screenshot(path=str(tmp_path / "docs.png"))
                assert 'data-path="/devices"' in _get(f"{base}/docs", token=None)
                page.goto(f"{base}/?interval=1")

                # The token left the address bar for sessionStorage; without it the page asks.
                assert "token" not in page.url
                assert page.evaluate("sessionStorage.getItem('fedprune-dashboard-token')") == TOKEN
                assert errors == [] and outside == []
                assert page.evaluate("window.cspViolations") == []
                assert not [m for m in console if "Content Security Policy" in m], console
                anonymous = browser.new_page()
                anonymous.goto(f"{base}/?interval=1")
                anonymous.wait_for_selector("#token-form:not([hidden])", timeout=10_000)
                assert anonymous.get_attribute("#connection", "data-state") == "unauthorized"
                assert anonymous.eval_on_selector_all("tr[data-device-id]", "rs => rs.length") == 0
            finally:
                browser.close()
    finally:
        service.stopping.set()
        thread.join(30)
        stop_processes(devices)
    print(f"screenshots: {tmp_path}/dashboard.png, dashboard-800.png, docs.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000

