"""Read replicas on a real primary and streaming standby (tests/replica.py): routing,
read-your-writes under paused replay, the lag bound, a standby going down and coming
back, and failover to a promoted standby."""

from __future__ import annotations

import logging
import math
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from examples.bank.app import create_app
from examples.bank.models import txn as bank_txn
from flask_txn import ConfigError, FlaskTxn, _replicas, atomic, transaction_committed

from . import pgbouncer, replica
from .conftest import Attempts, Base, Item
from .pgserver import free_port


@pytest.fixture(scope="session")
def pair() -> Iterator[tuple[Any, replica.Standby]]:
    """One primary and its standby for the whole session (the failover test makes its own)."""
    with replica.running_pair() as servers:
        yield servers


@pytest.fixture
def standby_engine(pair: tuple[Any, replica.Standby]) -> Iterator[sa.Engine]:
    """A plain engine on the standby, to pause and resume its replay; replay runs again after."""
    engine = sa.create_engine(pair[1].url)
    yield engine
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT pg_wal_replay_resume()")
    engine.dispose()


class Servers:
    """The server each committed block ran on, from the signal's ``server`` key."""

    def __init__(self, app: Flask) -> None:
        self.seen: list[str] = []
        transaction_committed.connect(self.receive, sender=app, weak=False)
        self.app = app

    def receive(self, _sender: Any, **payload: Any) -> None:
        self.seen.append(payload["server"])

    def close(self) -> None:
        transaction_committed.disconnect(self.receive, sender=self.app)


def make(primary_url: str, standby_url: str, **config: Any) -> tuple[Flask, FlaskTxn, Servers]:
    """An app on the primary with the standby configured; fresh tables, replayed."""
    app = Flask("replicas")
    app.config.update(
        {
            "TESTING": True,
            "TXN_DATABASE_URI": primary_url,
            "TXN_REPLICA_URIS": [standby_url],
            "TXN_REPLICA_CHECK_INTERVAL": 0,
            **config,
        }
    )
    txn = FlaskTxn(app)
    with app.app_context():
        Base.metadata.drop_all(txn.engine)
        Base.metadata.create_all(txn.engine)
        replica.wait_for_replay(sa.create_engine(standby_url, poolclass=sa.NullPool), lsn(txn))

    @app.get("/count")
    @atomic(replica=True)
    def count() -> dict[str, Any]:
        return {"count": txn.session.scalar(sa.select(sa.func.count()).select_from(Item))}

    @app.post("/write")
    @atomic
    def write() -> dict[str, Any]:
        txn.session.add(Item(name="w"))
        return {}

    @app.post("/write-then-count")
    def write_then_count() -> dict[str, Any]:
        with atomic():
            txn.session.add(Item(name="w"))
        with atomic(replica=True):
            return {"count": txn.session.scalar(sa.select(sa.func.count()).select_from(Item))}

    @app.post("/raw-write-then-count")
    def raw_write_then_count() -> dict[str, Any]:
        with atomic() as session:
            session.execute(sa.text("INSERT INTO item (name, value) VALUES ('raw', 0)"))
        with atomic(replica=True) as session:
            return {"count": session.scalar(sa.select(sa.func.count()).select_from(Item))}

    return app, txn, Servers(app)


def lsn(txn: FlaskTxn) -> str:
    """The primary's WAL insert position now."""
    return replica.primary_lsn(txn.engine)


@pytest.fixture
def routed(pair: tuple[Any, replica.Standby]) -> Iterator[Any]:
    """Make apps on the pair; dispose of their engines and receivers after the test."""
    made: list[tuple[Flask, FlaskTxn, Servers]] = []

    def build(**config: Any) -> tuple[Flask, FlaskTxn, Servers]:
        made.append(make(pair[0].url, pair[1].url, **config))
        return made[-1]

    yield build
    for app, txn, servers in made:
        servers.close()
        with app.app_context():
            assert txn.engine.pool.checkedout() == 0, "a test leaked a connection"
            router(txn).dispose()
            txn.engine.dispose()


