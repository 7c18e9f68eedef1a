"""The bank of examples/bank as tests/test_reliability.py serves it, threaded or under gunicorn.

:func:`build` makes the example's app with flask-txn's error responses
(:func:`flask_txn.register_error_handlers`) in place of the example's own for
database errors, counters of what flask-txn saw (fed by its signals), and a
report endpoint, ``GET /_reliability``, with the leak checks of this process.

Under gunicorn (``-c python:tests.reliabilityapp tests.reliabilityapp:app``),
the app is built at import from the JSON in ``CONFIG_ENV``, and each worker
writes its report to ``<REPORTS_ENV folder>/<pid>.json`` when it exits: with
several workers, a request cannot choose which one answers it.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import threading
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from examples.bank.app import create_app
from examples.bank.models import txn
from flask_txn import (
    AmbiguousCommitError,
    _watchdog,
    is_retryable,
    register_error_handlers,
    sqlstate_of,
    transaction_committed,
    transaction_retrying,
    transaction_rolled_back,
)

#: JSON of {"url": ..., "config": {...}} for the app gunicorn serves.
CONFIG_ENV = "FLASK_TXN_RELIABILITY_APP"
#: A folder where each gunicorn worker writes its report as it exits.
REPORTS_ENV = "FLASK_TXN_RELIABILITY_REPORTS"


def kind_of(error: BaseException | None) -> str:
    """A short name for a failed attempt's error: what the counters are keyed by."""
    if error is None:
        return "none"
    if isinstance(error, AmbiguousCommitError):
        return "ambiguous-commit"
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return "connection-lost"
    code = sqlstate_of(error)
    if code is not None:
        return f"sqlstate-{code}"
    if isinstance(error, DBAPIError):
        return "no-connection" if not is_retryable(error) else "retriable"
    return type(error).__name__


class Probe:
    """What flask-txn did in this process: commits, retries and final failures by kind."""

    def __init__(self, app: Flask) -> None:
        self._lock = threading.Lock()
        self.committed = 0
        self.retried: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self._fired_before = _watchdog.watchdog.fired
        transaction_committed.connect(self._committed, sender=app)
        transaction_retrying.connect(self._retrying, sender=app)
        transaction_rolled_back.connect(self._rolled_back, sender=app)

    def _committed(self, app: Flask, **extra: Any) -> None:
        with self._lock:
            self.committed += 1

    def _retrying(self, app: Flask, *, error: BaseException, **extra: Any) -> None:
        with self._lock:
            self.retried[kind_of(error)] += 1

    def _rolled_back(
        self, app: Flask, *, reason: str, error: BaseException | None, **extra: Any
    ) -> None:
        if reason == "error":  # "retry" is counted above; "veto" is a 4xx answer
            with self._lock:
                self.failed[kind_of(error)] += 1

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {
                "committed": self.committed,
                "retried": dict(self.retried),
                "failed": dict(self.failed),
                "watchdog_fired": _watchdog.watchdog.fired - self._fired_before,
            }


def report(app: Flask) -> dict[str, Any]:
    """This process's leak checks and counters."""
    with app.app_context():
        engine = txn.engine
    gc.collect()
    # Every Session of this app still alive: one kept by a registry (a thread's
    # or a scope's) after its request ended would be here.
    sessions = [obj for obj in gc.get_objects() if isinstance(obj, Session) and obj.bind is engine]
    return {
        "pid": os.getpid(),
        "checked_out": engine.pool.checkedout(),
        "pool": engine.pool.status(),
        "sessions": len(sessions),
        "sessions_in_transaction": sum(session.in_transaction() for session in sessions),
        **app.extensions["reliability"].counts(),
    }


def build(database_url: str, **config: Any) -> Flask:
    """The bank with flask-txn's error responses, the counters and the report endpoint."""
    app = create_app(database_url, **config)
    # The example answers database errors itself; use flask-txn's responses, which
    # tell an ambiguous commit (502) from a database that is busy or away (503).
    # A key raced by a concurrent copy (IntegrityError) keeps the example's 409.
    handlers = app.error_handler_spec["bank"][None]
    handlers[IntegrityError] = handlers.pop(DBAPIError)
    handlers.pop(AmbiguousCommitError)
    register_error_handlers(app)
    app.extensions["reliability"] = Probe(app)

    @app.get("/_reliability")
    def reliability() -> dict[str, Any]:
        return report(app)

    return app


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: the exiting worker writes its report."""
    folder = os.environ.get(REPORTS_ENV)
    if folder:
        path = Path(folder) / f"{os.getpid()}.json"
        path.write_text(json.dumps(report(app)))


if CONFIG_ENV in os.environ:
    _served = json.loads(os.environ[CONFIG_ENV])
    app = build(_served["url"], **_served["config"])
