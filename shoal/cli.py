"""The ``shoal`` command: publish, tail, inspect topics and replay dead letters.

Every command finds the broker and the Store as ``shoal.settings`` says (``--broker``,
``SHOAL_BROKER``, ``./shoal.yaml``, default). Errors a user can fix (bad URL, manifest,
JSON, topic name; any ``ShoalError``) print one line to stderr and exit 2; Ctrl-C or
SIGTERM end ``tail`` cleanly with exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import stat
import sys
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, NoReturn, TypeVar

import msgspec
import typer

from shoal.commands.certs import certs as certs_command
from shoal.commands.gateway import gateway as gateway_command
from shoal.commands.routes import routes_app
from shoal.commands.sidecar import sidecar as sidecar_command
from shoal.commands.top import top
from shoal.commands.up import launch_forkserver
from shoal.commands.up import register as register_runtime_commands
from shoal.commands.validate import validate as validate_command
from shoal.errors import ConfigError, InvalidEvent, ShoalError, TopicError
from shoal.events.bus import EventBus, Message
from shoal.events.dlq import REPLAY_GROUP, replay_dead_letters
from shoal.events.dlq import as_replay as _as_replay
from shoal.events.dlq import dead_letters as _dead_letters
from shoal.events.event import Event
from shoal.events.group import group_prefix
from shoal.events.partitioning import check_group_name, check_topic_name
from shoal.settings import Settings, load_settings

T = TypeVar("T")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
LINES_BATCH = 4096

app = typer.Typer(
    name="shoal",
    help="Shoal: durable events between Python services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(certs_command, name="certs")

BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker", metavar="URL", show_default=False,
        help="Broker URL [else $SHOAL_BROKER, broker: in ./shoal.yaml, "
        "sqlite:///.shoal/events.db]",
    ),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store", metavar="URL", show_default=False,
        help="Store URL [else $SHOAL_STORE, store: in ./shoal.yaml, beside the broker]",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class StartFrom(StrEnum):
    """Where a new consumer group starts reading."""

    earliest = "earliest"
    latest = "latest"


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived."""


# -- plumbing ----------------------------------------------------------------------------


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one line to stderr and exit."""
    sys.stderr.write("shoal: error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main``; SIGINT/SIGTERM cancel it (raising ``_Interrupted``); user errors exit 2."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopped = False

        def stop() -> None:
            nonlocal stopped
            stopped = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            return await main
        except asyncio.CancelledError:
            if stopped:
                raise _Interrupted from None
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(guarded())
    except ShoalError as exc:
        _fail(str(exc))


def _settings(broker: str | None, store: str | None) -> Settings:
    try:
        return load_settings(broker, store)
    except ConfigError as exc:
        _fail(str(exc))


@contextlib.asynccontextmanager
async def _connect(settings: Settings) -> AsyncIterator[EventBus]:
    """The bus, with URL and open errors naming the URL and where it came from."""
    try:
        bus = await EventBus.connect(settings.broker, store=settings.store)
    except ConfigError as exc:
        origin = settings.store_origin if str(exc).startswith("store") else (
            settings.broker_origin
        )
        raise ConfigError(f"{exc} ({origin})") from None
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(
            f"cannot open broker {settings.broker!r} ({settings.broker_origin}) with store "
            f"{settings.store!r} ({settings.store_origin}): {exc}"
        ) from None
    async with bus:
        yield bus


async def _existing_topic(bus: EventBus, topic: str) -> None:
    if await bus.broker.get_topic(topic) is None:
        raise TopicError(f"topic {topic!r} does not exist (see `shoal topics`)")


def _decode_json(text: str | bytes, what: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from None


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def _human_seconds(s: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{int(s // n)}{unit}"
    return f"{s:g}s"


def _printable(value: object) -> str:
    """``value`` as text with control characters escaped (no terminal escapes from data)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Out:
    """Standard output that turns a closed pipe into ``BrokenPipeError`` once, quietly."""

    @staticmethod
    def write_line(data: bytes) -> None:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.buffer.flush()

    @staticmethod
    def silence() -> None:
        """After a broken pipe: point stdout at /dev/null so exiting does not complain."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _console(stderr: bool = False) -> Any:
    """A rich console that does not wrap lines and lets a broken pipe raise (rich would
    exit 1 from inside the event loop)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    return _Console(stderr=stderr, highlight=False, soft_wrap=True)


