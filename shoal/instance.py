"""Run one instance of a service in the foreground: what the control plane spawns.

::

    python -m shoal.instance --app shop.orders:svc --listen 127.0.0.1:0 \\
        --broker sqlite:///.shoal/events.db --store sqlite:///.shoal/store.db \\
        [--instance-id orders-1] [--label zone=a ...] [--manifest shoal.yaml] \\
        [--policies '{"payments": {"retries": {"attempts": 2}}}'] \\
        [--mtls strict|permissive|off] [--trust-domain shoal.local]

With ``--manifest``, the instance takes from it the traffic policies of the services it
calls, its own service's authorization policy (``policies:``) and topic policy
(``topics:``), and ``security:`` (``--mtls`` and ``--trust-domain`` override it; without
a manifest mTLS is off). Under ``strict`` and ``permissive`` it gets its certificate from
the control plane's CA before it serves (see ``shoal.service``).

When the instance is ready (HTTP served, registered, every subscription in its group)
it prints exactly one JSON line on stdout::

    {"event": "ready", "instance": "orders-1", "service": "orders",
     "listen": "127.0.0.1:41233", "pid": 123}          (on one line)

SIGTERM or SIGINT drains it (``Service.stop``) and exits 0; a second SIGINT (Ctrl-C
twice) exits at once with status 1, a repeated SIGTERM is ignored. Logs go to stderr.
``--policies`` gives the services' traffic policies as JSON (what ``shoal up`` passes: the
manifest's schema and YAML parser cost every instance ~0.1 s of CPU at start, paid nine
times at once); ``--manifest`` reads them from a manifest instead, and ``--policies``
wins for the services it names. A bad argument or an app that cannot be loaded exits 2
with one line naming what and where; a failure while starting exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from typing import Any

from shoal.control.load import LoadReporter
from shoal.control.timeline import mark
from shoal.errors import ConfigError, ShoalError
from shoal.mesh.resilience import TrafficPolicy, load_traffic_policy
from shoal.service import Service

EXIT_USAGE = 2
EXIT_FAILED = 1
MAX_POLICIES_BYTES = 64 * 1024


def load_app(spec: str) -> Service:
    """The ``Service`` named by ``module:attribute`` (the current directory is importable)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"--app: expected module:attribute like shop.orders:svc, got {spec!r}")
    module_name, attribute = spec.split(":")
    if not module_name or not attribute:
        raise ConfigError(f"--app: expected module:attribute like shop.orders:svc, got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"--app {spec}: no module named {e.name!r} "
                              f"(looked in {os.getcwd()} and sys.path)") from None
        raise
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"--app {spec}: module {module_name!r} has no attribute "
                              f"{attribute!r}") from None
    if not isinstance(target, Service):
        raise ConfigError(f"--app {spec}: expected a shoal.Service, got "
                          f"{type(target).__name__}")
    return target


def parse_policies(text: str) -> dict[str, TrafficPolicy]:
    """``{service: TrafficPolicy}`` from ``--policies`` JSON: an object of policy objects,
    each as a manifest's ``services.NAME.policy`` (``load_traffic_policy``)."""
    if len(text) > MAX_POLICIES_BYTES:
        raise ConfigError(f"--policies: {len(text)} bytes, over the limit of "
                          f"{MAX_POLICIES_BYTES}")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--policies: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--policies: expected a JSON object of service: policy, got "
                          f"{type(data).__name__}")
    policies = {}
    for name, policy in data.items():
        if not isinstance(policy, dict):
            raise ConfigError(f"--policies {name!r}: expected an object, got "
                              f"{type(policy).__name__}")
        policies[name] = load_traffic_policy(policy, where=f"--policies {name}")
    return policies


