"""The pytest plugin (flask_txn.testing): each fixture and each documented limitation.

Every test writes a small test module, runs it with pytester on SQLite and on
PostgreSQL, and checks its outcome.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import os

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from flask_txn import FlaskTxn, atomic, on_commit

txn = FlaskTxn()
SENT = []
CALLS = []
HELD = []  # connections checked out during each backoff sleep


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    books: Mapped[list["Book"]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def authors():
    with txn.engine.connect() as connection:
        return list(connection.scalars(sa.select(Author.name).order_by(Author.id)))


@pytest.fixture(scope="session")
def app():
    app = Flask("inner")
    app.config.update(
        TESTING=True,
        TXN_DATABASE_URI=os.environ["INNER_DATABASE_URL"],
        TXN_RETRY_SLEEP=lambda delay: HELD.append(txn.engine.pool.checkedout()),
    )
    txn.init_app(app)
    with app.app_context():
        Base.metadata.drop_all(txn.engine)
        Base.metadata.create_all(txn.engine)

    @app.post("/authors/<name>")
    @atomic
    def add_author(name):
        CALLS.append(name)
        author = Author(name=name)
        txn.session.add(author)
        txn.session.flush()
        txn.session.add_all([Book(author_id=author.id), Book(author_id=author.id)])
        on_commit(lambda: SENT.append(f"welcome {name}"))
        return "ok"

    @app.get("/books")
    def books_lazy():
        return {a.name: len(a.books) for a in txn.session.scalars(sa.select(Author))}

    @app.get("/books/eager")
    def books_eager():
        query = sa.select(Author).options(selectinload(Author.books))
        return {a.name: len(a.books) for a in txn.session.scalars(query)}

    @app.get("/level")
    @atomic(isolation=os.environ["INNER_OTHER_LEVEL"])
    def level():
        return txn.session.connection().get_isolation_level()

    yield app
    with app.app_context():
        Base.metadata.drop_all(txn.engine)
        txn.engine.dispose()
"""


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def inner(request: pytest.FixtureRequest, pytester: pytest.Pytester, monkeypatch: Any) -> Any:
    """A pytester whose test modules get an ``app`` on SQLite, PostgreSQL or MariaDB."""
    if request.param == "sqlite":
        url = f"sqlite:///{pytester.path / 'inner.db'}"
        monkeypatch.setenv("INNER_OTHER_LEVEL", "READ UNCOMMITTED")
    else:
        url = str(request.getfixturevalue(f"{request.param}_url"))
        monkeypatch.setenv("INNER_OTHER_LEVEL", "SERIALIZABLE")
    monkeypatch.setenv("INNER_DATABASE_URL", url)
    pytester.makeconftest(CONFTEST)
    pytester.url = url  # type: ignore[attr-defined]
    return pytester


def run(inner: Any, source: str, **outcomes: int) -> Any:
    """Run ``source`` as a test module and assert its outcomes."""
    inner.makepyfile(test_inner=source)
    result = inner.runpytest_inprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(**outcomes)
    return result


def test_rollback_isolation_between_tests(inner: Any) -> None:
    """Data a request commits in test A is gone in test B, and nothing reaches the database."""
    run(
        inner,
        """
        from conftest import authors

        def test_a(txn_rollback, client):
            assert client.post("/authors/ann").status_code == 200
            assert authors() == []  # another connection: the commit is a savepoint release

        def test_b(txn_rollback, client, txn_signals, txn_queries):
            assert client.get("/books").json == {}
            assert authors() == []
            assert txn_queries.count == 2  # the view's SELECT and authors()'s
            client.post("/authors/bo")
            txn_signals.clear()
            assert txn_signals.events == []

        def test_c(txn_rollback, client):
            client.post("/authors/cat")
            txn_rollback.rollback()  # the test may end the transaction itself
        """,
        passed=3,
    )


def test_atomic_keeps_its_semantics_inside_the_test_transaction(inner: Any) -> None:
    """Commits, rollbacks, savepoints and signals behave as in production."""
    run(
        inner,
        """
        import pytest
        from conftest import Author, txn
        from flask_txn import atomic

        def test_blocks(txn_rollback, txn_signals, app):
            with atomic():
                txn.session.add(Author(name="kept"))
                with pytest.raises(ValueError), atomic():
                    txn.session.add(Author(name="savepoint"))
                    raise ValueError
            with pytest.raises(KeyError), atomic():
                txn.session.add(Author(name="rolled back"))
                raise KeyError
            names = [a.name for a in txn.session.query(Author).order_by(Author.id)]
            assert names == ["kept"]
            assert txn_signals.names() == [
                "transaction-committed", "transaction-rolled-back"
            ]
        """,
        passed=1,
    )


