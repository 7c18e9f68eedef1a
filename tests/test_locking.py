"""Ordered row locks, version columns and advisory locks, on real SQLite and PostgreSQL.

Locks are held by a second client of the same database (``outside``) or by a
thread running the helper; a thread that must block is seen blocking through
``pg_blocking_pids``, with a deadline. No sleeps for synchronisation.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from flask_txn import (
    ConfigError,
    FlaskTxn,
    UsageError,
    Versioned,
    advisory_lock,
    advisory_lock_key,
    atomic,
    lock_rows,
    on_commit,
    sqlstate_of,
    transaction_retrying,
    transaction_rolled_back,
    try_advisory_lock,
)

from .conftest import AppFactory, Attempts, Item, every_engine

pytestmark = every_engine

TIMEOUT = 10
ROUNDS = 50

on_postgresql = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
#: The databases with row locks.
on_servers = pytest.mark.parametrize("database_url", ["postgresql", "mariadb"], indirect=True)
on_mariadb = pytest.mark.parametrize("database_url", ["mariadb"], indirect=True)
#: The error of a lock not granted at once (NOWAIT), by dialect.
LOCKED = {"postgresql": "55P03", "mysql": "1205", "mariadb": "1205"}
#: The clause that locks a row with each strength, on MySQL and MariaDB.
MYSQL_CLAUSES = {
    "update": "FOR UPDATE",
    "no key update": "FOR UPDATE",
    "share": "LOCK IN SHARE MODE",
    "key share": "LOCK IN SHARE MODE",
}
on_sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class LockBase(DeclarativeBase):
    pass


class Counter(Versioned, LockBase):
    __tablename__ = "locking_counter"

    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


class Pair(LockBase):
    __tablename__ = "locking_pair"

    a: Mapped[int] = mapped_column(primary_key=True)
    b: Mapped[str] = mapped_column(sa.String(10), primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


class Account(LockBase):
    __tablename__ = "locking_account"

    id: Mapped[int] = mapped_column(primary_key=True)


class Entry(LockBase):
    __tablename__ = "locking_entry"

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(sa.ForeignKey("locking_account.id"))


App = tuple[Flask, FlaskTxn]


@pytest.fixture
def locking_app(make_app: AppFactory, database_url: str) -> App:
    """An app whose retries never wait; items 2, 1, 3 stored in that order, counter 1 at 0."""
    options = {}
    if database_url.startswith("postgresql"):
        # A bug that leaves a lock waiting fails the test instead of hanging it.
        options = {"connect_args": {"options": f"-c lock_timeout={TIMEOUT}s"}}
    app, txn = make_app(TXN_RETRY_SLEEP=lambda _: None, TXN_ENGINE_OPTIONS=options)
    with app.app_context():
        LockBase.metadata.drop_all(txn.engine)
        LockBase.metadata.create_all(txn.engine)
        with atomic():
            # One flush per row: the physical order differs from the key order,
            # so a lock order that follows the table scan would show.
            for key in (2, 1, 3):
                txn.session.add(Item(id=key, name=f"item {key}"))
                txn.session.flush()
            txn.session.add(Counter(id=1))
    return app, txn


@pytest.fixture
def outside(locking_app: App) -> Iterator[sa.Engine]:
    """Another client of the same database, for holding and probing locks."""
    app, txn = locking_app
    with app.app_context():
        url = txn.engine.url
    connect_args: dict[str, Any] = {"options": f"-c lock_timeout={TIMEOUT}s"}
    if url.get_backend_name() == "sqlite":
        connect_args = {"timeout": TIMEOUT}
    elif url.get_backend_name() != "postgresql":
        connect_args = {}  # the server's innodb_lock_wait_timeout (tests/mariadb.py) bounds waits
    engine = sa.create_engine(url, connect_args=connect_args)
    yield engine
    engine.dispose()


def values(engine: sa.Engine) -> dict[int, int]:
    """Committed item values by id."""
    with engine.connect() as connection:
        return {key: value for key, value in connection.execute(sa.select(Item.id, Item.value))}


def nowait_lock(engine: sa.Engine, item_id: int, strength: str = "update") -> str | None:
    """Lock item ``item_id`` ``FOR <strength> NOWAIT`` from another transaction, then release it.

    Returns None if the lock was granted, else the SQLSTATE of the error
    (:data:`LOCKED` when another transaction holds a conflicting lock).
    """
    clause = f"FOR {strength.upper()}"
    if engine.dialect.name != "postgresql":
        clause = MYSQL_CLAUSES[strength]
    with engine.connect() as connection:
        try:
            connection.execute(
                sa.text(f"SELECT id FROM item WHERE id = :id {clause} NOWAIT"),
                {"id": item_id},
            )
        except sa.exc.OperationalError as exc:
            return sqlstate_of(exc)
        finally:
            connection.rollback()
    return None


def backend_pid() -> int:
    """The PostgreSQL backend of the current app's session."""
    session = current_app.extensions["flask-txn"].session
    return int(session.scalar(sa.select(sa.func.pg_backend_pid())))


