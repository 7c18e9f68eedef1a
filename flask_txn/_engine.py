"""Engines: flask-txn's per-dialect defaults under the user's options, sync and async."""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from . import _timeouts
from ._config import Settings
from ._errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

#: Connection execution option: the kind of SQLite BEGIN for this transaction
#: ("IMMEDIATE" takes the write lock at once; atomic blocks set it).
SQLITE_BEGIN = "flask_txn_sqlite_begin"

#: Sync drivers whose own package also speaks asyncio under the same URL.
_SAME_DRIVER_ASYNC = frozenset({"postgresql+psycopg"})

# Every engine flask-txn made in this process, for disposal after a fork.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _dispose_after_fork() -> None:
    """Drop the parent's pooled connections in a forked child without closing them."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_dispose_after_fork)


def make_engine(settings: Settings) -> Engine:
    """Create the app's engine with flask-txn's per-dialect defaults under the user's options."""
    options = _timeouts.engine_options(
        settings.url,
        settings.timeouts,
        {**_dialect_defaults(settings.url), **settings.engine_options},
    )
    try:
        engine = sa.create_engine(settings.url, **options)
    except TypeError as exc:
        # Only the names are shown: values (connect_args) may hold a password.
        raise ConfigError(
            f"'TXN_ENGINE_OPTIONS' has keys {sorted(settings.engine_options)!r} that"
            f" sqlalchemy.create_engine() refused: {exc} Use keyword arguments of"
            " create_engine() that this database and pool accept, e.g. {'pool_size': 10}."
        ) from None
    if engine.dialect.name == "sqlite" and engine.dialect.driver == "pysqlite":
        _use_sqlite_transactions(engine)
    _timeouts.watch(engine, settings.timeouts.read)
    _ENGINES.add(engine)
    return engine


def _dialect_defaults(url: URL) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return {}
    # A server may drop idle connections (restart, failover, idle timeouts):
    # test each one on checkout rather than fail the first statement of a request.
    return {"pool_pre_ping": True}


def _use_sqlite_transactions(engine: Engine) -> None:
    """Make pysqlite emit BEGIN itself, so SAVEPOINT and isolation work (SQLAlchemy's recipe)."""

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
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


def make_async_engine(settings: Settings, url: URL) -> AsyncEngine:
    """The app's async engine; ``NullPool`` unless the user chose a pool.

    Flask runs each ``async def`` view in an event loop of its own, and a
    connection made in one loop must not be handed to another.

    :raises ImportError: SQLAlchemy's asyncio support (greenlet) is not installed.
    """
    # Imported here: SQLAlchemy's asyncio support needs greenlet (the 'async'
    # extra), which a sync-only app need not install.
    from sqlalchemy.ext.asyncio import create_async_engine

    options = _timeouts.connect_options(
        url, settings.timeouts, {"poolclass": NullPool, **settings.async_engine_options}
    )
    return create_async_engine(url, **options)
