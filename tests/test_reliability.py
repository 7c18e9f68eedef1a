"""Reliability: the bank under load and faults, on real PostgreSQL, real servers, real HTTP clients.

Sixteen client threads send transfers to examples/bank (served by
tests/reliabilityapp.py) over keep-alive HTTP connections, each with its own
``Idempotency-Key``. A transfer answered 502 or 503 (or whose connection
failed) is sent again with the same key, a few times at most. Each case runs
one server (threaded werkzeug, or gunicorn's pre-forked gthread workers), one
endpoint (``/transfers``: SERIALIZABLE with retries; ``/transfers/locked``:
READ COMMITTED with ordered row locks) and at most one kind of fault, then
checks the ledger, the leaks and the latencies (see :func:`check`).

The quick size runs in CI. ``FLASK_TXN_RELIABILITY_TRANSFERS=20000`` runs the
full size (and every fault on both endpoints); ``FLASK_TXN_RELIABILITY_REPORT``
names a JSON file that receives each case's figures (docs/reliability.md).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from examples.bank.models import txn

from . import pgserver, tcpproxy
from .pgserver import free_port
from .reliabilityapp import CONFIG_ENV, REPORTS_ENV, build

ROOT = Path(__file__).resolve().parent.parent
TRANSFERS_ENV = "FLASK_TXN_RELIABILITY_TRANSFERS"
REPORT_ENV = "FLASK_TXN_RELIABILITY_REPORT"

#: Transfers per case: a quick run by default, the full one on request.
TRANSFERS = int(os.environ.get(TRANSFERS_ENV, "240"))
FULL = TRANSFERS >= 20_000
CLIENTS = 16
ACCOUNTS = 40
OPENING = 10_000_000
MAX_AMOUNT = 1_000
#: Sends of one transfer after its first, when its answer leaves it in doubt.
RESENDS = 4
#: Answers after which a client sends the transfer again, with the same key: no
#: answer; the bank's 409 for a key raced by a copy ("resend it to see what was
#: stored"); 502 (commit outcome unknown); 503 (nothing saved, try again).
RESEND = frozenset({0, 409, 502, 503})
#: A client's pause before resending after a 503, doubled at each resend (seconds).
RESEND_PAUSE = 0.05
#: backend_pid marks the app's connections in pg_stat_activity.
APPLICATION = "flask-txn-reliability"
#: A bound on every wait for a server, a proxy or a thread, so a failure cannot hang.
WAIT = 60
#: Timeouts the app runs with (seconds), from which the latency bound follows.
DEADLINE = 3.0
CONNECT = 2.0
#: Every response must come within this: the deadline, then one last attempt's
#: read timeout (statement timeout + 1 s) and connect timeout, plus slack for a
#: machine shared with the database. The HTTP client gives up later than this.
BOUND = DEADLINE + (DEADLINE + 1.0) + CONNECT + 2.0
HTTP_TIMEOUT = BOUND + 15


#: A PostgreSQL URL nothing listens at: engines are made, never connected.
NOWHERE = "postgresql+psycopg2://user@127.0.0.1:1/db"


@pytest.fixture
def database_url(postgresql_url: str) -> str:
    return postgresql_url


def app_config(**overrides: Any) -> dict[str, Any]:
    """The bank's config for a run: pool sized for the clients, timeouts from the deadline."""
    return {
        "BANK_RESET": True,
        "BANK_ACCOUNTS": ACCOUNTS,
        "BANK_OPENING_BALANCE": OPENING,
        "TXN_RETRY_DEADLINE": DEADLINE,
        "TXN_RETRY_WAIT_MAX": 0.2,
        "TXN_CONNECT_TIMEOUT": CONNECT,
        "TXN_TCP_TIMEOUT": 10.0,
        "TXN_ENGINE_OPTIONS": {
            "pool_size": CLIENTS,
            "max_overflow": 4,
            "connect_args": {"application_name": APPLICATION},
        },
        **overrides,
    }


# -- the load ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transfer:
    key: str
    source: int
    target: int
    amount: int


@dataclasses.dataclass
class Answer:
    """One response (or a failure to get one) to one send of a transfer."""

    key: str
    status: int  # 0: no response (the connection failed)
    reason: str  # the error response's "reason", the exception, or ""
    latency: float
    body: dict[str, Any]
    replayed: bool


def make_plan(count: int, rng: random.Random, die_every: int = 0) -> list[Transfer]:
    """``count`` random transfers; with ``die_every``, every such one has a key marked to die."""
    plan = []
    for number in range(count):
        source, target = rng.sample(range(1, ACCOUNTS + 1), 2)
        dies = die_every and number % die_every == die_every // 2
        key = f"{'die' if dies else 'ok'}-{uuid.UUID(int=rng.getrandbits(128))}"
        plan.append(Transfer(key, source, target, rng.randint(1, MAX_AMOUNT)))
    return plan


class Client:
    """One keep-alive HTTP connection to the bank."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any, headers: dict[str, str]) -> Answer:
        started = time.monotonic()
        if self.connection is None:
            self.connection = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=HTTP_TIMEOUT
            )
        try:
            data = None if body is None else json.dumps(body).encode()
            self.connection.request(
                method, path, body=data, headers={"Content-Type": "application/json", **headers}
            )
            response = self.connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            latency = time.monotonic() - started
            key = headers.get("Idempotency-Key", "")
            return Answer(key, 0, type(exc).__name__, latency, {}, False)
        latency = time.monotonic() - started
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"text": raw.decode(errors="replace")[:200]}
        return Answer(
            headers.get("Idempotency-Key", ""),
            response.status,
            parsed.get("reason", "") if response.status >= 400 else "",
            latency,
            parsed,
            response.getheader("Idempotent-Replayed") == "true",
        )

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class Load:
    """Sends a plan of transfers from CLIENTS threads; counts and keeps every answer."""

    def __init__(self, port: int, endpoint: str, plan: list[Transfer]) -> None:
        self.port = port
        self.endpoint = endpoint
        self.plan = plan
        self.answers: list[Answer] = []
        self.finished = 0
        self._next = 0
        self._lock = threading.Lock()
        self._milestones: list[tuple[int, threading.Event]] = []
        self.stop = threading.Event()

    def when_finished(self, count: int) -> threading.Event:
        """An event set once ``count`` transfers got their final answer."""
        event = threading.Event()
        with self._lock:
            self._milestones.append((count, event))
            if self.finished >= count:
                event.set()
        return event

    def run(self, deadline: float) -> float:
        """Send every transfer; return the seconds it took."""
        started = time.monotonic()
        threads = [
            threading.Thread(target=self._client, args=(deadline,), name=f"client-{n}")
            for n in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic() + HTTP_TIMEOUT))
        self.stop.set()
        assert not any(thread.is_alive() for thread in threads), "a client thread hung"
        return time.monotonic() - started

    def _take(self) -> Transfer | None:
        with self._lock:
            if self._next >= len(self.plan):
                return None
            self._next += 1
            return self.plan[self._next - 1]

    def _client(self, deadline: float) -> None:
        client = Client(self.port)
        try:
            while time.monotonic() < deadline and (transfer := self._take()) is not None:
                self._send(client, transfer)
                with self._lock:
                    self.finished += 1
                    for count, event in self._milestones:
                        if self.finished >= count:
                            event.set()
        finally:
            client.close()

    def _send(self, client: Client, transfer: Transfer) -> None:
        body = {"from": transfer.source, "to": transfer.target, "amount": transfer.amount}
        for send in range(RESENDS + 1):
            answer = client.request("POST", self.endpoint, body, {"Idempotency-Key": transfer.key})
            with self._lock:
                self.answers.append(answer)
            if answer.status not in RESEND:
                return
            if answer.status == 503 and self.stop.wait(RESEND_PAUSE * 2**send):
                return


# -- servers ----------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """Keep-alive, and no line per request on stderr."""

    protocol_version = "HTTP/1.1"

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclasses.dataclass
class Served:
    """A running bank: its port, and how to read every worker's report once it stopped."""

    port: int
    kind: str
    reports: Callable[[], list[dict[str, Any]]]


