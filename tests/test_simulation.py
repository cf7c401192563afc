"""End-to-end simulations on real Fashion-MNIST: learning that beats chance, honest bytes, DP."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from coordinator.config import load_config
from coordinator.simulation import run_simulation

logging.getLogger("absl").setLevel(logging.ERROR)

# A budget small enough for CI: 10 devices x 600 samples (S1: 5 classes each), 3 rounds.
QUICK = dict(clients=10, rounds=3, partition="classes:5", max_client_samples=600)
FAST_SGD = ["train.lr=0.05", "train.momentum=0.9", "train.local_epochs=2"]


@pytest.fixture(scope="module")
def fedavg_result():
    return run_simulation(load_config(None, FAST_SGD, strategy="fedavg", **QUICK), progress=False).to_dict()


@pytest.fixture(scope="module")
def fedp3_result():
    config = load_config(None, FAST_SGD + ["fedp3.selection=opu2"], strategy="fedp3", **QUICK)
    return run_simulation(config, progress=False).to_dict()


def test_fedavg_learns_well_beyond_chance(fedavg_result):
    # Chance is 0.2 on a device's own 5 classes, 0.1 on the global test set.
    assert fedavg_result["final"]["personalized_accuracy"] > 0.6
    assert fedavg_result["final"]["global_accuracy"] > 0.3
    accs = [r["personalized_accuracy"] for r in fedavg_result["rounds"]]
    assert accs[-1] > accs[0]


def test_fedp3_learns_and_uploads_less_than_fedavg(fedp3_result, fedavg_result):
    assert fedp3_result["final"]["personalized_accuracy"] > 0.6
    # OPU2 uploads two of four hidden layers plus the head; on this CNN that is well under half.
    assert fedp3_result["final"]["bytes_up_total"] < 0.6 * fedavg_result["final"]["bytes_up_total"]


def test_fedp3_global_pruning_shrinks_downloads(fedp3_result):
    config = load_config(None, FAST_SGD + ["fedp3.selection=opu2", "fedp3.global_keep=0.5"],
                         strategy="fedp3", **{**QUICK, "rounds": 1})
    pruned = run_simulation(config, progress=False).to_dict()
    assert pruned["rounds"][0]["bytes_down"] < 0.85 * fedp3_result["rounds"][0]["bytes_down"]


def test_results_carry_the_documented_schema(fedavg_result):
    for entry in fedavg_result["rounds"]:
        assert set(entry) >= {"round", "personalized_accuracy", "global_accuracy", "bytes_up",
                              "bytes_down", "seconds"}
        assert entry["bytes_up"] > 0 and entry["bytes_down"] > 0
    assert set(fedavg_result["final"]) == {"personalized_accuracy", "global_device_accuracy",
                                           "global_accuracy", "chance_accuracy",
                                           "bytes_up_total", "bytes_down_total",
                                           "client_seconds_total", "updates_aggregated",
                                           "updates_lost", "flops_per_sample_full",
                                           "flops_per_sample_mean", "flops_per_sample_by_width"}
    # S1 (five classes per device): each device's chance is about 1/5, not 1/10
    assert 0.18 < fedavg_result["final"]["chance_accuracy"] < 0.3
    assert fedavg_result["final"]["flops_per_sample_mean"] == fedavg_result["final"]["flops_per_sample_full"]
    assert fedavg_result["final"]["bytes_up_total"] == sum(r["bytes_up"] for r in fedavg_result["rounds"])
    assert "privacy" not in fedavg_result


def test_dp_epsilon_per_client_agrees_with_an_independent_accountant():
    config = load_config(None, ["dp.noise_multiplier=1.1", "dp.max_grad_norm=1.0", "dp.delta=1e-5",
                                "fedp3.selection=opu2"],
                         strategy="fedp3", clients=4, rounds=2, partition="classes:5",
                         max_client_samples=300)
    result = run_simulation(config, progress=False).to_dict()
    assert len(result["privacy"]) == 4
    for entry in result["privacy"]:
        assert entry["noise_multiplier"] == 1.1 and entry["delta"] == 1e-5
        assert entry["sample_rate"] == pytest.approx(1 / 5)  # 210 training samples, batch 48
        assert entry["steps"] == 2 * 5
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            entry["sample_rate"], dp_accounting.GaussianDpEvent(entry["noise_multiplier"])),
            entry["steps"])
        assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)


def test_cli_simulate_writes_results_json(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "simulate", "--strategy", "fedp3", "--clients", "4",
         "--partition", "dirichlet:0.5", "--rounds", "1", "--local-epochs", "1", "--seed", "3",
         "--set", "max_client_samples=200", "--set", "fedp3.selection=lowerb", "--quiet",
         "--json-out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["partition"] == "dirichlet:0.5"
    assert result["config"]["fedp3"]["selection"] == "lowerb"
    assert len(result["rounds"]) == 1
    assert "final: personalized accuracy" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "fedp3.selection=opu9", "--strategy", "fedp3"], "k must be between 1 and the 4"),
    (["--set", "fedp3.nonsense=1"], "fedp3.nonsense: not a setting here (known: aggregation, "),
    (["--set", "fedp3.selectio=opu2"], "fedp3.selectio: not a setting; did you mean selection?"),
    (["--partition", "classes:11"], "classes"),
    (["--data-dir", "/nonexistent/fedprune-data"], "/nonexistent/fedprune-data"),
])
def test_cli_bad_input_is_a_clear_error(args, message, capsys, monkeypatch):
    """The CLI's own entry point in this process (an uncaught exception fails the test, so no
    traceback can hide behind exit code 2)."""
    from coordinator.cli import main

    monkeypatch.setenv("FEDPRUNE_DOWNLOAD", "0")
    try:
        code = main(["simulate", "--clients", "2", "--rounds", "1", "--quiet", *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_fleet_simulation_plans_each_device(monkeypatch):
    """Sampled catalogue devices are planned; those that cannot hold any submodel never train."""
    config = load_config(None, FAST_SGD, strategy="fedavg", clients=6, rounds=1,
                         partition="classes:5", max_client_samples=200, fleet="catalogue:3")
    result = run_simulation(config, progress=False).to_dict()
    assert [c["client"] for c in result["clients"]] == list(range(6))
    for entry in result["clients"]:
        plan = entry["plan"]
        assert plan["fits"] == (plan["predicted_peak_bytes"] <= plan["memory_limit_bytes"])
        assert entry["selected"] == plan["fits"]
    refused = sum(not c["plan"]["fits"] for c in result["clients"])
    assert result["rounds"][0]["participants"] == 6 - refused


def test_width_sliced_devices_train_and_merge_by_coverage(monkeypatch):
    """Devices planned at widths 1.0, 0.5 and 0.25 train physically smaller models together."""
    import coordinator.simulation as simulation
    from coordinator.planning.fleet import DeviceAssignment
    from device_profiles import catalogue_profile

    real_plan_fleet = simulation.plan_fleet

    def narrowed(fleet, *args):
        assignments = real_plan_fleet("catalogue:0", *args)
        ratios = [1.0, 0.5, 0.25, 1.0, 0.5, 0.25]
        return [DeviceAssignment(a.device_index, catalogue_profile("rpi4-4gb"),
                                 a.plan.model_copy(update={"width_ratio": ratios[a.device_index],
                                                           "fits": True, "reasons": []}), True)
                for a in assignments]

    monkeypatch.setattr(simulation, "plan_fleet", narrowed)
    config = load_config(None, FAST_SGD + ["train.local_epochs=3"], strategy="fedavg", clients=6,
                         rounds=2, partition="classes:5", max_client_samples=400,
                         fleet="catalogue", deadline_seconds=1e6)
    result = run_simulation(config, progress=False).to_dict()
    assert [c["plan"]["width_ratio"] for c in result["clients"]] == [1.0, 0.5, 0.25, 1.0, 0.5, 0.25]
    assert all(r["participants"] == 6 for r in result["rounds"])
    assert result["final"]["personalized_accuracy"] > 0.4  # chance on a device's 5 classes: 0.2
    # A 0.25-width device moves far fewer bytes than a full one: total is well under 6 full models.
    assert result["rounds"][0]["bytes_down"] < 4 * 4_533_613


def test_eval_every_scores_the_devices_every_kth_round_and_the_last(capsys):
    from coordinator.cli import _print_summary

    config = load_config(None, ["eval_every=2"], strategy="fedavg", model="mlp", clients=4,
                         rounds=3, max_client_samples=100)
    result = run_simulation(config, progress=False).to_dict()
    scored = [r["personalized_accuracy"] is not None for r in result["rounds"]]
    assert scored == [False, True, True]
    assert [r["global_device_accuracy"] is not None for r in result["rounds"]] == scored
    assert all(r["global_accuracy"] > 0 for r in result["rounds"])  # every round
    assert result["final"]["personalized_accuracy"] is not None
    _print_summary(result)
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["1", "-"]
