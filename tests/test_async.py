"""@atomic on coroutines: AsyncSession transactions in Flask's async views, on PostgreSQL.

Both async drivers run every test: psycopg 3 (whose URL flask-txn derives from
a ``postgresql+psycopg`` app URL) and asyncpg (set by TXN_ASYNC_DATABASE_URI).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import sys
import threading
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, request
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util import queue

from flask_txn import (
    ConfigError,
    FlaskTxn,
    TransactionAbortedError,
    UsageError,
    atomic,
    is_retryable,
    on_commit,
    sqlstate_of,
    transaction_committed,
    transaction_retrying,
    transaction_rolled_back,
)
from flask_txn._engine import LoopFreeQueuePool

from . import tcpproxy
from .conftest import Item

TIMEOUT = 30
FAIL_WITH = "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = 'injected'; END $$"


@pytest.fixture
def database_url(postgresql_url: str) -> str:
    """Async support is tested on PostgreSQL."""
    return postgresql_url


class Sleeper:
    """``TXN_RETRY_SLEEP``: no wait, unless a test sets ``during`` (it may return an awaitable)."""

    def __init__(self) -> None:
        self.during: Any = None

    def __call__(self, delay: float) -> Any:
        return None if self.during is None else self.during(delay)


@pytest.fixture(params=["psycopg", "asyncpg"])
def async_app(request: pytest.FixtureRequest, make_app: Any, postgresql_url: str) -> Any:
    """An app whose async blocks use psycopg 3 (URL derived) or asyncpg (URL configured)."""
    base = sa.make_url(postgresql_url)
    if request.param == "psycopg":
        url = base.set(drivername="postgresql+psycopg")
        config: dict[str, Any] = {}
    else:
        url = base
        config = {"TXN_ASYNC_DATABASE_URI": base.set(drivername="postgresql+asyncpg")}
    app, txn = make_app(url, TXN_RETRY_SLEEP=Sleeper(), **config)
    with app.app_context(), atomic():
        txn.session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
    pool = txn._states[app].async_database.engine.sync_engine.pool
    connections = AsyncConnections()
    for name in ("connect", "close", "checkout", "checkin"):
        sa.event.listen(pool, name, getattr(connections, name))
    app.extensions["test-async-connections"] = connections
    yield app, txn
    assert connections.held == 0, "a request kept its async connection"
    txn._states[app].async_database.close()
    assert connections.open == 0, "an async connection outlived its engine"


class AsyncConnections:
    """The async engine's DBAPI connections: made and not yet closed (``open``), and
    checked out by a request and not yet returned (``held``). Under NullPool the two
    are the same; a pool keeps connections open between requests."""

    def __init__(self) -> None:
        self.open = 0
        self.held = 0
        self.made = 0
        self.lock = threading.Lock()

    def connect(self, *_: Any) -> None:
        with self.lock:
            self.open += 1
            self.made += 1

    def close(self, *_: Any) -> None:
        with self.lock:
            self.open -= 1

    def checkout(self, *_: Any) -> None:
        with self.lock:
            self.held += 1

    def checkin(self, *_: Any) -> None:
        with self.lock:
            self.held -= 1


def async_connections(app: Flask) -> int:
    """The async engine's connections that a request holds right now."""
    return int(app.extensions["test-async-connections"].held)


def fails_once(app: Flask, txn: Any, then: Any = None) -> list[int]:
    """Serve ``POST /``: an async view whose first attempt meets a real 40001, then
    runs ``then()``; return the list its attempts append to."""
    calls: list[int] = []

    @app.post("/")
    @atomic
    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            await txn.async_session.execute(sa.text(FAIL_WITH.format(code="40001")))
        if then is not None:
            then()
        return "ok"

    return calls


def values(app: Flask, txn: Any) -> dict[int, int]:
    """Committed values by id."""
    with app.app_context(), txn.engine.connect() as connection:
        return dict(connection.execute(sa.select(Item.id, Item.value)).all())  # type: ignore[arg-type]


