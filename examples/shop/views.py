"""The shop's blueprint. Before flask-txn each writing view ended with
``db.session.commit()`` inside ``try``/``except``/``rollback()``; now ``@atomic``
commits, rolls back on an exception or an error status, and re-runs the view
on a serialization failure."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request

from flask_txn import atomic, on_commit

from .extensions import db
from .models import Order, Product

shop = Blueprint("shop", __name__)


@shop.get("/products")
@atomic
def products() -> dict[str, Any]:
    """One page of products, with Flask-SQLAlchemy's paginate, in one snapshot."""
    page = db.paginate(db.select(Product).order_by(Product.id), per_page=20)
    return {"total": page.total, "items": [{"id": p.id, "stock": p.stock} for p in page]}


@shop.post("/products")
@atomic
def add_product() -> tuple[dict[str, int], int]:
    """Add a product; flush for its id, the block commits."""
    product = Product(name=request.json["name"], stock=request.json["stock"])
    db.session.add(product)
    db.session.flush()
    return {"id": product.id}, 201


@shop.post("/products/<int:product_id>/orders")
@atomic(isolation="SERIALIZABLE")
def place_order(product_id: int) -> tuple[dict[str, int], int] | tuple[dict[str, str], int]:
    """Take stock and record the order, or 409 (rolled back) when there is too little."""
    product = db.get_or_404(Product, product_id)
    quantity = request.json["quantity"]
    if product.stock < quantity:
        return {"error": "not enough stock"}, 409
    product.stock -= quantity
    order = Order(product_id=product.id, quantity=quantity)
    db.session.add(order)
    db.session.flush()
    # Only once the order is saved: a re-run or a rollback drops it.
    on_commit(lambda: current_app.logger.info("order %d placed", order.id))
    return {"order": order.id, "stock": product.stock}, 201
