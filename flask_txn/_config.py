"""Reading and validating settings: the ``TXN_*`` config keys and atomic's arguments.

Every check here raises :class:`ConfigError` with the same shape of message: the
key or argument in quotes, the bad value, what is allowed and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ._errors import ConfigError
from ._limiter import Bounds, read_bounds
from ._timeouts import Timeouts, check_seconds, read_timeouts

ISOLATION_LEVELS = ("READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
SCOPES = ("thread", "app_context")
DISCARD_POLICIES = ("warn", "ignore", "raise")
NPLUSONE_MODES = ("off", "warn", "raise")
SQLITE_BEGIN_MODES = ("IMMEDIATE", "DEFERRED", "EXCLUSIVE")
#: The isolation levels each dialect offers, where it is not all four.
DIALECT_LEVELS = {"sqlite": ("SERIALIZABLE", "READ UNCOMMITTED")}

Scope = Literal["thread", "app_context"] | Callable[[], Any]
DiscardPolicy = Literal["warn", "ignore", "raise"]
StatusVeto = int | Callable[[Any], bool] | None
RetryOn = Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...]

#: Config key -> default. ``FlaskTxn(**options)`` takes the same names in lower
#: case without the prefix; the app's config overrides them.
DEFAULTS: dict[str, Any] = {
    "TXN_DATABASE_URI": None,
    "TXN_ENGINE_OPTIONS": {},
    "TXN_SESSION_OPTIONS": {},
    "TXN_SESSION_SCOPE": "thread",
    "TXN_ON_DISCARD": "warn",
    "TXN_ISOLATION_LEVEL": None,
    "TXN_RETRIES": 5,
    # 20 ms: the best goodput on a hot spot from 2 to 32 clients (docs/performance.md).
    "TXN_RETRY_WAIT_INITIAL": 0.02,
    "TXN_RETRY_WAIT_MAX": 1.0,
    "TXN_RETRY_DEADLINE": None,
    "TXN_CONNECT_TIMEOUT": 10.0,
    "TXN_TCP_TIMEOUT": 30.0,
    "TXN_STATEMENT_TIMEOUT": None,
    "TXN_READ_TIMEOUT": None,
    "TXN_POOL_TIMEOUT": None,
    "TXN_ROLLBACK_ON_STATUS": 400,
    "TXN_RETRY_SLEEP": time.sleep,
    "TXN_RETRY_RANDOM": random.random,
    "TXN_SQLITE_BEGIN": "IMMEDIATE",
    # None: "warn" when the app is in debug or testing mode, else "off" (init_app).
    "TXN_NPLUSONE": None,
    "TXN_NPLUSONE_THRESHOLD": 2,
    "TXN_ERROR_HANDLERS": True,
    "TXN_IDEMPOTENCY_HEADER": "Idempotency-Key",
    # 24 hours, as Stripe keeps its keys.
    "TXN_IDEMPOTENCY_TTL": 86400.0,
    "TXN_IDEMPOTENCY_SCOPE": None,
    # Read replicas (flask_txn._replicas reads and checks them).
    "TXN_REPLICA_URIS": (),
    "TXN_REPLICA_MAX_LAG": 5.0,
    "TXN_REPLICA_CHECK_INTERVAL": 1.0,
    "TXN_REPLICA_READ_YOUR_WRITES": "request",
    # Admission control of contended blocks (flask_txn._admission).
    "TXN_ADMISSION": True,
    "TXN_ADMISSION_LIMITS": (1, 32),
    "TXN_ASYNC_DATABASE_URI": None,
    "TXN_ASYNC_ENGINE_OPTIONS": {},
}

OPTION_NAMES = {key.removeprefix("TXN_").lower(): key for key in DEFAULTS}

# Session options flask-txn sets itself; a user value would break scoping or binding.
_RESERVED_SESSION_OPTIONS = ("bind", "binds")

#: An HTTP header name: a token (RFC 9110, 5.6.2).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# The password runs to the next "@", as in SQLAlchemy's own URL pattern: a "/"
# in it must not end the match early and leave the rest of it visible.
_PASSWORD_IN_URL = re.compile(r"(?<=://)([^:/@]*):[^@]*@")


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the outermost decorated function is re-run after a retriable failure."""

    retries: int
    wait_initial: float
    wait_max: float
    deadline: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The validated ``TXN_*`` config of one app."""

    url: URL
    engine_options: Mapping[str, Any]
    session_options: Mapping[str, Any]
    scope: Scope
    on_discard: DiscardPolicy
    isolation: str | None
    retry: RetryPolicy
    timeouts: Timeouts
    rollback_on_status: StatusVeto
    sleep: Callable[[float], object]
    random: Callable[[], float]
    sqlite_begin: str
    async_url: URL | None
    async_engine_options: Mapping[str, Any]
    #: ``TXN_NPLUSONE``: "off", "warn" or "raise".
    nplusone: str
    #: ``TXN_NPLUSONE_THRESHOLD``: lazy loads of one relationship, for the objects of
    #: one query, that make an N+1.
    nplusone_threshold: int
    #: ``TXN_ERROR_HANDLERS``: answer database failures with 503/502 by default.
    error_handlers: bool
    #: ``TXN_IDEMPOTENCY_*``: the header ``@idempotent`` reads, how long a stored
    #: response is kept (seconds), and what gives each request its scope.
    idempotency_header: str
    idempotency_ttl: float
    idempotency_scope: Callable[[], object] | None
    #: ``TXN_ADMISSION_LIMITS`` when ``TXN_ADMISSION`` is True, else None.
    admission: Bounds | None


def hide_password(value: object) -> str:
    """Render a database URL (or any text holding one) with the password masked."""
    if isinstance(value, URL):
        return value.render_as_string(hide_password=True)
    return _PASSWORD_IN_URL.sub(r"\1:***@", str(value))


def options_to_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``FlaskTxn(**options)`` names to config keys, refusing unknown names."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        allowed = ", ".join(repr(name) for name in OPTION_NAMES)
        raise ConfigError(
            f"FlaskTxn() got unknown option {unknown[0]!r}. Allowed options: {allowed}"
            " (each is a TXN_* config key in lower case without the prefix)."
        )
    return {OPTION_NAMES[name]: value for name, value in options.items()}


def read_settings(config: Mapping[str, Any]) -> Settings:
    """Validate the app's ``TXN_*`` keys (defaults already filled in)."""
    _refuse_unknown_keys(config)
    wait_initial = check_seconds("TXN_RETRY_WAIT_INITIAL", config["TXN_RETRY_WAIT_INITIAL"])
    wait_max = check_seconds("TXN_RETRY_WAIT_MAX", config["TXN_RETRY_WAIT_MAX"])
    check_wait_order("TXN_RETRY_WAIT_MAX", wait_initial, wait_max)
    url = check_url(config["TXN_DATABASE_URI"])
    deadline = check_seconds(
        "TXN_RETRY_DEADLINE", config["TXN_RETRY_DEADLINE"], optional=True, zero=False
    )
    return Settings(
        url=url,
        engine_options=_check_mapping(
            "TXN_ENGINE_OPTIONS", config["TXN_ENGINE_OPTIONS"], "{'pool_size': 10}"
        ),
        session_options=_check_session_options(config["TXN_SESSION_OPTIONS"]),
        scope=_check_scope(config["TXN_SESSION_SCOPE"]),
        on_discard=check_choice("TXN_ON_DISCARD", config["TXN_ON_DISCARD"], DISCARD_POLICIES),
        isolation=check_isolation("TXN_ISOLATION_LEVEL", config["TXN_ISOLATION_LEVEL"]),
        retry=RetryPolicy(
            retries=check_retries("TXN_RETRIES", config["TXN_RETRIES"]),
            wait_initial=wait_initial,
            wait_max=wait_max,
            deadline=deadline,
        ),
        timeouts=read_timeouts(config, url, deadline),
        rollback_on_status=_check_status_veto(config["TXN_ROLLBACK_ON_STATUS"]),
        sleep=_check_callable("TXN_RETRY_SLEEP", config["TXN_RETRY_SLEEP"], "time.sleep"),
        random=_check_callable("TXN_RETRY_RANDOM", config["TXN_RETRY_RANDOM"], "random.random"),
        sqlite_begin=check_choice(
            "TXN_SQLITE_BEGIN", _upper(config["TXN_SQLITE_BEGIN"]), SQLITE_BEGIN_MODES
        ),
        async_url=None
        if config["TXN_ASYNC_DATABASE_URI"] is None
        else check_url(config["TXN_ASYNC_DATABASE_URI"], "TXN_ASYNC_DATABASE_URI"),
        async_engine_options=_check_mapping(
            "TXN_ASYNC_ENGINE_OPTIONS", config["TXN_ASYNC_ENGINE_OPTIONS"], "{'echo': True}"
        ),
        nplusone=check_choice("TXN_NPLUSONE", config["TXN_NPLUSONE"], NPLUSONE_MODES),
        nplusone_threshold=_check_threshold(config["TXN_NPLUSONE_THRESHOLD"]),
        error_handlers=check_flag("TXN_ERROR_HANDLERS", config["TXN_ERROR_HANDLERS"]),
        idempotency_header=_check_header(config["TXN_IDEMPOTENCY_HEADER"]),
        idempotency_ttl=check_seconds(
            "TXN_IDEMPOTENCY_TTL", config["TXN_IDEMPOTENCY_TTL"], zero=False
        ),
        idempotency_scope=None
        if config["TXN_IDEMPOTENCY_SCOPE"] is None
        else _check_callable(
            "TXN_IDEMPOTENCY_SCOPE", config["TXN_IDEMPOTENCY_SCOPE"], "lambda: current_user.id"
        ),
        admission=read_bounds(config["TXN_ADMISSION"], config["TXN_ADMISSION_LIMITS"]),
    )


