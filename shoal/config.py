"""The ``shoal.yaml`` manifest: schema, loading, and errors that say file, line and key.

::

    broker: sqlite:///.shoal/events.db        # default
    store: sqlite:///.shoal/store.db          # default: beside the broker
    admin: {listen: 127.0.0.1:8081}
    gateway:
      listen: 127.0.0.1:8080
      routes:
        - {name: orders, match: {path: {prefix: /orders}}, service: orders}
    security: {mtls: strict, trust_domain: shoal.local}   # strict (default) | permissive | off
    services:
      orders:
        app: shop.orders:svc                  # module:attribute of a shoal.Service
        replicas: 2
        policies:                             # who may call it (shoal.mesh.security.authz)
          - {name: no-debug, action: deny, paths: [{prefix: /debug}]}
          - {name: gateway-in, action: allow, from: [gateway], methods: [POST]}
        topics: {publish: [orders], subscribe: ["payments.*"]}   # its topic policy
        autoscale: {min: 1, max: 5, target_inflight: 10, cooldown: 30s}
        load_balancer: peak_ewma              # or {policy: peak_ewma, ...}
        policy: {timeouts: {request: 2s}, retries: {attempts: 2}}
        labels: {tier: front}
        env: {LOG_LEVEL: info}

``load_manifest(path)`` reads and validates it; every problem found is reported at once
as a ``ManifestError`` whose lines read ``shoal.yaml, line 12: services.orders.replicas:
expected an integer >= 0, got 'two'``. Unknown keys are refused, with "did you mean".

Top-level keys starting with ``x-`` are ignored (a place for YAML anchors to reuse, as in
Compose files: ``x-defaults: &defaults {...}`` then ``<<: *defaults``).

The ``gateway:`` section has one schema, ``shoal.gateway.config.gateway_section`` (the
same for ``shoal validate``, ``shoal up`` and ``shoal gateway``); ``Manifest.gateway`` is
its ``GatewayConfig``. Hostile input is refused by the one YAML loader, ``shoal.yamlsafe``
(size, alias expansion, nesting, tags, duplicate keys).

Relative ``sqlite:///`` paths are relative to the working directory, as everywhere in
Shoal; ``Manifest.directory`` is the manifest's directory, from which the control plane
runs the services (so ``app: shop.orders:svc`` imports from there).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from shoal.errors import CertificateError, ConfigError
from shoal.events.brokers.connect import DEFAULT_BROKER_URL
from shoal.events.bus import default_store_for
from shoal.mesh.registry import check_service_name
from shoal.mesh.resilience import TrafficPolicy, load_traffic_policy
from shoal.mesh.security.authz import MAX_RULES, AuthorizationPolicy
from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, check_trust_domain
from shoal.mesh.security.topics import TopicPolicy
from shoal.units import parse_duration
from shoal.yamlsafe import MAX_YAML_BYTES, YamlDocument, YamlError, load_yaml

if TYPE_CHECKING:
    from shoal.gateway.config import GatewayConfig

MANIFEST_NAME = "shoal.yaml"
MAX_MANIFEST_BYTES = MAX_YAML_BYTES  # 1 MiB: a manifest is a page of settings
MAX_ERRORS = 50
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8081"
_APP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
                  r":[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_LISTEN = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_IDENTITIES = {"shoal-gateway": "gateway", "shoal-control": "control plane"}
"""Identities ``shoal up`` gives its gateway and control plane (policies name them)."""
_LABEL_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class ManifestIssue:
    """One problem in a manifest: where (file, line, key path) and what was expected."""

    path: Path
    line: int | None
    key: str  # dotted key path, e.g. "services.orders.replicas"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = f"{self.path}, line {self.line}" if self.line else str(self.path)
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ManifestError(ConfigError):
    """A manifest is invalid; ``issues`` lists every problem found, each on its own line."""

    def __init__(self, issues: list[ManifestIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


# -- value types ------------------------------------------------------------------------
def _duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '250ms', '2s' or '1m', got {value!r}")
    try:
        seconds = parse_duration(value, name="duration")
    except ConfigError as e:
        raise ValueError(str(e).removeprefix("duration: ")) from None
    if seconds is None:
        raise ValueError("expected a duration like '250ms', '2s' or '1m'")
    return seconds


def _listen(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 300 or not _LISTEN.fullmatch(value):
        raise ValueError(f"expected HOST:PORT like 127.0.0.1:8080, got {value!r}")
    if int(value.rpartition(":")[2]) > 65535:
        raise ValueError(f"port must be 0..65535, got {value!r}")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a URL string like sqlite:///.shoal/events.db, not "
                         f"{_kind(value) if value != '' else 'an empty string'}")
    if "://" not in value or len(value) > 4096:
        raise ValueError(f"must be a URL like sqlite:///.shoal/events.db, got {value!r}")
    return value.strip()


def _service_name(value: Any) -> str:
    try:
        name = check_service_name(value)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if name in RESERVED_IDENTITIES:
        raise ValueError(f"service name {name!r} is reserved: it is the identity of Shoal's "
                         f"own {RESERVED_IDENTITIES[name]}")
    return name


Duration = Annotated[float, BeforeValidator(_duration)]
ServiceName = Annotated[str, AfterValidator(_service_name)]
Listen = Annotated[str, BeforeValidator(_listen)]
Url = Annotated[str, BeforeValidator(_url)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False,
                              arbitrary_types_allowed=True)


class AdminConfig(_Section):
    """``admin:``: where the control plane's admin API and dashboard listen."""

    listen: Listen = DEFAULT_ADMIN_LISTEN


