"""Scenario 6: a crowd on a hot spot with *default settings*, in-process, against pgbench.

``python -m benchmarks.crowd`` (``--clients 8,32,64,128``, ``--seconds 3``,
``--rounds 1``, ``--out FOLDER``) starts a throwaway PostgreSQL, then drives
hot ``SERIALIZABLE`` transfers (``sql/transfer_ser.sql``) from client threads in
this process through Flask's test client (WSGI, no network), on 10 accounts and
on 2 (every transfer then touches the same two rows: one hot spot), at each
client count. The variants, interleaved within each round and row:

- flask-txn with default settings (``@atomic(isolation="SERIALIZABLE")``,
  SQLAlchemy's default pool, 5 retries, admission control on);
- the same with ``TXN_ADMISSION = False``: the defaults before admission control;
- the hand-tuned configuration of scenario 3: a pool of as many connections as
  the database has cores, ``max_overflow=0``, ``retries=9``, admission off;
- pgbench with ``--max-tries=10`` (its retries at once), at the same client count.

It also runs the case of the issue that brought admission control in: 16
clients, 2 accounts, ``retries=3``, with and without it. Each row reports the
median committed/s, the failed share, and p50 and p99 latency of committed
transfers; it writes ``results.md`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import sqlalchemy as sa
from flask import Flask, request

from flask_txn import FlaskTxn, atomic, transaction_retrying
from tests import pgserver

from . import machine, pgbench, plots, processes, webapp, workload
from .loadgen import pick
from .report import FRONT_MATTER
from .results import Run, percentile, shuffled

DEFAULTS = "flask-txn, default settings"
ADMISSION_OFF = "flask-txn, default settings, `TXN_ADMISSION=False`"
HAND_TUNED = "flask-txn, pool of 1 x cores, `retries=9`, `TXN_ADMISSION=False`"
PGBENCH = "pgbench `--max-tries=10`"
#: The issue's case: 16 clients on one hot spot with ``retries=3``.
FEW_RETRIES = 3
FEW_RETRIES_CLIENTS = 16
HOT_SPOT = 2
TITLE = "# Scenario 6: a crowd on a hot spot with default settings\n\n"
#: Accounts: 10 (scenario 3's hot rows) and one hot spot.
ACCOUNTS = (workload.HOT, HOT_SPOT)


class App:
    """One variant's Flask app serving ``POST /transfer``, and its retry count."""

    def __init__(self, name: str, url: str, config: dict[str, Any], **options: Any) -> None:
        self.name = name
        self.app = Flask(name.replace(" ", "-"))
        self.app.config.update(TXN_DATABASE_URI=url, **config)
        self.txn = FlaskTxn(self.app)
        self.retries = itertools.count()
        statements = [sa.text(sql) for sql in workload.script(workload.SERIALIZABLE).statements]
        txn = self.txn

        @self.app.post("/transfer")
        @atomic(isolation="SERIALIZABLE", **options)
        def transfer() -> str:
            params = {name: int(request.args[name]) for name in ("a", "b", "amt")}
            for statement in statements:
                txn.session.execute(statement, params)
            return ""

        transaction_retrying.connect(self._retried, self.app, weak=False)

    def _retried(self, _sender: Any, **_payload: Any) -> None:
        next(self.retries)

    def dispose(self) -> None:
        with self.app.app_context():
            self.txn.engine.dispose()


def drive(app: App, *, clients: int, seconds: float, naccts: int, seed: int) -> Run:
    """``clients`` threads posting transfers for ``seconds``: what ended within the window."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failed = [0] * clients
    window: list[float] = []

    def open_window() -> None:
        now = time.perf_counter()
        window[:] = [now, now + seconds]

    start = threading.Barrier(clients, action=open_window)

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        http = app.app.test_client()
        start.wait()
        end = window[1]
        while True:
            params = pick(rng, naccts)
            url = f"/transfer?a={params['a']}&b={params['b']}&amt={params['amt']}"
            sent = time.perf_counter()
            if sent >= end:
                return
            status = http.post(url).status_code
            done = time.perf_counter()
            if done > end:
                return
            if status == 200:
                latencies[index].append((done - sent) * 1000)
            else:
                failed[index] += 1

    before = next(app.retries)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    retries = next(app.retries) - before - 1
    app.dispose()
    everything = [value for values in latencies for value in values]
    return Run(
        committed=len(everything),
        seconds=seconds,
        failed=sum(failed),
        retries=retries,
        p50_ms=percentile(everything, 0.50),
        p99_ms=percentile(everything, 0.99),
    )


@dataclasses.dataclass
class Row:
    """One (accounts, clients) cell of the scenario: each variant's runs."""

    naccts: int
    clients: int
    runs: dict[str, list[Run]]

    def median(self, variant: str, attribute: str) -> float:
        values = [getattr(run, attribute) for run in self.runs[variant]]
        values = [value for value in values if not math.isnan(value)]
        return statistics.median(values) if values else math.nan