def wait_until_blocked(engine: sa.Engine, pid: int, by: int) -> None:
    """Return once backend ``pid`` waits for a lock that backend ``by`` holds."""
    deadline = time.monotonic() + TIMEOUT
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            blockers = connection.scalar(sa.select(sa.func.pg_blocking_pids(pid))) or []
            connection.rollback()
            if by in blockers:
                return
            # Readiness polling of the server's lock table, not synchronisation.
            time.sleep(0.005)
    raise AssertionError(f"backend {pid} never waited for backend {by}")


class Background:
    """Run functions in threads that report their exceptions; join them with a deadline."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, func: Callable[[], object], *, on_error: Callable[[], object] = list) -> None:
        """Start ``func`` in a thread; ``on_error`` runs if it raises (e.g. to break a barrier)."""

        def run() -> None:
            try:
                func()
            except BaseException as exc:  # reported by join(), not lost in the thread
                self.errors.append(exc)
                on_error()

        thread = threading.Thread(target=run)
        self.threads.append(thread)
        thread.start()

    def join(self) -> list[BaseException]:
        """Wait for every thread; return the exceptions they raised."""
        for thread in self.threads:
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in self.threads), "a thread hung"
        return self.errors


# -- lock_rows: results ---------------------------------------------------------


def test_lock_rows_returns_the_rows_found_by_key_in_key_order(locking_app: App) -> None:
    """Duplicates count once, missing ids are absent, keys come in primary-key order."""
    app, _ = locking_app
    with app.app_context(), atomic():
        locked = lock_rows(Item, [3, 1, 2, 1, 99])
        assert list(locked) == [1, 2, 3]
        assert [item.id for item in locked.values()] == [1, 2, 3]
        assert all(isinstance(item, Item) for item in locked.values())


def test_lock_rows_refreshes_objects_already_in_the_session(
    locking_app: App, outside: sa.Engine
) -> None:
    """An object loaded before the lock gets the locked row's values, not stale ones."""
    app, txn = locking_app
    with app.app_context():
        with atomic():
            item = txn.session.get(Item, 1)
        assert item is not None
        with outside.begin() as connection:
            connection.execute(sa.update(Item).where(Item.id == 1).values(value=7))
        assert item.value == 0  # the session keeps values after commit
        with atomic():
            locked = lock_rows(Item, [1])
        assert locked[1] is item
        assert item.value == 7


def test_lock_rows_on_a_table_returns_rows(locking_app: App) -> None:
    """Given a Table, the result holds its rows keyed by primary key."""
    app, _ = locking_app
    with app.app_context(), atomic():
        locked = lock_rows(Item.metadata.tables["item"], [2, 1])
    assert list(locked) == [1, 2]
    assert [(row.id, row.name) for row in locked.values()] == [(1, "item 1"), (2, "item 2")]


def test_lock_rows_with_a_composite_primary_key(locking_app: App) -> None:
    """Composite keys are tuples (or lists) of values; the result is keyed by tuples in order."""
    app, txn = locking_app
    with app.app_context(), atomic():
        txn.session.add_all([Pair(a=1, b="a"), Pair(a=1, b="b"), Pair(a=2, b="a")])
        txn.session.flush()
        locked = lock_rows(Pair, [(2, "a"), (1, "b"), [1, "b"], (3, "z")])
    assert list(locked) == [(1, "b"), (2, "a")]
    assert [(pair.a, pair.b) for pair in locked.values()] == [(1, "b"), (2, "a")]


def test_lock_rows_with_no_ids_returns_an_empty_dict(locking_app: App) -> None:
    """No ids, no statement and no rows."""
    app, _ = locking_app
    with app.app_context(), atomic():
        assert lock_rows(Item, []) == {}


# -- lock_rows: order and deadlocks (PostgreSQL) --------------------------------


@on_postgresql
@pytest.mark.parametrize(
    ("held", "probe", "probe_is_free"),
    [(2, 1, False), (1, 2, True)],
    ids=["waiting-on-2-holds-1", "waiting-on-1-holds-nothing-else"],
)
def test_lock_rows_locks_in_primary_key_order(
    locking_app: App, outside: sa.Engine, held: int, probe: int, probe_is_free: bool
) -> None:
    """Called with [2, 1] (rows stored 2, 1), it locks row 1 before row 2.

    While it waits for the row another transaction holds, it holds every row
    with a lower key and none with a higher one.
    """
    app, _ = locking_app
    with outside.connect() as connection:
        stored = connection.scalars(sa.text("SELECT id FROM item ORDER BY ctid")).all()
    assert stored == [2, 1, 3], "the table scan order must differ from the key order"
    pids: list[int] = []
    started = threading.Event()
    locked: dict[int, int] = {}

    def lock() -> None:
        with app.app_context(), atomic():
            pids.append(backend_pid())
            started.set()
            locked.update({key: item.id for key, item in lock_rows(Item, [2, 1]).items()})

    holder = outside.connect()
    background = Background()
    try:
        holder.execute(sa.select(Item.id).where(Item.id == held).with_for_update())
        holder_pid = holder.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
        background.start(lock, on_error=started.set)
        assert started.wait(TIMEOUT)
        assert pids, background.errors
        wait_until_blocked(outside, pids[0], by=holder_pid)
        assert nowait_lock(outside, probe) == (None if probe_is_free else "55P03")
    finally:
        holder.rollback()
        holder.close()
        errors = background.join()
    assert not errors
    assert locked == {1: 1, 2: 2}


