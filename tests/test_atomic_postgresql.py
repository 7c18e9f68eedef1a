"""@atomic on PostgreSQL: isolation, read-only, timeouts, and errors user code swallowed."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import sqlalchemy as sa

from flask_txn import TransactionAbortedError, atomic, sqlstate_of

from .conftest import Item, count_items


@pytest.fixture
def database_url(postgresql_url: str) -> str:
    """Every test here runs on PostgreSQL only."""
    return postgresql_url


def show(txn: Any, *settings: str) -> tuple[Any, ...]:
    """Read server settings through the current session."""
    return tuple(txn.session.execute(sa.text(f"SHOW {name}")).scalar() for name in settings)


def test_isolation_and_readonly_apply_and_reset_on_the_pooled_connection(make_app: Any) -> None:
    """The options hold inside the view and are gone when the same connection is reused."""
    app, txn = make_app(TXN_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0})
    settings = ("transaction_isolation", "transaction_read_only", "transaction_deferrable")

    @app.get("/strict")
    @atomic(isolation="serializable", readonly=True, deferrable=True)
    def strict() -> Any:
        return [*show(txn, *settings), txn.session.scalar(sa.select(sa.func.pg_backend_pid()))]

    @app.get("/plain")
    @atomic
    def plain() -> Any:
        return [*show(txn, *settings), txn.session.scalar(sa.select(sa.func.pg_backend_pid()))]

    client = app.test_client()
    inside = client.get("/strict").json
    after = client.get("/plain").json
    assert inside[:3] == ["serializable", "on", "on"]
    assert after[:3] == ["read committed", "off", "off"]
    assert inside[3] == after[3], "both requests must use the one pooled connection"


def test_read_only_transaction_refuses_writes(make_app: Any) -> None:
    """``readonly=True`` makes PostgreSQL refuse writes (SQLSTATE 25006)."""
    app, txn = make_app()

    @atomic(readonly=True)
    def write() -> None:
        txn.session.add(Item(name="x"))

    with app.app_context(), pytest.raises(sa.exc.InternalError) as raised:
        write()
    assert raised.value.orig.pgcode == "25006"  # type: ignore[union-attr]


def test_statement_timeout_fires(make_app: Any) -> None:
    """``statement_timeout`` cancels a slow statement with SQLSTATE 57014."""
    app, txn = make_app()

    @atomic(statement_timeout=0.05, retries=0)
    def slow() -> None:
        txn.session.execute(sa.text("SELECT pg_sleep(5)"))

    with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        slow()
    assert raised.value.orig.pgcode == "57014"  # type: ignore[union-attr]


def test_lock_timeout_fires_and_is_local_to_the_block(make_app: Any) -> None:
    """``lock_timeout`` gives up on a held row lock (55P03) and does not outlive the block."""
    app, txn = make_app(TXN_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0})
    with app.app_context():
        with atomic():
            txn.session.add(Item(id=1, name="locked"))
        holder_engine = sa.create_engine(txn.engine.url)

    @atomic(lock_timeout=0.05, retries=0)
    def take_lock() -> None:
        txn.session.execute(sa.select(Item).where(Item.id == 1).with_for_update())

    try:
        with holder_engine.begin() as holder:
            holder.execute(sa.select(Item).where(Item.id == 1).with_for_update())
            with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
                take_lock()
        assert raised.value.orig.pgcode == "55P03"  # type: ignore[union-attr]
        with app.app_context(), atomic():
            assert show(txn, "lock_timeout") == ("0",)
    finally:
        holder_engine.dispose()


def test_swallowed_error_never_reports_success(make_app: Any) -> None:
    """A caught error that aborted the transaction raises instead of a silent rollback."""
    app, txn = make_app()

    @atomic
    def swallow() -> None:
        txn.session.add(Item(name="lost"))
        txn.session.flush()
        with contextlib.suppress(sa.exc.DataError):
            txn.session.execute(sa.text("SELECT 1/0"))

    with app.app_context(), pytest.raises(TransactionAbortedError) as raised:
        swallow()
    assert isinstance(raised.value.__cause__, sa.exc.DataError)
    assert count_items(app, txn) == 0


def test_swallowed_error_in_a_view_is_not_a_200(make_app: Any) -> None:
    """Through a request, the swallowed error becomes a 500, never a success."""
    app, txn = make_app()

    @app.post("/")
    @atomic
    def swallow() -> str:
        txn.session.add(Item(name="lost"))
        txn.session.flush()
        with contextlib.suppress(sa.exc.DataError):
            txn.session.execute(sa.text("SELECT 1/0"))
        return "ok"

    app.testing = False
    assert app.test_client().post("/").status_code == 500
    assert count_items(app, txn) == 0


def test_swallowed_error_with_a_pending_orm_write(make_app: Any) -> None:
    """A caught error followed by an unflushed ORM write: the block raises
    TransactionAbortedError caused by the original error, not the flush's 25P02."""
    app, txn = make_app()
    with app.app_context(), atomic():
        txn.session.add(Item(id=1, name="first"))

    @atomic
    def swallow() -> None:
        with contextlib.suppress(sa.exc.IntegrityError):
            txn.session.execute(
                sa.text("INSERT INTO item (id, name, value) VALUES (1, 'again', 0)")
            )
        txn.session.add(Item(id=2, name="pending"))

    with app.app_context(), pytest.raises(TransactionAbortedError) as raised:
        swallow()
    assert sqlstate_of(raised.value.__cause__) == "23505"
    assert count_items(app, txn) == 1