def post_concurrently(app: Flask, *paths: str) -> list[Any]:
    """POST each path from its own thread (each async view gets its own event loop)."""
    responses: list[Any] = [None] * len(paths)

    def post(index: int, path: str) -> None:
        responses[index] = app.test_client().post(path)

    threads = [threading.Thread(target=post, args=(i, p)) for i, p in enumerate(paths)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    return responses


def test_async_view_commits_rolls_back_and_runs_callbacks(async_app: Any) -> None:
    """An async view commits, an exception rolls back, on_commit runs after the commit."""
    app, txn = async_app
    sent = []

    @app.post("/add/<int(signed=True):value>")
    @atomic
    async def add(value: int) -> str:
        """Add an item."""
        txn.async_session.add(Item(id=10 + value, name="new", value=value))
        on_commit(lambda: sent.append(value))
        if value < 0:
            raise ValueError("negative")
        return "ok"

    app.testing = False
    client = app.test_client()
    assert client.post("/add/5").status_code == 200
    assert client.post("/add/-1").status_code == 500
    assert add.__name__ == "add"
    assert add.__doc__ == "Add an item."
    assert sent == [5]
    assert values(app, txn) == {1: 0, 2: 0, 15: 5}


def test_async_savepoint_and_veto(async_app: Any) -> None:
    """A nested async block is a savepoint; an error response rolls the view back."""
    app, txn = async_app

    @app.post("/nested")
    @atomic
    async def nested() -> str:
        session = txn.async_session
        (await session.get(Item, 1)).value = 1
        with pytest.raises(KeyError):
            async with atomic() as inner:
                assert inner is session
                (await session.get(Item, 2)).value = 2
                await session.flush()
                raise KeyError
        return "ok"

    @app.post("/veto")
    @atomic
    async def veto() -> tuple[str, int]:
        (await txn.async_session.get(Item, 2)).value = 99
        return "no", 409

    client = app.test_client()
    assert client.post("/nested").status_code == 200
    assert client.post("/veto").status_code == 409
    assert values(app, txn) == {1: 1, 2: 0}


def test_nested_async_function_is_a_savepoint(async_app: Any) -> None:
    """An ``@atomic`` coroutine awaited inside an async block is a savepoint: its
    failure undoes its own work and drops its on_commit callbacks, not the outer's."""
    app, txn = async_app
    sent: list[str] = []

    @atomic
    async def inner(value: int) -> None:
        (await txn.async_session.get(Item, 2)).value = value
        on_commit(lambda: sent.append(f"inner {value}"))
        if value < 0:
            raise KeyError(value)

    @app.post("/")
    @atomic
    async def outer() -> str:
        (await txn.async_session.get(Item, 1)).value = 1
        on_commit(lambda: sent.append("outer"))
        await inner(5)
        with pytest.raises(KeyError):
            await inner(-5)
        return "ok"

    assert app.test_client().post("/").status_code == 200
    assert values(app, txn) == {1: 1, 2: 5}
    assert sent == ["outer", "inner 5"]


def test_async_block_that_cannot_begin_rolls_back_and_raises(postgresql_url: str) -> None:
    """An ``async with`` block whose connection cannot be made raises the connect
    error, reports one rollback, and leaves no block open."""
    target = sa.make_url(postgresql_url)
    proxy = tcpproxy.FaultProxy(target.host or "127.0.0.1", target.port or 5432)
    proxy.start()
    refusing = Flask("refusing")
    refusing.config.update(
        TXN_DATABASE_URI=postgresql_url,
        TXN_ASYNC_DATABASE_URI=target.set(
            drivername="postgresql+psycopg", host="127.0.0.1", port=proxy.port
        ),
    )
    refusing_txn = FlaskTxn(refusing)
    reasons: list[str] = []

    async def block() -> None:
        async with atomic(isolation="SERIALIZABLE") as session:
            await session.execute(sa.text("SELECT 1"))

    async def block_then_on_commit() -> None:
        with pytest.raises(sa.exc.OperationalError):
            await block()
        with pytest.raises(UsageError, match="outside of an atomic block"):
            on_commit(lambda: None)

    def rolled_back(_app: Any, *, reason: str, **_: Any) -> None:
        reasons.append(reason)

    try:
        with refusing.app_context(), transaction_rolled_back.connected_to(rolled_back):
            asyncio.run(block())  # connects once: the engine is set up
            proxy.stop()  # from now on, every new connection is refused
            asyncio.run(block_then_on_commit())
    finally:
        proxy.stop()
        with refusing.app_context():
            refusing_txn.engine.dispose()
            refusing_txn._states[refusing].async_database.close()
    assert reasons == ["error"]


def test_async_retry_waits_without_blocking_the_loop(make_app: Any, postgresql_url: str) -> None:
    """With the default TXN_RETRY_SLEEP (time.sleep), an async retry waits with asyncio.sleep."""
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    app, txn = make_app(url, TXN_RETRY_WAIT_INITIAL=0.001, TXN_RETRY_WAIT_MAX=0.001)
    calls = fails_once(app, txn, lambda: txn.async_session.add(Item(id=3, name="retried")))

    assert app.test_client().post("/").status_code == 200
    assert len(calls) == 2
    assert values(app, txn) == {3: 0}


def test_async_with_block_and_isolation(async_app: Any) -> None:
    """``async with atomic(isolation=...)`` applies the level and commits on exit."""
    app, _txn = async_app

    @app.get("/level")
    async def level() -> str:
        async with atomic(isolation="SERIALIZABLE", readonly=True) as session:
            result = await session.execute(sa.text("SHOW transaction_isolation"))
            return str(result.scalar())

    assert app.test_client().get("/level").text == "serializable"


def test_concurrent_update_in_async_views_is_retried(async_app: Any) -> None:
    """Two async read-modify-write views on one row: a real 40001, retried, no lost update."""
    app, txn = async_app
    calls: Counter[str] = Counter()
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    @app.post("/increment/<name>")
    @atomic(isolation="SERIALIZABLE")
    async def increment(name: str) -> str:
        item = await txn.async_session.get(Item, 1)
        calls[name] += 1
        if calls[name] == 1:
            await asyncio.to_thread(barrier.wait)  # both have read 0
        item.value += 1
        return "ok"

    sqlstates: list[Any] = []
    with transaction_retrying.connected_to(lambda _, **p: sqlstates.append(p["sqlstate"])):
        responses = post_concurrently(app, "/increment/a", "/increment/b")
    assert [r.status_code for r in responses] == [200, 200]
    assert sqlstates == ["40001"]
    assert values(app, txn)[1] == 2


def test_deadlock_in_async_views_is_retried(async_app: Any) -> None:
    """Opposite lock orders in two async views: a real 40P01, the victim re-run."""
    app, txn = async_app
    calls: Counter[str] = Counter()
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    survivor_committed = threading.Event()

    @app.post("/add/<int:first>/<int:second>/<int:amount>")
    @atomic
    async def add(first: int, second: int, amount: int) -> str:
        update = sa.update(Item).values(value=Item.value + amount)
        calls[str(first)] += 1
        if calls[str(first)] > 1:
            # As in test_conflicts: a re-run that came at once could take its first
            # row back before the survivor (row locks are not handed over) and
            # deadlock again.
            assert await asyncio.to_thread(survivor_committed.wait, TIMEOUT)
        await txn.async_session.execute(update.where(Item.id == first))
        if calls[str(first)] == 1:
            await asyncio.to_thread(barrier.wait)
        await txn.async_session.execute(update.where(Item.id == second))
        on_commit(survivor_committed.set)
        return "ok"

    sqlstates: list[Any] = []
    with transaction_retrying.connected_to(lambda _, **p: sqlstates.append(p["sqlstate"])):
        post_concurrently(app, "/add/1/2/1", "/add/2/1/10")
    assert sqlstates == ["40P01"]
    assert values(app, txn) == {1: 11, 2: 11}


def test_connection_released_during_async_backoff(async_app: Any) -> None:
    """While an async retry waits (asyncio.sleep), no connection of the attempt is open."""
    app, txn = async_app
    open_during_wait: list[int] = []

    async def record(_delay: float) -> None:
        open_during_wait.append(async_connections(app))

    app.config["TXN_RETRY_SLEEP"].during = record
    fails_once(app, txn)

    assert app.test_client().post("/").status_code == 200
    assert open_during_wait == [0]


def test_swallowed_errors_in_async_views(async_app: Any) -> None:
    """A caught 40001 is still retried; a caught other error is never reported committed."""
    app, txn = async_app
    calls = []

    @atomic
    async def swallow(code: str) -> None:
        calls.append(code)
        txn.async_session.add(Item(id=len(calls) + 20, name=code))
        await txn.async_session.flush()
        if len(calls) == 1 or code != "40001":
            with contextlib.suppress(sa.exc.DBAPIError):
                await txn.async_session.execute(sa.text(FAIL_WITH.format(code=code)))

    with app.app_context():
        asyncio.run(swallow("40001"))
        with pytest.raises(TransactionAbortedError):
            asyncio.run(swallow("22012"))
    assert calls == ["40001", "40001", "22012"]
    assert sorted(values(app, txn)) == [1, 2, 22]


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_async_connections_get_the_timeouts(
    make_app: Any, postgresql_url: str, driver: str
) -> None:
    """The async engine's connections carry the timeout keys as the sync engine's do:
    the server's statement timeout, and (psycopg) libpq's connect and TCP settings."""
    base = sa.make_url(postgresql_url)
    if driver == "psycopg":
        url, config = base.set(drivername="postgresql+psycopg"), {}
    else:
        url, config = base, {"TXN_ASYNC_DATABASE_URI": base.set(drivername="postgresql+asyncpg")}
    app, _ = make_app(url, TXN_STATEMENT_TIMEOUT=5, TXN_CONNECT_TIMEOUT=7, **config)
    seen: dict[str, Any] = {}

    @atomic
    async def look() -> None:
        session = app.extensions["flask-txn"].async_session
        seen["statement_timeout"] = await session.scalar(sa.text("SHOW statement_timeout"))
        connection = await session.connection()
        raw = (await connection.get_raw_connection()).driver_connection
        if driver == "psycopg":
            seen["libpq"] = {
                key: raw.info.get_parameters().get(key)
                for key in ("connect_timeout", "keepalives", "tcp_user_timeout")
            }

    with app.app_context():
        asyncio.run(look())
    assert seen["statement_timeout"] == "5s"
    if driver == "psycopg":
        assert seen["libpq"] == {
            "connect_timeout": "7",
            "keepalives": "1",
            "tcp_user_timeout": "30000",
        }


def test_every_attempt_of_an_async_view_reads_the_whole_body(async_app: Any) -> None:
    """A re-run async view reads the request stream from its start again."""
    app, txn = async_app
    bodies = []

    @app.post("/")
    @atomic
    async def work() -> str:
        bodies.append(request.stream.read())
        if len(bodies) == 1:
            await txn.async_session.execute(sa.text(FAIL_WITH.format(code="40001")))
        return "ok"

    assert app.test_client().post("/", data=b"amount=5").status_code == 200
    assert bodies == [b"amount=5", b"amount=5"]


def test_signals_carry_the_async_session(async_app: Any) -> None:
    """The commit signal's ``session`` is the AsyncSession the view used."""
    app, txn = async_app
    seen: list[Any] = []

    @app.post("/")
    @atomic
    async def view() -> str:
        seen.append(txn.async_session)
        return "ok"

    with transaction_committed.connected_to(lambda _, **p: seen.append(p["session"])):
        app.test_client().post("/")
    assert seen[0] is seen[1]


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_async_driver_errors_are_classified(postgresql_url: str, driver: str) -> None:
    """asyncpg's and psycopg 3's async errors carry their SQLSTATE to is_retryable."""
    from sqlalchemy.ext.asyncio import create_async_engine

    url = sa.make_url(postgresql_url).set(drivername=f"postgresql+{driver}")

    async def raise_code(code: str) -> BaseException:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                await connection.execute(sa.text(FAIL_WITH.format(code=code)))
        except sa.exc.DBAPIError as exc:
            return exc
        finally:
            await engine.dispose()
        raise AssertionError("the server did not raise")

    for code, retriable in [("40001", True), ("40P01", True), ("23505", False)]:
        error = asyncio.run(raise_code(code))
        assert (sqlstate_of(error), is_retryable(error)) == (code, retriable)


# -- what cannot work, and says so ------------------------------------------------


def test_psycopg2_app_needs_an_async_url(make_app: Any, postgresql_url: str) -> None:
    """With psycopg2 and no TXN_ASYNC_DATABASE_URI, an async block says which key to set."""
    app, _ = make_app(postgresql_url)

    @atomic
    async def work() -> None:
        pass

    with app.app_context(), pytest.raises(UsageError, match="Set 'TXN_ASYNC_DATABASE_URI'"):
        asyncio.run(work())


def test_without_the_async_extra(
    make_app: Any, postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without SQLAlchemy's asyncio support (no greenlet): a psycopg 3 app still serves
    sync blocks, and its async blocks say which extra to install; an app that set
    TXN_ASYNC_DATABASE_URI is refused in init_app."""
    # What a missing greenlet does: importing SQLAlchemy's asyncio package fails.
    monkeypatch.setitem(sys.modules, "sqlalchemy.ext.asyncio", None)
    app, txn = make_app(sa.make_url(postgresql_url).set(drivername="postgresql+psycopg"))

    @atomic
    async def work() -> None:
        pass

    with app.app_context():
        with atomic():
            txn.session.add(Item(id=5, name="sync"))
        with pytest.raises(UsageError, match=r"pip install 'flask-txn\[async\]'"):
            asyncio.run(work())
    explicit = Flask("explicit_async_url")
    explicit.config.update(
        TXN_DATABASE_URI=postgresql_url,
        TXN_ASYNC_DATABASE_URI=sa.make_url(postgresql_url).set(drivername="postgresql+asyncpg"),
    )
    with pytest.raises(
        ConfigError, match=r"'TXN_ASYNC_DATABASE_URI' is set, but .*flask-txn\[async\]"
    ):
        FlaskTxn(explicit)


def test_async_url_is_validated(postgresql_url: str) -> None:
    """A bad TXN_ASYNC_DATABASE_URI fails in init_app, naming the key."""
    app = Flask("bad_async")
    app.config.update(TXN_DATABASE_URI=postgresql_url, TXN_ASYNC_DATABASE_URI="not a url")
    with pytest.raises(ConfigError, match="'TXN_ASYNC_DATABASE_URI' is not a database URL"):
        FlaskTxn(app)


def test_sync_and_async_blocks_do_not_nest(async_app: Any) -> None:
    """A sync block inside an async one (or the reverse) would be a separate transaction."""
    app, _ = async_app

    @atomic
    def sync_helper() -> None:
        pass

    @atomic
    async def calls_sync() -> None:
        sync_helper()

    @atomic
    async def inner_async() -> None:
        pass

    @atomic
    def calls_async() -> None:
        asyncio.run(inner_async())

    with app.app_context():
        with pytest.raises(UsageError, match="a sync atomic block was entered inside an async"):
            asyncio.run(calls_sync())
        with pytest.raises(UsageError, match="an async atomic block was entered inside a sync"):
            calls_async()


def test_sync_session_inside_an_async_view_is_refused(async_app: Any) -> None:
    """``txn.session`` in a running loop would leak its connection: a clear error instead."""
    app, txn = async_app

    @app.get("/")
    async def view() -> str:
        txn.session.get(Item, 1)
        return "ok"

    with app.app_context(), pytest.raises(UsageError, match="used inside a running event loop"):
        asyncio.run(view())


def test_async_session_outside_a_block_is_refused(async_app: Any) -> None:
    """``txn.async_session`` exists only inside an async atomic block."""
    app, txn = async_app
    with app.app_context(), pytest.raises(UsageError, match="only available inside an async"):
        txn.async_session  # noqa: B018


def test_retries_on_an_async_block_are_refused(async_app: Any) -> None:
    """``async with atomic(retries=...)`` cannot re-run its body."""
    app, _ = async_app

    async def block() -> None:
        async with atomic(retries=2):
            pass

    with app.app_context(), pytest.raises(ConfigError, match="'retries' cannot be used"):
        asyncio.run(block())


# -- pooled async connections across Flask's per-request event loops ---------------


class SignallingQueue(queue.Queue[Any]):
    """The pool's queue, telling a test when a request is about to wait in it."""

    about_to_wait = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self.mutex:
            if self._empty():
                self.about_to_wait.set()
        return super().get(block, timeout)


class SignallingPool(LoopFreeQueuePool):
    _queue_class = SignallingQueue


def pooled_psycopg_app(make_app: Any, postgresql_url: str, **options: Any) -> Any:
    """An app on psycopg 3 whose async engine keeps one connection, with the counters."""
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    app, txn = make_app(
        url, TXN_ASYNC_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0, **options}
    )
    with app.app_context(), atomic():
        txn.session.add(Item(id=1, name="counter"))
    connections = AsyncConnections()
    pool = txn._states[app].async_database.sync_engine.pool
    for name in ("connect", "close", "checkout", "checkin"):
        sa.event.listen(pool, name, getattr(connections, name))

    @app.post("/add")
    @atomic
    async def add() -> str:
        item = await txn.async_session.get(Item, 1)
        item.value += 1
        return str(item.value)

    return app, txn, connections


def test_one_pooled_connection_serves_request_after_request(
    make_app: Any, postgresql_url: str
) -> None:
    """psycopg 3: a pool of one connection serves sequential requests, each in its own
    event loop; the connection is made once and handed from loop to loop."""
    app, txn, connections = pooled_psycopg_app(make_app, postgresql_url)
    asyncio.run(txn._states[app].async_database.connected())  # the engine's set-up
    made = connections.made
    client = app.test_client()
    assert [client.post("/add").text for _ in range(5)] == ["1", "2", "3", "4", "5"]
    assert (connections.made - made, connections.held) == (1, 0)


def test_one_pooled_connection_under_concurrent_requests(
    make_app: Any, postgresql_url: str
) -> None:
    """psycopg 3: while one request holds the only connection, another waits for it in
    the pool (in its own loop and thread) and gets it when the first returns it."""
    app, txn, connections = pooled_psycopg_app(make_app, postgresql_url, poolclass=SignallingPool)
    holding, release = threading.Event(), threading.Event()

    @app.post("/hold")
    @atomic
    async def hold() -> str:
        (await txn.async_session.get(Item, 1)).value += 10
        holding.set()
        release.wait(TIMEOUT)  # blocks only this request's own loop and thread
        return "held"

    asyncio.run(txn._states[app].async_database.connected())  # the engine's set-up
    made = connections.made
    SignallingQueue.about_to_wait.clear()
    responses: list[Any] = []
    first = threading.Thread(target=lambda: responses.append(app.test_client().post("/hold")))
    first.start()
    assert holding.wait(TIMEOUT)
    second = threading.Thread(target=lambda: responses.append(app.test_client().post("/add")))
    second.start()
    assert SignallingQueue.about_to_wait.wait(TIMEOUT)
    release.set()
    for thread in (first, second):
        thread.join(TIMEOUT)
    assert sorted(r.text for r in responses) == ["11", "held"]
    assert (connections.made - made, connections.held) == (1, 0)


def test_async_set_up_leaves_no_connection_of_its_own_loop(
    make_app: Any, postgresql_url: str
) -> None:
    """The engine's first connection, made in a loop of its own, is closed there:
    no later request's loop can get it from the pool."""
    app, txn, connections = pooled_psycopg_app(make_app, postgresql_url)
    asyncio.run(txn._states[app].async_database.connected())
    assert (connections.made, connections.open) == (1, 0)
    assert app.test_client().post("/add").text == "1"
    assert (connections.made, connections.open, connections.held) == (2, 1, 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"pool_size": 1, "max_overflow": 0},
            "asks for a connection pool ({'pool_size': 1, 'max_overflow': 0}), but asyncpg's"
            " connections belong to the event loop that made them",
        ),
        (
            {"poolclass": AsyncAdaptedQueuePool},
            "asks for a connection pool ({'poolclass': <class"
            " 'sqlalchemy.pool.impl.AsyncAdaptedQueuePool'>}), but asyncpg's",
        ),
    ],
)
def test_asyncpg_pool_is_refused(
    make_app: Any, postgresql_url: str, options: dict[str, Any], message: str
) -> None:
    """asyncpg's connections cannot outlive their loop: a pool is refused at init_app."""
    asyncpg = sa.make_url(postgresql_url).set(drivername="postgresql+asyncpg")
    with pytest.raises(ConfigError, match=re.escape(f"'TXN_ASYNC_ENGINE_OPTIONS' {message}")):
        make_app(TXN_ASYNC_DATABASE_URI=asyncpg, TXN_ASYNC_ENGINE_OPTIONS=options)


