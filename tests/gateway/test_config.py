"""shoal.gateway.config and shoal.yamlsafe: the gateway section loads, and every malformed,
oversized or hostile document is refused with the file, the line and the key."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.config import load_manifest
from shoal.errors import ConfigError
from shoal.gateway.config import (
    DEFAULT_ROUTES_KEY,
    ListenAddress,
    parse_gateway_config,
    parse_listen,
    parse_routes,
)
from shoal.gateway.routes import ROUTE_KEYS
from shoal.yamlsafe import MAX_YAML_BYTES, load_yaml

GOOD = """\
broker: sqlite:///x/events.db      # other sections belong to shoal.config
services: {orders: {app: "shop.orders:svc"}}
gateway:
  listen: [127.0.0.1:0, ":9000", "[::1]:8080", "unix:/tmp/gw.sock"]
  routes_key: my/routes
  drain: 2s
  limits: {max_body_bytes: 1MiB, header_timeout: 2s, max_connections: 100}
  services:
    orders: {timeout: 2s, retries: {attempts: 1}}
    billing:
  routes:
    - name: orders
      match: {path: {prefix: /api/orders}, methods: [GET, POST]}
      service: orders
    - {service: billing}
"""


def test_good_config_loads() -> None:
    c = parse_gateway_config(GOOD, "shoal.yaml")
    assert c.listen == (ListenAddress("127.0.0.1", 0), ListenAddress(None, 9000),
                        ListenAddress("::1", 8080), ListenAddress(path="/tmp/gw.sock"))
    assert [str(a) for a in c.listen] == ["127.0.0.1:0", "0.0.0.0:9000", "[::1]:8080",
                                          "unix:/tmp/gw.sock"]
    assert c.routes_key == "my/routes" and c.drain == 2.0
    assert c.limits.max_body_bytes == 1024 * 1024 and c.limits.header_timeout == 2.0
    assert c.limits.max_connections == 100
    assert c.services == {"orders": {"timeout": "2s", "retries": {"attempts": 1}},
                          "billing": {}}
    assert [r.name for r in c.routes.table] == ["orders", None]
    m = c.routes.table.match("POST", "h", "/api/orders/7")
    assert m is not None and m.route.name == "orders"


def test_defaults_and_missing_section(tmp_path: Path) -> None:
    for text in ("", "broker: sqlite:///a.db\n", "gateway:\n"):
        c = parse_gateway_config(text, "f.yaml")
        assert len(c.routes.table) == 0 and c.routes_key == DEFAULT_ROUTES_KEY
        assert [str(a) for a in c.listen] == ["127.0.0.1:8080"]
    f = tmp_path / "shoal.yaml"
    f.write_text(GOOD)
    assert len(load_manifest(f).gateway.routes.table) == 2  # the manifest's, the same schema
    assert parse_gateway_config("gateway: {routes_key: null}", "f").routes_key is None


BAD = [
    # (text, line, fragments)
    ("gateway:\n  listen: nope\n", 2, ["gateway.listen", "'nope'", "port"]),
    ("gateway:\n  listen: [1.2.3.4:80, 'a b:1']\n", 2, ["gateway.listen[1]", "invalid host"]),
    ("gateway:\n  listen: 1.2.3.4:70000\n", 2, ["port 0-65535"]),
    ("gateway:\n  listen: []\n", 2, ["at least one"]),
    ("gateway:\n  listen: unix:relative.sock\n", 2, ["absolute"]),
    ("gateway:\n  lisen: 1\n", 2, ["gateway.lisen", "did you mean 'listen'"]),
    ("gateway: 3\n", 1, ["gateway: expected a mapping", "3"]),
    ("- a\n- b\n", 1, ["must be a mapping", "a list"]),
    ("gateway:\n  routes_key: ''\n", 2, ["gateway.routes_key", "empty"]),
    ("gateway:\n  drain: soon\n", 2, ["gateway.drain", "duration"]),
    ("gateway:\n  limits: 5\n", 2, ["gateway.limits", "mapping"]),
    ("gateway:\n  limits:\n    max_conections: 5\n", 3,
     ["gateway.limits.max_conections", "did you mean 'max_connections'"]),
    ("gateway:\n  limits:\n    max_connections: 1.5\n", 3, ["integer"]),
    ("gateway:\n  limits:\n    max_connections: true\n", 3, ["integer"]),
    ("gateway:\n  limits:\n    header_timeout: -1\n", 3, ["header_timeout", "negative"]),
    ("gateway:\n  limits:\n    max_body_bytes: lots\n", 3, ["max_body_bytes", "size"]),
    ("gateway:\n  services: [a]\n", 2, ["gateway.services", "mapping"]),
    ("gateway:\n  services:\n    Orders: {}\n", 3, ["gateway.services.Orders", "DNS label"]),
    ("gateway:\n  services:\n    orders: 5\n", 3, ["gateway.services.orders", "policy"]),
    ("gateway:\n  services:\n    orders:\n      retries:\n        atempts: 3\n", 5,
     ["gateway.services.orders.retries.atempts", "did you mean 'attempts'"]),
    ("gateway:\n  services:\n    orders:\n      timeout: forever\n", 4,
     ["gateway.services.orders.timeout", "duration"]),
    ("gateway:\n  routes: {a: 1}\n", 2, ["gateway.routes", "list"]),
    ("gateway:\n  routes:\n    - service: orders\n    - name: x\n      match:\n"
     "        path: {prefx: /a}\n      service: orders\n", 6,
     ["route 'x' (routes[1])", "match.path.prefx", "did you mean 'prefix'"]),
    ("gateway:\n  routes:\n    - name: a\n      destinations:\n        - {service: x}\n"
     "        - {service: Bad}\n", 6, ["destinations[1].service", "DNS label"]),
    ("gateway:\n  routes:\n    - service: x\n    - name: b\n      service: x\n", 4,
     ["route 'b' (routes[1])", "can never match"]),
    ("gateway:\n  routes:\n    - service: x\n      match: {path: {regex: '(a+)+$'}}\n", 4,
     ["match.path.regex", "exponentially"]),
    ("gateway:\n  routes:\n    - 7\n", 3, ["routes[0]", "expected a mapping"]),
]


@pytest.mark.parametrize(("text", "line", "fragments"), BAD,
                         ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_config_names_file_line_and_key(text: str, line: int,
                                                  fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_gateway_config(text, "conf/shoal.yaml")
    message = str(info.value)
    assert message.startswith(f"conf/shoal.yaml, line {line}: "), message
    for fragment in fragments:
        assert fragment in message, message


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi",
                                                                strict=True))

HOSTILE = [
    ("a: 1\na: 2\n", r"line 2: a: given twice \(first on line 1\)"),
    ("gateway:\n  routes:\n    - service: x\n      service: y\n",
     r"line 4: .*service: given twice"),
    ("gateway: !!python/object/apply:os.system [echo hi]\n",
     r"line 1: (unsupported tag|not valid YAML)"),
    ("gateway: !!python/name:os.system\n", r"line 1: unsupported tag"),
    ("a: !!set {x}\n", r"line 1: unsupported tag"),
    ("a: !custom 5\n", r"line 1: unsupported tag '!custom'"),
    ("? [1, 2]\n: x\n", r"line 1: the top level: keys must be strings"),
    ("gateway:\n  1: x\n", r"line 2: gateway: keys must be strings"),
    ("a: 1\n---\nb: 2\n", r"line 2: not valid YAML: more than one document"),
    ("gateway: {listen: [\n", r"not valid YAML"),
    ("gateway:\n\tlisten: x\n", r"line 2: not valid YAML"),
    (BILLION_LAUGHS, r"more than 100000 values \(alias expansion\?\)"),
    ("x: " + "[" * 200 + "]" * 200 + "\n", r"nested (more than 64 levels deep|too deeply)"),
    ("x: " + "[" * 50000 + "]" * 50000 + "\n", r"nested (more than 64 levels deep|too deeply)"),
]


@pytest.mark.parametrize(("text", "pattern"), HOSTILE, ids=[f"h{i}" for i in range(len(HOSTILE))])
def test_hostile_yaml_refused_quickly(text: str, pattern: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_gateway_config(text, "f.yaml")
    assert time.monotonic() - t0 < 5
    assert str(info.value).startswith("f.yaml"), info.value
    assert re.search(pattern, str(info.value)), info.value


def test_oversized_and_binary_files(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("gateway:\n  routes:\n" + "    - {service: x}\n" * (11 * 1024 * 1024 // 18))
    with pytest.raises(ConfigError, match=rf"big.yaml: larger than the limit of "
                                          rf"{MAX_YAML_BYTES} bytes"):
        load_manifest(big)
    with pytest.raises(ConfigError, match=rf"big: {MAX_YAML_BYTES + 1} bytes, more than the "
                                          rf"limit of {MAX_YAML_BYTES}"):
        load_yaml(b" " * (MAX_YAML_BYTES + 1), "big")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"gateway:\n  listen: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin.yaml, line 2: not valid UTF-8"):
        load_manifest(binary)
    with pytest.raises(ConfigError, match="no such file"):
        load_manifest(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_manifest(tmp_path)


def test_merge_keys_and_aliases_are_plain_yaml() -> None:
    doc = load_yaml("base: &b {timeout: 2s, retries: {attempts: 1}}\n"
                    "gateway:\n  services:\n    a: *b\n    b:\n      <<: *b\n      timeout: 5s\n",
                    "f")
    services = doc.data["gateway"]["services"]
    assert services["a"] == {"timeout": "2s", "retries": {"attempts": 1}}
    assert services["b"] == {"retries": {"attempts": 1}, "timeout": "5s"}
    assert doc.line(("gateway", "services", "b", "timeout")) == 7
    assert doc.line(("gateway", "services", "b", "nothing", "here")) == 5


def test_store_routes_value() -> None:
    loaded = parse_routes(b'[{"name": "a", "service": "x", "match": {"path": {"exact": "/a"}}},'
                          b' {"service": "y"}]', "store key 'k'")
    assert len(loaded.table) == 2
    with pytest.raises(ConfigError, match=r"store key 'k', line 1: empty"):
        parse_routes(b"", "store key 'k'")
    with pytest.raises(ConfigError, match=r"store key 'k', line 3: routes: routes\[1\]"):
        parse_routes("- service: x\n  match: {path: {exact: /a}}\n- {service: Nope}\n",
                     "store key 'k'")


def test_unchanged_routes_are_found_by_their_config() -> None:
    old = parse_routes("- {name: a, service: x, match: {path: {exact: /a}}}\n"
                       "- {name: b, service: y, match: {path: {exact: /b}}}\n", "s")
    new = parse_routes("- {service: x, name: a, match: {path: {exact: /a}}}\n"  # key order
                       "- {name: b, service: y, match: {path: {exact: /b}}, timeout: 1s}\n"
                       "- {name: c, service: z}\n", "s")
    unchanged = new.unchanged(old)
    assert {o.name: n.name for o, n in unchanged.items()} == {"a": "a"}
    a_old, a_new = old.table.routes[0], new.table.routes[0]
    assert unchanged[a_old] is a_new


@pytest.mark.parametrize("value", ["x", "host", "1.2.3.4", ":", "a:b", "[zz]:1", ":-1",
                                   "h:123456", "unix:", "/" + "a" * 200, 8080, None, ""])
def test_listen_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="--listen"):
        parse_listen(value, what="--listen")


def test_too_many_routes_refused() -> None:
    from shoal.gateway.config import MAX_ROUTES

    text = "".join(f"- {{match: {{path: {{exact: /r{i}}}}}, service: s}}\n"
                   for i in range(MAX_ROUTES + 1))
    with pytest.raises(ConfigError, match=rf"store key 'k', line 1: routes: {MAX_ROUTES + 1} "
                                          rf"routes, more than the limit of {MAX_ROUTES}"):
        parse_routes(text, "store key 'k'")


KEYS = st.sampled_from(["name", "match", "path", "prefix", "exact", "regex", "host", "methods",
                        "headers", "query", "present", "service", "destinations", "subset",
                        "weight", "rewrite", "mirror", "percent", "fault", "delay", "abort",
                        "status", "fixed", "timeout", "retries", "attempts", "request", "set",
                        "add", "remove", "load_balancer", "policy", "circuit_breaker",
                        "outlier_detection", "x-a", "version"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 10**12), st.floats(),
                    st.sampled_from(["/a", "/", "a", "GET", "2s", "-1s", "(a+)+", "[", "v1",
                                     "*.x.com", "\x00", "%zz", "orders", "peak_ewma", "50%",
                                     "x" * 300]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)), max_leaves=15)


ROUTE = st.dictionaries(st.sampled_from(ROUTE_KEYS), VALUES, max_size=6)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(routes=st.lists(ROUTE, max_size=4))
def test_random_store_values_only_raise_config_errors(routes: list[dict[str, Any]]) -> None:
    """Whatever a Store value holds, loading it either works or raises a ConfigError that
    names the store key and a line (never another exception, which would stop reloads)."""
    text = json.dumps(routes, allow_nan=True)
    try:
        parse_routes(text, "store key 'k'")
    except ConfigError as exc:
        assert str(exc).startswith("store key 'k', line 1: "), exc
