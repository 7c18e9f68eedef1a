"""An adopted app's other Flask-SQLAlchemy binds inside a block: the block's
options applied on each as the block first uses it, and its errors recorded.

The default bind gets the block's options before any statement
(``_options.apply``). Another bind is connected only when a statement needs it,
inside the block, so its options are sent as SQL at that moment, before its
first statement: ``SET TRANSACTION``, and the block's timeouts as
``_timeouts.set_block_timeouts`` sets them on the default bind.
"""

from __future__ import annotations

import functools

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from ._listeners import record_on
from ._options import Options
from ._session import JOINED
from ._timeouts import set_block_timeouts
from ._transaction import current, current_on


def watch_binds(factory: sessionmaker[Session], default: Engine, others: list[Engine]) -> None:
    """Apply blocks' options on, and record their errors from, the ``others`` engines."""
    # An app without binds pays nothing per transaction: no listener at all.
    if others and not event.contains(factory, "after_begin", apply_on_other_bind):
        event.listen(factory, "after_begin", apply_on_other_bind)
    for engine in others:
        event.listen(engine, "handle_error", functools.partial(_record_bind_error, default))


def apply_on_other_bind(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    """``after_begin``: the block's options on a bind other than its default one."""
    attempt = current_on(session)
    if attempt is None or transaction is not attempt.root or connection.engine is attempt.engine:
        return
    options = attempt.options
    if options.plain or session.info.get(JOINED):
        return
    characteristics = _characteristics(options, connection.dialect.name)
    if characteristics:
        # Validated keywords only: never user text.
        connection.exec_driver_sql(f"SET TRANSACTION {', '.join(characteristics)}")
    if options.statement_timeout is not None or options.lock_timeout is not None:
        set_block_timeouts(connection, options.statement_timeout, options.lock_timeout)


def _characteristics(options: Options, dialect: str) -> list[str]:
    """The ``SET TRANSACTION`` characteristics of ``options``, for a transaction that
    has run no statement yet."""
    if dialect == "sqlite":
        # SQLite's transactions are serializable; the BEGIN mode was chosen already.
        return []
    characteristics = []
    if options.isolation is not None:
        characteristics.append(f"ISOLATION LEVEL {options.isolation}")
    if options.readonly:
        characteristics.append("READ ONLY")
    if options.deferrable:
        characteristics.append("DEFERRABLE")
    return characteristics


def _record_bind_error(default: Engine, context: ExceptionContext) -> None:
    """``handle_error`` of another bind: an error of the app's open block, if any."""
    attempt = current()
    if attempt is None or attempt.engine is not default or context.is_pre_ping:
        return
    record_on(attempt, context)
