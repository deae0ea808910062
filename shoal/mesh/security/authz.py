"""Authorization policy for calls to a service: pure rules on (source, method, path).

A policy is a list of rules from the manifest::

    authorization:
      - {name: no-debug, action: deny, paths: [{prefix: /debug}]}
      - {name: orders-charge, action: allow, from: [orders], methods: [POST],
         paths: [{exact: /charge}]}

* ``from`` lists service names (in the policy's trust domain), full SPIFFE ids, or ``*``
  (any authenticated peer). A rule with ``from`` never matches an unauthenticated caller;
  a rule without it matches any caller. ``methods`` and ``paths`` left out match all.
* Paths match exact or by prefix on whole segments (``/v1`` takes ``/v1`` and ``/v1/x``,
  not ``/v1x``), after the same normalization the gateway routes with (percent-escapes
  of unreserved characters decoded, dot segments removed), so ``/a/../debug`` is
  ``/debug``. A path that cannot be normalized is denied.
* **DENY rules are evaluated before ALLOW rules**; with at least one ALLOW rule, a call
  matching none is denied by the implicit rule ``default-deny``; with no ALLOW rule, it is
  allowed by ``default-allow``. Every ``Decision`` names the rule that made it, and
  denials are counted per rule.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.errors import CertificateError, ConfigError
from shoal.gateway.routes import InvalidPath, normalize_path
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, check_service_name

__all__ = ["AuthorizationPolicy", "Decision", "Rule", "authorize"]

DEFAULT_DENY = "default-deny"
DEFAULT_ALLOW = "default-allow"
MAX_RULES = 1024
_RULE_KEYS = ("name", "action", "from", "methods", "paths")
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"))


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed or not, and which rule said so."""

    allowed: bool
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule; ``sources`` None means any caller, ``"*"`` any authenticated one."""

    name: str
    allow: bool
    sources: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def matches(self, source: str | None, method: str, path: str) -> bool:
        """Whether this rule applies to the call."""
        sources = self.sources
        if sources is not None and (source is None or ("*" not in sources
                                                       and source not in sources)):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if not self.exact and not self.prefixes:
            return True
        if path in self.exact:
            return True
        return any(p == "/" or path == p or path.startswith(p + "/") for p in self.prefixes)


class AuthorizationPolicy:
    """The rules guarding one service; ``decide`` is pure and counts denials."""

    def __init__(self, service: str, rules: Sequence[Rule]) -> None:
        self.service = service
        self.deny_rules = tuple(r for r in rules if not r.allow)
        self.allow_rules = tuple(r for r in rules if r.allow)
        self.denials: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_config(cls, service: str, data: Any, *,
                    trust_domain: str = DEFAULT_TRUST_DOMAIN,
                    where: str | None = None) -> AuthorizationPolicy:
        """From the manifest's list of rules; a ``ConfigError`` names the rule and key."""
        where = where or f"services.{service}.authorization"
        if data is None:
            return cls(service, ())
        if not isinstance(data, list):
            raise ConfigError(f"{where}: expected a list of rules, got {type(data).__name__}")
        if len(data) > MAX_RULES:
            raise ConfigError(f"{where}: {len(data)} rules; at most {MAX_RULES}")
        rules, names = [], set()
        for i, item in enumerate(data):
            rule = _rule(item, f"{where}[{i}]", trust_domain)
            if rule.name in names or rule.name in (DEFAULT_ALLOW, DEFAULT_DENY):
                raise ConfigError(f"{where}[{i}].name: {rule.name!r} is already used")
            names.add(rule.name)
            rules.append(rule)
        return cls(service, rules)

    def decide(self, source: str | None, method: str, raw_path: str) -> Decision:
        """The decision for a call from ``source`` (a SPIFFE id, or None when the caller
        is not authenticated) of ``method`` on ``raw_path`` (as received, query allowed)."""
        try:
            path = normalize_path(raw_path.split("?", 1)[0])
        except InvalidPath as exc:
            return self._deny("invalid-path", f"the path cannot be normalized: {exc}")
        who = source or "an unauthenticated caller"
        for rule in self.deny_rules:
            if rule.matches(source, method, path):
                return self._deny(rule.name, f"{who} may not {method} {path} on "
                                  f"{self.service!r}: denied by rule {rule.name!r}")
        for rule in self.allow_rules:
            if rule.matches(source, method, path):
                return Decision(True, rule.name, f"allowed by rule {rule.name!r}")
        if self.allow_rules:
            return self._deny(DEFAULT_DENY, f"{who} may not {method} {path} on "
                              f"{self.service!r}: no allow rule matches ({DEFAULT_DENY})")
        return Decision(True, DEFAULT_ALLOW, "no allow rule is configured")

    def _deny(self, rule: str, reason: str) -> Decision:
        self.denials[rule] += 1
        return Decision(False, rule, reason)


