"""Topic policy: which services may publish to and subscribe to which topics.

From the manifest::

    topics:
      orders:    {publish: [shop], subscribe: [billing, audit]}
      "audit.*": {publish: ["*"], subscribe: [audit]}

A key is a topic name, a prefix pattern ending in ``.*`` (``audit.*`` takes
``audit.login``, not ``audit``), or ``*``; the most specific key decides (exact, then the
longest prefix, then ``*``). Entries are service names, SPIFFE ids, or ``*`` (any
identity). **A topic no key covers is closed**: naming topics is opting into zero trust.
Dead letters follow their topic: whoever may subscribe to ``T`` may publish to
``T.dlq`` (the bus dead-letters what its handlers give up on).

The bus enforces it (``EventBus.connect(..., topic_policy=..., identity=...)``): a refused
publish raises ``Forbidden`` before anything is appended; a refused subscribe fails when
``subscribe`` (or ``consume``) is called, not at the first event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shoal.errors import CertificateError, ConfigError, Forbidden
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, check_service_name

__all__ = ["TopicGuard", "TopicPolicy"]

Action = Literal["publish", "subscribe"]
MAX_ENTRIES = 4096
_ACTIONS = ("publish", "subscribe")


@dataclass(frozen=True, slots=True)
class _Grant:
    key: str
    publish: frozenset[str]
    subscribe: frozenset[str]


class TopicPolicy:
    """The ``topics:`` section, compiled; ``check`` raises ``Forbidden`` naming the key."""

    def __init__(self, grants: Mapping[str, _Grant]) -> None:
        self._exact = {k: g for k, g in grants.items() if k != "*" and not k.endswith(".*")}
        self._prefixes = sorted(((k[:-1], g) for k, g in grants.items() if k.endswith(".*")),
                                key=lambda kg: -len(kg[0]))
        self._any = grants.get("*")

    @classmethod
    def from_config(cls, data: Any, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                    where: str = "topics") -> TopicPolicy:
        """From the manifest section; a ``ConfigError`` names the topic and key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of topic -> {{publish, subscribe}}, "
                              f"got {type(data).__name__}")
        if len(data) > MAX_ENTRIES:
            raise ConfigError(f"{where}: {len(data)} entries; at most {MAX_ENTRIES}")
        grants = {}
        for key, spec in data.items():
            what = f"{where}.{key!s:.80}"
            if not isinstance(key, str) or not key or len(key) > 255 or not key.isprintable() \
                    or ("*" in key and key != "*" and not (key.endswith(".*")
                                                          and key.count("*") == 1)):
                raise ConfigError(f"{what}: expected a topic name, 'prefix.*' or '*'")
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{what}: expected {{publish: [...], subscribe: [...]}}")
            for k in spec:
                if k not in _ACTIONS:
                    raise ConfigError(f"{what}: unknown key {k!r:.40}; expected publish or "
                                      "subscribe")
            grants[key] = _Grant(key, *(
                _who(spec.get(action, []), f"{what}.{action}", trust_domain)
                for action in _ACTIONS))
        return cls(grants)

    def _grant(self, topic: str) -> _Grant | None:
        grant = self._exact.get(topic)
        if grant is not None:
            return grant
        for prefix, grant in self._prefixes:
            if topic.startswith(prefix):
                return grant
        return self._any

    def allows(self, identity: str | None, action: Action, topic: str) -> tuple[bool, str]:
        """``(allowed, the key or reason that decided)``."""
        if action == "publish" and topic.endswith(".dlq"):
            allowed, why = self.allows(identity, "subscribe", topic[:-4])
            if allowed:
                return True, why
        grant = self._grant(topic)
        if grant is None:
            return False, "no-entry"
        if identity is None:
            return False, f"topics.{grant.key}"
        who = grant.publish if action == "publish" else grant.subscribe
        return ("*" in who or identity in who), f"topics.{grant.key}"

    def check(self, identity: str | None, action: Action, topic: str) -> None:
        """Raise ``Forbidden`` if ``identity`` may not ``action`` on ``topic``."""
        allowed, rule = self.allows(identity, action, topic)
        if not allowed:
            who = identity or "an unauthenticated client"
            why = ("no entry of the topic policy covers it (topics are closed unless named)"
                   if rule == "no-entry" else f"not listed under {rule}.{action}")
            raise Forbidden(f"{who} may not {action} {'to' if action == 'publish' else 'on'} "
                            f"topic {topic!r}: {why}", rule=rule)


class TopicGuard:
    """A policy bound to one client identity, with decisions cached per topic."""

    def __init__(self, policy: TopicPolicy, identity: str | SpiffeId | None) -> None:
        self.policy = policy
        self.identity = None if identity is None else str(identity)
        self._allowed: set[tuple[str, str]] = set()

    def check(self, action: Action, topic: str) -> None:
        """Raise ``Forbidden`` unless allowed (allowed decisions are remembered)."""
        if (action, topic) in self._allowed:
            return
        self.policy.check(self.identity, action, topic)
        self._allowed.add((action, topic))

    def check_create(self, topic: str) -> None:
        """Creating a topic takes the right to publish to it or to subscribe to it."""
        if self.policy.allows(self.identity, "subscribe", topic)[0]:
            return
        self.check("publish", topic)


def _who(value: Any, where: str, trust_domain: str) -> frozenset[str]:
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise ConfigError(f"{where}: expected a list of services, got {value!r:.60}")
    out = set()
    for item in value:
        try:
            if item == "*":
                out.add("*")
            elif isinstance(item, str) and item.startswith("spiffe://"):
                out.add(SpiffeId.parse(item).uri)
            else:
                out.add(SpiffeId(trust_domain, check_service_name(item)).uri)
        except CertificateError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return frozenset(out)
