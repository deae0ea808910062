"""The service registry: which instances of which service are where, and in which state.

Store layout, under ``shoal/registry/``::

    <service>/<instance id>          Instance (msgspec JSON), with the owner's lease
    <service>/<instance id>/health   HealthVerdict (msgspec JSON), with the HealthMonitor's lease

**One writer per key** (the design choice, written down once):

* The owner's ``Registration`` alone writes the instance key. It registers, heartbeats
  (lease keepalive and a ``last_heartbeat`` refresh every ttl/3), declares its state
  (``set_state``: STARTING while warming up, SERVING when ready, DRAINING on the way
  out) and deregisters. A process killed with -9 stops heartbeating; its lease runs out,
  the store deletes the key, and every watcher sees the instance leave.
* The ``HealthMonitor`` runs ``InstanceHealth`` on active checks and writes its verdict to
  the ``/health`` key beside the instance key. It must not write the instance key: the
  Store attaches a key to the lease of its *last* writer, so a monitor write would
  detach the key from the owner's lease, and a kill -9 of the owner would then leave
  the instance registered forever. (A cas on the instance key would keep heartbeats
  from being lost, but not the lease.)
* Readers (``EndpointCache``, ``Registry.list``) combine both with ``effective_state``:
  an instance its owner declares SERVING takes the monitor's verdict (SERVING, STARTING
  until a check passed, UNHEALTHY after ``unhealthy_threshold`` failures); any other
  declared state stands, so a draining or not-ready owner is believed at once. A verdict
  names the registration it judges (``registered_at``) and never applies to a later one
  that reuses the id. Verdicts are leased to the monitor: when it stops, they vanish and
  instances count as their owners declare them (fail open, as Envoy does without a
  health checker). One HealthMonitor per store.

Malformed values (other writers, older versions) are skipped with a warning; they never
stop a watcher.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ipaddress
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.errors import ConfigError, LeaseExpired, ShoalError, StoreError
from shoal.events.bus import EventBus, Message
from shoal.mesh.ejections import (
    EJECTIONS_PREFIX,
    EjectionReport,
    decode_report,
    parse_ejection_key,
)
from shoal.mesh.endpoint import Endpoint
from shoal.mesh.health import ActiveCheckSchedule, HealthCheckConfig, HealthState, InstanceHealth
from shoal.mesh.http1 import ConnectionPool
from shoal.store.base import Change, Entry, Lease, Store
from shoal.units import parse_duration

if TYPE_CHECKING:
    from shoal.mesh.security.tls import MeshTLS

log = logging.getLogger(__name__)

REGISTRY_PREFIX = "shoal/registry/"
HEALTH_SUFFIX = "/health"
INSTANCES_TOPIC = "shoal.instances"
STATE_CHANGED = "shoal.instance.state_changed"
DEFAULT_TTL = 10.0
MAX_WEIGHT = 1_000_000
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_REASON = 1024
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the NUL
USER_AGENT = "shoal-health-check/1"

_SERVICE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:{_DNS_LABEL}\.)*{_DNS_LABEL}")
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")


class RegistrationLost(StoreError):
    """Another writer took over or removed this instance's key; heartbeats stopped."""


# -- validation ------------------------------------------------------------------------
def check_service_name(name: object) -> str:
    """``name`` if it is a valid service name (a DNS label); else ConfigError."""
    if not isinstance(name, str) or not _SERVICE.fullmatch(name):
        raise ConfigError(
            f"service name {name!r}: must be 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit (a DNS label)")
    return name


def check_instance_id(instance_id: object) -> str:
    """``instance_id`` if it is 1-128 of ``A-Z a-z 0-9 . _ -``; else ConfigError."""
    if not isinstance(instance_id, str) or not _INSTANCE_ID.fullmatch(instance_id):
        raise ConfigError(
            f"instance id {instance_id!r}: must be 1-128 letters, digits, '.', '_' or '-'")
    return instance_id


def check_address(address: object, *, what: str = "address") -> str:
    """``host:port`` (hostname, IPv4 or ``[IPv6]``) or an absolute unix socket path."""
    form = "'host:port', '/path/to.sock' or 'unix:/path/to.sock'"
    if not isinstance(address, str) or not address:
        raise ConfigError(f"{what}: must be {form}, got {address!r}")
    if address.startswith(("/", "unix:")):
        path = address.removeprefix("unix:")
        if not path.startswith("/"):
            raise ConfigError(f"{what} {address!r}: a unix socket path must be absolute "
                              "(processes do not share a working directory)")
        if "\0" in path or len(path.encode(errors="replace")) > MAX_SOCKET_PATH:
            raise ConfigError(f"{what} {address!r}: not a usable unix socket path "
                              f"(at most {MAX_SOCKET_PATH} bytes, no NUL)")
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what} {address!r}: must be {form} with a port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(f"{what} {address!r}: {host} is not an IPv6 address") from None
    elif not _HOST.fullmatch(host):
        raise ConfigError(f"{what} {address!r}: {host!r} is not a hostname or IP address "
                          "(write IPv6 as [::1]:port)")
    return address


def _check_labels(labels: object, where: str) -> None:
    if not isinstance(labels, dict):
        raise ConfigError(f"{where}: labels must be a mapping of str to str")
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"{where}: {len(labels)} labels, more than {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ConfigError(f"{where}: label name {key!r} must be 1-63 letters, digits, "
                              "'.', '_', '/' or '-', starting and ending with a letter or digit")
        if (not isinstance(value, str) or len(value) > MAX_LABEL_VALUE
                or not value.isprintable()):
            raise ConfigError(f"{where}: label {key!r} must be a printable str of at most "
                              f"{MAX_LABEL_VALUE} chars, got {value!r}")