def router(txn: FlaskTxn) -> _replicas.Replicas:
    """The app's router (the current app's)."""
    return _replicas._ROUTERS[txn.engine][0]


def _pause(standby: sa.Engine) -> None:
    """Stop replay on the standby, and wait (polling, bounded) until it has stopped."""
    with standby.connect() as connection:
        connection.exec_driver_sql("SELECT pg_wal_replay_pause()")
    replica.wait_until(standby, "SELECT pg_get_wal_replay_pause_state() = 'paused'")


def _resume(standby: sa.Engine) -> None:
    with standby.connect() as connection:
        connection.exec_driver_sql("SELECT pg_wal_replay_resume()")


def test_replica_blocks_read_on_the_standby_and_the_rest_on_the_primary(
    routed: Any, pair: tuple[Any, replica.Standby]
) -> None:
    """replica=True runs on the standby, read-only; blocks that may write, readonly blocks
    without replica=True, and txn.session outside blocks stay on the primary."""
    app, txn, servers = routed()
    in_recovery = sa.text("SELECT pg_is_in_recovery()")
    with app.app_context():
        with atomic(replica=True) as session:
            on_standby = session.scalar(in_recovery)
            readonly = session.scalar(sa.text("SHOW transaction_read_only"))
        with atomic() as session:
            on_primary = session.scalar(in_recovery)
        with atomic(readonly=True) as session:
            readonly_on_primary = session.scalar(in_recovery)
        outside = txn.session.scalar(in_recovery)
        txn.session.rollback()
    assert (on_standby, readonly, on_primary, readonly_on_primary, outside) == (
        True,
        "on",
        False,
        False,
        False,
    )
    assert str(pair[1].port) in servers.seen[0]
    assert servers.seen[1:] == ["primary", "primary"]


