"""The PostgreSQL the tests use (127.0.0.1:5432, trust auth, database `test`), emptied around each
test that uses it. FEDPRUNE_TEST_POSTGRES names another database, for runs that must not share
`test` (the tables are dropped). Under pytest-xdist each worker empties a database of its own,
`<database>_<worker>`, created on first use, so two workers never drop each other's tables."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy

from coordinator.service.store import Base

POSTGRES = os.environ.get("FEDPRUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _shared = sqlalchemy.make_url(POSTGRES)
    POSTGRES = _shared.set(database=f"{_shared.database}_{_WORKER}").render_as_string(
        hide_password=False)


def _create_worker_database() -> None:
    """The worker's own database, made once (it outlives the run: the next run empties it)."""
    url = sqlalchemy.make_url(POSTGRES)
    admin = sqlalchemy.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                        {"n": url.database}).first()
            if not exists:
                connection.execute(sqlalchemy.text(f'CREATE DATABASE "{url.database}"'))
    finally:
        admin.dispose()


def _drop_tables() -> None:
    if _WORKER:
        _create_worker_database()
    engine = sqlalchemy.create_engine(POSTGRES)
    try:
        Base.metadata.drop_all(engine)
    finally:
        engine.dispose()


@contextmanager
def empty_postgres() -> Iterator[str]:
    """POSTGRES with no fedprune tables, before and after; fails the test when it is not reachable."""
    try:
        _drop_tables()
    except sqlalchemy.exc.OperationalError:
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (database test, trust auth); "
                    "start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    try:
        yield POSTGRES
    finally:
        _drop_tables()


@contextmanager
def own_database(purpose: str = "test") -> Iterator[str]:
    """A PostgreSQL database of the caller's own (created, then dropped), on POSTGRES's server: for
    several processes sharing one database (a cluster of coordinators), which `empty_postgres`'s
    shared `test` database cannot be while other tests use it."""
    server = sqlalchemy.make_url(POSTGRES)
    name = f"fedprune_{purpose}_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError:
        admin.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {server.render_as_string()}; start it: "
                    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
