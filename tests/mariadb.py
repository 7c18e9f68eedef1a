"""A throwaway MariaDB server for the tests, from Debian's ``mariadb-server`` package.

``mariadb-install-db`` makes a data folder in a temporary folder, and
``mariadbd --no-defaults`` serves it on 127.0.0.1 and a free port, ignoring
every ``my.cnf`` (a system MariaDB on port 3306 is never used). The server
runs in the foreground under a systemd-style notify socket: it sends
``READY=1`` once it accepts connections, after running the init file that
creates the tests' user and database, so the tests wait for that message
instead of polling. Without the binaries the tests skip, except on CI (``CI``
set), where they fail: ``.ci/run`` installs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from .pgserver import free_port

#: Seconds to wait for the server to say it is ready, and to stop.
TIMEOUT = 30
#: The tests' user, password and database.
USER = DATABASE = "txn"
#: Server settings that make tests fast and lock waits short: no fsync at
#: commit, no binary log, a small log, and a 2 s lock wait timeout (1205).
SETTINGS = (
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
    "--innodb-lock-wait-timeout=2",
    "--skip-log-bin",
    "--skip-name-resolve",
    "--max-connections=200",
    "--character-set-server=utf8mb4",
)


def _binary(name: str) -> str:
    """A MariaDB binary; skip without it on a laptop, fail on CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        message = f"No {name!r} binary for the MariaDB tests (apt-get install mariadb-server)."
        if os.environ.get("CI"):
            pytest.fail(message + " CI must run them: .ci/run installs it.")
        pytest.skip(message)
    return found


def _run(args: list[str], log: Path) -> None:
    with log.open("ab") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{log.read_text()}")


@contextlib.contextmanager
def running() -> Iterator[URL]:
    """Start a throwaway MariaDB; yield its PyMySQL URL; stop it and delete its files
    however the block ends."""
    install, server = _binary("mariadb-install-db"), _binary("mariadbd")
    # As root, mariadbd must be told to stay root (it has no files elsewhere);
    # any other user runs it as themselves.
    as_user = ["--user=root"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="flask-txn-mariadb-"))
    try:
        data, log = folder / "data", folder / "server.log"
        _run(
            [
                install,
                *as_user,
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            log,
        )
        port = free_port()
        (folder / "init.sql").write_text(
            f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{USER}';\n"
            f"CREATE DATABASE {DATABASE};\n"
            f"GRANT ALL ON *.* TO '{USER}'@'127.0.0.1';\n"
        )
        notify_path = str(folder / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            notify.settimeout(TIMEOUT)
            with log.open("ab") as out:
                process = subprocess.Popen(
                    [
                        server,
                        "--no-defaults",
                        *as_user,
                        f"--datadir={data}",
                        f"--socket={folder / 'sock'}",
                        f"--pid-file={folder / 'pid'}",
                        f"--init-file={folder / 'init.sql'}",
                        "--bind-address=127.0.0.1",
                        f"--port={port}",
                        *SETTINGS,
                    ],
                    env={**os.environ, "NOTIFY_SOCKET": notify_path},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                _wait_ready(notify, process, log)
                yield URL.create(
                    "mysql+pymysql",
                    username=USER,
                    password=USER,
                    host="127.0.0.1",
                    port=port,
                    database=DATABASE,
                    query={"charset": "utf8mb4"},
                )
            finally:
                process.terminate()
                try:
                    process.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(notify: socket.socket, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for ``READY=1``: fail with the server's log if it exits or takes too long."""
    while True:
        try:
            message = notify.recv(4096)
        except TimeoutError:
            message = b""
        if b"READY=1" in message:
            return
        if not message or process.poll() is not None:
            raise RuntimeError(f"MariaDB did not start:\n{log.read_text()}")
