"""Scenario 1: flask-txn's cost per request against hand-written SQLAlchemy and Flask-SQLAlchemy.

One client in this process calls each app through WSGI (Flask's test client,
no network), so the figures are CPU per request: with more threads the GIL
would only interleave the same work. Every app reads one account by primary
key with the same statement, on an engine with the same options (flask-txn's
defaults for PostgreSQL: ``pool_pre_ping=True``; sessions with
``expire_on_commit=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from flask_txn import FlaskTxn, atomic, transaction_committed

from .results import Comparison, Run, shuffled
from .workload import COLD

SELECT = sa.text("SELECT balance FROM accounts WHERE id = :id")

#: The anchor measured again as if it were another variant: its ratio (1 when
#: there is no noise) shows how far apart two identical variants come out.
CONTROL = "hand-written again (the noise floor)"

#: Flask-SQLAlchemy adopted by flask-txn: compared with the row above it (issue 16).
FSA_ATOMIC = "Flask-SQLAlchemy `db.session` + flask-txn `@atomic` (`db=db`)"
#: The view without admission control: what it costs a block that never conflicts.
ADMISSION_OFF = "flask-txn `@atomic`, `TXN_ADMISSION=False`"

#: Independently built copies of each app in the view comparison. Two copies of
#: the same code came out up to 3% apart here (the noise-floor row of the ten saved runs
#: in docs/benchmarks/restructure: 0.974 to 1.026): each has its own connection (so its
#: own database backend) and its own place in memory. The rounds rotate over the
#: copies, so that no ratio rests on one copy, and the noise-floor row is a copy
#: of the anchor built apart from it.
COPIES = 3

#: A variant: the calls to time (one per copy, used in turn by the rounds), and
#: whether 3 signal receivers listen meanwhile.
Variant = tuple[Sequence[Callable[[], object]], bool]


def rate(func: Callable[[], object], seconds: float) -> Run:
    """Calls of ``func`` completed in about ``seconds``."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            func()
        calls += 20
    return Run(committed=calls, seconds=elapsed)


@contextlib.contextmanager
def receivers(connect: bool) -> Iterator[None]:
    """Three no-op receivers of ``transaction_committed`` (the signal every commit sends)."""
    if not connect:
        yield
        return
    functions = [lambda sender, **extra: None for _ in range(3)]
    for function in functions:
        transaction_committed.connect(function)
    try:
        yield
    finally:
        for function in functions:
            transaction_committed.disconnect(function)


def compare(variants: dict[str, Variant], rounds: int, seconds: float) -> dict[str, list[Run]]:
    """Interleave the variants ``rounds`` times (A B C, C A B, ...: a new order each
    round), each round on the next copy of each variant."""
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    # Warm pools, caches and code paths, one copy of each variant at a time and
    # in a new order for each copy: a pool connects when it is first used, and
    # no variant should always get the first connections to the database.
    for copy in range(max(len(funcs) for funcs, _ in variants.values())):
        for name in shuffled(variants, -1 - copy):
            funcs, signals = variants[name]
            with receivers(signals):
                rate(funcs[copy % len(funcs)], seconds / 2)
    for round_ in range(rounds):
        for name in shuffled(variants, round_):
            funcs, signals = variants[name]
            with receivers(signals):
                runs[name].append(rate(funcs[round_ % len(funcs)], seconds))
    return runs


