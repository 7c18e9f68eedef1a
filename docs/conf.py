"""Sphinx configuration for the flask-txn documentation."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer

# Document the checkout, not whichever flask_txn happens to be installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flask_txn

project = "flask-txn"
copyright = "the flask-txn authors"
release = flask_txn.__version__
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "pallets_sphinx_themes"]
myst_enable_extensions = ["colon_fence", "deflist"]
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"

# The theme of Flask's own docs, which Flask users know.
html_theme = "flask"
html_sidebars = {"**": ["localtoc.html", "relations.html", "searchbox.html"]}
html_title = f"flask-txn {release}"
# The banner's script asks PyPI for the newest version: these pages load nothing from elsewhere.
version_banner = False
html_static_path = ["_static"]
html_css_files = ["flask-txn.css"]

# The private modules that define public data (the signals, the idempotency table)
# and hold their attribute docstrings.
DATA_MODULES = ("flask_txn._signals", "flask_txn._idempotency")


def data_docstring(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Use a public datum's attribute docstring instead of its class's docstring.

    autodoc looks for attribute docstrings in the module a name is documented
    under (``flask_txn``), but these are defined in private modules.
    """
    if what != "data":
        return
    for module in DATA_MODULES:
        docs = ModuleAnalyzer.for_module(module).find_attr_docs()
        found = docs.get(("", name.rpartition(".")[2]))
        if found is not None:
            lines[:] = found
            return


def make_plots(app: Sphinx) -> None:
    """Draw the plots the pages show, from the code they describe (docs/plots/*.py)."""
    for script in sorted((Path(__file__).resolve().parent / "plots").glob("*.py")):
        runpy.run_path(str(script))["main"]()


def setup(app: Sphinx) -> None:
    """Register the docstring hook and the plots."""
    app.connect("autodoc-process-docstring", data_docstring)
    app.connect("builder-inited", make_plots)
