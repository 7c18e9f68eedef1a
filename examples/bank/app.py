"""A money-transfer service on flask-txn: accounts, a ledger, idempotency keys, live counters.

Run it from the repository root with ``flask --app examples/bank/app.py run`` (Flask
finds ``create_app``) and open http://127.0.0.1:5000/. It uses a SQLite file next to
this script unless ``DATABASE_URL`` names another database, such as
``postgresql+psycopg2://user:password@localhost/bank``. ``STANDBY_DATABASE_URL``
names a streaming standby of that PostgreSQL server: the balances (``/stats``) and
the ledger are then read there, and each user still sees their own transfers at once.

Tests and benchmarks build it with ``create_app(url, **config)``; every key of
:data:`DEFAULTS` and every ``TXN_*`` key can be passed that way.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

from flask_txn import atomic, idempotency_keys

from .models import Account, Base, txn
from .monitor import Monitor
from .views import bp

#: The example's own config keys and their defaults.
DEFAULTS: dict[str, Any] = {
    # Accounts created when the table is empty, each opening with this many cents.
    "BANK_ACCOUNTS": 10,
    "BANK_OPENING_BALANCE": 100_000,
    # Drop the bank's tables and start afresh (tests, benchmarks).
    "BANK_RESET": False,
}


def create_app(database_url: str | None = None, **config: Any) -> Flask:
    """Build the bank: config, then the extension, the tables, the counters and the views.

    :param database_url: a SQLAlchemy URL; by default ``DATABASE_URL``, else a SQLite file.
    :param config: Flask config keys, such as ``BANK_ACCOUNTS=3`` or ``TXN_RETRY_WAIT_MAX=0.1``.
    """
    app = Flask(__name__)
    default_url = f"sqlite:///{Path(__file__).with_name('bank.db')}"
    app.config.update(DEFAULTS)
    app.config["TXN_DATABASE_URI"] = database_url or os.environ.get("DATABASE_URL", default_url)
    if os.environ.get("STANDBY_DATABASE_URL"):
        app.config["TXN_REPLICA_URIS"] = [os.environ["STANDBY_DATABASE_URL"]]
    app.config.update(config)
    if app.config.get("TXN_REPLICA_URIS"):
        # Each user's reads wait for their own transfers, through the signed session cookie.
        app.config.setdefault("TXN_REPLICA_READ_YOUR_WRITES", "session")
        if not app.config["SECRET_KEY"]:
            app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY") or secrets.token_hex()
    txn.init_app(app)
    with app.app_context():
        _create_tables(app)
        _open_accounts(app.config["BANK_ACCOUNTS"], app.config["BANK_OPENING_BALANCE"])
    # Connected after the accounts were opened: the counters show requests only.
    app.extensions["bank"] = Monitor(app)
    app.register_blueprint(bp)
    return app


def _create_tables(app: Flask) -> None:
    if app.config["BANK_RESET"]:
        Base.metadata.drop_all(txn.engine)
        idempotency_keys.drop(txn.engine, checkfirst=True)
    Base.metadata.create_all(txn.engine)
    # The responses @idempotent stores (a real app creates it in a migration).
    idempotency_keys.create(txn.engine, checkfirst=True)


def _open_accounts(count: int, opening: int) -> None:
    """Create ``count`` accounts if there are none yet."""
    for name, value in (("BANK_ACCOUNTS", count), ("BANK_OPENING_BALANCE", opening)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name!r} must be a whole number >= 0, got {value!r}.")
    with atomic():
        if txn.session.scalar(sa.select(sa.func.count(Account.id))):
            return
        txn.session.add_all(
            Account(id=number, opening=opening, balance=opening) for number in range(1, count + 1)
        )
