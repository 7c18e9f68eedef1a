"""``flask txn check``: what it reports on real databases, each warning, exit statuses."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import Result
from flask import Flask

from flask_txn import FlaskTxn

from . import pgbouncer, tcpproxy

#: A password that must never appear in the output.
PASSWORD = "s3cret-Pw"
#: A PostgreSQL URL nothing listens at (port 1 on loopback is closed), with a password.
CLOSED = f"postgresql+psycopg2://app:{PASSWORD}@127.0.0.1:1/app"

Check = Callable[..., Result]


@pytest.fixture
def run_check() -> Iterator[Check]:
    """Run ``flask txn check [args]`` on a new app on ``url`` with ``config``."""
    apps: list[tuple[Flask, FlaskTxn]] = []

    def run(url: str, *args: str, **config: Any) -> Result:
        app = Flask(f"cli{len(apps)}")
        app.config.update(TXN_DATABASE_URI=url, **config)
        txn = FlaskTxn(app)
        apps.append((app, txn))
        return app.test_cli_runner().invoke(args=["txn", "check", *args])

    yield run
    for app, txn in apps:
        state = txn._states[app]
        pool = state.engine.pool
        if isinstance(pool, sa.pool.QueuePool):
            assert pool.checkedout() == 0, "the check leaked a connection"
        state.engine.dispose()
        if state.async_database is not None:
            state.async_database.close()


def _report(result: Result) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _warnings(result: Result) -> set[str]:
    return {warning["id"] for warning in _report(result)["warnings"]}


def test_the_group_is_registered_by_init_app(sqlite_url: str) -> None:
    """``flask txn --help`` lists its commands on any app the extension was registered with."""
    app = Flask("registered")
    app.config["TXN_DATABASE_URI"] = sqlite_url
    FlaskTxn(app)
    result = app.test_cli_runner().invoke(args=["txn", "--help"])
    assert result.exit_code == 0
    commands = [
        line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line
    ]
    assert commands == ["check", "purge-idempotency-keys"]


def test_report_on_postgresql(run_check: Check, postgresql_url: str) -> None:
    """On PostgreSQL: server and version, driver, default isolation, no pooler, pool, cores."""
    result = run_check(postgresql_url, TXN_RETRY_DEADLINE=5)
    assert result.exit_code == 0, result.output
    facts = dict(line.split("  ", 1) for line in result.stdout.splitlines()[:-1])
    facts = {name.strip(): value.strip() for name, value in facts.items()}
    url = sa.make_url(postgresql_url)
    assert facts["database"] == url.render_as_string(hide_password=True)
    assert facts["driver"].startswith("psycopg2 2.")
    assert facts["server"].startswith("PostgreSQL 1")
    assert facts["isolation"] == "READ COMMITTED (the database's default)"
    assert facts["pooler"].startswith(f"none seen (the server listens on the URL's port {url.port}")
    assert facts["pool"] == "QueuePool: 5 + 10 overflow = 15 connections per process"
    assert facts["cores"] == f"{os.cpu_count()} (the database runs on this machine)"
    assert facts["retries"] == "5 (waits from 0.02 s doubling to 1 s, deadline 5 s)"
    assert facts["timeouts"] == "connect 10 s, tcp 30 s, statement 5 s, read 6 s, pool 5 s"
    assert facts["async"] == "none"
    assert result.stdout.splitlines()[-1] == "ok: the database answers; 0 warnings."


def test_report_on_sqlite(run_check: Check, sqlite_url: str) -> None:
    """On SQLite: its version, SERIALIZABLE, the journal mode; no pooler, no libpq timeouts."""
    result = run_check(sqlite_url, "--json", TXN_ISOLATION_LEVEL="read uncommitted")
    assert result.exit_code == 0, result.output
    report = _report(result)
    facts = report["facts"]
    assert (report["ok"], report["problem"]) == (True, None)
    assert facts["server"] == f"SQLite {sqlite3.sqlite_version}"
    assert facts["isolation"] == "READ UNCOMMITTED (from 'TXN_ISOLATION_LEVEL')"
    assert facts["journal mode"] == "delete"
    assert "pooler" not in facts
    assert facts["timeouts"].startswith("connect n/a, tcp n/a, statement none, read none")


def test_report_through_a_proxy_sees_something_in_between(
    run_check: Check, postgresql_url: str
) -> None:
    """A TCP proxy in front of PostgreSQL: the URL's port is not the server's, so it is said."""
    url = sa.make_url(postgresql_url)
    with tcpproxy.running(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        result = run_check(proxied, "--json")
    assert result.exit_code == 0, result.output
    assert _report(result)["facts"]["pooler"] == (
        f"likely (the URL connects to port {proxy.port}, the server listens on {url.port}):"
        " a pooler such as PgBouncer, a proxy or a port mapping is in between"
    )


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_unreachable_database_fails_with_the_password_hidden(
    run_check: Check, as_json: bool
) -> None:
    """A closed port: exit status 1, the driver's error, and the password nowhere."""
    result = run_check(CLOSED, *(["--json"] if as_json else []))
    assert result.exit_code == 1
    assert PASSWORD not in result.output
    problem = _report(result)["problem"] if as_json else result.stderr
    assert "Cannot connect to postgresql+psycopg2://app:***@127.0.0.1:1/app:" in problem
    assert "Connection refused" in problem
    if as_json:
        assert _report(result)["ok"] is False
        assert _report(result)["facts"]["cores"] == "unknown (the database cannot be reached)"


