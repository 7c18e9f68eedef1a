"""@idempotent on real databases: a repeated request is answered once, from the stored
response, whatever the timing; concurrent copies are driven with events, no sleeps."""

from __future__ import annotations

import datetime
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alembic
import alembic.command
import alembic.config
import pytest
import sqlalchemy as sa
from flask import Flask, request

from flask_txn import (
    ConfigError,
    FlaskTxn,
    UsageError,
    advisory_lock_key,
    atomic,
    idempotency_keys,
    idempotent,
    purge_idempotency_keys,
    transaction_committed,
)

from .conftest import Attempts, Item, every_engine, new_database
from .test_async import async_app  # noqa: F401 (a fixture)

pytestmark = every_engine

TIMEOUT = 30
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def shop(make_app: Any, keys_table: Any) -> tuple[Flask, Any, list[int]]:
    """An app whose ``POST /items`` adds an item under an idempotency key; the list
    holds one entry per run of the view."""
    app, txn = make_app(TXN_RETRY_SLEEP=lambda _: None)
    runs: list[int] = []
    keys_table(app, txn)

    @app.post("/items")
    @atomic
    @idempotent
    def add() -> Any:
        runs.append(1)
        item = Item(name=request.json["name"])
        txn.session.add(item)
        txn.session.flush()
        if request.json.get("refuse"):
            return {"error": "refused"}, 409
        return {"id": item.id}, 201, {"Location": f"/items/{item.id}"}

    return app, txn, runs


def post(app: Flask, key: str | None, name: str = "a", **extra: Any) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return app.test_client().post("/items", json={"name": name, **extra}, headers=headers)


def count(app: Flask, txn: Any, table: Any) -> int:
    with app.app_context():
        return int(txn.session.scalar(sa.select(sa.func.count()).select_from(table)))


def test_a_repeat_gets_the_stored_response_and_the_view_runs_once(shop: Any) -> None:
    """Same key, same request: the same status, body and headers; one item, one run."""
    app, txn, runs = shop
    first, again = post(app, "k1"), post(app, "k1")
    assert (again.status_code, again.json, again.headers["Location"]) == (
        first.status_code,
        first.json,
        first.headers["Location"],
    )
    assert (first.headers.get("Idempotent-Replayed"), again.headers["Idempotent-Replayed"]) == (
        None,
        "true",
    )
    assert (len(runs), count(app, txn, Item.__table__)) == (1, 1)


def test_the_commit_signal_says_which_commit_was_a_replay(shop: Any) -> None:
    """transaction_committed carries replayed=True for the repeat only."""
    app, _, _ = shop
    replayed: list[bool] = []
    with transaction_committed.connected_to(lambda _, **p: replayed.append(p["replayed"])):
        post(app, "k1")
        post(app, "k1")
    assert replayed == [False, True]


def test_a_key_used_for_another_request_is_refused(shop: Any) -> None:
    """Same key, another body: 422 naming the header, and the view does not run."""
    app, txn, runs = shop
    post(app, "k1", "a")
    response = post(app, "k1", "b")
    assert (response.status_code, response.json["reason"]) == (422, "idempotency-key-reused")
    assert "'Idempotency-Key' 'k1' was already used for another request" in response.json["error"]
    assert (len(runs), count(app, txn, Item.__table__)) == (1, 1)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "idempotency-key-missing"),
        ("", "idempotency-key-invalid"),
        ("é", "idempotency-key-invalid"),
        ("k" * 256, "idempotency-key-invalid"),
    ],
)
def test_a_missing_or_malformed_key_is_400(shop: Any, key: str | None, reason: str) -> None:
    """No header, or not 1 to 255 printable ASCII characters: 400 naming the header."""
    app, _txn, runs = shop
    response = app.test_client().post(
        "/items",
        json={"name": "a"},
        headers={} if key is None else {"Idempotency-Key": key.encode("utf-8").decode("latin-1")},
    )
    assert (response.status_code, response.json["reason"], runs) == (400, reason, [])
    assert "needs an 'Idempotency-Key' header of 1 to 255 printable ASCII" in response.json["error"]
    sent = "and sent none." if key is None else "and sent '"
    assert sent in response.json["error"]


