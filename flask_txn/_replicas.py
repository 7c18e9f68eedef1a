"""Read replicas: which server a block runs on, each standby's health and lag, and
read-your-writes.

An app with ``TXN_REPLICA_URIS`` gets a :class:`Replicas` router, found by the
engine a block would run on (:func:`begin`). A block marked
``atomic(replica=True)`` begins on the first standby, in turn, that is up, no
more than ``max_lag`` seconds behind, and has replayed every commit the request
(or the user's session) made; otherwise on the primary. Every other block, and
``txn.session`` outside blocks, stays on the primary.

A standby's status (up, lag, replayed WAL position) is measured by one query on
it, at most once per ``TXN_REPLICA_CHECK_INTERVAL``, inline, by the first block
that needs it; a standby whose connection fails as a block begins is out at
once, and the block begins on the next server instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import g, has_request_context
from flask import session as cookie_session
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from ._config import Settings, check_choice, check_url, hide_password
from ._engine import async_url, make_engine
from ._errors import AmbiguousCommitError, ConfigError
from ._options import Options
from ._session import JOINED, AsyncDatabase, AsyncWorkSession, has_pending_writes, track_writes
from ._timeouts import check_seconds

log = logging.getLogger("flask_txn")

#: The ``server`` a block reports when it ran on the primary.
PRIMARY = "primary"
READ_YOUR_WRITES = ("off", "request", "session")
#: Where the last commit's WAL position is kept: ``flask.g`` and Flask's session.
LSN_KEY = "flask_txn_lsn"
#: ``session.info`` key, set while a replica block runs (on a standby or not): the
#: session's own bind, put back as the block ends.
_BIND = "flask_txn.bind"
#: A WAL position past any real one: read from the primary (the position is unknown).
_UNKNOWN = 1 << 64

_STATUS = text(
    "SELECT CAST(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_insert_lsn() END AS text),"
    " CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()"
    " THEN 0 ELSE EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()) END,"
    " NOT pg_is_in_recovery()"
    # A role without pg_read_all_stats sees the receiver's row, but not its status.
    " OR EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status IS NULL OR status = 'streaming')"
)
_COMMIT_POSITION = "SELECT CAST(pg_current_wal_insert_lsn() AS text)"
#: Whether the open transaction wrote (PostgreSQL 9.6 and later).
_HAS_XID = text("SELECT txid_current_if_assigned() IS NOT NULL")

# Each engine a router serves -> (the router, True for the app's async engine).
_ROUTERS: weakref.WeakKeyDictionary[Engine, tuple[Replicas, bool]] = weakref.WeakKeyDictionary()


def parse_lsn(value: str) -> int:
    """PostgreSQL's ``pg_lsn`` text (``"16/B374D848"``) as a number."""
    high, _, low = value.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """A WAL position as PostgreSQL writes it."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """The validated ``TXN_REPLICA_*`` keys."""

    urls: tuple[URL, ...]
    max_lag: float
    check_interval: float
    read_your_writes: str


def read_replica_settings(config: Mapping[str, Any], settings: Settings) -> ReplicaSettings:
    """Validate the ``TXN_REPLICA_*`` keys (defaults already filled in)."""
    given = config["TXN_REPLICA_URIS"]
    if (
        isinstance(given, str | URL)
        or not isinstance(given, Sequence)
        or not all(isinstance(url, str | URL) for url in given)
    ):
        raise ConfigError(
            f"'TXN_REPLICA_URIS' must be a list of database URLs, one per standby, got"
            f" {hide_password(given)!r}. Use e.g. ['postgresql+psycopg2://app@standby1/app'],"
            " or [] for none."
        )
    urls = tuple(check_url(url, "TXN_REPLICA_URIS") for url in given)
    for url in urls:
        for name, server in (("TXN_REPLICA_URIS", url), ("TXN_DATABASE_URI", settings.url)):
            if server.get_backend_name() != "postgresql":
                raise ConfigError(
                    f"{name!r} is {hide_password(server)!r}, but read replicas need"
                    " PostgreSQL streaming replication: the primary and each standby must"
                    " be 'postgresql' URLs. Remove 'TXN_REPLICA_URIS' for this database."
                )
    choice = check_choice(
        "TXN_REPLICA_READ_YOUR_WRITES", config["TXN_REPLICA_READ_YOUR_WRITES"], READ_YOUR_WRITES
    )
    if choice == "session" and not config.get("SECRET_KEY"):
        raise ConfigError(
            "'TXN_REPLICA_READ_YOUR_WRITES' is 'session', which keeps the position of"
            " each user's last write in Flask's signed session cookie, but 'SECRET_KEY'"
            " is not set. Set 'SECRET_KEY' before init_app, or use 'request'."
        )
    return ReplicaSettings(
        urls=urls,
        max_lag=check_seconds("TXN_REPLICA_MAX_LAG", config["TXN_REPLICA_MAX_LAG"]),
        check_interval=check_seconds(
            "TXN_REPLICA_CHECK_INTERVAL", config["TXN_REPLICA_CHECK_INTERVAL"]
        ),
        read_your_writes=choice,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    """What one check of a standby found."""

    up: bool
    #: seconds behind: 0 when it replayed all the WAL a live stream brought it.
    lag: float
    #: the WAL position it has replayed (a promoted standby: its own insert position).
    lsn: int
    #: ``time.monotonic()`` of the check.
    checked: float
    #: why it is down or out of rotation, for the log.
    why: str = ""


_NEVER = Status(up=False, lag=math.inf, lsn=0, checked=-math.inf, why="not checked yet")


class Standby:
    """One standby: its engines, and its status as last checked."""

    def __init__(self, url: URL, settings: Settings, watch: Callable[[Engine], None]) -> None:
        self.label = hide_password(url)
        self.engine = make_engine(dataclasses.replace(settings, url=url))
        watch(self.engine)
        self._watch = watch
        primary_async = async_url(settings)
        self._async_url = (
            None if primary_async is None else url.set(drivername=primary_async.drivername)
        )
        self._settings = settings
        self._async: AsyncDatabase | None = None
        self.status = _NEVER
        self._lock = threading.Lock()

    def async_engine(self) -> Engine:
        """The standby's async engine (its ``sync_engine``), made and first connected once."""
        with self._lock:
            if self._async is None:
                assert self._async_url is not None  # only asked by an app with an async engine
                self._async = AsyncDatabase(self._settings, self._async_url)
                self._watch(self._async.sync_engine)
        self._async.connect_from_loop()
        return self._async.sync_engine

    def current(self, max_age: float) -> tuple[Status, bool]:
        """The status, checked again if older than ``max_age``; and whether it was."""
        if time.monotonic() - self.status.checked < max_age:
            return self.status, False
        if not self._lock.acquire(blocking=False):
            return self.status, False  # another thread is checking it
        try:
            self._set(self._check())
        finally:
            self._lock.release()
        return self.status, True

    def _check(self) -> Status:
        now = time.monotonic()
        try:
            with self.engine.connect() as connection:
                lsn, lag, streaming = connection.execute(_STATUS).one()
        except DBAPIError as exc:
            return Status(False, math.inf, 0, now, f"down ({_first_line(exc.orig)})")
        lag = math.inf if lag is None else float(lag)
        if not streaming:
            return Status(True, math.inf, parse_lsn(lsn), now, "not streaming from a primary")
        return Status(True, lag, parse_lsn(lsn), now)

    def down(self, error: BaseException) -> None:
        """Take the standby out of rotation until its next check (its connection failed)."""
        self._set(Status(False, math.inf, 0, time.monotonic(), f"down ({type(error).__name__})"))

    def _set(self, status: Status) -> None:
        was = self.status
        self.status = status
        if status.up and not was.up and was is not _NEVER:
            log.info("Standby %s is back in rotation.", self.label)
        elif not status.up and (was.up or was is _NEVER):
            log.warning("Standby %s is out of rotation: %s.", self.label, status.why)

    def dispose(self) -> None:
        """Close the standby's pooled connections."""
        self.engine.dispose()
        if self._async is not None:
            self._async.close()