class SecurityConfig(_Section):
    """``security:``: mutual TLS between services and the trust domain of their identities.

    ``mtls: strict`` (the default) - every call between services and from the gateway is
    mutual TLS, plaintext is refused; ``permissive`` - instances accept both (a migration
    step); ``off`` - plaintext, no identities. Identities are
    ``spiffe://<trust_domain>/svc/<service>``. Without mTLS a caller cannot be
    authenticated: a policy rule with ``from:`` then matches no call (its ALLOWs deny).
    """

    mtls: Literal["strict", "permissive", "off"] = "strict"
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @field_validator("mtls", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("trust_domain", mode="before")
    @classmethod
    def _trust_domain(cls, value: Any) -> str:
        try:
            return check_trust_domain(value)
        except CertificateError as e:
            raise ValueError(str(e).partition(": ")[2]) from None


def _topic_pattern(value: Any) -> str:
    """A topic name, ``prefix.*`` or ``*`` (what a topic policy's keys may be)."""
    if not isinstance(value, str) or not value or len(value) > 255 or not value.isprintable() \
            or ("*" in value and value != "*" and not (value.endswith(".*")
                                                       and value.count("*") == 1)):
        raise ValueError(f"expected a topic name, 'prefix.*' or '*', got {value!r:.80}")
    return value


TopicPattern = Annotated[str, BeforeValidator(_topic_pattern)]


class TopicsConfig(_Section):
    """``services.<name>.topics:``: the topics this service may publish to and subscribe
    to (``prefix.*`` and ``*`` allowed). A service with this section may use only those
    (dead letters follow: subscribing ``T`` allows publishing ``T.dlq``); a service
    without it is not restricted."""

    publish: list[TopicPattern] = Field(default_factory=list, max_length=1024)
    subscribe: list[TopicPattern] = Field(default_factory=list, max_length=1024)

    def policy(self, service: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> TopicPolicy:
        """The ``TopicPolicy`` granting exactly these to ``service``."""
        grants: dict[str, dict[str, list[str]]] = {}
        for action in ("publish", "subscribe"):
            for pattern in getattr(self, action):
                grants.setdefault(pattern, {"publish": [], "subscribe": []})[action] = [service]
        return TopicPolicy.from_config(grants, trust_domain=trust_domain,
                                       where=f"services.{service}.topics")


class AutoscaleConfig(_Section):
    """``autoscale:``: replicas between ``min`` and ``max`` on load per instance."""

    min: int = Field(1, ge=0, le=1000)
    max: int = Field(1, ge=1, le=1000)
    target_inflight: float | None = Field(None, gt=0)  # in-flight requests per instance
    target_lag: int | None = Field(None, gt=0)  # consumer lag (events) per instance
    cooldown: Duration = 30.0

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if self.target_inflight is None and self.target_lag is None:
            raise ValueError("give target_inflight or target_lag (or both): what to scale on")
        return self


class ServiceConfig(_Section):
    """One entry of ``services:``."""

    app: str
    replicas: int = Field(1, ge=0, le=1000)
    autoscale: AutoscaleConfig | None = None
    load_balancer: str | dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    env: dict[str, str] = Field(default_factory=dict, max_length=1000)
    policies: list[Any] | None = Field(None, max_length=MAX_RULES)
    """Authorization rules for calls to this service (``shoal.mesh.security.authz``)."""
    topics: TopicsConfig | None = None
    _traffic_policy: TrafficPolicy = PrivateAttr(default_factory=TrafficPolicy)

    @field_validator("app")
    @classmethod
    def _app(cls, value: str) -> str:
        if len(value) > 512 or not _APP.fullmatch(value):
            raise ValueError(f"expected module:attribute like shop.orders:svc, got {value!r}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for k, v in value.items():
            if not _LABEL_KEY.fullmatch(k):
                raise ValueError(f"label key {k!r}: use letters, digits, '.', '_', '/', '-'")
            if len(v) > 256:
                raise ValueError(f"label {k!r}: value longer than 256 characters")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for k in value:
            if not _ENV_NAME.fullmatch(k):
                raise ValueError(f"environment variable name {k!r} is invalid")
        return value

    @field_validator("policies")
    @classmethod
    def _policies(cls, value: list[Any] | None) -> list[Any] | None:
        try:  # the rules' shape; the service and trust domain only change messages and ids
            AuthorizationPolicy.from_config("service", value, where="policies")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    def authorization(self, service: str, trust_domain: str = DEFAULT_TRUST_DOMAIN
                      ) -> AuthorizationPolicy | None:
        """The authorization policy guarding ``service`` (None: no ``policies:``)."""
        if self.policies is None:
            return None
        return AuthorizationPolicy.from_config(service, self.policies, trust_domain=trust_domain,
                                               where=f"services.{service}.policies")

    def topic_policy(self, service: str, trust_domain: str = DEFAULT_TRUST_DOMAIN
                     ) -> TopicPolicy | None:
        """What ``service`` may publish and subscribe (None: no ``topics:``, unrestricted)."""
        return None if self.topics is None else self.topics.policy(service, trust_domain)

    @model_validator(mode="after")
    def _policy(self) -> ServiceConfig:
        self._traffic_policy = load_traffic_policy(self.policy_config(), where="policy")
        return self

    def policy_config(self) -> dict[str, Any]:
        """``policy`` with ``load_balancer`` folded in: a ``TrafficPolicy``-shaped dict (what
        ``shoal.gateway.routes.merge_policy`` takes as a service's settings)."""
        data = dict(self.policy or {})
        if "load_balancer" in data and self.load_balancer is not None:
            raise ValueError("give load_balancer or policy.load_balancer, not both")
        lb = self.load_balancer
        if isinstance(lb, str):
            lb = {"policy": lb}
        if lb is not None:
            data["load_balancer"] = lb
        return data

    @property
    def traffic_policy(self) -> TrafficPolicy:
        """The resilience stack's config for calls to this service."""
        return self._traffic_policy


class Manifest(_Section):
    """A whole ``shoal.yaml``, validated."""

    broker: Url = DEFAULT_BROKER_URL
    store: Url | None = None  # default: beside the broker
    admin: AdminConfig = Field(default_factory=AdminConfig)
    gateway: Any = Field(default_factory=lambda: _gateway_section(None, None))
    """The ``gateway:`` section: a ``shoal.gateway.config.GatewayConfig``."""
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    services: dict[ServiceName, ServiceConfig] = Field(default_factory=dict, max_length=1000)
    _path: Path | None = PrivateAttr(default=None)
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @field_validator("store", mode="before")
    @classmethod
    def _store_given(cls, value: Any) -> Any:
        return _url(value)  # written but empty is a mistake, not "the default"

    @model_validator(mode="after")
    def _policy_sources_exist(self) -> Manifest:
        """A rule's ``from:`` naming no service of the manifest is a typo that would deny
        (full SPIFFE ids, for callers outside it, are taken as written)."""
        known = set(self.services) | set(RESERVED_IDENTITIES)
        problems = []
        for name, spec in self.services.items():
            for i, rule in enumerate(spec.policies or ()):
                for source in rule.get("from", ()) if isinstance(rule, Mapping) else ():
                    if isinstance(source, str) and source != "*" and \
                            not source.startswith("spiffe://") and source not in known:
                        close = difflib.get_close_matches(source, sorted(known), n=1)
                        hint = f" (did you mean {close[0]!r}?)" if close else ""
                        names = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10
                                                                else "")
                        problems.append(f"services.{name}.policies[{i}].from: {source!r:.80} "
                                        f"is not a service of this manifest{hint}; name one "
                                        f"of {names}, or a full spiffe:// id")
        if problems:
            raise ValueError("\n".join(problems[:MAX_ERRORS]))
        return self

    @property
    def store_url(self) -> str:
        """The Store URL: ``store``, else the one beside the broker."""
        return self.store or default_store_for(self.broker)

    @property
    def path(self) -> Path | None:
        """The file this manifest was read from (None when built in code)."""
        return self._path

    @property
    def directory(self) -> Path:
        """The manifest's directory (the working directory of its services)."""
        return self.path.parent if self.path is not None else Path.cwd()

    def line_of(self, key: str) -> int | None:
        """The line where the dotted ``key`` (e.g. ``"broker"``) is written, if it is."""
        return self._lines.get(key)


# -- loading ----------------------------------------------------------------------------
def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path``; ``ManifestError`` lists every problem."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError([ManifestIssue(path, None, "", "no such file")]) from None
    except IsADirectoryError:
        raise ManifestError([ManifestIssue(path, None, "",
                                           "is a directory, not a manifest file")]) from None
    except OSError as e:
        raise ManifestError([ManifestIssue(path, None, "",
                                           f"cannot be read: {e.strerror}")]) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError([ManifestIssue(
            path, None, "", f"larger than the limit of {MAX_MANIFEST_BYTES} bytes (1 MiB): "
                            "not a manifest")])
    return parse_manifest(raw, path)


def parse_manifest(text: str | bytes, path: str | Path = MANIFEST_NAME) -> Manifest:
    """Validate a manifest's text; ``path`` is only used in messages."""
    path = Path(path)
    try:
        doc = load_yaml(text, str(path))
    except YamlError as e:
        raise ManifestError([ManifestIssue(path, e.line, "", e.message)]) from None
    data = {} if doc.data is None else doc.data
    if not isinstance(data, dict):
        raise ManifestError([ManifestIssue(
            path, 1, "", f"the manifest must be a mapping (keys like broker:, services:), "
                         f"not {_kind(data)}")])
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    issues = []
    try:
        data["gateway"] = _gateway_section(doc, data.get("gateway"))
    except YamlError as e:
        issues.append(ManifestIssue(path, e.line, "", e.message))
        del data["gateway"]
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        issues.extend(_issues(e, path, doc.lines, data))
    if issues:
        raise ManifestError(sorted(issues, key=lambda i: i.line or 0)[:MAX_ERRORS])
    manifest._path = path
    manifest._lines = {_dotted(key): line for key, line in doc.lines.items() if key}
    return manifest


def _gateway_section(doc: YamlDocument | None, section: Any) -> GatewayConfig:
    """The gateway section through its one schema (imported here: only ``shoal gateway``
    and ``shoal up`` need the gateway's modules otherwise)."""
    from shoal.gateway.config import GatewayConfig, gateway_section

    if doc is None:
        return GatewayConfig()
    return gateway_section(doc, section)


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", list: "a list",
          dict: "a mapping", str: "a string"}


def _kind(value: Any) -> str:
    if value is None:
        return "empty (null)"
    return _KINDS.get(type(value), f"a {type(value).__name__}")


_KEY_PREFIX = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:(?:\.|\[)[A-Za-z0-9_\]-]+)*): ")


