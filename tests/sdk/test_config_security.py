"""The manifest's security settings: mTLS mode, trust domain, per-service authorization
policies and topic policies; malformed and hostile input answered with file, line, key."""

from __future__ import annotations

import pytest

from shoal.config import ManifestError, parse_manifest
from shoal.errors import Forbidden

GOOD = """
security: {mtls: permissive, trust_domain: shop.example}
services:
  orders:
    app: shop.orders:svc
    policies:
      - {name: no-admin, action: deny, paths: [{prefix: /admin}]}
      - {name: from-gateway, action: allow, from: [shoal-gateway], methods: [post]}
      - {name: peers, action: allow, from: [billing, "spiffe://other.org/svc/x"],
         paths: [{exact: /orders/a/../b}]}
    topics: {publish: [orders], subscribe: ["payments.*"]}
  billing: {app: shop.billing:svc, policies: []}
"""


def test_security_section_and_policies_are_read() -> None:
    m = parse_manifest(GOOD)
    assert (m.security.mtls, m.security.trust_domain) == ("permissive", "shop.example")
    policy = m.services["orders"].authorization("orders", m.security.trust_domain)
    assert policy is not None
    gw = "spiffe://shop.example/svc/shoal-gateway"
    billing = "spiffe://shop.example/svc/billing"
    assert policy.decide(gw, "POST", "/orders").rule == "from-gateway"
    assert policy.decide(gw, "POST", "/admin/x").rule == "no-admin"  # DENY first
    assert not policy.decide(gw, "POST", "/admin/x").allowed
    assert policy.decide(billing, "GET", "/orders/b").allowed  # the normalized path
    assert policy.decide(billing, "GET", "/orders/c").rule == "default-deny"
    assert policy.decide(None, "POST", "/orders").rule == "default-deny"  # from: needs a peer
    assert m.services["billing"].authorization("billing") is not None
    assert m.services["billing"].topic_policy("billing") is None  # unrestricted


def test_topic_policy_of_a_service() -> None:
    m = parse_manifest(GOOD)
    topics = m.services["orders"].topic_policy("orders", "shop.example")
    assert topics is not None
    me = "spiffe://shop.example/svc/orders"
    topics.check(me, "publish", "orders")
    topics.check(me, "subscribe", "payments.settled")
    topics.check(me, "publish", "payments.settled.dlq")  # dead letters follow subscribe
    with pytest.raises(Forbidden, match=r"may not publish to topic 'payments\.settled'"):
        topics.check(me, "publish", "payments.settled")
    with pytest.raises(Forbidden, match="topics are closed unless named"):
        topics.check(me, "subscribe", "inventory")
    with pytest.raises(Forbidden):
        topics.check("spiffe://shop.example/svc/billing", "publish", "orders")


def test_every_unknown_source_is_reported_on_its_own_line() -> None:
    text = ("services:\n  a:\n    app: m:s\n    policies:\n"
            "      - {name: x, action: allow, from: [nope, a, shoal-control, '*']}\n"
            "      - {name: y, action: deny, from: [gone, 'spiffe://other.org/svc/z']}\n")
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "m.yaml")
    assert [(i.line, i.key) for i in info.value.issues] == [
        (5, "services.a.policies[0].from"), (6, "services.a.policies[1].from")]
    assert "'nope' is not a service of this manifest" in str(info.value)


def test_defaults_are_strict_in_the_default_trust_domain() -> None:
    m = parse_manifest("services: {a: {app: m:s}}\n")
    assert (m.security.mtls, m.security.trust_domain) == ("strict", "shoal.local")
    assert m.services["a"].authorization("a") is None


