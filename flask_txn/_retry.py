"""The retry loop, which errors are worth re-running a transaction for, and how long to wait.

:class:`Retrying` is the loop, written once: ``for attempt in Retrying(...)``
in sync code, ``async for`` in async code; the two differ only in how they wait.
Each attempt is run by its caller and says, as it ends, whether to re-run it
(:attr:`Attempt.retry_delay`), and makes the next one (:meth:`Attempt.next`),
so the loop knows nothing of transactions.

Errors are classified by the driver's error code, never by class name, so the
same table serves every driver that reports the code:

============================  ==========================  =====================
database                      code                        where the driver has it
============================  ==========================  =====================
PostgreSQL, CockroachDB       ``40001`` serialization     psycopg2 ``pgcode``,
                              failure, ``40P01`` deadlock psycopg 3 / asyncpg
                                                          ``sqlstate``
MySQL, MariaDB                ``1213`` deadlock, ``1020`` ``args[0]`` / ``errno``
                              record changed (snapshot
                              isolation)
SQLite                        ``SQLITE_BUSY*``,           ``sqlite_errorname``
                              ``SQLITE_LOCKED*``
any                           connection lost before      SQLAlchemy's
                              COMMIT                      ``connection_invalidated``
============================  ==========================  =====================

Never retried: a statement that a timeout flask-txn enforces ended (``57014``,
or a connection the read watchdog cut), see :func:`timed_out`; nor MySQL's lock
wait timeout (``1205``), like PostgreSQL's ``55P03``: see
:data:`STATEMENT_ROLLED_BACK`.

MySQL errors are identified by their error number, whatever the driver: PyMySQL
also gives a SQLSTATE (``40001`` for a deadlock, ``HY000`` for most others),
mysqlclient does not, so :func:`sqlstate_of` returns the number (``"1213"``)
for both.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Generic, Protocol, Self, TypeVar

from sqlalchemy.exc import DBAPIError

from ._config import RetryOn, RetryPolicy

_RETRIABLE_CODES = frozenset({"40001", "40P01", "1213", "1020"})
#: MySQL/MariaDB errors after which InnoDB rolled back the failed statement, not
#: the transaction: the lock wait timeout (1205; also MariaDB's NOWAIT) and
#: MySQL's NOWAIT (3572). Not retried; a block that catches one outside a nested
#: block does not commit (``_commit.obstacle``), as on PostgreSQL, which aborts
#: the whole transaction.
STATEMENT_ROLLED_BACK = frozenset({"1205", "3572"})
#: SQLSTATE of a statement cancelled: by its statement timeout, or by a cancel request.
QUERY_CANCELED = "57014"
#: Statements a server's statement timeout ended: PostgreSQL's (and its cancel
#: requests), MariaDB's max_statement_time (1969), MySQL's max_execution_time (3024).
STATEMENT_TIMEOUTS = frozenset({QUERY_CANCELED, "1969", "3024"})
#: Attribute set (True) on a driver error raised because the read watchdog cut the connection.
WATCHDOG_MARK = "flask_txn_read_timeout"
_RETRIABLE_SQLITE = ("SQLITE_BUSY", "SQLITE_LOCKED")
#: SQLSTATE of "statement completion unknown": the outcome of COMMIT is unknown.
AMBIGUOUS_SQLSTATE = "40003"
_MYSQL_DRIVERS = frozenset({"pymysql", "MySQLdb", "mysql"})
# A cause chain longer than this is a cycle or not worth following.
_MAX_CHAIN = 16


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, the driver error it wraps, and their ``__cause__`` chain."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < _MAX_CHAIN:
        yield current
        if isinstance(current, DBAPIError) and isinstance(current.orig, BaseException):
            yield current.orig
        current = current.__cause__
        seen += 1


def _driver_code(error: BaseException) -> str | None:
    if type(error).__module__.partition(".")[0] in _MYSQL_DRIVERS:
        # The error number, never PyMySQL's sqlstate: mysqlclient has none.
        code = getattr(error, "errno", None)
        if code is None and error.args:
            code = error.args[0]
        if isinstance(code, int) and not isinstance(code, bool):
            return str(code)
        return None
    for attribute in ("pgcode", "sqlstate", "sqlite_errorname"):
        code = getattr(error, attribute, None)
        if isinstance(code, str):
            return code
    return None


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE or driver error code behind ``exc``, as a string, or None.

    PostgreSQL's SQLSTATE (``"40001"``), SQLite's extended error name
    (``"SQLITE_BUSY"``), MySQL's and MariaDB's error number (``"1213"``) whatever
    the driver.

    :param exc: any exception; SQLAlchemy's wrappers and ``__cause__`` are followed.

    .. versionchanged:: 0.2.0
       A MySQL error gives its number through PyMySQL too, not PyMySQL's SQLSTATE.
    """
    for error in _chain(exc):
        code = _driver_code(error)
        if code is not None:
            return code
    return None


