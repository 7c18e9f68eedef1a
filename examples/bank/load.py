"""Fire concurrent transfers at the bank, then check that no money appeared or vanished.

Against a running server (loopback addresses only)::

    python examples/bank/load.py http://127.0.0.1:5000

or, with no URL, against an app built in this process on a fresh SQLite file (or
``--database URL``). Some requests are sent twice at once with the same
``Idempotency-Key``, as a client that resends after a timeout would; a copy
answered 409 because the first is still running is sent again after its
``Retry-After``, as the docs tell clients to.

It prints how many transfers committed, were replayed, refused or failed, and how
many times flask-txn re-ran a transaction, by SQLSTATE; then it checks that

- every account's balance equals its opening balance plus credits minus debits
  in the ledger,
- the total of all balances never changed, before, during or after the run,
- every key was applied at most once: its copies got the same transfer, and the
  ledger grew by exactly one row per key that succeeded,
- no more requests failed than ``--max-failed``.

The exit status is 0 if every check passed, 1 if one failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import ipaddress
import json
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Bounds that keep a run short whatever the arguments.
MAX_REQUESTS = 10_000
MAX_THREADS = 64
HTTP_TIMEOUT = 30.0

#: (method, path, JSON body or None, headers) -> (status, JSON body, headers)
#: How often a copy answered "409, the first copy is still running" is sent again.
IN_FLIGHT_TRIES = 10

Send = Callable[[str, str, Any, dict[str, str]], tuple[int, Any, dict[str, str]]]


@dataclasses.dataclass(frozen=True)
class Request:
    key: str
    source: int
    target: int
    amount: int


@dataclasses.dataclass
class Outcome:
    request: Request
    status: int
    body: Any
    replayed: bool


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load and the checks; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.duplicates <= 1:
        parser.error(f"argument --duplicates: must be from 0 to 1, got {args.duplicates!r}")
    if not 0 < args.timeout <= 3600:
        parser.error(f"argument --timeout: must be seconds from 0 to 3600, got {args.timeout!r}")
    if args.url:
        try:
            send = http_sender(args.url)
        except ValueError as exc:
            parser.error(str(exc))
        return run(send, args)
    with tempfile.TemporaryDirectory(prefix="bank-load-") as folder:
        url = args.database or f"sqlite:///{Path(folder) / 'bank.db'}"
        send = app_sender(url)
        return run(send, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="the bank's address, e.g. http://127.0.0.1:5000")
    parser.add_argument(
        "--database", help="with no URL: the database of the in-process app (default: a temp file)"
    )
    parser.add_argument(
        "--requests", type=_bounded(1, MAX_REQUESTS), default=200, help="transfers to send"
    )
    parser.add_argument(
        "--threads", type=_bounded(1, MAX_THREADS), default=8, help="concurrent clients"
    )
    parser.add_argument(
        "--endpoint",
        choices=["/transfers", "/transfers/locked"],
        default="/transfers",
        help="SERIALIZABLE with retries, or ordered row locks",
    )
    parser.add_argument(
        "--accounts", type=_bounded(2, 1_000_000), help="use only accounts 1..N (hot spots)"
    )
    parser.add_argument(
        "--duplicates",
        type=float,
        default=0.1,
        help="share of requests also sent a second time at once (0 to 1)",
    )
    parser.add_argument(
        "--max-amount", type=_bounded(1, 1_000_000), default=1_000, help="largest amount, cents"
    )
    parser.add_argument(
        "--max-failed", type=_bounded(0, MAX_REQUESTS), default=0, help="failures to tolerate"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="stop sending after this many seconds"
    )
    parser.add_argument("--seed", type=int, help="random seed, to repeat a run")
    return parser


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {low} to {high}, got {text!r}"
            )
        return value

    return parse


# -- clients --------------------------------------------------------------------------


def check_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash if it is http(s) on this machine; else raise."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(
            f"'url' must be an http:// or https:// address such as http://127.0.0.1:5000,"
            f" got {url!r}."
        )
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 80)}
    except socket.gaierror:
        addresses = set()
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise ValueError(
            f"'url' must point at this machine: its host must be a loopback address"
            f" (127.0.0.0/8, ::1) or a name for one such as 'localhost', got {host!r}"
            f" in {url!r}."
        )
    return url.rstrip("/")


def http_sender(url: str) -> Send:
    """Send requests over HTTP to a server on this machine."""
    base = check_loopback(url)
    # Never through a proxy: the address was checked, the proxy's would not be.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def send(method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **headers},
        )
        try:
            with opener.open(request, timeout=HTTP_TIMEOUT) as response:
                return response.status, json.load(response), dict(response.headers)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, _json_or_text(error.read()), dict(error.headers)

    return send


def app_sender(database_url: str) -> Send:
    """Send requests to an app built in this process, one test client per thread."""
    from examples.bank.app import create_app

    app = create_app(database_url)
    clients = threading.local()

    def send(method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        if not hasattr(clients, "client"):
            clients.client = app.test_client()
        response = clients.client.open(path, method=method, json=body, headers=headers)
        return response.status_code, _json_or_text(response.data), dict(response.headers)

    return send


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


# -- the run --------------------------------------------------------------------------


def run(send: Send, args: argparse.Namespace) -> int:
    """Send the transfers from ``args.threads`` threads, print the counts, run the checks."""
    try:
        before = _stats(send)
    except (OSError, RuntimeError) as exc:
        print(f"Cannot read the bank's /stats: {exc}. Is the server running?", file=sys.stderr)
        return 1
    ids = [account["id"] for account in before["accounts"]][: args.accounts]
    if len(ids) < 2:
        print(f"The bank has {len(ids)} account(s); transfers need 2 or more.", file=sys.stderr)
        return 2
    plan = make_plan(ids, args.requests, args.duplicates, args.max_amount, random.Random(args.seed))
    totals = [before["total"]]
    done = threading.Event()

    def watch_total() -> None:
        # A reader during the run: a total that moves means money was seen mid-transfer.
        while not done.wait(0.05):
            try:
                totals.append(_stats(send)["total"])
            except (OSError, RuntimeError):
                continue  # the requests' own failures are counted and reported

    watcher = threading.Thread(target=watch_total, name="total-watcher", daemon=True)
    watcher.start()
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        outcomes, failures, skipped = _send_all(send, args.endpoint, plan, args.threads, deadline)
    finally:
        done.set()
        watcher.join()
    elapsed = time.monotonic() - started
    after = _stats(send)
    totals.append(after["total"])

    report = summarize(before, after, outcomes, failures)
    print(
        f"{len(plan) - skipped} requests to {args.endpoint} from {args.threads} threads"
        f" in {elapsed:.1f} s ({after['database']}, {len(ids)} accounts)"
        + (f"; {skipped} not sent: --timeout reached" if skipped else "")
    )
    for line in report["lines"]:
        print("  " + line)
    checks = run_checks(before, after, outcomes, failures, totals, args.max_failed)
    for ok, text in checks:
        print(("ok      " if ok else "FAILED  ") + text)
    return 0 if all(ok for ok, _ in checks) else 1


def make_plan(
    ids: list[int], count: int, duplicates: float, max_amount: int, rng: random.Random
) -> list[Request]:
    """``count`` random transfers; a share of them appear twice in a row, to race each other."""
    plan: list[Request] = []
    for _ in range(count):
        key = str(uuid.UUID(int=rng.getrandbits(128)))
        source, target = rng.sample(ids, 2)
        request = Request(key, source, target, rng.randint(1, max_amount))
        plan.append(request)
        if rng.random() < duplicates:
            plan.append(request)
    return plan


def _send_all(
    send: Send, endpoint: str, plan: list[Request], threads: int, deadline: float
) -> tuple[list[Outcome], list[tuple[Request, str]], int]:
    outcomes: list[Outcome] = []
    failures: list[tuple[Request, str]] = []
    skipped = 0
    lock = threading.Lock()

    def one(request: Request) -> None:
        nonlocal skipped
        if time.monotonic() > deadline:
            with lock:
                skipped += 1
            return
        body = {"from": request.source, "to": request.target, "amount": request.amount}
        try:
            for _ in range(IN_FLIGHT_TRIES):
                status, answer, headers = send(
                    "POST", endpoint, body, {"Idempotency-Key": request.key}
                )
                if not _in_flight(status, answer):
                    break
                # A copy of this key is still being handled: ask again for its answer.
                time.sleep(float(headers.get("Retry-After", 1)))
        except Exception as exc:  # a dead server, a timeout: count it, go on
            with lock:
                failures.append((request, f"{type(exc).__name__}: {exc}"))
            return
        replayed = headers.get("Idempotent-Replayed") == "true"
        with lock:
            outcomes.append(Outcome(request, status, answer, replayed))

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="client") as pool:
        list(pool.map(one, plan))
    return outcomes, failures, skipped


def _in_flight(status: int, answer: Any) -> bool:
    return (
        status == 409
        and isinstance(answer, dict)
        and answer.get("reason") == "idempotency-key-in-flight"
    )


def _stats(send: Send) -> dict[str, Any]:
    status, body, _ = send("GET", "/stats", None, {})
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"GET /stats answered {status}: {body!r}")
    return body


# -- the report and the checks ----------------------------------------------------------


def summarize(
    before: dict[str, Any],
    after: dict[str, Any],
    outcomes: list[Outcome],
    failures: list[tuple[Request, str]],
) -> dict[str, Any]:
    """Counts of the run's outcomes, and the retries the server counted meanwhile."""
    committed = sum(1 for o in outcomes if o.status == 201 and not o.replayed)
    replayed = sum(1 for o in outcomes if o.status == 201 and o.replayed)
    refused = collections.Counter(o.status for o in outcomes if 400 <= o.status < 500)
    failed = sum(1 for o in outcomes if o.status >= 500 or o.status < 200) + len(failures)
    retried = _by_code(after, "retried")
    retried.subtract(_by_code(before, "retried"))
    retries = {code: n for code, n in sorted(retried.items()) if n}
    by_status = ", ".join(f"{status}: {n}" for status, n in sorted(refused.items()))
    by_code = ", ".join(f"SQLSTATE {code}: {n}" for code, n in retries.items())
    lines = [
        f"committed {committed}, replayed {replayed} (a copy of a key got the first's result)",
        f"refused {refused.total()}" + (f" ({by_status})" if by_status else ""),
        f"failed {failed}",
        f"retried {sum(retries.values())}" + (f" ({by_code})" if by_code else ""),
    ]
    for outcome in [o for o in outcomes if o.status >= 500][:5]:
        lines.append(f"  {outcome.status}: {outcome.body}")
    for _, text in failures[:5]:
        lines.append(f"  {text}")
    return {"committed": committed, "replayed": replayed, "failed": failed, "lines": lines}


