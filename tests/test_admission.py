"""Admission control: the adaptive limit of contended blocks, on real conflicts from PostgreSQL.

The AIMD arithmetic and the queue's order are tested on :class:`Limit` alone;
everything else through ``@atomic`` on a real server, with barriers and events
where threads must meet. No sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_txn import ConfigError, _limiter, _transaction, atomic, transaction_retrying
from flask_txn._limiter import Bounds, Limit, Waiter

from .conftest import Attempts, Item
from .test_conflicts import run_concurrently, values

TIMEOUT = 30
KEY = "tests.hot"
CONFLICT = sa.text("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$")


@pytest.fixture
def database_url(postgresql_url: str) -> str:
    """Conflicts are PostgreSQL's."""
    return postgresql_url


def make_bank(make_app: Any, url: str | None = None, **config: Any) -> tuple[Flask, Any]:
    """An app whose retries never wait, with two rows at value 0."""
    app, txn = make_app(url, TXN_RETRY_SLEEP=lambda _: None, **config)
    with app.app_context(), atomic():
        txn.session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
    return app, txn


def limit_of(app: Flask, txn: Any, key: str = KEY) -> Limit | None:
    limits = txn._states[app].limits
    assert limits is not None
    return limits.get(key)  # type: ignore[no-any-return]


def track(app: Flask, txn: Any, key: str = KEY) -> Limit:
    """Give ``key`` a limit, as its first conflict would."""
    txn._states[app].limits.conflicted(key)
    limit = limit_of(app, txn, key)
    assert limit is not None
    return limit


# -- the limit alone ---------------------------------------------------------------


def test_aimd_halves_on_conflict_and_adds_a_tenth_of_a_slot_per_commit_in_use() -> None:
    """A conflict halves the limit down to the floor; a commit while the limit is in
    use adds INCREASE / limit, up to the ceiling; a commit of an idle limit adds nothing."""
    limit = Limit(Bounds(1, 8))
    assert (limit.limit, limit.slots) == (8.0, 8)
    for expected in (4.0, 2.0, 1.0, 1.0):
        limit.leave("conflict", held=False)
        assert limit.limit == expected
    assert limit.enter(Waiter(retry=False))  # 1 running of 1 slot: in use
    limit.leave("commit", held=True)
    assert limit.limit == pytest.approx(1.0 + _limiter.INCREASE)
    limit.leave("commit", held=False)  # 0 running: idle, no growth
    assert limit.limit == pytest.approx(1.0 + _limiter.INCREASE)
    limit.limit = 7.99
    limit.running = 4
    limit.leave("commit", held=True)
    assert limit.limit == 8.0
    limit.leave("other", held=True)
    assert (limit.limit, limit.running) == (8.0, 2)


def test_queue_is_first_come_first_served_with_re_runs_first() -> None:
    """A full limit queues attempts; a freed slot goes to the oldest re-run, then the
    oldest first attempt; an attempt that gave up leaves the queue."""
    limit = Limit(Bounds(1, 1))
    assert limit.enter(Waiter(retry=False))
    first, second, rerun, gone = (Waiter(retry=r) for r in (False, False, True, False))
    assert not any(limit.enter(w) for w in (first, second, rerun, gone))
    assert limit.waiting == 4
    assert not limit.give_up(gone)
    limit.leave("commit", held=True)
    assert (rerun.granted, first.granted, limit.running) == (True, False, 1)
    limit.leave("commit", held=True)
    assert (first.granted, second.granted) == (True, False)
    assert limit.give_up(first)  # granted meanwhile: it holds the slot
    limit.leave("other", held=True)
    assert second.granted
    assert limit.waiting == 0


def test_a_waiter_whose_loop_closed_is_skipped() -> None:
    """A freed slot goes past an async waiter whose event loop is gone, to the next."""
    limit = Limit(Bounds(1, 1))
    assert limit.enter(Waiter(retry=False))
    loop = asyncio.new_event_loop()
    gone, next_ = Waiter(retry=False, loop=loop), Waiter(retry=False)
    loop.close()
    assert not limit.enter(gone)
    assert not limit.enter(next_)
    limit.leave("commit", held=True)
    assert (next_.granted, limit.running, limit.waiting) == (True, 1, 0)


