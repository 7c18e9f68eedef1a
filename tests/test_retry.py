"""Retries: which errors are retried, the backoff, exhaustion, and the doomed-attempt rule.

The failures are real: PostgreSQL raises them (``RAISE ... USING ERRCODE``) and
SQLite's busy error comes from a second connection holding the write lock.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg2
import pytest
import sqlalchemy as sa
from flask import Flask, request

from flask_txn import (
    FlaskTxn,
    atomic,
    is_retryable,
    sqlstate_of,
    transaction_retrying,
    transaction_rolled_back,
)
from flask_txn._config import RetryPolicy
from flask_txn._retry import backoff

from . import tcpproxy
from .conftest import Item, count_items

FAIL_WITH = """
CREATE OR REPLACE FUNCTION fail_with(code text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION USING ERRCODE = code, MESSAGE = 'injected failure ' || code; END $$
"""


@pytest.fixture
def database_url(postgresql_url: str) -> str:
    """The retry loop is exercised on PostgreSQL, whose errors are the real ones."""
    return postgresql_url


class Waits:
    """A ``TXN_RETRY_SLEEP`` that records the delays and the checked-out connections."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.checked_out: list[int] = []
        self.engine: sa.Engine | None = None

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.engine is not None:
            self.checked_out.append(self.engine.pool.checkedout())


@pytest.fixture
def retry_app(make_app: Any) -> Any:
    """An app on PostgreSQL whose retries never wait, with ``fail_with(code)`` installed."""
    waits = Waits()
    app, txn = make_app(TXN_RETRY_SLEEP=waits, TXN_RETRY_RANDOM=lambda: 1.0)
    with app.app_context(), txn.engine.begin() as connection:
        connection.exec_driver_sql(FAIL_WITH)
        waits.engine = txn.engine
    return app, txn, waits


def fail(txn: Any, code: str) -> None:
    """Make the server raise ``code`` in the current transaction."""
    txn.session.execute(sa.text("SELECT fail_with(:code)"), {"code": code})


@pytest.mark.parametrize("code", ["40001", "40P01"])
def test_retriable_failure_reruns_and_commits_once(retry_app: Any, code: str) -> None:
    """A serialization failure or deadlock re-runs the function, which then commits once."""
    app, txn, waits = retry_app
    calls = []

    @atomic
    def work() -> None:
        calls.append(1)
        txn.session.add(Item(name="x"))
        txn.session.flush()
        if len(calls) == 1:
            fail(txn, code)

    with app.app_context():
        work()
    assert (len(calls), count_items(app, txn), len(waits.delays)) == (2, 1, 1)


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("comes_back", [True, False], ids=["server-back", "server-down"])
def test_connection_refused_is_retried(
    make_app: Any, postgresql_url: str, comes_back: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that could not be made (refused, as while the server restarts) sent
    nothing, so the function runs again: it commits once connections are accepted
    again, and gives up with the connect error after its attempts otherwise."""
    app, txn = make_app()  # the tables
    target = sa.make_url(postgresql_url)
    port = _closed_port()
    proxy = tcpproxy.FaultProxy(target.host or "127.0.0.1", target.port or 5432)

    def sleep(_: float) -> None:
        if comes_back and not proxy.port:
            proxy.start(port)  # the server accepts connections again

    refused = Flask("refused")
    refused.config.update(
        TXN_DATABASE_URI=target.set(host="127.0.0.1", port=port),
        TXN_RETRY_SLEEP=sleep,
        TXN_RETRIES=2,
    )
    refused_txn = FlaskTxn(refused)
    calls = []

    @atomic
    def work() -> None:
        calls.append(1)
        refused_txn.session.add(Item(name="x"))

    try:
        with refused.app_context(), caplog.at_level(logging.INFO, logger="flask_txn"):
            if comes_back:
                work()
            else:
                with pytest.raises(sa.exc.OperationalError) as raised:
                    work()
                assert raised.value.txn_attempts == 3  # type: ignore[attr-defined]
    finally:
        proxy.stop()
        with refused.app_context():
            refused_txn.engine.dispose()
    assert (len(calls), count_items(app, txn)) == ((2, 1) if comes_back else (3, 0))
    assert "attempt 1 failed with OperationalError;" in caplog.text


def test_a_connect_that_timed_out_is_not_retried(make_app: Any, postgresql_url: str) -> None:
    """A server that accepts the TCP connection and never answers makes the connect
    run out of TXN_CONNECT_TIMEOUT: retrying would make each attempt wait as long
    again, so the block gives up after one."""
    make_app()  # the tables
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever answers
        url = sa.make_url(postgresql_url).set(host="127.0.0.1", port=silent.getsockname()[1])
        app = Flask("silent")
        app.config.update(TXN_DATABASE_URI=url, TXN_CONNECT_TIMEOUT=2)
        ext = FlaskTxn(app)
        calls = []

        @atomic
        def work() -> None:
            calls.append(1)
            ext.session.add(Item(name="x"))

        try:
            with app.app_context(), pytest.raises(sa.exc.OperationalError, match="timeout"):
                work()
        finally:
            with app.app_context():
                ext.engine.dispose()
    assert calls == [1]


def test_retry_signals_carry_the_sqlstate(retry_app: Any) -> None:
    """The rolled-back and retrying events of a real 40001 carry its SQLSTATE."""
    app, txn, _ = retry_app
    seen: list[Any] = []
    calls = []

    @atomic
    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            fail(txn, "40001")

    def receiver(_: Any, **payload: Any) -> None:
        seen.append(payload["sqlstate"])

    with (
        transaction_rolled_back.connected_to(receiver),
        transaction_retrying.connected_to(receiver),
        app.app_context(),
    ):
        flaky()
    assert seen == ["40001", "40001"]


def test_other_errors_are_not_retried(retry_app: Any) -> None:
    """A unique violation is raised at once."""
    app, txn, waits = retry_app
    calls = []

    @atomic
    def work() -> None:
        calls.append(1)
        fail(txn, "23505")

    with app.app_context(), pytest.raises(sa.exc.IntegrityError):
        work()
    assert (len(calls), waits.delays) == (1, [])


def test_swallowed_serialization_failure_is_still_retried(retry_app: Any) -> None:
    """A function that catches a 40001 and returns normally is re-run, not reported committed."""
    app, txn, _ = retry_app
    calls = []

    @app.post("/")
    @atomic
    def work() -> str:
        calls.append(1)
        txn.session.add(Item(name="x"))
        txn.session.flush()
        if len(calls) == 1:
            try:
                fail(txn, "40001")
            except sa.exc.OperationalError:
                return "swallowed"
        return "committed"

    response = app.test_client().post("/")
    assert (response.text, len(calls), count_items(app, txn)) == ("committed", 2, 1)


@pytest.mark.parametrize("follow_up", ["own exception", "next statement"])
def test_failure_hidden_behind_another_error_is_retried(retry_app: Any, follow_up: str) -> None:
    """Raising another exception after catching a 40001 still counts as retriable."""
    app, txn, _ = retry_app
    calls = []

    @atomic
    def work() -> None:
        calls.append(1)
        if len(calls) == 1:
            try:
                fail(txn, "40001")
            except sa.exc.OperationalError:
                if follow_up == "own exception":
                    raise ValueError("translated") from None
                txn.session.execute(sa.text("SELECT 1"))  # 25P02: transaction aborted

    with app.app_context():
        work()
    assert len(calls) == 2


def test_exhausted_retries_raise_the_last_error_with_the_count(retry_app: Any) -> None:
    """After ``retries`` re-runs the last attempt's exception propagates, annotated."""
    app, txn, waits = retry_app
    raised_by_attempt: list[BaseException] = []

    @atomic(retries=2)
    def work() -> None:
        try:
            fail(txn, "40001")
        except sa.exc.OperationalError as exc:
            raised_by_attempt.append(exc)
            raise

    with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        work()
    assert raised.value is raised_by_attempt[-1]
    assert len(raised_by_attempt) == 3
    assert raised.value.txn_attempts == 3  # type: ignore[attr-defined]
    assert "flask-txn: gave up after 3 attempt(s)." in raised.value.__notes__
    assert len(waits.delays) == 2


def test_deadline_stops_retrying(retry_app: Any) -> None:
    """No attempt starts once the next wait would pass the deadline."""
    app, txn, waits = retry_app
    calls = []

    @atomic(retries=10, wait_initial=0.6, wait_max=5, deadline=1.0)
    def work() -> None:
        calls.append(1)
        fail(txn, "40001")

    with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        work()
    # Waits drawn at the cap: 0.6 s fits in the deadline, 1.2 s more does not.
    assert (len(calls), waits.delays) == (2, [0.6])
    assert raised.value.txn_attempts == 2  # type: ignore[attr-defined]


def test_backoff_doubles_up_to_the_cap_with_full_jitter() -> None:
    """The cap doubles from ``wait_initial`` to ``wait_max``; the wait is a fraction of it."""
    policy = RetryPolicy(retries=10, wait_initial=0.01, wait_max=0.05, deadline=None)
    assert [backoff(policy, n, lambda: 1.0) for n in range(1, 6)] == [
        0.01,
        0.02,
        0.04,
        0.05,
        0.05,
    ]
    assert backoff(policy, 3, lambda: 0.25) == 0.01
    assert backoff(policy, 2000, lambda: 1.0) == 0.05


def test_connection_is_returned_before_the_backoff_sleep(retry_app: Any) -> None:
    """While the retry loop waits, the attempt holds no pooled connection."""
    app, txn, waits = retry_app

    @atomic(retries=3)
    def work() -> None:
        txn.session.execute(sa.text("SELECT 1"))
        if len(waits.delays) < 3:
            fail(txn, "40001")

    with app.app_context():
        work()
    assert waits.checked_out == [0, 0, 0]


def test_retry_on_adds_retriable_errors(retry_app: Any) -> None:
    """``retry_on`` takes exception classes or a predicate."""
    app, _, _ = retry_app

    class Conflict(Exception):
        pass

    counts = {}
    for label, retry_on in [
        ("class", Conflict),
        ("tuple", (KeyError, Conflict)),
        ("predicate", lambda exc: isinstance(exc, Conflict)),
    ]:
        calls: list[int] = []

        def work(calls: list[int] = calls) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise Conflict

        with app.app_context():
            atomic(retry_on=retry_on)(work)()
        counts[label] = len(calls)
    assert counts == {"class": 2, "tuple": 2, "predicate": 2}


def test_keyboard_interrupt_is_never_retried(retry_app: Any) -> None:
    """A BaseException that is not an Exception stops at once, even in a doomed attempt."""
    app, txn, _ = retry_app
    calls = []

    @atomic
    def work() -> None:
        calls.append(1)
        try:
            fail(txn, "40001")
        except sa.exc.OperationalError:
            raise KeyboardInterrupt from None

    with app.app_context(), pytest.raises(KeyboardInterrupt):
        work()
    assert calls == [1]


JSON_BODY = {"data": b'{"amount": 5}', "content_type": "application/json"}


@pytest.mark.parametrize(
    ("read", "sent", "expected"),
    [
        (lambda: request.get_json(cache=False), JSON_BODY, {"amount": 5}),
        (lambda: request.get_data(cache=False), JSON_BODY, b'{"amount": 5}'),
        (lambda: request.stream.read(), JSON_BODY, b'{"amount": 5}'),
        (lambda: request.form.to_dict(), {"data": {"amount": "5"}}, {"amount": "5"}),
    ],
    ids=["get_json", "get_data", "stream", "form"],
)
@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"CONTENT_LENGTH": "", "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True},
    ],
    ids=["content-length", "chunked"],
)
def test_every_attempt_reads_the_whole_request_body(
    retry_app: Any,
    environ: dict[str, Any],
    read: Callable[[], object],
    sent: dict[str, Any],
    expected: object,
) -> None:
    """The body is kept, so a re-run view reads all of it again, however it reads
    it, whether the request gave its length or was sent in chunks (a server sets
    ``wsgi.input_terminated`` for those)."""
    app, txn, _ = retry_app
    bodies = []

    @app.post("/")
    @atomic
    def work() -> str:
        bodies.append(read())
        if len(bodies) == 1:
            fail(txn, "40001")
        return "ok"

    app.test_client().post("/", environ_overrides=environ, **sent)
    assert bodies == [expected, expected]


