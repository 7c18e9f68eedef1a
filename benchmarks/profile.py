"""Profile flask-txn's hot path with pyinstrument: ``python -m benchmarks.profile``.

Calls an empty ``@atomic`` function and the scenario-1 view (one SELECT by
primary key, through WSGI in-process) in a loop, and prints pyinstrument's
call tree for each, with the share of time spent in flask-txn's own frames.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

from flask import Flask, request
from pyinstrument import Profiler
from pyinstrument.frame import Frame

from flask_txn import FlaskTxn, atomic
from tests import pgserver

from . import workload
from .overhead import SELECT


def _own_share(frame: Frame | None) -> float:
    """Share of the samples whose innermost frame is in the flask_txn package."""
    if frame is None or not frame.time:
        return 0.0

    def own(node: Frame) -> float:
        inside = "flask_txn" in (node.file_path or "")
        return (node.total_self_time if inside else 0.0) + sum(own(c) for c in node.children)

    return own(frame) / frame.time


def profile(name: str, func: Callable[[], object], seconds: float) -> None:
    """Call ``func`` for ``seconds`` under the profiler and print the tree."""
    for _ in range(200):
        func()  # warm up
    profiler = Profiler(interval=0.0002)
    calls, deadline = 0, time.perf_counter() + seconds
    with profiler:
        while time.perf_counter() < deadline:
            func()
            calls += 1
    session = profiler.last_session
    share = _own_share(session.root_frame() if session else None)
    print(
        f"\n## {name}: {calls / seconds:,.0f} calls/s under the profiler;"
        f" {share:.0%} of the time in flask_txn's own code\n"
    )
    print(profiler.output_text(unicode=False, color=False, show_all=False, short_mode=False))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per profile")
    args = parser.parse_args(argv)
    with pgserver.running() as server:
        app = Flask("profiled")
        app.config["TXN_DATABASE_URI"] = server.url
        txn = FlaskTxn(app)
        with app.app_context():
            workload.reset_accounts(txn.engine, workload.COLD)

        @atomic
        def noop() -> None:
            pass

        @app.get("/")
        @atomic
        def view() -> str:
            return str(txn.session.execute(SELECT, {"id": request.args["id"]}).scalar_one())

        rng = random.Random(1)
        client = app.test_client()
        try:
            with app.app_context():
                profile("empty @atomic function", noop, args.seconds)
            profile(
                "@atomic view, one SELECT, WSGI in-process",
                lambda: client.get(f"/?id={rng.randint(1, workload.COLD)}"),
                args.seconds,
            )
        finally:
            with app.app_context():
                txn.engine.dispose()


if __name__ == "__main__":
    main()
