"""Round and task states, declared once, and the one transition function of each.

The values are the strings the database columns have always held, so existing databases read
back unchanged. Every state change goes through `round_transition` or `task_transition` (the
store calls them inside the transaction that writes the row), which return the new state or raise
`IllegalTransition` naming both states and the legal next ones.

    round:  collecting -> committing -> committed
            collecting -> aborted        (below quorum at the deadline)
            committing -> aborted        (the commit failed for good)
    task:   sent -> accepted | refused | rejected | missing
            refused, rejected -> accepted | rejected   (an update is judged on its own merits)

A refused task may still be answered: the device refused a copy of it that it could not trust
(a forged or damaged task carrying the real task's key) and then ran the real one. A rejected
task may be answered again, up to `max_refused_updates` times. Accepted and missing tasks, and
committed and aborted rounds, are final.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class RoundState(StrEnum):
    COLLECTING = "collecting"   # tasks sent, updates being collected
    COMMITTING = "committing"   # updates fixed; aggregating (re-run after a crash)
    COMMITTED = "committed"     # the new global checkpoint is written
    ABORTED = "aborted"         # below quorum, or the commit failed for good


class TaskState(StrEnum):
    SENT = "sent"               # sent, not answered yet
    ACCEPTED = "accepted"       # its update is stored and will be aggregated
    REFUSED = "refused"         # the device refused to run it (REFUSAL)
    REJECTED = "rejected"       # its update was refused (late, damaged, over the limits)
    MISSING = "missing"         # never answered when the round closed


ROUND_START = RoundState.COLLECTING
TASK_START = TaskState.SENT
ROUND_IN_PROGRESS = frozenset({RoundState.COLLECTING, RoundState.COMMITTING})

_R, _T = RoundState, TaskState
ROUND_MOVES: Mapping[RoundState, frozenset[RoundState]] = MappingProxyType({
    _R.COLLECTING: frozenset({_R.COMMITTING, _R.ABORTED}),
    _R.COMMITTING: frozenset({_R.COMMITTED, _R.ABORTED}),
    _R.COMMITTED: frozenset(),
    _R.ABORTED: frozenset(),
})
TASK_MOVES: Mapping[TaskState, frozenset[TaskState]] = MappingProxyType({
    _T.SENT: frozenset({_T.ACCEPTED, _T.REFUSED, _T.REJECTED, _T.MISSING}),
    _T.REFUSED: frozenset({_T.ACCEPTED, _T.REJECTED}),
    _T.REJECTED: frozenset({_T.ACCEPTED, _T.REJECTED}),
    _T.ACCEPTED: frozenset(),
    _T.MISSING: frozenset(),
})


class IllegalTransition(ValueError):
    """A state change the table does not allow; the text names both states and the legal ones."""


def _transition(kind: str, states: type[StrEnum], moves: Mapping, current, new):
    try:
        current, new = states(current), states(new)
    except ValueError:
        known = ", ".join(s.value for s in states)
        raise IllegalTransition(f"illegal {kind} transition {current!s} -> {new!s}: "
                                f"{kind} states are {known}") from None
    legal = moves[current]
    if new not in legal:
        options = ", ".join(s.value for s in states if s in legal)
        raise IllegalTransition(
            f"illegal {kind} transition {current.value} -> {new.value}: "
            + (f"the legal next states from {current.value} are {options}" if legal
               else f"{current.value} is final (no next state is legal)"))
    return new


def round_transition(current: RoundState | str, new: RoundState | str) -> RoundState:
    """`new` if a round in `current` may move to it; IllegalTransition otherwise."""
    return _transition("round", RoundState, ROUND_MOVES, current, new)


def task_transition(current: TaskState | str, new: TaskState | str) -> TaskState:
    """`new` if a task in `current` may move to it; IllegalTransition otherwise."""
    return _transition("task", TaskState, TASK_MOVES, current, new)