def test_a_role_without_monitoring_rights_still_reads_the_standby(
    routed: Any, pair: tuple[Any, replica.Standby]
) -> None:
    """A role that cannot see the WAL receiver's status (no pg_read_all_stats) still finds
    the standby up and streaming, and its replica blocks run there."""
    admin = sa.create_engine(pair[0].url, poolclass=sa.NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql("CREATE ROLE plain LOGIN")
    try:
        plain = pair[1].url.replace("postgres@", "plain@")
        app, _txn, servers = routed(TXN_REPLICA_URIS=[plain])
        with app.app_context(), atomic(replica=True) as session:
            assert session.scalar(sa.text("SELECT pg_is_in_recovery()")) is True
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql("DROP ROLE plain")
    assert servers.seen == [_replicas.hide_password(sa.make_url(plain))]


def test_a_standby_behind_pgbouncer(routed: Any, pair: tuple[Any, replica.Standby]) -> None:
    """PgBouncer in transaction mode in front of the standby: the status check, the block
    and read-your-writes each run in transactions of their own, and the reads go there."""
    with pgbouncer.running(sa.make_url(pair[1].url)) as bouncer:
        through = bouncer.render_as_string(hide_password=False)
        app, _txn, servers = routed(TXN_REPLICA_URIS=[through])
        client = app.test_client()
        assert client.get("/count").json == {"count": 0}
        assert client.post("/write-then-count").json == {"count": 1}
        routed_servers = list(servers.seen)
    assert routed_servers == [_replicas.hide_password(bouncer), "primary", "primary"]


def test_serializable_app_reads_the_standby_in_repeatable_read(routed: Any) -> None:
    """A hot standby refuses SERIALIZABLE: a replica block of a SERIALIZABLE app reads a
    REPEATABLE READ snapshot there; an explicit SERIALIZABLE is refused at once."""
    app, _txn, servers = routed(TXN_ISOLATION_LEVEL="SERIALIZABLE")
    with app.app_context(), atomic(replica=True) as session:
        level = session.scalar(sa.text("SHOW transaction_isolation"))
    assert (level, servers.seen[0] != "primary") == ("repeatable read", True)
    with pytest.raises(ConfigError, match="'replica=True' cannot run isolation='SERIALIZABLE'"):
        atomic(replica=True, isolation="SERIALIZABLE")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param({"replica": "yes"}, "'replica' must be True or False, got 'yes'", id="flag"),
        pytest.param(
            {"replica": True, "readonly": False},
            "'replica=True' runs the block read-only on a standby, but 'readonly=False'",
            id="readonly",
        ),
        pytest.param(
            {"replica": True, "deferrable": True, "readonly": True},
            "'replica=True' cannot run isolation=None, deferrable=True",
            id="deferrable",
        ),
        pytest.param(
            {"max_lag": 1}, "'max_lag=1.0' only applies to a block on a standby", id="no-replica"
        ),
        pytest.param(
            {"replica": True, "max_lag": "1s"},
            "'max_lag' must be a finite number of seconds >= 0, or None for"
            " 'TXN_REPLICA_MAX_LAG', got '1s'",
            id="max-lag",
        ),
    ],
)
def test_bad_replica_arguments_are_refused(arguments: dict[str, Any], message: str) -> None:
    """Each wrong use of replica= and max_lag= fails as atomic() is called, saying the fix."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        atomic(**arguments)


def test_a_request_reads_its_own_write_while_replay_is_paused(
    routed: Any, standby_engine: sa.Engine
) -> None:
    """Replay paused: the request that wrote reads from the primary and sees its row;
    another request reads the standby's older state; once replayed, the standby serves."""
    # Checked once: the request's own write makes the block ask the standby again.
    app, txn, servers = routed(TXN_REPLICA_MAX_LAG=3600, TXN_REPLICA_CHECK_INTERVAL=3600)
    client = app.test_client()
    assert client.get("/count").json == {"count": 0}
    _pause(standby_engine)
    assert client.post("/write-then-count").json == {"count": 1}
    assert servers.seen[1:] == ["primary", "primary"]
    # A write the session cannot see (SQL text): the server's transaction ID tells.
    assert client.post("/raw-write-then-count").json == {"count": 2}
    assert servers.seen[3:] == ["primary", "primary"]
    stale = client.get("/count").json
    assert (stale, servers.seen[-1] != "primary") == ({"count": 0}, True)
    _resume(standby_engine)
    with app.app_context():
        replica.wait_for_replay(standby_engine, lsn(txn))
    assert client.get("/count").json == {"count": 2}
    assert servers.seen[-1] != "primary"


def test_a_connection_lost_before_commit_while_asking_whether_it_wrote_is_retried(
    routed: Any,
) -> None:
    """The question "did this transaction write?" is asked before COMMIT: if its connection
    is lost there, the attempt fails like any lost connection, and is re-run once."""
    app, txn, _servers = routed()
    attempts = Attempts()

    @app.post("/lost")
    @atomic(retries=1, wait_initial=0, wait_max=0)
    def lost() -> dict[str, Any]:
        txn.session.execute(sa.text("INSERT INTO item (name, value) VALUES ('raw', 0)"))
        if attempts.first():
            pid = txn.session.scalar(sa.text("SELECT pg_backend_pid()"))
            with txn.engine.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        return {}

    assert app.test_client().post("/lost").status_code == 200
    with app.app_context(), txn.engine.connect() as connection:
        rows = connection.scalar(sa.select(sa.func.count()).select_from(Item))
    assert (attempts.total, rows) == (2, 1)


