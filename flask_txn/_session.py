"""Engines and scoped sessions: one registry per app, sessions owned by app contexts."""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import sqlalchemy as sa
from flask import current_app, has_request_context, request
from flask.globals import app_ctx
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import ORMExecuteState, Session, scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry, ThreadLocalRegistry

from . import _timeouts
from ._config import Settings
from ._errors import ConfigError, UsageError

#: ``session.info`` keys: the session's :class:`Owner`, and whether it wrote.
OWNER = "flask_txn.owner"
_WROTE = "flask_txn.wrote"


class Owner(NamedTuple):
    """Who made a session: the app context whose teardown alone removes it, and
    the endpoint and time, for the warning if that teardown discards writes."""

    context: Any
    endpoint: str | None
    created: float


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


#: Connection execution option: the kind of SQLite BEGIN for this transaction
#: ("IMMEDIATE" takes the write lock at once; atomic blocks set it).
SQLITE_BEGIN = "flask_txn_sqlite_begin"


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


def make_sessionmaker(engine: Engine, settings: Settings) -> sessionmaker[Session]:
    """A sessionmaker bound to the app's engine that records writes made in each transaction."""
    options = {"expire_on_commit": False, **settings.session_options}
    factory = sessionmaker(bind=engine, **options)
    try:
        # sessionmaker keeps the options unchecked until the first Session: check
        # them now rather than fail the app's first request. No connection is made.
        factory().close()
    except TypeError as exc:
        raise ConfigError(
            f"'TXN_SESSION_OPTIONS' has keys {sorted(settings.session_options)!r} that"
            f" sqlalchemy.orm.Session() refused: {exc}. Use keyword arguments of"
            " Session, e.g. {'autoflush': False}."
        ) from None
    event.listen(factory, "after_flush", _mark_written)
    event.listen(factory, "do_orm_execute", _mark_dml)
    event.listen(factory, "after_commit", _clear_written)
    event.listen(factory, "after_rollback", _clear_written)
    return factory


def _mark_written(session: Session, _flush_context: Any) -> None:
    session.info[_WROTE] = True


def _mark_dml(state: ORMExecuteState) -> None:
    # INSERT, UPDATE or DELETE, also inside select().from_statement(...).
    if state.statement.is_dml:
        state.session.info[_WROTE] = True


def _clear_written(session: Session) -> None:
    session.info.pop(_WROTE, None)


def has_pending_writes(session: Session) -> bool:
    """True if the session holds changes that a rollback would discard.

    Counts unflushed objects, flushes and ORM DML in the open transaction; a raw
    SQL string passed to ``execute`` is not inspected.
    """
    if session.info.get(_WROTE) or session.new:
        return True
    # Deleted and modified objects are persistent, so in the identity map: an
    # empty map (a view that ran SQL statements only) spares building both sets.
    return bool(session.identity_map) and bool(session.deleted or session.dirty)


def current_app_context() -> Any:
    """The app context object behind Flask's proxy (a scope key and an owner tag)."""
    return app_ctx._get_current_object()  # type: ignore[attr-defined]


def current_app_object() -> Any:
    """The app object behind ``current_app``: the sender of flask-txn's signals."""
    return current_app._get_current_object()  # type: ignore[attr-defined]


def claim(session: Session) -> Session:
    """Tag a session as owned by the current app context, unless it already has an owner."""
    if OWNER not in session.info:
        endpoint = request.endpoint if has_request_context() else None
        session.info[OWNER] = Owner(current_app_context(), endpoint, time.perf_counter())
    return session


def _refuse_in_event_loop() -> None:
    """Flask runs an async view in a loop of its own, in another thread: a session made
    there would never be removed by teardown, and would keep its connection."""
    # The non-raising form of get_running_loop(): this runs for every new session.
    if asyncio._get_running_loop() is None:
        return
    raise UsageError(
        "'txn.session' was used inside a running event loop (an async view). Flask"
        " runs each async view in a new loop in another thread, where teardown cannot"
        " remove the session, so its connection would leak. Use 'txn.async_session'"
        " inside an async '@atomic' block instead."
    )


def make_registry(factory: sessionmaker[Session], scope: Any) -> ScopedRegistry[Session]:
    """The per-app store of current sessions for ``TXN_SESSION_SCOPE``."""

    def create() -> Session:
        _refuse_in_event_loop()
        return claim(factory())

    if scope == "thread":
        return ThreadLocalRegistry(create)
    if scope == "app_context":
        return ScopedRegistry(create, current_app_context)
    return ScopedRegistry(create, scope)


class CurrentAppRegistry(ScopedRegistry[Session]):
    """Delegates to the current app's registry, so one ``scoped_session`` serves every app."""

    def __init__(self, registry_of_current_app: Callable[[], ScopedRegistry[Session]]) -> None:
        self._current = registry_of_current_app

    def __call__(self) -> Session:
        return self._current()()

    def has(self) -> bool:
        return self._current().has()

    def set(self, obj: Session) -> None:
        # scoped_session(**kw) builds the session itself and stores it here: without
        # an owner, no teardown would ever remove it and its connection would leak.
        self._current().set(claim(obj))

    def clear(self) -> None:
        self._current().clear()


class AppScopedSession(scoped_session[Session]):
    """The ``txn.session`` proxy: the current app's session in the configured scope."""

    def __init__(
        self,
        registry_of_current_app: Callable[[], ScopedRegistry[Session]],
        factory_of_current_app: Callable[[], sessionmaker[Session]],
    ) -> None:
        # scoped_session.__init__ would build its own registry: replace it wholesale.
        self.registry = CurrentAppRegistry(registry_of_current_app)
        self._factory_of_current_app = factory_of_current_app

    @property
    def session_factory(self) -> sessionmaker[Session]:  # type: ignore[override]
        """The current app's sessionmaker."""
        return self._factory_of_current_app()
