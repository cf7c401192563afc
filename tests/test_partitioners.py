"""The partitioner registry (edge_sdk/data/partitioners/) and the tier-aware kinds: the old kinds'
outputs pinned from before they moved, each tier kind's property measured on real labels, a kind
added by an entry point, and a simulation whose shards follow its fleet's tiers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edge_sdk.data import partition

# sha256 (first 16 hex) of each client's index array, taken with the if-chain partition.py had
# before the kinds moved to the registry: the move must not change a single index.
PINNED = {
    ("iid", 20, 1): "05839eabede56509",
    ("classes:2", 20, 1): "52d5b9e12c168e37",
    ("classes:5", 10, 0): "f43dc81b0a63609f",
    ("dirichlet:0.5", 20, 1): "2d746b5a788a4e0e",
    ("niid-dirichlet:0.5", 20, 1): "0939f8deb3aec229",
    ("niid-dirichlet:0.1:20", 30, 2): "6d143c4ba053ec04",
}
PINNED_NATURAL = "3e0eb0da3e807461"  # femnist, 10 clients, seed 3


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(np.asarray(p, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


@pytest.mark.parametrize("spec,clients,seed", sorted(PINNED))
def test_old_kinds_give_the_pinned_partitions(fmnist, spec, clients, seed):
    assert _digest(partition(fmnist.train_y, clients, spec, seed)) == PINNED[(spec, clients, seed)]


def test_natural_gives_the_pinned_partition(femnist):
    parts = partition(femnist.train_y, 10, "natural", 3, writers=femnist.train_writers,
                      num_classes=62)
    assert _digest(parts) == PINNED_NATURAL


# --- the tier kinds, measured ---------------------------------------------------------------------

import sys  # noqa: E402

from device_profiles import sample_fleet  # noqa: E402
from device_profiles.tiers import TIERS, tier_index  # noqa: E402
from edge_sdk.data import parse_partition  # noqa: E402
from edge_sdk.data.partitioners import accepted, kinds  # noqa: E402

GROUPS = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 0, 1])  # 3 low, 4 mid, 5 high
TIER_SPECS = ["tier-classes:0.1", "tier-dirichlet:0.3", "tier-quantity:2"]


def _tier_counts(labels, parts, groups, num_classes=10):
    return {int(t): np.bincount(labels[np.concatenate([p for p, g in zip(parts, groups) if g == t])],
                                minlength=num_classes)
            for t in np.unique(groups)}


@pytest.mark.parametrize("spec", TIER_SPECS)
def test_tier_kinds_are_deterministic_disjoint_and_nonempty(fmnist, spec):
    a = partition(fmnist.train_y, 12, spec, 5, groups=GROUPS)
    assert _digest(a) == _digest(partition(fmnist.train_y, 12, spec, 5, groups=GROUPS))
    assert _digest(a) != _digest(partition(fmnist.train_y, 12, spec, 6, groups=GROUPS))
    every = np.concatenate(a)
    assert len(np.unique(every)) == len(every) and all(len(p) > 0 for p in a)
    # the tiers matter: the same clients under other tiers get other shards
    assert _digest(a) != _digest(partition(fmnist.train_y, 12, spec, 5, groups=GROUPS[::-1]))


def test_tier_classes_gives_each_tier_classes_the_others_barely_hold(fmnist):
    parts = partition(fmnist.train_y, 12, "tier-classes:0.1", 0, groups=GROUPS)
    counts = _tier_counts(fmnist.train_y, parts, GROUPS)
    owner = np.argmax(np.stack([counts[t] / counts[t].sum() for t in (0, 1, 2)]), axis=0)
    assert sorted(set(owner.tolist())) == [0, 1, 2]  # one block per tier, blocks cover the classes
    for t in (0, 1, 2):
        block = owner == t
        assert counts[t][block].sum() / counts[t].sum() >= 0.85
        for other in {0, 1, 2} - {t}:
            assert counts[other][block].sum() / counts[other].sum() <= 0.1
    assert len({len(p) for p in parts}) == 1  # equal sizes


def test_tier_classes_share_zero_makes_the_blocks_disjoint(fmnist):
    parts = partition(fmnist.train_y, 12, "tier-classes:0", 1, groups=GROUPS)
    held = [set(np.unique(fmnist.train_y[p]).tolist()) for p in parts]
    for i, j in [(0, 2), (2, 5), (0, 5)]:  # clients of tiers 0, 1, 2
        assert not held[i] & held[j]


def test_tier_dirichlet_clients_of_a_tier_share_a_label_distribution(fmnist):
    parts = partition(fmnist.train_y, 12, "tier-dirichlet:0.3", 0, groups=GROUPS)
    dist = [np.bincount(fmnist.train_y[p], minlength=10) / len(p) for p in parts]

    def tv(a, b):
        return 0.5 * np.abs(a - b).sum()

    within = [tv(dist[i], dist[j]) for i in range(12) for j in range(i) if GROUPS[i] == GROUPS[j]]
    between = [tv(dist[i], dist[j]) for i in range(12) for j in range(i) if GROUPS[i] != GROUPS[j]]
    assert max(within) < 0.05 and np.mean(between) > 0.3
    assert sum(len(p) for p in parts) == len(fmnist.train_y)


def test_tier_quantity_sizes_grow_by_the_ratio_per_tier(fmnist):
    parts = partition(fmnist.train_y, 12, "tier-quantity:2", 0, groups=GROUPS)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == len(fmnist.train_y)
    for i, j in [(0, 2), (2, 5), (0, 5)]:
        assert abs(sizes[j] / sizes[i] - 2.0 ** (GROUPS[j] - GROUPS[i])) < 0.01
    # label-iid: every shard's class shares near the data's
    assert max(np.bincount(fmnist.train_y[p], minlength=10).max() / len(p) for p in parts) < 0.15
    with pytest.raises(ValueError, match="none"):
        partition(fmnist.train_y[:100], 12, "tier-quantity:100", 0, groups=GROUPS)


def test_tier_writers_orders_whole_writers_by_digit_share(femnist):
    writers, labels = femnist.train_writers, femnist.train_y
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    parts = partition(labels, 10, "tier-writers", 0, writers=writers, num_classes=62, groups=groups)
    assert sum(len(p) for p in parts) == len(labels) and all(len(p) for p in parts)
    share = {w: float(np.mean(labels[writers == w] < 10)) for w in np.unique(writers)}
    tier_writers = {t: {w for p, g in zip(parts, groups) if g == t for w in np.unique(writers[p])}
                    for t in (0, 1, 2)}
    for p in parts:  # whole writers
        for w in np.unique(writers[p]):
            assert np.array_equal(np.flatnonzero(writers == w), p[writers[p] == w])
    for low, high in [(0, 1), (1, 2)]:
        assert max(share[w] for w in tier_writers[low]) <= min(share[w] for w in tier_writers[high])
    with pytest.raises(ValueError, match="writer"):
        partition(labels, 10, "tier-writers", 0, num_classes=62, groups=groups)


@pytest.mark.parametrize("spec", [*TIER_SPECS, "tier-writers"])
def test_a_tier_kind_without_the_fleet_says_so(fmnist, spec):
    with pytest.raises(ValueError, match="needs the fleet's tiers: run it in a simulation with a fleet"):
        partition(fmnist.train_y, 12, spec, 0)


@pytest.mark.parametrize("groups", [np.array([0, 1]), np.array([0.5] * 12), np.array([-1] * 12)])
def test_bad_groups_are_refused(fmnist, groups):
    with pytest.raises(ValueError, match="groups must be one non-negative tier index per client"):
        partition(fmnist.train_y, 12, "tier-classes:0.1", 0, groups=groups)


@pytest.mark.parametrize("bad", ["tier-classes", "tier-classes:1.5", "tier-classes:-0.1",
                                 "tier-dirichlet:0", "tier-quantity:0", "tier-quantity:x",
                                 "tier-writers:2", "tier-classes:0.1:2"])
def test_bad_tier_specs_list_every_kind(bad):
    with pytest.raises(ValueError) as err:
        parse_partition(bad)
    for name in ["'iid'", "'natural'", "'tier-classes'", "'tier-dirichlet'", "'tier-writers'",
                 "'tier-quantity'"]:
        assert name in str(err.value)


def test_tier_specs_round_trip():
    for text in [*TIER_SPECS, "tier-writers"]:
        assert str(parse_partition(text)) == text
    assert parse_partition("tier-classes:0.1").param("share") == 0.1


# --- a kind added by an entry point -------------------------------------------------------------


def _install_plugin(tmp_path, monkeypatch, module: str, body: str, entries: str) -> None:
    """A real installed distribution: a module and a dist-info whose entry_points.txt names it."""
    (tmp_path / f"{module}.py").write_text(body)
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fedprune.partitioners]\n{entries}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_an_entry_point_adds_a_kind(tmp_path, monkeypatch, fmnist):
    body = '''
import numpy as np
from edge_sdk.data.partitioners import partitioner, one_param

@partitioner("halves", parse=one_param("first", "F", low=0.0, high=1.0), summary="two sizes, e.g. 'halves:0.3'")
def halves(data, spec):
    order = data.rng.permutation(len(data.labels))
    cut = int(spec.param("first") * len(order))
    return [order[:cut], *np.array_split(order[cut:], data.num_clients - 1)]
'''
    broken = "raise RuntimeError('no luck')\n"
    _install_plugin(tmp_path, monkeypatch, "fp_halves_plugin", body,
                    "halves = fp_halves_plugin\nbroken = fp_broken_plugin")
    (tmp_path / "fp_broken_plugin.py").write_text(broken)
    assert "'halves' (two sizes, e.g. 'halves:0.3')" in accepted()
    assert "halves" in kinds() and "broken" not in kinds()
    parts = partition(fmnist.train_y, 4, "halves:0.4", 0)
    assert len(parts[0]) == 24000 and sum(map(len, parts)) == 60000
    assert str(parse_partition("halves:0.4")) == "halves:0.4"
    with pytest.raises(ValueError, match="must lie in"):
        parse_partition("halves:2")
    with pytest.raises(ValueError, match="'broken'.*fails to load: RuntimeError: no luck"):
        parse_partition("broken")
    sys.modules.pop("fp_halves_plugin", None)
    sys.modules.pop("fp_broken_plugin", None)


# --- the wiring: a device's own table, and a simulation whose data follows its fleet ---------------


def test_a_device_benchmark_table_refuses_a_tier_kind():
    from edge_sdk.data.sources import DataSettings

    with pytest.raises(ValueError, match="tiers need the fleet"):
        DataSettings(source="benchmark", dataset="fashion-mnist", partition="tier-classes:0.1")


def test_a_simulation_partitions_by_its_planned_fleets_tiers(monkeypatch):
    import coordinator.simulation as simulation
    from coordinator.config import load_config

    seen = []

    def recording(*args, **kwargs):  # the real federated_data; keeps what the run trained on
        data = federated_data(*args, **kwargs)
        seen.append(data)
        return data

    federated_data = simulation.federated_data
    monkeypatch.setattr(simulation, "federated_data", recording)
    config = load_config(None, ["max_client_samples=400"], strategy="fedavg", clients=6, rounds=1,
                         partition="tier-classes:0.1", fleet="catalogue:3")
    result = simulation.run_simulation(config, progress=False).to_dict()
    profiles = sample_fleet(6, 3)
    assert [c["device"] for c in result["clients"]] == [p.name for p in profiles]  # planned = tiered
    tiers = np.array([tier_index(p) for p in profiles])
    assert len(set(tiers.tolist())) == len(TIERS)  # the fleet really has every tier
    shards = seen[0].shards
    counts = {int(t): sum(np.bincount(s.train_y.numpy(), minlength=10)
                          for s, g in zip(shards, tiers) if g == t) for t in np.unique(tiers)}
    owner = np.argmax(np.stack([counts[t] / counts[t].sum() for t in (0, 1, 2)]), axis=0)
    for t in (0, 1, 2):
        assert counts[t][owner == t].sum() / counts[t].sum() >= 0.85
    assert result["final"]["updates_aggregated"] >= 1


def test_a_simulation_without_a_fleet_refuses_a_tier_kind():
    from coordinator.config import load_config
    from coordinator.simulation import run_simulation

    config = load_config(None, [], clients=4, rounds=1, partition="tier-quantity:2")
    with pytest.raises(ValueError, match="needs the fleet's tiers.*set fleet"):
        run_simulation(config, progress=False)
