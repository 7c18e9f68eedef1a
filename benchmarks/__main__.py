"""Run every benchmark scenario against pgbench in one run: ``python -m benchmarks``.

From the repository root: ``python -m benchmarks`` (full, under 15 minutes),
``--quick`` (under 3 minutes) or ``--smoke`` (under 30 seconds, to keep the
harness working). It starts a throwaway PostgreSQL with the tests' settings,
runs each scenario's variants interleaved, prints markdown tables and writes
``results.md``, ``results.json`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

from flask_txn._config import DEFAULTS
from tests import pgserver

from . import contention, machine, overhead, processes, report, results, workload
from .modes import FULL, MODES, Mode
from .results import MAIN_CLIENTS

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("overhead", "transfers", "scaling", "backoff")


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _settings(mode: Mode) -> str:
    backoff = (
        f"`wait_initial={DEFAULTS['TXN_RETRY_WAIT_INITIAL']}`,"
        f" `wait_max={DEFAULTS['TXN_RETRY_WAIT_MAX']}`"
    )
    return (
        f"- runs: scenarios 2-4 {mode.rounds} x {mode.seconds} s per variant;"
        f" scaling {mode.scaling_rounds} x {mode.scaling_seconds} s; backoff"
        f" {mode.backoff_rounds} x {mode.backoff_seconds} s; paired scaling"
        f" {mode.paired_rounds} x {mode.scaling_seconds} s; overhead"
        f" {mode.overhead_rounds} x {mode.overhead_seconds} s\n"
        "- flask-txn side: gunicorn gthread, min(2, clients) workers x `clients` threads,"
        " each worker's pool `pool_size=clients, max_overflow=0` (the bounded pool: 1 x cores"
        " connections in all); load generator in its own process, one keep-alive HTTP"
        " connection per client\n"
        f"- flask-txn's default backoff: {backoff}; pgbench retries at once\n"
    )


def run(mode: Mode, scenarios: Sequence[str], out: Path) -> list[results.Comparison]:
    """Run ``scenarios`` in ``mode``; write the results and plots into ``out``."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    comparisons: list[results.Comparison] = []

    def done(comparison: results.Comparison) -> None:
        comparisons.append(comparison)
        print(results.markdown([comparison]), flush=True)

    with pgserver.running() as server:
        engine = sa.create_engine(server.url)
        try:
            facts = machine.facts(server, engine, mode.name)
            facts["settings"] = _settings(mode)
            print(f"# flask-txn benchmarks\n\n{report.header(facts)}")
            if "overhead" in scenarios:
                _progress("scenario 1: overhead")
                workload.reset_accounts(engine, workload.COLD)
                for comparison in overhead.scenario(
                    server.url, rounds=mode.overhead_rounds, seconds=mode.overhead_seconds
                ):
                    done(comparison)
            for clients in _client_counts(mode, scenarios):
                _progress(f"gunicorn for {clients} client(s)")
                with processes.gunicorn(
                    server.url, clients=clients, backoffs=mode.backoffs
                ) as port:
                    contention.warm_up(port, clients, mode.warmup)
                    main = clients == MAIN_CLIENTS and "transfers" in scenarios
                    setup = contention.Setup(
                        server,
                        engine,
                        port,
                        clients,
                        mode.rounds if main else mode.scaling_rounds,
                        mode.seconds if main else mode.scaling_seconds,
                    )
                    if main or ("scaling" in scenarios and clients in mode.scaling_clients):
                        _progress(f"cold, {clients} client(s)")
                        done(contention.cold(setup, without_pre_ping=main))
                        _progress(f"serializable, {clients} client(s)")
                        done(contention.serializable(setup))
                    if main:
                        _progress("where the lead on hot rows comes from, 8 clients")
                        done(contention.lead(setup, mode.backoffs))
                        _progress("read committed, 8 clients")
                        done(contention.read_committed(setup))
                    if (
                        "scaling" in scenarios
                        and mode.paired_rounds
                        and clients == max(mode.scaling_clients) > MAIN_CLIENTS
                    ):
                        _progress(f"serializable, {MAIN_CLIENTS} and {clients} clients, paired")
                        paired = dataclasses.replace(
                            setup, rounds=mode.paired_rounds, seconds=mode.scaling_seconds
                        )
                        for comparison in contention.paired_scaling(paired, MAIN_CLIENTS):
                            done(comparison)
                    if "backoff" in scenarios and clients in mode.backoff_clients:
                        _progress(f"backoff sweep, {clients} client(s)")
                        sweep = contention.Setup(
                            server,
                            engine,
                            port,
                            clients,
                            mode.backoff_rounds,
                            mode.backoff_seconds,
                        )
                        done(contention.backoff_sweep(sweep, mode.backoffs))
        finally:
            engine.dispose()
    facts["duration_s"] = round(time.monotonic() - started, 1)
    _progress(f"done in {facts['duration_s']} s; writing {out}")
    print("Wrote", *report.write(out, facts, comparisons), sep="\n  ")
    return comparisons


def _client_counts(mode: Mode, scenarios: Sequence[str]) -> list[int]:
    """Client counts to start gunicorn for, 8 (scenarios 2 to 4) first."""
    counts: set[int] = set()
    if "transfers" in scenarios:
        counts.add(MAIN_CLIENTS)
    if "scaling" in scenarios:
        counts.update(mode.scaling_clients)
    if "backoff" in scenarios:
        counts.update(mode.backoff_clients)
    return sorted(counts, key=lambda n: (n != MAIN_CLIENTS, n))


def _client_list(text: str) -> tuple[int, ...]:
    """``--clients 16,32``: whole numbers from 1 to 64."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or not all(1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError(
            f"must be client counts from 1 to 64, separated by commas, e.g. 16,32; got {text!r}"
        )
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--smoke", action="store_true", help="under 30 s: keep the harness working")
    speed.add_argument("--quick", action="store_true", help="under 3 minutes")
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only these scenarios (repeatable); scaling needs transfers for its 8 clients",
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds of every scenario, instead of the mode's"
    )
    parser.add_argument(
        "--seconds",
        type=int,
        help="seconds per run of scenarios 2 to 5 (pgbench takes whole seconds)",
    )
    parser.add_argument(
        "--clients",
        type=_client_list,
        help="client counts for scaling, other than 8 (comma-separated), instead of the mode's",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder for results.md, results.json and the plots (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    mode = MODES["smoke"] if args.smoke else MODES["quick"] if args.quick else FULL
    for name, value in (("--rounds", args.rounds), ("--seconds", args.seconds)):
        if value is not None and not 1 <= value <= 60:
            parser.error(f"argument {name}: must be from 1 to 60, got {value!r}")
    if args.rounds:
        mode = dataclasses.replace(
            mode,
            overhead_rounds=args.rounds,
            rounds=args.rounds,
            scaling_rounds=args.rounds,
            backoff_rounds=args.rounds,
            paired_rounds=args.rounds,
        )
    if args.seconds:
        mode = dataclasses.replace(
            mode, seconds=args.seconds, scaling_seconds=args.seconds, backoff_seconds=args.seconds
        )
    if args.clients:
        mode = dataclasses.replace(mode, scaling_clients=args.clients)
    run(mode, args.only or SCENARIOS, args.out)


if __name__ == "__main__":
    main()