class Replicas:
    """An app's standbys, and the choice of the server each replica block runs on."""

    def __init__(
        self,
        settings: ReplicaSettings,
        app_settings: Settings,
        watch: Callable[[Engine], None],
    ) -> None:
        """:param watch: called with each engine made for a standby (its error listener)."""
        self.settings = settings
        self.standbys = [Standby(url, app_settings, watch) for url in settings.urls]
        self._turn = itertools.count()

    def watch(self, engine: Engine, *, is_async: bool) -> None:
        """Serve the blocks that would run on ``engine``, the app's sync or async one."""
        _ROUTERS[engine] = (self, is_async)
        if is_async:
            # Read-your-writes needs to know which async transactions wrote.
            track_writes(AsyncWorkSession)

    def begin(
        self, session: Session, options: Options, start: Callable[[Options], object], is_async: bool
    ) -> str:
        """Begin on a standby that may serve the block, else on the primary; its name."""
        max_lag = self.settings.max_lag if options.max_lag is None else options.max_lag
        session.info.setdefault(_BIND, session.bind)
        needed = self.needed()
        first = next(self._turn)
        count = len(self.standbys)
        for standby in (self.standbys[(first + i) % count] for i in range(count)):
            if not self._may_serve(standby, max_lag, needed):
                continue
            try:
                session.bind = standby.async_engine() if is_async else standby.engine
                start(_on_standby(options))
                # Connect now, where a standby that cannot be reached is passed over.
                session.connection()
            except OperationalError as exc:
                # It could not be reached: the block begins on the next server.
                standby.down(exc)
                session.rollback()
                session.bind = session.info[_BIND]
                continue
            return standby.label
        start(options)
        return PRIMARY

    def _may_serve(self, standby: Standby, max_lag: float, needed: int) -> bool:
        status, fresh = standby.current(self.settings.check_interval)
        if status.up and status.lag <= max_lag and status.lsn < needed and not fresh:
            # Replay only moves forward: ask again only when the last answer is too old.
            status, fresh = standby.current(0)
        if status.up and status.lag > max_lag and fresh:
            log.info(
                "Standby %s skipped: %.3f s behind, more than max_lag %r s.",
                standby.label,
                status.lag,
                max_lag,
            )
        return status.up and status.lag <= max_lag and status.lsn >= needed

    def needed(self) -> int:
        """The WAL position a standby must have replayed to serve this request."""
        return max(int(g.get(LSN_KEY, 0)), self._kept())

    def _kept(self) -> int:
        """In "session" mode, the position of the user's last write, from the cookie."""
        if self.settings.read_your_writes != "session" or not has_request_context():
            return 0
        kept = cookie_session.get(LSN_KEY)
        return parse_lsn(kept) if isinstance(kept, str) else 0

    def committed(self, engine: Engine) -> None:
        """After a write committed on the primary: keep where its WAL ended."""
        if self.settings.read_your_writes == "off":
            return
        try:
            with engine.connect() as connection:
                lsn = parse_lsn(str(connection.exec_driver_sql(_COMMIT_POSITION).scalar()))
        except DBAPIError:
            log.warning(
                "The WAL position after a commit could not be read: this request's"
                " later replica blocks read from the primary.",
                exc_info=True,
            )
            setattr(g, LSN_KEY, _UNKNOWN)
            return
        setattr(g, LSN_KEY, max(lsn, int(g.get(LSN_KEY, 0))))
        if self.settings.read_your_writes == "session" and has_request_context():
            cookie_session[LSN_KEY] = format_lsn(max(lsn, self._kept()))

    def dispose(self) -> None:
        """Close every standby's pooled connections."""
        for standby in self.standbys:
            standby.dispose()