# -- publish -----------------------------------------------------------------------------


@app.command()
def publish(
    topic: Annotated[str, typer.Argument(help="Topic to publish to.")],
    key: Annotated[str | None, typer.Option("--key", "-k", help="Partition key.")] = None,
    type_: Annotated[
        str | None, typer.Option("--type", "-t", help="CloudEvents type [default: the topic].")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", metavar="JSON", help="Event data, as JSON.")
    ] = None,
    id_: Annotated[
        str | None,
        typer.Option("--id", help="Event id; a repeated id is not added twice (dedup window)."),
    ] = None,
    lines: Annotated[
        bool,
        typer.Option("--lines", help="Publish each line of standard input (a JSON document "
                     "per line) as one event's data, in batches."),
    ] = False,
    key_field: Annotated[
        str | None,
        typer.Option("--key-field", metavar="FIELD", help="With --lines: take each event's "
                     "key from this top-level field of its document."),
    ] = None,
    json_out: JsonOption = False,
    broker: BrokerOption = None,
    store: StoreOption = None,
) -> None:
    """Publish one event (prints partition, offset, duplicate) or --lines from stdin."""
    try:
        check_topic_name(topic)
        if lines:
            if data is not None or id_ is not None:
                raise ConfigError("--lines reads the data from standard input: "
                                  "do not combine it with --data or --id")
        elif key_field is not None:
            raise ConfigError("--key-field applies only with --lines")
        value = None if data is None or lines else _decode_json(data, "--data")
    except ShoalError as exc:
        _fail(str(exc))
    settings = _settings(broker, store)
    if lines:
        _publish_lines(settings, topic, key, type_, key_field, json_out)
        return

    async def main() -> None:
        async with _connect(settings) as bus:
            ack = await bus.publish(topic, value, key=key, type=type_, id=id_)
        if json_out:
            _Out.write_line(msgspec.json.encode(ack))
        else:
            dup = "yes (already published: not added again)" if ack.duplicate else "no"
            _Out.write_line(
                f"{ack.topic}: partition {ack.partition}, offset {ack.offset}, "
                f"duplicate {dup}, id {ack.id}".encode()
            )

    try:
        _run(main())
    except _Interrupted:
        _fail("interrupted: the event may or may not have been published", EXIT_INTERRUPTED)
    except BrokenPipeError:
        _Out.silence()


class _LineError(Exception):
    """A line of --lines input that cannot become an event, or its batch failed."""


