"""The HTTP load generator: a separate process, one thread and keep-alive connection per client.

``python -m benchmarks.loadgen PORT PATH --clients 8 --seconds 5 --naccts 10``
sends transfers to ``http://127.0.0.1:PORT/PATH`` as fast as the answers come
(a closed loop, like pgbench's clients) and prints one JSON line: a
:class:`~benchmarks.results.Run` of the requests that ended within the window.
Each client first sends one untimed request to open its connection. Loopback
only; each client stops at the end of the window or after ``--max-requests``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import random
import threading
import time
from collections.abc import Sequence

# Only the standard library and .results: this process starts once per run.
from .results import Run, percentile

HTTP_TIMEOUT = 60.0


@dataclasses.dataclass
class _Tally:
    committed: int = 0
    failed: int = 0
    retries: int = 0
    errors: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)


def pick(rng: random.Random, naccts: int) -> dict[str, int]:
    """One transfer's parameters, drawn as the scripts' ``\\set`` lines draw them."""
    a = rng.randint(1, naccts)
    off = rng.randint(1, naccts - 1)
    return {"a": a, "b": 1 + (a - 1 + off) % naccts, "amt": rng.randint(1, 100)}


def _send(connection: http.client.HTTPConnection, path: str) -> tuple[int, int]:
    connection.request("POST", path, body=b"", headers={"Content-Length": "0"})
    response = connection.getresponse()
    response.read()
    return response.status, int(response.headers.get("X-Attempts") or 0)


def _client(
    port: int,
    path: str,
    naccts: int,
    seed: int,
    start: threading.Barrier,
    window: list[float],
    budget: int,
    tally: _Tally,
) -> None:
    rng = random.Random(seed)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        _send(connection, _url(path, rng, naccts))
        start.wait()
        end = window[1]
        for _ in range(budget):
            url = _url(path, rng, naccts)
            sent = time.perf_counter()
            if sent >= end:
                break
            status, attempts = _send(connection, url)
            done = time.perf_counter()
            if done > end:
                break  # ended after the window: not counted, as pgbench does
            tally.retries += max(0, attempts - 1)
            if status == 200:
                tally.committed += 1
                tally.latencies.append((done - sent) * 1000)
            elif status == 503:
                tally.failed += 1
            else:
                tally.errors += 1
    finally:
        connection.close()


def _url(path: str, rng: random.Random, naccts: int) -> str:
    params = pick(rng, naccts)
    return f"{path}?a={params['a']}&b={params['b']}&amt={params['amt']}"


def run(
    port: int, path: str, *, clients: int, seconds: float, naccts: int, max_requests: int, seed: int
) -> Run:
    """Drive the server from ``clients`` threads for ``seconds``; count what ended in time."""
    window: list[float] = []

    def open_window() -> None:
        begin = time.perf_counter()
        window[:] = [begin, begin + seconds]

    start = threading.Barrier(clients, action=open_window)
    tallies = [_Tally() for _ in range(clients)]
    threads = [
        threading.Thread(
            target=_client,
            args=(port, path, naccts, seed * 1000 + i, start, window, max_requests, tallies[i]),
            daemon=True,
        )
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + HTTP_TIMEOUT + 10)
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("A load-generator client did not finish in time.")
    latencies = [value for tally in tallies for value in tally.latencies]
    return Run(
        committed=sum(t.committed for t in tallies),
        seconds=seconds,
        failed=sum(t.failed for t in tallies),
        retries=sum(t.retries for t in tallies),
        errors=sum(t.errors for t in tallies),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--naccts", type=int, default=10)
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="per client")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        parser.error("--clients must be 1 to 256 and --seconds more than 0 and at most 600")
    result = run(
        args.port,
        args.path,
        clients=args.clients,
        seconds=args.seconds,
        naccts=args.naccts,
        max_requests=args.max_requests,
        seed=args.seed,
    )
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