def test_psycopg_loop_bound_pool_is_refused(make_app: Any, postgresql_url: str) -> None:
    """SQLAlchemy's asyncio pool waits in one loop: refused, naming the way out."""
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "'TXN_ASYNC_ENGINE_OPTIONS' sets 'poolclass' to <class"
            " 'sqlalchemy.pool.impl.AsyncAdaptedQueuePool'>, but Flask runs each async view in"
            " a new event loop"
        ),
    ):
        make_app(url, TXN_ASYNC_ENGINE_OPTIONS={"poolclass": AsyncAdaptedQueuePool})


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_bad_async_engine_option_is_a_config_error(
    make_app: Any, postgresql_url: str, driver: str
) -> None:
    """An option create_async_engine() refuses is a ConfigError naming the key."""
    async_url = sa.make_url(postgresql_url).set(drivername=f"postgresql+{driver}")
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "'TXN_ASYNC_ENGINE_OPTIONS' has keys ['echo_poll'] that"
            " sqlalchemy.ext.asyncio.create_async_engine() refused:"
        ),
    ):
        make_app(TXN_ASYNC_DATABASE_URI=async_url, TXN_ASYNC_ENGINE_OPTIONS={"echo_poll": True})


def test_swallowed_error_with_a_pending_orm_write_in_an_async_view(async_app: Any) -> None:
    """A caught error, then an unflushed ORM write: TransactionAbortedError caused by
    the original error (23505), not the flush's 25P02, and nothing committed."""
    app, txn = async_app

    @atomic
    async def swallow() -> None:
        with contextlib.suppress(sa.exc.IntegrityError):
            await txn.async_session.execute(
                sa.text("INSERT INTO item (id, name, value) VALUES (1, 'again', 0)")
            )
        txn.async_session.add(Item(id=30, name="pending"))

    with app.app_context(), pytest.raises(TransactionAbortedError) as raised:
        asyncio.run(swallow())
    assert sqlstate_of(raised.value.__cause__) == "23505"
    assert values(app, txn) == {1: 0, 2: 0}


