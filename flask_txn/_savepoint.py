"""Nested blocks: savepoints on the current attempt, and ``on_commit``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy.exc import ResourceClosedError
from sqlalchemy.orm import SessionTransaction

from ._config import check_flag
from ._errors import ConfigError, UsageError
from ._transaction import Attempt, current


class Savepoint:
    """A nested block: a SAVEPOINT, and the ``on_commit`` callbacks registered under it.

    Sync code enters it with ``with``; async code with ``async with``, which
    runs the same steps through ``AsyncSession.run_sync``.
    """

    __slots__ = ("attempt", "nested")

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        self.nested: SessionTransaction | None = None

    def __enter__(self) -> None:
        self.nested = self.attempt.session.begin_nested()
        self.attempt.savepoints.append(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.attempt.savepoints.pop()
        assert self.nested is not None
        if exc is None:
            try:
                self.nested.commit()
            except BaseException:
                self._rollback()
                raise
            # Released: what a MySQL lock error undid in here is the enclosing level's now.
            depth = len(self.attempt.savepoints)
            self.attempt.lock_failures = [
                (min(level, depth), error) for level, error in self.attempt.lock_failures
            ]
            return
        self._rollback()

    async def __aenter__(self) -> None:
        await self.attempt.run_sync(self.__enter__)

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.attempt.run_sync(self.__exit__, *exc_info)

    def _rollback(self) -> None:
        attempt = self.attempt
        assert self.nested is not None
        # A failed flush leaves the savepoint inactive but open: it still needs
        # its ROLLBACK TO SAVEPOINT. One that user code already ended is closed.
        with contextlib.suppress(ResourceClosedError):
            self.nested.rollback()
        # Work undone here will never commit: neither will what it registered.
        attempt.callbacks = [entry for entry in attempt.callbacks if self not in entry[0]]
        # Statements a MySQL lock error undid in here are undone with the rest.
        depth = len(attempt.savepoints)
        attempt.lock_failures = [entry for entry in attempt.lock_failures if entry[0] <= depth]


def on_commit(func: Callable[[], object], *, robust: bool = False) -> None:
    """Run ``func()`` once the outermost atomic block has committed.

    It never runs if the transaction, the savepoint it was registered in, or the
    attempt rolls back. Callbacks run in registration order after the
    :data:`transaction_committed` signal, outside any block. Every callback
    runs; a failure is logged, and with ``robust=False`` the first one is
    re-raised to the caller after the others ran (the data stays committed).

    :param func: a callable taking no arguments.
    :param robust: log and swallow an exception from ``func`` instead of raising it.
    """
    if not callable(func):
        raise ConfigError(
            f"'on_commit' needs a callable taking no arguments, got {func!r}. Pass the"
            " function itself (or functools.partial(f, ...)), not its result."
        )
    check_flag("robust", robust)
    attempt = current()
    if attempt is None:
        raise UsageError(
            "'on_commit' was called outside of an atomic block, so there is no commit to"
            " wait for. Call it inside '@atomic' or 'with atomic():'."
        )
    attempt.callbacks.append((tuple(attempt.savepoints), func, robust))
