"""Concurrency control inside an atomic block: ordered row locks, version columns, advisory locks.

- :func:`lock_rows` locks rows by primary key in one ``SELECT ... FOR ...`` in
  primary-key order, so transactions that take their row locks through it
  cannot deadlock on those rows.
- :class:`Versioned` adds SQLAlchemy's ``version_id_col``: a lost update raises
  ``StaleDataError``, which ``@atomic(retry_on=StaleDataError)`` re-runs.
- :func:`advisory_lock` and :func:`try_advisory_lock` take PostgreSQL's
  transaction-scoped advisory locks on a string or integer key.

Every lock here lasts until the transaction (or the savepoint it was taken in)
ends, so each function refuses to run outside an atomic block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, Mapper, Session, declared_attr, mapped_column

from ._config import check_flag
from ._errors import ConfigError, UsageError
from ._state import app_state
from ._transaction import current_on

T = TypeVar("T")

LockMode = Literal["no key update", "update", "share", "key share"]

#: Lock strength -> ``with_for_update()``'s (read, key_share). PostgreSQL renders
#: all four; SQLAlchemy renders the nearest lock other server databases have.
_MODES: dict[str, tuple[bool, bool]] = {
    "no key update": (False, True),
    "update": (False, False),
    "share": (True, False),
    "key share": (True, True),
}
_ALLOWED_MODES = ", ".join(repr(mode) for mode in _MODES)
_MYSQL_NO_ADVISORY = (
    " MySQL's and MariaDB's GET_LOCK locks belong to the connection, not the"
    " transaction, so the pool would keep them past the block: lock a row that"
    " stands for the resource with lock_rows() instead."
)
#: Why a database has no advisory lock of a transaction, and what to do instead.
_NO_ADVISORY = {
    "sqlite": " On SQLite a writer already excludes every other writer: start the block"
    " with a write, or use lock_rows() and @atomic's retries.",
    "mysql": _MYSQL_NO_ADVISORY,
    "mariadb": _MYSQL_NO_ADVISORY,
}
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


# -- ordered row locks --------------------------------------------------------


@overload
def lock_rows(
    entity: type[T],
    ids: Iterable[Any],
    *,
    mode: LockMode = ...,
    nowait: bool = ...,
    skip_locked: bool = ...,
) -> dict[Any, T]: ...


@overload
def lock_rows(
    entity: sa.Table,
    ids: Iterable[Any],
    *,
    mode: LockMode = ...,
    nowait: bool = ...,
    skip_locked: bool = ...,
) -> dict[Any, sa.Row[Any]]: ...


def lock_rows(
    entity: Any,
    ids: Iterable[Any],
    *,
    mode: LockMode = "no key update",
    nowait: bool = False,
    skip_locked: bool = False,
) -> dict[Any, Any]:
    """Lock rows by primary key, in primary-key order, in one statement; return them by key.

    Runs ``SELECT ... WHERE pk IN (...) ORDER BY pk FOR <mode>`` on the current
    app's session. Objects already in the session are refreshed from the locked
    rows. Ids that match no row (or, with ``skip_locked``, a row locked by
    another transaction) are absent from the result; duplicates count once. On
    SQLite, which has no row locks, the same SELECT runs without a lock clause.
    See :doc:`/locking`.

    :param entity: a mapped class (the result holds its objects) or a
        :class:`~sqlalchemy.schema.Table` (the result holds rows).
    :param ids: primary key values; tuples of values for a composite primary key.
    :param mode: the lock strength: ``"no key update"`` (the default),
        ``"update"``, ``"share"`` or ``"key share"``, as PostgreSQL's ``FOR ...``.
        MySQL and MariaDB have two strengths: the first two lock ``FOR UPDATE``
        (which also makes an insert of a row referencing a locked one wait),
        the last two ``LOCK IN SHARE MODE`` (``FOR SHARE`` on MySQL 8).
    :param nowait: fail with the database's lock-not-available error (SQLSTATE
        ``55P03`` on PostgreSQL, ``1205`` on MariaDB, ``3572`` on MySQL) instead
        of waiting for a row another transaction holds.
    :param skip_locked: leave out rows another transaction holds instead of waiting.
    :return: the locked objects or rows keyed by primary key value (a tuple for a
        composite key) as loaded, in primary-key order.
    """
    strength = _check_mode(mode)
    check_flag("nowait", nowait)
    check_flag("skip_locked", skip_locked)
    if nowait and skip_locked:
        raise ConfigError(
            "'nowait=True' and 'skip_locked=True' cannot be combined: NOWAIT fails when a"
            " row is locked, SKIP LOCKED leaves it out. Choose one of them."
        )
    mapper, table, columns = _primary_key_of(entity)
    keys = _check_ids(ids, table, columns)
    session = _session_in_block("lock_rows")
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        for name, value in (("nowait", nowait), ("skip_locked", skip_locked)):
            if value:
                raise ConfigError(
                    f"{name}={value!r} needs row locks, which SQLite does not have; the"
                    f" database is {dialect!r}. Use {name}=False (the default) on SQLite,"
                    " where a writer locks the whole database."
                )
    if not keys:
        return {}
    wanted = columns[0].in_(keys) if len(columns) == 1 else sa.tuple_(*columns).in_(keys)
    statement = sa.select(entity if mapper is not None else table).where(wanted)
    # PostgreSQL sorts first and locks each row as it leaves the sort, so the
    # ORDER BY is the lock order, whatever order the ids came in.
    statement = statement.order_by(*columns)
    if dialect != "sqlite":
        read, key_share = _MODES[strength]
        statement = statement.with_for_update(
            read=read, key_share=key_share, nowait=nowait, skip_locked=skip_locked
        )
    if mapper is not None:
        # An object loaded before the lock may hold values another transaction
        # has since changed: overwrite them with the locked row's.
        statement = statement.execution_options(populate_existing=True)
        objects = session.scalars(statement).all()
        return {_key(mapper.primary_key_from_instance(obj)): obj for obj in objects}
    rows = session.execute(statement).all()
    return {_key([row._mapping[column] for column in columns]): row for row in rows}


def _key(values: Sequence[Any]) -> Any:
    return values[0] if len(values) == 1 else tuple(values)


def _check_mode(mode: object) -> str:
    if isinstance(mode, str):
        normalised = " ".join(mode.replace("_", " ").lower().split())
        if normalised in _MODES:
            return normalised
    raise ConfigError(
        f"'mode' must be one of {_ALLOWED_MODES} (case-insensitive), got {mode!r}."
        " 'no key update', the default, is right for updating the rows' non-key columns."
    )


def _primary_key_of(entity: object) -> tuple[Mapper[Any] | None, sa.Table, list[sa.Column[Any]]]:
    """The mapper (None for a Table), the table and the primary key columns of ``entity``."""
    if isinstance(entity, sa.Table):
        if not entity.primary_key.columns:
            raise ConfigError(
                f"'entity' {entity.name!r} has no primary key, and lock_rows finds rows by"
                " primary key. Give the table a primary key, or lock its rows with your"
                " own SELECT ... FOR UPDATE."
            )
        return None, entity, list(entity.primary_key.columns)
    mapper = sa.inspect(entity, raiseerr=False) if isinstance(entity, type) else None
    if not isinstance(mapper, Mapper) or not isinstance(mapper.local_table, sa.Table):
        raise ConfigError(
            f"'entity' must be a mapped class or a Table, got {entity!r}. Pass the model"
            " class itself, e.g. lock_rows(Account, [1, 2])."
        )
    return mapper, mapper.local_table, list(mapper.primary_key)


def _check_ids(ids: object, table: sa.Table, columns: list[sa.Column[Any]]) -> list[Any]:
    """The distinct keys in ``ids``: values, or tuples of values for a composite key."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise ConfigError(
            f"'ids' must be an iterable of primary key values, got {ids!r}. Pass a list,"
            f" e.g. [{ids!r}] for one row."
        )
    keys: dict[Any, None] = {}
    for key in ids:
        if len(columns) > 1:
            if isinstance(key, str | bytes) or not isinstance(key, Iterable):
                key = (key,)  # reported below: the length cannot match
            key = tuple(key)
            if len(key) != len(columns):
                names = ", ".join(column.name for column in columns)
                raise ConfigError(
                    f"'ids' must hold tuples of {len(columns)} values for the composite"
                    f" primary key ({names}) of {table.name!r}, got {key!r}."
                )
        try:
            keys[key] = None
        except TypeError:
            raise ConfigError(
                f"'ids' must hold primary key values (hashable: numbers, strings, UUIDs,"
                f" or tuples of them for a composite key), got {key!r}."
            ) from None
    return list(keys)