@on_postgresql
def test_opposite_orders_through_lock_rows_never_deadlock(locking_app: App) -> None:
    """Two threads locking [1, 2, 3] and [3, 2, 1], round after round: no rollback at all."""
    app, txn = locking_app
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    @atomic(retries=0)
    def add_one(ids: list[int]) -> None:
        for item in lock_rows(Item, ids).values():
            item.value += 1

    def rounds(ids: list[int]) -> None:
        with app.app_context():
            for _ in range(ROUNDS):
                barrier.wait()
                add_one(ids)

    rollbacks: list[Any] = []

    def rolled_back(_app: Flask, **payload: Any) -> None:
        rollbacks.append(payload["error"])

    background = Background()
    with transaction_rolled_back.connected_to(rolled_back):
        background.start(lambda: rounds([1, 2, 3]), on_error=barrier.abort)
        background.start(lambda: rounds([3, 2, 1]), on_error=barrier.abort)
        errors = background.join()
    assert errors == []
    assert rollbacks == []
    with app.app_context():
        assert values(txn.engine) == {1: 2 * ROUNDS, 2: 2 * ROUNDS, 3: 2 * ROUNDS}


@on_postgresql
def test_opposite_orders_by_hand_deadlock(locking_app: App) -> None:
    """The same two rows updated in opposite orders without the helper: one gets 40P01."""
    app, txn = locking_app
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    @atomic(retries=0)
    def add_one(first: int, second: int) -> None:
        update = sa.update(Item).values(value=Item.value + 1)
        txn.session.execute(update.where(Item.id == first))
        barrier.wait()  # each holds its first row
        txn.session.execute(update.where(Item.id == second))

    def run(first: int, second: int) -> None:
        with app.app_context():
            add_one(first, second)

    background = Background()
    background.start(lambda: run(1, 2))
    background.start(lambda: run(2, 1))
    errors = background.join()
    assert [sqlstate_of(error) for error in errors] == ["40P01"]


# -- lock_rows: strength, nowait, skip_locked (PostgreSQL) ----------------------

#: PostgreSQL's row-lock conflict table: what each strength keeps others from taking.
CONFLICTS = {
    "key share": {"update"},
    "share": {"no key update", "update"},
    "no key update": {"share", "no key update", "update"},
    "update": {"key share", "share", "no key update", "update"},
}


@on_postgresql
@pytest.mark.parametrize("mode", list(CONFLICTS))
def test_lock_mode_conflicts_as_postgresql_documents(
    locking_app: App, outside: sa.Engine, mode: Any
) -> None:
    """Each mode blocks exactly the strengths PostgreSQL's conflict table says it does."""
    app, _ = locking_app
    with app.app_context(), atomic():
        lock_rows(Item, [1], mode=mode)
        blocked = {probe for probe in CONFLICTS if nowait_lock(outside, 1, probe) == "55P03"}
    assert blocked == CONFLICTS[mode]


#: MySQL's and MariaDB's two strengths: what each mode keeps others from taking.
MYSQL_CONFLICTS = {
    "key share": {"update", "no key update"},
    "share": {"update", "no key update"},
    "no key update": set(CONFLICTS),
    "update": set(CONFLICTS),
}


@on_mariadb
@pytest.mark.parametrize("mode", list(MYSQL_CONFLICTS))
def test_lock_modes_on_mariadb_are_its_two_strengths(
    locking_app: App, outside: sa.Engine, mode: Any
) -> None:
    """MariaDB has FOR UPDATE and LOCK IN SHARE MODE: each mode takes the nearest one that
    is at least as strong, so it blocks at least what it blocks on PostgreSQL."""
    app, _ = locking_app
    with app.app_context(), atomic():
        lock_rows(Item, [1], mode=mode)
        blocked = {probe for probe in CONFLICTS if nowait_lock(outside, 1, probe) == "1205"}
    assert blocked == MYSQL_CONFLICTS[mode]
    assert blocked >= CONFLICTS[mode]


@on_servers
@pytest.mark.parametrize("mode", [None, "update"])
def test_default_mode_lets_rows_referencing_the_locked_row_be_inserted(
    locking_app: App, outside: sa.Engine, mode: Any
) -> None:
    """On PostgreSQL the default, FOR NO KEY UPDATE, lets others insert rows with a foreign
    key to the locked row, and FOR UPDATE makes them wait. MariaDB has no such lock: both
    are FOR UPDATE, and the insert waits (InnoDB checks the key with a shared lock)."""
    app, txn = locking_app
    with app.app_context():
        dialect = txn.engine.dialect.name
        with atomic():
            txn.session.add(Account(id=1))
        with atomic():
            lock_rows(Account, [1], **({} if mode is None else {"mode": mode}))
            with outside.connect() as connection:
                if dialect == "postgresql":
                    connection.exec_driver_sql("SET lock_timeout = '50ms'")
                else:
                    connection.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 0")
                error = None
                try:
                    connection.execute(sa.insert(Entry).values(id=1, account_id=1))
                except sa.exc.OperationalError as exc:
                    error = sqlstate_of(exc)
                connection.rollback()
    insert_waits = mode == "update" or dialect != "postgresql"
    assert error == (LOCKED[dialect] if insert_waits else None)


