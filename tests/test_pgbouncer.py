"""Through a real PgBouncer in transaction mode, with psycopg2 and psycopg 3.

Each transaction may run on a different server connection, and PgBouncer
refuses (or, told to, drops) libpq's ``options`` startup parameter: what
flask-txn sets must be set per transaction, and psycopg 3 must not rely on
statements it prepared on one server connection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_txn import FlaskTxn, atomic, sqlstate_of

from . import pgbouncer
from .conftest import Attempts, Item, new_database
from .test_conflicts import TIMEOUT, deadlock, retries_of, run_concurrently, values
from .test_example_bank import assert_load_reconciles

#: Concurrent clients for the prepared statements test, and blocks each runs.
CLIENTS, BLOCKS = 8, 40


@pytest.fixture(params=["psycopg2", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    """Each libpq driver in turn."""
    return str(request.param)


@pytest.fixture(params=["", "options"], ids=["refusing-options", "ignoring-options"])
def bouncer(request: pytest.FixtureRequest, postgresql_url: str) -> Iterator[sa.URL]:
    """A PgBouncer before the tests' server: refusing 'options', or dropping it silently."""
    with pgbouncer.running(
        sa.make_url(postgresql_url), ignore_startup_parameters=request.param
    ) as url:
        yield url


@pytest.fixture
def database_url(bouncer: sa.URL, driver: str) -> str:
    """The tests' server through PgBouncer, with the driver under test."""
    return bouncer.set(drivername=f"postgresql+{driver}").render_as_string(False)


def show(txn: Any, *settings: str) -> list[Any]:
    """Read server settings through the current session."""
    return [txn.session.execute(sa.text(f"SHOW {name}")).scalar() for name in settings]


def test_isolation_readonly_deferrable_apply_per_block(make_app: Any) -> None:
    """A block's options hold inside it, and the next block on any server connection has none."""
    app, txn = make_app()
    settings = ("transaction_isolation", "transaction_read_only", "transaction_deferrable")

    @atomic(isolation="SERIALIZABLE", readonly=True, deferrable=True)
    def strict() -> list[Any]:
        return show(txn, *settings)

    @atomic
    def plain() -> list[Any]:
        return show(txn, *settings)

    with app.app_context():
        seen = [strict(), plain()]
    assert seen == [["serializable", "on", "on"], ["read committed", "off", "off"]]


def test_block_timeouts_fire_and_end_with_the_block(make_app: Any) -> None:
    """A block's statement timeout cancels its slow statement (57014); the next block has none."""
    app, txn = make_app()

    @atomic(statement_timeout=0.05, lock_timeout=0.05, retries=0)
    def slow() -> None:
        txn.session.execute(sa.text("SELECT pg_sleep(2)"))

    @atomic
    def plain() -> list[Any]:
        return show(txn, "statement_timeout", "lock_timeout")

    with app.app_context():
        with pytest.raises(sa.exc.OperationalError) as raised:
            slow()
        after = plain()
    assert (sqlstate_of(raised.value), after) == ("57014", ["0", "0"])


def test_statement_timeout_is_set_in_every_transaction(make_app: Any) -> None:
    """TXN_STATEMENT_TIMEOUT connects through PgBouncer, and holds in blocks and outside them."""
    app, txn = make_app(TXN_STATEMENT_TIMEOUT=5)

    @atomic
    def inside() -> list[Any]:
        return show(txn, "statement_timeout")

    with app.app_context():
        in_block = inside()
        with txn.engine.connect() as connection:
            outside = connection.exec_driver_sql("SHOW statement_timeout").scalar()
    assert (in_block, outside) == (["5s"], "5s")


def test_retry_deadline_alone_sets_the_statement_timeout(make_app: Any) -> None:
    """TXN_RETRY_DEADLINE alone connects through PgBouncer and bounds each statement."""
    app, txn = make_app(TXN_RETRY_DEADLINE=4)

    @atomic
    def inside() -> list[Any]:
        return show(txn, "statement_timeout")

    with app.app_context():
        assert inside() == ["4s"]


def test_a_slow_statement_runs_once(make_app: Any) -> None:
    """A statement TXN_STATEMENT_TIMEOUT cancels is not re-run: one attempt, SQLSTATE 57014."""
    app, txn = make_app(TXN_STATEMENT_TIMEOUT=0.2, TXN_RETRIES=3, TXN_RETRY_SLEEP=lambda _: None)
    attempts = Attempts()

    @atomic
    def slow() -> None:
        attempts.first()
        txn.session.execute(sa.text("SELECT pg_sleep(3)"))

    with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        slow()
    assert (attempts.total, sqlstate_of(raised.value)) == (1, "57014")


def test_a_real_serialization_failure_is_retried(make_app: Any) -> None:
    """Two SERIALIZABLE increments of one row through PgBouncer: one gets 40001, both count."""
    app, txn = make_app(TXN_RETRY_SLEEP=lambda _: None)
    with app.app_context(), atomic():
        txn.session.add(Item(id=1, name="a"))
    attempts, barrier = Attempts(), threading.Barrier(2, timeout=TIMEOUT)

    @app.post("/increment")
    @atomic(isolation="SERIALIZABLE")
    def increment() -> str:
        item = txn.session.get(Item, 1)
        assert item is not None
        if attempts.first():
            barrier.wait()  # both have read 0
        item.value += 1
        return "ok"

    errors = retries_of(lambda: run_concurrently(app, ("A", "/increment"), ("B", "/increment")))
    assert ([sqlstate_of(e) for e in errors], values(app, txn)[1]) == (["40001"], 2)


