"""Engines: flask-txn's per-dialect defaults under the user's options, sync and async.

Flask runs each ``async def`` view in a new event loop, in a thread of its own.
An async engine's pool must therefore hand a connection from one loop to the
next: psycopg 3's connections allow it, and get :class:`LoopFreeQueuePool`;
asyncpg's belong to the loop that made them, and are never pooled.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, NullPool
from sqlalchemy.util import queue

from . import _timeouts, _watchdog
from ._config import Settings
from ._errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

#: Connection execution option: the kind of SQLite BEGIN for this transaction
#: ("IMMEDIATE" takes the write lock at once; atomic blocks set it).
SQLITE_BEGIN = "flask_txn_sqlite_begin"

#: The package that provides a driver's module, for the install hint.
_PACKAGES = {
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
    "psycopg2": "'flask-txn[postgresql]' (psycopg2-binary)",
    "psycopg": "'flask-txn[psycopg]' (psycopg 3)",
    "asyncpg": "'flask-txn[asyncpg]'",
    "aiosqlite": "aiosqlite",
    "aiomysql": "aiomysql",
    "asyncmy": "asyncmy",
    "pg8000": "pg8000",
    "oracledb": "oracledb",
    "pyodbc": "pyodbc",
}

#: Drivers refused, by dialect+driver name: why flask-txn cannot keep its promises
#: with them. Checked before the driver is imported.
_UNSUPPORTED = {
    "postgresql+pg8000": (
        "its errors carry no SQLSTATE that flask-txn reads, so serialization failures"
        " and deadlocks would not be retried, and it applies an isolation level with"
        " SET SESSION CHARACTERISTICS and COMMIT, outside the transaction (behind a"
        " pooler such as PgBouncer, blocks then run at another client's level)"
    ),
}
#: What to use instead of a refused driver.
_INSTEAD = "'postgresql+psycopg://...' (psycopg 3) or 'postgresql+psycopg2://...'"

#: Sync drivers whose own package also speaks asyncio under the same URL.
_SAME_DRIVER_ASYNC = frozenset({"postgresql+psycopg"})
#: psycopg 3's driver names, sync and async.
_PSYCOPG3 = frozenset({"psycopg", "psycopg_async"})
#: Async drivers whose connections may serve one event loop after another.
_LOOP_FREE_DRIVERS = frozenset({"psycopg"})
#: create_engine() arguments that only a pool that keeps connections takes.
_POOL_ARGUMENTS = frozenset(
    {"pool_size", "max_overflow", "pool_timeout", "pool_recycle", "pool_use_lifo"}
)

# Every engine flask-txn made in this process, for disposal after a fork.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _dispose_after_fork() -> None:
    """Drop the parent's pooled connections in a forked child without closing them."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_dispose_after_fork)


def make_engine(settings: Settings) -> Engine:
    """Create the app's engine with flask-txn's per-dialect defaults under the user's options."""
    check_driver("TXN_DATABASE_URI", settings.url)
    options = _timeouts.engine_options(
        settings.url,
        settings.timeouts,
        {**_dialect_defaults(settings.url), **settings.engine_options},
    )
    try:
        engine = sa.create_engine(settings.url, **_unprepared(settings.url, options))
    except ImportError as exc:
        raise missing_driver("TXN_DATABASE_URI", settings.url, exc) from None
    except TypeError as exc:
        # Only the names are shown: values (connect_args) may hold a password.
        raise ConfigError(
            f"'TXN_ENGINE_OPTIONS' has keys {sorted(settings.engine_options)!r} that"
            f" sqlalchemy.create_engine() refused: {exc} Use keyword arguments of"
            " create_engine() that this database and pool accept, e.g. {'pool_size': 10}."
        ) from None
    instrument(engine, settings)
    return engine


def instrument(engine: Engine, settings: Settings) -> None:
    """What flask-txn adds to an engine, its own or one it adopts: SQLite's real
    BEGIN, the read watchdog, the per-transaction statement timeout, and disposal
    after a fork."""
    if engine.dialect.name == "sqlite" and engine.dialect.driver == "pysqlite":
        _use_sqlite_transactions(engine)
    _watchdog.watch(engine, settings.timeouts.read)
    _timeouts.set_per_transaction(engine, settings.timeouts.statement)
    _ENGINES.add(engine)


def check_driver(key: str, url: URL) -> None:
    """Refuse a driver that lacks what flask-txn needs (see :doc:`/deployments`)."""
    name = f"{url.get_backend_name()}+{url.get_driver_name()}"
    if name in _UNSUPPORTED:
        raise ConfigError(
            f"{key!r} uses the driver {name!r}, which flask-txn does not support:"
            f" {_UNSUPPORTED[name]}. Use {_INSTEAD}."
        )


def missing_driver(key: str, url: URL, exc: ImportError) -> ConfigError:
    """The error for a URL whose driver is not installed: which package to install."""
    module = (exc.name or "").partition(".")[0]
    package = _PACKAGES.get(module, f"the package that provides {module or 'it'!r}")
    return ConfigError(
        f"{key!r} uses the driver {url.drivername!r}, which is not installed ({exc})."
        f" Install it: pip install {package}."
    )


def _dialect_defaults(url: URL) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return {}
    # A server may drop idle connections (restart, failover, idle timeouts):
    # test each one on checkout rather than fail the first statement of a request.
    return {"pool_pre_ping": True}


