"""@atomic: forms, commit and rollback, savepoints, veto, on_commit, option validation."""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from flask import abort
from flask.views import MethodView

from flask_txn import (
    Atomic,
    ConfigError,
    NestingError,
    PendingWritesError,
    UsageError,
    atomic,
    on_commit,
)

from .conftest import Item, count_items, every_engine

pytestmark = every_engine


def names(app: Any, txn: Any) -> list[str]:
    """The committed item names, read outside any session."""
    with app.app_context(), txn.engine.connect() as connection:
        return list(connection.scalars(sa.select(Item.name).order_by(Item.id)))


def test_decorated_view_commits(app_txn: Any) -> None:
    """A view that returns normally commits its writes."""
    app, txn = app_txn

    @app.post("/")
    @atomic
    def add() -> str:
        txn.session.add(Item(name="a"))
        return "ok"

    assert app.test_client().post("/").status_code == 200
    assert names(app, txn) == ["a"]


def test_exception_rolls_back_and_propagates_unchanged(app_txn: Any) -> None:
    """An exception rolls the writes back and reaches the caller as it was raised."""
    app, txn = app_txn
    error = LookupError("boom")

    @atomic
    def add() -> None:
        txn.session.add(Item(name="a"))
        txn.session.flush()
        raise error

    with app.app_context():
        with pytest.raises(LookupError) as raised:
            add()
        assert raised.value is error
    assert names(app, txn) == []


def test_with_block_commits_and_rolls_back(app_txn: Any) -> None:
    """``with atomic():`` commits on normal exit and rolls back on an exception."""
    app, txn = app_txn
    with app.app_context():
        with atomic() as session:
            session.add(Item(name="kept"))
        with pytest.raises(KeyError), atomic():
            txn.session.add(Item(name="lost"))
            raise KeyError
    assert names(app, txn) == ["kept"]


def test_extension_atomic_is_bound_to_its_extension(app_txn: Any) -> None:
    """``txn.atomic`` works as a decorator, a decorator factory and a block."""
    app, txn = app_txn

    @txn.atomic
    def one() -> None:
        txn.session.add(Item(name="1"))

    @txn.atomic(retries=1)
    def two() -> None:
        txn.session.add(Item(name="2"))

    with app.app_context():
        one()
        two()
        with txn.atomic():
            txn.session.add(Item(name="3"))
    assert names(app, txn) == ["1", "2", "3"]


def test_keeps_name_docstring_and_works_on_method_views(app_txn: Any) -> None:
    """The wrapper keeps the function's metadata and stacks on class-based views."""
    app, txn = app_txn

    class Items(MethodView):
        decorators = [atomic]

        def post(self) -> str:
            """Add one."""
            txn.session.add(Item(name="view"))
            return "ok"

    app.add_url_rule("/items", view_func=Items.as_view("items"))

    @atomic(retries=0)
    def documented() -> None:
        """Doc."""

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "Doc."
    assert app.test_client().post("/items").status_code == 200
    assert names(app, txn) == ["view"]


def test_nested_block_is_a_savepoint(app_txn: Any) -> None:
    """A failing nested block undoes only its own writes."""
    app, txn = app_txn
    with app.app_context(), atomic():
        txn.session.add(Item(name="outer"))
        with pytest.raises(ValueError), atomic():
            txn.session.add(Item(name="inner"))
            txn.session.flush()
            raise ValueError
        txn.session.add(Item(name="after"))
    assert names(app, txn) == ["outer", "after"]


def test_nested_decorated_function_is_a_savepoint(app_txn: Any) -> None:
    """A decorated function called inside a block runs once, in a savepoint."""
    app, txn = app_txn
    calls = []

    @atomic(isolation=None)
    def inner() -> None:
        calls.append(1)
        txn.session.add(Item(name="inner"))
        txn.session.flush()
        raise ValueError

    with app.app_context(), atomic():
        with pytest.raises(ValueError):
            inner()
        txn.session.add(Item(name="outer"))
    assert calls == [1]
    assert names(app, txn) == ["outer"]


def test_same_atomic_object_reused_and_nested(app_txn: Any) -> None:
    """One ``Atomic`` object can be entered inside itself and used again."""
    app, txn = app_txn
    block = atomic()
    with app.app_context():
        with block:
            txn.session.add(Item(name="a"))
            with block:
                txn.session.add(Item(name="b"))
        with block:
            txn.session.add(Item(name="c"))
    assert names(app, txn) == ["a", "b", "c"]