@pytest.mark.parametrize(("text", "expected"), [
    ("security: {trust_domain: Bad_Domain}\n",
     "line 1: security.trust_domain: expected a lowercase name like 'shoal.local'"),
    ("security: {trust_domain: 7}\n", "line 1: security.trust_domain: expected a lowercase"),
    ("security: {trust_domian: x}\n",
     "line 1: security.trust_domian: unknown key (did you mean 'trust_domain'?)"),
    ("services:\n  a:\n    app: m:s\n    policies: {a: 1}\n",
     "line 4: services.a.policies: expected a list, got a mapping"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: x, action: maybe}\n",
     "line 5: services.a.policies[0].action: expected allow or deny, got 'maybe'"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - x\n",
     "line 5: services.a.policies[0]: expected a mapping (a rule), got str"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: x, action: allow}\n"
     "      - {name: x, action: deny}\n",
     "line 6: services.a.policies[1].name: 'x' is already used"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: x, action: allow,\n"
     "         from: [Not A Service]}\n",
     "services.a.policies[0].from: service name: expected a lowercase name"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: x, action: allow,\n"
     "         methods: [FETCH]}\n",
     "services.a.policies[0].methods: expected an HTTP method like GET, got 'FETCH'"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: x, action: deny,\n"
     "         paths: [{regex: .*}]}\n",
     "services.a.policies[0].paths[0]: expected {exact: /path} or {prefix: /path}"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: x, action: deny, "
     "paths: [{exact: 'no-slash'}]}\n",
     "line 5: services.a.policies[0].paths[0].exact:"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: x, action: deny, wen: 1}\n",
     "line 5: services.a.policies[0]: unknown key 'wen'"),
    ("services:\n  a:\n    app: m:s\n    policies:\n      - {name: \"\\x01\", action: deny}\n",
     "services.a.policies[0].name: expected a printable ASCII name"),
    ("services:\n  a:\n    app: m:s\n    topics: {publish: orders}\n",
     "line 4: services.a.topics.publish: expected a list, got a string"),
    ("services:\n  a:\n    app: m:s\n    topics: {publish: ['a*b']}\n",
     "line 4: services.a.topics.publish[0]: expected a topic name, 'prefix.*' or '*'"),
    ("services:\n  a:\n    app: m:s\n    topics: {subscirbe: [x]}\n",
     "line 4: services.a.topics.subscirbe: unknown key (did you mean 'subscribe'?)"),
    ("services:\n  a:\n    app: m:s\n    topics: [x]\n",
     "line 4: services.a.topics: expected a mapping, got a list"),
    ("services:\n  orders-view:\n    app: m:s\n    policies:\n      - {name: x, action: allow,"
     " from: [ordrs]}\n  orders: {app: m:s}\n",
     "line 5: services.orders-view.policies[0].from: 'ordrs' is not a service of this "
     "manifest (did you mean 'orders'?)"),
    ("services:\n  a-b:\n    app: m:s\n    policies:\n      - {name: x, action: alow}\n",
     "line 5: services.a-b.policies[0].action: expected allow or deny, got 'alow'"),
    ("services:\n  shoal-gateway: {app: m:s}\n",
     "line 2: services.shoal-gateway: service name 'shoal-gateway' is reserved"),
])
def test_malformed_security_is_refused_naming_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text)
    assert expected in str(info.value), str(info.value)
    assert str(info.value).startswith("shoal.yaml, line ")


def test_oversized_and_hostile_policies_are_refused_quickly() -> None:
    many = "".join(f"      - {{name: r{i}, action: deny}}\n" for i in range(1100))
    with pytest.raises(ManifestError, match=r"services\.a\.policies: too many entries"):
        parse_manifest("services:\n  a:\n    app: m:s\n    policies:\n" + many)
    long_topic = "t" * 300
    with pytest.raises(ManifestError, match=r"topics.subscribe\[0\]: expected a topic name"):
        parse_manifest(f"services:\n  a:\n    app: m:s\n    topics: {{subscribe: [{long_topic}]}}"
                       "\n")
    bomb = ("x-a: &a [{name: r, action: deny}]\nservices:\n  a:\n    app: m:s\n"
            "    policies: [*a, *a, *a]\n")
    with pytest.raises(ManifestError, match=r"services.a.policies\[0\]: expected a mapping"):
        parse_manifest(bomb)
