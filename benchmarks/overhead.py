"""What flask-txn costs per call: @atomic against hand-written SQLAlchemy, signals on and off.

Run from the repository root: ``python -m benchmarks.overhead`` (``--quick`` for
fewer repetitions). It starts a throwaway PostgreSQL (as the tests do), runs
each pair of variants interleaved (A B A B ...) and prints medians, the spread
and the ratio, since absolute figures drift on a shared machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import sessionmaker

import flask_txn
from flask_txn import FlaskTxn, atomic, transaction_committed
from tests import pgserver
from tests.conftest import Base, Item


def rate(func: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``func`` over about ``seconds``."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            func()
        calls += 50
    return calls / elapsed


def compare(variants: dict[str, Callable[[], object]], rounds: int, seconds: float) -> dict:
    """Interleave the variants ``rounds`` times; the rates of each, in order."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for func in variants.values():
        rate(func, seconds / 4)  # warm up pools, caches and code paths
    for _ in range(rounds):
        for name, func in variants.items():
            results[name].append(rate(func, seconds))
    return results


def report(title: str, results: dict[str, list[float]], unit: str) -> None:
    """A markdown table: median, spread, ratio to the first variant."""
    base = statistics.median(next(iter(results.values())))
    print(f"\n### {title}\n")
    print(f"| variant | median {unit} | min-max | ratio to first |")
    print("| --- | --- | --- | --- |")
    for name, rates in results.items():
        median = statistics.median(rates)
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
        print(f"| {name} | {median:,.0f} | {spread} | {median / base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of 0.5 s instead of 7 of 1 s"
    )
    args = parser.parse_args()
    rounds, seconds = (3, 0.5) if args.quick else (7, 1.0)

    with pgserver.running() as server:
        print(
            f"flask-txn {flask_txn.__version__}, SQLAlchemy {sa.__version__},"
            f" Python {platform.python_version()}, {platform.machine()}"
        )
        print(f"PostgreSQL settings: {pgserver.SETTINGS}")
        app = Flask("flask_txn_app")
        app.config["TXN_DATABASE_URI"] = server.url
        txn = FlaskTxn(app)
        engine = sa.create_engine(server.url, pool_pre_ping=True)  # flask-txn's defaults
        hand_session = sessionmaker(engine, expire_on_commit=False)
        with app.app_context():
            Base.metadata.create_all(txn.engine)
            with atomic():
                txn.session.add(Item(id=1, name="x"))

        @atomic
        def noop() -> None:
            pass

        def hand_noop() -> None:
            with hand_session.begin():
                pass

        with app.app_context():
            plain = compare(
                {"hand-written Session.begin()": hand_noop, "@atomic": noop}, rounds, seconds
            )
            receivers = [lambda sender, **extra: None for _ in range(3)]
            for receiver in receivers:
                transaction_committed.connect(receiver)
            signalled = compare({"@atomic, 3 receivers": noop}, rounds, seconds)
            for receiver in receivers:
                transaction_committed.disconnect(receiver)
        report("No-op block, called directly (no statement)", {**plain, **signalled}, "calls/s")

        @app.get("/")
        @atomic
        def by_key() -> str:
            return txn.session.get(Item, 1).name

        hand_app = Flask("hand_app")

        @hand_app.get("/")
        def hand_by_key() -> str:
            with hand_session.begin() as session:
                return session.get(Item, 1).name

        client, hand_client = app.test_client(), hand_app.test_client()
        results = compare(
            {"hand-written": lambda: hand_client.get("/"), "@atomic": lambda: client.get("/")},
            rounds,
            seconds,
        )
        report("View: one SELECT by primary key, through WSGI in-process", results, "requests/s")
        with app.app_context():
            txn.engine.dispose()
        engine.dispose()


if __name__ == "__main__":
    main()
