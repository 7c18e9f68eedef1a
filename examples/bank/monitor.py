"""What the bank shows about itself: counters fed by flask-txn's signals, and an outbox.

Each app gets one :class:`Monitor`, kept in ``app.extensions["bank"]``. Its
receivers are connected for that app only (``sender=app``). blinker holds them
weakly, so they go away with the app.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from flask import Flask, current_app

from flask_txn import transaction_committed, transaction_retrying, transaction_rolled_back

#: How many notifications the outbox keeps.
OUTBOX_SIZE = 20
#: The endpoints that only read (the page's balances and the ledger): counted apart,
#: by the server they read, so that the counters show the transfers alone.
READS = frozenset({"bank.stats", "bank.ledger"})


class Monitor:
    """Counts of commits, replays, retries and final rollbacks per endpoint, and recent
    notifications."""

    def __init__(self, app: Flask) -> None:
        # Receivers run in the request's thread: several at once under a threaded server.
        self._lock = threading.Lock()
        self.committed: collections.Counter[str] = collections.Counter()
        #: endpoint -> requests answered with a stored result (a repeated idempotency
        #: key): their read-only transactions commit, but they moved no money.
        self.replayed: collections.Counter[str] = collections.Counter()
        #: (endpoint, SQLSTATE) -> re-runs
        self.retried: collections.Counter[tuple[str, str]] = collections.Counter()
        #: (endpoint, SQLSTATE, or the reason when there is none) -> final rollbacks
        self.rolled_back: collections.Counter[tuple[str, str]] = collections.Counter()
        self.outbox: collections.deque[str] = collections.deque(maxlen=OUTBOX_SIZE)
        #: server ("primary", or a standby's URL) -> reads of the page and the ledger
        self.reads: collections.Counter[str] = collections.Counter()
        transaction_committed.connect(self.on_committed, sender=app)
        transaction_retrying.connect(self.on_retrying, sender=app)
        transaction_rolled_back.connect(self.on_rolled_back, sender=app)

    def on_committed(
        self, app: Flask, *, endpoint: str | None, replayed: bool, server: str, **extra: Any
    ) -> None:
        if endpoint in READS:
            with self._lock:
                self.reads[server] += 1
            return
        # A replay (@idempotent answered from its table) commits, but moved no money.
        counter = self.replayed if replayed else self.committed
        with self._lock:
            counter[endpoint or "-"] += 1

    def on_retrying(
        self, app: Flask, *, endpoint: str | None, sqlstate: str | None, **extra: Any
    ) -> None:
        with self._lock:
            self.retried[endpoint or "-", sqlstate or "-"] += 1

    def on_rolled_back(
        self,
        app: Flask,
        *,
        endpoint: str | None,
        reason: str,
        sqlstate: str | None,
        **extra: Any,
    ) -> None:
        if reason == "retry":
            return  # counted by on_retrying: another attempt follows
        with self._lock:
            # "veto" (an error response) and plain errors have no SQLSTATE.
            self.rolled_back[endpoint or "-", sqlstate or reason] += 1

    def notify(self, message: str) -> None:
        """Deliver a notification: here, the outbox the page shows and a log line."""
        self.outbox.append(message)
        current_app.logger.info("notification: %s", message)

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON: totals, then per endpoint and SQLSTATE."""
        with self._lock:
            endpoints: dict[str, dict[str, Any]] = {}
            for endpoint, count in self.committed.items():
                _row(endpoints, endpoint)["committed"] = count
            for endpoint, count in self.replayed.items():
                _row(endpoints, endpoint)["replayed"] = count
            for (endpoint, code), count in self.retried.items():
                _row(endpoints, endpoint)["retried"][code] = count
            for (endpoint, code), count in self.rolled_back.items():
                _row(endpoints, endpoint)["rolled_back"][code] = count
            return {
                "committed": sum(self.committed.values()),
                "replayed": sum(self.replayed.values()),
                "retried": sum(self.retried.values()),
                "rolled_back": sum(self.rolled_back.values()),
                "endpoints": dict(sorted(endpoints.items())),
                "outbox": list(self.outbox),
                "reads": dict(sorted(self.reads.items())),
            }


def _row(endpoints: dict[str, dict[str, Any]], endpoint: str) -> dict[str, Any]:
    return endpoints.setdefault(
        endpoint, {"committed": 0, "replayed": 0, "retried": {}, "rolled_back": {}}
    )


def monitor() -> Monitor:
    """The current app's monitor."""
    found: Monitor = current_app.extensions["bank"]
    return found


def money(cents: int) -> str:
    """An amount of whole cents as people read it: ``123456`` is ``"1,234.56"``."""
    return f"{cents // 100:,}.{cents % 100:02d}"
