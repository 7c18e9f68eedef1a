"""Run by tests/test_pgserver.py in a child pytest (its name keeps it out of the suite):
start the session's PostgreSQL (or MariaDB) server, print its pid file, wait for the parent."""

from __future__ import annotations

import sys

import sqlalchemy as sa


def test_waits_for_its_parent(postgresql_url: str) -> None:
    engine = sa.create_engine(postgresql_url)
    with engine.connect() as connection:
        data = connection.exec_driver_sql("SHOW data_directory").scalar()
    engine.dispose()
    print(f"SERVER {data}/postmaster.pid", flush=True)
    sys.stdin.read()  # until the parent ends the run


def test_mariadb_waits_for_its_parent(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    with engine.connect() as connection:
        pid_file = connection.exec_driver_sql("SELECT @@pid_file").scalar()
    engine.dispose()
    print(f"SERVER {pid_file}", flush=True)
    sys.stdin.read()
