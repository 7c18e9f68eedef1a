"""The N+1 guard: lazy loads in a loop over a query's results, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

from flask_txn import FlaskTxn, NPlusOneError, atomic
from flask_txn._nplusone import Guard

from .conftest import every_engine

pytestmark = every_engine


class Model(DeclarativeBase):
    pass


book_tags = sa.Table(
    "np_book_tag",
    Model.metadata,
    sa.Column("book_id", sa.ForeignKey("np_book.id"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey("np_tag.id"), primary_key=True),
)


class Author(Model):
    __tablename__ = "np_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Model):
    __tablename__ = "np_book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("np_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")
    tags: Mapped[list[Tag]] = relationship(secondary=book_tags, order_by="Tag.id")


class Tag(Model):
    __tablename__ = "np_tag"
    id: Mapped[int] = mapped_column(primary_key=True)


class Node(Model):
    __tablename__ = "np_node"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("np_node.id"))
    children: Mapped[list[Node]] = relationship(back_populates="parent", order_by="Node.id")
    parent: Mapped[Node | None] = relationship(back_populates="children", remote_side=[id])


#: Three authors with two books each; every book has both tags; a tree of 1 + 3 + 6 nodes.
AUTHORS = 3


@pytest.fixture
def library(make_app: Any) -> Callable[..., tuple[Flask, FlaskTxn]]:
    """Make an app (TESTING, so the guard warns by default) on the library's tables."""

    def make(**config: Any) -> tuple[Flask, FlaskTxn]:
        app, txn = make_app(**config)
        with app.app_context():
            Model.metadata.drop_all(txn.engine)
            Model.metadata.create_all(txn.engine)
            with atomic():
                tags = [Tag(id=1), Tag(id=2)]
                for a in range(1, AUTHORS + 1):
                    books = [Book(id=10 * a + b, tags=tags) for b in range(2)]
                    txn.session.add(Author(id=a, books=books))
                root = Node(id=1)
                for c in range(2, 5):
                    root.children.append(Node(id=c, children=[Node(id=10 * c + i) for i in (0, 1)]))
                txn.session.add(root)
        return app, txn

    return make


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "flask_txn" and "N+1" in r.getMessage()
    ]


LOOPS: dict[str, tuple[Callable[[Any], object], str, str]] = {
    "one-to-many": (
        lambda s: [len(a.books) for a in s.scalars(sa.select(Author))],
        "Author.books",
        "select(Author).options(selectinload(Author.books))",
    ),
    "many-to-one": (
        lambda s: [b.author.id for b in s.scalars(sa.select(Book))],
        "Book.author",
        "select(Book).options(joinedload(Book.author))",
    ),
    "many-to-many": (
        lambda s: [len(b.tags) for b in s.scalars(sa.select(Book))],
        "Book.tags",
        "select(Book).options(selectinload(Book.tags))",
    ),
    "self-referential": (
        lambda s: [len(n.children) for n in s.scalars(sa.select(Node).where(Node.id < 5))],
        "Node.children",
        "select(Node).options(selectinload(Node.children))",
    ),
}