def _first_line(error: object) -> str:
    """The first line of a driver's error message: what went wrong, for the log."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _on_standby(options: Options) -> Options:
    """The block's options for a hot standby, where every transaction is read-only.

    The driver's read-only flag is not set there: psycopg2 resets it as the
    connection goes back to the pool, and a standby refuses that reset ("cannot
    set transaction read-write mode during recovery"). A standby refuses
    SERIALIZABLE too: a consistent snapshot of what it replayed is REPEATABLE READ
    (``atomic`` refuses an explicit SERIALIZABLE with ``replica=True``).
    """
    isolation = "REPEATABLE READ" if options.isolation == "SERIALIZABLE" else options.isolation
    return dataclasses.replace(options, isolation=isolation, readonly=False, deferrable=False)


def begin(
    session: Session, engine: Engine, options: Options, start: Callable[[Options], object]
) -> str:
    """Begin the block's transaction where it runs: ``start(options)`` after binding the
    session to that server. Returns the server's name: ``"primary"`` or a standby's URL."""
    routed = _ROUTERS.get(engine) if options.replica else None
    if routed is None or session.info.get(JOINED):
        # No standby, a block that may write, or a test's joined session: the primary.
        start(options)
        return PRIMARY
    router, is_async = routed
    return router.begin(session, options, start, is_async)


def end(session: Session) -> None:
    """As a block ends: bind the session to the server it was bound to before the block."""
    if _BIND in session.info:
        session.bind = session.info.pop(_BIND)


def commit(
    session: Session, engine: Engine, commit: Callable[[Session], BaseException | None]
) -> BaseException | None:
    """``commit(session)``; after a commit that wrote, keep its WAL position for the reads."""
    routed = _ROUTERS.get(engine)
    try:
        # A replica block is read-only wherever it ran: no need to ask.
        wrote = routed is not None and _BIND not in session.info and _wrote(session)
    except Exception as exc:
        # The transaction may be aborted now: COMMIT would silently roll it back.
        return exc
    error = commit(session)
    # After an ambiguous COMMIT the write may have happened: the position read now
    # is past it if it did, so the user's next reads still see it.
    if routed is not None and wrote and (error is None or isinstance(error, AmbiguousCommitError)):
        routed[0].committed(engine)
    return error


def _wrote(session: Session) -> bool:
    """Whether the primary's transaction wrote: the writes the session saw, else whether
    the server gave it a transaction ID (a raw SQL string that wrote, a trigger)."""
    return has_pending_writes(session) or bool(session.execute(_HAS_XID).scalar())
