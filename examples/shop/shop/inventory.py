"""inventory: reserves stock for each new order; publishes ``stock.reserved`` or
``stock.rejected``.

Stock lives in the Store, one record per SKU, holding the decision taken for each order
of that SKU: a redelivered ``order.created`` finds its decision and republishes the same
event (same id: the bus drops the duplicate) instead of reserving twice.
"""

from __future__ import annotations

import os

import shoal
from shoal.events import Event, RetryPolicy
from shop.records import update

svc = shoal.Service("inventory")
INITIAL_STOCK = int(os.environ.get("SHOP_INITIAL_STOCK", "1000"))
REMEMBERED = 10_000  # decisions kept per SKU (older redeliveries are out of the question)


@svc.subscribe("orders", retry=RetryPolicy(attempts=50, initial=0.05, maximum=1.0))
async def reserve(event: Event) -> None:
    """Reserve ``quantity`` of ``sku`` for the order, once."""
    order = event.data
    order_id, quantity = order["order_id"], order["quantity"]

    def decide(stock: dict | None) -> dict:
        stock = stock or {"available": INITIAL_STOCK, "decisions": {}}
        if order_id in stock["decisions"]:
            return stock
        decisions = dict(stock["decisions"])
        ok = stock["available"] >= quantity
        decisions[order_id] = "reserved" if ok else "rejected"
        while len(decisions) > REMEMBERED:
            decisions.pop(next(iter(decisions)))
        return {"available": stock["available"] - (quantity if ok else 0),
                "decisions": decisions}

    stock = await update(svc.store, f"shop/stock/{order['sku']}", decide)
    outcome = stock["decisions"][order_id]
    data = {**order, "available": stock["available"]}
    if outcome == "rejected":
        data["reason"] = "out of stock"
    await svc.publish("stock", data, key=order["customer"], type=f"stock.{outcome}",
                      id=f"stock-{outcome}-{order_id}")
