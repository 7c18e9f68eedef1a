"""``atomic`` on coroutines: the same transactions on SQLAlchemy's ``AsyncSession``.

Flask runs an ``async def`` view through asgiref, in a new event loop (in
another thread) for every call, and runs teardown after that loop has closed.
So nothing here may outlive the coroutine: each outermost block opens its
``AsyncSession`` inside the coroutine and closes it there, and the async engine
uses ``NullPool`` by default, so a connection is never handed from one loop to
another. Each step that talks to the database runs the sync implementation in
``_atomic`` through ``AsyncSession.run_sync``: one set of rules for both.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from . import _atomic
from ._atomic import (
    Outcome,
    _after_block,
    _begin,
    _committed,
    _current,
    _finish_block,
    _retrying,
    _Savepoint,
    _Transaction,
    keep_request_body,
    record_error,
    refuse_inner_commit,
    refuse_mixing,
    rewind_request_body,
)
from ._config import Settings, hide_password
from ._errors import ConfigError, UsageError
from ._timeouts import connect_options

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from ._atomic import Atomic
    from ._extension import _State

P = ParamSpec("P")
R = TypeVar("R")

#: Sync drivers whose own package also speaks asyncio under the same URL.
_SAME_DRIVER_ASYNC = frozenset({"postgresql+psycopg"})


class _AsyncWorkSession(Session):
    """The sync session inside each ``AsyncSession``: refuses commits inside a block."""


event.listen(_AsyncWorkSession, "before_commit", refuse_inner_commit)


def async_url(settings: Settings) -> URL | None:
    """The async database URL: the configured one, or the sync URL when its driver is async too."""
    if settings.async_url is not None:
        return settings.async_url
    if settings.url.drivername in _SAME_DRIVER_ASYNC:
        return settings.url
    return None


class AsyncDatabase:
    """An app's async engine and session factory, safe to use from many event loops."""

    def __init__(self, settings: Settings, url: URL) -> None:
        # Imported here: SQLAlchemy's asyncio support needs greenlet (the 'async'
        # extra), which a sync-only app need not install.
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        options = connect_options(
            url, settings.timeouts, {"poolclass": NullPool, **settings.async_engine_options}
        )
        self.engine = create_async_engine(url, **options)
        event.listen(self.engine.sync_engine, "handle_error", record_error)
        self.factory: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine,
            sync_session_class=_AsyncWorkSession,
            **{"expire_on_commit": False, **settings.session_options},
        )
        self._first_connect = threading.Lock()
        self._connected = False

    async def connected(self) -> None:
        """Make the engine's first connection alone, in a loop of its own.

        SQLAlchemy guards an engine's first connection (dialect initialisation)
        with an asyncio lock. Two event loops making their first connections at
        once would wait on each other's lock and hang, so the first one is made
        in a worker thread, one at a time, before any loop uses the engine.
        """
        if not self._connected:
            await asyncio.to_thread(self._connect_once)

    def _connect_once(self) -> None:
        with self._first_connect:
            if not self._connected:
                asyncio.run(self._connect())
                self._connected = True

    async def _connect(self) -> None:
        async with self.engine.connect():
            pass


def make_database(settings: Settings) -> AsyncDatabase | None:
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


async def database_of(state: _State) -> AsyncDatabase:
    """The app's async database, connected once, or an error that says how to configure it."""
    database = state.async_database
    if database is None:
        url = state.settings.url
        if async_url(state.settings) is not None:
            raise UsageError(
                "'atomic' on a coroutine needs SQLAlchemy's asyncio support, which needs the"
                " greenlet package. Install the 'async' extra: pip install 'flask-txn[async]'."
            )
        raise UsageError(
            f"'atomic' on a coroutine needs an async database URL, and the app's URL"
            f" {hide_password(url)!r} uses {url.drivername!r}, which has no async form"
            " flask-txn may switch to. Set 'TXN_ASYNC_DATABASE_URI', e.g."
            " 'postgresql+asyncpg://...' or 'postgresql+psycopg://...' (psycopg 3 serves"
            " both, so a 'postgresql+psycopg' URL needs no second key)."
        )
    await database.connected()
    return database


def current_session() -> AsyncSession:
    """The ``AsyncSession`` of the innermost async atomic block of this task."""
    txn = _current.get()
    if txn is None or txn.exposed is txn.session:
        raise UsageError(
            "'async_session' is only available inside an async atomic block (an"
            " '@atomic' coroutine or 'async with atomic():'), which opens and closes it"
            " in the view's own event loop. Outside one, there is no session."
        )
    session: AsyncSession = txn.exposed
    return session