def is_disconnect(exc: BaseException) -> bool:
    """True if SQLAlchemy found the connection dead when ``exc`` was raised."""
    return any(
        isinstance(error, DBAPIError) and error.connection_invalidated for error in _chain(exc)
    )


def is_retryable(exc: BaseException) -> bool:
    """True if re-running the whole transaction from the start may succeed.

    See the table in :doc:`/retries`: serialization failures and deadlocks on
    every supported database, SQLite's busy and locked errors, and a connection
    lost *before* COMMIT, unless the read watchdog cut it (see :doc:`/retries`). A
    connection lost *during* COMMIT is not answered here: ``atomic`` raises
    :class:`AmbiguousCommitError` for it.

    :param exc: any exception; SQLAlchemy's wrappers and ``__cause__`` are followed.

    .. versionchanged:: 0.2.0
       False for a connection the read watchdog cut.
    """
    for error in _chain(exc):
        code = _driver_code(error)
        if code is not None and (code in _RETRIABLE_CODES or code.startswith(_RETRIABLE_SQLITE)):
            return True
    return is_disconnect(exc) and not timed_out(exc)


def timed_out(exc: BaseException) -> bool:
    """True if a timeout flask-txn enforces ended the statement: the read watchdog
    cut its connection, or it was cancelled (57014, its statement timeout; on
    MariaDB and MySQL, 1969 and 3024).

    Such an attempt is never re-run, whatever ``retry_on`` says: the same slow
    statement would run out of time again, each time adding its load.
    """
    return sqlstate_of(exc) in STATEMENT_TIMEOUTS or any(
        getattr(error, WATCHDOG_MARK, False) is True for error in _chain(exc)
    )


def backoff(policy: RetryPolicy, retry: int, random: Callable[[], float]) -> float:
    """Seconds to wait before re-run number ``retry`` (1-based): full jitter, capped.

    The cap grows as ``wait_initial * 2 ** (retry - 1)`` up to ``wait_max``, and
    the wait is drawn uniformly from 0 to the cap, so that clients that failed
    together do not retry together.
    """
    cap = min(policy.wait_max, policy.wait_initial * 2.0 ** min(retry - 1, 64))
    return cap * random()


def should_retry(error: Exception, retry_on: RetryOn | None) -> bool:
    """True if ``error`` is retryable, or one the block's ``retry_on`` names, unless
    a timeout flask-txn enforces caused it (:func:`timed_out`)."""
    if is_retryable(error):
        return True
    if retry_on is None or timed_out(error):
        return False
    if isinstance(retry_on, type | tuple):
        return isinstance(error, retry_on)
    return bool(retry_on(error))


def next_delay(
    policy: RetryPolicy, attempt: int, started: float, random: Callable[[], float]
) -> float | None:
    """Seconds to wait before re-running after failed attempt number ``attempt``,
    or None when the policy gives up: no retries left, or the wait would end
    past the deadline (counted from ``started``, a ``time.perf_counter()``)."""
    delay = backoff(policy, attempt, random)
    if attempt > policy.retries:
        return None
    if policy.deadline is not None and time.perf_counter() - started + delay > policy.deadline:
        return None
    return delay


class Attempt(Protocol):
    """What the loop needs of an attempt: after it ran, whether to run another."""

    #: seconds to wait before the next attempt; None when this one was the last.
    retry_delay: float | None

    def next(self) -> Self:
        """The attempt that runs the same work again."""
        ...


A = TypeVar("A", bound=Attempt)


class Retrying(Generic[A]):
    """The retry loop: yields attempts, waiting between them, while the last one
    ended asking to be re-run.

    :param first: the first attempt; each next one is made by the one before.
    :param sleep: waits a number of seconds (``TXN_RETRY_SLEEP``); in ``async
        for``, it may return an awaitable.
    """

    __slots__ = ("_first", "_sleep")

    def __init__(self, first: A, sleep: Callable[[float], object]) -> None:
        self._first = first
        self._sleep = sleep

    def _steps(self) -> Iterator[A | float]:
        """Each attempt, then the seconds to wait before the next, while there is one."""
        attempt = self._first
        while True:
            yield attempt
            if attempt.retry_delay is None:
                return
            yield float(attempt.retry_delay)
            attempt = attempt.next()

    def __iter__(self) -> Iterator[A]:
        for step in self._steps():
            if isinstance(step, float):
                self._sleep(step)
            else:
                yield step

    async def __aiter__(self) -> AsyncIterator[A]:
        for step in self._steps():
            if isinstance(step, float):
                await _wait(self._sleep, step)
            else:
                yield step


async def _wait(sleep: Callable[[float], object], seconds: float) -> None:
    """Wait without blocking the loop; a custom ``TXN_RETRY_SLEEP`` may return an awaitable."""
    if sleep is time.sleep:
        await asyncio.sleep(seconds)
        return
    waited = sleep(seconds)
    if inspect.isawaitable(waited):
        await waited
