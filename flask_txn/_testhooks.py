"""The one seam through which the pytest plugin (``flask_txn.testing``) reaches
the commit path: fault injection before the flush, and the capture of
``on_commit`` callbacks. Outside tests both lists are empty.

The retry loop's waits and jitter are the other things tests replace; they are
the config keys ``TXN_RETRY_SLEEP`` and ``TXN_RETRY_RANDOM``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy.orm import Session

H = TypeVar("H")


@contextlib.contextmanager
def added(hooks: list[H], hook: H) -> Iterator[None]:
    """Add ``hook`` to one of the lists below for the duration of the block."""
    hooks.append(hook)
    try:
        yield
    finally:
        hooks.remove(hook)


class TestHooks:
    """What the pytest plugin has asked the core to do at each commit."""

    __slots__ = ("captures", "injectors")

    def __init__(self) -> None:
        #: each may raise a real database error just before the outermost flush.
        self.injectors: list[Callable[[Session], None]] = []
        #: each receives the callbacks of a commit, and returns whether they still run.
        self.captures: list[Callable[[list[Callable[[], object]]], bool]] = []

    def before_commit(self, session: Session) -> None:
        """Just before the outermost block flushes and commits."""
        for inject in self.injectors:
            inject(session)

    def release(self, callbacks: Sequence[tuple[Any, Callable[[], object], bool]]) -> bool:
        """After COMMIT: whether the ``on_commit`` callbacks run now."""
        if not self.captures:
            return True
        funcs = [func for _, func, _ in callbacks]
        # Every capture sees the callbacks; any of them may hold them back.
        return all([capture(funcs) for capture in self.captures])


hooks = TestHooks()
