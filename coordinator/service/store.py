"""Persistent coordinator state through SQLAlchemy: SQLite by default, PostgreSQL by URL.

Accepted updates are stored whole (their encoded payload) in the same transaction that accepts
them, keyed by the idempotency key (round, device, task): a QoS 1 redelivery or a replay hits
the primary key and is recognised as a duplicate, and a coordinator killed at any point finds
every update it acknowledged when it restarts. Aggregation reads them back at commit.

Several coordinators may share one PostgreSQL database ([cluster]): every one of them stores
updates, the leader alone opens and closes rounds. Accepting an update holds the round's row
FOR SHARE while it checks the round is still collecting and stores the update; the leader's move
to committing waits for those transactions and makes later ones fail (`RoundClosed`), so every
update acknowledged as accepted is one the commit reads. Two processes storing the same update
(a redelivery) meet at the primary key: one stores it, the other is told it is a duplicate.

Fencing: the `leadership` row holds the leader epoch, raised by every coordinator that takes the
leader lock (`raise_epoch`, on the lock's own session, so only a holder of the lock can raise it).
While a process leads, its store's `fence` is that epoch and every write transaction first reads
the row FOR SHARE and fails with `Deposed` (writing nothing) when the epoch moved: a leader that
was paused or cut off and woke after another took over cannot open, close or change anything.
The new leader's raise waits for the old leader's transactions in flight, so each of them either
committed before the takeover or fails. A partial unique index allows one round in progress
(collecting or committing) at a time, whoever tries to open a second.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from sqlalchemy import (JSON, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String,
                        TypeDecorator, create_engine, func, make_url, select, text)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, defer, mapped_column, sessionmaker
from sqlalchemy.schema import CreateIndex

from .states import (ROUND_IN_PROGRESS, ROUND_START, TASK_START, RoundState, TaskState,
                     round_transition, task_transition)


class Base(DeclarativeBase):
    pass


class RoundClosed(Exception):
    """The update's round is no longer collecting (the leader moved it on): nothing was stored."""


class SeveralRoundsInProgress(ValueError):
    """The database holds more than one round in progress (left by a coordinator from before
    fencing, when two leaders could each open one): the one-round index cannot be made."""


class Deposed(Exception):
    """This process led under a leader epoch the database no longer holds: another coordinator
    took the lead since. The transaction wrote nothing."""


class _StateColumn(TypeDecorator):
    """A state stored as its string value (VARCHAR(16), as before) and read back as the enum; a
    value that is not a state of the kind is refused before it reaches the database."""
    impl = String(16)
    states: type[StrEnum]

    def process_bind_param(self, value, dialect):
        return None if value is None else self.states(value).value

    def process_result_value(self, value, dialect):
        return None if value is None else self.states(value)


class _RoundStateColumn(_StateColumn):
    cache_ok = True  # checked per class
    states = RoundState


class _TaskStateColumn(_StateColumn):
    cache_ok = True  # checked per class
    states = TaskState


class DeviceRow(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, unique=True)  # stable integer id for strategies
    profile: Mapped[dict] = mapped_column(JSON)
    num_samples: Mapped[int] = mapped_column(Integer)
    formats: Mapped[list] = mapped_column(JSON)
    plan: Mapped[dict] = mapped_column(JSON)                  # the memory planner's DevicePlan
    width_ratio: Mapped[float] = mapped_column(Float)
    fits: Mapped[bool] = mapped_column(Boolean)
    online: Mapped[bool] = mapped_column(Boolean, default=True)
    model_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    epsilon_budget: Mapped[float | None] = mapped_column(Float, nullable=True)
    exhausted: Mapped[bool] = mapped_column(Boolean, default=False)  # refused for its budget
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class RoundRow(Base):
    __tablename__ = "rounds"
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[RoundState] = mapped_column(_RoundStateColumn())  # states.py: round_transition
    started_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    selected: Mapped[list] = mapped_column(JSON)
    quorum: Mapped[int] = mapped_column(Integer)
    checkpoint: Mapped[str | None] = mapped_column(String(512), nullable=True)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)


# One round in progress at a time: a unique index over a value every in-progress row shares (true),
# holding only those rows. Created with the table, and on a database made before it (`Store`).
_IN_PROGRESS = RoundRow.state.in_([state.value for state in ROUND_IN_PROGRESS])
ONE_ROUND_IN_PROGRESS = Index("rounds_one_in_progress", _IN_PROGRESS, unique=True,
                              postgresql_where=_IN_PROGRESS, sqlite_where=_IN_PROGRESS)


