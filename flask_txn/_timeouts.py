"""Bounding how long a request can wait on the database: the timeout keys.

Retrying bounds the number of attempts; these bound each attempt, so that a
request whose database or network stopped answering fails (or is retried)
instead of hanging. Each ``TXN_*`` key becomes what the driver or the pool
offers:

- ``TXN_CONNECT_TIMEOUT``: libpq's ``connect_timeout``;
- ``TXN_TCP_TIMEOUT``: libpq's ``keepalives*`` and ``tcp_user_timeout``;
- ``TXN_STATEMENT_TIMEOUT``: ``SET LOCAL statement_timeout`` as each
  transaction begins (:func:`set_per_transaction`), never a startup parameter,
  which a pooler in transaction mode (PgBouncer) refuses or drops;
- ``TXN_READ_TIMEOUT``: the watchdog of :mod:`flask_txn._watchdog`;
- ``TXN_POOL_TIMEOUT``: the ``pool_timeout`` of a QueuePool, for any database.

The first four apply to PostgreSQL through psycopg2 and psycopg only: for
another database the first two do nothing, and setting the statement or read
timeout is refused. The async engine gets the first three (through asyncpg,
the connect timeout, and the statement timeout as its ``server_settings``), not
the watchdog.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, event, pool
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import PoolResetState

from ._errors import ConfigError

#: Drivers whose connection parameters and sockets flask-txn knows (libpq's).
LIBPQ_DRIVERS = ("psycopg2", "psycopg")
#: The read timeout exceeds the statement timeout by this much, so that the
#: server's own, clearer error (SQLSTATE 57014) arrives first.
READ_MARGIN = 1.0
#: libpq's smallest connect_timeout: a smaller one is raised to it.
_LIBPQ_MIN_CONNECT = 2
#: TCP keepalive probes sent before the connection is declared dead.
_KEEPALIVE_COUNT = 3
#: The pooled connection's ``info`` key: the MySQL session variables a block set,
#: reset to the server's values when the connection returns to the pool.
_SESSION_VARIABLES = "flask_txn.session_variables"
#: Databases where a block's ``statement_timeout`` and ``lock_timeout`` apply.
BLOCK_TIMEOUT_DIALECTS = ("postgresql", "mysql", "mariadb")


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    """The timeouts in force for one app, in seconds; None where none applies."""

    connect: float | None
    tcp: float | None
    statement: float | None
    read: float | None
    pool: float | None
    #: where ``statement``, ``read`` and ``pool`` came from: a key, or the key
    #: they were derived from.
    sources: Mapping[str, str]


def check_seconds(
    name: str, value: Any, *, optional: bool = False, zero: bool = True, allowed: str = ""
) -> Any:
    """A duration in seconds: a finite, non-negative int or float (positive if not
    ``zero``), or None if ``optional``.

    :param allowed: what the error message says is allowed, if not the default
        "a finite number of seconds >= 0".
    """
    if value is None and optional:
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        # An int too large for a float (10**400) is not a usable duration either.
        with contextlib.suppress(OverflowError):
            seconds = float(value)
    if seconds is None or not math.isfinite(seconds) or (seconds < 0 if zero else seconds <= 0):
        if not allowed:
            allowed = f"a finite number of seconds {'>= 0' if zero else '> 0'}"
            allowed += " or None for no limit" if optional else ""
        raise ConfigError(f"{name!r} must be {allowed}, got {value!r}.")
    return seconds


def milliseconds(seconds: float) -> int:
    """A validated duration as the whole milliseconds PostgreSQL's settings take, at
    least 1 (0 would mean no limit)."""
    return max(1, round(seconds * 1000))


def read_timeouts(config: Mapping[str, Any], url: URL, deadline: float | None) -> Timeouts:
    """Validate the timeout keys and derive the unset ones from ``TXN_RETRY_DEADLINE``.

    :param config: the app's config, defaults filled in.
    :param url: the validated database URL, to refuse what its driver cannot honour.
    :param deadline: the validated ``TXN_RETRY_DEADLINE``.
    """
    connect = check_seconds(
        "TXN_CONNECT_TIMEOUT",
        config["TXN_CONNECT_TIMEOUT"],
        optional=True,
        allowed="a finite number of seconds > 0, or None for the driver's default (no limit)",
        zero=False,
    )
    tcp = check_seconds(
        "TXN_TCP_TIMEOUT",
        config["TXN_TCP_TIMEOUT"],
        optional=True,
        allowed="a finite number of seconds > 0, or None for the operating system's defaults",
        zero=False,
    )
    statement = check_seconds(
        "TXN_STATEMENT_TIMEOUT",
        config["TXN_STATEMENT_TIMEOUT"],
        optional=True,
        allowed="a finite number of seconds > 0, 0 for no limit, or None to use"
        " 'TXN_RETRY_DEADLINE'",
        zero=True,
    )
    read = check_seconds(
        "TXN_READ_TIMEOUT",
        config["TXN_READ_TIMEOUT"],
        optional=True,
        allowed="a finite number of seconds > 0, 0 for no limit, or None for the statement"
        f" timeout plus {READ_MARGIN:g} s",
        zero=True,
    )
    pool_timeout = check_seconds(
        "TXN_POOL_TIMEOUT",
        config["TXN_POOL_TIMEOUT"],
        optional=True,
        allowed="a finite number of seconds > 0, or None to use 'TXN_RETRY_DEADLINE'",
        zero=False,
    )
    libpq = uses_libpq(url)
    for name, value in (("TXN_STATEMENT_TIMEOUT", statement), ("TXN_READ_TIMEOUT", read)):
        if value and not libpq:
            raise ConfigError(
                f"{name!r} is {config[name]!r}, but flask-txn applies it only to PostgreSQL"
                f" through {' or '.join(LIBPQ_DRIVERS)}, and the database URL uses"
                f" {url.drivername!r}. Set {name!r} to None for this database."
            )
    sources = {
        "statement": "TXN_STATEMENT_TIMEOUT" if statement is not None else "TXN_RETRY_DEADLINE",
        "pool": "TXN_POOL_TIMEOUT" if pool_timeout is not None else "TXN_RETRY_DEADLINE",
        "read": "TXN_READ_TIMEOUT" if read is not None else "the statement timeout",
    }
    if statement is None:
        statement = deadline if libpq else None
    if pool_timeout is None:
        pool_timeout = deadline
    if read is None:
        read = statement + READ_MARGIN if statement else None
    elif statement and read and read <= statement:
        raise ConfigError(
            f"'TXN_READ_TIMEOUT' ({read:g} s) must be longer than the statement timeout in"
            f" force ({statement:g} s, from {sources['statement']!r}): the server's own"
            " timeout ends a slow statement with a clear error and keeps the connection,"
            " while the read timeout is the last resort for a server or network that"
            " stopped answering. Raise 'TXN_READ_TIMEOUT' or lower the statement timeout."
        )
    return Timeouts(
        connect=connect,
        tcp=tcp,
        statement=statement or None,
        read=read or None,
        pool=pool_timeout,
        sources=sources,
    )


def uses_libpq(url: URL) -> bool:
    """True if the URL's driver is one whose libpq parameters flask-txn sets."""
    return url.get_backend_name() == "postgresql" and url.get_driver_name() in LIBPQ_DRIVERS


