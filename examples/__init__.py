"""flask-txn's example apps. ``examples.bank`` is importable from the repository root."""
