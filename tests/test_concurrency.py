"""Thread isolation: requests served at once never share a session, objects or connection."""

from __future__ import annotations

import dataclasses
import http.client
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask
from sqlalchemy.orm import Session
from werkzeug.serving import WSGIRequestHandler, make_server

from flask_txn import FlaskTxn

from .conftest import AppFactory, Item, every_engine

pytestmark = every_engine

#: Requests in flight at once; below the pool's 5 + 10 overflow connections.
REQUESTS = 8
#: A bound on waiting for the other requests, so a broken test fails instead of hanging.
TIMEOUT = 30


@dataclasses.dataclass
class Seen:
    """What one request saw while every request was in flight."""

    session: Session
    item: Item
    pending: set[object]
    dbapi_connection: Any


@dataclasses.dataclass
class Run:
    """The outcome of serving REQUESTS requests at once."""

    statuses: list[int]
    seen: dict[int, Seen]
    checked_out: int


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def _through_test_clients(app: Flask) -> Callable[[int], int]:
    return lambda index: app.test_client().get(f"/{index}").status_code


def _through_a_threaded_server(app: Flask, stack: list[Callable[[], None]]) -> Callable[[int], int]:
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    stack.append(stop)

    def get(index: int) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        try:
            connection.request("GET", f"/{index}")
            return connection.getresponse().status
        finally:
            connection.close()

    return get


@pytest.fixture(params=["test-clients", "threaded-server"])
def run(make_app: AppFactory, request: pytest.FixtureRequest) -> Iterator[Run]:
    """REQUESTS requests served at once, each by its own thread, overlapping at a barrier."""
    app, txn = make_app()
    barrier = threading.Barrier(REQUESTS, timeout=TIMEOUT)
    seen: dict[int, Seen] = {}
    _add_view(app, txn, barrier, seen)
    stack: list[Callable[[], None]] = []
    try:
        if request.param == "test-clients":
            get = _through_test_clients(app)
        else:
            get = _through_a_threaded_server(app, stack)
        with ThreadPoolExecutor(REQUESTS) as pool:
            statuses = list(pool.map(get, range(REQUESTS)))
        with app.app_context():
            checked_out = txn.engine.pool.checkedout()
        yield Run(statuses, seen, checked_out)
    finally:
        for stop in stack:
            stop()


def _add_view(app: Flask, txn: FlaskTxn, barrier: threading.Barrier, seen: dict[int, Seen]) -> None:
    @app.get("/<int:index>")
    def view(index: int) -> str:
        session = txn.session()
        item = Item(name=f"request {index}")
        session.add(item)
        connection = session.connection()
        # Every request now holds a session with a pending object and a connection.
        barrier.wait()
        seen[index] = Seen(session, item, set(session.new), connection.connection.dbapi_connection)
        session.expunge(item)
        return "ok"


def test_every_concurrent_request_succeeds(run: Run) -> None:
    """All the overlapping requests answer 200."""
    assert run.statuses == [200] * REQUESTS


def test_concurrent_requests_get_their_own_session(run: Run) -> None:
    """Each overlapping request gets a different Session object."""
    sessions = {id(seen.session) for seen in run.seen.values()}
    assert len(sessions) == REQUESTS


def test_concurrent_requests_see_only_their_own_objects(run: Run) -> None:
    """A request's session holds only the object that request added, none of the others'."""
    assert all(seen.pending == {seen.item} for seen in run.seen.values())
    assert len(run.seen) == REQUESTS


def test_concurrent_requests_use_their_own_connection(run: Run) -> None:
    """Each overlapping request's session runs on a different database connection."""
    connections = {id(seen.dbapi_connection) for seen in run.seen.values()}
    assert len(connections) == REQUESTS


def test_concurrent_requests_return_every_connection(run: Run) -> None:
    """Once every request answered, no connection is left checked out."""
    assert run.checked_out == 0