def test_an_optional_key_may_be_left_out(shop: Any) -> None:
    """required=False: without the header the view runs each time and nothing is stored."""
    app, txn, runs = shop

    @app.post("/optional")
    @atomic
    @idempotent(required=False)
    def optional() -> str:
        runs.append(1)
        return "ok"

    client = app.test_client()
    assert [client.post("/optional").status_code for _ in range(2)] == [200, 200]
    assert (len(runs), count(app, txn, idempotency_keys)) == (2, 0)


def test_a_refused_request_stores_nothing(shop: Any) -> None:
    """An error response rolls the block back, the key's row with it: the repeat runs again."""
    app, txn, runs = shop
    assert post(app, "k1", refuse=True).status_code == 409
    assert post(app, "k1", refuse=True).status_code == 409
    assert (len(runs), count(app, txn, idempotency_keys), count(app, txn, Item.__table__)) == (
        2,
        0,
        0,
    )


@pytest.mark.postgresql_only
def test_a_retried_attempt_stores_the_key_once(
    keys_table: Any, make_app: Any, postgresql_url: str
) -> None:
    """A real 40001 after the view's work: the re-run stores one row, one item."""
    app, txn = make_app(postgresql_url, TXN_RETRY_SLEEP=lambda _: None)
    attempts = Attempts()
    keys_table(app, txn)

    @app.post("/items")
    @atomic
    @idempotent
    def add() -> Any:
        txn.session.add(Item(name="a"))
        txn.session.flush()
        if attempts.first():
            txn.session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$")
            )
        return {"ok": True}, 201

    first = app.test_client().post("/items", headers={"Idempotency-Key": "k"})
    again = app.test_client().post("/items", headers={"Idempotency-Key": "k"})
    assert (first.status_code, again.headers["Idempotent-Replayed"]) == (201, "true")
    assert (attempts.total, count(app, txn, idempotency_keys)) == (2, 1)
    assert count(app, txn, Item.__table__) == 1


def test_a_copy_that_arrives_while_the_first_runs(shop: Any, database_url: str) -> None:
    """PostgreSQL: 409 with Retry-After while the first holds the key, then its answer.
    SQLite runs one writer at a time, and MariaDB's insert of the key waits for the
    first's: the copy waits and gets the first's answer."""
    app, txn, runs = shop
    inside, release = threading.Event(), threading.Event()

    @app.post("/slow")
    @atomic
    @idempotent
    def slow() -> Any:
        runs.append(1)
        txn.session.add(Item(name="slow"))
        txn.session.flush()
        inside.set()
        assert release.wait(TIMEOUT)
        return {"done": True}, 201

    answers: dict[str, Any] = {}

    def send(name: str) -> None:
        answers[name] = app.test_client().post("/slow", headers={"Idempotency-Key": "k"})

    first = threading.Thread(target=send, args=("first",))
    first.start()
    assert inside.wait(TIMEOUT)
    if database_url.startswith("postgresql"):
        send("copy")
        release.set()
        first.join(TIMEOUT)
        assert (answers["copy"].status_code, answers["copy"].headers["Retry-After"]) == (409, "1")
        assert answers["copy"].json["reason"] == "idempotency-key-in-flight"
    else:
        copy = threading.Thread(target=send, args=("copy",))
        copy.start()
        release.set()
        first.join(TIMEOUT)
        copy.join(TIMEOUT)
        assert answers["copy"].headers["Idempotent-Replayed"] == "true"
    later = app.test_client().post("/slow", headers={"Idempotency-Key": "k"})
    assert (answers["first"].status_code, later.json, later.headers["Idempotent-Replayed"]) == (
        201,
        {"done": True},
        "true",
    )
    assert (len(runs), count(app, txn, Item.__table__)) == (1, 1)