def _coerce_state(state: object, where: str) -> HealthState:
    if isinstance(state, HealthState):
        return state
    try:
        return HealthState(state)
    except ValueError:
        names = ", ".join(s.value for s in HealthState)
        raise ConfigError(f"{where}: state must be one of {names}; got {state!r}") from None


def _check_time(value: object, name: str, where: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0):
        raise ConfigError(f"{where}: {name} must be a wall-clock time >= 0, got {value!r}")


# -- stored values ---------------------------------------------------------------------
class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One instance of a service: where it listens and in which state (its stored form)."""

    id: str
    service: str
    address: str  # "host:port", "/path.sock" or "unix:/path.sock"
    labels: dict[str, str] = {}  # e.g. {"version": "1.4", "zone": "a"}
    weight: int = 1
    state: HealthState = HealthState.SERVING  # as declared by the owner (when stored)
    reason: str = ""  # why the state is what it is
    registered_at: float = 0.0  # wall clock; set by Registry.register
    last_heartbeat: float = 0.0  # wall clock of the owner's last write

    def __post_init__(self) -> None:
        check_service_name(self.service)
        check_instance_id(self.id)
        where = f"instance {self.service}/{self.id}"
        check_address(self.address, what=f"{where}: address")
        if type(self.weight) is not int or not 1 <= self.weight <= MAX_WEIGHT:
            raise ConfigError(
                f"{where}: weight must be an integer 1..{MAX_WEIGHT}, got {self.weight!r}")
        msgspec.structs.force_setattr(self, "state", _coerce_state(self.state, where))
        _check_labels(self.labels, where)
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON:
            raise ConfigError(f"{where}: reason must be a str of at most {MAX_REASON} chars")
        _check_time(self.registered_at, "registered_at", where)
        _check_time(self.last_heartbeat, "last_heartbeat", where)

    def endpoint(self) -> Endpoint:
        """This instance as the balancers see it."""
        return Endpoint(self.id, self.service, self.address, self.labels, self.weight,
                        self.registered_at)


class HealthVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """The HealthMonitor's verdict on one registration of an instance, from active checks."""

    state: HealthState
    reason: str = ""
    at: float = 0.0  # wall clock of the transition that produced this state
    registered_at: float = 0.0  # the registration judged (an id may be registered again)


def _verdict_applies(record: Instance, verdict: HealthVerdict | None) -> bool:
    return (verdict is not None and record.state is HealthState.SERVING
            and verdict.registered_at == record.registered_at)


def effective_state(record: Instance, verdict: HealthVerdict | None) -> HealthState:
    """The state clients act on: the verdict for a SERVING-declared instance, else its own."""
    if verdict is not None and _verdict_applies(record, verdict):
        return verdict.state
    return record.state


def _effective(record: Instance, verdict: HealthVerdict | None) -> Instance:
    """``record`` with its effective state (and the verdict's reason when that applies)."""
    if not _verdict_applies(record, verdict):
        return record
    assert verdict is not None
    return msgspec.structs.replace(record, state=verdict.state, reason=verdict.reason)


_encoder = msgspec.json.Encoder()
_instance_decoder = msgspec.json.Decoder(Instance)
_verdict_decoder = msgspec.json.Decoder(HealthVerdict)


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise ConfigError(f"registry prefix: must end with '/', got {prefix!r}")
    return prefix


def instance_key(service: str, instance_id: str, prefix: str = REGISTRY_PREFIX) -> str:
    """The store key of an instance."""
    return f"{prefix}{service}/{instance_id}"


def health_key(service: str, instance_id: str, prefix: str = REGISTRY_PREFIX) -> str:
    """The store key of the HealthMonitor's verdict on an instance."""
    return f"{prefix}{service}/{instance_id}{HEALTH_SUFFIX}"


def _parse_key(prefix: str, key: str) -> tuple[str, str, bool] | None:
    """``(service, instance id, is_verdict)`` of a registry key, or None if it is not one."""
    parts = key[len(prefix):].split("/")
    if len(parts) == 2 or (len(parts) == 3 and parts[2] == HEALTH_SUFFIX[1:]):
        service, instance_id = parts[0], parts[1]
        if _SERVICE.fullmatch(service) and _INSTANCE_ID.fullmatch(instance_id):
            return service, instance_id, len(parts) == 3
    return None


def _decode(key: str, value: bytes, service: str, instance_id: str,
            is_verdict: bool) -> Instance | HealthVerdict | None:
    """The stored value, or None (with a warning) when it is malformed."""
    try:
        if is_verdict:
            return _verdict_decoder.decode(value)
        record = _instance_decoder.decode(value)
    except msgspec.DecodeError as e:
        log.warning("registry: skipping malformed value of %r: %s", key, e)
        return None
    if (record.service, record.id) != (service, instance_id):
        log.warning("registry: skipping %r: it holds instance %s/%s, not %s/%s", key,
                    record.service, record.id, service, instance_id)
        return None
    return record


def _read_entries(prefix: str, entries: list[Entry]
                  ) -> dict[tuple[str, str], tuple[Instance | None, HealthVerdict | None]]:
    """Records and verdicts per (service, instance id), skipping malformed entries."""
    out: dict[tuple[str, str], tuple[Instance | None, HealthVerdict | None]] = {}
    for entry in entries:
        parsed = _parse_key(prefix, entry.key)
        if parsed is None:
            log.warning("registry: skipping %r: not <service>/<instance id>[/health]", entry.key)
            continue
        service, instance_id, is_verdict = parsed
        value = _decode(entry.key, entry.value, service, instance_id, is_verdict)
        if value is None:
            continue
        record, verdict = out.get((service, instance_id), (None, None))
        if isinstance(value, HealthVerdict):
            out[(service, instance_id)] = (record, value)
        else:
            out[(service, instance_id)] = (value, verdict)
    return out


