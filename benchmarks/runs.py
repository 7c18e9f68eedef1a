"""Medians over saved runs: ``python -m benchmarks.runs FOLDER [FOLDER ...]``.

Each folder holds a ``results.json`` written by ``python -m benchmarks``. For
every variant of every scenario it prints each run's ratio to the scenario's
anchor (the median of the per-round ratios, as ``results.md`` shows it) and the
median of those ratios over the runs: how a figure quoted as "the median of N
runs" is reproduced from the committed files.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from .results import load


def ratios(folders: Sequence[Path]) -> dict[tuple[str, str], list[float]]:
    """(scenario key, variant) -> the variant's ratio in each run, in folder order."""
    table: dict[tuple[str, str], list[float]] = {}
    for folder in folders:
        _, comparisons = load(folder / "results.json")
        for comparison in comparisons:
            for variant in list(comparison.runs)[1:]:
                table.setdefault((comparison.key, variant), []).append(comparison.ratio(variant))
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runs", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding results.json")
    args = parser.parse_args(argv)
    print("| scenario | variant | ratio, each run | median |")
    print("| --- | --- | --- | ---: |")
    for (scenario, variant), values in ratios(args.folders).items():
        each = " ".join(f"{value:.3f}" for value in values)
        print(f"| {scenario} | {variant} | {each} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
