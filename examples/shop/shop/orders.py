"""orders: takes orders over HTTP (behind the gateway) and publishes ``order.created``.

``POST /orders {"customer", "sku", "quantity", "amount", "order_id"?}`` answers 202 with
the order id. The event id is derived from the order id, so a retried request (same
``order_id``) is deduplicated by the bus instead of creating a second order.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse

import shoal

svc = shoal.Service("orders")
FIELDS = {"customer": str, "sku": str, "quantity": int, "amount": (int, float)}


def _invalid(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


@svc.post("/orders")
async def place_order(request: Request) -> JSONResponse:
    """Validate an order and publish ``order.created`` keyed by customer."""
    if int(request.headers.get("content-length") or 0) > 16_384:
        return JSONResponse({"error": "order: body over 16 KiB"}, status_code=413)
    try:
        order = await request.json()
    except ValueError:
        return _invalid("order: body is not JSON")
    if not isinstance(order, dict):
        return _invalid("order: expected a JSON object")
    for name, kind in FIELDS.items():
        value = order.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            return _invalid(f"order.{name}: missing or not a {getattr(kind, '__name__', 'number')}")
    if order["quantity"] < 1 or order["amount"] < 0 or not order["customer"] or len(
            order["customer"]) > 128 or not order["sku"] or len(order["sku"]) > 64:
        return _invalid("order: quantity must be >= 1, amount >= 0, customer and sku non-empty")
    order_id = order.get("order_id") or uuid.uuid4().hex
    if not isinstance(order_id, str) or not 1 <= len(order_id) <= 64 or not all(
            c.isalnum() or c in "-_" for c in order_id):
        return _invalid("order.order_id: 1-64 letters, digits, '-' or '_'")
    data = {"order_id": order_id, **{name: order[name] for name in FIELDS}}
    await svc.publish("orders", data, key=order["customer"], type="order.created",
                      id=f"order-created-{order_id}")
    return JSONResponse({"order_id": order_id, "status": "pending"}, status_code=202)