@on_servers
def test_nowait_fails_at_once_on_a_row_another_transaction_holds(
    locking_app: App, outside: sa.Engine
) -> None:
    """``nowait=True`` raises the lock-not-available error (55P03; MariaDB's 1205, its lock
    wait timeout) instead of waiting."""
    app, _ = locking_app
    with outside.begin() as holder:
        holder.execute(sa.select(Item.id).where(Item.id == 2).with_for_update())
        with (
            app.app_context(),
            pytest.raises(sa.exc.OperationalError) as raised,
            atomic(),
        ):
            lock_rows(Item, [1, 2], nowait=True)
    assert sqlstate_of(raised.value) == LOCKED[outside.dialect.name]


@on_servers
def test_skip_locked_leaves_out_rows_another_transaction_holds(
    locking_app: App, outside: sa.Engine
) -> None:
    """``skip_locked=True`` returns the free rows and omits the held one."""
    app, _ = locking_app
    with outside.begin() as holder:
        holder.execute(sa.select(Item.id).where(Item.id == 2).with_for_update())
        with app.app_context(), atomic():
            assert list(lock_rows(Item, [1, 2, 3], skip_locked=True)) == [1, 3]


@on_servers
def test_row_locks_last_until_the_block_ends(locking_app: App, outside: sa.Engine) -> None:
    """Rows stay locked for the whole block and are free after it commits."""
    app, _ = locking_app
    with app.app_context():
        with atomic():
            lock_rows(Item, [1])
            assert nowait_lock(outside, 1) == LOCKED[outside.dialect.name]
        assert nowait_lock(outside, 1) is None


@on_servers
def test_row_locks_taken_in_a_rolled_back_savepoint_are_released(
    locking_app: App, outside: sa.Engine
) -> None:
    """A nested block that rolls back releases the locks taken in it on PostgreSQL; the
    outer ones stay. InnoDB keeps them until the transaction ends (MariaDB's pitfall)."""
    app, _ = locking_app
    locked = LOCKED[outside.dialect.name]
    with app.app_context(), atomic():
        lock_rows(Item, [1])
        with pytest.raises(LookupError), atomic():
            lock_rows(Item, [2])
            raise LookupError
        after = (nowait_lock(outside, 1), nowait_lock(outside, 2))
    assert after == (locked, None if locked == "55P03" else locked)


@on_mariadb
def test_opposite_orders_through_lock_rows_never_deadlock_on_mariadb(locking_app: App) -> None:
    """InnoDB locks the rows of ``lock_rows``' primary-key range scan in key order too."""
    test_opposite_orders_through_lock_rows_never_deadlock(locking_app)


# -- lock_rows: SQLite ----------------------------------------------------------


@on_sqlite
def test_lock_rows_on_sqlite_relies_on_the_database_lock(
    locking_app: App, outside: sa.Engine
) -> None:
    """SQLite has no row locks: the block's BEGIN IMMEDIATE keeps every other writer out."""
    app, _ = locking_app
    with app.app_context(), atomic():
        assert list(lock_rows(Item, [2, 1])) == [1, 2]
        with outside.connect() as connection:
            connection.exec_driver_sql("PRAGMA busy_timeout = 0")
            with pytest.raises(sa.exc.OperationalError, match="database is locked"):
                connection.execute(sa.update(Item).where(Item.id == 3).values(value=5))
            connection.rollback()


@on_sqlite
def test_lock_rows_on_sqlite_deferred_takes_no_lock(
    make_app: Any, sqlite_url: str, outside: sa.Engine
) -> None:
    """With TXN_SQLITE_BEGIN='DEFERRED' the rows stay writable by another client."""
    app, txn = make_app(sqlite_url, TXN_SQLITE_BEGIN="deferred")
    with app.app_context():
        LockBase.metadata.create_all(txn.engine)
        with atomic():
            txn.session.add(Item(id=1, name="one"))
        with atomic():
            lock_rows(Item, [1])
            with outside.connect() as connection:
                connection.exec_driver_sql("PRAGMA busy_timeout = 0")
                result = connection.execute(sa.update(Item).where(Item.id == 1).values(value=5))
                assert result.rowcount == 1
                connection.rollback()


@on_sqlite
@pytest.mark.parametrize("name", ["nowait", "skip_locked"])
def test_lock_rows_on_sqlite_refuses_nowait_and_skip_locked(locking_app: App, name: str) -> None:
    """The options that promise row-lock behaviour are refused on SQLite."""
    app, _ = locking_app
    with (
        app.app_context(),
        atomic(),
        pytest.raises(
            ConfigError,
            match=re.escape(f"{name}=True needs row locks, which SQLite does not have;")
            + r".*'sqlite'.*"
            + re.escape(f"Use {name}=False (the default)"),
        ),
    ):
        lock_rows(Item, [1], nowait=name == "nowait", skip_locked=name == "skip_locked")