@pytest.mark.parametrize("kind", list(LOOPS))
def test_lazy_loads_in_a_loop_are_reported_with_the_fix(
    library: Any, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """Each relationship kind, lazy-loaded in a loop over one query's results, is
    reported once, naming the endpoint, the relationship and the eager load."""
    app, txn = library()
    loop, name, fix = LOOPS[kind]

    @app.get("/list")
    @atomic
    def listing() -> str:
        loop(txn.session)
        return "ok"

    with caplog.at_level(logging.WARNING, logger="flask_txn"):
        assert app.test_client().get("/list").status_code == 200
    owner = name.split(".")[0]
    assert warnings_of(caplog) == [
        f"N+1 queries in endpoint 'listing': {name} was lazy-loaded, one query each, for 2"
        f" {owner} objects that one query returned. Load it with that query instead: {fix}."
        " Set 'TXN_NPLUSONE' to 'off' to silence this."
    ]


EAGER: dict[str, Callable[[Any], object]] = {
    "selectinload": lambda s: [
        len(a.books) for a in s.scalars(sa.select(Author).options(selectinload(Author.books)))
    ],
    "joinedload": lambda s: [
        b.author.id for b in s.scalars(sa.select(Book).options(joinedload(Book.author)))
    ],
    "one parent's relationship once": lambda s: len(s.get(Author, 1).books),
    "objects fetched one by one": lambda s: [
        len(s.get(Author, a).books) for a in range(1, AUTHORS + 1)
    ],
    "one object's relationships from a query": lambda s: [
        len(b.tags) for b in s.get(Author, 1).books[:1]
    ],
    "objects the code made itself": lambda s: made_by_the_code(s),
}


def made_by_the_code(session: Any) -> list[int]:
    """Books the code adds (no query loaded them), then their authors, lazily."""
    books = [Book(id=90 + a, author_id=a) for a in range(1, AUTHORS + 1)]
    session.add_all(books)
    session.flush()
    return [book.author.id for book in books]


@pytest.mark.parametrize("case", list(EAGER))
def test_no_report_without_an_n_plus_one(
    library: Any, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """Eager-loaded code, and lazy loads that are not one per object of a query, are quiet."""
    app, txn = library(TXN_NPLUSONE="raise")
    with caplog.at_level(logging.WARNING, logger="flask_txn"), app.app_context(), atomic():
        EAGER[case](txn.session)
    assert warnings_of(caplog) == []


def test_raise_stops_the_load_that_makes_the_n_plus_one(library: Any) -> None:
    """'raise': the lazy load for the second object of the query raises NPlusOneError."""
    app, txn = library(TXN_NPLUSONE="raise")
    loaded = []
    with app.app_context(), atomic(), pytest.raises(NPlusOneError) as raised:
        for author in txn.session.scalars(sa.select(Author)):
            loaded.append(len(author.books))
    assert loaded == [2]
    assert str(raised.value).startswith(
        "N+1 queries outside a request: Author.books was lazy-loaded, one query each, for 2"
    )


def test_threshold(library: Any) -> None:
    """TXN_NPLUSONE_THRESHOLD=3: two objects' lazy loads pass, the third raises."""
    app, txn = library(TXN_NPLUSONE="raise", TXN_NPLUSONE_THRESHOLD=3)
    loaded = []
    with app.app_context(), atomic(), pytest.raises(NPlusOneError, match="for 3 Author objects"):
        for author in txn.session.scalars(sa.select(Author)):
            loaded.append(len(author.books))
    assert loaded == [2, 2]


def test_warned_once_per_endpoint_and_relationship(
    library: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The same N+1 on every request of an endpoint is one WARNING; another endpoint
    gets its own."""
    app, txn = library()

    def books() -> str:
        return str(sum(len(a.books) for a in txn.session.scalars(sa.select(Author))))

    app.get("/a", endpoint="first")(atomic(books))
    app.get("/b", endpoint="second")(atomic(books))
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="flask_txn"):
        assert [client.get(path).text for path in ("/a", "/a", "/b", "/a")] == ["6"] * 4
    assert [message.split(":")[0] for message in warnings_of(caplog)] == [
        "N+1 queries in endpoint 'first'",
        "N+1 queries in endpoint 'second'",
    ]


@pytest.mark.parametrize(
    ("config", "mode"),
    [({"TESTING": True}, "warn"), ({"DEBUG": True}, "warn"), ({}, "off")],
)
def test_default_mode_follows_debug_and_testing(
    sqlite_url: str, config: dict[str, Any], mode: str
) -> None:
    """Unset, TXN_NPLUSONE is 'warn' in debug or testing mode and 'off' otherwise,
    and init_app writes the value in force into the config."""
    app = Flask("modes")
    app.config.update(TXN_DATABASE_URI=sqlite_url, **config)
    txn = FlaskTxn(app)
    with app.app_context():
        listening = guards(txn)
        txn.session.remove()
        txn.engine.dispose()
    assert (app.config["TXN_NPLUSONE"], listening) == (mode, 0 if mode == "off" else 1)


def guards(txn: FlaskTxn) -> int:
    """How many N+1 guards listen to the current app's sessions."""
    return sum(isinstance(f, Guard) for f in txn.session().dispatch.do_orm_execute)


def test_off_adds_no_listener(library: Any, caplog: pytest.LogCaptureFixture) -> None:
    """'off': the N+1 runs unreported, and nothing listens to the sessions for it."""
    app, txn = library(TXN_NPLUSONE="off")
    with caplog.at_level(logging.WARNING, logger="flask_txn"), app.app_context(), atomic():
        assert [len(a.books) for a in txn.session.scalars(sa.select(Author))] == [2, 2, 2]
        assert guards(txn) == 0
    assert warnings_of(caplog) == []
