"""Bad input: every wrong use fails at once with a clear error (the table in docs/reliability.md).

:data:`TABLE` mirrors the docs table row for row. A row tested elsewhere names
that test; the others are tested here, by :func:`test_wrong_use_fails_early`,
which arranges everything the wrong use needs, then checks that the very next
step raises, with a message naming the argument or key, showing the bad value
and saying what is allowed. Passwords in database URLs are checked last.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_txn import (
    ConfigError,
    FlaskTxn,
    NestingError,
    PendingWritesError,
    UsageError,
    atomic,
    on_commit,
    register_error_handlers,
)
from flask_txn._config import DEFAULTS
from flask_txn.opentelemetry import instrument
from flask_txn.testing import Faults

from .pgserver import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "reliability.md"
#: A PostgreSQL URL nothing listens at: engines are made, never connected.
NOWHERE = "postgresql+psycopg2://user@127.0.0.1:1/db"

#: Given a SQLite URL, arrange a wrong use and return the step that must raise.
Arrange = Callable[[str], Callable[[], object]]


@dataclasses.dataclass(frozen=True)
class Row:
    """One wrong use: what it raises, when, and the test that shows it."""

    id: str
    error: type[Exception]
    raised: str
    #: a test elsewhere (``file::test[param]``), or None: tested here by ``arrange``
    tested_by: str | None = None
    arrange: Arrange | None = None
    #: pieces the message contains: the key or argument, the bad value, the allowed
    says: tuple[str, ...] = ()
    #: the config keys whose type the row checks
    keys: tuple[str, ...] = ()

    @property
    def test(self) -> str:
        if self.tested_by is not None:
            return self.tested_by
        return f"test_bad_input.py::test_wrong_use_fails_early[{self.id}]"


def _init(url: str, **config: Any) -> Callable[[], object]:
    """The step ``FlaskTxn(app)`` for an app with ``config``."""
    app = Flask("bad-input")
    app.config.update(TXN_DATABASE_URI=url, **config)
    return lambda: FlaskTxn(app)


def _config(**config: Any) -> Arrange:
    return lambda url: _init(url, **config)


def _config_on(url: str, **config: Any) -> Arrange:
    return lambda _: _init(url, **config)


def _generator() -> Any:
    yield 1


async def _async_generator() -> Any:
    yield 1


def _decorate(func: Callable[..., Any]) -> Arrange:
    return lambda _: lambda: atomic(func)


def _on_commit_robust(_: str) -> Callable[[], object]:
    return lambda: on_commit(print, robust="yes")  # type: ignore[arg-type]


def _error_handlers(target: object, **options: Any) -> Arrange:
    return lambda _: lambda: register_error_handlers(target, **options)  # type: ignore[arg-type]


def _fail_next(_: str) -> Callable[[], object]:
    faults = Faults()
    return lambda: faults.fail_next(0)


def _instrument(_: str) -> Callable[[], object]:
    return lambda: instrument("app")  # type: ignore[arg-type]


BAD_CONFIG = "test_extension.py::test_bad_config_value_is_refused"
BAD_OPTIONS = "test_atomic.py::test_bad_options_fail_when_applied"
NESTED = "test_atomic.py::test_nested_conflicts_fail_at_entry"
SECONDS = "a finite number of seconds > 0"

TABLE = [
    # -- config keys, read and checked in init_app
    Row(
        "uri-missing",
        ConfigError,
        "init_app",
        "test_extension.py::test_missing_database_uri_is_refused",
        keys=("TXN_DATABASE_URI",),
    ),
    Row("uri-type", ConfigError, "init_app", f"{BAD_CONFIG}[uri-type]", keys=("TXN_DATABASE_URI",)),
    Row("uri-syntax", ConfigError, "init_app", f"{BAD_CONFIG}[uri-syntax]"),
    Row("uri-dialect", ConfigError, "init_app", f"{BAD_CONFIG}[uri-dialect]"),
    Row(
        "uri-password",
        ConfigError,
        "init_app",
        "test_extension.py::test_bad_url_message_hides_the_password",
    ),
    Row(
        "db-not-registered",
        UsageError,
        "init_app",
        "test_adopt.py::test_db_not_registered_is_refused",
    ),
    Row(
        "db-uri-conflict",
        ConfigError,
        "init_app",
        "test_adopt.py::test_a_different_database_uri_is_refused",
    ),
    Row(
        "db-engine-keys",
        ConfigError,
        "init_app",
        "test_adopt.py::test_engine_keys_are_refused_with_db",
    ),
    Row(
        "db-replicas",
        ConfigError,
        "init_app",
        "test_adopt.py::test_replicas_are_refused_with_db",
    ),
    Row(
        "db-no-default-bind",
        ConfigError,
        "init_app",
        "test_adopt.py::test_db_without_a_default_bind_is_refused",
    ),
    Row(
        "db-async",
        UsageError,
        "entering the block",
        "test_adopt.py::test_async_views_are_refused",
    ),
    Row(
        "db-second-session",
        ConfigError,
        "init_app",
        "test_adopt.py::test_without_db_the_same_database_is_refused",
    ),
    Row(
        "db-second-session-no-uri",
        ConfigError,
        "init_app",
        "test_adopt.py::test_without_db_and_without_uri_is_refused",
    ),
    Row(
        "engine-options-type",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[engine-options-type]",
        keys=("TXN_ENGINE_OPTIONS",),
    ),
    Row("engine-options-unknown", ConfigError, "init_app", f"{BAD_CONFIG}[engine-options-unknown]"),
    Row(
        "session-options-type",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[session-options-type]",
        keys=("TXN_SESSION_OPTIONS",),
    ),
    Row("session-options-bind", ConfigError, "init_app", f"{BAD_CONFIG}[session-options-reserved]"),
    Row(
        "session-scope",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[scope]",
        keys=("TXN_SESSION_SCOPE",),
    ),
    Row(
        "on-discard", ConfigError, "init_app", f"{BAD_CONFIG}[on-discard]", keys=("TXN_ON_DISCARD",)
    ),
    Row(
        "isolation-name",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[isolation-name]",
        keys=("TXN_ISOLATION_LEVEL",),
    ),
    Row(
        "isolation-type",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[isolation-type]",
        keys=("TXN_ISOLATION_LEVEL",),
    ),
    Row("isolation-autocommit", ConfigError, "init_app", f"{BAD_CONFIG}[isolation-autocommit]"),
    Row("isolation-not-offered", ConfigError, "init_app", f"{BAD_CONFIG}[isolation-not-offered]"),
    Row(
        "retries-type", ConfigError, "init_app", f"{BAD_CONFIG}[retries-str]", keys=("TXN_RETRIES",)
    ),
    Row("retries-negative", ConfigError, "init_app", f"{BAD_CONFIG}[retries-negative]"),
    Row(
        "wait-initial-type",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[wait-initial-str]",
        keys=("TXN_RETRY_WAIT_INITIAL",),
    ),
    Row(
        "wait-max-nan",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[wait-max-nan]",
        keys=("TXN_RETRY_WAIT_MAX",),
    ),
    Row("wait-max-below-initial", ConfigError, "init_app", f"{BAD_CONFIG}[wait-max-below-initial]"),
    Row(
        "deadline-zero",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[deadline-zero]",
        keys=("TXN_RETRY_DEADLINE",),
    ),
    Row(
        "rollback-on-status",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[status-str]",
        keys=("TXN_ROLLBACK_ON_STATUS",),
    ),
    Row("retry-sleep", ConfigError, "init_app", f"{BAD_CONFIG}[sleep]", keys=("TXN_RETRY_SLEEP",)),
    Row(
        "retry-random", ConfigError, "init_app", f"{BAD_CONFIG}[random]", keys=("TXN_RETRY_RANDOM",)
    ),
    Row(
        "sqlite-begin",
        ConfigError,
        "init_app",
        f"{BAD_CONFIG}[sqlite-begin]",
        keys=("TXN_SQLITE_BEGIN",),
    ),
    Row(
        "sqlite-begin-elsewhere",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_SQLITE_BEGIN="deferred"),
        says=("'TXN_SQLITE_BEGIN'", "'DEFERRED'", "'postgresql'", "only applies to SQLite"),
    ),
    Row(
        "nplusone-mode",
        ConfigError,
        "init_app",
        arrange=_config(TXN_NPLUSONE="loud"),
        says=("'TXN_NPLUSONE'", "'loud'", "'off', 'warn', 'raise'"),
        keys=("TXN_NPLUSONE",),
    ),
    Row(
        "nplusone-threshold",
        ConfigError,
        "init_app",
        arrange=_config(TXN_NPLUSONE_THRESHOLD=1),
        says=("'TXN_NPLUSONE_THRESHOLD'", "got 1", "a whole number of at least 2"),
        keys=("TXN_NPLUSONE_THRESHOLD",),
    ),
    Row(
        "error-handlers-flag",
        ConfigError,
        "init_app",
        arrange=_config(TXN_ERROR_HANDLERS="yes"),
        says=("'TXN_ERROR_HANDLERS'", "'yes'", "True or False"),
        keys=("TXN_ERROR_HANDLERS",),
    ),
    Row(
        "idempotency-header",
        ConfigError,
        "init_app",
        arrange=_config(TXN_IDEMPOTENCY_HEADER="Idempotency Key"),
        says=("'TXN_IDEMPOTENCY_HEADER'", "'Idempotency Key'", "an HTTP header name"),
        keys=("TXN_IDEMPOTENCY_HEADER",),
    ),
    Row(
        "idempotency-ttl",
        ConfigError,
        "init_app",
        arrange=_config(TXN_IDEMPOTENCY_TTL=0),
        says=("'TXN_IDEMPOTENCY_TTL'", "got 0", "seconds > 0"),
        keys=("TXN_IDEMPOTENCY_TTL",),
    ),
    Row(
        "idempotency-scope",
        ConfigError,
        "init_app",
        arrange=_config(TXN_IDEMPOTENCY_SCOPE="user"),
        says=("'TXN_IDEMPOTENCY_SCOPE'", "'user'", "a callable"),
        keys=("TXN_IDEMPOTENCY_SCOPE",),
    ),
    Row(
        "admission-flag",
        ConfigError,
        "init_app",
        arrange=_config(TXN_ADMISSION="on"),
        says=("'TXN_ADMISSION'", "'on'", "True", "False"),
        keys=("TXN_ADMISSION",),
    ),
    Row(
        "admission-limits",
        ConfigError,
        "init_app",
        arrange=_config(TXN_ADMISSION_LIMITS=(4, 2)),
        says=("'TXN_ADMISSION_LIMITS'", "(4, 2)", "1 <= smallest <= largest", "'TXN_ADMISSION'"),
        keys=("TXN_ADMISSION_LIMITS",),
    ),
    Row(
        "connect-timeout-type",
        ConfigError,
        "init_app",
        arrange=_config(TXN_CONNECT_TIMEOUT="10s"),
        says=("'TXN_CONNECT_TIMEOUT'", "'10s'", SECONDS, "None"),
        keys=("TXN_CONNECT_TIMEOUT",),
    ),
    Row(
        "tcp-timeout-negative",
        ConfigError,
        "init_app",
        arrange=_config(TXN_TCP_TIMEOUT=-1),
        says=("'TXN_TCP_TIMEOUT'", "-1", SECONDS, "None"),
        keys=("TXN_TCP_TIMEOUT",),
    ),
    Row(
        "statement-timeout-type",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_STATEMENT_TIMEOUT="5"),
        says=("'TXN_STATEMENT_TIMEOUT'", "'5'", SECONDS, "0 for no limit", "'TXN_RETRY_DEADLINE'"),
        keys=("TXN_STATEMENT_TIMEOUT",),
    ),
    Row(
        "read-timeout-type",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_READ_TIMEOUT=True),
        says=("'TXN_READ_TIMEOUT'", "True", SECONDS, "0 for no limit"),
        keys=("TXN_READ_TIMEOUT",),
    ),
    Row(
        "pool-timeout-zero",
        ConfigError,
        "init_app",
        arrange=_config(TXN_POOL_TIMEOUT=0),
        says=("'TXN_POOL_TIMEOUT'", "got 0", SECONDS, "'TXN_RETRY_DEADLINE'"),
        keys=("TXN_POOL_TIMEOUT",),
    ),
    Row(
        "read-timeout-not-longer",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_STATEMENT_TIMEOUT=2, TXN_READ_TIMEOUT=1),
        says=("'TXN_READ_TIMEOUT' (1 s)", "statement timeout in force (2 s", "Raise"),
    ),
    Row(
        "statement-timeout-not-postgresql",
        ConfigError,
        "init_app",
        arrange=_config(TXN_STATEMENT_TIMEOUT=5),
        says=("'TXN_STATEMENT_TIMEOUT' is 5", "PostgreSQL", "'sqlite'", "to None"),
    ),
    Row(
        "read-timeout-not-postgresql",
        ConfigError,
        "init_app",
        arrange=_config(TXN_READ_TIMEOUT=5),
        says=("'TXN_READ_TIMEOUT' is 5", "PostgreSQL", "'sqlite'", "to None"),
    ),
    Row(
        "pool-timeout-no-queue",
        ConfigError,
        "init_app",
        arrange=_config_on(
            NOWHERE, TXN_POOL_TIMEOUT=1, TXN_ENGINE_OPTIONS={"poolclass": sa.pool.NullPool}
        ),
        says=("'TXN_POOL_TIMEOUT' is 1", "NullPool", "None", "QueuePool"),
    ),
    Row(
        "uri-driver-missing",
        ConfigError,
        "init_app",
        arrange=_config_on("oracle+oracledb://app@127.0.0.1:1/app"),
        says=("'TXN_DATABASE_URI'", "'oracle+oracledb'", "not installed", "pip install oracledb"),
    ),
    Row(
        "uri-driver-unsupported",
        ConfigError,
        "init_app",
        arrange=_config_on("postgresql+pg8000://app@127.0.0.1:1/app"),
        says=("'TXN_DATABASE_URI'", "'postgresql+pg8000'", "no SQLSTATE", "postgresql+psycopg"),
    ),
    Row(
        "async-uri-driver-missing",
        ConfigError,
        "init_app",
        arrange=_config(TXN_ASYNC_DATABASE_URI="mysql+aiomysql://app@127.0.0.1:1/app"),
        says=("'TXN_ASYNC_DATABASE_URI'", "'mysql+aiomysql'", "pip install aiomysql"),
    ),
    Row(
        "async-uri-type",
        ConfigError,
        "init_app",
        arrange=_config(TXN_ASYNC_DATABASE_URI=42),
        says=("'TXN_ASYNC_DATABASE_URI'", "'42'", "a URL string or a sqlalchemy.engine.URL"),
        keys=("TXN_ASYNC_DATABASE_URI",),
    ),
    Row("async-uri-syntax", ConfigError, "init_app", "test_async.py::test_async_url_is_validated"),
    Row(
        "async-extra-missing",
        ConfigError,
        "init_app",
        "test_async.py::test_without_the_async_extra",
    ),
    Row(
        "async-engine-options-type",
        ConfigError,
        "init_app",
        arrange=_config(TXN_ASYNC_ENGINE_OPTIONS=["echo"]),
        says=("'TXN_ASYNC_ENGINE_OPTIONS'", "['echo']", "a dict of keyword arguments"),
        keys=("TXN_ASYNC_ENGINE_OPTIONS",),
    ),
    Row(
        "async-engine-options-unknown",
        ConfigError,
        "init_app",
        "test_async.py::test_bad_async_engine_option_is_a_config_error",
    ),
    Row(
        "async-pool-asyncpg", ConfigError, "init_app", "test_async.py::test_asyncpg_pool_is_refused"
    ),
    Row(
        "async-poolclass-psycopg",
        ConfigError,
        "init_app",
        "test_async.py::test_psycopg_loop_bound_pool_is_refused",
    ),
    Row(
        "replica-uris-type",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_REPLICA_URIS=NOWHERE),
        says=("'TXN_REPLICA_URIS'", "'postgresql+psycopg2://user@127.0.0.1:1/db'", "a list of"),
        keys=("TXN_REPLICA_URIS",),
    ),
    Row(
        "replica-uris-not-postgresql",
        ConfigError,
        "init_app",
        arrange=_config(TXN_REPLICA_URIS=["sqlite:///standby.db"]),
        says=("'TXN_REPLICA_URIS'", "'sqlite:///standby.db'", "need PostgreSQL"),
    ),
    Row(
        "replica-max-lag",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_REPLICA_MAX_LAG="5s"),
        says=("'TXN_REPLICA_MAX_LAG'", "'5s'", "a finite number of seconds >= 0"),
        keys=("TXN_REPLICA_MAX_LAG",),
    ),
    Row(
        "replica-check-interval",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_REPLICA_CHECK_INTERVAL=-1),
        says=("'TXN_REPLICA_CHECK_INTERVAL'", "-1", "a finite number of seconds >= 0"),
        keys=("TXN_REPLICA_CHECK_INTERVAL",),
    ),
    Row(
        "replica-read-your-writes",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_REPLICA_READ_YOUR_WRITES="always"),
        says=("'TXN_REPLICA_READ_YOUR_WRITES'", "'always'", "'off', 'request', 'session'"),
        keys=("TXN_REPLICA_READ_YOUR_WRITES",),
    ),
    Row(
        "replica-session-needs-secret-key",
        ConfigError,
        "init_app",
        arrange=_config_on(NOWHERE, TXN_REPLICA_READ_YOUR_WRITES="session"),
        says=("'TXN_REPLICA_READ_YOUR_WRITES' is 'session'", "'SECRET_KEY' is not set"),
    ),
    Row("unknown-key", ConfigError, "init_app", f"{BAD_CONFIG}[unknown-key]"),
    Row(
        "unknown-option",
        ConfigError,
        "FlaskTxn()",
        "test_extension.py::test_unknown_constructor_option_is_refused",
    ),
    Row(
        "init-twice",
        UsageError,
        "init_app",
        "test_extension.py::test_registering_twice_is_refused[same-object]",
    ),
    # -- atomic's arguments, checked when atomic(...) is called
    Row("atomic-isolation", ConfigError, "atomic()", BAD_OPTIONS),
    Row("atomic-retries", ConfigError, "atomic()", BAD_OPTIONS),
    Row("atomic-backoff", ConfigError, "atomic()", BAD_OPTIONS),
    Row("atomic-deadline", ConfigError, "atomic()", BAD_OPTIONS),
    Row("atomic-timeouts", ConfigError, "atomic()", BAD_OPTIONS),
    Row("atomic-flags", ConfigError, "atomic()", BAD_OPTIONS),
    Row("atomic-deferrable", ConfigError, "atomic()", BAD_OPTIONS),
    Row("atomic-retry-on", ConfigError, "atomic()", BAD_OPTIONS),
    Row(
        "atomic-replica",
        ConfigError,
        "atomic()",
        "test_replicas.py::test_bad_replica_arguments_are_refused",
    ),
    Row(
        "atomic-contention-key",
        ConfigError,
        "atomic()",
        arrange=lambda _: lambda: atomic(contention_key=42),  # type: ignore[call-overload]
        says=("'contention_key'", "got 42", "a non-empty string", "Leave it out"),
    ),
    Row(
        "atomic-unknown-argument",
        ConfigError,
        "atomic()",
        arrange=lambda _: lambda: atomic(retry=3),  # type: ignore[call-overload]
        says=("'atomic' got an unknown argument 'retry'", "(=3)", "Did you mean 'retries'?"),
    ),
    Row(
        "atomic-not-callable",
        ConfigError,
        "atomic()",
        "test_atomic.py::test_atomic_refuses_a_non_callable",
    ),
    Row(
        "atomic-generator",
        UsageError,
        "decorating",
        arrange=_decorate(_generator),
        says=("'atomic' cannot decorate '_generator'", "generator function", "Decorate a plain"),
    ),
    Row(
        "atomic-async-generator",
        UsageError,
        "decorating",
        arrange=_decorate(_async_generator),
        says=("'atomic' cannot decorate '_async_generator'", "generator function"),
    ),
    Row(
        "atomic-class",
        UsageError,
        "decorating",
        arrange=_decorate(Flask),
        says=("'atomic' cannot decorate the class 'Flask'", "Decorate the methods", "decorators"),
    ),
    Row(
        "atomic-above-route",
        UsageError,
        "first request",
        "test_atomic.py::test_atomic_above_the_route_decorator_is_refused_at_the_first_request",
    ),
    # -- where and how atomic is used, checked when the block is entered
    Row(
        "async-without-async-url",
        UsageError,
        "entering the block",
        "test_async.py::test_psycopg2_app_needs_an_async_url",
    ),
    Row(
        "async-extra-missing-block",
        UsageError,
        "entering the block",
        "test_async.py::test_without_the_async_extra",
    ),
    Row(
        "sync-async-nesting",
        UsageError,
        "entering the block",
        "test_async.py::test_sync_and_async_blocks_do_not_nest",
    ),
    Row(
        "sync-session-in-async-view",
        UsageError,
        "using the session",
        "test_async.py::test_sync_session_inside_an_async_view_is_refused",
    ),
    Row(
        "async-session-outside-block",
        UsageError,
        "using the session",
        "test_async.py::test_async_session_outside_a_block_is_refused",
    ),
    Row(
        "async-block-retry-options",
        ConfigError,
        "entering the block",
        "test_async.py::test_retries_on_an_async_block_are_refused",
    ),
    Row(
        "block-retry-options",
        ConfigError,
        "entering the block",
        "test_atomic.py::test_retry_options_on_a_block_are_refused",
    ),
    Row("nested-conflicts", NestingError, "entering the block", NESTED),
    Row(
        "no-app-context",
        UsageError,
        "entering the block",
        "test_atomic.py::test_atomic_needs_an_app_context",
    ),
    Row(
        "no-extension",
        UsageError,
        "entering the block",
        "test_atomic.py::test_atomic_needs_a_registered_extension",
    ),
    Row(
        "session-no-app-context",
        UsageError,
        "using the session",
        "test_extension.py::test_use_outside_an_app_context_is_refused[session]",
    ),
    Row(
        "session-app-not-registered",
        UsageError,
        "using the session",
        "test_extension.py::test_use_with_an_app_never_initialised_is_refused[session]",
    ),
    Row(
        "dialect-cannot-honour",
        ConfigError,
        "entering the block",
        "test_atomic.py::test_options_sqlite_cannot_honour",
    ),
    Row(
        "statement-timeout-on-mysql",
        ConfigError,
        "entering the block",
        "test_mariadb.py::test_statement_timeout_on_mysql_is_refused",
    ),
    Row(
        "deferrable-level-in-force",
        ConfigError,
        "entering the block",
        "test_atomic.py::test_deferrable_needs_serializable_in_force",
    ),
    Row(
        "pending-writes-before-block",
        PendingWritesError,
        "entering the block",
        "test_atomic.py::test_pending_writes_before_the_block_are_refused",
    ),
    Row(
        "commit-inside-block",
        UsageError,
        "session.commit()",
        "test_atomic.py::test_commit_inside_a_block_is_refused",
    ),
    # -- on_commit
    Row(
        "on-commit-not-callable",
        ConfigError,
        "on_commit()",
        "test_atomic.py::test_on_commit_needs_a_callable",
    ),
    Row(
        "on-commit-robust-type",
        ConfigError,
        "on_commit()",
        arrange=_on_commit_robust,
        says=("'robust'", "'yes'", "True or False"),
    ),
    Row(
        "on-commit-outside-block",
        UsageError,
        "on_commit()",
        "test_atomic.py::test_on_commit_outside_block_is_refused",
    ),
    Row(
        "idempotent-placement",
        UsageError,
        "the request",
        "test_idempotency.py::test_wrong_placement_is_refused",
    ),
    Row(
        "idempotent-class",
        UsageError,
        "@idempotent",
        "test_idempotency.py::test_a_class_is_refused",
    ),
    Row(
        "idempotent-streamed",
        UsageError,
        "the request",
        "test_idempotency.py::test_a_streamed_response_is_refused",
    ),
    Row(
        "idempotency-scope-result",
        ConfigError,
        "the request",
        "test_idempotency.py::test_a_scope_that_would_not_match_again_is_refused",
    ),
    Row(
        "purge-batch-size",
        ConfigError,
        "purge_idempotency_keys()",
        "test_idempotency.py::test_a_bad_batch_size_is_refused",
    ),
    # -- error responses and the testing plugin
    Row(
        "error-handlers-retry-after",
        ConfigError,
        "register_error_handlers()",
        arrange=_error_handlers(Flask("bad-input"), retry_after=1.5),
        says=("'retry_after'", "1.5", "whole number of seconds >= 0"),
    ),
    Row(
        "error-handlers-target",
        ConfigError,
        "register_error_handlers()",
        arrange=_error_handlers("app"),
        says=("'register_error_handlers'", "'app'", "Flask app or a Blueprint"),
    ),
    Row(
        "fail-next-times",
        ConfigError,
        "fail_next()",
        arrange=_fail_next,
        says=("'times'", "got 0", "whole number >= 1"),
    ),
    # -- OpenTelemetry
    Row(
        "otel-instrument-app",
        ConfigError,
        "instrument()",
        arrange=_instrument,
        says=("'app'", "got 'app'", "a Flask app or None"),
    ),
    Row(
        "otel-extra-missing",
        ImportError,
        "import",
        "test_opentelemetry.py::test_without_the_extra",
    ),
]


def _docs_rows() -> list[tuple[str, str, str, str]]:
    """(id, error, raised, tested by) of each row of the table in docs/reliability.md."""
    text = DOCS.read_text(encoding="utf-8")
    table = text.split("(bad-input-table)=", 1)[1]
    rows = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 5:
            if rows and not line.startswith("|"):
                break  # the first line after the table
            continue
        id_, _wrong, error, raised, tested_by = (cell.strip("`") for cell in cells)
        # The error is written as a cross-reference: {py:exc}`~flask_txn.ConfigError`.
        rows.append((id_, error.rsplit(".", 1)[-1], raised, tested_by))
    return rows


def test_docs_table_and_test_table_have_the_same_rows() -> None:
    """docs/reliability.md lists exactly TABLE's rows, in order, with the same errors and tests."""
    expected = [(row.id, row.error.__name__, row.raised, row.test) for row in TABLE]
    assert (_docs_rows(), len(TABLE) >= 25) == (expected, True)


