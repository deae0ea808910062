"""The shop's services one by one, in-process (ServiceHarness on memory://): idempotence
under redelivery, and malformed, oversized and hostile input."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "shop"))

from shop import billing, inventory, orders, payments, view

from shoal.testing import ServiceHarness

ORDER = {"customer": "alice", "sku": "book", "quantity": 2, "amount": 30}


async def test_orders_publishes_once_per_order_id():
    async with ServiceHarness(orders.svc) as h:
        for _ in range(2):  # a retried request: same order id
            r = await h.client.post("/orders", json={**ORDER, "order_id": "o-1"})
            assert r.status_code == 202 and r.json() == {"order_id": "o-1", "status": "pending"}
        r = await h.client.post("/orders", json=ORDER)
        assert r.status_code == 202 and len(r.json()["order_id"]) == 32
        events = await h.published("orders")
        assert [e.id for e in events].count("order-created-o-1") == 1 and len(events) == 2
        first = next(e for e in events if e.id == "order-created-o-1")
        assert first.key == "alice" and first.type == "order.created"
        assert first.data == {**ORDER, "order_id": "o-1"}


BAD_ORDERS = [
    (b"{", 400, "not JSON"), (b"[1]", 400, "expected a JSON object"),
    (b'{"customer": "a"}', 400, "order.sku: missing"),
    (b'{"customer": "a", "sku": "b", "quantity": true, "amount": 1}', 400, "order.quantity"),
    (b'{"customer": "a", "sku": "b", "quantity": 0, "amount": 1}', 400, "quantity must be >= 1"),
    (b'{"customer": "", "sku": "b", "quantity": 1, "amount": 1}', 400, "non-empty"),
    (b'{"customer": "a", "sku": "b", "quantity": 1, "amount": -1}', 400, "amount >= 0"),
    (b'{"customer": "a", "sku": "b", "quantity": 1, "amount": 1, "order_id": "../x"}', 400,
     "order.order_id"),
    (b'{"customer": "a", "sku": "b", "quantity": 1, "amount": 1, "order_id": 7}', 400,
     "order.order_id"),
    (b'{"customer": "' + b"x" * 20000 + b'"}', 413, "over 16 KiB"),
]


async def test_orders_refuses_bad_orders_by_field():
    async with ServiceHarness(orders.svc) as h:
        for body, status, message in BAD_ORDERS:
            r = await h.client.post("/orders", content=body)
            assert r.status_code == status and message in r.json()["error"], body[:40]
        assert await h.bus.broker.get_topic("orders") is None  # nothing was published


async def test_inventory_decides_once_per_order_even_when_redelivered():
    async with ServiceHarness(inventory.svc) as h:
        order = {**ORDER, "order_id": "o-1"}
        await h.publish("orders", order, key="alice", type="order.created")
        await h.publish("orders", order, key="alice", type="order.created")  # redelivery
        big = {**ORDER, "order_id": "o-2", "quantity": inventory.INITIAL_STOCK}
        await h.publish("orders", big, key="bob", type="order.created")
        events = await h.published("stock")
        assert sorted(e.id for e in events) == ["stock-rejected-o-2", "stock-reserved-o-1"]
        rejected = next(e for e in events if e.type == "stock.rejected")
        assert rejected.data["reason"] == "out of stock"
        assert rejected.data["available"] == inventory.INITIAL_STOCK - 2  # reserved once


async def test_payments_charges_once_and_refuses_bad_bodies():
    async with ServiceHarness(payments.svc) as h:
        body = {"order_id": "o-1", "customer": "alice", "amount": 30}
        first = (await h.client.post("/payments", json=body)).json()
        again = (await h.client.post("/payments", json={**body, "amount": 9999})).json()
        assert first == again == {"order_id": "o-1", "status": "settled", "charged": 30.0}
        declined = (await h.client.post("/payments", json={**body, "order_id": "o-2",
                                                           "amount": 9999})).json()
        assert declined["status"] == "failed" and "card declined" in declined["reason"]
        for bad in (b"{", b"[]", b'{"order_id": "x"}', b'{"order_id": "x", "amount": "y"}'):
            r = await h.client.post("/payments", content=bad)
            assert r.status_code == 400 and "expected {order_id" in r.json()["error"]


async def test_billing_calls_payments_through_the_mesh():
    async with ServiceHarness(billing.svc) as h:
        await h.serve(payments.svc)
        reserved = {**ORDER, "order_id": "o-1"}
        await h.publish("stock", reserved, key="alice", type="stock.reserved")
        await h.publish("stock", {**ORDER, "order_id": "o-2"}, key="bob", type="stock.rejected")
        events = await h.published("payments")
        assert [(e.id, e.type) for e in events] == [("payment-settled-o-1", "payment.settled")]


async def test_view_applies_each_event_once_in_any_order():
    async with ServiceHarness(view.svc) as h:
        data = {**ORDER, "order_id": "o-1"}
        await h.publish("payments", {**data, "status": "settled", "charged": 30},
                        type="payment.settled", id="payment-settled-o-1")
        await h.publish("orders", data, type="order.created", id="order-created-o-1")
        await h.publish("stock", data, type="stock.reserved", id="stock-reserved-o-1")
        await h.publish("stock", data, type="stock.reserved", id="stock-reserved-o-1-again")
        await h.publish("orders", {"no": "order id"}, type="order.created")
        await h.publish("orders", data, type="something.else")
        r = await h.client.get("/orders/o-1")
        assert r.status_code == 200
        got = r.json()
        assert got["status"] == "settled" and got["charged"] == 30
        assert sorted(got["events"]) == ["order-created-o-1", "payment-settled-o-1",
                                         "stock-reserved-o-1", "stock-reserved-o-1-again"]
        r = await h.client.get("/orders")
        assert r.json()["counts"] == {"settled": 1}
        r = await h.client.get("/orders/unknown")
        assert r.status_code == 404 and "not known" in r.json()["error"]
        r = await h.client.get("/orders/" + "x" * 100)
        assert r.status_code == 400