def _unprepared(url: URL, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with psycopg 3's automatic prepared statements off, unless the
    user's ``connect_args`` set ``prepare_threshold``.

    A prepared statement lives in one server connection; behind a pooler in
    transaction mode (PgBouncer) the next transaction may run on another, which
    fails with 26000, 42P05 or 08P01.
    """
    if url.get_driver_name() not in _PSYCOPG3:
        return options
    return {
        **options,
        "connect_args": {"prepare_threshold": None, **options.get("connect_args", {})},
    }


def _use_sqlite_transactions(engine: Engine) -> None:
    """Make pysqlite emit BEGIN itself, so SAVEPOINT and isolation work (SQLAlchemy's recipe)."""

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        driver: Any = connection.connection.driver_connection
        if driver.isolation_level is not None:
            # An adopted engine's pool may hold connections made before flask-txn listened.
            driver.isolation_level = None
        # A validated keyword (TXN_SQLITE_BEGIN), never user text.
        mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def async_url(settings: Settings) -> URL | None:
    """The async database URL: the configured one, or the sync URL when its driver is async too."""
    if settings.async_url is not None:
        return settings.async_url
    if settings.url.drivername in _SAME_DRIVER_ASYNC:
        return settings.url
    return None


class LoopFreeQueuePool(AsyncAdaptedQueuePool):
    """The async engine's pool for drivers whose connections may move between loops.

    SQLAlchemy's ``AsyncAdaptedQueuePool`` waits for a free connection on an
    asyncio queue, which belongs to the first event loop that waited on it: a
    request in any other loop would then fail. This pool waits on a thread lock
    instead, which blocks only the waiting request, alone in its own loop and
    thread as Flask runs it.
    """

    _queue_class = queue.Queue[ConnectionPoolEntry]


def make_async_engine(settings: Settings, url: URL) -> AsyncEngine:
    """The app's async engine: pooled across event loops where the driver allows it.

    :raises ImportError: SQLAlchemy's asyncio support (greenlet) is not installed.
    """
    # Imported here: SQLAlchemy's asyncio support needs greenlet (the 'async'
    # extra), which a sync-only app need not install.
    from sqlalchemy.ext.asyncio import create_async_engine

    options = _async_pool_options(url, settings.async_engine_options)
    # Only a pool that keeps connections makes a request wait for one.
    with_timeouts = (
        _timeouts.connect_options if options["poolclass"] is NullPool else _timeouts.engine_options
    )
    try:
        engine = create_async_engine(
            url, **_unprepared(url, with_timeouts(url, settings.timeouts, options))
        )
    except ImportError as exc:
        key = "TXN_DATABASE_URI" if settings.async_url is None else "TXN_ASYNC_DATABASE_URI"
        raise missing_driver(key, url, exc) from None
    except TypeError as exc:
        # Only the names are shown: values (connect_args) may hold a password.
        raise ConfigError(
            f"'TXN_ASYNC_ENGINE_OPTIONS' has keys {sorted(settings.async_engine_options)!r}"
            f" that sqlalchemy.ext.asyncio.create_async_engine() refused: {exc} Use keyword"
            " arguments of create_async_engine() that this driver and pool accept, e.g."
            " {'echo': True}."
        ) from None
    _timeouts.set_per_transaction(engine.sync_engine, settings.timeouts.statement)
    return engine


def _async_pool_options(url: URL, options: Mapping[str, Any]) -> dict[str, Any]:
    """``TXN_ASYNC_ENGINE_OPTIONS`` with the pool flask-txn chooses, or an error
    for a pool that would hand a connection to a loop it cannot serve."""
    merged = dict(options)
    poolclass = merged.get("poolclass")
    driver = url.get_driver_name()
    if driver in _LOOP_FREE_DRIVERS:
        if poolclass is None:
            merged["poolclass"] = LoopFreeQueuePool
            merged.setdefault("pool_pre_ping", True)  # as the sync engine, see _dialect_defaults
        elif not (
            isinstance(poolclass, type) and issubclass(poolclass, LoopFreeQueuePool | NullPool)
        ):
            raise ConfigError(
                f"'TXN_ASYNC_ENGINE_OPTIONS' sets 'poolclass' to {poolclass!r}, but Flask runs"
                " each async view in a new event loop and that pool waits for connections"
                " in one loop. Remove 'poolclass' (flask-txn pools psycopg connections"
                " across loops, sized by 'pool_size' and 'max_overflow'), or set it to"
                " sqlalchemy.pool.NullPool to connect per request."
            )
        return merged
    given = {
        key: value
        for key, value in merged.items()
        if key in _POOL_ARGUMENTS or (key == "poolclass" and value not in (None, NullPool))
    }
    if given:
        raise ConfigError(
            f"'TXN_ASYNC_ENGINE_OPTIONS' asks for a connection pool ({given!r}), but"
            f" {driver}'s connections belong to the event loop that made them, and Flask"
            " runs each async view in a new loop, so no connection can serve two requests."
            " Remove the pool options (flask-txn connects per request, with NullPool), or"
            " use psycopg 3 ('postgresql+psycopg://...'), whose connections flask-txn pools."
        )
    merged["poolclass"] = NullPool
    return merged
