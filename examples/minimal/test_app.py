"""Tests for the minimal app with flask-txn's pytest fixtures (docs: "Testing your app").

Run them with ``pytest examples/minimal/test_app.py``; pytest-flask provides
``client`` from the ``app`` fixture below.
"""

from __future__ import annotations

from typing import Any

import pytest
from app import create_app
from flask import Flask


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """One app for the whole run, on a throwaway SQLite file."""
    return create_app(f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}")


def test_hits_are_counted(txn_rollback: Any, client: Any) -> None:
    """Each hit adds one; the view's commits stay inside the test's transaction."""
    assert client.post("/hit/me").json == {"me": 1}
    assert client.post("/hit/me").json == {"me": 2}


def test_each_test_starts_empty(txn_rollback: Any, client: Any) -> None:
    """The previous test's hits were rolled back."""
    assert client.post("/hit/me").json == {"me": 1}


def test_a_conflict_is_retried(
    txn_rollback: Any, txn_faults: Any, txn_signals: Any, client: Any
) -> None:
    """A serialization failure (injected, raised by the database) re-runs the view once."""
    txn_faults.fail_next(1, endpoint="hit")
    assert client.post("/hit/me").json == {"me": 1}
    txn_signals.assert_retried_then_committed(1)


def test_a_hit_is_two_statements(txn_rollback: Any, txn_queries: Any, client: Any) -> None:
    """Reading and writing the counter takes one SELECT and one INSERT or UPDATE."""
    with txn_queries.assert_max_queries(2):
        client.post("/hit/you")
