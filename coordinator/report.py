"""`fedprune report`: figures of one or more runs, as PNG files and an HTML page that shows them.

It reads the results files fedprune writes:

- `fedprune simulate --json-out`: `rounds[]` (accuracies, bytes, the devices sent a task with
  their outcome, width, keeps and, under DP, the epsilon spent so far), the fleet's plans under
  `clients[]` (with `--fleet`) and each device's final epsilon under `privacy[]`;
- the coordinator service's round summaries: `fedprune demo --json-out` (`rounds[]` are the
  engine's summaries: selected, accepted, refused, rejected, missing, straggled, bytes,
  accuracies, epsilon_max; `devices[]` the registered devices with their plans and epsilon), or
  a list of such runs (benchmarks/service_overhead.py);
- a benchmark's bundle of runs, `{"runs": [{..., "result": RESULTS}]}` (benchmarks/payoff.py),
  or one run wrapped as `{"label": ..., "result": RESULTS}`.

Figures, each drawn when some run has what it needs (otherwise the page says why it is missing):
`accuracy_by_round.png` and `accuracy_by_bytes.png` (every run on one set of axes: personalized
solid, global dashed, and the chance level dotted where the results give it: each device's
majority class on its own test split, the bar personalized accuracy must clear),
`epsilon_by_device.png` (a line per device, each in its own colour, line style and marker, so
devices that spent the same ε stay visible, and the title names them), `fleet_plans.png` (width
and download / upload keep per device), `devices_per_round.png` (devices in and out of each
round). Matplotlib draws through its Agg canvas directly (no pyplot state, no display). The page's
runs table says what each run was: strategy, model, clients, partition and DP, as its results
file records them ("-" where it does not).

A results file is parsed with the bounded JSON reader (edge_sdk.validation: nesting, integer
lengths and size bounded, NaN and Infinity refused). A file that cannot be read or is not a
results file is left out, named with what is wrong, and the other files are still drawn
(`Report.unread`); a valid file with fields missing loses only the figures that need them. Text
from the files (labels, device names) is drawn as it is, never as mathtext (a `$` in a label
made matplotlib raise), and a figure matplotlib still cannot draw is listed with the reason while
the others are drawn (`Report.failed`).
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections.abc import Sequence

import numpy as np
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.validation import load_json

FIGURES = ("accuracy_by_round.png", "accuracy_by_bytes.png", "epsilon_by_device.png",
           "fleet_plans.png", "devices_per_round.png", "accuracy_by_tier.png")
DPI = 110
MAX_COLUMNS = 3
MAX_RESULTS_BYTES = 256 * 1024 * 1024  # a results file of thousands of rounds is a few MB


class ReportError(ValueError):
    """A results file that cannot be read as one; the message starts with the file's name."""


# --- reading ---------------------------------------------------------------------------------


@dataclass
class PlanRow:
    device: str
    width: float | None
    download_keep: float | None
    upload_keep: float | None
    selected: bool = True


@dataclass
class Run:
    """One run's series, whatever file format it came from. NaN marks a round without the value."""

    label: str
    source: str
    kind: str  # "simulation" or "service"
    rounds: list[int] = field(default_factory=list)
    personalized: list[float] = field(default_factory=list)
    global_accuracy: list[float] = field(default_factory=list)
    cumulative_bytes: list[float] = field(default_factory=list)
    # Devices in and out per round: series name -> one count per round.
    flows: dict[str, list[int]] = field(default_factory=dict)
    epsilon_by_round: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    epsilon_final: dict[str, float] = field(default_factory=dict)
    epsilon_max_by_round: list[tuple[int, float]] = field(default_factory=list)
    epsilon_budget: float | None = None
    plans: list[PlanRow] = field(default_factory=list)
    plans_from: str = ""  # "plans" (the planner's) or "tasks" (what the rounds sent)
    chance: float | None = None  # each device's majority class on its own test split, mean
    # What the run was, as its file records it (None: it does not say).
    strategy: str | None = None
    model: str | None = None
    clients: str | None = None
    partition: str | None = None
    dp: str | None = None
    # A fleet's final accuracy of the model each device runs: per tier, and over the fleet.
    tiers: dict[str, float] = field(default_factory=dict)
    fleet_accuracy: float | None = None

    def has(self, series: list[float]) -> bool:
        return any(not math.isnan(v) for v in series)

    def last(self, series: list[float]) -> float | None:
        values = [v for v in series if not math.isnan(v)]
        return values[-1] if values else None

    @property
    def epsilon_max(self) -> float | None:
        values = [*self.epsilon_final.values(), *(e for _, e in self.epsilon_max_by_round),
                  *(e for points in self.epsilon_by_round.values() for _, e in points)]
        return max(values) if values else None

    @property
    def lost_anything(self) -> bool:
        return any(sum(counts) for name, counts in self.flows.items()
                   if name not in ("selected", "sent", "accepted"))


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: expected a number, got {_show(value)}")
    return float(value)