def test_a_real_deadlock_is_retried(make_app: Any) -> None:
    """Opposite lock orders through PgBouncer: a real 40P01, the victim re-run, both land."""
    app, txn = make_app(TXN_RETRY_SLEEP=lambda _: None)
    with app.app_context(), atomic():
        txn.session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
    errors = deadlock(app, txn)
    assert ([sqlstate_of(e) for e in errors], values(app, txn)) == (["40P01"], {1: 11, 2: 11})


@pytest.mark.parametrize("driver", ["psycopg"])
@pytest.mark.parametrize("bouncer", [""], indirect=True, ids=["refusing-options"])
def test_psycopg3_statements_from_concurrent_clients(make_app: Any) -> None:
    """psycopg 3 by default, 8 clients each running the same statements more often than its
    prepare threshold: no block fails on a statement another client prepared."""
    app, txn = make_app(TXN_ENGINE_OPTIONS={"pool_size": CLIENTS, "max_overflow": 0})
    with app.app_context(), atomic():
        txn.session.add_all(Item(id=n, name=str(n)) for n in range(CLIENTS))
    start = threading.Barrier(CLIENTS, timeout=TIMEOUT)
    failures: list[BaseException] = []

    @atomic(retries=0)
    def work(n: int) -> None:
        txn.session.execute(sa.text("SELECT CAST(:a AS int)"), {"a": n})
        txn.session.execute(sa.text("SELECT CAST(:a AS int) + CAST(:b AS int)"), {"a": n, "b": 1})
        item = txn.session.get(Item, n)
        assert item is not None
        item.value += 1

    def client(n: int) -> None:
        start.wait()
        for _ in range(BLOCKS):
            try:
                with app.app_context():
                    work(n)
            except sa.exc.DBAPIError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert ([sqlstate_of(e) for e in failures], set(values(app, txn).values())) == ([], {BLOCKS})


@pytest.mark.parametrize("driver", ["psycopg"])
@pytest.mark.parametrize("bouncer", [""], indirect=True, ids=["refusing-options"])
def test_psycopg3_async_blocks_from_concurrent_clients(make_app: Any) -> None:
    """psycopg 3's async engine through PgBouncer under load: 8 concurrent tasks, each
    running 40 blocks of the same statements, and no block fails, no increment is lost."""
    app, txn = make_app(TXN_ASYNC_ENGINE_OPTIONS={"pool_size": CLIENTS, "max_overflow": 0})
    with app.app_context(), atomic():
        txn.session.add_all(Item(id=n, name=str(n)) for n in range(CLIENTS))
    failures: list[BaseException] = []

    @atomic(retries=0)
    async def work(n: int) -> None:
        session = txn.async_session
        await session.execute(sa.text("SELECT CAST(:a AS int)"), {"a": n})
        item = await session.get(Item, n)
        assert item is not None
        item.value += 1

    async def client(n: int) -> None:
        for _ in range(BLOCKS):
            try:
                await work(n)
            except sa.exc.DBAPIError as exc:
                failures.append(exc)

    async def clients() -> None:
        await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    with app.app_context():
        asyncio.run(clients())
    assert ([sqlstate_of(e) for e in failures], set(values(app, txn).values())) == ([], {BLOCKS})


@pytest.mark.parametrize("driver", ["psycopg"])
def test_the_async_engine_gets_the_statement_timeout(make_app: Any) -> None:
    """psycopg 3's async engine through PgBouncer: TXN_STATEMENT_TIMEOUT holds in a block."""
    app, txn = make_app(TXN_STATEMENT_TIMEOUT=5)
    seen: list[Any] = []

    @atomic
    async def look() -> None:
        seen.append(await txn.async_session.scalar(sa.text("SHOW statement_timeout")))

    with app.app_context():
        asyncio.run(look())
    assert seen == ["5s"]


def test_psycopg3_prepares_nothing_unless_asked(postgresql_url: str) -> None:
    """flask-txn's psycopg 3 connections have prepare_threshold None; connect_args' value wins."""
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    seen = []
    for config in ({}, {"TXN_ENGINE_OPTIONS": {"connect_args": {"prepare_threshold": 5}}}):
        app = Flask("prepared")
        app.config.update(TXN_DATABASE_URI=url, **config)
        txn = FlaskTxn(app)
        with app.app_context(), txn.engine.connect() as connection:
            seen.append(connection.connection.dbapi_connection.prepare_threshold)  # type: ignore[union-attr]
        with app.app_context():
            txn.engine.dispose()
    assert seen == [None, 5]


@pytest.fixture
def bank_database(postgresql_url: str) -> Iterator[sa.URL]:
    """A database of its own on the tests' server, for the bank's load run: no other
    test's accounts, ledger or idempotency keys."""
    with new_database(postgresql_url, "flask_txn_bank_pgbouncer") as url:
        yield url


@pytest.mark.parametrize("endpoint", ["/transfers", "/transfers/locked"])
def test_the_bank_load_reconciles_through_pgbouncer(
    bank_database: sa.URL, driver: str, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/bank/load.py, 8 clients and copies of keys, against the bank through
    PgBouncer in transaction mode: every check of the script passes (the balances
    reconcile with the ledger, the total never changes, no key applied twice)."""
    with pgbouncer.running(bank_database) as url:
        database = url.set(drivername=f"postgresql+{driver}").render_as_string(False)
        assert_load_reconciles(database, endpoint, capsys)
