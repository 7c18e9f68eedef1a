"""``atomic``: one transaction per call or block, savepoints when nested, retries when outermost.

The state of an open outermost block lives in ``session.info`` (so nesting is
found from the session, whichever ``Atomic`` object is used) and, for the
engine's ``handle_error`` event, in a context variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import inspect
import io
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

from flask import current_app, has_request_context, request
from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import DBAPIError, ResourceClosedError
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from . import _signals
from ._config import (
    RetryPolicy,
    Settings,
    StatusVeto,
    check_dialect_isolation,
    check_isolation,
    check_retries,
    check_wait_order,
)
from ._errors import (
    AmbiguousCommitError,
    ConfigError,
    NestingError,
    PendingWritesError,
    TransactionAbortedError,
    UsageError,
)
from ._retry import AMBIGUOUS_SQLSTATE, backoff, is_disconnect, is_retryable, sqlstate_of
from ._session import SQLITE_BEGIN, current_app_object, has_pending_writes
from ._timeouts import check_seconds, milliseconds

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._extension import FlaskTxn, _State

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("flask_txn")

_TXN = "flask_txn.transaction"
_UNSET: Any = object()
#: libpq's PQTRANS_INERROR, reported by psycopg2 and psycopg 3 alike.
_TRANSACTION_IN_ERROR = 3
#: SQLSTATE of a statement sent in a transaction that an earlier error aborted.
_IN_FAILED_TRANSACTION = "25P02"
_POSTGRESQL_ONLY = ("readonly", "deferrable", "statement_timeout", "lock_timeout")

#: Options that shape the retry loop: only an outermost decorated function has one.
_RETRY_OPTIONS = frozenset({"retries", "wait_initial", "wait_max", "deadline", "retry_on"})

RetryOn = Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...]

_current: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar(
    "flask_txn_transaction", default=None
)


class _Transaction:
    """One attempt of an outermost block: its savepoints, callbacks and recorded errors."""

    __slots__ = (
        "attempt",
        "callbacks",
        "committing",
        "doomed",
        "engine",
        "exposed",
        "frames",
        "isolation",
        "last_error",
        "options",
        "root",
        "savepoint_ids",
        "session",
        "started",
    )

    def __init__(
        self,
        session: Session,
        engine: Engine,
        options: _Options,
        attempt: int,
        started: float,
        exposed: Any = None,
    ) -> None:
        self.session = session
        #: the session user code sees (and signals carry): an AsyncSession in
        #: async blocks, whose sync ``session`` does the work.
        self.exposed: Any = session if exposed is None else exposed
        self.engine = engine
        self.options = options
        self.isolation = options.isolation
        self.attempt = attempt
        self.started = started
        #: (savepoint ids active at registration, callback, robust)
        self.callbacks: list[tuple[tuple[int, ...], Callable[[], object], bool]] = []
        #: open ``with`` blocks, innermost last: a savepoint, or for an outermost
        #: block the context-variable token to restore when it ends.
        self.frames: list[Any] = []
        self.savepoint_ids: list[int] = []
        #: the first retriable error seen, even if user code caught it.
        self.doomed: BaseException | None = None
        self.last_error: BaseException | None = None
        #: the session's transaction this block began, and whether the block
        #: itself is committing it (any other commit is user code's mistake).
        self.root: Any = None
        self.committing = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Options:
    """An outermost block's options after config defaults were applied."""

    isolation: str | None
    readonly: bool
    deferrable: bool
    statement_timeout: float | None
    lock_timeout: float | None
    policy: RetryPolicy
    veto: StatusVeto
    sqlite_begin: str | None
    #: ``TXN_CONNECT_TIMEOUT``: how long a block keeps retrying connections that
    #: could not be made.
    connect_timeout: float | None
    #: nothing to apply as the transaction begins: no isolation level, BEGIN
    #: mode or read-only flag, no ``SET LOCAL`` (the default; checked per block).
    plain: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        plain = (
            self.isolation is None
            and self.sqlite_begin is None
            and not self.readonly  # deferrable needs readonly
            and self.statement_timeout is None
            and self.lock_timeout is None
        )
        object.__setattr__(self, "plain", plain)


_savepoint_ids = itertools.count(1)


class Outcome(enum.Enum):
    """How an attempt of an outermost function ended, when it did not raise."""

    COMMITTED = "committed"
    VETOED = "vetoed"
    RETRY = "retry"


