"""orders-view: projects every shop event into a read model; ``GET /orders/{id}``.

CQRS: commands write events (orders, inventory, billing), queries read this projection.
Each order's view is one Store record; an event is applied at most once (its id is
remembered in the record), and a status only moves forward (pending < reserved <
settled | failed), so events of different topics may arrive in any order.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

import shoal
from shoal.events import Event, RetryPolicy
from shop.records import read, update

svc = shoal.Service("orders-view")
PREFIX = "shop/view/"
STATUS = {"order.created": "pending", "stock.reserved": "reserved",
          "stock.rejected": "failed", "payment.settled": "settled",
          "payment.failed": "failed"}
RANK = {"pending": 0, "reserved": 1, "settled": 2, "failed": 2}


async def project(event: Event) -> None:
    """Apply one event to its order's view, once."""
    data = event.data
    status = STATUS.get(event.type or "")
    if status is None or not isinstance(data, dict) or "order_id" not in data:
        return

    def apply(view: dict | None) -> dict:
        view = view or {"order_id": data["order_id"], "status": "pending", "events": []}
        if event.id in view["events"]:
            return view
        new = {**view, "events": [*view["events"], event.id]}
        if RANK[status] > RANK[view["status"]]:
            new["status"] = status
        for name in ("customer", "sku", "quantity", "amount", "reason", "charged"):
            if name in data:
                new[name] = data[name]
        return new

    await update(svc.store, f"{PREFIX}{data['order_id']}", apply)


RETRY = RetryPolicy(attempts=50, initial=0.05, maximum=1.0)
# 16 events at a time per topic (one customer's still in order): each is a Store
# read-modify-write that mostly waits on the Store, and projecting is idempotent and
# order-free, so they overlap (and their writes share transactions). One at a time, this
# instance was the shop's limit (~130 settled orders/s in bench/shop.py; ~250 with 16).
for topic in ("orders", "stock", "payments"):
    svc.subscribe(topic, retry=RETRY, concurrency=16)(project)


@svc.get("/orders/{order_id}")
async def get_order(request: Request) -> JSONResponse:
    """One order's view, or 404."""
    order_id = request.path_params["order_id"]
    if len(order_id) > 64:
        return JSONResponse({"error": "order id: at most 64 characters"}, status_code=400)
    view = await read(svc.store, f"{PREFIX}{order_id}")
    if view is None:
        return JSONResponse({"error": f"order {order_id!r}: not known (yet)"}, status_code=404)
    return JSONResponse(view)


@svc.get("/orders")
async def list_orders(request: Request) -> JSONResponse:
    """Every order's view, and how many are in each status."""
    views = [json.loads(e.value) for e in await svc.store.list(PREFIX)]
    counts: dict[str, int] = {}
    for view in views:
        counts[view["status"]] = counts.get(view["status"], 0) + 1
    return JSONResponse({"counts": counts, "orders": views})
