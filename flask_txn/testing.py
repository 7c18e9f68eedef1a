"""A pytest plugin for testing apps that use flask-txn.

Registered through the ``pytest11`` entry point. Every fixture is opt-in and
prefixed ``txn_``: a test that requests none of them runs exactly as without
the plugin. They find the app through pytest-flask's ``app`` fixture.

- :func:`txn_rollback`: the test runs inside one outer transaction, rolled back
  at the end; the app's commits become savepoint releases.
- :func:`txn_on_commit`: collects ``on_commit`` callbacks instead of running them.
- :func:`txn_faults`: makes the next transactions fail with a real retriable error.
- :func:`txn_signals`: records every flask-txn signal with its payload.
- :func:`txn_queries`: counts the SQL statements the app runs.
- :func:`txn_nplusone`: fails the test on any N+1 lazy load, whatever ``TXN_NPLUSONE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, has_app_context, has_request_context, request
from sqlalchemy import Connection, event
from sqlalchemy.orm import Session

from ._adopt import joined_session_class
from ._errors import ConfigError, UsageError
from ._nplusone import Guard, NPlusOne
from ._session import JOINED
from ._signals import transaction_committed, transaction_retrying, transaction_rolled_back
from ._state import AppState, app_state
from ._testhooks import added, hooks

__all__ = [
    "CapturedCallbacks",
    "Faults",
    "QueryCounter",
    "SignalRecorder",
    "txn_faults",
    "txn_nplusone",
    "txn_on_commit",
    "txn_queries",
    "txn_rollback",
    "txn_signals",
]

NO_ROLLBACK = "txn_no_rollback"

#: Codes :meth:`Faults.fail_next` can make each database raise for real.
FAULT_CODES = {
    "postgresql": ("40001", "40P01"),
    "sqlite": ("SQLITE_LOCKED",),
    "mysql": ("1213", "1020"),
    "mariadb": ("1213", "1020"),
}
#: The SQLSTATE MariaDB and MySQL send with each of their fault codes.
_MYSQL_SQLSTATES = {"1213": "40001", "1020": "HY000"}

# Transaction control that flask-txn and SQLAlchemy emit: not the app's queries.
_CONTROL = re.compile(r"\s*(BEGIN|SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT)\b", re.I)


def pytest_configure(config: pytest.Config) -> None:
    """Register the opt-out marker."""
    config.addinivalue_line(
        "markers",
        f"{NO_ROLLBACK}: run this test with real transactions even if it uses txn_rollback.",
    )


def _state(app: Flask) -> AppState:
    try:
        return app_state(app=app)
    except UsageError as exc:
        raise UsageError(
            f"The 'app' fixture's app {app.name!r} has no flask-txn extension. Call"
            " 'FlaskTxn(app)' or 'txn.init_app(app)' in the fixture that builds it."
        ) from exc


def _discard_sessions(state: AppState) -> None:
    """Close the current context's session so the next one is made afresh."""
    if has_app_context() and state.registry.has():
        state.registry().close()
        state.registry.clear()


@pytest.fixture
def txn_rollback(request: pytest.FixtureRequest, app: Flask) -> Iterator[Connection | None]:
    """Run the test inside one transaction that is rolled back when it ends.

    Yields the connection the app's sessions share (use it for direct SQL in
    the test), or None under the ``txn_no_rollback`` marker, where the test runs
    with real transactions and must clean up itself.
    """
    if request.node.get_closest_marker(NO_ROLLBACK):
        yield None
        return
    state = _state(app)
    factory = state.sessionmaker
    saved = dict(factory.kw)
    saved_class = factory.class_
    if state.adopted is not None:
        factory.class_ = joined_session_class(saved_class, state.engine)
    connection = state.engine.connect()
    outer = connection.begin()
    event.listen(connection, "before_cursor_execute", _refuse_other_threads(threading.get_ident()))
    _discard_sessions(state)
    factory.configure(
        bind=connection,
        join_transaction_mode="create_savepoint",
        info={**saved.get("info", {}), JOINED: True},
    )
    try:
        yield connection
    finally:
        try:
            _discard_sessions(state)
        finally:
            factory.kw.clear()
            factory.kw.update(saved)
            factory.class_ = saved_class
            if outer.is_active:
                outer.rollback()
            connection.close()


