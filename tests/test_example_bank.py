"""The bank example (examples/bank) works as its docs page says, on SQLite and PostgreSQL.

Races are arranged with barriers: before the requests start, or inside their
transactions through an engine event on PostgreSQL. The page is tested in a real
headless Chromium against a threaded server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from examples.bank import load
from examples.bank.app import create_app
from examples.bank.models import Transfer, txn
from flask_txn import testing
from flask_txn._nplusone import Guard

# The plugin is off in this suite (pyproject.toml): borrow the one fixture used here.
txn_faults = testing.txn_faults

ROOT = Path(__file__).resolve().parent.parent
#: A bound on every wait, so a broken test fails instead of hanging.
TIMEOUT = 30
OPENING = 1_000


@pytest.fixture
def make_bank(database_url: str) -> Iterator[Callable[..., Flask]]:
    """Build the bank on fresh tables (three accounts of OPENING cents each); check for leaks."""
    made: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = create_app(
            database_url,
            TESTING=True,
            BANK_RESET=True,
            BANK_ACCOUNTS=3,
            BANK_OPENING_BALANCE=OPENING,
            **config,
        )
        made.append(app)
        return app

    yield make
    for app in made:
        with app.app_context():
            engine = txn.engine
        assert engine.pool.checkedout() == 0, "a request leaked a connection"
        engine.dispose()


@pytest.fixture
def bank(make_bank: Callable[..., Flask]) -> Flask:
    """The bank with its own config."""
    return make_bank()


@pytest.fixture
def pg_bank(postgresql_url: str) -> Iterator[Flask]:
    """The bank on PostgreSQL, for races that only PostgreSQL's locks make exact."""
    app = create_app(
        postgresql_url,
        TESTING=True,
        BANK_RESET=True,
        BANK_ACCOUNTS=3,
        BANK_OPENING_BALANCE=OPENING,
    )
    yield app
    with app.app_context():
        txn.engine.dispose()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.fixture
def served(bank: Flask) -> Iterator[str]:
    """The bank behind a real threaded WSGI server on 127.0.0.1; its base URL."""
    server = make_server("127.0.0.1", 0, bank, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def transfer(
    app: Flask, key: str, source: int = 1, target: int = 2, amount: int = 100, path: str = ""
) -> Any:
    """POST one transfer through a new test client."""
    body = {"from": source, "to": target, "amount": amount}
    return app.test_client().post(path or "/transfers", json=body, headers={"Idempotency-Key": key})


def stats(app: Flask) -> Any:
    return app.test_client().get("/stats").json


def balances(app: Flask) -> list[int]:
    return [account["balance"] for account in stats(app)["accounts"]]


def ledger_rows(app: Flask) -> int:
    with app.app_context(), txn.engine.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).select_from(Transfer)) or 0)


def endpoint_counters(app: Flask, endpoint: str = "bank.transfer") -> Any:
    return stats(app)["transactions"]["endpoints"][endpoint]


