"""flask-txn: correct-by-default database transactions for Flask."""

from ._atomic import Atomic, atomic
from ._errorhandlers import register_error_handlers
from ._errors import (
    AmbiguousCommitError,
    ConfigError,
    FlaskTxnError,
    NestingError,
    NPlusOneError,
    PartialCommitError,
    PendingWritesError,
    TransactionAbortedError,
    UsageError,
)
from ._extension import FlaskTxn
from ._idempotency import idempotency_keys, idempotent, purge_idempotency_keys
from ._locking import (
    Versioned,
    advisory_lock,
    advisory_lock_key,
    lock_rows,
    try_advisory_lock,
)
from ._retry import is_retryable, sqlstate_of
from ._savepoint import on_commit
from ._signals import transaction_committed, transaction_retrying, transaction_rolled_back

__version__ = "0.1.0.dev0"

__all__ = [
    "AmbiguousCommitError",
    "Atomic",
    "ConfigError",
    "FlaskTxn",
    "FlaskTxnError",
    "NPlusOneError",
    "NestingError",
    "PartialCommitError",
    "PendingWritesError",
    "TransactionAbortedError",
    "UsageError",
    "Versioned",
    "advisory_lock",
    "advisory_lock_key",
    "atomic",
    "idempotency_keys",
    "idempotent",
    "is_retryable",
    "lock_rows",
    "on_commit",
    "purge_idempotency_keys",
    "register_error_handlers",
    "sqlstate_of",
    "transaction_committed",
    "transaction_retrying",
    "transaction_rolled_back",
    "try_advisory_lock",
]
