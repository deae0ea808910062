"""The ``gateway:`` section of ``shoal.yaml``, and the routes the Store holds.

::

    gateway:
      listen: 0.0.0.0:8080            # or a list; "unix:/run/shoal.sock"; ":8080"
      routes_key: shoal/gateway/routes  # Store key watched for routes (null: do not watch)
      drain: 10s                      # on SIGTERM: how long in-flight requests may finish
      limits: {max_body_bytes: 16MiB, header_timeout: 10s}   # shoal.gateway.ServerLimits
      services:                       # per-service traffic policy (routes override it)
        orders: {timeout: 2s, retries: {attempts: 2}, load_balancer: {policy: peak_ewma}}
      routes:                         # shoal.gateway.routes (first match wins)
        - {name: orders, match: {path: {prefix: /api/orders}}, service: orders}

``gateway_section(doc, data)`` is the one schema of this section: ``shoal.config`` validates
a manifest's with it (for ``shoal validate``, ``shoal up`` and ``shoal gateway`` alike);
``parse_gateway_config(text, source)`` reads only this section of a text. The Store's
routes (``parse_routes``) are the same ``routes:`` list as YAML or JSON.
Every error is a ``ConfigError`` that names the file (or store key), the line, and the key
path; route errors come from ``RouteTable.from_config`` and are placed on the line of the
route's key they name. Input limits: see ``shoal.yamlsafe``, the one YAML loader.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec

from shoal.errors import ConfigError
from shoal.gateway.routes import Route, RouteTable, merge_policy
from shoal.gateway.server import ServerLimits
from shoal.mesh.registry import check_service_name
from shoal.mesh.resilience import _suggestion
from shoal.store.validation import check_key
from shoal.units import parse_duration, parse_size
from shoal.yamlsafe import Path, YamlDocument, dotted, load_yaml

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ROUTES_KEY = "shoal/gateway/routes"
DEFAULT_DRAIN = 10.0
MAX_ROUTES = 1000
"""Most routes in one table (load-time overlap checks compare every pair)."""
SECTION_KEYS = ("listen", "routes_key", "drain", "limits", "services", "routes")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: TCP ``host:port`` (port 0: any free port) or a unix socket path."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


_PORT = re.compile(r"[0-9]{1,5}")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")


def parse_listen(value: Any, *, what: str = "listen") -> ListenAddress:
    """``host:port``, ``[ipv6]:port``, ``:port`` (every interface), ``unix:/path`` or
    ``/path``; a ConfigError naming ``what`` otherwise."""
    form = "'host:port', ':port', '[::1]:port' or 'unix:/path/to.sock'"
    if not isinstance(value, str) or not value or len(value) > 300:
        raise ConfigError(f"{what}: expected {form}, got {value!r}")
    if value.startswith(("/", "unix:")):
        path = value.removeprefix("unix:")
        if not path.startswith("/") or "\0" in path or len(path.encode()) > 107:
            raise ConfigError(f"{what}: {value!r} is not an absolute unix socket path of at "
                              "most 107 bytes")
        return ListenAddress(path=path)
    host, sep, port = value.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        raise ConfigError(f"{what}: {value!r} needs a port 0-65535; expected {form}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or not all(c in "0123456789abcdefABCDEF:." for c in host):
            raise ConfigError(f"{what}: {value!r} has no valid IPv6 address in brackets")
    elif host and not _HOST.fullmatch(host):
        raise ConfigError(f"{what}: {value!r} has an invalid host; expected {form}")
    return ListenAddress(host=host or None, port=int(port))


@dataclass(frozen=True, slots=True)
class LoadedRoutes:
    """A route table and, per route, a fingerprint of its config: two routes with the same
    fingerprint are the same route (a reload keeps that route's upstream state)."""

    table: RouteTable
    fingerprints: tuple[bytes, ...] = ()

    def unchanged(self, old: LoadedRoutes) -> dict[Route, Route]:
        """Routes of ``old`` that this table has too, unchanged: old route -> new route."""
        by_print = dict(zip(old.fingerprints, old.table.routes, strict=True))
        return {by_print[p]: r for p, r in zip(self.fingerprints, self.table.routes,
                                               strict=True) if p in by_print}


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The gateway section, validated."""

    listen: tuple[ListenAddress, ...] = (parse_listen(DEFAULT_LISTEN),)
    routes: LoadedRoutes = field(default_factory=lambda: LoadedRoutes(RouteTable(())))
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    limits: ServerLimits = field(default_factory=ServerLimits)
    routes_key: str | None = DEFAULT_ROUTES_KEY
    drain: float = DEFAULT_DRAIN
    source: str = "defaults"


def parse_gateway_config(text: str | bytes, source: str) -> GatewayConfig:
    """The ``gateway:`` section of a manifest's text, other top-level keys ignored (the
    whole manifest, with this section in it: ``shoal.config.load_manifest``)."""
    doc = load_yaml(text, source)
    if doc.data is None:
        return GatewayConfig(source=source)
    if not isinstance(doc.data, dict):
        raise doc.error((), f"the manifest must be a mapping (with a gateway: section), "
                            f"not {_kind(doc.data)}")
    return gateway_section(doc, doc.data.get("gateway"))


def gateway_section(doc: YamlDocument, section: Any) -> GatewayConfig:
    """The ``gateway:`` section ``section`` of ``doc`` validated: the one schema of it, for
    ``shoal gateway``, ``shoal up`` and ``shoal validate`` alike (a ``YamlError`` placing
    the first problem on its line)."""
    base: Path = ("gateway",)
    if section is None:
        return GatewayConfig(source=doc.source)
    if not isinstance(section, dict):
        raise doc.error(base, f"gateway: expected a mapping (listen, routes, services, "
                              f"limits...), got {_kind(section)}")
    for key in section:
        if key not in SECTION_KEYS:
            raise doc.error((*base, key), f"gateway.{key}: unknown key"
                            f"{_suggestion(key, set(SECTION_KEYS))}; expected one of "
                            f"{', '.join(SECTION_KEYS)}")
    listen = _listen(doc, section.get("listen", DEFAULT_LISTEN), (*base, "listen"))
    routes_key = section.get("routes_key", DEFAULT_ROUTES_KEY)
    if routes_key is not None:
        try:
            check_key(routes_key)
        except Exception as exc:
            raise doc.error((*base, "routes_key"), f"gateway.routes_key: {exc}") from None
    drain = _drain(doc, section.get("drain", DEFAULT_DRAIN), (*base, "drain"))
    limits = _limits(doc, section.get("limits"), (*base, "limits"))
    services = _services(doc, section.get("services"), (*base, "services"))
    routes = routes_from(doc, section.get("routes"), (*base, "routes"))
    return GatewayConfig(tuple(listen), routes, services, limits, routes_key, drain,
                         doc.source)


def parse_routes(text: str | bytes, source: str) -> LoadedRoutes:
    """A ``routes:`` list given alone (the Store's value): YAML or JSON."""
    doc = load_yaml(text, source)
    if doc.data is None:
        raise doc.error((), "empty; expected a list of routes (an empty list: [])")
    return routes_from(doc, doc.data, ())


def routes_from(doc: YamlDocument, data: Any, base: Path) -> LoadedRoutes:
    """A ``LoadedRoutes`` from the list at ``base`` of ``doc``, errors placed on its lines."""
    where = dotted(base) or "routes"
    if data is not None and not isinstance(data, list):
        raise doc.error(base, f"{where}: expected a list of routes, got {_kind(data)}")
    if data is not None and len(data) > MAX_ROUTES:
        raise doc.error(base, f"{where}: {len(data)} routes, more than the limit of "
                              f"{MAX_ROUTES}")
    try:
        table = RouteTable.from_config(data, where=where)
    except ConfigError as exc:
        raise doc.error(_route_path(str(exc), base), str(exc)) from None
    return LoadedRoutes(table, tuple(_fingerprint(item) for item in data or ()))


_ROUTE_KEY = re.compile(r"routes\[(\d+)\]\)?: ([A-Za-z0-9_.\[\]-]+):")
_ROUTE_INDEX = re.compile(r"routes\[(\d+)\]")
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _route_path(message: str, base: Path) -> Path:
    """The key path a route error names: ``routes[2]): match.path: ...`` -> ``base +
    (2, "match", "path")`` (the route alone when no key is named)."""
    m = _ROUTE_KEY.search(message)
    if m is not None:
        parts: list[str | int] = [int(m.group(1))]
        for name, index in _PART.findall(m.group(2)):
            parts.append(int(index) if index else name)
        return (*base, *parts)
    m = _ROUTE_INDEX.search(message)
    return (*base, int(m.group(1))) if m is not None else base


def _fingerprint(item: Any) -> bytes:
    try:
        return msgspec.json.encode(item, order="sorted")
    except (TypeError, msgspec.EncodeError):
        return repr(item).encode()


def _listen(doc: YamlDocument, value: Any, path: Path) -> list[ListenAddress]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise doc.error(path, "gateway.listen: give at least one address")
    out = []
    for i, item in enumerate(items):
        where = (*path, i) if isinstance(value, list) else path
        try:
            out.append(parse_listen(item, what=dotted(where)))
        except ConfigError as exc:
            raise doc.error(where, str(exc)) from None
    return out


def _drain(doc: YamlDocument, value: Any, path: Path) -> float:
    try:
        seconds = parse_duration(value, name="gateway.drain")
    except ConfigError as exc:
        raise doc.error(path, str(exc)) from None
    if seconds is None:
        raise doc.error(path, "gateway.drain: expected a duration like '10s', got null")
    return seconds


_LIMITS = {f.name for f in fields(ServerLimits)}


def _limits(doc: YamlDocument, data: Any, path: Path) -> ServerLimits:
    if data is None:
        return ServerLimits()
    if not isinstance(data, dict):
        raise doc.error(path, f"gateway.limits: expected a mapping, got {_kind(data)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        where = (*path, name)
        what = dotted(where)
        if name not in _LIMITS:
            raise doc.error(where, f"{what}: unknown limit{_suggestion(name, _LIMITS)}; "
                            f"expected one of {', '.join(sorted(_LIMITS))}")
        try:
            if name.endswith("_timeout"):
                values[name] = parse_duration(value, name=what)
            elif name.endswith("_bytes"):
                values[name] = parse_size(value, name=what)
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{what}: expected an integer >= 0, got {value!r}")
            else:
                values[name] = value
            if values[name] is None:
                raise ConfigError(f"{what}: expected a value, got null")
        except ConfigError as exc:
            raise doc.error(where, str(exc)) from None
    return ServerLimits(**values)


def _services(doc: YamlDocument, data: Any, path: Path) -> dict[str, dict[str, Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise doc.error(path, f"gateway.services: expected a mapping of service name to "
                              f"traffic policy, got {_kind(data)}")
    out: dict[str, dict[str, Any]] = {}
    for name, policy in data.items():
        where = (*path, name)
        try:
            check_service_name(name)
        except ConfigError as exc:
            raise doc.error(where, f"{dotted(where)}: {exc}") from None
        if policy is None:
            policy = {}
        if not isinstance(policy, dict):
            raise doc.error(where, f"{dotted(where)}: expected a traffic policy mapping "
                            f"(timeout, retries, circuit_breaker, ...), got {_kind(policy)}")
        try:
            merge_policy(policy, None, where=dotted(where))
        except ConfigError as exc:
            message = str(exc)
            if message.startswith("service."):  # merge_policy's name for this section
                message = dotted(where) + message[len("service"):]
            raise doc.error(_policy_path(message, where), message) from None
        out[name] = policy
    return out


def _policy_path(message: str, where: Path) -> Path:
    """``gateway.services.orders.retries.attempts: ...`` -> that path (as far as known)."""
    prefix = dotted(where) + "."
    head = message.split(":", 1)[0]
    if not head.startswith(prefix):
        return where
    return (*where, *head[len(prefix):].split("."))


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", list: "a list",
          dict: "a mapping", str: "a string"}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{_KINDS.get(type(value), type(value).__name__)} {value!r}"[:120]
