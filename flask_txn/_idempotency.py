"""Idempotency keys: a request sent again after an unknown outcome is answered
once, from the response stored in the same transaction as its work.

The rules, per request that carries the header (``Idempotency-Key`` by default):

- the key is looked up in :data:`idempotency_keys`, under the request's scope;
- found with the same fingerprint (method, path with query, body): the stored
  response is returned and the view does not run;
- found with another fingerprint: ``422``, the key was used for another request;
- not found: the view runs, and its response is stored under the key in the
  same transaction, so that both commit, or neither;
- the same key still being handled by another transaction: ``409`` with
  ``Retry-After`` (PostgreSQL, by an advisory lock; SQLite runs one writing
  transaction at a time, and on MySQL and MariaDB the copy's insert of the key
  waits for the first's transaction, so there the second request finds the
  first's answer).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

import sqlalchemy as sa
from flask import current_app, has_request_context, request
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from ._config import check_flag
from ._errorhandlers import error_response
from ._errors import ConfigError, UsageError
from ._locking import advisory_lock_key, xact_lock
from ._state import app_state
from ._transaction import Attempt, current
from ._view import rewind_request_body

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("flask_txn")

#: The keys' own MetaData, ``idempotency_keys.metadata``.
metadata = sa.MetaData()

#: The longest key accepted, the column's length.
MAX_KEY_LENGTH = 255
#: The longest scope accepted, the column's length.
MAX_SCOPE_LENGTH = 200

idempotency_keys = sa.Table(
    "flask_txn_idempotency_key",
    metadata,
    sa.Column("scope", sa.String(MAX_SCOPE_LENGTH), primary_key=True),
    sa.Column("key", sa.String(MAX_KEY_LENGTH), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("headers", sa.JSON, nullable=False),
    # MySQL's BLOB, LargeBinary's type there, holds 64 KiB: LONGBLOB holds any body.
    sa.Column(
        "body", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False
    ),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)
"""The table of stored responses, one row per (scope, key), in a ``MetaData`` of its
own, ``idempotency_keys.metadata``: give that to Alembic beside your models'."""

#: Headers never stored: a cookie is a credential of the first client; the length
#: is the body's own.
_NOT_STORED = frozenset({"set-cookie", "content-length"})
#: The databases where the rules above hold, as tested.
_DIALECTS = ("postgresql", "sqlite", "mysql", "mariadb")
_MYSQL = ("mysql", "mariadb")