def _count(value: Any, where: str) -> int | None:
    number = _number(value, where)
    if number is None:
        return None
    if number < 0 or number != int(number):
        raise ReportError(f"{where}: expected a count, got {_show(value)}")
    return int(number)


def _share_of(value: Any, where: str) -> float | None:
    """An accuracy: a number in [0, 1] (NaN and infinities included in the refusal)."""
    number = _number(value, where)
    if number is not None and not 0.0 <= number <= 1.0:
        raise ReportError(f"{where}: expected an accuracy between 0 and 1, got {_show(value)}")
    return number


def bootstrap_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval of the mean (percentile, 10,000 resamples, seeded): what
    a difference or a bar over seeds is reported with."""
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if len(data) < 2 or np.ptp(data) == 0:
        return mean, mean, mean
    ci = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=10_000,
                   method="percentile", random_state=0).confidence_interval
    return mean, float(ci.low), float(ci.high)


def _object(value: Any, where: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReportError(f"{where}: expected an object, got {_show(value)}")
    return value


def _array(value: Any, where: str) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ReportError(f"{where}: expected a list, got {_show(value)}")
    return value


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _text(value: Any) -> str | None:
    """A setting as the runs table shows it: a name or a number; anything else says nothing."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _dp_text(dp: dict, privacy: dict) -> str | None:
    """The run's DP in a few words: simulate's config.dp, or the demo's privacy budget."""
    delta = dp.get("delta", privacy.get("delta"))
    at = f", δ {delta:g}" if isinstance(delta, (int, float)) and not isinstance(delta, bool) else ""
    for key, words in (("target_epsilon", "ε {:g} target"), ("noise_multiplier", "noise σ {:g}")):
        value = dp.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return words.format(value) + at
    budget = privacy.get("epsilon_budget")
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return f"ε {budget:g} budget{at}"
    return "off" if dp or privacy else None


def _runs_in(data: Any, where: str) -> list[tuple[str | None, dict, str]]:
    """(label given in the file, run dict, where) for every run a results file holds."""
    if isinstance(data, list):
        if not data:
            raise ReportError(f"{where}: an empty list holds no run")
        out = []
        for i, item in enumerate(data):
            item = _object(item, f"{where}[{i}]")
            if item is None:
                raise ReportError(f"{where}[{i}]: expected a run, got null")
            name = f"{item['devices']} devices" if isinstance(item.get("devices"), int) else f"#{i}"
            out += [(name if sub is None else f"{name} {sub}", run, w)
                    for sub, run, w in _runs_in(item, f"{where}[{i}]")]
        return out
    if not isinstance(data, dict):
        raise ReportError(f"{where}: expected a results object, got {_show(data)}")
    label = data.get("label") if isinstance(data.get("label"), str) else None
    if "rounds" in data or "final" in data:
        return [(label, data, where)]
    if "result" in data:
        result = _object(data["result"], f"{where}.result")
        return [(label, result, f"{where}.result")] if result is not None else []
    if "runs" in data:
        runs = _array(data["runs"], f"{where}.runs")
        out = []
        for i, item in enumerate(runs or []):
            item = _object(item, f"{where}.runs[{i}]")
            if item is None:
                raise ReportError(f"{where}.runs[{i}]: expected a run, got null")
            name = " ".join(str(item[k]) for k in ("dataset", "sizing", "strategy", "label")
                            if isinstance(item.get(k), (str, int, float))) or f"#{i}"
            out += [(name, run, w) for _, run, w in _runs_in(item, f"{where}.runs[{i}]")]
        if not out:
            raise ReportError(f"{where}.runs: no run in it")
        return out
    raise ReportError(f"{where}: not a fedprune results file: no 'rounds' (simulate, demo or "
                      f"service results), 'final', 'result' or 'runs' (a benchmark's bundle); "
                      f"its keys are {', '.join(sorted(map(str, data))[:8]) or 'none'}")


def _device_names(run: dict, where: str) -> dict[int, str]:
    """Simulation client index -> the device's name in the fleet (`clients[]`), when planned."""
    names = {}
    for i, client in enumerate(_array(run.get("clients"), f"{where}.clients") or []):
        client = _object(client, f"{where}.clients[{i}]") or {}
        index = _count(client.get("client"), f"{where}.clients[{i}].client")
        if index is not None and isinstance(client.get("device"), str):
            names[index] = client["device"]
    return names


def _plan_row(device: str, plan: dict, selected: Any, where: str) -> PlanRow:
    return PlanRow(device, _number(plan.get("width_ratio"), f"{where}.width_ratio"),
                   _number(plan.get("download_keep"), f"{where}.download_keep"),
                   _number(plan.get("upload_keep"), f"{where}.upload_keep"),
                   selected is not False)