def _refuse_other_threads(owner: int) -> Callable[..., None]:
    """A DBAPI connection must not be shared by threads: refuse before any statement."""

    def check(*_: Any) -> None:
        if threading.get_ident() != owner:
            raise UsageError(
                "txn_rollback shares one database connection between the test and the"
                " app, so it cannot serve a request from another thread (a threaded"
                f" server, test threads). Mark the test with '{NO_ROLLBACK}' and clean up"
                " the data yourself."
            )

    return check


class CapturedCallbacks:
    """The ``on_commit`` callbacks of every commit since the fixture started."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], object]] = []
        #: Also run the callbacks at commit, as in production.
        self.execute = False

    def _capture(self, callbacks: list[Callable[[], object]]) -> bool:
        self.callbacks.extend(callbacks)
        return self.execute

    def run(self) -> None:
        """Run the captured callbacks in order, and forget them."""
        pending, self.callbacks = self.callbacks, []
        for callback in pending:
            callback()

    def __len__(self) -> int:
        return len(self.callbacks)


@pytest.fixture
def txn_on_commit() -> Iterator[CapturedCallbacks]:
    """Collect ``on_commit`` callbacks instead of running them (set ``.execute`` to run too)."""
    captured = CapturedCallbacks()
    with added(hooks.captures, captured._capture):
        yield captured


class SignalRecorder:
    """Every flask-txn signal sent while the fixture is active, with its payload."""

    def __init__(self) -> None:
        #: (signal name, payload) in the order sent, e.g. ``("transaction-committed", {...})``.
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _receiver(self, name: str) -> Callable[..., None]:
        def receive(_sender: Any, **payload: Any) -> None:
            self.events.append((name, payload))

        return receive

    def names(self) -> list[str]:
        """The names of the signals sent, in order."""
        return [name for name, _ in self.events]

    def clear(self) -> None:
        """Forget the events recorded so far."""
        self.events.clear()

    def assert_retried_then_committed(self, retries: int) -> None:
        """Assert the transactions so far were retried ``retries`` times, then committed once.

        :param retries: how many times the transaction was re-run.
        """
        expected = [transaction_rolled_back.name, transaction_retrying.name] * retries
        expected.append(transaction_committed.name)
        assert self.names() == expected, (
            f"expected {retries} retries then one commit, got {self.names()}"
        )


@pytest.fixture
def txn_signals() -> Iterator[SignalRecorder]:
    """Record every flask-txn signal, from any app, with its payload."""
    recorder = SignalRecorder()
    with contextlib.ExitStack() as stack:
        for signal in (transaction_committed, transaction_rolled_back, transaction_retrying):
            stack.enter_context(signal.connected_to(recorder._receiver(signal.name)))
        yield recorder


@dataclasses.dataclass
class _Plan:
    remaining: int
    endpoint: str | None
    code: str | None


class Faults:
    """Makes transactions fail with real retriable errors raised by the database."""

    def __init__(self) -> None:
        self._plans: list[_Plan] = []
        #: How many failures were injected so far.
        self.injected = 0

    def fail_next(
        self, times: int = 1, *, endpoint: str | None = None, code: str | None = None
    ) -> None:
        """Make the next ``times`` outermost transactions fail just before they commit.

        The database itself raises the error, so the driver's exception has its
        real shape: PostgreSQL raises SQLSTATE ``code`` (``"40001"``, the
        default, or ``"40P01"``); MariaDB error ``code`` (``"1213"``, the
        default, or ``"1020"``); SQLite raises ``SQLITE_LOCKED`` ("database
        table is locked"), provoked on the transaction's own connection.

        :param times: how many transactions fail (each attempt counts).
        :param endpoint: fail only transactions of requests to this endpoint.
        :param code: the error to raise; None for the database's default.
        """
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ConfigError(f"'times' must be a whole number >= 1, got {times!r}.")
        self._plans.append(_Plan(times, endpoint, code))

    def _inject(self, session: Session) -> None:
        current = request.endpoint if has_request_context() else None
        for plan in self._plans:
            if plan.remaining and plan.endpoint in (None, current):
                plan.remaining -= 1
                self.injected += 1
                _raise_from_database(session, plan.code)


def _raise_from_database(session: Session, code: str | None) -> None:
    """Have the database raise a retriable error in the session's transaction."""
    connection = session.connection()
    dialect = connection.dialect.name
    allowed = FAULT_CODES.get(dialect)
    if allowed is None:
        raise UsageError(
            f"txn_faults cannot inject errors on {dialect!r}; it supports {sorted(FAULT_CODES)!r}."
        )
    code = code or allowed[0]
    if code not in allowed:
        raise ConfigError(f"'code' must be one of {allowed!r} on {dialect}, got {code!r}.")
    if dialect == "postgresql":
        # A validated literal: DO blocks take no parameters.
        connection.exec_driver_sql(
            f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE ="
            " 'injected by flask_txn.testing'; END $$"
        )
    elif dialect == "sqlite":
        _raise_sqlite_locked(connection)
    else:
        # MariaDB raises it (SIGNAL outside a stored program): validated literals.
        connection.exec_driver_sql(
            f"SIGNAL SQLSTATE '{_MYSQL_SQLSTATES[code]}' SET MYSQL_ERRNO = {code},"
            " MESSAGE_TEXT = 'injected by flask_txn.testing'"
        )


def _raise_sqlite_locked(connection: Connection) -> None:
    """SQLite refuses to drop a table that a statement of the same connection is
    still reading: a real SQLITE_LOCKED, with no other connection involved."""
    connection.exec_driver_sql("CREATE TEMP TABLE IF NOT EXISTS flask_txn_fault (x)")
    connection.exec_driver_sql("INSERT INTO temp.flask_txn_fault VALUES (1), (2)")
    reading = connection.exec_driver_sql("SELECT x FROM temp.flask_txn_fault")
    reading.fetchone()
    try:
        connection.exec_driver_sql("DROP TABLE temp.flask_txn_fault")
    finally:
        reading.close()


@pytest.fixture
def txn_faults() -> Iterator[Faults]:
    """Inject real retriable errors: ``txn_faults.fail_next(1)`` fails the next transaction."""
    faults = Faults()
    with added(hooks.injectors, faults._inject):
        yield faults


class QueryCounter:
    """The SQL statements the app's engine ran, without transaction control."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not _CONTROL.match(statement):
            self.statements.append(statement)

    @property
    def count(self) -> int:
        """How many statements ran so far."""
        return len(self.statements)

    @contextlib.contextmanager
    def assert_max_queries(self, limit: int) -> Iterator[None]:
        """Fail if the block runs more than ``limit`` statements (an N+1 query, say).

        :param limit: the most statements the block may run.
        """
        start = len(self.statements)
        yield
        ran = self.statements[start:]
        assert len(ran) <= limit, (
            f"{len(ran)} statements ran, at most {limit} expected:\n" + "\n".join(ran)
        )


@pytest.fixture
def txn_queries(app: Flask) -> Iterator[QueryCounter]:
    """Count the statements the app's engine runs (``assert_max_queries(n)`` for a block)."""
    engine = _state(app).engine
    counter = QueryCounter()
    event.listen(engine, "before_cursor_execute", counter._record)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", counter._record)


@pytest.fixture
def txn_nplusone(app: Flask) -> Iterator[list[NPlusOne]]:
    """Fail the test if the app lazy-loads a relationship, a query each, for
    ``TXN_NPLUSONE_THRESHOLD`` objects of one query (an N+1), whatever ``TXN_NPLUSONE``.

    Yields the N+1s found so far. A test that found any fails when it ends,
    with the guard's messages.
    """
    state = _state(app)
    found: list[NPlusOne] = []
    guard = Guard(state.settings.nplusone_threshold, found.append)
    event.listen(state.sessionmaker, "do_orm_execute", guard)
    try:
        yield found
    finally:
        event.remove(state.sessionmaker, "do_orm_execute", guard)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail, in the test's own call, a test whose ``txn_nplusone`` found an N+1."""
    result = yield
    found = getattr(item, "funcargs", {}).get("txn_nplusone")
    if found:
        pytest.fail("\n".join(n.message() for n in found), pytrace=False)
    return result
