"""What ``flask txn check`` finds: the app's database as the app sees it, and risky settings.

:func:`check` connects with the app's own engine, reads what the server says of
itself, and sets it beside the validated settings. Each warning names the
settings that make the combination risky and the docs section that explains
it; a connection that cannot be made is the one problem. Every text that could
hold the database URL passes through :func:`hide_password`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
from typing import Any

from sqlalchemy import pool, text
from sqlalchemy.engine import URL, Connection, Engine

from ._config import Settings, hide_password
from ._engine import async_url
from ._state import AppState
from ._timeouts import uses_libpq

#: Warnings about the pool's size fire above this many connections per database core.
CONNECTIONS_PER_CORE = 2
_SERVER_NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite", "mysql": "MySQL"}
_SQLALCHEMY_DEFAULT = "SQLAlchemy's default"


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One risky combination of settings: an id, what is risky and why, where the docs say more."""

    id: str
    message: str
    see: str


@dataclasses.dataclass(slots=True)
class Report:
    """What the check found: facts by name, warnings, and the problem that fails it, if any."""

    facts: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: list[Finding] = dataclasses.field(default_factory=list)
    problem: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Server:
    """What the database says of itself over one connection."""

    version: str
    #: the isolation level of a transaction that sets none, upper case
    default_isolation: str
    #: True: on this machine; False: elsewhere; None: cannot tell
    local: bool | None
    #: PostgreSQL: the port the server listens on
    port: int | None = None
    #: SQLite: the journal mode
    journal_mode: str | None = None


def check(state: AppState) -> Report:
    """Connect with the app's engines; report what they find, and what is risky.

    :param state: the app's flask-txn state.
    """
    settings, engine = state.settings, state.engine
    report = Report()
    report.facts["database"] = hide_password(settings.url)
    report.facts["driver"] = _driver(engine)
    server: _Server | None = None
    try:
        connection = engine.connect()
    except Exception as exc:  # whatever stops the app connecting is the problem to report
        report.problem = _cannot_connect(settings.url, exc)
    else:
        with connection:
            server = _server(connection)
    if server is not None:
        report.facts["server"] = f"{_server_name(engine)} {server.version}"
        given = "from 'TXN_ISOLATION_LEVEL'" if settings.isolation else "the database's default"
        report.facts["isolation"] = f"{_isolation(settings, server)} ({given})"
        if server.journal_mode is not None:
            report.facts["journal mode"] = server.journal_mode
        if server.port is not None:
            report.facts["pooler"] = _pooler(settings.url, server.port)
    limit, report.facts["pool"] = _pool(engine.pool)
    cores = os.cpu_count() if server is not None and server.local else None
    if cores:
        report.facts["cores"] = f"{cores} (the database runs on this machine)"
    else:
        where = "cannot be reached" if server is None else "is elsewhere, or does not say"
        report.facts["cores"] = f"unknown (the database {where})"
    report.facts["retries"] = _retries(settings)
    report.facts["timeouts"] = _timeouts(settings)
    if server is not None:
        report.warnings += _warnings(settings, engine, server, limit, cores)
    report.facts["async"] = _async(state, report)
    return report


def _isolation(settings: Settings, server: _Server) -> str:
    """The isolation level of an atomic block that sets none."""
    return settings.isolation or server.default_isolation


def _driver(engine: Engine) -> str:
    dbapi: Any = engine.dialect.dbapi
    # PyMySQL's __version__ is the mysqlclient version it stands in for.
    version = getattr(dbapi, "VERSION_STRING", None) or getattr(dbapi, "__version__", "")
    if not version and hasattr(dbapi, "version_info"):  # mysqlclient
        version = ".".join(str(part) for part in dbapi.version_info[:3])
    return f"{engine.dialect.driver} {str(version).split(' ')[0]}".strip()


def _server_name(engine: Engine) -> str:
    dialect = engine.dialect
    mariadb = getattr(dialect, "is_mariadb", False)
    return "MariaDB" if mariadb else _SERVER_NAMES.get(dialect.name, dialect.name)


def _server(connection: Connection) -> _Server:
    """Ask the database for its version, default isolation and what matters for this dialect."""
    dialect = connection.dialect
    version = ".".join(str(part) for part in dialect.server_version_info or ())
    isolation = str(connection.default_isolation_level or "unknown").upper()
    if dialect.name == "sqlite":
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        return _Server(version, isolation, local=True, journal_mode=str(mode))
    if dialect.name == "postgresql":
        # inet_server_addr() is NULL over a Unix socket: the server is on this machine.
        # Through a pooler it is the address the pooler reached the server at.
        address, port = connection.execute(
            text("SELECT inet_server_addr()::text, current_setting('port')::int")
        ).one()
        local = address is None or ipaddress.ip_interface(address).is_loopback
        return _Server(version, isolation, local, port=port)
    # Other servers do not say where they run: the URL's host may be an alias.
    return _Server(version, isolation, local=None)


def _cannot_connect(url: URL, exc: Exception) -> str:
    """The connection error, the URL's password hidden, with a hint for PgBouncer's refusal."""
    # One line, for a pipeline's log: libpq's messages span several.
    error = " ".join(str(getattr(exc, "orig", None) or exc).split())
    if url.password:
        error = error.replace(str(url.password), "***")
    message = f"Cannot connect to {hide_password(url)}: {hide_password(error)}"
    if "unsupported startup parameter" in error:
        message = message.rstrip(".") + (
            ". A pooler (PgBouncer) refused a libpq startup parameter: flask-txn sends"
            " none (its statement timeout is set per transaction), so it is in your"
            " 'options' (URL or 'connect_args'). Remove it, and set 'TXN_STATEMENT_TIMEOUT'"
            " or the setting on the database role instead."
        )
    return message