def test_bad_limits_and_keys_are_refused() -> None:
    """Every wrong value names the key or argument and says what is allowed."""
    for value in (0, (0, 2), (3, 2), (1, 2, 3), (1, True), "1,2"):
        with pytest.raises(ConfigError, match=r"'TXN_ADMISSION_LIMITS' must be a pair"):
            _limiter.read_bounds(True, value)
    with pytest.raises(ConfigError, match=r"'TXN_ADMISSION' must be True .* got 'yes'"):
        _limiter.read_bounds("yes", (1, 2))
    assert _limiter.read_bounds(False, (1, 2)) is None
    with pytest.raises(ConfigError, match=r"'contention_key' must be a non-empty string"):
        atomic(contention_key="")


# -- through @atomic, on PostgreSQL -------------------------------------------------


def test_uncontended_blocks_are_admitted_at_once(make_app: Any) -> None:
    """A key that never conflicted has no limit: its blocks run together, whatever
    the bounds, and nothing is tracked."""
    app, txn = make_bank(make_app, TXN_ADMISSION_LIMITS=(1, 1))
    inside = threading.Barrier(2, timeout=TIMEOUT)

    @app.post("/read")
    @atomic(contention_key=KEY)
    def read() -> str:
        txn.session.get(Item, 1)
        inside.wait()  # both are inside their blocks at once
        return "ok"

    responses = run_concurrently(app, ("A", "/read"), ("B", "/read"))
    assert [r.status_code for r in responses.values()] == [200, 200]
    assert limit_of(app, txn) is None


def conflict(app: Flask, txn: Any, path: str) -> list[Any]:
    """Two requests read row 1 and both write it, once: one gets 40001 and is re-run."""
    seen: list[Any] = []

    def receive(_app: Any, **payload: Any) -> None:
        seen.append(payload)

    with transaction_retrying.connected_to(receive, app):
        responses = run_concurrently(app, ("A", path), ("B", path))
    assert [r.status_code for r in responses.values()] == [200, 200]
    return seen


def test_real_conflicts_narrow_the_limit_and_commits_widen_it(make_app: Any) -> None:
    """Each 40001 halves the key's limit (4, then 2, then 1); commits without conflict
    widen it again; the retry signal reports the limit and the seconds queued."""
    app, txn = make_bank(make_app, TXN_ADMISSION_LIMITS=(1, 4))
    attempts = Attempts()
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    racing = [True]

    @app.post("/increment")
    @atomic(isolation="SERIALIZABLE", contention_key=KEY)
    def increment() -> str:
        item = txn.session.get(Item, 1)
        if attempts.first() and racing:
            barrier.wait()  # both have read the row
        item.value += 1
        return "ok"

    first = conflict(app, txn, "/increment")
    assert [(p["sqlstate"], p["limit"], p["queued"]) for p in first] == [("40001", 2, 0.0)]
    limit = limit_of(app, txn)
    assert limit is not None
    assert limit.slots == 2
    attempts.calls.clear()
    second = conflict(app, txn, "/increment")  # 2 slots: both still run at once
    assert [p["limit"] for p in second] == [1]
    assert (limit.slots, values(app, txn)[1]) == (1, 4)

    racing.clear()
    client = app.test_client()
    slots = []
    for _ in range(20):
        assert client.post("/increment").status_code == 200
        slots.append(limit.limit)
    assert slots == sorted(slots)
    assert limit.slots == 2
    assert (limit.running, limit.waiting) == (0, 0)


