"""``on_commit`` callbacks: what is kept of each, and running them after COMMIT."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("flask_txn")

#: An ``on_commit`` callback: the savepoints open when it was registered (it is
#: dropped if one of them rolls back), the callable, and whether its exception
#: is swallowed.
Callback = tuple[tuple[Any, ...], Callable[[], object], bool]


def run_callbacks(callbacks: list[Callback]) -> None:
    """Run every callback in order; log each failure, then raise the first not robust."""
    first: BaseException | None = None
    for _, func, robust in callbacks:
        try:
            func()
        except Exception as exc:
            log.exception("on_commit callback %r raised after the commit.", func)
            if not robust and first is None:
                first = exc
    if first is not None:
        raise first