@contextlib.contextmanager
def threaded(app: Flask) -> Iterator[Served]:
    """The app in a threaded werkzeug server on 127.0.0.1, in this process."""
    from .reliabilityapp import report

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="bank-server")
    thread.start()
    try:
        yield Served(server.server_port, "threaded", lambda: [report(app)])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


@contextlib.contextmanager
def gunicorn(url: str, config: dict[str, Any], folder: Path) -> Iterator[Served]:
    """The app under ``gunicorn --preload`` with 2 gthread workers of 8 threads each."""
    port = free_port()
    reports = folder / "reports"
    reports.mkdir()
    log = folder / "gunicorn.log"
    # Each worker serves 8 requests at once: a pool of 8 connections each.
    options = dict(config["TXN_ENGINE_OPTIONS"], pool_size=8)
    env = {
        **os.environ,
        CONFIG_ENV: json.dumps({"url": url, "config": {**config, "TXN_ENGINE_OPTIONS": options}}),
        REPORTS_ENV: str(reports),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--preload",
        "--config=python:tests.reliabilityapp",
        "--workers=2",
        "--worker-class=gthread",
        "--threads=8",
        f"--bind=127.0.0.1:{port}",
        "--no-control-socket",
        f"--graceful-timeout={WAIT}",
        f"--timeout={WAIT}",
        "tests.reliabilityapp:app",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=output)
    served_well = False
    try:
        _wait_until_listening(process, port, log)

        def read_reports() -> list[dict[str, Any]]:
            process.send_signal(signal.SIGTERM)  # graceful: workers finish, then report
            process.wait(WAIT)
            return [json.loads(path.read_text()) for path in sorted(reports.glob("*.json"))]

        yield Served(port, "gunicorn", read_reports)
        served_well = True
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if served_well:
        assert "Traceback" not in log.read_text(), log.read_text()


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        try:
            process.wait(timeout=0.05)  # the pause between polls, noticing an early exit
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"gunicorn exited with {process.returncode}:\n{log.read_text()}")
    pytest.fail(f"gunicorn did not listen within {WAIT} s:\n{log.read_text()}")


# -- checks -------------------------------------------------------------------------------


def direct_engine(url: str) -> sa.Engine:
    """An engine straight to the database, for checks and faults: no pool, no proxy."""
    return sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


def idle_in_transaction(engine: sa.Engine) -> int:
    """The app's backends idle in a transaction, once the closing of killed ones has settled.

    A backend whose client vanished ends when it notices: poll, bounded, until
    none is left or the deadline passes, and return the last count.
    """
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = :name AND state LIKE 'idle in transaction%'"
    )
    deadline = time.monotonic() + 10
    with engine.connect() as connection:
        while True:
            count = int(connection.scalar(query, {"name": APPLICATION}) or 0)
            if count == 0 or time.monotonic() > deadline:
                return count
            connection.execute(sa.text("SELECT pg_sleep(0.05)"))  # the pause between polls


def ledger(engine: sa.Engine) -> tuple[list[Any], list[Any]]:
    """Accounts (id, opening, balance) and transfers (key, id, from, to, amount), one snapshot."""
    with engine.connect() as connection, connection.begin():
        connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        accounts = connection.exec_driver_sql(
            "SELECT id, opening, balance FROM bank_account ORDER BY id"
        ).all()
        transfers = connection.exec_driver_sql(
            "SELECT key, id, source_id, target_id, amount FROM bank_transfer"
        ).all()
    return accounts, transfers


def check(
    engine: sa.Engine,
    plan: list[Transfer],
    answers: list[Answer],
    reports: list[dict[str, Any]],
    idle: int,
    bound: float,
) -> dict[str, list[Any]]:
    """Every invariant and leak check, as a list of violations each (all must be empty).

    :param idle: the app's backends left idle in a transaction, counted while it ran.
    :param bound: the seconds within which every response must have come.
    """
    accounts, transfers = ledger(engine)
    rows = collections.defaultdict(list)
    for key, id_, source, target, amount in transfers:
        rows[key].append((id_, source, target, amount))
    by_key = collections.defaultdict(list)
    for answer in answers:
        by_key[answer.key].append(answer)
    planned = {transfer.key: transfer for transfer in plan}
    credits: collections.Counter[int] = collections.Counter()
    debits: collections.Counter[int] = collections.Counter()
    for _key, _id, source, target, amount in transfers:
        debits[source] += amount
        credits[target] += amount
    violations: dict[str, list[Any]] = {
        "total changed": []
        if sum(balance for _, _, balance in accounts) == ACCOUNTS * OPENING
        else [sum(balance for _, _, balance in accounts) - ACCOUNTS * OPENING],
        "balance != opening + credits - debits": [
            id_
            for id_, opening, balance in accounts
            if balance != opening + credits[id_] - debits[id_]
        ],
        "key with two ledger rows": [key for key, found in rows.items() if len(found) > 1],
        "2xx without exactly its ledger row": [],
        "ledger row for a key that never got a 2xx and was not in doubt": [],
        "ledger row for a key answered only 503": [],
        "ledger row for a key never sent": [key for key in rows if key not in planned],
        "unclean response": [],
        "no HTTP answer": [a.reason for a in answers if a.status == 0],
        "response slower than the bound": [],
        "connection checked out at the end": [r["pid"] for r in reports if r["checked_out"]],
        "session left in a registry": [r["pid"] for r in reports if r["sessions"]],
        "idle in transaction": [idle] if idle else [],
    }
    for key, sent in by_key.items():
        transfer = planned[key]
        for answer in sent:
            if answer.status == 201:
                expected = (
                    answer.body.get("id"),
                    transfer.source,
                    transfer.target,
                    transfer.amount,
                )
                if rows.get(key) != [expected]:
                    violations["2xx without exactly its ledger row"].append(key)
            elif answer.status not in RESEND or (answer.status in (502, 503) and not answer.reason):
                violations["unclean response"].append((answer.status, answer.body))
            if answer.latency > bound:
                violations["response slower than the bound"].append(round(answer.latency, 2))
        statuses = {answer.status for answer in sent}
        if key in rows and 201 not in statuses:
            if statuses == {503}:
                violations["ledger row for a key answered only 503"].append(key)
            elif not statuses & {0, 409, 502}:
                violations["ledger row for a key that never got a 2xx and was not in doubt"].append(
                    key
                )
    return violations