def _read_run(label: str, source: str, run: dict, where: str) -> Run:
    rounds = _array(run.get("rounds"), f"{where}.rounds") or []
    entries = []
    for i, entry in enumerate(rounds):
        entry = _object(entry, f"{where}.rounds[{i}]")
        if entry is None:
            raise ReportError(f"{where}.rounds[{i}]: expected an object, got null")
        entries.append(entry)
    service = any("selected" in e or "accepted" in e for e in entries) or "devices" in run \
        and not any("participants" in e for e in entries)
    out = Run(label, source, "service" if service else "simulation")
    names = _device_names(run, where)
    total, last_sent = 0.0, {}
    for i, entry in enumerate(entries):
        at = f"{where}.rounds[{i}]"
        number = _count(entry.get("round"), f"{at}.round")
        out.rounds.append(i + 1 if number is None else number)
        out.personalized.append(_nan(_number(entry.get("personalized_accuracy"),
                                             f"{at}.personalized_accuracy")))
        out.global_accuracy.append(_nan(_number(entry.get("global_accuracy"),
                                                f"{at}.global_accuracy")))
        up = _number(entry.get("bytes_up"), f"{at}.bytes_up")
        down = _number(entry.get("bytes_down"), f"{at}.bytes_down")
        total = total + up + down if up is not None and down is not None else math.nan
        out.cumulative_bytes.append(total)
        eps_max = _number(entry.get("epsilon_max"), f"{at}.epsilon_max")
        if eps_max is not None:
            out.epsilon_max_by_round.append((out.rounds[-1], eps_max))
        if service:
            counts = {name: _count(entry.get(name), f"{at}.{name}")
                      for name in ("selected", "accepted", "straggled", "refused", "rejected")}
        else:
            devices = _array(entry.get("devices"), f"{at}.devices")
            left_out = _count(entry.get("left_out"), f"{at}.left_out")
            counts = {"sent": None if devices is None else len(devices),
                      "accepted": _count(entry.get("participants"), f"{at}.participants"),
                      "straggled": _count(entry.get("straggled"), f"{at}.straggled"),
                      "out of memory": _count(entry.get("out_of_memory"), f"{at}.out_of_memory"),
                      "refused": _count(entry.get("refused"), f"{at}.refused"),
                      "left out": left_out}
            for j, device in enumerate(devices or []):
                dwhere = f"{at}.devices[{j}]"
                device = _object(device, dwhere) or {}
                client = _count(device.get("client"), f"{dwhere}.client")
                name = names.get(client, f"device {client if client is not None else j}")
                epsilon = _number(device.get("epsilon"), f"{dwhere}.epsilon")
                if epsilon is not None:
                    out.epsilon_by_round.setdefault(name, []).append((out.rounds[-1], epsilon))
                if device.get("width_ratio") is not None or device.get("download_keep") is not None:
                    last_sent[name] = _plan_row(name, device, True, dwhere)
        for name, count in counts.items():
            if count is not None:  # a series that starts late is padded with zeros
                out.flows.setdefault(name, [0] * i).append(count)
            elif name in out.flows:
                out.flows[name].append(0)

    # The privacy spent: simulate's privacy[] (final, per device), demo's devices[].epsilon.
    per_device = [] if isinstance(run.get("privacy"), dict) else \
        _array(run.get("privacy"), f"{where}.privacy") or []  # the demo's is a dict: the budget
    for i, item in enumerate(per_device):
        item = _object(item, f"{where}.privacy[{i}]") or {}
        client = _count(item.get("client"), f"{where}.privacy[{i}].client")
        epsilon = _number(item.get("epsilon"), f"{where}.privacy[{i}].epsilon")
        if epsilon is not None:
            out.epsilon_final[names.get(client, f"device {client if client is not None else i}")] = epsilon
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    dp = config.get("dp") if isinstance(config.get("dp"), dict) else {}
    privacy = run.get("privacy") if isinstance(run.get("privacy"), dict) else {}
    out.epsilon_budget = _number(dp.get("target_epsilon"), f"{where}.config.dp.target_epsilon") \
        if dp.get("target_epsilon") is not None \
        else _number(privacy.get("epsilon_budget"), f"{where}.privacy.epsilon_budget")
    out.dp = _dp_text(dp, privacy)
    for key in ("strategy", "model", "partition"):
        setattr(out, key, _text(config.get(key)) or _text(run.get(key)))
    devices = run.get("devices")
    out.clients = _text(config.get("clients")) or (
        str(len(devices)) if isinstance(devices, list) else _text(devices))

    # The chance level: the file's final one, else its last round's (simulate has it per round).
    final = _object(run.get("final"), f"{where}.final") or {}
    out.chance = _number(final.get("chance_accuracy"), f"{where}.final.chance_accuracy")
    tiers = _object(final.get("tiers"), f"{where}.final.tiers") or {}
    for tier, item in list(tiers.items())[:20]:
        at = f"{where}.final.tiers[{_show(tier)}]"
        out.tiers[str(tier)[:40]] = _share_of(
            (_object(item, at) or {}).get("accuracy"), f"{at}.accuracy")
    out.fleet_accuracy = _share_of(final.get("fleet_accuracy"), f"{where}.final.fleet_accuracy")
    out.tiers = {t: v for t, v in out.tiers.items() if v is not None}
    for i, entry in reversed(list(enumerate(entries))):
        if out.chance is None and entry.get("chance_accuracy") is not None:
            out.chance = _number(entry["chance_accuracy"], f"{where}.rounds[{i}].chance_accuracy")

    # The fleet's plans: simulate's clients[].plan, demo's devices[].plan.
    for key in ("clients", "devices"):
        if key == "devices" and not isinstance(run.get(key), list):
            continue  # benchmarks/service_overhead.py's runs: the fleet's size
        for i, item in enumerate(_array(run.get(key), f"{where}.{key}") or []):
            at = f"{where}.{key}[{i}]"
            item = _object(item, at) or {}
            plan = _object(item.get("plan"), f"{at}.plan")
            name = item.get("device") if isinstance(item.get("device"), str) else \
                " ".join(str(item[k]) for k in ("id", "device_class") if isinstance(item.get(k), str)) \
                or f"device {item.get('client', i)}"
            if key == "devices":
                epsilon = _number(item.get("epsilon"), f"{at}.epsilon")
                if epsilon is not None:
                    out.epsilon_final[name] = epsilon
            if plan is not None:
                out.plans.append(_plan_row(name, plan, item.get("selected", item.get("fits")),
                                           f"{at}.plan"))
    if out.plans:
        out.plans_from = "plans"
    elif any(v is not None and v < 1 for row in last_sent.values()
             for v in (row.width, row.download_keep, row.upload_keep)):
        out.plans, out.plans_from = list(last_sent.values()), "tasks"
    return out


