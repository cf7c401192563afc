"""Leader election for several coordinators on one PostgreSQL database ([cluster] in
coordinator.toml; docs/ARCHITECTURE.md, "Several coordinators").

The leader is the process holding PostgreSQL's session-level advisory lock `leader_lock_key`,
taken with `pg_try_advisory_lock` on a connection of its own kept open for as long as it leads.
PostgreSQL releases a session lock when the session ends, so a leader that dies loses it as
soon as the server sees its connection close: at once when the process dies (its kernel closes
the socket), within `dead_leader_seconds` when its host vanishes without closing it (server-side
TCP keepalives and user timeout, set on this connection only). Followers try the lock every
`takeover_poll_seconds`; the leader checks its connection as often and steps down when it is
gone (its lock is gone with it).

A leader that hangs (stopped, swapping, deadlocked) keeps its session: its kernel still answers
TCP, so PostgreSQL would never free the lock and the fleet would wait. So the leader's heartbeat
thread runs `SELECT 1` on the lock connection every `takeover_poll_seconds`, which PostgreSQL
records as the session's `state_change`; a follower that finds the holder's last heartbeat older
than `dead_leader_seconds` ends that session with `pg_terminate_backend` (allowed between
sessions of one database role) and takes the lock. A thread of its own, so a leader busy with a
long commit still beats. A deposed leader that wakes finds its connection closed at its next
check and steps down. Its store's sessions (`fedprune:<node>`, `member_url`) are ended with it, so
no row lock it held blocks the new leader.

Fencing: taking the lock raises the leader epoch in the database (`store.raise_epoch`, on the lock's
session), and the leader's `epoch` is the value it got. `poll` checks, on the lock connection,
that the database still holds that epoch (a closed connection fails the query: the lock is gone);
the service asks it before every retry of a leader's step, and the store refuses any write of a
leader whose epoch moved (`store.Deposed`), so a leader that woke between those checks still opens,
commits and publishes nothing. Devices refuse a TASK or ARTIFACT of an older epoch (`stale`).

Who leads is visible in PostgreSQL: the lock connection is named `fedprune-leader:<node>` while it
holds the lock (`fedprune-candidate:<node>` before):

    SELECT application_name, client_addr, backend_start FROM pg_stat_activity
    WHERE application_name LIKE 'fedprune-leader:%';
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .config import ClusterSettings
from .store import leader_epoch, raise_epoch

log = logging.getLogger("fedprune.coordinator.cluster")

LEADER_PREFIX, CANDIDATE_PREFIX, MEMBER_PREFIX = "fedprune-leader:", "fedprune-candidate:", "fedprune:"


def member_url(database_url: str, node: str) -> str:
    """The store's database URL for a cluster member: its sessions named `fedprune:<node>`, so a
    follower deposing a hung leader can end them too (a hung leader's open transaction would
    keep its row locks and block the new leader)."""
    url = make_url(database_url)
    return url.update_query_dict({"application_name": f"{MEMBER_PREFIX}{node}"}).render_as_string(
        hide_password=False)


def keepalive_settings(dead_leader_seconds: int) -> dict[str, int]:
    """TCP keepalive idle, interval, count (seconds) and user timeout (ms) that notice a peer gone
    without a word within `dead_leader_seconds`: idle half of it, then 3 probes in the rest."""
    idle = max(1, dead_leader_seconds // 2)
    interval = max(1, (dead_leader_seconds - idle) // 3)
    return {"idle": idle, "interval": interval, "count": 3, "user_timeout_ms": dead_leader_seconds * 1000}


def lock_parts(key: int) -> tuple[int, int]:
    """pg_locks' (classid, objid) of a bigint advisory lock key (objsubid is 1)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


class ConnectionLost(Exception):
    """The lock connection is gone (the lock went with it), or the leader epoch moved."""