def _stdin_size() -> int | None:
    """The size of standard input if it is a regular file (for the progress bar)."""
    try:
        st = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _publish_lines(
    settings: Settings,
    topic: str,
    key: str | None,
    type_: str | None,
    key_field: str | None,
    json_out: bool,
) -> None:
    """Publish stdin line by line, as a prefix: on a bad line, every line before it is
    published and nothing from it on, and the error says so (the user can resume there)."""
    published = 0  # lines 1..published were handled (published, or blank)
    events = 0
    duplicates = 0

    def to_message(number: int, raw: bytes) -> Message:
        try:
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise _LineError(f"line {number}: not valid JSON: {exc}") from None
        k = key
        if key_field is not None:
            if not isinstance(doc, dict) or key_field not in doc:
                raise _LineError(f"line {number}: no field {key_field!r} for --key-field")
            k = doc[key_field]
            if isinstance(k, int) and not isinstance(k, bool):
                k = str(k)
            if not isinstance(k, str):
                raise _LineError(f"line {number}: field {key_field!r} must be a string or "
                                 f"integer to be a key, not {type(k).__name__}")
        return Message(data=doc, key=k, type=type_)

    async def main() -> None:
        nonlocal published, events, duplicates
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=64)

        def read() -> None:
            """A thread: blocking reads of fd 0 (unbuffered: no lock held at exit), handed
            to the loop a chunk of lines at a time."""
            fd, rest = sys.stdin.fileno(), b""

            def put(item: list[bytes] | None) -> None:
                asyncio.run_coroutine_threadsafe(chunks.put(item), loop).result()

            try:
                while chunk := os.read(fd, 1 << 16):
                    *complete, rest = (rest + chunk).split(b"\n")
                    if complete:
                        put(complete)
                put([rest] if rest else [])
                put(None)
            except Exception:  # stdin unreadable, or the loop is gone: we are exiting
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(chunks.put(None), loop)

        progress = bar = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                TimeElapsedColumn(), console=_console(stderr=True), transient=True,
            )
            bar = progress.add_task(f"publishing to {topic}", total=_stdin_size())
            progress.start()
        async with _connect(settings) as bus:
            threading.Thread(target=read, name="shoal-stdin", daemon=True).start()
            pending: deque[bytes] = deque()
            eof = False
            try:
                while True:
                    if not pending and not eof:
                        item = await chunks.get()
                        eof = item is None
                        pending.extend(item or ())
                    while not eof and len(pending) < LINES_BATCH and not chunks.empty():
                        item = chunks.get_nowait()
                        eof = item is None
                        pending.extend(item or ())
                    if not pending:
                        if eof:
                            break
                        continue
                    lines = [pending.popleft() for _ in range(min(LINES_BATCH, len(pending)))]
                    batch: list[Message] = []
                    error = None
                    handled = published
                    for raw in lines:
                        if not raw.strip():
                            handled += 1
                            continue
                        try:
                            batch.append(to_message(handled + 1, raw))
                        except _LineError as exc:
                            error = exc
                            break
                        handled += 1
                    if batch:
                        try:
                            acks = await bus.publish_many(topic, batch)
                        except ShoalError as exc:
                            raise _LineError(str(exc)) from None
                        events += len(acks)
                        duplicates += sum(a.duplicate for a in acks)
                    published = handled
                    if progress is not None and bar is not None:
                        progress.update(
                            bar, description=f"published {events} events to {topic}",
                            advance=sum(len(r) + 1 for r in lines),
                        )
                    if error is not None:
                        raise error
            finally:
                if progress is not None:
                    progress.stop()

    def so_far() -> str:
        if published == 0:
            return "nothing was published"
        return (f"lines 1-{published} were published ({events} events), "
                f"nothing from line {published + 1} on")

    try:
        _run(main())
    except _LineError as exc:
        _fail(f"{exc}; {so_far()}")
    except _Interrupted:
        _fail(f"interrupted; {so_far()}", EXIT_INTERRUPTED)
    summary = {"topic": topic, "lines": published, "events": events, "duplicates": duplicates}
    try:
        if json_out:
            _Out.write_line(msgspec.json.encode(summary))
        else:
            dup = f" ({duplicates} duplicates not added)" if duplicates else ""
            _Out.write_line(f"published {events} events to {topic}{dup}".encode())
    except BrokenPipeError:
        _Out.silence()


# -- tail --------------------------------------------------------------------------------


def _readable(event: Event) -> Any:
    from rich.text import Text

    when = event.time.astimezone(UTC) if event.time else datetime.now(UTC)
    line = Text()
    line.append(when.strftime("%H:%M:%S.%f")[:-3], style="dim")
    line.append("  ")
    line.append(_printable(event.type), style="bold cyan")
    if event.key is not None:
        line.append("  key=", style="dim")
        line.append(_printable(event.key), style="yellow")
    line.append("  id=", style="dim")
    line.append(_printable(event.id), style="dim")
    if event.data is not None:
        line.append("  ")
        try:
            line.append(msgspec.json.encode(event.data).decode())
        except (TypeError, msgspec.EncodeError):
            line.append(_printable(repr(event.data)))
    return line


