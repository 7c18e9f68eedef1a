"""Exceptions raised by flask-txn itself.

Database errors (``sqlalchemy.exc.DBAPIError`` and the driver's own) are never
wrapped: they propagate unchanged. flask-txn adds only these::

    FlaskTxnError
    ├── ConfigError (also ValueError)         a TXN_* key or an argument has a bad value
    ├── UsageError (also RuntimeError)        called in the wrong place or order
    │   └── NestingError                      an atomic block cannot run where it was entered
    ├── PendingWritesError                    uncommitted writes would be lost
    ├── TransactionAbortedError               a swallowed database error aborted the transaction
    ├── AmbiguousCommitError                  COMMIT was sent, its outcome is unknown
    │   └── PartialCommitError                some binds committed, a later one failed
    └── NPlusOneError                         a relationship lazy-loaded in a loop
"""

from __future__ import annotations


class FlaskTxnError(Exception):
    """Base class of every exception flask-txn raises itself."""


class ConfigError(FlaskTxnError, ValueError):
    """A config key or an argument has a value flask-txn cannot use."""


class UsageError(FlaskTxnError, RuntimeError):
    """flask-txn was used outside the context it needs (no app context, no block)."""


class NestingError(UsageError):
    """A nested atomic block asked for something only the outermost block can set."""


class PendingWritesError(FlaskTxnError):
    """Uncommitted writes would have been discarded silently."""


class TransactionAbortedError(FlaskTxnError):
    """The function returned normally, but a database error it caught had aborted
    the transaction, so nothing could be committed. The error is the ``__cause__``.
    """


class AmbiguousCommitError(FlaskTxnError):
    """COMMIT's outcome is unknown: the connection was lost while its reply was
    pending, or the server reported SQLSTATE 40003 (statement completion unknown).

    The transaction may or may not have committed, so it is never retried. The
    driver's error is the ``__cause__``. Make the operation idempotent (an
    idempotency key stored in the same transaction) so the client can retry safely.
    """


class PartialCommitError(AmbiguousCommitError):
    """A block that wrote to several Flask-SQLAlchemy binds committed some of them,
    then the COMMIT of the next one failed: the block's work is partly saved.

    The binds commit one after the other (never atomically across databases):
    the other binds in the order the block first used them, the default bind
    last. Like :class:`AmbiguousCommitError`, it is never retried. The failed
    COMMIT's error is the ``__cause__``.

    .. versionadded:: 0.2.0
    """

    def __init__(self, message: str, *, committed: list[str | None], failed: str | None) -> None:
        super().__init__(message)
        #: the bind keys that committed, in order (None is the default bind).
        self.committed = committed
        #: the bind key whose COMMIT failed (None is the default bind).
        self.failed = failed


class NPlusOneError(FlaskTxnError):
    """A relationship was lazy-loaded, one query each, for many objects of one query.

    Raised by the lazy load that crosses ``TXN_NPLUSONE_THRESHOLD`` when
    ``TXN_NPLUSONE`` is ``"raise"``. The message names the relationship and the
    eager load that fixes it.

    .. versionadded:: 0.2.0
    """
