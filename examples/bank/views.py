"""The bank's HTTP API: two ways to transfer money, the ledger, the numbers behind the
page, the page."""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, current_app, request
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import joinedload

from flask_txn import (
    atomic,
    idempotent,
    lock_rows,
    on_commit,
    register_error_handlers,
    sqlstate_of,
)

from .models import Account, Transfer, txn
from .monitor import money, monitor

bp = Blueprint("bank", __name__)
# Retries used up, an unreachable database, timeouts: 503 with Retry-After. A
# connection lost during COMMIT: 502, resend with the same 'Idempotency-Key'.
register_error_handlers(bp)

#: Re-runs after a serialization failure, deadlock or busy database (11 attempts in all).
RETRIES = 10
MAX_AMOUNT = 1_000_000


class InvalidTransfer(ValueError):
    """The request cannot be a transfer; the message says which field is wrong and why."""


@dataclasses.dataclass(frozen=True)
class Order:
    """A transfer request, checked: who pays whom how much, under which idempotency key."""

    key: str
    source: int
    target: int
    amount: int

    @classmethod
    def from_request(cls) -> Order:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise InvalidTransfer(
                f"The body must be a JSON object like {{'from': 1, 'to': 2, 'amount': 500}},"
                f" got {request.get_data(as_text=True)[:100]!r}."
            )
        source = _whole_number(body, "from", 1, None, "an account id")
        target = _whole_number(body, "to", 1, None, "an account id")
        amount = _whole_number(body, "amount", 1, MAX_AMOUNT, "cents")
        if source == target:
            raise InvalidTransfer(
                f"'from' and 'to' must be different accounts, got {source!r} for both."
            )
        # @idempotent has checked the key: 1 to 255 printable ASCII characters.
        return cls(request.headers["Idempotency-Key"], source, target, amount)


def _whole_number(body: dict[str, Any], name: str, low: int, high: int | None, what: str) -> int:
    value = body.get(name)
    in_range = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )
    if not in_range:
        allowed = f">= {low}" if high is None else f"from {low} to {high}"
        raise InvalidTransfer(f"{name!r} must be a whole number {allowed} ({what}), got {value!r}.")
    return value  # type: ignore[return-value]


@bp.post("/transfers")
@atomic(isolation="SERIALIZABLE", retries=RETRIES)
@idempotent  # a repeat of the key gets the stored answer; the view runs once per key
def transfer() -> Any:
    """Move money; the database aborts one of two conflicting transfers and flask-txn re-runs it."""
    order = Order.from_request()
    accounts = [txn.session.get(Account, id_) for id_ in (order.source, order.target)]
    return apply(order, {account.id: account for account in accounts if account})


@bp.post("/transfers/locked")
# isolation=None: the database's default level whatever TXN_ISOLATION_LEVEL says. That
# is READ COMMITTED on PostgreSQL, where lock_rows makes transfers wait in line; the
# same on MariaDB and MySQL, at REPEATABLE READ, where a locking read sees the latest
# committed balances; on SQLite, which has no row locks and no other level, it is
# SERIALIZABLE.
@atomic(isolation=None, retries=RETRIES)
@idempotent
def transfer_locked() -> Any:
    """Move money; lock both accounts first, in id order, so that transfers wait instead."""
    order = Order.from_request()
    return apply(order, lock_rows(Account, [order.source, order.target]))


