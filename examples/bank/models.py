"""The bank's tables: accounts and a ledger of transfers, one row per idempotency key."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from flask_txn import FlaskTxn

txn = FlaskTxn()


class Base(DeclarativeBase):
    pass


class Account(Base):
    """An account: its balance now, and the balance it opened with (for reconciliation)."""

    __tablename__ = "bank_account"
    __table_args__ = (sa.CheckConstraint("balance >= 0", name="bank_account_not_overdrawn"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    opening: Mapped[int]
    balance: Mapped[int]


class Transfer(Base):
    """One entry of the ledger: money moved from one account to another, in cents.

    ``key`` is the client's ``Idempotency-Key``, kept for the record. ``@idempotent``
    answers a repeat of the key from its own table; the unique constraint here is
    a last line of defence: the same key can never be applied twice.
    """

    __tablename__ = "bank_transfer"
    __table_args__ = (
        sa.CheckConstraint("amount > 0", name="bank_transfer_positive"),
        sa.CheckConstraint("source_id <> target_id", name="bank_transfer_two_accounts"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # 255: the longest key @idempotent accepts.
    key: Mapped[str] = mapped_column(sa.String(255), unique=True)
    source_id: Mapped[int] = mapped_column(sa.ForeignKey(Account.id), index=True)
    target_id: Mapped[int] = mapped_column(sa.ForeignKey(Account.id), index=True)
    amount: Mapped[int]
    source: Mapped[Account] = relationship(foreign_keys=[source_id])
    target: Mapped[Account] = relationship(foreign_keys=[target_id])

    def as_json(self) -> dict[str, object]:
        """The transfer as the API returns it, first time and on every replay."""
        return {
            "id": self.id,
            "key": self.key,
            "from": self.source_id,
            "to": self.target_id,
            "amount": self.amount,
        }
