"""The benchmark harness keeps working: its smoke run, and the pieces that make it fair.

No figure is asserted: speed on a shared machine is not a test result.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import crowd, loadgen, results, workload
from benchmarks import runs as saved_runs
from benchmarks.overhead import FSA_ATOMIC
from benchmarks.results import Comparison, Run

from . import pgserver, reliability_report

ROOT = Path(__file__).resolve().parent.parent


def test_flask_txn_runs_the_statements_of_the_pgbench_scripts() -> None:
    """Both sides of a comparison run the same SQL: flask-txn's statements are the
    script's lines between BEGIN and COMMIT, at the level BEGIN names."""
    for name in workload.SCRIPTS:
        ours = workload.script(name)
        lines = [
            line
            for line in ours.path.read_text().splitlines()
            if line and not line.startswith(("--", "\\set"))
        ]
        assert lines[0] == f"BEGIN ISOLATION LEVEL {ours.isolation};"
        assert lines[-1] == "COMMIT;"
        assert [f"{sql};" for sql in ours.statements] == lines[1:-1]


def test_pick_draws_two_different_accounts_in_range() -> None:
    """Transfers are drawn as the scripts' \\set lines draw them."""
    rng = random.Random(0)
    for naccts in (2, 10, 1000):
        for _ in range(500):
            params = loadgen.pick(rng, naccts)
            assert 1 <= params["a"] <= naccts
            assert 1 <= params["b"] <= naccts
            assert params["a"] != params["b"]
            assert 1 <= params["amt"] <= 100


def test_ratio_is_the_median_of_paired_runs() -> None:
    """Each round's ratio pairs runs made side by side; the table shows their median."""
    comparison = Comparison(
        "x",
        "X",
        8,
        "committed/s",
        {
            "anchor": [Run(100, 1.0), Run(200, 1.0), Run(50, 1.0)],
            "other": [Run(110, 1.0), Run(180, 1.0), Run(100, 1.0)],
        },
    )
    assert comparison.ratio("other") == pytest.approx(1.1)
    assert comparison.spread("other") == (100, 180)
    assert "| other | 110 | 100-180 | 1.100 |" in results.markdown([comparison])
    assert results.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0


def test_report_orders_the_scenarios_and_ends_with_the_paired_scaling() -> None:
    """The report: scenarios at 8 clients, then scaling, then 5b (paired 8 against 32)."""

    def comparison(key: str, clients: int, names: tuple[str, ...]) -> Comparison:
        runs = {name: [Run(100, 1.0), Run(90, 1.0)] for name in names}
        return Comparison(key, f"title of {key} at {clients}", clients, "committed/s", runs)

    report = results.report(
        [
            comparison("paired", 32, ("8 clients", "32 clients")),
            comparison("serializable", 8, ("pgbench", "flask-txn")),
            comparison("serializable", 32, ("pgbench", "flask-txn")),
        ]
    )
    positions = [
        report.index(text)
        for text in ("title of serializable at 8", "## 5. Scaling", "title of paired at 32")
    ]
    assert positions == sorted(positions)
    assert "title of serializable at 32" not in report  # only in the scaling table


