"""Benchmarks for flask-txn; run each module with ``python -m benchmarks.<name>``."""
