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

from benchmarks import loadgen, results, workload
from benchmarks import runs as saved_runs
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