class TaskRow(Base):
    __tablename__ = "tasks"
    round: Mapped[int] = mapped_column(ForeignKey("rounds.number"), primary_key=True)
    device: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    state: Mapped[TaskState] = mapped_column(_TaskStateColumn())  # states.py: task_transition
    width_ratio: Mapped[float] = mapped_column(Float)
    aggregation_weight: Mapped[float] = mapped_column(Float)
    bytes_down: Mapped[int] = mapped_column(Integer)
    sent_at: Mapped[float] = mapped_column(Float)
    answered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(String(4096), nullable=True)


class CheckpointRow(Base):
    """A committed round's global checkpoint file, for coordinators that do not share the
    leader's state_dir (cluster mode writes it; one coordinator reads its own file)."""
    __tablename__ = "checkpoints"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class UpdateRow(Base):
    __tablename__ = "updates"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    weight: Mapped[float] = mapped_column(Float)
    num_samples: Mapped[int] = mapped_column(Integer)
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    local_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class RefusedUpdatesRow(Base):
    """Updates refused for one task (damaged, over the limits): past `max_refused_updates` no
    more are decoded. Kept here, not in memory, so a restart or another coordinator of the
    cluster does not start the count again (a table of its own: databases made before it gain
    it as they open)."""
    __tablename__ = "refused_updates"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class LeadershipRow(Base):
    """The cluster's leader epoch (the fencing token): one row (id 1), raised by every takeover."""
    __tablename__ = "leadership"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(64))   # who raised it last
    since: Mapped[float] = mapped_column(Float)


def raise_epoch(connection: Connection, node: str) -> int:
    """Raise the leader epoch by one (the first leader gets 1) and return it, in one statement on
    `connection`: the leader lock's session, so only the holder of the lock raises it (a session
    ended by a follower cannot). PostgreSQL (cluster mode)."""
    row = pg_insert(LeadershipRow).values(id=1, epoch=1, node=node, since=time.time())
    return connection.scalar(row.on_conflict_do_update(
        index_elements=[LeadershipRow.id],
        set_={"epoch": LeadershipRow.epoch + 1, "node": row.excluded.node,
              "since": row.excluded.since}).returning(LeadershipRow.epoch))


def leader_epoch(connection: Connection | Session) -> int:
    """The leader epoch the database holds now (0 before any coordinator led)."""
    return connection.scalar(select(LeadershipRow.epoch).where(LeadershipRow.id == 1)) or 0


# pg_advisory_xact_lock's key while the schema is created: the ASCII bytes of "fpschema".
SCHEMA_LOCK_KEY = int.from_bytes(b"fpschema", "big")