#: ``session.info`` key that flask_txn.testing sets on sessions joined to a test's
#: outer transaction: there, commits are savepoint releases and per-transaction
#: settings (isolation, read-only, timeouts) cannot be applied.
JOINED = "flask_txn.joined"

#: Test hooks (flask_txn.testing): each injector may raise a database error just
#: before the outermost flush; each capture receives the callbacks of a commit
#: and returns whether they should still run.
fault_injectors: list[Callable[[Session], None]] = []
callback_captures: list[Callable[[list[Callable[[], object]]], bool]] = []


def record_error(context: ExceptionContext) -> None:
    """``handle_error`` listener: remember database errors of the open attempt.

    User code may catch a serialization failure and carry on; PostgreSQL would
    then turn COMMIT into a silent ROLLBACK. Recording here lets the block see it.
    A connection that could not be made (refused, the server starting up or
    shutting down) dooms the attempt too: nothing was sent, so running it again
    is safe, and the server may be back by then.
    """
    txn = _current.get()
    if txn is None or context.engine is not txn.engine or context.is_pre_ping:
        return
    error = context.sqlalchemy_exception or context.original_exception
    txn.last_error = error
    reconnect = context.connection is None and _may_reconnect(txn)
    if txn.doomed is None and (context.is_disconnect or reconnect or is_retryable(error)):
        txn.doomed = error


def _may_reconnect(txn: _Transaction) -> bool:
    """Whether a connection that could not be made is worth another attempt: only
    while the block has run for less than the connect timeout in all. A connect
    that ran out of it (a host that does not answer) would make each retry wait
    as long again."""
    limit = txn.options.connect_timeout
    return limit is None or time.perf_counter() - txn.started < limit


