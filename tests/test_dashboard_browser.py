"""The fleet dashboard in a real browser: a running coordinator (its HTTP API on a free loopback
port), real edge agents (`fedprune-edge run` processes) over a real Mosquitto, and Debian's
headless Chromium driven by Playwright. After round 1 commits, the page must show a row for every
device with the width and ε the API gives, and charts with the round's data points drawn. The
coordinator requires a token: the page takes it from its URL fragment (`#token=...`), and without
it shows the token form and no data.

The fleet makes the table worth reading: a roomy device trains at full width, one whose memory
the planner fits at width 0.5 trains narrower, and a 512 MB gateway that no width fits registers
but is never selected (no ε).
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
        "rounds": {"total": 1, "devices_per_round": 2, "min_devices": 2, "deadline_seconds": 90,
                   "registration_grace_seconds": 0},
        "export": {"enabled": False}, "train": {"lr": 0.05}, "dp": {"target_epsilon": 8.0}})


def _fleet(config: ServiceSettings) -> list:
    """Profiles: full width, width NARROW (the memory the planner needs for it at the configured
    batch, as the planner's own prediction gives it), and nothing fits."""
    roomy = catalogue_profile("rpi4-4gb")
    spec = model_spec(config.model, (1, 28, 28), 10)
    need = predict_peak_bytes(width_spec(spec, NARROW), config.train.batch_size, SAMPLES,
                              MemoryCoefficients.load())
    tight = roomy.model_copy(update={"name": "tight-4gb",
                                     "memory_available_bytes": math.ceil((need + 2) / 0.9)})
    return [roomy, tight, catalogue_profile("gateway-512mb")]


def _get(url: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


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
                max_samples=SAMPLES, epsilon_budget=8.0,
                data={"clients": len(profiles), "device_index": i}), tmp_path))
        wait_until(lambda: service.store.last_committed() is not None, 150, "round 1 to commit",
                   watch=devices)
        wait_until(lambda: len(service.store.devices()) == len(profiles), 30,
                   "every device to register", watch=devices)
        base = service.http_url
        api_devices = {d["device_id"]: d for d in _get(f"{base}/devices")["devices"]}
        api_round = _get(f"{base}/rounds/1")
        assert api_round["state"] == "committed" and api_round["accepted"] == 2
        widths = {d: v["plan"]["width_ratio"] for d, v in api_devices.items()}
        assert widths["dev-0"] == 1.0 and widths["dev-1"] == NARROW, widths
        assert api_devices["dev-2"]["state"] == "unfit" and api_devices["dev-2"]["epsilon_spent"] is None

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
                    " && Number(document.getElementById('chart-epsilon').dataset.points) > 0",
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
                by_epsilon = sorted(api_devices, key=lambda d: (api_devices[d]["epsilon_spent"] or -1, d))
                assert order == by_epsilon
                page.click("th[data-sort='epsilon'] button")
                assert page.eval_on_selector_all(
                    "tr[data-device-id]", "rs => rs.map(r => r.dataset.deviceId)") == by_epsilon[::-1]
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
    print(f"screenshot: {tmp_path / 'dashboard.png'}")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000