class Store:
    def __init__(self, url: str):
        kwargs: dict[str, Any] = {}
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # How long to wait for a lock before failing (a transient failure, retried by the
            # service): 30 s unless the URL says otherwise (sqlite:///x.db?timeout=2).
            kwargs["connect_args"] = {"check_same_thread": False,
                                      **({} if "timeout" in parsed.query else {"timeout": 30})}
        self.engine = create_engine(url, **kwargs)
        try:
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    # Coordinators of a cluster started together on an empty database would both
                    # find a table missing and both create it: the second failed on a duplicate
                    # type. DDL is transactional here, so the lock (released at commit) serialises
                    # them.
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": SCHEMA_LOCK_KEY})
                Base.metadata.create_all(connection)
                connection.execute(CreateIndex(ONE_ROUND_IN_PROGRESS, if_not_exists=True))
        except IntegrityError:
            self._refuse_several_in_progress()
            raise
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        # The leader epoch this process leads under (cluster mode), which every write checks;
        # None: no check (one coordinator, or a follower, whose writes need no lead).
        self.fence: int | None = None

    def _refuse_several_in_progress(self) -> None:
        with self.engine.connect() as connection:
            numbers = list(connection.scalars(select(RoundRow.number).where(_IN_PROGRESS)
                                              .order_by(RoundRow.number)))
        if len(numbers) < 2:
            return  # not that: the caller re-raises the error as it came
        self.engine.dispose()
        states = ", ".join(f"'{state.value}'" for state in sorted(ROUND_IN_PROGRESS))
        raise SeveralRoundsInProgress(
            f"the database holds {len(numbers)} rounds in progress ({', '.join(map(str, numbers))}); "
            "a coordinator from before leader fencing left them, and only one may be. Stop every "
            "coordinator, abort all but the newest (UPDATE rounds SET state = 'aborted' WHERE "
            f"state IN ({states}) AND number < {numbers[-1]}), then start again") from None

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction; while `fence` is set it first holds the leadership row FOR SHARE
        and raises `Deposed` if the epoch moved (a takeover's raise waits for it, or it sees it)."""
        with self.session.begin() as s:
            if self.fence is not None:
                epoch = s.scalar(select(LeadershipRow.epoch).where(LeadershipRow.id == 1)
                                 .with_for_update(read=True))
                self._check(epoch)
            yield s

    def _check(self, epoch: int | None) -> None:
        if self.fence is not None and epoch != self.fence:
            raise Deposed(f"this coordinator led under leader epoch {self.fence}, the database "
                          f"holds {epoch}: another coordinator took the lead")

    def check_fence(self) -> None:
        """Raise `Deposed` if this process no longer leads under its epoch: asked before tasks
        or artifacts are published, which write nothing the fence could stop."""
        if self.fence is not None:
            with self.session() as s:
                self._check(leader_epoch(s))

    def close(self) -> None:
        self.engine.dispose()

    # --- devices ---------------------------------------------------------------------------
    def upsert_device(self, device_id: str, **fields: Any) -> DeviceRow:
        now = time.time()
        with self._write() as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                highest = s.scalar(select(func.max(DeviceRow.index)))
                index = 0 if highest is None else highest + 1
                row = DeviceRow(id=device_id, index=index, registered_at=now, last_seen=now, **fields)
                s.add(row)
            else:
                for key, value in fields.items():
                    setattr(row, key, value)
                row.last_seen = now
        return row

    def update_device(self, device_id: str, **fields: Any) -> None:
        with self._write() as s:
            row = s.get(DeviceRow, device_id)
            if row is not None:
                for key, value in fields.items():
                    setattr(row, key, value)
                row.last_seen = time.time()

    def device(self, device_id: str) -> DeviceRow | None:
        with self.session() as s:
            return s.get(DeviceRow, device_id)

    def devices(self) -> list[DeviceRow]:
        with self.session() as s:
            return list(s.scalars(select(DeviceRow).order_by(DeviceRow.index)))

    def eligible_devices(self) -> list[DeviceRow]:
        """The devices a round may select (online, fitting, budget not exhausted), in `devices`'
        order, without their profile and plan: the registry's JSON is not parsed at each tick."""
        with self.session() as s:
            return list(s.scalars(
                select(DeviceRow).where(DeviceRow.online.is_(True), DeviceRow.fits.is_(True),
                                        DeviceRow.exhausted.is_not(True))
                .order_by(DeviceRow.index).options(defer(DeviceRow.profile), defer(DeviceRow.plan))))

    # --- rounds and tasks ------------------------------------------------------------------
    def open_round(self, number: int, deadline: float, selected: list[str], quorum: int,
                   tasks: list[TaskRow]) -> None:
        """The round, collecting, with its tasks, each sent (the states every round and task
        starts in; `tasks` are given without a state)."""
        with self._write() as s:
            s.add(RoundRow(number=number, state=ROUND_START, started_at=time.time(),
                           deadline=deadline, selected=selected, quorum=quorum, summary={}))
            s.flush()
            for task in tasks:
                task.state = TASK_START
            s.add_all(tasks)

    def current_round(self) -> RoundRow | None:
        """The round in progress (collecting or committing), if any."""
        with self.session() as s:
            return s.scalar(select(RoundRow).where(RoundRow.state.in_(ROUND_IN_PROGRESS))
                            .order_by(RoundRow.number.desc()))

    def last_committed(self) -> RoundRow | None:
        with self.session() as s:
            return s.scalar(select(RoundRow).where(RoundRow.state == RoundState.COMMITTED)
                            .order_by(RoundRow.number.desc()))

    def round_row(self, number: int) -> RoundRow | None:
        with self.session() as s:
            return s.get(RoundRow, number)

    def rounds(self) -> list[RoundRow]:
        with self.session() as s:
            return list(s.scalars(select(RoundRow).order_by(RoundRow.number)))

    def next_round_number(self) -> int:
        with self.session() as s:
            return (s.scalar(select(func.max(RoundRow.number))) or 0) + 1

    def set_round(self, number: int, **fields: Any) -> None:
        """Write `fields` of round `number`; a `state` moves through `round_transition` (an
        illegal move raises IllegalTransition and writes nothing)."""
        with self._write() as s:
            row = s.get(RoundRow, number, with_for_update=True)  # SQLite: no-op (one writer)
            if "state" in fields:
                fields["state"] = round_transition(row.state, fields["state"])
            for key, value in fields.items():
                setattr(row, key, value)

    def count(self, number: int, event: str) -> None:
        """One more `event` in the round's summary: "duplicates" (a second copy of an accepted
        update, not counted again), "artifact_refusals" (a device refused its exported model)."""
        with self._write() as s:
            row = s.get(RoundRow, number, with_for_update=True)  # several coordinators may count
            row.summary = {**(row.summary or {}), event: (row.summary or {}).get(event, 0) + 1}

    def tasks(self, round_number: int) -> dict[str, TaskRow]:
        with self.session() as s:
            return {t.device: t for t in s.scalars(select(TaskRow).where(TaskRow.round == round_number))}

    def task(self, round_number: int, device: str) -> TaskRow | None:
        with self.session() as s:
            return s.get(TaskRow, (round_number, device))

    def task_counts(self, round_number: int) -> dict[TaskState, int]:
        """Tasks of a round per state, counted by the database (cheap at a thousand devices)."""
        with self.session() as s:
            return dict(s.execute(select(TaskRow.state, func.count()).where(TaskRow.round == round_number)
                                  .group_by(TaskRow.state)).all())

    def set_task(self, round_number: int, device: str, **fields: Any) -> None:
        """Write `fields` of the device's task; a `state` moves through `task_transition` (an
        illegal move raises IllegalTransition and writes nothing)."""
        with self._write() as s:
            row = s.get(TaskRow, (round_number, device))
            if "state" in fields:
                fields["state"] = task_transition(row.state, fields["state"])
                if fields["state"] == TaskState.REFUSED:  # when, for the API's event log
                    fields.setdefault("answered_at", time.time())
            for key, value in fields.items():
                setattr(row, key, value)

    def reject_update(self, round_number: int, device: str, reason: str, counted: bool = True) -> None:
        """Mark the device's task rejected with `reason` and, when `counted`, count one more
        refused update for it, atomically (the task row is locked first: coordinators of a
        cluster counting at once take turns)."""
        with self._write() as s:
            row = s.get(TaskRow, (round_number, device), with_for_update=True)
            row.state, row.reason = task_transition(row.state, TaskState.REJECTED), reason
            row.answered_at = time.time()
            if counted:
                refused = s.get(RefusedUpdatesRow, (round_number, device))
                if refused is None:
                    s.add(RefusedUpdatesRow(round=round_number, device=device, count=1))
                else:
                    refused.count += 1

    def refused_updates(self, round_number: int, device: str) -> int:
        """Updates refused (and counted) for the device's task of this round."""
        with self.session() as s:
            row = s.get(RefusedUpdatesRow, (round_number, device))
            return 0 if row is None else row.count

    # --- updates ---------------------------------------------------------------------------
    def accept_update(self, round_number: int, device: str, task: str, payload: bytes, weight: float,
                      num_samples: int, epsilon: float | None,
                      local_accuracy: float | None = None, size: int | None = None) -> bool:
        """Store an update and mark its task accepted, atomically. `size`: the bytes it took on
        the wire, when `payload` is not what was sent (a secure round's masked input is summed
        on arrival and stored as nothing). False: already stored;
        IllegalTransition (nothing stored): the task cannot be accepted (missing); RoundClosed
        (nothing stored): the round is no longer collecting."""
        now = time.time()
        try:
            with self._write() as s:
                # FOR SHARE: the leader's move to committing waits for this transaction, and one
                # that starts after it sees the new state (SQLite: no-op, it has one writer).
                state = s.scalar(select(RoundRow.state).where(RoundRow.number == round_number)
                                 .with_for_update(read=True))
                if state != RoundState.COLLECTING:
                    raise RoundClosed(f"round {round_number} is {state}")
                s.add(UpdateRow(round=round_number, device=device, task=task, payload=payload,
                                weight=weight, num_samples=num_samples, epsilon=epsilon,
                                local_accuracy=local_accuracy,
                                bytes=len(payload) if size is None else size, received_at=now))
                s.flush()
                row = s.get(TaskRow, (round_number, device))
                row.state, row.answered_at = task_transition(row.state, TaskState.ACCEPTED), now
        except IntegrityError:
            return False
        return True

    def update_weights(self, round_number: int) -> list[float]:
        """The aggregation weights of a round's stored updates, without their payloads: the
        commit declares them first, so the weight cap is known before the first update is folded
        in and the commit holds one update at a time."""
        with self.session() as s:
            return list(s.scalars(select(UpdateRow.weight).where(UpdateRow.round == round_number)))

    def updates(self, round_number: int) -> Iterator[UpdateRow]:
        """One at a time, so aggregation memory does not grow with the number of devices."""
        with self.session() as s:
            keys = s.execute(select(UpdateRow.device, UpdateRow.task)
                             .where(UpdateRow.round == round_number)
                             .order_by(UpdateRow.device)).all()
        for device, task in keys:
            with self.session() as s:
                yield s.get(UpdateRow, (round_number, device, task))

    def save_checkpoint(self, round_number: int, data: bytes) -> None:
        """Keep a round's checkpoint file in the database (again after a re-run commit)."""
        with self._write() as s:
            s.merge(CheckpointRow(round=round_number, data=data))

    def checkpoint(self, round_number: int) -> bytes | None:
        with self.session() as s:
            row = s.get(CheckpointRow, round_number)
            return None if row is None else row.data

    def has_update(self, round_number: int, device: str, task: str) -> bool:
        with self.session() as s:
            return s.get(UpdateRow, (round_number, device, task)) is not None

    def update_count(self, round_number: int) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(UpdateRow)
                            .where(UpdateRow.round == round_number)) or 0
