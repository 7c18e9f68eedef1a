"""Tests for the shop with flask-txn's pytest fixtures, which work with ``db=``.

Run them with ``pytest examples/shop/test_shop.py`` from the repository's root;
pytest-flask provides ``client`` from the ``app`` fixture below. The schema is
made by the app's own migrations, as in production.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flask import Flask
from flask_migrate import upgrade

from examples.shop.app import create_app
from examples.shop.extensions import db
from examples.shop.models import Order, Product
from flask_txn import atomic


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One app for the whole run, on a throwaway SQLite file migrated to the head."""
    app = create_app(f"sqlite:///{tmp_path_factory.mktemp('db') / 'shop.db'}", TESTING=True)
    with app.app_context():
        upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def pen(app: Flask, txn_rollback: Any) -> int:
    """A product with 3 in stock, inside the test's transaction."""
    with app.app_context(), atomic():
        product = Product(name="pen", stock=3)
        db.session.add(product)
        db.session.flush()
        product_id = product.id  # Flask-SQLAlchemy expires objects on commit
    return product_id


def test_order_takes_stock(client: Any, pen: int, txn_on_commit: Any) -> None:
    """An order commits (inside the test's transaction) and its callback waits for the commit."""
    response = client.post(f"/products/{pen}/orders", json={"quantity": 2})
    assert (response.status_code, response.json["stock"], len(txn_on_commit)) == (201, 1, 1)


def test_each_test_starts_afresh(client: Any, pen: int) -> None:
    """The previous test's order was rolled back with its transaction."""
    assert client.get("/products").json == {"total": 1, "items": [{"id": pen, "stock": 3}]}


def test_too_many_rolls_back(app: Flask, client: Any, pen: int, txn_signals: Any) -> None:
    """A 409 rolls the order back and says so in the signal."""
    response = client.post(f"/products/{pen}/orders", json={"quantity": 5})
    assert (response.status_code, txn_signals.events[-1][1]["reason"]) == (409, "veto")
    with app.app_context():
        assert db.session.scalars(db.select(Order)).all() == []


def test_a_conflict_reruns_the_order(
    client: Any, pen: int, txn_faults: Any, txn_signals: Any, caplog: Any
) -> None:
    """A serialization failure re-runs the view; the callback runs once, after the commit."""
    txn_faults.fail_next(1, endpoint="shop.place_order")
    with caplog.at_level(logging.INFO):
        response = client.post(f"/products/{pen}/orders", json={"quantity": 1})
    assert response.status_code == 201
    txn_signals.assert_retried_then_committed(1)
    assert [r.getMessage() for r in caplog.records if "placed" in r.getMessage()] == [
        f"order {response.json['order']} placed"
    ]


def test_a_product_page_is_two_statements(client: Any, pen: int, txn_queries: Any) -> None:
    """Listing products costs paginate's count and its page: no N+1."""
    with txn_queries.assert_max_queries(2):
        assert client.get("/products").status_code == 200
