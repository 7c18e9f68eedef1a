"""A Flask-SQLAlchemy shop converted to flask-txn (docs/adopting.md)."""
