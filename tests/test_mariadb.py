"""MariaDB for real, through PyMySQL and mysqlclient: what is retried, what never commits.

The suite's own MariaDB (tests/mariadb.py). Conflicts are provoked with two
requests and a ``threading.Barrier``, as on PostgreSQL (test_conflicts); lock
errors with ``innodb_lock_wait_timeout = 0``, which makes MariaDB answer a lock
conflict at once with 1205 instead of after a wait.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from flask_txn import (
    ConfigError,
    TransactionAbortedError,
    atomic,
    register_error_handlers,
    sqlstate_of,
    testing,
    transaction_committed,
    transaction_retrying,
)

from .conftest import Attempts, Item, new_database
from .test_conflicts import (  # noqa: F401 (bank: a fixture)
    TIMEOUT,
    bank,
    deadlock,
    retries_of,
    run_concurrently,
    values,
)
from .test_example_bank import assert_load_reconciles

# The plugin is off in this suite (pyproject.toml): borrow the fixture used here.
txn_faults = testing.txn_faults


@pytest.fixture(params=["pymysql", "mysqlclient"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The suite's MariaDB through each driver."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def pymysql_url(mariadb_url: str) -> str:
    return mariadb_url


def with_session(statement: str) -> dict[str, Any]:
    """``TXN_ENGINE_OPTIONS`` that run ``statement`` on each new connection (both drivers)."""
    return {"connect_args": {"init_command": statement}}


@pytest.fixture
def nowait_bank(make_app: Any) -> Any:
    """Like ``bank``, but a lock conflict fails at once with 1205."""
    app, txn = make_app(
        TXN_RETRY_SLEEP=lambda _: None,
        TXN_ENGINE_OPTIONS=with_session("SET SESSION innodb_lock_wait_timeout = 0"),
    )
    with app.app_context(), atomic():
        txn.session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
    return app, txn


@contextlib.contextmanager
def row_1_held(app: Any, txn: Any) -> Iterator[None]:
    """Another client holds row 1's lock inside the ``with`` block."""
    with app.app_context():
        engine = sa.create_engine(txn.engine.url)
    try:
        with engine.connect() as other:
            other.execute(sa.select(Item.id).where(Item.id == 1).with_for_update())
            yield
            other.rollback()
    finally:
        engine.dispose()


@pytest.fixture
def row_1_locked(nowait_bank: Any) -> Iterator[None]:
    """Another client holds row 1's lock while the test runs."""
    with row_1_held(*nowait_bank):
        yield


def test_deadlock_is_retried_and_reported_as_its_number(bank: Any) -> None:  # noqa: F811
    """Real 1213: the victim is re-run, both updates count, and the signal's sqlstate is
    the error number with either driver (PyMySQL used to give its SQLSTATE, 40001)."""
    app, txn = bank
    payloads: list[Any] = []

    def retrying(_: Any, **payload: Any) -> None:
        payloads.append(payload["sqlstate"])

    with transaction_retrying.connected_to(retrying):
        errors = deadlock(app, txn)
    assert [sqlstate_of(error) for error in errors] == payloads == ["1213"]
    assert values(app, txn) == {1: 11, 2: 11}


def test_record_changed_under_snapshot_isolation_is_retried(make_app: Any) -> None:
    """Real 1020 ("Record has changed since last read", innodb_snapshot_isolation=ON,
    MariaDB 11.8's default): the stale writer is re-run and no update is lost."""
    app, txn = make_app(
        TXN_RETRY_SLEEP=lambda _: None,
        TXN_ENGINE_OPTIONS=with_session("SET SESSION innodb_snapshot_isolation = ON"),
    )
    with app.app_context(), atomic():
        txn.session.add(Item(id=1, name="a"))
    attempts, read, written = Attempts(), threading.Barrier(2, timeout=TIMEOUT), threading.Event()

    @app.post("/add/<int:amount>")
    @atomic(isolation="REPEATABLE READ")
    def add(amount: int) -> str:
        first = attempts.first()
        txn.session.execute(sa.select(Item.value).where(Item.id == 1)).one()  # the snapshot
        if first:
            read.wait()
        if first and amount == 1:
            assert written.wait(TIMEOUT)  # the other one committed after our snapshot
        txn.session.execute(sa.update(Item).values(value=Item.value + amount))
        return "ok"

    def committed(_: Any, **payload: Any) -> None:
        written.set()

    with transaction_committed.connected_to(committed):
        errors = retries_of(lambda: run_concurrently(app, ("A", "/add/1"), ("B", "/add/10")))
    assert [sqlstate_of(error) for error in errors] == ["1020"]
    assert values(app, txn) == {1: 11}


