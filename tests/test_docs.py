"""The docs, the README and CI stay in step with the code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import flask_txn
from flask_txn._config import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

DEMO_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e . &&"
    " .venv/bin/flask --app examples/bank/app.py run"
)
#: What the README and the quick start tell a newcomer to run next, against the demo.
LOAD_COMMAND = ".venv/bin/python examples/bank/load.py http://127.0.0.1:5000"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _test_command() -> str:
    """The one line of ``.ci/run`` that installs and runs the test suite."""
    (line,) = [
        line
        for line in _read(ROOT / ".ci" / "run").splitlines()
        if line.startswith("python3 -m venv") and "pytest" in line
    ]
    return line


def test_api_page_documents_exactly_all() -> None:
    """docs/api.md documents every name in flask_txn.__all__ and nothing else."""
    documented = re.findall(
        r"^\.\. auto(?:class|function|data|exception):: flask_txn\.(\w+)",
        _read(DOCS / "api.md"),
        re.MULTILINE,
    )
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(flask_txn.__all__)


def test_api_page_atomic_signature_matches_code() -> None:
    """The signature written out for Atomic in docs/api.md names its public parameters."""
    (written,) = re.findall(
        r"^\.\. autoclass:: flask_txn\.Atomic\((.*)\)$", _read(DOCS / "api.md"), re.MULTILINE
    )
    names = [part.split("=")[0].strip() for part in written.split(",")]
    public = [
        name for name in inspect.signature(flask_txn.Atomic).parameters if not name.startswith("_")
    ]
    assert names == ["*", *public]


def test_config_page_documents_every_key() -> None:
    """docs/config.md has one entry per TXN_* key in DEFAULTS, with its default."""
    entries = dict(
        re.findall(
            r"^```\{py:data\} (TXN_\w+)\n(?::type: .*\n)?:value: (.*)$",
            _read(DOCS / "config.md"),
            re.MULTILINE,
        )
    )
    assert sorted(entries) == sorted(DEFAULTS)
    for key, default in DEFAULTS.items():
        # MyST reads directive options as YAML: a quoted string keeps its quotes.
        shown = entries[key].removeprefix('"').removesuffix('"')
        if callable(default):
            assert shown.endswith(default.__name__), key
        else:
            assert shown == repr(default), key


def test_readme_starts_with_the_two_commands() -> None:
    """The README starts with the demo and CI's test command; the quick start repeats them."""
    test_command = _test_command()
    readme = _read(ROOT / "README.md")
    commands = [line for line in readme.splitlines() if line.startswith("python3 ")]
    assert commands[:2] == [DEMO_COMMAND, test_command]
    quickstart = _read(DOCS / "quickstart.md")
    assert DEMO_COMMAND in quickstart
    assert test_command in quickstart


def test_readme_and_quickstart_give_the_load_command() -> None:
    """Both tell a newcomer how to put the running demo under load."""
    assert LOAD_COMMAND in _read(ROOT / "README.md")
    assert LOAD_COMMAND in _read(DOCS / "quickstart.md")


def test_example_files_named_in_readme_and_quickstart_exist() -> None:
    """Every examples/... path the README or the quick start names is a file in the repo."""
    named = {
        path
        for page in (ROOT / "README.md", DOCS / "quickstart.md")
        for path in re.findall(r"examples/[\w/]+\.py", _read(page))
    }
    assert "examples/bank/app.py" in named
    assert sorted(path for path in named if not (ROOT / path).is_file()) == []


def test_internals_page_names_every_module() -> None:
    """docs/internals.md describes every module of the package, and no module that is gone."""
    page = _read(DOCS / "internals.md")
    modules = {path.stem for path in (ROOT / "flask_txn").glob("*.py")} - {"__init__"}
    named = set(re.findall(r"^\| [^|]*\| ((?:`\w+`(?:, )?)+) \|", page, re.MULTILINE))
    in_table = {name for cell in named for name in re.findall(r"`(\w+)`", cell)}
    assert in_table == modules


def test_contributing_links_the_internals_page() -> None:
    """CONTRIBUTING.md points a contributor at docs/internals.md and gives the test command."""
    contributing = _read(ROOT / "CONTRIBUTING.md")
    assert "(docs/internals.md)" in contributing
    assert _test_command() in contributing


#: A desktop window, the one the docs are laid out for; and a phone's.
DESKTOP, PHONE = (1280, 900), (400, 800)


# myst-parser reaches for an attribute Sphinx 9 deprecates; nothing to do with these pages.
@pytest.mark.filterwarnings("ignore:'sphinx.environment.BuildEnvironment.app' is deprecated")
def test_docs_show_every_code_block_in_full(browser: Any, tmp_path: Path) -> None:
    """Built with the project's theme, no page hides code behind a scrollbar, on a
    desktop or a phone, and no page is wider than a desktop window."""
    from sphinx.cmd.build import build_main

    assert build_main(["-q", "-b", "html", str(DOCS), str(tmp_path)]) == 0
    pages = sorted(tmp_path.glob("*.html"))
    clipped, too_wide = [], []
    for width, height in (DESKTOP, PHONE):
        browser.set_window_size(width, height)
        for page in pages:
            browser.get(page.as_uri())
            hidden = browser.execute_script(
                "return Array.from(document.querySelectorAll('pre'))"
                ".filter(pre => pre.scrollWidth > pre.clientWidth + 1).length"
            )
            if hidden:
                clipped.append(f"{page.name} at {width} px: {hidden} code blocks")
            if (width, height) == DESKTOP and browser.execute_script(
                "const root = document.documentElement; return root.scrollWidth > root.clientWidth"
            ):
                too_wide.append(page.name)
    assert (clipped, too_wide) == ([], [])
