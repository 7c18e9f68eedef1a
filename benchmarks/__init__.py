"""Benchmarks for flask-txn against hand-written SQLAlchemy and pgbench: ``python -m benchmarks``.

One module per part: :mod:`.modes` (durations), :mod:`.workload` (the table and
the pgbench scripts' SQL), :mod:`.overhead` (scenario 1), :mod:`.contention`
(scenarios 2 to 5), :mod:`.webapp` (the app gunicorn serves), :mod:`.loadgen`
(the HTTP client process), :mod:`.processes` (starting and stopping them),
:mod:`.pgbench`, :mod:`.results`, :mod:`.report` (results.md, JSON and
:mod:`.plots`), :mod:`.machine` and :mod:`.profile` (the hot path under
pyinstrument).
"""
