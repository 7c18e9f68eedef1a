"""Fork safety: workers of ``gunicorn --preload`` never use the parent's pooled connection."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from .pgserver import free_port

ROOT = Path(__file__).resolve().parent.parent
#: Read by tests/forkapp.py (not imported here: importing it runs its query).
DATABASE_URI_ENV = "FLASK_TXN_FORKAPP_DATABASE_URI"
#: Seconds to wait for gunicorn to listen, answer or stop before failing.
DEADLINE = 30
#: Ordinary requests made after the two that reach both workers.
REQUESTS = 20


@dataclasses.dataclass
class Answer:
    status: int
    body: dict[str, Any]


@dataclasses.dataclass
class Served:
    """What the workers answered while gunicorn ran, and its log."""

    answers: list[Answer]
    log: Path

    def values(self, key: str) -> list[Any]:
        return [answer.body.get(key) for answer in self.answers]


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        try:
            # The pause between two polls, which also notices gunicorn dying.
            process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"gunicorn exited with {process.returncode}:\n{log.read_text()}")
    pytest.fail(f"gunicorn did not listen within {DEADLINE} s:\n{log.read_text()}")


def _answer(status: int, body: bytes) -> Answer:
    return Answer(status, json.loads(body) if status == 200 else {})


def _get(port: int) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return _answer(response.status, response.read())
    finally:
        connection.close()


def _from_both_workers(port: int) -> list[Answer]:
    """One answer from each worker: one holds an unfinished request while the other answers.

    A sync worker serves one connection at a time, so the worker reading the
    unfinished request cannot be the one answering the second.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as held:
        held.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        other = _get(port)
        held.sendall(b"Connection: close\r\n\r\n")
        raw = b""
        while chunk := held.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return [other, _answer(int(head.split()[1]), body)]


@pytest.fixture(scope="module")
def served(postgresql_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """tests/forkapp.py under gunicorn --preload with 2 sync workers, after requests to both."""
    port = free_port()
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--preload",
        "--workers=2",
        "--worker-class=sync",
        f"--bind=127.0.0.1:{port}",
        "--no-control-socket",
        f"--graceful-timeout={DEADLINE}",
        "tests.forkapp:app",
    ]
    env = {**os.environ, DATABASE_URI_ENV: postgresql_url}
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=output)
    try:
        _wait_until_listening(process, port, log)
        answers = _from_both_workers(port) + [_get(port) for _ in range(REQUESTS)]
        yield Served(answers, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_every_request_succeeds(served: Served) -> None:
    """Every request answers 200 and gunicorn logs no traceback."""
    assert (
        [answer.status for answer in served.answers],
        "Traceback" in served.log.read_text(),
    ) == (
        [200] * (REQUESTS + 2),
        False,
    )


def test_both_workers_answer(served: Served) -> None:
    """Two worker processes, neither of them the parent, answered."""
    workers = set(served.values("pid")) - set(served.values("parent_pid"))
    assert len(workers) == 2


def test_parent_pool_held_a_connection_at_the_fork(served: Served) -> None:
    """The parent's pool held the connection of its import-time query when it forked."""
    assert set(served.values("parent_pooled")) == {1}


def test_workers_never_use_the_parent_connection(served: Served) -> None:
    """No worker's query ran on the parent's database connection."""
    (parent_backend,) = set(served.values("parent_backend_pid"))
    assert parent_backend not in served.values("backend_pid")


def test_workers_do_not_share_a_connection(served: Served) -> None:
    """Each database connection serves one worker only."""
    workers_of: dict[int, set[int]] = {}
    for answer in served.answers:
        workers_of.setdefault(answer.body["backend_pid"], set()).add(answer.body["pid"])
    assert all(len(workers) == 1 for workers in workers_of.values())


def test_parent_connection_is_left_open(served: Served, postgresql_url: str) -> None:
    """The workers leave the parent's connection alone: its server process still runs."""
    (parent_backend,) = set(served.values("parent_backend_pid"))
    engine = sa.create_engine(postgresql_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            alive = connection.scalar(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": parent_backend},
            )
    finally:
        engine.dispose()
    assert alive == 1