def test_injected_failure_reruns_the_view_and_commits_once(inner: Any) -> None:
    """``txn_faults.fail_next()`` makes the view run twice and commit once."""
    run(
        inner,
        """
        from conftest import CALLS, Author, txn

        def test_retry(txn_rollback, txn_faults, txn_signals, client):
            txn_faults.fail_next(1, endpoint="add_author")
            assert client.post("/authors/bob").status_code == 200
            assert CALLS == ["bob", "bob"]
            assert txn_faults.injected == 1
            txn_signals.assert_retried_then_committed(1)
            assert txn.session.query(Author).count() == 1
        """,
        passed=1,
    )


def test_injected_error_has_the_drivers_real_shape(inner: Any) -> None:
    """The injected error is raised by the database: real driver exception, retriable code."""
    run(
        inner,
        """
        import pytest
        import sqlalchemy as sa
        from flask_txn import atomic, is_retryable, sqlstate_of

        def test_shape(txn_faults, app):
            txn_faults.fail_next(1)
            with pytest.raises(sa.exc.OperationalError) as raised:
                atomic(retries=0)(lambda: None)()
            module = type(raised.value.orig).__module__.split(".")[0]
            assert module in ("sqlite3", "psycopg2", "pymysql")
            assert sqlstate_of(raised.value) in ("40001", "SQLITE_LOCKED", "1213")
            assert is_retryable(raised.value)
        """,
        passed=1,
    )


def test_fault_injection_refuses_bad_arguments(inner: Any) -> None:
    """Bad ``fail_next`` arguments get a clear error naming them."""
    run(
        inner,
        """
        import pytest
        from flask_txn import ConfigError, atomic

        def test_bad(txn_faults, app):
            with pytest.raises(ConfigError, match=r"'times' must be a whole number >= 1, got 0"):
                txn_faults.fail_next(0)
            txn_faults.fail_next(1, code="23505")
            with pytest.raises(ConfigError, match=r"'code' must be one of .* got '23505'"):
                atomic(retries=0)(lambda: None)()
        """,
        passed=1,
    )


def test_captured_callbacks_run_only_on_request(inner: Any) -> None:
    """``txn_on_commit`` holds the callbacks until ``run()``."""
    run(
        inner,
        """
        from conftest import SENT

        def test_email(txn_rollback, txn_on_commit, client):
            client.post("/authors/cy")
            assert len(txn_on_commit) == 1
            assert SENT == []
            txn_on_commit.run()
            assert SENT == ["welcome cy"]
            assert len(txn_on_commit) == 0
            txn_on_commit.execute = True  # run at commit too, as in production
            client.post("/authors/dan")
            assert SENT == ["welcome cy", "welcome dan"]
            assert len(txn_on_commit) == 1
        """,
        passed=1,
    )


def test_query_counter_catches_n_plus_one(inner: Any) -> None:
    """Lazy loading runs a query per author; ``selectinload`` stays within the limit."""
    run(
        inner,
        """
        import pytest

        def test_lazy(txn_rollback, txn_queries, client):
            for name in ("a", "b", "c"):
                client.post(f"/authors/{name}")
            with pytest.raises(AssertionError, match="4 statements ran, at most 2"):
                with txn_queries.assert_max_queries(2):
                    assert client.get("/books").json == {"a": 2, "b": 2, "c": 2}
            with txn_queries.assert_max_queries(2):
                assert client.get("/books/eager").json == {"a": 2, "b": 2, "c": 2}
        """,
        passed=1,
    )


def test_limitation_isolation_is_the_test_transactions(inner: Any) -> None:
    """Inside the test transaction a block's isolation level is not applied."""
    run(
        inner,
        """
        import os
        from conftest import txn

        def test_level(txn_rollback, client):
            outer_level = txn_rollback.get_isolation_level()
            assert client.get("/level").text == outer_level
            assert outer_level != os.environ["INNER_OTHER_LEVEL"]
        """,
        passed=1,
    )