def _step(_session: Session, func: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Run one of ``_atomic``'s sync steps where the AsyncSession's sync session may do I/O."""
    return func(*args, **kwargs)


async def _sleep(state: _State, delay: float) -> None:
    """Wait without blocking the loop; a custom ``TXN_RETRY_SLEEP`` may return an awaitable."""
    sleep = state.settings.sleep
    if sleep is time.sleep:
        await asyncio.sleep(delay)
        return
    waited = sleep(delay)
    if inspect.isawaitable(waited):
        await waited


def decorate(block: Atomic, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``@atomic`` on a coroutine function."""

    @functools.wraps(func)
    async def atomic_call(*args: P.args, **kwargs: P.kwargs) -> R:
        state = block._state()
        refuse_mixing(async_block=True)
        txn = _current.get()
        if txn is not None:
            # Inside another block: a savepoint; the outermost block retries.
            block._check_nested(txn)
            async with _AsyncSavepoint(txn):
                return await func(*args, **kwargs)
        return await _run(block, state, atomic_call, func, args, kwargs)

    return atomic_call


async def _run(
    block: Atomic,
    state: _State,
    wrapper: Callable[..., Any],
    func: Callable[..., Awaitable[R]],
    args: Any,
    kwargs: Any,
) -> R:
    database = await database_of(state)
    engine = database.engine.sync_engine  # handle_error reports this engine
    options = block._options(state, engine, retrying=True)
    policy = options.policy
    started = time.perf_counter()
    body = keep_request_body(policy)
    for attempt in itertools.count(1):  # pragma: no branch - left by return or raise
        rewind_request_body(body)
        async with database.factory() as session:
            txn = _Transaction(
                session.sync_session, engine, options, attempt, started, exposed=session
            )
            token = _current.set(txn)
            try:
                error: BaseException | None = None
                rv: Any = None
                try:
                    await session.run_sync(_step, _begin, txn)
                    rv = await func(*args, **kwargs)
                except BaseException as exc:
                    error = exc
                outcome, failure, delay = await session.run_sync(
                    _step, block._conclude, txn, error, rv, wrapper, state
                )
            finally:
                _current.reset(token)
        # The session is closed: its connection is gone before the wait.
        if outcome is Outcome.RETRY:
            _retrying(txn, failure, delay, final=attempt + 1 > policy.retries)
            await _sleep(state, delay)
            continue
        if outcome is Outcome.COMMITTED:
            _committed(txn)
        return rv  # type: ignore[no-any-return]
    raise AssertionError("unreachable")  # pragma: no cover


class _AsyncSavepoint:
    """A nested async block: the sync savepoint's steps, run through ``run_sync``."""

    def __init__(self, txn: _Transaction) -> None:
        self.savepoint = _Savepoint(txn)
        self.session: AsyncSession = txn.exposed

    async def __aenter__(self) -> None:
        await self.session.run_sync(_step, self.savepoint.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.session.run_sync(_step, self.savepoint.__exit__, exc_type, exc, tb)


async def enter_block(block: Atomic) -> AsyncSession:
    """``async with atomic():``: a new transaction, or a savepoint when nested."""
    state = block._state()
    refuse_mixing(async_block=True)
    txn = _current.get()
    if txn is not None:
        block._check_nested(txn)
        await _AsyncSavepoint(txn).__aenter__()  # pushes the savepoint's frame
        return current_session()
    database = await database_of(state)
    engine = database.engine.sync_engine
    options = block._options(state, engine, retrying=False)
    session = database.factory()
    txn = _Transaction(session.sync_session, engine, options, 1, time.perf_counter(), session)
    token = _current.set(txn)
    try:
        await session.run_sync(_step, _begin, txn)
    except BaseException as exc:
        try:
            await session.run_sync(_step, _atomic._rollback, txn, reason="error", error=exc)
        finally:
            _current.reset(token)
            await session.close()
        raise
    txn.frames.append(token)
    return session


async def exit_block(
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> Literal[False]:
    """End the innermost ``async with atomic():`` block of this task."""
    txn = _current.get()
    assert txn is not None, "__aexit__ without __aenter__"
    frame = txn.frames[-1]
    session: AsyncSession = txn.exposed
    if isinstance(frame, _Savepoint):
        await session.run_sync(_step, frame.__exit__, exc_type, exc, tb)  # pops its frame
        return False
    txn.frames.pop()
    try:
        failure = await session.run_sync(_step, _finish_block, txn, exc)
    finally:
        _current.reset(frame)
        await session.close()
    _after_block(txn, failure, exc)
    return False