def test_a_large_response_is_replayed_whole(shop: Any) -> None:
    """A body larger than MySQL's BLOB (64 KiB) is stored and replayed byte for byte."""
    app, _txn, runs = shop

    @app.post("/report")
    @atomic
    @idempotent
    def report() -> Any:
        runs.append(1)
        return {"lines": [f"line {n}" for n in range(20_000)]}

    def send() -> Any:
        return app.test_client().post("/report", headers={"Idempotency-Key": "big"})

    first, again = send(), send()
    assert len(first.get_data()) > 200_000
    assert (again.get_data(), again.headers["Idempotent-Replayed"], len(runs)) == (
        first.get_data(),
        "true",
        1,
    )


def test_an_expired_key_runs_again_and_is_purged(shop: Any) -> None:
    """Past its expiry a key is no longer answered; purge_idempotency_keys deletes it."""
    app, txn, runs = shop
    post(app, "old")
    post(app, "new")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    with app.app_context(), atomic():
        txn.session.execute(
            sa.update(idempotency_keys)
            .where(idempotency_keys.c.key == "old")
            .values(expires_at=past)
        )
    with app.app_context():
        assert purge_idempotency_keys() == 1
    assert post(app, "old").headers.get("Idempotent-Replayed") is None
    with app.app_context(), atomic():
        txn.session.execute(sa.update(idempotency_keys).values(expires_at=past))
    # Expired but not yet purged: answered as if new, and stored again.
    assert post(app, "new").headers.get("Idempotent-Replayed") is None
    assert (len(runs), count(app, txn, idempotency_keys)) == (4, 2)


def test_keys_are_scoped_by_the_hook(keys_table: Any, make_app: Any) -> None:
    """TXN_IDEMPOTENCY_SCOPE: the same key from two users is two operations."""
    app, txn = make_app(TXN_IDEMPOTENCY_SCOPE=lambda: request.headers["X-User"])
    runs: list[str] = []
    keys_table(app, txn)

    @app.post("/")
    @atomic
    @idempotent
    def act() -> str:
        runs.append(request.headers["X-User"])
        return "ok"

    client = app.test_client()
    for user in ("ann", "bob", "ann"):
        client.post("/", headers={"Idempotency-Key": "k", "X-User": user})
    assert runs == ["ann", "bob"]


def test_wrong_placement_is_refused(shop: Any) -> None:
    """Above @atomic, the key could not be stored with the work: UsageError saying where."""
    app, _txn, _ = shop

    @app.post("/above")
    @idempotent
    @atomic
    def above() -> str:
        return "ok"

    app.testing = True
    with pytest.raises(UsageError, match="Put '@idempotent' right below '@atomic'"):
        app.test_client().post("/above", headers={"Idempotency-Key": "k"})


def test_a_class_is_refused() -> None:
    """A class cannot be a view's transaction: refused when decorated, pointing to its
    methods."""
    with pytest.raises(UsageError, match=r"got the class .* Decorate its methods"):
        idempotent(type("View", (), {}))


@pytest.mark.postgresql_only
def test_async_views_are_answered_once(keys_table: Any, async_app: Any) -> None:  # noqa: F811
    """An async view: the repeat gets the stored response, another body 422, and the
    view runs once (psycopg 3 and asyncpg)."""
    app, txn = async_app
    runs: list[int] = []
    keys_table(app, txn)

    @app.post("/items")
    @atomic
    @idempotent
    async def add() -> Any:
        runs.append(1)
        txn.async_session.add(Item(id=10 + len(runs), name="async"))
        return {"run": len(runs)}, 201

    headers = {"Idempotency-Key": "ak"}
    client = app.test_client()
    first = client.post("/items", json={"n": 1}, headers=headers)
    again = client.post("/items", json={"n": 1}, headers=headers)
    other = client.post("/items", json={"n": 2}, headers=headers)
    assert (first.status_code, again.json, again.headers["Idempotent-Replayed"]) == (
        201,
        {"run": 1},
        "true",
    )
    assert (other.status_code, len(runs), count(app, txn, Item.__table__)) == (422, 1, 3)