def _session_in_block(name: str) -> Session:
    """The current app's session, refusing to go on outside an atomic block."""
    state = app_state(user=f"{name!r} was used")
    session = state.registry()
    if current_on(session) is None:
        raise UsageError(
            f"{name!r} was called outside of an atomic block: the transaction would end, and"
            " release the lock, before the code that needs it runs. Call it inside"
            " '@atomic' or 'with atomic():'."
        )
    return session


# -- optimistic concurrency ---------------------------------------------------


class Versioned:
    """Mixin for a mapped class: a ``version`` column checked and bumped by every UPDATE.

    ``version`` is an integer, 1 when the row is inserted; its server default
    of 1 fills existing rows when a migration adds the column. It is the
    mapper's ``version_id_col``: SQLAlchemy adds ``AND version = <the version
    loaded>`` to each UPDATE and DELETE of the object and raises
    :class:`~sqlalchemy.orm.exc.StaleDataError` when no row matched, because
    another transaction changed the row since it was loaded. Retry with
    ``@atomic(retry_on=StaleDataError)``. A model that defines its own
    ``__mapper_args__`` must include ``"version_id_col": cls.version`` in them.
    """

    version: Mapped[int] = mapped_column(nullable=False, server_default=sa.text("1"))

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        return {"version_id_col": cls.version}


