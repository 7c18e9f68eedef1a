"""OpenTelemetry for flask-txn: what each transaction did, on the current span and as metrics.

Public, like :mod:`flask_txn.testing`; it needs the ``opentelemetry`` extra
(``opentelemetry-api``). :func:`instrument` connects one receiver to each
flask-txn signal; the receivers annotate the span that is current when a
transaction ends (whoever started it: the Flask instrumentation, or your own
code) and record metrics on a meter named ``flask_txn``. Until it is called,
nothing here runs: flask-txn sends no signal that nobody receives.

Nothing recorded comes from an error's message, a statement or its parameters,
or the database URL: only the names, numbers and codes listed in
:doc:`/observability`.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any

from flask import Flask

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import Counter, Histogram, MeterProvider
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:
    raise ImportError(
        "'flask_txn.opentelemetry' needs the OpenTelemetry API, which is not installed."
        " Install flask-txn's 'opentelemetry' extra: pip install 'flask-txn[opentelemetry]'."
    ) from exc

from . import __version__
from ._errors import ConfigError
from ._signals import transaction_committed, transaction_retrying, transaction_rolled_back

__all__ = ["instrument", "uninstrument"]

#: The instrumentation scope: the meter's name.
SCOPE = "flask_txn"

# Attributes: OpenTelemetry's semantic conventions where they have one.
DB_SYSTEM_NAME = "db.system.name"
DB_RESPONSE_STATUS_CODE = "db.response.status_code"
ERROR_TYPE = "error.type"
ENDPOINT = "flask_txn.endpoint"
ISOLATION = "flask_txn.isolation"
OUTCOME = "flask_txn.outcome"
ATTEMPTS = "flask_txn.attempts"
ATTEMPT = "flask_txn.attempt"
ELAPSED = "flask_txn.elapsed"
REASON = "flask_txn.rollback.reason"
EXHAUSTED = "flask_txn.retry.exhausted"
DELAY = "flask_txn.retry.delay"
FINAL = "flask_txn.retry.final"

#: SQLAlchemy's dialect names -> ``db.system.name``; any other is ``"other_sql"``.
SYSTEMS = {
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
}

#: Histogram buckets in seconds: the semantic conventions' for request durations.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: Histogram buckets for attempts: one each up to the default 6 (5 retries), then coarser.
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 20)

Attributes = dict[str, AttributeValue]


@dataclasses.dataclass(frozen=True)
class _Instruments:
    """The metrics one :func:`instrument` call records, on its meter provider."""

    commits: Counter
    rollbacks: Counter
    retries: Counter
    retry_delay: Histogram
    attempts: Histogram
    duration: Histogram

    @classmethod
    def on(cls, meter_provider: MeterProvider | None) -> _Instruments:
        """The instruments of ``meter_provider``'s ``flask_txn`` meter (None: the global's)."""
        meter = metrics.get_meter(SCOPE, __version__, meter_provider)
        return cls(
            commits=meter.create_counter(
                "flask_txn.commits", "{transaction}", "Transactions committed, replays left out."
            ),
            rollbacks=meter.create_counter(
                "flask_txn.rollbacks", "{rollback}", "Attempts rolled back, by reason."
            ),
            retries=meter.create_counter(
                "flask_txn.retries", "{retry}", "Attempts re-run after a retriable error."
            ),
            retry_delay=meter.create_histogram(
                "flask_txn.retry.delay",
                "s",
                "Seconds waited before re-running an attempt.",
                explicit_bucket_boundaries_advisory=SECONDS,
            ),
            attempts=meter.create_histogram(
                "flask_txn.attempts",
                "{attempt}",
                "Attempts an outermost block made, by its outcome.",
                explicit_bucket_boundaries_advisory=ATTEMPT_BUCKETS,
            ),
            duration=meter.create_histogram(
                "flask_txn.transaction.duration",
                "s",
                "Seconds from an outermost block's first attempt to its end, waits included.",
                explicit_bucket_boundaries_advisory=SECONDS,
            ),
        )


class _Registry:
    """Which apps are instrumented, and with which instruments."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: from ``instrument(app)``: they win over ``every_app`` for their app.
        self.apps: weakref.WeakKeyDictionary[Flask, _Instruments] = weakref.WeakKeyDictionary()
        #: from ``instrument()``.
        self.every_app: _Instruments | None = None

    def find(self, app: Flask) -> _Instruments | None:
        """The instruments that record ``app``, if any."""
        return self.apps.get(app, self.every_app)


_registry = _Registry()


def instrument(app: Flask | None = None, *, meter_provider: MeterProvider | None = None) -> None:
    """Record each transaction of ``app`` on the current span and as metrics.

    Calling it again for the same app replaces the earlier call's meter
    provider; it never counts a transaction twice. An app instrumented on its
    own is recorded only by its own call, even if :func:`instrument` was also
    called for every app.

    :param app: the app whose transactions to record; None for every app.
    :param meter_provider: where the metrics go; None for the global one
        (``opentelemetry.metrics.set_meter_provider``).

    .. versionadded:: 0.2.0
    """
    if app is not None and not isinstance(app, Flask):
        raise ConfigError(
            f"'app' must be a Flask app or None (every app), got {app!r}."
            " Call 'instrument(app)' with the app, or 'instrument()' for every app."
        )
    instruments = _Instruments.on(meter_provider)
    with _registry.lock:
        if app is None:
            _registry.every_app = instruments
        else:
            _registry.apps[app] = instruments
        # weak=False: blinker would drop a receiver nobody else refers to. Connecting
        # a receiver that is connected already changes nothing.
        transaction_committed.connect(_committed, weak=False)
        transaction_rolled_back.connect(_rolled_back, weak=False)
        transaction_retrying.connect(_retrying, weak=False)


