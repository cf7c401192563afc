// The fleet dashboard: polls the coordinator's JSON API and renders the broker's state, the
// device table, the round progress, three charts (uPlot, vendored) and the event log. Plain
// JavaScript, no build step.
//
// API (docs at /docs, code in coordinator/service/http_api.py): GET /devices (with each device's
// last task and its outcome), /rounds, /rounds/{n} (with the round's tasks: per-device ε),
// /status (with `broker` when the coordinator reports it), /events. A coordinator that requires a
// token gets it as `Authorization: Bearer <token>`; the page takes it from the URL fragment
// (#token=...), keeps it in sessionStorage and removes it from the address bar.
//
// The charts draw what an operator watches over rounds: the fleet's accuracy and bytes (sums
// over the round's devices, as the API's rounds give them) and each device's ε, one line per
// device, each in its own colour, dash and marker size, so devices that spent the same ε stay
// visible as concentric markers. What each device did in its last round (outcome, accuracy,
// bytes) is in the table. Each chart's legend is drawn here (uPlot's shows "--" until hovered).
//
// For tests and scripts: every device row is tr[data-device-id] (a device's note, why it is
// unfit, exhausted or was refused, is the next row, tr[data-note-for]); its cells td.width and
// td.epsilon carry the API's values in data-value (and data-spent/data-budget); each chart's
// figure has data-points (points drawn) and its legend li[data-series]; window.fedpruneDashboard
// exposes the charts (uPlot instances: .data is what they draw) and the last data fetched.
"use strict";

