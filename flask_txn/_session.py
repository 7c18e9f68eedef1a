"""Sessions: one scoped registry per app, sessions owned by app contexts, and async sessions."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from flask import current_app, has_request_context, request
from flask.globals import app_ctx
from sqlalchemy import Connection, event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import ORMExecuteState, Session, scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry, ThreadLocalRegistry

from ._config import Settings
from ._engine import async_url, make_async_engine
from ._errors import ConfigError, PendingWritesError, UsageError
from ._retry import sqlstate_of

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

#: ``session.info`` keys: the session's :class:`Owner`, and whether it wrote.
OWNER = "flask_txn.owner"
#: libpq's PQTRANS_INERROR, reported by psycopg2 and psycopg 3 alike.
_TRANSACTION_IN_ERROR = 3
#: SQLSTATE of a statement sent in a transaction that an earlier error aborted.
IN_FAILED_TRANSACTION = "25P02"
_WROTE = "flask_txn.wrote"

#: ``session.info`` key that flask_txn.testing sets on sessions joined to a test's
#: outer transaction: there, commits are savepoint releases and per-transaction
#: settings (isolation, read-only, timeouts) cannot be applied.
JOINED = "flask_txn.joined"


class Owner(NamedTuple):
    """Who made a session: the app context whose teardown alone removes it, and
    the endpoint and time, for the warning if that teardown discards writes."""

    context: Any
    endpoint: str | None
    created: float


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
    track_writes(factory)
    return factory


def track_writes(sessions: Any) -> None:
    """Record in ``session.info`` the writes made in each transaction of ``sessions``
    (a sessionmaker or a Session class), for :func:`has_pending_writes`; listening
    twice is harmless."""
    for name, listener in (
        ("after_flush", _mark_written),
        ("do_orm_execute", _mark_dml),
        ("after_commit", _clear_written),
        ("after_rollback", _clear_written),
    ):
        if not event.contains(sessions, name, listener):
            event.listen(sessions, name, listener)


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


def prepare(session: Session) -> None:
    """Before a block's first attempt: end a transaction of reads, refuse to lose writes."""
    if session.in_transaction():
        if has_pending_writes(session):
            raise PendingWritesError(
                "The session has uncommitted writes made before this atomic block began."
                " Starting the block would have to commit or discard them. Commit them"
                " first, or move them inside the block."
            )
        # Reads made before the block (a before_request hook, a user loader)
        # hold a snapshot and maybe a different isolation level: start afresh.
        session.rollback()


def aborted(session: Session) -> bool:
    """True if the database considers the open transaction failed, so that it
    would turn COMMIT into a silent ROLLBACK (PostgreSQL does)."""
    connection = session.connection()
    status = _transaction_status(connection)
    if status is not None:  # psycopg2 and psycopg 3 report libpq's status
        return bool(status == _TRANSACTION_IN_ERROR)
    # Other drivers (asyncpg, sqlite3) do not: ask the database. Only done
    # after an error, so the extra statement costs nothing on the hot path.
    try:
        connection.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        return sqlstate_of(exc) == IN_FAILED_TRANSACTION
    return False


def _transaction_status(connection: Connection) -> int | None:
    """libpq's transaction status, which psycopg2 and psycopg 3 report; None for other drivers."""
    info = getattr(connection.connection.driver_connection, "info", None)
    status: int | None = getattr(info, "transaction_status", None)
    return status


def in_failed_transaction(connection: Connection) -> bool:
    """True if the driver reports that an error aborted the connection's
    transaction (False where it cannot tell, without asking the database)."""
    return _transaction_status(connection) == _TRANSACTION_IN_ERROR


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


class AsyncWorkSession(Session):
    """The sync session inside each ``AsyncSession``, a class of its own so that
    flask-txn's session events can be listened for on async sessions alone."""


class AsyncDatabase:
    """An app's async engine and session factory, safe to use from many event loops.

    :raises ImportError: SQLAlchemy's asyncio support (greenlet) is not installed.
    """

    def __init__(self, settings: Settings, url: URL) -> None:
        # Imported here, like the engine: the 'async' extra is optional.
        from sqlalchemy.ext.asyncio import async_sessionmaker

        self.engine: AsyncEngine = make_async_engine(settings, url)
        self.factory: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine,
            sync_session_class=AsyncWorkSession,
            **{"expire_on_commit": False, **settings.session_options},
        )
        self._first_connect = threading.Lock()
        self._connected = False

    @property
    def sync_engine(self) -> Engine:
        """The engine that does the work, and that SQLAlchemy's events report."""
        return self.engine.sync_engine

    async def connected(self) -> AsyncDatabase:
        """Make the engine's first connection alone, in a loop of its own.

        SQLAlchemy guards an engine's first connection (dialect initialisation)
        with an asyncio lock. Two event loops making their first connections at
        once would wait on each other's lock and hang, so the first one is made
        in a worker thread, one at a time, before any loop uses the engine.
        """
        if not self._connected:
            await asyncio.to_thread(self._connect_once)
        return self

    def connect_from_loop(self) -> None:
        """:meth:`connected` for sync code that runs inside an event loop: the first
        connection is made in a thread of its own, and waited for."""
        if not self._connected:
            first = threading.Thread(target=self._connect_once)
            first.start()
            first.join()

    def _connect_once(self) -> None:
        with self._first_connect:
            if not self._connected:
                asyncio.run(self._connect())
                self._connected = True

    def close(self) -> None:
        """Close the pooled connections, from any thread, inside a running loop or not.

        Runs when the app is garbage collected: a psycopg connection left open
        then would warn, and SQLAlchemy can only close it in an event loop.
        """
        if asyncio._get_running_loop() is None:
            asyncio.run(self.engine.dispose())
            return
        # This thread's loop is busy: close them in a loop of their own.
        closer = threading.Thread(target=asyncio.run, args=(self.engine.dispose(),))
        closer.start()
        closer.join()

    async def _connect(self) -> None:
        async with self.engine.connect():
            pass
        # A pooled connection made in this loop would be handed to a view's loop
        # later: close it here, in its own loop.
        await self.engine.dispose()


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


def make_async_database(settings: Settings) -> AsyncDatabase | None:
    """The app's async database, or None when it has no async URL, or when its URL is
    the sync one (psycopg 3) and SQLAlchemy's asyncio support is not installed."""
    url = async_url(settings)
    if url is None:
        return None
    try:
        return AsyncDatabase(settings, url)
    except ImportError as exc:
        if settings.async_url is None:
            return None  # a sync app on psycopg 3, without the 'async' extra
        raise ConfigError(
            f"'TXN_ASYNC_DATABASE_URI' is set, but SQLAlchemy's asyncio support cannot be"
            f" imported ({exc}). Install the 'async' extra: pip install 'flask-txn[async]'."
        ) from None
