"""The Flask extension: per-app engines and sessions, and session removal at teardown."""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask
from flask.ctx import AppContext
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import _adopt, _session
from ._atomic import Atomic, check_names, current_async_session, decorate_or_open
from ._binds import watch_binds
from ._cli import cli
from ._config import (
    DEFAULTS,
    Settings,
    check_dialect_isolation,
    hide_password,
    options_to_config,
    read_settings,
)
from ._engine import make_engine
from ._errorhandlers import register_default_error_handlers
from ._errors import ConfigError, PendingWritesError, UsageError
from ._listeners import watch, watch_errors
from ._nplusone import guard_for
from ._replicas import Replicas, read_replica_settings
from ._signals import payload, send_rolled_back
from ._state import EXTENSION_KEY, AppState, app_state
from ._view import check_route_order

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger("flask_txn")


class FlaskTxn:
    """Database transactions for a Flask app: a scoped session and ``@atomic`` blocks.

    One instance may serve several apps (the application-factory pattern); each
    app gets its own engine, sessions and settings from its ``TXN_*`` config.

    :param app: the app to initialise now; or call :meth:`init_app` later.
    :param db: a Flask-SQLAlchemy extension already registered on the app(s):
        flask-txn then adopts its engines and its session (``txn.session() is
        db.session()``) instead of making its own. See :doc:`adopting`.
    :param options: defaults for the ``TXN_*`` config keys, named in lower case
        without the prefix (``retries=3`` for ``TXN_RETRIES``). The app's config
        overrides them.
    """

    def __init__(self, app: Flask | None = None, *, db: Any = None, **options: Any) -> None:
        self._defaults = options_to_config(options)
        self._db = db
        self._states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
        self.session = _session.AppScopedSession(
            lambda: self._get_state().registry, lambda: self._get_state().sessionmaker
        )
        """The current app's :class:`~sqlalchemy.orm.scoped_session`."""
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and validate the app's ``TXN_*`` config, create its engine and
        arrange for its sessions to be removed at app-context teardown.

        :param app: the app to register this extension with.
        """
        if EXTENSION_KEY in app.extensions:
            raise UsageError(
                f"A flask-txn extension is already registered on app {app.name!r}."
                " Call 'init_app' once per app (one FlaskTxn object can serve many apps)."
            )
        given = {**self._defaults, **app.config}
        sqlite_begin_given = "TXN_SQLITE_BEGIN" in given
        engines = None if self._db is None else _adopt.engines_of(app, self._db)
        if engines is None:
            _adopt.refuse_second_session(app, given)
        else:
            _adopt.configure(app, engines, given)
        for key, value in {**DEFAULTS, **self._defaults}.items():
            # Dicts are copied: editing one app's TXN_ENGINE_OPTIONS in place must not
            # change the module's defaults or another app served by this object.
            app.config.setdefault(key, dict(value) if isinstance(value, dict) else value)
        if app.config["TXN_NPLUSONE"] is None:
            # Where a developer looks (debug, tests), not in production by default.
            app.config["TXN_NPLUSONE"] = "warn" if app.debug or app.testing else "off"
        settings = read_settings(app.config)
        if sqlite_begin_given and settings.url.get_backend_name() != "sqlite":
            raise ConfigError(
                f"'TXN_SQLITE_BEGIN' is set ({settings.sqlite_begin!r}), but the database is"
                f" {settings.url.get_backend_name()!r}: it only applies to SQLite, so it would"
                " do nothing. Set it only where 'TXN_DATABASE_URI' is a SQLite URL."
            )
        if engines is None:
            adopted = None
            engine = make_engine(settings)
            factory = _session.make_sessionmaker(engine, settings)
            registry = _session.make_registry(factory, settings.scope)
            async_database = _session.make_async_database(settings)
            weakref.finalize(app, engine.dispose)
        else:
            adopted = _adopt.adopt(app, self._db, engines, settings)
            engine, factory, registry = adopted.engine, adopted.factory, adopted.registry
            watch_binds(factory, engine, [e for key, e in engines.items() if key is not None])
            async_database = None  # Flask-SQLAlchemy has no async session to adopt
        check_dialect_isolation("TXN_ISOLATION_LEVEL", settings.isolation, engine.dialect.name)
        watch(engine, factory)
        guard = guard_for(settings.nplusone, settings.nplusone_threshold)
        if guard is not None:  # "off" costs nothing: no listener at all
            event.listen(factory, "do_orm_execute", guard)
        if async_database is not None:
            watch(async_database.sync_engine, _session.AsyncWorkSession)
        replica_settings = read_replica_settings(app.config, settings)
        if replica_settings.urls:
            replicas = Replicas(replica_settings, settings, watch_errors)
            replicas.watch(engine, is_async=False)
            if async_database is not None:
                replicas.watch(async_database.sync_engine, is_async=True)
            weakref.finalize(app, replicas.dispose)
        self._states[app] = AppState(
            settings, engine, factory, registry, async_database, adopted=adopted
        )
        if async_database is not None:
            weakref.finalize(app, async_database.close)
        app.extensions[EXTENSION_KEY] = self
        if settings.error_handlers:
            register_default_error_handlers(app)
        app.cli.add_command(cli)  # flask txn check
        app.before_request(functools.partial(_check_routes_once, app, self._states[app]))
        _always_remove_at_teardown(app, self)

    @property
    def engine(self) -> Engine:
        """The current app's engine."""
        return self._get_state().engine

    @property
    def async_session(self) -> AsyncSession:
        """The ``AsyncSession`` of the innermost async atomic block of the current task.

        .. versionadded:: 0.1.0
        """
        return current_async_session()

    @property
    def settings(self) -> Settings:
        """The current app's validated settings."""
        return self._get_state().settings

    def atomic(self, func: Any = None, /, **options: Any) -> Any:
        """Like :func:`flask_txn.atomic`, for this extension whatever the current app's is."""
        check_names(options)
        return decorate_or_open(Atomic(_extension=self, **options), func)

    def _get_state(self) -> AppState:
        """The current app's state in this extension."""
        return app_state(self)

    def _teardown(self, app: Flask, *, failed: bool) -> None:
        """Remove the session the ending app context created, discarding its open transaction.

        :param app: the app whose context is ending.
        :param failed: the context ends with an exception, which a
            :class:`PendingWritesError` must not replace.
        """
        state = self._states.get(app)
        if state is None or not state.registry.has():
            return
        session = state.registry()
        owner: _session.Owner | None = session.info.get(_session.OWNER)
        if owner is None or owner.context is not _session.current_app_context():
            # An outer context (same thread, or the scope a custom scopefunc
            # chose) made this session and still uses it.
            return
        discarded = _session.has_pending_writes(session)
        try:
            session.close()
        finally:
            state.registry.clear()
        if discarded:
            _report_discarded(state.settings, app, session, owner, failed=failed)