class Atomic:
    """A transaction boundary usable as a decorator and as a ``with`` block.

    Create it with :func:`atomic` or :meth:`FlaskTxn.atomic`. The object keeps
    no per-call state: it may be reused, nested and shared between threads.
    """

    __slots__ = (
        "_cached",
        "_explicit",
        "_extension",
        "deadline",
        "deferrable",
        "durable",
        "isolation",
        "lock_timeout",
        "readonly",
        "retries",
        "retry_on",
        "statement_timeout",
        "wait_initial",
        "wait_max",
    )

    def __init__(
        self,
        *,
        isolation: str | None = _UNSET,
        retries: int = _UNSET,
        wait_initial: float = _UNSET,
        wait_max: float = _UNSET,
        deadline: float | None = _UNSET,
        retry_on: RetryOn | None = None,
        readonly: bool = _UNSET,
        deferrable: bool = _UNSET,
        statement_timeout: float | None = None,
        lock_timeout: float | None = None,
        durable: bool = False,
        _extension: FlaskTxn | None = None,
    ) -> None:
        given = {
            "isolation": isolation,
            "retries": retries,
            "wait_initial": wait_initial,
            "wait_max": wait_max,
            "deadline": deadline,
            "retry_on": _UNSET if retry_on is None else retry_on,
            "readonly": readonly,
            "deferrable": deferrable,
        }
        self._explicit = frozenset(name for name, value in given.items() if value is not _UNSET)
        self._extension = _extension
        self._cached: tuple[Any, Any, bool, _Options] | None = None
        self.isolation = (
            check_isolation("isolation", isolation) if isolation is not _UNSET else None
        )
        self.retries = check_retries("retries", retries) if retries is not _UNSET else None
        self.wait_initial = (
            check_seconds("wait_initial", wait_initial) if wait_initial is not _UNSET else None
        )
        self.wait_max = check_seconds("wait_max", wait_max) if wait_max is not _UNSET else None
        if self.wait_initial is not None and self.wait_max is not None:
            check_wait_order("wait_max", self.wait_initial, self.wait_max)
        self.deadline = (
            check_seconds("deadline", deadline, optional=True, zero=False)
            if deadline is not _UNSET
            else None
        )
        self.retry_on = _check_retry_on(retry_on)
        self.readonly = _check_flag("readonly", readonly) if readonly is not _UNSET else False
        self.deferrable = (
            _check_flag("deferrable", deferrable) if deferrable is not _UNSET else False
        )
        self.durable = _check_flag("durable", durable)
        self.statement_timeout = check_seconds(
            "statement_timeout", statement_timeout, optional=True, zero=False
        )
        self.lock_timeout = check_seconds("lock_timeout", lock_timeout, optional=True, zero=False)
        if self.deferrable and not self.readonly:
            raise ConfigError(
                "'deferrable=True' needs 'readonly=True' (and isolation 'SERIALIZABLE'):"
                " PostgreSQL only defers read-only serializable transactions."
            )
        if self.deferrable and "isolation" in self._explicit and self.isolation != "SERIALIZABLE":
            raise ConfigError(
                f"'deferrable=True' needs isolation 'SERIALIZABLE', got {self.isolation!r}."
            )

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={getattr(self, name)!r}" for name in sorted(self._explicit))
        return f"<atomic({options})>"

    # -- decorator -----------------------------------------------------------

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Run ``func`` in a transaction, re-running it on retriable errors when outermost."""
        _refuse_unsupported(func)
        if inspect.iscoroutinefunction(func):
            from . import _async

            return _async.decorate(self, func)  # type: ignore[return-value]

        @functools.wraps(func)
        def atomic_call(*args: P.args, **kwargs: P.kwargs) -> R:
            state, session, txn = self._open()
            if txn is not None:
                # Inside another block: a savepoint, and the outermost block
                # alone decides about retries.
                self._check_nested(txn)
                with _Savepoint(txn):
                    return func(*args, **kwargs)
            return self._run(state, session, atomic_call, func, args, kwargs)

        return atomic_call

    def _run(
        self,
        state: _State,
        session: Session,
        wrapper: Callable[..., R],
        func: Callable[..., R],
        args: Any,
        kwargs: Any,
    ) -> R:
        options = self._options(state, state.engine, retrying=True)
        policy = options.policy
        _prepare(session)
        started = time.perf_counter()
        body = keep_request_body(policy)
        for attempt in itertools.count(1):  # pragma: no branch - left by return or raise
            rewind_request_body(body)
            txn = _Transaction(session, state.engine, options, attempt, started)
            token = _current.set(txn)
            try:
                error: BaseException | None = None
                rv: Any = None
                try:
                    _begin(txn)
                    rv = func(*args, **kwargs)
                except BaseException as exc:
                    error = exc
                outcome, failure, delay = self._conclude(txn, error, rv, wrapper, state)
            finally:
                _current.reset(token)
            if outcome is Outcome.RETRY:
                _retrying(txn, failure, delay, final=attempt + 1 > policy.retries)
                state.settings.sleep(delay)
                continue
            if outcome is Outcome.COMMITTED:
                _committed(txn)
            return rv  # type: ignore[no-any-return]
        raise AssertionError("unreachable")  # pragma: no cover

    def _conclude(
        self,
        txn: _Transaction,
        error: BaseException | None,
        rv: Any,
        wrapper: Callable[..., Any],
        state: _State,
    ) -> tuple[Outcome, Any, float]:
        """End an attempt of the outermost function: commit, veto, or roll back.

        Returns the outcome with, for ``RETRY``, the failure and the seconds to
        wait; raises the failure when it is not to be re-run.
        """
        options = txn.options
        policy = options.policy
        if error is None and txn.doomed is None:
            if _vetoed(rv, options.veto, wrapper):
                _rollback(txn, reason="veto", error=None)
                return Outcome.VETOED, None, 0.0
            error = _commit(txn)
            if error is None:
                return Outcome.COMMITTED, None, 0.0
        failure = error if error is not None else txn.doomed
        assert failure is not None
        retriable = isinstance(failure, Exception) and (
            txn.doomed is not None or self._retriable(failure)
        )
        delay = backoff(policy, txn.attempt, state.settings.random) if retriable else 0.0
        give_up = (
            not retriable
            or txn.attempt > policy.retries
            or (
                policy.deadline is not None
                and time.perf_counter() - txn.started + delay > policy.deadline
            )
        )
        if give_up:
            _rollback(txn, reason="error", error=failure, exhausted=retriable)
            if retriable:
                _note_attempts(failure, txn.attempt)
            raise failure
        _rollback(txn, reason="retry", error=failure)
        return Outcome.RETRY, failure, delay

    def _retriable(self, error: Exception) -> bool:
        if is_retryable(error):
            return True
        retry_on = self.retry_on
        if retry_on is None:
            return False
        if isinstance(retry_on, type | tuple):
            return isinstance(error, retry_on)
        return bool(retry_on(error))

    # -- with block ----------------------------------------------------------

    def _refuse_retry_options(self) -> None:
        for name in sorted(self._explicit & _RETRY_OPTIONS):
            raise ConfigError(
                f"{name!r} cannot be used with a 'with atomic(...)' block (got"
                f" {name}={getattr(self, name)!r}): a block cannot be re-run. Decorate a"
                f" function with '@atomic({name}=...)' instead."
            )

    async def __aenter__(self) -> AsyncSession:
        from . import _async

        self._refuse_retry_options()
        return await _async.enter_block(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        from . import _async

        return await _async.exit_block(exc_type, exc, tb)

    def __enter__(self) -> Session:
        self._refuse_retry_options()
        state, session, txn = self._open()
        if txn is not None:
            self._check_nested(txn)
            _Savepoint(txn).__enter__()
            return session
        options = self._options(state, state.engine, retrying=False)
        _prepare(session)
        txn = _Transaction(session, state.engine, options, 1, time.perf_counter())
        token = _current.set(txn)
        try:
            _begin(txn)
        except BaseException as exc:
            try:
                _rollback(txn, reason="error", error=exc)
            finally:
                _current.reset(token)
            raise
        txn.frames.append(token)
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        # The innermost open block of this context, found the way it was
        # entered, so that no path out of here leaves it set.
        txn = _current.get()
        assert txn is not None, "__exit__ without __enter__"
        frame = txn.frames[-1]
        if isinstance(frame, _Savepoint):
            frame.__exit__(exc_type, exc, tb)  # pops its own frame
            return False
        txn.frames.pop()
        try:
            if self._state().registry() is not txn.session:
                _end(txn)
                txn.session.rollback()
                raise UsageError(
                    "The session was removed inside a 'with atomic()' block, so the"
                    " transaction was lost. Do not call 'session.remove()' inside a block."
                )
            failure = _finish_block(txn, exc)
        finally:
            _current.reset(frame)
        _after_block(txn, failure, exc)
        return False

    # -- shared --------------------------------------------------------------

    def _open(self) -> tuple[_State, Session, _Transaction | None]:
        """The app's state, its current session, and the block already open on it."""
        state = self._state()
        refuse_mixing(async_block=False)
        session = state.registry()
        return state, session, session.info.get(_TXN)

    def _state(self) -> _State:
        if self._extension is not None:
            return self._extension._get_state()
        try:
            app = current_app_object()
        except RuntimeError:
            raise UsageError(
                "'atomic' was used outside of an application context: it needs one to"
                " find the app's database. Use it in a request, a CLI command, or"
                " 'with app.app_context():'."
            ) from None
        extension = app.extensions.get("flask-txn")
        if extension is None:
            raise UsageError(
                f"No flask-txn extension is registered on the current app"
                f" {app.name!r}. Did you forget to call 'FlaskTxn(app)' or"
                " 'txn.init_app(app)'?"
            )
        return extension._get_state(app)  # type: ignore[no-any-return]

    def _options(self, state: _State, engine: Engine, *, retrying: bool) -> _Options:
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
        options = self._resolve(state.settings, engine, retrying=retrying)
        _check_dialect(engine, options)
        self._cached = (weakref.ref(state), weakref.ref(engine), retrying, options)
        return options

    def _resolve(self, settings: Settings, engine: Engine, *, retrying: bool) -> _Options:
        default = settings.retry
        if retrying:
            policy = RetryPolicy(
                retries=default.retries if self.retries is None else self.retries,
                wait_initial=default.wait_initial
                if self.wait_initial is None
                else self.wait_initial,
                wait_max=default.wait_max if self.wait_max is None else self.wait_max,
                deadline=self.deadline if "deadline" in self._explicit else default.deadline,
            )
            if self.wait_initial is None or self.wait_max is None:
                check_wait_order("wait_max", policy.wait_initial, policy.wait_max)
        else:
            # A block cannot be re-run: the configured retries never apply to it.
            policy = RetryPolicy(0, 0.0, 0.0, None)
        isolation = self.isolation if "isolation" in self._explicit else settings.isolation
        if self.deferrable and isolation != "SERIALIZABLE":
            raise ConfigError(
                f"'deferrable=True' needs isolation 'SERIALIZABLE', but the level in force"
                f" is {isolation!r}. Pass isolation='SERIALIZABLE'."
            )
        return _Options(
            isolation=isolation,
            readonly=self.readonly,
            deferrable=self.deferrable,
            statement_timeout=self.statement_timeout,
            lock_timeout=self.lock_timeout,
            policy=policy,
            veto=settings.rollback_on_status,
            sqlite_begin=settings.sqlite_begin if engine.dialect.name == "sqlite" else None,
            connect_timeout=settings.timeouts.connect,
        )

    def _check_nested(self, txn: _Transaction) -> None:
        """Refuse options that only the outermost block can honour."""
        outer = txn.options
        outermost_only = sorted(self._explicit & _RETRY_OPTIONS) + [
            name
            for name in ("durable", "statement_timeout", "lock_timeout")
            if getattr(self, name) not in (False, None)
        ]
        for name in outermost_only:
            raise NestingError(
                f"{name}={getattr(self, name)!r} cannot be used on a nested atomic block: it"
                " only applies to the outermost block. Move it to the outermost"
                f" 'atomic', or remove it here.{_durable_hint(name)}"
            )
        for name, value, outer_value in (
            ("isolation", self.isolation, outer.isolation),
            ("readonly", self.readonly, outer.readonly),
            ("deferrable", self.deferrable, outer.deferrable),
        ):
            if name in self._explicit and value != outer_value:
                raise NestingError(
                    f"{name}={value!r} differs from the enclosing atomic block's"
                    f" {name}={outer_value!r}; a savepoint cannot change it. Set it on"
                    " the outermost block, or remove it here."
                )