def test_an_ambiguous_commit_keeps_the_position_for_the_users_next_reads(
    routed: Any,
) -> None:
    """The connection is lost as COMMIT is sent: the client gets a 502 (the write may have
    committed), and the user's session still carries a WAL position past it, so their next
    reads wait for it as for any write."""
    app, txn, _servers = routed(TXN_REPLICA_READ_YOUR_WRITES="session", SECRET_KEY="k")

    def lose_connection(connection: sa.Connection) -> None:
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with txn.engine.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    client = app.test_client()
    with app.app_context():
        sa.event.listen(txn.engine, "commit", lose_connection)
    try:
        assert client.post("/write").status_code == 502
    finally:
        with app.app_context():
            sa.event.remove(txn.engine, "commit", lose_connection)
    with client.session_transaction() as session:
        assert _replicas.LSN_KEY in session


def test_read_your_writes_off_reads_the_standby_at_once(
    routed: Any, standby_engine: sa.Engine
) -> None:
    """TXN_REPLICA_READ_YOUR_WRITES='off': no WAL position is kept, so the request's read
    goes to the standby, which has not replayed its write."""
    app, _txn, servers = routed(TXN_REPLICA_MAX_LAG=3600, TXN_REPLICA_READ_YOUR_WRITES="off")
    _pause(standby_engine)
    assert app.test_client().post("/write-then-count").json == {"count": 0}
    assert servers.seen[-1] != "primary"


def test_a_standby_being_checked_by_another_thread_keeps_its_status(routed: Any) -> None:
    """One check at a time: while another thread checks a standby, its last status stands."""
    app, txn, _servers = routed()
    with app.app_context():
        standby = router(txn).standbys[0]
        first, fresh = standby.current(0)
        with standby._lock:
            assert standby.current(0) == (first, False)
    assert (first.up, fresh) == (True, True)


def test_a_user_session_reads_its_own_write_in_its_next_request(
    routed: Any, standby_engine: sa.Engine
) -> None:
    """TXN_REPLICA_READ_YOUR_WRITES='session': the writer's next request reads the primary
    until the standby replayed the write; another user reads the standby meanwhile."""
    app, txn, servers = routed(
        TXN_REPLICA_MAX_LAG=3600, TXN_REPLICA_READ_YOUR_WRITES="session", SECRET_KEY="k"
    )
    writer, other = app.test_client(), app.test_client()
    _pause(standby_engine)
    writer.post("/write")
    writer.post("/write")
    assert (writer.get("/count").json, servers.seen[-1]) == ({"count": 2}, "primary")
    assert other.get("/count").json == {"count": 0}
    assert servers.seen[-1] != "primary"
    _resume(standby_engine)
    with app.app_context():
        replica.wait_for_replay(standby_engine, lsn(txn))
    assert writer.get("/count").json == {"count": 2}
    assert servers.seen[-1] != "primary"


def test_a_commit_position_that_cannot_be_read_sends_the_request_to_the_primary(
    routed: Any, pair: tuple[Any, replica.Standby], caplog: pytest.LogCaptureFixture
) -> None:
    """A role that may not read the WAL position: the write commits, a warning says why,
    and the request's later reads go to the primary, where its write is."""
    admin = sa.create_engine(pair[0].url, poolclass=sa.NullPool)
    revoke = "REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC"
    Base.metadata.drop_all(admin)  # the reader makes its own tables
    with admin.begin() as connection:
        connection.exec_driver_sql("CREATE ROLE reader LOGIN")
        connection.exec_driver_sql("GRANT USAGE, CREATE ON SCHEMA public TO reader")
    try:
        app, _txn, servers = routed(TXN_DATABASE_URI=pair[0].url.replace("postgres@", "reader@"))
        with admin.begin() as connection:
            connection.exec_driver_sql(revoke)
        with caplog.at_level(logging.WARNING, "flask_txn"):
            assert app.test_client().post("/write-then-count").json == {"count": 1}
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(revoke.replace("REVOKE", "GRANT").replace("FROM", "TO"))
            connection.exec_driver_sql("DROP OWNED BY reader")
            connection.exec_driver_sql("DROP ROLE reader")
    assert servers.seen == ["primary", "primary"]
    assert "The WAL position after a commit could not be read" in caplog.text