def test_a_streamed_response_is_refused(shop: Any) -> None:
    """A replay must return the same body: a generator's response cannot be stored."""
    app, txn, _runs = shop

    @app.post("/stream")
    @atomic
    @idempotent
    def stream() -> Any:
        return (part for part in ("a", "b"))

    app.testing = True
    with pytest.raises(UsageError, match="cannot store a streamed response"):
        app.test_client().post("/stream", headers={"Idempotency-Key": "k"})
    assert count(app, txn, idempotency_keys) == 0


@pytest.fixture
def empty_database(database_url: str) -> Iterator[str]:
    """A database with no table in it: autogenerate would drop other tests' tables.
    SQLite's is a new file already; on PostgreSQL, a database made for the test."""
    if not database_url.startswith("postgresql"):
        yield database_url
        return
    with new_database(database_url, "flask_txn_alembic") as url:
        yield url.render_as_string(False)


def test_the_alembic_recipe_creates_the_table(tmp_path: Path, empty_database: str) -> None:
    """The docs' env.py line, given to Alembic's autogenerate: the migration it writes
    creates the table, and @idempotent works on it."""
    database_url = empty_database
    (recipe,) = re.findall(
        r"^```\{code-block\} python\n(.*?)^```", (DOCS / "idempotency.md").read_text(), re.S | re.M
    )
    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, scripts)
    (scripts / "env.py").write_text(
        "from alembic import context\n"
        "from sqlalchemy import create_engine\n"
        "from sqlalchemy.orm import DeclarativeBase\n\n\n"
        "class Base(DeclarativeBase):\n    pass\n\n\n"
        + recipe
        + "\nwith create_engine(context.config.get_main_option('sqlalchemy.url')).connect() as c:\n"
        "    context.configure(connection=c, target_metadata=target_metadata)\n"
        "    with context.begin_transaction():\n"
        "        context.run_migrations()\n"
    )
    config = alembic.config.Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    engine = sa.create_engine(database_url)
    try:
        alembic.command.revision(config, "idempotency keys", autogenerate=True)
        alembic.command.upgrade(config, "head")
        assert "flask_txn_idempotency_key" in sa.inspect(engine).get_table_names()
        app = Flask("migrated")
        app.config["TXN_DATABASE_URI"] = database_url
        txn = FlaskTxn(app)

        @app.post("/")
        @atomic
        @idempotent
        def act() -> str:
            return "done"

        client = app.test_client()
        answers = [client.post("/", headers={"Idempotency-Key": "k"}) for _ in range(2)]
        assert [a.headers.get("Idempotent-Replayed") for a in answers] == [None, "true"]
        with app.app_context():
            txn.engine.dispose()
    finally:
        with engine.begin() as connection:
            idempotency_keys.drop(connection, checkfirst=True)
            connection.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        engine.dispose()


def test_the_purge_command_deletes_expired_keys(shop: Any) -> None:
    """flask txn purge-idempotency-keys: the expired keys go, the others stay."""
    app, txn, _ = shop
    for key in ("old", "new"):
        post(app, key)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    with app.app_context(), atomic():
        txn.session.execute(
            sa.update(idempotency_keys)
            .where(idempotency_keys.c.key == "old")
            .values(expires_at=past)
        )
    result = app.test_cli_runner().invoke(args=["txn", "purge-idempotency-keys"])
    assert (result.exit_code, result.output) == (0, "deleted 1 expired idempotency key\n")
    with app.app_context():
        assert txn.session.scalars(sa.select(idempotency_keys.c.key)).all() == ["new"]


