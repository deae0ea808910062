"""Authorization and topic policies: pure decisions, hostile config, the bus enforcing."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from shoal.errors import ConfigError, Forbidden
from shoal.events import EventBus
from shoal.mesh.security.authz import AuthorizationPolicy
from shoal.mesh.security.topics import TopicPolicy

ORDERS = "spiffe://shoal.local/svc/orders"
SHIPPING = "spiffe://shoal.local/svc/shipping"
AUDIT = "spiffe://shoal.local/svc/audit"

RULES = [
    {"name": "no-debug", "action": "deny", "paths": [{"prefix": "/debug"}]},
    {"name": "no-shipping-writes", "action": "deny", "from": ["shipping"],
     "methods": ["POST", "DELETE"]},
    {"name": "orders-charge", "action": "allow", "from": ["orders"], "methods": ["POST"],
     "paths": [{"exact": "/charge"}, {"prefix": "/v1/"}]},
    {"name": "anyone-reads", "action": "allow", "from": ["*"], "methods": ["GET"]},
]


@pytest.mark.parametrize(("source", "method", "path", "allowed", "rule"), [
    (ORDERS, "POST", "/charge", True, "orders-charge"),
    (ORDERS, "POST", "/charge?x=1", True, "orders-charge"),
    (ORDERS, "POST", "/v1/refund", True, "orders-charge"),
    (ORDERS, "POST", "/v1", True, "orders-charge"),
    (ORDERS, "POST", "/v1x", False, "default-deny"),  # prefixes are whole segments
    (ORDERS, "POST", "/chargeback", False, "default-deny"),
    (ORDERS, "PUT", "/charge", False, "default-deny"),
    (SHIPPING, "GET", "/status", True, "anyone-reads"),
    (SHIPPING, "POST", "/charge", False, "no-shipping-writes"),
    (None, "GET", "/status", False, "default-deny"),  # '*' means authenticated
    (ORDERS, "GET", "/debug", False, "no-debug"),  # DENY before ALLOW
    (ORDERS, "GET", "/debug/vars", False, "no-debug"),
    (ORDERS, "GET", "/status/../debug", False, "no-debug"),  # normalized first
    (ORDERS, "GET", "/%64ebug", False, "no-debug"),
    (ORDERS, "GET", "/x/%2e%2e/debug", False, "no-debug"),
    (ORDERS, "GET", "/a/\x00", False, "invalid-path"),
    (ORDERS, "GET", "/%zz", False, "invalid-path"),
    ("spiffe://other.domain/svc/orders", "POST", "/charge", False, "default-deny"),
])
def test_decisions_name_their_rule(source: str | None, method: str, path: str,
                                   allowed: bool, rule: str) -> None:
    policy = AuthorizationPolicy.from_config("billing", RULES)
    decision = policy.decide(source, method, path)
    assert (decision.allowed, decision.rule) == (allowed, rule), decision.reason
    assert policy.denials[rule] == (0 if allowed else 1)


def test_without_allow_rules_what_is_not_denied_is_allowed() -> None:
    policy = AuthorizationPolicy.from_config("billing", [RULES[0]])
    assert policy.decide(None, "DELETE", "/x").rule == "default-allow"
    assert not policy.decide(None, "GET", "/debug").allowed
    assert AuthorizationPolicy.from_config("billing", None).decide(None, "GET", "/").allowed


@pytest.mark.parametrize(("rules", "message"), [
    ({"name": "x"}, "expected a list of rules"),
    ([{"name": "x", "action": "permit"}], r"\[0\]\.action: expected allow or deny"),
    ([{"action": "allow"}], r"\[0\]\.name"),
    ([{"name": "caf\u00e9", "action": "allow"}], "ASCII"),
    ([{"name": "x", "action": "allow", "form": ["a"]}], "unknown key 'form'"),
    ([{"name": "x", "action": "allow", "from": "orders"}], "from: expected a non-empty list"),
    ([{"name": "x", "action": "allow", "from": ["Orders!"]}], "from: service"),
    ([{"name": "x", "action": "allow", "from": ["spiffe://a/b"]}], "from: SPIFFE id"),
    ([{"name": "x", "action": "allow", "methods": ["FETCH"]}], "methods: expected an HTTP"),
    ([{"name": "x", "action": "allow", "paths": [{"regex": ".*"}]}], r"paths\[0\]"),
    ([{"name": "x", "action": "allow", "paths": [{"exact": "no-slash"}]}], "must start"),
    ([{"name": "x", "action": "allow"}, {"name": "x", "action": "deny"}], "already used"),
    ([{"name": "default-deny", "action": "deny"}], "already used"),
    ([{"name": f"r{i}", "action": "allow"} for i in range(1025)], "at most 1024"),
    (["allow all"], r"\[0\]: expected a mapping"),
])
def test_bad_rules_are_named(rules: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AuthorizationPolicy.from_config("billing", rules)


TOPICS = {
    "orders": {"publish": ["orders"], "subscribe": ["shipping", "audit"]},
    "audit.*": {"publish": ["*"], "subscribe": ["audit"]},
}


@pytest.mark.parametrize(("who", "action", "topic", "allowed"), [
    (ORDERS, "publish", "orders", True),
    (SHIPPING, "publish", "orders", False),
    (SHIPPING, "subscribe", "orders", True),
    (ORDERS, "subscribe", "orders", False),
    (SHIPPING, "publish", "orders.dlq", True),  # dead letters follow the subscription
    (ORDERS, "publish", "orders.dlq", False),
    (SHIPPING, "publish", "audit.login", True),
    (SHIPPING, "publish", "audit", False),  # 'audit.*' does not take 'audit'
    (AUDIT, "subscribe", "audit.login", True),
    (None, "publish", "audit.login", False),
    (ORDERS, "publish", "payments", False),  # topics are closed unless named
])
def test_topic_decisions(who: str | None, action: str, topic: str, allowed: bool) -> None:
    assert TopicPolicy.from_config(TOPICS).allows(who, action, topic)[0] is allowed  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "message"), [
    ([], "expected a mapping"),
    ({"a*b": {}}, "topic name"),
    ({"*.x": {}}, "topic name"),
    ({"orders": ["x"]}, "expected {publish"),
    ({"orders": {"produce": []}}, "unknown key 'produce'"),
    ({"orders": {"publish": "orders"}}, "publish: expected a list"),
    ({"orders": {"publish": ["NOT VALID"]}}, r"orders\.publish: service"),
])
def test_bad_topic_policies_are_named(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TopicPolicy.from_config(data)


@pytest.fixture(params=["memory", "sqlite"])
def bus_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    return f"sqlite:///{tmp_path}/events.db"


async def test_a_service_not_allowed_to_publish_gets_a_clear_error_and_nothing_is_appended(
        bus_url: str) -> None:
    policy = TopicPolicy.from_config(TOPICS)
    async with EventBus.connect(bus_url, source="/t") as owner:
        await owner.create_topic("orders", 2)
        store = owner.store
        async with EventBus.connect(bus_url, store=store, topic_policy=policy,
                                    identity=SHIPPING) as shipping:
            with pytest.raises(Forbidden, match=re.escape(
                    "svc/shipping may not publish to topic 'orders': not listed under "
                    "topics.orders.publish")) as info:
                await shipping.publish("orders", {"n": 1}, key="k")
            assert info.value.rule == "topics.orders"
            with pytest.raises(Forbidden):
                await shipping.publish_many("orders", [{"n": 2}])
            with pytest.raises(Forbidden, match="no entry of the topic policy covers it"):
                await shipping.publish("payments", {"n": 3})
            infos = {t.spec.name: t.events for t in await owner.topics()}
            assert infos.get("orders") == 0 and "payments" not in infos  # nothing, not even
        async with EventBus.connect(bus_url, store=store, topic_policy=policy,
                                    identity=ORDERS) as orders:
            await orders.publish("orders", {"n": 4}, key="k")
            with pytest.raises(Forbidden, match="may not subscribe on topic 'orders'"):
                await orders.subscribe("orders", "g", lambda e: None)  # type: ignore[arg-type,return-value]
            with pytest.raises(Forbidden, match="subscribe"):
                orders.consume("orders", "g")
        assert {t.spec.name: t.events for t in await owner.topics()}["orders"] == 1