def _named(name: str, read, *args):
    """`read(*args)`, its errors worded `NAME: rounds[2].bytes_up: what is wrong`."""
    try:
        return read(*args)
    except ReportError as exc:
        text = str(exc)
        if text[len(name):len(name) + 1] in (".", "["):
            raise ReportError(f"{name}: {text[len(name):].lstrip('.')}") from None
        raise


def load_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None
              ) -> tuple[list[Run], list[str]]:
    """Every run in the files, and `PATH: why` for each file that could not be read. `labels`, one per
    file, name the runs (default: the label the file carries, else its name); a file of several
    runs adds each run's own name to it."""
    if labels and len(labels) != len(paths):
        raise ReportError(f"{len(labels)} labels for {len(paths)} results files: give one "
                          "--label per file, in the same order, or none")
    stems = [Path(p).stem for p in paths]
    runs: list[Run] = []
    unread: list[str] = []
    for n, path in enumerate(paths):
        path = Path(path)
        try:
            runs += _file_runs(path, labels[n] if labels else None, stems.count(path.stem) > 1)
        except ReportError as exc:
            unread.append(str(exc))
    seen: dict[str, int] = {}
    for run in runs:  # labels are legends: keep them apart
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    return runs, unread


def _file_runs(path: Path, label: str | None, stem_taken: bool) -> list[Run]:
    """The runs of one results file; ReportError `PATH: what is wrong` if it has none to give."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_RESULTS_BYTES + 1)
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = load_json(raw, "it", ReportError, MAX_RESULTS_BYTES)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None
    found = _named(str(path), _runs_in, data, str(path))
    if label:
        base = label
    elif len(found) == 1 and found[0][0] and not isinstance(data, list):
        base = None  # the file's own label
    else:
        base = f"{path.parent.name}/{path.stem}" if stem_taken else path.stem
    runs = []
    for sub, run, where in found:
        name = base if len(found) == 1 and base else " ".join(x for x in (base, sub) if x) or path.stem
        runs.append(_named(str(path), _read_run, name, str(path), run, where))
    return runs


# --- drawing ---------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _colors(n: int) -> list:
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _grid(figure, count: int, width_each: float, height_each: float,
          most: int = MAX_COLUMNS):
    columns = min(most, count)
    rows = math.ceil(count / columns)
    figure.set_size_inches(max(6.0, width_each * columns), height_each * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return axes[:count]


def _figure_legend(figure, axes) -> None:
    """One legend above the subplots for the series they share (first handle of each label)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside upper center",
                  ncols=min(len(handles), 7), fontsize="small")


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _accuracy(runs: list[Run], x_of, xlabel: str, title: str, path: Path):
    from matplotlib.lines import Line2D

    figure = _figure(9, 5.5)
    ax = figure.subplots()
    colors = _colors(len(runs))
    for run, color in zip(runs, colors):
        x = x_of(run)
        if run.has(run.personalized):
            ax.plot(x, run.personalized, color=color, marker="o", linestyle="-")
        if run.has(run.global_accuracy):
            ax.plot(x, run.global_accuracy, color=color, marker="s", markersize=4, linestyle="--")
    chances = sorted({run.chance for run in runs if run.chance is not None})
    if len(chances) == 1:  # every run has the same chance (the same partition): one grey line
        ax.axhline(chances[0], color="grey", linestyle=":", linewidth=1.5)
    else:
        for run, color in zip(runs, colors):
            if run.chance is not None:
                ax.axhline(run.chance, color=color, linestyle=":", linewidth=1.5)
    ax.set_xlabel(xlabel)
    if xlabel == "round":
        _integer_x(ax)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    styles = [Line2D([], [], color="black", marker="o", linestyle="-", label="personalized (own model, own test split)"),
              Line2D([], [], color="black", marker="s", markersize=4, linestyle="--",
                     label="global model (official test set)")]
    if chances:
        styles.append(Line2D([], [], color="black" if len(chances) > 1 else "grey", linestyle=":",
                             linewidth=1.5, label="chance: each device's majority class"
                             + (f" ({chances[0]:.2f})" if len(chances) == 1 else "")))
    legend = ax.legend(handles=styles, loc="lower right", fontsize="small")
    ax.add_artist(legend)
    figure.legend(handles=[Line2D([], [], color=c, linewidth=3, label=r.label)
                           for r, c in zip(runs, colors)],
                  loc="outside right upper", fontsize="small", title="run")
    figure.savefig(path, dpi=DPI)
    return figure


