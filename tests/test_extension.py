"""The foundation: config, usage errors, session teardown and scoping, SQLite savepoints."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.ctx import AppContext
from flask.globals import _cv_app
from sqlalchemy.orm import Session, scoped_session

from flask_txn import ConfigError, FlaskTxn, PendingWritesError, UsageError
from flask_txn._config import DEFAULTS

from .conftest import AppFactory, Base, Item, count_items, every_engine

pytestmark = every_engine

#: A URL with a password, for messages only: nothing connects to it.
SECRET_URL = "postgresql+psycopg2://user:s3cret@127.0.0.1:1/db"
HIDDEN_URL = "postgresql+psycopg2://user:***@127.0.0.1:1/db"


def exactly(*pieces: str) -> str:
    """A pattern for the whole message: the pieces literally, anything between them."""
    return "^" + ".*".join(re.escape(piece) for piece in pieces) + "$"


def init(url: str, **config: Any) -> tuple[Flask, FlaskTxn]:
    """An app with ``config``, registered with a new extension."""
    app = Flask("configured")
    app.config.update({"TXN_DATABASE_URI": url, **config})
    return app, FlaskTxn(app)


# -- config --------------------------------------------------------------------

ISOLATIONS = "'READ UNCOMMITTED', 'READ COMMITTED', 'REPEATABLE READ', 'SERIALIZABLE'"
URL_FORM = (
    " The form is 'dialect+driver://user:password@host:port/database', e.g."
    " 'sqlite:///app.db' or 'postgresql+psycopg2://user:password@localhost/app'."
)
RETRIES = (
    "'TXN_RETRIES' must be a whole number >= 0 (the number of re-runs after the first"
    " attempt; 0 disables retrying), got {}."
)
STATUS = (
    "'TXN_ROLLBACK_ON_STATUS' must be an HTTP status from 100 to 599 (a response with"
    " this status or higher rolls back), None (never roll back on a response) or a"
    " callable(response) -> bool, got {}."
)

BAD_CONFIG = [
    pytest.param(
        "TXN_DATABASE_URI",
        42,
        ["'TXN_DATABASE_URI' must be a URL string or a sqlalchemy.engine.URL, got a int: '42'."],
        id="uri-type",
    ),
    pytest.param(
        "TXN_DATABASE_URI",
        "not a url",
        ["'TXN_DATABASE_URI' is not a database URL: 'not a url'." + URL_FORM],
        id="uri-syntax",
    ),
    pytest.param(
        "TXN_DATABASE_URI",
        "postgresql+psycopg2://user@127.0.0.1:notaport/db",
        [
            "'TXN_DATABASE_URI' is not a database URL:"
            " 'postgresql+psycopg2://user@127.0.0.1:notaport/db'." + URL_FORM
        ],
        id="uri-port",
    ),
    pytest.param(
        "TXN_DATABASE_URI",
        "nosuchdb://user@host/db",
        [
            "'TXN_DATABASE_URI' names an unknown dialect or driver 'nosuchdb':"
            " 'nosuchdb://user@host/db'. Use a SQLAlchemy dialect such as 'sqlite',"
            " 'postgresql+psycopg2' or 'postgresql+psycopg', or install the package"
            " providing it."
        ],
        id="uri-dialect",
    ),
    pytest.param(
        "TXN_ENGINE_OPTIONS",
        ["echo"],
        [
            "'TXN_ENGINE_OPTIONS' must be a dict of keyword arguments, got list ['echo']."
            " Use e.g. {'pool_size': 10}."
        ],
        id="engine-options-type",
    ),
    pytest.param(
        "TXN_ENGINE_OPTIONS",
        {"pool_sise": 10},
        [
            "'TXN_ENGINE_OPTIONS' has keys ['pool_sise'] that sqlalchemy.create_engine()"
            " refused: Invalid argument(s) 'pool_sise' sent to create_engine()",
            " Use keyword arguments of create_engine() that this database and pool"
            " accept, e.g. {'pool_size': 10}.",
        ],
        id="engine-options-unknown",
    ),
    pytest.param(
        "TXN_SESSION_OPTIONS",
        "autoflush",
        [
            "'TXN_SESSION_OPTIONS' must be a dict of keyword arguments, got str"
            " 'autoflush'. Use e.g. {'autoflush': False}."
        ],
        id="session-options-type",
    ),
    pytest.param(
        "TXN_SESSION_OPTIONS",
        {"bind": None},
        [
            "'TXN_SESSION_OPTIONS' cannot set 'bind' (got None): flask-txn binds each"
            " session to the current app's engine. Set 'TXN_DATABASE_URI' instead."
        ],
        id="session-options-reserved",
    ),
    pytest.param(
        "TXN_SESSION_OPTIONS",
        {"autoflsh": False},
        [
            "'TXN_SESSION_OPTIONS' has keys ['autoflsh'] that sqlalchemy.orm.Session() refused: ",
            "'autoflsh'. Use keyword arguments of Session, e.g. {'autoflush': False}.",
        ],
        id="session-options-unknown",
    ),
    pytest.param(
        "TXN_SESSION_SCOPE",
        "request",
        [
            "'TXN_SESSION_SCOPE' must be 'thread', 'app_context' or a callable returning"
            " a hashable scope key, got 'request'."
        ],
        id="scope",
    ),
    pytest.param(
        "TXN_ON_DISCARD",
        "log",
        ["'TXN_ON_DISCARD' must be one of 'warn', 'ignore', 'raise', got 'log'."],
        id="on-discard",
    ),
    pytest.param(
        "TXN_ISOLATION_LEVEL",
        "SNAPSHOT",
        [
            f"'TXN_ISOLATION_LEVEL' must be one of {ISOLATIONS} (case-insensitive) or"
            " None for the database's default, got 'SNAPSHOT'."
        ],
        id="isolation-name",
    ),
    pytest.param(
        "TXN_ISOLATION_LEVEL",
        "autocommit",
        [
            "'TXN_ISOLATION_LEVEL' cannot be 'autocommit': an atomic block always runs a"
            f" transaction. Use one of {ISOLATIONS}, or None for the database's default."
        ],
        id="isolation-autocommit",
    ),
    pytest.param(
        "TXN_ISOLATION_LEVEL",
        2,
        [
            f"'TXN_ISOLATION_LEVEL' must be one of {ISOLATIONS} (case-insensitive) or"
            " None for the database's default, got 2 of type int."
        ],
        id="isolation-type",
    ),
    pytest.param("TXN_RETRIES", -1, [RETRIES.format("-1")], id="retries-negative"),
    pytest.param("TXN_RETRIES", True, [RETRIES.format("True")], id="retries-bool"),
    pytest.param("TXN_RETRIES", "3", [RETRIES.format("'3'")], id="retries-str"),
    pytest.param(
        "TXN_RETRY_WAIT_INITIAL",
        -0.5,
        ["'TXN_RETRY_WAIT_INITIAL' must be a finite number of seconds >= 0, got -0.5."],
        id="wait-initial-negative",
    ),
    pytest.param(
        "TXN_RETRY_WAIT_INITIAL",
        "0.1",
        ["'TXN_RETRY_WAIT_INITIAL' must be a finite number of seconds >= 0, got '0.1'."],
        id="wait-initial-str",
    ),
    pytest.param(
        "TXN_RETRY_WAIT_MAX",
        float("nan"),
        ["'TXN_RETRY_WAIT_MAX' must be a finite number of seconds >= 0, got nan."],
        id="wait-max-nan",
    ),
    pytest.param(
        "TXN_RETRY_WAIT_MAX",
        10**400,
        [f"'TXN_RETRY_WAIT_MAX' must be a finite number of seconds >= 0, got {10**400}."],
        id="wait-max-too-large-for-a-float",
    ),
    pytest.param(
        "TXN_RETRY_WAIT_MAX",
        0.001,
        [
            "'TXN_RETRY_WAIT_MAX' must be >= the initial wait (0.02 s), got 0.001."
            " Raise the maximum or lower the initial wait."
        ],
        id="wait-max-below-initial",
    ),
    pytest.param(
        "TXN_RETRY_DEADLINE",
        0,
        [
            "'TXN_RETRY_DEADLINE' must be a finite number of seconds > 0 or None for no"
            " limit, got 0."
        ],
        id="deadline-zero",
    ),
    pytest.param("TXN_ROLLBACK_ON_STATUS", 99, [STATUS.format("99")], id="status-range"),
    pytest.param("TXN_ROLLBACK_ON_STATUS", "500", [STATUS.format("'500'")], id="status-str"),
    pytest.param(
        "TXN_RETRY_SLEEP",
        1,
        ["'TXN_RETRY_SLEEP' must be a callable like time.sleep, got 1."],
        id="sleep",
    ),
    pytest.param(
        "TXN_RETRY_RANDOM",
        0.5,
        ["'TXN_RETRY_RANDOM' must be a callable like random.random, got 0.5."],
        id="random",
    ),
    pytest.param(
        "TXN_SQLITE_BEGIN",
        "LAZY",
        ["'TXN_SQLITE_BEGIN' must be one of 'IMMEDIATE', 'DEFERRED', 'EXCLUSIVE', got 'LAZY'."],
        id="sqlite-begin",
    ),
    pytest.param(
        "TXN_ISOLATION_LEVEL",
        "REPEATABLE READ",
        [
            "'TXN_ISOLATION_LEVEL' is 'REPEATABLE READ', which 'sqlite' does not support; it"
            " offers 'SERIALIZABLE', 'READ UNCOMMITTED'."
        ],
        id="isolation-not-offered",
    ),
    pytest.param(
        "TXN_RETRY",
        3,
        [
            "Unknown config key 'TXN_RETRY': flask-txn reads only 'TXN_DATABASE_URI',",
            "'TXN_ASYNC_ENGINE_OPTIONS'. Did you mean 'TXN_RETRIES'?",
        ],
        id="unknown-key",
    ),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_CONFIG)
def test_bad_config_value_is_refused(
    sqlite_url: str, key: str, value: object, message: list[str]
) -> None:
    """A bad TXN_* value raises ConfigError naming the key, the value and what is allowed."""
    with pytest.raises(ConfigError, match=exactly(*message)):
        init(sqlite_url, **{key: value})


def _veto(response: object) -> bool:
    return False


@pytest.mark.parametrize(
    ("key", "value", "in_force"),
    [
        pytest.param("TXN_ISOLATION_LEVEL", "read_uncommitted", "READ UNCOMMITTED", id="isolation"),
        pytest.param("TXN_ISOLATION_LEVEL", " Serializable ", "SERIALIZABLE", id="isolation-case"),
        pytest.param("TXN_ROLLBACK_ON_STATUS", _veto, _veto, id="status-callable"),
        pytest.param("TXN_ROLLBACK_ON_STATUS", None, None, id="status-off"),
        pytest.param("TXN_RETRY_WAIT_MAX", 2, 2.0, id="seconds-int"),
        pytest.param("TXN_RETRY_DEADLINE", None, None, id="deadline-off"),
    ],
)
def test_good_config_value_is_accepted(
    sqlite_url: str, key: str, value: object, in_force: object
) -> None:
    """A valid TXN_* value is accepted, with names of isolation levels normalised."""
    app, txn = init(sqlite_url, **{key: value})
    with app.app_context():
        settings = txn.settings
    attributes = {
        "TXN_ISOLATION_LEVEL": settings.isolation,
        "TXN_ROLLBACK_ON_STATUS": settings.rollback_on_status,
        "TXN_RETRY_WAIT_MAX": settings.retry.wait_max,
        "TXN_RETRY_DEADLINE": settings.retry.deadline,
    }
    assert attributes[key] == in_force


def test_missing_database_uri_is_refused() -> None:
    """An app without TXN_DATABASE_URI gets a ConfigError naming the key."""
    with pytest.raises(
        ConfigError,
        match=exactly(
            "'TXN_DATABASE_URI' is not set. Set it in the app's config (or pass"
            " FlaskTxn(database_uri=...)), e.g. 'sqlite:///app.db' or"
            " 'postgresql+psycopg2://user:password@localhost/app'."
        ),
    ):
        FlaskTxn(Flask("no-uri"))


def test_constructor_options_are_defaults_the_config_overrides(sqlite_url: str) -> None:
    """FlaskTxn(**options) fills in keys the app's config leaves unset, and only those."""
    app = Flask("defaults")
    app.config.update(TXN_DATABASE_URI=sqlite_url, TXN_RETRIES=7)
    FlaskTxn(retries=2, on_discard="ignore").init_app(app)
    assert (app.config["TXN_RETRIES"], app.config["TXN_ON_DISCARD"]) == (7, "ignore")