# -- the owner's side ------------------------------------------------------------------
class Registration:
    """A live registration: keeps its lease and ``last_heartbeat`` fresh until deregistered."""

    def __init__(self, registry: Registry, record: Instance, lease: Lease, revision: int,
                 ttl: float) -> None:
        self.instance = record  # the record as last written
        self.ttl = ttl
        self.key = instance_key(record.service, record.id, registry.prefix)
        self.lost = False  # another writer took over or removed the key
        self.closed = False
        self._lost_reason = ""
        self._registry = registry
        self._store = registry.store
        self._lease = lease
        self._revision = revision
        self._lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(
            self._beat(), name=f"shoal-registry-heartbeat {self.key}")

    def __repr__(self) -> str:
        return f"<Registration {self.key} {self.instance.state.value} ttl={self.ttl:g}s>"

    @property
    def state(self) -> HealthState:
        """The state this owner declared."""
        return self.instance.state

    async def set_state(self, state: HealthState | str, reason: str = "") -> None:
        """Declare a new state (not GONE: use ``deregister``); DRAINING is final."""
        where = f"instance {self.instance.service}/{self.instance.id}"
        state = _coerce_state(state, where)
        if state is HealthState.GONE:
            raise ConfigError(f"{where}: use deregister() to leave the registry")
        async with self._lock:
            self._check_open()
            if self.instance.state is HealthState.DRAINING and state is not HealthState.DRAINING:
                raise ConfigError(f"{where}: draining is final; register a new instance instead")
            await self._write(msgspec.structs.replace(
                self.instance, state=state, reason=reason, last_heartbeat=time.time()))

    async def heartbeat(self) -> None:
        """Renew the lease and refresh ``last_heartbeat`` now (done every ttl/3 anyway)."""
        async with self._lock:
            self._check_open()
            record = msgspec.structs.replace(self.instance, last_heartbeat=time.time())
            try:
                await self._lease.keepalive()
            except LeaseExpired:
                await self._register_again(record)
                return
            await self._write(record)

    async def deregister(self, *, grace: float | str = 0.0, reason: str = "deregistering") -> None:
        """Leave: state DRAINING (clients stop sending), wait ``grace``, then delete the key."""
        seconds = parse_duration(grace, name="grace") or 0.0
        if self.closed:
            return
        if not self.lost:
            try:
                if self.instance.state is not HealthState.DRAINING:
                    await self.set_state(HealthState.DRAINING, reason)
                if seconds:
                    await asyncio.sleep(seconds)  # heartbeats go on meanwhile
            except RegistrationLost:
                pass
        async with self._lock:
            if self.closed:
                return
            self.closed = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if not self.lost:
                try:
                    await self._lease.revoke()  # deletes the key (only if it is still ours)
                except StoreError as e:
                    log.warning("registry: revoking the lease of %s failed (the key goes "
                                "when it expires): %s", self.key, e)
        self._registry._forget(self)

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.deregister()

    # -- internals -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise StoreError(f"registration {self.key}: deregistered")
        if self.lost:
            raise RegistrationLost(f"registration {self.key}: {self._lost_reason}")

    async def _write(self, record: Instance) -> None:
        """cas at our last revision; a foreign write means the key is no longer ours."""
        value = _encoder.encode(record)
        for _ in range(2):
            try:
                revision = await self._store.cas(
                    self.key, value, expected_revision=self._revision, lease=self._lease)
            except LeaseExpired:
                await self._register_again(record)
                return
            if revision is not None:
                self.instance, self._revision = record, revision
                return
            current = await self._store.get(self.key)
            if current is None or current.lease != self._lease.id:
                self._lose("taken over by another registration of the same id"
                           if current else "deleted by another writer")
                raise RegistrationLost(f"registration {self.key}: {self._lost_reason}")
            self._revision = current.revision  # our own earlier write whose reply we lost
        raise StoreError(f"registration {self.key}: could not write (concurrent writers)")

    async def _register_again(self, record: Instance) -> None:
        """The lease ran out (process paused, store unreachable): a new registration."""
        lease = await self._store.lease(self.ttl)
        now = time.time()
        record = msgspec.structs.replace(record, registered_at=now, last_heartbeat=now)
        try:
            revision = await self._store.cas(self.key, _encoder.encode(record),
                                             expected_revision=0, lease=lease)
        except BaseException:
            with contextlib.suppress(StoreError):
                await lease.revoke()
            raise
        if revision is None:
            with contextlib.suppress(StoreError):
                await lease.revoke()
            self._lose("its lease expired and another registration took the id")
            raise RegistrationLost(f"registration {self.key}: {self._lost_reason}")
        log.warning("registry: the lease of %s (ttl %gs) expired; registered it again",
                    self.key, self.ttl)
        self._lease, self._revision, self.instance = lease, revision, record

    def _lose(self, why: str) -> None:
        self.lost = True
        self._lost_reason = why
        log.warning("registry: %s was %s; its heartbeats stop", self.key, why)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.heartbeat()
            except RegistrationLost:
                return
            except StoreError as e:
                if self.closed:
                    return
                log.warning("registry: heartbeat of %s failed, retrying: %s", self.key, e)
            except Exception:
                log.exception("registry: heartbeat of %s failed, retrying", self.key)


