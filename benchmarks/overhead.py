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
from collections.abc import Callable, Iterator

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

#: A variant: the call to time, and whether 3 signal receivers listen meanwhile.
Variant = tuple[Callable[[], object], bool]


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
    """Interleave the variants ``rounds`` times (A B C, C A B, ...: a new order each round)."""
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for func, signals in variants.values():
        with receivers(signals):
            rate(func, seconds / 2)  # warm pools, caches and code paths
    for round_ in range(rounds):
        for name in shuffled(variants, round_):
            func, signals = variants[name]
            with receivers(signals):
                runs[name].append(rate(func, seconds))
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
    app.config["TXN_DATABASE_URI"] = async_url
    txn = FlaskTxn(app)

    @app.get("/")
    @atomic
    async def txn_view() -> str:
        result = await txn.async_session.execute(SELECT, {"id": request.args["id"]})
        return str(result.scalar_one())

    hand, txn_client, hand_ids, txn_ids = hand_app.test_client(), app.test_client(), _ids(), _ids()
    try:
        return compare(
            {
                "hand-written `async with AsyncSession.begin()`": (
                    lambda: hand.get(hand_ids()),
                    False,
                ),
                "flask-txn `@atomic` on a coroutine": (lambda: txn_client.get(txn_ids()), False),
            },
            rounds,
            seconds,
        )
    finally:
        asyncio.run(engine.dispose())
        with app.app_context():
            txn.engine.dispose()


def _ids() -> Callable[[], str]:
    rng = random.Random(1)
    return lambda: f"/?id={rng.randint(1, COLD)}"


def scenario(url: str, *, rounds: int, seconds: float) -> list[Comparison]:
    """Scenario 1 on the ``accounts`` table (already loaded): a view, then a bare block."""
    engine = sa.create_engine(url, pool_pre_ping=True)
    hand_session = sessionmaker(engine, expire_on_commit=False)
    hand_app = Flask("hand_written")

    @hand_app.get("/")
    def hand_view() -> str:
        with hand_session.begin() as session:
            return str(session.execute(SELECT, {"id": request.args["id"]}).scalar_one())

    app = Flask("flask_txn_app")
    app.config["TXN_DATABASE_URI"] = url
    txn = FlaskTxn(app)

    @app.get("/")
    @atomic
    def txn_view() -> str:
        return str(txn.session.execute(SELECT, {"id": request.args["id"]}).scalar_one())

    lean_app = Flask("flask_txn_no_pre_ping")
    lean_app.config.update(TXN_DATABASE_URI=url, TXN_ENGINE_OPTIONS={"pool_pre_ping": False})
    lean_txn = FlaskTxn(lean_app)

    @lean_app.get("/")
    @lean_txn.atomic
    def lean_view() -> str:
        return str(lean_txn.session.execute(SELECT, {"id": request.args["id"]}).scalar_one())

    fsa_app = Flask("flask_sqlalchemy_app")
    fsa_app.config.update(
        SQLALCHEMY_DATABASE_URI=url, SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True}
    )
    db = SQLAlchemy(fsa_app, session_options={"expire_on_commit": False})

    @fsa_app.get("/")
    def fsa_view() -> str:
        balance = db.session.execute(SELECT, {"id": request.args["id"]}).scalar_one()
        db.session.commit()
        return str(balance)

    try:
        clients = {
            name: (a.test_client(), _ids())
            for name, a in (
                ("hand", hand_app),
                ("hand again", hand_app),
                ("txn", app),
                ("lean", lean_app),
                ("fsa", fsa_app),
            )
        }

        def get(name: str) -> Callable[[], object]:
            client, path = clients[name]
            return lambda: client.get(path())

        views = compare(
            {
                "hand-written `with Session.begin()`": (get("hand"), False),
                CONTROL: (get("hand again"), False),
                "flask-txn `@atomic`": (get("txn"), False),
                "flask-txn `@atomic`, 3 receivers": (get("txn"), True),
                "Flask-SQLAlchemy `db.session` + `commit()`": (get("fsa"), False),
                "flask-txn `@atomic`, `pool_pre_ping=False`": (get("lean"), False),
            },
            rounds,
            seconds,
        )

        @atomic
        def noop() -> None:
            pass

        def hand_noop() -> None:
            with hand_session.begin():
                pass

        async_views = _async_views(url, rounds, seconds)

        with app.app_context():
            blocks = compare(
                {
                    "hand-written `with Session.begin()`": (hand_noop, False),
                    "flask-txn `@atomic`": (noop, False),
                    "flask-txn `@atomic`, 3 receivers": (noop, True),
                },
                rounds,
                seconds,
            )
    finally:
        with app.app_context():
            txn.engine.dispose()
        with lean_app.app_context():
            lean_txn.engine.dispose()
        with fsa_app.app_context():
            db.engine.dispose()
        engine.dispose()
    return [
        Comparison(
            "overhead",
            "1. Overhead: a view reading one row by primary key, through WSGI in-process",
            1,
            "requests/s",
            views,
            notes="The hand-written code and Flask-SQLAlchemy use flask-txn's engine option"
            " `pool_pre_ping=True`; the last row shows what it costs. The second row runs"
            " the anchor again: its distance from 1 is the noise of this machine.",
        ),
        Comparison(
            "async",
            "1c. Overhead in an async view: one row by primary key, NullPool, psycopg 3",
            1,
            "requests/s",
            async_views,
            notes="Flask runs each async view in a new event loop, so both sides open a new"
            " connection per request (NullPool, flask-txn's async default): the ratio is"
            " flask-txn's cost, the absolute rate is Flask's model (see Async views).",
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