def test_constructor_option_reaches_the_settings(sqlite_url: str) -> None:
    """A constructor option is the value in force when the config does not set the key."""
    app = Flask("defaults")
    app.config["TXN_DATABASE_URI"] = sqlite_url
    txn = FlaskTxn(app, retries=2)
    with app.app_context():
        assert txn.settings.retry.retries == 2


def test_unknown_constructor_option_is_refused() -> None:
    """FlaskTxn() with an option name it does not know raises ConfigError listing the names."""
    allowed = ", ".join(repr(key.removeprefix("TXN_").lower()) for key in DEFAULTS)
    with pytest.raises(
        ConfigError,
        match=exactly(
            f"FlaskTxn() got unknown option 'retry'. Allowed options: {allowed} (each is a"
            " TXN_* config key in lower case without the prefix)."
        ),
    ):
        FlaskTxn(retry=3)


def test_init_app_writes_every_default_into_the_config(sqlite_url: str) -> None:
    """After init_app the app's config holds every TXN_* key with the value in force."""
    app, _ = init(sqlite_url)
    # TXN_NPLUSONE's default None is resolved by the app's mode: off outside debug and tests.
    expected = {**DEFAULTS, "TXN_DATABASE_URI": sqlite_url, "TXN_NPLUSONE": "off"}
    assert {key: app.config[key] for key in DEFAULTS} == expected


