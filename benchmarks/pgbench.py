"""Run pgbench on a workload script and read its report and per-transaction log."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.pgserver import PostgresServer

from .results import Run, percentile
from .workload import SQL_DIR

#: pgbench's budget: 10 tries in all, i.e. flask-txn's ``retries=9``.
MAX_TRIES = 10


def _count(report: str, label: str) -> int:
    found = re.search(rf"^{re.escape(label)}: (\d+)", report, re.MULTILINE)
    return int(found.group(1)) if found else 0


def run(server: PostgresServer, script: str, *, clients: int, seconds: int, naccts: int) -> Run:
    """Run ``sql/<script>.sql`` for ``seconds`` with ``clients`` connections, over TCP.

    pgbench retries a serialization failure or deadlock at once, with the same
    values, up to ``MAX_TRIES`` tries in all.
    """
    logs = Path(tempfile.mkdtemp(prefix="flask-txn-pgbench-"))
    command = [
        str(server.bindir / "pgbench"),
        "--no-vacuum",
        f"--client={clients}",
        f"--jobs={min(2, clients)}",
        f"--time={seconds}",
        f"--max-tries={MAX_TRIES}",
        "--failures-detailed",
        f"--define=naccts={naccts}",
        f"--file={SQL_DIR / script}.sql",
        "--host=127.0.0.1",
        f"--port={server.port}",
        "--username=postgres",
        "--log",
        f"--log-prefix={logs / 'tx'}",
        "postgres",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False, cwd=logs
        )
        report = result.stdout
        if result.returncode != 0 or "actually processed" not in report:
            raise RuntimeError(f"pgbench failed ({result.returncode}):\n{report}{result.stderr}")
        latencies: list[float] = []
        for log in logs.glob("tx.*"):
            for line in log.read_text().splitlines():
                # client transaction time|failure script epoch us [retries]
                time = line.split()[2]
                if time.isdigit():
                    latencies.append(int(time) / 1000)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return Run(
        committed=_count(report, "number of transactions actually processed"),
        seconds=float(seconds),
        failed=_count(report, "number of failed transactions"),
        retries=_count(report, "total number of retries"),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
    )


def version(server: PostgresServer) -> str:
    """``pgbench (18.6)``, say."""
    return subprocess.run(
        [str(server.bindir / "pgbench"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
