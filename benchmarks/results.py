"""Measured runs, their medians, spreads and ratios, as markdown and JSON.

Every scenario runs its variants interleaved, in a new order each round (A B C,
then C A B, ...), so a variant's ratio to the anchor is the median of the
ratios of the runs made side by side: that cancels most of the drift of a
shared machine, and no variant gains from its place in the order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed run of one variant.

    ``committed`` counts transactions (or calls, or requests) that succeeded
    within ``seconds``; ``failed`` those that gave up after all attempts;
    ``retries`` the re-runs of all of them; ``errors`` anything else.
    """

    committed: int
    seconds: float
    failed: int = 0
    retries: int = 0
    errors: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    #: the database's sessions in a transaction, on average over the run (sampled)
    in_transaction: float = math.nan

    @property
    def goodput(self) -> float:
        """Committed per second."""
        return self.committed / self.seconds

    @property
    def failed_share(self) -> float:
        """Failed after all attempts, as a share of all that ended."""
        ended = self.committed + self.failed
        return self.failed / ended if ended else 0.0

    @property
    def retries_per_commit(self) -> float:
        return self.retries / self.committed if self.committed else math.nan


def shuffled(names: Iterable[str], round_: int) -> list[str]:
    """The order of the variants in round ``round_``: a new one each round (seeded,
    so a rerun repeats it), so that no variant always runs first, or right after
    the same other one, and gains or loses from warm or cold caches."""
    order = list(names)
    return random.Random(round_).sample(order, len(order))


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of ``values`` (NaN if there are none)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass
class Comparison:
    """One scenario: its variants' runs, the first variant being the anchor."""

    key: str
    title: str
    clients: int
    unit: str
    runs: dict[str, list[Run]]
    notes: str = ""

    @property
    def anchor(self) -> str:
        return next(iter(self.runs))

    def median(self, variant: str, attribute: str = "goodput") -> float:
        values = [getattr(run, attribute) for run in self.runs[variant]]
        values = [value for value in values if not math.isnan(value)]
        return statistics.median(values) if values else math.nan

    def ratio(self, variant: str, against: str | None = None) -> float:
        """Median of the paired ratios variant / anchor (or / ``against``), run by run."""
        pairs = zip(self.runs[variant], self.runs[against or self.anchor], strict=True)
        ratios = [run.goodput / base.goodput for run, base in pairs if base.goodput]
        return statistics.median(ratios) if ratios else math.nan

    def spread(self, variant: str) -> tuple[float, float]:
        rates = [run.goodput for run in self.runs[variant]]
        return min(rates), max(rates)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "clients": self.clients,
            "unit": self.unit,
            "notes": self.notes,
            "runs": {
                name: [dataclasses.asdict(run) for run in runs] for name, runs in self.runs.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        runs = {name: [Run(**run) for run in items] for name, items in data["runs"].items()}
        return cls(data["key"], data["title"], data["clients"], data["unit"], runs, data["notes"])


def _number(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def markdown(comparisons: Sequence[Comparison]) -> str:
    """One table per scenario: medians over the runs, the spread, the ratio to the anchor."""
    out: list[str] = []
    for comparison in comparisons:
        contended = any(
            run.failed or run.retries for runs in comparison.runs.values() for run in runs
        )
        rounds = len(comparison.runs[comparison.anchor])
        heading = comparison.title
        if comparison.key == "backoff":
            heading += f", {comparison.clients} clients"
        out.append(f"## {heading}\n")
        out.append(
            f"{comparison.clients} client(s), {rounds} interleaved round(s);"
            f" ratio = median of the per-round ratios to the first row."
            + (f" {comparison.notes}" if comparison.notes else "")
            + "\n"
        )
        header = f"| variant | {comparison.unit} (median) | min-max | ratio |"
        rule = "| --- | ---: | ---: | ---: |"
        if contended:
            header += " failed | retries/commit | p50 ms | p99 ms |"
            rule += " ---: | ---: | ---: | ---: |"
        elif not math.isnan(comparison.median(comparison.anchor, "p50_ms")):
            header += " p50 ms | p99 ms |"
            rule += " ---: | ---: |"
        sampled = not math.isnan(comparison.median(comparison.anchor, "in_transaction"))
        if sampled:
            header += " in a transaction |"
            rule += " ---: |"
        out += [header, rule]
        for name in comparison.runs:
            low, high = comparison.spread(name)
            row = (
                f"| {name} | {_number(comparison.median(name))} | {_number(low)}-{_number(high)}"
                f" | {comparison.ratio(name):.3f} |"
            )
            if contended:
                row += (
                    f" {comparison.median(name, 'failed_share'):.1%} |"
                    f" {_number(comparison.median(name, 'retries_per_commit'), 2)} |"
                )
            if contended or "p50" in header:
                row += (
                    f" {_number(comparison.median(name, 'p50_ms'), 1)} |"
                    f" {_number(comparison.median(name, 'p99_ms'), 1)} |"
                )
            if sampled:
                row += f" {_number(comparison.median(name, 'in_transaction'), 1)} |"
            out.append(row)
        out.append("")
    return "\n".join(out)


#: The concurrency of scenarios 2 to 4; scenario 5 adds the other client counts.
MAIN_CLIENTS = 8
SCALED = {"cold": "2. cold transfers", "serializable": "3. hot SERIALIZABLE transfers"}


def scaling_markdown(comparisons: Sequence[Comparison]) -> str:
    """Scenario 5: per variant, one row per client count, with the share of its own
    goodput at 8 clients that it keeps (how far it collapses as clients are added)."""
    out: list[str] = []
    for key, title in SCALED.items():
        points = sorted((c for c in comparisons if c.key == key), key=lambda c: c.clients)
        if len(points) < 2:
            continue
        variants = [name for name in points[0].runs if all(name in c.runs for c in points)]
        at_main = {c.clients: c for c in points}.get(MAIN_CLIENTS)
        out.append(f"## 5. Scaling of scenario {title}\n")
        out.append(
            f"Medians; *of {MAIN_CLIENTS}* = goodput / the same variant's goodput at"
            f" {MAIN_CLIENTS} clients.\n"
        )
        for name in variants:
            out += [
                f"{name}:\n",
                f"| clients | rounds | {points[0].unit} | of {MAIN_CLIENTS} | failed"
                " | retries/commit | p99 ms |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for c in points:
                share = c.median(name) / at_main.median(name) if at_main else math.nan
                out.append(
                    f"| {c.clients} | {len(c.runs[name])} | {_number(c.median(name))}"
                    f" | {_number(share, 2)} | {c.median(name, 'failed_share'):.1%}"
                    f" | {_number(c.median(name, 'retries_per_commit'), 2)}"
                    f" | {_number(c.median(name, 'p99_ms'), 1)} |"
                )
            out.append("")
    return "\n".join(out)


def report(comparisons: Sequence[Comparison]) -> str:
    """Scenarios 1 to 4 at their concurrency, the backoff sweeps, scaling, then 5b."""
    main = [
        c
        for c in comparisons
        if c.key in ("overhead", "async", "noop") or c.clients == MAIN_CLIENTS
    ]
    main = [c for c in main if c.key not in ("backoff", "paired")]
    sweeps = sorted((c for c in comparisons if c.key == "backoff"), key=lambda c: c.clients)
    paired = [c for c in comparisons if c.key == "paired"]
    return (
        markdown([*main, *sweeps])
        + "\n"
        + scaling_markdown(comparisons)
        + ("\n" + markdown(paired) if paired else "")
    )


def save(path: Path, facts: dict[str, Any], comparisons: Sequence[Comparison]) -> None:
    """Write the run's facts and every run's figures as JSON."""
    data = {"facts": facts, "comparisons": [c.to_json() for c in comparisons]}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def load(path: Path) -> tuple[dict[str, Any], list[Comparison]]:
    """Read what :func:`save` wrote."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["facts"], [Comparison.from_json(item) for item in data["comparisons"]]