def _pool(pool_: pool.Pool) -> tuple[int | None, str]:
    """The most connections the pool opens per process (None: no limit), and its description."""
    name = type(pool_).__name__
    if isinstance(pool_, pool.QueuePool):
        # No public accessor: SQLAlchemy keeps create_engine's max_overflow here.
        overflow = max(0, int(getattr(pool_, "_max_overflow", 0)))
        size = pool_.size()
        limit = size + overflow
        return limit, f"{name}: {size} + {overflow} overflow = {limit} connections per process"
    if isinstance(pool_, pool.NullPool):
        return None, f"{name}: a new connection per checkout, no limit"
    if isinstance(pool_, pool.SingletonThreadPool):
        return None, f"{name}: one connection per thread"
    return 1, f"{name}: one connection"


def _seconds(value: float | None, none: str = "none") -> str:
    return none if value is None else f"{value:g} s"


def _retries(settings: Settings) -> str:
    retry = settings.retry
    return (
        f"{retry.retries} (waits from {_seconds(retry.wait_initial)} doubling to"
        f" {_seconds(retry.wait_max)}, deadline {_seconds(retry.deadline)})"
    )


def _timeouts(settings: Settings) -> str:
    timeouts = settings.timeouts
    libpq = uses_libpq(settings.url)
    parts = [
        f"connect {_seconds(timeouts.connect) if libpq else 'n/a'}",
        f"tcp {_seconds(timeouts.tcp) if libpq else 'n/a'}",
        f"statement {_seconds(timeouts.statement)}",
        f"read {_seconds(timeouts.read)}",
        f"pool {_seconds(timeouts.pool, _SQLALCHEMY_DEFAULT)}",
    ]
    return ", ".join(parts)


def _pooler(url: URL, server_port: int) -> str:
    url_port = url.port or 5432
    if url_port == server_port:
        return (
            f"none seen (the server listens on the URL's port {server_port}; a pooler on"
            " that same port would not show)"
        )
    return (
        f"likely (the URL connects to port {url_port}, the server listens on {server_port}):"
        " a pooler such as PgBouncer, a proxy or a port mapping is in between"
    )


def _async(state: AppState, report: Report) -> str:
    """The async engine, connected once; a failure is the report's problem if it has none."""
    database = state.async_database
    if database is None:
        url = async_url(state.settings)
        return "none" if url is None else f"{hide_password(url)} (asyncio support not installed)"
    url = database.engine.url
    try:
        # The CLI runs no event loop: the first connection is made as a view's would be.
        asyncio.run(database.connected())
    except Exception as exc:
        report.problem = report.problem or _cannot_connect(url, exc)
        return f"{hide_password(url)}, cannot connect"
    _, pool_text = _pool(database.sync_engine.pool)
    return f"{hide_password(url)}, connected; {pool_text}"


def _warnings(
    settings: Settings,
    engine: Engine,
    server: _Server,
    limit: int | None,
    cores: int | None,
) -> list[Finding]:
    """The risky combinations of these settings on this server."""
    found: list[Finding] = []
    isolation = _isolation(settings, server)
    sqlite = engine.dialect.name == "sqlite"
    if settings.retry.retries == 0 and isolation == "SERIALIZABLE":
        found.append(
            Finding(
                "retries-off",
                "'TXN_RETRIES' is 0 under SERIALIZABLE: every serialization failure (or busy"
                " SQLite database) reaches the user as an error. Set 'TXN_RETRIES' to 3 or more.",
                "docs/retries.md, 'What is retried'",
            )
        )
    crowded = cores is not None and (limit is None or limit > CONNECTIONS_PER_CORE * cores)
    # Admission control bounds the attempts of contended blocks whatever the pool's size.
    unadmitted = settings.admission is None
    if not sqlite and crowded and unadmitted and isolation == "SERIALIZABLE":
        found.append(
            Finding(
                "pool-above-cores",
                f"The pool opens {'any number of' if limit is None else limit} connections"
                f" per process, against {cores} database cores, under SERIALIZABLE, with"
                " 'TXN_ADMISSION' False: the more transactions run at once, the more"
                " conflict and are retried. Set 'TXN_ADMISSION' to True, or size the pool"
                " for the database, e.g. 'TXN_ENGINE_OPTIONS' = {'pool_size':"
                f" {cores}, 'max_overflow': 0}} for one process.",
                "docs/retries.md, 'Hot spots: admission control'",
            )
        )
    if not sqlite and settings.retry.deadline is None and settings.timeouts.statement is None:
        found.append(
            Finding(
                "no-time-limit",
                "Neither 'TXN_RETRY_DEADLINE' nor 'TXN_STATEMENT_TIMEOUT' is set: nothing"
                " bounds how long a request waits on a slow statement or a lock. Set"
                " 'TXN_RETRY_DEADLINE' (e.g. 10), which also bounds the statement timeout and"
                " the pool's wait.",
                "docs/reliability.md, 'Bounding every wait'",
            )
        )
    if sqlite and isinstance(engine.pool, pool.SingletonThreadPool):
        found.append(
            Finding(
                "sqlite-memory",
                "The SQLite database is in memory with a connection per thread: each thread"
                " sees a database of its own, empty. Use a file, e.g. 'sqlite:///app.db'.",
                "docs/session.md, 'SQLite'",
            )
        )
    elif sqlite and limit != 1 and server.journal_mode != "wal":
        found.append(
            Finding(
                "sqlite-journal",
                f"SQLite's journal mode is {server.journal_mode!r} and the pool opens more than"
                " one connection: readers and the one writer block each other, and waits past"
                " the busy timeout fail. Run 'PRAGMA journal_mode=WAL' once on the file, so"
                " that readers run beside the writer.",
                "docs/session.md, 'SQLite'",
            )
        )
    return found