def test_unreachable_async_database_fails_with_the_password_hidden(
    run_check: Check, postgresql_url: str
) -> None:
    """The sync database answers, the async one does not: exit status 1, password hidden."""
    async_url = CLOSED.replace("psycopg2", "asyncpg")
    result = run_check(postgresql_url, "--json", TXN_ASYNC_DATABASE_URI=async_url)
    assert result.exit_code == 1
    assert PASSWORD not in result.output
    report = _report(result)
    assert report["problem"].startswith(
        "Cannot connect to postgresql+asyncpg://app:***@127.0.0.1:1/app:"
    )
    assert (
        report["facts"]["async"] == "postgresql+asyncpg://app:***@127.0.0.1:1/app, cannot connect"
    )


def test_async_engine_is_connected_and_reported(run_check: Check, postgresql_url: str) -> None:
    """A psycopg 3 URL serves async views too: the check connects its async engine."""
    url = postgresql_url.replace("+psycopg2", "+psycopg")
    result = run_check(url, "--json", TXN_RETRY_DEADLINE=5)
    assert result.exit_code == 0, result.output
    assert _report(result)["facts"]["async"] == (
        f"{sa.make_url(url).render_as_string(hide_password=True)}, connected;"
        " LoopFreeQueuePool: 5 + 10 overflow = 15 connections per process"
    )