def test_nested_and_reentrant_blocks_take_no_slot(make_app: Any) -> None:
    """With one slot, held by the outermost block: a nested block of the same key, a
    re-entrant call and an outermost block of another app context all run at once."""
    app, txn = make_bank(
        make_app, TXN_ADMISSION_LIMITS=(1, 1), TXN_SESSION_SCOPE="app_context", TXN_POOL_TIMEOUT=5
    )
    limit = track(app, txn)
    seen = []

    @atomic(contention_key=KEY)
    def inner() -> None:
        txn.session.get(Item, 2)
        attempt = _transaction.current()
        assert attempt is not None
        # A savepoint runs in the outer attempt, which holds the slot; an outermost
        # block of its own context has an attempt that was never admitted.
        seen.append((limit.running, attempt.admission is None))

    @atomic(contention_key=KEY)
    def outer(depth: int) -> None:
        txn.session.get(Item, 1)
        if depth:
            outer(depth - 1)  # re-entrant: a savepoint
            return
        inner()
        with app.app_context():  # a new session: an outermost block inside this one
            inner()

    with app.app_context():
        outer(2)
    assert seen == [(1, False), (1, True)]
    with pytest.raises(ConfigError, match=r"'contention_key' cannot be used with a 'with atomic"):
        atomic(contention_key=KEY).__enter__()
    assert (limit.running, limit.waiting) == (0, 0)


def test_no_slot_is_held_across_an_exception_and_all_are_free_after_teardown(
    make_app: Any,
) -> None:
    """A block that raises, a block vetoed by its response, and a conflict that
    exhausted its retries each give their slot back: with one slot, every next
    request is admitted, and after the requests' teardown nothing runs or waits."""
    app, txn = make_bank(make_app, TXN_ADMISSION_LIMITS=(1, 1), TXN_POOL_TIMEOUT=5)
    limit = track(app, txn)
    held = []

    @app.post("/<how>")
    @atomic(contention_key=KEY, retries=0)
    def fail(how: str) -> tuple[str, int]:
        held.append(limit.running)
        txn.session.get(Item, 1).value += 1  # type: ignore[union-attr]
        if how == "raise":
            raise ValueError("boom")
        if how == "conflict":
            txn.session.execute(CONFLICT)
        return ("vetoed", 409) if how == "veto" else ("ok", 200)

    client = app.test_client()
    with pytest.raises(ValueError, match="boom"):
        client.post("/raise")  # TESTING: the error reaches the test
    statuses = [client.post(f"/{how}").status_code for how in ("veto", "conflict", "ok")]
    assert statuses == [409, 503, 200]
    assert held == [1, 1, 1, 1]
    assert (limit.running, limit.waiting, values(app, txn)[1]) == (0, 0, 1)


