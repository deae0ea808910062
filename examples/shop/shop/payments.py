"""payments: charges a customer, called synchronously by billing through the mesh.

``POST /payments {"order_id", "customer", "amount"}`` answers 200 with ``{"status":
"settled"|"failed", ...}``. A payment is recorded under its order id before it is
answered, so a retried call (billing restarted, or the mesh retried) gets the same answer
and the customer is charged once. Amounts over ``SHOP_PAYMENT_LIMIT`` are declined.
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import JSONResponse

import shoal
from shop.records import update

svc = shoal.Service("payments")
LIMIT = float(os.environ.get("SHOP_PAYMENT_LIMIT", "500"))


@svc.post("/payments")
async def pay(request: Request) -> JSONResponse:
    """Charge once per order id."""
    try:
        payment = await request.json()
        order_id, amount = str(payment["order_id"]), float(payment["amount"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "payment: expected {order_id, customer, amount}"},
                            status_code=400)

    def charge(existing: dict | None) -> dict:
        if existing is not None:
            return existing
        if amount > LIMIT:
            return {"order_id": order_id, "status": "failed",
                    "reason": f"card declined: {amount:g} over the limit {LIMIT:g}"}
        return {"order_id": order_id, "status": "settled", "charged": amount}

    return JSONResponse(await update(svc.store, f"shop/payments/{order_id}", charge))
