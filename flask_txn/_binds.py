"""An adopted app's other Flask-SQLAlchemy binds inside a block: the block's
options applied on each as the block first uses it, and its errors recorded.

The default bind gets the block's options before any statement
(``_options.apply``). Another bind is connected only when a statement needs it,
inside the block, so its options are sent as SQL at that moment, before its
first statement: ``SET TRANSACTION`` and ``SET LOCAL``.
"""

from __future__ import annotations

import functools

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from ._listeners import record_on
from ._options import Options
from ._session import JOINED
from ._timeouts import milliseconds
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
    if attempt.options.plain or session.info.get(JOINED):
        return
    for statement in statements(attempt.options, connection.dialect.name):
        connection.exec_driver_sql(statement)


def statements(options: Options, dialect: str) -> list[str]:
    """What sets ``options`` on a transaction that has run no statement yet."""
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
    # Validated keywords and integers only: never user text.
    sql = [f"SET TRANSACTION {', '.join(characteristics)}"] if characteristics else []
    for setting, seconds in (
        ("statement_timeout", options.statement_timeout),
        ("lock_timeout", options.lock_timeout),
    ):
        if seconds is not None:
            sql.append(f"SET LOCAL {setting} = {milliseconds(seconds)}")
    return sql


def _record_bind_error(default: Engine, context: ExceptionContext) -> None:
    """``handle_error`` of another bind: an error of the app's open block, if any."""
    attempt = current()
    if attempt is None or attempt.engine is not default or context.is_pre_ping:
        return
    record_on(attempt, context)
