"""FlaskTxn(app, db=db): flask-txn adopts Flask-SQLAlchemy's engines and session."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import alembic
import alembic.command
import alembic.config
import pytest
import sqlalchemy as sa
from flask import Flask, abort
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_txn import (
    ConfigError,
    FlaskTxn,
    PartialCommitError,
    PendingWritesError,
    TransactionAbortedError,
    UsageError,
    atomic,
    on_commit,
)
from flask_txn.testing import Faults, SignalRecorder, txn_faults, txn_signals

from .conftest import new_database

__all__ = ["txn_faults", "txn_signals"]  # the plugin's fixtures, used here


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Note(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


class Audit(db.Model):  # type: ignore[name-defined,misc]
    __bind_key__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


DOCS_ADOPTING = Path(__file__).resolve().parent.parent / "docs" / "adopting.md"

MakeApp = Callable[..., tuple[Flask, FlaskTxn]]


@pytest.fixture
def make_fsa_app(database_url: str, tmp_path: Path) -> Iterator[MakeApp]:
    """Build apps with Flask-SQLAlchemy on ``database_url`` and flask-txn adopting it."""
    made: list[Flask] = []

    def make(binds: dict[str, str] | None = None, **config: Any) -> tuple[Flask, FlaskTxn]:
        app = Flask(f"fsa{len(made)}", instance_path=str(tmp_path / "instance"))
        app.config.update(
            TESTING=True, SQLALCHEMY_DATABASE_URI=database_url, SQLALCHEMY_BINDS=binds or {}
        )
        app.config.update(config)
        db.init_app(app)
        made.append(app)
        txn = FlaskTxn(app, db=db)
        keys: list[str | None] = [None, *(binds or {})]
        with app.app_context():
            db.drop_all(bind_key=keys)
            db.create_all(bind_key=keys)
        return app, txn

    yield make
    for app in made:
        with app.app_context():
            for engine in db.engines.values():
                assert engine.pool.checkedout() == 0, "a test leaked a connection"
                engine.dispose()


@pytest.fixture
def fsa(make_fsa_app: MakeApp) -> tuple[Flask, FlaskTxn]:
    """One adopted app on the current engine."""
    return make_fsa_app()


def _count(app: Flask, model: Any = Note) -> int:
    with app.app_context():
        return int(db.session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def test_txn_session_is_db_session(fsa: tuple[Flask, FlaskTxn]) -> None:
    """Within a request, txn.session() is db.session() and txn.engine is db.engine."""
    app, txn = fsa
    with app.test_request_context():
        assert (txn.session() is db.session(), txn.engine is db.engine) == (True, True)
    with app.app_context():
        assert app.config["TXN_DATABASE_URI"] == db.engine.url.render_as_string(hide_password=False)


def test_factory_form(database_url: str) -> None:
    """FlaskTxn(db=db) then init_app(app) adopts the same way."""
    txn = FlaskTxn(db=db)
    app = Flask("factory")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    db.init_app(app)
    txn.init_app(app)
    with app.app_context():
        assert (txn.session() is db.session(), txn.engine is db.engine) == (True, True)
        db.engine.dispose()


def test_helpers_see_the_blocks_writes_and_roll_back(fsa: tuple[Flask, FlaskTxn]) -> None:
    """Model.query, get_or_404, first_or_404 and paginate run in the block's transaction:
    they see its uncommitted writes, and a veto or an exception rolls it all back."""
    app, txn = fsa
    seen: list[Any] = []

    @app.post("/write/<int:status>")
    @atomic
    def write(status: int) -> Any:
        db.session.add(Note(id=1, text="draft"))
        db.session.flush()
        seen.append(
            (
                Note.query.count(),
                db.get_or_404(Note, 1).text,
                db.first_or_404(sa.select(Note)).text,
                db.paginate(sa.select(Note), page=1, per_page=5).total,
                txn.session.get(Note, 1) is db.session.get(Note, 1),
            )
        )
        if status == 500:
            raise RuntimeError("boom")
        return "written", status

    client = app.test_client()
    assert client.post("/write/400").status_code == 400
    with pytest.raises(RuntimeError):
        client.post("/write/500")
    assert (_count(app), seen) == (0, [(1, "draft", "draft", 1, True)] * 2)
    assert client.post("/write/200").status_code == 200
    assert _count(app) == 1


def test_missing_row_still_404s_inside_a_block(fsa: tuple[Flask, FlaskTxn]) -> None:
    """get_or_404 in a block: the 404 is a veto, the block rolls back."""
    app, _ = fsa

    @app.post("/missing")
    @atomic
    def missing() -> Any:
        db.session.add(Note(text="lost"))
        return db.get_or_404(Note, 99).text

    assert (app.test_client().post("/missing").status_code, _count(app)) == (404, 0)


def test_db_session_commit_inside_a_block_is_refused(fsa: tuple[Flask, FlaskTxn]) -> None:
    """db.session.commit() in a block raises UsageError, as txn.session.commit() does,
    and nothing is committed."""
    app, _ = fsa

    @atomic
    def commit_early() -> None:
        db.session.add(Note(text="early"))
        db.session.commit()

    with app.app_context(), pytest.raises(UsageError, match=r"'session.commit\(\)' was called"):
        commit_early()
    assert _count(app) == 0


def test_retry_reruns_the_view(
    fsa: tuple[Flask, FlaskTxn], txn_faults: Faults, txn_signals: SignalRecorder
) -> None:
    """A retriable error re-runs the whole view on db.session; signals and on_commit too."""
    app, _ = fsa
    calls: list[int] = []
    committed: list[int] = []

    @app.post("/add")
    @atomic
    def add() -> str:
        calls.append(1)
        note = Note(text="once")
        db.session.add(note)
        db.session.flush()
        on_commit(lambda: committed.append(note.id))
        return "ok"

    txn_faults.fail_next(1)
    assert app.test_client().post("/add").status_code == 200
    txn_signals.assert_retried_then_committed(1)
    assert (len(calls), _count(app), len(committed)) == (2, 1, 1)
    assert txn_signals.events[-1][1]["session"] is not None


def test_teardown_reports_discarded_writes(
    fsa: tuple[Flask, FlaskTxn], caplog: pytest.LogCaptureFixture, txn_signals: SignalRecorder
) -> None:
    """db.session writes left uncommitted outside a block are reported at teardown,
    not discarded silently as Flask-SQLAlchemy alone would."""
    app, _ = fsa

    @app.post("/forgot")
    def forgot() -> str:
        db.session.add(Note(text="forgotten"))
        return "ok"

    with caplog.at_level(logging.WARNING, "flask_txn"):
        assert app.test_client().post("/forgot").status_code == 200
    assert "Uncommitted writes were rolled back" in caplog.text
    assert [(name, payload["reason"]) for name, payload in txn_signals.events] == [
        ("transaction-rolled-back", "teardown")
    ]
    assert _count(app) == 0


def test_teardown_removes_the_session_when_another_teardown_raises(
    fsa: tuple[Flask, FlaskTxn],
) -> None:
    """flask-txn's teardown, not Flask-SQLAlchemy's, removes the session: even after
    a teardown function raised, the next context gets a new session."""
    app, _ = fsa

    @app.teardown_appcontext
    def broken(_exc: BaseException | None) -> None:
        raise LookupError("teardown failed")

    with pytest.raises(LookupError), app.app_context():
        first = db.session()
    with app.app_context():
        app.teardown_appcontext_funcs.remove(broken)
        assert db.session() is not first


def test_the_former_hang_is_impossible(fsa: tuple[Flask, FlaskTxn]) -> None:
    """txn.session and db.session updating one row in one view: one session, one
    transaction, so the request can no longer wait on its own row lock."""
    app, txn = fsa
    with app.app_context(), atomic():
        db.session.add(Note(id=1, text="v0"))

    @app.post("/both")
    @atomic(retries=0)
    def both() -> str:
        txn.session.execute(sa.update(Note).where(Note.id == 1).values(text="v1"))
        db.session.execute(sa.update(Note).where(Note.id == 1).values(text="v2"))
        return "ok"

    assert app.test_client().post("/both").status_code == 200
    with app.app_context():
        assert db.session.get(Note, 1).text == "v2"  # type: ignore[union-attr]


def test_pending_writes_before_a_block_are_refused(fsa: tuple[Flask, FlaskTxn]) -> None:
    """Writes made through db.session before a block are not swept into it."""
    app, _ = fsa
    with app.app_context():
        db.session.add(Note(text="before"))
        with pytest.raises(PendingWritesError, match="uncommitted writes"), atomic():
            pass
        db.session.rollback()


def test_async_views_are_refused(fsa: tuple[Flask, FlaskTxn]) -> None:
    """An async block cannot use db=: Flask-SQLAlchemy has no async session."""
    app, _ = fsa

    @atomic
    async def view() -> None:
        pass

    with app.app_context(), pytest.raises(UsageError, match=r"cannot use FlaskTxn\(db=db\)"):
        asyncio.run(view())


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_block_options_apply_to_db_session(fsa: tuple[Flask, FlaskTxn]) -> None:
    """Isolation, read-only and timeouts apply to work through db.session and Model.query."""
    app, _ = fsa

    @atomic(isolation="SERIALIZABLE", readonly=True, statement_timeout=3, lock_timeout=2)
    def read() -> tuple[Any, ...]:
        Note.query.all()
        return tuple(
            db.session.execute(sa.text(f"SHOW {name}")).scalar()
            for name in (
                "transaction_isolation",
                "transaction_read_only",
                "statement_timeout",
                "lock_timeout",
            )
        )

    @atomic(readonly=True)
    def write() -> None:
        db.session.add(Note(text="refused"))

    with app.app_context():
        assert read() == ("serializable", "on", "3s", "2s")
        with pytest.raises(sa.exc.InternalError, match="read-only transaction"):
            write()


# -- configuration --------------------------------------------------------------------------


def _fsa_app(url: str, **config: Any) -> Flask:
    app = Flask("fsa-config")
    app.config.update(SQLALCHEMY_DATABASE_URI=url, **config)
    db.init_app(app)
    return app


def test_same_database_uri_is_accepted(sqlite_url: str) -> None:
    """TXN_DATABASE_URI equal to SQLALCHEMY_DATABASE_URI is fine with db=."""
    app = _fsa_app(sqlite_url, TXN_DATABASE_URI=sqlite_url)
    txn = FlaskTxn(app, db=db)
    with app.app_context():
        assert txn.engine is db.engine


def test_a_different_database_uri_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    """A TXN_DATABASE_URI that differs from Flask-SQLAlchemy's names both keys."""
    app = _fsa_app(sqlite_url, TXN_DATABASE_URI=f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(ConfigError, match=r"'TXN_DATABASE_URI' is .*'SQLALCHEMY_DATABASE_URI'"):
        FlaskTxn(app, db=db)


def test_engine_keys_are_refused_with_db(sqlite_url: str) -> None:
    """TXN_ENGINE_OPTIONS would do nothing with db=: refused, naming the equivalent."""
    app = _fsa_app(sqlite_url, TXN_ENGINE_OPTIONS={"pool_size": 3})
    with pytest.raises(ConfigError, match=r"'TXN_ENGINE_OPTIONS' is set.*'SQLALCHEMY_ENGINE"):
        FlaskTxn(app, db=db)


def test_replicas_are_refused_with_db(sqlite_url: str) -> None:
    """Flask-SQLAlchemy's session picks its engine per model, so replica blocks could not
    run on a standby: TXN_REPLICA_URIS with db= is refused, the password hidden."""
    standby = "postgresql+psycopg2://reader:secret@127.0.0.1:1/db"
    app = _fsa_app(sqlite_url, TXN_REPLICA_URIS=[standby])
    with pytest.raises(
        ConfigError, match=r"'TXN_REPLICA_URIS' is set .*reader:\*\*\*@.*must be empty"
    ) as info:
        FlaskTxn(app, db=db)
    assert "secret" not in str(info.value)


def test_db_without_a_default_bind_is_refused(sqlite_url: str) -> None:
    """db= runs blocks on the default bind: an app with binds only is refused."""
    app = Flask("binds-only")
    app.config["SQLALCHEMY_BINDS"] = {"audit": sqlite_url}
    db.init_app(app)
    with pytest.raises(ConfigError, match=r"'SQLALCHEMY_DATABASE_URI' is not set.*\['audit'\]"):
        FlaskTxn(app, db=db)


def test_db_not_registered_is_refused(sqlite_url: str) -> None:
    """db= needs db.init_app(app) first."""
    app = Flask("unregistered")
    with pytest.raises(UsageError, match=r"not registered on app 'unregistered'.*db.init_app"):
        FlaskTxn(app, db=SQLAlchemy())


def test_without_db_the_same_database_is_refused(sqlite_url: str) -> None:
    """Without db=, flask-txn on Flask-SQLAlchemy's database is an error naming db=."""
    app = _fsa_app(sqlite_url, TXN_DATABASE_URI=sqlite_url)
    with pytest.raises(ConfigError, match=r"second session.*FlaskTxn\(app, db=db\)"):
        FlaskTxn(app)


@pytest.mark.parametrize("binds_only", [False, True], ids=["default-bind", "binds-only"])
def test_without_db_and_without_uri_is_refused(sqlite_url: str, binds_only: bool) -> None:
    """Without db= and without TXN_DATABASE_URI, the error names db= too."""
    app = Flask("no-uri")
    key = "SQLALCHEMY_BINDS" if binds_only else "SQLALCHEMY_DATABASE_URI"
    app.config[key] = {"audit": sqlite_url} if binds_only else sqlite_url
    db.init_app(app)
    with pytest.raises(ConfigError, match=r"'TXN_DATABASE_URI' is not set.*db=db"):
        FlaskTxn(app)


def test_without_db_a_relative_sqlite_path_is_refused(tmp_path: Path) -> None:
    """The same relative SQLite path names the same file to the user, though
    Flask-SQLAlchemy opens it in the instance folder: refused, naming db=."""
    app = Flask("relative", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite:///app.db", TXN_DATABASE_URI="sqlite:///app.db"
    )
    db.init_app(app)
    with pytest.raises(ConfigError, match=r"'TXN_DATABASE_URI' 'sqlite:///app.db' is the database"):
        FlaskTxn(app)


def test_an_unreadable_uri_with_db_names_both_keys(sqlite_url: str) -> None:
    """A TXN_DATABASE_URI that is not a URL, with db=, is refused naming both keys."""
    app = _fsa_app(sqlite_url, TXN_DATABASE_URI="not a url")
    with pytest.raises(ConfigError, match=r"'not a url', but 'SQLALCHEMY_DATABASE_URI'"):
        FlaskTxn(app, db=db)


def test_without_db_an_unreadable_uri_gets_the_usual_error(sqlite_url: str) -> None:
    """Without db=, a TXN_DATABASE_URI that is not a URL gets flask-txn's own message."""
    app = _fsa_app(sqlite_url, TXN_DATABASE_URI="not a url")
    with pytest.raises(ConfigError, match=r"'TXN_DATABASE_URI' .*not a url"):
        FlaskTxn(app)


@pytest.mark.parametrize(
    ("fsa_url", "txn_url", "same"),
    [
        (
            "postgresql+psycopg2://u@127.0.0.1:1/shop",
            "postgresql+psycopg://u@127.0.0.1:1/shop",
            True,
        ),
        ("postgresql+psycopg2://u@127.0.0.1:1/shop", "postgresql+psycopg2://u@127.0.0.1/x", False),
        ("sqlite:///:memory:", "sqlite:///:memory:", False),
        ("sqlite:///:memory:", "postgresql+psycopg2://u@127.0.0.1:1/shop", False),
    ],
    ids=["other-driver", "other-database", "memory", "other-backend"],
)
def test_without_db_the_same_database_whatever_the_driver(
    fsa_url: str, txn_url: str, same: bool
) -> None:
    """The same server and database through another driver is the same database;
    in-memory SQLite and other databases are not."""
    app = _fsa_app(fsa_url, TXN_DATABASE_URI=txn_url)
    if same:
        with pytest.raises(ConfigError, match="second session"):
            FlaskTxn(app)
        return
    txn = FlaskTxn(app)
    with app.app_context():
        txn.engine.dispose()
        db.engine.dispose()


def test_without_db_another_database_is_allowed(sqlite_url: str, tmp_path: Path) -> None:
    """flask-txn on another database than Flask-SQLAlchemy's is a plain second database."""
    app = _fsa_app(sqlite_url, TXN_DATABASE_URI=f"sqlite:///{tmp_path / 'other.db'}")
    txn = FlaskTxn(app)
    with app.app_context():
        assert txn.engine is not db.engine
        txn.engine.dispose()


# -- binds ------------------------------------------------------------------------------------


def _new_database(postgresql_url: str) -> Iterator[str]:
    """A new database on the test server, dropped afterwards."""
    with new_database(postgresql_url, f"fsa_{uuid.uuid4().hex[:12]}") as url:
        yield url.render_as_string(hide_password=False)


@pytest.fixture
def second_database(postgresql_url: str) -> Iterator[str]:
    """A second database on the test server, for a second bind."""
    yield from _new_database(postgresql_url)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"isolation": "REPEATABLE READ", "readonly": True, "lock_timeout": 2},
            ("repeatable read", "on", "off", "0", "2s"),
        ),
        (
            {"isolation": "SERIALIZABLE", "readonly": True, "deferrable": True},
            ("serializable", "on", "on", "0", "0"),
        ),
        ({"statement_timeout": 3}, ("read committed", "off", "off", "3s", "0")),
    ],
    ids=["isolation-readonly-lock", "deferrable", "statement-timeout"],
)
def test_options_apply_on_every_bind(
    make_fsa_app: MakeApp, second_database: str, options: dict[str, Any], expected: tuple[str]
) -> None:
    """Isolation, read-only and timeouts hold on a second bind the block touches."""
    app, _ = make_fsa_app(binds={"audit": second_database})

    @atomic(**options)
    def read() -> tuple[Any, ...]:
        Audit.query.all()
        connection = db.session.connection(bind_arguments={"bind": db.engines["audit"]})
        return tuple(
            connection.exec_driver_sql(f"SHOW {name}").scalar()
            for name in (
                "transaction_isolation",
                "transaction_read_only",
                "transaction_deferrable",
                "statement_timeout",
                "lock_timeout",
            )
        )

    with app.app_context():
        assert read() == expected


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_swallowed_error_on_another_bind_commits_nothing(
    make_fsa_app: MakeApp, second_database: str
) -> None:
    """A caught error that aborted a second bind's transaction stops the whole commit."""
    app, _ = make_fsa_app(binds={"audit": second_database})

    @atomic
    def swallow() -> None:
        db.session.add_all([Note(text="n"), Audit(text="a")])
        db.session.flush()
        connection = db.session.connection(bind_arguments={"bind": db.engines["audit"]})
        with contextlib.suppress(sa.exc.DBAPIError):
            connection.exec_driver_sql("SELECT 1/0")

    with app.app_context(), pytest.raises(TransactionAbortedError, match="on bind 'audit'"):
        swallow()
    with app.app_context(), pytest.raises(sa.exc.DataError):
        # Outside any block, an error on another bind is not an attempt's.
        db.session.connection(bind_arguments={"bind": db.engines["audit"]}).exec_driver_sql(
            "SELECT 1/0"
        )
    assert (_count(app, Audit), _count(app, Note)) == (0, 0)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_error_on_another_bind_is_found_after_the_default_bind(
    make_fsa_app: MakeApp, second_database: str
) -> None:
    """The default bind used first and healthy, a caught error on the second: nothing commits."""
    app, _ = make_fsa_app(binds={"audit": second_database})

    @atomic
    def swallow() -> None:
        db.session.add(Note(text="n"))
        db.session.flush()
        db.session.add(Audit(text="a"))
        db.session.flush()
        connection = db.session.connection(bind_arguments={"bind": db.engines["audit"]})
        with contextlib.suppress(sa.exc.DBAPIError):
            connection.exec_driver_sql("SELECT 1/0")

    with app.app_context(), pytest.raises(TransactionAbortedError, match="on bind 'audit'"):
        swallow()
    assert (_count(app, Audit), _count(app, Note)) == (0, 0)