def test_returned_error_response_rolls_back(app_txn: Any) -> None:
    """A response with status >= TXN_ROLLBACK_ON_STATUS is a veto; below it commits."""
    app, txn = app_txn

    @app.post("/<int:status>")
    @atomic
    def add(status: int) -> Any:
        txn.session.add(Item(name=str(status)))
        return "done", status

    client = app.test_client()
    assert client.post("/400").status_code == 400
    assert client.post("/399").status_code == 399
    assert client.post("/500").status_code == 500
    assert names(app, txn) == ["399"]


def test_veto_reads_response_status_without_consuming_a_stream(app_txn: Any) -> None:
    """A streamed error response is vetoed and still streams its body."""
    app, txn = app_txn

    @app.post("/")
    @atomic
    def add() -> Any:
        txn.session.add(Item(name="streamed"))
        return app.response_class(iter([b"a", b"b"]), status=422)

    response = app.test_client().post("/")
    assert (response.status_code, response.data) == (422, b"ab")
    assert names(app, txn) == []


def test_veto_applies_to_the_view_only(app_txn: Any) -> None:
    """A decorated helper returning a tuple is data: it commits whatever the tuple holds."""
    app, txn = app_txn

    @atomic
    def create() -> tuple[int, int]:
        item = Item(name="helper", value=500)
        txn.session.add(item)
        txn.session.flush()
        return item.id, item.value

    @app.post("/")
    def view() -> str:
        item_id, value = create()
        return f"{item_id}:{value}"

    assert app.test_client().post("/").text == "1:500"
    assert names(app, txn) == ["helper"]


def test_veto_applies_to_a_decorated_method_view(app_txn: Any) -> None:
    """An ``@atomic`` method of a class-based view is the view: its error response rolls back."""
    app, txn = app_txn

    class Items(MethodView):
        @atomic
        def post(self) -> Any:
            txn.session.add(Item(name="refused"))
            return "no", 400

    app.add_url_rule("/items", view_func=Items.as_view("items"))
    assert app.test_client().post("/items").status_code == 400
    assert names(app, txn) == []


def test_veto_callable_and_disabled(make_app: Any) -> None:
    """TXN_ROLLBACK_ON_STATUS may be a callable, or None to never veto."""
    results = {}
    for label, setting in [("callable", lambda rv: rv[0] == "no"), ("none", None)]:
        app, txn = make_app(TXN_ROLLBACK_ON_STATUS=setting)

        def add(word: str, txn: Any = txn) -> Any:
            txn.session.add(Item(name=word))
            return word, 500

        app.post("/<word>")(atomic(add))

        client = app.test_client()
        client.post("/no")
        client.post("/yes")
        results[label] = names(app, txn)
    assert results == {"callable": ["yes"], "none": ["no", "yes"]}


def test_abort_rolls_back(app_txn: Any) -> None:
    """``abort()`` inside the view rolls back."""
    app, txn = app_txn

    @app.post("/")
    @atomic
    def add() -> str:
        txn.session.add(Item(name="x"))
        txn.session.flush()
        abort(403)

    assert app.test_client().post("/").status_code == 403
    assert names(app, txn) == []


def test_flush_errors_surface_before_commit(app_txn: Any) -> None:
    """An IntegrityError from the final flush propagates and nothing is committed."""
    app, txn = app_txn

    @atomic
    def duplicate() -> None:
        txn.session.add(Item(id=1, name="a"))
        txn.session.add(Item(id=1, name="b"))

    with app.app_context(), pytest.raises(sa.exc.IntegrityError):
        duplicate()
    assert count_items(app, txn) == 0


def test_on_commit_runs_after_commit_only(app_txn: Any) -> None:
    """Callbacks run after commit, in order, and never for rollbacks or rolled-back savepoints."""
    app, _txn = app_txn
    ran: list[str] = []
    with app.app_context():
        with atomic():
            on_commit(lambda: ran.append("outer"))
            with pytest.raises(ValueError), atomic():
                on_commit(lambda: ran.append("rolled-back savepoint"))
                raise ValueError
            with atomic():
                on_commit(lambda: ran.append("released savepoint"))
            assert ran == []
        with pytest.raises(ValueError), atomic():
            on_commit(lambda: ran.append("rolled back"))
            raise ValueError
    assert ran == ["outer", "released savepoint"]


