"""SQLAlchemy event listeners that let the current attempt see what user code hides."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.orm import Session

from ._errors import UsageError
from ._retry import STATEMENT_ROLLED_BACK, is_retryable, sqlstate_of, timed_out
from ._session import IN_FAILED_TRANSACTION
from ._transaction import Attempt, current, current_on


def record_error(context: ExceptionContext) -> None:
    """``handle_error`` listener: remember database errors of the open attempt.

    User code may catch a serialization failure and carry on; PostgreSQL would
    then turn COMMIT into a silent ROLLBACK. Recording here lets the block see it,
    and a MySQL lock error that undid one statement (which the block must not
    commit without), with the savepoint depth it happened at.
    A connection that could not be made (refused, the server starting up or
    shutting down) dooms the attempt too: nothing was sent, so running it again
    is safe, and the server may be back by then.
    """
    attempt = current()
    if attempt is None or context.is_pre_ping or not _concerns(attempt, context):
        return
    record_on(attempt, context)


def record_on(attempt: Attempt, context: ExceptionContext) -> None:
    """Record a database error on ``attempt``; the first retriable one dooms it."""
    error = context.sqlalchemy_exception or context.original_exception
    code = sqlstate_of(error)
    # "In failed transaction" follows the error that aborted it: keep that one.
    if code != IN_FAILED_TRANSACTION:
        attempt.last_error = error
    if code in STATEMENT_ROLLED_BACK:
        attempt.lock_failures.append((len(attempt.savepoints), error))
    reconnect = context.connection is None and _may_reconnect(attempt)
    if attempt.first_retriable_error is None and (
        (context.is_disconnect and not timed_out(error)) or reconnect or is_retryable(error)
    ):
        attempt.first_retriable_error = error


def _concerns(attempt: Attempt, context: ExceptionContext) -> bool:
    """An error of the attempt's engine, or of its open connection to a standby. A
    standby that cannot be reached as the block begins is not the attempt's failure:
    the block then begins on another server (flask_txn._replicas)."""
    if context.engine is attempt.engine:
        return True
    return context.connection is not None and context.engine is attempt.session.bind


def _may_reconnect(attempt: Attempt) -> bool:
    """Whether a connection that could not be made is worth another attempt: only
    while the block has run for less than the connect timeout in all. A connect
    that ran out of it (a host that does not answer) would make each retry wait
    as long again."""
    limit = attempt.options.connect_timeout
    return limit is None or time.perf_counter() - attempt.started < limit


def refuse_inner_commit(session: Session) -> None:
    """``before_commit`` listener: only the outermost block commits its transaction."""
    attempt = current_on(session)
    # A savepoint's commit is a RELEASE, which a nested block may do.
    if attempt is not None and not attempt.committing and session.get_nested_transaction() is None:
        raise UsageError(
            "'session.commit()' was called inside an atomic block. The block commits"
            " when it ends; committing earlier would make part of its work permanent"
            " even if the rest fails. Remove the call, or use 'session.flush()' to send"
            " the changes to the database without committing."
        )


def watch_errors(engine: Engine) -> None:
    """Listen to ``engine``'s errors on behalf of the attempts that use it (a standby's)."""
    event.listen(engine, "handle_error", record_error)


def watch(engine: Engine, sessions: Any) -> None:
    """Listen to ``engine``'s errors and to commits of ``sessions`` (a sessionmaker
    or a Session class) on behalf of the attempts that use them."""
    event.listen(engine, "handle_error", record_error)
    # A Flask-SQLAlchemy factory adopted by several apps is watched once.
    if not event.contains(sessions, "before_commit", refuse_inner_commit):
        event.listen(sessions, "before_commit", refuse_inner_commit)