def test_the_purge_deletes_in_batches(shop: Any) -> None:
    """Five expired keys, batches of two: three transactions delete all five, and the
    key that has not expired stays."""
    app, txn, _ = shop
    for number in range(6):
        post(app, f"k{number}")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    with app.app_context(), atomic():
        txn.session.execute(
            sa.update(idempotency_keys)
            .where(idempotency_keys.c.key != "k5")
            .values(expires_at=past)
        )
    commits: list[int] = []
    with app.app_context():
        sa.event.listen(txn.engine, "commit", lambda _: commits.append(1))
        assert purge_idempotency_keys(batch_size=2) == 5
        assert txn.session.scalars(sa.select(idempotency_keys.c.key)).all() == ["k5"]
    assert len(commits) == 3
    result = app.test_cli_runner().invoke(
        args=["txn", "purge-idempotency-keys", "--batch-size", "0"]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--batch-size'" in result.output


@pytest.mark.parametrize("batch_size", [0, 2.5, True])
def test_a_bad_batch_size_is_refused(shop: Any, batch_size: object) -> None:
    """purge_idempotency_keys(batch_size=...) names the argument, the value and the rule."""
    app, _txn, _ = shop
    with app.app_context(), pytest.raises(ConfigError) as raised:
        purge_idempotency_keys(batch_size=batch_size)  # type: ignore[arg-type]
    assert "'batch_size' must be a whole number >= 1" in str(raised.value)
    assert f"got {batch_size!r}" in str(raised.value)


@pytest.mark.postgresql_only
def test_a_copy_whose_snapshot_predates_the_first_commit_gets_its_answer(
    keys_table: Any, make_app: Any, postgresql_url: str
) -> None:
    """REPEATABLE READ: a copy whose snapshot was taken (here by the scope hook's query)
    before the first committed takes the freed lock, misses the row, and is retried
    into a replay instead of a unique violation."""
    copy_read, first_done = threading.Event(), threading.Event()

    def scope() -> str:
        if request.headers.get("X-Copy"):
            # A query before the lock, as a hook that loads the user makes.
            txn.session.execute(sa.text("SELECT 1"))
            copy_read.set()
            assert first_done.wait(TIMEOUT)
        return ""

    app, txn = make_app(
        postgresql_url,
        TXN_ISOLATION_LEVEL="REPEATABLE READ",
        TXN_IDEMPOTENCY_SCOPE=scope,
        TXN_RETRY_SLEEP=lambda _: None,
    )
    runs: list[int] = []
    keys_table(app, txn)

    @app.post("/items")
    @atomic
    @idempotent
    def add() -> Any:
        runs.append(1)
        txn.session.add(Item(name="a"))
        return {"ok": True}, 201

    answers: dict[str, Any] = {}

    def send_copy() -> None:
        answers["copy"] = app.test_client().post(
            "/items", headers={"Idempotency-Key": "k", "X-Copy": "1"}
        )

    copy = threading.Thread(target=send_copy)
    try:
        copy.start()
        assert copy_read.wait(TIMEOUT)
        first = app.test_client().post("/items", headers={"Idempotency-Key": "k"})
        first_done.set()
        copy.join(TIMEOUT)
        assert (first.status_code, answers["copy"].status_code) == (201, 201)
        assert answers["copy"].headers["Idempotent-Replayed"] == "true"
        assert count(app, txn, Item.__table__) == 1
    finally:
        first_done.set()
        copy.join(TIMEOUT)


@pytest.mark.parametrize("value", [object(), None, True, 1.5, "u" * 201])
def test_a_scope_that_would_not_match_again_is_refused(
    keys_table: Any, make_app: Any, value: object
) -> None:
    """The hook must return a str or int that fits the column: an object's str() names its
    address, a new scope per request, and every repeat would run the view again."""
    app, txn = make_app(TXN_IDEMPOTENCY_SCOPE=lambda: value)
    keys_table(app, txn)

    @app.post("/")
    @atomic
    @idempotent
    def act() -> str:
        return "ok"

    app.testing = True
    with pytest.raises(
        ConfigError,
        match=r"'TXN_IDEMPOTENCY_SCOPE' must return a str or an int of at most 200"
        r" characters, got .* of type \w+\. Return an id, such as 'lambda: current_user.id'",
    ):
        app.test_client().post("/", headers={"Idempotency-Key": "k"})
    assert count(app, txn, idempotency_keys) == 0


def test_an_int_scope_is_accepted(keys_table: Any, make_app: Any) -> None:
    """An int id, the usual 'current_user.id', is stored as its digits."""
    app, txn = make_app(TXN_IDEMPOTENCY_SCOPE=lambda: 42)
    keys_table(app, txn)

    @app.post("/")
    @atomic
    @idempotent
    def act() -> str:
        return "ok"

    try:
        app.test_client().post("/", headers={"Idempotency-Key": "k"})
        with app.app_context():
            assert txn.session.scalars(sa.select(idempotency_keys.c.scope)).all() == ["42"]
    finally:
        with app.app_context():
            txn.session.remove()


@pytest.mark.parametrize("retries", [0, 1])
def test_the_view_can_read_the_request_stream(keys_table: Any, make_app: Any, retries: int) -> None:
    """The fingerprint reads the body; the view still finds all of it in request.stream."""
    app, txn = make_app(TXN_RETRIES=retries)
    keys_table(app, txn)

    @app.post("/upload")
    @atomic
    @idempotent
    def upload() -> Any:
        return {"read": request.stream.read().decode()}

    response = app.test_client().post(
        "/upload",
        data=b"the body",
        headers={"Idempotency-Key": "k", "Content-Type": "application/octet-stream"},
    )
    assert response.json == {"read": "the body"}


@pytest.mark.postgresql_only
def test_a_callable_veto_judges_what_the_view_returned(keys_table: Any, make_app: Any) -> None:
    """TXN_ROLLBACK_ON_STATUS as a callable gets the view's tuple, as without @idempotent,
    and its rollback takes the key's row with the work."""
    seen: list[object] = []

    def veto(rv: object) -> bool:
        seen.append(rv)
        return isinstance(rv, tuple) and rv[1] == 409

    app, txn = make_app(TXN_ROLLBACK_ON_STATUS=veto)
    keys_table(app, txn)

    @app.post("/")
    @atomic
    @idempotent
    def act() -> Any:
        txn.session.add(Item(name="a"))
        return {"error": "taken"}, 409

    response = app.test_client().post("/", headers={"Idempotency-Key": "k"})
    assert (response.status_code, seen) == (409, [({"error": "taken"}, 409)])
    assert (count(app, txn, Item.__table__), count(app, txn, idempotency_keys)) == (0, 0)


@pytest.mark.postgresql_only
def test_a_resend_after_an_ambiguous_commit_that_committed_is_replayed(
    keys_table: Any, make_app: Any, postgresql_url: str
) -> None:
    """COMMIT's reply is late (502 commit-unknown), the server commits after all: the
    client's resend with the same key gets the first response, and the view ran once."""
    app, txn = make_app(postgresql_url, TXN_READ_TIMEOUT=0.3, TXN_RETRY_SLEEP=lambda _: None)
    runs: list[int] = []
    engine = sa.create_engine(postgresql_url)
    gate = 4243  # the advisory lock COMMIT waits on, held here
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS commit_gate")
        connection.exec_driver_sql("CREATE TABLE commit_gate (id int)")
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION commit_gate_wait() RETURNS trigger LANGUAGE plpgsql"
            f" AS $$ BEGIN PERFORM pg_advisory_xact_lock({gate}); RETURN NULL; END $$"
        )
        connection.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER commit_gate AFTER INSERT ON commit_gate DEFERRABLE"
            " INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_gate_wait()"
        )
    keys_table(app, txn)

    @app.post("/items")
    @atomic
    @idempotent
    def add() -> Any:
        runs.append(1)
        txn.session.add(Item(name="a"))
        txn.session.execute(sa.text("INSERT INTO commit_gate VALUES (1)"))
        return {"ok": True}, 201

    holder = engine.connect()
    try:
        holder.execute(sa.text(f"SELECT pg_advisory_lock({gate})"))
        first = app.test_client().post("/items", headers={"Idempotency-Key": "k"})
        assert (first.status_code, first.json["reason"]) == (502, "commit-unknown")
        holder.execute(sa.text(f"SELECT pg_advisory_unlock({gate})"))
        # The abandoned backend holds the key's advisory lock until its COMMIT ends:
        # taking it here waits for that, with no polling.
        with engine.begin() as connection:
            connection.execute(
                sa.select(
                    sa.func.pg_advisory_xact_lock(advisory_lock_key("flask-txn-idempotency:0::k"))
                )
            )
        again = app.test_client().post("/items", headers={"Idempotency-Key": "k"})
        assert (again.status_code, again.json, again.headers["Idempotent-Replayed"]) == (
            201,
            {"ok": True},
            "true",
        )
        assert (len(runs), count(app, txn, Item.__table__)) == (1, 1)
    finally:
        holder.close()
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS commit_gate")
        engine.dispose()
        with app.app_context():
            txn.engine.dispose()