def test_default_dicts_are_not_shared_between_apps(sqlite_url: str) -> None:
    """Editing one app's TXN_ENGINE_OPTIONS in place changes no other app's config."""
    txn = FlaskTxn(session_options={"autoflush": False})
    first, second = Flask("first"), Flask("second")
    for app in (first, second):
        app.config["TXN_DATABASE_URI"] = sqlite_url
        txn.init_app(app)
    first.config["TXN_ENGINE_OPTIONS"]["echo"] = True
    first.config["TXN_SESSION_OPTIONS"]["autoflush"] = True
    assert (second.config["TXN_ENGINE_OPTIONS"], second.config["TXN_SESSION_OPTIONS"]) == (
        {},
        {"autoflush": False},
    )


@pytest.mark.parametrize("same_object", [True, False], ids=["same-object", "other-object"])
def test_registering_twice_is_refused(sqlite_url: str, same_object: bool) -> None:
    """A second init_app on one app raises UsageError, whichever FlaskTxn object makes it."""
    app, txn = init(sqlite_url)
    with pytest.raises(
        UsageError,
        match=exactly(
            "A flask-txn extension is already registered on app 'configured'. Call"
            " 'init_app' once per app (one FlaskTxn object can serve many apps)."
        ),
    ):
        (txn if same_object else FlaskTxn()).init_app(app)


