"""`fedprune report`: two real simulations' results (one plain, one on a planned fleet with DP)
and a coordinator service's round summaries become PNG figures and an HTML page that shows them;
a file that is not a results file is refused with its name and what is wrong; hostile files
(a `$` label, an Infinity, deep nesting, numbers matplotlib cannot place) never end the report
with a traceback: the rest is drawn and what was not is listed. The runs table says what each run
was (strategy, model, clients, partition, DP), the accuracy figures draw the chance level the
results give, and devices whose ε lines coincide are drawn each in a style of its own."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from matplotlib.image import imread

from coordinator import report
from coordinator.cli import main

SIMULATE = ["simulate", "--model", "mlp", "--clients", "3", "--rounds", "2",
            "--set", "max_client_samples=150", "--quiet"]


def _service_results(rounds: int = 3) -> dict:
    """Round summaries as the coordinator's engine commits them (`fedprune demo --json-out`)."""
    summaries = [{"round": n, "selected": 4, "accepted": 4 - (n == 2), "refused": 0,
                  "rejected": int(n == 2), "missing": 0, "straggled": int(n == 2),
                  "refused_by_reason": {}, "bytes_up": 1_000_000, "bytes_down": 1_200_000,
                  "epsilon_max": 2.0 * n, "personalized_accuracy": 0.4 + 0.05 * n,
                  "global_accuracy": 0.3 + 0.04 * n, "seconds": 1.5, "contributions": []}
                 for n in range(1, rounds + 1)]
    return {"rounds": summaries,
            "devices": [{"id": f"dev-{i}", "device_class": "rpi4-4gb", "fits": True,
                         "selected": True, "epsilon": 6.0, "width_ratio": 1.0 / (i + 1),
                         "plan": {"width_ratio": 1.0 / (i + 1), "download_keep": 1.0,
                                  "upload_keep": 0.5}} for i in range(4)],
            "privacy": {"epsilon_budget": 8.0, "delta": 1e-5}}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    plain, planned = folder / "plain.json", folder / "planned_dp.json"
    assert main([*SIMULATE, "--json-out", str(plain)]) == 0
    assert main([*SIMULATE, "--fleet", "catalogue:0", "--set", "dp.target_epsilon=4",
                 "--json-out", str(planned)]) == 0
    return plain, planned


def _assert_real_png(path):
    assert path.exists(), f"{path.name} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 8_000, f"{path.name}: only {path.stat().st_size} bytes"
    pixels = imread(path)[..., :3]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert float(np.var(pixels)) > 1e-3, f"{path.name} is blank"
    return pixels