#: One timed run of a variant, given the clients, the accounts and the round (the seed).
RunOnce = Callable[[int, int, int], Run]
#: Rows to measure: (accounts, clients, the variants by name).
Plan = list[tuple[int, int, dict[str, RunOnce]]]


def in_process(
    server: pgserver.PostgresServer,
    *,
    clients: Sequence[int],
    seconds: int,
    waits: Sequence[float] = (),
) -> Plan:
    """The rows of the in-process scenario, and the issue's case last; ``waits``
    adds a variant of the default settings per ``TXN_RETRY_WAIT_INITIAL``."""
    cores = os.cpu_count() or 2
    apps = {
        DEFAULTS: App(DEFAULTS, server.url, {}),
        ADMISSION_OFF: App(ADMISSION_OFF, server.url, {"TXN_ADMISSION": False}),
        HAND_TUNED: App(
            HAND_TUNED,
            server.url,
            {
                "TXN_ADMISSION": False,
                "TXN_ENGINE_OPTIONS": {"pool_size": cores, "max_overflow": 0},
            },
            retries=9,
        ),
    }
    for wait in waits:
        name = f"{DEFAULTS}, `TXN_RETRY_WAIT_INITIAL={wait:g}`"
        apps[name] = App(name, server.url, {"TXN_RETRY_WAIT_INITIAL": wait})
    few = {
        f"{DEFAULTS}, `retries={FEW_RETRIES}`": App("few", server.url, {}, retries=FEW_RETRIES),
        f"{ADMISSION_OFF}, `retries={FEW_RETRIES}`": App(
            "few-off", server.url, {"TXN_ADMISSION": False}, retries=FEW_RETRIES
        ),
    }

    def driven(app: App) -> RunOnce:
        return lambda n, naccts, seed: drive(
            app, clients=n, seconds=seconds, naccts=naccts, seed=seed
        )

    variants = {name: driven(app) for name, app in apps.items()}
    variants[PGBENCH] = _pgbench(server, seconds)
    plan: Plan = [(naccts, n, variants) for naccts in ACCOUNTS for n in clients]
    plan.append((HOT_SPOT, FEW_RETRIES_CLIENTS, {name: driven(app) for name, app in few.items()}))
    return plan


def _pgbench(server: pgserver.PostgresServer, seconds: int) -> RunOnce:
    return lambda n, naccts, seed: pgbench.run(
        server, workload.SERIALIZABLE, clients=n, seconds=seconds, naccts=naccts
    )


HTTP_THREADS = 16
HTTP_HAND_TUNED = f"{HAND_TUNED} (1 per worker)"


def over_http(
    server: pgserver.PostgresServer, port: int, *, clients: Sequence[int], seconds: int
) -> Plan:
    """The rows over HTTP, against gunicorn with 2 workers of ``HTTP_THREADS`` threads."""
    path = f"/transfer/{workload.SERIALIZABLE}"

    def served(prefix: str) -> RunOnce:
        return lambda n, naccts, seed: processes.load(
            port, prefix + path, clients=n, seconds=seconds, naccts=naccts, seed=seed
        )

    variants = {
        DEFAULTS: served(webapp.DEFAULTS),
        ADMISSION_OFF: served(webapp.DEFAULTS_OFF),
        HTTP_HAND_TUNED: served(webapp.BOUNDED_POOL_OFF),
        PGBENCH: _pgbench(server, seconds),
    }
    return [(naccts, n, variants) for naccts in ACCOUNTS for n in clients]


def measure(
    engine: sa.Engine, plan: Plan, *, rounds: int, progress: Callable[[str], None]
) -> list[Row]:
    """Every row, each variant's runs interleaved round by round on a fresh table."""
    rows: list[Row] = []
    for naccts, n, variants in plan:
        progress(f"{naccts} accounts, {n} clients")
        row = Row(naccts, n, {name: [] for name in variants})
        for round_ in range(1, rounds + 1):
            for name in shuffled(variants, round_):
                workload.reset_accounts(engine, naccts)
                row.runs[name].append(variants[name](n, naccts, round_))
        rows.append(row)
    return rows