def test_lock_wait_timeout_is_raised_not_retried(nowait_bank: Any, row_1_locked: None) -> None:
    """1205 is not retried (like PostgreSQL's lock_not_available): the same wait would
    time out again. It reaches the caller with its number."""
    app, txn = nowait_bank
    attempts = Attempts()

    @atomic
    def update() -> None:
        attempts.first()
        txn.session.execute(sa.update(Item).where(Item.id == 1).values(value=5))

    with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        update()
    assert (sqlstate_of(raised.value), attempts.total) == ("1205", 1)


def test_a_caught_lock_wait_timeout_commits_nothing(nowait_bank: Any, row_1_locked: None) -> None:
    """InnoDB undoes only the statement that timed out: a block that catches 1205 and
    returns would have committed its other writes. It raises TransactionAbortedError
    instead, and nothing is committed."""
    app, txn = nowait_bank

    @atomic
    def careless() -> None:
        txn.session.execute(sa.update(Item).where(Item.id == 2).values(value=7))
        with contextlib.suppress(sa.exc.OperationalError):
            txn.session.execute(sa.update(Item).where(Item.id == 1).values(value=7))

    with app.app_context(), pytest.raises(TransactionAbortedError, match="1205") as raised:
        careless()
    assert sqlstate_of(raised.value.__cause__) == "1205"
    assert values(app, txn) == {1: 0, 2: 0}


def test_a_lock_wait_timeout_in_a_nested_block_rolls_back_that_block_only(
    nowait_bank: Any, row_1_locked: None
) -> None:
    """Caught around a nested block, the 1205 is undone with the savepoint: the rest
    commits, as a PostgreSQL error caught around a nested block does."""
    app, txn = nowait_bank

    @atomic
    def careful() -> None:
        txn.session.execute(sa.update(Item).where(Item.id == 2).values(value=7))
        try:
            with atomic():
                txn.session.execute(sa.update(Item).where(Item.id == 1).values(value=7))
        except sa.exc.OperationalError:
            pass

    with app.app_context():
        careful()
    assert values(app, txn) == {1: 0, 2: 7}


def test_a_lock_wait_timeout_caught_inside_a_released_nested_block_commits_nothing(
    nowait_bank: Any, row_1_locked: None
) -> None:
    """Caught inside a nested block that then ends normally (RELEASE), the 1205 belongs to
    the enclosing block: a later nested block's rollback does not undo it."""
    app, txn = nowait_bank

    @atomic
    def careless() -> None:
        with atomic():
            txn.session.execute(sa.update(Item).where(Item.id == 2).values(value=7))
            with contextlib.suppress(sa.exc.OperationalError):
                txn.session.execute(sa.update(Item).where(Item.id == 1).values(value=7))
        with contextlib.suppress(LookupError), atomic():
            raise LookupError

    with app.app_context(), pytest.raises(TransactionAbortedError, match="1205"):
        careless()
    assert values(app, txn) == {1: 0, 2: 0}


