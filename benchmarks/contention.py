"""Scenarios 2 to 5: transfers through gunicorn over loopback HTTP, against pgbench in the same run.

Each variant is a callable making one timed run; :func:`interleave` runs the
variants of a scenario A B A B ..., each on a freshly loaded ``accounts`` table.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
from collections.abc import Callable, Sequence

import sqlalchemy as sa

from tests.pgserver import PostgresServer

from . import pgbench, processes, workload
from .results import Comparison, Run, shuffled
from .webapp import BOUNDED_POOL, NO_PRE_PING

#: One timed run of a variant, given the round number (the load generator's seed).
RunOnce = Callable[[int], Run]


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every run of a scenario shares: the server, the clients and the duration."""

    server: PostgresServer
    engine: sa.Engine
    port: int
    clients: int
    rounds: int
    seconds: int

    def flask_txn(self, path: str, naccts: int) -> RunOnce:
        return lambda seed: processes.load(
            self.port, path, clients=self.clients, seconds=self.seconds, naccts=naccts, seed=seed
        )

    def pgbench(self, script: str, naccts: int) -> RunOnce:
        return lambda seed: pgbench.run(
            self.server, script, clients=self.clients, seconds=self.seconds, naccts=naccts
        )

    def interleave(self, naccts: int, variants: dict[str, RunOnce]) -> dict[str, list[Run]]:
        """Run the variants in turn, ``rounds`` times, each on a fresh table."""
        runs: dict[str, list[Run]] = {name: [] for name in variants}
        for round_ in range(1, self.rounds + 1):
            for name in shuffled(variants, round_):
                workload.reset_accounts(self.engine, naccts)
                runs[name].append(variants[name](round_))
        return runs


def sampled(engine: sa.Engine, run: RunOnce) -> RunOnce:
    """``run``, with the mean number of the database's sessions in a transaction
    while it ran, sampled every 5 ms from ``pg_stat_activity`` on a connection of
    its own: how many transactions the database really had at once."""

    def run_sampled(seed: int) -> Run:
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            with engine.connect() as connection:
                query = sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE xact_start IS NOT NULL"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                while not stop.wait(0.005):  # the sampling period, not a synchronisation
                    samples.append(connection.scalar(query) or 0)
                    connection.rollback()

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = run(seed)
        finally:
            stop.set()
            sampler.join()
        return dataclasses.replace(result, in_transaction=statistics.fmean(samples or [0]))

    return run_sampled


def _path(script: str) -> str:
    return f"/transfer/{script}"


PGBENCH_SER = f"pgbench `{workload.SERIALIZABLE}.sql`, `--max-tries=10`"
FLASK_TXN_SER = "flask-txn `@atomic(isolation='SERIALIZABLE', retries=9)`"
FLASK_TXN_SER_BOUNDED = f"{FLASK_TXN_SER}, pool of 1 x cores"
PGBENCH_COLD = f"pgbench `{workload.READ_COMMITTED}.sql`"
FLASK_TXN_COLD = "flask-txn `@atomic(isolation='READ COMMITTED')`"


def _cold_variants(setup: Setup) -> dict[str, RunOnce]:
    """pgbench and flask-txn on the cold transfers (scenarios 2 and 5b)."""
    return {
        PGBENCH_COLD: setup.pgbench(workload.READ_COMMITTED, workload.COLD),
        FLASK_TXN_COLD: setup.flask_txn(_path(workload.READ_COMMITTED), workload.COLD),
    }


def _hot_variants(setup: Setup) -> dict[str, RunOnce]:
    """pgbench and flask-txn, with either pool, on the hot transfers (scenarios 3 and 5b)."""
    serializable = _path(workload.SERIALIZABLE)
    return {
        PGBENCH_SER: setup.pgbench(workload.SERIALIZABLE, workload.HOT),
        FLASK_TXN_SER: setup.flask_txn(serializable, workload.HOT),
        FLASK_TXN_SER_BOUNDED: setup.flask_txn(BOUNDED_POOL + serializable, workload.HOT),
    }