def test_one_log_line_per_retry_without_password(
    make_app: Any, postgresql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each retry logs attempt, SQLSTATE and delay at INFO, and never the password."""
    url = sa.make_url(postgresql_url).set(password="s3cret")
    app, txn = make_app(url, TXN_RETRY_SLEEP=lambda _: None, TXN_RETRY_RANDOM=lambda: 0.5)
    with app.app_context(), txn.engine.begin() as connection:
        connection.exec_driver_sql(FAIL_WITH)
    calls = []

    @atomic(retries=2, wait_initial=0.1)
    def work() -> None:
        calls.append(1)
        if len(calls) < 3:
            fail(txn, "40P01")

    caplog.set_level(logging.INFO, logger="flask_txn")
    with app.app_context():
        work()
    lines = [r.getMessage() for r in caplog.records if r.name == "flask_txn"]
    assert lines == [
        "Retrying transaction: attempt 1 failed with SQLSTATE 40P01; waiting 0.050 s"
        " (queued 0.000 s for admission; limit 16).",
        "Retrying transaction: attempt 2 failed with SQLSTATE 40P01; waiting 0.100 s"
        " (queued 0.000 s for admission; limit 8).",
    ]
    assert "s3cret" not in caplog.text


def test_configured_retries_apply_to_decorators_not_blocks(make_app: Any) -> None:
    """TXN_RETRIES is the decorator default; a ``with`` block never re-runs."""
    app, txn = make_app(TXN_RETRIES=1, TXN_RETRY_SLEEP=lambda _: None)
    with app.app_context(), txn.engine.begin() as connection:
        connection.exec_driver_sql(FAIL_WITH)
    calls = []

    @atomic
    def work() -> None:
        calls.append(1)
        fail(txn, "40001")

    with app.app_context():
        with pytest.raises(sa.exc.OperationalError):
            work()
        with pytest.raises(sa.exc.OperationalError), atomic():
            calls.append(1)
            fail(txn, "40001")
    assert len(calls) == 3


def test_sqlite_busy_is_retried(make_app: Any, sqlite_url: str) -> None:
    """A real 'database is locked' from SQLite is retried once the lock is gone."""
    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    waits: list[float] = []

    def release(delay: float) -> None:
        waits.append(delay)
        blocker.execute("COMMIT")

    app, txn = make_app(
        sqlite_url,
        TXN_ENGINE_OPTIONS={"connect_args": {"timeout": 0}},
        TXN_RETRY_SLEEP=release,
    )
    blocker.execute("BEGIN IMMEDIATE")

    @atomic
    def write() -> None:
        txn.session.add(Item(name="after the lock"))

    try:
        with app.app_context():
            write()
    finally:
        blocker.close()
    assert (len(waits), count_items(app, txn)) == (1, 1)


# -- classification of each driver's real error shape -------------------------


def server_error(url: str, code: str) -> sa.exc.DBAPIError:
    """The SQLAlchemy error a real server raises for SQLSTATE ``code`` through ``url``'s driver."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(FAIL_WITH)
            try:
                connection.execute(sa.text("SELECT fail_with(:code)"), {"code": code})
            except sa.exc.DBAPIError as exc:
                return exc
    finally:
        engine.dispose()
    raise AssertionError("the server did not raise")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
@pytest.mark.parametrize(
    ("code", "retriable"), [("40001", True), ("40P01", True), ("23505", False), ("40003", False)]
)
def test_postgresql_errors_are_classified_by_sqlstate(
    postgresql_url: str, driver: str, code: str, retriable: bool
) -> None:
    """psycopg2's ``pgcode`` and psycopg 3's ``sqlstate``, bare, wrapped and as a cause."""
    url = sa.make_url(postgresql_url).set(drivername=f"postgresql+{driver}")
    error = server_error(url.render_as_string(hide_password=False), code)
    assert isinstance(error.orig, psycopg2.Error if driver == "psycopg2" else psycopg.Error)
    try:
        raise RuntimeError("translated by the app") from error
    except RuntimeError as exc:
        translated = exc
    for shape in (error, error.orig, translated):
        assert is_retryable(shape) is retriable
        assert sqlstate_of(shape) == code


def test_sqlite_busy_error_shape_is_retriable(tmp_path: Any) -> None:
    """sqlite3's ``sqlite_errorname`` SQLITE_BUSY is retriable; a constraint error is not."""
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as busy:
            other.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError) as constraint:
            holder.execute("INSERT INTO t VALUES (1)")
    finally:
        holder.close()
        other.close()
    assert (is_retryable(busy.value), sqlstate_of(busy.value)) == (True, "SQLITE_BUSY")
    assert is_retryable(constraint.value) is False


