"""OpenTelemetry: the current span and the metrics record real transactions, once each."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from opentelemetry.metrics import Meter, NoOpCounter, NoOpMeter, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes.db_attributes import DbSystemNameValues
from opentelemetry.semconv.attributes import db_attributes, error_attributes

import flask_txn
from flask_txn import UsageError, atomic, idempotent, on_commit, testing
from flask_txn import opentelemetry as txn_otel
from flask_txn.opentelemetry import instrument, uninstrument

from .conftest import Item, count_items, every_engine
from .test_async import fails_once

pytestmark = every_engine

# The plugin is off in this suite (pyproject.toml): borrow the fixture used here.
txn_faults = testing.txn_faults

#: The retriable error txn_faults makes each database raise by default.
FAULT = {"postgresql": "40001", "sqlite": "SQLITE_LOCKED", "mariadb": "1213"}


class Conflict(Exception):
    """A retriable failure on any engine (through ``retry_on``), with no SQLSTATE."""


@dataclasses.dataclass
class Telemetry:
    """A real SDK pipeline: spans to an in-memory exporter, metrics to an in-memory reader."""

    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def request(self, app: Flask, path: str, method: str = "post") -> Any:
        """Send a request inside a span, as the Flask instrumentation would; return it."""
        tracer = self.tracer_provider.get_tracer("test")
        # The exception is the test's to check: keep the span's events flask-txn's own.
        with tracer.start_as_current_span(
            "request", record_exception=False, set_status_on_exception=False
        ):
            return getattr(app.test_client(), method)(path)

    def span(self) -> ReadableSpan:
        """The one span ended so far."""
        (span,) = self.spans.get_finished_spans()
        return span

    def points(self, name: str) -> list[Any]:
        """The data points of the metric ``name`` on the ``flask_txn`` meter, if any."""
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                assert (scope.scope.name, scope.scope.version) == (
                    "flask_txn",
                    flask_txn.__version__,
                )
                for metric in scope.metrics:
                    if metric.name == name:
                        return list(metric.data.data_points)
        return []

    def counts(self, name: str) -> dict[frozenset[tuple[str, Any]], int]:
        """A counter's values (a histogram's counts) by their attributes."""
        return {
            frozenset(dict(point.attributes).items()): getattr(point, "value", None) or point.count
            for point in self.points(name)
        }


def make_telemetry() -> Telemetry:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    return Telemetry(spans, reader, tracer_provider, MeterProvider(metric_readers=[reader]))


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    made = make_telemetry()
    yield made
    made.meter_provider.shutdown()


@pytest.fixture
def app_txn(make_app: Any) -> Any:
    """An app whose retries never wait and always wait the cap."""
    return make_app(TXN_RETRY_SLEEP=lambda _: None, TXN_RETRY_RANDOM=lambda: 1.0)


@pytest.fixture
def instrumented(app_txn: Any, telemetry: Telemetry) -> Iterator[Any]:
    """``app_txn``, instrumented on ``telemetry``'s meter provider."""
    app, txn = app_txn
    instrument(app, meter_provider=telemetry.meter_provider)
    yield app, txn
    uninstrument(app)


def key(**attributes: Any) -> frozenset[tuple[str, Any]]:
    return frozenset(attributes.items())


def system(app: Flask, txn: Any) -> str:
    """The db.system.name expected: MariaDB's through its mysql:// URL too."""
    with app.app_context():
        dialect = txn.engine.dialect
        return "mariadb" if getattr(dialect, "is_mariadb", False) else str(dialect.name)


def serve_flaky(app: Flask, txn: Any, then: Callable[[], object] = lambda: None) -> Flask:
    """Serve ``POST /``: a view whose first attempt fails and is retried; the second
    calls ``then()``."""
    calls: list[int] = []

    @app.post("/")
    @atomic(retry_on=Conflict)
    def flaky() -> str:
        calls.append(1)
        txn.session.add(Item(name="a"))
        if len(calls) == 1:
            raise Conflict
        then()
        return "ok"

    return app


