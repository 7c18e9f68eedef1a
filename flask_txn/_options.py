"""An outermost block's options: its arguments over the app's config, checked
against the database, and applied as its transaction begins."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ._config import (
    RetryOn,
    RetryPolicy,
    Settings,
    StatusVeto,
    check_dialect_isolation,
    check_flag,
    check_isolation,
    check_retries,
    check_retry_on,
    check_wait_order,
)
from ._engine import SQLITE_BEGIN
from ._errors import ConfigError, NestingError, UsageError
from ._limiter import check_key
from ._session import JOINED
from ._timeouts import BLOCK_TIMEOUT_DIALECTS, check_seconds, set_block_timeouts

#: ``atomic()``'s default for an argument not given: the app's config decides.
UNSET: Any = object()
#: Arguments recorded as given: all but ``contention_key`` override a ``TXN_*`` key.
OVERRIDES = (
    "contention_key",
    "isolation",
    "retries",
    "wait_initial",
    "wait_max",
    "deadline",
    "retry_on",
    "readonly",
    "deferrable",
)
#: Arguments that shape the retry loop: only an outermost decorated function has one.
RETRY_ARGUMENTS = frozenset({"retries", "wait_initial", "wait_max", "deadline", "retry_on"})
_POSTGRESQL_ONLY = ("readonly", "deferrable")


class Arguments:
    """What ``atomic()`` was given, validated: None (or False) where not given.

    :param given: every argument by name, :data:`UNSET` where not given.
    """

    __slots__ = (
        "contention_key",
        "deadline",
        "deferrable",
        "durable",
        "explicit",
        "isolation",
        "lock_timeout",
        "max_lag",
        "readonly",
        "replica",
        "retries",
        "retry_on",
        "statement_timeout",
        "wait_initial",
        "wait_max",
    )

    def __init__(self, given: dict[str, Any]) -> None:
        def unless_unset(check: Callable[[str, Any], Any], name: str, default: Any = None) -> Any:
            value = given[name]
            return default if value is UNSET else check(name, value)

        #: the names of the arguments given, which override the app's config.
        self.explicit = frozenset(name for name in OVERRIDES if given[name] is not UNSET)
        self.isolation: str | None = unless_unset(check_isolation, "isolation")
        self.retries: int | None = unless_unset(check_retries, "retries")
        self.wait_initial: float | None = unless_unset(check_seconds, "wait_initial")
        self.wait_max: float | None = unless_unset(check_seconds, "wait_max")
        if self.wait_initial is not None and self.wait_max is not None:
            check_wait_order("wait_max", self.wait_initial, self.wait_max)
        self.deadline: float | None = unless_unset(_positive_or_none, "deadline")
        self.retry_on: RetryOn | None = unless_unset(check_retry_on, "retry_on")
        self.readonly: bool = unless_unset(check_flag, "readonly", False)
        self.deferrable: bool = unless_unset(check_flag, "deferrable", False)
        self.durable: bool = check_flag("durable", given["durable"])
        self.contention_key: str | None = unless_unset(check_key, "contention_key")
        self.statement_timeout = _positive_or_none("statement_timeout", given["statement_timeout"])
        self.lock_timeout = _positive_or_none("lock_timeout", given["lock_timeout"])
        self.replica: bool = check_flag("replica", given["replica"])
        self.max_lag: float | None = check_seconds(
            "max_lag",
            given["max_lag"],
            optional=True,
            allowed="a finite number of seconds >= 0, or None for 'TXN_REPLICA_MAX_LAG'",
        )
        if self.replica:
            self._check_replica()
        elif self.max_lag is not None:
            raise ConfigError(
                f"'max_lag={self.max_lag!r}' only applies to a block on a standby: add"
                " 'replica=True', or remove 'max_lag'."
            )
        if self.deferrable and not self.readonly:
            raise ConfigError(
                "'deferrable=True' needs 'readonly=True' (and isolation 'SERIALIZABLE'):"
                " PostgreSQL only defers read-only serializable transactions."
            )
        if self.deferrable and "isolation" in self.explicit and self.isolation != "SERIALIZABLE":
            raise ConfigError(
                f"'deferrable=True' needs isolation 'SERIALIZABLE', got {self.isolation!r}."
            )

    def _check_replica(self) -> None:
        """``replica=True`` reads on a hot standby: read-only, and never SERIALIZABLE."""
        if "readonly" in self.explicit and not self.readonly:
            raise ConfigError(
                "'replica=True' runs the block read-only on a standby, but"
                " 'readonly=False' was given. Remove 'readonly', or 'replica' for a"
                " block that writes."
            )
        if self.isolation == "SERIALIZABLE" or self.deferrable:
            raise ConfigError(
                f"'replica=True' cannot run isolation={self.isolation!r},"
                f" deferrable={self.deferrable!r}: PostgreSQL runs no SERIALIZABLE"
                " transaction on a hot standby. Use isolation='REPEATABLE READ' (one"
                " snapshot of what the standby replayed), or remove 'replica'."
            )


def _positive_or_none(name: str, value: object) -> float | None:
    seconds: float | None = check_seconds(name, value, optional=True, zero=False)
    return seconds


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """An outermost block's options after config defaults were applied."""

    isolation: str | None
    readonly: bool
    deferrable: bool
    statement_timeout: float | None
    lock_timeout: float | None
    #: how a decorated function is re-run; None for a ``with`` block, which cannot be.
    policy: RetryPolicy | None
    retry_on: RetryOn | None
    #: ``TXN_RETRY_RANDOM``: draws the jitter of each wait.
    random: Callable[[], float]
    veto: StatusVeto
    sqlite_begin: str | None
    #: ``TXN_CONNECT_TIMEOUT``: how long a block keeps retrying connections that
    #: could not be made.
    connect_timeout: float | None
    #: ``atomic(replica=True)``: the block may run on a standby (flask_txn._replicas).
    replica: bool = False
    #: ``atomic(max_lag=...)``; None for ``TXN_REPLICA_MAX_LAG``.
    max_lag: float | None = None
    #: nothing to apply as the transaction begins: no isolation level, BEGIN
    #: mode or read-only flag, no ``SET LOCAL`` (the default; checked per block).
    plain: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        plain = (
            self.isolation is None
            and self.sqlite_begin is None
            and not self.readonly  # deferrable needs readonly
            and self.statement_timeout is None
            and self.lock_timeout is None
        )
        object.__setattr__(self, "plain", plain)


