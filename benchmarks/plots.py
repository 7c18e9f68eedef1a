"""PNG plots of a run's results (matplotlib, no display needed)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from .results import MAIN_CLIENTS, Comparison

_PGBENCH = "#4c72b0"
_FLASK_TXN = "#dd8452"
_OTHER = "#8c8c8c"


_BOUNDED = "#55a868"


def colour(variant: str) -> str:
    if variant.startswith("pgbench"):
        return _PGBENCH
    if "pool of" in variant:
        return _BOUNDED
    return _FLASK_TXN if variant.startswith("flask-txn") else _OTHER


def plain(label: str) -> str:
    return label.replace("`", "")


def goodput_bars(comparisons: Sequence[Comparison], path: Path) -> None:
    """One panel per scenario: each variant's median goodput, with its min-max as error bars."""
    columns = 2
    rows = math.ceil(len(comparisons) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(11, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(comparisons) :]:
        ax.set_visible(False)
    for ax, comparison in zip(axes.flat, comparisons, strict=False):
        names = list(comparison.runs)
        medians = [comparison.median(name) for name in names]
        spreads = [comparison.spread(name) for name in names]
        errors = [
            [m - low for m, (low, _) in zip(medians, spreads, strict=True)],
            [high - m for m, (_, high) in zip(medians, spreads, strict=True)],
        ]
        positions = list(range(len(names)))
        ax.bar(positions, medians, yerr=errors, capsize=4, color=[colour(n) for n in names])
        top = max(high for _, high in spreads)
        for x, name, (_, high) in zip(positions, names, spreads, strict=True):
            label = f"x{comparison.ratio(name):.2f}"
            failed = comparison.median(name, "failed_share")
            if failed:
                label += f"\n{failed:.1%} failed"
            ax.text(x, high + top * 0.02, label, ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, top * 1.25)
        ax.set_xticks(positions)
        width = 22 if len(names) < 5 else 16
        ax.set_xticklabels([_wrap(plain(n), width) for n in names], fontsize=7)
        ax.set_title(
            f"{comparison.title.split(':')[0]} ({comparison.clients} client(s))", fontsize=9
        )
        ax.set_ylabel(comparison.unit)
    fig.suptitle(
        "Median goodput; bars: min-max of the rounds; label: ratio to the first bar", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrap(label: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(label, width))


def scaling(comparisons: Sequence[Comparison], path: Path) -> None:
    """Scenario 5: goodput against clients for scenarios 2 and 3, flask-txn and pgbench."""
    keys = [("cold", "2. cold, READ COMMITTED"), ("serializable", "3. hot SERIALIZABLE")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (key, title) in zip(axes, keys, strict=True):
        points = sorted((c for c in comparisons if c.key == key), key=lambda c: c.clients)
        if not points:
            continue
        for name in [n for n in points[0].runs if all(n in c.runs for c in points)]:
            clients = [c.clients for c in points]
            medians = [c.median(name) for c in points]
            lows = [m - c.spread(name)[0] for m, c in zip(medians, points, strict=True)]
            highs = [c.spread(name)[1] - m for m, c in zip(medians, points, strict=True)]
            ax.errorbar(
                clients,
                medians,
                yerr=[lows, highs],
                marker="o",
                capsize=3,
                label=plain(name),
                color=colour(name),
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients)
        ax.set_xticklabels([str(n) for n in clients])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(points[0].unit)
        ax.set_title(f"Scenario {title}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def backoff(comparisons: Sequence[Comparison], path: Path) -> None:
    """Scenario 3b: goodput, failures and p99 latency of each backoff setting."""
    sweeps = sorted((c for c in comparisons if c.key == "backoff"), key=lambda c: c.clients)
    if not sweeps:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    metrics = (
        ("goodput", "committed/s", 1),
        ("failed_share", "failed after 10 attempts, %", 100),
        ("p99_ms", "p99 latency, ms", 1),
    )
    width = 0.8 / len(sweeps)
    for ax, (attribute, label, scale) in zip(axes, metrics, strict=True):
        for offset, sweep in enumerate(sweeps):
            names = list(sweep.runs)
            values = [sweep.median(n, attribute) * scale for n in names]
            xs = [i + (offset - (len(sweeps) - 1) / 2) * width for i in range(len(names))]
            ax.bar(
                xs,
                [0 if math.isnan(v) else v for v in values],
                width,
                label=f"{sweep.clients} clients",
            )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_backoff_label(n) for n in names], fontsize=7)
        ax.set_xlabel("wait_initial, wait_max (s)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Backoff settings on hot SERIALIZABLE transfers (medians)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _backoff_label(variant: str) -> str:
    if variant.startswith("pgbench"):
        return "pgbench\n(at once)"
    return plain(variant).replace("flask-txn wait_initial=", "").replace(" wait_max=", "\n")


def draw(comparisons: Sequence[Comparison], folder: Path) -> list[Path]:
    """Every plot of the run into ``folder``; the paths written."""
    main = [
        c
        for c in comparisons
        if c.key == "overhead"
        or (c.key in ("cold", "serializable", "read-committed") and c.clients == MAIN_CLIENTS)
    ]
    written = []
    if main:
        written.append(folder / "goodput.png")
        goodput_bars(main, written[-1])
    if any(c.key in ("cold", "serializable") for c in comparisons):
        written.append(folder / "scaling.png")
        scaling(comparisons, written[-1])
    if any(c.key == "backoff" for c in comparisons):
        written.append(folder / "backoff.png")
        backoff(comparisons, written[-1])
    return written
