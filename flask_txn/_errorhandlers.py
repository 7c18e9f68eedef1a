"""Error responses for database failures a client can do something about.

:func:`register_error_handlers` (and, by default, every app's
``TXN_ERROR_HANDLERS``) maps them to 503 and 502 responses, by ``reason``:

- ``retries-exhausted`` (503): every attempt met a serialization failure,
  deadlock or busy database;
- ``database-unavailable`` (503): the database could not be reached, refused
  the connection, or the connection was lost before COMMIT;
- ``timeout`` (503): a statement or lock wait timed out, or no pooled
  connection became free in time;
- ``commit-unknown`` (502): :class:`~flask_txn.AmbiguousCommitError`, COMMIT
  was sent and its outcome is unknown.

Other database errors are left alone: Flask answers them as it answers any
unhandled exception (500).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flask import Blueprint, Flask, jsonify, request
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import (
    BadGateway,
    BadRequest,
    Conflict,
    HTTPException,
    ServiceUnavailable,
    UnprocessableEntity,
)
from werkzeug.wrappers import Response

from ._errors import AmbiguousCommitError, ConfigError
from ._retry import (
    STATEMENT_ROLLED_BACK,
    STATEMENT_TIMEOUTS,
    is_disconnect,
    is_retryable,
    sqlstate_of,
)

log = logging.getLogger("flask_txn")

#: SQLSTATEs (and MySQL error numbers) of a database that cannot be reached or
#: used right now: connection exceptions (class 08), shutdown and start-up
#: (57P01-57P03), too many connections (53300); MySQL's can't connect, server
#: gone away and lost connection, too many connections.
_UNAVAILABLE = frozenset(
    {"57P01", "57P02", "57P03", "53300", "2002", "2003", "2006", "2013", "1040"}
)
#: Statement and lock timeouts: PostgreSQL's query_canceled (statement_timeout)
#: and lock_not_available (lock_timeout, NOWAIT); MySQL's and MariaDB's statement
#: timeouts and lock errors (lock wait timeout, NOWAIT).
_TIMEOUT = STATEMENT_TIMEOUTS | {"55P03"} | STATEMENT_ROLLED_BACK
_HANDLED = (OperationalError, PoolTimeoutError, AmbiguousCommitError)
#: The HTML page of each status flask-txn answers with.
_PAGES: dict[int, type[HTTPException]] = {
    400: BadRequest,
    409: Conflict,
    422: UnprocessableEntity,
    502: BadGateway,
    503: ServiceUnavailable,
}
#: JSON first: a client that accepts anything (curl, most HTTP libraries) gets JSON.
_MEDIA_TYPES = ("application/json", "text/html")


def classify(exc: BaseException) -> str | None:
    """The ``reason`` :func:`register_error_handlers` answers ``exc`` with, or None."""
    if isinstance(exc, AmbiguousCommitError):
        return "commit-unknown"
    if isinstance(exc, PoolTimeoutError):
        return "timeout"
    if not isinstance(exc, DBAPIError):
        return None
    code = sqlstate_of(exc)
    if code in _TIMEOUT:
        return "timeout"
    if is_disconnect(exc) or code in _UNAVAILABLE or (code or "").startswith("08"):
        return "database-unavailable"
    if is_retryable(exc):
        return "retries-exhausted"
    if code is None and isinstance(exc, OperationalError):
        # No SQLSTATE: the error came from the driver, not the server (refused,
        # timed out, lost), so there was no server to answer.
        return "database-unavailable"
    return None


def _message(reason: str, exc: BaseException, retry_after: int) -> str:
    code = sqlstate_of(exc)
    later = f" Send the request again in {retry_after} s."
    if reason == "commit-unknown":
        return (
            "The connection to the database was lost while it committed this request, so"
            " it may or may not have been carried out. Send the same request again with"
            " the same Idempotency-Key to find out; a new key could carry it out twice."
        )
    if reason == "retries-exhausted":
        attempts = getattr(exc, "txn_attempts", 1)
        return (
            f"The database refused the transaction {attempts} time(s) because of"
            f" concurrent transactions (SQLSTATE {code}); nothing was saved." + later
        )
    if reason == "timeout":
        what = "a connection" if code is None else f"the database (SQLSTATE {code})"
        return f"The request timed out waiting for {what}; nothing was saved." + later
    attempts = getattr(exc, "txn_attempts", None)
    tried = "" if attempts is None else f" (the last of {attempts} attempts)"
    return f"The connection to the database failed or was lost{tried}; nothing was saved." + later


def register_error_handlers(app: Flask | Blueprint, *, retry_after: int = 1) -> None:
    """Answer database failures a client can retry with 503 or 502 instead of 500.

    Retries used up, an unreachable database and timeouts get ``503 Service
    Unavailable`` with a ``Retry-After`` header; an
    :class:`~flask_txn.AmbiguousCommitError` gets ``502 Bad Gateway``, whose body
    tells the client to send the request again with the same idempotency key.
    The body is JSON, ``{"error": <sentence>, "reason": <reason>}`` plus
    ``sqlstate`` and ``attempts`` where known, unless the client prefers HTML
    (a browser), which gets a short HTML page with the same sentence. Each
    response is logged as one WARNING line on the ``flask_txn`` logger. See
    :doc:`/reliability` for the table.

    :class:`FlaskTxn` registers these handlers on every app by default
    (``TXN_ERROR_HANDLERS``); call this function to use another ``retry_after``,
    or to add them to a blueprint.

    Handlers are registered for ``OperationalError`` (which covers every
    retriable and connection error), SQLAlchemy's pool ``TimeoutError`` and
    ``AmbiguousCommitError``. An ``OperationalError`` of another kind (a full
    disk, say) is re-raised, so Flask answers it as any unhandled error.

    :param app: the app, or a blueprint to limit the handlers to its views.
    :param retry_after: seconds for the ``Retry-After`` header, a whole number >= 0.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0
       A client that prefers HTML gets an HTML page; responses vary on ``Accept``.
    """
    if not isinstance(app, Flask | Blueprint):
        raise ConfigError(
            f"'register_error_handlers' needs a Flask app or a Blueprint, got {app!r}."
            " Call it with the app (or blueprint) whose errors it should answer."
        )
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ConfigError(
            f"'retry_after' must be a whole number of seconds >= 0 (the Retry-After"
            f" header), got {retry_after!r}."
        )

    for error in _HANDLED:
        app.register_error_handler(error, functools.partial(_answer, retry_after=retry_after))


def register_default_error_handlers(app: Flask) -> None:
    """What ``TXN_ERROR_HANDLERS`` adds to every app: :func:`register_error_handlers`'
    answers, yielding to any handler of the app's own for the same errors.

    A handler the app registers for the same class replaces this one (before
    ``init_app``, this one is not added); one for a broader class
    (``SQLAlchemyError``, ``Exception``) is found at the time of the error and
    called instead.
    """
    handlers = app.error_handler_spec[None][None]

    def database_error(exc: Exception) -> Any:
        for cls in type(exc).__mro__:
            own = handlers.get(cls)
            if own is not None and own is not database_error:
                return own(exc)
        return _answer(exc, retry_after=1)

    for error in _HANDLED:
        if error not in handlers:
            app.register_error_handler(error, database_error)


def _answer(exc: Exception, *, retry_after: int) -> Response:
    """The 503 or 502 for ``exc``, JSON or HTML for a client that prefers it; or
    ``exc`` raised again, for Flask to answer, if it is no failure of that kind."""
    reason = classify(exc)
    if reason is None:
        raise exc
    status = 502 if reason == "commit-unknown" else 503
    message = _message(reason, exc, retry_after)
    # An ambiguous commit's SQLSTATE (40003, if any) is its cause's.
    code = sqlstate_of(exc.__cause__ or exc if isinstance(exc, AmbiguousCommitError) else exc)
    body: dict[str, Any] = {"error": message, "reason": reason}
    if code is not None:
        body["sqlstate"] = code
    attempts = getattr(exc, "txn_attempts", None)
    if attempts is not None:
        body["attempts"] = attempts
    response = error_response(status, body, retry_after)
    log.warning(
        "Answered %d (%s) for endpoint %r: %s%s",
        status,
        reason,
        request.endpoint,
        type(exc).__name__,
        "" if code is None else f", SQLSTATE {code}",
    )
    return response


def error_response(status: int, body: dict[str, Any], retry_after: int | None) -> Response:
    """``body`` as JSON, or Werkzeug's short HTML page with its ``error`` sentence for
    a client that prefers HTML; with ``Retry-After`` if given."""
    if request.accept_mimetypes.best_match(_MEDIA_TYPES) == "text/html":
        response = _PAGES[status](description=body["error"]).get_response()
    else:
        response = jsonify(body)
        response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    response.vary.add("Accept")
    return response