USES = [
    pytest.param(lambda txn: txn.session(), id="session"),
    pytest.param(lambda txn: txn.session.execute(sa.text("SELECT 1")), id="session-proxy"),
    pytest.param(lambda txn: txn.engine, id="engine"),
]


@pytest.mark.parametrize("use", USES)
def test_use_outside_an_app_context_is_refused(sqlite_url: str, use: Any) -> None:
    """The session or engine outside an app context raises UsageError saying where to use it."""
    _, txn = init(sqlite_url)
    with pytest.raises(
        UsageError,
        match=exactly(
            "Working outside of an application context: flask-txn needs one to find the"
            " app's database. Use it inside a request, a CLI command, or"
            " 'with app.app_context():'."
        ),
    ):
        use(txn)


@pytest.mark.parametrize("use", USES)
def test_use_with_an_app_never_initialised_is_refused(sqlite_url: str, use: Any) -> None:
    """The session or engine in an app not registered raises UsageError naming init_app."""
    _, txn = init(sqlite_url)
    other = Flask("other")
    with (
        other.app_context(),
        pytest.raises(
            UsageError,
            match=exactly(
                "The current Flask app 'other' is not registered with this extension."
                " Did you forget to call 'init_app'?"
            ),
        ),
    ):
        use(txn)


def test_session_is_a_scoped_session(sqlite_url: str) -> None:
    """txn.session is a sqlalchemy.orm.scoped_session."""
    _, txn = init(sqlite_url)
    assert isinstance(txn.session, scoped_session)


# -- teardown --------------------------------------------------------------------


class Served:
    """An app whose ``/write`` view leaves a flushed, uncommitted row behind."""

    def __init__(self, make_app: AppFactory, ending: str) -> None:
        self.app, self.txn = make_app()
        self.ending = ending
        self.sessions: list[Session] = []
        with self.app.app_context():
            self.engine = self.txn.engine
        txn, sessions = self.txn, self.sessions

        @self.app.get("/write")
        def write() -> str:
            sessions.append(txn.session())
            txn.session.add(Item(name="never committed"))
            txn.session.flush()
            if ending == "view-raised":
                raise RuntimeError("the view failed")
            return "written"

        @self.app.get("/count")
        def count() -> str:
            sessions.append(txn.session())
            return str(txn.session.scalar(sa.select(sa.func.count()).select_from(Item)))

        failed = []

        # Registered after init_app, so Flask 3.1 runs it first; when it raises,
        # Flask calls no other teardown function.
        @self.app.teardown_appcontext
        def failing_teardown(_exc: BaseException | None) -> None:
            if ending == "teardown-raised" and not failed:
                failed.append(True)
                raise RuntimeError("another teardown failed")

        self.client = self.app.test_client()

    def write(self) -> None:
        """Request ``/write``; the failure the scenario provokes is expected."""
        if self.ending == "normal":
            assert self.client.get("/write").text == "written"
            return
        with pytest.raises(RuntimeError, match="failed"):
            self.client.get("/write")


ENDINGS = ["normal", "view-raised", "teardown-raised"]


@pytest.fixture(params=ENDINGS)
def served(make_app: AppFactory, request: pytest.FixtureRequest) -> Iterator[Served]:
    """An app after ``/write`` ended normally, with a raising view, or a raising teardown."""
    served = Served(make_app, request.param)
    try:
        served.write()
        yield served
    finally:
        # If teardown is broken, the session it left holds the row lock that the
        # next test's DROP TABLE would wait for forever: fail, don't hang.
        with served.app.app_context():
            served.txn.session.remove()