# -- lock_rows: errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"mode": "exclusive"},
            "'mode' must be one of 'no key update', 'update', 'share', 'key share'"
            " (case-insensitive), got 'exclusive'.",
        ),
        ({"mode": None}, "'mode' must be one of 'no key update', 'update', 'share', 'key share'"),
        ({"nowait": "yes"}, "'nowait' must be True or False, got 'yes'."),
        ({"skip_locked": 1}, "'skip_locked' must be True or False, got 1."),
        (
            {"nowait": True, "skip_locked": True},
            "'nowait=True' and 'skip_locked=True' cannot be combined",
        ),
    ],
)
def test_lock_rows_refuses_bad_options(arguments: dict[str, Any], message: str) -> None:
    """A bad lock option is named, shown and explained."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        lock_rows(Item, [1], **arguments)


def test_lock_rows_accepts_modes_in_any_case() -> None:
    """'NO KEY UPDATE' and 'no_key_update' are the default mode (then the missing app context)."""
    for mode in ("NO KEY UPDATE", "no_key_update", " Key  Share "):
        with pytest.raises(UsageError, match="outside of an application context"):
            lock_rows(Item, [1], mode=mode)  # type: ignore[call-overload]


NO_KEY = sa.Table("no_key", sa.MetaData(), sa.Column("x", sa.Integer))


@pytest.mark.parametrize(
    ("entity", "ids", "message"),
    [
        (
            "item",
            [1],
            "'entity' must be a mapped class or a Table, got 'item'. Pass the model class"
            " itself, e.g. lock_rows(Account, [1, 2]).",
        ),
        (Item(id=1), [1], "'entity' must be a mapped class or a Table, got <"),
        (object, [1], "'entity' must be a mapped class or a Table, got <class 'object'>."),
        (NO_KEY, [1], "'entity' 'no_key' has no primary key"),
        (Item, 1, "'ids' must be an iterable of primary key values, got 1. Pass a list, e.g. [1]"),
        (Item, "12", "'ids' must be an iterable of primary key values, got '12'."),
        (Item, [[1]], "'ids' must hold primary key values (hashable: "),
        (
            Pair,
            [(1, "a", 2)],
            "'ids' must hold tuples of 2 values for the composite primary key (a, b) of"
            " 'locking_pair', got (1, 'a', 2).",
        ),
        (Pair, [1], "'ids' must hold tuples of 2 values for the composite primary key"),
    ],
)
def test_lock_rows_refuses_bad_entities_and_ids(entity: Any, ids: Any, message: str) -> None:
    """A bad entity or id is named, shown and explained."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        lock_rows(entity, ids)


# -- must run in an atomic block ------------------------------------------------

LOCKERS: dict[str, Callable[[], object]] = {
    "lock_rows": lambda: lock_rows(Item, [1]),
    "advisory_lock": lambda: advisory_lock("k"),
    "try_advisory_lock": lambda: try_advisory_lock("k"),
}


@pytest.mark.parametrize("name", list(LOCKERS))
def test_locks_need_an_atomic_block(locking_app: App, name: str) -> None:
    """Outside a block the lock would end with the statement: refused."""
    app, _ = locking_app
    with (
        app.app_context(),
        pytest.raises(
            UsageError,
            match=re.escape(f"{name!r} was called outside of an atomic block")
            + ".*"
            + re.escape("Call it inside '@atomic' or 'with atomic():'."),
        ),
    ):
        LOCKERS[name]()


@pytest.mark.parametrize("name", list(LOCKERS))
def test_locks_need_an_app_context(name: str) -> None:
    """Without an app context there is no session to lock with."""
    with pytest.raises(
        UsageError, match=re.escape(f"{name!r} was used outside of an application context")
    ):
        LOCKERS[name]()


@pytest.mark.parametrize("name", list(LOCKERS))
def test_locks_need_the_extension(name: str) -> None:
    """An app without flask-txn is told to register it."""
    with (
        Flask("bare").app_context(),
        pytest.raises(
            UsageError,
            match=re.escape("No flask-txn extension is registered on the current app 'bare'."),
        ),
    ):
        LOCKERS[name]()


def test_lock_in_an_on_commit_callback_is_refused(locking_app: App) -> None:
    """After the commit the block is over: a lock there is refused, not silently useless."""
    app, _ = locking_app
    with (
        app.app_context(),
        pytest.raises(UsageError, match="'lock_rows' was called outside of an atomic block"),
        atomic(),
    ):
        on_commit(lambda: lock_rows(Item, [1]))


# -- Versioned ------------------------------------------------------------------


def test_versioned_starts_at_one_and_counts_updates(locking_app: App) -> None:
    """The version is 1 after INSERT and goes up by one per UPDATE."""
    app, txn = locking_app
    with app.app_context():
        with atomic():
            counter = txn.session.get(Counter, 1)
            assert counter is not None
            assert counter.version == 1
        with atomic():
            counter.value += 1
        assert counter.version == 2