def test_async_blocks_wait_without_blocking_their_loop(
    make_app: Any, postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Async blocks queued behind a sync block of the same key wait on their loop,
    which keeps running other tasks: one is cancelled and leaves the queue, the
    other is admitted when the sync block commits."""
    url = sa.make_url(postgresql_url).set(drivername="postgresql+psycopg")
    app, txn = make_bank(make_app, url, TXN_ADMISSION_LIMITS=(1, 1), TXN_POOL_TIMEOUT=10)
    limit = track(app, txn)
    queued, loop_ran, inside, release = (threading.Event() for _ in range(4))
    order: list[str] = []
    enter = Limit.enter

    def spy(self: Limit, waiter: Waiter) -> bool:
        admitted = enter(self, waiter)
        if self.waiting == 2:
            queued.set()
        return admitted

    monkeypatch.setattr(Limit, "enter", spy)

    @atomic(contention_key=KEY)
    def hold() -> None:
        txn.session.get(Item, 1)
        inside.set()
        assert release.wait(TIMEOUT)
        order.append("sync")

    @atomic(contention_key=KEY)
    async def later() -> None:
        await txn.async_session.get(Item, 2)
        order.append("async")

    @atomic(contention_key=KEY)
    async def doomed() -> None:
        raise AssertionError("ran")

    async def both() -> None:
        admitted = asyncio.create_task(later())
        cancelled = asyncio.create_task(doomed())
        await asyncio.get_running_loop().run_in_executor(None, queued.wait, TIMEOUT)
        # The loop runs this while both blocks wait for their slot.
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert limit.waiting == 1
        loop_ran.set()
        await admitted

    def run_async() -> None:
        with app.app_context():
            asyncio.run(both())

    def run_sync() -> None:
        with app.app_context():
            hold()

    holder = threading.Thread(target=run_sync)
    holder.start()
    assert inside.wait(TIMEOUT)
    waiter = threading.Thread(target=run_async)
    waiter.start()
    assert loop_ran.wait(TIMEOUT)
    release.set()
    for thread in (holder, waiter):
        thread.join(TIMEOUT)
    assert order == ["sync", "async"]
    assert (limit.running, limit.waiting) == (0, 0)


def test_admission_off_tracks_nothing(make_app: Any) -> None:
    """'TXN_ADMISSION = False': conflicts leave no limit, and blocks are never wrapped."""
    app, txn = make_bank(make_app, TXN_ADMISSION=False)
    assert txn._states[app].limits is None

    @app.post("/fail")
    @atomic(contention_key=KEY, retries=1)
    def fail() -> str:
        attempt = _transaction.current()
        assert attempt is not None
        assert attempt.admission is None
        if attempt.number == 1:
            txn.session.execute(CONFLICT)
        return "ok"

    seen: list[Any] = []
    with transaction_retrying.connected_to(lambda _a, **p: seen.append(p), app):
        assert app.test_client().post("/fail").status_code == 200
    assert [(p["queued"], p["limit"]) for p in seen] == [(0.0, None)]


def test_default_key_is_the_function(make_app: Any) -> None:
    """Without 'contention_key', a conflict limits the decorated function's own key."""
    app, txn = make_bank(make_app)

    @app.post("/fail")
    @atomic(retries=1)
    def fail() -> str:
        attempt = _transaction.current()
        assert attempt is not None
        if attempt.number == 1:
            txn.session.execute(CONFLICT)
        return "ok"

    assert app.test_client().post("/fail").status_code == 200
    key = f"{__name__}.test_default_key_is_the_function.<locals>.fail"
    limit = limit_of(app, txn, key)
    assert limit is not None
    assert limit.slots == 16


def test_the_wait_is_bounded_by_the_deadline(make_app: Any) -> None:
    """With every slot taken, a block whose deadline leaves no time to wait runs at once,
    without a slot, and commits; the slot's holder keeps it."""
    app, txn = make_bank(make_app, TXN_ADMISSION_LIMITS=(1, 1))
    limit = track(app, txn)
    limit.running = 1  # another request holds the only slot
    ran = []

    @atomic(contention_key=KEY, deadline=0.001)
    def late() -> None:
        ran.append(limit.running)
        txn.session.get(Item, 1).value += 1  # type: ignore[union-attr]

    with app.app_context():
        late()
    assert (ran, limit.running, limit.waiting, values(app, txn)[1]) == ([1], 1, 0, 1)
    limit.running = 0


@pytest.mark.parametrize("granted", [False, True])
def test_an_interrupted_wait_leaves_the_queue_and_frees_its_slot(
    make_app: Any, monkeypatch: pytest.MonkeyPatch, granted: bool
) -> None:
    """Ctrl-C while an attempt waits: it leaves the queue, and the slot granted to it
    meanwhile, if any, goes back; the block never runs."""
    app, txn = make_bank(make_app, TXN_ADMISSION_LIMITS=(1, 1))
    limit = track(app, txn)
    limit.running = 1  # another request holds the only slot

    def interrupted(self: Waiter, timeout: float) -> None:
        if granted:
            limit.leave("commit", held=True)  # the holder leaves: the slot is this waiter's
        raise KeyboardInterrupt

    monkeypatch.setattr(Waiter, "wait", interrupted)

    @atomic(contention_key=KEY)
    def never() -> None:
        raise AssertionError("ran")

    with app.app_context(), pytest.raises(KeyboardInterrupt):
        never()
    assert (limit.running, limit.waiting) == (0 if granted else 1, 0)
    limit.running = 0
