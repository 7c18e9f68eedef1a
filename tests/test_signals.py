"""Signals: exact sequences and payloads, once per event, and receivers that raise."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import sqlalchemy as sa

from flask_txn import (
    atomic,
    on_commit,
    transaction_committed,
    transaction_retrying,
    transaction_rolled_back,
)

from .conftest import Item, count_items, every_engine

pytestmark = every_engine

SIGNALS = {
    "committed": transaction_committed,
    "rolled_back": transaction_rolled_back,
    "retrying": transaction_retrying,
}


class Conflict(Exception):
    """A retriable failure on any engine (through ``retry_on``)."""


@pytest.fixture
def events(app_txn: Any) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every flask-txn signal the app sends, as (name, payload), in order."""
    app, _ = app_txn
    seen: list[tuple[str, dict[str, Any]]] = []
    with ExitStack() as stack:
        for name, signal in SIGNALS.items():

            def receiver(sender: Any, name: str = name, **payload: Any) -> None:
                assert sender is app
                seen.append((name, payload))

            stack.enter_context(signal.connected_to(receiver, sender=app))
        yield seen


@pytest.fixture
def app_txn(make_app: Any) -> Any:
    """An app whose retries never wait and always wait the cap."""
    return make_app(TXN_RETRY_SLEEP=lambda _: None, TXN_RETRY_RANDOM=lambda: 1.0)


def sequence(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[Any, ...]]:
    """The events reduced to their name, attempt and outcome keys."""
    keys = ("attempt", "reason", "exhausted", "final", "delay", "isolation", "endpoint")
    return [(name, *(payload.get(key, "-") for key in keys)) for name, payload in events]


def test_commit(app_txn: Any, events: list[Any]) -> None:
    """One commit event with the session, attempt, isolation, endpoint and elapsed time."""
    app, txn = app_txn

    @app.post("/")
    @atomic(isolation="SERIALIZABLE")
    def add() -> str:
        txn.session.add(Item(name="a"))
        return "ok"

    app.test_client().post("/")
    assert sequence(events) == [("committed", 1, "-", "-", "-", "-", "SERIALIZABLE", "add")]
    payload = events[0][1]
    assert set(payload) == {
        "session",
        "attempt",
        "isolation",
        "endpoint",
        "elapsed",
        "server",
        "replayed",
    }
    assert (payload["replayed"], payload["server"]) == (False, "primary")
    assert payload["elapsed"] >= 0.0
    with app.app_context():
        assert payload["session"] is not txn.session()  # the request's, since removed


def test_exception_rollback(app_txn: Any, events: list[Any]) -> None:
    """An exception sends one rolled-back event with reason 'error' and the error."""
    app, _ = app_txn
    error = ValueError("boom")

    @atomic
    def fail() -> None:
        raise error

    with app.app_context(), pytest.raises(ValueError):
        fail()
    assert sequence(events) == [("rolled_back", 1, "error", False, "-", "-", None, None)]
    assert events[0][1]["error"] is error
    assert events[0][1]["sqlstate"] is None


def test_veto_rollback(app_txn: Any, events: list[Any]) -> None:
    """An error response sends reason 'veto' with no error."""
    app, _ = app_txn

    @app.post("/")
    @atomic
    def refuse() -> Any:
        return "no", 422

    app.test_client().post("/")
    assert sequence(events) == [("rolled_back", 1, "veto", False, "-", "-", None, "refuse")]
    assert events[0][1]["error"] is None


def test_teardown_discard(app_txn: Any, events: list[Any]) -> None:
    """Writes discarded at teardown send reason 'teardown' with the endpoint."""
    app, txn = app_txn
    app.config["TXN_ON_DISCARD"] = "ignore"

    @app.post("/")
    def forgot_to_commit() -> str:
        txn.session.add(Item(name="lost"))
        return "ok"

    app.test_client().post("/")
    assert [(n, p["reason"], p["endpoint"], p["error"]) for n, p in events] == [
        ("rolled_back", "teardown", "forgot_to_commit", None)
    ]
    assert count_items(app, txn) == 0


def test_retry_then_commit(app_txn: Any, events: list[Any]) -> None:
    """N attempts: N-1 (rolled back 'retry', retrying) pairs, then one commit."""
    app, _ = app_txn
    calls = []

    @atomic(retries=3, retry_on=Conflict, wait_initial=0.5, wait_max=10)
    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise Conflict

    with app.app_context():
        flaky()
    assert sequence(events) == [
        ("rolled_back", 1, "retry", False, "-", "-", None, None),
        ("retrying", 1, "-", "-", False, 0.5, None, None),
        ("rolled_back", 2, "retry", False, "-", "-", None, None),
        ("retrying", 2, "-", "-", False, 1.0, None, None),
        ("committed", 3, "-", "-", "-", "-", None, None),
    ]
    assert all(isinstance(p["error"], Conflict) for n, p in events if n != "committed")