def _issues(error: ValidationError, path: Path, lines: dict[tuple[Any, ...], int],
            data: Any) -> list[ManifestIssue]:
    issues = []
    for item in error.errors(include_url=False)[:MAX_ERRORS]:
        loc = _clean_loc(item["loc"], data)
        messages = _message(item, loc, data).split("\n") if not loc else [
            _message(item, loc, data)]  # a check across sections finds several problems
        for message in messages:
            issues.append(_issue(item, loc, message, path, lines))
    return sorted(issues, key=lambda i: i.line or 0)  # in the order a reader meets them


def _issue(item: Mapping[str, Any], loc: tuple[Any, ...], message: str, path: Path,
           lines: dict[tuple[Any, ...], int]) -> ManifestIssue:
    """One issue, placed at the key its message starts with when a sub-loader named one."""
    key_loc = loc
    m = _KEY_PREFIX.match(message)  # "policy.retries.attempts: ..." from a sub-loader
    if m and item["type"] == "value_error":
        sub = tuple(int(p) if p.isdigit() else p
                    for p in re.split(r"\.|\[|\]\.?", m.group(1)) if p)
        if sub and sub[0] == "policy" and len(loc) >= 1:
            base = loc[:-1] if loc and loc[-1] == "policy" else loc
            key_loc = (*base, *sub)
            if sub[0] == "policy" and key_loc not in lines:
                key_loc = (*base, *sub[1:])  # load_balancer folded into the policy
            message = message[m.end():]
        elif sub and loc and sub[0] == loc[-1]:  # "policies[0].action: ..." of a rule
            key_loc = (*loc[:-1], *sub)
            message = message[m.end():]
        elif sub and not loc and sub[0] == "services":  # a check across sections
            key_loc = sub
            message = message[m.end():]
    return ManifestIssue(path, _line_for(key_loc, lines), _dotted(key_loc), message)


