"""Adaptive concurrency limits: how many attempts of a contended block run at once.

A :class:`Limits` holds one :class:`Limit` per contention key, created the
first time an attempt with that key ends in a conflict (a serialization
failure or deadlock). A key that never conflicted has no limit: its attempts
never look at a lock, let alone wait.

Each limit adapts by additive increase, multiplicative decrease (AIMD, as in
TCP's congestion avoidance and Netflix's ``concurrency-limits``): a conflict
halves it, down to the smallest allowed; a commit while the limit was in use
raises it by ``INCREASE / limit``, up to the largest allowed, so that it takes
about ``limit / INCREASE`` commits without conflict to admit one more attempt.
Attempts beyond the limit wait in a first-come, first-served queue, re-runs of
attempts that lost a conflict ahead of first attempts. Sync waiters wait on a
``threading.Event``; async waiters on a future of their own event loop, woken
from whichever thread frees the slot, so that a wait never blocks a loop.

This module knows nothing of transactions: :mod:`flask_txn._admission` asks it
for slots and tells it how each attempt ended.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import Literal

from ._errors import ConfigError

#: A conflict multiplies the limit by this.
DECREASE = 0.5
#: A commit adds this divided by the limit: one more slot per ``limit / INCREASE`` commits.
INCREASE = 0.1

#: How an attempt ended, as far as its limit is concerned.
Outcome = Literal["commit", "conflict", "other"]


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """The smallest and largest limit a contended key may have (``TXN_ADMISSION_LIMITS``)."""

    smallest: int
    largest: int


def read_bounds(enabled: object, limits: object) -> Bounds | None:
    """``TXN_ADMISSION`` and ``TXN_ADMISSION_LIMITS``, checked; None when admission is off."""
    if not isinstance(enabled, bool):
        raise ConfigError(
            f"'TXN_ADMISSION' must be True (limit the attempts of contended blocks that run"
            f" at once) or False (never limit them), got {enabled!r}."
        )
    valid = (
        isinstance(limits, tuple | list)
        and len(limits) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in limits)
        and 1 <= limits[0] <= limits[1]
    )
    if not valid:
        raise ConfigError(
            "'TXN_ADMISSION_LIMITS' must be a pair of whole numbers (smallest, largest) with"
            f" 1 <= smallest <= largest, got {limits!r}. The default is (1, 32); set"
            " 'TXN_ADMISSION' to False to turn admission control off."
        )
    assert isinstance(limits, tuple | list)
    return Bounds(limits[0], limits[1]) if enabled else None


def check_key(name: str, value: object) -> str:
    """``atomic(contention_key=...)``: a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{name!r} must be a non-empty string naming what the block contends for"
            f" (blocks with the same key share one admission limit), got {value!r}."
            " Leave it out to key the block by its function."
        )
    return value


class Waiter:
    """One attempt waiting for a slot: granted by :meth:`Limit.leave`."""

    __slots__ = ("_event", "_future", "_loop", "granted", "retry")

    def __init__(self, *, retry: bool, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.retry = retry
        #: set, under the limit's lock, when the slot is this waiter's.
        self.granted = False
        self._loop = loop
        self._event = threading.Event() if loop is None else None
        self._future: asyncio.Future[None] | None = None if loop is None else loop.create_future()

    def _wake(self) -> bool:
        """Tell the waiter it has the slot; False if it can no longer be told."""
        if self._event is not None:
            self._event.set()
            return True
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, self._future)
        except RuntimeError:  # the loop was closed: nobody waits there any more
            return False
        return True

    def wait(self, timeout: float) -> None:
        """Sync: wait until woken or ``timeout`` seconds passed."""
        assert self._event is not None
        self._event.wait(timeout)

    async def wait_async(self, timeout: float) -> None:
        """Async: wait, without blocking the loop, until woken or ``timeout`` seconds passed."""
        assert self._future is not None
        await asyncio.wait([self._future], timeout=timeout)  # never cancels the future


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class Limit:
    """One contention key's adaptive limit, its running attempts and its queue."""

    __slots__ = ("_first", "_lock", "_retries", "bounds", "limit", "running")

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        #: the limit, a real number between the bounds; ``slots`` attempts may run.
        self.limit = float(bounds.largest)
        #: attempts that hold a slot.
        self.running = 0
        self._lock = threading.Lock()
        self._first: collections.deque[Waiter] = collections.deque()
        self._retries: collections.deque[Waiter] = collections.deque()

    @property
    def slots(self) -> int:
        """How many attempts may run at once now."""
        return max(self.bounds.smallest, int(self.limit))

    @property
    def waiting(self) -> int:
        """How many attempts wait for a slot."""
        return len(self._first) + len(self._retries)

    def enter(self, waiter: Waiter) -> bool:
        """Take a slot if one is free and nobody waits ahead; else queue ``waiter``."""
        with self._lock:
            ahead = bool(self._retries) if waiter.retry else self.waiting > 0
            if not ahead and self.running < self.slots:
                self.running += 1
                return True
            (self._retries if waiter.retry else self._first).append(waiter)
            return False

    def give_up(self, waiter: Waiter) -> bool:
        """Stop waiting: True if the slot was granted meanwhile (the caller holds it)."""
        with self._lock:
            if waiter.granted:
                return True
            (self._retries if waiter.retry else self._first).remove(waiter)
            return False

    def leave(self, outcome: Outcome, *, held: bool) -> None:
        """An attempt ended: adapt the limit, free its slot if it ``held`` one, admit the next."""
        with self._lock:
            if outcome == "conflict":
                self.limit = max(float(self.bounds.smallest), self.limit * DECREASE)
            elif outcome == "commit" and 2 * self.running >= self.slots:
                # Only a limit in use grows: an idle one would grow without a test.
                self.limit = min(float(self.bounds.largest), self.limit + INCREASE / self.limit)
            if held:
                self.running -= 1
            while self.running < self.slots and self.waiting:
                waiter = (self._retries or self._first).popleft()
                waiter.granted = True
                if waiter._wake():
                    self.running += 1

    def narrow(self) -> None:
        """A conflict of an attempt that held no slot."""
        self.leave("conflict", held=False)


class Limits:
    """The limits of one app's contention keys, made on a key's first conflict."""

    __slots__ = ("_keys", "_lock", "bounds")

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self._keys: dict[str, Limit] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Limit | None:
        """The key's limit; None if it never conflicted (no lock is taken)."""
        return self._keys.get(key)

    def conflicted(self, key: str) -> None:
        """A conflict of an attempt that held no slot: make the key's limit if new, narrow it."""
        with self._lock:
            limit = self._keys.setdefault(key, Limit(self.bounds))
        limit.narrow()
