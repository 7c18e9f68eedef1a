"""Through a real PgBouncer in transaction mode, with psycopg2 and psycopg 3.

Each transaction may run on a different server connection, and PgBouncer
refuses (or, told to, drops) libpq's ``options`` startup parameter: what
flask-txn sets must be set per transaction.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from flask_txn import atomic, sqlstate_of

from . import pgbouncer
from .conftest import Attempts, Item
from .test_conflicts import TIMEOUT, retries_of, run_concurrently, values


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