def _async_views(url: str, rounds: int, seconds: float) -> dict[str, list[Run]]:
    """Async ``@atomic`` against hand-written ``AsyncSession`` code, same engine options."""
    async_url = sa.make_url(url).set(drivername="postgresql+psycopg")
    engine = create_async_engine(async_url, poolclass=NullPool)
    by_hand = async_sessionmaker(engine, expire_on_commit=False)
    hand_app = Flask("async_hand_written")

    @hand_app.get("/")
    async def hand_view() -> str:
        async with by_hand.begin() as session:
            result = await session.execute(SELECT, {"id": request.args["id"]})
            return str(result.scalar_one())

    app = Flask("async_flask_txn")
    # NullPool on both sides: the ratio is flask-txn's own cost (its default pools
    # psycopg 3; python -m benchmarks.async_views compares the pools).
    app.config.update(TXN_DATABASE_URI=async_url, TXN_ASYNC_ENGINE_OPTIONS={"poolclass": NullPool})
    txn = FlaskTxn(app)

    @app.get("/")
    @atomic
    async def txn_view() -> str:
        result = await txn.async_session.execute(SELECT, {"id": request.args["id"]})
        return str(result.scalar_one())

    try:
        return compare(
            {
                "hand-written `async with AsyncSession.begin()`": ([_requests(hand_app)], False),
                "flask-txn `@atomic` on a coroutine": ([_requests(app)], False),
            },
            rounds,
            seconds,
        )
    finally:
        asyncio.run(engine.dispose())
        with app.app_context():
            txn.engine.dispose()
        txn._states[app].async_database.close()


def _requests(app: Flask) -> Callable[[], object]:
    """A GET of ``app``'s view for a random account, through WSGI in-process."""
    client, rng = app.test_client(), random.Random(1)
    return lambda: client.get(f"/?id={rng.randint(1, COLD)}")


def _hand_written(url: str, stack: contextlib.ExitStack) -> Flask:
    """The anchor: ``with Session.begin():`` in the view, flask-txn's engine options."""
    engine = sa.create_engine(url, pool_pre_ping=True)
    stack.callback(engine.dispose)
    by_hand = sessionmaker(engine, expire_on_commit=False)
    app = Flask("hand_written")

    @app.get("/")
    def view() -> str:
        with by_hand.begin() as session:
            return str(session.execute(SELECT, {"id": request.args["id"]}).scalar_one())

    return app


def _flask_txn(url: str, stack: contextlib.ExitStack, **config: Any) -> Flask:
    """The same view under ``@atomic``, with flask-txn's defaults updated by ``config``."""
    app = Flask("flask_txn_app")
    app.config.update(TXN_DATABASE_URI=url, **config)
    txn = FlaskTxn(app)

    def dispose() -> None:
        with app.app_context():
            txn.engine.dispose()

    stack.callback(dispose)

    @app.get("/")
    @txn.atomic
    def view() -> str:
        return str(txn.session.execute(SELECT, {"id": request.args["id"]}).scalar_one())

    return app


def _flask_sqlalchemy(url: str, stack: contextlib.ExitStack, *, adopted: bool = False) -> Flask:
    """Flask-SQLAlchemy's scoped session with an explicit ``commit()``; or, ``adopted``,
    the same app converted to flask-txn: ``FlaskTxn(app, db=db)`` and ``@atomic``."""
    app = Flask("flask_sqlalchemy_app")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url, SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True}
    )
    db = SQLAlchemy(app, session_options={"expire_on_commit": False})

    def dispose() -> None:
        with app.app_context():
            db.engine.dispose()

    stack.callback(dispose)

    if adopted:
        FlaskTxn(app, db=db)

        @app.get("/")
        @atomic
        def atomic_view() -> str:
            return str(db.session.execute(SELECT, {"id": request.args["id"]}).scalar_one())

        return app

    @app.get("/")
    def view() -> str:
        balance = db.session.execute(SELECT, {"id": request.args["id"]}).scalar_one()
        db.session.commit()
        return str(balance)

    return app