def mysql_error(
    module: str, code: int, *, errno: bool = False, sqlstate: str | None = None
) -> Exception:
    """An error shaped like a MySQL driver's, for the drivers and codes the suite's
    MariaDB (test_mariadb.py) does not give: code in args or errno, PyMySQL's sqlstate."""
    error_class = type("OperationalError", (Exception,), {"__module__": module})
    error = error_class(code, "message")
    if errno:
        error.errno = code  # type: ignore[attr-defined]
        error.args = ("message",)
    if sqlstate is not None:
        error.sqlstate = sqlstate  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        (mysql_error("pymysql.err", 1213), True),
        (mysql_error("MySQLdb._exceptions", 1213), True),
        (mysql_error("mysql.connector.errors", 1213, errno=True), True),
        (mysql_error("pymysql.err", 1062), False),
        (mysql_error("somewhere.else", 1213), False),
        (mysql_error("mysql.connector.errors", 1020, errno=True), True),
        (mysql_error("pymysql.err", 1205, sqlstate="HY000"), False),
        (mysql_error("MySQLdb._exceptions", 3572), False),
    ],
)
def test_mysql_deadlock_code_is_retriable(error: Exception, retriable: bool) -> None:
    """MySQL/MariaDB errors 1213 and 1020 are retriable whichever driver reports them;
    the lock wait timeout 1205 and MySQL's NOWAIT error 3572 are not."""
    assert is_retryable(sa.exc.OperationalError("UPDATE", {}, error)) is retriable