def resolve(block: Arguments, settings: Settings, engine: Engine, *, retrying: bool) -> Options:
    """The block's options with the app's config applied, checked against ``engine``."""
    policy = _policy(block, settings.retry) if retrying else None
    isolation = block.isolation if "isolation" in block.explicit else settings.isolation
    if block.deferrable and isolation != "SERIALIZABLE":
        raise ConfigError(
            f"'deferrable=True' needs isolation 'SERIALIZABLE', but the level in force"
            f" is {isolation!r}. Pass isolation='SERIALIZABLE'."
        )
    postgresql = engine.dialect.name == "postgresql"
    options = Options(
        isolation=isolation,
        # A read on the primary is read-only too, as it would be on a standby.
        readonly=block.readonly or (block.replica and postgresql),
        deferrable=block.deferrable,
        statement_timeout=block.statement_timeout,
        lock_timeout=block.lock_timeout,
        policy=policy,
        retry_on=block.retry_on,
        random=settings.random,
        veto=settings.rollback_on_status,
        # A read takes no write lock as it begins.
        sqlite_begin=_sqlite_begin(block, settings, engine.dialect.name),
        connect_timeout=settings.timeouts.connect,
        replica=block.replica,
        max_lag=block.max_lag,
    )
    _check_dialect(engine, options)
    return options


def _sqlite_begin(block: Arguments, settings: Settings, dialect: str) -> str | None:
    if dialect != "sqlite":
        return None
    return "DEFERRED" if block.replica else settings.sqlite_begin