# Devices' ε lines: colour, line style and marker cycle apart, and markers shrink, so lines that
# coincide (devices with the same noise and samples spend the same ε) show as concentric markers
# over interleaved dashes.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
MARKER_SIZES = (9, 7, 5, 3.5)


def _coinciding(series: dict[str, list[tuple[int, float]]]) -> list[list[str]]:
    """Groups of devices whose points are all the same: their lines lie on top of each other."""
    groups: dict[tuple, list[str]] = {}
    for device, points in sorted(series.items()):
        groups.setdefault(tuple((x, round(y, 9)) for x, y in points), []).append(device)
    return [names for names in groups.values() if len(names) > 1]


def _names(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _epsilon(runs: list[Run], path: Path):
    figure = _figure(6, 4)
    for ax, run in zip(_grid(figure, len(runs), 7.5, 4.0, most=2), runs):
        if run.epsilon_by_round:
            colors = _colors(len(run.epsilon_by_round))
            if run.epsilon_max_by_round:  # underneath, wide and pale: the devices' lines show on it
                x, y = zip(*run.epsilon_max_by_round)
                ax.plot(x, y, color="black", linewidth=6, alpha=0.18, zorder=1,
                        label="max over the round's devices")
            for i, ((device, points), color) in enumerate(zip(sorted(run.epsilon_by_round.items()), colors)):
                x, y = zip(*points)
                ax.step(x, y, where="post", color=color, label=device, zorder=2 + i,
                        linestyle=LINE_STYLES[i % len(LINE_STYLES)], linewidth=1.6,
                        marker=MARKERS[i % len(MARKERS)], markersize=MARKER_SIZES[i % len(MARKER_SIZES)])
            ax.set_xlabel("round")
            _integer_x(ax)
            what = f"{len(run.epsilon_by_round)} devices sent tasks, after each round they had one"
            same = _coinciding(run.epsilon_by_round)
            if same:
                what += "; the same ε, lines on top of each other: " + "; ".join(map(_names, same[:3]))
        elif run.epsilon_max_by_round:
            x, y = zip(*run.epsilon_max_by_round)
            ax.plot(x, y, color="black", marker="o", linewidth=2, label="max over the round's devices")
            if run.epsilon_final:
                last = max(x)
                for device, epsilon in sorted(run.epsilon_final.items()):
                    ax.scatter([last], [epsilon], s=18, zorder=3, label=f"{device} (final)")
            ax.set_xlabel("round")
            _integer_x(ax)
            what = "max per round" + (", each device's at the end" if run.epsilon_final else "")
        else:
            devices = sorted(run.epsilon_final)
            ax.bar(range(len(devices)), [run.epsilon_final[d] for d in devices], color="tab:blue")
            ax.set_xticks(range(len(devices)), devices, rotation=60, ha="right", fontsize="x-small")
            what = "each device's at the end of the run"
        if run.epsilon_budget is not None:
            ax.axhline(run.epsilon_budget, color="tab:red", linestyle=":",
                       label=f"budget {run.epsilon_budget:g}")
        ax.set_ylabel("epsilon spent")
        ax.set_ylim(0, 1.1 * max(run.epsilon_max or 0, run.epsilon_budget or 0) or 1)
        ax.set_title(f"{run.label}\n" + textwrap.fill(f"({what})", 90), fontsize="small")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if 0 < len(handles) <= 16:  # beside the plot, not over its lines
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, dpi=DPI)
    return figure


