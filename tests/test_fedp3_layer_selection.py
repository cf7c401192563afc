"""Which hidden layers a FedP3 client trains for the server (FedP3's Fashion-MNIST CNN has 4):
LowerB one per client by modulo; OPU-k k cyclically consecutive ones, fixed over rounds; OPR-k k
distinct ones drawn per round, reproducible from the seed; and the selection names that parse, or
are refused with the reason. A service device's group follows from its id."""

from __future__ import annotations

import pytest

from coordinator.rounds import device_key
from coordinator.strategies.fedp3 import FedP3, FedP3Settings, parse_selection
from harness.strategies import HIDDEN, LAYERS, SPEC, fedp3


def test_fedp3s_cnn_has_four_hidden_layers():
    assert len(LAYERS) == HIDDEN + 1
    assert fedp3().hidden == HIDDEN


def test_lowerb_selects_one_layer_per_client_by_modulo():
    strategy = fedp3(selection="lowerb")
    for client in range(13):
        for rnd in (0, 1, 5):
            assert strategy.selected_layers(client, rnd) == (client % HIDDEN,)


@pytest.mark.parametrize("k", [2, 3])
def test_opuk_selects_k_cyclically_consecutive_layers_fixed_over_rounds(k):
    strategy = fedp3(selection=f"opu{k}")
    for client in range(12):
        group = client % HIDDEN
        expected = tuple(sorted((group + j) % HIDDEN for j in range(k)))
        assert strategy.selected_layers(client, 0) == expected
        assert strategy.selected_layers(client, 7) == expected  # fixed over rounds
    assert fedp3(selection="opu2").selected_layers(3, 0) == (0, 3)
    assert fedp3(selection="opu2").selected_layers(1, 0) == (1, 2)
    assert fedp3(selection="opu3").selected_layers(2, 0) == (0, 2, 3)
    assert fedp3(selection="opu3").selected_layers(3, 0) == (0, 1, 3)


def test_opr2_selects_two_distinct_layers_per_round_reproducibly_from_the_seed():
    a = fedp3(selection="opr2", seed=11)
    b = fedp3(selection="opr2", seed=11)
    per_round = []
    for rnd in range(20):
        sel = a.selected_layers(5, rnd)
        assert len(sel) == 2 and len(set(sel)) == 2
        assert sel == tuple(sorted(sel))
        assert all(0 <= i < HIDDEN for i in sel)
        assert sel == b.selected_layers(5, rnd) == a.selected_layers(5, rnd)
        per_round.append(sel)
    assert len(set(per_round)) > 1, "OPR must vary across rounds"
    # different clients in the same round are not all forced onto one pair
    assert len({a.selected_layers(c, 3) for c in range(20)}) > 1
    # another seed gives a different sequence
    other = fedp3(selection="opr2", seed=12)
    assert [other.selected_layers(5, r) for r in range(20)] != per_round


@pytest.mark.parametrize("text,expected", [("lowerb", ("lowerb", 1)), ("opu2", ("opu", 2)),
                                           ("OPU3", ("opu", 3)), ("opr2", ("opr", 2)),
                                           ("opu4", ("opu", 4))])
def test_lowerb_opuk_and_oprk_parse_in_any_case(text, expected):
    assert parse_selection(text, HIDDEN) == expected


def test_an_unknown_selection_is_refused_naming_the_known_forms():
    for text in ("foo", "opu", "opr", "random2", "lowerb2", ""):
        with pytest.raises(ValueError, match=r"lowerb, opuK or oprK"):
            parse_selection(text, HIDDEN)
    with pytest.raises(ValueError, match=r"lowerb, opuK or oprK"):
        FedP3(SPEC, FedP3Settings(selection="foo"))


@pytest.mark.parametrize("text", ["opu9", "opr5", "opu0"])
def test_a_k_outside_the_hidden_layers_is_refused(text):
    with pytest.raises(ValueError, match=rf"{text}.*between 1 and the {HIDDEN} hidden layers"):
        parse_selection(text, HIDDEN)
    with pytest.raises(ValueError, match=text):
        FedP3(SPEC, FedP3Settings(selection=text))


def _groups(tmp_path, order: list[str]) -> dict[str, tuple]:
    """Each device's uploaded layers and planned upload size in round 1, on a fresh coordinator
    the devices register with in `order`."""
    from harness.fleet import Harness

    tmp_path.mkdir()
    fleet = Harness(tmp_path, f"sqlite:///{tmp_path / 'coordinator.db'}", devices=4,
                    strategy="fedp3", fedp3={"selection": "opu2"})
    for device in order:
        fleet.engine.handle(fleet.topics.register(device), fleet.agents[device]._registration())
    fleet.engine.tick()
    assert len(fleet.take(fleet.to_devices, "task")) == 4
    return {device: (fleet.engine.tasks_built[device].plan.selected_layers,
                     fleet.store.device(device).plan["upload_bytes"]) for device in fleet.agents}


def test_a_service_devices_layer_group_follows_its_id_not_the_order_it_registered_in(tmp_path):
    """The demo's devices register in a race; which layers one uploads (and so the bytes a round
    moves) must not depend on it (issue 24: bytes up per round were 9.8-42.3 MB across runs)."""
    names = [f"dev-{i}" for i in range(4)]
    first = _groups(tmp_path / "a", names)
    assert _groups(tmp_path / "b", names[::-1]) == first
    assert len({layers for layers, _ in first.values()}) > 1  # the devices are still spread
    # A stable hash of the id (not Python's salted hash()): the same in every process.
    assert device_key("dev-0") == 0x3AA5_37A4