def test_teardown_returns_the_connection(served: Served) -> None:
    """After the request, its connection is back in the pool."""
    assert served.engine.pool.checkedout() == 0


def test_teardown_rolls_back_uncommitted_work(served: Served) -> None:
    """The next request on the thread does not see the row the previous one left uncommitted."""
    assert served.client.get("/count").text == "0"


def test_teardown_gives_the_next_request_a_new_session(served: Served) -> None:
    """The next request on the thread gets a new Session object."""
    served.client.get("/count")
    first, second = served.sessions
    assert second is not first


def test_nested_app_context_keeps_the_outer_session(app_txn: tuple[Flask, FlaskTxn]) -> None:
    """A nested app context ending does not close or roll back the request's session."""
    app, txn = app_txn
    seen: dict[str, Any] = {}

    @app.get("/")
    def view() -> str:
        outer = txn.session()
        outer.add(Item(name="outer"))
        outer.flush()
        with app.app_context():
            seen["shared"] = txn.session() is outer
        seen["same after"] = txn.session() is outer
        seen["rows after"] = outer.scalar(sa.select(sa.func.count()).select_from(Item))
        outer.commit()
        return "ok"

    app.test_client().get("/")
    assert (seen, count_items(app, txn)) == (
        {"shared": True, "same after": True, "rows after": 1},
        1,
    )


def test_session_made_in_a_nested_context_is_removed_at_its_end(
    app_txn: tuple[Flask, FlaskTxn],
) -> None:
    """A session first used in a nested app context is removed when that context ends."""
    app, txn = app_txn
    seen: dict[str, Any] = {}

    @app.get("/")
    def view() -> str:
        with app.app_context():
            inner = txn.session()
            inner.execute(sa.text("SELECT 1"))
        seen["checked out"] = txn.engine.pool.checkedout()
        seen["new session"] = txn.session() is not inner
        return "ok"

    app.test_client().get("/")
    assert seen == {"checked out": 0, "new session": True}


def test_session_made_with_arguments_is_removed_at_teardown(
    app_txn: tuple[Flask, FlaskTxn],
) -> None:
    """txn.session(**kw) makes a session that teardown removes like any other."""
    app, txn = app_txn

    @app.get("/")
    def view() -> str:
        txn.session(autoflush=False).execute(sa.text("SELECT 1"))
        return "ok"

    app.test_client().get("/")
    with app.app_context():
        assert txn.engine.pool.checkedout() == 0


# -- scopes --------------------------------------------------------------------


def test_app_context_scope_gives_each_context_its_own_session(make_app: AppFactory) -> None:
    """With TXN_SESSION_SCOPE='app_context' a nested context gets a session of its own."""
    app, txn = make_app(TXN_SESSION_SCOPE="app_context")
    with app.app_context():
        outer = txn.session()
        with app.app_context():
            inner = txn.session()
        after = txn.session()
    assert (inner is not outer, after is outer) == (True, True)


def test_app_context_scope_removes_the_nested_session_at_its_end(make_app: AppFactory) -> None:
    """With TXN_SESSION_SCOPE='app_context' the nested context's session is closed at its end."""
    app, txn = make_app(TXN_SESSION_SCOPE="app_context")
    with app.app_context():
        txn.session.execute(sa.text("SELECT 1"))
        with app.app_context():
            txn.session.execute(sa.text("SELECT 1"))
        checked_out = txn.engine.pool.checkedout()
    assert checked_out == 1


def test_callable_scope_picks_the_session(make_app: AppFactory) -> None:
    """A callable TXN_SESSION_SCOPE decides which session txn.session hands out."""
    key = ["a"]
    app, txn = make_app(TXN_SESSION_SCOPE=lambda: key[0])
    with app.app_context():
        first = txn.session()
        key[0] = "b"
        second = txn.session()
        txn.session.remove()
        key[0] = "a"
        again = txn.session()
    assert (second is not first, again is first) == (True, True)


# -- two apps, one extension -----------------------------------------------------


@pytest.fixture
def two_apps(
    make_app: AppFactory, tmp_path: Any
) -> tuple[tuple[Flask, FlaskTxn], tuple[Flask, FlaskTxn]]:
    """Two apps on two databases (the current one and another SQLite file), one FlaskTxn."""
    txn = FlaskTxn()
    return make_app(txn=txn), make_app(f"sqlite:///{tmp_path / 'other.db'}", txn=txn)