def test_every_config_key_has_a_row() -> None:
    """Each TXN_* key's type is checked by some row, so a new key needs a row."""
    covered = {key for row in TABLE for key in row.keys}
    assert sorted(set(DEFAULTS) - covered) == []


def _parametrize_ids(function: Any) -> set[str]:
    ids: set[str] = set()
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize":
            for value in mark.args[1]:
                if getattr(value, "id", None):
                    ids.add(value.id)
            ids.update(mark.kwargs.get("ids") or [])
    return ids


@pytest.mark.parametrize("row", [row for row in TABLE if row.tested_by], ids=lambda row: row.id)
def test_rows_tested_elsewhere_name_a_real_test(row: Row) -> None:
    """A row's test exists: the module, the function and, if named, the parameter id."""
    path, _, name = row.test.partition("::")
    function_name, _, param = name.partition("[")
    module = importlib.import_module(f"tests.{path.removesuffix('.py')}")
    function = getattr(module, function_name, None)
    assert callable(function), row.test
    if param:
        assert param.removesuffix("]") in _parametrize_ids(function), row.test


@pytest.mark.parametrize("row", [row for row in TABLE if row.arrange], ids=lambda row: row.id)
def test_wrong_use_fails_early(row: Row, tmp_path: Path) -> None:
    """Everything before the wrong step works; the step raises, naming the argument, the value
    and what is allowed."""
    assert row.arrange is not None
    step = row.arrange(f"sqlite:///{tmp_path / 'db'}")
    with pytest.raises(row.error) as raised:
        step()
    message = str(raised.value)
    assert [piece for piece in row.says if piece not in message] == [], message