def _plans(runs: list[Run], path: Path) -> None:
    devices = max(len(r.plans) for r in runs)
    figure = _figure(6, 4)
    figure.set_size_inches(min(30.0, max(8.0, 0.45 * devices + 2)), 3.6 * len(runs))
    axes = figure.subplots(len(runs), 1, squeeze=False).ravel()
    series = (("width", "width ratio", "tab:blue"), ("download_keep", "download keep", "tab:orange"),
              ("upload_keep", "upload keep", "tab:green"))
    for ax, run in zip(axes, runs):
        step = 0.8 / len(series)
        for k, (attr, name, color) in enumerate(series):
            values = [getattr(row, attr) for row in run.plans]
            x = [i - 0.4 + step * (k + 0.5) for i in range(len(values))]
            heights = [_nan(v) for v in values]
            bars = ax.bar(x, heights, width=step, color=color, label=name)
            for bar, row in zip(bars, run.plans):
                if not row.selected:
                    bar.set_alpha(0.3)
                    bar.set_hatch("//")
        ax.set_xticks(range(len(run.plans)),
                      [row.device + ("" if row.selected else " (left out)") for row in run.plans],
                      rotation=60, ha="right", fontsize="x-small")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("ratio")
        source = "each device's plan" if run.plans_from == "plans" else "each device's last task"
        ax.set_title(f"{run.label} ({source})", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    _figure_legend(figure, axes)
    figure.savefig(path, dpi=DPI)


FLOW_COLORS = {"selected": "tab:cyan", "sent": "tab:blue", "accepted": "tab:green",
               "straggled": "tab:orange", "out of memory": "tab:purple", "refused": "tab:red",
               "rejected": "tab:brown", "left out": "tab:gray"}


def _flows(runs: list[Run], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    figure = _figure(6, 4)
    axes = _grid(figure, len(runs), 6.0, 4.0)
    for ax, run in zip(axes, runs):
        names = [n for n in FLOW_COLORS if n in run.flows
                 and (n in ("selected", "sent", "accepted") or any(run.flows[n]))]
        step = 0.8 / len(names)
        for k, name in enumerate(names):
            ax.bar([r - 0.4 + step * (k + 0.5) for r in run.rounds], run.flows[name], width=step,
                   color=FLOW_COLORS[name], label=name)
        ax.set_xlabel("round")
        ax.set_ylabel("devices")
        _integer_x(ax)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{run.label} ({run.kind})", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    _figure_legend(figure, axes)
    figure.savefig(path, dpi=DPI)


def _tiers(runs: list[Run], path: Path) -> None:
    """Per label (runs of one label are its seeds): each tier's accuracy, mean with a 95%
    bootstrap interval, the worst tier hatched; beside it, the fleet's accuracy against the MB
    moved, both with their intervals."""
    from matplotlib.patches import Rectangle

    from device_profiles import TIERS

    labels = list(dict.fromkeys(r.label for r in runs))
    groups = {label: [r for r in runs if r.label == label] for label in labels}
    names = {t for r in runs for t in r.tiers}
    tiers = [t for t in TIERS if t in names] + sorted(names - set(TIERS))
    figure = _figure(6, 4)
    figure.set_size_inches(max(9.0, 1.2 * len(tiers) * len(labels) / 2 + 6), 4.2)
    bars_ax, bytes_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    colors = dict(zip(labels, _colors(len(labels))))
    step = 0.8 / len(labels)
    for k, label in enumerate(labels):
        stats = {t: bootstrap_interval([r.tiers[t] for r in groups[label] if t in r.tiers])
                 for t in tiers if any(t in r.tiers for r in groups[label])}
        worst = min(stats, key=lambda t: stats[t][0])
        for i, tier in enumerate(tiers):
            if tier not in stats:
                continue
            mean, low, high = stats[tier]
            bar = bars_ax.bar(i - 0.4 + step * (k + 0.5), mean, width=step, color=colors[label],
                              yerr=[[mean - low], [high - mean]], capsize=3)[0]
            if tier == worst:
                bar.set_hatch("//")
        bars_ax.add_patch(Rectangle((0, 0), 0, 0, color=colors[label], label=label))  # legend
        fleet = [r.fleet_accuracy for r in groups[label] if r.fleet_accuracy is not None]
        moved = [r.cumulative_bytes[-1] / 1e6 for r in groups[label] if r.cumulative_bytes]
        if fleet and moved:
            y, x = bootstrap_interval(fleet), bootstrap_interval(moved)
            bytes_ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]],
                              yerr=[[y[0] - y[1]], [y[2] - y[0]]], fmt="o", capsize=3,
                              color=colors[label])
    bars_ax.set_xticks(range(len(tiers)), [f"{t} tier" for t in tiers])
    bars_ax.set_ylabel("accuracy of the model each device runs")
    bars_ax.set_ylim(0, 1.05)
    bars_ax.grid(axis="y", alpha=0.3)
    bars_ax.set_title("Per tier (hatched: each run's worst tier; bars: 95% interval over seeds)",
                      fontsize="small")
    bytes_ax.set_xlabel("MB moved over the run, up + down")
    bytes_ax.set_ylabel("fleet mean accuracy")
    bytes_ax.grid(alpha=0.3)
    bytes_ax.set_title("Fleet accuracy against bytes", fontsize="small")
    _figure_legend(figure, [bars_ax])
    figure.savefig(path, dpi=DPI)