# -- a run --------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one case did and saw: the figures docs/reliability.md reports."""

    case: str
    server: str
    endpoint: str
    plan: list[Transfer]
    bound: float = BOUND
    answers: list[Answer] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    violations: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def app_counts(self, counter: str) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for report in self.reports:
            total.update(report[counter])
        return total

    def final(self) -> collections.Counter[str]:
        """Each transfer's last answer, by status (and reason for errors)."""
        last: dict[str, Answer] = {}
        for answer in self.answers:
            last[answer.key] = answer
        return collections.Counter(
            str(a.status) + (f" {a.reason}" if a.reason else "") for a in last.values()
        )

    def ambiguous_outcomes(self) -> collections.Counter[str]:
        """What each 502 turned out to be, from the answer to the same key's next send.

        A replayed 201 means the COMMIT in doubt had committed; a fresh 201, that
        it had not, and the resend carried the transfer out.
        """
        outcomes: collections.Counter[str] = collections.Counter()
        by_key = collections.defaultdict(list)
        for answer in self.answers:
            by_key[answer.key].append(answer)
        for answers in by_key.values():
            for number, answer in enumerate(answers):
                if answer.status != 502:
                    continue
                later = [a for a in answers[number + 1 :] if a.status == 201]
                if not later:
                    outcomes["never resolved"] += 1
                elif later[0].replayed:
                    outcomes["had committed"] += 1
                else:
                    outcomes["had not committed"] += 1
        return outcomes

    def figures(self) -> dict[str, Any]:
        statuses = collections.Counter(
            str(a.status) + (f" {a.reason}" if a.reason else "") for a in self.answers
        )
        final = self.final()
        return {
            "case": self.case,
            "server": self.server,
            "endpoint": self.endpoint,
            "transfers": len(self.plan),
            "committed": final["201"],
            "requests": len(self.answers),
            "seconds": round(self.seconds, 1),
            "transfers_per_second": round(len(self.plan) / self.seconds) if self.seconds else 0,
            "max_latency": round(max((a.latency for a in self.answers), default=0.0), 2),
            "latency_bound": self.bound,
            "responses": dict(sorted(statuses.items())),
            "final": dict(sorted(final.items())),
            "faults": self.faults,
            "retried": dict(sorted(self.app_counts("retried").items())),
            "failed": dict(sorted(self.app_counts("failed").items())),
            "watchdog_fired": sum(report["watchdog_fired"] for report in self.reports),
            "ambiguous_outcomes": dict(sorted(self.ambiguous_outcomes().items())),
            "workers": len(self.reports),
            "violations": {name: len(found) for name, found in self.violations.items()},
        }


