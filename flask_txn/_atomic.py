"""``atomic``: one transaction per call or block, savepoints when nested, retries when outermost.

A decorated function runs each attempt of the retry loop (:class:`~._retry.Retrying`)
as ``with attempt:``; a ``with atomic():`` block is one attempt that is never
re-run. Coroutines and ``async with`` take the same path with ``async``
forms: :class:`~._transaction.Attempt` and :class:`~._savepoint.Savepoint`
run their steps through ``AsyncSession.run_sync``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ._admission import Gate, key_of
from ._config import RetryOn
from ._errors import ConfigError, UsageError
from ._options import (
    RETRY_ARGUMENTS,
    UNSET,
    Arguments,
    Options,
    check_nested,
    resolve,
)
from ._retry import Retrying
from ._savepoint import Savepoint
from ._session import prepare
from ._state import AppState, app_state, async_database_of
from ._transaction import Attempt, current, current_on
from ._view import keep_request_body, mark_wrapped, rewind_request_body, vetoed

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

P = ParamSpec("P")
R = TypeVar("R")


class Atomic(Arguments):
    """A transaction boundary usable as a decorator and as a ``with`` block.

    Create it with :func:`atomic` or :meth:`FlaskTxn.atomic`. The object keeps
    no per-call state: it may be reused, nested and shared between threads.
    """

    __slots__ = ("_cached", "_extension")

    def __init__(
        self,
        *,
        isolation: str | None = UNSET,
        retries: int = UNSET,
        wait_initial: float = UNSET,
        wait_max: float = UNSET,
        deadline: float | None = UNSET,
        retry_on: RetryOn | None = None,
        readonly: bool = UNSET,
        deferrable: bool = UNSET,
        replica: bool = False,
        max_lag: float | None = None,
        statement_timeout: float | None = None,
        lock_timeout: float | None = None,
        durable: bool = False,
        contention_key: str | None = None,
        _extension: Any = None,
    ) -> None:
        super().__init__(
            {
                "isolation": isolation,
                "retries": retries,
                "wait_initial": wait_initial,
                "wait_max": wait_max,
                "deadline": deadline,
                # None is retry_on's documented default: the same as not given.
                "retry_on": UNSET if retry_on is None else retry_on,
                "readonly": readonly,
                "deferrable": deferrable,
                "replica": replica,
                "max_lag": max_lag,
                "statement_timeout": statement_timeout,
                "lock_timeout": lock_timeout,
                "durable": durable,
                "contention_key": UNSET if contention_key is None else contention_key,
            }
        )
        self._extension = _extension
        self._cached: tuple[Any, Any, bool, Options] | None = None

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={getattr(self, name)!r}" for name in sorted(self.explicit))
        return f"<atomic({options})>"

    # -- decorator -----------------------------------------------------------

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Run ``func`` in a transaction, re-running it on retriable errors when outermost."""
        _refuse_unsupported(func)
        if inspect.iscoroutinefunction(func):
            return self._decorate_coroutine(func)  # type: ignore[return-value]
        key = self.contention_key or key_of(func)

        @functools.wraps(func)
        def atomic_call(*args: P.args, **kwargs: P.kwargs) -> R:
            state, session, outer = self._open()
            if outer is not None:
                # Inside another block: a savepoint, and the outermost block
                # alone decides about retries.
                with Savepoint(outer):
                    return func(*args, **kwargs)
            options = self._options(state, state.engine, retrying=True)
            prepare(session)
            body = keep_request_body(options.policy)
            first = Attempt(session, state.engine, options, registry=state.registry)
            gate = Gate(state, key)
            for attempt in Retrying(first, state.settings.sleep):
                with gate.admit(attempt):
                    rewind_request_body(body)
                    attempt.begin()
                    rv = func(*args, **kwargs)
                    attempt.vetoed = vetoed(rv, options.veto, atomic_call)
            return rv

        mark_wrapped(func, atomic_call)
        return atomic_call

    def _decorate_coroutine(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        key = self.contention_key or key_of(func)

        @functools.wraps(func)
        async def atomic_call(*args: P.args, **kwargs: P.kwargs) -> R:
            state, outer = self._open_async()
            if outer is not None:
                async with Savepoint(outer):
                    return await func(*args, **kwargs)
            database = await async_database_of(state)
            options = self._options(state, database.sync_engine, retrying=True)
            body = keep_request_body(options.policy)
            first = Attempt.on_new_async_session(database, options)
            gate = Gate(state, key)
            async for attempt in Retrying(first, state.settings.sleep):
                async with gate.admit(attempt):
                    rewind_request_body(body)
                    await attempt.run_sync(attempt.begin)
                    rv = await func(*args, **kwargs)
                    attempt.vetoed = vetoed(rv, options.veto, atomic_call)
            return rv

        mark_wrapped(func, atomic_call)
        return atomic_call

    # -- with block ----------------------------------------------------------

    def __enter__(self) -> Session:
        self._refuse_retry_options()
        state, session, outer = self._open()
        if outer is not None:
            Savepoint(outer).__enter__()
            return session
        options = self._options(state, state.engine, retrying=False)
        prepare(session)
        attempt = Attempt(session, state.engine, options, registry=state.registry)
        attempt.__enter__()
        try:
            attempt.begin()
        except BaseException as exc:
            # The block never ran: end the attempt (roll back, report) before raising.
            attempt.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return session

    def __exit__(self, *exc_info: Any) -> Literal[False]:
        _innermost().__exit__(*exc_info)
        return False

    async def __aenter__(self) -> AsyncSession:
        self._refuse_retry_options()
        state, outer = self._open_async()
        if outer is not None:
            await Savepoint(outer).__aenter__()
            return outer.user_session  # type: ignore[return-value]
        database = await async_database_of(state)
        options = self._options(state, database.sync_engine, retrying=False)
        attempt = Attempt.on_new_async_session(database, options)
        await attempt.__aenter__()
        try:
            await attempt.run_sync(attempt.begin)
        except BaseException as exc:
            # The block never ran: end the attempt (roll back, report) before raising.
            await attempt.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return attempt.user_session  # type: ignore[return-value]

    async def __aexit__(self, *exc_info: Any) -> Literal[False]:
        await _innermost().__aexit__(*exc_info)
        return False

    # -- shared --------------------------------------------------------------

    def _open(self) -> tuple[AppState, Session, Attempt | None]:
        """The app's state, its current session, and the sync block this one nests in."""
        state = app_state(self._extension, user="'atomic' was used")
        _refuse_mixing(current(), async_block=False)
        session = state.registry()
        # A block of another app, or of another app context, is not enclosing.
        outer = current_on(session)
        if outer is not None:
            check_nested(self, outer.options)
        return state, session, outer

    def _open_async(self) -> tuple[AppState, Attempt | None]:
        """The app's state, and the async block this one nests in."""
        state = app_state(self._extension, user="'atomic' was used")
        outer = current()
        _refuse_mixing(outer, async_block=True)
        if outer is not None:
            check_nested(self, outer.options)
        return state, outer

    def _options(self, state: AppState, engine: Engine, *, retrying: bool) -> Options:
        """The block's options with the app's config applied, checked against ``engine``.

        Cached for the last app and engine: the settings are frozen and the
        block's own arguments never change, so the work is done once, not per call.
        """
        cached = self._cached
        if (
            cached is not None
            and cached[0]() is state
            and cached[1]() is engine
            and cached[2] is retrying
        ):
            return cached[3]
        options = resolve(self, state.settings, engine, retrying=retrying)
        self._cached = (weakref.ref(state), weakref.ref(engine), retrying, options)
        return options

    def _refuse_retry_options(self) -> None:
        # contention_key too: a block nested in another is admitted with it, a with block never.
        for name in sorted(self.explicit & (RETRY_ARGUMENTS | {"contention_key"})):
            raise ConfigError(
                f"{name!r} cannot be used with a 'with atomic(...)' block (got"
                f" {name}={getattr(self, name)!r}): a block cannot be re-run. Decorate a"
                f" function with '@atomic({name}=...)' instead."
            )


def _innermost() -> Attempt | Savepoint:
    """The innermost block open in this context, which a ``with`` block's exit ends."""
    attempt = current()
    assert attempt is not None, "exit without enter"
    # A nested block is a savepoint on the attempt of the outermost one.
    return attempt.savepoints[-1] if attempt.savepoints else attempt


def _refuse_unsupported(func: Callable[..., Any]) -> None:
    """A generator's body would run after the transaction ended; a class is no view."""
    if inspect.isclass(func):
        raise UsageError(
            f"'atomic' cannot decorate the class {func.__qualname__!r}: calling it would"
            " only create an object inside a transaction. Decorate the methods that need"
            " one (a MethodView's 'get', 'post', ...), or add 'atomic' to the class's"
            " 'decorators' list to run every request it serves in one."
        )
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise UsageError(
            f"'atomic' cannot decorate {func.__qualname__!r}, a generator function: its"
            " body would run after the transaction had ended. Decorate a plain function"
            " (or coroutine) that builds the data, and stream outside it."
        )


def _refuse_mixing(outer: Attempt | None, *, async_block: bool) -> None:
    """Sync and async blocks use different sessions: one cannot nest in the other."""
    if outer is None or outer.is_async == async_block:
        return
    inner, enclosing = ("an async", "a sync") if async_block else ("a sync", "an async")
    raise UsageError(
        f"{inner} atomic block was entered inside {enclosing} one. They use different"
        " sessions and connections, so the inner one would be a separate transaction"
        " that commits on its own. Make both sync or both async."
    )


def current_async_session() -> AsyncSession:
    """The ``AsyncSession`` of the innermost async atomic block of this task."""
    attempt = current()
    if attempt is None or not attempt.is_async:
        raise UsageError(
            "'async_session' is only available inside an async atomic block (an"
            " '@atomic' coroutine or 'async with atomic():'), which opens and closes it"
            " in the view's own event loop. Outside one, there is no session."
        )
    return attempt.user_session  # type: ignore[return-value]


#: Names users bring from other libraries (SQLAlchemy, stamina, Django), and ours.
_FAMILIAR = {
    "retry": "retries",
    "max_retries": "retries",
    "attempts": "retries",
    "isolation_level": "isolation",
    "read_only": "readonly",
    "timeout": "statement_timeout",
}


#: The arguments ``atomic`` takes, in signature order (read once: blocks are made per request).
_ARGUMENTS = tuple(name for name in inspect.signature(Atomic).parameters if name[0] != "_")


def check_names(options: dict[str, Any]) -> None:
    """Refuse an argument ``atomic`` does not take, with the closest it does."""
    allowed = _ARGUMENTS
    for name in options:
        if name not in allowed:
            close = _FAMILIAR.get(name) or next(
                iter(difflib.get_close_matches(name, allowed, n=1)), None
            )
            hint = f" Did you mean {close!r}?" if close else ""
            raise ConfigError(
                f"'atomic' got an unknown argument {name!r} (={options[name]!r}).{hint} It"
                f" takes {', '.join(repr(n) for n in allowed)}, all by keyword."
            )


@overload
def atomic(func: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def atomic(
    func: None = None,
    /,
    *,
    isolation: str | None = ...,
    retries: int = ...,
    wait_initial: float = ...,
    wait_max: float = ...,
    deadline: float | None = ...,
    retry_on: RetryOn | None = ...,
    readonly: bool = ...,
    deferrable: bool = ...,
    replica: bool = ...,
    max_lag: float | None = ...,
    statement_timeout: float | None = ...,
    lock_timeout: float | None = ...,
    durable: bool = ...,
    contention_key: str | None = ...,
) -> Atomic: ...


def atomic(func: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Run a function, or a ``with`` block, in one database transaction.

    ``@atomic`` and ``@atomic(...)`` decorate a view or any function called in
    an app context; ``with atomic(...):`` wraps a block. See :doc:`/atomic` for
    every option; options not given come from the ``TXN_*`` config.

    :param func: the function, when used as a bare ``@atomic``.
    :param options: ``isolation``, ``retries``, ``wait_initial``, ``wait_max``,
        ``deadline``, ``retry_on``, ``readonly``, ``deferrable``, ``replica``,
        ``max_lag``, ``statement_timeout``, ``lock_timeout``, ``durable``,
        ``contention_key``.
    """
    check_names(options)
    return decorate_or_open(Atomic(**options), func)


def decorate_or_open(block: Atomic, func: Any) -> Any:
    """``@atomic`` applies the block to ``func``; ``atomic(...)`` returns the block."""
    if func is None:
        return block
    if not callable(func):
        raise ConfigError(
            f"'atomic' takes a function or keyword options, got {func!r}. Write"
            " '@atomic', '@atomic(isolation=...)' or 'with atomic(...):'."
        )
    return block(func)
