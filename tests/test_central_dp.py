"""User-level central DP (DP-FedAvg at a trusted coordinator, coordinator/central_dp.py): a
device's influence is bounded by the clip, the noise has the stated spread, a real simulation
learns and reports its epsilon, the service persists it, and nonsense is refused up front."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.central_dp import (CentralDP, CentralDPError, CentralDPSettings, CentralRound,
                                    central_epsilon, holder_counts)
from coordinator.combine import RoundCombiner
from coordinator.config import ConfigError, load_config
from coordinator.rounds import RoundPipeline
from coordinator.strategies import build_strategy
from edge_sdk import codec
from edge_sdk.models import build_model, model_spec

CLIP, DEVICES, RATE = 2.0, 10, 0.5


def _setup(strategy: str, *overrides: str):
    config = load_config(None, list(overrides), strategy=strategy, model="mlp", clients=DEVICES)
    strategy = build_strategy(config, model_spec("mlp", (1, 28, 28), 10))
    state = {k: v.detach().numpy().copy() for k, v in build_model(strategy.spec, seed=0)
             .state_dict().items()}
    pipeline = RoundPipeline(strategy, config, state, 1, config.train)
    tasks = [pipeline.task(i, 100) for i in range(DEVICES)]
    return strategy, state, pipeline, tasks


def _moved_values(task, pipeline, state, rng, scale):
    """The values a device of `task` uploads: its start plus a change of about `scale` per
    entry, in global indices (as `RoundPipeline.intake` gives them)."""
    view = pipeline.view(task.width_ratio)
    local = {name: view.state[name] + rng.normal(0, scale, view.state[name].shape).astype(np.float32)
             for name in task.plan.uploaded}
    return view.to_global({n: codec.SparseTensor.from_dense(v) for n, v in local.items()})


def _combined(strategy, state, pipeline, tasks, updates, seed):
    central = CentralDP(CentralDPSettings(clip_norm=CLIP, noise_multiplier=0.5), RATE, 3,
                        rng=np.random.default_rng(seed))
    combiner = RoundCombiner(strategy, state, central=central.round(tasks, pipeline))
    for update in updates:
        combiner.add(update, 1.0)
    return combiner.result()


@pytest.mark.parametrize("strategy, overrides, step", [
    ("fedavg", (), 1.0),                                  # values, every device the full model
    ("heterofl", ("width_levels=[1.0, 0.5]",), 1.0),      # values, half the devices half wide
    ("ffgg", ("ffgg.server_lr=0.5",), 0.5),               # changes, through a server step
])
def test_a_huge_update_moves_the_model_by_at_most_the_clip_over_the_expected_holders(
        strategy, overrides, step):
    strategy, state, pipeline, tasks = _setup(strategy, *overrides)
    rng = np.random.default_rng(1)
    honest = [_moved_values(tasks[i], pipeline, state, rng, 0.01) for i in (0, 1, 2)]
    huge = _moved_values(tasks[3], pipeline, state, rng, 1e6)
    # The same noise in both (one seed): their difference is the huge device's doing alone.
    without = _combined(strategy, state, pipeline, tasks, honest, seed=7)
    with_it = _combined(strategy, state, pipeline, tasks, honest + [huge], seed=7)
    holders = holder_counts(tasks, pipeline)
    influence = sum(float(np.sum(((with_it[n] - without[n]).reshape(-1).astype(np.float64)
                                  * RATE * holders.get(n, 1) / step) ** 2)) for n in state)
    # Undo the per-coordinate denominator q*H(e) (and the server's step): what is left is the
    # device's clipped change, of norm C exactly (float32 rounding aside).
    assert np.sqrt(influence) == pytest.approx(CLIP, rel=1e-3)
    moved = np.sqrt(sum(float(np.sum((with_it[n] - without[n]).astype(np.float64) ** 2))
                        for n in state))
    assert moved <= step * CLIP / (RATE * min(int(h[h > 0].min()) for h in holders.values())) * 1.001
    if strategy.name == "fedavg":  # every device holds every entry: C / (expected updates)
        assert moved == pytest.approx(CLIP / (RATE * DEVICES), rel=1e-3)


def test_the_noise_has_std_z_c_over_the_expected_holders_and_spares_what_nobody_holds():
    z, size = 1.3, 200_000
    holders = {"a": np.full(size, DEVICES), "b": np.r_[np.full(size, 4), np.zeros(size, int)]}
    mechanism = CentralRound(CLIP, z, RATE, holders)  # OS-seeded, as in a run
    change = mechanism.mean_change({"a": (size,), "b": (2, size)})
    assert change["a"].std() == pytest.approx(z * CLIP / (RATE * DEVICES), rel=0.01)
    assert abs(change["a"].mean()) < 3 * z * CLIP / (RATE * DEVICES) / np.sqrt(size)
    assert change["b"][0].std() == pytest.approx(z * CLIP / (RATE * 4), rel=0.01)
    assert not change["b"][1].any()  # no device holds these: no noise, no change


def test_an_update_on_coordinates_nobody_holds_is_refused_whole():
    from coordinator.aggregation import AggregationError

    mechanism = CentralRound(CLIP, 1.0, RATE, {"w": np.array([1, 0, 1])})
    with pytest.raises(AggregationError, match="no device of the round's population holds"):
        mechanism.add({"w": codec.SparseTensor.from_dense(np.ones(3, np.float32))})
    assert mechanism.updates == 0 and not mechanism.sums["w"].any()


QUICK = ["train.lr=0.05", "train.momentum=0.9", "train.local_epochs=2", "model=mlp",
         "max_client_samples=300", "fraction=0.5"]


def test_a_simulation_with_central_dp_learns_and_reports_its_epsilon(tmp_path, capsys):
    """20 devices, 3 rounds, about 10 a round, at a generous epsilon: with tens of devices only
    an epsilon in the thousands leaves a model that learns (central_dp.py's docstring). Measured
    (global accuracy, six runs): 0.46 to 0.69 here, 0.33 to 0.64 at epsilon 2000, 0.66 without
    central DP; the Poisson draw (4 to 14 devices a round) moves it most."""
    from coordinator.cli import main

    out = tmp_path / "result.json"
    code = main(["simulate", "--strategy", "fedavg", "--clients", "20", "--rounds", "3",
                 "--quiet", "--json-out", str(out), *(f"--set={s}" for s in QUICK),
                 "--set", "central_dp.target_epsilon=10000", "--set", "central_dp.clip_norm=3"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    reports = [row["central_dp"] for row in result["rounds"]]
    assert f"central DP: epsilon {reports[-1]['epsilon']:.3f} at delta=1e-05 after 3 rounds" \
        in printed.out
    assert [r["rounds"] for r in reports] == [1, 2, 3]
    z = reports[0]["noise_multiplier"]
    for r in reports:
        assert set(r) == {"epsilon", "delta", "noise_multiplier", "clip_norm", "rounds",
                          "sample_rate"}
        assert (r["noise_multiplier"], r["clip_norm"], r["delta"], r["sample_rate"]) == \
            (z, 3.0, 1e-5, 0.5)
        assert r["epsilon"] == pytest.approx(central_epsilon([(0.5, z)] * r["rounds"], 1e-5))
    assert reports[-1]["epsilon"] == pytest.approx(10000, rel=0.01)  # calibrated to spend it
    assert reports[-1]["epsilon"] <= 10000
    final = result["final"]
    # Chance: 0.1 on the global test set, about 0.26 on a device's own five classes.
    assert final["global_accuracy"] > 0.3
    assert final["personalized_accuracy"] > final["chance_accuracy"] + 0.2


@pytest.mark.parametrize("overrides, message", [
    (["central_dp.target_epsilon=8", "aggregator.rule=median"], "aggregator.rule 'median' cannot"),
    (["strategy=hidenseek", "central_dp.noise_multiplier=1"], "'hidenseek' uploads signs"),
    (["central_dp.noise_multiplier=1", "central_dp.target_epsilon=8"], "not both"),
    (["central_dp.noise_multiplier=1", "central_dp.fleet_size=7"], "draws its rounds from its 2"),
    (["central_dp.noise_multiplier=0"], "central_dp.noise_multiplier"),
    (["central_dp.clip_norm=-1", "central_dp.noise_multiplier=1"], "central_dp.clip_norm"),
])
def test_a_configuration_central_dp_cannot_serve_is_refused_naming_why(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, clients=2)


def test_central_dp_for_a_strategy_that_uploads_nothing_is_refused_before_any_round(capsys):
    from coordinator.cli import main

    assert main(["simulate", "--strategy", "local", "--clients", "2", "--rounds", "1",
                 "--quiet", "--set", "central_dp.noise_multiplier=1"]) == 2
    assert "'local' uploads nothing" in capsys.readouterr().err


def test_the_service_needs_its_fleet_size_to_calibrate_a_target(tmp_path):
    from harness.fleet import Harness

    with pytest.raises(CentralDPError, match="needs central_dp.fleet_size"):
        Harness(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", central_dp={"target_epsilon": 8.0})


def test_the_service_persists_the_coordinators_epsilon_with_each_round_across_a_restart(tmp_path):
    from harness.fleet import Harness

    z = 0.05
    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'c.db'}",
                central_dp={"noise_multiplier": z, "clip_norm": 5.0})
    h.register_all()
    for number in (1, 2):
        h.engine.tick()
        h.deliver_to_devices("task")
        h.deliver_to_coordinator("update")
        h.engine.tick()
        row = h.store.last_committed()
        assert row.number == number
        spent = row.summary["central_dp"]
        # three devices eligible, three drawn: q = 1
        assert spent == {"epsilon": pytest.approx(central_epsilon([(1.0, z)] * number, 1e-5)),
                         "delta": 1e-5, "noise_multiplier": z, "clip_norm": 5.0,
                         "rounds": number, "sample_rate": 1.0, "population": 3}
        if number == 1:
            h.new_engine()  # a restart reads what was spent from the store


def test_the_service_opens_no_round_its_central_budget_cannot_pay_for(tmp_path, caplog):
    """Calibrated for 3 of 300 devices a round, but only 3 are eligible: every round would be
    drawn at q = 1, far over the target, so none is released."""
    from harness.fleet import Harness

    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'c.db'}",
                central_dp={"target_epsilon": 1.0, "fleet_size": 300})
    h.register_all()
    h.engine.tick()
    h.engine.tick()
    assert h.engine.round is None and h.store.rounds() == []
    said = [r.getMessage() for r in caplog.records if "not opening another round" in r.getMessage()]
    assert len(said) == 1 and "over central_dp.target_epsilon 1 at delta 1e-05" in said[0]
    assert h.engine.done  # so `exit_when_done` exits rather than waiting for ever