def cold(setup: Setup, *, without_pre_ping: bool = False) -> Comparison:
    """Scenario 2: 1000 accounts, READ COMMITTED, hardly any conflict."""
    variants = _cold_variants(setup)
    if without_pre_ping:
        variants[f"{FLASK_TXN_COLD}, `pool_pre_ping=False`"] = setup.flask_txn(
            NO_PRE_PING + _path(workload.READ_COMMITTED), workload.COLD
        )
    runs = setup.interleave(workload.COLD, variants)
    return Comparison(
        "cold",
        "2. Cold transfers: 1000 accounts, READ COMMITTED",
        setup.clients,
        "transfers/s",
        runs,
        notes="flask-txn's default `pool_pre_ping=True` costs two round trips per"
        " transaction with psycopg2 (`SELECT 1`, then `SET default_transaction_isolation"
        " TO DEFAULT` when the driver leaves autocommit).",
    )


def serializable(setup: Setup) -> Comparison:
    """Scenario 3: 10 hot accounts, SERIALIZABLE, the same budget of 10 attempts."""
    runs = setup.interleave(workload.HOT, _hot_variants(setup))
    return Comparison(
        "serializable",
        "3. Hot SERIALIZABLE transfers: 10 accounts, 10 attempts at most",
        setup.clients,
        "committed/s",
        runs,
        notes="flask-txn's pool has a connection per client, except in the last row: there"
        " it has as many connections as the database has cores, whatever the"
        " number of clients, and the other requests wait for one.",
    )


def lead(setup: Setup, backoffs: Sequence[tuple[float, float]]) -> Comparison:
    """Scenario 3c: where flask-txn's lead over pgbench on hot rows comes from.

    pgbench with as many connections as flask-txn's bounded pool, flask-txn
    retrying at once as pgbench does, and every variant's mean number of
    transactions in the database at once.
    """
    cores = processes.bounded_pool_for(setup.clients) * processes.workers_for(setup.clients)
    variants = {
        PGBENCH_SER: setup.pgbench(workload.SERIALIZABLE, workload.HOT),
        f"{PGBENCH_SER}, {cores} clients (1 x cores)": lambda seed: pgbench.run(
            setup.server,
            workload.SERIALIZABLE,
            clients=cores,
            seconds=setup.seconds,
            naccts=workload.HOT,
        ),
        FLASK_TXN_SER: setup.flask_txn(_path(workload.SERIALIZABLE), workload.HOT),
        FLASK_TXN_SER_BOUNDED: setup.flask_txn(
            BOUNDED_POOL + _path(workload.SERIALIZABLE), workload.HOT
        ),
    }
    if (0.0, 0.0) in backoffs:
        index = list(backoffs).index((0.0, 0.0))
        variants[f"{FLASK_TXN_SER}, retrying at once (no backoff)"] = setup.flask_txn(
            f"/transfer/backoff/{index}", workload.HOT
        )
    runs = setup.interleave(
        workload.HOT, {name: sampled(setup.engine, run) for name, run in variants.items()}
    )
    return Comparison(
        "lead",
        "3c. Where the lead on hot rows comes from: connections, backoff, transactions at once",
        setup.clients,
        "committed/s",
        runs,
        notes="The last column is the mean number of the database's sessions in a"
        " transaction during the run (pg_stat_activity, sampled every 5 ms): the"
        " transactions that can conflict with each other.",
    )