def test_commit_annotates_the_span_and_counts(instrumented: Any, telemetry: Telemetry) -> None:
    """A commit: outcome, attempts and isolation on the span, one commit counted, one
    attempt and the block's duration recorded, all by database, endpoint and isolation."""
    app, txn = instrumented

    @app.post("/")
    @atomic(isolation="SERIALIZABLE")
    def add() -> str:
        txn.session.add(Item(name="a"))
        return "ok"

    assert telemetry.request(app, "/").status_code == 200
    span = telemetry.span()
    summary = {
        "flask_txn.outcome": "commit",
        "flask_txn.attempts": 1,
        "flask_txn.isolation": "SERIALIZABLE",
    }
    assert dict(span.attributes or {}) == summary
    (event,) = span.events
    assert event.name == "flask_txn.transaction"
    assert dict(event.attributes or {}).items() >= summary.items()
    assert dict(event.attributes or {})["flask_txn.elapsed"] > 0
    labels = {
        "db.system.name": system(app, txn),
        "flask_txn.endpoint": "add",
        "flask_txn.isolation": "SERIALIZABLE",
    }
    assert telemetry.counts("flask_txn.commits") == {key(**labels): 1}
    (attempts,) = telemetry.points("flask_txn.attempts")
    assert (dict(attempts.attributes), attempts.sum) == (
        {**labels, "flask_txn.outcome": "commit"},
        1,
    )
    assert telemetry.counts("flask_txn.transaction.duration") == {
        key(**labels, **{"flask_txn.outcome": "commit"}): 1
    }
    assert telemetry.points("flask_txn.rollbacks") == []
    assert telemetry.points("flask_txn.retries") == []


def test_real_retries_by_sqlstate(
    instrumented: Any, telemetry: Telemetry, txn_faults: testing.Faults
) -> None:
    """Two attempts failing with the database's own retriable error: two retry events with
    the SQLSTATE and the wait, two retries counted and their waits, then one commit after
    three attempts."""
    app, txn = instrumented
    dialect = system(app, txn)
    code = FAULT[dialect]

    @app.post("/pay")
    @atomic
    def pay() -> str:
        txn.session.add(Item(name="a"))
        return "ok"

    txn_faults.fail_next(2, endpoint="pay")
    assert telemetry.request(app, "/pay").status_code == 200
    span = telemetry.span()
    assert [(e.name, dict(e.attributes or {})) for e in span.events[:2]] == [
        (
            "flask_txn.retry",
            {
                "flask_txn.attempt": attempt,
                "db.response.status_code": code,
                "error.type": code,
                "flask_txn.retry.delay": delay,
                "flask_txn.retry.final": False,
            },
        )
        for attempt, delay in ((1, 0.02), (2, 0.04))
    ]
    assert span.events[2].name == "flask_txn.transaction"
    assert dict(span.attributes or {})["flask_txn.attempts"] == 3
    labels = {"db.system.name": dialect, "flask_txn.endpoint": "pay"}
    labels["flask_txn.isolation"] = "default"
    failed = {**labels, "db.response.status_code": code, "error.type": code}
    assert telemetry.counts("flask_txn.retries") == {key(**failed): 2}
    (delays,) = telemetry.points("flask_txn.retry.delay")
    assert (delays.count, delays.sum) == (2, pytest.approx(0.06))
    assert telemetry.counts("flask_txn.rollbacks") == {
        key(
            **failed, **{"flask_txn.rollback.reason": "retry", "flask_txn.retry.exhausted": False}
        ): 2
    }
    (attempts,) = telemetry.points("flask_txn.attempts")
    assert (attempts.count, attempts.sum) == (1, 3)
    assert telemetry.counts("flask_txn.commits") == {key(**labels): 1}


def test_failure_for_good(
    instrumented: Any, telemetry: Telemetry, txn_faults: testing.Faults
) -> None:
    """Retries exhausted: the span says 'error' after every attempt, its event has the
    SQLSTATE and 'exhausted', and the final rollback is counted apart from the retries."""
    app, txn = instrumented
    code = FAULT[system(app, txn)]

    @app.post("/")
    @atomic(retries=1)
    def doomed() -> str:
        return "never committed"

    txn_faults.fail_next(2)
    # flask-txn's error handlers answer 503: the span records the failure all the same.
    assert telemetry.request(app, "/").status_code == 503
    span = telemetry.span()
    assert dict(span.attributes or {}) == {
        "flask_txn.outcome": "error",
        "flask_txn.attempts": 2,
        "flask_txn.isolation": "default",
    }
    assert [e.name for e in span.events] == ["flask_txn.retry", "flask_txn.transaction"]
    assert dict(span.events[0].attributes or {})["flask_txn.retry.final"] is True
    ended = dict(span.events[1].attributes or {})
    assert (ended["db.response.status_code"], ended["flask_txn.retry.exhausted"]) == (code, True)
    reasons = {
        (dict(k)["flask_txn.rollback.reason"], dict(k)["flask_txn.retry.exhausted"]): n
        for k, n in telemetry.counts("flask_txn.rollbacks").items()
    }
    assert reasons == {("retry", False): 1, ("error", True): 1}
    assert telemetry.points("flask_txn.commits") == []
    (attempts,) = telemetry.points("flask_txn.attempts")
    assert (dict(attempts.attributes)["flask_txn.outcome"], attempts.sum) == ("error", 2)


