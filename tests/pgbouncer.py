"""PgBouncer in front of the tests' PostgreSQL server, from Debian's ``pgbouncer`` package.

PgBouncer runs in the foreground under a systemd-style notify socket: it sends
``READY=1`` once it listens, so the tests wait for that message instead of
polling its port. Without the binary the tests skip, except on CI (``CI``
set), where they fail: ``.ci/run`` installs it.
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

from . import pgserver

#: Seconds to wait for PgBouncer to say it is ready.
TIMEOUT = 10


def _binary() -> str:
    """The pgbouncer binary; skip without it on a laptop, fail on CI."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        message = "No 'pgbouncer' binary for the PgBouncer tests (apt-get install pgbouncer)."
        if os.environ.get("CI"):
            pytest.fail(message + " CI must run them: .ci/run installs it.")
        pytest.skip(message)
    return found


@contextlib.contextmanager
def running(server: URL, *, ignore_startup_parameters: str = "") -> Iterator[URL]:
    """A PgBouncer in transaction mode before ``server``; yields the URL that goes through it.

    :param server: the PostgreSQL server's URL (trust authentication, no password).
    :param ignore_startup_parameters: PgBouncer's setting of that name.
    """
    binary = _binary()
    # PgBouncer refuses to run as root: as root, it runs as the server's user.
    user = pgserver._server_user()
    port = pgserver.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "users.txt").write_text(f'"{server.username}" ""\n')
        (folder / "pgbouncer.ini").write_text(
            f"[databases]\n{server.database} = host={server.host} port={server.port}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
            "unix_socket_dir =\nauth_type = trust\n"
            f"auth_file = {folder / 'users.txt'}\npool_mode = transaction\n"
            f"ignore_startup_parameters = {ignore_startup_parameters}\n"
        )
        notify_path = str(folder / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            notify.settimeout(TIMEOUT)
            if user is not None:
                os.chmod(notify_path, 0o666)
                for path in (folder, *folder.iterdir()):
                    os.chown(path, user.pw_uid, user.pw_gid)
            log = (folder / "log").open("wb")
            process = subprocess.Popen(
                [binary, *(["-u", user.pw_name] if user is not None else []), "pgbouncer.ini"],
                cwd=folder,
                env={**os.environ, "NOTIFY_SOCKET": notify_path},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                try:
                    ready = notify.recv(4096)
                except TimeoutError:
                    ready = b""
                assert b"READY=1" in ready, (folder / "log").read_text()
                yield server.set(host="127.0.0.1", port=port)
            finally:
                process.terminate()
                process.wait()
                log.close()
