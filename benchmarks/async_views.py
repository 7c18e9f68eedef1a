"""What an async view costs under Flask: async @atomic against hand-written AsyncSession code.

Run from the repository root: ``python -m benchmarks.async_views`` (``--rounds``,
``--requests``). It starts a throwaway PostgreSQL (as the tests do) and calls
four views through Flask's test client, interleaved round by round, each
reading one row by primary key: hand-written ``async with factory.begin()`` on
a NullPool engine (flask-txn's async default), ``@atomic`` on a coroutine, a
hand-written view with a pooled engine per event loop (the alternative to
NullPool), and a sync ``@atomic`` view on the pooled sync engine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from flask_txn import FlaskTxn, atomic
from tests import pgserver
from tests.conftest import Base, Item


def rate(call: Callable[[], object], requests: int) -> float:
    """Requests per second over ``requests`` calls."""
    start = time.perf_counter()
    for _ in range(requests):
        call()
    return requests / (time.perf_counter() - start)


def build(url: sa.URL) -> tuple[Flask, FlaskTxn, list[Callable[[], None]]]:
    """The app with the four views, and what to dispose of afterwards."""
    app = Flask("async_views")
    app.config["TXN_DATABASE_URI"] = url
    txn = FlaskTxn(app)
    null_engine = create_async_engine(url, poolclass=NullPool)
    by_hand = async_sessionmaker(null_engine, expire_on_commit=False)

    @app.get("/hand-written")
    async def hand_written() -> str:
        async with by_hand.begin() as session:
            return (await session.get(Item, 1)).name  # type: ignore[union-attr]

    @app.get("/atomic")
    @atomic
    async def async_atomic() -> str:
        return (await txn.async_session.get(Item, 1)).name  # type: ignore[union-attr]

    @app.get("/pool-per-loop")
    async def pool_per_loop() -> str:
        engine = create_async_engine(url)  # a pool that lives as long as this loop
        try:
            async with async_sessionmaker(engine, expire_on_commit=False).begin() as session:
                return (await session.get(Item, 1)).name  # type: ignore[union-attr]
        finally:
            await engine.dispose()

    @app.get("/sync-atomic")
    @atomic
    def sync_atomic() -> str:
        return txn.session.get(Item, 1).name  # type: ignore[union-attr]

    return app, txn, [lambda: asyncio.run(null_engine.dispose())]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--requests", type=int, default=200, help="requests per round (200)")
    args = parser.parse_args()
    with pgserver.running() as server:
        url = sa.make_url(server.url).set(drivername="postgresql+psycopg")
        app, txn, cleanups = build(url)
        with app.app_context():
            Base.metadata.create_all(txn.engine)
            with atomic():
                txn.session.add(Item(id=1, name="x"))
        client = app.test_client()
        paths = ["/hand-written", "/atomic", "/pool-per-loop", "/sync-atomic"]
        for path in paths:
            rate(functools.partial(client.get, path), 20)  # warm up
        rates: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path in paths:
                rates[path].append(rate(functools.partial(client.get, path), args.requests))
        base = statistics.median(rates["/hand-written"])
        print(f"psycopg 3, {args.rounds} rounds x {args.requests} requests, medians\n")
        print("| view | requests/s | min-max | ratio to hand-written |")
        print("| --- | --- | --- | --- |")
        for path, values in rates.items():
            median = statistics.median(values)
            spread = f"{min(values):,.0f}-{max(values):,.0f}"
            print(f"| {path} | {median:,.0f} | {spread} | {median / base:.2f} |")
        for cleanup in cleanups:
            cleanup()
        with app.app_context():
            txn.engine.dispose()


if __name__ == "__main__":
    main()
