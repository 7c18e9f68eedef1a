"""The transaction core: one attempt of an outermost block, from BEGIN to COMMIT or ROLLBACK.

An :class:`Attempt` is the single source of truth for "am I inside a block?":
while it runs it is the context's current attempt (:func:`current`), and the
savepoints of blocks nested in it are a stack on it. The same attempt serves
sync code (``with attempt:``, on a ``Session``) and async code (``async with
attempt:``, on an ``AsyncSession``, whose steps run here through ``run_sync``):
only the awaiting differs.

Ending an attempt takes two steps. :meth:`Attempt._end` commits or rolls back,
still inside the block, so that the database errors it meets are recorded on
it. :meth:`Attempt._report` then runs outside the block: it sends the signals,
runs the ``on_commit`` callbacks and decides what the caller sees.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import has_request_context, request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.util import ScopedRegistry

from . import _commit, _replicas, _signals
from ._callbacks import Callback, run_callbacks
from ._errors import AmbiguousCommitError
from ._options import Options, apply
from ._retry import next_delay, should_retry, sqlstate_of
from ._session import AsyncDatabase, current_app_object
from ._testhooks import hooks

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger("flask_txn")


_current: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "flask_txn_attempt", default=None
)


def current() -> Attempt | None:
    """The attempt of the innermost outermost block open in this context, if any."""
    return _current.get()


def current_on(session: Session) -> Attempt | None:
    """The attempt open on ``session`` in this context: None if there is none, or if
    the open one uses another session (another app's, or another app context's)."""
    attempt = _current.get()
    return attempt if attempt is not None and attempt.session is session else None


@dataclasses.dataclass(frozen=True, slots=True)
class _Ending:
    """How :meth:`Attempt._end` ended the transaction, for :meth:`Attempt._report`."""

    #: ``"commit"``, or the rollback's reason: ``"veto"``, ``"retry"`` or ``"error"``.
    reason: str
    failure: BaseException | None = None
    exhausted: bool = False


_COMMITTED = _Ending("commit")
_VETOED = _Ending("veto")


class Attempt:
    """One run of an outermost block's transaction, and what happened in it.

    Enter it, call :meth:`begin` (the block's options are applied there, and a
    failure to connect is a failure of the attempt), run the block, and exit.
    On exit it commits, or rolls back. It returns True (swallowing the error)
    when it asks to be re-run (:attr:`retry_delay` is set), and it raises when
    the failure is one of its own (a commit's error, an aborted transaction).
    """

    __slots__ = (
        "_token",
        "admission",
        "callbacks",
        "committing",
        "database",
        "engine",
        "first_retriable_error",
        "last_error",
        "lock_failures",
        "number",
        "options",
        "registry",
        "replayed",
        "retry_delay",
        "root",
        "savepoints",
        "server",
        "session",
        "started",
        "user_session",
        "vetoed",
    )

    def __init__(
        self,
        session: Session,
        engine: Engine,
        options: Options,
        *,
        number: int = 1,
        started: float | None = None,
        registry: ScopedRegistry[Session] | None = None,
        user_session: AsyncSession | None = None,
        database: AsyncDatabase | None = None,
    ) -> None:
        #: the sync session that does the work.
        self.session = session
        #: the session user code holds and signals carry: ``session`` itself, or
        #: in async code the ``AsyncSession`` whose sync session it is.
        self.user_session: Session | AsyncSession = (
            session if user_session is None else user_session
        )
        self.engine = engine
        self.options = options
        #: 1 for the first attempt, 2 for the first re-run, ...
        self.number = number
        #: ``time.perf_counter()`` when the block's first attempt began.
        self.started = time.perf_counter() if started is None else started
        #: where ``session`` must still be current when the block ends (sync only).
        self.registry = registry
        #: where a re-run gets its new ``AsyncSession`` (async only).
        self.database = database
        #: (savepoints open at registration, callback, robust), in order.
        self.callbacks: list[Callback] = []
        #: the open nested blocks (``_savepoint.Savepoint``), innermost last.
        self.savepoints: list[Any] = []
        #: the first retriable database error seen, even if user code caught it:
        #: the attempt can no longer commit, and is re-run.
        self.first_retriable_error: BaseException | None = None
        #: the last database error seen, to explain an aborted transaction.
        self.last_error: BaseException | None = None
        #: (savepoint depth, error) of MySQL errors that undid one statement only.
        self.lock_failures: list[tuple[int, BaseException]] = []
        #: the session's transaction that :meth:`begin` began.
        self.root: Any = None
        #: the attempt is committing ``root`` itself (any other commit is a mistake).
        self.committing = False
        #: the view returned a response that asks for a rollback.
        self.vetoed = False
        #: seconds to wait before the next attempt, when this one asks for one.
        self.retry_delay: float | None = None
        #: the attempt answered with a stored response (``@idempotent``).
        self.replayed = False
        #: where :meth:`begin` began it: ``"primary"``, or a standby's URL.
        self.server = _replicas.PRIMARY
        #: its admission (``_admission.Admitted``, or the ``Gate`` of a key that never
        #: conflicted, which only hears how it ended), or None.
        self.admission: Any = None

    @classmethod
    def on_new_async_session(
        cls,
        database: AsyncDatabase,
        options: Options,
        number: int = 1,
        started: float | None = None,
    ) -> Attempt:
        """An attempt on a new ``AsyncSession``, which it closes when it ends."""
        session = database.factory()
        return cls(
            session.sync_session,
            database.sync_engine,
            options,
            number=number,
            started=started,
            user_session=session,
            database=database,
        )

    def next(self) -> Attempt:
        """The attempt that re-runs this block: in async code, on a new ``AsyncSession``."""
        if self.database is not None:
            return self.on_new_async_session(
                self.database, self.options, self.number + 1, self.started
            )
        return Attempt(
            self.session,
            self.engine,
            self.options,
            number=self.number + 1,
            started=self.started,
            registry=self.registry,
        )

    @property
    def is_async(self) -> bool:
        """True when user code works through an ``AsyncSession``."""
        return self.user_session is not self.session

    def begin(self) -> None:
        """Start the transaction, on the server the block runs on (a standby for a
        replica block), with the block's options applied before any statement."""
        self.server = _replicas.begin(self.session, self.engine, self.options, self._start)

    def _start(self, options: Options) -> None:
        self.root = self.session.begin()
        apply(self.session, options)

    async def run_sync(self, func: Callable[..., Any], *args: Any) -> Any:
        """Async code: run one of these sync steps where the sync session may do I/O."""
        session: AsyncSession = self.user_session  # type: ignore[assignment]
        return await session.run_sync(_call, func, *args)

    # -- sync and async entry and exit ---------------------------------------

    def __enter__(self) -> Any:
        self._token = _current.set(self)
        return self.user_session

    def __exit__(self, *exc_info: Any) -> bool:
        exc: BaseException | None = exc_info[1]
        try:
            ending = self._end(exc)
        finally:
            _current.reset(self._token)
            _replicas.end(self.session)
        return self._report(ending, exc)

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(self, *exc_info: Any) -> bool:
        exc: BaseException | None = exc_info[1]
        try:
            try:
                ending = await self.run_sync(self._end, exc)
            finally:
                _current.reset(self._token)
        finally:
            # The attempt owns its AsyncSession: the connection goes back before any wait.
            await self.user_session.close()  # type: ignore[misc]
        return self._report(ending, exc)

    # -- ending: inside the block --------------------------------------------

    def _end(self, error: BaseException | None) -> _Ending:
        """Commit, or roll back; say how and why."""
        failure = error if error is not None else self.first_retriable_error
        if failure is None:
            if self.vetoed:
                self._rollback()
                return _VETOED
            failure = self._commit()
            if failure is None:
                return _COMMITTED
        ending = self._after(failure)
        self._rollback()
        return ending

    def _after(self, failure: BaseException) -> _Ending:
        """Whether the attempt that failed with ``failure`` is re-run, and after how long."""
        policy = self.options.policy
        retriable = (
            policy is not None  # a with block cannot be re-run
            and isinstance(failure, Exception)  # not KeyboardInterrupt, SystemExit
            # It may have committed: running it again could apply it twice.
            and not isinstance(failure, AmbiguousCommitError)
            # A caught retriable error dooms the attempt whatever ended it.
            and (
                self.first_retriable_error is not None
                or should_retry(failure, self.options.retry_on)
            )
        )
        if not retriable:
            return _Ending("error", failure)
        assert policy is not None
        self.retry_delay = next_delay(policy, self.number, self.started, self.options.random)
        if self.retry_delay is None:
            return _Ending("error", failure, exhausted=True)
        return _Ending("retry", failure)

    def _commit(self) -> BaseException | None:
        """Flush and commit; return the error instead of raising it."""
        error = _commit.obstacle(
            self.session,
            self.root,
            registry=self.registry,
            with_block=self.options.policy is None,
            last_error=self.last_error,
            lock_failures=self.lock_failures,
        )
        if error is not None:
            return error
        try:
            # Ordinary errors (constraints, triggers) surface here, before COMMIT,
            # so that only COMMIT itself can leave an outcome unknown.
            self.session.flush()
        except Exception as exc:
            return exc
        self.committing = True
        return _replicas.commit(self.session, self.engine, _commit.commit)

    def _rollback(self) -> None:
        """Roll back, returning the connection to the pool."""
        try:
            self.session.rollback()
        except Exception:
            # The original error matters more; the pool discards a broken connection.
            log.exception("Rollback failed; closing the session.")
            self.session.close()

    # -- reporting: outside the block ----------------------------------------

    def _report(self, ending: _Ending, exc: BaseException | None) -> bool:
        """Signals and callbacks; True to swallow ``exc`` for a re-run."""
        if self.admission is not None:
            self.admission.leave(ending)  # the slot is free before signals and callbacks
        if ending is _COMMITTED:
            self._committed()
            return False
        failure = ending.failure
        _signals.send_rolled_back(
            current_app_object(),
            **self.payload(),
            reason=ending.reason,
            error=failure,
            sqlstate=None if failure is None else sqlstate_of(failure),
            exhausted=ending.exhausted,
        )
        if ending.reason == "retry":
            assert failure is not None
            self._retrying(failure)
            return True
        if failure is None:
            return False  # a veto: the view's response stands
        if ending.exhausted:
            failure.txn_attempts = self.number  # type: ignore[attr-defined]
            failure.add_note(f"flask-txn: gave up after {self.number} attempt(s).")
        if failure is exc:
            return False  # the block's own exception propagates unchanged
        raise failure

    def _retrying(self, error: BaseException) -> None:
        delay = self.retry_delay
        policy = self.options.policy
        assert delay is not None
        assert policy is not None
        sqlstate = sqlstate_of(error)
        queued, limit = (0.0, None) if self.admission is None else self.admission.report()
        log.info(
            "Retrying transaction: attempt %d failed with %s%s; waiting %.3f s"
            " (queued %.3f s for admission; limit %s).",
            self.number,
            # A connection that was lost or never made has no SQLSTATE: name the error.
            f"SQLSTATE {sqlstate}" if sqlstate else type(error).__name__,
            "" if self.server == _replicas.PRIMARY else f" on standby {self.server}",
            delay,
            queued,
            limit,
        )
        if _signals.transaction_retrying.receivers:
            _signals.send(
                _signals.transaction_retrying,
                current_app_object(),
                **self.payload(),
                error=error,
                sqlstate=sqlstate,
                delay=delay,
                final=self.number + 1 > policy.retries,
                queued=queued,
                limit=limit,
            )

    def _committed(self) -> None:
        """After COMMIT: the signal, then the on_commit callbacks, outside any block."""
        if _signals.transaction_committed.receivers:
            _signals.send(
                _signals.transaction_committed,
                current_app_object(),
                **self.payload(),
                replayed=self.replayed,
            )
        if hooks.release(self.callbacks) and self.callbacks:
            run_callbacks(self.callbacks)

    def payload(self) -> dict[str, Any]:
        """The keys every signal about this attempt carries."""
        return _signals.payload(
            session=self.user_session,
            attempt=self.number,
            isolation=self.options.isolation,
            endpoint=request.endpoint if has_request_context() else None,
            started=self.started,
            server=self.server,
        )


def _call(_session: Session, func: Callable[..., Any], *args: Any) -> Any:
    """``AsyncSession.run_sync``'s form: run ``func`` where the sync session may do I/O."""
    return func(*args)