def test_retries_exhausted(app_txn: Any, events: list[Any]) -> None:
    """The last failure is one rolled-back event with reason 'error' and exhausted=True."""
    app, _ = app_txn

    @atomic(retries=1, retry_on=Conflict)
    def always() -> None:
        raise Conflict

    with app.app_context(), pytest.raises(Conflict):
        always()
    assert sequence(events) == [
        ("rolled_back", 1, "retry", False, "-", "-", None, None),
        ("retrying", 1, "-", "-", True, 0.02, None, None),
        ("rolled_back", 2, "error", True, "-", "-", None, None),
    ]


def test_deadline_exhausted(app_txn: Any, events: list[Any]) -> None:
    """Giving up at the deadline is a final rolled-back event with exhausted=True."""
    app, _ = app_txn

    @atomic(retries=5, retry_on=Conflict, wait_initial=10, wait_max=10, deadline=1)
    def always() -> None:
        raise Conflict

    with app.app_context(), pytest.raises(Conflict):
        always()
    assert sequence(events) == [("rolled_back", 1, "error", True, "-", "-", None, None)]


def test_nested_savepoint_failure_sends_nothing(app_txn: Any, events: list[Any]) -> None:
    """A savepoint rollback is not a transaction event; the outer commit is the only one."""
    app, _ = app_txn
    with app.app_context(), atomic():
        with pytest.raises(ValueError), atomic():
            raise ValueError
        assert events == []
    assert sequence(events) == [("committed", 1, "-", "-", "-", "-", None, None)]


def broken_receiver(_: Any, **__: Any) -> None:
    """A receiver that always fails, like a metrics client that lost its server."""
    raise sa.exc.OperationalError("metrics", {}, Exception("down"))


@pytest.mark.parametrize("name", list(SIGNALS))
def test_raising_receiver_changes_nothing(
    app_txn: Any, name: str, events: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A raising receiver is logged; the result, other receivers and retries are unchanged."""
    app, txn = app_txn
    calls = []

    @app.post("/")
    @atomic(retries=2, retry_on=Conflict)
    def flaky() -> str:
        calls.append(1)
        txn.session.add(Item(name=str(len(calls))))
        if len(calls) == 1:
            raise Conflict
        return "ok"

    with SIGNALS[name].connected_to(broken_receiver):
        response = app.test_client().post("/")
    assert response.status_code == 200
    assert len(calls) == 2, "a receiver must neither stop nor cause a retry"
    assert count_items(app, txn) == 1
    assert [n for n, _ in events] == ["rolled_back", "retrying", "committed"]
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert f"transaction-{name.replace('_', '-')}" in logged[0].getMessage()


def test_signal_comes_before_on_commit_callbacks(app_txn: Any) -> None:
    """The commit signal is sent before the callbacks run."""
    app, _ = app_txn
    order: list[str] = []

    with (
        transaction_committed.connected_to(lambda _, **__: order.append("signal")),
        app.app_context(),
        atomic(),
    ):
        on_commit(lambda: order.append("callback"))
    assert order == ["signal", "callback"]


def test_elapsed_counts_from_the_first_attempt_with_the_waits(make_app: Any) -> None:
    """``elapsed`` is the seconds since the block's first attempt began, backoff waits
    included: at the commit it covers every attempt and every wait, not the last one."""
    slept: list[float] = []

    def sleep(delay: float) -> None:
        start = time.perf_counter()
        time.sleep(delay)  # the wait under test, not a wait for another thread
        slept.append(time.perf_counter() - start)

    app, _ = make_app(
        TXN_RETRY_SLEEP=sleep,
        TXN_RETRY_RANDOM=lambda: 1.0,
        TXN_RETRY_WAIT_INITIAL=0.01,
        TXN_RETRY_WAIT_MAX=0.01,
    )
    marks: dict[str, float] = {}
    seen: list[tuple[str, float, float]] = []

    @atomic(retry_on=Conflict)
    def work() -> None:
        marks.setdefault("first began", time.perf_counter())
        if len(slept) < 2:
            raise Conflict
        marks["last ended"] = time.perf_counter()

    def receiver(name: str) -> Any:
        def receive(_: Any, *, elapsed: float, **__: Any) -> None:
            seen.append((name, elapsed, time.perf_counter()))

        return receive

    with ExitStack() as stack:
        for name, signal in SIGNALS.items():
            stack.enter_context(signal.connected_to(receiver(name), sender=app))
        with app.app_context():
            called = time.perf_counter()
            work()
    assert [name for name, _, _ in seen] == ["rolled_back", "retrying"] * 2 + ["committed"]
    for _, elapsed, received in seen:
        assert 0 < elapsed <= received - called
    committed = seen[-1][1]
    assert committed >= marks["last ended"] - marks["first began"] >= sum(slept) > 0
    assert [elapsed for _, elapsed, _ in seen] == sorted(elapsed for _, elapsed, _ in seen)