def _refuse_unknown_keys(config: Mapping[str, Any]) -> None:
    """A misspelt key would silently leave its default in force."""
    for key in config:
        if key.startswith("TXN_") and key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown config key {key!r}: flask-txn reads only"
                f" {', '.join(repr(k) for k in DEFAULTS)}.{hint}"
            )


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def check_dialect_isolation(name: str, level: str | None, dialect: str) -> None:
    """Refuse an isolation level the database does not offer.

    :param name: the argument or config key that set the level.
    :param level: a normalised level, or None for the database's default.
    :param dialect: SQLAlchemy's dialect name, e.g. ``"sqlite"``.
    """
    offered = DIALECT_LEVELS.get(dialect, ISOLATION_LEVELS)
    if level is not None and level not in offered:
        raise ConfigError(
            f"{name!r} is {level!r}, which {dialect!r} does not support; it offers"
            f" {', '.join(repr(o) for o in offered)}."
        )


def check_isolation(name: str, value: object) -> str | None:
    """Normalise an isolation level name, or None for the database's default."""
    if value is None:
        return None
    allowed = ", ".join(repr(level) for level in ISOLATION_LEVELS)
    if not isinstance(value, str):
        raise ConfigError(
            f"{name!r} must be one of {allowed} (case-insensitive) or None for the"
            f" database's default, got {value!r} of type {type(value).__name__}."
        )
    level = " ".join(value.replace("_", " ").upper().split())
    if level == "AUTOCOMMIT":
        raise ConfigError(
            f"{name!r} cannot be {value!r}: an atomic block always runs a transaction."
            f" Use one of {allowed}, or None for the database's default."
        )
    if level not in ISOLATION_LEVELS:
        raise ConfigError(
            f"{name!r} must be one of {allowed} (case-insensitive) or None for the"
            f" database's default, got {value!r}."
        )
    return level