def markdown(rows: Sequence[Row]) -> str:
    """One table per number of accounts; the issue's case last."""
    out: list[str] = []
    for naccts in ACCOUNTS:
        out += [
            f"## {naccts} accounts{' (one hot spot)' if naccts == HOT_SPOT else ''}\n",
            "| variant | clients | committed/s | failed | retries/commit | p50 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        chosen = [row for row in rows if row.naccts == naccts and PGBENCH in row.runs]
        for name in chosen[0].runs if chosen else []:
            out += [_line(name, row) for row in chosen]
        out.append("")
    for row in rows:
        if PGBENCH not in row.runs:
            out += [
                f"## {row.clients} clients, {row.naccts} accounts, `retries={FEW_RETRIES}`\n",
                "| variant | clients | committed/s | failed | retries/commit | p50 ms | p99 ms |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                *(_line(name, row) for name in row.runs),
                "",
            ]
    return "\n".join(out)


def _line(name: str, row: Row) -> str:
    failed = sum(run.failed for run in row.runs[name])
    ended = failed + sum(run.committed for run in row.runs[name])
    return (
        f"| {name} | {row.clients} | {row.median(name, 'goodput'):,.0f}"
        f" | {failed} ({failed / ended if ended else 0:.1%})"
        f" | {row.median(name, 'retries_per_commit'):.2f}"
        f" | {row.median(name, 'p50_ms'):,.1f} | {row.median(name, 'p99_ms'):,.1f} |"
    )


def plot(rows: Sequence[Row], path: Path) -> None:
    """Goodput and p99 against clients, per variant, on 10 accounts and on the hot spot."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, naccts in enumerate(ACCOUNTS):
        chosen = [row for row in rows if row.naccts == naccts and PGBENCH in row.runs]
        if not chosen:
            continue
        clients = [row.clients for row in chosen]
        for name in chosen[0].runs:
            style = "--" if "TXN_ADMISSION=False" in name and "pool of" not in name else "-"
            for ax, attribute in zip(axes[:, column], ("goodput", "p99_ms"), strict=True):
                ax.plot(
                    clients,
                    [row.median(name, attribute) for row in chosen],
                    style,
                    marker="o",
                    label=plots.plain(name),
                    color=plots.colour(name),
                )
        hot = " (one hot spot)" if naccts == HOT_SPOT else ""
        for ax, label in zip(axes[:, column], ("committed/s", "p99 ms"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients)
            ax.set_xticklabels([str(n) for n in clients])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.set_title(f"Hot SERIALIZABLE transfers, {naccts} accounts{hot}", fontsize=9)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(folder: Path) -> list[Row]:
    """The rows a run saved in ``folder/results.json``."""
    data = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    return [
        Row(
            item["naccts"],
            item["clients"],
            {name: [Run(**run) for run in runs] for name, runs in item["runs"].items()},
        )
        for item in data["rows"]
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", default="8,32,64,128", help="client counts (8,32,64,128)")
    parser.add_argument("--seconds", type=int, default=3, help="seconds per run (3)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (1)")
    parser.add_argument("--out", type=Path, help="folder for results.md and results.json")
    parser.add_argument(
        "--http",
        action="store_true",
        help=f"over HTTP: gunicorn, 2 workers x {HTTP_THREADS} threads, instead of in-process",
    )
    parser.add_argument("--replot", type=Path, help="only draw crowd.png again from FOLDER")
    parser.add_argument(
        "--wait-initial", default="", help="in-process: default settings with these first waits"
    )
    args = parser.parse_args(argv)
    clients = [int(part) for part in args.clients.split(",")]
    waits = [float(part) for part in args.wait_initial.split(",") if part]
    if args.replot:
        plot(load(args.replot), args.replot / "crowd.png")
        return
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    with pgserver.running() as server:
        engine = sa.create_engine(server.url)
        try:
            facts = machine.facts(server, engine, "crowd")
            if args.http:
                with processes.gunicorn(server.url, clients=HTTP_THREADS) as port:
                    plan = over_http(server, port, clients=clients, seconds=args.seconds)
                    rows = measure(engine, plan, rounds=args.rounds, progress=progress)
            else:
                plan = in_process(server, clients=clients, seconds=args.seconds, waits=waits)
                rows = measure(engine, plan, rounds=args.rounds, progress=progress)
        finally:
            engine.dispose()
    facts["duration_s"] = round(time.monotonic() - started, 1)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"`python -m benchmarks.crowd {command}`: {args.rounds} round(s) of {args.seconds} s"
        " per variant"
        f" and row, medians; failed = transfers that gave up, over all rounds\n\n"
        f"{machine.markdown(facts)}- whole run: {facts['duration_s']} s\n\n{markdown(rows)}"
    )
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(f"{FRONT_MATTER}{TITLE}{text}", encoding="utf-8")
        data = {
            "facts": facts,
            "rows": [
                {
                    "naccts": row.naccts,
                    "clients": row.clients,
                    "runs": {
                        name: [dataclasses.asdict(run) for run in runs]
                        for name, runs in row.runs.items()
                    },
                }
                for row in rows
            ],
        }
        (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n", "utf-8")
        plot(rows, args.out / "crowd.png")


if __name__ == "__main__":
    main()
