"""How long and how often each mode measures: ``--smoke``, ``--quick`` and the full run."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mode:
    """Repetitions and durations of one mode; seconds are per run of one variant."""

    name: str
    #: scenario 1: interleaved rounds and seconds per variant and round. Many
    #: short rounds: the ratio of runs made a fraction of a second apart is the
    #: one the machine's drift disturbs least.
    overhead_rounds: int
    overhead_seconds: float
    #: scenarios 2 to 4, at 8 clients (pgbench's -T takes whole seconds).
    rounds: int
    seconds: int
    #: scenario 5: the other client counts (8 comes from scenarios 2 and 3).
    scaling_clients: tuple[int, ...]
    scaling_rounds: int
    scaling_seconds: int
    #: scenario 5b: rounds of 8 against the most scaling clients on one server (0: none).
    paired_rounds: int
    #: scenario 3b: backoff settings (wait_initial, wait_max) and where to try them.
    backoffs: tuple[tuple[float, float], ...]
    backoff_clients: tuple[int, ...]
    backoff_rounds: int
    backoff_seconds: int
    #: untimed load after gunicorn starts.
    warmup: float


#: Backoff settings compared in scenario 3b: none (pgbench's immediate retry),
#: then first caps of 2, 10, 20 and 50 ms.
BACKOFFS = ((0.0, 0.0), (0.002, 0.25), (0.01, 1.0), (0.02, 1.0), (0.05, 1.0))

SMOKE = Mode(
    name="smoke",
    overhead_rounds=1,
    overhead_seconds=0.1,
    rounds=1,
    seconds=1,
    scaling_clients=(2,),
    scaling_rounds=1,
    scaling_seconds=1,
    paired_rounds=0,
    backoffs=((0.0, 0.0),),
    backoff_clients=(2,),
    backoff_rounds=1,
    backoff_seconds=1,
    warmup=0.3,
)

QUICK = Mode(
    name="quick",
    overhead_rounds=15,
    overhead_seconds=0.1,
    rounds=3,
    seconds=2,
    scaling_clients=(1, 2, 4, 16, 32),
    scaling_rounds=1,
    scaling_seconds=2,
    paired_rounds=0,
    backoffs=BACKOFFS,
    backoff_clients=(8,),
    backoff_rounds=1,
    backoff_seconds=2,
    warmup=0.5,
)

FULL = Mode(
    name="full",
    overhead_rounds=60,
    overhead_seconds=0.15,
    rounds=5,
    seconds=4,
    scaling_clients=(1, 2, 4, 16, 32),
    scaling_rounds=2,
    scaling_seconds=3,
    paired_rounds=4,
    backoffs=BACKOFFS,
    backoff_clients=(2, 8, 32),
    backoff_rounds=3,
    backoff_seconds=3,
    warmup=2.0,
)

MODES = {mode.name: mode for mode in (SMOKE, QUICK, FULL)}