def _policy(block: Arguments, default: RetryPolicy) -> RetryPolicy:
    policy = RetryPolicy(
        retries=default.retries if block.retries is None else block.retries,
        wait_initial=default.wait_initial if block.wait_initial is None else block.wait_initial,
        wait_max=default.wait_max if block.wait_max is None else block.wait_max,
        deadline=block.deadline if "deadline" in block.explicit else default.deadline,
    )
    if block.wait_initial is None or block.wait_max is None:
        # One of the two comes from the config: only now can their order be checked.
        check_wait_order("wait_max", policy.wait_initial, policy.wait_max)
    return policy


def _check_dialect(engine: Engine, options: Options) -> None:
    dialect = engine.dialect.name
    check_dialect_isolation("isolation", options.isolation, dialect)
    if dialect != "postgresql":
        for name in _POSTGRESQL_ONLY:
            value = getattr(options, name)
            if value:
                raise ConfigError(
                    f"{name}={value!r} needs PostgreSQL; the database is {dialect!r}."
                    f" Remove {name!r} for this database."
                )
    if dialect not in BLOCK_TIMEOUT_DIALECTS:
        for name in ("statement_timeout", "lock_timeout"):
            value = getattr(options, name)
            if value:
                raise ConfigError(
                    f"{name}={value!r} needs PostgreSQL, MariaDB or MySQL; the database is"
                    f" {dialect!r}. Remove {name!r} for this database."
                )


def check_nested(block: Arguments, outer: Options) -> None:
    """Refuse, as a nested block enters, options that only the outermost block can honour."""
    outermost_only = sorted(block.explicit & RETRY_ARGUMENTS) + [
        name
        for name in ("durable", "statement_timeout", "lock_timeout")
        if getattr(block, name) not in (False, None)
    ]
    for name in outermost_only:
        raise NestingError(
            f"{name}={getattr(block, name)!r} cannot be used on a nested atomic block: it"
            " only applies to the outermost block. Move it to the outermost"
            f" 'atomic', or remove it here.{_durable_hint(name)}"
        )
    for name, value, outer_value in (
        ("isolation", block.isolation, outer.isolation),
        ("readonly", block.readonly, outer.readonly),
        ("deferrable", block.deferrable, outer.deferrable),
    ):
        if name in block.explicit and value != outer_value:
            raise NestingError(
                f"{name}={value!r} differs from the enclosing atomic block's"
                f" {name}={outer_value!r}; a savepoint cannot change it. Set it on"
                " the outermost block, or remove it here."
            )


def _durable_hint(name: str) -> str:
    if name != "durable":
        return ""
    return (
        " ('durable=True' promises that the block commits on its own, but it was"
        " entered inside another block.)"
    )


def apply(session: Session, options: Options) -> None:
    """Apply the options to the session's new transaction, before any statement."""
    if options.plain or session.info.get(JOINED):
        return  # flask_txn.testing documents that the test's transaction rules.
    execution_options: dict[str, Any] = {}
    if options.sqlite_begin is not None:
        # Writers queue on SQLite's busy timeout at BEGIN instead of failing
        # with SQLITE_BUSY when a read lock cannot be upgraded mid-transaction.
        execution_options[SQLITE_BEGIN] = options.sqlite_begin
    if options.isolation is not None:
        execution_options["isolation_level"] = options.isolation
    if options.readonly:
        execution_options["postgresql_readonly"] = True
    if options.deferrable:
        execution_options["postgresql_deferrable"] = True
    if execution_options:
        if isinstance(session.get_bind(), Connection):
            raise UsageError(
                f"isolation/readonly options {execution_options!r} cannot be applied: the"
                " session is bound to a connection whose transaction already began."
            )
        session.connection(execution_options=execution_options)
    if options.statement_timeout is not None or options.lock_timeout is not None:
        set_block_timeouts(session.connection(), options.statement_timeout, options.lock_timeout)