def engine_options(url: URL, timeouts: Timeouts, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for ``create_engine`` with the timeouts added beneath the user's own:
    the connection's (see :func:`connect_options`) and the pool's.

    :param url: the database URL.
    :param timeouts: the app's timeouts.
    :param options: ``TXN_ENGINE_OPTIONS`` over flask-txn's other engine defaults.
    """
    merged = connect_options(url, timeouts, options)
    if timeouts.pool is not None and "pool_timeout" not in merged and "pool" not in merged:
        dialect: Any = url.get_dialect()  # a DefaultDialect subclass, which has get_pool_class
        poolclass = merged.get("poolclass") or dialect.get_pool_class(url)
        if issubclass(poolclass, pool.QueuePool):
            merged["pool_timeout"] = timeouts.pool
        elif timeouts.sources["pool"] == "TXN_POOL_TIMEOUT":
            raise ConfigError(
                f"'TXN_POOL_TIMEOUT' is {timeouts.pool!r}, but the engine's pool"
                f" {poolclass.__name__} never makes a request wait for a connection, so it"
                " has no timeout. Set 'TXN_POOL_TIMEOUT' to None, or use a QueuePool."
            )
    return merged


def connect_options(url: URL, timeouts: Timeouts, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the timeouts the driver applies to each connection added to
    ``connect_args``, beneath the user's own: libpq's parameters (psycopg2, psycopg),
    or asyncpg's connect timeout and ``statement_timeout`` setting.

    A connection parameter in the user's ``connect_args`` or in the URL's query
    wins over flask-txn's, as do the user's asyncpg ``server_settings``. The
    libpq drivers get no statement timeout here: see :func:`set_per_transaction`.
    """
    merged = dict(options)
    given = dict(merged.get("connect_args", {}))
    if uses_libpq(url):
        for key, value in _libpq_parameters(timeouts).items():
            if key not in given and key not in url.query:
                given[key] = value
    elif url.get_backend_name() == "postgresql" and url.get_driver_name() == "asyncpg":
        if timeouts.connect is not None:
            given.setdefault("timeout", timeouts.connect)
        if timeouts.statement is not None:
            given["server_settings"] = {
                "statement_timeout": str(milliseconds(timeouts.statement)),
                **given.get("server_settings", {}),
            }
    else:
        return merged
    merged["connect_args"] = given
    return merged


def _libpq_parameters(timeouts: Timeouts) -> dict[str, Any]:
    """libpq connection parameters for the timeouts (whole seconds where libpq wants them)."""
    parameters: dict[str, Any] = {}
    if timeouts.connect is not None:
        parameters["connect_timeout"] = max(_LIBPQ_MIN_CONNECT, math.ceil(timeouts.connect))
    if timeouts.tcp is not None:
        # A dead idle peer is noticed after idle + count * interval <= tcp seconds;
        # one that stops acknowledging data, after tcp seconds.
        parameters.update(
            keepalives=1,
            keepalives_idle=max(1, math.floor(timeouts.tcp / 2)),
            keepalives_interval=max(1, math.floor(timeouts.tcp / (2 * _KEEPALIVE_COUNT))),
            keepalives_count=_KEEPALIVE_COUNT,
            tcp_user_timeout=milliseconds(timeouts.tcp),
        )
    return parameters


def set_per_transaction(engine: Engine, seconds: float | None) -> None:
    """Make each transaction of a libpq engine begin with ``SET LOCAL statement_timeout``.

    Sent per transaction rather than when connecting, it reaches the server
    connection that runs the transaction even through a pooler in transaction
    mode, and ends with it. A block's own ``statement_timeout`` is set after it,
    so it wins. A connection in AUTOCOMMIT has no transaction to set it in: its
    statements run under the server's (or role's) ``statement_timeout``.

    :param engine: an engine flask-txn made (the sync engine of an async one).
    :param seconds: the statement timeout in force, or None to send nothing.
    """
    if seconds is None or not uses_libpq(engine.url):
        return
    # A validated number, so the statement is never user text.
    statement = f"SET LOCAL statement_timeout = {milliseconds(seconds)}"

    def begin(connection: Connection) -> None:
        if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            connection.exec_driver_sql(statement)

    event.listen(engine, "begin", begin)


def set_block_timeouts(connection: Connection, statement: float | None, lock: float | None) -> None:
    """Apply a block's ``statement_timeout`` and ``lock_timeout`` (seconds) to the
    transaction ``connection`` began, as its first statements.

    PostgreSQL: ``SET LOCAL``, which ends with the transaction. MySQL and MariaDB
    have no ``SET LOCAL``: ``SET SESSION innodb_lock_wait_timeout`` (whole seconds,
    rounded up) and MariaDB's ``max_statement_time``, which the pool's reset puts
    back to the server's values (``DEFAULT``) when the connection returns to it.

    :raises ConfigError: ``statement_timeout`` on MySQL, whose ``max_execution_time``
        bounds only ``SELECT`` statements.
    """
    if connection.dialect.name == "postgresql":
        for setting, seconds in (("statement_timeout", statement), ("lock_timeout", lock)):
            if seconds is not None:
                # A validated integer literal: SET takes no bound parameters.
                connection.exec_driver_sql(f"SET LOCAL {setting} = {milliseconds(seconds)}")
        return
    assignments: dict[str, str] = {}
    if lock is not None:
        assignments["innodb_lock_wait_timeout"] = str(max(1, math.ceil(lock)))
    if statement is not None:
        if not getattr(connection.dialect, "is_mariadb", False):
            raise ConfigError(
                f"'statement_timeout' is {statement!r}, but MySQL has no timeout for every"
                " statement of a transaction (its max_execution_time bounds only SELECT)."
                " Remove 'statement_timeout' on MySQL (MariaDB and PostgreSQL have it), or"
                " bound a query with MySQL's /*+ MAX_EXECUTION_TIME(ms) */ hint."
            )
        assignments["max_statement_time"] = f"{statement:.6f}"
    engine = connection.engine
    if not event.contains(engine, "reset", _reset_session_variables):
        event.listen(engine, "reset", _reset_session_variables)
    connection.connection.info[_SESSION_VARIABLES] = tuple(assignments)
    # Validated numbers, never user text.
    connection.exec_driver_sql(
        "SET SESSION " + ", ".join(f"{name} = {value}" for name, value in assignments.items())
    )


def _reset_session_variables(
    dbapi_connection: Any, record: pool.ConnectionPoolEntry | None, state: PoolResetState
) -> None:
    """Pool ``reset`` listener: put back the session variables a block set. An error
    here makes the pool discard the connection, so no later user inherits them."""
    names = record.info.pop(_SESSION_VARIABLES, ()) if record is not None else ()
    if names and not state.terminate_only and state.asyncio_safe:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET SESSION " + ", ".join(f"{name} = DEFAULT" for name in names))
        finally:
            cursor.close()
