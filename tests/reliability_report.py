"""The tables of docs/reliability.md, made from a full run's report file.

``FLASK_TXN_RELIABILITY_REPORT=FILE`` makes ``tests/test_reliability.py`` write one
JSON line per case (``Run.figures``); this prints the page's tables from them::

    python -m tests.reliability_report docs/benchmarks/reliability/report.jsonl

and ``tests/test_docs.py`` checks that the page holds exactly these tables for
the committed file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: The endpoint each case ran against, by its isolation level.
ISOLATION = {"/transfers": "SERIALIZABLE", "/transfers/locked": "READ COMMITTED"}
#: How the report's names of what was retried or given up read in the tables.
KINDS = {
    "connection-lost": "connection lost",
    "no-connection": "no connection",
    "ambiguous-commit": "ambiguous commit",
    "sqlstate-57014": "57014 (statement timeout)",
}


def load(path: Path) -> list[dict[str, Any]]:
    """The report's cases, in the order they ran."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def tables(cases: list[dict[str, Any]]) -> str:
    """The four tables, as the page shows them."""
    return "\n\n".join([_violations(cases), _transfers(cases), _no_fault(cases), _faults(cases)])


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(header: tuple[str, ...], rows: list[str]) -> str:
    return "\n".join([_row(*header), _row(*["---"] * len(header)), *rows])


def _counts(counts: Mapping[str, int], name: Callable[[str], str] = str) -> str:
    """``{"a": 1200, "b": 3}`` as ``1,200 a, 3 b``, largest first; ``0`` if empty."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{count:,} {name(key)}" for key, count in ordered) or "0"


def _kind(key: str) -> str:
    return KINDS.get(key, key.removeprefix("sqlstate-"))


def _times(counts: Mapping[str, int]) -> str:
    """``{"503 timeout": 3}`` as ``3 × 503 timeout``, largest first; ``0`` if empty."""  # noqa: RUF002
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{count:,} × {answer}" for answer, count in ordered) or "0"  # noqa: RUF001


def _answers(case: dict[str, Any]) -> str:
    return _times({k: n for k, n in case["responses"].items() if not k.startswith("2")})


def _violations(cases: list[dict[str, Any]]) -> str:
    checks = cases[0]["violations"]
    rows = [_row(check, sum(case["violations"][check] for case in cases)) for check in checks]
    return _table(("Check", f"Violations, all {len(cases)} cases"), rows)


def _transfers(cases: list[dict[str, Any]]) -> str:
    rows = []
    for case in cases:
        given_up = case["transfers"] - case["committed"]
        finals = {k: n for k, n in case["final"].items() if not k.startswith("2")}
        rows.append(
            _row(
                case["case"],
                case["server"],
                ISOLATION[case["endpoint"]],
                f"{case['transfers']:,}",
                f"{case['committed']:,}",
                f"{given_up:,}" + (f" ({_times(finals)})" if finals else ""),
                f"{case['requests']:,}",
                case["transfers_per_second"],
                f"{case['max_latency']} s ({case['latency_bound']:g} s)",
            )
        )
    header = (
        "Case",
        "Server",
        "Isolation",
        "Transfers",
        "Committed",
        "Given up (final answer)",
        "Requests",
        "Transfers/s",
        "Slowest answer (bound)",
    )
    return _table(header, rows)


def _no_fault(cases: list[dict[str, Any]]) -> str:
    rows = [
        _row(
            case["case"],
            case["server"],
            ISOLATION[case["endpoint"]],
            _counts(case["retried"], _kind),
            _answers(case),
        )
        for case in cases
        if not case["faults"]
    ]
    return _table(("Case", "Server", "Isolation", "Attempts retried", "Error answers"), rows)


def _faults(cases: list[dict[str, Any]]) -> str:
    rows = []
    for case in cases:
        if not case["faults"]:
            continue
        faults = _counts(case["faults"])
        if case["watchdog_fired"]:
            faults += f"; the read watchdog fired {case['watchdog_fired']:,} times"
        rows.append(
            _row(
                case["case"],
                ISOLATION[case["endpoint"]],
                faults,
                _counts(case["retried"], _kind),
                _counts(case["failed"], _kind),
                _answers(case),
                _counts(case["ambiguous_outcomes"]) if case["ambiguous_outcomes"] else "–",  # noqa: RUF001
            )
        )
    header = (
        "Case",
        "Isolation",
        "Faults injected",
        "Attempts retried",
        "Attempts given up",
        "Error answers",
        "Each 502 turned out",
    )
    return _table(header, rows)


if __name__ == "__main__":
    print(tables(load(Path(sys.argv[1]))))
