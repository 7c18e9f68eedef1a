"""Write a run's results: ``results.json``, ``results.md`` and the plots.

``python -m benchmarks.report FOLDER`` renders ``results.md`` and the plots
again from the ``results.json`` in ``FOLDER``, without measuring anything.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
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
