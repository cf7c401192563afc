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

Who leads is visible in PostgreSQL: the lock connection is named `fedprune-leader:<node>` while it
holds the lock (`fedprune-candidate:<node>` before):

    SELECT application_name, client_addr, backend_start FROM pg_stat_activity
    WHERE application_name LIKE 'fedprune-leader:%';
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .config import ClusterSettings

log = logging.getLogger("fedprune.coordinator.cluster")

LEADER_PREFIX, CANDIDATE_PREFIX = "fedprune-leader:", "fedprune-candidate:"


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
        self.changes = 0                   # times this process took or lost the lead

    def poll(self) -> bool:
        """Whether this process leads now: the leader checks that its lock connection is alive; a
        follower tries to take the lock. A database that cannot be reached makes a follower (and
        a leader that loses its connection steps down: its lock went with the connection)."""
        try:
            if self.connection is None:
                self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            if self.leading:
                self.connection.execute(text("SELECT 1"))
                return True
            if self.connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}):
                self.connection.execute(text(f"SET application_name = '{LEADER_PREFIX}{self.node}'"))
                self.leading, self.since = True, time.time()
                self.changes += 1
            return self.leading
        except SQLAlchemyError as exc:
            if self.leading:
                log.error("lost the leader lock's database connection (%s: %s); stepping down",
                          type(exc).__name__, exc)
                self.changes += 1
            else:
                log.warning("cannot try the leader lock (%s: %s)", type(exc).__name__, exc)
            self.leading, self.since = False, None
            self._drop_connection()
            return False

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

    def _drop_connection(self) -> None:
        if self.connection is not None:
            try:
                self.connection.invalidate()
                self.connection.close()
            except SQLAlchemyError:
                pass
        self.connection = None

    def close(self) -> None:
        """Give the lock up (closing the session releases it) and close the connection."""
        if self.connection is not None:
            try:
                self.connection.close()
            except SQLAlchemyError:
                pass
        self.connection, self.leading, self.since = None, False, None
        self.engine.dispose()
