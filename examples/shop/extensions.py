"""The extensions, created once and registered by the app factory: Flask-SQLAlchemy
first, then flask-txn adopting it, then Flask-Migrate."""

from __future__ import annotations

from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from flask_txn import FlaskTxn


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
txn = FlaskTxn(db=db)
migrate = Migrate()
