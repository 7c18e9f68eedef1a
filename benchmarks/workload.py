"""The reference transfer workload: the ``accounts`` table and the pgbench scripts' SQL.

flask-txn runs the statements it reads from the same ``sql/*.sql`` files that
pgbench runs, so both sides send the same SQL by construction: pgbench's
``:name`` variables are SQLAlchemy's bind parameters.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import sqlalchemy as sa

SQL_DIR = Path(__file__).resolve().with_name("sql")

#: Accounts for the hot scenarios (3, 4) and the cold one (2).
HOT = 10
COLD = 1000

metadata = sa.MetaData()
#: ``lock_rows`` locks rows of this table; the scripts name it as ``accounts``.
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
)

_BEGIN = re.compile(r"BEGIN ISOLATION LEVEL ([A-Z ]+);")


@dataclasses.dataclass(frozen=True)
class Script:
    """A pgbench script: its file, isolation level and statements between BEGIN and COMMIT."""

    name: str
    path: Path
    isolation: str
    statements: tuple[str, ...]


def script(name: str) -> Script:
    """Read ``sql/<name>.sql``."""
    path = SQL_DIR / f"{name}.sql"
    isolation = None
    statements: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("--", "\\set")) or line == "COMMIT;":
            continue
        begin = _BEGIN.fullmatch(line)
        if begin:
            isolation = begin.group(1)
            continue
        statements.append(line.removesuffix(";"))
    if isolation is None:
        raise ValueError(f"{path} has no 'BEGIN ISOLATION LEVEL ...;' line.")
    return Script(name, path, isolation, tuple(statements))


SERIALIZABLE = "transfer_ser"
READ_COMMITTED = "transfer_rc_plain"
ORDERED_LOCKS = "transfer_rc_forupdate_1stmt"
SCRIPTS = (SERIALIZABLE, READ_COMMITTED, ORDERED_LOCKS)


def reset_accounts(engine: sa.Engine, naccts: int) -> None:
    """A fresh ``accounts`` table of ``naccts`` rows, analysed: every run starts alike."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        metadata.drop_all(connection)
        metadata.create_all(connection)
        connection.execute(
            sa.text("INSERT INTO accounts SELECT g, 0 FROM generate_series(1, :n) AS g"),
            {"n": naccts},
        )
        connection.exec_driver_sql("VACUUM ANALYZE accounts")
