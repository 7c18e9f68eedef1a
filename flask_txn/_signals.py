"""Signals sent when the outermost atomic block commits, rolls back or retries.

The sender is the app. Receivers take ``**extra``: keys may be added later.
A receiver that raises is logged and skipped; it never affects the transaction,
the other receivers, or the retry loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from blinker import NamedSignal, Namespace

_signals = Namespace()
log = logging.getLogger("flask_txn")

transaction_committed: NamedSignal = _signals.signal("transaction-committed")
"""Sent after the outermost block's COMMIT succeeded.

Payload: ``session``, ``attempt``, ``isolation``, ``endpoint``, ``elapsed``, ``server``,
``replayed`` (True when ``@idempotent`` answered with a stored response: the
transaction only read).
"""

transaction_rolled_back: NamedSignal = _signals.signal("transaction-rolled-back")
"""Sent after an outermost block rolled back, for any reason, and when
uncommitted writes were discarded at app-context teardown (reason ``"teardown"``).

Payload: ``session``, ``attempt``, ``isolation``, ``endpoint``, ``elapsed``, ``server``,
``reason`` (``"error"``, ``"retry"``, ``"veto"`` or ``"teardown"``), ``error``,
``sqlstate``, ``exhausted``.
"""

transaction_retrying: NamedSignal = _signals.signal("transaction-retrying")
"""Sent after a retriable failure was rolled back, before the backoff sleep.

Payload: ``session``, ``attempt``, ``isolation``, ``endpoint``, ``elapsed``, ``server``,
``error``, ``sqlstate``, ``delay``, ``final``, ``queued`` (seconds the block
waited for admission so far) and ``limit`` (its contention key's admission
limit, or None).
"""


def payload(
    *,
    session: Any,
    attempt: int,
    isolation: str | None,
    endpoint: str | None,
    started: float,
    server: str = "primary",
) -> dict[str, Any]:
    """The keys every flask-txn signal carries; ``started`` is a ``time.perf_counter()``;
    ``server`` is ``"primary"``, or the URL (password hidden) of the standby the block ran on."""
    return {
        "session": session,
        "attempt": attempt,
        "isolation": isolation,
        "endpoint": endpoint,
        "elapsed": time.perf_counter() - started,
        "server": server,
    }


def send(signal: NamedSignal, sender: Any, **payload: Any) -> None:
    """Call every receiver of ``signal``; log and skip any that raises."""
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **payload)
        except Exception:
            log.exception("A receiver of the flask-txn signal %r raised; ignored.", signal.name)


def send_rolled_back(sender: Any, **payload: Any) -> None:
    """Send ``transaction_rolled_back`` if anything listens."""
    if transaction_rolled_back.receivers:
        send(transaction_rolled_back, sender, **payload)
