"""Each app's flask-txn state, and the one way to find it.

:class:`AppState` is what ``init_app`` builds for an app. :func:`app_state`
finds the current app's (or a given app's) state for every part of flask-txn,
with the same errors: no app context, no extension on the app, or an extension
that was not registered with that app.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import ScopedRegistry

from ._adopt import Adopted
from ._config import Settings, hide_password
from ._engine import async_url
from ._errors import UsageError
from ._limiter import Limits
from ._session import AsyncDatabase, current_app_object

#: The key of ``app.extensions`` under which the extension object is registered.
EXTENSION_KEY = "flask-txn"


@dataclasses.dataclass(slots=True, weakref_slot=True)
class AppState:
    """One app's validated settings, engine and sessions."""

    settings: Settings
    engine: Engine
    sessionmaker: sessionmaker[Session]
    registry: ScopedRegistry[Session]
    #: for atomic coroutines; None when the app has no async database URL.
    async_database: AsyncDatabase | None
    #: the Flask-SQLAlchemy extension and engines given as ``FlaskTxn(db=...)``, if any.
    adopted: Adopted | None = None
    #: the routes were checked for '@atomic' written above the route decorator.
    routes_checked: bool = False
    #: the admission limits of contended blocks; None when 'TXN_ADMISSION' is False.
    limits: Limits | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        bounds = self.settings.admission
        self.limits = None if bounds is None else Limits(bounds)


def app_state(extension: Any = None, app: Any = None, *, user: str = "Working") -> AppState:
    """The state of ``app`` (by default the current app) in ``extension`` (by
    default the one registered on that app).

    :param extension: the :class:`~flask_txn.FlaskTxn` object asking; None for
        the extension the app is registered with.
    :param app: the app; None for the current app.
    :param user: who asks, as the error message starts: ``"Working"``, or
        ``"'atomic' was used"``.
    """
    if app is None:
        try:
            app = current_app_object()
        except RuntimeError:  # Flask's "Working outside of application context."
            raise UsageError(
                f"{user} outside of an application context: flask-txn needs one to find"
                " the app's database. Use it inside a request, a CLI command, or"
                " 'with app.app_context():'."
            ) from None
    if extension is None:
        extension = app.extensions.get(EXTENSION_KEY)
        if extension is None:
            raise UsageError(
                f"No flask-txn extension is registered on the current app {app.name!r}."
                " Did you forget to call 'FlaskTxn(app)' or 'txn.init_app(app)'?"
            )
    state: AppState | None = extension._states.get(app)
    if state is None:
        raise UsageError(
            f"The current Flask app {app.name!r} is not registered with this"
            " extension. Did you forget to call 'init_app'?"
        )
    return state


async def async_database_of(state: AppState) -> AsyncDatabase:
    """The app's async database, connected once, or an error that says how to configure it."""
    database = state.async_database
    if database is not None:
        return await database.connected()
    if state.adopted is not None:
        raise UsageError(
            "'atomic' on a coroutine cannot use FlaskTxn(db=db): Flask-SQLAlchemy has"
            " no async session for it to adopt. Make the view a plain 'def' (Flask runs"
            " it in a worker thread), or serve async views from a FlaskTxn without"
            " 'db=' on another app, with 'TXN_ASYNC_DATABASE_URI'."
        )
    url = state.settings.url
    if async_url(state.settings) is not None:
        raise UsageError(
            "'atomic' on a coroutine needs SQLAlchemy's asyncio support, which needs the"
            " greenlet package. Install the 'async' extra: pip install 'flask-txn[async]'."
        )
    raise UsageError(
        f"'atomic' on a coroutine needs an async database URL, and the app's URL"
        f" {hide_password(url)!r} uses {url.drivername!r}, which has no async form"
        " flask-txn may switch to. Set 'TXN_ASYNC_DATABASE_URI', e.g."
        " 'postgresql+asyncpg://...' or 'postgresql+psycopg://...' (psycopg 3 serves"
        " both, so a 'postgresql+psycopg' URL needs no second key)."
    )
