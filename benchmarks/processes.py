"""Child processes: gunicorn serving :mod:`benchmarks.webapp`, and load-generator runs.

Each child gets its own process group, killed however the benchmark ends.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from .results import Run

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def workers_for(clients: int) -> int:
    """gunicorn workers: one per core (2 here), since the GIL keeps a process on one core."""
    return min(2, clients, os.cpu_count() or 1)


def bounded_pool_for(clients: int) -> int:
    """Connections per worker of the bounded pool: as many in all as the database has
    cores (the server runs on this machine), however many clients there are. On
    the hot spot, twice as many kept less goodput at 32 clients (docs/performance.md)."""
    return max(1, (os.cpu_count() or 1) // workers_for(clients))


@contextlib.contextmanager
def gunicorn(
    url: str, *, clients: int, backoffs: Sequence[tuple[float, float]] = ()
) -> Iterator[int]:
    """Serve the transfer app on a free loopback port; yield the port.

    gthread workers, each with a thread per client and a pool of that many
    connections: whichever worker a client's keep-alive connection lands on,
    every request in flight has a thread and a connection. Under
    ``/bounded-pool/`` the pool has :func:`bounded_pool_for` connections.
    """
    port = _free_port()
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": url,
        "BENCH_POOL_SIZE": str(clients),
        "BENCH_BOUNDED_POOL_SIZE": str(bounded_pool_for(clients)),
        "BENCH_BACKOFFS": json.dumps(list(backoffs)),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class=gthread",
        f"--workers={workers_for(clients)}",
        f"--threads={clients}",
        f"--bind=127.0.0.1:{port}",
        "--keep-alive=30",
        "--log-level=warning",
        "benchmarks.webapp:create_app()",
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            _wait_ready(port, process, log)
            yield port
        finally:
            _stop(process)


def _wait_ready(port: int, process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"gunicorn exited ({process.returncode}):\n{output}")
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            finally:
                connection.close()
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not answer within 60 s.")


def load(port: int, path: str, *, clients: int, seconds: float, naccts: int, seed: int) -> Run:
    """Run :mod:`benchmarks.loadgen` in its own process against the local server."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        str(port),
        path,
        f"--clients={clients}",
        f"--seconds={seconds}",
        f"--naccts={naccts}",
        f"--seed={seed}",
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=seconds + 120)
    finally:
        _stop(process)
    if process.returncode != 0:
        raise RuntimeError(f"The load generator failed:\n{stderr.decode(errors='replace')}")
    return Run(**json.loads(stdout))