def test_on_commit_skipped_on_veto(app_txn: Any) -> None:
    """A vetoed response drops the callbacks."""
    app, _txn = app_txn
    ran = []

    @app.post("/")
    @atomic
    def add() -> Any:
        on_commit(lambda: ran.append(1))
        return "no", 400

    app.test_client().post("/")
    assert ran == []


def test_on_commit_callback_runs_outside_the_block(app_txn: Any) -> None:
    """An atomic block inside a callback is a new outermost transaction."""
    app, txn = app_txn

    def audit() -> None:
        with atomic():
            txn.session.add(Item(name="audit"))

    with app.app_context(), atomic():
        txn.session.add(Item(name="main"))
        on_commit(audit)
    assert names(app, txn) == ["main", "audit"]


def test_failing_callbacks(app_txn: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Every callback runs; failures are logged; the first non-robust one is raised after commit."""
    app, txn = app_txn
    ran = []

    def broken(label: str) -> Any:
        def callback() -> None:
            ran.append(label)
            raise RuntimeError(label)

        return callback

    with app.app_context(), pytest.raises(RuntimeError, match="first"), atomic():
        txn.session.add(Item(name="kept"))
        on_commit(broken("robust"), robust=True)
        on_commit(broken("first"))
        on_commit(broken("second"))
        on_commit(lambda: ran.append("last"))
    assert ran == ["robust", "first", "second", "last"]
    assert names(app, txn) == ["kept"]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(failures) == 3


def test_callback_error_is_not_retried(app_txn: Any) -> None:
    """A failing callback never re-runs the committed function."""
    app, txn = app_txn
    calls = []

    def fail() -> None:
        raise sa.exc.OperationalError("x", {}, Exception("looks retriable"))

    @atomic(retries=3)
    def add() -> None:
        calls.append(1)
        txn.session.add(Item(name="once"))
        on_commit(fail)

    with app.app_context(), pytest.raises(sa.exc.OperationalError):
        add()
    assert calls == [1]
    assert names(app, txn) == ["once"]


def test_reads_before_the_block_are_rolled_back_first(app_txn: Any) -> None:
    """A read-only transaction begun before the outermost block does not block it."""
    app, txn = app_txn

    @app.before_request
    def load_user() -> None:
        txn.session.execute(sa.select(1))

    @app.post("/")
    @atomic(isolation="SERIALIZABLE")
    def add() -> str:
        txn.session.add(Item(name="a"))
        return "ok"

    assert app.test_client().post("/").status_code == 200
    assert names(app, txn) == ["a"]


def test_pending_writes_before_the_block_are_refused(app_txn: Any) -> None:
    """Writes made before the outermost block raise instead of being committed or lost."""
    app, txn = app_txn
    with app.app_context():
        txn.session.add(Item(name="early"))
        with pytest.raises(PendingWritesError, match="uncommitted writes made before"), atomic():
            pass
        txn.session.rollback()


def test_objects_usable_after_commit(app_txn: Any) -> None:
    """Attributes of committed objects read without a new query (expire_on_commit=False)."""
    app, txn = app_txn

    @atomic
    def create() -> Item:
        item = Item(name="a", value=3)
        txn.session.add(item)
        return item

    with app.app_context():
        item = create()
        assert not txn.session().in_transaction()
        assert (item.name, item.value) == ("a", 3)
        assert not txn.session().in_transaction()


def test_on_commit_outside_block_is_refused(app_txn: Any) -> None:
    """``on_commit`` with no open block raises instead of running or dropping the callback."""
    app, _ = app_txn
    with app.app_context(), pytest.raises(UsageError, match="outside of an atomic block"):
        on_commit(lambda: None)


def test_on_commit_needs_a_callable(app_txn: Any) -> None:
    """``on_commit`` refuses a non-callable at once."""
    with pytest.raises(ConfigError, match=r"'on_commit' needs a callable .* got 42"):
        on_commit(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"isolation": "SERIALISABLE"}, r"'isolation' must be one of .*got 'SERIALISABLE'"),
        ({"isolation": 3}, r"'isolation' must be one of .* got 3 of type int"),
        ({"isolation": "autocommit"}, r"'isolation' cannot be 'autocommit'"),
        ({"retries": -1}, r"'retries' must be a whole number >= 0 .*got -1"),
        ({"retries": True}, r"'retries' must be a whole number >= 0 .*got True"),
        ({"retries": 1.5}, r"'retries' must be a whole number >= 0 .*got 1.5"),
        ({"wait_initial": -0.1}, r"'wait_initial' must be a finite number of seconds >= 0"),
        ({"wait_max": float("nan")}, r"'wait_max' must be a finite number of seconds >= 0"),
        ({"wait_initial": 2, "wait_max": 1}, r"'wait_max' must be >= the initial wait"),
        ({"deadline": 0}, r"'deadline' must be a finite number of seconds > 0 or None"),
        ({"statement_timeout": "1s"}, r"'statement_timeout' must be a finite number"),
        ({"lock_timeout": -1}, r"'lock_timeout' must be a finite number of seconds > 0"),
        ({"readonly": "yes"}, r"'readonly' must be True or False, got 'yes'"),
        ({"durable": 1}, r"'durable' must be True or False, got 1"),
        ({"deferrable": True}, r"'deferrable=True' needs 'readonly=True'"),
        (
            {"deferrable": True, "readonly": True, "isolation": "read committed"},
            r"'deferrable=True' needs isolation 'SERIALIZABLE', got 'READ COMMITTED'",
        ),
        ({"retry_on": 42}, r"'retry_on' must be an exception class, .* got 42"),
        ({"retry_on": (ValueError, int)}, r"'retry_on' must be an exception class"),
    ],
)
def test_bad_options_fail_when_applied(options: dict[str, Any], message: str) -> None:
    """Every option is validated when ``atomic(...)`` is called, before any app exists."""
    with pytest.raises(ConfigError, match=message):
        atomic(**options)


def test_isolation_names_are_case_insensitive() -> None:
    """Isolation levels accept any case and underscores."""
    assert atomic(isolation="repeatable_read").isolation == "REPEATABLE READ"


def test_atomic_refuses_a_non_callable() -> None:
    """``atomic(42)`` says how to call it."""
    with pytest.raises(ConfigError, match=r"'atomic' takes a function or keyword options, got 42"):
        atomic(42)  # type: ignore[call-overload]


def test_generators_are_refused() -> None:
    """Decorating a generator fails at decoration time: its body would outlive the block."""

    def stream() -> Any:
        yield b"x"

    async def async_stream() -> Any:
        yield b"x"

    with pytest.raises(UsageError, match=r"stream', a generator function"):
        atomic(stream)
    with pytest.raises(UsageError, match=r"async_stream', a generator function"):
        atomic(retries=1)(async_stream)


@pytest.mark.parametrize(
    "options",
    [{"retries": 2}, {"wait_initial": 1}, {"wait_max": 1}, {"deadline": 3}, {"retry_on": KeyError}],
)
def test_retry_options_on_a_block_are_refused(app_txn: Any, options: dict[str, Any]) -> None:
    """A block cannot be re-run, so retry options on it are an error, not ignored."""
    app, _ = app_txn
    (name,) = options
    with (
        app.app_context(),
        pytest.raises(ConfigError, match=rf"'{name}' cannot be used with a 'with atomic"),
        atomic(**options),
    ):
        pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"isolation": "SERIALIZABLE"}, r"isolation='SERIALIZABLE' differs from the enclosing"),
        ({"readonly": True}, r"readonly=True differs from the enclosing"),
        ({"durable": True}, r"durable=True cannot be used on a nested atomic block"),
        ({"retries": 0}, r"retries=0 cannot be used on a nested atomic block"),
        ({"wait_initial": 1}, r"wait_initial=1.0 cannot be used on a nested atomic block"),
        ({"wait_max": 1}, r"wait_max=1.0 cannot be used on a nested atomic block"),
        ({"deadline": None}, r"deadline=None cannot be used on a nested atomic block"),
        ({"retry_on": KeyError}, r"retry_on=<class 'KeyError'> cannot be used on a nested"),
        ({"statement_timeout": 1}, r"statement_timeout=1.0 cannot be used on a nested"),
        ({"lock_timeout": 1}, r"lock_timeout=1.0 cannot be used on a nested"),
    ],
)
def test_nested_conflicts_fail_at_entry(
    app_txn: Any, options: dict[str, Any], message: str
) -> None:
    """A nested block cannot change what only the outermost block sets."""
    app, _txn = app_txn
    inner = atomic(**options)

    @inner
    def nested() -> None:
        raise AssertionError("must not run")

    with (
        app.app_context(),
        atomic(isolation="READ UNCOMMITTED"),
        pytest.raises(NestingError, match=message),
    ):
        nested()


def test_configured_defaults_never_fail_a_nested_block(make_app: Any) -> None:
    """With TXN_ISOLATION_LEVEL and TXN_RETRIES set, a plain nested ``@atomic`` just works."""
    app, txn = make_app(TXN_ISOLATION_LEVEL="SERIALIZABLE", TXN_RETRIES=2)

    @atomic
    def inner() -> None:
        txn.session.add(Item(name="inner"))

    @atomic
    def outer() -> None:
        inner()

    with app.app_context():
        outer()
    assert names(app, txn) == ["inner"]


def test_durable_outermost_block_commits(app_txn: Any) -> None:
    """``durable=True`` is fine where the block is outermost."""
    app, txn = app_txn
    with app.app_context(), atomic(durable=True):
        txn.session.add(Item(name="d"))
    assert names(app, txn) == ["d"]


def test_atomic_needs_an_app_context() -> None:
    """Calling a decorated function with no app context says what to do."""

    @atomic
    def work() -> None:
        pass

    with pytest.raises(UsageError, match="'atomic' was used outside of an application context"):
        work()


def test_atomic_needs_a_registered_extension() -> None:
    """An app without flask-txn gets an error naming the missing call."""
    from flask import Flask

    @atomic
    def work() -> None:
        pass

    with (
        Flask("bare").app_context(),
        pytest.raises(UsageError, match=r"No flask-txn extension is registered on the current app"),
    ):
        work()


def test_error_undone_by_a_savepoint_does_not_abort(app_txn: Any) -> None:
    """An error caught around a nested block leaves the transaction usable and committed."""
    app, txn = app_txn

    @atomic
    def get_or_create() -> None:
        txn.session.add(Item(id=1, name="first"))
        txn.session.flush()
        try:
            with atomic():
                txn.session.add(Item(id=1, name="duplicate"))
        except sa.exc.IntegrityError:
            pass
        txn.session.add(Item(id=2, name="second"))

    with app.app_context():
        get_or_create()
    assert names(app, txn) == ["first", "second"]


def test_repr_shows_explicit_options() -> None:
    """``Atomic`` objects show their explicit options in their repr."""
    assert repr(Atomic(isolation="serializable", retries=2)) == (
        "<atomic(isolation='SERIALIZABLE', retries=2)>"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"isolation": "READ COMMITTED"},
            r"'isolation' is 'READ COMMITTED', which 'sqlite' does not support; it offers",
        ),
        ({"readonly": True}, r"readonly=True needs PostgreSQL; the database is 'sqlite'"),
        ({"statement_timeout": 1}, r"statement_timeout=1.0 needs PostgreSQL"),
    ],
)
def test_options_sqlite_cannot_honour(
    make_app: Any, sqlite_url: str, options: dict[str, Any], message: str
) -> None:
    """Options SQLite cannot honour fail at entry with the supported alternatives."""
    app, _txn = make_app(sqlite_url)
    with app.app_context(), pytest.raises(ConfigError, match=message), atomic(**options):
        raise AssertionError("must not run")


def test_commit_inside_a_block_is_refused(app_txn: Any) -> None:
    """``session.commit()`` inside a block raises; nothing of the block is committed."""
    app, txn = app_txn

    @atomic
    def early_commit() -> None:
        txn.session.add(Item(name="half"))
        txn.session.commit()

    with app.app_context(), pytest.raises(UsageError, match=r"'session.commit\(\)' was called"):
        early_commit()
    assert names(app, txn) == []


def test_savepoints_the_user_opens_may_commit(app_txn: Any) -> None:
    """Releasing a savepoint of one's own (``begin_nested().commit()``) is allowed."""
    app, txn = app_txn
    with app.app_context(), atomic():
        savepoint = txn.session.begin_nested()
        txn.session.add(Item(name="in savepoint"))
        savepoint.commit()
    assert names(app, txn) == ["in savepoint"]


def test_rollback_inside_a_block_commits_nothing(app_txn: Any) -> None:
    """Ending the transaction inside a block raises instead of committing what came after."""
    app, txn = app_txn

    @atomic
    def rollback_midway() -> None:
        txn.session.add(Item(name="lost by the rollback"))
        txn.session.flush()
        txn.session.rollback()
        txn.session.add(Item(name="would be committed alone"))

    with app.app_context(), pytest.raises(UsageError, match="rolled back inside the atomic block"):
        rollback_midway()
    assert names(app, txn) == []


def test_sqlite_writers_queue_instead_of_failing(make_app: Any, sqlite_url: str) -> None:
    """With BEGIN IMMEDIATE, concurrent read-modify-write blocks never need a retry."""
    app, txn = make_app(sqlite_url, TXN_RETRIES=0)
    threads_count, increments = 4, 25
    with app.app_context(), atomic():
        txn.session.add(Item(id=1, name="counter"))
    start = threading.Barrier(threads_count, timeout=30)
    errors: list[BaseException] = []

    @atomic
    def increment() -> None:
        item = txn.session.get(Item, 1)
        item.value += 1

    def work() -> None:
        start.wait()
        try:
            with app.app_context():
                for _ in range(increments):
                    increment()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with app.app_context():
        assert txn.session.get(Item, 1).value == threads_count * increments
        txn.session.remove()


def test_errors_outside_blocks_and_on_other_engines_do_not_doom(app_txn: Any) -> None:
    """Only errors of the block's own engine, inside the block, count against it."""
    app, txn = app_txn
    other = sa.create_engine("sqlite://")
    try:
        with app.app_context():
            with pytest.raises(sa.exc.DBAPIError):
                txn.session.execute(sa.text("SELECT * FROM no_such_table"))
            txn.session.rollback()
            with atomic():
                txn.session.add(Item(name="kept"))
                with other.connect() as connection, pytest.raises(sa.exc.OperationalError):
                    connection.execute(sa.text("SELECT * FROM no_such_table"))
    finally:
        other.dispose()
    assert names(app, txn) == ["kept"]


def test_retriable_error_raised_outside_the_engine_is_retried(app_txn: Any) -> None:
    """A retriable driver error that never went through the engine (1213) still retries."""
    app, _ = app_txn
    deadlock = type("OperationalError", (Exception,), {"__module__": "pymysql.err"})
    calls = []

    @atomic(retries=1, wait_initial=0)
    def work() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise deadlock(1213, "Deadlock found when trying to get lock")

    with app.app_context():
        work()
    assert len(calls) == 2


def test_block_that_cannot_begin_sends_rollback_and_leaves_no_state() -> None:
    """A failure while starting a ``with`` block signals a rollback and leaves no block open."""
    from flask import Flask

    from flask_txn import FlaskTxn, transaction_rolled_back

    app = Flask("unreachable")
    app.config["TXN_DATABASE_URI"] = "postgresql+psycopg2://nobody@127.0.0.1:1/none"
    txn = FlaskTxn(app)
    reasons = []
    with (
        transaction_rolled_back.connected_to(lambda _, **p: reasons.append(p["reason"])),
        app.app_context(),
    ):
        with pytest.raises(sa.exc.OperationalError), atomic(isolation="SERIALIZABLE"):
            raise AssertionError("must not run")
        with pytest.raises(UsageError, match="outside of an atomic block"):
            on_commit(lambda: None)
        txn.session.remove()
        txn.engine.dispose()
    assert reasons == ["error"]


def test_session_removed_inside_a_block_is_an_error(app_txn: Any) -> None:
    """Removing the session inside a ``with`` block loses the transaction: say so."""
    app, txn = app_txn
    with (
        app.app_context(),
        pytest.raises(UsageError, match="removed inside a 'with atomic\\(\\)' block"),
        atomic(),
    ):
        txn.session.remove()
    with app.app_context():
        with pytest.raises(UsageError, match="outside of an atomic block"):
            on_commit(lambda: None)  # no block is left open in this context
        txn.session.remove()


def test_deferrable_needs_serializable_in_force(app_txn: Any) -> None:
    """``deferrable=True`` with the database's default level fails at entry."""
    app, _ = app_txn
    with (
        app.app_context(),
        pytest.raises(ConfigError, match="the level in force is None"),
        atomic(readonly=True, deferrable=True),
    ):
        pass


def test_isolation_on_a_session_bound_to_a_connection_is_refused(app_txn: Any) -> None:
    """A session the user bound to an open connection cannot get a new isolation level."""
    app, txn = app_txn
    with app.app_context(), txn.engine.connect() as connection:
        txn.session(bind=connection)
        try:
            with (
                pytest.raises(UsageError, match="session is bound to a connection"),
                atomic(isolation="SERIALIZABLE"),
            ):
                pass
        finally:
            txn.session.remove()


def test_failed_rollback_is_logged_and_the_session_closed(
    app_txn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """If the rollback itself fails, the original error still propagates."""
    app, txn = app_txn

    def broken(*_: Any) -> None:
        raise RuntimeError("rollback hook failed")

    with app.app_context():
        session = txn.session()
        sa.event.listen(session, "after_soft_rollback", broken)
        with pytest.raises(KeyError), atomic():
            txn.session.add(Item(name="x"))
            raise KeyError
        sa.event.remove(session, "after_soft_rollback", broken)
    assert "Rollback failed; closing the session." in caplog.text
    assert names(app, txn) == []


def test_veto_reads_the_status_of_a_response_with_headers(app_txn: Any) -> None:
    """A ``(response, headers)`` tuple is judged by the response's own status."""
    app, txn = app_txn

    @app.post("/")
    @atomic
    def add() -> Any:
        txn.session.add(Item(name="x"))
        return app.response_class("conflict", status=409), {"X-Reason": "taken"}

    assert app.test_client().post("/").status_code == 409
    assert names(app, txn) == []


def test_veto_reads_a_status_line(app_txn: Any) -> None:
    """A status given as text ("404 NOT FOUND") is read for the veto."""
    app, txn = app_txn

    @app.post("/")
    @atomic
    def add() -> Any:
        txn.session.add(Item(name="x"))
        return "missing", "404 NOT FOUND"

    assert app.test_client().post("/").status_code == 404
    assert names(app, txn) == []


def test_extension_atomic_refuses_an_unknown_argument(app_txn: Any) -> None:
    """``txn.atomic(isolaton=...)`` names the argument and the one it resembles."""
    _, txn = app_txn
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "'atomic' got an unknown argument 'isolaton' (='SERIALIZABLE'). Did you mean"
            " 'isolation'? It takes 'isolation', 'retries',"
        ),
    ):
        txn.atomic(isolaton="SERIALIZABLE")