def _by_code(stats: dict[str, Any], counter: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for endpoint in stats["transactions"]["endpoints"].values():
        counts.update(endpoint[counter])
    return counts


def run_checks(
    before: dict[str, Any],
    after: dict[str, Any],
    outcomes: list[Outcome],
    failures: list[tuple[Request, str]],
    totals: list[int],
    max_failed: int,
) -> list[tuple[bool, str]]:
    """Each check as (passed, what it says)."""
    checks = []
    wrong = [a["id"] for a in after["accounts"] if not _reconciles(a)]
    checks.append(
        (
            not wrong,
            f"{len(after['accounts'])} accounts: balance == opening + credits - debits"
            + (f"; not for accounts {wrong}" if wrong else ""),
        )
    )
    moved = sorted({t for t in totals if t != after["opening_total"]})
    checks.append(
        (
            not moved,
            f"total {after['opening_total']} unchanged in {len(totals)} readings"
            + (f"; saw {moved}" if moved else ""),
        )
    )
    transfers_by_key: dict[str, set[Any]] = collections.defaultdict(set)
    fresh: collections.Counter[str] = (
        collections.Counter()
    )  # key -> 201 answers that were not replays
    for outcome in outcomes:
        if outcome.status == 201:
            transfers_by_key[outcome.request.key].add(outcome.body["id"])
            fresh[outcome.request.key] += not outcome.replayed
    twice = sorted(k for k, ids in transfers_by_key.items() if len(ids) > 1 or fresh[k] > 1)
    applied = sum(1 for n in fresh.values() if n)
    grown = after["transfers"] - before["transfers"]
    checks.append(
        (
            not twice and grown == applied,
            f"each key applied once: {applied} new keys, the ledger grew by {grown}"
            + (f"; keys applied twice: {twice[:5]}" if twice else ""),
        )
    )
    failed = sum(1 for o in outcomes if o.status >= 500) + len(failures)
    checks.append((failed <= max_failed, f"{failed} failed requests, at most {max_failed} allowed"))
    return checks


def _reconciles(account: dict[str, int]) -> bool:
    return account["balance"] == account["opening"] + account["credits"] - account["debits"]


if __name__ == "__main__":
    if not __package__:
        # Run as a file: make the repository root importable, for examples.bank.app.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
