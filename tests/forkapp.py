"""The app tests/test_fork.py serves with ``gunicorn --preload``: imported once, in the parent.

Importing it runs a query, so the parent's pool holds an open connection when
gunicorn forks its workers. The database is the URL in the environment
variable named by ``DATABASE_URI_ENV`` (PostgreSQL: the view asks for the
server process serving its connection).
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from flask import Flask

from flask_txn import FlaskTxn

DATABASE_URI_ENV = "FLASK_TXN_FORKAPP_DATABASE_URI"

BACKEND_PID = sa.text("SELECT pg_backend_pid()")

app = Flask(__name__)
app.config["TXN_DATABASE_URI"] = os.environ[DATABASE_URI_ENV]
txn = FlaskTxn(app)

with app.app_context():
    PARENT_BACKEND_PID = txn.session.scalar(BACKEND_PID)
    ENGINE = txn.engine
# The context's end removed the session; its connection now waits in the pool.
PARENT_POOLED = ENGINE.pool.checkedin()
PARENT_PID = os.getpid()


@app.get("/")
def whoami() -> dict[str, Any]:
    """This worker's pid and the backend pid of its connection, next to the parent's."""
    return {
        "pid": os.getpid(),
        "backend_pid": txn.session.scalar(BACKEND_PID),
        "parent_pid": PARENT_PID,
        "parent_backend_pid": PARENT_BACKEND_PID,
        "parent_pooled": PARENT_POOLED,
    }