@overload
def idempotent(func: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def idempotent(*, required: bool = True) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def idempotent(func: Callable[P, R] | None = None, /, *, required: bool = True) -> Any:
    """Answer a repeated request from the response stored under its idempotency key.

    Put it right below ``@atomic``, so that the key and the response are stored in
    the view's transaction::

        @app.post("/transfers")
        @atomic
        @idempotent
        def transfer(): ...

    :param required: answer ``400`` to a request without the header; with
        False, such a request runs the view as usual, and nothing is stored.

    .. versionadded:: 0.2.0
    """
    check_flag("required", required)
    if func is None:
        return functools.partial(idempotent, required=required)
    if isinstance(func, type):
        raise UsageError(
            f"'@idempotent' takes a view function, got the class {func!r}. Decorate its"
            " methods (of a MethodView) instead."
        )
    view: Callable[..., Any] = func

    if inspect.iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            prepared = _prepare(view, required=required)
            if not isinstance(prepared, _Request):
                return await view(*args, **kwargs) if prepared is None else prepared
            claimed = await prepared.attempt.run_sync(_claim_key, prepared)
            if isinstance(claimed, Response):
                return claimed
            rv = await view(*args, **kwargs)
            await prepared.attempt.run_sync(_store, prepared, claimed, rv)
            return rv

        return async_wrapper

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        prepared = _prepare(view, required=required)
        if not isinstance(prepared, _Request):
            return view(*args, **kwargs) if prepared is None else prepared
        claimed = _claim_key(prepared)
        if isinstance(claimed, Response):
            return claimed
        rv = view(*args, **kwargs)
        _store(prepared, claimed, rv)
        return rv

    return wrapper


@dataclasses.dataclass(frozen=True)
class _Request:
    """What ``@idempotent`` knows of the request before the view runs."""

    view: Callable[..., Any]
    attempt: Attempt
    dialect: str
    header: str
    scope: str
    key: str
    fingerprint: str
    now: datetime.datetime
    ttl: float


def _prepare(view: Callable[..., Any], *, required: bool) -> _Request | Response | None:
    """The checks that need no database: a refusal, None to run the view as usual
    (no key, and none required), or the request to claim its key for."""
    attempt = current()
    if attempt is None or not has_request_context():
        raise UsageError(
            f"'@idempotent' on {view.__qualname__!r} ran outside an atomic block in a request:"
            " the key and the response must be stored in the view's own transaction. Put"
            " '@idempotent' right below '@atomic', and '@atomic' below the route decorator."
        )
    settings = app_state(user="'@idempotent' was used").settings
    header = settings.idempotency_header
    key = _unquoted(request.headers.get(header))
    if key is None and not required:
        return None
    if key is None or not (1 <= len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()):
        return _refuse(
            400,
            "idempotency-key-missing" if key is None else "idempotency-key-invalid",
            f"This request needs an {header!r} header of 1 to {MAX_KEY_LENGTH} printable ASCII"
            " characters, "
            + ("and sent none." if key is None else f"and sent {key[:300]!r}.")
            + " Send a new value (a UUID) for each operation, and the same value when you"
            " send it again.",
        )
    dialect = attempt.session.get_bind().dialect.name
    if dialect not in _DIALECTS:
        raise UsageError(
            f"'@idempotent' supports {' and '.join(_DIALECTS)}; the database is {dialect!r}."
            " Remove '@idempotent' from the view, or store its keys on a supported database."
        )
    scope = "" if settings.idempotency_scope is None else _scope(settings.idempotency_scope())
    return _Request(
        view=view,
        attempt=attempt,
        dialect=dialect,
        header=header,
        scope=scope,
        key=key,
        fingerprint=_fingerprint(),
        now=datetime.datetime.now(datetime.UTC),
        ttl=settings.idempotency_ttl,
    )


def _claim_key(req: _Request) -> Any:
    """In the view's transaction, before the view: the stored response or a refusal,
    or a condition that finds the key's newly claimed row."""
    session = req.attempt.session
    # The scope's length makes the lock's name unambiguous: scope "a:b" with key
    # "c" and scope "a" with key "b:c" are different keys, and must not exclude
    # each other.
    lock = advisory_lock_key(f"flask-txn-idempotency:{len(req.scope)}:{req.scope}:{req.key}")
    if req.dialect == "postgresql" and not session.scalar(xact_lock(lock, wait=False)):
        return _refuse(
            409,
            "idempotency-key-in-flight",
            f"A request with the {req.header!r} {req.key!r} is still being handled. Send it"
            " again in 1 s to get its answer.",
            retry_after=1,
        )
    claim = {
        "scope": req.scope,
        "key": req.key,
        "fingerprint": req.fingerprint,
        "status": 0,  # the response's, once the view has answered
        "headers": [],
        "body": b"",
        "created_at": req.now,
        "expires_at": req.now + datetime.timedelta(seconds=req.ttl),
    }
    this_key = (idempotency_keys.c.scope == req.scope) & (idempotency_keys.c.key == req.key)
    claimed = _claim(session, req.dialect, claim, this_key)
    if claimed is not None:
        return claimed
    # The key was stored before.
    stored_row = sa.select(idempotency_keys).where(this_key)
    if req.dialect in _MYSQL:
        # InnoDB's plain SELECT reads the transaction's snapshot, which may predate
        # the commit that stored the key: a locking read sees the committed row.
        stored_row = stored_row.with_for_update(read=True)
    stored = session.execute(stored_row).one()
    if _aware(stored.expires_at) > req.now:
        return _replay(req, stored)
    session.execute(sa.update(idempotency_keys).where(this_key).values(**claim))
    return this_key


def _store(req: _Request, claimed: Any, rv: Any) -> None:
    """After the view: its response, written into the key's claimed row."""
    response = current_app.make_response(rv)
    if response.is_streamed:
        raise UsageError(
            f"'@idempotent' on {req.view.__qualname__!r} cannot store a streamed response: a"
            " replay must return the same body. Return the whole body instead."
        )
    stored_headers = [[n, v] for n, v in response.headers.items() if n.lower() not in _NOT_STORED]
    req.attempt.session.execute(
        sa.update(idempotency_keys)
        .where(claimed)
        .values(status=response.status_code, headers=stored_headers, body=response.get_data())
    )


def _claim(session: Session, dialect: str, claim: dict[str, Any], this_key: Any) -> Any:
    """Insert the key's row, unless the key is stored: a condition that finds the row
    again (``this_key``, or on PostgreSQL its ``ctid``), or None if the key was there.

    Nothing is read to find out. Under SERIALIZABLE on PostgreSQL, a lookup of the key
    takes a predicate lock on an index page that the other requests insert into,
    and makes their transactions conflict: in the bank test's SERIALIZABLE case,
    about 900 re-runs per 240 transfers with a lookup, 170 with this claim. The
    row is found again by its ``ctid``, which locks only that row, one this
    transaction made.
    """
    if dialect == "postgresql":
        insert = postgresql.insert(idempotency_keys).values(**claim).on_conflict_do_nothing()
        ctid = session.execute(insert.returning(sa.literal_column("ctid"))).scalar()
        return None if ctid is None else sa.text("ctid = CAST(:ctid AS tid)").bindparams(ctid=ctid)
    if dialect == "sqlite":
        added: Any = sqlite.insert(idempotency_keys).values(**claim).on_conflict_do_nothing()
    else:
        # MySQL, MariaDB: a copy of a key another transaction claimed waits here
        # until that one ends, then is ignored if it committed (or claims the key).
        added = sa.insert(idempotency_keys).values(**claim).prefix_with("IGNORE")
    if session.execute(added).rowcount == 0:  # type: ignore[attr-defined]
        return None
    return this_key


def _replay(req: _Request, stored: Any) -> Response:
    """The stored response of the key, or 422 if it answered another request."""
    if stored.fingerprint != req.fingerprint:
        return _refuse(
            422,
            "idempotency-key-reused",
            f"The {req.header!r} {req.key!r} was already used for another request (another"
            " method, path or body). Use a new key for a new operation.",
        )
    req.attempt.replayed = True
    log.info("Replayed the stored response of %s %r for %r.", req.header, req.key, request.endpoint)
    replay = Response(stored.body, stored.status, [tuple(pair) for pair in stored.headers])
    replay.headers["Idempotent-Replayed"] = "true"
    return replay


def _unquoted(value: str | None) -> str | None:
    """The key of the header: the IETF draft sends it as a quoted string (``"k"``),
    many clients send it bare (``k``); both are the key ``k``."""
    if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _scope(value: object) -> str:
    """The hook's result as stored: a str or an int, at most the column's length."""
    # Only values whose str() is the same in every request: str() of an object
    # (a user, not its id) names its address, a new scope each time, and every
    # repeat would run the view again.
    if isinstance(value, str | int) and not isinstance(value, bool):
        scope = str(value)
        if len(scope) <= MAX_SCOPE_LENGTH:
            return scope
    raise ConfigError(
        f"'TXN_IDEMPOTENCY_SCOPE' must return a str or an int of at most {MAX_SCOPE_LENGTH}"
        f" characters, got {value!r} of type {type(value).__name__}. Return an id, such as"
        " 'lambda: current_user.id', or '' for keys shared by the whole app."
    )


def _fingerprint() -> str:
    """What makes two requests the same request: method, path with query, body."""
    body = request.get_data(cache=True)
    # get_data() read request.stream to its end: a view that reads the stream
    # itself must find the whole body there.
    rewind_request_body(body)
    digest = hashlib.sha256()
    # Flask serves HEAD with the GET view and drops the body: the same request.
    method = "GET" if request.method == "HEAD" else request.method
    for part in (method.encode(), request.full_path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _aware(moment: datetime.datetime) -> datetime.datetime:
    """SQLite returns the stored UTC time without its zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _refuse(status: int, reason: str, message: str, *, retry_after: int | None = None) -> Response:
    log.info("Answered %d (%s) for endpoint %r.", status, reason, request.endpoint)
    return error_response(status, {"error": message, "reason": reason}, retry_after)


def purge_idempotency_keys(*, batch_size: int = 1000) -> int:
    """Delete the expired keys of the current app's database; return how many.

    They are deleted ``batch_size`` at a time, each batch in a transaction of its
    own, so that a large purge never holds many row locks, or one long
    transaction, while requests store new keys. Run it from a scheduled job, or
    run ``flask txn purge-idempotency-keys``.

    :param batch_size: keys deleted per transaction, a whole number >= 1.

    .. versionadded:: 0.2.0
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"'batch_size' must be a whole number >= 1 (keys deleted per transaction), got"
            f" {batch_size!r}. The default is 1000."
        )
    engine = app_state(user="'purge_idempotency_keys' was used").engine
    now = datetime.datetime.now(datetime.UTC)
    is_expired = idempotency_keys.c.expires_at <= now
    if engine.dialect.name in _MYSQL:
        # MySQL and MariaDB refuse LIMIT in an IN subquery, but have DELETE ... LIMIT.
        batch = (
            sa.delete(idempotency_keys)
            .where(is_expired)
            .with_dialect_options(mysql_limit=batch_size)
        )
    else:
        expired = (
            sa.select(idempotency_keys.c.scope, idempotency_keys.c.key)
            .where(is_expired)
            .limit(batch_size)
        )
        batch = sa.delete(idempotency_keys).where(
            sa.tuple_(idempotency_keys.c.scope, idempotency_keys.c.key).in_(expired)
        )
    total = 0
    while True:
        with engine.begin() as connection:
            deleted = int(connection.execute(batch).rowcount)
        total += deleted
        if deleted < batch_size:
            return total