@pytest.mark.postgresql_only
def test_keys_that_join_to_the_same_text_do_not_exclude_each_other(
    keys_table: Any, make_app: Any, postgresql_url: str
) -> None:
    """Scope 'a:b' with key 'c' is in flight: scope 'a' with key 'b:c' is another key,
    and runs, instead of getting 409 for a lock it shares by name."""
    app, txn = make_app(postgresql_url, TXN_IDEMPOTENCY_SCOPE=lambda: request.headers["X-User"])
    inside, release = threading.Event(), threading.Event()
    keys_table(app, txn)

    @app.post("/")
    @atomic
    @idempotent
    def act() -> str:
        if request.headers["X-User"] == "a:b":
            inside.set()
            assert release.wait(TIMEOUT)
        return "done"

    answers: dict[str, Any] = {}

    def send(user: str, key: str) -> None:
        answers[user] = app.test_client().post(
            "/", headers={"Idempotency-Key": key, "X-User": user}
        )

    first = threading.Thread(target=send, args=("a:b", "c"))
    try:
        first.start()
        assert inside.wait(TIMEOUT)
        send("a", "b:c")
        release.set()
        first.join(TIMEOUT)
        assert (answers["a"].status_code, answers["a:b"].status_code) == (200, 200)
    finally:
        release.set()
        first.join(TIMEOUT)


