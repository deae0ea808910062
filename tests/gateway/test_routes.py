"""Gateway routing, deterministically: matchers, order, rewrites, splits, overlaps, bad config."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import ConfigError
from shoal.gateway.routes import (
    MAX_PATH,
    NO_FAULT,
    Destination,
    FaultDecision,
    HeaderEdits,
    InvalidPath,
    RouteTable,
    compile_regex,
    merge_policy,
    normalize_host,
    normalize_path,
)


def table(*routes: dict[str, Any]) -> RouteTable:
    return RouteTable.from_config(list(routes))


def route(name: str, service: str = "svc", **fields: Any) -> dict[str, Any]:
    return {"name": name, "service": service, **fields}


def name_of(t: RouteTable, method: str = "GET", host: str = "example.com", path: str = "/",
            headers: Any = None, query: str | None = None) -> str | None:
    m = t.match(method, host, path, headers, query)
    return None if m is None else m.route.name


class NoDraw(random.Random):
    """An rng that fails the test if it is used."""

    def random(self) -> float:
        raise AssertionError("rng drawn")


# -- paths and hosts ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "normal"), [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/a/..", "/"),
    ("/a/.", "/a/"),
    ("/a/b/../", "/a/"),
    ("/a//b", "/a//b"),  # repeated slashes are kept
    ("/.well-known/x", "/.well-known/x"),
    ("/%61pi/%7Euser", "/api/~user"),  # unreserved characters decoded
    ("/a%2fb", "/a%2Fb"),  # others kept, upper-cased: an encoded '/' splits no segment
    ("/a%20b", "/a%20b"),
    ("/a/%2E%2e/b", "/b"),  # encoded dots are dots
    ("/caf%C3%A9", "/caf%C3%A9"),
])
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal
    assert normalize_path(normal) == normal


@pytest.mark.parametrize(("raw", "why", "status"), [
    ("", "must start with '/'", 400),
    ("api/x", "must start with '/'", 400),
    ("/..", "climbs above the root", 400),
    ("/a/../..", "climbs above the root", 400),
    ("/%2e%2e/etc/passwd", "climbs above the root", 400),
    ("/a\x00b", "NUL", 400),
    ("/a%00b", "encoded NUL", 400),
    ("/a b", "' '", 400),
    ("/a\r\nb", "'\\r'", 400),
    ("/a%zzb", "malformed percent-escape", 400),
    ("/a%4", "malformed percent-escape", 400),
    ("/" + "a" * MAX_PATH, "longer than", 414),
])
def test_normalize_path_refuses(raw: str, why: str, status: int) -> None:
    with pytest.raises(InvalidPath, match="invalid path") as info:
        normalize_path(raw)
    assert why in str(info.value)
    assert info.value.status == status


@pytest.mark.parametrize(("raw", "normal"), [
    ("Example.COM", "example.com"),
    ("example.com:8080", "example.com"),
    ("example.com.", "example.com"),
    ("[::1]:8443", "[::1]"),
    ("10.0.0.1:80", "10.0.0.1"),
])
def test_normalize_host(raw: str, normal: str) -> None:
    assert normalize_host(raw) == normal


# -- matchers -------------------------------------------------------------------------------


def test_exact_path() -> None:
    t = table(route("x", match={"path": {"exact": "/health"}}))
    assert name_of(t, path="/health") == "x"
    assert name_of(t, path="/health?verbose=1") == "x"
    for path in ("/health/", "/healthz", "/health/x", "/"):
        assert name_of(t, path=path) is None


def test_prefix_is_segment_aware() -> None:
    t = table(route("api", match={"path": {"prefix": "/api"}}))
    for path in ("/api", "/api/", "/api/x", "/api/x/y", "/%61pi/x", "/x/../api/y"):
        assert name_of(t, path=path) == "api", path
    for path in ("/apix", "/ap", "/", "/x/api", "/api%2Fx"):
        assert name_of(t, path=path) is None, path


def test_prefix_trailing_slash_is_ignored() -> None:
    t = table(route("api", match={"path": {"prefix": "/api/"}}))
    assert name_of(t, path="/api") == "api"
    assert name_of(t, path="/api/v1") == "api"
    assert name_of(t, path="/apiv1") is None


def test_regex_is_anchored_and_sees_the_normalized_path() -> None:
    t = table(route("user", match={"path": {"regex": "/users/[0-9]+"}}))
    assert name_of(t, path="/users/42") == "user"
    assert name_of(t, path="/users/%34%32") == "user"
    assert name_of(t, path="/users/7/../42") == "user"
    for path in ("/users/42/x", "/x/users/42", "/users/", "/users/4a"):
        assert name_of(t, path=path) is None, path


def test_normalized_path_is_forwarded() -> None:
    t = table(route("public", match={"path": {"prefix": "/public"}}),
              route("admin", match={"path": {"prefix": "/admin"}}))
    m = t.match("GET", "h", "/public/%2e%2e/admin/users")
    assert m is not None and m.route.name == "admin" and m.path == "/admin/users"


def test_invalid_request_path_raises_invalid_path() -> None:
    t = table(route("all"))
    with pytest.raises(InvalidPath):
        t.match("GET", "h", "/../etc/passwd")
    with pytest.raises(InvalidPath):
        t.match("GET", "h", "/x%00")


def test_host_exact_wildcard_and_list() -> None:
    t = table(route("shop", match={"host": "shop.example.com"}),
              route("wild", match={"host": "*.example.com"}),
              route("list", match={"host": ["a.test", "B.test"]}))
    assert name_of(t, host="shop.example.com") == "shop"
    assert name_of(t, host="SHOP.Example.com:8080") == "shop"
    assert name_of(t, host="shop.example.com.") == "shop"
    assert name_of(t, host="api.example.com") == "wild"
    assert name_of(t, host="a.b.example.com") == "wild"
    assert name_of(t, host="example.com") is None
    assert name_of(t, host="badexample.com") is None
    assert name_of(t, host="b.test") == "list"
    assert name_of(t, host="c.test") is None


def test_star_host_matches_any() -> None:
    t = table(route("any", match={"host": "*", "path": {"prefix": "/x"}}))
    assert name_of(t, host="whatever", path="/x") == "any"


def test_methods() -> None:
    t = table(route("read", match={"methods": ["get", "HEAD"]}), route("write"))
    assert name_of(t, "GET") == "read"
    assert name_of(t, "HEAD") == "read"
    assert name_of(t, "POST") == "write"
    assert name_of(t, "get") == "write"  # methods are case-sensitive on the wire


def test_header_matchers() -> None:
    t = table(
        route("exact", match={"headers": {"X-Canary": "1"}}),
        route("regex", match={"headers": {"x-user": {"regex": "[0-9]+"}}}),
        route("present", match={"headers": {"x-debug": {"present": True}}}),
        route("absent", match={"headers": {"authorization": {"present": False}}}),
        route("rest"),
    )
    assert name_of(t, headers={"x-canary": "1"}) == "exact"
    assert name_of(t, headers=[(b"X-CANARY", b"1")]) == "exact"
    assert name_of(t, headers={"x-canary": "2", "authorization": "t"}) == "rest"
    assert name_of(t, headers={"x-user": "123", "authorization": "t"}) == "regex"
    assert name_of(t, headers={"x-user": "12a", "authorization": "t"}) == "rest"
    assert name_of(t, headers={"x-debug": "", "authorization": "t"}) == "present"
    assert name_of(t, headers={}) == "absent"
    assert name_of(t, headers=None) == "absent"
    assert name_of(t, headers={"authorization": "t"}) == "rest"


def test_repeated_headers_are_joined() -> None:
    t = table(route("both", match={"headers": {"x-tag": "a, b"}}), route("rest"))
    assert name_of(t, headers=[("x-tag", "a"), ("X-Tag", "b")]) == "both"
    assert name_of(t, headers=[("x-tag", "a")]) == "rest"


def test_query_matchers() -> None:
    t = table(
        route("exact", match={"query": {"debug": "1"}}),
        route("present", match={"query": {"preview": {"present": True}}}),
        route("decoded", match={"query": {"q": "a b"}}),
        route("rest"),
    )
    assert name_of(t, path="/x?debug=1") == "exact"
    assert name_of(t, path="/x", query="debug=1") == "exact"
    assert name_of(t, path="/x?debug=1&debug=2") == "exact"  # the first value counts
    assert name_of(t, path="/x?debug=2&debug=1") == "rest"
    assert name_of(t, path="/x?preview") == "present"
    assert name_of(t, path="/x?preview=&a=b") == "present"
    assert name_of(t, path="/x?q=a+b") == "decoded"
    assert name_of(t, path="/x?q=a%20b") == "decoded"
    assert name_of(t, path="/x?debugx=1") == "rest"


def test_bytes_inputs() -> None:
    t = table(route("x", match={"methods": ["POST"], "host": "h.test",
                                 "path": {"exact": "/a"}, "query": {"k": "v"}}))
    m = t.match(b"POST", b"h.test", b"/a?k=v", [(b"content-type", b"x")])
    assert m is not None and m.route.name == "x" and m.target == "/a?k=v"


# -- order ----------------------------------------------------------------------------------


def test_first_match_wins_in_declared_order() -> None:
    get_api = route("get-api", match={"methods": ["GET"], "path": {"prefix": "/api"}})
    users = route("users", match={"path": {"prefix": "/api/users"}})
    t = table(get_api, users)
    assert name_of(t, "GET", path="/api/users/1") == "get-api"
    assert name_of(t, "POST", path="/api/users/1") == "users"
    flipped = table(users, get_api)
    assert name_of(flipped, "GET", path="/api/users/1") == "users"
    assert name_of(flipped, "GET", path="/api/orders") == "get-api"


def test_order_across_index_kinds() -> None:
    """Exact, prefix, regex and catch-all routes interleave exactly as declared."""
    t = table(
        route("regex-first", match={"path": {"regex": "/a/b/[0-9]+"}, "methods": ["PUT"]}),
        route("prefix", match={"path": {"prefix": "/a"}, "headers": {"x": "1"}}),
        route("exact", match={"path": {"exact": "/a/b/1"}}),
        route("deeper", match={"path": {"prefix": "/a/b"}}),
        route("catch-all", match={"methods": ["GET", "PUT", "POST"]}),
    )
    assert name_of(t, "PUT", path="/a/b/1", headers={"x": "1"}) == "regex-first"
    assert name_of(t, "GET", path="/a/b/1", headers={"x": "1"}) == "prefix"
    assert name_of(t, "GET", path="/a/b/1") == "exact"
    assert name_of(t, "GET", path="/a/b/2") == "deeper"
    assert name_of(t, "GET", path="/a/c") == "catch-all"
    assert name_of(t, "DELETE", path="/a/c") is None


# -- rewrites and header edits --------------------------------------------------------------


@pytest.mark.parametrize(("match", "rewrite", "path", "expected"), [
    ({"prefix": "/v1"}, "/", "/v1/users", "/users"),
    ({"prefix": "/v1"}, "/", "/v1", "/"),
    ({"prefix": "/v1"}, "/", "/v1/", "/"),
    ({"prefix": "/v1"}, "/v2", "/v1/users", "/v2/users"),
    ({"prefix": "/v1"}, "/v2", "/v1", "/v2"),
    ({"prefix": "/v1"}, "/v2/", "/v1/users", "/v2/users"),
    ({"exact": "/old"}, "/new/place", "/old", "/new/place"),
    (None, "/app", "/users", "/app/users"),
    (None, "/app", "/", "/app"),
])
def test_prefix_rewrite(match: Any, rewrite: str, path: str, expected: str) -> None:
    spec = {"path": match} if match else {}
    t = table(route("r", match=spec, rewrite={"prefix": rewrite}))
    m = t.match("GET", "h", path + "?q=1")
    assert m is not None
    assert m.path == expected
    assert m.target == f"{expected}?q=1"


def test_regex_rewrite_and_host_rewrite() -> None:
    t = table(route("r", match={"path": {"prefix": "/users"}},
                    rewrite={"regex": {"pattern": r"/users/(?P<id>[0-9]+)/profile",
                                       "substitution": r"/profiles/\g<id>"},
                             "host": "Profiles.Internal"}))
    m = t.match("GET", "shop.example.com:8080", "/users/42/profile")
    assert m is not None and m.path == "/profiles/42" and m.host == "profiles.internal"
    m = t.match("GET", "shop.example.com:8080", "/users/42")  # no match: path unchanged
    assert m is not None and m.path == "/users/42"


def test_host_is_kept_as_received_without_rewrite() -> None:
    m = table(route("r")).match("GET", "Shop.Example.com:8080", "/")
    assert m is not None and m.host == "Shop.Example.com:8080"


def test_header_edits() -> None:
    t = table(route("r", headers={
        "request": {"set": {"X-Route": "r", "x-version": 2}, "add": {"via": ["a", "b"]},
                    "remove": ["X-Debug"]},
        "response": {"remove": "server", "add": {"x-served-by": "shoal"}}}))
    m = t.match("GET", "h", "/")
    assert m is not None
    out = m.request_headers.apply([("Accept", "*/*"), ("x-debug", "1"), ("X-Route", "old"),
                                   ("via", "client")])
    assert out == [("Accept", "*/*"), ("via", "client"), ("x-route", "r"), ("x-version", "2"),
                   ("via", "a"), ("via", "b")]
    raw = m.request_headers.apply_bytes([(b"X-Debug", b"1"), (b"Host", b"h")])
    assert raw == [(b"Host", b"h"), (b"x-route", b"r"), (b"x-version", b"2"), (b"via", b"a"),
                   (b"via", b"b")]
    assert m.response_headers.apply([("Server", "x"), ("date", "d")]) == [
        ("date", "d"), ("x-served-by", "shoal")]
    assert not HeaderEdits() and m.request_headers


# -- destinations, mirror, fault ------------------------------------------------------------


def test_weighted_split_distribution() -> None:
    rt = RouteTable.from_config([{"name": "canary", "destinations": [
        {"service": "orders", "subset": {"version": "v1"}, "weight": 90},
        {"service": "orders", "subset": {"version": "v2"}, "weight": 10},
        {"service": "orders", "subset": {"version": "v3"}, "weight": 0}]}])
    m = rt.match("GET", "h", "/")
    assert m is not None
    rng = random.Random(7)
    picks = [m.choose_destination(rng) for _ in range(10_000)]
    v2 = sum(d.labels == {"version": "v2"} for d in picks)
    assert 900 <= v2 <= 1100  # 10% within 1 point (about 3 standard deviations)
    assert not any(d.labels == {"version": "v3"} for d in picks)
    assert {d.service for d in picks} == {"orders"}
    again = [m.choose_destination(random.Random(7)) for _ in range(3)]
    assert again == [picks[0]] * 3  # deterministic with a seeded rng


def test_equal_split_without_weights_and_single_destination() -> None:
    rt = RouteTable.from_config([{"destinations": [{"service": "a"}, {"service": "b"}]}])
    m = rt.match("GET", "h", "/")
    assert m is not None
    rng = random.Random(1)
    a = sum(m.choose_destination(rng).service == "a" for _ in range(10_000))
    assert 4800 <= a <= 5200
    one = table(route("one", service="orders")).match("GET", "h", "/")
    assert one is not None
    assert one.choose_destination(NoDraw()) == Destination("orders")


def test_subset_destination() -> None:
    rt = RouteTable.from_config([{"destinations": [
        {"service": "orders", "subset": {"version": "v2", "zone": "eu"}}]}])
    d = rt.routes[0].destinations[0]
    assert d.labels == {"version": "v2", "zone": "eu"}
    assert d.describe() == "orders{version=v2,zone=eu}"


def test_mirror_percentages() -> None:
    def mirror(percent: float) -> Any:
        m = table(route("m", mirror={"service": "shadow", "subset": {"version": "v3"},
                                     "percent": percent})).match("GET", "h", "/")
        assert m is not None
        return m

    assert not any(mirror(0).should_mirror(NoDraw()) for _ in range(100))
    assert all(mirror(100).should_mirror(NoDraw()) for _ in range(100))
    m = mirror(25)
    rng = random.Random(3)
    hits = sum(m.should_mirror(rng) for _ in range(10_000))
    assert 2300 <= hits <= 2700
    assert m.route.mirror is not None
    assert m.route.mirror.destination == Destination("shadow", (("version", "v3"),))
    plain = table(route("p")).match("GET", "h", "/")
    assert plain is not None and not plain.should_mirror(NoDraw())


def test_fault_decisions() -> None:
    m = table(route("chaos", fault={"delay": {"percent": 50, "fixed": "250ms"},
                                    "abort": {"percent": 10, "status": 503}})
              ).match("GET", "h", "/")
    assert m is not None
    rng = random.Random(11)
    decisions = [m.fault_decision(rng) for _ in range(10_000)]
    delayed = sum(d.delay == 0.25 for d in decisions)
    aborted = sum(d.abort == 503 for d in decisions)
    assert 4800 <= delayed <= 5200
    assert 850 <= aborted <= 1150
    assert {d.delay for d in decisions} == {0.0, 0.25}
    both = sum(bool(d.delay) and d.abort is not None for d in decisions)
    assert 350 <= both <= 650  # independent draws: about 5%
    always = table(route("a", fault={"abort": {"status": 418}})).match("GET", "h", "/")
    assert always is not None and always.fault_decision(NoDraw()) == FaultDecision(abort=418)
    none = table(route("n")).match("GET", "h", "/")
    assert none is not None and none.fault_decision(NoDraw()) is NO_FAULT


# -- policy ---------------------------------------------------------------------------------


def test_route_policy() -> None:
    rt = table(route("p", timeout="2s", retries={"attempts": 1, "retry_on": "5xx"},
                     load_balancer={"policy": "round_robin"}))
    policy = rt.routes[0].policy
    assert policy.timeouts.request == 2.0
    assert policy.retries.attempts == 1 and policy.retries.retry_on == ("5xx",)
    assert policy.load_balancer.policy == "round_robin"
    m = rt.match("GET", "h", "/")
    assert m is not None and m.policy is policy


def test_merge_policy_key_by_key() -> None:
    service = {"timeouts": {"request": "10s", "connect": "1s"},
               "retries": {"attempts": 3, "retry_on": ["5xx"]},
               "circuit_breaker": {"consecutive_failures": 7},
               "load_balancer": {"policy": "peak_ewma", "decay": "5s"}}
    policy = merge_policy(service, {"timeout": "2s", "retries": {"attempts": 1}})
    assert policy.timeouts.request == 2.0 and policy.timeouts.connect == 1.0
    assert policy.retries.attempts == 1 and policy.retries.retry_on == ("5xx",)
    assert policy.circuit_breaker.consecutive_failures == 7
    assert policy.load_balancer.policy == "peak_ewma"
    assert policy.load_balancer.options == {"decay": "5s"}
    # same balancer: options merge; another balancer: the section is replaced whole
    same = merge_policy(service, {"load_balancer": {"policy": "peak_ewma", "decay": "1s"}})
    assert same.load_balancer.options == {"decay": "1s"}
    other = merge_policy(service, {"load_balancer": {"policy": "round_robin"}})
    assert other.load_balancer.policy == "round_robin" and other.load_balancer.options == {}
    assert merge_policy(None, None).retries.attempts == 2  # the defaults
    assert merge_policy(service, None).retries.attempts == 3


def test_route_policy_for_service() -> None:
    rt = table(route("p", retries={"per_try_timeout": "500ms"}))
    policy = rt.routes[0].policy_for({"retries": {"attempts": 4}, "timeout": "9s"})
    assert policy.retries.attempts == 4 and policy.retries.per_try_timeout == 0.5
    assert policy.timeouts.request == 9.0


def test_merge_policy_fails_loudly() -> None:
    with pytest.raises(ConfigError, match=r"retriez: unknown key \(did you mean 'retries'\?\)"):
        merge_policy({"retriez": {}}, None)
    with pytest.raises(ConfigError, match=r"timeout: give timeout or timeouts\.request"):
        merge_policy(None, {"timeout": "1s", "timeouts": {"request": "2s"}})


# -- overlaps -------------------------------------------------------------------------------


@pytest.mark.parametrize(("earlier", "later"), [
    ({"path": {"prefix": "/api"}}, {"path": {"prefix": "/api"}}),  # identical
    ({}, {"path": {"exact": "/x"}}),  # catch-all first
    ({"path": {"prefix": "/"}}, {"path": {"prefix": "/api"}}),
    ({"path": {"prefix": "/api"}}, {"path": {"prefix": "/api/x"}}),
    ({"path": {"prefix": "/api"}}, {"path": {"exact": "/api/users"}}),
    ({"path": {"prefix": "/api"}}, {"path": {"regex": "/api/v[0-9]+"}}),
    ({"path": {"regex": "/u/[0-9]+"}}, {"path": {"exact": "/u/42"}}),
    ({"path": {"prefix": "/a"}}, {"path": {"prefix": "/a/b"}, "methods": ["GET"]}),
    ({"host": "*.example.com"}, {"host": "shop.example.com", "path": {"prefix": "/x"}}),
    ({"host": "*.example.com"}, {"host": "*.eu.example.com"}),
    ({"headers": {"x-canary": {"present": True}}}, {"headers": {"x-canary": "1"}}),
    ({"headers": {"x-user": {"regex": "[0-9]+"}}}, {"headers": {"x-user": "42", "y": "1"}}),
    ({"query": {"v": {"present": True}}}, {"query": {"v": "2"}, "methods": ["GET"]}),
    ({"methods": ["GET", "POST"]}, {"methods": ["GET"]}),
])
def test_shadowed_route_is_an_error_naming_both(earlier: dict[str, Any],
                                                later: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        table(route("broad", match=earlier), route("narrow", match=later))
    message = str(info.value)
    assert "route 'narrow' (routes[1])" in message and "can never match" in message
    assert "route 'broad' (routes[0])" in message


def test_every_shadowed_route_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        table(route("all"), route("a", match={"path": {"exact": "/a"}}),
              route("b", match={"methods": ["GET"]}))
    assert "route 'a'" in str(info.value) and "route 'b'" in str(info.value)


@pytest.mark.parametrize(("earlier", "later"), [
    ({"headers": {"x-canary": "1"}}, {}),  # specific first
    ({"path": {"exact": "/api/health"}}, {"path": {"prefix": "/api"}}),
    ({"methods": ["GET"], "path": {"prefix": "/api"}}, {"path": {"prefix": "/api"}}),
    ({"path": {"regex": "/api/v[0-9]+/.*"}}, {"path": {"prefix": "/api"}}),
    ({"path": {"prefix": "/api"}}, {"path": {"prefix": "/apix"}}),  # disjoint
    ({"path": {"prefix": "/api"}}, {"path": {"regex": "/apix/.*"}}),
    ({"path": {"regex": "/a/[0-9]+"}}, {"path": {"regex": "/b/[0-9]+"}}),
    ({"host": "a.test"}, {"host": "b.test"}),
    ({"host": "*.a.test"}, {"host": "a.test"}),
    ({"headers": {"auth": {"present": False}}}, {"headers": {"auth": {"present": True}}}),
    ({"headers": {"v": "1"}}, {"headers": {"v": {"regex": "[2-9]"}}}),
    ({"query": {"v": "1"}}, {"query": {"v": "2"}}),
    ({"methods": ["GET"]}, {"methods": ["POST"]}),
    # a narrower path first, other conditions broader: how first-match-wins tables read
    ({"path": {"prefix": "/api/users"}}, {"host": "*.example.com", "methods": ["GET"]}),
])
def test_no_report_for_narrower_first_or_disjoint(earlier: dict[str, Any],
                                                  later: dict[str, Any]) -> None:
    assert table(route("a", match=earlier), route("b", match=later)).overlaps() == []


@pytest.mark.parametrize(("earlier", "later", "certain"), [
    ({"methods": ["GET"], "path": {"prefix": "/api"}}, {"path": {"prefix": "/api/users"}},
     True),
    ({"host": ["a.test", "b.test"]}, {"host": ["b.test", "c.test"]}, True),
    ({"headers": {"x": "1"}}, {"query": {"y": "1"}}, True),
    ({"methods": ["GET", "PUT"]}, {"methods": ["PUT", "POST"]}, True),
    ({"path": {"prefix": "/api"}}, {"path": {"regex": "/api(/.*)?"}}, False),
    ({"path": {"regex": "/api/[a-z]+"}}, {"path": {"regex": "/api/v[0-9]+"}}, False),
    ({"headers": {"u": {"regex": "[0-9]+"}}}, {"headers": {"u": {"regex": "[0-5]+"}}}, False),
])
def test_partial_overlaps_are_reported(earlier: dict[str, Any], later: dict[str, Any],
                                       certain: bool) -> None:
    t = table(route("first", match=earlier), route("second", match=later))
    [overlap] = t.overlaps()
    assert overlap.earlier.name == "first" and overlap.later.name == "second"
    assert overlap.certain is certain
    text = str(overlap)
    assert "route 'first' (routes[0])" in text and "route 'second' (routes[1])" in text
    assert ("may take" in text) is not certain


# -- malformed config -----------------------------------------------------------------------

MALFORMED: list[tuple[Any, list[str]]] = [
    ({"name": "a"}, ["gateway.routes: "]),  # not a list
    ("routes", ["gateway.routes: expected a list of routes"]),
    (["x"], ["routes[0]: expected a mapping (a route)"]),
    ([{"name": "r", "service": "a", "matchh": {}}],
     ["route 'r' (routes[0])", "matchh: unknown key (did you mean 'match'?)"]),
    ([{"service": "a", "match": {"paths": {}}}],
     ["routes[0]", "match.paths: unknown key (did you mean 'path'?)"]),
    ([{"service": "a", "match": {"path": "/api"}}], ["match.path: expected a mapping"]),
    ([{"service": "a", "match": {"path": {"prefix": "api"}}}],
     ["match.path.prefix: must start with '/'"]),
    ([{"service": "a", "match": {"path": {"exact": "/a/../../b"}}}],
     ["match.path.exact", "climbs above the root"]),
    ([{"service": "a", "match": {"path": {"exact": "/a?b=1"}}}], ["match.query"]),
    ([{"service": "a", "match": {"path": {"prefix": "/a", "exact": "/b"}}}],
     ["match.path: give exactly one of exact, prefix, regex"]),
    ([{"name": "r", "service": "a", "match": {"path": {"regex": "/users/([0-9]+"}}}],
     ["route 'r' (routes[0])", "match.path.regex: invalid regular expression"]),
    ([{"service": "a", "match": {"path": {"regex": "/(a+)+"}}}],
     ["match.path.regex", "grows exponentially"]),
    ([{"service": "a", "match": {"path": {"regex": "/.*/.*x"}}}],
     ["match.path.regex", "two repeats"]),
    ([{"service": "a", "match": {"path": {"regex": r"/(a)\1"}}}], ["backreference"]),
    ([{"service": "a", "match": {"path": {"regex": "/" + "a" * 2000}}}],
     ["match.path.regex", "more than 1024"]),
    ([{"service": "a", "match": {"headers": {"x": {"regex": "(x|y|xy)+"}}}}],
     ["match.headers.x.regex", "alternatives"]),
    ([{"service": "a", "match": {"headers": {"bad header": "1"}}}],
     ["match.headers", "not a valid header name"]),
    ([{"service": "a", "match": {"headers": {"x": {"present": "yes"}}}}],
     ["match.headers.x.present: must be true or false"]),
    ([{"service": "a", "match": {"headers": {"x": {"exact": "1", "regex": "1"}}}}],
     ["match.headers.x: give exactly one"]),
    ([{"service": "a", "match": {"query": {"v": {"prefix": "1"}}}}],
     ["match.query.v.prefix: unknown key"]),
    ([{"service": "a", "match": {"host": "example.com:8080"}}],
     ["match.host", "without the port"]),
    ([{"service": "a", "match": {"host": ["a.test", "b..test"]}}], ["match.host[1]"]),
    ([{"service": "a", "match": {"methods": []}}], ["match.methods: expected a non-empty"]),
    ([{"name": "r", "destinations": [{"service": "a", "weight": 1},
                                     {"service": "b", "weight": -1}]}],
     ["route 'r' (routes[0])", "destinations[1].weight: must be a number >= 0"]),
    ([{"destinations": [{"service": "a", "weight": 0}, {"service": "b", "weight": 0}]}],
     ["routes[0]: destinations: weights sum to 0"]),
    ([{"destinations": [{"service": "a", "weight": 1}, {"service": "b"}]}],
     ["destinations: give every destination a weight, or none"]),
    ([{"destinations": []}], ["destinations: expected a non-empty list"]),
    ([{"destinations": [{"service": "a", "subset": {"version": 1.10}}]}],
     ["destinations[0].subset.version: must be a string (quote it in YAML)"]),
    ([{"destinations": [{"service": "a", "wieght": 1}]}],
     ["destinations[0].wieght: unknown key (did you mean 'weight'?)"]),
    ([{"service": "Orders_!"}], ["service: service name 'Orders_!'"]),
    ([{"service": "a", "destinations": [{"service": "b"}]}],
     ["give service (one destination) or destinations, not both"]),
    ([{"name": "r"}], ["route 'r' (routes[0]): destinations: missing"]),
    ([{"service": "a", "timeout": "fast"}], ["timeout: expected a duration"]),
    ([{"service": "a", "timeout": 0}], ["timeout: must be a duration greater than zero"]),
    ([{"service": "a", "fault": {"delay": {"fixed": "soon"}}}],
     ["fault.delay.fixed: expected a duration"]),
    ([{"service": "a", "fault": {"delay": {"percent": 10}}}], ["fault.delay.fixed: missing"]),
    ([{"name": "r", "service": "a", "fault": {"abort": {"status": 600}}}],
     ["route 'r' (routes[0])", "fault.abort.status: must be an HTTP status 200-599"]),
    ([{"service": "a", "fault": {"abort": {"status": "503"}}}], ["fault.abort.status"]),
    ([{"service": "a", "fault": {"abort": {"status": 503, "percent": 101}}}],
     ["fault.abort.percent: must be a percentage between 0 and 100"]),
    ([{"service": "a", "mirror": {"service": "b", "percent": 150}}],
     ["mirror.percent: must be a percentage between 0 and 100"]),
    ([{"service": "a", "mirror": {"service": "b", "weight": 1}}],
     ["mirror.weight: unknown key"]),
    ([{"name": "r", "service": "a", "retries": {"atempts": 1}}],
     ["route 'r' (routes[0])", "retries.atempts: unknown key (did you mean 'attempts'?)"]),
    ([{"service": "a", "load_balancer": {"policy": "fastest"}}],
     ["load_balancer", "unknown load-balancing policy"]),
    ([{"service": "a", "rewrite": {"prefix": "/x", "regex": {"pattern": "/", "substitution": ""}}}],
     ["rewrite: give prefix or regex, not both"]),
    ([{"service": "a", "match": {"path": {"regex": "/x"}}, "rewrite": {"prefix": "/y"}}],
     ["rewrite.prefix: needs match.path.prefix or exact"]),
    ([{"service": "a", "rewrite": {"regex": {"pattern": "/(x)", "substitution": r"/\2"}}}],
     ["rewrite.regex.substitution", "invalid group reference"]),
    ([{"service": "a", "rewrite": {"host": "*.x.test"}}], ["rewrite.host: must be one host"]),
    ([{"service": "a", "headers": {"request": {"set": {"content-length": "0"}}}}],
     ["headers.request.set: header 'content-length' cannot be edited"]),
    ([{"service": "a", "headers": {"request": {"set": {"Host": "x"}}}}],
     ["change it with rewrite.host"]),
    ([{"service": "a", "headers": {"request": {"add": {"x": "a\r\nb"}}}}],
     ["headers.request.add.x", "without control characters"]),
    ([{"service": "a", "match": {"headers": {"X-A": "1", "x-a": "2"}}}],
     ["match.headers: 'x-a' is named twice"]),
    ([{"service": "a", "rewrite": {"regex": {"pattern": "/(x)", "substitution": "/a b"}}}],
     ["rewrite.regex.substitution: must be a string without spaces"]),
    ([{"service": "a", "headers": {"requests": {}}}],
     ["headers.requests: unknown key (did you mean 'request'?)"]),
    ([{"name": "r", "service": "a"}, {"name": "r", "service": "b", "match": {"methods": ["X"]}}],
     ["route 'r' (routes[1]): name already used by routes[0]"]),
]


@pytest.mark.parametrize(("config", "expected"), MALFORMED,
                         ids=[f"malformed-{i}" for i in range(len(MALFORMED))])
def test_malformed_config(config: Any, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        RouteTable.from_config(config)
    message = str(info.value)
    assert message.startswith("gateway.routes")
    for part in expected:
        assert part in message, message


def test_empty_and_missing_route_lists() -> None:
    assert len(RouteTable.from_config(None)) == 0
    assert RouteTable.from_config([]).match("GET", "h", "/") is None


@pytest.mark.parametrize("pattern", [
    "/api/v[0-9]+/users/[^/]+", "/api/.*", "/(en|fr)/.*", r".*\.(png|jpe?g)",
    "/files/.+/download", "/x/[a-z]+[0-9]*", r"(\.[0-9]{1,3}){3}", "/[a-z]+(/[a-z0-9]+)*",
    "/static/.*\\.[a-z]+", "(?i)/API/.*", r"/u/(?P<id>\d+)", "/.*+/x",
    ".*Mobile.*", ".*(iPhone|Android).*", "Bearer [A-Za-z0-9._~+/-]+=*", r"(?i)bearer\s+\S+",
    r"[a-z0-9-]+(\.[a-z0-9-]+)*", "/blog/[0-9]{4}/[0-9]{2}/[a-z0-9-]+",
])
def test_reasonable_regexes_are_accepted(pattern: str) -> None:
    assert compile_regex(pattern, what="r").pattern == pattern


# -- hostile input --------------------------------------------------------------------------


def hostile_table() -> RouteTable:
    return table(
        route("exact", match={"path": {"exact": "/a/b"}}),
        route("users", match={"path": {"regex": "/users/[0-9]+(/[a-z]+)*"}}),
        route("files", match={"path": {"regex": "/files/.*\\.txt"}}),
        route("hdr", match={"headers": {"x-user": {"regex": "[a-z0-9-]+(\\.[a-z0-9-]+)*"}}}),
        route("host", match={"host": "*.example.com", "path": {"prefix": "/a"}}),
        route("get", match={"methods": ["GET"], "query": {"q": {"present": True}}}),
    )


def test_long_inputs_are_not_slow() -> None:
    t = hostile_table()
    inputs = [
        ("/a" * (MAX_PATH // 2), "h", {}),
        ("/users/1" + "/abc" * 2000 + "1", "h", {}),
        ("/files/" + "a/" * 4000 + "x", "h", {}),
        ("/" + "%41" * (MAX_PATH // 3 - 1), "h", {}),
        ("/a/" + "./" * 4000, "h", {}),
        ("/x", "a." * 50_000 + "example.com", {}),
        ("/x", "h", {"x-user": "a." * 500_000 + "!"}),
        ("/x", "h", [("x-" + str(i), "v" * 100) for i in range(5000)]),
    ]
    start = time.perf_counter()
    for path, host, headers in inputs:
        for _ in range(5):
            t.match("GET", host, path, headers)
    assert time.perf_counter() - start < 1.0


def linear_match(t: RouteTable, method: str, host: str, path: str, headers: Any,
                 query: str) -> str | None:
    """The oracle: every route in order, no index."""
    norm = normalize_path(path)
    for r in t.routes:
        if r.matches(method, normalize_host(host), norm, headers, query):
            return r.name
    return None


segments = st.sampled_from(["a", "b", "api", "users", "1", "42", "files", "x.txt", ".", "..",
                            "%2e", "%2E%2e", "%41", "%2f", "%zz", "%", "", "~", "a b", "\x00"])
paths = st.one_of(
    st.text(max_size=60),
    st.lists(segments, max_size=8).map(lambda s: "/" + "/".join(s)),
)
header_names = st.sampled_from(["x-user", "X-User", "other", b"X-USER"]) | st.text() | st.binary()
header_lists = st.lists(st.tuples(header_names, st.text(max_size=20) | st.binary(max_size=20)),
                        max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "get"]) | st.text(max_size=10),
       host=st.sampled_from(["a.example.com", "h", "A.EXAMPLE.COM:80"]) | st.text(),
       path=paths, headers=header_lists,
       query=st.sampled_from(["", "q", "q=1&r=2"]) | st.text(max_size=20))
def test_match_never_raises_and_agrees_with_the_oracle(method: str, host: str, path: str,
                                                       headers: list[tuple[Any, Any]],
                                                       query: str) -> None:
    t = hostile_table()
    try:
        norm = normalize_path(path)
    except InvalidPath:
        with pytest.raises(InvalidPath):
            t.match(method, host, path, headers, query)
        return
    assert normalize_path(norm) == norm  # idempotent
    m = t.match(method, host, path, headers, query)
    assert (m.route.name if m else None) == linear_match(t, method, host, path, headers, query)
    assert name_of(t, method, host, norm, headers, query) == (m.route.name if m else None)


@settings(max_examples=200, deadline=None)
@given(path=st.text(max_size=200))
def test_normalize_path_only_raises_invalid_path(path: str) -> None:
    try:
        out = normalize_path(path)
    except InvalidPath:
        return
    assert out.startswith("/") and "\x00" not in out and normalize_path(out) == out
    assert "/../" not in out + "/" and "/./" not in out + "/"


ATOMS = ["a", "b", "/", ".", "[a-z]", "[^/]", r"\d", r"\w", "[ab]", "x", "ab"]
QUANTIFIERS = ["", "", "", "*", "+", "?", "{1,3}", "{2}", "*+"]


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    out = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.25 and depth < 2:
            inner = random_pattern(rng, depth + 1)
            if rng.random() < 0.3:
                inner += "|" + random_pattern(rng, depth + 1)
            atom = f"(?:{inner})"
        else:
            atom = rng.choice(ATOMS)
        out.append(atom + rng.choice(QUANTIFIERS))
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_accepted_regexes_stay_fast_on_hostile_input(seed: int) -> None:
    """What ``compile_regex`` accepts takes milliseconds on long repetitive input."""
    rng = random.Random(seed)
    pattern = random_pattern(rng)
    try:
        compiled = compile_regex(pattern, what="r")
    except ConfigError:
        return
    units = ["a", "b", "/", "1", ".", "x", "ab", "a/", "aab", "1a", "b/a", "x/"]
    for _ in range(4):
        unit = "".join(rng.choice(units) for _ in range(rng.randint(1, 3)))
        text = unit * (4000 // len(unit)) + rng.choice(["!", "", "/", "a"])
        start = time.perf_counter()
        compiled.fullmatch(text)
        assert time.perf_counter() - start < 0.05, (pattern, text[:20])


@pytest.mark.parametrize("pattern", [
    "(a+)+", "(a*)*", "(a?a)+", "(x|y|xy)+", "(?:[^/]?\\w{2})*", "(\\w+\\s?)+$",
    ".*.*x", "[ab]+[ab]a*", "\\w+.[^/]*[ab]", ".*Mobile.*x", "(?:.*a.*)+", "(a)\\1",
])
def test_catastrophic_regexes_are_refused(pattern: str) -> None:
    with pytest.raises(ConfigError, match="regular expression"):
        compile_regex(pattern, what="r")


# -- remembered decisions -----------------------------------------------------------------------
def test_decisions_are_remembered_with_the_query_of_each_request() -> None:
    t = table(route("api", match={"path": {"prefix": "/api"}},
                    rewrite={"prefix": "/v2", "host": "api.internal"}),
              route("rest", match={"methods": ["POST"]}))
    first = t.match("GET", "shop", b"/api/a", None, b"")
    assert first is not None and (first.path, first.host, first.query) == ("/v2/a", "api.internal",
                                                                          "")
    assert t.match("GET", "shop", b"/api/a", None, b"") is first  # remembered
    other = t.match("GET", "shop", b"/api/a", None, b"x=1&y=2")
    assert other is not None and other.route is first.route and other.query == "x=1&y=2"
    assert first.query == ""  # the remembered decision is not changed by a later query
    assert t.match("GET", "shop", b"/other", None, b"") is None
    assert t.match("POST", "shop", b"/other", None, b"")  # method is part of the key
    assert t.match("GET", "shop", b"/api/b", None, b"").path == "/v2/b"  # type: ignore[union-attr]


def test_refused_paths_are_refused_every_time() -> None:
    t = table(route("all"))
    for _ in range(3):
        with pytest.raises(InvalidPath):
            t.match("GET", "h", b"/a/../../etc", None, b"")


def test_remembered_decisions_are_bounded() -> None:
    from shoal.gateway.routes import MAX_DECISIONS

    t = table(route("all"))
    for i in range(MAX_DECISIONS * 3):
        assert t.match("GET", "h", f"/p{i}".encode(), None, b"") is not None
        assert len(t._decisions or {}) <= MAX_DECISIONS


def test_header_and_query_matchers_are_decided_per_request() -> None:
    t = table(route("canary", match={"headers": {"x-canary": "1"}}), route("stable"))
    assert name_of(t, headers=[(b"x-canary", b"1")], query="") == "canary"
    assert name_of(t, headers=[], query="") == "stable"
    assert name_of(t, headers=[(b"x-canary", b"1")], query="") == "canary"
    q = table(route("preview", match={"query": {"preview": {"present": True}}}), route("plain"))
    assert name_of(q, query="preview=1") == "preview" and name_of(q, query="") == "plain"
    assert name_of(q, query="preview=1") == "preview"