def _deferred_unique(app: Flask, table: str, bind: str | None) -> None:
    """Make ``table``'s text unique, checked only at COMMIT."""
    with app.app_context(), db.engines[bind].begin() as connection:
        connection.exec_driver_sql(
            f"ALTER TABLE {table} ADD CONSTRAINT {table}_text_key UNIQUE (text)"
            " DEFERRABLE INITIALLY DEFERRED"
        )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_bind_partial_commit(
    make_fsa_app: MakeApp,
    second_database: str,
    txn_signals: SignalRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The other binds commit first, the default bind last: when the default bind's
    COMMIT fails, the audit bind's work is saved, and the error, the signal and the
    log say which bind committed; it is not retried."""
    app, _ = make_fsa_app(binds={"audit": second_database})
    _deferred_unique(app, "note", None)
    calls: list[int] = []

    @app.post("/both")
    @atomic
    def both() -> str:
        calls.append(1)
        db.session.add_all([Audit(text="audited"), Note(text="twice"), Note(text="twice")])
        return "ok"

    with caplog.at_level(logging.ERROR, "flask_txn"):
        response = app.test_client().post("/both")
    assert (response.status_code, len(calls)) == (502, 1)
    assert (_count(app, Audit), _count(app, Note)) == (1, 0)
    name, payload = txn_signals.events[-1]
    error = payload["error"]
    assert (name, type(error), error.committed, error.failed) == (
        "transaction-rolled-back",
        PartialCommitError,
        ["audit"],
        None,
    )
    assert "bind 'audit' committed, then COMMIT on the default bind failed" in caplog.text


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_bind_failure_before_any_commit_saves_nothing(
    make_fsa_app: MakeApp, second_database: str
) -> None:
    """When the first bind to commit fails, nothing is saved anywhere."""
    app, _ = make_fsa_app(binds={"audit": second_database})
    _deferred_unique(app, "audit", "audit")

    @atomic
    def both() -> None:
        db.session.add_all([Note(text="kept?"), Audit(text="same"), Audit(text="same")])

    with app.app_context(), pytest.raises(sa.exc.IntegrityError):
        both()
    assert (_count(app, Audit), _count(app, Note)) == (0, 0)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_serialization_failure_on_another_bind_is_retried(
    make_fsa_app: MakeApp, second_database: str, txn_signals: SignalRecorder
) -> None:
    """A retriable error raised on a second bind re-runs the block, even if caught."""
    app, _ = make_fsa_app(binds={"audit": second_database})
    calls: list[int] = []

    @atomic
    def audited() -> None:
        calls.append(1)
        db.session.add(Audit(text="ok"))
        if len(calls) == 1:
            connection = db.session.connection(bind_arguments={"bind": db.engines["audit"]})
            # Swallowed: the block must still be re-run.
            with contextlib.suppress(sa.exc.DBAPIError):
                connection.exec_driver_sql(
                    "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$"
                )

    with app.app_context():
        audited()
    txn_signals.assert_retried_then_committed(1)
    assert (len(calls), _count(app, Audit)) == (2, 1)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_binds_on_sqlite(make_fsa_app: MakeApp, tmp_path: Path) -> None:
    """Models with __bind_key__ work inside blocks on SQLite, and roll back together."""
    app, _ = make_fsa_app(binds={"audit": f"sqlite:///{tmp_path / 'audit.db'}"})

    @atomic
    def both(fail: bool) -> None:
        db.session.add(Note(text="n"))
        db.session.flush()
        with atomic():  # the audit bind is first used inside a savepoint
            db.session.add(Audit(text="a"))
            db.session.flush()
        if fail:
            abort(500)

    with app.app_context():
        with pytest.raises(Exception, match="Internal Server Error"):
            both(True)
        both(False)
    assert (_count(app, Audit), _count(app, Note)) == (1, 1)


# -- Flask-Migrate ----------------------------------------------------------------------------


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """Alembic's env.py configures logging from alembic.ini: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    disabled = {
        name: logger.disabled
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in disabled.items():
        logging.getLogger(name).disabled = was


@pytest.fixture
def migrations_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind, for migrations to fill."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrated.db'}"
        return
    yield from _new_database(request.getfixturevalue("postgresql_url"))


@pytest.mark.parametrize("migrations_url", ["sqlite", "postgresql"], indirect=True)
# Flask-Migrate's env.py template calls db.get_engine() first, which warns.
@pytest.mark.filterwarnings("ignore:'get_engine' is deprecated:DeprecationWarning")
def test_flask_migrate_in_an_adopted_app(
    migrations_url: str, tmp_path: Path, logging_restored: None
) -> None:
    """'flask db init', 'flask db migrate' and 'flask db upgrade' work in an app
    where flask-txn adopted Flask-SQLAlchemy, and the migrated table serves blocks."""
    migrate_db = SQLAlchemy(model_class=type("MigratedBase", (DeclarativeBase,), {}))

    class Order(migrate_db.Model):  # type: ignore[name-defined,misc]
        id: Mapped[int] = mapped_column(primary_key=True)
        total: Mapped[int]

    app = Flask("migrated", instance_path=str(tmp_path / "instance"))
    app.config["SQLALCHEMY_DATABASE_URI"] = migrations_url
    migrate_db.init_app(app)
    FlaskTxn(app, db=migrate_db)
    Migrate(app, migrate_db, directory=str(tmp_path / "migrations"))
    runner = app.test_cli_runner()
    results = [runner.invoke(args=["db", "init"])]
    env = tmp_path / "migrations" / "env.py"
    # Keep the app's loggers (flask_txn's among them) on: see docs/adopting.md.
    env.write_text(
        env.read_text().replace(
            "fileConfig(config.config_file_name)",
            "fileConfig(config.config_file_name, disable_existing_loggers=False)",
        )
    )
    results += [
        runner.invoke(args=["db", "migrate", "-m", "orders"]),
        runner.invoke(args=["db", "upgrade"]),
    ]
    assert [(r.exit_code, r.exception) for r in results] == [(0, None)] * 3, [
        r.output for r in results
    ]

    @atomic
    def order() -> int:
        migrate_db.session.add(Order(total=5))
        return int(migrate_db.session.scalar(sa.select(sa.func.count(Order.id))) or 0)

    with app.app_context():
        try:
            assert order() == 1
            assert sa.inspect(migrate_db.engine).has_table("alembic_version")
        finally:
            migrate_db.engine.dispose()


def test_one_db_serves_two_apps(database_url: str, tmp_path: Path) -> None:
    """One SQLAlchemy and one FlaskTxn serve two apps, each on its own engine and session."""
    txn = FlaskTxn(db=db)
    apps = []
    for name in ("one", "two"):
        app = Flask(name)
        app.config["SQLALCHEMY_DATABASE_URI"] = (
            f"sqlite:///{tmp_path / name}.db" if name == "two" else database_url
        )
        db.init_app(app)
        txn.init_app(app)
        apps.append(app)
    sessions, engines = [], []
    for app in apps:
        with app.app_context():
            db.drop_all(bind_key=[None])
            db.create_all(bind_key=[None])
            with atomic():
                db.session.add(Note(text=app.name))
            sessions.append(txn.session())
            engines.append(txn.engine)
            assert (txn.session() is db.session(), txn.engine is db.engine) == (True, True)
            assert [n.text for n in Note.query.all()] == [app.name]
            db.engine.dispose()
    assert (sessions[0] is not sessions[1], engines[0] is not engines[1]) == (True, True)


MYAPP = """
import os

from flask import Flask

from flask_txn import FlaskTxn

txn = FlaskTxn()


def create_app():
    app = Flask("myapp")
    app.config["TXN_DATABASE_URI"] = os.environ["MYAPP_DATABASE_URL"]
    txn.init_app(app)
    return app
"""

MYAPP_MODELS = """
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Widget(Base):
    __tablename__ = "widget"
    id: Mapped[int] = mapped_column(primary_key=True)
"""


@pytest.mark.parametrize("migrations_url", ["sqlite", "postgresql"], indirect=True)
def test_the_standalone_alembic_recipe(
    migrations_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/adopting.md's env.py for a standalone app: autogenerate and upgrade on txn.engine."""
    (recipe,) = [
        block
        for block in re.findall(
            r"^```\{code-block\} python\n(.*?)^```", DOCS_ADOPTING.read_text(), re.S | re.M
        )
        if "run_migrations_online" in block
    ]
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text(MYAPP)
    (package / "models.py").write_text(MYAPP_MODELS)
    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, scripts)
    (scripts / "env.py").write_text(recipe)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MYAPP_DATABASE_URL", migrations_url)
    config = alembic.config.Config()
    config.set_main_option("script_location", str(scripts))
    try:
        alembic.command.revision(config, "widgets", autogenerate=True)
        alembic.command.upgrade(config, "head")
        engine = sa.create_engine(migrations_url)
        try:
            assert {"widget", "alembic_version"} <= set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()
    finally:
        for name in ("myapp", "myapp.models"):
            sys.modules.pop(name, None)
        gc.collect()  # the apps the recipe made: their engines are disposed with them
