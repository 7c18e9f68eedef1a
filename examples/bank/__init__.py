"""A money-transfer service built on flask-txn: see ``app.py`` and the docs' Examples page."""