def check_retries(name: str, value: object) -> int:
    """A whole number of re-runs, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{name!r} must be a whole number >= 0 (the number of re-runs after the first"
            f" attempt; 0 disables retrying), got {value!r}."
        )
    return value


def check_flag(name: str, value: object) -> bool:
    """Refuse anything but ``True`` or ``False`` (``1`` or ``"yes"`` is a mistake, not a flag)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name!r} must be True or False, got {value!r}.")
    return value


def check_retry_on(name: str, value: object) -> RetryOn | None:
    """``atomic(retry_on=...)``: exception classes, or a predicate on the exception."""
    if value is None or (callable(value) and not isinstance(value, type)):
        return value
    classes = value if isinstance(value, tuple) else (value,)
    if classes and all(isinstance(c, type) and issubclass(c, BaseException) for c in classes):
        return value  # type: ignore[return-value]
    raise ConfigError(
        f"{name!r} must be an exception class, a tuple of exception classes, or a"
        f" callable(exception) -> bool, got {value!r}."
    )


def check_wait_order(name: str, wait_initial: float, wait_max: float) -> None:
    """The backoff cap cannot be below the first wait."""
    if wait_max < wait_initial:
        raise ConfigError(
            f"{name!r} must be >= the initial wait ({wait_initial!r} s), got {wait_max!r}."
            " Raise the maximum or lower the initial wait."
        )


