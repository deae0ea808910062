"""``shoal up``, ``shoal ps`` and ``shoal scale``: run an application, look at it, scale it.

``shoal up [MANIFEST]`` runs the control plane in the foreground and prints, once every
instance is ready (the time since the command started)::

    shoal up: ready in 1.21s: gateway http://127.0.0.1:8080, admin http://127.0.0.1:8081

Ctrl-C or SIGTERM stops it gracefully. ``ps`` and ``scale`` talk to the admin API at
``--admin URL``, else at the manifest's ``admin.listen``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.control.forkserver import ForkServer

EXIT_ERROR = 2
MANIFEST_NAME = "shoal.yaml"
ManifestArg = Annotated[Path, typer.Argument(help="The manifest (default: ./shoal.yaml).",
                                             show_default=False)]
AdminOption = Annotated[str | None, typer.Option(
    "--admin", metavar="URL", show_default=False,
    help="Admin API URL [else admin.listen of the manifest]")]


def _fail(message: str) -> NoReturn:
    sys.stderr.write("shoal: error: " + str(message) + "\n")
    raise typer.Exit(EXIT_ERROR)


def up(manifest: ManifestArg = Path(MANIFEST_NAME),
       gateway_listen: Annotated[str | None, typer.Option(
           "--gateway-listen", metavar="HOST:PORT", show_default=False,
           help="Override gateway.listen (port 0: any free port).")] = None,
       admin_listen: Annotated[str | None, typer.Option(
           "--admin-listen", metavar="HOST:PORT", show_default=False,
           help="Override admin.listen (port 0: any free port).")] = None,
       ready_timeout: Annotated[float, typer.Option(
           "--ready-timeout", help="Seconds to wait for every instance to be ready.")] = 60.0,
       ) -> None:
    """Run the control plane, the gateway and every service instance in the foreground."""
    from shoal.control.timeline import mark

    mark("cli: command parsed")
    overrides = {k: v for k, v in (("gateway_listen", gateway_listen),
                                   ("admin_listen", admin_listen)) if v is not None}
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        code = runner.run(_up(manifest, overrides, ready_timeout))
    raise typer.Exit(code)


_early_forkserver: ForkServer | None = None  # launched before the CLI parsed its arguments


def launch_forkserver(args: list[str] | None = None) -> None:
    """Launch the fork server of ``shoal up`` at once, before the CLI parses its arguments
    (typer's parameters load pydantic) and imports the plane, so that its own imports run
    in parallel with those: a fork of this process, which has no thread or event loop yet.
    ``args``: what follows ``up`` on the command line, scanned for the manifest (the
    server must run in its directory; a wrong guess costs only the head start: the plane
    then starts another). Nothing if ``SHOAL_FORKSERVER=0``."""
    global _early_forkserver
    if os.environ.get("SHOAL_FORKSERVER", "1") == "0" or _early_forkserver is not None:
        return
    from shoal.control.forkserver import ForkServer, instance_environment

    base_dir = _manifest_of(args or []).parent.resolve()  # the plan's base_dir
    try:
        _early_forkserver = ForkServer(instance_environment(base_dir), str(base_dir),
                                       preload_later=True)
        _early_forkserver.launch(fork=True)  # what the CLI imported is not imported again
    except OSError:  # the plane starts one later (or instances start the usual way)
        _early_forkserver = None


def _manifest_of(args: list[str]) -> Path:
    """The MANIFEST argument of ``up`` in ``args`` (every option of ``up`` takes a value)."""
    taking_value = False
    for arg in args:
        if taking_value:
            taking_value = False
        elif arg.startswith("-"):
            taking_value = "=" not in arg
        else:
            return Path(arg)
    return Path(MANIFEST_NAME)


async def _up(manifest: Path, overrides: dict[str, str], ready_timeout: float) -> int:
    from shoal.control.timeline import mark

    global _early_forkserver
    forkserver, _early_forkserver = _early_forkserver, None  # else the plane starts one
    try:
        from shoal.config import load_manifest
        from shoal.control.plan import plan_from_manifest
        from shoal.control.plane import ControlPlane

        mark("cli: plane imported")
        plan = plan_from_manifest(load_manifest(manifest), **overrides)
        mark("cli: manifest parsed")
        plane = ControlPlane(plan, forkserver=forkserver)
    except BaseException as e:
        if forkserver is not None:
            await forkserver.close()
        if isinstance(e, ShoalError):
            sys.stderr.write(f"shoal: error: {e}\n")
            return EXIT_ERROR
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(plane.start(ready_timeout))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await plane.close()
        print("shoal up: stopped before it was ready", flush=True)
        return 0
    stopping.cancel()
    try:
        starting.result()
    except (ShoalError, TimeoutError) as e:
        sys.stderr.write(f"shoal: error: {e}\n")
        return EXIT_ERROR
    age = _process_age()  # what the user waited, not only the plane's part
    ready_in = age if age is not None else plane.ready_after
    print(f"shoal up: ready in {ready_in:.2f}s: gateway {plane.gateway_url}, "
          f"admin {plane.admin_url}", flush=True)
    mark("cli: ready line printed")
    await stop.wait()
    print("shoal up: stopping (draining every instance)", flush=True)
    await plane.close()
    print("shoal up: stopped", flush=True)
    return 0


def _process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere), to 1/CLK_TCK."""
    try:
        with open("/proc/self/stat", "rb") as f:
            started = int(f.read().rsplit(b")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _admin_url(admin: str | None, manifest: Path) -> str:
    if admin:
        return admin.rstrip("/")
    from shoal.config import load_manifest

    try:
        listen = load_manifest(manifest).admin.listen
    except ShoalError as e:
        _fail(str(e))
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def _call(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        _fail(f"{url}: {message}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        _fail(f"{url}: cannot reach the admin API ({reason}); is `shoal up` running?")


def ps(manifest: ManifestArg = Path(MANIFEST_NAME), admin: AdminOption = None,
       as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
       ) -> None:
    """List the instances of a running application and their states."""
    base = _admin_url(admin, manifest)
    instances = _call(f"{base}/api/instances")
    services = _call(f"{base}/api/services")
    if as_json:
        print(json.dumps({"services": services, "instances": instances}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("SERVICE", "INSTANCE", "STATE", "PROCESS", "PID", "ADDRESS", "RESTARTS"):
        table.add_column(column)
    for inst in instances:
        table.add_row(inst["service"], inst["id"], inst["state"], inst["process"],
                      str(inst["pid"] or "-"), inst["address"], str(inst["restarts"]))
    console = Console(soft_wrap=True)
    console.print(table)
    for inst in instances:
        if inst["process"] == "failed":  # crash looping: say why, with its last words
            console.print(f"{inst['id']} failed: {inst['reason']}", style="red",
                          highlight=False, markup=False)
            for line in inst.get("last_output", []):
                console.print(f"  | {line}", highlight=False, markup=False)
    for service in services:
        scale = service.get("autoscale")
        auto = f"  autoscale {scale['min']}..{scale['max']}" if scale else ""
        console.print(f"{service['name']}: {service['replicas']} replicas{auto}",
                      highlight=False)


def scale(service: Annotated[str, typer.Argument(help="The service to scale.")],
          replicas: Annotated[int, typer.Argument(help="How many instances to run.")],
          manifest: ManifestArg = Path(MANIFEST_NAME), admin: AdminOption = None) -> None:
    """Run REPLICAS instances of SERVICE in a running application."""
    base = _admin_url(admin, manifest)
    result = _call(f"{base}/api/services/{service}/scale", {"replicas": replicas})
    print(f"{result['service']}: {result['from']} -> {result['replicas']} replicas")


def register(app: typer.Typer) -> None:
    """Add ``up``, ``ps`` and ``scale`` to the ``shoal`` command."""
    app.command()(up)
    app.command()(ps)
    app.command()(scale)