def test_atomic_above_the_route_decorator_is_refused_at_the_first_request(app_txn: Any) -> None:
    """'@atomic' above '@app.post' registers the plain function: the first request
    raises UsageError naming the endpoint and the fix, instead of losing the write."""
    app, txn = app_txn

    @atomic
    @app.post("/add")
    def add() -> str:
        txn.session.add(Item(name="lost"))
        return "ok"

    with pytest.raises(UsageError, match=re.escape("The route of endpoint 'add' serves")) as raised:
        app.test_client().post("/add")
    assert "Put '@atomic' below '@app.route'" in str(raised.value)
    assert count_items(app, txn) == 0


def test_atomic_below_the_route_decorator_and_wrapped_helpers_pass_the_check(
    app_txn: Any,
) -> None:
    """The right order, under other decorators too, and an '@atomic' helper that no
    route serves, pass the first request's check."""
    app, txn = app_txn

    def logged(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        return wrapper

    def helper() -> None:
        txn.session.add(Item(name="by helper"))

    atomic_helper = atomic(helper)

    @app.post("/add")
    @logged
    @atomic
    def add() -> str:
        txn.session.add(Item(name="by view"))
        return "ok"

    @app.post("/helped")
    def helped() -> str:
        atomic_helper()
        return "ok"

    def twice() -> str:
        txn.session.add(Item(name="twice"))
        return "ok"

    # One function wrapped twice, under two routes: each route serves its own wrapper.
    app.post("/first", endpoint="first")(atomic(twice))
    app.post("/second", endpoint="second")(atomic(twice))
    # A function '@atomic' wrapped for other callers, routed under another decorator.
    app.post("/plain-logged", endpoint="plain_logged")(logged(helper))

    client = app.test_client()
    paths = ("/add", "/helped", "/first", "/second")
    assert [client.post(path).status_code for path in paths] == [200] * 4
    assert count_items(app, txn) == 4
