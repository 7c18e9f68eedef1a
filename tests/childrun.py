"""Run by tests/test_pgserver.py in a child pytest (its name keeps it out of the suite):
start the session's PostgreSQL server, print its data folder, wait for the parent."""

from __future__ import annotations

import sys

import sqlalchemy as sa


def test_waits_for_its_parent(postgresql_url: str) -> None:
    engine = sa.create_engine(postgresql_url)
    with engine.connect() as connection:
        data = connection.exec_driver_sql("SHOW data_directory").scalar()
    engine.dispose()
    print(f"SERVER {data}", flush=True)
    sys.stdin.read()  # until the parent ends the run