def _durable_hint(name: str) -> str:
    if name != "durable":
        return ""
    return (
        " ('durable=True' promises that the block commits on its own, but it was"
        " entered inside another block.)"
    )


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name!r} must be True or False, got {value!r}.")
    return value


def _check_retry_on(value: object) -> RetryOn | None:
    if value is None or (callable(value) and not isinstance(value, type)):
        return value
    classes = value if isinstance(value, tuple) else (value,)
    if classes and all(isinstance(c, type) and issubclass(c, BaseException) for c in classes):
        return value  # type: ignore[return-value]
    raise ConfigError(
        "'retry_on' must be an exception class, a tuple of exception classes, or a"
        f" callable(exception) -> bool, got {value!r}."
    )


def _refuse_unsupported(func: Callable[..., Any]) -> None:
    """A generator's body would run after the transaction ended."""
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise UsageError(
            f"'atomic' cannot decorate {func.__qualname__!r}, a generator function: its"
            " body would run after the transaction had ended. Decorate a plain function"
            " (or coroutine) that builds the data, and stream outside it."
        )


def refuse_mixing(*, async_block: bool) -> None:
    """Sync and async blocks use different sessions: one cannot nest in the other."""
    txn = _current.get()
    if txn is None or (txn.exposed is not txn.session) == async_block:
        return
    inner, outer = ("an async", "a sync") if async_block else ("a sync", "an async")
    raise UsageError(
        f"{inner} atomic block was entered inside {outer} one. They use different"
        " sessions and connections, so the inner one would be a separate transaction"
        " that commits on its own. Make both sync or both async."
    )