def test_async_url_without_asyncio_support_is_reported(
    run_check: Check, postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A psycopg 3 URL without SQLAlchemy's asyncio support: the async line says so."""
    # What a missing greenlet does: importing SQLAlchemy's asyncio package fails.
    monkeypatch.setitem(sys.modules, "sqlalchemy.ext.asyncio", None)
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    result = run_check(url.render_as_string(hide_password=False), "--json")
    assert result.exit_code == 0, result.output
    assert _report(result)["facts"]["async"] == (
        f"{url.render_as_string(hide_password=True)} (asyncio support not installed)"
    )


#: Database cores on this machine, where the tests' PostgreSQL runs.
CORES = os.cpu_count() or 1
SERIALIZABLE = {"TXN_ISOLATION_LEVEL": "SERIALIZABLE", "TXN_RETRY_DEADLINE": 5}
#: Admission control off: the pool alone bounds the transactions at once.
UNADMITTED = {"TXN_ADMISSION": False}


def _pool(size: int) -> dict[str, Any]:
    return {"TXN_ENGINE_OPTIONS": {"pool_size": size, "max_overflow": 0}}


@dataclasses.dataclass(frozen=True)
class Case:
    """Settings on a database, and exactly the warnings they raise."""

    id: str
    database: str  # "postgresql", "sqlite" (a file) or "memory"
    config: dict[str, Any]
    warnings: set[str]
    wal: bool = False  # put the SQLite file in WAL mode first


CASES = [
    Case("defaults", "postgresql", {}, {"no-time-limit"}),
    Case("deadline", "postgresql", {"TXN_RETRY_DEADLINE": 5}, set()),
    Case("statement-timeout", "postgresql", {"TXN_STATEMENT_TIMEOUT": 5}, set()),
    Case(
        "retries-off-serializable",
        "postgresql",
        {**SERIALIZABLE, **_pool(1), "TXN_RETRIES": 0},
        {"retries-off"},
    ),
    Case(
        "retries-off-read-committed",
        "postgresql",
        {"TXN_RETRIES": 0, "TXN_RETRY_DEADLINE": 5},
        set(),
    ),
    Case(
        "pool-above-cores",
        "postgresql",
        {**SERIALIZABLE, **_pool(2 * CORES + 1), **UNADMITTED},
        {"pool-above-cores"},
    ),
    Case(
        "pool-above-cores-admitted",
        "postgresql",
        {**SERIALIZABLE, **_pool(2 * CORES + 1)},
        set(),
    ),
    Case(
        "pool-twice-cores",
        "postgresql",
        {**SERIALIZABLE, **_pool(2 * CORES), **UNADMITTED},
        set(),
    ),
    Case(
        "pool-unbounded",
        "postgresql",
        {
            **SERIALIZABLE,
            "TXN_ENGINE_OPTIONS": {"poolclass": sa.pool.NullPool},
            **UNADMITTED,
        },
        {"pool-above-cores"},
    ),
    Case(
        "pool-large-read-committed",
        "postgresql",
        {"TXN_RETRY_DEADLINE": 5, **_pool(2 * CORES + 1)},
        set(),
    ),
    Case("sqlite-defaults", "sqlite", {}, {"sqlite-journal"}),
    Case("sqlite-wal", "sqlite", {}, set(), wal=True),
    Case(
        "sqlite-one-connection",
        "sqlite",
        {"TXN_ENGINE_OPTIONS": {"poolclass": sa.pool.StaticPool}},
        set(),
    ),
    Case("sqlite-retries-off", "sqlite", {"TXN_RETRIES": 0}, {"retries-off"}, wal=True),
    Case(
        "sqlite-retries-off-read-uncommitted",
        "sqlite",
        {"TXN_RETRIES": 0, "TXN_ISOLATION_LEVEL": "READ UNCOMMITTED"},
        set(),
        wal=True,
    ),
    Case("sqlite-memory", "memory", {}, {"sqlite-memory"}),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_each_warning_fires_on_its_combination_only(
    run_check: Check, request: pytest.FixtureRequest, case: Case
) -> None:
    """The settings raise exactly the warnings listed for them, and the check still passes."""
    if case.database == "memory":
        url = "sqlite://"
    else:
        url = str(request.getfixturevalue(f"{case.database}_url"))
    if case.wal:
        with sqlite3.connect(sa.make_url(url).database or "") as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    result = run_check(url, "--json", **case.config)
    assert result.exit_code == 0, result.output
    assert _warnings(result) == case.warnings


def test_warnings_are_printed_with_their_id_and_docs(run_check: Check, sqlite_url: str) -> None:
    """A warning's line names it, says why, and where the docs explain it."""
    result = run_check(sqlite_url, TXN_RETRIES=0)
    assert result.exit_code == 0
    assert (
        "warning [retries-off]: 'TXN_RETRIES' is 0 under SERIALIZABLE: every serialization"
        " failure (or busy SQLite database) reaches the user as an error. Set 'TXN_RETRIES' to 3"
        " or more. See docs/retries.md, 'What is retried'."
    ) in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1] == "ok: the database answers; 2 warnings."


def test_strict_fails_on_a_warning(run_check: Check, sqlite_url: str) -> None:
    """With --strict, a warning makes the exit status 1; without one, it is 0."""
    warned = run_check(sqlite_url, "--strict")
    assert (warned.exit_code, warned.stderr) == (
        1,
        "failed: 1 warning, and --strict fails on any.\n",
    )
    quiet = run_check(
        sqlite_url, "--strict", "--json", TXN_ENGINE_OPTIONS={"poolclass": sa.pool.StaticPool}
    )
    assert (quiet.exit_code, _report(quiet)["ok"]) == (0, True)
    strict_json = run_check(sqlite_url, "--strict", "--json")
    assert (strict_json.exit_code, _report(strict_json)["ok"]) == (1, False)


def test_unknown_option_is_a_usage_error(run_check: Check, sqlite_url: str) -> None:
    """Click's convention: a usage error exits with status 2, naming the option."""
    result = run_check(sqlite_url, "--bogus")
    assert result.exit_code == 2
    assert "No such option '--bogus'" in result.stderr


def test_pgbouncer_is_seen(run_check: Check, postgresql_url: str) -> None:
    """Through PgBouncer, with nothing sent as a startup parameter: seen, and the check passes."""
    with pgbouncer.running(sa.make_url(postgresql_url)) as url:
        result = run_check(url.render_as_string(hide_password=False), "--json")
    assert result.exit_code == 0, result.output
    assert _report(result)["facts"]["pooler"].startswith(
        f"likely (the URL connects to port {url.port}"
    )


def test_pgbouncer_gets_the_statement_timeout_per_transaction(
    run_check: Check, postgresql_url: str
) -> None:
    """Through PgBouncer, 'TXN_RETRY_DEADLINE' sends no startup parameter: the check passes."""
    with pgbouncer.running(sa.make_url(postgresql_url)) as url:
        result = run_check(
            url.render_as_string(hide_password=False), "--json", TXN_RETRY_DEADLINE=5
        )
    assert (result.exit_code, _report(result)["warnings"]) == (0, []), result.output


def test_pgbouncer_refusing_the_users_options_fails(run_check: Check, postgresql_url: str) -> None:
    """PgBouncer refuses libpq's 'options' of the user's own: exit status 1, and the problem
    says where it comes from and what to set instead."""
    with pgbouncer.running(sa.make_url(postgresql_url)) as url:
        result = run_check(
            url.render_as_string(hide_password=False),
            TXN_ENGINE_OPTIONS={"connect_args": {"options": "-c lock_timeout=1000"}},
        )
    assert result.exit_code == 1
    assert "FATAL: unsupported startup parameter: options. A pooler (PgBouncer) refused" in (
        result.stderr
    )
    assert "so it is in your 'options' (URL or 'connect_args'). Remove it" in result.stderr


@pytest.mark.parametrize(
    ("url_fixture", "driver"), [("mariadb_url", "pymysql 1."), ("mysqlclient_url", "mysqldb 2.")]
)
def test_report_on_mariadb(
    run_check: Check, request: pytest.FixtureRequest, url_fixture: str, driver: str
) -> None:
    """On MariaDB: the driver's own version (PyMySQL's __version__ is mysqlclient's),
    named MariaDB (not MySQL), REPEATABLE READ by default."""
    result = run_check(request.getfixturevalue(url_fixture), TXN_RETRY_DEADLINE=5)
    assert result.exit_code == 0, result.output
    facts = dict(line.split("  ", 1) for line in result.stdout.splitlines()[:-1])
    facts = {name.strip(): value.strip() for name, value in facts.items()}
    assert facts["driver"].startswith(driver)
    assert facts["server"].startswith("MariaDB 10.")
    assert facts["isolation"] == "REPEATABLE READ (the database's default)"
    assert result.stdout.splitlines()[-1].startswith("ok: the database answers")