# --- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    out: Path
    figures: dict[str, str] = field(default_factory=dict)  # file name -> caption
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why
    notes: dict[str, list[str]] = field(default_factory=dict)  # file name -> runs left out of it
    unread: list[str] = field(default_factory=list)  # "results file: why it was not read"
    failed: list[str] = field(default_factory=list)  # figures matplotlib could not draw (in skipped)

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def _left_out(report: Report, name: str, runs: list[Run], kept: list[Run], why: str) -> None:
    missing = [r.label for r in runs if r not in kept]
    if missing:
        report.notes.setdefault(name, []).append(f"not drawn ({why}): {', '.join(missing)}")


def _one_figure(report: Report, name: str, runs: list[Run], kept: list[Run], draw,
                caption: str, without: str, nobody: str) -> None:
    """Figure `name`, `draw(kept, path)`, of the runs that have what it needs, with `caption`
    and the runs left out (`without`: why); `nobody` says why it is missing when no run has it.

    The files' text is drawn as plain text, never as mathtext. A figure matplotlib cannot draw
    anyway (any of its exceptions: an axis limit it refuses, a font) is listed as not drawn with
    the reason, and the other figures are still drawn."""
    import matplotlib

    if not kept:
        report.skipped[name] = nobody
        return
    try:
        with matplotlib.rc_context({"text.parse_math": False}):
            draw(kept, report.out / name)
    except Exception as exc:  # matplotlib raises many types; the report must go on without it
        (report.out / name).unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        report.skipped[name] = f"matplotlib could not draw it ({type(exc).__name__}: {reason})"
        report.failed.append(name)
        return
    report.figures[name] = caption
    _left_out(report, name, runs, kept, without)