_MARKERS = ("str", "dict", "int", "float", "function-after", "function-before")


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Pydantic's loc without its union/function markers (``str``, ``dict[str,any]``...):
    a part that is a key of the data at that point is the user's, even if named ``int``."""
    out = []
    for part in loc:
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif isinstance(part, str) and ("[" in part or part in _MARKERS):
            continue
        else:
            data = None
        out.append(part)
    return tuple(out)


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for n in range(len(loc), 0, -1):
        line = lines.get(loc[:n])
        if line is not None:
            return line
    return 1 if lines else None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _model_at(parent: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model whose keys live at ``parent`` (for "did you mean")."""
    if not parent:
        return Manifest
    if len(parent) == 1:
        return {"admin": AdminConfig, "security": SecurityConfig}.get(str(parent[0]))
    if parent[0] == "services" and len(parent) == 2:
        return ServiceConfig
    if parent[0] == "services" and len(parent) == 3 and parent[2] == "autoscale":
        return AutoscaleConfig
    if parent[0] == "services" and len(parent) == 3 and parent[2] == "topics":
        return TopicsConfig
    return None


def _message(item: Mapping[str, Any], loc: tuple[Any, ...], data: Any) -> str:
    kind = item["type"]
    given = item.get("input")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; expected one of {', '.join(known)}"
    if kind == "missing":
        return "required, but missing"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {given!r}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {given!r}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {_kind(given)}"
    if kind == "list_type":
        return f"expected a list, got {_kind(given)}"
    if kind in ("string_type",):
        return f"expected a string, got {_kind(given)}"
    if kind == "literal_error":
        return f"expected {item['ctx']['expected']}, got {given!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return f"{item['msg'].lower()}, got {given!r}"
    if kind in ("too_long",):
        return f"too many entries: {item['msg'].lower()}"
    if kind == "value_error":
        return str(item["ctx"]["error"]) if "ctx" in item else item["msg"]
    return f"{item['msg']}, got {given!r}" if given is not None else item["msg"]