@pytest.mark.parametrize(
    "error",
    [
        mysql_error("pymysql.err", 1213, sqlstate="40001"),
        mysql_error("MySQLdb._exceptions", 1213),
        mysql_error("mysql.connector.errors", 1213, errno=True, sqlstate="40001"),
    ],
)
def test_a_mysql_error_is_known_by_its_number_whatever_the_driver(error: Exception) -> None:
    """One convention for MySQL errors: the number, never the SQLSTATE that only some
    drivers give (PyMySQL's 40001 for a deadlock)."""
    assert sqlstate_of(sa.exc.OperationalError("UPDATE", {}, error)) == "1213"


def test_a_mysql_error_without_a_number_has_no_code() -> None:
    """A MySQL driver's error that carries no number (a driver-side error) gives None."""
    error = mysql_error("pymysql.err", 0)
    error.args = ("no number",)
    assert sqlstate_of(error) is None


def test_lost_connection_is_retriable_and_has_no_sqlstate(postgresql_url: str) -> None:
    """A backend killed before COMMIT gives an invalidated connection: retriable, no SQLSTATE."""
    engine = sa.create_engine(postgresql_url)
    try:
        with engine.connect() as victim, engine.connect() as killer:
            pid = victim.scalar(sa.select(sa.func.pg_backend_pid()))
            killer.execute(sa.select(sa.func.pg_terminate_backend(pid)))
            with pytest.raises(sa.exc.OperationalError) as raised:
                victim.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()
    assert raised.value.connection_invalidated
    assert (is_retryable(raised.value), sqlstate_of(raised.value)) == (True, None)


def test_unrelated_exceptions_are_not_retriable() -> None:
    """Plain exceptions, even with a cyclic cause chain, are not retriable."""
    first, second = ValueError("a"), ValueError("b")
    first.__cause__, second.__cause__ = second, first
    assert (is_retryable(first), sqlstate_of(first)) == (False, None)