def paired_scaling(setup: Setup, fewer: int) -> list[Comparison]:
    """Scenario 5b: scenarios 3 and 2 at ``fewer`` clients and at ``setup.clients``, on
    one server.

    The runs at both client counts are interleaved, so each variant's goodput at
    more clients is divided by its goodput at fewer in the same round: the
    share it keeps, with the drift between separate servers and minutes taken out.
    The cold transfers never conflict: what they lose is what the machine loses to
    more clients, the baseline for the hot ones. The server is sized for the larger
    count; with fewer clients, a pool with a connection per client leaves some unused.
    """
    return [
        *_paired(setup, fewer, workload.HOT, "hot SERIALIZABLE", _hot_variants),
        *_paired(setup, fewer, workload.COLD, "cold READ COMMITTED", _cold_variants),
    ]


def _paired(
    setup: Setup,
    fewer: int,
    naccts: int,
    what: str,
    variants_of: Callable[[Setup], dict[str, RunOnce]],
) -> list[Comparison]:
    sides = (dataclasses.replace(setup, clients=fewer), setup)
    per_side = [variants_of(side) for side in sides]
    variants = list(per_side[-1])
    runs = setup.interleave(
        naccts,
        {
            f"{name} at {side.clients}": runs_of[name]
            for name in variants
            for side, runs_of in zip(sides, per_side, strict=True)
        },
    )
    return [
        Comparison(
            "paired",
            f"5b. {name}: {what} at {fewer} and {setup.clients} clients, paired",
            setup.clients,
            "committed/s",
            {f"{side.clients} clients": runs[f"{name} at {side.clients}"] for side in sides},
            notes=f"Both client counts on one server, interleaved; ratio = the share of its"
            f" {fewer}-client goodput the variant keeps with {setup.clients} clients,"
            " round by round.",
        )
        for name in variants
    ]


def read_committed(setup: Setup) -> Comparison:
    """Scenario 4: 10 hot accounts, READ COMMITTED: ordered locks against deadlocks."""
    runs = setup.interleave(
        workload.HOT,
        {
            f"pgbench `{workload.ORDERED_LOCKS}.sql`": setup.pgbench(
                workload.ORDERED_LOCKS, workload.HOT
            ),
            "flask-txn `lock_rows(..., mode='update')`": setup.flask_txn(
                "/transfer/lock-rows", workload.HOT
            ),
            "flask-txn, two UPDATEs in random order": setup.flask_txn(
                _path(workload.READ_COMMITTED), workload.HOT
            ),
            f"pgbench `{workload.READ_COMMITTED}.sql`, `--max-tries=10`": setup.pgbench(
                workload.READ_COMMITTED, workload.HOT
            ),
        },
    )
    return Comparison(
        "read-committed",
        "4. Hot READ COMMITTED transfers: 10 accounts, ordered row locks or deadlocks",
        setup.clients,
        "committed/s",
        runs,
        notes="Two UPDATEs in random order deadlock; PostgreSQL detects it after"
        " deadlock_timeout (100 ms) and both retry.",
    )


def backoff_label(wait_initial: float, wait_max: float) -> str:
    return f"flask-txn `wait_initial={wait_initial:g}, wait_max={wait_max:g}`"


def backoff_sweep(setup: Setup, backoffs: Sequence[tuple[float, float]]) -> Comparison:
    """Scenario 3 with each backoff setting (served at ``/transfer/backoff/<i>``)."""
    variants = {PGBENCH_SER: setup.pgbench(workload.SERIALIZABLE, workload.HOT)}
    for index, (wait_initial, wait_max) in enumerate(backoffs):
        variants[backoff_label(wait_initial, wait_max)] = setup.flask_txn(
            f"/transfer/backoff/{index}", workload.HOT
        )
    return Comparison(
        "backoff",
        "3b. Backoff settings on scenario 3 (hot SERIALIZABLE, retries=9)",
        setup.clients,
        "committed/s",
        setup.interleave(workload.HOT, variants),
    )


def warm_up(port: int, clients: int, seconds: float) -> None:
    """Untimed load, so that every worker has imported, compiled and filled its pool."""
    processes.load(
        port,
        _path(workload.READ_COMMITTED),
        clients=clients,
        seconds=seconds,
        naccts=workload.COLD,
        seed=0,
    )