def test_error_type_without_sqlstate(instrumented: Any, telemetry: Telemetry) -> None:
    """An error with no SQLSTATE is named by its class: qualified by its module, except
    built-in exceptions; no ``db.response.status_code`` is set."""
    app, _ = instrumented
    calls: list[int] = []

    @app.post("/")
    @atomic(retry_on=Conflict)
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Conflict
        raise ValueError("not retried")

    with pytest.raises(ValueError, match="not retried"):
        telemetry.request(app, "/")
    retry, ended = (dict(e.attributes or {}) for e in telemetry.span().events)
    assert "db.response.status_code" not in retry
    assert retry["error.type"] == f"{__name__}.Conflict"
    assert (ended["error.type"], ended["flask_txn.outcome"]) == ("ValueError", "error")


def test_error_type_of_flask_txn_errors(instrumented: Any, telemetry: Telemetry) -> None:
    """flask-txn's own errors are named as the package exports them, not by the private
    module that defines them."""
    app, txn = instrumented

    @app.post("/")
    @atomic
    def early_commit() -> str:
        txn.session.commit()
        return "never"

    with pytest.raises(UsageError):
        telemetry.request(app, "/")
    (event,) = telemetry.span().events
    assert dict(event.attributes or {})["error.type"] == "flask_txn.UsageError"


class BrokenCounter(NoOpCounter):
    """A counter whose pipeline is down: it raises where a real one records."""

    def add(self, *_: Any, **__: Any) -> None:
        raise RuntimeError("the metrics pipeline is down")


class BrokenMeter(NoOpMeter):
    """A meter whose counters raise."""

    def create_counter(self, name: str, *_: Any, **__: Any) -> BrokenCounter:
        return BrokenCounter(name)


class BrokenMeterProvider(NoOpMeterProvider):
    """A meter provider whose meters' counters raise."""

    def get_meter(self, name: str, *_: Any, **__: Any) -> Meter:
        return BrokenMeter(name)


