"""Fixtures: throwaway PostgreSQL and MariaDB servers, apps on each engine, test models.

``FLASK_TXN_TEST_POSTGRESQL`` (``FLASK_TXN_TEST_MARIADB``) set to a SQLAlchemy
URL makes the suite use that server instead of starting one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_txn import FlaskTxn, _transaction, idempotency_keys

from . import mariadb, pgserver

POSTGRESQL_ENV = "FLASK_TXN_TEST_POSTGRESQL"
MARIADB_ENV = "FLASK_TXN_TEST_MARIADB"


def pytest_configure(config: pytest.Config) -> None:
    """A run ended by SIGTERM (``timeout``, a CI limit) stops like one ended by Ctrl-C:
    pytest then tears its fixtures down, and the servers they started stop too."""
    config.addinivalue_line(
        "markers", "every_engine: run the test's database_url on MariaDB too (conftest.ENGINES)"
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), default="")
    value: Mapped[int] = mapped_column(default=0)


@pytest.fixture(autouse=True)
def no_block_left_open() -> Iterator[None]:
    """A test leaves no atomic block open: a leaked one would reach the tests after it."""
    yield
    assert _transaction.current() is None, "an atomic block was left open"


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A PostgreSQL server for the whole session: the user's, or one started here."""
    url = os.environ.get(POSTGRESQL_ENV)
    if url:
        yield url
        return
    with pgserver.running() as server:
        yield server.url


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    """A SQLite file (not ``:memory:``, which SQLAlchemy keeps per thread)."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A MariaDB server for the whole session, through PyMySQL: the user's, or one started here."""
    url = os.environ.get(MARIADB_ENV)
    if url:
        yield url
        return
    with mariadb.running() as server:
        yield server.render_as_string(hide_password=False)


@pytest.fixture
def mysqlclient_url(mariadb_url: str) -> str:
    """The MariaDB server through mysqlclient (MySQLdb), which CI installs (see CONTRIBUTING)."""
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        message = (
            "No 'mysqlclient' for the MariaDB tests through it: apt-get install"
            " default-libmysqlclient-dev pkg-config build-essential, then"
            " .venv/bin/pip install mysqlclient."
        )
        if os.environ.get("CI"):
            pytest.fail(message + " CI must run them: .ci/run installs it.")
        pytest.skip(message)
    return sa.make_url(mariadb_url).set(drivername="mysql+mysqldb").render_as_string(False)


#: Every engine the suite runs; the database_url fixture runs the first two by default.
ENGINES = ("sqlite", "postgresql", "mariadb")
#: Mark a test (or a module, as ``pytestmark``) whose behaviour holds on MariaDB too:
#: its tests that use ``database_url`` run on every engine.
every_engine = pytest.mark.every_engine


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the tests marked :data:`every_engine` that use ``database_url`` on MariaDB
    too, unless they choose their engines themselves (a parametrize mark, or a
    module's own ``database_url`` fixture)."""
    chosen = hasattr(metafunc.module, "database_url") or any(
        "database_url" in str(mark.args[0] if mark.args else mark.kwargs.get("argnames"))
        for mark in metafunc.definition.iter_markers("parametrize")
    )
    if metafunc.definition.get_closest_marker("every_engine") and (
        "database_url" in metafunc.fixturenames and not chosen
    ):
        metafunc.definition.add_marker(
            pytest.mark.parametrize("database_url", ENGINES, indirect=True)
        )


@pytest.fixture(params=ENGINES[:2])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each engine in turn, for behaviour that must hold on both (on all three
    with :data:`every_engine`)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


AppFactory = Callable[..., tuple[Flask, FlaskTxn]]


@contextlib.contextmanager
def new_database(url: str, name: str) -> Iterator[sa.URL]:
    """A new, empty database ``name`` on the server of ``url`` (PostgreSQL or MariaDB),
    dropped afterwards, however the block ends (on PostgreSQL, open connections too)."""
    server = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    force = " WITH (FORCE)" if server.dialect.name == "postgresql" else ""
    try:
        with server.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield sa.make_url(url).set(database=name)
        finally:
            with server.connect() as connection:
                connection.exec_driver_sql(f"DROP DATABASE {name}{force}")
    finally:
        server.dispose()


@pytest.fixture
def make_app(database_url: str) -> Iterator[AppFactory]:
    """Build apps on ``database_url`` with fresh tables; check for leaked connections after."""
    made: list[tuple[Flask, FlaskTxn]] = []

    def make(url: str | None = None, *, txn: FlaskTxn | None = None, **config: Any) -> Any:
        app = Flask(f"app{len(made)}")
        app.config.update(TESTING=True, TXN_DATABASE_URI=url or database_url, **config)
        txn = txn or FlaskTxn()
        txn.init_app(app)
        with app.app_context():
            Base.metadata.drop_all(txn.engine)
            Base.metadata.create_all(txn.engine)
        made.append((app, txn))
        return app, txn

    yield make
    for app, txn in made:
        with app.app_context():
            engine = txn.engine
        assert engine.pool.checkedout() == 0, "a test leaked a connection"
        engine.dispose()
        database = txn._states[app].async_database
        if database is not None:
            database.close()  # pooled psycopg 3 connections


@pytest.fixture
def keys_table(make_app: Any) -> Iterator[Callable[[Flask, Any], None]]:
    """Give an app a fresh idempotency table, with no other test's keys in it (the
    bank's tests keep theirs on the shared server); it is dropped after the test."""
    given: list[tuple[Flask, Any]] = []

    def fresh(app: Flask, txn: Any) -> None:
        with app.app_context():
            idempotency_keys.drop(txn.engine, checkfirst=True)
            idempotency_keys.create(txn.engine)
        given.append((app, txn))

    yield fresh
    for app, txn in given:
        with app.app_context():
            idempotency_keys.drop(txn.engine)


@pytest.fixture
def app_txn(make_app: AppFactory) -> tuple[Flask, FlaskTxn]:
    """One app on the current engine."""
    return make_app()


def count_items(app: Flask, txn: FlaskTxn) -> int:
    """Rows in ``item``, read on a fresh connection outside any session."""
    with app.app_context(), txn.engine.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).select_from(Item)) or 0)


class Attempts:
    """Counts calls per thread, so a barrier is awaited on the first attempt only."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def first(self) -> bool:
        """Record a call by this thread; True if it is its first."""
        with self.lock:
            self.calls[threading.current_thread().name] += 1
            return self.calls[threading.current_thread().name] == 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())


# -- a real browser, for the pages (the bank, the docs) ---------------------------------

#: Chromium flags for a headless run as root that reaches for nothing on the network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
)


def _find_browser() -> tuple[str, str]:
    """Chromium and chromedriver; skip without them on a laptop, fail on CI."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the 'selenium' package (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None:
        missing.append("'chromium' on PATH (apt-get install chromium)")
    if driver is None:
        missing.append("'chromedriver' on PATH (apt-get install chromium-driver)")
    if missing:
        message = "No browser for the page test: missing " + ", ".join(missing) + "."
        if os.environ.get("CI"):
            pytest.fail(message + " CI must run it: .ci/run installs them.")
        pytest.skip(message)
    assert chromium is not None
    assert driver is not None
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium driven through chromedriver; quit however the test ends."""
    chromium, driver = _find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # Both paths given: Selenium Manager (which would download a driver) never runs.
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="flask-txn-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        chrome = webdriver.Chrome(options=options, service=Service(driver))
        try:
            yield chrome
        finally:
            chrome.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