def test_replays_and_refusals_are_logged(shop: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The docs' promise: each replay and each refusal at INFO on 'flask_txn', with the endpoint."""
    app, _, _ = shop
    with caplog.at_level("INFO", logger="flask_txn"):
        post(app, "k1")
        post(app, "k1")
        post(app, "k1", "b")
    messages = [r.getMessage() for r in caplog.records if r.name == "flask_txn"]
    assert "Replayed the stored response of Idempotency-Key 'k1' for 'add'." in messages
    assert "Answered 422 (idempotency-key-reused) for endpoint 'add'." in messages


def test_an_unsupported_database_is_refused(
    shop: Any, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """A database where the rules are not tested raises UsageError naming it."""
    app, _, runs = shop
    monkeypatch.setattr("flask_txn._idempotency._DIALECTS", ("mariadb",))
    app.testing = True
    dialect = database_url.split(":")[0].split("+")[0]
    with pytest.raises(
        UsageError, match=rf"'@idempotent' supports mariadb; the database is '{dialect}'\."
    ):
        post(app, "k1")
    assert runs == []


def test_a_head_is_the_same_request_as_its_get(shop: Any) -> None:
    """Flask serves HEAD with the GET view: the same key is a replay, not a 422."""
    app, _, runs = shop

    @app.get("/report")
    @atomic
    @idempotent
    def report() -> Any:
        runs.append(1)
        return {"total": 1}

    client = app.test_client()
    get = client.get("/report", headers={"Idempotency-Key": "k"})
    head = client.head("/report", headers={"Idempotency-Key": "k"})
    assert (get.status_code, head.status_code, head.headers["Idempotent-Replayed"]) == (
        200,
        200,
        "true",
    )
    assert (head.get_data(), len(runs)) == (b"", 1)


def test_a_quoted_key_is_the_same_key(shop: Any) -> None:
    """The IETF draft's form, a quoted string, names the same key as the bare form."""
    app, _txn, runs = shop
    first, again = post(app, '"k1"'), post(app, "k1")
    assert (again.headers["Idempotent-Replayed"], again.json, len(runs)) == ("true", first.json, 1)