# -- passwords ------------------------------------------------------------------------------

#: A password with the characters that break naive masking: "@", "/", ":".
SECRET = "s3cr:et/P@ss"


def _texts(exc: BaseException) -> list[str]:
    """What an exception shows: str, repr and notes, through its cause and context chain."""
    texts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), *getattr(current, "__notes__", [])]
        current = current.__cause__ or current.__context__
    return texts


def test_the_password_never_appears(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """No log line, exception message or repr that flask-txn produces shows a URL's password."""
    quoted = urllib.parse.quote(SECRET, safe="")
    url = f"postgresql+psycopg2://user:{quoted}@127.0.0.1:{free_port()}/db"
    shown: list[str] = []
    with caplog.at_level(logging.DEBUG):
        # Config errors that show the URL.
        for bad in (
            url.replace("/db", ":notaport/db"),
            url.replace("postgresql+psycopg2", "nosuchdb"),
            url.encode(),
        ):
            with pytest.raises(ConfigError) as raised:
                _init(bad)()  # type: ignore[arg-type]
            shown += _texts(raised.value)
        # A working app: the reprs of what it exposes.
        app = Flask("secret")
        app.config.update(
            TXN_DATABASE_URI=url,
            TXN_ON_DISCARD="raise",
            TXN_RETRY_DEADLINE=2,
            TXN_RETRIES=1,
            TXN_RETRY_SLEEP=lambda _: None,
        )
        ext = FlaskTxn(app)
        register_error_handlers(app)
        with app.app_context():
            shown += [
                repr(ext.settings),
                repr(ext.engine),
                repr(ext.engine.url),
                str(ext.engine.url),
            ]
            shown += [repr(ext.settings.timeouts), repr(ext.session), repr(atomic(retries=1))]

        @app.post("/read")
        @atomic
        def read() -> str:
            ext.session.execute(sa.text("SELECT 1"))
            return "ok"

        @app.post("/discard")
        def discard() -> str:
            ext.session.add_all([])
            ext.session.info["flask_txn.wrote"] = True  # as if it had flushed a write
            return "ok"

        # The database is unreachable: the error response and its log line.
        response = app.test_client().post("/read")
        shown += [response.get_data(as_text=True), json.dumps(dict(response.headers))]
        # The same failure raised to the caller, and uncommitted writes refused at teardown.
        app.testing = True
        with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
            atomic(retries=1)(lambda: ext.session.execute(sa.text("SELECT 1")))()
        shown += _texts(raised.value)
        with pytest.raises(Exception) as raised:
            app.test_client().post("/discard")
        shown += _texts(raised.value)
        with app.app_context():
            ext.engine.dispose()
    shown += [record.getMessage() for record in caplog.records]
    shown += [caplog.text]
    leaked = [text for text in shown if SECRET in text or quoted in text or "P@ss" in text]
    assert (leaked, response.status_code, len(shown) > 20) == ([], 503, True)