def test_failing_telemetry_changes_nothing(app_txn: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Telemetry that raises is logged and skipped: the retry, the commit, the on_commit
    callback and the response are as without it."""
    app, txn = app_txn
    ran: list[str] = []
    app = serve_flaky(app, txn, then=lambda: on_commit(lambda: ran.append("callback")))
    instrument(app, meter_provider=BrokenMeterProvider())
    try:
        response = app.test_client().post("/")
    finally:
        uninstrument(app)
    assert (response.status_code, ran, count_items(app, txn)) == (200, ["callback"], 1)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 3, logged  # rolled back (retry), retrying, committed


def test_replay_is_not_a_commit(keys_table: Any, instrumented: Any, telemetry: Telemetry) -> None:
    """A repeat answered by @idempotent from the stored response ends with outcome
    'replay', and is left out of the commits."""
    app, txn = instrumented
    keys_table(app, txn)

    @app.post("/items")
    @atomic
    @idempotent
    def add() -> tuple[str, int]:
        txn.session.add(Item(name="a"))
        return "created", 201

    for _ in range(2):
        with telemetry.tracer_provider.get_tracer("test").start_as_current_span("request"):
            app.test_client().post("/items", headers={"Idempotency-Key": "k1"})
    outcomes = [
        dict(s.attributes or {})["flask_txn.outcome"] for s in telemetry.spans.get_finished_spans()
    ]
    assert outcomes == ["commit", "replay"]
    assert list(telemetry.counts("flask_txn.commits").values()) == [1]
    by_outcome = {
        dict(k)["flask_txn.outcome"]: n for k, n in telemetry.counts("flask_txn.attempts").items()
    }
    assert by_outcome == {"commit": 1, "replay": 1}


def test_veto_and_teardown(instrumented: Any, telemetry: Telemetry) -> None:
    """A veto ends its block with outcome 'veto'; writes discarded at teardown are a
    rollback counted with reason 'teardown', but no block ended: the span is left alone."""
    app, txn = instrumented

    @app.post("/veto")
    @atomic
    def veto() -> tuple[str, int]:
        txn.session.add(Item(name="a"))
        return "no", 409

    @app.post("/forgot")
    def forgot() -> str:
        txn.session.add(Item(name="b"))
        return "ok"

    assert telemetry.request(app, "/veto").status_code == 409
    assert telemetry.request(app, "/forgot").status_code == 200
    veto_span, forgot_span = telemetry.spans.get_finished_spans()
    assert dict(veto_span.attributes or {})["flask_txn.outcome"] == "veto"
    assert (dict(forgot_span.attributes or {}), forgot_span.events) == ({}, ())
    reasons = {
        dict(k)["flask_txn.rollback.reason"]: n
        for k, n in telemetry.counts("flask_txn.rollbacks").items()
    }
    assert reasons == {"veto": 1, "teardown": 1}
    assert [
        dict(p.attributes)["flask_txn.outcome"] for p in telemetry.points("flask_txn.attempts")
    ] == ["veto"]


def test_each_block_has_its_event_and_the_span_the_latest(
    instrumented: Any, telemetry: Telemetry
) -> None:
    """Two outermost blocks in one request: two events; the span's summary is the second's,
    with no attribute left over from the first."""
    app, txn = instrumented

    @app.post("/")
    def two_blocks() -> str:
        with atomic(isolation="SERIALIZABLE"):
            txn.session.add(Item(name="a"))
        with atomic():
            txn.session.add(Item(name="b"))
        return "ok"

    telemetry.request(app, "/")
    span = telemetry.span()
    assert [dict(e.attributes or {})["flask_txn.isolation"] for e in span.events] == [
        "SERIALIZABLE",
        "default",
    ]
    assert dict(span.attributes or {})["flask_txn.isolation"] == "default"


def test_no_span_still_counts(instrumented: Any, telemetry: Telemetry) -> None:
    """Outside any span (a CLI command, a worker) the metrics are recorded all the same,
    without an endpoint."""
    app, _ = instrumented
    calls: list[int] = []

    @atomic(retry_on=Conflict)
    def job() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Conflict

    with app.app_context():
        job()
    assert telemetry.spans.get_finished_spans() == ()
    (labels,) = telemetry.counts("flask_txn.commits")
    assert "flask_txn.endpoint" not in dict(labels)
    assert list(telemetry.counts("flask_txn.retries").values()) == [1]


def test_instrumenting_twice_counts_once(app_txn: Any, telemetry: Telemetry) -> None:
    """instrument(app) twice, and instrument() for every app too: one commit is one commit,
    one event; the app's own call wins over the one for every app."""
    app, txn = app_txn
    every = make_telemetry()
    instrument(app, meter_provider=telemetry.meter_provider)
    instrument(app, meter_provider=telemetry.meter_provider)
    instrument(meter_provider=every.meter_provider)
    try:

        @app.post("/")
        @atomic
        def add() -> str:
            txn.session.add(Item(name="a"))
            return "ok"

        telemetry.request(app, "/")
    finally:
        uninstrument(app)
        uninstrument()
    assert list(telemetry.counts("flask_txn.commits").values()) == [1]
    assert [e.name for e in telemetry.span().events] == ["flask_txn.transaction"]
    assert every.points("flask_txn.commits") == []


def test_every_app_and_only_instrumented_apps(make_app: Any, telemetry: Telemetry) -> None:
    """instrument() records every app; instrument(app) only that one: another app's commit,
    retry and rollback are not recorded."""
    app, other = serve_flaky(*make_app()), serve_flaky(*make_app())
    instrument(app, meter_provider=telemetry.meter_provider)
    try:
        telemetry.request(other, "/")
        assert telemetry.points("flask_txn.commits") == []
        telemetry.request(app, "/")
    finally:
        uninstrument(app)
    assert list(telemetry.counts("flask_txn.commits").values()) == [1]
    assert list(telemetry.counts("flask_txn.retries").values()) == [1]
    every = make_telemetry()
    instrument(meter_provider=every.meter_provider)
    try:
        every.request(other, "/")
    finally:
        uninstrument()
    assert list(every.counts("flask_txn.commits").values()) == [1]


def test_uninstrumented_costs_nothing(instrumented: Any, telemetry: Telemetry) -> None:
    """Importing flask_txn imports no OpenTelemetry; once the last instrumentation is
    undone no receiver is left, so flask-txn sends no signal and records nothing."""
    app, txn = instrumented
    code = "import sys, flask_txn; print(sorted(m for m in sys.modules if 'opentelemetry' in m))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert imported.stdout.strip() == "[]"
    instrument(meter_provider=telemetry.meter_provider)
    uninstrument(app)
    assert flask_txn.transaction_committed.receivers, "instrument() for every app remains"
    uninstrument()
    uninstrument()  # again: nothing to undo
    gc.collect()  # other tests' apps, whose receivers (the bank's counters) die with them
    signals = (
        flask_txn.transaction_committed,
        flask_txn.transaction_rolled_back,
        flask_txn.transaction_retrying,
    )
    assert [signal.receivers for signal in signals] == [{}, {}, {}]
    with app.app_context(), atomic():
        txn.session.add(Item(name="a"))
    assert telemetry.points("flask_txn.commits") == []


def test_nothing_secret_is_recorded(instrumented: Any, telemetry: Telemetry) -> None:
    """A failing INSERT's parameters and message appear in no attribute of the span, its
    events or the metrics: only codes and class names."""
    app, txn = instrumented
    secret = "s3cret-parameter"

    @app.post("/")
    @atomic
    def insert_twice() -> str:
        insert = sa.text("INSERT INTO item (id, name, value) VALUES (1, :name, 0)")
        txn.session.execute(insert, {"name": secret})
        txn.session.execute(insert, {"name": secret})
        return "never"

    with pytest.raises(sa.exc.IntegrityError):
        telemetry.request(app, "/")
    span = telemetry.span()
    recorded = [span.attributes, *(e.attributes for e in span.events)]
    for name in ("flask_txn.rollbacks", "flask_txn.attempts"):
        recorded += [point.attributes for point in telemetry.points(name)]
    values = [str(v) for attributes in recorded for v in dict(attributes or {}).values()]
    assert "error" in values
    assert [v for v in values if secret in v or "INSERT" in v or "duplicate key" in v] == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_async_view(make_app: Any, postgresql_url: str, telemetry: Telemetry) -> None:
    """An async view's retry and commit reach the span current in its coroutine."""
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    app, txn = make_app(url, TXN_RETRY_SLEEP=lambda _: None)
    fails_once(app, txn)  # a real 40001 on the first attempt
    instrument(app, meter_provider=telemetry.meter_provider)
    try:
        assert telemetry.request(app, "/").status_code == 200
    finally:
        uninstrument(app)
    span = telemetry.span()
    assert [e.name for e in span.events] == ["flask_txn.retry", "flask_txn.transaction"]
    assert dict(span.events[0].attributes or {})["db.response.status_code"] == "40001"
    assert dict(span.attributes or {})["flask_txn.attempts"] == 2


def test_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without opentelemetry-api, importing the module says which extra to install."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "flask_txn.opentelemetry")  # imported afresh, then restored
    with pytest.raises(ImportError, match=r"pip install 'flask-txn\[opentelemetry\]'"):
        importlib.import_module("flask_txn.opentelemetry")


def test_names_follow_the_semantic_conventions() -> None:
    """The attributes borrowed from OpenTelemetry's semantic conventions are spelt as the
    conventions' own package spells them, and every database name is a well-known one."""
    assert txn_otel.DB_SYSTEM_NAME == db_attributes.DB_SYSTEM_NAME
    assert txn_otel.DB_RESPONSE_STATUS_CODE == db_attributes.DB_RESPONSE_STATUS_CODE
    assert txn_otel.ERROR_TYPE == error_attributes.ERROR_TYPE
    known = {value.value for value in DbSystemNameValues}
    assert set(txn_otel.SYSTEMS.values()) | {"other_sql"} <= known