def _structured(event: Event) -> bytes:
    """The event in CloudEvents JSON, or an error naming it (it stays unacknowledged)."""
    from shoal.events.codec import to_structured

    try:
        return to_structured(event)
    except InvalidEvent as exc:
        raise InvalidEvent(
            exc.attribute, f"event {event.id!r} cannot be written as a CloudEvent: {exc}"
        ) from None


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="Topic to follow.")],
    group: Annotated[
        str | None,
        typer.Option("--group", "-g", help="Consumer group (its offsets are committed); "
                     "default: a private group that is forgotten on exit."),
    ] = None,
    from_: Annotated[
        StartFrom | None,
        typer.Option("--from", help="Where a new group starts [default: latest without "
                     "--group, earliest with it]."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One structured CloudEvent (JSON) per line.")
    ] = False,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Exit after N events.")
    ] = None,
    broker: BrokerOption = None,
    store: StoreOption = None,
) -> None:
    """Follow a topic's events; each is acknowledged once written and flushed."""
    try:
        check_topic_name(topic)
        if group is not None:
            check_group_name(group)
    except ShoalError as exc:
        _fail(str(exc))
    settings = _settings(broker, store)
    ephemeral = group is None
    name = group or f"shoal-tail-{uuid.uuid4().hex[:12]}"
    start = (from_ or (StartFrom.latest if ephemeral else StartFrom.earliest)).value
    console = None if json_out else _console()

    async def main() -> None:
        async with _connect(settings) as bus:
            await _existing_topic(bus, topic)
            try:
                if ephemeral:  # pin the start now, not when the partitions are claimed
                    await bus.seek(topic, name, start)
                seen = 0
                async with bus.consume(topic, name, start=start) as events:
                    async for event in events:
                        if json_out:
                            _Out.write_line(_structured(event))
                        else:
                            assert console is not None
                            console.print(_readable(event))
                            sys.stdout.flush()
                        seen += 1
                        if count is not None and seen >= count:
                            break
            finally:
                if ephemeral:
                    await _forget_group(bus, topic, name)

    try:
        _run(main())
    except _Interrupted:
        pass
    except BrokenPipeError:
        _Out.silence()


async def _forget_group(bus: EventBus, topic: str, group: str) -> None:
    """Delete a private group's state so it does not show up in ``shoal topics``."""
    for entry in await bus.store.list(group_prefix(topic, group)):
        await bus.store.delete(entry.key)


# -- topics ------------------------------------------------------------------------------


@app.command()
def topics(
    json_out: JsonOption = False,
    broker: BrokerOption = None,
    store: StoreOption = None,
) -> None:
    """List topics: partitions, events kept, size, retention and each group's lag."""
    settings = _settings(broker, store)

    async def main() -> list[dict[str, Any]]:
        rows = []
        async with _connect(settings) as bus:
            for info in await bus.topics():
                name = info.spec.name
                groups = {}
                for g in await bus.groups(name):
                    lag = await bus.lag(name, g)
                    groups[g] = {"lag": sum(lag.values()), "partitions": lag}
                rows.append({
                    "topic": name,
                    "partitions": info.spec.partitions,
                    "events": info.events,
                    "size_bytes": info.size_bytes,
                    "retention_seconds": info.spec.retention_seconds,
                    "retention_bytes": info.spec.retention_bytes,
                    "groups": groups,
                })
        return rows

    try:
        rows = _run(main())
        if json_out:
            _Out.write_line(msgspec.json.encode(rows))
            return
        console = _console()
        if not rows:
            console.print(f"no topics on {settings.broker}")
            return
        from rich.table import Table

        table = Table(title=f"topics on {settings.broker}", title_justify="left")
        for column in ("topic", "partitions", "events", "size", "retention", "groups (lag)"):
            justify = "right" if column in ("partitions", "events", "size") else "left"
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for row in rows:
            kept = [
                _human_seconds(row["retention_seconds"]) if row["retention_seconds"] else "",
                _human_size(row["retention_bytes"]) + "/partition"
                if row["retention_bytes"] else "",
            ]
            lags = "\n".join(f"{g}: {v['lag']}" for g, v in row["groups"].items())
            table.add_row(
                row["topic"], str(row["partitions"]), str(row["events"]),
                _human_size(row["size_bytes"]), " ".join(k for k in kept if k) or "forever",
                lags or "-",
            )
        console.print(table)
    except BrokenPipeError:
        _Out.silence()


# -- dlq ---------------------------------------------------------------------------------


