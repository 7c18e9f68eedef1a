"""Type-checked by mypy in CI (not run): decorated functions keep their signatures."""

from __future__ import annotations

from typing import assert_type

from flask_txn import Atomic, FlaskTxn, atomic

txn = FlaskTxn()


@atomic
def bare(a: int, *, b: str) -> float:
    return 1.0


@atomic(isolation="SERIALIZABLE", retries=3)
def configured(a: int) -> str:
    return ""


assert_type(bare(1, b="x"), float)
assert_type(configured(1), str)
assert_type(atomic(retries=1), Atomic)
bare("not an int", b="x")  # type: ignore[arg-type]
configured(1, 2)  # type: ignore[call-arg]

with atomic() as session:
    session.flush()
