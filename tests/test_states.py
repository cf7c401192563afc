"""Round and task states (issue 13, "states as types"): one table of legal moves per kind, one
transition function each, and the store refusing an illegal move on a real database."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from sqlalchemy import text

from coordinator.service.states import (ROUND_MOVES, TASK_MOVES, IllegalTransition, RoundState,
                                        TaskState, round_transition, task_transition)
from coordinator.service.store import Store, TaskRow

# Sorted: the moves are frozensets, whose order differs between processes (pytest-xdist's
# workers must collect the same list).
ROUND_LEGAL = sorted((a, b) for a, nexts in ROUND_MOVES.items() for b in nexts)
TASK_LEGAL = sorted((a, b) for a, nexts in TASK_MOVES.items() for b in nexts)
ROUND_ILLEGAL = [p for p in itertools.product(RoundState, RoundState) if p not in ROUND_LEGAL]
TASK_ILLEGAL = [p for p in itertools.product(TaskState, TaskState) if p not in TASK_LEGAL]


def test_the_states_are_the_strings_the_database_always_held():
    assert [s.value for s in RoundState] == ["collecting", "committing", "committed", "aborted"]
    assert [s.value for s in TaskState] == ["sent", "accepted", "refused", "rejected", "missing"]
    assert set(ROUND_MOVES) == set(RoundState) and set(TASK_MOVES) == set(TaskState)
    assert RoundState.COMMITTED == "committed" and TaskState("sent") is TaskState.SENT


@pytest.mark.parametrize("current,new", ROUND_LEGAL, ids=lambda s: s.value)
def test_every_legal_round_move_passes(current, new):
    assert round_transition(current, new) is new
    assert round_transition(current.value, new.value) is new  # as read from a plain column


@pytest.mark.parametrize("current,new", TASK_LEGAL, ids=lambda s: s.value)
def test_every_legal_task_move_passes(current, new):
    assert task_transition(current, new) is new
    assert task_transition(current.value, new.value) is new


@pytest.mark.parametrize("current,new", ROUND_ILLEGAL, ids=lambda s: s.value)
def test_every_illegal_round_move_is_refused_naming_both_states(current, new):
    with pytest.raises(IllegalTransition, match=f"illegal round transition {current} -> {new}: "):
        round_transition(current, new)


@pytest.mark.parametrize("current,new", TASK_ILLEGAL, ids=lambda s: s.value)
def test_every_illegal_task_move_is_refused_naming_both_states(current, new):
    with pytest.raises(IllegalTransition, match=f"illegal task transition {current} -> {new}: "):
        task_transition(current, new)


def test_the_error_names_the_legal_next_states():
    with pytest.raises(IllegalTransition) as error:
        round_transition("committed", "collecting")
    assert str(error.value) == ("illegal round transition committed -> collecting: committed is "
                                "final (no next state is legal)")
    with pytest.raises(IllegalTransition) as error:
        task_transition(TaskState.ACCEPTED, TaskState.SENT)
    assert "accepted -> sent" in str(error.value) and "accepted is final" in str(error.value)
    with pytest.raises(IllegalTransition) as error:
        round_transition(RoundState.COLLECTING, RoundState.COMMITTED)
    assert str(error.value) == ("illegal round transition collecting -> committed: the legal next "
                                "states from collecting are committing, aborted")
    with pytest.raises(IllegalTransition) as error:
        task_transition("missing", "accepted")
    assert "missing is final" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_a_state_that_does_not_exist_is_refused_with_the_states_of_its_kind():
    with pytest.raises(IllegalTransition) as error:
        round_transition("committed", "open")
    assert str(error.value) == ("illegal round transition committed -> open: round states are "
                                "collecting, committing, committed, aborted")
    with pytest.raises(IllegalTransition, match="task states are sent, accepted"):
        task_transition("sent", "committed")  # a round state is not a task state


def _store_with_a_round(url: str) -> Store:
    store = Store(url)
    for device in ("dev-0", "dev-1", "dev-2"):
        store.upsert_device(device, profile={}, num_samples=10, formats=["onnx"], plan={},
                            width_ratio=1.0, fits=True)
    store.open_round(1, deadline=1e12, selected=["dev-0", "dev-1", "dev-2"], quorum=1, tasks=[
        TaskRow(round=1, device=d, task=f"t{d[-1]}", width_ratio=1.0, aggregation_weight=1.0,
                bytes_down=0, sent_at=0.0) for d in ("dev-0", "dev-1", "dev-2")])
    return store


def test_the_store_opens_rounds_and_tasks_in_their_first_state_and_stores_plain_strings(db_url):
    store = _store_with_a_round(db_url)
    try:
        assert store.current_round().state is RoundState.COLLECTING
        assert {t.state for t in store.tasks(1).values()} == {TaskState.SENT}
        assert store.task_counts(1) == {TaskState.SENT: 3}
        with store.engine.connect() as connection:  # the columns hold the same strings as before
            assert connection.execute(text("SELECT state FROM rounds")).scalar_one() == "collecting"
            assert set(connection.execute(text("SELECT state FROM tasks")).scalars()) == {"sent"}
    finally:
        store.close()


def test_the_store_refuses_an_illegal_move_and_writes_nothing(db_url):
    store = _store_with_a_round(db_url)
    try:
        assert store.accept_update(1, "dev-0", "t0", b"update", 1.0, 10, None)
        store.set_task(1, "dev-1", state=TaskState.MISSING)
        with pytest.raises(IllegalTransition, match="accepted -> sent: accepted is final"):
            store.set_task(1, "dev-0", state=TaskState.SENT, reason="not written either")
        assert store.task(1, "dev-0").state is TaskState.ACCEPTED
        assert store.task(1, "dev-0").reason is None
        with pytest.raises(IllegalTransition, match="missing -> accepted: missing is final"):
            store.accept_update(1, "dev-1", "t1", b"too late", 1.0, 10, None)
        assert not store.has_update(1, "dev-1", "t1")  # rolled back with the refused move

        with pytest.raises(IllegalTransition, match="collecting -> committed: the legal next "
                                                    "states from collecting are committing, aborted"):
            store.set_round(1, state=RoundState.COMMITTED, checkpoint="skipped.pt")
        assert store.round_row(1).state is RoundState.COLLECTING
        assert store.round_row(1).checkpoint is None
        store.set_round(1, state="committing")
        store.set_round(1, state=RoundState.COMMITTED, checkpoint="global.pt")
        with pytest.raises(IllegalTransition, match="committed -> collecting: committed is final"):
            store.set_round(1, state=RoundState.COLLECTING)
        with pytest.raises(IllegalTransition, match="committed -> open: round states are"):
            store.set_round(1, state="open")
        assert store.last_committed().number == 1 and store.current_round() is None
    finally:
        store.close()


def test_the_engine_writes_no_state_string():
    """Every state the engine writes or compares is a member of RoundState or TaskState."""
    engine = Path(__file__).resolve().parents[1] / "coordinator" / "service" / "engine.py"
    values = {s.value for s in RoundState} | {s.value for s in TaskState}
    found = []
    for node in ast.walk(ast.parse(engine.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "state":
            found += [node.value] if isinstance(node.value, ast.Constant) else []
        elif isinstance(node, ast.Compare):
            found += [n for n in [node.left, *node.comparators]
                      if isinstance(n, ast.Constant) and n.value in values]
            found += [e for n in node.comparators if isinstance(n, (ast.Tuple, ast.List, ast.Set))
                      for e in n.elts if isinstance(e, ast.Constant) and e.value in values]
    assert not found, [f"line {n.lineno}: {n.value!r}" for n in found]