def write_report(runs: list[Run], out: str | Path, title: str = "fedprune report",
                 command: str | None = None, unread: Sequence[str] = ()) -> Report:
    """Draw every figure the runs allow into `out`, and `out/index.html` showing them and
    listing the `unread` results files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, unread=list(unread))
    for stale in FIGURES:  # a figure this report does not draw must not be left from an older one
        (out / stale).unlink(missing_ok=True)

    with_accuracy = [r for r in runs if r.has(r.personalized) or r.has(r.global_accuracy)]
    _one_figure(
        report, "accuracy_by_round.png", runs, with_accuracy,
        lambda kept, path: _accuracy(kept, lambda r: r.rounds, "round", "Accuracy after each round",
                                     path),
        "Accuracy after each round: personalized (each device's own model on its own test split; "
        "solid), the global model (dashed) and chance (dotted: each device's majority class on its "
        "own test split, the mean over devices; runs whose results give it).",
        "no accuracy in its rounds",
        "no run has accuracies in its rounds (a service run with evaluation off reports none)")
    _one_figure(
        report, "accuracy_by_bytes.png", runs,
        [r for r in with_accuracy if r.has(r.cumulative_bytes)],
        lambda kept, path: _accuracy(kept, lambda r: [b / 1e6 for b in r.cumulative_bytes],
                                     "cumulative bytes, up + down (MB)",
                                     "Accuracy against the bytes moved", path),
        "Accuracy against the cumulative bytes moved (uploads plus downloads, codec payloads) up "
        "to each round.",
        "no accuracy or no bytes in its rounds",
        "no run has both accuracies and bytes_up/bytes_down in its rounds")
    _one_figure(
        report, "epsilon_by_device.png", runs,
        [r for r in runs if r.epsilon_by_round or r.epsilon_final or r.epsilon_max_by_round],
        _epsilon,
        "The privacy spent (record-level epsilon): per device after each round it trained in when "
        "the results have it, else the round's maximum and each device's at the end; dotted: the "
        "budget.",
        "no epsilon: trained without DP",
        "no run has epsilon (none trained with DP, e.g. --set dp.target_epsilon=4)")
    _one_figure(
        report, "fleet_plans.png", runs, [r for r in runs if r.plans], _plans,
        "The fleet's sizing: width ratio and download / upload keep per device (hatched: left "
        "out, no plan that fits). From the planner's plans where the results have them (--fleet, "
        "the service), else from each device's last task.",
        "no plans, every task at full width and keep",
        "no run has plans (simulate --fleet, demo) or tasks below full width or keep")
    _one_figure(
        report, "devices_per_round.png", runs,
        [r for r in runs if r.flows and (r.kind == "service" or r.lost_anything)], _flows,
        "Devices in and out of each round: selected (service) or sent a task (simulation), "
        "accepted into the aggregate, straggled (past the deadline), out of memory, refused, "
        "rejected, left out (no plan fits).",
        "a simulation where every device sent was accepted",
        "no service results, and no simulation lost a device in a round")
    _one_figure(
        report, "accuracy_by_tier.png", runs, [r for r in runs if r.tiers], _tiers,
        "The accuracy of the model each device runs after the run, on its own test split, per "
        "device tier (low, mid, high memory), and the fleet's mean against the MB moved. Runs "
        "with one label are its seeds: the bars show their mean and 95% bootstrap interval.",
        "no per-tier accuracy (a simulation without a fleet)",
        "no run has per-tier accuracy (simulate with --fleet)")

    report.index.write_text(_html(report, runs, title, command), encoding="utf-8")
    return report


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * scale:,.{digits}f}"


def _html(report: Report, runs: list[Run], title: str, command: str | None) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(r.label)}</td><td>{e(r.source)}</td><td>{r.kind}</td>"
        + "".join(f"<td>{e(value or '-')}</td>" for value in (r.strategy, r.model, r.clients,
                                                              r.partition, r.dp))
        + f"<td>{len(r.rounds)}</td>"
        f"<td>{_fmt(r.last(r.personalized), 100)}</td><td>{_fmt(r.chance, 100)}</td>"
        f"<td>{_fmt(r.last(r.global_accuracy), 100)}</td>"
        f"<td>{_fmt(r.last(r.cumulative_bytes), 1e-6, 1)}</td><td>{_fmt(r.epsilon_max)}</td></tr>"
        for r in runs)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "figure{margin:2em 0}figcaption{color:#333}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if command:
        parts.append(f"<p>Made by <code>{e(command)}</code></p>")
    parts += ["<h2>Runs</h2>",
              "<table><tr><th>run</th><th>file</th><th>kind</th><th>strategy</th><th>model</th>"
              "<th>clients</th><th>partition</th><th>DP</th><th>rounds</th>"
              "<th>personalized % (last)</th><th>chance %</th><th>global % (last)</th>"
              "<th>MB up + down</th><th>max epsilon</th></tr>", rows, "</table>", "<h2>Figures</h2>"]
    for name, caption in report.figures.items():
        notes = "".join(f"<br><small>{e(n)}</small>" for n in report.notes.get(name, []))
        parts.append(f'<figure id="{e(name)}"><img src="{e(name)}" alt="{e(caption)}">'
                     f"<figcaption><code>{e(name)}</code>: {e(caption)}{notes}</figcaption></figure>")
    if report.unread:
        parts.append("<h2>Results files not read</h2><ul>")
        parts += [f"<li>{e(why)}</li>" for why in report.unread]
        parts.append("</ul>")
    if report.skipped:
        parts.append("<h2>Not drawn</h2><ul>")
        parts += [f"<li><code>{e(name)}</code>: {e(why)}</li>" for name, why in report.skipped.items()]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def report_files(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                 title: str = "fedprune report", command: str | None = None) -> Report:
    """The report of every results file that can be read; ReportError when none can."""
    runs, unread = load_runs(paths, labels)
    if not runs:
        raise ReportError("; ".join(unread))
    return write_report(runs, out, title, command, unread)


def report_results(results: Sequence[tuple[str, dict]], out: str | Path,
                   title: str = "fedprune report", command: str | None = None) -> Report:
    """For a benchmark holding its runs in memory: (label, results dict) per run."""
    runs = []
    for label, data in results:
        found = _named(label, _runs_in, data, label)
        for sub, run, where in found:  # a bundle's runs add their own names to the label
            runs.append(_named(label, _read_run, label if len(found) == 1 or not sub
                               else f"{label} {sub}", label, run, where))
    return write_report(runs, out, title, command)