def parse_label(text: str) -> tuple[str, str]:
    """``("zone", "a")`` from ``"zone=a"``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The runner's command line."""
    parser = argparse.ArgumentParser(prog="python -m shoal.instance",
                                     description="Run one instance of a shoal.Service.")
    parser.add_argument("--app", required=True, help="module:attribute of the Service")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--broker", default=None, help="broker URL (default: $SHOAL_BROKER)")
    parser.add_argument("--store", default=None, help="store URL (default: $SHOAL_STORE)")
    parser.add_argument("--instance-id", default=None, help="instance id (default: random)")
    parser.add_argument("--label", action="append", type=parse_label, default=[],
                        metavar="KEY=VALUE", help="instance label (repeatable)")
    parser.add_argument("--manifest", default=None, metavar="PATH",
                        help="shoal.yaml whose services' policies apply to our calls")
    parser.add_argument("--mtls", default=None, choices=("strict", "permissive", "off"),
                        help="mutual TLS (default: the manifest's security.mtls, else off)")
    parser.add_argument("--trust-domain", default=None,
                        help="trust domain of SPIFFE identities (default: the manifest's)")
    parser.add_argument("--policies", dest="policies_json", default=None, metavar="JSON",
                        help='services\' traffic policies, {"SERVICE": {...policy}, ...}')
    parser.add_argument("--drain-grace", default="250ms",
                        help="time between DRAINING and closing the listener")
    return parser


async def run(svc: Service, args: argparse.Namespace) -> int:
    """Start ``svc``, print the ready line, wait for a signal, drain."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if sig is signal.SIGINT and stopping.is_set():
            os._exit(EXIT_FAILED)  # Ctrl-C twice: the operator wants it gone now
        stopping.set()  # a repeated SIGTERM changes nothing: the drain goes on

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        starting = asyncio.ensure_future(svc.start(
            broker=args.broker, store=args.store, listen=args.listen,
            instance_id=args.instance_id, labels=dict(args.label), policies=args.policies,
            **args.security))
        waiting = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # signalled while starting: abandon the start
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await svc.stop(grace=0)
            return 0
        waiting.cancel()
        starting.result()
        line = {"event": "ready", "instance": svc.instance_id, "service": svc.name,
                "listen": svc.address, "pid": os.getpid()}
        mark(f"instance: {svc.instance_id} ready")
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        reporter = None
        if svc.store is not None and svc.registration is not None:  # for the autoscaler
            reporter = await LoadReporter(svc.store, svc.name, svc.instance_id or "",
                                          lambda: svc.load.take_peaks()[0]).start()
        await stopping.wait()
        if reporter is not None:
            await reporter.close()
        await svc.stop(grace=args.drain_grace)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def security_options(service: str, manifest: Any, mtls: str | None,
                     trust_domain: str | None) -> dict[str, Any]:
    """``Service.start``'s zero-trust arguments for ``service`` from the manifest (if any)
    and the command line."""
    from shoal.mesh.security.spiffe import DEFAULT_TRUST_DOMAIN, check_trust_domain

    security = getattr(manifest, "security", None)
    domain = trust_domain or (security.trust_domain if security else DEFAULT_TRUST_DOMAIN)
    try:
        check_trust_domain(domain, what="--trust-domain")
    except ShoalError as e:
        raise ConfigError(str(e)) from None
    spec = manifest.services.get(service) if manifest is not None else None
    return {"mtls": mtls or (security.mtls if security else "off"), "trust_domain": domain,
            "authorization": None if spec is None else spec.authorization(service, domain),
            "topic_policy": None if spec is None else spec.topic_policy(service, domain)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m shoal.instance``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("SHOAL_LOG_LEVEL", "WARNING").upper(),
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.policies = manifest = None
        if args.manifest is not None:
            from shoal.config import load_manifest

            manifest = load_manifest(args.manifest)
            args.policies = {name: spec.traffic_policy
                             for name, spec in manifest.services.items()}
        if args.policies_json is not None:
            args.policies = {**(args.policies or {}), **parse_policies(args.policies_json)}
        svc = load_app(args.app)
        mark(f"instance: {args.instance_id or svc.name} app loaded")
        args.security = security_options(svc.name, manifest, args.mtls, args.trust_domain)
        from shoal.observability import enable_metrics
        from shoal.observability.tracing import enable_tracing_from_env

        enable_metrics()  # served on the instance's /metrics
        enable_tracing_from_env(svc.name)  # OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set
    except ConfigError as e:
        print(f"shoal.instance: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        runner = asyncio.Runner()
    try:
        with runner:
            return runner.run(run(svc, args))
    except ConfigError as e:
        print(f"shoal.instance: {svc.name}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ShoalError as e:
        print(f"shoal.instance: {svc.name}: failed to start: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
