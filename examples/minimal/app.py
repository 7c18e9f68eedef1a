"""The smallest complete flask-txn app: one model, one atomic view.

Run it with ``flask --app examples/minimal/app.py run`` (Flask finds
``create_app``). It uses a SQLite file
next to this script unless ``DATABASE_URL`` names another database.
"""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_txn import FlaskTxn, atomic

txn = FlaskTxn()


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counter"

    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


def create_app(database_url: str | None = None) -> Flask:
    """Build the app; the tables are created if missing."""
    app = Flask(__name__)
    default = f"sqlite:///{Path(__file__).with_name('minimal.db')}"
    app.config["TXN_DATABASE_URI"] = database_url or os.environ.get("DATABASE_URL", default)
    txn.init_app(app)
    with app.app_context():
        Base.metadata.create_all(txn.engine)

    @app.post("/hit/<name>")
    @atomic(isolation="SERIALIZABLE")
    def hit(name: str) -> dict[str, int]:
        """Count a hit: read, add one, write, all in one retried transaction."""
        counter = txn.session.get(Counter, name) or Counter(name=name, value=0)
        counter.value += 1
        txn.session.add(counter)
        return {name: counter.value}

    @app.get("/")
    def index() -> str:
        return "POST to /hit/<name> to count: curl -X POST localhost:5000/hit/me\n"

    return app