class Registry:
    """Registers this process's instances and reads the registry: ``Registry(store)``."""

    def __init__(self, store: Store, *, prefix: str = REGISTRY_PREFIX) -> None:
        self.store = store
        self.prefix = _check_prefix(prefix)
        self._registrations: dict[str, Registration] = {}

    async def register(self, instance: Instance, *, ttl: float | str = DEFAULT_TTL
                       ) -> Registration:
        """Write ``instance`` with a lease of ``ttl``, kept alive in the background.

        The newest registration of an id wins: one left by a crashed predecessor is
        replaced (and the predecessor, if still alive, notices and stops).
        """
        if not isinstance(instance, Instance):
            raise ConfigError(f"register: expected an Instance, got {type(instance).__name__}")
        seconds = parse_duration(ttl, name="ttl")
        if seconds is None or seconds <= 0:
            raise ConfigError(f"ttl: must be a duration greater than zero, got {ttl!r}")
        if instance.state is HealthState.GONE:
            raise ConfigError(f"instance {instance.service}/{instance.id}: cannot register "
                              "in state 'gone'")
        now = time.time()
        record = msgspec.structs.replace(instance, registered_at=now, last_heartbeat=now)
        lease = await self.store.lease(seconds)
        try:
            revision = await self.store.put(
                instance_key(record.service, record.id, self.prefix), _encoder.encode(record),
                lease=lease)
        except BaseException:
            with contextlib.suppress(StoreError):
                await lease.revoke()
            raise
        registration = Registration(self, record, lease, revision, seconds)
        self._registrations[registration.key] = registration
        return registration

    def instances(self) -> builtins.list[Registration]:
        """The registrations this Registry keeps alive (this process's instances)."""
        return builtins.list(self._registrations.values())

    async def list(self, service: str | None = None) -> builtins.list[Instance]:
        """Registered instances (of ``service``, or all), with their effective state."""
        prefix = self.prefix if service is None else f"{self.prefix}{check_service_name(service)}/"
        found = _read_entries(self.prefix, await self.store.list(prefix))
        return [_effective(record, verdict)
                for _, (record, verdict) in sorted(found.items(), key=lambda kv: kv[0])
                if record is not None]

    async def close(self) -> None:
        """Deregister every instance this Registry holds."""
        for registration in self.instances():
            await registration.deregister()

    def _forget(self, registration: Registration) -> None:
        if self._registrations.get(registration.key) is registration:
            del self._registrations[registration.key]


# -- the client's side -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InstanceChange:
    """An instance changed in the registry; ``before``/``after`` carry the effective state."""

    service: str
    instance_id: str
    before: Instance | None  # None: it was not registered
    after: Instance | None  # None: it left (deregistered, or its lease expired)
    record: Instance | None  # the owner's record as stored (its declared state)
    reason: str
    at: float  # wall clock of the write that caused it (of the observation, for a delete)
    initial: bool = False  # from the first listing, not a live change


@dataclass(slots=True)
class _Slot:
    record: Instance | None = None
    verdict: HealthVerdict | None = None
    view: Instance | None = None  # the record with its effective state
    endpoint: Endpoint | None = None


ServiceCallback = Callable[[str, list[Endpoint]], None]
InstanceCallback = Callable[[InstanceChange], None]


