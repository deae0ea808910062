"""``shoal top``: the dashboard's figures in the terminal, refreshed every second.

Reads ``/api/snapshot`` of the admin API (``--admin URL``, else ``$SHOAL_ADMIN``, else
``http://127.0.0.1:8081``, the control plane's default): services with their instances,
requests per second, success rate and p50/p95/p99; topics with publish rate, lag per group
and dead letters; the newest events and autoscaler decisions. ``--once`` prints one frame
(taken over one interval, so rates mean something) and exits; ``--json`` prints that
snapshot as JSON. An unreachable or misbehaving admin API is one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

DEFAULT_ADMIN = "http://127.0.0.1:8081"
MAX_SNAPSHOT = 16 * 1024 * 1024  # bytes read from the admin API at most
EXIT_ERROR = 2


class AdminError(Exception):
    """The admin API could not be read; the message says which URL and why."""


def fetch_snapshot(base: str, timeout: float = 5.0) -> dict[str, Any]:
    """One snapshot from ``base``/api/snapshot."""
    url = base.rstrip("/") + "/api/snapshot"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            raw = response.read(MAX_SNAPSHOT + 1)
    except urllib.error.HTTPError as exc:
        raise AdminError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"{url}: cannot reach the admin API ({reason}); is `shoal up` "
                         "running?") from None
    if len(raw) > MAX_SNAPSHOT:
        raise AdminError(f"{url}: answer larger than {MAX_SNAPSHOT} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdminError(f"{url}: not a JSON snapshot ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("services"), list) or \
            not isinstance(data.get("topics"), list):
        raise AdminError(f"{url}: not a dashboard snapshot (no services and topics lists)")
    return data


def _ms(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return f"{seconds * 1e6:.0f}µs" if seconds < 0.001 else f"{seconds * 1e3:.1f}ms" \
        if seconds < 1 else f"{seconds:.2f}s"


def _rate(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _text(value: Any) -> str:
    """A value as printable text (no terminal escapes from data)."""
    text = str(value)
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(snapshot: dict[str, Any]) -> Any:
    """The frame for ``snapshot``: rich renderables grouped."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    when = snapshot.get("time")
    stamp = datetime.fromtimestamp(when, UTC).strftime("%H:%M:%S") if isinstance(
        when, int | float) else "?"
    services = Table(title=f"services  {stamp}", title_justify="left", expand=False)
    for column in ("service", "instances", "req/s", "success", "p50", "p95", "p99"):
        services.add_column(column, justify="left" if column in ("service", "instances")
                            else "right")
    for s in snapshot.get("services", []):
        instances = " ".join(f"{_text(i.get('id'))}:{_text(i.get('state'))}"
                             for i in s.get("instances", [])) or " ".join(
            f"{_text(k)} {v}" for k, v in (s.get("states") or {}).items()) or "-"
        success = s.get("success_rate")
        style = "green" if isinstance(success, int | float) and success >= 0.99 else "red" \
            if isinstance(success, int | float) and success < 0.95 else "yellow"
        services.add_row(_text(s.get("name")), instances, _rate(s.get("rps")),
                         Text(f"{success * 100:.1f}%", style=style)
                         if isinstance(success, int | float) else "-",
                         _ms(s.get("p50")), _ms(s.get("p95")), _ms(s.get("p99")))
    topics = Table(title="topics", title_justify="left")
    for column in ("topic", "events", "publish/s", "groups (lag)", "dead letters"):
        topics.add_column(column, justify="right" if column in ("events", "publish/s",
                                                                 "dead letters") else "left")
    for t in snapshot.get("topics", []):
        groups = ", ".join(f"{_text(g.get('name'))}: {g.get('lag')}"
                           for g in t.get("groups", [])) or "-"
        dead = t.get("dead_letters") or 0
        topics.add_row(_text(t.get("name")), str(t.get("events", "-")),
                       _rate(t.get("publish_rate")), groups,
                       Text(str(dead), style="red" if dead else ""))
    parts: list[Any] = [services, topics]
    events = snapshot.get("events") or []
    if events:
        parts.append(Text("recent events", style="bold"))
        for e in events[:5]:
            parts.append(Text(f"  {_text(e.get('topic'))}  {_text(e.get('type'))}  "
                              f"{_text(e.get('id'))}", style="dim"))
    decisions = snapshot.get("autoscaler") or []
    if decisions:
        parts.append(Text("autoscaler", style="bold"))
        for d in decisions[:5]:
            parts.append(Text("  " + " ".join(f"{_text(k)}={_text(v)}" for k, v in d.items()
                                              if k != "time"), style="dim"))
    for problem in snapshot.get("errors") or []:
        parts.append(Text(f"problem: {_text(problem)}", style="red"))
    return Group(*parts)


def top(
    admin: Annotated[str | None, typer.Option(
        "--admin", metavar="URL", show_default=False,
        help=f"Admin API URL [else $SHOAL_ADMIN, {DEFAULT_ADMIN}]")] = None,
    interval: Annotated[float, typer.Option("--interval", "-i", min=0.1, max=60,
                                            help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --once: the snapshot as "
                                           "JSON.")] = False,
) -> None:
    """Live figures of a running mesh: services, topics, events, autoscaler."""
    from rich.console import Console
    from rich.live import Live

    base = admin or os.environ.get("SHOAL_ADMIN") or DEFAULT_ADMIN
    if not base.startswith(("http://", "https://")):
        _fail(f"--admin {base!r}: expected an http:// or https:// URL")
    console = Console(highlight=False)
    try:
        if once or json_out:
            fetch_snapshot(base)  # the first reading starts the interval the rates cover
            time.sleep(interval)
            snapshot = fetch_snapshot(base)
            if json_out:
                sys.stdout.write(json.dumps(snapshot) + "\n")
            else:
                console.print(render(snapshot))
            return
        with Live(render(fetch_snapshot(base)), console=console, auto_refresh=False,
                  screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(fetch_snapshot(base)), refresh=True)
    except AdminError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return


def _fail(message: str) -> None:
    sys.stderr.write("shoal: error: " + " ".join(message.split()) + "\n")
    raise typer.Exit(EXIT_ERROR)
