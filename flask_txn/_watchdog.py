"""The read watchdog: ``TXN_READ_TIMEOUT``, for a server or network that stopped answering.

libpq has no read timeout: a server that stopped (or a network device that
froze a connection while its TCP peer still answers) leaves a query waiting
forever. The watchdog closes the socket under a statement, COMMIT, ROLLBACK or
pre-ping that has had no reply for ``TXN_READ_TIMEOUT`` seconds; the driver
then reports a lost connection. The error is marked (:func:`cut_by_watchdog`),
so that ``atomic`` does not re-run a block whose statement it cut: the same
slow statement would only be cut again. During COMMIT it is raised as
:class:`~flask_txn.AmbiguousCommitError`.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from ._retry import WATCHDOG_MARK
from ._timeouts import LIBPQ_DRIVERS

log = logging.getLogger("flask_txn")

#: Dialect methods that wait for the server, and what each is waiting for. The
#: first ones take a cursor, the others a DBAPI connection.
_CURSOR_METHODS = {
    "do_execute": "a statement",
    "do_executemany": "a statement",
    "do_execute_no_params": "a statement",
}
_CONNECTION_METHODS = {"do_commit": "COMMIT", "do_rollback": "ROLLBACK", "do_ping": "the pre-ping"}


class _Watchdog:
    """One thread per process that shuts the sockets of operations past their deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        #: token -> (socket's file descriptor, seconds allowed, what runs)
        self._armed: dict[int, tuple[int, float, str]] = {}
        #: (deadline, token), including tokens already disarmed
        self._heap: list[tuple[float, int]] = []
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self.fired = 0

    def arm(self, fd: int, seconds: float, what: str) -> int:
        """Watch the socket ``fd`` for ``seconds``; return the token to disarm it with."""
        deadline = time.monotonic() + seconds
        with self._lock:
            token = next(self._tokens)
            self._armed[token] = (fd, seconds, what)
            if len(self._heap) > 2 * len(self._armed) + 1024:
                # Disarmed entries are dropped lazily: keep the heap from growing.
                self._heap = [entry for entry in self._heap if entry[1] in self._armed]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="flask-txn-read-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0][1] == token:
                self._wake.notify()
        return token

    def disarm(self, token: int) -> bool:
        """The operation ended: stop watching it. False if the watchdog fired on it."""
        with self._lock:
            return self._armed.pop(token, None) is not None

    def _run(self) -> None:
        while True:
            with self._lock:
                self._fire_next()

    def _fire_next(self) -> None:
        """Wait (holding the lock between waits) until some operation is overdue; break it."""
        while True:
            while self._heap and self._heap[0][1] not in self._armed:
                heapq.heappop(self._heap)
            if not self._heap:
                self._wake.wait()
                continue
            deadline, token = self._heap[0]
            delay = deadline - time.monotonic()
            if delay > 0:
                self._wake.wait(delay)
                continue
            heapq.heappop(self._heap)
            fd, seconds, what = self._armed.pop(token)
            # Logged before the socket is shut, so that the line comes before the
            # error it explains (a caller reading the log after the error sees it).
            log.warning(
                "No reply from the database for %g s during %s ('TXN_READ_TIMEOUT'):"
                " closed the connection, so that the request fails or is retried"
                " instead of hanging.",
                seconds,
                what,
            )
            # Still under the lock: the operation has not returned (it would have
            # disarmed first), so the descriptor is still its connection's socket.
            _shut(fd)
            self.fired += 1
            return


def _shut(fd: int) -> None:
    """Shut a socket down in both directions: a read blocked on it returns at once."""
    with contextlib.suppress(OSError), socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as s:
        # fromfd works on a duplicate descriptor; shutting that down shuts the socket.
        s.shutdown(socket.SHUT_RDWR)


watchdog = _Watchdog()


def _new_watchdog_after_fork() -> None:
    """A forked child has no watchdog thread, and the parent's lock may be held."""
    global watchdog
    watchdog = _Watchdog()


os.register_at_fork(after_in_child=_new_watchdog_after_fork)


def _guard(original: Callable[..., Any], seconds: float, what: str, cursor: bool) -> Any:
    @functools.wraps(original)
    def guarded(first: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            fd = (first.connection if cursor else first).fileno()
        except Exception:
            # No socket (a closed connection): the call itself reports that.
            return original(first, *args, **kwargs)
        current = watchdog
        token = current.arm(fd, seconds, what)
        try:
            result = original(first, *args, **kwargs)
        except Exception as exc:
            if not current.disarm(token):
                # Fired: the error is the watchdog's doing, which atomic must not retry.
                setattr(exc, WATCHDOG_MARK, True)
            raise
        current.disarm(token)
        return result

    return guarded


def watch(engine: Engine, seconds: float | None) -> None:
    """Put every wait of the engine's dialect for the server under the read watchdog.

    :param engine: an engine flask-txn made; its dialect object is its own.
    :param seconds: ``TXN_READ_TIMEOUT`` in force, or None to leave the engine alone.
    """
    dialect = engine.dialect
    if seconds is None or dialect.driver not in LIBPQ_DRIVERS or dialect.is_async:
        return
    for methods, cursor in ((_CURSOR_METHODS, True), (_CONNECTION_METHODS, False)):
        for name, what in methods.items():
            setattr(dialect, name, _guard(getattr(dialect, name), seconds, what, cursor))