def _prepare(session: Session) -> None:
    """Before the first attempt: end a transaction of reads, refuse to lose writes."""
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


def keep_request_body(policy: RetryPolicy) -> bytes | None:
    """Before a view's first attempt: its request body, read into memory if the
    view may be re-run, so that every attempt can read all of it (see
    :func:`rewind_request_body`). None if there is nothing to keep: no retries,
    no request, or no body (no ``Content-Length`` above 0, not chunked)."""
    if not policy.retries or not has_request_context():
        return None
    environ = request.environ
    if environ.get("CONTENT_LENGTH", "") in ("", "0") and "HTTP_TRANSFER_ENCODING" not in environ:
        return None
    return request.get_data(cache=True)


def rewind_request_body(body: bytes | None) -> None:
    """At the start of an attempt: ``request.stream`` reads the kept body from its
    start (``get_data()``, ``get_json()`` and ``form`` read the kept copy anyway)."""
    if body is not None:
        # Werkzeug's cached_property: setting it replaces the cached stream.
        request.stream = io.BytesIO(body)


def _begin(txn: _Transaction) -> None:
    """Start the outermost transaction with its options applied before any statement."""
    session = txn.session
    txn.root = session.begin()
    session.info[_TXN] = txn
    _apply_options(session, txn.options)