def test_each_app_session_is_bound_to_its_own_engine(
    two_apps: tuple[tuple[Flask, FlaskTxn], tuple[Flask, FlaskTxn]],
) -> None:
    """Used alternately in one thread, each app's session is bound to that app's engine."""
    binds = []
    for app, txn in [*two_apps, *two_apps]:
        with app.app_context():
            binds.append(txn.session.get_bind() is txn.engine)
    (first, _), (second, txn) = two_apps
    with first.app_context():
        first_engine = txn.engine
    with second.app_context():
        second_engine = txn.engine
    assert (binds, first_engine is not second_engine) == ([True] * 4, True)


def test_each_app_writes_to_its_own_database(
    two_apps: tuple[tuple[Flask, FlaskTxn], tuple[Flask, FlaskTxn]],
) -> None:
    """Writes made alternately through two apps, nested too, land in each app's database."""
    (first, txn), (second, _) = two_apps
    with first.app_context():
        txn.session.add(Item(name="first"))
        with second.app_context():
            txn.session.add_all([Item(name="second"), Item(name="second")])
            txn.session.commit()
        txn.session.commit()
    with second.app_context():
        txn.session.add(Item(name="second"))
        txn.session.commit()
    assert (count_items(first, txn), count_items(second, txn)) == (1, 3)


