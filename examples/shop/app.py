"""The app factory: Flask-SQLAlchemy, flask-txn adopting it (``db=db``) and
Flask-Migrate, and the shop's blueprint.

Run it with ``flask --app examples.shop.app db upgrade`` then
``flask --app examples.shop.app run`` from the repository's root. It uses a
SQLite file next to this module unless ``DATABASE_URL`` names another database.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask

from .extensions import db, migrate, txn
from .views import shop

MIGRATIONS = Path(__file__).with_name("migrations")


def create_app(database_url: str | None = None, **config: Any) -> Flask:
    """Build the app; the schema comes from the migrations (``flask db upgrade``)."""
    app = Flask(__name__)
    default = f"sqlite:///{Path(__file__).with_name('shop.db')}"
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url or os.environ.get("DATABASE_URL", default)
    app.config.update(config)
    db.init_app(app)
    txn.init_app(app)  # after db.init_app(app): flask-txn adopts its engine and session
    migrate.init_app(app, db, directory=str(MIGRATIONS))
    app.register_blueprint(shop)
    return app
