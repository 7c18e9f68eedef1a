"""The examples run as written."""

from __future__ import annotations

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