def scenario(url: str, *, rounds: int, seconds: float) -> list[Comparison]:
    """Scenario 1 on the ``accounts`` table (already loaded): a view, then a bare block."""
    with contextlib.ExitStack() as stack:
        builders: dict[str, Callable[[], Flask]] = {
            "hand": lambda: _hand_written(url, stack),
            "control": lambda: _hand_written(url, stack),
            "txn": lambda: _flask_txn(url, stack),
            "fsa": lambda: _flask_sqlalchemy(url, stack),
            "fsa_txn": lambda: _flask_sqlalchemy(url, stack, adopted=True),
            "lean": lambda: _flask_txn(url, stack, TXN_ENGINE_OPTIONS={"pool_pre_ping": False}),
            "guarded": lambda: _flask_txn(url, stack, TXN_NPLUSONE="warn"),
            "unadmitted": lambda: _flask_txn(url, stack, TXN_ADMISSION=False),
        }
        apps: dict[str, list[Flask]] = {name: [] for name in builders}
        for copy in range(COPIES):
            # Each copy in a new order, so that no variant is always built first.
            for name in shuffled(builders, -1 - copy):
                apps[name].append(builders[name]())
        hand, control, txn_apps, fsa, fsa_txn, lean, guarded, unadmitted = apps.values()

        def get(apps: list[Flask]) -> list[Callable[[], object]]:
            return [_requests(app) for app in apps]

        txn_requests = get(txn_apps)
        views = compare(
            {
                "hand-written `with Session.begin()`": (get(hand), False),
                CONTROL: (get(control), False),
                "flask-txn `@atomic`": (txn_requests, False),
                "flask-txn `@atomic`, 3 receivers": (txn_requests, True),
                "Flask-SQLAlchemy `db.session` + `commit()`": (get(fsa), False),
                FSA_ATOMIC: (get(fsa_txn), False),
                "flask-txn `@atomic`, `pool_pre_ping=False`": (get(lean), False),
                "flask-txn `@atomic`, N+1 guard on (`TXN_NPLUSONE='warn'`)": (
                    get(guarded),
                    False,
                ),
                ADMISSION_OFF: (get(unadmitted), False),
            },
            rounds,
            seconds,
        )

        @atomic
        def noop() -> None:
            pass

        engine = sa.create_engine(url, pool_pre_ping=True)
        stack.callback(engine.dispose)
        by_hand = sessionmaker(engine, expire_on_commit=False)

        def hand_noop() -> None:
            with by_hand.begin():
                pass

        async_views = _async_views(url, rounds, seconds)

        with txn_apps[0].app_context():
            blocks = compare(
                {
                    "hand-written `with Session.begin()`": ([hand_noop], False),
                    "flask-txn `@atomic`": ([noop], False),
                    "flask-txn `@atomic`, 3 receivers": ([noop], True),
                },
                rounds,
                seconds,
            )
    return [
        Comparison(
            "overhead",
            "1. Overhead: a view reading one row by primary key, through WSGI in-process",
            1,
            "requests/s",
            views,
            notes="The hand-written code and Flask-SQLAlchemy use flask-txn's engine option"
            " `pool_pre_ping=True`; the row without it shows what it costs, and the last row"
            " what the N+1 guard costs when it listens (its default outside debug and"
            " testing mode is off), and the row with `TXN_ADMISSION=False` what admission"
            " control costs a block that never conflicts. Each variant is built"
            f" {COPIES} times and the rounds take the copies in turn. The second row is the"
            " anchor built again: its distance from 1 is the noise of this machine.",
        ),
        Comparison(
            "async",
            "1c. Overhead in an async view: one row by primary key, NullPool, psycopg 3",
            1,
            "requests/s",
            async_views,
            notes="Flask runs each async view in a new event loop; both sides open a new"
            " connection per request (NullPool), so the ratio is flask-txn's cost, and the"
            " absolute rate is Flask's model. flask-txn's default pools psycopg 3 across"
            " loops: see Async views for what that gains.",
        ),
        Comparison(
            "noop",
            "1b. Overhead of the transaction boundary alone: an empty block, called directly",
            1,
            "calls/s",
            blocks,
            notes="No statement is sent, so no connection is used: this is flask-txn's own"
            " Python code, and the cost of sending a signal (issue 4).",
        ),
    ]
