"""The examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_minimal_example_tests_pass(pytester: pytest.Pytester) -> None:
    """The tests the testing docs page walks through pass with the plugin enabled."""
    result = pytester.runpytest_inprocess(
        str(EXAMPLES / "minimal" / "test_app.py"), "-o", "addopts=", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=4)


def test_shop_example_tests_pass(pytester: pytest.Pytester) -> None:
    """The Flask-SQLAlchemy shop converted to flask-txn: its own tests, with the plugin's
    fixtures on db=, on a schema made by its Flask-Migrate migrations."""
    pytester.syspathinsert(EXAMPLES.parent)
    result = pytester.runpytest_inprocess(
        str(EXAMPLES / "shop" / "test_shop.py"), "-o", "addopts=", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=5)


#: Run as a fresh interpreter where SQLAlchemy's asyncio support cannot be imported,
#: as after the README's `pip install -e .` (no greenlet): the demo must still serve.
WITHOUT_ASYNCIO = """
import sys
sys.modules["sqlalchemy.ext.asyncio"] = None  # what a missing greenlet does to the import
from examples.bank.app import create_app
app = create_app(sys.argv[1])
client = app.test_client()
sent = client.post(
    "/transfers", json={"from": 1, "to": 2, "amount": 5}, headers={"Idempotency-Key": "k"}
)
print(client.get("/").status_code, sent.status_code)
"""


def test_demo_runs_without_the_async_extra(tmp_path: Path) -> None:
    """The README's demo installs flask-txn without extras, so without greenlet: the bank
    app must import flask_txn, start and move money all the same."""
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_ASYNCIO, f"sqlite:///{tmp_path / 'bank.db'}"],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (completed.returncode, completed.stdout.split()) == (0, ["200", "201"]), completed.stderr