def test_a_standby_behind_max_lag_is_skipped(
    routed: Any, standby_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A standby that received WAL it has not replayed is behind by the age of its last
    replayed transaction: over max_lag, reads go to the primary; under it, to the standby."""
    app, txn, servers = routed(TXN_REPLICA_MAX_LAG=3600)
    _pause(standby_engine)
    with app.app_context():
        # Written outside any block: no read-your-writes position sends reads to the primary.
        with txn.engine.begin() as connection:
            connection.execute(sa.insert(Item).values(name="unreplayed"))
        replica.wait_for_replay(standby_engine, lsn(txn), column="receive")
        with caplog.at_level(logging.INFO, "flask_txn"), atomic(replica=True, max_lag=0) as s:
            strict = s.scalar(sa.select(sa.func.count()).select_from(Item))
        with atomic(replica=True) as session:
            lenient = session.scalar(sa.select(sa.func.count()).select_from(Item))
    assert (strict, lenient) == (1, 0)
    assert servers.seen[0] == "primary"
    assert servers.seen[1] != "primary"
    assert "more than max_lag 0.0 s" in caplog.text


def test_a_recovery_conflict_on_the_standby_is_retried(
    routed: Any, pair: tuple[Any, replica.Standby], caplog: pytest.LogCaptureFixture
) -> None:
    """The primary takes a lock that the standby's open read conflicts with: replaying it,
    the standby ends that read's session (max_standby_streaming_delay = 0), and the block
    is re-run like any other lost connection, on the standby again."""
    app, txn, servers = routed()
    attempts = Attempts()
    settings = sa.create_engine(pair[1].url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)

    def streaming_delay(value: str) -> None:
        """Set the standby's delay (``"30s"``: back to its default) and wait until it is read."""
        change = (
            "SET max_standby_streaming_delay = 0"
            if value == "0"
            else "RESET max_standby_streaming_delay"
        )
        with settings.connect() as connection:
            connection.exec_driver_sql(f"ALTER SYSTEM {change}")
            connection.exec_driver_sql("SELECT pg_reload_conf()")
        replica.wait_until(
            settings, f"SELECT current_setting('max_standby_streaming_delay') = '{value}'"
        )

    @app.get("/conflict")
    @atomic(replica=True, retries=1, wait_initial=0, wait_max=0)
    def conflict() -> dict[str, Any]:
        count = txn.session.scalar(sa.select(sa.func.count()).select_from(Item))
        if attempts.first():
            with txn.engine.begin() as connection:
                connection.exec_driver_sql("LOCK TABLE item IN ACCESS EXCLUSIVE MODE")
            replica.wait_for_replay(settings, lsn(txn))
            count = txn.session.scalar(sa.select(sa.func.count()).select_from(Item))
        return {"count": count}

    streaming_delay("0")
    try:
        with caplog.at_level(logging.INFO, "flask_txn"):
            assert app.test_client().get("/conflict").json == {"count": 0}
    finally:
        streaming_delay("30s")
    assert (attempts.total, servers.seen[-1] != "primary") == (2, True)
    assert f"on standby {servers.seen[-1]}" in caplog.text


def test_a_standby_that_goes_down_is_left_out_and_comes_back(
    routed: Any, pair: tuple[Any, replica.Standby], caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped standby: reads answer 200 from the primary; started again, it serves again."""
    app, _txn, servers = routed()
    client = app.test_client()
    standby = pair[1]
    standby.stop_fast()
    try:
        with caplog.at_level(logging.INFO, "flask_txn"):
            response = client.get("/count")
            assert (response.status_code, servers.seen[-1]) == (200, "primary")
    finally:
        standby.start_streaming()
    with caplog.at_level(logging.INFO, "flask_txn"):
        assert client.get("/count").status_code == 200
    assert servers.seen[-1] != "primary"
    assert "is out of rotation: down" in caplog.text
    assert "is back in rotation" in caplog.text


def test_a_standby_lost_between_checks_falls_back_as_the_block_begins(
    routed: Any, pair: tuple[Any, replica.Standby]
) -> None:
    """Checked healthy an hour ago: a standby that refuses the block's connection is taken
    out, and the same block begins on the primary, with no error."""
    app, _txn, servers = routed(TXN_REPLICA_CHECK_INTERVAL=3600)
    client = app.test_client()
    assert client.get("/count").status_code == 200
    assert servers.seen[-1] != "primary"
    pair[1].stop_fast()
    try:
        assert client.get("/count").status_code == 200
        assert client.get("/count").status_code == 200
    finally:
        pair[1].start_streaming()
    assert servers.seen[-2:] == ["primary", "primary"]


def test_async_replica_blocks(
    routed: Any, pair: tuple[Any, replica.Standby], standby_engine: sa.Engine
) -> None:
    """Async blocks route the same way, on psycopg 3's async engine for the standby."""
    async_url = sa.make_url(pair[0].url).set(drivername="postgresql+psycopg")
    app, txn, servers = routed(
        TXN_REPLICA_MAX_LAG=3600,
        TXN_ASYNC_DATABASE_URI=async_url.render_as_string(hide_password=False),
    )
    query = sa.select(sa.func.count()).select_from(Item), sa.text("SELECT pg_is_in_recovery()")

    @app.get("/async-count")
    @atomic(replica=True)
    async def async_count() -> dict[str, Any]:
        session = txn.async_session
        return {"count": await session.scalar(query[0]), "standby": await session.scalar(query[1])}

    @app.post("/async-write-then-count")
    async def async_write_then_count() -> dict[str, Any]:
        async with atomic() as session:
            session.add(Item(name="async"))
        async with atomic(replica=True) as session:
            return {
                "count": await session.scalar(query[0]),
                "standby": await session.scalar(query[1]),
            }

    client = app.test_client()
    _pause(standby_engine)
    try:
        assert client.post("/async-write-then-count").json == {"count": 1, "standby": False}
        assert client.get("/async-count").json == {"count": 0, "standby": True}
        assert client.get("/async-count").json == {"count": 0, "standby": True}
    finally:
        _resume(standby_engine)
    assert servers.seen[:2] == ["primary", "primary"]
    assert servers.seen[2:] == [servers.seen[2]] * 2 != ["primary"] * 2
    database = txn._states[app].async_database
    assert database is not None
    database.close()


def test_failover_to_a_promoted_standby(tmp_path: Any) -> None:
    """The primary stops inside a write and the standby is promoted: the write is re-run on
    the new primary (a multi-host URL with target_session_attrs=read-write), commits once,
    and the app keeps serving reads and writes without a restart."""
    attempts = Attempts()
    lost: list[_replicas.Status] = []
    with replica.running_pair() as (primary, standby):
        hosts = f"host=127.0.0.1:{primary.port}&host=127.0.0.1:{standby.port}"
        app, txn, servers = make(
            f"postgresql+psycopg2://postgres@/postgres?{hosts}&target_session_attrs=read-write",
            standby.url,
        )

        @app.post("/failover-write")
        @atomic
        def failover_write() -> dict[str, Any]:
            txn.session.add(Item(name="before"))
            txn.session.flush()
            if attempts.first():
                primary.stop()
                lost.append(_until_not_streaming(router(txn).standbys[0]))
                standby.promote()
            txn.session.add(Item(name="after"))
            return {}

        def _until_not_streaming(standby: _replicas.Standby) -> _replicas.Status:
            """Poll (bounded, no sleep) until the standby notices its primary is gone."""
            for _ in range(replica.POLLS):
                status, _fresh = standby.current(0)
                if status.why:
                    return status
            raise AssertionError("the standby kept streaming from a stopped primary")

        client = app.test_client()
        try:
            assert client.post("/failover-write").status_code == 200
            assert client.get("/count").json == {"count": 2}
            assert str(standby.port) in servers.seen[-1]  # promoted, it still serves reads
            assert client.post("/write").status_code == 200
            assert client.get("/count").json == {"count": 3}
        finally:
            servers.close()
            with app.app_context():
                router(txn).dispose()
                txn.engine.dispose()
    assert attempts.total == 2
    assert (lost[0].up, lost[0].lag, lost[0].why) == (
        True,
        math.inf,
        "not streaming from a primary",
    )


def test_the_bank_reads_balances_on_the_standby_and_shows_a_users_own_transfer(
    pair: tuple[Any, replica.Standby], standby_engine: sa.Engine
) -> None:
    """The bank with a standby: with replay paused, the user who made a transfer sees it on
    their next balance page (read on the primary, by their session cookie), another user
    reads the standby's older balances; once replayed, both read the standby."""
    app = create_app(
        pair[0].url,
        TESTING=True,
        BANK_RESET=True,
        BANK_ACCOUNTS=2,
        BANK_OPENING_BALANCE=1_000,
        TXN_REPLICA_URIS=[pair[1].url],
        TXN_REPLICA_CHECK_INTERVAL=0,
        TXN_REPLICA_MAX_LAG=3600,
    )
    user, other = app.test_client(), app.test_client()
    servers = Servers(app)
    with app.app_context():
        replica.wait_for_replay(standby_engine, replica.primary_lsn(bank_txn.engine))

    def balances(client: Any) -> tuple[list[int], str]:
        page = client.get("/stats").json
        return [account["balance"] for account in page["accounts"]], servers.seen[-1]

    try:
        assert balances(user)[0] == [1_000, 1_000]
        _pause(standby_engine)
        transfer = {"from": 1, "to": 2, "amount": 300}
        headers = {"Idempotency-Key": "replica-1"}
        assert user.post("/transfers", json=transfer, headers=headers).status_code == 201
        assert balances(user) == ([700, 1_300], "primary")
        stale, server = balances(other)
        assert (stale, str(pair[1].port) in server) == ([1_000, 1_000], True)
        _resume(standby_engine)
        with app.app_context():
            replica.wait_for_replay(standby_engine, replica.primary_lsn(bank_txn.engine))
        for client in (user, other):
            fresh, server = balances(client)
            assert (fresh, str(pair[1].port) in server) == ([700, 1_300], True)
    finally:
        servers.close()
        with app.app_context():
            router(bank_txn).dispose()
            bank_txn.engine.dispose()
    assert app.extensions["bank"].reads["primary"] == 1


def test_no_standby_password_in_signals_logs_or_errors(
    routed: Any, pair: tuple[Any, replica.Standby], caplog: pytest.LogCaptureFixture
) -> None:
    """A standby's password never shows: not in the signals' server, the logs (a standby
    that is down too), nor the error for a bad TXN_REPLICA_URIS."""
    secret = urllib.parse.quote("s3cr:et/P@ss", safe="")
    standby = pair[1].url.replace("postgres@", f"postgres:{secret}@")
    nowhere = f"postgresql+psycopg2://postgres:{secret}@127.0.0.1:{free_port()}/postgres"
    with caplog.at_level(logging.INFO, "flask_txn"):
        app, _txn, servers = routed(TXN_REPLICA_URIS=[nowhere, standby])
        with app.app_context():
            for _ in range(2):  # each standby first, in turn
                with atomic(replica=True) as session:
                    session.scalar(sa.text("SELECT 1"))
        with pytest.raises(ConfigError) as raised:
            make(pair[0].url, standby, TXN_REPLICA_URIS=standby)
    shown = [*servers.seen, caplog.text, str(raised.value)]
    assert [text for text in shown if secret in text or "P@ss" in text] == []
    assert servers.seen == [_replicas.hide_password(sa.make_url(standby))] * 2
    assert "is out of rotation: down" in caplog.text
