"""shoal.Service in-process, through shoal.testing.ServiceHarness (memory:// bus and store)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from shoal import Service
from shoal.context import current_traceparent, parse_traceparent
from shoal.errors import ConfigError, ShoalError, TopicError
from shoal.events import Drop, Event, RetryPolicy
from shoal.events.group import offset_key
from shoal.mesh import Registry, load_traffic_policy
from shoal.service import ServiceNotRunning
from shoal.store.connect import connect_store
from shoal.testing import ServiceHarness

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make_orders() -> tuple[Service, list[Event]]:
    svc = Service("orders", version="3")
    handled: list[Event] = []

    @svc.post("/orders")
    async def place(request: Request) -> JSONResponse:
        body = await request.json()
        ack = await svc.publish("orders", body, key=body["customer"], type="order.created")
        return JSONResponse({"offset": ack.offset, "id": ack.id}, status_code=201)

    @svc.get("/orders/{order_id:int}")
    async def show(request: Request) -> JSONResponse:
        return JSONResponse({"order": request.path_params["order_id"]})

    @svc.route("/multi", methods=["PUT", "PATCH"])
    async def multi(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.method)

    @svc.get("/boom")
    async def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("handler bug")

    @svc.get("/trace")
    async def trace(request: Request) -> PlainTextResponse:
        return PlainTextResponse(current_traceparent.get() or "")

    @svc.subscribe("orders")
    async def on_order(event: Event) -> None:
        handled.append(event)
        await svc.publish("invoices", {"order": event.data}, key=event.key,
                          type="invoice.created")

    return svc, handled


async def test_routes_answer_through_starlette_router() -> None:
    svc, _ = make_orders()
    async with ServiceHarness(svc) as h:
        assert (await h.client.get("/orders/7")).json() == {"order": 7}
        assert (await h.client.put("/multi")).text == "PUT"
        assert (await h.client.patch("/multi")).text == "PATCH"
        assert (await h.client.get("/multi")).status_code == 405
        assert (await h.client.get("/nowhere")).status_code == 404
        resp = await h.client.get("/boom")
        assert resp.status_code == 500
        assert resp.json() == {"error": "internal server error", "service": "orders"}
        assert svc.load.inflight_requests == 0 and svc.load.requests >= 6


async def test_route_publishes_and_subscription_handles_with_trace_carried() -> None:
    svc, handled = make_orders()
    async with ServiceHarness(svc) as h:
        resp = await h.client.post("/orders", json={"customer": "alice", "total": 30},
                                   headers={"traceparent": TRACE})
        assert resp.status_code == 201
        await h.wait_idle()
        assert [e.data for e in handled] == [{"customer": "alice", "total": 30}]
        event = handled[0]
        assert event.key == "alice" and event.type == "order.created"
        # the event carries the request's trace (same trace id, a new span for this hop)
        trace_id, span, _ = parse_traceparent(event.traceparent)  # type: ignore[misc]
        assert trace_id == TRACE.split("-")[1] and span != TRACE.split("-")[2]
        # and the handler's own publish continues it again
        (invoice,) = await h.published("invoices")
        assert invoice.type == "invoice.created" and invoice.data == {"order": event.data}
        assert invoice.traceparent.split("-")[1] == trace_id  # type: ignore[union-attr]
        assert invoice.traceparent != event.traceparent


async def test_request_without_trace_starts_one_and_malformed_is_replaced() -> None:
    svc, _ = make_orders()
    async with ServiceHarness(svc) as h:
        fresh = (await h.client.get("/trace")).text
        assert parse_traceparent(fresh) is not None
        bad = (await h.client.get("/trace", headers={"traceparent": "00-zz-zz-01"})).text
        assert parse_traceparent(bad) is not None
        kept = (await h.client.get("/trace", headers={"traceparent": TRACE})).text
        assert kept.split("-")[1] == TRACE.split("-")[1]
    assert current_traceparent.get() is None  # nothing leaks into the test's context


async def test_harness_publish_waits_for_handlers_and_counts_events() -> None:
    svc, handled = make_orders()
    async with ServiceHarness(svc) as h:
        for i in range(5):
            await h.publish("orders", {"customer": "bob", "n": i}, key="bob")
            assert len(handled) == i + 1  # publish returned after the handler finished
        assert [e.data["n"] for e in handled] == list(range(5))
        assert svc.load.events == 5 and svc.load.inflight_events == 0
        assert len(await h.published("invoices")) == 5
        assert await h.published("never-written") == []


async def test_group_defaults_to_service_name_and_groups_are_independent() -> None:
    svc = Service("billing")
    seen: dict[str, list[int]] = {"billing": [], "audit": []}

    @svc.subscribe("orders")
    async def bill(event: Event) -> None:
        seen["billing"].append(event.data)

    @svc.subscribe("orders", group="audit")
    def audit(event: Event) -> None:  # sync handlers run in a thread
        assert threading.current_thread() is not threading.main_thread()
        assert parse_traceparent(current_traceparent.get()) is not None
        seen["audit"].append(event.data)

    assert [(s.topic, s.group) for s in svc.subscriptions] == [
        ("orders", "billing"), ("orders", "audit")]
    async with ServiceHarness(svc) as h:
        await h.publish("orders", 1)
        await h.publish("orders", 2, key="k")
        assert sorted(seen["billing"]) == [1, 2] and sorted(seen["audit"]) == [1, 2]
        assert set(await h.bus.groups("orders")) == {"billing", "audit"}


async def test_failing_handler_is_retried_then_dead_lettered_and_drop_drops() -> None:
    svc = Service("flaky")
    calls: list[int] = []

    @svc.subscribe("jobs", retry=RetryPolicy(attempts=3, initial=0.001, maximum=0.001))
    async def job(event: Event) -> None:
        calls.append(event.data)
        if event.data == "drop":
            raise Drop("not for us")
        raise ValueError("always fails")

    async with ServiceHarness(svc) as h:
        await h.publish("jobs", 1)
        assert calls == [1, 1, 1]
        (dead,) = await h.published("jobs.dlq")
        assert dead.data == 1 and "always fails" in str(dead.extensions["dlqreason"])
        await h.publish("jobs", "drop")
        assert calls[-1] == "drop" and len(await h.published("jobs.dlq")) == 1


async def test_mount_starlette_app_and_raw_asgi_app() -> None:
    svc = Service("web")

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"path": request.url.path, "root": request.scope["root_path"]})

    svc.mount("/api", Starlette(routes=[Route("/hello", hello)]))

    async def raw(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"raw " + scope["path"].encode()})

    svc.mount("/raw", raw)

    @svc.get("/own")
    async def own(request: Request) -> PlainTextResponse:
        return PlainTextResponse("own")

    async with ServiceHarness(svc) as h:
        assert (await h.client.get("/api/hello")).json() == {"path": "/api/hello",
                                                             "root": "/api"}
        assert (await h.client.get("/api/missing")).status_code == 404
        assert (await h.client.get("/raw/x")).text == "raw /raw/x"
        assert (await h.client.get("/own")).text == "own"


async def test_health_and_readiness_endpoints() -> None:
    svc, _ = make_orders()
    assert not svc.ready and svc.missing() == ["not started"]
    async with ServiceHarness(svc) as h:
        assert (await h.client.get("/healthz")).json() == {"status": "alive",
                                                           "service": "orders"}
        resp = await h.client.get("/readyz")
        assert resp.status_code == 200
        assert resp.json() == {"ready": True, "service": "orders", "missing": []}
    assert not svc.ready


async def test_call_reaches_a_served_service_by_name_with_trace_header() -> None:
    front = Service("front")
    back = Service("back", version="2")
    got: list[str | None] = []

    @back.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        got.append(request.headers.get("traceparent"))
        return JSONResponse({"echo": await request.json(), "from": "back"})

    @front.get("/relay")
    async def relay(request: Request) -> JSONResponse:
        resp = await front.call("back", "post", "/echo", json={"x": 1})
        return JSONResponse({"status": resp.status, "body": await resp.json()})

    policy = load_traffic_policy({"retries": {"attempts": 0}, "timeouts": {"request": "3s"}})
    async with ServiceHarness(front, policies={"back": policy}) as h:
        assert front.mesh.upstream("back").policy is policy  # type: ignore[union-attr]
        await h.serve(back)
        (instance,) = front.mesh.cache.instances("back")  # type: ignore[union-attr]
        assert instance.labels == {"version": "2"} and instance.state == "serving"
        resp = await h.client.get("/relay", headers={"traceparent": TRACE})
        assert resp.json() == {"status": 200, "body": {"echo": {"x": 1}, "from": "back"}}
        assert got[0] is not None and got[0].split("-")[1] == TRACE.split("-")[1]
    assert back.registration is None and not back.ready


async def test_declaration_errors_name_what_is_wrong() -> None:
    svc = Service("checks")
    with pytest.raises(ConfigError, match="service name 'Bad Name'"):
        Service("Bad Name")
    with pytest.raises(ConfigError, match="version"):
        Service("ok", version="")
    with pytest.raises(ConfigError, match="reserved"):
        svc.get("/healthz")
    with pytest.raises(ConfigError, match="must be a string starting with '/'"):
        svc.get("no-slash")
    with pytest.raises(TopicError, match="topic name"):
        svc.subscribe("bad topic!")
    with pytest.raises(ConfigError, match="concurrency"):
        svc.subscribe("t", concurrency=0)
    with pytest.raises(ConfigError, match="retry"):
        svc.subscribe("t", retry="often")  # type: ignore[arg-type]
    svc.subscribe("t")(lambda e: None)
    with pytest.raises(ConfigError, match="already has a handler"):
        svc.subscribe("t")(lambda e: None)
    with pytest.raises(ConfigError, match="ASGI"):
        svc.mount("/x", "not an app")  # type: ignore[arg-type]
    with pytest.raises(ServiceNotRunning, match="publish"):
        await svc.publish("t", 1)
    with pytest.raises(ServiceNotRunning, match="call"):
        await svc.call("other", "GET", "/")


async def test_start_refuses_bad_listen_and_twice_and_cleans_up() -> None:
    svc = Service("twice")
    for listen, message in [("nonsense", "HOST:PORT"), ("127.0.0.1:99999", "HOST:PORT"),
                            ("203.0.113.9:0", "cannot listen")]:
        with pytest.raises(ConfigError, match=message):
            await svc.start(broker="memory://twice", store="memory://twice", listen=listen)
        assert svc.missing() == ["not started"] and svc.bus is None
    async with ServiceHarness(svc):
        with pytest.raises(ShoalError, match="already"):
            await svc.start(broker="memory://twice", store="memory://twice")


async def test_stop_finishes_inflight_event_and_commits() -> None:
    svc = Service("slow")
    started, finished = asyncio.Event(), []

    @svc.subscribe("work")
    async def work(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(event.data)

    h = ServiceHarness(svc)
    await h.__aenter__()
    bus = h.bus
    ack = await h.publish("work", "x", wait=None)
    await asyncio.wait_for(started.wait(), 5)
    watcher = await connect_store(h.url)  # a second client of the same memory store
    await h.__aexit__(None, None, None)
    assert finished == ["x"]  # the in-flight handler finished before stop returned
    entry = await watcher.get(offset_key("work", "slow", ack.partition))
    assert entry is not None and int(entry.value) == ack.offset + 1  # and was committed
    await watcher.close()
    assert bus._closed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_readyz_is_503_naming_what_is_missing_until_subscriptions_joined() -> None:
    gate = asyncio.Event()

    class Gated(Service):
        async def _subscribe_all(self) -> None:  # hold the group join until the test says
            await gate.wait()
            await super()._subscribe_all()

    svc = Gated("gated")
    svc.subscribe("t")(lambda event: None)
    url = "memory://gated-readyz"
    port = free_port()
    starting = asyncio.create_task(svc.start(broker=url, store=url,
                                             listen=f"127.0.0.1:{port}"))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        while True:  # until the listener is up and the instance registered
            try:
                resp = await client.get("/readyz")
            except httpx.ConnectError:
                await asyncio.sleep(0.01)
                continue
            assert resp.status_code == 503 and resp.json()["ready"] is False
            if resp.json()["missing"] == ["subscriptions"]:
                break
            assert "subscriptions" in resp.json()["missing"]
            await asyncio.sleep(0.01)
        assert (await client.get("/healthz")).status_code == 200  # alive meanwhile
        (instance,) = await Registry(svc.store).list("gated")  # type: ignore[arg-type]
        assert instance.state == "starting"
        gate.set()
        await starting
        assert (await client.get("/readyz")).status_code == 200
        (instance,) = await Registry(svc.store).list("gated")  # type: ignore[arg-type]
        assert instance.state == "serving" and svc.address == f"127.0.0.1:{port}"
        store = await connect_store(url)
        await svc.stop(grace=0)
        assert await Registry(store).list("gated") == []
        await store.close()


async def test_mounted_apps_lifespans_run_at_start_and_stop() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        events.append("startup")
        yield {"pool": "db-pool"}
        events.append("shutdown")

    async def uses_state(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.pool)

    svc = Service("lifes")
    svc.mount("/api", Starlette(routes=[Route("/pool", uses_state)], lifespan=lifespan))

    async def no_lifespan(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            raise RuntimeError("only http")  # a raw app without lifespan: skipped
        await PlainTextResponse("raw")(scope, receive, send)

    svc.mount("/raw", no_lifespan)
    async with ServiceHarness(svc) as h:
        assert events == ["startup"]
        assert (await h.client.get("/api/pool")).text == "db-pool"
        assert (await h.client.get("/raw/")).text == "raw"
    assert events == ["startup", "shutdown"]


async def test_mounted_app_whose_startup_fails_fails_the_start() -> None:
    @contextlib.asynccontextmanager
    async def broken(app: Starlette):  # type: ignore[no-untyped-def]
        raise RuntimeError("database unreachable")
        yield

    svc = Service("broken")
    svc.mount("/api", Starlette(lifespan=broken))
    failed = r"^mount /api: lifespan startup failed: RuntimeError: database unreachable$"
    with pytest.raises(ShoalError, match=failed):
        await svc.start(broker="memory://broken", store="memory://broken", listen=None)
    assert svc.missing() == ["not started"] and svc.bus is None


async def test_concurrent_stops_share_one_drain() -> None:
    svc = Service("stopper")
    finished: list[int] = []
    started = asyncio.Event()

    @svc.subscribe("t")
    async def slow(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(event.data)

    async with ServiceHarness(svc) as h:
        await h.publish("t", 1, wait=None)
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.gather(svc.stop(grace=0), svc.stop(grace=0))
        assert finished == [1] and svc.bus is None and not svc.ready
    await svc.stop()  # stopping a stopped service is a no-op
    async with svc.running(broker="memory://stopper-2", store="memory://stopper-2",
                           listen="127.0.0.1:0", instance_id="stopper-1") as running:
        assert running is svc and svc.ready and svc.registration is not None
        assert svc.registration.instance.address == svc.address
    assert svc.registration is None and not svc.ready