class Leadership:
    """The leader lock of one coordinator process; `poll` from one thread only."""

    def __init__(self, database_url: str, settings: ClusterSettings):
        self.settings = settings
        self.key = settings.leader_lock_key
        self.node = settings.node
        tcp = keepalive_settings(settings.dead_leader_seconds)
        # Both ends of this one connection watch the other: the server drops the session (and so
        # the lock) of a leader that vanished, and the leader learns that its database is gone.
        server = (f"-c tcp_keepalives_idle={tcp['idle']} -c tcp_keepalives_interval={tcp['interval']} "
                  f"-c tcp_keepalives_count={tcp['count']} -c tcp_user_timeout={tcp['user_timeout_ms']}")
        self.engine = create_engine(database_url, poolclass=NullPool, connect_args={
            "application_name": f"{CANDIDATE_PREFIX}{self.node}", "options": server,
            "keepalives": 1, "keepalives_idle": tcp["idle"], "keepalives_interval": tcp["interval"],
            "keepalives_count": tcp["count"], "tcp_user_timeout": tcp["user_timeout_ms"],
            "connect_timeout": max(2, settings.dead_leader_seconds // 2)})
        self.connection: Connection | None = None
        self.leading = False
        self.since: float | None = None   # time.time() when this process took the lead
        self.epoch: int | None = None     # the leader epoch it took the lead with (fencing)
        self.changes = 0                   # times this process took or lost the lead
        # The lock connection is shared by `poll` and the heartbeat thread; `beat_failed` tells
        # `poll` that a heartbeat found the connection gone.
        self._connection_lock = threading.Lock()
        self._beat_failed: str | None = None
        self._stop_beating = threading.Event()

    def poll(self) -> bool:
        """Whether this process leads now: the leader checks that its lock connection is alive; a
        follower tries to take the lock. A database that cannot be reached makes a follower (and
        a leader that loses its connection steps down: its lock went with the connection)."""
        try:
            if self.leading:
                self._confirm()
                return True
            with self._connection_lock:
                if self.connection is None:
                    self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                if not self._try_lock() and not (self._depose_hung_leader() and self._try_lock()):
                    return False
                self.connection.execute(text(f"SET application_name = '{LEADER_PREFIX}{self.node}'"))
                self.epoch = raise_epoch(self.connection, self.node)
            log.info("node %s leads under leader epoch %d", self.node, self.epoch,
                     extra={"event": "leader_epoch", "epoch": self.epoch})
            self.leading, self.since = True, time.time()
            self.changes += 1
            self._start_heartbeat()
            return True
        except (SQLAlchemyError, ConnectionLost) as exc:
            if self.leading:
                log.error("lost the lead (%s: %s); stepping down",
                          type(exc).__name__, exc)
                self.changes += 1
            else:
                log.warning("cannot try the leader lock (%s: %s)", type(exc).__name__, exc)
            self.leading, self.since, self.epoch = False, None, None
            self._drop_connection()
            return False

    def _confirm(self) -> None:
        """A leader's check, on its lock connection: the connection answers (so the lock is
        held) and the database's epoch is still the one it took the lead with; ConnectionLost
        (or the query's error) otherwise. After a pause the heartbeat may not have run yet."""
        if self._beat_failed is not None:
            raise ConnectionLost(self._beat_failed)
        with self._connection_lock:
            if self.connection is None:
                raise ConnectionLost("the lock connection was closed")
            epoch = leader_epoch(self.connection)
        if epoch != self.epoch:
            raise ConnectionLost(f"the leader epoch moved from {self.epoch} to {epoch}: another "
                                 "coordinator took the lead")

    def _try_lock(self) -> bool:
        return bool(self.connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}))

    def _depose_hung_leader(self) -> bool:
        """End the holder's session when its last heartbeat is older than dead_leader_seconds:
        whether it was ended (PostgreSQL frees the lock as the session exits, at once or by the
        next poll)."""
        classid, objid = lock_parts(self.key)
        holder = self.connection.execute(text(
            "SELECT a.pid, a.application_name, EXTRACT(EPOCH FROM now() - a.state_change) "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.classid = :classid AND l.objid = :objid AND l.objsubid = 1"),
            {"classid": classid, "objid": objid}).first()
        if holder is None or holder[2] is None or float(holder[2]) <= self.settings.dead_leader_seconds:
            return False
        pid, name, silent = holder
        if not self.connection.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}):
            return False
        if name.startswith(LEADER_PREFIX):  # and the hung leader's store sessions (their locks)
            self.connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :member"),
                {"member": MEMBER_PREFIX + name.removeprefix(LEADER_PREFIX)})
        log.error("the leader %s has not beaten for %.1f s (dead_leader_seconds %d): ended its "
                  "session; taking the lead", name, float(silent), self.settings.dead_leader_seconds,
                  extra={"event": "deposed_leader", "leader": name, "silent_seconds": float(silent)})
        return True

    def _start_heartbeat(self) -> None:
        self._beat_failed = None
        self._stop_beating = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop_beating,),
                         name="fedprune-leader-heartbeat", daemon=True).start()

    def _beat(self, stop: threading.Event) -> None:
        """The leader's `SELECT 1` every takeover_poll_seconds: what followers read as alive."""
        while not stop.wait(self.settings.takeover_poll_seconds):
            with self._connection_lock:
                if self.connection is None:
                    return
                try:
                    self.connection.execute(text("SELECT 1"))
                except SQLAlchemyError as exc:
                    self._beat_failed = f"{type(exc).__name__}: {exc}"
                    return

    def holder(self) -> str | None:
        """The node that holds the leader lock now (from pg_locks), or None."""
        classid, objid = lock_parts(self.key)
        with self.engine.connect() as connection:
            name = connection.scalar(text(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :classid "
                "AND l.objid = :objid AND l.objsubid = 1"), {"classid": classid, "objid": objid})
        if name is None:
            return None
        return name.split(":", 1)[1] if ":" in name else name

    def _drop_connection(self, broken: bool = True) -> None:
        """Stop beating and close the lock connection; a `broken` one is not returned for reuse."""
        self._stop_beating.set()
        with self._connection_lock:
            if self.connection is not None:
                try:
                    if broken:
                        self.connection.invalidate()
                    self.connection.close()
                except SQLAlchemyError:
                    pass
            self.connection = None

    def close(self) -> None:
        """Give the lock up (closing the session releases it) and close the connection."""
        self._drop_connection(broken=False)
        self.leading, self.since, self.epoch = False, None, None
        self.engine.dispose()