def test_pooled_connections_are_closed_when_the_app_goes(postgresql_url: str) -> None:
    """The app's async pool is closed when the app is garbage collected: no psycopg
    connection is left to be deleted while open (a ResourceWarning, an error here)."""
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    app = Flask("collected")
    app.config["TXN_DATABASE_URI"] = url
    txn = FlaskTxn(app)

    @app.get("/")
    @atomic
    async def one() -> str:
        return str(await txn.async_session.scalar(sa.text("SELECT 1")))

    connections = AsyncConnections()
    for name in ("connect", "close"):
        sa.event.listen(
            txn._states[app].async_database.sync_engine.pool, name, getattr(connections, name)
        )
    assert app.test_client().get("/").text == "1"
    with app.app_context():
        txn.engine.dispose()
    assert connections.open == 1
    del app, one
    gc.collect()
    assert connections.open == 0


def test_pool_closes_from_inside_a_running_loop(make_app: Any, postgresql_url: str) -> None:
    """Closing the pool where an event loop runs (a collection inside an async view)
    closes its connections in a loop of their own."""
    app, txn, connections = pooled_psycopg_app(make_app, postgresql_url)
    assert app.test_client().post("/add").text == "1"
    assert connections.open == 1

    async def close_here() -> None:
        txn._states[app].async_database.close()

    asyncio.run(close_here())
    assert connections.open == 0
