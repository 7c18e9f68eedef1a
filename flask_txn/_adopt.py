"""Adopting Flask-SQLAlchemy (``FlaskTxn(app, db=db)``): its engines and its session
serve flask-txn's blocks, so that ``txn.session() is db.session()``.

Flask-SQLAlchemy keeps its engines (one per bind key) and its scoped session;
flask-txn instruments the engines as it does its own, listens to the session
factory, tags each new session with the app context that owns it, and takes
over removing the session at teardown (so that discarded writes are reported).
A block that used several binds commits them one after the other: the other
binds first, in the order the block first used them, the default bind last.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask
from sqlalchemy import Connection, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.util import ScopedRegistry

from ._config import DEFAULTS, Settings, hide_password
from ._engine import instrument
from ._errors import ConfigError, PartialCommitError, UsageError
from ._session import claim, in_failed_transaction, track_writes

log = logging.getLogger("flask_txn")

#: The key of ``app.extensions`` under which Flask-SQLAlchemy registers itself.
FLASK_SQLALCHEMY_KEY = "sqlalchemy"
#: ``session.info`` key: ``(bind key, Connection)`` of each bind the open
#: transaction used, in the order it first used them (apps with binds only).
BINDS = "flask_txn.binds"
#: Keys that configure an engine or a session of flask-txn's own, and where the
#: same is set for Flask-SQLAlchemy.
_FLASK_SQLALCHEMY_EQUIVALENT = {
    "TXN_ENGINE_OPTIONS": "'SQLALCHEMY_ENGINE_OPTIONS'",
    "TXN_SESSION_OPTIONS": "SQLAlchemy(session_options=...)",
    "TXN_SESSION_SCOPE": "SQLAlchemy(session_options={'scopefunc': ...})",
    "TXN_ASYNC_DATABASE_URI": "nothing: async blocks need FlaskTxn without 'db='",
    "TXN_ASYNC_ENGINE_OPTIONS": "nothing: async blocks need FlaskTxn without 'db='",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Adopted:
    """An app's Flask-SQLAlchemy extension and engines, as flask-txn uses them."""

    db: Any
    #: the app's engines by bind key; None is the default bind.
    engines: Mapping[str | None, Engine]

    @property
    def engine(self) -> Engine:
        """The default bind's engine, ``db.engine``."""
        return self.engines[None]

    @property
    def factory(self) -> sessionmaker[Session]:
        """Flask-SQLAlchemy's session factory."""
        factory: sessionmaker[Session] = self.db.session.session_factory
        return factory

    @property
    def registry(self) -> ScopedRegistry[Session]:
        """Flask-SQLAlchemy's store of current sessions, ``db.session.registry``."""
        registry: ScopedRegistry[Session] = self.db.session.registry
        return registry


def engines_of(app: Flask, db: Any, *, default: bool = True) -> dict[str | None, Engine]:
    """The engines ``db`` made for ``app``, or an error if ``db`` is not registered on it.

    :param default: refuse an app without a default bind (``db=`` needs one).
    """
    if app.extensions.get(FLASK_SQLALCHEMY_KEY) is not db:
        raise UsageError(
            f"FlaskTxn(db={db!r}) was given a Flask-SQLAlchemy extension that is not"
            f" registered on app {app.name!r}. Call 'db.init_app(app)' (or"
            " 'SQLAlchemy(app)') before 'FlaskTxn(app, db=db)' or 'txn.init_app(app)'."
        )
    with app.app_context():
        engines: dict[str | None, Engine] = dict(db.engines)  # type: ignore[union-attr]
    if default and None not in engines:
        raise ConfigError(
            f"'SQLALCHEMY_DATABASE_URI' is not set on app {app.name!r} (only"
            f" 'SQLALCHEMY_BINDS' {sorted(map(str, engines))!r}): FlaskTxn(db=db) runs blocks on"
            " the default bind. Set 'SQLALCHEMY_DATABASE_URI'."
        )
    return engines