# -- SQLite ----------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_savepoint_rollback_undoes_its_writes(app_txn: tuple[Flask, FlaskTxn]) -> None:
    """On SQLite, rolling back a SAVEPOINT removes its rows while the outer ones commit."""
    app, txn = app_txn
    with app.app_context():
        session = txn.session()
        session.add(Item(name="kept"))
        savepoint = session.begin_nested()
        session.add(Item(name="undone"))
        session.flush()
        savepoint.rollback()
        session.commit()
    with app.app_context(), txn.engine.connect() as connection:
        names = connection.scalars(sa.select(Item.name)).all()
    assert names == ["kept"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_outer_rollback_undoes_a_released_savepoint(
    app_txn: tuple[Flask, FlaskTxn],
) -> None:
    """On SQLite, a savepoint opened first and released is still undone by the outer rollback.

    Left to itself, pysqlite sends no BEGIN before a SAVEPOINT: SQLite then treats
    the savepoint as the transaction and its RELEASE as COMMIT.
    """
    app, txn = app_txn
    with app.app_context():
        session = txn.session()
        session.begin()
        savepoint = session.begin_nested()
        session.add(Item(name="released, then rolled back"))
        session.flush()
        savepoint.commit()
        session.rollback()
    assert count_items(app, txn) == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_reads_run_inside_the_transaction(app_txn: tuple[Flask, FlaskTxn]) -> None:
    """On SQLite, a session's first SELECT already runs inside its transaction."""
    app, txn = app_txn
    with app.app_context():
        txn.session.execute(sa.select(Item))
        in_transaction = txn.session.connection().connection.dbapi_connection.in_transaction
    assert in_transaction is True


# -- discarded writes --------------------------------------------------------------


@pytest.fixture
def discarding(make_app: AppFactory) -> Any:
    """Make an app whose ``/leave`` view adds a row and returns without committing."""

    def make(fail: bool = False, **config: Any) -> Any:
        app, txn = make_app(**config)

        @app.get("/leave")
        def leave() -> str:
            txn.session.add(Item(name="left behind"))
            if fail:
                raise LookupError("the view failed")
            return "ok"

        @app.get("/read")
        def read() -> str:
            return str(txn.session.scalar(sa.select(sa.func.count()).select_from(Item)))

        return app, txn

    return make


def test_discarded_writes_are_logged(discarding: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Uncommitted writes at teardown log a WARNING naming the endpoint and the database."""
    app, txn = discarding()
    with app.app_context():
        url = txn.engine.url.render_as_string(hide_password=True)
    with caplog.at_level(logging.WARNING, logger="flask_txn"):
        app.test_client().get("/leave")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "flask_txn",
            "WARNING",
            "Uncommitted writes were rolled back at app-context teardown (endpoint"
            f" 'leave', database {url}). Wrap the writes in '@atomic' or call"
            " 'session.commit()'; set 'TXN_ON_DISCARD' to 'ignore' to silence this.",
        )
    ]


def test_discarded_orm_statement_is_reported(make_app: AppFactory) -> None:
    """An ORM insert() run through the session and never committed counts as a discarded write."""
    app, txn = make_app(TXN_ON_DISCARD="raise")

    @app.get("/insert")
    def insert() -> str:
        txn.session.execute(sa.insert(Item).values(name="inserted"))
        return "ok"

    with pytest.raises(PendingWritesError, match="endpoint 'insert'"):
        app.test_client().get("/insert")


def test_raw_sql_writes_are_discarded_unreported(make_app: AppFactory) -> None:
    """Documented limit: a raw SQL string's write is rolled back at teardown without a report."""
    app, txn = make_app(TXN_ON_DISCARD="raise")

    @app.get("/raw")
    def raw() -> str:
        txn.session.execute(sa.text("INSERT INTO item (name, value) VALUES ('raw', 0)"))
        return "ok"

    app.test_client().get("/raw")
    assert count_items(app, txn) == 0


def test_read_only_request_is_not_reported(
    discarding: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that only read leaves nothing to report at teardown."""
    app, _ = discarding()
    with caplog.at_level(logging.DEBUG, logger="flask_txn"):
        app.test_client().get("/read")
    assert caplog.records == []


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_writes_of_an_ended_transaction_are_not_reported(make_app: AppFactory, end: str) -> None:
    """Writes that a commit or rollback ended do not count against the next transaction."""
    app, txn = make_app(TXN_ON_DISCARD="raise")

    @app.get("/")
    def view() -> str:
        txn.session.execute(sa.insert(Item).values(name="statement"))
        txn.session.add(Item(name="flushed"))
        txn.session.flush()
        getattr(txn.session, end)()
        # A new transaction, open at teardown, that only reads.
        return str(txn.session.scalar(sa.select(sa.func.count()).select_from(Item)))

    assert app.test_client().get("/").text == ("2" if end == "commit" else "0")


def test_discard_ignore_is_silent(discarding: Any, caplog: pytest.LogCaptureFixture) -> None:
    """TXN_ON_DISCARD='ignore' logs nothing for discarded writes."""
    app, _ = discarding(TXN_ON_DISCARD="ignore")
    with caplog.at_level(logging.DEBUG, logger="flask_txn"):
        app.test_client().get("/leave")
    assert caplog.records == []


def test_discard_raise_raises_pending_writes_error(discarding: Any) -> None:
    """TXN_ON_DISCARD='raise' raises PendingWritesError from the teardown."""
    app, _ = discarding(TXN_ON_DISCARD="raise")
    with pytest.raises(
        PendingWritesError, match=r"^Uncommitted writes were rolled back at app-context teardown"
    ):
        app.test_client().get("/leave")


class NextFlaskAppContext(AppContext):
    """An app context that ends as Flask's next release ends one: it passes itself,
    then the exception, to ``do_teardown_appcontext``."""

    def pop(self, exc: BaseException | None = None) -> None:  # type: ignore[override]
        try:
            self.app.do_teardown_appcontext(self, exc)  # type: ignore[call-arg]
        finally:
            _cv_app.reset(self._cv_tokens.pop())


class NextFlask(Flask):
    """Flask's next calling convention for teardown: context first."""

    def do_teardown_appcontext(self, ctx: Any, exc: Any = None) -> None:  # type: ignore[override]
        for func in reversed(self.teardown_appcontext_funcs):
            self.ensure_sync(func)(exc)

    def app_context(self) -> AppContext:
        return NextFlaskAppContext(self)


@pytest.mark.parametrize("fail", [False, True])
def test_teardown_understands_the_context_first_convention(sqlite_url: str, fail: bool) -> None:
    """Called as ``do_teardown_appcontext(ctx, exc)``, teardown still tells a failed
    context from a clean one: 'raise' raises, unless the context ended with an error."""
    app = NextFlask("next")
    app.config.update(TXN_DATABASE_URI=sqlite_url, TXN_ON_DISCARD="raise")
    txn = FlaskTxn(app)
    with app.app_context():
        Base.metadata.create_all(txn.engine)
    ctx = app.app_context()
    ctx.push()
    txn.session.add(Item(name="left behind"))
    if fail:
        ctx.pop(LookupError("the context failed"))  # logged: the context's error is the news
    else:
        with pytest.raises(PendingWritesError, match=r"^Uncommitted writes were rolled back"):
            ctx.pop(None)
    assert count_items(app, txn) == 0
    with app.app_context():
        assert txn.engine.pool.checkedout() == 0
        txn.engine.dispose()


def test_teardown_called_bare_looks_at_the_exception_being_handled(discarding: Any) -> None:
    """``do_teardown_appcontext()`` with no argument, as Flask's own method does,
    takes the exception being handled: inside ``except`` it only logs."""
    app, txn = discarding(TXN_ON_DISCARD="raise")
    with app.app_context():
        txn.session.add(Item(name="left behind"))
        try:
            raise LookupError("being handled")
        except LookupError:
            app.do_teardown_appcontext()
        txn.session.add(Item(name="left behind again"))
        with pytest.raises(PendingWritesError):
            app.do_teardown_appcontext()
    assert count_items(app, txn) == 0


def test_discard_raise_keeps_the_view_error(discarding: Any) -> None:
    """TXN_ON_DISCARD='raise' lets the view's own exception through instead of replacing it."""
    app, _ = discarding(fail=True, TXN_ON_DISCARD="raise")
    with pytest.raises(LookupError, match="the view failed"):
        app.test_client().get("/leave")


def test_discarded_writes_are_gone(discarding: Any) -> None:
    """Writes discarded at teardown are not in the database."""
    app, txn = discarding(TXN_ON_DISCARD="ignore")
    app.test_client().get("/leave")
    assert count_items(app, txn) == 0


# -- passwords -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://user:s3cret@127.0.0.1:notaport/db",
        "not a url://user:s3cret@host/db",
        "postgresql://user:s3/cr:et@host:notaport/db",
        "nosuchdb://user:s3cret@host/db",
    ],
)
def test_bad_url_message_hides_the_password(url: str) -> None:
    """A ConfigError about a URL with a password shows the URL with the password masked."""
    app = Flask("secret")
    app.config["TXN_DATABASE_URI"] = url
    with pytest.raises(ConfigError) as excinfo:
        FlaskTxn(app)
    message = str(excinfo.value)
    assert ("s3" not in message, ":***@" in message) == (True, True)


def test_bad_url_type_message_hides_the_password() -> None:
    """A URL given as bytes is refused with the password masked."""
    app = Flask("secret")
    app.config["TXN_DATABASE_URI"] = SECRET_URL.encode()
    with pytest.raises(ConfigError, match=re.escape(HIDDEN_URL)) as excinfo:
        FlaskTxn(app)
    assert "s3cret" not in str(excinfo.value)


def test_engine_repr_hides_the_password() -> None:
    """repr() of the engine and the settings show the URL with the password masked."""
    app, txn = init(SECRET_URL)
    with app.app_context():
        shown = repr(txn.engine) + repr(txn.settings)
    assert (HIDDEN_URL in shown, "s3cret" in shown) == (True, False)


def test_discard_warning_hides_the_password(caplog: pytest.LogCaptureFixture) -> None:
    """The discarded-writes warning shows the URL with the password masked."""
    app, txn = init(SECRET_URL)

    @app.get("/leave")
    def leave() -> str:
        txn.session.add(Item(name="never flushed, so nothing connects"))
        return "ok"

    with caplog.at_level(logging.WARNING, logger="flask_txn"):
        app.test_client().get("/leave")
    assert (HIDDEN_URL in caplog.text, "s3cret" in caplog.text) == (True, False)


def test_discard_error_hides_the_password() -> None:
    """The PendingWritesError of TXN_ON_DISCARD='raise' shows the URL with the password masked."""
    app, txn = init(SECRET_URL, TXN_ON_DISCARD="raise")

    @app.get("/leave")
    def leave() -> str:
        txn.session.add(Item(name="never flushed, so nothing connects"))
        return "ok"

    with pytest.raises(PendingWritesError, match=re.escape(HIDDEN_URL)) as excinfo:
        app.test_client().get("/leave")
    assert "s3cret" not in str(excinfo.value)


# -- pytest-flask ------------------------------------------------------------------


class TestPytestFlask:
    """pytest-flask's ``app`` and ``client`` fixtures with the extension.

    pytest-flask pushes a test request context for the whole test, so the
    client's requests reuse the test's app context: flask-txn removes their
    session when the test ends, not after each request.
    """

    @pytest.fixture
    def app(self, make_app: AppFactory) -> Iterator[Flask]:
        """The app pytest-flask serves; checks the session is gone once the test ended."""
        app, txn = make_app()
        app.config["sessions"] = sessions = []

        @app.post("/items")
        def add() -> str:
            sessions.append(txn.session())
            txn.session.add(Item(name="posted"))
            txn.session.commit()
            return str(txn.session.scalar(sa.select(sa.func.count()).select_from(Item)))

        yield app
        # pytest-flask popped its context before this runs.
        with app.app_context():
            assert txn.engine.pool.checkedout() == 0
            assert all(session is not txn.session() for session in sessions)

    @pytest.fixture
    def txn(self, app: Flask) -> FlaskTxn:
        """The app's extension."""
        return app.extensions["flask-txn"]  # type: ignore[no-any-return]

    def test_client_requests_commit(self, client: Any) -> None:
        """Requests through pytest-flask's client run the view and commit its writes."""
        assert [client.post("/items").text for _ in range(2)] == ["1", "2"]

    def test_client_requests_share_the_test_session(
        self, app: Flask, txn: FlaskTxn, client: Any
    ) -> None:
        """Every request in the test uses the session of the test's own app context."""
        client.post("/items")
        client.post("/items")
        assert app.config["sessions"] == [txn.session(), txn.session()]

    def test_session_stays_open_until_the_test_ends(
        self, app: Flask, txn: FlaskTxn, client: Any
    ) -> None:
        """After a client request the session still holds its connection: teardown waits."""
        client.post("/items")
        assert txn.engine.pool.checkedout() == 1