def _finish_block(txn: _Transaction, exc: BaseException | None) -> BaseException | None:
    """End an outermost ``with`` block: commit, or roll back; return the failure."""
    failure = exc if exc is not None else txn.doomed
    if failure is None:
        failure = _commit(txn)
    if failure is not None:
        _rollback(txn, reason="error", error=failure)
    return failure


def _after_block(
    txn: _Transaction, failure: BaseException | None, exc: BaseException | None
) -> None:
    """After an outermost ``with`` block: the commit's aftermath, or its own failure."""
    if failure is None:
        _committed(txn)
    elif failure is not exc:
        raise failure


def _check_dialect(engine: Engine, options: _Options) -> None:
    dialect = engine.dialect.name
    check_dialect_isolation("isolation", options.isolation, dialect)
    if dialect != "postgresql":
        for name in _POSTGRESQL_ONLY:
            value = getattr(options, name)
            if value:
                raise ConfigError(
                    f"{name}={value!r} needs PostgreSQL; the database is {dialect!r}."
                    f" Remove {name!r} for this database."
                )


def _apply_options(session: Session, options: _Options) -> None:
    if options.plain or session.info.get(JOINED):
        return  # flask_txn.testing documents that the test's transaction rules.
    execution_options: dict[str, Any] = {}
    if options.sqlite_begin is not None:
        # Writers queue on SQLite's busy timeout at BEGIN instead of failing
        # with SQLITE_BUSY when a read lock cannot be upgraded mid-transaction.
        execution_options[SQLITE_BEGIN] = options.sqlite_begin
    if options.isolation is not None:
        execution_options["isolation_level"] = options.isolation
    if options.readonly:
        execution_options["postgresql_readonly"] = True
    if options.deferrable:
        execution_options["postgresql_deferrable"] = True
    if execution_options:
        if isinstance(session.get_bind(), Connection):
            raise UsageError(
                f"isolation/readonly options {execution_options!r} cannot be applied: the"
                " session is bound to a connection whose transaction already began."
            )
        session.connection(execution_options=execution_options)
    for setting, seconds in (
        ("statement_timeout", options.statement_timeout),
        ("lock_timeout", options.lock_timeout),
    ):
        if seconds is not None:
            # A validated integer literal: SET takes no bound parameters.
            session.execute(text(f"SET LOCAL {setting} = {milliseconds(seconds)}"))


def _end(txn: _Transaction) -> None:
    """Forget the block's state, so code after it (callbacks too) starts a new block."""
    txn.session.info.pop(_TXN, None)


def _commit(txn: _Transaction) -> BaseException | None:
    """Flush and commit; return the error instead of raising it, unless it is final."""
    session = txn.session
    try:
        for inject in fault_injectors:
            inject(session)
        # Ordinary errors (constraints, triggers) surface here, before COMMIT,
        # so that only COMMIT itself can leave an outcome unknown.
        session.flush()
    except Exception as exc:
        return exc
    if session.get_transaction() is not txn.root:
        return UsageError(
            "The transaction was rolled back inside the atomic block (session.rollback()"
            " or session.close()), so the writes made before that are lost and those"
            " made after it would be committed alone. Do not end the session's"
            " transaction inside a block: raise instead, or use a nested 'atomic'"
            " block to undo part of the work."
        )
    caught = txn.last_error
    if caught is not None and _aborted(session):
        error = TransactionAbortedError(
            "A database error aborted this transaction, but the function caught it and"
            " returned normally, so nothing was committed. Let the error propagate, or"
            " wrap the failing statement in a nested 'atomic' block (a savepoint)."
        )
        error.__cause__ = caught
        return error
    txn.committing = True
    try:
        session.commit()
    except Exception as exc:
        if is_disconnect(exc) or sqlstate_of(exc) == AMBIGUOUS_SQLSTATE:
            ambiguous = AmbiguousCommitError(
                "COMMIT's outcome is unknown (the connection was lost while waiting for its"
                " reply, or the server reported SQLSTATE 40003): the transaction may or"
                " may not have committed, so it is not retried."
                " Make the operation idempotent (store an idempotency key in the same"
                " transaction) and let the client retry with the same key."
            )
            ambiguous.__cause__ = exc
            _end(txn)
            _rollback(txn, reason="error", error=ambiguous)
            raise ambiguous from exc
        return exc
    return None