class EndpointCache:
    """A client's live view of the registry: ``await EndpointCache(store).start()``.

    Lists the registry, then watches it from the listed revision (nothing is missed and
    nothing polled), and keeps per service the endpoints a balancer may use: instances
    whose effective state is ``in_pool``. ``is_healthy`` is the balancer's predicate.
    """

    def __init__(self, store: Store, *, prefix: str = REGISTRY_PREFIX) -> None:
        self.store = store
        self.prefix = _check_prefix(prefix)
        self.revision = 0  # the store revision the view reflects
        self._services: dict[str, dict[str, _Slot]] = {}
        self._pools: dict[str, list[Endpoint]] = {}
        self._signatures: dict[str, tuple[tuple[Endpoint, HealthState], ...]] = {}
        self._service_callbacks: dict[str, list[ServiceCallback]] = {}
        self._instance_callbacks: list[InstanceCallback] = []
        self._waiters: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._stream: Any = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> EndpointCache:
        """Load the registry and follow its changes in a background task."""
        if self._task is None:
            entries, revision = await self._snapshot()
            self._load(entries, initial=True)
            self.revision = revision
            self._stream = self.store.watch(self.prefix, after_revision=revision)
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name=f"shoal-endpoint-cache {self.prefix}")
        return self

    async def close(self) -> None:
        """Stop following the registry; pending ``wait_for`` calls raise."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._stream is not None:
            await self._stream.aclose()
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()

    async def __aenter__(self) -> EndpointCache:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading ---------------------------------------------------------------------------
    def endpoints(self, service: str) -> list[Endpoint]:
        """The in-pool endpoints of ``service``, by instance id (do not mutate: shared)."""
        return self._pools.get(service, [])

    def services(self) -> list[str]:
        """Every service with at least one registered instance."""
        return sorted(s for s, slots in self._services.items()
                      if any(slot.view for slot in slots.values()))

    def instances(self, service: str | None = None) -> list[Instance]:
        """Registered instances (any state) with their effective state."""
        names = [service] if service is not None else sorted(self._services)
        return [slot.view for name in names
                for _, slot in sorted(self._services.get(name, {}).items(), key=lambda kv: kv[0])
                if slot.view is not None]

    def get(self, service: str, instance_id: str) -> Instance | None:
        """One instance with its effective state, or None."""
        slot = self._services.get(service, {}).get(instance_id)
        return None if slot is None else slot.view

    def state(self, service: str, instance_id: str) -> HealthState | None:
        """The effective state of one instance (None: not registered)."""
        view = self.get(service, instance_id)
        return None if view is None else view.state

    def is_healthy(self, endpoint: Endpoint) -> bool:
        """True if ``endpoint`` is SERVING (the balancer's ``is_healthy``)."""
        return self.state(endpoint.service, endpoint.instance_id) is HealthState.SERVING

    async def wait_for(self, service: str,
                       predicate: Callable[[list[Endpoint]], bool] = bool,
                       timeout: float | str = 5.0) -> list[Endpoint]:
        """Wait until ``predicate(endpoints(service))`` holds (default: any endpoint).

        The predicate is re-evaluated on every change of the service's instances.
        """
        seconds = parse_duration(timeout, name="timeout") or 0.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if self._closed:
                raise StoreError("endpoint cache: closed")
            endpoints = self.endpoints(service)
            if predicate(endpoints):
                return endpoints
            event = self._waiters.setdefault(service, asyncio.Event())
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await event.wait()
            except TimeoutError:
                raise TimeoutError(
                    f"endpoint cache: waited {seconds:g}s for service {service!r} to reach "
                    f"the expected endpoints; it has {len(endpoints)} in pool "
                    f"({', '.join(e.instance_id for e in endpoints) or 'none'})") from None

    def on_change(self, service: str, callback: ServiceCallback) -> Callable[[], None]:
        """Call ``callback(service, endpoints)`` when the pool (or a member's health) changes.

        Returns a function that unsubscribes. Callbacks run in the cache's task: keep
        them short and non-blocking; an exception is logged, not propagated.
        """
        self._service_callbacks.setdefault(service, []).append(callback)
        return lambda: _discard(self._service_callbacks.get(service, []), callback)

    def on_instance(self, callback: InstanceCallback) -> Callable[[], None]:
        """Call ``callback(InstanceChange)`` on every change of any instance (heartbeats too)."""
        self._instance_callbacks.append(callback)
        return lambda: _discard(self._instance_callbacks, callback)

    # -- following the store ---------------------------------------------------------------
    async def _snapshot(self) -> tuple[list[Entry], int]:
        """A listing and the revision it reflects (retried while writes land in between;
        the fallback replays a few changes already listed, which converges)."""
        for _ in range(5):
            revision = await self.store.revision()
            entries = await self.store.list(self.prefix)
            if await self.store.revision() == revision:
                break
        return entries, revision

    async def _follow(self) -> None:
        while not self._closed:
            try:
                async for change in self._stream:
                    self.revision = change.revision
                    self._apply(change)
                return  # the store was closed
            except StoreError as e:  # fell behind the kept history, or a transient failure
                if self._closed:
                    return
                log.warning("endpoint cache: %s; listing the registry again", e)
            await self._stream.aclose()
            await self._resync()

    async def _resync(self) -> None:
        """List again and watch from there, emitting what changed meanwhile."""
        delay = 0.05
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                entries, revision = await self._snapshot()
                stream = self.store.watch(self.prefix, after_revision=revision)
            except StoreError as e:
                log.warning("endpoint cache: listing the registry failed, retrying: %s", e)
                delay = min(delay * 2, 2.0)
                continue
            self._load(entries, initial=False)
            self.revision, self._stream = revision, stream
            return

    def _load(self, entries: list[Entry], *, initial: bool) -> None:
        """Make the view equal to ``entries`` (a fresh listing), emitting the differences."""
        listed = {e.key for e in entries}
        for service, slots in builtins.list(self._services.items()):
            for instance_id, slot in builtins.list(slots.items()):
                for key, held in ((instance_key(service, instance_id, self.prefix), slot.record),
                                  (health_key(service, instance_id, self.prefix), slot.verdict)):
                    if held is not None and key not in listed:
                        self._apply(Change("delete", key, None, 0))
        for entry in entries:
            self._apply(Change("put", entry.key, entry.value, entry.revision), initial=initial)

    def _apply(self, change: Change, *, initial: bool = False) -> None:
        parsed = _parse_key(self.prefix, change.key)
        if parsed is None:
            if change.kind == "put":
                log.warning("endpoint cache: skipping %r: not <service>/<instance id>[/health]",
                            change.key)
            return
        service, instance_id, is_verdict = parsed
        slots = self._services.setdefault(service, {})
        slot = slots.get(instance_id) or _Slot()
        value = None
        if change.value is not None:
            value = _decode(change.key, change.value, service, instance_id, is_verdict)
        if is_verdict:
            slot.verdict = value  # type: ignore[assignment]
        else:
            slot.record = value  # type: ignore[assignment]
        before = slot.view
        after = slot.view = None if slot.record is None else _effective(slot.record, slot.verdict)
        if slot.record is None and slot.verdict is None:
            slots.pop(instance_id, None)
            if not slots:
                del self._services[service]
        else:
            slots[instance_id] = slot
        if before == after:
            return
        if after is not None:
            old = slot.endpoint
            if (old is None or old.address != after.address or old.weight != after.weight
                    or old.labels != after.labels or old.registered_at != after.registered_at):
                slot.endpoint = after.endpoint()
        else:
            slot.endpoint = None
        self._emit(service, instance_id, before, after, slot, is_verdict, initial)
        self._refresh_pool(service)
        waiter = self._waiters.pop(service, None)
        if waiter is not None:  # any change of the service: predicates may look beyond the pool
            waiter.set()

    def _emit(self, service: str, instance_id: str, before: Instance | None,
              after: Instance | None, slot: _Slot, is_verdict: bool, initial: bool) -> None:
        if not self._instance_callbacks:
            return
        if after is None:
            assert before is not None
            drained = before.state is HealthState.DRAINING
            reason = "deregistered" if drained else "registration lease expired (no heartbeat)"
            at = time.time()
        elif before is None:
            reason, at = ("listed" if initial else "registered"), after.registered_at
        elif is_verdict and slot.verdict is not None:
            reason, at = after.reason, slot.verdict.at
        else:
            reason = after.reason or f"declared {after.state.value} by its owner"
            at = after.last_heartbeat
        change = InstanceChange(service, instance_id, before, after, slot.record, reason, at,
                                initial)
        for callback in builtins.list(self._instance_callbacks):
            try:
                callback(change)
            except Exception:
                log.exception("endpoint cache: instance callback %r failed", callback)

    def _refresh_pool(self, service: str) -> None:
        slots = self._services.get(service, {})
        members = [(slot.endpoint, slot.view.state)
                   for _, slot in sorted(slots.items(), key=lambda kv: kv[0])
                   if slot.view is not None and slot.endpoint is not None
                   and slot.view.state.in_pool]
        signature = tuple(members)
        if signature == self._signatures.get(service, ()):
            return
        pool = [endpoint for endpoint, _ in members]
        if pool:
            self._pools[service], self._signatures[service] = pool, signature
        else:
            self._pools.pop(service, None)
            self._signatures.pop(service, None)
        for callback in builtins.list(self._service_callbacks.get(service, [])):
            try:
                callback(service, pool)
            except Exception:
                log.exception("endpoint cache: callback %r for %r failed", callback, service)


def _discard(callbacks: list[Any], callback: Any) -> None:
    with contextlib.suppress(ValueError):
        callbacks.remove(callback)


async def http_check(pool: ConnectionPool, path: str, timeout: float) -> tuple[bool, str]:
    """One active health check through ``pool``: ``GET path``, passed if it answers 2xx
    within ``timeout``; returns (passed, what happened)."""
    where = f"GET {path} on {pool.address}"
    try:
        async with asyncio.timeout(timeout):
            response = await pool.request(
                "GET", path, [("User-Agent", USER_AGENT), ("Accept", "*/*")])
            await response.aread()
    except TimeoutError:
        return False, f"{where} timed out after {timeout:g}s"
    except (ShoalError, OSError, ValueError) as e:
        return False, f"{where} failed: {e}"
    except Exception as e:  # whatever went wrong, the check did not pass
        log.debug("health check: unexpected error checking %s", where, exc_info=True)
        return False, f"{where} failed: {e!r}"
    return 200 <= response.status < 300, f"{where} answered HTTP {response.status}"


# -- the control plane's side ----------------------------------------------------------
@dataclass(slots=True)
class _Tracked:
    """The HealthMonitor's state for one registration."""

    record: Instance
    health: InstanceHealth
    config: HealthCheckConfig
    pool: ConnectionPool | None = None
    task: asyncio.Task[None] | None = None
    checked: bool = False  # at least one active check finished
    reason: str = ""
    reason_at: float = 0.0
    written: HealthVerdict | None = None  # the verdict last written to the store


class HealthMonitor:
    """Runs active health checks on every registered instance and publishes transitions.

    For each registration it keeps an ``InstanceHealth`` fed with ``GET <path>`` checks
    (through ``shoal.mesh.http1``, on the ``HealthCheckConfig`` schedule) and with the
    owner's drain; it writes the resulting state as a ``HealthVerdict`` beside the
    instance key (see the module docstring). Every change of an instance's effective
    state - registered, checks failing or passing, draining, gone (deregistered or
    lease expired) - is published on ``shoal.instances`` as a ``shoal.instance.state_changed``
    CloudEvent keyed by instance id, with data ``{instance, service, from, to, reason, at}``
    (``from`` is None for a registration, ``to`` is ``"gone"`` when it left).

    Passive outlier detection feeds it too: callers share their ejections under
    ``shoal/ejections/`` (``shoal.mesh.ejections``); the first report on an instance makes
    it EJECTED, the end of the last one takes that back.
    """

    def __init__(self, store: Store, bus: EventBus, *,
                 config: HealthCheckConfig | None = None,
                 services: Mapping[str, HealthCheckConfig] | None = None,
                 topic: str = INSTANCES_TOPIC, prefix: str = REGISTRY_PREFIX,
                 verdict_ttl: float | str = DEFAULT_TTL,
                 rng: random.Random | None = None, tls: MeshTLS | None = None) -> None:
        self.store = store
        self.tls = tls  # checks over mutual TLS, with the checker's own identity
        self.bus = bus
        self.topic = topic
        self.prefix = _check_prefix(prefix)
        self.config = config if config is not None else HealthCheckConfig()
        self.services = dict(services or {})
        ttl = parse_duration(verdict_ttl, name="verdict_ttl")
        if ttl is None or ttl <= 0:
            raise ConfigError(f"verdict_ttl: must be a duration greater than zero, "
                              f"got {verdict_ttl!r}")
        self.verdict_ttl = ttl
        self.published = 0  # events published so far
        self.cache = EndpointCache(store, prefix=self.prefix)
        self._rng = rng if rng is not None else random.Random()
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._background: set[asyncio.Task[Any]] = set()
        self._lease: Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._closed = False
        # (service, instance id) -> reporter -> its live ejection report
        self._ejections: dict[tuple[str, str], dict[str, EjectionReport]] = {}

    async def start(self) -> HealthMonitor:
        """Take a lease for verdicts, load the registry and start checking."""
        self._lease = await self.store.lease(self.verdict_ttl)
        self._spawn(self._publish_loop(), "publish")
        self._spawn(self._keep_lease(), "lease")
        self.cache.on_instance(self._on_change)
        await self.cache.start()
        revision = await self.store.revision()
        for entry in await self.store.list(EJECTIONS_PREFIX):
            self._on_report(entry.key, entry.value)
        self._spawn(self._watch_ejections(revision), "ejections")
        return self

    async def close(self) -> None:
        """Stop checking, publish what is queued, and revoke the verdicts' lease."""
        if self._closed:
            return
        self._closed = True
        await self.cache.close()
        pools = [t.pool for t in self._tracked.values() if t.pool is not None]
        for tracked in self._tracked.values():
            tracked.pool = None
            self._stop_checks(tracked)
        await asyncio.gather(*(pool.aclose() for pool in pools), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._events.join()
        for task in builtins.list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._lease is not None:
            with contextlib.suppress(StoreError):
                await self._lease.revoke()  # every verdict goes with it

    async def __aenter__(self) -> HealthMonitor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def health(self, service: str, instance_id: str) -> InstanceHealth | None:
        """The health state machine the monitor runs for an instance (None: not tracked)."""
        tracked = self._tracked.get((service, instance_id))
        return None if tracked is None else tracked.health

    # -- registry changes ------------------------------------------------------------------
    def _on_change(self, change: InstanceChange) -> None:
        key = (change.service, change.instance_id)
        tracked, record = self._tracked.get(key), change.record
        if record is None:
            if tracked is not None:
                self._untrack(key, drained=tracked.record.state is HealthState.DRAINING)
        elif tracked is None or tracked.record.registered_at != record.registered_at:
            if tracked is not None:  # the id was registered again: a new instance
                self._untrack(key, drained=False)
                if change.before is not None:
                    self._publish(change.before, None, "replaced by a new registration of "
                                  "the same id", record.registered_at)
                    change = InstanceChange(change.service, change.instance_id, None,
                                            change.after, record, "registered",
                                            record.registered_at)
            self._track(record)
        else:
            self._update(tracked, record)
        if change.initial:
            return
        before, after = change.before, change.after
        if before is None or after is None or before.state is not after.state:
            self._publish(before, after, change.reason, change.at,
                          service=change.service, instance_id=change.instance_id)

    def _track(self, record: Instance) -> None:
        config = self.services.get(record.service, self.config)
        health = InstanceHealth(record.id, config, now=record.registered_at)
        tracked = self._tracked[(record.service, record.id)] = _Tracked(record, health, config)
        if record.state is HealthState.DRAINING:
            health.on_drain(time.time(), record.reason or "drain requested")
        elif config.active_checks:
            tracked.task = self._spawn(self._check_loop(tracked), f"check {record.id}")
        reports = self._ejections.get((record.service, record.id))
        if reports:  # reported before we saw it registered
            self._apply_ejection(tracked, next(iter(reports.values())).reason)

    def _update(self, tracked: _Tracked, record: Instance) -> None:
        previous, tracked.record = tracked.record, record
        if record.last_heartbeat != previous.last_heartbeat:
            tracked.health.on_heartbeat(record.last_heartbeat)
        if record.state is HealthState.DRAINING and previous.state is not HealthState.DRAINING:
            tracked.health.on_drain(record.last_heartbeat, record.reason or "drain requested")
            self._stop_checks(tracked)

    def _untrack(self, key: tuple[str, str], *, drained: bool) -> None:
        tracked = self._tracked.pop(key)
        now = time.time()
        if drained:
            tracked.health.on_deregistered(now)
        else:
            tracked.health.on_heartbeat_expired(now)
        self._stop_checks(tracked)
        if tracked.checked:  # a verdict may be stored (or its write still in flight)
            self._spawn(self._delete_verdict(tracked), f"forget {key[1]}")

    def _stop_checks(self, tracked: _Tracked) -> None:
        if tracked.task is not None:
            tracked.task.cancel()
            tracked.task = None
        if tracked.pool is not None:
            pool, tracked.pool = tracked.pool, None
            self._spawn(pool.aclose(), "close pool")

    # -- passive outlier ejections ----------------------------------------------------------
    async def _watch_ejections(self, revision: int) -> None:
        async for change in self.store.watch(EJECTIONS_PREFIX, after_revision=revision):
            if change.kind == "put":
                self._on_report(change.key, change.value)
            else:
                self._on_report_gone(change.key)

    def _on_report(self, key: str, value: bytes | None) -> None:
        parsed = parse_ejection_key(key)
        report = decode_report(key, value) if parsed is not None else None
        if parsed is None or report is None:
            return
        service, instance_id, reporter = parsed
        reports = self._ejections.setdefault((service, instance_id), {})
        first = not reports
        reports[reporter] = report
        tracked = self._tracked.get((service, instance_id))
        if first and tracked is not None:
            self._apply_ejection(tracked, report.reason)

    def _on_report_gone(self, key: str) -> None:
        parsed = parse_ejection_key(key)
        if parsed is None:
            return
        service, instance_id, reporter = parsed
        reports = self._ejections.get((service, instance_id))
        if reports is None or reports.pop(reporter, None) is None or reports:
            return
        del self._ejections[(service, instance_id)]
        tracked = self._tracked.get((service, instance_id))
        if tracked is not None:
            self._apply_ejection(tracked, None)

    def _apply_ejection(self, tracked: _Tracked, reason: str | None) -> None:
        """Feed an ejection (``reason``) or its end (None) to the state machine and store it."""
        now = time.time()
        if reason is not None:
            transitions = tracked.health.on_ejected(now, reason)
        else:
            transitions = tracked.health.on_unejected(now)
        if not transitions:
            return
        tracked.reason, tracked.reason_at = transitions[-1].reason, transitions[-1].at
        tracked.checked = True  # a verdict may now be stored
        self._spawn(self._write_verdict_logged(tracked), f"verdict {tracked.record.id}")

    async def _write_verdict_logged(self, tracked: _Tracked) -> None:
        try:
            await self._write_verdict(tracked)
        except StoreError as e:
            log.warning("health monitor: writing the verdict on %s/%s failed: %s",
                        tracked.record.service, tracked.record.id, e)

    # -- active checks -----------------------------------------------------------------------
    async def _check_loop(self, tracked: _Tracked) -> None:
        schedule = ActiveCheckSchedule.from_config(tracked.config, self._rng)
        clock = asyncio.get_running_loop().time
        due = schedule.first_check_at(clock())
        while True:
            await asyncio.sleep(max(0.0, due - clock()))
            ok, detail = await self._probe(tracked)
            now = time.time()
            transitions = tracked.health.on_check(ok, now, detail)
            if transitions:
                tracked.reason, tracked.reason_at = transitions[-1].reason, transitions[-1].at
            elif not tracked.checked:
                tracked.reason = f"first health check {'passed' if ok else 'failed'}: {detail}"
                tracked.reason_at = now
            tracked.checked = True
            try:
                await self._write_verdict(tracked)
            except StoreError as e:
                log.warning("health monitor: writing the verdict on %s/%s failed: %s",
                            tracked.record.service, tracked.record.id, e)
            due = schedule.next_check_at(clock(), healthy=tracked.health.state.healthy)

    async def _probe(self, tracked: _Tracked) -> tuple[bool, str]:
        config = tracked.config
        timeout: float = config.timeout  # type: ignore[assignment]
        if tracked.pool is None:
            tracked.pool = ConnectionPool(
                tracked.record.address, max_connections=1, max_idle=1, connect_timeout=timeout,
                ssl=None if self.tls is None else self.tls.client_context(
                    tracked.record.service))
        return await http_check(tracked.pool, config.path, timeout)

    async def _write_verdict(self, tracked: _Tracked) -> None:
        record, state = tracked.record, tracked.health.state
        if state in (HealthState.DRAINING, HealthState.GONE):
            return  # the owner's state (or the deletion) already says it
        written = tracked.written
        if written is not None and (written.state, written.registered_at) == (
                state, record.registered_at):
            return
        verdict = HealthVerdict(state=state, reason=tracked.reason, at=tracked.reason_at,
                                registered_at=record.registered_at)
        key = health_key(record.service, record.id, self.prefix)
        for attempt in range(2):
            lease = self._lease
            assert lease is not None
            try:
                await self.store.put(key, _encoder.encode(verdict), lease=lease)
                break
            except LeaseExpired:
                if attempt:
                    raise
                await self._renew_lease(lease)
        tracked.written = verdict

    async def _delete_verdict(self, tracked: _Tracked) -> None:
        record = tracked.record
        key = health_key(record.service, record.id, self.prefix)
        try:
            entry = await self.store.get(key)
            if entry is not None:  # only ours: a new registration may have one already
                value = _decode(key, entry.value, record.service, record.id, True)
                if isinstance(value, HealthVerdict) and value.registered_at == record.registered_at:
                    await self.store.delete(key, expected_revision=entry.revision)
        except StoreError as e:
            log.warning("health monitor: deleting %r failed (it expires with the monitor's "
                        "lease): %s", key, e)

    async def _renew_lease(self, expired: Lease) -> None:
        """The verdicts' lease ran out (monitor paused): take a new one, rewrite verdicts."""
        async with self._lease_lock:
            if self._lease is not expired:
                return
            self._lease = await self.store.lease(self.verdict_ttl)
            log.warning("health monitor: the verdicts' lease expired; took a new one")
            for tracked in self._tracked.values():
                tracked.written = None  # rewritten after their next check

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.verdict_ttl / 3)
            lease = self._lease
            assert lease is not None
            try:
                await lease.keepalive()
            except LeaseExpired:
                await self._renew_lease(lease)
            except StoreError as e:
                log.warning("health monitor: renewing the verdicts' lease failed: %s", e)

    # -- events --------------------------------------------------------------------------------
    def _publish(self, before: Instance | None, after: Instance | None, reason: str, at: float,
                 *, service: str | None = None, instance_id: str | None = None) -> None:
        some = after if after is not None else before
        assert some is not None
        self._events.put_nowait({
            "instance": instance_id or some.id,
            "service": service or some.service,
            "from": None if before is None else before.state.value,
            "to": HealthState.GONE.value if after is None else after.state.value,
            "reason": reason,
            "at": at,
        })

    async def _publish_loop(self) -> None:
        """Publish queued transitions in order, in batches, retrying until the bus takes them."""
        while True:
            batch = [await self._events.get()]
            while not self._events.empty():
                batch.append(self._events.get_nowait())
            messages = [Message(data, key=data["instance"], type=STATE_CHANGED) for data in batch]
            delay = 0.05
            while True:
                try:
                    await self.bus.publish_many(self.topic, messages)
                    break
                except Exception as e:
                    log.warning("health monitor: publishing %d transition(s) failed, "
                                "retrying: %s", len(messages), e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self.published += len(batch)
            for _ in batch:
                self._events.task_done()

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"shoal-health-monitor {what}")
        self._background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("health monitor: background task %s failed", task.get_name(),
                      exc_info=task.exception())
