"""Write a run's results: ``results.json``, ``results.md`` and the plots.

``python -m benchmarks.report FOLDER`` renders ``results.md`` and the plots
again from the ``results.json`` in ``FOLDER``, without measuring anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import machine, plots, results

#: Sphinx builds every .md under docs/: the front matter lets a copy there stand
#: outside the toctree, and docs/performance.md includes it from the marker on.
FRONT_MATTER = "---\norphan: true\n---\n\n"
FACTS = "<!-- facts -->"


def header(facts: dict[str, Any]) -> str:
    """The facts and settings of a run, as markdown."""
    duration = f"- whole run: {facts['duration_s']} s\n" if "duration_s" in facts else ""
    return f"{machine.markdown(facts)}{facts.get('settings', '')}{duration}"


def commit() -> str:
    """The short hash of the checked-out commit, for a report's first line."""
    root = Path(__file__).resolve().parent.parent
    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root
    ).stdout.strip()
    return found or "an unknown commit"


def save_table(out: Path | None, report: str, table: Mapping[str, Any]) -> None:
    """Print a one-table benchmark's report; with ``out``, save it as ``results.md``
    and its figures as ``results.json`` there."""
    print(report)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(FRONT_MATTER + report + "\n", encoding="utf-8")
        (out / "results.json").write_text(json.dumps(table, indent=2) + "\n", "utf-8")


def write(
    out: Path, facts: dict[str, Any], comparisons: Sequence[results.Comparison]
) -> list[Path]:
    """Save the figures as JSON, the tables as markdown, and draw the plots; the paths."""
    results.save(out / "results.json", facts, comparisons)
    text = (
        f"{FRONT_MATTER}# flask-txn benchmarks\n\n{FACTS}\n{header(facts)}\n"
        f"{results.report(comparisons)}"
    )
    (out / "results.md").write_text(text, encoding="utf-8")
    return [out / "results.json", out / "results.md", *plots.draw(comparisons, out)]


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    folder = Path(args[0]) if args else Path("benchmarks/results")
    facts, comparisons = results.load(folder / "results.json")
    print(*write(folder, facts, comparisons), sep="\n")


if __name__ == "__main__":
    main()