def refuse_inner_commit(session: Session) -> None:
    """``before_commit`` listener: only the outermost block commits its transaction."""
    txn: _Transaction | None = session.info.get(_TXN)
    if txn is not None and not txn.committing and session.get_nested_transaction() is None:
        raise UsageError(
            "'session.commit()' was called inside an atomic block. The block commits"
            " when it ends; committing earlier would make part of its work permanent"
            " even if the rest fails. Remove the call, or use 'session.flush()' to send"
            " the changes to the database without committing."
        )


def _aborted(session: Session) -> bool:
    """True if the database considers the open transaction failed, so that it
    would turn COMMIT into a silent ROLLBACK (PostgreSQL does)."""
    connection = session.connection()
    info = getattr(connection.connection.driver_connection, "info", None)
    status = getattr(info, "transaction_status", None)
    if status is not None:  # psycopg2 and psycopg 3 report libpq's status
        return bool(status == _TRANSACTION_IN_ERROR)
    # Other drivers (asyncpg, sqlite3) do not: ask the database. Only done
    # after an error, so the extra statement costs nothing on the hot path.
    try:
        connection.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        return sqlstate_of(exc) == _IN_FAILED_TRANSACTION
    return False


def _rollback(
    txn: _Transaction,
    *,
    reason: str,
    error: BaseException | None,
    exhausted: bool = False,
) -> None:
    """Roll back, returning the connection to the pool, then tell the receivers."""
    _end(txn)
    try:
        txn.session.rollback()
    except Exception:
        # The original error matters more; the pool discards a broken connection.
        log.exception("Rollback failed; closing the session.")
        txn.session.close()
    _signals.send_rolled_back(
        current_app_object(),
        **_payload(txn),
        reason=reason,
        error=error,
        sqlstate=None if error is None else sqlstate_of(error),
        exhausted=exhausted,
    )


def _retrying(txn: _Transaction, error: BaseException, delay: float, *, final: bool) -> None:
    sqlstate = sqlstate_of(error)
    log.info(
        "Retrying transaction: attempt %d failed with %s; waiting %.3f s.",
        txn.attempt,
        # A connection that was lost or never made has no SQLSTATE: name the error.
        f"SQLSTATE {sqlstate}" if sqlstate else type(error).__name__,
        delay,
    )
    if _signals.transaction_retrying.receivers:
        _signals.send(
            _signals.transaction_retrying,
            current_app_object(),
            **_payload(txn),
            error=error,
            sqlstate=sqlstate,
            delay=delay,
            final=final,
        )


def _committed(txn: _Transaction) -> None:
    """After COMMIT: the signal, then the on_commit callbacks, outside any block."""
    _end(txn)
    if _signals.transaction_committed.receivers:
        _signals.send(_signals.transaction_committed, current_app_object(), **_payload(txn))
    if callback_captures:
        callbacks = [func for _, func, _ in txn.callbacks]
        # Every capture sees the callbacks; any of them may hold them back.
        if not all([capture(callbacks) for capture in callback_captures]):
            return
    if txn.callbacks:
        _run_callbacks(txn.callbacks)


def _payload(txn: _Transaction) -> dict[str, Any]:
    return {
        "session": txn.exposed,
        "attempt": txn.attempt,
        "isolation": txn.isolation,
        "endpoint": request.endpoint if has_request_context() else None,
        "elapsed": time.perf_counter() - txn.started,
    }


def _note_attempts(error: BaseException, attempts: int) -> None:
    error.txn_attempts = attempts  # type: ignore[attr-defined]
    error.add_note(f"flask-txn: gave up after {attempts} attempt(s).")


def _vetoed(rv: object, veto: StatusVeto, wrapper: Callable[..., Any]) -> bool:
    """True if the view returned a response that asks for a rollback.

    Only the request's view function is judged (``TXN_ROLLBACK_ON_STATUS``): a
    helper returning a tuple like ``(item_id, 500)`` is data, not a response.
    """
    if veto is None:
        return False
    if callable(veto):
        return has_request_context() and _is_current_view(wrapper) and bool(veto(rv))
    # The status first: finding the view is only worth it for an error response.
    status = _status_of(rv)
    return (
        status is not None
        and status >= veto
        and has_request_context()
        and _is_current_view(wrapper)
    )