def test_report_of_two_simulations_and_a_service_run(simulated, tmp_path, capsys):
    plain, planned = simulated
    epsilons = [d["epsilon"] for r in json.loads(planned.read_text())["rounds"] for d in r["devices"]]
    assert epsilons and all(0 < e <= 4 * 1.01 for e in epsilons)  # the simulator records them

    out = tmp_path / "report"
    assert main(["report", str(plain), str(planned), "--out", str(out)]) == 0
    index = (out / "index.html").read_text()
    for name in ("accuracy_by_round.png", "accuracy_by_bytes.png", "epsilon_by_device.png",
                 "fleet_plans.png", "accuracy_by_tier.png"):  # the planned run has a fleet
        _assert_real_png(out / name)
        assert f'src="{name}"' in index
    assert not (out / "devices_per_round.png").exists()  # no service run, nothing lost
    assert "devices_per_round.png" in index and "Not drawn" in index
    for label in ("plain", "planned_dp"):
        assert f"<td>{label}</td>" in index
    assert "wrote " in capsys.readouterr().out

    service = tmp_path / "demo.json"
    service.write_text(json.dumps(_service_results()))
    both = tmp_path / "both"
    assert main(["report", str(plain), str(planned), str(service), "--out", str(both),
                 "--label", "FedAvg", "--label", "planned + DP", "--label", "service"]) == 0
    index = (both / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', index)
    assert sorted(images) == sorted(["accuracy_by_round.png", "accuracy_by_bytes.png",
                                     "epsilon_by_device.png", "fleet_plans.png",
                                     "devices_per_round.png", "accuracy_by_tier.png"])
    for name in images:
        _assert_real_png(both / name)
    assert "<td>planned + DP</td>" in index and "<td>service</td>" in index

    # The runs table: what each run was, and its chance level beside its accuracy.
    header = re.search(r"<tr><th>run</th>(.*?)</tr>", index).group(1)
    columns = ["run", *re.findall(r"<th>(.*?)</th>", header)]
    assert columns[:9] == ["run", "file", "kind", "strategy", "model", "clients", "partition",
                           "DP", "rounds"]
    table = {cells[0]: dict(zip(columns, cells)) for cells in
             (re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", index))}
    chance = json.loads(plain.read_text())["final"]["chance_accuracy"]
    assert {k: table["FedAvg"][k] for k in ("strategy", "model", "clients", "partition", "DP")} == {
        "strategy": "fedavg", "model": "mlp", "clients": "3", "partition": "classes:5", "DP": "off"}
    assert table["FedAvg"]["chance %"] == f"{chance * 100:,.2f}"
    assert table["planned + DP"]["DP"] == "ε 4 target, δ 1e-05"
    assert table["service"]["DP"] == "ε 8 budget, δ 1e-05" and table["service"]["clients"] == "4"
    assert table["service"]["strategy"] == "-"  # its file does not say


def test_accuracy_figures_draw_each_runs_chance_level(simulated, tmp_path):
    plain, planned = simulated
    runs, unread = report.load_runs([plain, planned])
    assert unread == []
    chances = [json.loads(path.read_text())["final"]["chance_accuracy"] for path in (plain, planned)]
    assert [run.chance for run in runs] == chances and all(0 < c < 1 for c in chances)
    for x_of in (lambda r: r.rounds, lambda r: r.cumulative_bytes):
        figure = report._accuracy(runs, x_of, "round", "accuracy", tmp_path / "accuracy.png")
        dotted = [line for line in figure.axes[0].lines if line.get_linestyle() == ":"]
        assert sorted(line.get_ydata()[0] for line in dotted) == sorted(set(chances))
        assert all(line.get_ydata()[0] == line.get_ydata()[1] for line in dotted)  # horizontal
        labels = [text.get_text() for legend in figure.legends + [figure.axes[0].get_legend()]
                  for text in legend.get_texts()]
        assert any(label.startswith("chance: each device's majority class") for label in labels)
    # Runs of different partitions: a chance line each, in the run's colour.
    runs[1].chance = chances[1] / 2
    figure = report._accuracy(runs, lambda r: r.rounds, "round", "accuracy", tmp_path / "two.png")
    dotted = [line for line in figure.axes[0].lines if line.get_linestyle() == ":"]
    assert sorted(line.get_ydata()[0] for line in dotted) == sorted([chances[0], chances[1] / 2])
    service = tmp_path / "service.json"
    service.write_text(json.dumps(_service_results()))  # gives no chance: none is drawn
    figure = report._accuracy(report.load_runs([service])[0], lambda r: r.rounds, "round", "a",
                              tmp_path / "service.png")
    assert not [line for line in figure.axes[0].lines if line.get_linestyle() == ":"]


def test_devices_with_the_same_epsilon_are_drawn_apart(tmp_path):
    """Devices with the same noise and samples spend the same ε every round: each line gets its
    own colour, line style and marker (markers shrinking, so they show as concentric), and the
    title names the devices whose lines coincide."""
    rounds = [{"round": n, "personalized_accuracy": 0.5, "participants": 4,
               "devices": [{"client": c, "epsilon": 2.0 * n + (c == 3)} for c in range(4)]}
              for n in (1, 2, 3)]
    path = tmp_path / "same.json"
    path.write_text(json.dumps({"rounds": rounds, "config": {"dp": {"target_epsilon": 8.0}}}))
    runs, _ = report.load_runs([path])
    figure = report._epsilon(runs, tmp_path / "epsilon.png")
    ax = figure.axes[0]
    devices = [line for line in ax.lines if line.get_label().startswith("device ")]
    assert len(devices) == 4
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker(), line.get_markersize())
              for line in devices}
    assert len(styles) == 4
    assert len({line.get_linestyle() for line in devices}) == 4
    assert len({line.get_marker() for line in devices}) == 4
    assert "lines on top of each other: device 0, device 1, device 2" in ax.get_title().replace("\n", " ")
    assert "device 3" not in ax.get_title()
    _assert_real_png(tmp_path / "epsilon.png")


def test_missing_fields_skip_figures_with_a_note(tmp_path):
    results = _service_results(2)
    for summary in results["rounds"]:  # evaluation and DP off, no plans: only the counts remain
        summary.update(personalized_accuracy=None, global_accuracy=None, epsilon_max=None)
        del summary["bytes_up"]
    del results["devices"], results["privacy"]
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "out"
    assert main(["report", str(path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["devices_per_round.png"]
    index = (out / "index.html").read_text()
    for name in ("accuracy_by_round.png", "accuracy_by_bytes.png", "epsilon_by_device.png",
                 "fleet_plans.png"):
        assert f"<code>{name}</code>:" in index and f'src="{name}"' not in index


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('"a string"', "expected a results object"),
    ('{"model": "mlp"}', "not a fedprune results file"),
    ('{"rounds": {"round": 1}}', "rounds: expected a list"),
    ('{"rounds": [{"round": 1, "bytes_up": "lots"}]}', 'rounds[0].bytes_up: expected a number, got "lots"'),
    ('{"rounds": [{"round": 1, "selected": -2}]}', "rounds[0].selected: expected a count"),
    ('{"runs": [{"sizing": "planned", "result": [1]}]}', "runs[0].result: expected an object"),
])
def test_malformed_results_are_refused_naming_file_and_field(tmp_path, capsys, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"fedprune report: error: {path}: " in error and message in error


def test_labels_must_match_the_files(tmp_path, capsys):
    path = tmp_path / "service.json"
    path.write_text(json.dumps(_service_results()))
    assert main(["report", str(path), "--label", "a", "--label", "b", "--out", str(tmp_path)]) == 2
    assert "2 labels for 1 results files" in capsys.readouterr().err


def test_hostile_files_are_listed_and_the_rest_is_drawn(tmp_path, capsys):
    good = tmp_path / "good.json"
    results = _service_results()
    for i, device in enumerate(results["devices"]):  # mathtext that matplotlib cannot parse
        device["id"] = f"$x^{{{i}$"
    good.write_text(json.dumps({"label": r"$\frac{a$ run", "result": results}))
    infinite = tmp_path / "infinite.json"
    infinite.write_text(json.dumps(_service_results()).replace('"epsilon_max": 2.0', '"epsilon_max": Infinity'))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "out"
    assert main(["report", str(good), str(infinite), str(deep), "--out", str(out),
                 "--label", "$5 $ fleet", "--label", "b", "--label", "c"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert f"fedprune report: error: {infinite}: " in captured.err and "Infinity is not a number" in captured.err
    assert f"fedprune report: error: {deep}: " in captured.err and "nests 100000 levels" in captured.err
    for name in ("accuracy_by_round.png", "epsilon_by_device.png", "fleet_plans.png",
                 "devices_per_round.png"):
        _assert_real_png(out / name)
    index = (out / "index.html").read_text()
    assert "Results files not read" in index and "<td>$5 $ fleet</td>" in index
    assert index.count("<li>") >= 2 and str(deep) in index


def test_a_figure_matplotlib_cannot_draw_is_listed_and_the_others_are_drawn(tmp_path, capsys):
    results = _service_results()
    results["rounds"][1]["global_accuracy"] = 1.7e308  # finite, but no axis can hold it
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "out"
    assert main(["report", str(path), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "skipped accuracy_by_round.png: matplotlib could not draw it (ValueError" in captured.out
    assert "fedprune report: error: not drawn: accuracy_by_round.png" in captured.err
    assert not (out / "accuracy_by_round.png").exists()
    for name in ("epsilon_by_device.png", "fleet_plans.png", "devices_per_round.png"):
        _assert_real_png(out / name)