def stale_counter(app: Flask, txn: FlaskTxn, outside: sa.Engine) -> Counter:
    """Counter 1 as loaded in an earlier transaction, then changed to 10 by another client."""
    with atomic():
        counter = txn.session.get(Counter, 1)
    assert counter is not None
    with outside.begin() as connection:
        connection.execute(sa.update(Counter).values(value=10, version=Counter.version + 1))
    return counter


def test_lost_update_on_a_versioned_row_raises_stale_data_error(
    locking_app: App, outside: sa.Engine
) -> None:
    """Writing back a value read before another client's update raises instead of losing it."""
    app, txn = locking_app
    with app.app_context():
        counter = stale_counter(app, txn, outside)
        with pytest.raises(StaleDataError, match="expected to update 1 row"), atomic():
            counter.value += 1
    with outside.connect() as connection:
        assert connection.execute(sa.select(Counter.value, Counter.version)).one() == (10, 2)


def test_retry_on_stale_data_error_reruns_with_fresh_values(
    locking_app: App, outside: sa.Engine
) -> None:
    """``@atomic(retry_on=StaleDataError)`` re-runs the function, which now reads 10."""
    app, txn = locking_app
    attempts = []
    with app.app_context():
        counter = stale_counter(app, txn, outside)

        @atomic(retry_on=StaleDataError)
        def increment() -> None:
            attempts.append(counter.value)
            counter.value += 1

        increment()
    assert attempts == [0, 10]
    with outside.connect() as connection:
        assert connection.execute(sa.select(Counter.value, Counter.version)).one() == (11, 3)


@on_postgresql
def test_concurrent_increments_of_a_versioned_row_lose_nothing(locking_app: App) -> None:
    """Two read-modify-writes of one row: the second gets StaleDataError, is re-run, both count."""
    app, txn = locking_app
    attempts, barrier = Attempts(), threading.Barrier(2, timeout=TIMEOUT)

    @atomic(retry_on=StaleDataError)
    def increment() -> None:
        counter = txn.session.get(Counter, 1)
        assert counter is not None
        if attempts.first():
            barrier.wait()  # both have read version 1
        counter.value += 1

    def run() -> None:
        with app.app_context():
            increment()

    retried: list[BaseException] = []

    def retrying(_app: Flask, **payload: Any) -> None:
        retried.append(payload["error"])

    background = Background()
    with transaction_retrying.connected_to(retrying):
        background.start(run, on_error=barrier.abort)
        background.start(run, on_error=barrier.abort)
        errors = background.join()
    assert errors == []
    assert [type(error) for error in retried] == [StaleDataError]
    assert attempts.total == 3
    with app.app_context(), txn.engine.connect() as connection:
        assert connection.execute(sa.select(Counter.value, Counter.version)).one() == (2, 3)


# -- advisory locks: keys -------------------------------------------------------


def test_advisory_lock_key_of_an_int_is_the_int() -> None:
    """Ints are used as they are, up to the signed 64-bit limits."""
    assert [advisory_lock_key(n) for n in (0, -1, 2**63 - 1, -(2**63))] == [
        0,
        -1,
        2**63 - 1,
        -(2**63),
    ]


