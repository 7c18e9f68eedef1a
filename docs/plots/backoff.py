"""Plot the waits flask-txn's retry loop draws, with the default settings: docs/plots/backoff.png.

The docs build runs it (``docs/conf.py``); by hand: ``python docs/plots/backoff.py``.
It samples flask-txn's own backoff function, so the plot cannot drift from the code.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write a file

import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flask_txn._config import DEFAULTS, RetryPolicy
from flask_txn._retry import backoff

OUTPUT = Path(__file__).with_name("backoff.png")
SAMPLES = 20_000
#: Re-runs shown in the left panel: past the cap, every wait looks the same.
SHOWN = 8


def main(output: Path = OUTPUT) -> Path:
    """Draw both panels into ``output`` (a PNG) and return its path."""
    policy = RetryPolicy(
        retries=DEFAULTS["TXN_RETRIES"],
        wait_initial=DEFAULTS["TXN_RETRY_WAIT_INITIAL"],
        wait_max=DEFAULTS["TXN_RETRY_WAIT_MAX"],
        deadline=None,
    )
    rng = random.Random(0)  # the same picture on every build
    figure, (waits, totals) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")

    runs = range(1, SHOWN + 1)
    drawn = [[backoff(policy, n, rng.random) for _ in range(SAMPLES)] for n in runs]
    caps = [backoff(policy, n, lambda: 1.0) for n in runs]
    for n, sample in zip(runs, drawn, strict=True):
        jitter = [n + rng.uniform(-0.3, 0.3) for _ in sample[:400]]
        waits.scatter(jitter, sample[:400], s=2, alpha=0.25, color="tab:blue")
    waits.plot(runs, caps, "k_", markersize=22, label="cap: min(wait_max, wait_initial * 2^(n-1))")
    waits.plot(runs, [sum(s) / len(s) for s in drawn], "r_", markersize=22, label="mean: cap / 2")
    waits.set_xticks(list(runs))
    waits.set_xlabel("re-run n")
    waits.set_ylabel("wait before re-run n (s)")
    waits.set_title("Each wait: uniform between 0 and its cap")
    waits.legend(loc="upper left", fontsize=8)

    for retries in range(1, policy.retries + 1):
        total = sorted(
            sum(backoff(policy, n, rng.random) for n in range(1, retries + 1))
            for _ in range(SAMPLES)
        )
        share = [(i + 1) / SAMPLES for i in range(SAMPLES)]
        totals.plot(total, share, label=f"after {retries} re-run{'s' if retries > 1 else ''}")
    totals.set_xlabel("total time waited (s)")
    totals.set_ylabel("share of requests that waited at most this long")
    totals.set_title(f"Total wait, default TXN_RETRIES = {policy.retries}")
    totals.grid(alpha=0.3)
    totals.legend(loc="lower right", fontsize=8)

    figure.suptitle(
        f"flask-txn backoff with the defaults: TXN_RETRY_WAIT_INITIAL = {policy.wait_initial} s,"
        f" TXN_RETRY_WAIT_MAX = {policy.wait_max} s"
    )
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


if __name__ == "__main__":
    print(main())