(function () {
  const POLL_MS = Math.max(500, Number(new URLSearchParams(location.search).get("interval")) * 1000 || 3000);
  const TOKEN_KEY = "fedprune-dashboard-token";
  const FINAL_ROUND_STATES = new Set(["committed", "aborted"]);
  const DETAILS_PER_POLL = 20; // round details fetched per poll while catching up on history
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
                   "#db2777", "#4b5563", "#65a30d", "#7c3aed", "#0d9488"];
  // The ε lines' dashes and marker sizes, cycled apart from the colours: lines that coincide
  // show as interleaved dashes and concentric markers (the first drawn, underneath, largest).
  const DASHES = [[], [9, 4], [3, 3], [12, 3, 3, 3], [5, 5], [1, 4]];
  const MARKERS = [13, 10, 7, 5];
  const EVENTS_SHOWN = 40;

  const $ = (selector) => document.querySelector(selector);
  const state = {
    devices: [], rounds: [], status: null, details: new Map(), events: null,
    sort: { key: "device", descending: false },
    deadlineAt: null, // performance.now() at which the open round's deadline passes
    refreshes: 0,
    resizes: 0, // window resizes the charts have followed
  };
  const charts = {};
  window.fedpruneDashboard = { state, charts };

  // --- the token -----------------------------------------------------------------------------
  function takeToken() {
    const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
    const token = fragment.get("token");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      fragment.delete("token");
      const rest = fragment.toString();
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }
  let token = takeToken();
  window.addEventListener("hashchange", () => { token = takeToken(); poll(); });

  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#token-input").value.trim();
    if (value) {
      sessionStorage.setItem(TOKEN_KEY, value);
      token = value;
      $("#token-form").hidden = true;
      poll();
    }
  });

  class ApiError extends Error {
    constructor(path, status, detail) {
      super(`${path}: HTTP ${status}${detail ? " (" + detail + ")" : ""}`);
      this.status = status;
    }
  }

  async function api(path) {
    // Relative to the page, so a dashboard behind a path prefix still reaches its API.
    const url = new URL(path.replace(/^\//, ""), new URL(".", location.href));
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(url, { headers, cache: "no-store" });
    if (!response.ok) {
      let detail = "";
      try { detail = (await response.json()).detail || ""; } catch (_) { /* not JSON */ }
      throw new ApiError(path, response.status, typeof detail === "string" ? detail : "");
    }
    return response.json();
  }

  // --- formatting ----------------------------------------------------------------------------
  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
  // The fixed formats of the table's cells (tests compare against them).
  const formatWidth = (w) => (isNumber(w) ? w.toFixed(3) : "–");
  const formatEpsilon = (e) => (isNumber(e) ? e.toFixed(2) : "–");
  const formatKeep = (k) => (isNumber(k) ? k.toFixed(2) : "–");
  const formatAccuracy = (a) => (isNumber(a) ? a.toFixed(3) : "–");

  function formatTime(unixSeconds) {
    if (!isNumber(unixSeconds)) return typeof unixSeconds === "string" ? unixSeconds : "–";
    return new Date(1000 * unixSeconds).toLocaleTimeString();
  }

  function formatBytes(bytes) {
    if (!isNumber(bytes)) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = bytes, unit = 0;
    while (Math.abs(value) >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return `${value >= 100 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
  }

  function formatSeconds(s) {
    if (!isNumber(s)) return "–";
    if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    const m = Math.floor(s / 60);
    return `${m} min ${Math.round(s - 60 * m)} s`;
  }

  // "a / b" whose halves stay whole: a narrow window wraps it at the slash.
  const pair = (a, b) => [el("span", { class: "half", text: a }), " / ", el("span", { class: "half", text: b })];

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("data-")) node.setAttribute(name, String(value));
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  // --- the device table ----------------------------------------------------------------------
  const plan = (d) => d.plan || {};
  const fits = (d) => plan(d).fits !== false && d.plan != null;
  const last = (d) => d.last_task || null;
  const OUTCOME_ORDER = { accepted: 0, pending: 1, straggled: 2, rejected: 3, refused: 4 };
  const SORT_KEYS = {
    device: (d) => d.device_id,
    state: (d) => d.state || "",
    width: (d) => (fits(d) && isNumber(plan(d).width_ratio) ? plan(d).width_ratio : -1),
    transfer: (d) => (isNumber(plan(d).download_keep) ? plan(d).download_keep + (plan(d).upload_keep || 0) : -1),
    memory: (d) => (isNumber(plan(d).predicted_peak_bytes) ? plan(d).predicted_peak_bytes : -1),
    last: (d) => (last(d) ? 10 * (OUTCOME_ORDER[last(d).outcome] ?? 5) - 1 / (1 + last(d).round) : 99),
    accuracy: (d) => (last(d) && isNumber(last(d).local_accuracy) ? last(d).local_accuracy : -1),
    bytes: (d) => (last(d) ? last(d).bytes_down + (last(d).bytes_up || 0) : -1),
    rounds: (d) => d.rounds_participated || 0,
    epsilon: (d) => (isNumber(d.epsilon_spent) ? d.epsilon_spent : -1),
  };

  function compareDevices(a, b) {
    const key = SORT_KEYS[state.sort.key];
    const x = key(a), y = key(b);
    let order = typeof x === "string" ? x.localeCompare(y, undefined, { numeric: true }) : x - y;
    if (order === 0) order = a.device_id.localeCompare(b.device_id, undefined, { numeric: true });
    return state.sort.descending ? -order : order;
  }

  function gaugeLevel(fraction) {
    if (fraction >= 1) return "exhausted";
    if (fraction >= 0.8) return "high";
    if (fraction >= 0.5) return "medium";
    return "low";
  }

  function epsilonCell(d) {
    const spent = d.epsilon_spent, budget = d.epsilon_budget;
    const cell = el("td", { class: "epsilon", "data-value": isNumber(spent) ? spent : "",
                            "data-spent": isNumber(spent) ? spent : "",
                            "data-budget": isNumber(budget) ? budget : "" });
    const text = `${formatEpsilon(spent)} / ${isNumber(budget) ? formatEpsilon(budget) : "∞"}`;
    const fraction = d.state === "exhausted" ? 1
      : isNumber(spent) && isNumber(budget) && budget > 0 ? Math.min(1, spent / budget) : 0;
    const gauge = el("div", { class: "gauge", role: "meter", "aria-valuemin": "0",
                              "aria-valuemax": isNumber(budget) ? String(budget) : undefined,
                              "aria-valuenow": isNumber(spent) ? String(spent) : "0",
                              "aria-label": "privacy budget spent" },
                     el("div", { class: `gauge-fill ${gaugeLevel(fraction)}` }));
    gauge.firstChild.style.width = `${(100 * fraction).toFixed(1)}%`;
    cell.append(el("div", { class: "epsilon-inner" }, gauge, el("span", { class: "gauge-text", text })));
    cell.dataset.text = text;
    return cell;
  }

  // Why a device does not train, or did not last round, in words (null: nothing to explain).
  function deviceNote(d) {
    const p = plan(d), task = last(d);
    if (d.state === "unfit") {
      return `not selected, no plan fits: ${(p.reasons || []).join("; ") || "the planner gave no reason"}`;
    }
    if (d.state === "exhausted") {
      if (task && task.outcome === "refused" && task.reason) return `no more tasks: it refused round ${task.round}: ${task.reason}`;
      return `no more tasks: its privacy budget is spent (ε ${formatEpsilon(d.epsilon_spent)} of ${formatEpsilon(d.epsilon_budget)})`;
    }
    if (task && (task.outcome === "refused" || task.outcome === "rejected") && task.reason) {
      return `round ${task.round}: ${task.outcome}: ${task.reason}`;
    }
    return null;
  }

  function lastCell(d) {
    const task = last(d);
    if (!task) return el("td", { class: "last muted", "data-outcome": "", text: fits(d) ? "not selected yet" : "–" });
    return el("td", { class: "last", "data-outcome": task.outcome, "data-round": task.round, title: task.reason || undefined },
              el("span", { class: `badge outcome-${task.outcome}`, text: task.outcome }), " ",
              el("span", { class: "muted half", text: `round ${task.round}` }));
  }

  function deviceRows(d) {
    const p = plan(d);
    const fit = fits(d);
    const task = last(d);
    const decisions = p.decisions && typeof p.decisions === "object"
      ? Object.entries(p.decisions).map(([k, v]) => `${k}: ${v}`).join("\n") : "";
    const note = deviceNote(d);
    const row = el("tr", { "data-device-id": d.device_id, "data-state": d.state,
                           class: `state-${d.state}${note ? " has-note" : ""}` });
    row.append(
      el("td", { class: "device" }, el("span", { class: "device-id", text: d.device_id }),
         el("span", { class: "device-class muted", text: d.device_class || "–" })),
      el("td", { class: "state" }, el("span", { class: `badge state-${d.state}`, text: d.state || "–" })),
      el("td", { class: "width num", "data-value": isNumber(p.width_ratio) ? p.width_ratio : "",
                 title: fit ? decisions || undefined : undefined,
                 text: fit ? formatWidth(p.width_ratio) : "does not fit" }),
      el("td", { class: "transfer" }, ...pair(`${p.download_dtype || "–"} ${formatKeep(p.download_keep)}`,
                                              `${p.upload_dtype || "–"} ${formatKeep(p.upload_keep)}`)),
      el("td", { class: "memory num" + (isNumber(p.predicted_peak_bytes) && isNumber(p.memory_limit_bytes)
                                        && p.predicted_peak_bytes > p.memory_limit_bytes ? " over" : ""),
                 title: `memory available ${formatBytes(d.memory_available_bytes)}` },
         ...pair(formatBytes(p.predicted_peak_bytes), formatBytes(p.memory_limit_bytes))),
      lastCell(d),
      el("td", { class: "accuracy num", text: formatAccuracy(task && task.local_accuracy) }),
      el("td", { class: "bytes num" }, ...(task ? pair(formatBytes(task.bytes_down), formatBytes(task.bytes_up)) : ["–"])),
      el("td", { class: "rounds num", text: String(d.rounds_participated ?? 0) }),
      epsilonCell(d),
    );
    if (!note) return [row];
    const noteRow = el("tr", { class: `note state-${d.state}`, "data-note-for": d.device_id },
                       el("td", { colspan: "10", text: note }));
    return [row, noteRow];
  }

  function renderDevices() {
    const body = $("#devices tbody");
    const devices = [...state.devices].sort(compareDevices);
    body.replaceChildren(...devices.flatMap(deviceRows));
    $("#devices-empty").hidden = devices.length > 0;
    const counts = {};
    for (const d of devices) counts[d.state] = (counts[d.state] || 0) + 1;
    $("#device-count").textContent = devices.length
      ? `(${devices.length}: ${Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(", ")})` : "";
    for (const th of document.querySelectorAll("#devices th[data-sort]")) {
      const active = th.dataset.sort === state.sort.key;
      th.setAttribute("aria-sort", active ? (state.sort.descending ? "descending" : "ascending") : "none");
    }
  }

  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      state.sort = { key, descending: state.sort.key === key ? !state.sort.descending : false };
      renderDevices();
    });
  }

  // --- round progress ------------------------------------------------------------------------
  function renderProgress() {
    const status = state.status || {};
    const current = status.current;
    const total = status.rounds_total;
    const committed = state.rounds.filter((r) => r.state === "committed");
    const last = committed[committed.length - 1];
    const line = $("#round-line");
    const facts = [];
    let accepted = 0, refused = 0, selected = 0;
    if (current) {
      const answered = current.answered || {};
      accepted = answered.accepted || 0;
      refused = (answered.refused || 0) + (answered.rejected || 0);
      selected = current.selected || 0;
      line.textContent = `Round ${current.round}${isNumber(total) ? " of " + total : ""}: ${current.state}, `
        + `${accepted} / ${selected} accepted`;
      line.dataset.round = current.round;
      line.dataset.state = current.state;
      facts.push(["deadline in", null, "deadline"]);
      if (isNumber(current.quorum)) facts.push(["quorum", `${current.quorum} updates`]);
      if (refused) facts.push(["refused or rejected", String(refused)]);
    } else if (last) {
      const done = isNumber(total) && committed.length >= total;
      line.textContent = done ? `Done: ${committed.length} of ${total} rounds committed`
        : `Round ${last.number}${isNumber(total) ? " of " + total : ""} committed; waiting for the next`;
      line.dataset.round = last.number;
      line.dataset.state = done ? "done" : "waiting";
      accepted = last.accepted || 0;
      selected = last.selected || 0;
    } else {
      line.textContent = "Waiting for devices to register and the first round to open";
      line.dataset.round = "";
      line.dataset.state = "waiting";
    }
    if (last) {
      facts.push(["last committed", `round ${last.number}: ${last.accepted ?? "–"} / ${last.selected ?? "–"} accepted`
        + (last.straggled ? `, ${last.straggled} straggled` : "")
        + `, ${formatSeconds(last.duration_seconds)}`]);
    }
    if (isNumber(total)) facts.push(["rounds committed", `${committed.length} / ${total}`]);
    const fill = (id, n) => { $(id).style.width = selected ? `${(100 * n / selected).toFixed(1)}%` : "0%"; };
    fill("#round-bar-accepted", accepted);
    fill("#round-bar-refused", refused);
    $("#round-facts").replaceChildren(...facts.flatMap(([term, text, id]) =>
      [el("dt", { text: term }), el("dd", { text: text ?? "", id: id ? `round-${id}` : undefined })]));
    state.deadlineAt = current && isNumber(current.deadline_in)
      ? performance.now() + 1000 * current.deadline_in : null;
    tickDeadline();
  }

  function tickDeadline() {
    const node = $("#round-deadline");
    if (!node || state.deadlineAt === null) return;
    node.textContent = formatSeconds(Math.max(0, (state.deadlineAt - performance.now()) / 1000));
  }
  setInterval(tickDeadline, 1000);

  // --- charts --------------------------------------------------------------------------------
  function chartWidth(figure) {
    return Math.max(200, Math.floor(figure.querySelector(".plot").clientWidth || figure.clientWidth) - 4);
  }

  const bytesAxis = (u, values) => values.map(formatBytes);

  function seriesSpec(label, color, { dash = [], size = 6 } = {}) {
    return { label, stroke: color, width: 2, dash, spanGaps: true,
             points: { show: true, size, fill: color, stroke: color } };
  }

  const SVG = "http://www.w3.org/2000/svg";
  function swatch(spec) {
    const svg = document.createElementNS(SVG, "svg");
    for (const [k, v] of Object.entries({ width: "30", height: "14", viewBox: "0 0 30 14", "aria-hidden": "true" })) {
      svg.setAttribute(k, v);
    }
    const line = document.createElementNS(SVG, "line");
    for (const [k, v] of Object.entries({ x1: "1", y1: "7", x2: "29", y2: "7", stroke: spec.stroke,
                                          "stroke-width": "2", "stroke-dasharray": spec.dash.join(" ") || "none" })) {
      line.setAttribute(k, v);
    }
    const dot = document.createElementNS(SVG, "circle");
    for (const [k, v] of Object.entries({ cx: "15", cy: "7", r: String(Math.min(6, spec.points.size / 2)), fill: spec.stroke })) {
      dot.setAttribute(k, v);
    }
    svg.append(line, dot);
    return svg;
  }

  // The legend under a chart: each series' style, name and latest value.
  function renderLegend(figure, series, data, formatValue) {
    const items = series.map((spec, i) => {
      const values = data[i + 1].filter(isNumber);
      const latest = values.length ? formatValue(values[values.length - 1]) : "no value yet";
      return el("li", { "data-series": spec.label, title: spec.title || undefined }, swatch(spec),
                el("span", { class: "legend-label", text: spec.label }),
                el("span", { class: "legend-value", text: latest }));
    });
    figure.querySelector(".legend").replaceChildren(...items);
  }

  // Series with the same points lie on top of each other: say so under the legend.
  function renderOverlap(figure, series, data) {
    const groups = new Map();
    series.forEach((spec, i) => {
      if (!data[i + 1].some(isNumber)) return;
      const key = JSON.stringify(data[i + 1]);
      groups.set(key, [...(groups.get(key) || []), spec.label]);
    });
    const same = [...groups.values()].filter((labels) => labels.length > 1);
    let note = figure.querySelector(".chart-note");
    if (!same.length) { if (note) note.remove(); return; }
    if (!note) { note = el("p", { class: "chart-note muted" }); figure.append(note); }
    const names = (labels) => (labels.length === 2 ? labels.join(" and ")
      : `${labels.slice(0, -1).join(", ")} and ${labels[labels.length - 1]}`);
    note.textContent = `${same.map(names).join("; ")}: the same value every round, so their lines `
      + "coincide (told apart by dash and marker size).";
  }

  // (Re)draw one chart: a new uPlot when its series change, setData otherwise.
  function drawChart(name, series, data, axisValues, yRange, formatValue) {
    const figure = $(`#chart-${name}`);
    const signature = series.map((s) => s.label).join("\u0000");
    let chart = charts[name];
    if (!chart || chart.signature !== signature) {
      if (chart) chart.destroy();
      chart = new uPlot({
        width: chartWidth(figure), height: 220,
        // One round alone sits in the middle, not between rounds 0 and 2.
        scales: { x: { time: false, range: (u) => {
                    const xs = u.data[0];
                    if (!xs.length) return [0, 1];
                    return xs.length === 1 ? [xs[0] - 0.5, xs[0] + 0.5] : [xs[0], xs[xs.length - 1]];
                  } },
                  y: yRange ? { range: yRange } : {} },
        axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100], values: (u, v) => v.map(String) },
               { values: axisValues, size: 64 }],
        series: [{ label: "round" }, ...series],
        legend: { show: false },
      }, data, figure.querySelector(".plot"));
      chart.signature = signature;
      chart.specs = series; // the styles asked for, for tests and scripts
      chart.ctx.canvas.id = `chart-${name}-canvas`;
      charts[name] = chart;
    } else {
      chart.setData(data);
    }
    renderLegend(figure, series, data, formatValue);
    renderOverlap(figure, series, data);
    const points = data.slice(1).reduce((n, ys) => n + ys.filter(isNumber).length, 0);
    figure.dataset.points = String(points);
    figure.dataset.rounds = String(data[0].length);
  }

  function renderCharts() {
    const committed = state.rounds.filter((r) => r.state === "committed")
      .sort((a, b) => a.number - b.number);
    const xs = committed.map((r) => r.number);
    const num = (v) => (isNumber(v) ? v : null);
    const fixed = (digits) => (v) => v.toFixed(digits);

    drawChart("accuracy",
              [{ ...seriesSpec("global model", PALETTE[0]), title: "the aggregated model on the coordinator's held-out test set" },
               { ...seriesSpec("personalized, device mean", PALETTE[2]), title: "each device's own model on its own test split, averaged over the round's devices" }],
              [xs, committed.map((r) => num(r.global_accuracy)), committed.map((r) => num(r.personalized_accuracy))],
              (u, values) => values.map(fixed(2)), [0, 1], fixed(3));

    drawChart("bytes", [seriesSpec("down, all devices", PALETTE[1]), seriesSpec("up, all devices", PALETTE[3])],
              [xs, committed.map((r) => num(r.bytes_down)), committed.map((r) => num(r.bytes_up))],
              bytesAxis, (u, min, max) => [0, max > 0 ? max * 1.1 : 1000], formatBytes);

    // ε after each committed round, per device, from that round's tasks: a line per device that
    // has a point, or may still get one (neither unfit nor exhausted).
    const ids = [...new Set([
      ...state.devices.filter((d) => d.state !== "unfit" && d.state !== "exhausted").map((d) => d.device_id),
      ...committed.flatMap((r) => (state.details.get(r.number)?.tasks || [])
        .filter((t) => isNumber(t.epsilon)).map((t) => t.device_id))])]
      .sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    const perDevice = ids.map((id) => committed.map((r) => {
      const task = (state.details.get(r.number)?.tasks || []).find((t) => t.device_id === id);
      return task && isNumber(task.epsilon) ? task.epsilon : null;
    }));
    const budgets = state.devices.map((d) => d.epsilon_budget).filter(isNumber);
    const top = Math.max(0, ...budgets, ...perDevice.flat().filter(isNumber));
    drawChart("epsilon",
              ids.map((id, i) => seriesSpec(id, PALETTE[i % PALETTE.length],
                                            { dash: DASHES[i % DASHES.length], size: MARKERS[i % MARKERS.length] })),
              [xs, ...perDevice], (u, values) => values.map(fixed(1)),
              () => [0, top > 0 ? top * 1.05 : 1], fixed(2));
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const [name, chart] of Object.entries(charts)) {
        chart.setSize({ width: chartWidth($(`#chart-${name}`)), height: 220 });
      }
      state.resizes += 1;
    }, 150);
  });

  // --- the broker and the event log ----------------------------------------------------------
  const BROKER_LEVELS = { connected: "ok", connecting: "warn", retrying: "warn", reconnecting: "warn" };

  function renderBroker() {
    const broker = state.status && state.status.broker;
    const node = $("#broker");
    if (!broker || typeof broker !== "object") {
      node.dataset.state = "unknown";
      node.dataset.level = "unknown";
      node.textContent = "broker: unknown";
      node.title = "this coordinator does not report its broker connection";
      return;
    }
    const kind = String(broker.state || "unknown");
    const parts = [`broker: ${kind}`];
    if (broker.since !== undefined && broker.since !== null) parts.push(`since ${formatTime(broker.since)}`);
    if (isNumber(broker.reconnects) && broker.reconnects > 0) {
      parts.push(`${broker.reconnects} reconnect${broker.reconnects === 1 ? "" : "s"}`);
    }
    const error = broker.last_error ? String(broker.last_error) : "";
    if (error && kind !== "connected") parts.push(error.length > 90 ? error.slice(0, 89) + "…" : error);
    node.dataset.state = kind;
    node.dataset.level = BROKER_LEVELS[kind] || "bad";
    node.textContent = parts.join(" · ");
    node.title = error ? `last error: ${error}` : "";
  }

  function renderEvents() {
    const list = $("#event-list");
    if (state.events === null) {
      list.replaceChildren();
      $("#events-empty").textContent = "This coordinator has no event log (/events).";
      $("#events-empty").hidden = false;
      return;
    }
    const events = state.events.slice(0, EVENTS_SHOWN);
    list.replaceChildren(...events.map((e) => el("li", { "data-kind": e.kind },
      el("time", { text: formatTime(e.at), title: isNumber(e.at) ? new Date(1000 * e.at).toLocaleString() : undefined }),
      el("span", { class: `badge event-${e.kind}`, text: e.kind.replace("_", " ") }),
      el("span", { class: "event-text", text: e.text }))));
    $("#events-empty").textContent = "Nothing has happened yet.";
    $("#events-empty").hidden = events.length > 0;
  }

  // --- polling -------------------------------------------------------------------------------
  async function fetchDetails() {
    // Final rounds are fetched once; the open one every poll.
    const wanted = state.rounds
      .filter((r) => !FINAL_ROUND_STATES.has(r.state) || !state.details.has(r.number)
                     || !FINAL_ROUND_STATES.has(state.details.get(r.number).state))
      .sort((a, b) => b.number - a.number)
      .slice(0, DETAILS_PER_POLL);
    const fetched = await Promise.all(wanted.map((r) => api(`/rounds/${r.number}`)));
    for (const detail of fetched) state.details.set(detail.number, detail);
  }

  function setConnection(kind, text) {
    const node = $("#connection");
    node.dataset.state = kind;
    node.textContent = text;
  }

  let timer = null;
  let polling = false;
  async function poll() {
    clearTimeout(timer);
    if (polling) return;
    polling = true;
    try {
      const [devices, rounds, status, events] = await Promise.all([
        api("/devices"), api("/rounds"), api("/status"),
        // A coordinator from before the event log answers 404: the rest of the page still works.
        api(`/events?limit=${EVENTS_SHOWN}`).catch((e) => (e instanceof ApiError && e.status === 404 ? null : Promise.reject(e)))]);
      state.devices = devices.devices || [];
      state.rounds = rounds.rounds || [];
      state.status = status;
      state.events = events ? events.events || [] : null;
      await fetchDetails();
      $("#fleet-name").textContent = status.fleet ? `· ${status.fleet}` : "";
      renderBroker();
      renderDevices();
      renderProgress();
      renderCharts();
      renderEvents();
      state.refreshes += 1;
      document.body.dataset.refreshes = String(state.refreshes);
      setConnection("live", `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        setConnection("unauthorized", token ? "the token was refused" : "a token is required");
        $("#token-form").hidden = false;
      } else {
        setConnection("error", `coordinator unreachable (${error.message}); retrying`);
      }
    } finally {
      polling = false;
      timer = setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