def configure(app: Flask, engines: Mapping[str | None, Engine], given: Mapping[str, Any]) -> None:
    """Refuse ``TXN_*`` keys that contradict Flask-SQLAlchemy, then set the
    database URL and scope in ``app.config`` to those in force.

    :param given: the ``TXN_*`` keys set in the app's config or as FlaskTxn's options.
    """
    url = engines[None].url
    uri = given.get("TXN_DATABASE_URI")
    if uri is not None and not _same_setting(uri, url, app.config.get("SQLALCHEMY_DATABASE_URI")):
        raise ConfigError(
            f"'TXN_DATABASE_URI' is {hide_password(uri)!r}, but 'SQLALCHEMY_DATABASE_URI'"
            f" is {hide_password(url)!r}, and FlaskTxn(db=db) runs blocks on"
            " Flask-SQLAlchemy's engine. Remove 'TXN_DATABASE_URI' (Flask-SQLAlchemy's"
            " config is the source), or give them the same value."
        )
    replicas = given.get("TXN_REPLICA_URIS")
    if replicas:
        raise ConfigError(
            f"'TXN_REPLICA_URIS' is set ({hide_password(replicas)!r}), but FlaskTxn(db=db)"
            " cannot run blocks on a standby: Flask-SQLAlchemy's session picks its engine"
            " per model, so atomic(replica=True) would still read on the primary. With"
            " 'db=', 'TXN_REPLICA_URIS' must be empty: remove it, or use FlaskTxn without"
            " 'db=' for reads on standbys."
        )
    for key, equivalent in _FLASK_SQLALCHEMY_EQUIVALENT.items():
        if key in given and given[key] != DEFAULTS[key]:
            raise ConfigError(
                f"{key!r} is set ({hide_password(given[key])!r}), but FlaskTxn(db=db) uses"
                " Flask-SQLAlchemy's engines and session, so it would do nothing. Remove"
                f" it; the equivalent is {equivalent}."
            )
    app.config["TXN_DATABASE_URI"] = url.render_as_string(hide_password=False)
    app.config["TXN_SESSION_SCOPE"] = "app_context"


def _same_setting(uri: object, url: URL, configured: object) -> bool:
    """Whether ``TXN_DATABASE_URI`` says what Flask-SQLAlchemy's config or engine says."""
    try:
        given = make_url(uri)  # type: ignore[arg-type]
    except Exception:
        return False  # read_settings would refuse it too; this error names both keys
    shown = given.render_as_string(hide_password=False)
    targets = [url] + ([make_url(configured)] if isinstance(configured, str | URL) else [])
    return any(shown == target.render_as_string(hide_password=False) for target in targets)


def adopt(app: Flask, db: Any, engines: Mapping[str | None, Engine], settings: Settings) -> Adopted:
    """Make ``db``'s engines and session serve flask-txn's blocks for ``app``."""
    adopted = Adopted(db, engines)
    for engine in engines.values():
        instrument(engine, settings)
    factory = adopted.factory
    track_writes(factory)
    # An app without binds has nothing to track: no listener, no cost per transaction.
    if len(engines) > 1 and not event.contains(factory, "after_begin", _track_binds):
        event.listen(factory, "after_begin", _track_binds)
        event.listen(factory, "after_commit", _forget_binds)
        event.listen(factory, "after_rollback", _forget_binds)
    registry = adopted.registry
    if not getattr(registry.createfunc, "claims", False):
        registry.createfunc = _claiming(registry.createfunc)
    # flask-txn's teardown removes the session even when another teardown raises,
    # and reports writes it discards: Flask-SQLAlchemy's would remove it silently first.
    own_teardown = db._teardown_session
    app.teardown_appcontext_funcs[:] = [
        func for func in app.teardown_appcontext_funcs if func != own_teardown
    ]
    return adopted


def joined_session_class(cls: type[Session], engine: Engine) -> type[Session]:
    """``cls`` with the default bind's statements sent to the session's own ``bind``
    (flask_txn.testing's connection): Flask-SQLAlchemy's ``get_bind`` ignores it."""

    class JoinedSession(cls):  # type: ignore[valid-type,misc]
        def get_bind(self, *args: Any, **kwargs: Any) -> Any:
            bind = super().get_bind(*args, **kwargs)
            return self.bind if bind is engine and self.bind is not None else bind

    return JoinedSession


def _claiming(create: Callable[[], Session]) -> Callable[[], Session]:
    def create_claimed() -> Session:
        return claim(create())

    create_claimed.claims = True  # type: ignore[attr-defined]
    return create_claimed


