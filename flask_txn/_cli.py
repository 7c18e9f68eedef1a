"""The ``flask txn`` commands: a click group that ``init_app`` adds to the app's CLI.

``flask txn purge-idempotency-keys`` deletes the expired idempotency keys.

``flask txn check`` prints what :func:`~flask_txn._check.check` finds, as lines
or as JSON, and exits 0 when the database answers, 1 when it does not (or, with
``--strict``, when a warning fired), and 2 on a usage error (click's own).
"""

from __future__ import annotations

import dataclasses
import json

import click
from flask.cli import AppGroup

from ._check import Report, check
from ._idempotency import purge_idempotency_keys
from ._state import app_state

#: Exit status: the database cannot be reached, or a warning fired under ``--strict``.
FAILED = 1

cli = AppGroup("txn", help="flask-txn: check the app's database and transaction settings.")


@cli.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when a warning fires, too.")
def check_command(as_json: bool, strict: bool) -> None:
    """Connect to the database; report it, the settings and their risks.

    Exits with status 1 if the database cannot be reached (or, with --strict, if
    any warning fires), so that a deploy pipeline can run it. The password is
    never shown.
    """
    report = check(app_state())
    failed = report.problem is not None or (strict and bool(report.warnings))
    if as_json:
        click.echo(json.dumps(_as_dict(report, failed=failed), indent=2))
    else:
        _print(report, failed=failed)
    if failed:
        raise SystemExit(FAILED)


@cli.command("purge-idempotency-keys")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Keys deleted per transaction.",
)
def purge_command(batch_size: int) -> None:
    """Delete the expired idempotency keys, a batch per transaction; print how many.

    Run it from a scheduled job (cron, a Kubernetes CronJob) as often as the keys
    should not pile up: once an hour is plenty for the default 24-hour expiry.
    """
    deleted = purge_idempotency_keys(batch_size=batch_size)
    click.echo(f"deleted {deleted} expired idempotency key{'' if deleted == 1 else 's'}")


def _as_dict(report: Report, *, failed: bool) -> dict[str, object]:
    return {
        "ok": not failed,
        "problem": report.problem,
        "facts": report.facts,
        "warnings": [dataclasses.asdict(finding) for finding in report.warnings],
    }


def _print(report: Report, *, failed: bool) -> None:
    width = max(len(name) for name in report.facts)
    for name, value in report.facts.items():
        click.echo(f"{name:<{width}}  {value}")
    for finding in report.warnings:
        click.echo(f"warning [{finding.id}]: {finding.message} See {finding.see}.")
    count = len(report.warnings)
    warnings = f"{count} warning{'' if count == 1 else 's'}"
    if report.problem is not None:
        click.echo(f"problem: {report.problem}", err=True)
    elif failed:
        click.echo(f"failed: {warnings}, and --strict fails on any.", err=True)
    else:
        click.echo(f"ok: the database answers; {warnings}.")