def test_a_caught_deadlock_commits_nothing(bank: Any) -> None:  # noqa: F811
    """InnoDB rolls the deadlock victim's whole transaction back: a ``with`` block (which
    cannot re-run) that catches 1213 raises it instead of committing what came after."""
    app, txn = bank
    barrier, results = threading.Barrier(2, timeout=TIMEOUT), {}

    def add(name: str, first: int, second: int) -> None:
        try:
            with app.app_context(), atomic():
                update = sa.update(Item).values(value=Item.value + 1)
                txn.session.execute(update.where(Item.id == first))
                barrier.wait()
                # The victim swallows its deadlock, and carries on.
                with contextlib.suppress(sa.exc.OperationalError):
                    txn.session.execute(update.where(Item.id == second))
                txn.session.add(Item(id=10 + first, name=name))
            results[name] = "committed"
        except sa.exc.OperationalError as exc:
            results[name] = sqlstate_of(exc)

    threads = [
        threading.Thread(target=add, args=("A", 1, 2)),
        threading.Thread(target=add, args=("B", 2, 1)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(results.values()) == ["1213", "committed"]
    rows = values(app, txn)
    assert len(rows) == 3
    assert sum(rows.values()) == 2


def test_a_lock_wait_timeout_is_answered_503_timeout(nowait_bank: Any, row_1_locked: None) -> None:
    """register_error_handlers answers 1205 as a timeout (503, Retry-After), through
    PyMySQL too, whose SQLSTATE for it (HY000) said nothing."""
    app, txn = nowait_bank
    register_error_handlers(app, retry_after=2)

    @app.post("/update")
    @atomic
    def update() -> str:
        txn.session.execute(sa.update(Item).where(Item.id == 1).values(value=5))
        return "unreachable"

    response = app.test_client().post("/update")
    body = response.get_json()
    assert (response.status_code, body["reason"], body["sqlstate"]) == (503, "timeout", "1205")


def session_settings(txn: Any) -> tuple[Any, ...]:
    """The connection's id, isolation level and timeouts, read in the current session."""
    return tuple(
        txn.session.execute(
            sa.text(
                "SELECT CONNECTION_ID(), @@tx_isolation, @@innodb_lock_wait_timeout,"
                " @@max_statement_time"
            )
        ).one()
    )


def test_isolation_and_timeouts_apply_per_block(make_app: Any) -> None:
    """A block's isolation level and timeouts hold inside it; the next block, on the same
    connection (a pool of one), has the server's again."""
    app, txn = make_app(TXN_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0})

    @atomic(isolation="SERIALIZABLE", statement_timeout=0.25, lock_timeout=0.5)
    def strict() -> tuple[Any, ...]:
        return session_settings(txn)

    @atomic
    def plain() -> tuple[Any, ...]:
        return session_settings(txn)

    with app.app_context():
        before, inside, again, after = plain(), strict(), strict(), plain()
    # lock_timeout in whole seconds, rounded up; the server's is 2 (tests/mariadb.py).
    assert inside[1:] == ("SERIALIZABLE", 1, 0.25)
    assert (again, before) == (inside, after)
    assert (after[0], after[1:]) == (inside[0], ("REPEATABLE-READ", 2, 0.0))


def test_a_block_statement_timeout_ends_the_statement_and_is_not_retried(
    make_app: Any,
) -> None:
    """MariaDB's max_statement_time ends the slow statement (1969); the same statement would
    only time out again, so it is not re-run."""
    app, txn = make_app(TXN_RETRY_SLEEP=lambda _: None)
    attempts = Attempts()

    @atomic(statement_timeout=0.05, retry_on=sa.exc.OperationalError)
    def slow() -> None:
        attempts.first()
        txn.session.execute(sa.text("SELECT SLEEP(5) FROM item"))

    with app.app_context():
        with atomic():
            txn.session.add(Item(id=1))
        with pytest.raises(sa.exc.OperationalError) as raised:
            slow()
    assert (sqlstate_of(raised.value), attempts.total) == ("1969", 1)


@pytest.mark.parametrize("database_url", ["pymysql"], indirect=True)  # a 1 s wait: once
def test_a_block_lock_timeout_bounds_the_wait(bank: Any) -> None:  # noqa: F811
    """``lock_timeout`` becomes innodb_lock_wait_timeout for the block: 1 s, not the server's
    (the settings test shows the value on both drivers)."""
    app, txn = bank

    @atomic(lock_timeout=1)
    def update() -> None:
        txn.session.execute(sa.update(Item).where(Item.id == 1).values(value=5))

    with row_1_held(app, txn), app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        update()
    assert sqlstate_of(raised.value) == "1205"


def test_statement_timeout_on_mysql_is_refused(make_app: Any, monkeypatch: Any) -> None:
    """MySQL (not MariaDB) bounds only SELECT statements: a block's statement_timeout is
    refused there, naming the argument. (The suite's server is MariaDB: the dialect is
    told otherwise.)"""
    app, txn = make_app()
    with app.app_context():
        txn.engine.connect().close()
        monkeypatch.setattr(txn.engine.dialect, "is_mariadb", False)
        with (
            pytest.raises(ConfigError, match=r"'statement_timeout' is 0\.5, but MySQL has no"),
            atomic(statement_timeout=0.5),
        ):
            raise AssertionError("must not run")


@pytest.fixture
def bank_database(database_url: str) -> Iterator[sa.URL]:
    """A database of its own on the suite's MariaDB, for the bank's load run: no other
    test's accounts, ledger or idempotency keys."""
    with new_database(database_url, "flask_txn_bank") as url:
        yield url


@pytest.mark.parametrize("endpoint", ["/transfers", "/transfers/locked"])
def test_the_bank_load_reconciles_on_mariadb(
    bank_database: sa.URL, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/bank/load.py, 8 clients and copies of keys, against the bank on MariaDB:
    every check of the script passes (the balances reconcile with the ledger, the total
    never changes, no key applied twice)."""
    assert_load_reconciles(bank_database.render_as_string(hide_password=False), endpoint, capsys)


@pytest.mark.parametrize("code", ["1213", "1020"])
def test_txn_faults_injects_mariadb_errors(
    make_app: Any, txn_faults: testing.Faults, code: str
) -> None:
    """The pytest plugin's txn_faults has MariaDB raise each retriable error for real (SIGNAL):
    the driver's own exception, retried once, then committed."""
    app, txn = make_app(TXN_RETRY_SLEEP=lambda _: None)
    payloads: list[Any] = []

    def retrying(_: Any, **payload: Any) -> None:
        payloads.append((type(payload["error"].orig).__module__, payload["sqlstate"]))

    @atomic
    def add() -> None:
        txn.session.add(Item(id=1))

    txn_faults.fail_next(1, code=code)
    with transaction_retrying.connected_to(retrying), app.app_context():
        add()
    assert [code for _, code in payloads] == [code]
    assert payloads[0][0].split(".")[0] in ("pymysql", "MySQLdb")
    assert values(app, txn) == {1: 0}
