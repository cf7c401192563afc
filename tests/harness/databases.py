"""The PostgreSQL the tests use (127.0.0.1:5432, trust auth, database `test`), emptied around each
test that uses it. FEDPRUNE_TEST_POSTGRES names another database, for runs that must not share
`test` (the tables are dropped)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy

from coordinator.service.store import Base

POSTGRES = os.environ.get("FEDPRUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _drop_tables() -> None:
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
