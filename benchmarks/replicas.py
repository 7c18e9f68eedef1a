"""Read-heavy traffic on one primary against one primary and one streaming standby.

Run from the repository root: ``python -m benchmarks.replicas`` (``--rounds``,
``--requests``, ``--threads``, ``--out``). It starts a primary and a streaming
standby (as the tests do, tests/replica.py) on this machine, and serves the same
two views from two apps through Flask's test client: ``GET /read``
(``@atomic(replica=True)``) and ``POST /write`` (``@atomic``, one UPDATE), sent
9 to 1 by each client thread. One app has no standby configured, the other has
the standby in ``TXN_REPLICA_URIS``; they run interleaved, round by round. Two
kinds of read: a point read by primary key, and an aggregate over the whole
table (a read that keeps a server busy). It reports requests per second, the
ratio standby/primary-alone, and the share of reads the standby served, and
writes ``results.md`` and ``results.json``.

Both servers and the client share the machine's cores: a second server on the
same cores adds no CPU, so the ratio shows what routing costs and what it
spreads, not what a second machine would add.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

from flask_txn import FlaskTxn, atomic, transaction_committed
from tests import replica
from tests.conftest import Base, Item

from .async_views import timed
from .report import commit, save_table

ROOT = Path(__file__).resolve().parent.parent
#: Rows in the table: the aggregate read scans them all.
ROWS = 20_000
#: Of every ten requests a client sends, this many are reads.
READS_PER_TEN = 9
READS = {
    "point read": lambda: sa.select(Item.value).where(Item.id == random.randint(1, ROWS)),
    "aggregate read": lambda: sa.select(sa.func.sum(Item.value)),
}


class Variant:
    """One app serving ``GET /read`` and ``POST /write``, and where its reads ran."""

    def __init__(self, name: str, app: Flask, txn: FlaskTxn) -> None:
        self.name = name
        self.app = app
        self.txn = txn
        self.client = app.test_client()
        self.servers: dict[str, int] = {}
        self._lock = threading.Lock()
        #: per client thread: how many requests it sent.
        self._sent = threading.local()
        transaction_committed.connect(self._committed, sender=app, weak=False)

    def _committed(self, _sender: Any, *, endpoint: str | None, server: str, **_: Any) -> None:
        if endpoint == "read_view":
            with self._lock:
                self.servers[server] = self.servers.get(server, 0) + 1

    def get(self) -> None:
        """A client's next request: a read, or every tenth a write."""
        sent = getattr(self._sent, "count", 0)
        self._sent.count = sent + 1
        if sent % 10 < READS_PER_TEN:
            response = self.client.get("/read")
        else:
            response = self.client.post("/write")
        if response.status_code != 200:
            raise RuntimeError(f"{self.name}: {response.status_code} {response.text}")

    def close(self) -> None:
        transaction_committed.disconnect(self._committed, sender=self.app)
        with self.app.app_context():
            self.txn.engine.dispose()


def make(name: str, url: str, read: Callable[[], Any], **config: Any) -> Variant:
    """An app on ``url`` with the two views."""
    app = Flask(name)
    app.config.update(TXN_DATABASE_URI=url, **config)
    txn = FlaskTxn(app)

    @app.get("/read")
    @atomic(replica=True)
    def read_view() -> dict[str, Any]:
        return {"value": txn.session.scalar(read())}

    @app.post("/write")
    @atomic
    def write() -> dict[str, Any]:
        row = random.randint(1, ROWS)
        txn.session.execute(sa.update(Item).where(Item.id == row).values(value=Item.value + 1))
        return {}

    return Variant(name, app, txn)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--requests", type=int, default=400, help="requests per run (400)")
    parser.add_argument("--threads", type=int, default=4, help="client threads at once (4)")
    parser.add_argument("--out", type=Path, help="folder for results.md and results.json")
    args = parser.parse_args()
    table: dict[str, dict[str, float]] = {}
    with replica.running_pair() as (primary, standby):
        engine = sa.create_engine(primary.url)
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(
                sa.insert(Item), [{"id": i, "name": "x", "value": 0} for i in range(1, ROWS + 1)]
            )
            version = connection.scalar(sa.text("SHOW server_version"))
        replica.wait_for_replay(sa.create_engine(standby.url), replica.primary_lsn(engine))
        engine.dispose()
        for kind, read in READS.items():
            alone = make(f"{kind}: primary alone", primary.url, read)
            routed = make(
                f"{kind}: primary + standby", primary.url, read, TXN_REPLICA_URIS=[standby.url]
            )
            try:
                table.update(_measure([alone, routed], args.rounds, args.requests, args.threads))
            finally:
                alone.close()
                routed.close()
    lines = [
        f"`python -m benchmarks.replicas` at {commit()}: PostgreSQL"
        f" {version}, primary and standby on this machine, {args.rounds} interleaved rounds of"
        f" {args.requests} requests per variant ({READS_PER_TEN}0% reads) from"
        f" {args.threads} client threads; medians",
        "",
        "| variant | requests/s | ratio to the primary alone | reads on the standby |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['rate']:,.0f} | {row['ratio']:.2f} | {row['standby_share']:.0%} |"
        )
    save_table(args.out, "\n".join(lines), table)


def _measure(
    pair: list[Variant], rounds: int, requests: int, threads: int
) -> dict[str, dict[str, float]]:
    """Medians per variant: the rate, its ratio to the first variant's in the same round,
    and the share of reads the standby served."""
    for variant in pair:
        timed(variant.get, 40, 1)  # warm up: first connections, the standby's first check
    rates: dict[str, list[float]] = {v.name: [] for v in pair}
    ratios: dict[str, list[float]] = {v.name: [] for v in pair}
    for round_ in range(rounds):
        order = pair if round_ % 2 == 0 else pair[::-1]
        measured = {variant.name: timed(variant.get, requests, threads) for variant in order}
        for variant in pair:
            rates[variant.name].append(measured[variant.name])
            ratios[variant.name].append(measured[variant.name] / measured[pair[0].name])
    result = {}
    for variant in pair:
        reads = sum(variant.servers.values())
        standby = reads - variant.servers.get("primary", 0)
        result[variant.name] = {
            "rate": statistics.median(rates[variant.name]),
            "ratio": statistics.median(ratios[variant.name]),
            "standby_share": standby / reads if reads else 0.0,
        }
    return result


if __name__ == "__main__":
    main()