def check_url(value: object, name: str = "TXN_DATABASE_URI") -> URL:
    """A database URL from a config value, or an error naming ``name``."""
    if value is None:
        raise ConfigError(
            "'TXN_DATABASE_URI' is not set. Set it in the app's config (or pass"
            " FlaskTxn(database_uri=...)), e.g. 'sqlite:///app.db' or"
            " 'postgresql+psycopg2://user:password@localhost/app'."
        )
    if not isinstance(value, str | URL):
        raise ConfigError(
            f"{name!r} must be a URL string or a sqlalchemy.engine.URL, got a"
            f" {type(value).__name__}: {hide_password(value)!r}."
        )
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        # ValueError: make_url parses the port with int() ("host:notaport").
        raise ConfigError(
            f"{name!r} is not a database URL: {hide_password(value)!r}. The form"
            " is 'dialect+driver://user:password@host:port/database', e.g."
            " 'sqlite:///app.db' or 'postgresql+psycopg2://user:password@localhost/app'."
        ) from None
    try:
        # Loads the dialect class only; the driver is imported by create_engine.
        url.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(
            f"{name!r} names an unknown dialect or driver"
            f" {url.drivername!r}: {hide_password(url)!r}. Use a SQLAlchemy dialect such"
            " as 'sqlite', 'postgresql+psycopg2' or 'postgresql+psycopg', or install"
            " the package providing it."
        ) from None
    return url


def _check_mapping(name: str, value: object, example: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{name!r} must be a dict of keyword arguments, got {type(value).__name__}"
            f" {value!r}. Use e.g. {example}."
        )
    return dict(value)


def _check_session_options(value: object) -> Mapping[str, Any]:
    options = _check_mapping("TXN_SESSION_OPTIONS", value, "{'autoflush': False}")
    for key in _RESERVED_SESSION_OPTIONS:
        if key in options:
            raise ConfigError(
                f"'TXN_SESSION_OPTIONS' cannot set {key!r} (got {options[key]!r}):"
                " flask-txn binds each session to the current app's engine. Set"
                " 'TXN_DATABASE_URI' instead."
            )
    return options


def _check_scope(value: object) -> Scope:
    if value in SCOPES or (callable(value) and not isinstance(value, str)):
        return value  # type: ignore[return-value]
    raise ConfigError(
        f"'TXN_SESSION_SCOPE' must be 'thread', 'app_context' or a callable returning"
        f" a hashable scope key, got {value!r}."
    )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> Any:
    """``value``, if it is one of ``choices``; else a ``ConfigError`` naming ``name``."""
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ConfigError(f"{name!r} must be one of {allowed}, got {value!r}.")
    return value


def _check_threshold(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(
            f"'TXN_NPLUSONE_THRESHOLD' must be a whole number of at least 2 (lazy loads of"
            f" one relationship for the objects of one query), got {value!r}."
        )
    return value


def _check_status_veto(value: object) -> StatusVeto:
    if value is None or callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ConfigError(
            "'TXN_ROLLBACK_ON_STATUS' must be an HTTP status from 100 to 599 (a response"
            " with this status or higher rolls back), None (never roll back on a"
            f" response) or a callable(response) -> bool, got {value!r}."
        )
    return value


def _check_header(value: object) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        raise ConfigError(
            f"'TXN_IDEMPOTENCY_HEADER' must be an HTTP header name (letters, digits and"
            f" !#$%&'*+-.^_`|~), got {value!r}. The default is 'Idempotency-Key'."
        )
    return value


def _check_callable(name: str, value: object, example: str) -> Any:
    if not callable(value):
        raise ConfigError(f"{name!r} must be a callable like {example}, got {value!r}.")
    return value