def test_limitation_durable_commits_into_the_test_transaction(inner: Any) -> None:
    """A durable block at the test's top level runs, but its commit is a savepoint release."""
    run(
        inner,
        """
        from conftest import Author, authors, txn
        from flask_txn import atomic

        def test_durable(txn_rollback, app):
            with atomic(durable=True):
                txn.session.add(Author(name="durable"))
            assert txn.session.query(Author).count() == 1
            assert authors() == []
        """,
        passed=1,
    )


def test_limitation_connection_kept_during_backoff(inner: Any) -> None:
    """Between attempts the test's one connection stays checked out."""
    run(
        inner,
        """
        from conftest import HELD

        def test_backoff(txn_rollback, txn_faults, client):
            txn_faults.fail_next(1)
            client.post("/authors/dee")
            assert HELD == [1]
        """,
        passed=1,
    )


def test_limitation_direct_engine_connections_escape(inner: Any) -> None:
    """``txn.engine.connect()`` is a new connection: its commits are not rolled back."""
    run(
        inner,
        """
        import sqlalchemy as sa
        from conftest import Author, authors, txn

        def test_escape(txn_rollback, app):
            with txn.engine.begin() as connection:
                connection.execute(sa.insert(Author).values(name="escaped"))

        def test_still_there(txn_rollback, app):
            assert authors() == ["escaped"]
            with txn.engine.begin() as connection:
                connection.execute(sa.delete(Author))
        """,
        passed=2,
    )


def test_limitation_other_threads_are_refused(inner: Any) -> None:
    """A request from another thread gets a clear error instead of sharing the connection."""
    run(
        inner,
        """
        import threading
        import pytest
        from flask_txn import UsageError

        def test_thread(txn_rollback, app):
            errors = []

            def request():
                try:
                    app.test_client().post("/authors/eve")
                except UsageError as exc:
                    errors.append(exc)

            thread = threading.Thread(target=request)
            thread.start()
            thread.join(30)
            assert "cannot serve a request from another thread" in str(errors[0])
        """,
        passed=1,
    )


def test_opting_out_uses_real_transactions(inner: Any) -> None:
    """With the ``txn_no_rollback`` marker, commits are real and the level is applied."""
    run(
        inner,
        """
        import os
        import pytest
        import sqlalchemy as sa
        from conftest import Author, Book, authors, txn

        @pytest.mark.txn_no_rollback
        def test_real(txn_rollback, client):
            assert txn_rollback is None
            client.post("/authors/fay")
            assert authors() == ["fay"]
            assert client.get("/level").text == os.environ["INNER_OTHER_LEVEL"]
            with txn.engine.begin() as connection:
                connection.execute(sa.delete(Book))
                connection.execute(sa.delete(Author))
        """,
        passed=1,
    )


def test_fixtures_need_the_extension(pytester: pytest.Pytester) -> None:
    """An ``app`` without flask-txn gets an error saying what to call."""
    pytester.makepyfile(
        """
        import pytest
        from flask import Flask

        @pytest.fixture
        def app():
            return Flask("bare")

        def test_bare(txn_rollback):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*has no flask-txn extension*init_app*"])


def test_nplusone_fixture_fails_a_test_that_lazy_loads_in_a_loop(inner: Any) -> None:
    """txn_nplusone fails the test whose request lazy-loads Author.books for each author,
    with the guard's message, and passes the eager version."""
    result = run(
        inner,
        """
        def test_lazy(txn_rollback, txn_nplusone, client):
            client.post("/authors/ann")
            client.post("/authors/bo")
            assert client.get("/books").json == {"ann": 2, "bo": 2}

        def test_eager(txn_rollback, txn_nplusone, client):
            client.post("/authors/ann")
            client.post("/authors/bo")
            assert client.get("/books/eager").json == {"ann": 2, "bo": 2}
            assert txn_nplusone == []
        """,
        passed=1,
        failed=1,
    )
    result.stdout.fnmatch_lines(
        [
            "*N+1 queries in endpoint 'books_lazy': Author.books was lazy-loaded, one query"
            " each, for 2 Author objects that one query returned. Load it with that query"
            " instead: select(Author).options(selectinload(Author.books)).*"
        ]
    )