def test_advisory_lock_key_of_a_string_is_its_sha256_prefix() -> None:
    """A string maps to the first 8 bytes of its UTF-8 SHA-256, signed big-endian."""
    digest = hashlib.sha256("invoice:42 ✓".encode()).hexdigest()[:16]
    expected = int(digest, 16) - (2**64 if int(digest, 16) >= 2**63 else 0)
    assert advisory_lock_key("invoice:42 ✓") == expected
    assert advisory_lock_key("invoice:43 ✓") != expected


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            2**63,
            f"'key' must fit in a signed 64-bit integer (from -2**63 to 2**63 - 1), got {2**63}.",
        ),
        (-(2**63) - 1, "'key' must fit in a signed 64-bit integer"),
        (True, "'key' must be a str or an int, got True of type bool."),
        (b"job", "'key' must be a str or an int, got b'job' of type bytes."),
        (1.5, "'key' must be a str or an int, got 1.5 of type float."),
    ],
)
def test_advisory_lock_key_refuses_bad_keys(key: Any, message: str) -> None:
    """Keys that are not a str or a 64-bit int are named and shown."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        advisory_lock_key(key)


@pytest.mark.parametrize("lock", [advisory_lock, try_advisory_lock])
def test_advisory_locks_refuse_a_non_bool_shared(lock: Callable[..., Any]) -> None:
    """``shared`` must be a bool."""
    with pytest.raises(ConfigError, match=re.escape("'shared' must be True or False, got 'no'.")):
        lock("k", shared="no")


@on_postgresql
def test_advisory_lock_key_matches_postgresql_sha256(locking_app: App) -> None:
    """PostgreSQL computes the same number from the string, so SQL clients can take the lock."""
    app, txn = locking_app
    with app.app_context(), txn.engine.connect() as connection:
        computed = connection.scalar(
            sa.text(
                "SELECT ('x' || left(encode(sha256(convert_to(:key, 'UTF8')), 'hex'), 16))"
                "::bit(64)::bigint"
            ),
            {"key": "invoice:42 ✓"},
        )
    assert computed == advisory_lock_key("invoice:42 ✓")


# -- advisory locks: behaviour (PostgreSQL) -------------------------------------


def advisory_holders(engine: sa.Engine, key: str | int) -> list[int]:
    """Backends holding a granted advisory lock on ``key``, from ``pg_locks``."""
    with engine.connect() as connection:
        return list(
            connection.scalars(
                sa.text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
                    " AND granted AND ((classid::bigint << 32) | objid::bigint) = :number"
                ),
                {"number": advisory_lock_key(key)},
            )
        )


@on_postgresql
def test_same_advisory_key_serialises_transactions(locking_app: App, outside: sa.Engine) -> None:
    """While one transaction holds a key, a try from another fails and a waiter blocks until
    the holder's transaction ends."""
    app, _ = locking_app
    held, release, waiter_started = threading.Event(), threading.Event(), threading.Event()
    pids: dict[str, int] = {}
    events: list[str] = []

    def hold() -> None:
        with app.app_context(), atomic():
            pids["holder"] = backend_pid()
            advisory_lock("invoice:42")
            held.set()
            assert release.wait(TIMEOUT)
            events.append("holder commits")

    def wait() -> None:
        with app.app_context(), atomic():
            pids["waiter"] = backend_pid()
            waiter_started.set()
            advisory_lock("invoice:42")
            events.append("waiter holds")

    background = Background()
    try:
        background.start(hold, on_error=held.set)
        assert held.wait(TIMEOUT)
        assert advisory_holders(outside, "invoice:42") == [pids["holder"]]
        with app.app_context(), atomic():
            assert try_advisory_lock("invoice:42") is False
        background.start(wait, on_error=waiter_started.set)
        assert waiter_started.wait(TIMEOUT)
        wait_until_blocked(outside, pids["waiter"], by=pids["holder"])
        assert events == []
    finally:
        release.set()
        errors = background.join()
    assert errors == []
    assert events == ["holder commits", "waiter holds"]


@on_postgresql
def test_different_advisory_keys_do_not_conflict(locking_app: App, outside: sa.Engine) -> None:
    """A lock on one key does not stop a lock on another."""
    app, _ = locking_app
    with outside.begin() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(advisory_lock_key("a"))))
        with app.app_context(), atomic(lock_timeout=TIMEOUT):
            assert try_advisory_lock("b") is True
            advisory_lock("c")
            assert try_advisory_lock("a") is False


@on_postgresql
def test_shared_advisory_locks_exclude_only_exclusive_ones(
    locking_app: App, outside: sa.Engine
) -> None:
    """Shared holders coexist; an exclusive lock and a shared one exclude each other."""
    app, _ = locking_app
    with outside.begin() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock_shared(advisory_lock_key("s"))))
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(advisory_lock_key("x"))))
        with app.app_context(), atomic():
            assert try_advisory_lock("s", shared=True) is True
            assert try_advisory_lock("s") is False
            assert try_advisory_lock("x", shared=True) is False
        with app.app_context(), atomic(lock_timeout=TIMEOUT):
            advisory_lock("s", shared=True)
            assert sorted(advisory_holders(outside, "s")) == sorted(
                [backend_pid(), holder.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()]
            )


class Boom(Exception):
    pass


@on_postgresql
@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_advisory_lock_is_released_when_the_transaction_ends(
    locking_app: App, outside: sa.Engine, ending: str
) -> None:
    """The lock is held in the block and gone after its commit or its rollback."""
    app, _ = locking_app
    with app.app_context():
        try:
            with atomic():
                assert try_advisory_lock("invoice:42") is True
                advisory_lock(7)
                assert advisory_holders(outside, "invoice:42") == [backend_pid()]
                assert advisory_holders(outside, 7) == [backend_pid()]
                if ending == "rollback":
                    raise Boom
        except Boom:
            pass
    assert advisory_holders(outside, "invoice:42") == []
    assert advisory_holders(outside, 7) == []


@on_postgresql
def test_advisory_lock_taken_in_a_rolled_back_savepoint_is_released(
    locking_app: App, outside: sa.Engine
) -> None:
    """A nested block that rolls back releases its advisory locks; the outer ones stay."""
    app, _ = locking_app
    with app.app_context(), atomic():
        advisory_lock("outer")
        with pytest.raises(Boom), atomic():
            advisory_lock("inner")
            raise Boom
        assert advisory_holders(outside, "outer") == [backend_pid()]
        assert advisory_holders(outside, "inner") == []


@on_postgresql
def test_lock_timeout_bounds_the_wait_for_an_advisory_lock(
    locking_app: App, outside: sa.Engine
) -> None:
    """``atomic(lock_timeout=...)`` turns a long wait into 55P03."""
    app, _ = locking_app
    with outside.begin() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(advisory_lock_key("busy"))))
        with (
            app.app_context(),
            pytest.raises(sa.exc.OperationalError) as raised,
            atomic(lock_timeout=0.05),
        ):
            advisory_lock("busy")
    assert sqlstate_of(raised.value) == "55P03"


