"""Every Python block in the docs runs: page by page, in order, as a reader would paste them.

Pages whose blocks lean on names the reader already has (an ``app``, a model)
get them from a small prelude here; after running a page's blocks, a test
calls what they define and checks what the page says about it. Pages that
show code from files (``literalinclude``) are covered by those files' tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, request
from flask.views import MethodView
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from flask_txn import (
    FlaskTxn,
    atomic,
    on_commit,
    testing,
    transaction_committed,
    transaction_retrying,
    transaction_rolled_back,
)
from flask_txn.opentelemetry import uninstrument

# The plugin is off in this suite (pyproject.toml): borrow the one fixture used here.
txn_faults = testing.txn_faults

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: Pages with Python blocks of their own; a test below checks that no page is missed.
PAGES = [
    "adopting",
    "async",
    "atomic",
    "config",
    "idempotency",
    "locking",
    "nplusone",
    "observability",
    "reliability",
    "retries",
    "signals",
    "testing",
]
#: The database URL written in docs/locking.md, replaced by the test server's.
LOCKING_URL = "postgresql+psycopg2://localhost/app"


def blocks(page: str) -> list[str]:
    """The ```python blocks of ``docs/<page>.md``, dedented (some sit in list items)."""
    path = DOCS.parent / "README.md" if page == "README" else DOCS / f"{page}.md"
    text = path.read_text(encoding="utf-8")
    found = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.DOTALL | re.MULTILINE)
    return ["\n".join(line[len(indent) :] for line in code.splitlines()) for indent, code in found]


def run_page(page: str, namespace: dict[str, Any], replace: dict[str, str] | None = None) -> None:
    """Run the page's blocks in order in ``namespace``, naming the block that fails.

    Inside the prelude app's context, if there is one: some blocks open a transaction.
    """
    # Flask(__name__) looks for the module's folder: as if the blocks were a script.
    namespace.setdefault("__name__", "__main__")
    app = namespace.get("app")
    with app.app_context() if isinstance(app, Flask) else contextlib.nullcontext():
        for number, code in enumerate(blocks(page), 1):
            for old, new in (replace or {}).items():
                code = code.replace(old, new)
            # dont_inherit: this module's `from __future__ import annotations` would turn
            # the blocks' annotations into strings SQLAlchemy must resolve in __main__.
            name = f"{page}.md, block {number}"
            source = compile(code, name, "exec", dont_inherit=True)
            exec(source, namespace)


def test_every_page_with_python_blocks_is_run_here() -> None:
    """A new page with Python blocks needs a test here (and maybe a prelude)."""
    pages = sorted(path.stem for path in DOCS.glob("*.md") if blocks(path.stem))
    assert pages == PAGES


# -- preludes: what each page assumes the reader has ----------------------------------------


class PreludeBase(DeclarativeBase):
    pass


class Item(PreludeBase):
    __tablename__ = "snippet_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Tag(PreludeBase):
    __tablename__ = "snippet_tag"
    __table_args__ = (sa.UniqueConstraint("item_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int]
    name: Mapped[str] = mapped_column(sa.String(50))


class Account(PreludeBase):
    __tablename__ = "snippet_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


class Order(PreludeBase):
    __tablename__ = "snippet_order"

    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[int]

    @classmethod
    def from_cart(cls, cart: list[int]) -> Order:
        return cls(total=sum(cart))


@pytest.fixture
def make_prelude(sqlite_url: str) -> Iterator[Callable[..., dict[str, Any]]]:
    """A reader's app (on SQLite unless told), with the names the pages take for granted."""
    made: list[tuple[Flask, FlaskTxn]] = []

    def make(url: str = sqlite_url) -> dict[str, Any]:
        app = Flask("snippets")
        app.config.update(TESTING=True, TXN_DATABASE_URI=url, TXN_RETRY_SLEEP=lambda _: None)
        txn = FlaskTxn(app)
        with app.app_context():
            PreludeBase.metadata.drop_all(txn.engine)
            PreludeBase.metadata.create_all(txn.engine)
        made.append((app, txn))

        class Base(DeclarativeBase):
            pass

        return {
            "app": app,
            "txn": txn,
            "request": request,
            "atomic": atomic,
            "on_commit": on_commit,
            "json": json,
            "Base": Base,
            "Mapped": Mapped,
            "mapped_column": mapped_column,
            "MethodView": MethodView,
            "IntegrityError": IntegrityError,
            "Item": Item,
            "Tag": Tag,
            "Order": Order,
        }

    yield make
    for app, txn in made:
        with app.app_context():
            PreludeBase.metadata.drop_all(txn.engine)
            txn.engine.dispose()


@pytest.fixture
def prelude(make_prelude: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The prelude on SQLite."""
    return make_prelude()


# -- the pages ------------------------------------------------------------------------------


def test_atomic_page_runs(make_prelude: Callable[..., dict[str, Any]], postgresql_url: str) -> None:
    """atomic.md: the views work, a duplicate tag is absorbed, a confirmation is sent once."""
    # Its blocks use REPEATABLE READ and PostgreSQL's read-only deferrable mode.
    prelude = make_prelude(postgresql_url)
    sent: list[int] = []
    prelude["send_confirmation"] = sent.append
    run_page("atomic", prelude)
    app, ns = prelude["app"], prelude
    with app.test_request_context():
        app.add_url_rule("/items", view_func=ns["create_item"], methods=["POST"])
    response = app.test_client().post("/items", json={"name": "pen"})
    assert (response.status_code, response.json) == (201, {"id": 1})
    with app.app_context():
        ns["add_tag"](1, "red")
        ns["add_tag"](1, "red")  # the nested block swallows the IntegrityError
        order = ns["place_order"]([3, 4])
        count = ns["txn"].session.scalar(sa.select(sa.func.count()).select_from(Tag))
    assert (count, sent) == (1, [order.id])


def test_adopting_page_runs(tmp_path: Path) -> None:
    """adopting.md: the converted views commit, roll back on 409, and the CLI command and
    the background job commit through db.session."""
    namespace: dict[str, Any] = {}
    run_page("adopting", namespace, {"sqlite:///shop.db": f"sqlite:///{tmp_path / 'shop.db'}"})
    app, db, txn = namespace["app"], namespace["db"], namespace["txn"]
    with app.app_context():
        assert (txn.session() is db.session(), txn.engine is db.engine) == (True, True)
        db.create_all()
    client = app.test_client()
    created = client.post("/products", json={"name": "pen", "stock": 3})
    sold = client.post("/products/1/sell", json={"quantity": 2})
    refused = client.post("/products/1/sell", json={"quantity": 5})
    result = app.test_cli_runner().invoke(args=["restock"])
    namespace["nightly_job"](app)
    with app.app_context():
        product = db.session.get(namespace["Product"], 1)
        state = (product.name, product.stock)
        db.engine.dispose()
    assert (created.status_code, sold.json, refused.status_code, result.exit_code, state) == (
        201,
        {"stock": 1},
        409,
        0,
        ("pen", 11),
    )


def test_config_page_runs(prelude: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """config.md: the values its comments promise are the values in force."""
    monkeypatch.chdir(Path(prelude["app"].config["TXN_DATABASE_URI"][10:]).parent)
    namespace = {"Flask": Flask, "FlaskTxn": FlaskTxn}
    run_page("config", namespace)
    config = namespace["app"].config
    assert (config["TXN_RETRIES"], config["TXN_ON_DISCARD"], config["TXN_RETRY_WAIT_MAX"]) == (
        10,
        "raise",
        1.0,
    )


def test_retries_page_runs(prelude: dict[str, Any]) -> None:
    """retries.md: the idempotent payment view answers a repeated key with the first result."""
    payments: list[object] = []

    class Payment:
        def __init__(self, data: Any) -> None:
            payments.append(data)
            self.id = len(payments)

    prelude["make_payment"] = Payment
    run_page("retries", prelude)
    app = prelude["app"]
    with app.app_context():
        prelude["Base"].metadata.create_all(prelude["txn"].engine)
    with app.test_request_context():
        app.add_url_rule("/payments", view_func=prelude["pay"], methods=["POST"])
    client = app.test_client()
    first = client.post("/payments", json={"cents": 5}, headers={"Idempotency-Key": "k"})
    again = client.post("/payments", json={"cents": 5}, headers={"Idempotency-Key": "k"})
    assert (first.json, again.json, len(payments)) == ({"payment": 1}, {"payment": 1}, 1)


def test_signals_page_runs(prelude: dict[str, Any], txn_faults: Any) -> None:
    """signals.md: the metrics view reports a retry counted by the page's receivers."""
    run_page("signals", prelude)
    app = prelude["app"]

    @app.post("/flaky")
    @atomic
    def flaky() -> str:
        return "ok"

    txn_faults.fail_next(1, endpoint="flaky")  # SQLite raises "database table is locked"
    try:
        assert app.test_client().post("/flaky").status_code == 200
        metrics = app.test_client().get("/metrics").text
    finally:
        for receiver in ("count_retry", "count_failure", "log_final_failure"):
            _disconnect(prelude[receiver])
    assert 'flask_txn_retries_total{endpoint="flaky",sqlstate="SQLITE_LOCKED"} 1' in metrics


def _disconnect(receiver: Any) -> None:
    from flask_txn import transaction_retrying, transaction_rolled_back

    for signal in (transaction_retrying, transaction_rolled_back):
        signal.disconnect(receiver)


def test_observability_page_runs(prelude: dict[str, Any], txn_faults: Any) -> None:
    """observability.md: after a real retry and commit, the current span has the block's
    summary, and the Prometheus registry and /metrics hold the page's samples."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    app = prelude["app"]
    try:
        run_page("observability", prelude)

        @app.post("/pay")
        @atomic
        def pay() -> str:
            return "ok"

        txn_faults.fail_next(1, endpoint="pay")  # SQLite raises "database table is locked"
        with tracer_provider.get_tracer("test").start_as_current_span("request"):
            assert app.test_client().post("/pay").status_code == 200
        served = app.test_client().get("/metrics")
    finally:
        uninstrument(app)
        for signal, receiver in (
            (transaction_committed, "count_commit"),
            (transaction_rolled_back, "count_rollback"),
            (transaction_retrying, "count_retry"),
        ):
            if receiver in prelude:
                signal.disconnect(prelude[receiver])
    (span,) = spans.get_finished_spans()
    assert dict(span.attributes or {}) == {
        "flask_txn.outcome": "commit",
        "flask_txn.attempts": 2,
        "flask_txn.isolation": "default",
    }
    text = generate_latest(prelude["registry"]).decode()
    assert served.content_type.startswith("text/plain")
    assert served.text == text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    pay_ = (("endpoint", "pay"),)
    assert samples["flask_txn_commits_total", pay_] == 1
    assert samples["flask_txn_retries_total", (*pay_, ("sqlstate", "SQLITE_LOCKED"))] == 1
    retried = (*pay_, ("reason", "retry"), ("sqlstate", "SQLITE_LOCKED"))
    assert samples["flask_txn_rollbacks_total", retried] == 1
    assert samples["flask_txn_retry_wait_seconds_count", pay_] == 1
    assert (samples["flask_txn_attempts_count", pay_], samples["flask_txn_attempts_sum", pay_]) == (
        1,
        2,
    )


def test_readme_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README.md: the quick start runs as pasted, with nothing defined beforehand, and its
    transfer view moves the amount between its two accounts."""
    monkeypatch.chdir(tmp_path)  # its database is the relative sqlite:///app.db
    namespace: dict[str, Any] = {}
    run_page("README", namespace)
    app, txn, account = namespace["app"], namespace["txn"], namespace["Account"]
    try:
        response = app.test_client().post("/accounts/1/transfer/2", json={"amount": 5})
        with app.app_context():
            balances = [txn.session.get(account, i).balance for i in (1, 2)]
    finally:
        with app.app_context():
            txn.engine.dispose()
    assert (response.json, balances) == ({"ok": True}, [95, 5])


def test_testing_page_runs() -> None:
    """testing.md: its example tests are valid test functions taking the plugin's fixtures."""
    namespace: dict[str, Any] = {}
    run_page("testing", namespace)
    tests = sorted(name for name in namespace if name.startswith("test_"))
    assert tests == [
        "test_book_list_has_no_n_plus_one",
        "test_book_list_loads_authors_eagerly",
        "test_signup_sends_one_email",
        "test_transfer_survives_a_conflict",
    ]


# -- locking.md: one app, run on PostgreSQL ------------------------------------------------


@pytest.fixture
def locking_page(postgresql_url: str) -> Iterator[dict[str, Any]]:
    """The app locking.md builds, on the test server, with its tables and three accounts."""
    assert any(LOCKING_URL in code for code in blocks("locking")), "the page's URL changed"
    namespace: dict[str, Any] = {}
    run_page("locking", namespace, replace={LOCKING_URL: postgresql_url})
    app, txn = namespace["app"], namespace["txn"]
    app.config["TESTING"] = True
    metadata = namespace["Base"].metadata
    with app.app_context():
        metadata.drop_all(txn.engine)
        metadata.create_all(txn.engine)
        with atomic():
            txn.session.add_all(namespace["Account"](id=i, balance=100) for i in (1, 2, 3))
    yield namespace
    with app.app_context():
        metadata.drop_all(txn.engine)
        txn.engine.dispose()


def _balances(namespace: dict[str, Any]) -> list[int]:
    with namespace["app"].app_context(), namespace["txn"].engine.connect() as connection:
        return list(connection.scalars(sa.text("SELECT balance FROM account ORDER BY id")))


@pytest.mark.parametrize("path", ["/transfer", "/serializable-transfer", "/bounded-transfer"])
def test_locking_page_transfers_move_money(locking_page: dict[str, Any], path: str) -> None:
    """locking.md: each transfer view moves the amount from one account to the other."""
    client = locking_page["app"].test_client()
    assert client.post(path, json={"from": 1, "to": 2, "amount": 30}).status_code == 200
    assert _balances(locking_page) == [70, 130, 100]


def test_locking_page_refuses_an_overdraft(locking_page: dict[str, Any]) -> None:
    """locking.md: a transfer of more than the balance answers 409 and moves nothing."""
    client = locking_page["app"].test_client()
    assert client.post("/transfer", json={"from": 1, "to": 2, "amount": 500}).status_code == 409
    assert _balances(locking_page) == [100, 100, 100]


def test_locking_page_workers_claim_pending_jobs(locking_page: dict[str, Any]) -> None:
    """locking.md: /work marks the pending jobs done and returns their ids."""
    app, txn = locking_page["app"], locking_page["txn"]
    with app.app_context(), atomic():
        txn.session.add_all(locking_page["Job"](id=i) for i in (1, 2))
    assert app.test_client().post("/work").json == {"done": [1, 2]}
    assert app.test_client().post("/work").json == {"done": []}


def test_locking_page_get_or_create_returns_one_customer(locking_page: dict[str, Any]) -> None:
    """locking.md: the advisory-locked get-or-create gives the same customer twice."""
    client = locking_page["app"].test_client()
    first = client.post("/customers", json={"email": "ada@example.com"}).json
    assert client.post("/customers", json={"email": "ada@example.com"}).json == first


def test_locking_page_rebuild_takes_the_lock(locking_page: dict[str, Any]) -> None:
    """locking.md: a rebuild with no other holder of its key goes ahead."""
    assert locking_page["app"].test_client().post("/reports/sales/rebuild").status_code == 200


def test_locking_page_versioned_document_refuses_a_stale_form(
    locking_page: dict[str, Any],
) -> None:
    """locking.md: appending bumps the version; a form saved with an old version gets 409."""
    app, txn = locking_page["app"], locking_page["txn"]
    with app.app_context(), atomic():
        txn.session.add(locking_page["Document"](id=7, body=""))
    client = app.test_client()
    assert client.post("/documents/7/append", json={"text": "a"}).status_code == 200
    stale = client.post("/documents/7", data={"version": "1", "body": "b"})
    fresh = client.post("/documents/7", data={"version": "2", "body": "b"})
    assert (stale.status_code, fresh.status_code) == (409, 200)


class SnippetCounter(PreludeBase):
    __tablename__ = "snippet_counter"

    name: Mapped[str] = mapped_column(sa.String(50), primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


def test_async_page_runs(postgresql_url: str) -> None:
    """async.md: the async view counts a hit and the report block reads the total."""
    import logging

    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    app = Flask("async_page")
    app.config["TXN_DATABASE_URI"] = url
    namespace: dict[str, Any] = {
        "app": app,
        "Counter": SnippetCounter,
        "log": logging.getLogger("async_page"),
        "select": sa.select,
        "func": sa.func,
    }
    run_page("async", namespace)
    txn = namespace["txn"]
    with app.app_context():
        PreludeBase.metadata.create_all(txn.engine, tables=[SnippetCounter.__table__])
        with atomic():
            txn.session.add(SnippetCounter(name="home", value=1))
    try:
        client = app.test_client()
        assert client.post("/counters/home").json == {"value": 2}
        assert client.get("/report").json == {"total": 2}
    finally:
        with app.app_context():
            PreludeBase.metadata.drop_all(txn.engine, tables=[SnippetCounter.__table__])
            txn.engine.dispose()


def test_reliability_page_runs() -> None:
    """reliability.md: with the error responses, an unreachable database is a 503 to retry."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = Flask("reliability_page")
    app.config["TXN_DATABASE_URI"] = f"postgresql+psycopg2://app@127.0.0.1:{port}/app"
    namespace: dict[str, Any] = {"app": app}
    run_page("reliability", namespace)
    txn = namespace["txn"]

    @app.post("/items")
    @atomic
    def create() -> str:
        txn.session.execute(sa.text("SELECT 1"))
        return "created"

    response = app.test_client().post("/items")
    # The page's own register_error_handlers call replaced the default's Retry-After: 1.
    assert (response.status_code, response.headers["Retry-After"], response.json["reason"]) == (
        503,
        "5",
        "database-unavailable",
    )


class SnippetAuthor(PreludeBase):
    __tablename__ = "snippet_author"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    books: Mapped[list[SnippetBook]] = relationship()


class SnippetBook(PreludeBase):
    __tablename__ = "snippet_book"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("snippet_author.id"))


def test_nplusone_page_runs(
    make_prelude: Callable[..., dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """nplusone.md: the loop it shows is the N+1 the guard warns of, with the fix."""
    namespace = make_prelude()
    app, txn = namespace["app"], namespace["txn"]
    with app.app_context(), atomic():
        txn.session.add_all(
            [SnippetAuthor(id=i, name=f"a{i}", books=[SnippetBook()]) for i in (1, 2)]
        )
    namespace.update(Author=SnippetAuthor, select=sa.select)
    with caplog.at_level(logging.WARNING, logger="flask_txn"):
        run_page("nplusone", namespace)
    assert capsys.readouterr().out == "a1 1\na2 1\n"
    assert [r.getMessage() for r in caplog.records] == [
        "N+1 queries outside a request: SnippetAuthor.books was lazy-loaded, one query each,"
        " for 2 SnippetAuthor objects that one query returned. Load it with that query"
        " instead: select(SnippetAuthor).options(selectinload(SnippetAuthor.books)). Set"
        " 'TXN_NPLUSONE' to 'off' to silence this."
    ]


def test_idempotency_page_runs(tmp_path: Path) -> None:
    """idempotency.md: an order sent twice is placed once; the commit counter leaves
    the replay out; the purge runs."""
    namespace: dict[str, Any] = {}
    run_page("idempotency", namespace, {"sqlite:///shop.db": f"sqlite:///{tmp_path / 'shop.db'}"})
    app, txn = namespace["app"], namespace["txn"]
    try:
        key = {"Idempotency-Key": "another"}
        for _ in range(2):
            app.test_client().post("/orders", json={"item": "cake"}, headers=key)
        assert (namespace["commits"], namespace["deleted"]) == (["place_order"], 0)
        with app.app_context():
            orders = txn.session.scalars(sa.select(namespace["Order"].item)).all()
        assert orders == ["tea", "cake"]
    finally:
        transaction_committed.disconnect(namespace["count_commit"])
        with app.app_context():
            txn.engine.dispose()
