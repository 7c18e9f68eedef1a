"""A PostgreSQL primary and a streaming standby for the replica tests.

The standby is a ``pg_basebackup -R -X stream`` copy of the primary, made by the
server's own user with the suite's own binaries, started on a free port of its
own. ``initdb``'s ``pg_hba.conf`` already lets local TCP connections replicate,
so the standby streams as the ``postgres`` role. Both servers stop, and their
files are deleted, however the block ends (SIGTERM too: conftest turns it into
``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from . import pgserver

#: The most times :func:`wait_for_replay` asks the standby before failing.
POLLS = 10_000


class Standby(pgserver.PostgresServer):
    """A streaming standby of ``primary``, in a data folder beside the primary's."""

    def __init__(self, primary: pgserver.PostgresServer, name: str = "standby") -> None:
        super().__init__(primary.bindir, primary.folder, primary.user, data=name, log=f"{name}.log")
        self.primary = primary

    def start(self) -> None:
        """Copy the primary (``-R`` writes ``standby.signal`` and ``primary_conninfo``), start."""
        self.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.data),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        self.start_cluster()

    def promote(self) -> None:
        """Make the standby a primary (``pg_ctl promote`` waits until it accepts writes)."""
        self.run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def start_streaming(self) -> None:
        """Start the stopped standby, and wait until it streams from its primary again."""
        self.start_cluster()
        engine = sa.create_engine(self.url, poolclass=sa.NullPool)
        try:
            wait_until(
                engine,
                "SELECT EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            )
        finally:
            engine.dispose()

    def stop_fast(self) -> None:
        """Stop the standby (it goes away; :meth:`start_cluster` brings it back)."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@contextlib.contextmanager
def running_pair() -> Iterator[tuple[pgserver.PostgresServer, Standby]]:
    """A started primary and its started standby; both stopped however the block ends.

    Without PostgreSQL binaries (a run on a server given by FLASK_TXN_TEST_POSTGRESQL,
    without the test extra) the tests skip, except on CI, where they fail.
    """
    try:
        pgserver.find_bindir()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} CI must run the replica tests.")
        pytest.skip(f"No PostgreSQL binaries for a primary and a standby: {exc}")
    with pgserver.running() as primary:
        standby = Standby(primary)
        try:
            standby.start()
            yield primary, standby
        finally:
            standby.stop()


def primary_lsn(primary: sa.Engine) -> str:
    """The primary's WAL insert position now: every commit made so far ends before it."""
    with primary.connect() as connection:
        return str(connection.scalar(sa.text("SELECT pg_current_wal_insert_lsn()")))


def wait_for_replay(standby: sa.Engine, lsn: str, *, column: str = "replay") -> None:
    """Poll until the standby has replayed, or received (``column="receive"``), the WAL
    up to ``lsn``."""
    wait_until(standby, f"SELECT pg_last_wal_{column}_lsn() >= CAST('{lsn}' AS pg_lsn)")


def wait_until(engine: sa.Engine, query: str) -> None:
    """Poll (no sleep: each poll is one round trip) until ``query`` answers true."""
    with engine.connect() as connection:
        for _ in range(POLLS):
            if connection.exec_driver_sql(query).scalar():
                return
            connection.rollback()
    raise AssertionError(f"{query!r} was still false after {POLLS} polls")