def _track_binds(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    """``after_begin``: remember each bind a transaction uses, in the order it first does."""
    if transaction.parent is not None:
        return  # a savepoint reuses its transaction's connections
    engines = session._db.engines  # type: ignore[attr-defined]
    key = next(key for key, engine in engines.items() if engine is connection.engine)
    session.info.setdefault(BINDS, []).append((key, connection))


def _forget_binds(session: Session) -> None:
    session.info.pop(BINDS, None)


def commit_binds(session: Session) -> None:
    """``session.commit()``; with several binds, each committed in turn, the other
    binds in the order the transaction first used them and the default bind last.

    :raises PartialCommitError: a COMMIT failed after another bind's had succeeded.
    """
    binds: list[tuple[str | None, Connection]] = session.info.get(BINDS, [])
    if len(binds) < 2:
        session.commit()
        return
    committed: list[str | None] = []
    key: str | None = None
    try:
        for key, connection in sorted(binds, key=lambda bind: bind[0] is None):
            # COMMIT as a statement, in this order: SQLAlchemy would commit the binds
            # in no set order. Its own COMMIT of each, below, finds nothing left to do.
            connection.exec_driver_sql("COMMIT")
            committed.append(key)
    except Exception as exc:
        if not committed:
            raise
        names = ", ".join(bind_name(key) for key in committed)
        log.error(
            "Partial commit: %s committed, then COMMIT on %s failed (%s).",
            names,
            bind_name(key),
            type(exc).__name__,
        )
        raise PartialCommitError(
            f"The block's work is partly saved: {names} committed, then COMMIT on"
            f" {bind_name(key)} failed ({type(exc).__name__}: {exc}). Binds commit one"
            " after the other, never atomically across databases, so this is not retried."
            " Make the work on the other binds idempotent, or keep a block's writes on"
            " one bind.",
            committed=committed,
            failed=key,
        ) from exc
    session.commit()


def failed_bind(session: Session) -> str | None:
    """The key of a bind other than the default whose transaction an error aborted
    (as its driver reports it), or None if there is none."""
    binds: list[tuple[str | None, Connection]] = session.info.get(BINDS, [])
    for key, connection in binds:
        if key is not None and in_failed_transaction(connection):
            return key
    return None


def bind_name(key: str | None) -> str:
    return "the default bind" if key is None else f"bind {key!r}"


def refuse_second_session(app: Flask, config: Mapping[str, Any]) -> None:
    """Without ``db=``: refuse flask-txn on the database Flask-SQLAlchemy already
    serves on this app, where two sessions would wait on each other's locks."""
    db = app.extensions.get(FLASK_SQLALCHEMY_KEY)
    if db is None:
        return
    engines = engines_of(app, db, default=False)
    uri = config.get("TXN_DATABASE_URI")
    fix = (
        " Pass the extension: 'FlaskTxn(app, db=db)' (or 'FlaskTxn(db=db)' then"
        " 'txn.init_app(app)'), so that flask-txn's blocks use Flask-SQLAlchemy's"
        " engine and session."
    )
    if uri is None:
        raise ConfigError(
            "'TXN_DATABASE_URI' is not set, and Flask-SQLAlchemy is registered on app"
            f" {app.name!r} with the binds {sorted(map(str, engines))!r}.{fix}"
        )
    try:
        url = make_url(uri)
    except Exception:
        return  # read_settings refuses it with its own message
    for key, engine in engines.items():
        if _same_database(url, engine.url, app.instance_path):
            raise ConfigError(
                f"'TXN_DATABASE_URI' {hide_password(url)!r} is the database of"
                f" Flask-SQLAlchemy's {bind_name(key)} on app {app.name!r}: a second"
                " session on it would wait on the first one's row locks (a request"
                f" that updates a row through both hangs).{fix}"
            )


def _same_database(url: URL, other: URL, instance_path: str) -> bool:
    """The same server and database, whatever the driver. A relative SQLite path
    is the same file when it resolves to it from the working directory (where
    flask-txn's own engine opens it) or from the app's instance folder (where
    Flask-SQLAlchemy opens it): either way the user meant one database."""
    if url.get_backend_name() != other.get_backend_name():
        return False
    if url.get_backend_name() == "sqlite":
        path, other_path = url.database or "", other.database or ""
        if path in ("", ":memory:") or other_path in ("", ":memory:"):
            return False
        target = os.path.abspath(other_path)
        return os.path.abspath(path) == target or (
            not os.path.isabs(path) and os.path.abspath(os.path.join(instance_path, path)) == target
        )
    return (url.host, url.port or 0, url.database) == (other.host, other.port or 0, other.database)