def uninstrument(app: Flask | None = None) -> None:
    """Undo :func:`instrument` for ``app``; a no-op if it is not instrumented.

    Once nothing is instrumented, the receivers are disconnected: flask-txn
    again sends no signal that nothing else receives.

    :param app: the app given to :func:`instrument`; None to undo ``instrument()``
        for every app (apps instrumented on their own stay so).

    .. versionadded:: 0.2.0
    """
    with _registry.lock:
        if app is None:
            _registry.every_app = None
        else:
            _registry.apps.pop(app, None)
        if _registry.every_app is None and not _registry.apps:
            transaction_committed.disconnect(_committed)
            transaction_rolled_back.disconnect(_rolled_back)
            transaction_retrying.disconnect(_retrying)


# -- the receivers ------------------------------------------------------------------------


def _committed(app: Flask, *, replayed: bool, **payload: Any) -> None:
    """``transaction_committed``: count the commit; the block ended."""
    instruments = _registry.find(app)
    if instruments is not None:
        attributes = _common(payload)
        # A replay of @idempotent only read the stored response: no work was committed.
        if not replayed:
            instruments.commits.add(1, attributes)
        _ended(instruments, "replay" if replayed else "commit", attributes, payload, {})


def _rolled_back(
    app: Flask, *, reason: str, error: BaseException | None, sqlstate: str | None, **payload: Any
) -> None:
    """``transaction_rolled_back``: count the rollback; a block ended unless it is re-run."""
    instruments = _registry.find(app)
    if instruments is None:
        return
    attributes = _common(payload)
    failure = {**_error(error, sqlstate), EXHAUSTED: payload["exhausted"]}
    instruments.rollbacks.add(1, {**attributes, REASON: reason, **failure})
    # "retry" is followed by transaction_retrying, which records it; "teardown"
    # ends no block, so it is only counted.
    if reason not in ("retry", "teardown"):
        _ended(instruments, reason, attributes, payload, failure)


def _retrying(
    app: Flask, *, error: BaseException, sqlstate: str | None, delay: float, **payload: Any
) -> None:
    """``transaction_retrying``: count the retry and its wait; an event on the span."""
    instruments = _registry.find(app)
    if instruments is None:
        return
    failure = _error(error, sqlstate)
    attributes = {**_common(payload), **failure}
    instruments.retries.add(1, attributes)
    instruments.retry_delay.record(delay, attributes)
    span = trace.get_current_span()
    if span.is_recording():
        event = {ATTEMPT: payload["attempt"], **failure, DELAY: delay, FINAL: payload["final"]}
        span.add_event("flask_txn.retry", event)


def _ended(
    instruments: _Instruments,
    outcome: str,
    attributes: Attributes,
    payload: dict[str, Any],
    failure: Attributes,
) -> None:
    """An outermost block ended for good: its attempts and duration, and the span."""
    by_outcome = {**attributes, OUTCOME: outcome}
    instruments.attempts.record(payload["attempt"], by_outcome)
    instruments.duration.record(payload["elapsed"], by_outcome)
    span = trace.get_current_span()
    if span.is_recording():
        summary: Attributes = {
            OUTCOME: outcome,
            ATTEMPTS: payload["attempt"],
            ISOLATION: attributes[ISOLATION],
        }
        # The latest block's summary; each block's is kept by its event.
        span.set_attributes(summary)
        span.add_event("flask_txn.transaction", {**summary, ELAPSED: payload["elapsed"], **failure})


def _system(dialect: Any) -> str:
    """``db.system.name`` of a dialect: MariaDB's through a ``mysql://`` URL too."""
    name = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
    return SYSTEMS.get(name, "other_sql")


def _common(payload: dict[str, Any]) -> Attributes:
    """The attributes of every metric: the database, the endpoint and the isolation level."""
    attributes: Attributes = {
        DB_SYSTEM_NAME: _system(payload["session"].bind.dialect),
        # Always set, so that a block's summary on a span replaces the one before.
        ISOLATION: payload["isolation"] or "default",
    }
    if payload["endpoint"] is not None:
        attributes[ENDPOINT] = payload["endpoint"]
    return attributes


def _error(error: BaseException | None, sqlstate: str | None) -> Attributes:
    """``db.response.status_code`` and ``error.type``, as the semantic conventions for
    database clients have them: the SQLSTATE when there is one, else the exception's class."""
    if error is None:
        return {}
    if sqlstate is not None:
        return {DB_RESPONSE_STATUS_CODE: sqlstate, ERROR_TYPE: sqlstate}
    kind = type(error)
    module = kind.__module__
    if module == "builtins":
        return {ERROR_TYPE: kind.__qualname__}
    if module.startswith(f"{SCOPE}._"):
        module = SCOPE  # flask-txn's errors by their public names: flask_txn.UsageError
    return {ERROR_TYPE: f"{module}.{kind.__qualname__}"}
