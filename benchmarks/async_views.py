"""What an async view costs under Flask, per driver and pool, against a sync view.

Run from the repository root: ``python -m benchmarks.async_views`` (``--rounds``,
``--requests``, ``--out``). It starts a throwaway PostgreSQL (as the tests do)
and serves one view that reads one row by primary key from several apps, one
per variant, through Flask's test client: sync ``@atomic`` on psycopg 3, and
async ``@atomic`` on psycopg 3 (pooled across event loops, flask-txn's default,
and ``NullPool``) and on asyncpg (``NullPool``, the only choice), plus
hand-written ``AsyncSession`` code on ``NullPool`` as the reference. The
variants run interleaved, round by round, first from one client thread, then
from several at once. It reports requests per second and new database
connections per request, and writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from flask_txn import FlaskTxn, atomic
from tests import pgserver
from tests.conftest import Base, Item

from .report import commit, save_table

ROOT = Path(__file__).resolve().parent.parent


class Variant:
    """One app serving ``GET /``, and a count of the connections its engine made."""

    def __init__(self, name: str, app: Flask, engine: sa.Engine, close: Callable[[], None]) -> None:
        self.name = name
        self.client = app.test_client()
        self.close = close
        self.connects = 0
        self._lock = threading.Lock()
        sa.event.listen(engine.pool, "connect", self._connected)

    def _connected(self, *_: Any) -> None:
        with self._lock:
            self.connects += 1

    def get(self) -> None:
        response = self.client.get("/")
        if response.status_code != 200:
            raise RuntimeError(f"{self.name}: {response.status_code} {response.text}")


def run(variant: Variant, requests: int, threads: int) -> tuple[float, float]:
    """Requests per second, and new connections per request, over ``requests``
    requests sent by ``threads`` client threads at once."""
    connects = variant.connects
    rate = timed(variant.get, requests, threads)
    done = requests // threads * threads
    return rate, (variant.connects - connects) / done


def timed(send: Callable[[], None], requests: int, threads: int) -> float:
    """Requests per second over ``requests`` calls of ``send`` from ``threads`` client
    threads, started together."""
    barrier = threading.Barrier(threads + 1)
    failures: list[BaseException] = []

    def client() -> None:
        barrier.wait()
        try:
            for _ in range(requests // threads):
                send()
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    return requests // threads * threads / elapsed


def _flask_txn_app(name: str, url: sa.URL, **config: Any) -> tuple[Flask, FlaskTxn]:
    app = Flask(name)
    app.config.update(TXN_DATABASE_URI=url, **config)
    return app, FlaskTxn(app)


def variants(url: sa.URL) -> Iterator[Variant]:
    """Every variant, each with its own app and engine."""
    psycopg = url.set(drivername="postgresql+psycopg")
    asyncpg = url.set(drivername="postgresql+asyncpg")

    app, sync_txn = _flask_txn_app("sync", psycopg)

    @app.get("/")
    @atomic
    def sync_view() -> str:
        return sync_txn.session.get(Item, 1).name  # type: ignore[union-attr]

    with app.app_context():
        engine = sync_txn.engine
    yield Variant("sync `@atomic`, psycopg 3, pooled", app, engine, engine.dispose)

    for name, config in (
        ("async `@atomic`, psycopg 3, pooled (default)", {}),
        (
            "async `@atomic`, psycopg 3, `NullPool`",
            {"TXN_ASYNC_ENGINE_OPTIONS": {"poolclass": NullPool}},
        ),
        ("async `@atomic`, asyncpg, `NullPool` (default)", {"TXN_ASYNC_DATABASE_URI": asyncpg}),
    ):
        app, txn = _flask_txn_app(name, psycopg, **config)

        @app.get("/")
        @atomic
        async def async_view(txn: FlaskTxn = txn) -> str:
            return (await txn.async_session.get(Item, 1)).name  # type: ignore[union-attr]

        database = txn._states[app].async_database
        assert database is not None
        yield Variant(name, app, database.sync_engine, database.close)

    engine = create_async_engine(psycopg, poolclass=NullPool)
    by_hand = async_sessionmaker(engine, expire_on_commit=False)
    app = Flask("hand-written")

    @app.get("/")
    async def hand_written() -> str:
        async with by_hand.begin() as session:
            return (await session.get(Item, 1)).name  # type: ignore[union-attr]

    yield Variant(
        "hand-written `async with factory.begin()`, psycopg 3, `NullPool`",
        app,
        engine.sync_engine,
        lambda: asyncio.run(engine.dispose()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--requests", type=int, default=200, help="requests per run (200)")
    parser.add_argument("--threads", type=int, default=4, help="client threads at once (4)")
    parser.add_argument("--out", type=Path, help="folder for results.md and results.json")
    args = parser.parse_args()
    with pgserver.running() as server:
        url = sa.make_url(server.url)
        engine = sa.create_engine(url)
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(sa.insert(Item), [{"id": 1, "name": "x"}])
            version = connection.scalar(sa.text("SHOW server_version"))
        engine.dispose()
        chosen = list(variants(url))
        try:
            table = _measure(chosen, args.rounds, args.requests, args.threads)
        finally:
            for variant in chosen:
                variant.close()
    lines = [
        f"`python -m benchmarks.async_views` at {commit()}:"
        f" PostgreSQL {version}, {args.rounds} interleaved rounds of {args.requests}"
        f" requests per variant, from 1 client thread and from {args.threads}; medians",
        "",
        "| variant | requests/s, 1 thread | requests/s, "
        f"{args.threads} threads | new connections per request |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['rate_1']:,.0f} | {row['rate_n']:,.0f} | {row['connects']:.2f} |"
        )
    save_table(args.out, "\n".join(lines), table)


def _measure(
    chosen: list[Variant], rounds: int, requests: int, threads: int
) -> dict[str, dict[str, float]]:
    """Medians per variant: rates from 1 and ``threads`` threads, connections per request."""
    for variant in chosen:
        run(variant, 20, 1)  # warm up: first connections, dialect initialisation
    samples: dict[str, dict[str, list[float]]] = {
        v.name: {"rate_1": [], "rate_n": [], "connects": []} for v in chosen
    }
    for round_ in range(rounds):
        # A new order each round, so that no variant always runs first.
        order = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]
        for variant in order:
            rate, connects = run(variant, requests, 1)
            samples[variant.name]["rate_1"].append(rate)
            samples[variant.name]["connects"].append(connects)
            rate, _ = run(variant, requests, threads)
            samples[variant.name]["rate_n"].append(rate)
    return {
        name: {key: statistics.median(values) for key, values in row.items()}
        for name, row in samples.items()
    }


if __name__ == "__main__":
    main()