def publish(run: Run) -> None:
    """Print the figures (shown with -s) and append them to the report file, if one is named."""
    figures = run.figures()
    print(f"\n{json.dumps(figures)}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as output:
            output.write(json.dumps(figures) + "\n")


def seconds_allowed() -> float:
    """The time a run may take before its clients stop taking transfers."""
    return 30.0 + TRANSFERS / 25


def execute(
    run: Run,
    url: str,
    served: Served,
    fault: Callable[[Load], None] | None = None,
) -> None:
    """Send the plan, with ``fault`` in a thread of its own; then check everything."""
    load = Load(served.port, run.endpoint, run.plan)
    errors: list[BaseException] = []

    def inject() -> None:
        try:
            assert fault is not None
            fault(load)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    injector = threading.Thread(target=inject, name="fault") if fault else None
    if injector:
        injector.start()
    try:
        run.seconds = load.run(time.monotonic() + seconds_allowed())
    finally:
        load.stop.set()
        if injector:
            injector.join(WAIT)
    assert not errors, errors
    assert injector is None or not injector.is_alive(), "the fault injector hung"
    assert load.finished == len(run.plan), f"only {load.finished} of {len(run.plan)} sent in time"
    run.answers = load.answers
    engine = direct_engine(url)
    try:
        idle = idle_in_transaction(engine)
        run.reports = served.reports()
        run.violations = check(engine, run.plan, run.answers, run.reports, idle, run.bound)
    finally:
        engine.dispose()


def recovered(port: int, endpoint: str, count: int = 10) -> list[int]:
    """The statuses of ``count`` fresh transfers sent one by one after the fault."""
    client = Client(port)
    try:
        statuses = []
        for transfer in make_plan(count, random.Random()):
            body = {"from": transfer.source, "to": transfer.target, "amount": transfer.amount}
            answer = client.request("POST", endpoint, body, {"Idempotency-Key": transfer.key})
            statuses.append(answer.status)
        return statuses
    finally:
        client.close()


def assert_clean(run: Run) -> None:
    """Every check of :func:`check` found nothing."""
    assert {name: found for name, found in run.violations.items() if found} == {}


ENDPOINTS = {"serializable": "/transfers", "read-committed": "/transfers/locked"}


def endpoints_for(quick: str) -> list[str]:
    """Both endpoints in the full run, one in the quick run (CI)."""
    return list(ENDPOINTS) if FULL else [quick]


# -- the cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", list(ENDPOINTS))
def test_threaded_server_keeps_the_books(database_url: str, isolation: str) -> None:
    """No fault, threaded server: every invariant and leak check holds."""
    run = Run("no fault", "threaded", ENDPOINTS[isolation], make_plan(TRANSFERS, random.Random(1)))
    app = build(database_url, **app_config())
    try:
        with threaded(app) as served:
            execute(run, database_url, served)
    finally:
        _dispose(app)
    publish(run)
    assert_clean(run)
    assert given_up(run) == {}


@pytest.mark.parametrize("isolation", list(ENDPOINTS))
def test_preforking_server_keeps_the_books(
    database_url: str, isolation: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No fault, gunicorn with two pre-forked workers: the checks hold in every worker."""
    run = Run("no fault", "gunicorn", ENDPOINTS[isolation], make_plan(TRANSFERS, random.Random(2)))
    folder = tmp_path_factory.mktemp("gunicorn")
    with gunicorn(database_url, app_config(), folder) as served:
        execute(run, database_url, served)
    publish(run)
    assert_clean(run)
    assert (given_up(run), len(run.reports)) == ({}, 2)


def given_up(run: Run) -> dict[str, int]:
    """Transfers whose last answer was not 201, beyond what contention explains.

    At SERIALIZABLE, a transfer can meet a serialization failure in every
    attempt of every send: up to 1 in 1,000 may end with 503 retries-exhausted.
    """
    final = run.final()
    final.pop("201", None)
    if run.endpoint == ENDPOINTS["serializable"]:
        exhausted = final.pop("503 retries-exhausted", 0)
        if exhausted > max(1, len(run.plan) // 1000):
            final["503 retries-exhausted"] = exhausted
    return dict(final)


def _dispose(app: Flask) -> None:
    with app.app_context():
        txn.engine.dispose()


def execute_threaded(
    run: Run, url: str, database_url: str, fault: Callable[[Load], None], config: dict[str, Any]
) -> list[int]:
    """Serve the bank on ``url`` from a threaded server, run ``run`` against it with
    ``fault`` (checked on ``database_url``), then return :func:`recovered`'s statuses."""
    app = build(url, **config)
    try:
        with threaded(app) as served:
            execute(run, database_url, served, fault)
            return recovered(served.port, run.endpoint)
    finally:
        _dispose(app)


#: Pause between two kills, and how many at most.
KILL_INTERVAL = 0.05
MAX_KILLS = max(20, TRANSFERS // 20)
#: Resets of every live connection through the proxy, spread over a run.
RESETS = max(4, TRANSFERS // 500)


def lost_connections(run: Run) -> int:
    """Attempts the app saw fail because a connection died or could not be made."""
    kinds = ("connection-lost", "no-connection", "ambiguous-commit")
    retried, failed = run.app_counts("retried"), run.app_counts("failed")
    return sum(retried[kind] + failed[kind] for kind in kinds)


@pytest.mark.parametrize("isolation", endpoints_for("serializable"))
def test_backends_killed_at_random(database_url: str, isolation: str) -> None:
    """pg_terminate_backend on random app backends in a transaction: the books still balance."""
    run = Run(
        "backends killed", "threaded", ENDPOINTS[isolation], make_plan(TRANSFERS, random.Random(3))
    )
    killed: collections.Counter[str] = collections.Counter()

    def kill(load: Load) -> None:
        engine = direct_engine(database_url)
        pick = sa.text(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = :name"
            " AND xact_start IS NOT NULL ORDER BY random() LIMIT 1"
        )
        try:
            with engine.connect() as connection:
                while not load.stop.wait(KILL_INTERVAL) and killed.total() < MAX_KILLS:
                    victim = connection.execute(pick, {"name": APPLICATION}).first()
                    terminate = (
                        sa.select(sa.func.pg_terminate_backend(victim.pid)) if victim else None
                    )
                    if victim and connection.scalar(terminate):
                        killed[f"killed in a transaction ({victim.state or 'state unknown'})"] += 1
        finally:
            engine.dispose()

    after = execute_threaded(run, database_url, database_url, kill, app_config())
    run.faults = dict(killed)
    publish(run)
    assert_clean(run)
    assert (killed.total() > 0, lost_connections(run) > 0, after) == (True, True, [201] * 10)


@pytest.mark.parametrize("isolation", endpoints_for("read-committed"))
def test_server_restarted(isolation: str) -> None:
    """The database restarts once mid-run (its own server): clean errors, then recovery."""
    run = Run(
        "server restarted", "threaded", ENDPOINTS[isolation], make_plan(TRANSFERS, random.Random(4))
    )
    with pgserver.running() as server:
        live: list[int] = []

        def restart(load: Load) -> None:
            if not load.when_finished(TRANSFERS // 3).wait(seconds_allowed()):
                return
            engine = direct_engine(server.url)
            try:
                with engine.connect() as connection:
                    live.append(
                        int(
                            connection.scalar(
                                sa.text(
                                    "SELECT count(*) FROM pg_stat_activity WHERE"
                                    " application_name = :name AND xact_start IS NOT NULL"
                                ),
                                {"name": APPLICATION},
                            )
                            or 0
                        )
                    )
            finally:
                engine.dispose()
            server.restart()

        after = execute_threaded(run, server.url, server.url, restart, app_config())
    run.faults = {"restarts": len(live), "transactions open at the restart": sum(live)}
    publish(run)
    assert_clean(run)
    assert (len(live), lost_connections(run) > 0, after) == (1, True, [201] * 10)


@contextlib.contextmanager
def proxied(database_url: str) -> Iterator[tuple[tcpproxy.FaultProxy, str]]:
    """A fault proxy in front of the database, and the URL that goes through it."""
    url = sa.make_url(database_url)
    with tcpproxy.running(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)


@pytest.mark.parametrize("isolation", endpoints_for("serializable"))
def test_connections_reset_by_the_network(database_url: str, isolation: str) -> None:
    """A proxy resets every live database connection a few times, each time once a
    transaction is open, so that attempts lose their connection: the books still balance."""
    run = Run(
        "connections reset",
        "threaded",
        ENDPOINTS[isolation],
        make_plan(TRANSFERS, random.Random(5)),
    )
    hits: list[tcpproxy.Hit] = []
    with proxied(database_url) as (proxy, url):

        def reset(load: Load) -> None:
            for part in range(1, RESETS + 1):
                if not load.when_finished(TRANSFERS * part // (RESETS + 1)).wait(seconds_allowed()):
                    return
                hits.append(proxy.reset(in_transaction=True))

        after = execute_threaded(run, url, database_url, reset, app_config())
    run.faults = {
        "resets": len(hits),
        "connections reset": sum(hit.connections for hit in hits),
        "of which in a transaction or awaiting a reply": sum(hit.live for hit in hits),
    }
    publish(run)
    assert_clean(run)
    live = sum(hit.live for hit in hits)
    assert (len(hits), live > 0, lost_connections(run) > 0, after) == (
        RESETS,
        True,
        True,
        [201] * 10,
    )


#: The stall case's timeouts: small, so that its stall can outlast its bound quickly.
STALL_DEADLINE, STALL_STATEMENT, STALL_READ = 1.0, 0.5, 1.0
STALL_BOUND = STALL_DEADLINE + STALL_READ + CONNECT + 2.0


@pytest.mark.parametrize("isolation", endpoints_for("read-committed"))
def test_connections_stalled_by_the_network(database_url: str, isolation: str) -> None:
    """Live connections stop passing data for longer than the bound: no request waits it out."""
    run = Run(
        "connections stalled",
        "threaded",
        ENDPOINTS[isolation],
        make_plan(TRANSFERS, random.Random(6)),
        bound=STALL_BOUND,
    )
    hits: list[tcpproxy.Hit] = []
    stall = STALL_BOUND + 1.0
    with proxied(database_url) as (proxy, url):

        def freeze(load: Load) -> None:
            if not load.when_finished(TRANSFERS // 4).wait(seconds_allowed()):
                return
            hits.append(proxy.stall())
            try:
                load.stop.wait(stall)  # how long the fault lasts; the run goes on meanwhile
            finally:
                proxy.resume()

        config = app_config(
            TXN_RETRY_DEADLINE=STALL_DEADLINE,
            TXN_STATEMENT_TIMEOUT=STALL_STATEMENT,
            TXN_READ_TIMEOUT=STALL_READ,
        )
        after = execute_threaded(run, url, database_url, freeze, config)
    run.faults = {
        "stalls": len(hits),
        "seconds stalled": stall,
        "connections stalled": sum(hit.connections for hit in hits),
        "of which in a transaction or awaiting a reply": sum(hit.live for hit in hits),
    }
    publish(run)
    assert_clean(run)
    fired = sum(report["watchdog_fired"] for report in run.reports)
    assert (len(hits), hits[0].live > 0, fired > 0, after) == (1, True, True, [201] * 10)


#: One transfer in this many has a key whose first COMMIT dies (the ambiguous case).
DIE_EVERY = 30
#: The advisory lock class the dying keys' trigger waits on.
LOCK_CLASS = 4242


@contextlib.contextmanager
def commits_that_die(engine: sa.Engine, keys: list[str]) -> Iterator[Callable[[Load], None]]:
    """A killer that ends the first COMMIT of each of ``keys`` while its reply is pending.

    A deferred constraint trigger makes the COMMIT of a transfer whose key
    starts with ``die-`` wait for an advisory lock held here; the killer
    terminates the waiting backend (so that COMMIT's outcome is unknown to the
    app, and the transfer is in fact not committed), waits until it is gone,
    then releases that key's lock, so that the client's second send passes.
    """
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION bank_wait_at_commit() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN"
            f" PERFORM pg_advisory_xact_lock({LOCK_CLASS}, hashtext(NEW.key));"
            " RETURN NULL; END $$"
        )
        connection.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER bank_wait_at_commit AFTER INSERT ON bank_transfer"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (starts_with(NEW.key, 'die-'))"
            " EXECUTE FUNCTION bank_wait_at_commit()"
        )
    holder = engine.connect()
    keys_by_lock = dict(
        holder.execute(
            sa.text(
                "SELECT hashtext(k)::bigint & 4294967295, k FROM unnest(CAST(:keys AS text[])) AS k"
            ),
            {"keys": keys},
        ).all()
    )
    for key in keys:
        holder.execute(
            sa.text(f"SELECT pg_advisory_lock({LOCK_CLASS}, hashtext(:key))"), {"key": key}
        )
    killed: dict[str, int] = {}
    waiting = sa.text(
        "SELECT pid, objid::bigint FROM pg_locks"
        f" WHERE locktype = 'advisory' AND classid = {LOCK_CLASS} AND NOT granted"
    )
    alive = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")

    def kill(load: Load) -> None:
        with engine.connect() as connection:
            while len(killed) < len(keys) and not load.stop.wait(0.01):
                for pid, lock in connection.execute(waiting).all():
                    key = keys_by_lock[lock]
                    if key in killed or not connection.scalar(
                        sa.select(sa.func.pg_terminate_backend(pid))
                    ):
                        continue
                    killed[key] = pid
                    deadline = time.monotonic() + WAIT
                    while connection.scalar(alive, {"pid": pid}) and time.monotonic() < deadline:
                        connection.execute(sa.text("SELECT pg_sleep(0.01)"))  # poll pause
                    holder.execute(
                        sa.text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(:key))"),
                        {"key": key},
                    )

    try:
        kill.killed = killed  # type: ignore[attr-defined]
        yield kill
    finally:
        holder.close()
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "DROP TRIGGER IF EXISTS bank_wait_at_commit ON bank_transfer"
            )


@pytest.mark.parametrize("isolation", endpoints_for("serializable"))
def test_ambiguous_commits_under_load(database_url: str, isolation: str) -> None:
    """COMMITs that die while their reply is pending: 502, never retried, one ledger row per key."""
    plan = make_plan(TRANSFERS, random.Random(7), die_every=DIE_EVERY)
    dying = sorted(transfer.key for transfer in plan if transfer.key.startswith("die-"))
    run = Run("commits die in flight", "threaded", ENDPOINTS[isolation], plan)
    app = build(database_url, **app_config())
    engine = direct_engine(database_url)
    try:
        with commits_that_die(engine, dying) as kill, threaded(app) as served:
            execute(run, database_url, served, kill)
            killed = kill.killed  # type: ignore[attr-defined]
    finally:
        engine.dispose()
        _dispose(app)
    ambiguous = sorted({a.key for a in run.answers if a.status == 502})
    run.faults = {"COMMITs killed while their reply was pending": len(killed)}
    publish(run)
    assert_clean(run)
    # Killed before its commit record, each transfer in doubt had not committed: the
    # client's second send carried it out (a fresh 201, one ledger row).
    assert (
        sorted(killed),
        ambiguous,
        run.app_counts("failed")["ambiguous-commit"],
        run.ambiguous_outcomes(),
        given_up(run),
    ) == (dying, dying, len(dying), {"had not committed": len(dying)}, {})


# -- the timeouts -----------------------------------------------------------------------


def libpq_parameters(app: Flask, ext: Any) -> dict[str, str]:
    """The connection parameters libpq used for one of the app's connections."""
    with app.app_context(), ext.engine.connect() as connection:
        dbapi = connection.connection.dbapi_connection
        if hasattr(dbapi, "get_dsn_parameters"):  # psycopg2
            return dict(dbapi.get_dsn_parameters())
        return dict(dbapi.info.get_parameters())  # psycopg 3


def plain_app(url: str, **config: Any) -> tuple[Flask, Any]:
    """A bare app with its own extension, for the timeout and error-response tests."""
    from flask_txn import FlaskTxn

    app = Flask("reliability")
    app.config.update(TXN_DATABASE_URI=url, **config)
    return app, FlaskTxn(app)


@pytest.fixture(params=["psycopg2", "psycopg"])
def driver_url(request: pytest.FixtureRequest, postgresql_url: str) -> str:
    """The PostgreSQL server through each libpq driver."""
    return (
        sa.make_url(postgresql_url)
        .set(drivername=f"postgresql+{request.param}")
        .render_as_string(False)
    )


def test_timeouts_become_libpq_parameters(driver_url: str) -> None:
    """Connect and TCP timeouts reach libpq; the statement timeout is in force in each
    transaction, and is no startup parameter."""
    app, ext = plain_app(
        driver_url, TXN_RETRY_DEADLINE=2.5, TXN_CONNECT_TIMEOUT=3.5, TXN_TCP_TIMEOUT=12
    )
    try:
        parameters = libpq_parameters(app, ext)
        with app.app_context(), ext.engine.connect() as connection:
            in_force = connection.exec_driver_sql("SHOW statement_timeout").scalar()
            pool_timeout = ext.engine.pool.timeout()
    finally:
        with app.app_context():
            ext.engine.dispose()
    shown = {
        key: parameters.get(key) or None  # psycopg2 shows an unset 'options' as ""
        for key in (
            "connect_timeout",
            "keepalives",
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_count",
            "tcp_user_timeout",
            "options",
        )
    }
    assert (shown, in_force, pool_timeout) == (
        {
            "connect_timeout": "4",
            "keepalives": "1",
            "keepalives_idle": "6",
            "keepalives_interval": "2",
            "keepalives_count": "3",
            "tcp_user_timeout": "12000",
            "options": None,
        },
        "2500ms",
        2.5,
    )


def test_the_users_connection_parameters_win(postgresql_url: str) -> None:
    """connect_args and the URL's query override flask-txn's libpq parameters; the user's
    options reach libpq, and TXN_STATEMENT_TIMEOUT, set in each transaction, wins over them."""
    url = sa.make_url(postgresql_url).update_query_dict({"connect_timeout": "7"})
    app, ext = plain_app(
        url.render_as_string(False),
        TXN_STATEMENT_TIMEOUT=5,
        TXN_ENGINE_OPTIONS={
            "connect_args": {"keepalives_idle": 99, "options": "-c statement_timeout=4000"},
            "pool_timeout": 9,
        },
    )
    try:
        parameters = libpq_parameters(app, ext)
        with app.app_context(), ext.engine.connect() as connection:
            in_force = connection.exec_driver_sql("SHOW statement_timeout").scalar()
            pool_timeout = ext.engine.pool.timeout()
    finally:
        with app.app_context():
            ext.engine.dispose()
    assert (
        parameters["connect_timeout"],
        parameters["keepalives_idle"],
        parameters["options"],
        in_force,
        pool_timeout,
    ) == ("7", "99", "-c statement_timeout=4000", "5s", 9)


def test_autocommit_connections_get_no_statement_timeout(postgresql_url: str) -> None:
    """A connection in AUTOCOMMIT has no transaction to set the timeout in: the server's stays."""
    app, ext = plain_app(postgresql_url, TXN_STATEMENT_TIMEOUT=5)
    with app.app_context():
        engine = ext.engine
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            in_force = connection.exec_driver_sql("SHOW statement_timeout").scalar()
    finally:
        engine.dispose()
    assert in_force == "0"


def test_no_deadline_sets_no_statement_or_read_timeout(postgresql_url: str) -> None:
    """Without TXN_RETRY_DEADLINE, the statement timeout and the pool's stay as they were."""
    app, ext = plain_app(postgresql_url)
    try:
        with app.app_context():
            timeouts = ext.settings.timeouts
        parameters = libpq_parameters(app, ext)
        with app.app_context():
            pool_timeout = ext.engine.pool.timeout()
    finally:
        with app.app_context():
            ext.engine.dispose()
    assert (timeouts.statement, timeouts.read, parameters.get("options", ""), pool_timeout) == (
        None,
        None,
        "",
        30.0,
    )


def test_sqlite_gets_only_the_pool_timeout(tmp_path: Path) -> None:
    """On SQLite the libpq keys do nothing, and the deadline still bounds the pool's wait."""
    app, ext = plain_app(f"sqlite:///{tmp_path / 'db'}", TXN_RETRY_DEADLINE=4)
    with app.app_context():
        timeouts, pool_timeout = ext.settings.timeouts, ext.engine.pool.timeout()
        ext.engine.dispose()
    assert (timeouts.statement, timeouts.read, pool_timeout) == (None, None, 4.0)


def test_unset_timeouts_add_nothing_and_a_derived_pool_timeout_needs_a_queue() -> None:
    """With every timeout None, no parameter is added; the deadline skips pools that never wait."""
    from flask_txn._timeouts import Timeouts, engine_options

    url = sa.make_url(NOWHERE)
    none = Timeouts(None, None, None, None, None, {"pool": "TXN_POOL_TIMEOUT"})
    derived = dataclasses.replace(none, pool=3.0, sources={"pool": "TXN_RETRY_DEADLINE"})
    user_pool = sa.pool.NullPool(lambda: None)
    assert (
        engine_options(url, none, {"connect_args": {"sslmode": "disable"}}),
        engine_options(url, derived, {"poolclass": sa.pool.NullPool}),
        engine_options(url, derived, {"pool": user_pool}),
    ) == (
        {"connect_args": {"sslmode": "disable"}},
        {"poolclass": sa.pool.NullPool, "connect_args": {}},
        {"pool": user_pool, "connect_args": {}},
    )


def test_asyncpg_gets_the_connect_and_statement_timeouts_beneath_the_users() -> None:
    """asyncpg: the connect timeout as ``timeout``, the statement timeout as a server
    setting; the user's own ``timeout`` and ``server_settings`` win."""
    from flask_txn._timeouts import Timeouts, connect_options

    url = sa.make_url("postgresql+asyncpg://u@127.0.0.1:1/x")
    timeouts = Timeouts(10.0, 30.0, 2.5, 3.5, None, {})
    mine = {"timeout": 4, "server_settings": {"statement_timeout": "900", "jit": "off"}}
    assert (
        connect_options(url, timeouts, {})["connect_args"],
        connect_options(url, timeouts, {"connect_args": mine})["connect_args"],
    ) == (
        {"timeout": 10.0, "server_settings": {"statement_timeout": "2500"}},
        {"timeout": 4, "server_settings": {"statement_timeout": "900", "jit": "off"}},
    )


def test_a_closed_connection_is_not_watched(postgresql_url: str) -> None:
    """An operation on a connection with no socket runs unwatched and fails as it would."""
    app, ext = plain_app(postgresql_url, TXN_READ_TIMEOUT=5)
    with app.app_context():
        engine = ext.engine
    raw = engine.raw_connection()
    dbapi = raw.dbapi_connection
    raw.invalidate()  # closes the DBAPI connection
    try:
        with pytest.raises(Exception, match="closed"):
            engine.dialect.do_rollback(dbapi)
    finally:
        engine.dispose()


def test_read_timeout_ends_a_statement_with_no_reply(
    driver_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement whose reply does not come within TXN_READ_TIMEOUT fails as a lost connection."""
    from flask_txn import atomic

    app, ext = plain_app(driver_url, TXN_READ_TIMEOUT=0.3)
    started = time.monotonic()
    with (
        caplog.at_level("WARNING", logger="flask_txn"),
        app.app_context(),
        pytest.raises(sa.exc.OperationalError) as raised,
        atomic(),
    ):
        ext.session.execute(sa.text("SELECT pg_sleep(5)"))
    elapsed = time.monotonic() - started
    with app.app_context():
        checked_out = ext.engine.pool.checkedout()
        ext.engine.dispose()
    assert (raised.value.connection_invalidated, elapsed < 3, checked_out) == (True, True, 0)
    assert "No reply from the database for 0.3 s during a statement" in caplog.text


def test_a_statement_the_watchdog_cut_is_not_retried(postgresql_url: str) -> None:
    """A decorated block whose statement outlived TXN_READ_TIMEOUT runs once, not once per retry."""
    from flask_txn import atomic

    app, ext = plain_app(postgresql_url, TXN_READ_TIMEOUT=0.3, TXN_RETRIES=3)
    calls = []

    @atomic(wait_initial=0)
    def slow() -> None:
        calls.append(1)
        ext.session.execute(sa.text("SELECT pg_sleep(5)"))

    with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        slow()
    with app.app_context():
        ext.engine.dispose()
    assert (calls, raised.value.connection_invalidated) == ([1], True)


def test_a_statement_timeout_is_not_retried_even_by_retry_on(driver_url: str) -> None:
    """TXN_STATEMENT_TIMEOUT cancels a slow statement (57014) once, though retry_on names it."""
    from flask_txn import atomic, sqlstate_of

    app, ext = plain_app(driver_url, TXN_STATEMENT_TIMEOUT=0.2, TXN_RETRIES=3)
    calls = []

    @atomic(wait_initial=0, retry_on=sa.exc.OperationalError)
    def slow() -> None:
        calls.append(1)
        ext.session.execute(sa.text("SELECT pg_sleep(5)"))

    with app.app_context(), pytest.raises(sa.exc.OperationalError) as raised:
        slow()
    with app.app_context():
        ext.engine.dispose()
    assert (calls, sqlstate_of(raised.value)) == ([1], "57014")


def test_read_timeout_during_commit_is_an_ambiguous_commit(postgresql_url: str) -> None:
    """COMMIT whose reply is late: AmbiguousCommitError, and indeed the server committed later."""
    from flask_txn import AmbiguousCommitError, atomic

    app, ext = plain_app(postgresql_url, TXN_READ_TIMEOUT=0.3, TXN_RETRIES=3)
    engine = direct_engine(postgresql_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS slow_commit")
        connection.exec_driver_sql("CREATE TABLE slow_commit (id int primary key)")
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION slow_commit_trigger() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"
        )
        connection.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commit"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit_trigger()"
        )
    calls = []

    @atomic
    def insert() -> None:
        calls.append(1)
        ext.session.execute(sa.text("INSERT INTO slow_commit VALUES (1)"))

    try:
        with app.app_context(), pytest.raises(AmbiguousCommitError):
            insert()
        # The server finishes the COMMIT it was sent: poll, bounded, for the row.
        deadline = time.monotonic() + WAIT
        with engine.connect() as connection:
            while not connection.exec_driver_sql("SELECT count(*) FROM slow_commit").scalar():
                assert time.monotonic() < deadline, "the COMMIT never landed"
                connection.exec_driver_sql("SELECT pg_sleep(0.05)")
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS slow_commit")
        engine.dispose()
        with app.app_context():
            ext.engine.dispose()
    assert calls == [1]


# -- error responses ----------------------------------------------------------------------


def default_app(url: str, **config: Any) -> tuple[Flask, Any]:
    """An app with flask-txn and no error handler registered by hand."""
    from flask_txn import atomic

    app, ext = plain_app(url, **config)

    @app.post("/conflict")
    @atomic(retries=1, wait_initial=0)
    def conflict() -> str:
        ext.session.execute(sa.text("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$"))
        return "unreachable"

    return app, ext


def responses_app(url: str, **config: Any) -> tuple[Flask, Any]:
    """``default_app`` with the error responses registered by hand (``Retry-After: 2``)
    and views that fail in the other ways."""
    from flask_txn import atomic, register_error_handlers

    app, ext = default_app(url, **config)
    register_error_handlers(app, retry_after=2)

    @app.post("/slow")
    @atomic(statement_timeout=0.05)
    def slow() -> str:
        ext.session.execute(sa.text("SELECT pg_sleep(2)"))
        return "unreachable"

    @app.post("/read")
    @atomic
    def read() -> str:
        ext.session.execute(sa.text("SELECT 1"))
        return "ok"

    return app, ext


def answer_of(response: Any) -> tuple[int, str | None, dict[str, Any]]:
    return response.status_code, response.headers.get("Retry-After"), response.get_json()


def test_retries_exhausted_is_503(postgresql_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every attempt met a serialization failure: 503, Retry-After, the attempts and SQLSTATE."""
    app, ext = responses_app(postgresql_url)
    with caplog.at_level("WARNING", logger="flask_txn"):
        status, retry_after, body = answer_of(app.test_client().post("/conflict"))
    with app.app_context():
        ext.engine.dispose()
    assert (status, retry_after, body["reason"], body["sqlstate"], body["attempts"]) == (
        503,
        "2",
        "retries-exhausted",
        "40001",
        2,
    )
    assert "refused the transaction 2 time(s)" in body["error"]
    assert "Answered 503 (retries-exhausted) for endpoint 'conflict'" in caplog.text


def test_unreachable_database_is_503() -> None:
    """Nothing listens at the database's address: 503 database-unavailable, no SQLSTATE."""
    app, ext = responses_app(f"postgresql+psycopg2://user:s3cret@127.0.0.1:{free_port()}/db")
    status, retry_after, body = answer_of(app.test_client().post("/read"))
    with app.app_context():
        ext.engine.dispose()
    assert (status, retry_after, body["reason"], "sqlstate" in body) == (
        503,
        "2",
        "database-unavailable",
        False,
    )
    assert "s3cret" not in json.dumps(body)


def test_statement_timeout_is_503(postgresql_url: str) -> None:
    """A statement cancelled by its timeout: 503 timeout with SQLSTATE 57014."""
    app, ext = responses_app(postgresql_url)
    status, retry_after, body = answer_of(app.test_client().post("/slow"))
    with app.app_context():
        ext.engine.dispose()
    assert (status, retry_after, body["reason"], body["sqlstate"]) == (503, "2", "timeout", "57014")


def test_pool_timeout_is_503(tmp_path: Path) -> None:
    """No pooled connection becomes free within TXN_POOL_TIMEOUT: 503 timeout."""
    from flask_txn import atomic, register_error_handlers

    app, ext = plain_app(
        f"sqlite:///{tmp_path / 'db'}",
        TXN_POOL_TIMEOUT=0.1,
        TXN_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
    )
    register_error_handlers(app)

    @app.post("/read")
    @atomic
    def read() -> str:
        ext.session.execute(sa.text("SELECT 1"))
        return "ok"

    with app.app_context(), ext.engine.connect():  # the only connection, held
        status, retry_after, body = answer_of(app.test_client().post("/read"))
    with app.app_context():
        ext.engine.dispose()
    assert (status, retry_after, body["reason"]) == (503, "1", "timeout")


def test_ambiguous_commit_is_502(postgresql_url: str) -> None:
    """The backend dies inside COMMIT: 502 commit-unknown, telling the client to resend the key."""
    from flask_txn import atomic, register_error_handlers

    app, ext = plain_app(postgresql_url)
    register_error_handlers(app)
    engine = direct_engine(postgresql_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS dies_at_commit")
        connection.exec_driver_sql("CREATE TABLE dies_at_commit (id int)")
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$"
        )
        connection.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON dies_at_commit"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION die_at_commit()"
        )
    calls = []

    @app.post("/insert")
    @atomic
    def insert() -> str:
        calls.append(1)
        ext.session.execute(sa.text("INSERT INTO dies_at_commit VALUES (1)"))
        return "ok"

    try:
        status, retry_after, body = answer_of(app.test_client().post("/insert"))
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE dies_at_commit")
        engine.dispose()
        with app.app_context():
            ext.engine.dispose()
    assert (status, retry_after, body["reason"], calls) == (502, "1", "commit-unknown", [1])
    assert "same Idempotency-Key" in body["error"]


def test_retries_exhausted_is_503_by_default(postgresql_url: str) -> None:
    """With no handler registered by hand, a block out of retries answers 503 JSON, not 500."""
    app, ext = default_app(postgresql_url)
    response = app.test_client().post("/conflict", headers={"Accept": "*/*"})
    with app.app_context():
        ext.engine.dispose()
    assert answer_of(response)[:2] == (503, "1")
    assert (response.get_json()["reason"], response.vary.as_set()) == (
        "retries-exhausted",
        {"accept"},
    )


def test_unreachable_database_is_503_by_default() -> None:
    """Nothing listens at the database's address: 503 database-unavailable by default."""
    app, ext = default_app(f"postgresql+psycopg2://user:s3cret@127.0.0.1:{free_port()}/db")
    status, retry_after, body = answer_of(app.test_client().post("/conflict"))
    with app.app_context():
        ext.engine.dispose()
    assert (status, retry_after, body["reason"]) == (503, "1", "database-unavailable")


def test_a_client_that_prefers_html_gets_a_page(postgresql_url: str) -> None:
    """A browser's Accept header gets a short HTML page with the same sentence."""
    app, ext = default_app(postgresql_url)
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    response = app.test_client().post("/conflict", headers={"Accept": accept})
    with app.app_context():
        ext.engine.dispose()
    page = response.get_data(as_text=True)
    assert (response.status_code, response.mimetype, response.headers["Retry-After"]) == (
        503,
        "text/html",
        "1",
    )
    assert "<h1>Service Unavailable</h1>" in page
    assert "refused the transaction 2 time(s)" in page


def test_error_handlers_off_leaves_the_failure_to_flask(postgresql_url: str) -> None:
    """TXN_ERROR_HANDLERS=False: a block out of retries is Flask's 500, as before 0.2.0."""
    app, ext = default_app(postgresql_url, TXN_ERROR_HANDLERS=False)
    status = app.test_client().post("/conflict").status_code
    with app.app_context():
        ext.engine.dispose()
    assert status == 500


@pytest.mark.parametrize(
    ("registered", "error"),
    [
        ("before init_app", sa.exc.OperationalError),
        ("after init_app", sa.exc.OperationalError),
        ("after init_app", sa.exc.SQLAlchemyError),
        ("before init_app", Exception),
    ],
)
def test_the_apps_own_handler_comes_first(
    postgresql_url: str, registered: str, error: type[Exception]
) -> None:
    """A handler of the app's own, for the same class or a broader one, registered before
    or after init_app, answers instead of flask-txn's."""
    from flask_txn import FlaskTxn, atomic

    app, ext = Flask("own"), FlaskTxn()
    app.config["TXN_DATABASE_URI"] = postgresql_url
    if registered == "before init_app":
        app.register_error_handler(error, lambda exc: ("mine", 418))
    ext.init_app(app)
    if registered == "after init_app":
        app.register_error_handler(error, lambda exc: ("mine", 418))

    @app.post("/conflict")
    @atomic(retries=0)
    def conflict() -> str:
        ext.session.execute(sa.text("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$"))
        return "unreachable"

    response = app.test_client().post("/conflict")
    with app.app_context():
        ext.engine.dispose()
    assert (response.status_code, response.get_data(as_text=True)) == (418, "mine")


def test_other_operational_errors_are_left_to_flask_by_default(tmp_path: Path) -> None:
    """By default too, an OperationalError of no known kind (a full disk) is Flask's 500."""
    app, ext = plain_app(f"sqlite:///{tmp_path / 'db'}")

    @app.get("/")
    def full() -> str:
        raise sa.exc.OperationalError("INSERT", {}, _DriverError("53100"))

    assert app.test_client().get("/").status_code == 500
    with app.app_context():
        ext.engine.dispose()


class _DriverError(Exception):
    """A driver exception with a SQLSTATE, as psycopg2 reports it."""

    def __init__(self, pgcode: str | None) -> None:
        super().__init__(f"SQLSTATE {pgcode}")
        self.pgcode = pgcode


@pytest.mark.parametrize(
    ("pgcode", "reason"),
    [
        ("40001", "retries-exhausted"),
        ("40P01", "retries-exhausted"),
        ("57P01", "database-unavailable"),
        ("57P03", "database-unavailable"),
        ("08006", "database-unavailable"),
        ("53300", "database-unavailable"),
        (None, "database-unavailable"),
        ("57014", "timeout"),
        ("55P03", "timeout"),
        ("53100", None),
    ],
)
def test_operational_errors_are_classified_by_sqlstate(
    pgcode: str | None, reason: str | None
) -> None:
    """Which reason each SQLSTATE of an OperationalError is answered with (None: not handled)."""
    from flask_txn._errorhandlers import classify

    error = sa.exc.OperationalError("SELECT 1", {}, _DriverError(pgcode))
    assert (classify(error), classify(ValueError(pgcode))) == (reason, None)


def test_other_operational_errors_are_left_to_flask() -> None:
    """An OperationalError of no known kind (a full disk) gets Flask's own 500."""
    from flask_txn import register_error_handlers

    app = Flask("disk")
    register_error_handlers(app)

    @app.get("/")
    def full() -> str:
        raise sa.exc.OperationalError("INSERT", {}, _DriverError("53100"))

    assert app.test_client().get("/").status_code == 500


def test_a_blueprint_gets_the_responses_for_its_views_only() -> None:
    """Registered on a blueprint, the handlers answer its views and no others."""
    from flask import Blueprint

    from flask_txn import register_error_handlers

    app, bp = Flask("bp"), Blueprint("api", "api")
    register_error_handlers(bp)

    @bp.get("/in")
    def inside() -> str:
        raise sa.exc.OperationalError("SELECT 1", {}, _DriverError("57P03"))

    @app.get("/out")
    def outside() -> str:
        raise sa.exc.OperationalError("SELECT 1", {}, _DriverError("57P03"))

    app.register_blueprint(bp)
    client = app.test_client()
    assert (client.get("/in").status_code, client.get("/out").status_code) == (503, 500)