# -- advisory locks -----------------------------------------------------------


def advisory_lock_key(key: str | int) -> int:
    """The signed 64-bit number that the advisory lock functions lock for ``key``.

    An int is used as it is. A string is encoded as UTF-8 and hashed with
    SHA-256; the first 8 bytes, read as a big-endian signed integer, are the
    number. The same string gives the same number in every process, and
    PostgreSQL computes it too::

        SELECT ('x' || left(encode(sha256(convert_to('invoice:42', 'UTF8')), 'hex'), 16))
               ::bit(64)::bigint

    :param key: a string, or an int from ``-2**63`` to ``2**63 - 1``.
    """
    if isinstance(key, str):
        # Never hash(): it is salted per process, and every process (and
        # every other client) must agree on the number.
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big", signed=True)
    if isinstance(key, int) and not isinstance(key, bool):
        if not _INT64_MIN <= key <= _INT64_MAX:
            raise ConfigError(
                f"'key' must fit in a signed 64-bit integer (from -2**63 to 2**63 - 1),"
                f" got {key!r}. Use a smaller number, or a string, which is hashed to 64 bits."
            )
        return key
    raise ConfigError(
        f"'key' must be a str or an int, got {key!r} of type {type(key).__name__}. Use"
        " a string naming what the lock protects, e.g. 'invoice:42', or an int."
    )


def advisory_lock(key: str | int, *, shared: bool = False) -> None:
    """Take a PostgreSQL advisory lock on ``key`` until the transaction ends, waiting for it.

    Runs ``pg_advisory_xact_lock`` (``pg_advisory_xact_lock_shared`` if
    ``shared``). The lock is released at commit or rollback, or when the
    savepoint it was taken in rolls back; it cannot be released earlier. The
    wait is unbounded unless the block sets ``lock_timeout``.

    :param key: a string (hashed, see :func:`advisory_lock_key`) or a 64-bit int.
    :param shared: take a shared lock: shared holders do not exclude each
        other, only exclusive ones.
    """
    _advisory("advisory_lock", key, shared=shared, wait=True)


def try_advisory_lock(key: str | int, *, shared: bool = False) -> bool:
    """Take a PostgreSQL advisory lock on ``key`` if no other transaction holds it.

    Runs ``pg_try_advisory_xact_lock`` (or its ``_shared`` variant) and never
    waits. A lock taken is held until the transaction ends, like
    :func:`advisory_lock`'s.

    :param key: a string (hashed, see :func:`advisory_lock_key`) or a 64-bit int.
    :param shared: take a shared lock: shared holders do not exclude each
        other, only exclusive ones.
    :return: True if the lock is now held, False if another transaction holds it.
    """
    return _advisory("try_advisory_lock", key, shared=shared, wait=False)


def _advisory(name: str, key: str | int, *, shared: bool, wait: bool) -> bool:
    number = advisory_lock_key(key)
    check_flag("shared", shared)
    session = _session_in_block(name)
    dialect = session.get_bind().dialect.name
    if dialect != "postgresql":
        raise UsageError(
            f"{name!r} needs PostgreSQL's advisory locks; the database is {dialect!r}."
            + _NO_ADVISORY.get(dialect, _NO_ADVISORY["sqlite"])
        )
    result = session.scalar(xact_lock(number, shared=shared, wait=wait))
    # pg_advisory_xact_lock returns void (None); the try variants a boolean.
    return True if wait else bool(result)


def xact_lock(number: int, *, shared: bool = False, wait: bool = True) -> sa.Select[Any]:
    """The statement that takes PostgreSQL's transaction-level advisory lock ``number``."""
    function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    if shared:
        function += "_shared"
    # The cast picks the one-bigint form, not the (int, int) pair, whatever
    # integer type the driver sends.
    argument = sa.cast(sa.bindparam("key", number), sa.BigInteger)
    return sa.select(getattr(sa.func, function)(argument))