def apply(order: Order, accounts: dict[int, Account]) -> Any:
    """Move the money of ``order`` between ``accounts`` and record it in the ledger."""
    for field, account_id in (("from", order.source), ("to", order.target)):
        if account_id not in accounts:
            return {"error": f"{field!r} is {account_id!r}, which is no account here."}, 404
    source, target = accounts[order.source], accounts[order.target]
    if source.balance < order.amount:
        # A 4xx response: flask-txn rolls back (the commit veto). Nothing was written anyway.
        has, needs = money(source.balance), money(order.amount)
        short = f"Account {source.id} has {has}, less than {needs}."
        return {"error": short}, 409
    source.balance -= order.amount
    target.balance += order.amount
    done = Transfer(key=order.key, source_id=source.id, target_id=target.id, amount=order.amount)
    txn.session.add(done)
    txn.session.flush()  # assigns done.id
    message = f"Transfer {done.id}: {money(done.amount)} from {source.id} to {target.id}."
    # Runs once, after COMMIT; never for an attempt that is rolled back and re-run.
    on_commit(functools.partial(monitor().notify, message))
    return done.as_json(), 201


@bp.errorhandler(InvalidTransfer)
def invalid_transfer(exc: InvalidTransfer) -> Any:
    return {"error": str(exc)}, 400


@bp.errorhandler(DBAPIError)
def database_error(exc: DBAPIError) -> Any:
    """The database errors that register_error_handlers leaves alone."""
    code = sqlstate_of(exc)
    if isinstance(exc, IntegrityError):
        # The unique key: a concurrent request with the same key but other accounts
        # got there first (under SERIALIZABLE this shows as a retried 40001 instead).
        return {
            "error": f"The transfer conflicts with another one (SQLSTATE {code}). Resend it"
            " with the same 'Idempotency-Key' to see what was stored."
        }, 409
    current_app.logger.exception("Database error, SQLSTATE %s", code)
    return {"error": f"Database error (SQLSTATE {code})."}, 500


@bp.get("/stats")
@atomic(replica=True)  # on a standby when one is configured, once it has this user's writes
def stats() -> Any:
    """Counters, balances and the reconciliation of every account, as JSON."""
    # MySQL's and MariaDB's SUM of integers is a DECIMAL: cast it back to a whole number.
    total = sa.cast(sa.func.coalesce(sa.func.sum(Transfer.amount), 0), sa.BigInteger)
    credits = sa.select(total).where(Transfer.target_id == Account.id).scalar_subquery()
    debits = sa.select(total).where(Transfer.source_id == Account.id).scalar_subquery()
    transfers = sa.select(sa.func.count(Transfer.id)).scalar_subquery()
    # One statement, so one snapshot: balances and ledger agree on every database.
    columns = (Account.id, Account.opening, Account.balance, credits, debits, transfers)
    rows = txn.session.execute(sa.select(*columns).order_by(Account.id)).all()
    accounts = [
        {
            "id": id_,
            "opening": opening,
            "balance": balance,
            "credits": credit,
            "debits": debit,
            "reconciled": balance == opening + credit - debit,
        }
        for id_, opening, balance, credit, debit, _ in rows
    ]
    return {
        "database": txn.engine.dialect.name,
        "transactions": monitor().snapshot(),
        "accounts": accounts,
        "transfers": rows[0][5] if rows else 0,
        "total": sum(account["balance"] for account in accounts),
        "opening_total": sum(account["opening"] for account in accounts),
    }


@bp.get("/transfers")
@atomic(replica=True)
def ledger() -> Any:
    """The latest transfers with both accounts' balances now (``?limit=``, 20 at most)."""
    limit = min(request.args.get("limit", 20, type=int), 20)
    # Both accounts in the same query (a JOIN each): touching transfer.source in the
    # loop below would otherwise send one query per transfer, the N+1 flask-txn warns of.
    query = (
        sa.select(Transfer)
        .options(joinedload(Transfer.source), joinedload(Transfer.target))
        .order_by(Transfer.id.desc())
        .limit(limit)
    )
    return [
        {
            **transfer.as_json(),
            "balances": {"from": transfer.source.balance, "to": transfer.target.balance},
        }
        for transfer in txn.session.scalars(query)
    ]


@bp.get("/")
def dashboard() -> Response:
    """The live page: everything inline, so the policy forbids loading anything else."""
    page = resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
        " img-src data:; connect-src 'self'; form-action 'none'; base-uri 'none'"
    )
    return response