@app.command()
def dlq(
    topic: Annotated[str, typer.Argument(help="The topic whose dead letters to show.")],
    replay: Annotated[
        bool,
        typer.Option("--replay", help="Republish the dead letters not yet replayed onto "
                     "TOPIC (every group of TOPIC gets them again)."),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One structured CloudEvent (JSON) per line.")
    ] = False,
    broker: BrokerOption = None,
    store: StoreOption = None,
) -> None:
    """List the dead letters of TOPIC (the events in TOPIC.dlq), or --replay them."""
    try:
        check_topic_name(topic)
    except ShoalError as exc:
        _fail(str(exc))
    settings = _settings(broker, store)
    dlq_topic = f"{topic}.dlq"

    async def main() -> tuple[list[tuple[int, int, Event]], dict[int, int], dict[str, int]]:
        async with _connect(settings) as bus:
            await _existing_topic(bus, topic)
            letters = await _dead_letters(bus, dlq_topic)
            done = await bus.committed(dlq_topic, REPLAY_GROUP)
            counts = {"replayed": 0, "duplicates": 0, "skipped": 0}
            if not replay:
                return letters, done, counts
            return letters, done, await replay_dead_letters(bus, topic, letters)

    try:
        letters, done, counts = _run(main())
        if replay:
            if json_out:
                _Out.write_line(msgspec.json.encode({"topic": topic, **counts}))
            else:
                extra = [f"{counts['skipped']} replayed before"] if counts["skipped"] else []
                if counts["duplicates"]:
                    extra.append(f"{counts['duplicates']} already there")
                more = f" ({', '.join(extra)})" if extra else ""
                _Out.write_line(
                    f"replayed {counts['replayed']} dead letters onto {topic}{more}".encode()
                )
            return
        if json_out:
            for _, _, dead in letters:
                _Out.write_line(_structured(dead))
            return
        _print_dead_letters(topic, letters, done)
    except BrokenPipeError:
        _Out.silence()
    except ShoalError as exc:
        _fail(str(exc))


def _print_dead_letters(
    topic: str, letters: list[tuple[int, int, Event]], done: dict[int, int]
) -> None:
    """Two lines per dead letter (a table folds into illegibility at 80 columns)."""
    from rich.text import Text

    console = _console()
    if not letters:
        console.print(f"no dead letters for {topic}")
        return
    waiting = sum(offset >= done.get(p, 0) for p, offset, _ in letters)
    console.print(Text(f"{len(letters)} dead letters of {topic} ({waiting} not replayed)",
                       style="bold"))
    for p, offset, dead in letters:
        ext = dead.extensions
        when = dead.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if dead.time else "-"
        head = Text(f"{topic}.dlq p{p}@{offset}", style="bold")
        head.append(f"  {when}  ", style="dim")
        head.append(f"id={_printable(_as_replay(dead).id)}")
        if dead.key is not None:
            head.append(f"  key={_printable(dead.key)}", style="yellow")
        if offset < done.get(p, 0):
            head.append("  replayed", style="green")
        attempts = ext.get("dlqattempts", "?")
        body = Text(
            f"  from {_printable(ext.get('dlqtopic', topic))} p{ext.get('dlqpartition', '?')}"
            f"@{ext.get('dlqoffset', '?')}, group {_printable(ext.get('dlqgroup', '?'))}, "
            f"{attempts} attempt{'' if attempts == 1 else 's'}: ", style="dim",
        )
        body.append(_printable(ext.get("dlqreason", "")), style="red")
        console.print(head)
        console.print(body)


app.command("gateway")(gateway_command)
app.command("sidecar")(sidecar_command)
app.add_typer(routes_app)
app.command("validate")(validate_command)
register_runtime_commands(app)  # shoal up / ps / scale
app.command()(top)  # shoal top (shoal/commands/top.py)


def main() -> None:
    """Entry point of the ``shoal`` console script."""
    if sys.argv[1:2] == ["up"]:  # its fork server starts importing now (shoal/commands/up.py)
        launch_forkserver(sys.argv[2:])
    app(prog_name="shoal")


if __name__ == "__main__":
    main()