@pytest.mark.postgresql_only
def test_smoke_run_writes_every_scenario(tmp_path: Path) -> None:
    """``python -m benchmarks --smoke`` runs scenarios 1 to 5 and writes tables, JSON and plots."""
    pytest.importorskip("flask_sqlalchemy", reason="the dev extra is not installed")
    pytest.importorskip("matplotlib", reason="the dev extra is not installed")
    try:
        pgserver.find_bindir()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", f"--out={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    facts, comparisons = results.load(tmp_path / "results.json")
    assert facts["postgresql_settings"]["deadlock_timeout"] == "100ms"
    assert facts["cores"] >= 1
    keys = {(c.key, c.clients) for c in comparisons}
    assert {("overhead", 1), ("noop", 1), ("cold", 8), ("serializable", 8)} <= keys
    assert {("read-committed", 8), ("cold", 2), ("serializable", 2), ("backoff", 2)} <= keys
    for comparison in comparisons:
        for runs in comparison.runs.values():
            assert runs
            # Every variant got work done and nothing but conflicts went wrong.
            assert all(run.committed > 0 and run.errors == 0 for run in runs), comparison.key
    assert any(c.key == "serializable" and c.anchor.startswith("pgbench") for c in comparisons)
    report = (tmp_path / "results.md").read_text()
    assert "deadlock_timeout=100ms" in report
    # A table per scenario at its concurrency and per backoff sweep; scaling in a table
    # per variant run at every client count: pgbench and flask-txn in scenario 2, and
    # flask-txn with the bounded pool too in scenario 3.
    tables = [
        c
        for c in comparisons
        if c.key in ("overhead", "async", "noop", "backoff") or c.clients == 8
    ]
    assert report.count("| variant |") == len(tables)
    assert "1c. Overhead in an async view" in report  # every scenario the run made is reported
    assert "3c. Where the lead on hot rows comes from" in report
    (lead,) = [c for c in comparisons if c.key == "lead"]
    assert all(run.in_transaction >= 0 for runs in lead.runs.values() for run in runs)
    assert report.count("| clients | rounds |") == 5
    assert "| hand-written again (the noise floor) |" in report
    assert "pool of 1 x cores |" in report
    for plot in ("goodput.png", "scaling.png", "backoff.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["facts"]["mode"] == "smoke"


def test_restructure_figures_come_from_the_saved_runs() -> None:
    """docs/performance.md's before/after table of the restructure holds the medians
    that ``python -m benchmarks.runs`` computes from the committed runs."""
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    saved = ROOT / "docs" / "benchmarks" / "restructure"
    for side, commit in (("before", "572ccc4"), ("after", "704ad8e")):
        table = saved_runs.ratios(sorted(saved.glob(f"{side}-*")))
        row = [
            f"{statistics.median(table[key]):.3f}"
            for key in (
                ("overhead", "flask-txn `@atomic`"),
                ("overhead", "hand-written again (the noise floor)"),
                ("noop", "flask-txn `@atomic`"),
            )
        ]
        assert f"| {side} (`{commit}`) | {' | '.join(row)} |" in page


def test_nplusone_cost_figures_come_from_the_saved_runs() -> None:
    """docs/nplusone.md's cost table holds the medians of the committed runs."""
    page = (ROOT / "docs" / "nplusone.md").read_text(encoding="utf-8")
    table = saved_runs.ratios(sorted((ROOT / "docs" / "benchmarks").glob("nplusone-*")))
    for variant, row in (
        ("flask-txn `@atomic`", "flask-txn `@atomic`"),
        (
            "flask-txn `@atomic`, N+1 guard on (`TXN_NPLUSONE='warn'`)",
            "flask-txn `@atomic`, N+1 guard on",
        ),
    ):
        assert f"| {row} | {statistics.median(table[('overhead', variant)]):.3f} |" in page


def test_overhead_figures_come_from_the_eight_saved_runs() -> None:
    """The Performance page's scenario 1 figures (ranges and medians) are those of the
    saved runs of the current core: docs/benchmarks/restructure/after-* and nplusone-*."""
    page = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    saved = ROOT / "docs" / "benchmarks"
    folders = sorted((saved / "restructure").glob("after-*")) + sorted(saved.glob("nplusone-*"))
    table = saved_runs.ratios(folders)
    assert len(folders) == 8

    def described(variant: str) -> str:
        values = table[("overhead", variant)]
        return f"{min(values):.3f} and {max(values):.3f} of the hand-written code, median" + (
            f" {statistics.median(values):.3f}"
        )

    assert f"between {described('flask-txn `@atomic`')}," in page
    for variant in (
        "hand-written again (the noise floor)",
        "Flask-SQLAlchemy `db.session` + `commit()`",
    ):
        values = table[("overhead", variant)]
        assert (
            f"from {min(values):.3f} to {max(values):.3f} (median {statistics.median(values):.3f})"
            in page
        )
    lean = table[("overhead", "flask-txn `@atomic`, `pool_pre_ping=False`")]
    assert f"({min(lean):.3f} to {max(lean):.3f} in the eight saved runs)" in page


def test_async_page_table_is_the_saved_run() -> None:
    """docs/async.md's cost table is the saved run of ``python -m benchmarks.async_views``."""
    page = (ROOT / "docs" / "async.md").read_text(encoding="utf-8")
    saved = json.loads((ROOT / "docs" / "benchmarks" / "async" / "results.json").read_text())
    for variant, row in saved.items():
        line = (
            f"| {variant} | {row['rate_1']:,.0f} | {row['rate_n']:,.0f} | {row['connects']:.2f} |"
        )
        assert line in page


def test_scaling_page_table_is_the_saved_run() -> None:
    """docs/scaling.md's table is the saved run of ``python -m benchmarks.replicas``."""
    page = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    saved = json.loads((ROOT / "docs" / "benchmarks" / "replicas" / "results.json").read_text())
    for variant, row in saved.items():
        line = (
            f"| {variant} | {row['rate']:,.0f} | {row['ratio']:.2f} | {row['standby_share']:.0%} |"
        )
        assert line in page


def test_hot_lead_table_comes_from_the_saved_run() -> None:
    """docs/performance.md's scenario 3c table holds the medians of the saved run."""
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    _, comparisons = results.load(ROOT / "docs" / "benchmarks" / "hot-lead" / "results.json")
    (lead,) = [c for c in comparisons if c.key == "lead"]
    rows = dict(
        zip(
            lead.runs,
            [
                "pgbench, 8 connections",
                "pgbench, 2 connections (1 x cores)",
                "flask-txn, a connection per client",
                "flask-txn, pool of 1 x cores",
                "flask-txn, a connection per client, retrying at once",
            ],
            strict=True,
        )
    )
    for variant, label in rows.items():
        line = (
            f"| {label} | {lead.median(variant):,.0f} | {lead.ratio(variant):.3f}"
            f" | {lead.median(variant, 'failed_share'):.1%}"
            f" | {lead.median(variant, 'in_transaction'):.1f} |"
        )
        assert line in page, line


def test_reliability_tables_are_the_saved_full_run() -> None:
    """docs/reliability.md's figures of the last full run are the tables that
    ``python -m tests.reliability_report`` makes from the committed report."""
    page = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    saved = reliability_report.load(ROOT / "docs" / "benchmarks" / "reliability" / "report.jsonl")
    assert (len(saved), sum(case["transfers"] for case in saved)) == (14, 280_000)
    for table in reliability_report.tables(saved).split("\n\n"):
        assert table in page


def _shows(text: str, value: float) -> bool:
    """Whether ``text`` (a figure as a page prints it: ``1,493 ms``, ``0.3%``,
    ``662/s``) is ``value`` rounded to the digits the page shows."""
    number = text.removesuffix(" ms").removesuffix("/s").replace(",", "")
    if number.endswith("%"):
        number, value = number[:-1], value * 100
    digits = len(number.partition(".")[2])
    return abs(float(number) - value) <= 0.5 * 10**-digits + 1e-9


def _table_rows(page: str, header: str) -> list[list[list[str]]]:
    """The rows of each table whose header line is ``header``, in page order,
    each row as its cells."""
    tables = []
    for part in page.split(header + "\n")[1:]:
        lines = part.split("\n\n")[0].splitlines()[1:]  # after the --- line
        tables.append([[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines])
    return tables


def test_backoff_sweeps_come_from_the_saved_runs() -> None:
    """docs/performance.md's four backoff tables, and the failure shares and p99s
    that its prose quotes from them, are the medians of the four saved runs."""
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    saved = ROOT / "docs" / "benchmarks"
    folders = [saved, saved / "full-437f78e", saved / "full-2fc7c60", saved / "backoff"]
    tables = _table_rows(
        page, "| `wait_initial`, `wait_max` | 2 clients | 8 clients | 32 clients |"
    )
    assert len(tables) == len(folders)
    sweeps = []
    for folder, rows in zip(folders, tables, strict=True):
        _, comparisons = results.load(folder / "results.json")
        sweep = {c.clients: c for c in comparisons if c.key == "backoff"}
        sweeps.append(sweep)
        assert len(rows) == 6, folder
        for label, *cells in rows:
            label = label.strip("*")
            waits = label.split(" (")[0]
            for clients, cell in zip((2, 8, 32), cells, strict=True):
                comparison = sweep[clients]
                variant = (
                    comparison.anchor
                    if label.startswith("pgbench")
                    else "flask-txn `wait_initial={}, wait_max={}`".format(*waits.split(", "))
                )
                shown = cell.split("; ")
                figures = [
                    comparison.median(variant),
                    comparison.median(variant, "failed_share"),
                    comparison.median(variant, "retries_per_commit"),
                    comparison.median(variant, "p99_ms"),
                ]
                for text, value in zip(shown, figures, strict=True):
                    assert _shows(text, value), (folder.name, label, clients, text, value)
    prose = " ".join(page.split())

    def each(initial: str, clients: int, attribute: str) -> list[float]:
        variant = f"flask-txn `wait_initial={initial}, wait_max=1`"
        return [sweep[clients].median(variant, attribute) for sweep in sweeps]

    for initial, ms in (("0.01", 10), ("0.02", 20)):
        *first, last = (f"{share:.1%}" for share in each(initial, 32, "failed_share"))
        assert f"with {ms} ms, {', '.join(first)} and {last}" in prose
    assert max(each("0.05", 32, "failed_share")) == 0.0  # "with 50 ms, none"
    # "At 2 clients it committed the most of flask-txn's settings in three of the
    # four sweeps (not at `2fc7c60`)"
    at_once_best = [
        max(list(sweep[2].runs)[1:], key=sweep[2].median)
        == "flask-txn `wait_initial=0, wait_max=0`"
        for sweep in sweeps
    ]
    assert at_once_best == [True, True, False, True]
    ranges = [
        f"{min(p99s):.0f}-{max(p99s):.0f} ms"
        for p99s in (each(initial, 2, "p99_ms") for initial in ("0.01", "0.02", "0.05"))
    ]
    assert f"from {ranges[0]} (10 ms) to {ranges[1]} (20 ms) and {ranges[2]} (50 ms)" in prose


def test_paired_figures_come_from_the_saved_runs() -> None:
    """The 5b table of docs/performance.md and the paired figures that it and
    docs/retries.md quote are those of docs/benchmarks/paired-32 (and -2x-cores)."""
    saved = ROOT / "docs" / "benchmarks"
    _, comparisons = results.load(saved / "paired-32" / "results.json")
    paired = {
        c.title.split(":")[0].removeprefix("5b. "): c for c in comparisons if c.key == "paired"
    }
    ser = "`transfer_ser.sql`, `--max-tries=10`"
    atomic = "flask-txn `@atomic(isolation='SERIALIZABLE', retries=9)`"
    labels = {
        "hot: pgbench, retries at once": paired[f"pgbench {ser}"],
        "hot: flask-txn, a connection per client": paired[atomic],
        "hot: flask-txn, pool of 1 x cores": paired[f"{atomic}, pool of 1 x cores"],
        "cold: pgbench": paired["pgbench `transfer_rc_plain.sql`"],
        "cold: flask-txn": paired["flask-txn `@atomic(isolation='READ COMMITTED')`"],
    }
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    (rows,) = _table_rows(
        page,
        "| variant | 8 clients | 32 clients | share kept | failed at 32"
        " | retries/commit at 32 | p99 at 32 |",
    )
    assert [row[0] for row in rows] == list(labels)
    for label, *cells in rows:
        c = labels[label]
        figures = [
            c.median("8 clients"),
            c.median("32 clients"),
            c.ratio("32 clients"),
            c.median("32 clients", "failed_share"),
            c.median("32 clients", "retries_per_commit"),
            c.median("32 clients", "p99_ms"),
        ]
        for text, value in zip(cells, figures, strict=True):
            assert _shows(text, value), (label, text, value)
    _, comparisons = results.load(saved / "paired-32-2x-cores" / "results.json")
    (double,) = [c for c in comparisons if c.key == "paired" and "2 x cores" in c.title]
    bounded = labels["hot: flask-txn, pool of 1 x cores"]
    retries = " ".join((ROOT / "docs" / "retries.md").read_text(encoding="utf-8").split())
    for text in (
        f"kept {bounded.ratio('32 clients'):.2f} of its 8-client goodput at 32 clients",
        f"{bounded.median('8 clients'):,.0f}/s, then {bounded.median('32 clients'):,.0f}/s",
        f"a p99 of {bounded.median('32 clients', 'p99_ms'):,.0f} ms at 32 clients",
        f"it kept {labels['hot: flask-txn, a connection per client'].ratio('32 clients'):.2f},",
        f"as cores kept {double.ratio('32 clients'):.2f}",
        f"({double.median('32 clients', 'retries_per_commit'):.2f} retries per commit at 32"
        f" clients against {bounded.median('32 clients', 'retries_per_commit'):.2f} with one",
    ):
        assert text in retries, text
    prose = " ".join(page.split())
    assert (
        f"kept {double.ratio('32 clients'):.2f} with it ({double.median('8 clients'):,.0f}/s,"
        f" then {double.median('32 clients'):,.0f}/s, p99"
        f" {double.median('32 clients', 'p99_ms'):,.0f} ms)" in prose
    )


def test_overhead_cost_in_microseconds_comes_from_the_eight_saved_runs() -> None:
    """The Performance page's "about N µs of its M ms" is the medians over the eight
    saved runs of what @atomic adds to a request and of a hand-written request."""
    page = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    saved = ROOT / "docs" / "benchmarks"
    folders = sorted((saved / "restructure").glob("after-*")) + sorted(saved.glob("nplusone-*"))
    added, request = [], []
    for folder in folders:
        _, comparisons = results.load(folder / "results.json")
        (overhead,) = [c for c in comparisons if c.key == "overhead"]
        hand = 1e6 / overhead.median(overhead.anchor)
        added.append(1e6 / overhead.median("flask-txn `@atomic`") - hand)
        request.append(hand)
    micro = round(statistics.median(added), -1)
    milli = statistics.median(request) / 1000
    assert f"about {micro:.0f} µs of its {milli:.1f} ms or so" in page
    assert f"one row, about {micro:.0f} µs (median of eight saved runs" in page


def test_nplusone_run_by_run_figures_come_from_the_saved_runs() -> None:
    """docs/nplusone.md's run-by-run ratios are those of nplusone-1 to -3."""
    page = " ".join((ROOT / "docs" / "nplusone.md").read_text(encoding="utf-8").split())
    table = saved_runs.ratios(sorted((ROOT / "docs" / "benchmarks").glob("nplusone-*")))
    pairs = zip(
        table[("overhead", "flask-txn `@atomic`")],
        table[("overhead", "flask-txn `@atomic`, N+1 guard on (`TXN_NPLUSONE='warn'`)")],
        strict=True,
    )
    *first, last = (f"{off:.3f} and {on:.3f}" for off, on in pairs)
    assert f"Run by run the two rows are {', '.join(first)}, {last}:" in page


def test_scenario_prose_comes_from_the_full_run() -> None:
    """The figures that docs/performance.md's sections 2 to 5 quote in prose are
    the medians and ratios of the full run in docs/benchmarks/results.json."""
    page = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    _, comparisons = results.load(ROOT / "docs" / "benchmarks" / "results.json")
    at = {(c.key, c.clients): c for c in comparisons}
    cold, hot, locks = at[("cold", 8)], at[("serializable", 8)], at[("read-committed", 8)]
    lean, bounded, ordered, shuffled_updates, pg_plain = (
        list(cold.runs)[2],
        list(hot.runs)[2],
        *list(locks.runs)[1:],
    )
    atomic_cold, atomic_hot = list(cold.runs)[1], list(hot.runs)[1]
    for text in (
        f"pgbench commits about {cold.median(cold.anchor):,.0f} transfers/s",
        f"a ratio of {cold.ratio(atomic_cold):.3f}",
        f"changes little here ({cold.median(lean):,.0f}/s)",
        f"flask-txn commits {hot.median(atomic_hot):.0f} transfers/s with none failed,"
        f" {hot.median(atomic_hot, 'retries_per_commit'):.2f} retries per commit and a p99"
        f" of {hot.median(atomic_hot, 'p99_ms'):.0f} ms",
        f"pgbench commits {hot.median(hot.anchor):.0f}/s, and"
        f" {hot.median(hot.anchor, 'failed_share'):.0%} of its transfers fail after 10"
        f" attempts, with {hot.median(hot.anchor, 'retries_per_commit'):.2f} retries",
        f"flask-txn commits {hot.median(bounded):.0f}/s, {hot.ratio(bounded):.1f} times"
        f" pgbench, with {hot.median(bounded, 'retries_per_commit'):.2f} retries per commit"
        f" and a p99 of {hot.median(bounded, 'p99_ms'):.0f} ms",
        f"commits {locks.median(locks.anchor):,.0f}/s; flask-txn with `lock_rows`"
        f" {locks.median(ordered):.0f}/s (ratio {locks.ratio(ordered):.2f})",
        f"with a p99 of {locks.median(ordered, 'p99_ms'):.0f} ms",
        f"That variant commits {locks.median(shuffled_updates):.0f}/s with a p99 of"
        f" {locks.median(shuffled_updates, 'p99_ms'):.0f} ms",
        f"retrying at once, commits {locks.median(pg_plain):.0f}/s",
    ):
        assert text in page, text
    cold32, hot1, hot32 = at[("cold", 32)], at[("serializable", 1)], at[("serializable", 32)]
    for text in (
        f"fell to {at[('cold', 16)].median(atomic_cold):.0f}/s at 16 and"
        f" {cold32.median(atomic_cold):.0f}/s at 32 clients"
        f" ({cold32.median(atomic_cold) / cold.median(atomic_cold):.2f} of its 8-client"
        f" goodput; pgbench {cold32.median(cold.anchor) / cold.median(cold.anchor):.2f})",
        f"{hot1.median(hot.anchor):,.0f}/s at 1 client, {hot.median(hot.anchor):.0f}/s at 8"
        f" and {hot32.median(hot.anchor):.0f}/s at 32, where"
        f" {hot32.median(hot.anchor, 'failed_share'):.0%} of its transfers fail",
        f"keeps {hot32.median(atomic_hot):.0f}/s at 32 clients,"
        f" {hot32.median(atomic_hot) / hot.median(atomic_hot):.2f} of its 8-client goodput,"
        f" with {hot32.median(atomic_hot, 'failed_share'):.1%} failing and a p99 of"
        f" {hot32.median(atomic_hot, 'p99_ms') / 1000:.1f} s",
        f"commits {hot32.median(bounded):.0f}/s at 32 clients,"
        f" {hot32.median(bounded) / hot.median(bounded):.2f} of its goodput at 8 clients and"
        f" {hot32.median(bounded) / hot32.median(hot.anchor):.0f} times pgbench's",
        f"with none failing and a p99 of {hot32.median(bounded, 'p99_ms'):.0f} ms",
    ):
        assert text in page, text


def test_async_page_prose_comes_from_the_saved_run() -> None:
    """The rates docs/async.md compares in prose are those of the saved run."""
    page = " ".join((ROOT / "docs" / "async.md").read_text(encoding="utf-8").split())
    saved = json.loads((ROOT / "docs" / "benchmarks" / "async" / "results.json").read_text())
    sync, pooled, nullpool, _, hand = saved.values()
    for text in (
        f"(1/{nullpool['rate_1']:.0f} s against 1/{pooled['rate_1']:.0f} s)",
        f"from {nullpool['rate_n']:.0f} to {pooled['rate_n']:.0f} requests/s",
        f"({pooled['rate_1']:.0f} against {sync['rate_1']:.0f} requests/s)",
        f"({pooled['rate_n']:.0f} against {sync['rate_n']:.0f})",
        f"({nullpool['rate_1']:.0f} and {hand['rate_1']:.0f} requests/s from one thread,"
        f" {nullpool['rate_n']:.0f} and {hand['rate_n']:.0f} from four)",
    ):
        assert text in page, text
    cost_ms = 1000 / nullpool["rate_1"] - 1000 / pooled["rate_1"]
    assert f"about {cost_ms:.0f} ms here" in page


def test_cold_paired_shares_come_from_the_three_saved_paired_runs() -> None:
    """docs/performance.md's shares of the 8-client goodput that cold transfers keep
    at 32 clients span the full run's 5b and the two 10-round paired runs."""
    page = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    saved = ROOT / "docs" / "benchmarks"
    kept: dict[str, list[float]] = {"flask-txn": [], "pgbench": []}
    for folder in (saved, saved / "paired-32", saved / "paired-32-2x-cores"):
        _, comparisons = results.load(folder / "results.json")
        for c in comparisons:
            if c.key == "paired" and "cold" in c.title:
                kept[c.title.removeprefix("5b. ").split()[0]].append(c.ratio("32 clients"))
    ours, theirs = kept["flask-txn"], kept["pgbench"]
    assert (len(ours), len(theirs)) == (3, 3)
    assert (
        f"cold transfers of flask-txn keep {min(ours):.2f} to {max(ours):.2f}"
        f" (pgbench's {min(theirs):.2f} to {max(theirs):.2f})" in page
    )


FSA_COMMIT = "Flask-SQLAlchemy `db.session` + `commit()`"


def test_adopted_flask_sqlalchemy_figures_come_from_the_saved_runs() -> None:
    """docs/performance.md's figures for Flask-SQLAlchemy with @atomic (db=db) are the
    paired ratios of the runs in docs/benchmarks/adopt-*."""
    page = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    folders = sorted((ROOT / "docs" / "benchmarks").glob("adopt-*"))
    adopted, plain = [], []
    for folder in folders:
        _, comparisons = results.load(folder / "results.json")
        overhead = next(c for c in comparisons if c.key == "overhead")
        adopted.append(overhead.ratio(FSA_ATOMIC, against=FSA_COMMIT))
        plain.append(overhead.ratio("flask-txn `@atomic`"))
    assert len(folders) == 4
    assert f"put it at {', '.join(f'{r:.3f}' for r in adopted)} of the same app" in page
    assert f"came out at {', '.join(f'{r:.3f}' for r in plain)} of the hand-written" in page


@pytest.mark.parametrize(
    ("folder", "prefix", "hand_tuned", "hand_label"),
    [
        ("crowd", "", crowd.HAND_TUNED, "pool of 1 x cores"),
        ("crowd-http", "over HTTP, ", crowd.HTTP_HAND_TUNED, "pool of 1 per worker"),
    ],
)
def test_crowd_tables_come_from_the_saved_runs(
    folder: str, prefix: str, hand_tuned: str, hand_label: str
) -> None:
    """docs/performance.md's scenario 6 tables hold the medians of the saved runs
    (committed/s; failed over all rounds; p99)."""
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    rows = crowd.load(ROOT / "docs" / "benchmarks" / folder)
    labels = {
        crowd.DEFAULTS: "**flask-txn, default settings**",
        crowd.ADMISSION_OFF: "the same, `TXN_ADMISSION=False`",
        hand_tuned: f"hand-tuned: {hand_label}, `retries=9`, admission off",
        crowd.PGBENCH: "pgbench `--max-tries=10`",
    }
    for naccts, title in ((10, "10 accounts"), (2, "2 accounts (one hot spot)")):
        chosen = [row for row in rows if row.naccts == naccts and crowd.PGBENCH in row.runs]
        assert [row.clients for row in chosen] == [8, 32, 64, 128]
        assert f"| {prefix}{title} | 8 clients | 32 clients | 64 clients | 128 clients |" in page
        for variant, label in labels.items():
            cells = []
            for row in chosen:
                failed = sum(run.failed for run in row.runs[variant])
                share = failed / (failed + sum(run.committed for run in row.runs[variant]))
                cells.append(
                    f"{row.median(variant, 'goodput'):,.0f}; {f'{share:.1%}' if failed else '0%'};"
                    f" {row.median(variant, 'p99_ms'):,.0f} ms"
                )
            line = f"| {label} | {' | '.join(cells)} |"
            assert line in page, line


def test_crowd_target_figures_come_from_the_saved_run() -> None:
    """The 64-client target in docs/performance.md: the default settings at 64 clients
    against the hand-tuned pool at 8, on 10 accounts, from docs/benchmarks/crowd-target."""
    page = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    rows = crowd.load(ROOT / "docs" / "benchmarks" / "crowd-target")
    (at_8,) = [row for row in rows if (row.naccts, row.clients) == (10, 8)]
    (at_64,) = [row for row in rows if (row.naccts, row.clients) == (10, 64)]
    ours = [run.goodput for run in at_64.runs[crowd.DEFAULTS]]
    theirs = [run.goodput for run in at_8.runs[crowd.HAND_TUNED]]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    figures = (
        f"committed {at_64.median(crowd.DEFAULTS, 'goodput'):,.0f}/s at 64 clients with none"
        f" failed and a p99 of {at_64.median(crowd.DEFAULTS, 'p99_ms'):,.0f} ms, against"
        f" {at_8.median(crowd.HAND_TUNED, 'goodput'):,.0f}/s for the hand-tuned pool at 8"
        f" clients: {statistics.median(ours) / statistics.median(theirs):.2f} of it (the median"
        f" of the per-round ratios {statistics.median(ratios):.2f}, from {min(ratios):.2f} to"
        f" {max(ratios):.2f})"
    )
    assert figures in page, figures
    assert sum(run.failed for run in at_64.runs[crowd.DEFAULTS]) == 0