def _rule(item: Any, where: str, trust_domain: str) -> Rule:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping (a rule), got {type(item).__name__}")
    for key in item:
        if key not in _RULE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r:.40}; expected one of "
                              f"{', '.join(_RULE_KEYS)}")
    name = item.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable() \
            or not name.isascii():
        raise ConfigError(f"{where}.name: expected a printable ASCII name of 1-128 characters, "
                          f"got {name!r:.60}")
    action = item.get("action")
    if action not in ("allow", "deny"):
        raise ConfigError(f"{where}.action: expected allow or deny, got {action!r:.40}")
    sources = None
    if "from" in item:
        sources = frozenset(_source(s, f"{where}.from", trust_domain)
                            for s in _list(item["from"], f"{where}.from"))
    methods = None
    if "methods" in item:
        methods = frozenset(_method(m, f"{where}.methods")
                            for m in _list(item["methods"], f"{where}.methods"))
    exact: set[str] = set()
    prefixes: list[str] = []
    for j, spec in enumerate(_list(item.get("paths", []), f"{where}.paths", empty=True)):
        what = f"{where}.paths[{j}]"
        if not isinstance(spec, Mapping) or len(spec) != 1 or \
                next(iter(spec)) not in ("exact", "prefix"):
            raise ConfigError(f"{what}: expected {{exact: /path}} or {{prefix: /path}}, got "
                              f"{spec!r:.60}")
        kind, value = next(iter(spec.items()))
        if not isinstance(value, str):
            raise ConfigError(f"{what}.{kind}: expected a path, got {value!r:.60}")
        try:
            path = normalize_path(value)
        except InvalidPath as exc:
            raise ConfigError(f"{what}.{kind}: {exc}") from None
        if kind == "exact":
            exact.add(path)
        else:
            prefixes.append(path.rstrip("/") or "/")
    return Rule(name, action == "allow", sources, methods, frozenset(exact), tuple(prefixes))


def _list(value: Any, where: str, *, empty: bool = False) -> list[Any]:
    if not isinstance(value, list) or (not value and not empty) or len(value) > MAX_RULES:
        raise ConfigError(f"{where}: expected a non-empty list, got {value!r:.60}")
    return value


def _source(value: Any, where: str, trust_domain: str) -> str:
    if value == "*":
        return "*"
    try:
        if isinstance(value, str) and value.startswith("spiffe://"):
            return SpiffeId.parse(value).uri
        return SpiffeId(trust_domain, check_service_name(value)).uri
    except CertificateError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _method(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in _METHODS:
        raise ConfigError(f"{where}: expected an HTTP method like GET, got {value!r:.40}")
    return value.upper()


def authorize(policy: AuthorizationPolicy, handler: Callable[[Any], Any]
              ) -> Callable[[Any], Awaitable[Any] | Any]:
    """Wrap an ``HttpServer`` handler: a call the policy denies is answered 403 naming
    the rule (``shoal-error: authz; <rule>``) and never reaches ``handler``."""
    from shoal.gateway.server import Response  # the gateway imports this package

    def guarded(request: Any) -> Any:
        decision = policy.decide(request.peer_identity, request.method,
                                 request.raw_path.decode("latin-1"))
        if not decision.allowed:
            return Response.error(403, decision.rule, decision.reason, layer="authz")
        return handler(request)

    return guarded
