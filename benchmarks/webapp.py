"""The transfer service that gunicorn serves in scenarios 2 to 5.

``POST /transfer/<script>?a=..&b=..&amt=..`` runs the statements of
``sql/<script>.sql`` in ``@atomic`` at the script's isolation level, with
pgbench's budget (``retries=9``: 10 attempts). ``/transfer/lock-rows`` takes
both row locks with :func:`flask_txn.lock_rows` first, as
``transfer_rc_forupdate_1stmt.sql`` does by hand. ``/transfer/backoff/<i>``
is ``transfer_ser`` with the i-th backoff setting of ``BENCH_BACKOFFS``.

The response carries the number of attempts in ``X-Attempts``, taken from the
signals' payloads; a transfer that failed after every attempt answers 503.
The same views answer under ``/no-pre-ping/`` from a second app whose engine
has ``pool_pre_ping=False``, to show what flask-txn's default costs, and under
``/bounded-pool/`` from a third whose pool is sized for the database rather
than for the clients (``BENCH_BOUNDED_POOL_SIZE`` per worker), so that
requests beyond it queue for a connection instead of running a transaction
that conflicts. Scenario 6 (``benchmarks.crowd --http``) adds ``/defaults/``,
an app with flask-txn's default settings (engine options, retries, admission
control), ``/defaults-off/``, the same with ``TXN_ADMISSION = False``, and
``/bounded-pool-off/``, the bounded pool with ``TXN_ADMISSION = False``.
Configured by the environment (gunicorn calls ``create_app()``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Flask, Response, g, request
from sqlalchemy.exc import DBAPIError
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from flask_txn import (
    FlaskTxn,
    atomic,
    is_retryable,
    lock_rows,
    transaction_committed,
    transaction_rolled_back,
)

from . import workload

#: The same budget as pgbench --max-tries=10.
RETRIES = 9
NO_PRE_PING = "/no-pre-ping"
BOUNDED_POOL = "/bounded-pool"
DEFAULTS = "/defaults"
DEFAULTS_OFF = "/defaults-off"
BOUNDED_POOL_OFF = "/bounded-pool-off"


def create_app() -> Flask:
    """The app, from ``BENCH_DATABASE_URL``, ``BENCH_POOL_SIZE``,
    ``BENCH_BOUNDED_POOL_SIZE`` and ``BENCH_BACKOFFS``."""
    # One connection per thread, so no request waits for the pool; the other
    # engine options are flask-txn's defaults (pool_pre_ping=True) unless given.
    pool_size = int(os.environ.get("BENCH_POOL_SIZE", "8"))
    app = _build("webapp", {"pool_size": pool_size})
    lean = _build("webapp_no_pre_ping", {"pool_size": pool_size, "pool_pre_ping": False})
    bounded_size = int(os.environ.get("BENCH_BOUNDED_POOL_SIZE", "2"))
    bounded = _build("webapp_bounded_pool", {"pool_size": bounded_size})
    mounts = {
        NO_PRE_PING: lean,
        BOUNDED_POOL: bounded,
        DEFAULTS: _build("webapp_defaults", None, retries=None),
        DEFAULTS_OFF: _build("webapp_defaults_off", None, retries=None, TXN_ADMISSION=False),
        BOUNDED_POOL_OFF: _build(
            "webapp_bounded_pool_off", {"pool_size": bounded_size}, TXN_ADMISSION=False
        ),
    }
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, mounts)  # type: ignore[method-assign]
    return app


def _build(
    name: str,
    engine_options: dict[str, Any] | None,
    *,
    retries: int | None = RETRIES,
    **config: Any,
) -> Flask:
    """An app serving the views; ``None`` for flask-txn's own engine options or retries."""
    app = Flask(name)
    app.config.update(TXN_DATABASE_URI=os.environ["BENCH_DATABASE_URL"], **config)
    if engine_options is not None:
        app.config["TXN_ENGINE_OPTIONS"] = {"max_overflow": 0, **engine_options}
    budget = {} if retries is None else {"retries": retries}
    txn = FlaskTxn(app)
    statements = {
        name: [sa.text(sql) for sql in workload.script(name).statements]
        for name in workload.SCRIPTS
    }

    def transfer(name: str, **options: Any) -> Callable[[], str]:
        script = workload.script(name)

        @atomic(isolation=script.isolation, **budget, **options)
        def view() -> str:
            params = _params()
            for statement in statements[name]:
                txn.session.execute(statement, params)
            return ""

        return view

    for name in (workload.SERIALIZABLE, workload.READ_COMMITTED):
        app.add_url_rule(f"/transfer/{name}", name, transfer(name), methods=["POST"])
    backoffs = json.loads(os.environ.get("BENCH_BACKOFFS", "[]"))
    for index, (wait_initial, wait_max) in enumerate(backoffs):
        view = transfer(workload.SERIALIZABLE, wait_initial=wait_initial, wait_max=wait_max)
        app.add_url_rule(f"/transfer/backoff/{index}", f"backoff{index}", view, methods=["POST"])

    # The locking statement of transfer_rc_forupdate_1stmt.sql comes from lock_rows.
    updates = statements[workload.ORDERED_LOCKS][1:]
    isolation = workload.script(workload.ORDERED_LOCKS).isolation

    @app.post("/transfer/lock-rows")
    @atomic(isolation=isolation, retries=RETRIES)
    def transfer_lock_rows() -> str:
        params = _params()
        lock_rows(workload.accounts, [params["a"], params["b"]], mode="update")
        for statement in updates:
            txn.session.execute(statement, params)
        return ""

    @app.get("/health")
    def health() -> str:
        return "ok"

    @transaction_committed.connect_via(app)
    def committed(sender: Flask, *, attempt: int, **extra: Any) -> None:
        g.attempts = attempt

    @transaction_rolled_back.connect_via(app)
    def rolled_back(sender: Flask, *, attempt: int, reason: str, **extra: Any) -> None:
        if reason != "retry":
            g.attempts = attempt

    @app.after_request
    def attempts(response: Response) -> Response:
        response.headers["X-Attempts"] = str(g.get("attempts", 0))
        return response

    @app.errorhandler(DBAPIError)
    def gave_up(exc: DBAPIError) -> tuple[str, int]:
        return ("retries exhausted", 503) if is_retryable(exc) else ("database error", 500)

    return app


def _params() -> dict[str, int]:
    return {name: int(request.args[name]) for name in ("a", "b", "amt")}