def _is_current_view(wrapper: Callable[..., Any]) -> bool:
    """True if ``wrapper`` is (or is wrapped by) the view serving this request."""
    view = current_app.view_functions.get(request.endpoint or "")
    while view is not None:
        if view is wrapper:
            return True
        view_class = getattr(view, "view_class", None)
        if view_class is not None:
            # A class-based view whose method was decorated.
            return getattr(view_class, request.method.lower(), None) is wrapper
        view = getattr(view, "__wrapped__", None)
    return False


def _status_of(rv: object) -> int | None:
    """The HTTP status of a view's return value, without touching a streamed body."""
    if isinstance(rv, tuple) and len(rv) in (2, 3):
        status = rv[1]
        if isinstance(status, int) and not isinstance(status, bool):
            return status
        if isinstance(status, str) and status.split(" ", 1)[0].isdigit():
            return int(status.split(" ", 1)[0])
        return _status_of(rv[0])
    if isinstance(rv, Response):
        return rv.status_code
    return None


class _Savepoint:
    """A nested block: a SAVEPOINT, and the callbacks registered under it."""

    __slots__ = ("id", "nested", "txn")

    def __init__(self, txn: _Transaction) -> None:
        self.txn = txn

    def __enter__(self) -> None:
        txn = self.txn
        self.nested = txn.session.begin_nested()
        self.id = next(_savepoint_ids)
        txn.savepoint_ids.append(self.id)
        txn.frames.append(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        txn = self.txn
        txn.frames.pop()
        txn.savepoint_ids.pop()
        if exc is None:
            try:
                self.nested.commit()
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        txn = self.txn
        # A failed flush leaves the savepoint inactive but open: it still needs
        # its ROLLBACK TO SAVEPOINT. One that user code already ended is closed.
        with contextlib.suppress(ResourceClosedError):
            self.nested.rollback()
        txn.callbacks = [entry for entry in txn.callbacks if self.id not in entry[0]]


def on_commit(func: Callable[[], object], *, robust: bool = False) -> None:
    """Run ``func()`` once the outermost atomic block has committed.

    It never runs if the transaction, the savepoint it was registered in, or the
    attempt rolls back. Callbacks run in registration order after the
    :data:`transaction_committed` signal, outside any block. Every callback
    runs; a failure is logged, and with ``robust=False`` the first one is
    re-raised to the caller after the others ran (the data stays committed).

    :param func: a callable taking no arguments.
    :param robust: log and swallow an exception from ``func`` instead of raising it.
    """
    if not callable(func):
        raise ConfigError(
            f"'on_commit' needs a callable taking no arguments, got {func!r}. Pass the"
            " function itself (or functools.partial(f, ...)), not its result."
        )
    _check_flag("robust", robust)
    txn = _current.get()
    if txn is None:
        raise UsageError(
            "'on_commit' was called outside of an atomic block, so there is no commit to"
            " wait for. Call it inside '@atomic' or 'with atomic():'."
        )
    txn.callbacks.append((tuple(txn.savepoint_ids), func, robust))


def _run_callbacks(callbacks: list[tuple[tuple[int, ...], Callable[[], object], bool]]) -> None:
    first: BaseException | None = None
    for _, func, robust in callbacks:
        try:
            func()
        except Exception as exc:
            log.exception("on_commit callback %r raised after the commit.", func)
            if not robust and first is None:
                first = exc
    if first is not None:
        raise first


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
    statement_timeout: float | None = ...,
    lock_timeout: float | None = ...,
    durable: bool = ...,
) -> Atomic: ...


def atomic(func: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Run a function, or a ``with`` block, in one database transaction.

    ``@atomic`` and ``@atomic(...)`` decorate a view or any function called in
    an app context; ``with atomic(...):`` wraps a block. See :doc:`/atomic` for
    every option; options not given come from the ``TXN_*`` config.

    :param func: the function, when used as a bare ``@atomic``.
    :param options: ``isolation``, ``retries``, ``wait_initial``, ``wait_max``,
        ``deadline``, ``retry_on``, ``readonly``, ``deferrable``,
        ``statement_timeout``, ``lock_timeout``, ``durable``.
    """
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