def _report_discarded(
    settings: Settings, app: Flask, session: Session, owner: _session.Owner, *, failed: bool
) -> None:
    """Tell the user that uncommitted writes were rolled back at teardown."""
    endpoint = owner.endpoint
    send_rolled_back(
        app,
        **payload(
            session=session, attempt=1, isolation=None, endpoint=endpoint, started=owner.created
        ),
        reason="teardown",
        error=None,
        sqlstate=None,
        exhausted=False,
    )
    if settings.on_discard == "ignore":
        return
    message = (
        f"Uncommitted writes were rolled back at app-context teardown (endpoint"
        f" {endpoint!r}, database {hide_password(settings.url)}). Wrap the writes in"
        " '@atomic' or call 'session.commit()'; set 'TXN_ON_DISCARD' to 'ignore' to"
        " silence this."
    )
    if settings.on_discard == "raise" and not failed:
        raise PendingWritesError(message)
    # After a failure the rollback is the expected outcome and the failure is the
    # news: raising here would hide it behind this error, so only log.
    log.warning(message)


def _check_routes_once(app: Flask, state: AppState) -> None:
    """At the app's first request, when every route is registered: refuse a route
    that serves a function '@atomic' wrapped instead of the wrapper."""
    if not state.routes_checked:
        check_route_order(app)
        state.routes_checked = True


def _always_remove_at_teardown(app: Flask, ext: FlaskTxn) -> None:
    """Run the extension's teardown after the app's, even when one of those raises.

    Flask 3.1 stops calling teardown functions at the first one that raises, and
    one registered after ``init_app`` runs before ours. A session left behind
    would keep its connection and carry its pending work into the thread's next
    request, so the removal wraps the whole teardown phase instead.
    """
    do_teardown: Callable[..., None] = app.do_teardown_appcontext

    def do_teardown_appcontext(*args: Any, **kwargs: Any) -> None:
        exc = _exception_of(args, kwargs)
        try:
            do_teardown(*args, **kwargs)
        except BaseException:
            ext._teardown(app, failed=True)
            raise
        ext._teardown(app, failed=exc is not None)

    app.do_teardown_appcontext = do_teardown_appcontext  # type: ignore[method-assign]


def _exception_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseException | None:
    """The exception the app context ends with, from ``do_teardown_appcontext``'s arguments.

    Flask 3.1 calls ``do_teardown_appcontext(exc)``; the next Flask calls
    ``do_teardown_appcontext(ctx, exc)``, context first. Called with no
    exception, it looks at the one being handled, as Flask's own method does.
    """
    if args and isinstance(args[0], AppContext):
        args = args[1:]
    if args:
        exc: BaseException | None = args[0]
        return exc
    return kwargs.get("exc", sys.exc_info()[1])