CHILD = """
import os, sys
from flask import Flask
from flask_txn import FlaskTxn, advisory_lock, advisory_lock_key, atomic

app = Flask("child")
app.config["TXN_DATABASE_URI"] = os.environ["FLASK_TXN_CHILD_URL"]
txn = FlaskTxn(app)
with app.app_context(), atomic():
    advisory_lock(sys.argv[1])
    print(advisory_lock_key(sys.argv[1]), flush=True)
    sys.stdin.readline()
"""


@on_postgresql
def test_string_key_names_the_same_lock_in_another_process(
    locking_app: App, outside: sa.Engine, database_url: str
) -> None:
    """A child process computes the same number for the string, and its lock excludes ours."""
    app, _ = locking_app
    key = "invoice:42"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # The URL goes by environment, not argv, where a password would be on show.
        env={**os.environ, "FLASK_TXN_CHILD_URL": database_url},
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
        assert ready, "the child never took the lock"
        number = int(child.stdout.readline())
        assert number == advisory_lock_key(key)
        assert len(advisory_holders(outside, key)) == 1
        with app.app_context(), atomic():
            assert try_advisory_lock(key) is False
    finally:
        child.communicate("\n", timeout=TIMEOUT)
    assert child.returncode == 0
    assert advisory_holders(outside, key) == []


@pytest.mark.parametrize(
    ("database_url", "instead"),
    [("sqlite", "start the block with a write"), ("mariadb", "belong to the connection")],
    indirect=["database_url"],
)
@pytest.mark.parametrize("name", ["advisory_lock", "try_advisory_lock"])
def test_advisory_locks_need_postgresql(locking_app: App, name: str, instead: str) -> None:
    """On SQLite and MariaDB the advisory lock functions are refused with the database
    named and what to do instead (MariaDB's GET_LOCK outlives the transaction)."""
    app, txn = locking_app
    with app.app_context():
        dialect = txn.engine.dialect.name
    with (
        app.app_context(),
        atomic(),
        pytest.raises(
            UsageError,
            match=re.escape(
                f"{name!r} needs PostgreSQL's advisory locks; the database is {dialect!r}."
            )
            + f".*{instead}",
        ),
    ):
        LOCKERS[name]()


# -- the docs page --------------------------------------------------------------

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "locking.md"
DOCS_URL = '"postgresql+psycopg2://localhost/app"'


def docs_app(url: str) -> dict[str, Any]:
    """Run the ``python`` blocks of docs/locking.md, in order, as one module on ``url``."""
    page = DOCS_PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```$", page, re.MULTILINE | re.DOTALL)
    source = "\n".join(textwrap.dedent(block) for _, block in blocks)
    assert DOCS_URL in source
    namespace: dict[str, Any] = {"__name__": "locking_docs"}
    # dont_inherit: run it as a user's module would, without this file's
    # "from __future__ import annotations".
    code = compile(source.replace(DOCS_URL, repr(url)), str(DOCS_PAGE), "exec", dont_inherit=True)
    exec(code, namespace)
    return namespace


def test_the_locking_page_examples_run(postgresql_url: str) -> None:
    """The page's examples, run as one app on PostgreSQL, answer as the page says."""
    page = docs_app(postgresql_url)
    app, txn, metadata = page["app"], page["txn"], page["Base"].metadata
    client = app.test_client()
    with app.app_context():
        engine = txn.engine
    metadata.drop_all(engine)
    metadata.create_all(engine)
    try:
        with app.app_context(), atomic():
            txn.session.add_all([page["Account"](id=1, balance=100), page["Account"](id=2)])
            txn.session.add_all([page["Job"](id=1), page["Job"](id=2)])
            txn.session.add(page["Document"](id=1, body="a"))

        def transfer(path: str, source: int, target: int, amount: int) -> int:
            body = {"from": source, "to": target, "amount": amount}
            return int(client.post(path, json=body).status_code)

        assert transfer("/transfer", 1, 2, 30) == 200
        assert transfer("/transfer", 1, 3, 30) == 404
        assert transfer("/transfer", 1, 2, 500) == 409
        assert transfer("/serializable-transfer", 1, 2, 10) == 200
        assert transfer("/bounded-transfer", 1, 2, 5) == 200
        assert client.post("/work").json == {"done": [1, 2]}
        assert client.post("/documents/1/append", json={"text": "b"}).status_code == 200
        stale = {"version": "1", "body": "lost"}
        assert client.post("/documents/1", data=stale).status_code == 409
        assert client.post("/documents/1", data={"version": "2", "body": "c"}).status_code == 200
        customer = client.post("/customers", json={"email": "ada@example.com"}).json
        assert client.post("/customers", json={"email": "ada@example.com"}).json == customer
        assert client.post("/reports/daily/rebuild").status_code == 200
        with engine.connect() as connection:
            balances = connection.execute(sa.text("SELECT id, balance FROM account ORDER BY id"))
            assert balances.all() == [(1, 55), (2, 45)]
            document = connection.execute(sa.text("SELECT body, version FROM document"))
            assert document.one() == ("c", 3)
    finally:
        metadata.drop_all(engine)
        engine.dispose()
