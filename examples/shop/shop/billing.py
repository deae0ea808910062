"""billing: for each ``stock.reserved``, calls payments through the mesh and publishes
``payment.settled`` or ``payment.failed``.

Payments answers a repeated call for one order with the recorded outcome, and the
published event's id is derived from the order id, so a redelivered ``stock.reserved``
neither charges twice nor produces a second outcome. A call that fails (payments
restarting) raises: the event is retried in place, in order, with backoff.
"""

from __future__ import annotations

import asyncio
import os

import shoal
from shoal.events import Event, RetryPolicy

svc = shoal.Service("billing")
DELAY = float(os.environ.get("SHOP_BILLING_DELAY", "0"))  # seconds of bookkeeping per order


# 16 orders at a time (one customer's still in order): each mostly waits on payments, and
# charging is idempotent per order id.
CONCURRENCY = int(os.environ.get("SHOP_BILLING_CONCURRENCY", "16"))


@svc.subscribe("stock", retry=RetryPolicy(attempts=100, initial=0.05, maximum=1.0),
               concurrency=CONCURRENCY)
async def bill(event: Event) -> None:
    """Charge a reserved order."""
    if event.type != "stock.reserved":
        return
    order = event.data
    if DELAY:
        await asyncio.sleep(DELAY)
    response = await svc.call("payments", "POST", "/payments", json={
        "order_id": order["order_id"], "customer": order["customer"],
        "amount": order["amount"]})
    result = await response.json()
    if response.status != 200:
        raise RuntimeError(f"payments answered {response.status}: {result}")
    outcome = result["status"]
    await svc.publish("payments", {**order, **result}, key=order["customer"],
                      type=f"payment.{outcome}", id=f"payment-{outcome}-{order['order_id']}")