def concurrently(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own thread, all released together by a barrier."""
    barrier = threading.Barrier(len(calls), timeout=TIMEOUT)

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


@contextlib.contextmanager
def overlap_at(app: Flask, matches: Callable[[str], bool], parties: int = 2) -> Iterator[None]:
    """Hold each thread's first statement that ``matches`` until ``parties`` threads reach one.

    The transactions have then all read what they read before it, so they overlap.
    """
    barrier = threading.Barrier(parties, timeout=TIMEOUT)
    waited: set[int] = set()
    lock = threading.Lock()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not matches(statement):
            return
        with lock:
            first = threading.get_ident() not in waited
            waited.add(threading.get_ident())
        if first:
            barrier.wait()

    with app.app_context():
        engine = txn.engine
    sa.event.listen(engine, "before_cursor_execute", hold)
    try:
        yield
    finally:
        sa.event.remove(engine, "before_cursor_execute", hold)


# -- transfers ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/transfers", "/transfers/locked"])
def test_transfer_moves_money_between_accounts(bank: Flask, path: str) -> None:
    """A transfer debits one account, credits the other and adds one ledger row."""
    response = transfer(bank, "k1", source=1, target=2, amount=250, path=path)
    assert response.status_code == 201
    assert response.json == {"id": 1, "key": "k1", "from": 1, "to": 2, "amount": 250}
    assert balances(bank) == [OPENING - 250, OPENING + 250, OPENING]
    assert ledger_rows(bank) == 1


def test_every_account_reconciles_with_the_ledger(bank: Flask) -> None:
    """After transfers both ways, each balance is opening + credits - debits; the total holds."""
    for key, (source, target, amount) in enumerate([(1, 2, 300), (2, 3, 50), (3, 1, 20)]):
        assert transfer(bank, f"k{key}", source, target, amount).status_code == 201
    numbers = stats(bank)
    assert all(account["reconciled"] for account in numbers["accounts"])
    assert numbers["total"] == numbers["opening_total"] == 3 * OPENING


def test_insufficient_funds_is_refused_and_rolled_back(bank: Flask) -> None:
    """409 for more than the balance: nothing moves, and the veto is counted."""
    response = transfer(bank, "k1", amount=OPENING + 1)
    assert response.status_code == 409
    assert balances(bank) == [OPENING] * 3
    assert endpoint_counters(bank)["rolled_back"] == {"veto": 1}


def test_unknown_account_is_not_found(bank: Flask) -> None:
    """404 naming the field and the account that does not exist."""
    response = transfer(bank, "k1", source=1, target=99)
    assert (response.status_code, response.json["error"]) == (
        404,
        "'to' is 99, which is no account here.",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"from": 1, "to": 2, "amount": 0}, "'amount' must be a whole number from 1 to 1000000"),
        ({"from": 1, "to": 2, "amount": 1.5}, "got 1.5"),
        ({"from": 1, "to": 2, "amount": True}, "got True"),
        ({"from": "1", "to": 2, "amount": 5}, "'from' must be a whole number >= 1 (an account"),
        ({"from": 2, "to": 2, "amount": 5}, "'from' and 'to' must be different accounts, got 2"),
        ([1, 2, 5], "The body must be a JSON object"),
    ],
)
def test_invalid_transfer_names_the_field_and_value(bank: Flask, body: Any, message: str) -> None:
    """400 with a message naming the field, the bad value and what is allowed."""
    response = bank.test_client().post("/transfers", json=body, headers={"Idempotency-Key": "k"})
    assert response.status_code == 400
    assert message in response.json["error"]


def test_missing_idempotency_key_is_refused(bank: Flask) -> None:
    """400 naming the header when a transfer comes without a key."""
    response = bank.test_client().post("/transfers", json={"from": 1, "to": 2, "amount": 5})
    assert response.status_code == 400
    assert "needs an 'Idempotency-Key' header of 1 to 255 printable" in response.json["error"]


# -- idempotency ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/transfers", "/transfers/locked"])
def test_repeated_key_returns_the_original_result(bank: Flask, path: str) -> None:
    """The same request sent again answers the same transfer and moves no more money."""
    first = transfer(bank, "once", path=path)
    again = transfer(bank, "once", path=path)
    assert (again.status_code, again.json) == (first.status_code, first.json)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert balances(bank) == [OPENING - 100, OPENING + 100, OPENING]
    assert ledger_rows(bank) == 1


def test_key_reused_for_another_transfer_is_refused(bank: Flask) -> None:
    """422 naming the key; nothing more moves."""
    transfer(bank, "k1", amount=100)
    response = transfer(bank, "k1", amount=200)
    assert response.status_code == 422
    assert "'Idempotency-Key' 'k1' was already used for another request" in response.json["error"]
    assert ledger_rows(bank) == 1


@pytest.mark.parametrize("path", ["/transfers", "/transfers/locked"])
def test_racing_copies_of_a_key_apply_once(bank: Flask, path: str) -> None:
    """Two copies of a request released together make one transfer: each copy gets it,
    at once or (a copy that came while the first ran, on PostgreSQL) when resent after
    its 409; the page counts one commit and the replays."""
    answers = concurrently(
        lambda: transfer(bank, "race", path=path), lambda: transfer(bank, "race", path=path)
    )
    for number, answer in enumerate(answers):
        if answer.status_code == 409:
            assert answer.json["reason"] == "idempotency-key-in-flight"
            answers[number] = transfer(bank, "race", path=path)
    first, second = answers
    assert (first.status_code, second.status_code, first.json) == (201, 201, second.json)
    assert ledger_rows(bank) == 1
    assert balances(bank) == [OPENING - 100, OPENING + 100, OPENING]
    endpoint = {"/transfers": "bank.transfer", "/transfers/locked": "bank.transfer_locked"}[path]
    counters = endpoint_counters(bank, endpoint)
    assert (counters["committed"], counters["replayed"]) == (1, 1)


# -- concurrency, retries and the counters ---------------------------------------------


def test_conflicting_serializable_transfers_are_retried_and_counted(pg_bank: Flask) -> None:
    """Two overlapping transfers from one account: one is re-run after 40001; both count."""
    with overlap_at(pg_bank, lambda sql: sql.startswith("UPDATE bank_account")):
        responses = concurrently(
            lambda: transfer(pg_bank, "a", 1, 2, 100), lambda: transfer(pg_bank, "b", 1, 3, 100)
        )
    assert [response.status_code for response in responses] == [201, 201]
    assert endpoint_counters(pg_bank) == {
        "committed": 2,
        "replayed": 0,
        "retried": {"40001": 1},
        "rolled_back": {},
    }
    assert balances(pg_bank) == [OPENING - 200, OPENING + 100, OPENING + 100]


def test_locked_transfers_in_opposite_directions_wait_instead_of_retrying(pg_bank: Flask) -> None:
    """1->2 and 2->1 reach their row locks together; one waits, neither deadlocks or retries."""
    with overlap_at(pg_bank, lambda sql: "FOR NO KEY UPDATE" in sql):
        responses = concurrently(
            lambda: transfer(pg_bank, "a", 1, 2, 100, path="/transfers/locked"),
            lambda: transfer(pg_bank, "b", 2, 1, 30, path="/transfers/locked"),
        )
    assert [response.status_code for response in responses] == [201, 201]
    counters = endpoint_counters(pg_bank, "bank.transfer_locked")
    assert counters == {"committed": 2, "replayed": 0, "retried": {}, "rolled_back": {}}
    assert balances(pg_bank) == [OPENING - 70, OPENING + 70, OPENING]


def test_conflict_reported_by_the_database_is_retried_and_counted(
    bank: Flask, txn_faults: Any
) -> None:
    """A real retriable error raised by the database shows in the counters by its SQLSTATE."""
    txn_faults.fail_next(1, endpoint="bank.transfer")
    assert transfer(bank, "k1").status_code == 201
    code = "40001" if stats(bank)["database"] == "postgresql" else "SQLITE_LOCKED"
    assert endpoint_counters(bank) == {
        "committed": 1,
        "replayed": 0,
        "retried": {code: 1},
        "rolled_back": {},
    }


def test_exhausted_retries_answer_503_and_are_counted(
    make_bank: Callable[..., Flask], txn_faults: Any
) -> None:
    """Eleven failed attempts: 503 with Retry-After, one final rollback, no money moved."""
    bank = make_bank(TXN_RETRY_SLEEP=lambda _: None)
    txn_faults.fail_next(11, endpoint="bank.transfer")
    response = transfer(bank, "k1")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    counters = endpoint_counters(bank)
    (code,) = counters["rolled_back"]
    assert (counters["committed"], sum(counters["retried"].values())) == (0, 10)
    assert counters["rolled_back"] == {code: 1}
    assert balances(bank) == [OPENING] * 3


def test_notification_is_sent_once_per_committed_transfer(bank: Flask) -> None:
    """on_commit fills the outbox for a new transfer, not for a replay or a refusal."""
    transfer(bank, "k1")
    transfer(bank, "k1")
    transfer(bank, "k2", amount=OPENING * 5)
    assert stats(bank)["transactions"]["outbox"] == ["Transfer 1: 1.00 from 1 to 2."]


def test_a_replay_is_counted_apart_from_commits(bank: Flask) -> None:
    """A key sent again is answered from the ledger: counted as a replay, not a commit."""
    first, again = transfer(bank, "k1"), transfer(bank, "k1")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (first.json, ledger_rows(bank)) == (again.json, 1)
    counters = stats(bank)["transactions"]
    assert (counters["committed"], counters["replayed"]) == (1, 1)
    assert endpoint_counters(bank) == {
        "committed": 1,
        "replayed": 1,
        "retried": {},
        "rolled_back": {},
    }


def test_notification_is_not_sent_for_an_attempt_that_is_re_run(
    bank: Flask, txn_faults: Any
) -> None:
    """Two attempts of a transfer fail after the view ran (and registered its
    notification): the outbox holds one notification, for the committed transfer."""
    txn_faults.fail_next(2, endpoint="bank.transfer")
    response = transfer(bank, "k1")
    assert (response.status_code, txn_faults.injected) == (201, 2)
    done = response.json
    assert stats(bank)["transactions"]["outbox"] == [f"Transfer {done['id']}: 1.00 from 1 to 2."]


def test_ledger_lists_the_latest_transfers_with_both_balances(bank: Flask) -> None:
    """GET /transfers: newest first, each with its accounts' balances now."""
    transfer(bank, "k1", 1, 2, 100)
    transfer(bank, "k2", 2, 3, 30)
    assert bank.test_client().get("/transfers?limit=5").json == [
        {
            "id": 2,
            "key": "k2",
            "from": 2,
            "to": 3,
            "amount": 30,
            "balances": {"from": OPENING + 70, "to": OPENING + 30},
        },
        {
            "id": 1,
            "key": "k1",
            "from": 1,
            "to": 2,
            "amount": 100,
            "balances": {"from": OPENING - 100, "to": OPENING + 70},
        },
    ]


def test_no_request_of_the_bank_is_an_n_plus_one(bank: Flask) -> None:
    """Every endpoint, with transfers in the ledger, under the N+1 guard at its
    strictest: no relationship is lazy-loaded for the objects of one query."""
    found: list[Any] = []
    state = bank.extensions["flask-txn"]._states[bank]
    guard = Guard(state.settings.nplusone_threshold, found.append)
    sa.event.listen(state.sessionmaker, "do_orm_execute", guard)
    try:
        for key, (source, target) in enumerate([(1, 2), (2, 3), (3, 1)]):
            assert transfer(bank, f"k{key}", source, target).status_code == 201
        assert transfer(bank, "k9", path="/transfers/locked").status_code == 201
        client = bank.test_client()
        for path in ("/transfers", "/stats", "/"):
            assert client.get(path).status_code == 200
    finally:
        sa.event.remove(state.sessionmaker, "do_orm_execute", guard)
    assert [n.message() for n in found] == []
    # The guard sees the loop the ledger avoids: the same query without the eager loads.
    with bank.app_context():
        lazily = txn.session.scalars(sa.select(Transfer)).all()
        sa.event.listen(state.sessionmaker, "do_orm_execute", guard)
        try:
            [t.source.balance for t in lazily]
        finally:
            sa.event.remove(state.sessionmaker, "do_orm_execute", guard)
            txn.session.remove()
    assert [n.name for n in found] == ["Transfer.source"]


# -- the app factory ------------------------------------------------------------------


def test_create_app_takes_config_as_keywords(sqlite_url: str) -> None:
    """BANK_* and TXN_* keys passed to create_app shape the app."""
    app = create_app(sqlite_url, BANK_ACCOUNTS=2, BANK_OPENING_BALANCE=7, TXN_RETRIES=1)
    assert balances(app) == [7, 7]
    assert app.config["TXN_RETRIES"] == 1


def test_create_app_reads_database_url_from_the_environment(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an argument, DATABASE_URL names the database."""
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    assert create_app().config["TXN_DATABASE_URI"] == sqlite_url


def test_create_app_refuses_a_bad_account_count(sqlite_url: str) -> None:
    """BANK_ACCOUNTS must be a whole number; the error names the key and the value."""
    with pytest.raises(ValueError, match=r"'BANK_ACCOUNTS' must be a whole number >= 0, got '3'"):
        create_app(sqlite_url, BANK_ACCOUNTS="3")


def test_readme_demo_command_finds_the_app(tmp_path: Path) -> None:
    """`flask --app examples/bank/app.py` (the README's demo) finds create_app and its routes."""
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}"}
    flask = Path(sys.executable).with_name("flask")
    result = subprocess.run(
        [str(flask), "--app", "examples/bank/app.py", "routes"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert {"/transfers", "/transfers/locked", "/stats"} <= set(
        re.findall(r"\s(/\S*)", result.stdout)
    )


# -- the load script ------------------------------------------------------------------


def assert_load_reconciles(
    database: str, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run the load script in process against the bank on ``database`` (a URL with its
    password), 200 transfers from 8 clients to ``endpoint``: every check passes."""
    argv = ["--database", database, "--requests", "200", "--threads", "8"]
    status = load.main([*argv, "--endpoint", endpoint, "--seed", "3"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "FAILED" not in output


def test_load_script_checks_pass_over_http(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Concurrent transfers over HTTP, duplicates included: every check of the script passes."""
    status = load.main([served, "--requests", "60", "--threads", "4", "--seed", "1"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "FAILED" not in output


def test_load_script_checks_pass_on_the_locked_endpoint(
    served: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same checks pass when the transfers take ordered row locks."""
    argv = [served, "--requests", "60", "--threads", "4", "--endpoint", "/transfers/locked"]
    status = load.main(argv)
    assert status == 0, capsys.readouterr().out


def test_load_script_runs_in_process_from_the_command_line(tmp_path: Path) -> None:
    """`python examples/bank/load.py` with no URL builds the app itself; it exits 0."""
    result = subprocess.run(
        [
            sys.executable,
            "examples/bank/load.py",
            *("--requests", "40", "--duplicates", "0.5", "--seed", "2"),
            *("--database", f"sqlite:///{tmp_path / 'load.db'}"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "committed 40," in result.stdout


def _checks_after(corrupt: Callable[[dict[str, Any], list[Any], list[int]], None]) -> list[bool]:
    """The script's checks on a clean run of two transfers, after ``corrupt`` changed it."""
    request = load.Request("k", 1, 2, 5)
    accounts = [
        {"id": 1, "opening": 10, "balance": 5, "credits": 0, "debits": 5},
        {"id": 2, "opening": 10, "balance": 15, "credits": 5, "debits": 0},
    ]
    stats_of = {"accounts": accounts, "opening_total": 20, "total": 20}
    before = {**stats_of, "transfers": 0}
    after = {**stats_of, "transfers": 1}
    outcomes = [load.Outcome(request, 201, {"id": 1}, replayed=False)]
    totals = [20, 20]
    corrupt(after, outcomes, totals)
    return [ok for ok, _ in load.run_checks(before, after, outcomes, [], totals, max_failed=0)]


def test_load_script_checks_pass_on_a_clean_run() -> None:
    """The baseline of the next test: nothing corrupted, every check passes."""
    assert _checks_after(lambda after, outcomes, totals: None) == [True] * 4


@pytest.mark.parametrize(
    ("corrupt", "failing"),
    [
        (lambda after, outcomes, totals: after["accounts"][0].update(balance=6), 0),
        (lambda after, outcomes, totals: totals.append(25), 1),
        (lambda after, outcomes, totals: after.update(transfers=2), 2),
        (
            lambda after, outcomes, totals: outcomes.append(
                load.Outcome(outcomes[0].request, 201, {"id": 2}, replayed=False)
            ),
            2,
        ),
        (
            lambda after, outcomes, totals: outcomes.append(
                load.Outcome(outcomes[0].request, 503, {}, replayed=False)
            ),
            3,
        ),
    ],
    ids=["balance-off", "total-moved", "ledger-grew-twice", "key-applied-twice", "failed"],
)
def test_load_script_checks_catch_what_they_are_for(corrupt: Any, failing: int) -> None:
    """Each kind of damage fails exactly its own check, so the exit status turns 1."""
    results = _checks_after(corrupt)
    assert [index for index, ok in enumerate(results) if not ok] == [failing]


def test_load_script_refuses_an_address_off_this_machine() -> None:
    """Only loopback URLs: the error names the argument, the host and what is allowed."""
    with pytest.raises(ValueError, match=r"'url' must point at this machine.*got '192\.0\.2\.1'"):
        load.check_loopback("http://192.0.2.1:5000")


# -- the page -------------------------------------------------------------------------


def test_page_is_self_contained(bank: Flask) -> None:
    """The page loads nothing from elsewhere, and its policy forbids it."""
    response = bank.test_client().get("/")
    assert response.mimetype == "text/html"
    assert re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", response.text) == ["data:,"]
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none';")


# The page is the same on every database: one run is enough.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_page_counters_update_in_a_real_browser(browser: Any, served: str) -> None:
    """The page polls /stats: its counters follow a transfer made on it and one made over HTTP."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    wait = WebDriverWait(browser, TIMEOUT)
    browser.get(served + "/")
    wait.until(lambda _: text("committed") == "0")
    browser.find_element(By.ID, "send").click()  # the form: 1.00 (100 cents) from 1 to 2
    wait.until(lambda _: text("result") == "201 transfer 1")
    wait.until(lambda _: text("committed") == "1")
    request = urllib.request.Request(
        served + "/transfers",
        data=json.dumps({"from": 2, "to": 3, "amount": 40}).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": "from-outside"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(2):  # the second time, the same key: a replay
        with opener.open(request, timeout=TIMEOUT) as response:
            assert response.status == 201
    wait.until(lambda _: (text("committed"), text("replayed")) == ("2", "1"))
    wait.until(lambda _: "Transfer 2: 0.40 from 2 to 3." in text("outbox"))
    # Money as people read it: OPENING is 1,000 cents, 10.00.
    assert text("total") == "30.00"
    assert "2 10.60 10.60 reconciled" in text("accounts")
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
