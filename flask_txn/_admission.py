"""Admission control: each attempt of a contended decorated function waits for a slot.

The retry loop of an outermost decorated function makes one :class:`Gate` per
call, keyed by ``atomic(contention_key=...)`` or else by the function
(:func:`key_of`), and runs each attempt as ``with gate.admit(attempt):``. Until
an attempt of the key ends in a conflict (:func:`~._retry.is_retryable`, and not
a lost connection), :meth:`Gate.admit` costs a dictionary look-up; after that,
the key's :class:`~._limiter.Limit` decides how many of its attempts run at once,
and the others queue here, in the app, instead of aborting each other in the
database.

What it promises: an attempt holds a slot from before ``BEGIN`` until its
``COMMIT`` or ``ROLLBACK`` ended, never during the backoff sleep, the signals
or the ``on_commit`` callbacks, and never after its block raised. A block
nested in another (a savepoint, or an outermost block of another session
entered inside one) takes no slot: the block around it holds one, and waiting
for a second could wait for itself. The wait is bounded: by the block's
``deadline`` left and by the pool timeout (``TXN_POOL_TIMEOUT``, else
``TXN_RETRY_DEADLINE``, else 30 s, SQLAlchemy's ``pool_timeout``); an attempt
still waiting then runs without a slot, so admission delays a request but
never fails it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ._limiter import Limit, Outcome, Waiter
from ._retry import is_disconnect, is_retryable
from ._state import AppState
from ._transaction import Attempt, current

#: SQLAlchemy's default ``pool_timeout``: the longest wait when nothing else bounds it.
DEFAULT_WAIT = 30.0


def key_of(func: Callable[..., Any]) -> str:
    """A decorated function's default contention key: its module and qualified name."""
    return f"{func.__module__}.{func.__qualname__}"


class Gate:
    """One call of a decorated function: the admission of each of its attempts."""

    __slots__ = ("key", "limits", "queued", "wait")

    def __init__(self, state: AppState, key: str) -> None:
        self.limits = state.limits
        self.key = key
        #: the longest an attempt waits for a slot, before its deadline is counted.
        self.wait = state.settings.timeouts.pool or DEFAULT_WAIT
        #: seconds the call's attempts waited for a slot so far.
        self.queued = 0.0

    def admit(self, attempt: Attempt) -> Attempt | Admitted:
        """The context manager that runs ``attempt``: with admission, or the attempt alone."""
        if self.limits is None or current() is not None:
            return attempt  # off, or inside another block, which holds the slot
        limit = self.limits.get(self.key)
        if limit is None:
            # Never conflicted: no slot to take, so nothing to wait for or give back.
            # The gate only hears how the attempt ended, to make a limit on a conflict.
            attempt.admission = self
            return attempt
        return Admitted(self, attempt, limit)

    def report(self) -> tuple[float, int | None]:
        """What the retry signal and log say: seconds queued, and the key's limit (or None)."""
        assert self.limits is not None
        limit = self.limits.get(self.key)
        return self.queued, None if limit is None else limit.slots

    def leave(self, ending: Any) -> None:
        """An attempt admitted without a slot ended (``ending``, a ``_transaction._Ending``)."""
        if _outcome(ending) == "conflict":
            assert self.limits is not None
            self.limits.conflicted(self.key)


class Admitted:
    """``with``/``async with``: wait for a slot, run the attempt, give the slot back as it ends."""

    __slots__ = ("_done", "_held", "_limit", "attempt", "gate")

    def __init__(self, gate: Gate, attempt: Attempt, limit: Limit) -> None:
        self.gate = gate
        self.attempt = attempt
        attempt.admission = self
        self._limit = limit
        self._held = False
        self._done = False

    def report(self) -> tuple[float, int | None]:
        """What the retry signal and log say (:meth:`Gate.report`)."""
        return self.gate.report()

    def leave(self, ending: Any) -> None:
        """The attempt committed or rolled back (``ending``, a ``_transaction._Ending``)."""
        self._release(_outcome(ending))

    # -- waiting -------------------------------------------------------------

    def _ask(self, loop: asyncio.AbstractEventLoop | None) -> Waiter | None:
        """Take a slot if the key's limit has one free; else the queued waiter."""
        waiter = Waiter(retry=self.attempt.number > 1, loop=loop)
        if self._limit.enter(waiter):
            self._held = True
            return None
        return waiter

    def _bound(self) -> float:
        """Seconds this attempt may wait: the gate's bound, and the block's deadline left."""
        policy = self.attempt.options.policy
        bound = self.gate.wait
        if policy is not None and policy.deadline is not None:
            left = policy.deadline - (time.perf_counter() - self.attempt.started)
            bound = min(bound, left)
        return max(0.0, bound)

    def _settle(self, waiter: Waiter, began: float, error: BaseException | None) -> None:
        """After the wait: hold the slot if granted; give it back if the wait raised."""
        self._held = self._limit.give_up(waiter)
        self.gate.queued += time.perf_counter() - began
        if error is not None:
            self._release("other")

    def _release(self, outcome: Outcome) -> None:
        """Adapt the key's limit to ``outcome`` and free the slot, once."""
        if self._done:
            return
        self._done = True
        held, self._held = self._held, False
        self._limit.leave(outcome, held=held)

    # -- sync ----------------------------------------------------------------

    def __enter__(self) -> Any:
        waiter = self._ask(None)
        if waiter is not None:
            began = time.perf_counter()
            try:
                waiter.wait(self._bound())
            except BaseException as exc:
                self._settle(waiter, began, exc)
                raise
            self._settle(waiter, began, None)
        return self.attempt.__enter__()  # sets a context variable: it cannot fail

    def __exit__(self, *exc_info: Any) -> bool:
        try:
            return self.attempt.__exit__(*exc_info)
        finally:
            self._release("other")  # a no-op unless the attempt ended without an ending

    # -- async ---------------------------------------------------------------

    async def __aenter__(self) -> Any:
        waiter = self._ask(asyncio.get_running_loop())
        if waiter is not None:
            began = time.perf_counter()
            try:
                await waiter.wait_async(self._bound())
            except BaseException as exc:
                self._settle(waiter, began, exc)
                raise
            self._settle(waiter, began, None)
        return await self.attempt.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool:
        try:
            return await self.attempt.__aexit__(*exc_info)
        finally:
            self._release("other")


def _outcome(ending: Any) -> Outcome:
    """A commit, a conflict (a retriable database error, not a lost connection), or other."""
    if ending.reason == "commit":
        return "commit"
    failure = ending.failure
    if failure is not None and is_retryable(failure) and not is_disconnect(failure):
        return "conflict"
    return "other"
