"""The suite's own PostgreSQL and MariaDB servers stop with the run, however the run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from . import mariadb

ROOT = Path(__file__).resolve().parent.parent
#: The child run's test: it starts the server, says so, and waits.
CHILD = Path(__file__).with_name("childrun.py")
TIMEOUT = 60


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_a_terminated_run_stops_its_server(server: str) -> None:
    """SIGTERM to a pytest run (what `timeout` and CI limits send) stops the PostgreSQL
    (MariaDB) server the run started, as Ctrl-C does."""
    test = "test_waits_for_its_parent"
    if server == "mariadb":
        mariadb._binary("mariadbd")  # skipped (failed on CI) without it, as the child would be
        test = "test_mariadb_waits_for_its_parent"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLASK_TXN_TEST_POSTGRESQL", "FLASK_TXN_TEST_MARIADB")
    }
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "--no-cov",
            "-p",
            "no:randomly",
            f"{CHILD}::{test}",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = next((line for line in child.stdout if line.startswith("SERVER ")), "")
        assert line, "the child run ended before its server started"
        postmaster = int(Path(line.split()[1]).read_text().split()[0])
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=TIMEOUT)
    finally:
        child.kill()
        child.wait()
    assert not _alive(postmaster), "the server outlived the run"


def _alive(pid: int) -> bool:
    """True if ``pid`` runs: not gone, and not a zombie (exited, not yet reaped by
    whichever process adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
