"""Committing an attempt's transaction: what stops it before COMMIT, and COMMIT itself.

Both return the error instead of raising it, so that the attempt records it and
decides (``_transaction.Attempt._end``) whether the block is re-run.
"""

from __future__ import annotations

from sqlalchemy.orm import Session
from sqlalchemy.util import ScopedRegistry

from ._adopt import bind_name, commit_binds, failed_bind
from ._errors import (
    AmbiguousCommitError,
    PartialCommitError,
    TransactionAbortedError,
    UsageError,
)
from ._retry import AMBIGUOUS_SQLSTATE, is_disconnect, sqlstate_of
from ._session import aborted
from ._testhooks import hooks


def obstacle(
    session: Session,
    root: object,
    *,
    registry: ScopedRegistry[Session] | None,
    with_block: bool,
    last_error: BaseException | None,
    lock_failures: list[tuple[int, BaseException]],
) -> BaseException | None:
    """What stops ``session``'s transaction ``root`` from committing, if anything: a
    mistake in the block, a fault the pytest plugin injects, an aborted transaction,
    or a MySQL lock error that undid one of its statements (``lock_failures``)."""
    if registry is not None and not (registry.has() and registry() is session):
        kind = "a 'with atomic()' block" if with_block else "an atomic block"
        return UsageError(
            f"The session was removed inside {kind}, so the transaction was lost."
            " Do not call 'session.remove()' inside a block."
        )
    if session.get_transaction() is not root:
        return UsageError(
            "The transaction was rolled back inside the atomic block (session.rollback()"
            " or session.close()), so the writes made before that are lost and those"
            " made after it would be committed alone. Do not end the session's"
            " transaction inside a block: raise instead, or use a nested 'atomic'"
            " block to undo part of the work."
        )
    try:
        hooks.before_commit(session)
    except Exception as exc:
        return exc
    # PostgreSQL turns COMMIT of an aborted transaction into a silent ROLLBACK,
    # and a flush there fails with 25P02, which would hide the error that aborted it.
    place = None if last_error is None else _aborted_at(session)
    if place is not None:
        error = TransactionAbortedError(
            f"A database error aborted this transaction{place}, but the function caught it"
            " and returned normally, so nothing was committed. Let the error propagate, or"
            " wrap the failing statement in a nested 'atomic' block (a savepoint)."
        )
        error.__cause__ = last_error
        return error
    if lock_failures:
        # InnoDB undid the statement alone: COMMIT would keep the rest without it.
        cause = lock_failures[0][1]
        error = TransactionAbortedError(
            f"MySQL error {sqlstate_of(cause)} (a lock wait timeout or NOWAIT) undid one"
            " statement of this transaction, but the function caught it and returned"
            " normally. InnoDB rolled back that statement alone, so committing would keep"
            " the rest of the block without it: nothing was committed. Let the error"
            " propagate, or wrap the statement in a nested 'atomic' block (a savepoint)"
            " to carry on without it."
        )
        error.__cause__ = cause
        return error
    return None


def _aborted_at(session: Session) -> str | None:
    """Where an error aborted the session's transaction: ``""`` on its own (default)
    bind, ``" on bind 'key'"`` on another Flask-SQLAlchemy bind; None if nowhere."""
    if aborted(session):
        return ""
    key = failed_bind(session)
    return None if key is None else f" on {bind_name(key)}"


def commit(session: Session) -> BaseException | None:
    """COMMIT; an error whose outcome is unknown becomes :class:`AmbiguousCommitError`."""
    try:
        commit_binds(session)  # session.commit(), binds in a known order
    except PartialCommitError as exc:
        return exc
    except Exception as exc:
        if is_disconnect(exc) or sqlstate_of(exc) == AMBIGUOUS_SQLSTATE:
            ambiguous = AmbiguousCommitError(
                "COMMIT's outcome is unknown (the connection was lost while waiting for"
                " its reply, or the server reported SQLSTATE 40003): the transaction may"
                " or may not have committed, so it is not retried. Make the operation"
                " idempotent (store an idempotency key in the same transaction) and let"
                " the client retry with the same key."
            )
            ambiguous.__cause__ = exc
            return ambiguous
        return exc
    return None
