"""The `shoal` command, run for real in subprocesses on a temporary SQLite broker; and the
pure URL resolution of `shoal.settings`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import ConfigError, InvalidEvent
from shoal.events import EventBus, RetryPolicy
from shoal.events.brokers.connect import DEFAULT_BROKER_URL
from shoal.events.codec import from_structured
from shoal.events.group import offset_key
from shoal.settings import Manifest, load_manifest, load_settings, parse_manifest, resolve

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_BROKER", "SHOAL_STORE")}
    env.update(extra)
    return env


def shoal(
    *args: str, cwd: Path, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real command line: ``python -m shoal.cli ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], cwd=cwd, input=input, text=True,
        capture_output=True, env=env or clean_env(), timeout=60,
    )


def spawn(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", *args], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or clean_env(),
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert exit 2 with one clear line on stderr that contains every fragment."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state/events.db"


def topics_json(url: str, cwd: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(ok(shoal("topics", "--json", "--broker", url, cwd=cwd)))
    return {row["topic"]: row for row in rows}


def events_in(url: str, cwd: Path, topic: str) -> int:
    row = topics_json(url, cwd).get(topic)
    return 0 if row is None else row["events"]


# -- publish -----------------------------------------------------------------------------


def test_publish_prints_the_ack_and_a_repeated_id_is_a_duplicate(tmp_path: Path, url: str):
    first = json.loads(ok(shoal("publish", "orders", "--key", "alice", "--data",
                                '{"n": 1}', "--id", "o-1", "--json", "--broker", url,
                                cwd=tmp_path)))
    assert first["topic"] == "orders" and first["offset"] == 0 and first["id"] == "o-1"
    assert first["duplicate"] is False
    again = ok(shoal("publish", "orders", "--key", "alice", "--data", '{"n": 1}', "--id",
                     "o-1", "--broker", url, cwd=tmp_path))
    assert f"partition {first['partition']}, offset 0, duplicate yes" in again
    assert events_in(url, tmp_path, "orders") == 1


def test_publish_lines_then_tail_json_gets_them_in_order(tmp_path: Path, url: str):
    lines = "".join(json.dumps({"customer": "c7", "n": n}) + "\n" for n in range(5))
    out = ok(shoal("publish", "orders", "--lines", "--key-field", "customer", "--type",
                   "order.created", "--broker", url, cwd=tmp_path, input=lines + "\n"))
    assert out.strip() == "published 5 events to orders"
    tailed = ok(shoal("tail", "orders", "--group", "audit", "--json", "--count", "5",
                      "--broker", url, cwd=tmp_path))
    events = [from_structured(line) for line in tailed.splitlines()]
    assert [e.data["n"] for e in events] == list(range(5))
    assert {e.key for e in events} == {"c7"} and {e.type for e in events} == {"order.created"}


def test_publish_lines_summary_json_and_integer_keys(tmp_path: Path, url: str):
    lines = "".join(json.dumps({"id": n}) + "\n" for n in range(5000))  # two batches
    summary = json.loads(ok(shoal("publish", "t", "--lines", "--key-field", "id", "--json",
                                  "--broker", url, cwd=tmp_path, input=lines)))
    assert summary == {"topic": "t", "lines": 5000, "events": 5000, "duplicates": 0}
    user_error(shoal("publish", "t", "--lines", "--broker", url, cwd=tmp_path,
                     input=lines + "[\n" + lines),
               "line 5001: not valid JSON", "lines 1-5000 were published (5000 events)")
    assert events_in(url, tmp_path, "t") == 10000


def test_a_bad_line_publishes_exactly_the_lines_before_it(tmp_path: Path, url: str):
    lines = '{"n": 1}\n\n{"n": 2}\n{"n": 3,\n{"n": 4}\n'
    err = user_error(
        shoal("publish", "orders", "--lines", "--broker", url, cwd=tmp_path, input=lines),
        "line 4: not valid JSON", "lines 1-3 were published (2 events)",
        "nothing from line 4 on",
    )
    assert "line 4" in err
    assert events_in(url, tmp_path, "orders") == 2


def test_a_bad_first_line_publishes_nothing(tmp_path: Path, url: str):
    user_error(shoal("publish", "orders", "--lines", "--key-field", "k", "--broker", url,
                     cwd=tmp_path, input='{"n": 1}\n'),
               "line 1: no field 'k'", "nothing was published")
    user_error(shoal("publish", "orders", "--lines", "--key-field", "k", "--broker", url,
                     cwd=tmp_path, input='{"k": [1]}\n'),
               "line 1: field 'k' must be a string or integer")
    assert events_in(url, tmp_path, "orders") == 0


# -- tail --------------------------------------------------------------------------------


def test_tail_commits_what_it_wrote_and_a_group_resumes(tmp_path: Path, url: str):
    for n in range(3):
        ok(shoal("publish", "orders", "--key", "k", "--data", str(n), "--broker", url,
                 cwd=tmp_path))
    out = ok(shoal("tail", "orders", "-g", "g", "--json", "-n", "2", "--broker", url,
                   cwd=tmp_path))
    assert [from_structured(line).data for line in out.splitlines()] == [0, 1]
    assert topics_json(url, tmp_path)["orders"]["groups"]["g"]["lag"] == 1
    readable = ok(shoal("tail", "orders", "-g", "g", "-n", "1", "--broker", url,
                        cwd=tmp_path))
    assert "key=k" in readable and readable.rstrip().endswith("2")
    assert topics_json(url, tmp_path)["orders"]["groups"]["g"]["lag"] == 0


def test_tail_without_group_starts_at_the_end_and_leaves_no_group(tmp_path: Path, url: str):
    for n in range(3):
        ok(shoal("publish", "orders", "--data", f'"old {n}"', "--broker", url, cwd=tmp_path))

    async def run() -> str:
        proc = spawn("tail", "orders", "--json", "--count", "1", "--broker", url, cwd=tmp_path)
        async with EventBus.connect(url) as bus:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                await bus.publish("orders", "new")
                await asyncio.sleep(0.2)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        return out

    out = asyncio.run(run())
    assert from_structured(out.strip()).data == "new"
    assert topics_json(url, tmp_path)["orders"]["groups"] == {}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_tail_stops_cleanly_on_a_signal(tmp_path: Path, url: str, sig: signal.Signals):
    ok(shoal("publish", "orders", "--data", '"hello"', "--broker", url, cwd=tmp_path))
    proc = spawn("tail", "orders", "--group", "g", "--broker", url, cwd=tmp_path)
    assert proc.stdout is not None
    assert "hello" in proc.stdout.readline()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert topics_json(url, tmp_path)["orders"]["groups"]["g"]["lag"] == 0


def _tail_into_closed_pipe(tmp_path: Path, url: str) -> subprocess.Popen[str]:
    ok(shoal("publish", "orders", "--key", "k", "--data", "1", "--broker", url, cwd=tmp_path))
    proc = spawn("tail", "orders", "--group", "g", "--json", "--broker", url, cwd=tmp_path)
    assert proc.stdout is not None
    assert from_structured(proc.stdout.readline()).data == 1
    proc.stdout.close()  # the reader goes away (like `| head -1`)
    ok(shoal("publish", "orders", "--key", "k", "--data", "2", "--broker", url, cwd=tmp_path))
    proc.wait(timeout=15)
    return proc


def test_tail_exits_quietly_when_the_reader_goes_away(tmp_path: Path, url: str):
    proc = _tail_into_closed_pipe(tmp_path, url)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in err and "Exception" not in err, err


def test_tail_does_not_acknowledge_an_event_it_could_not_write(tmp_path: Path, url: str):
    _tail_into_closed_pipe(tmp_path, url)
    assert topics_json(url, tmp_path)["orders"]["groups"]["g"]["lag"] == 1


def test_tail_json_names_an_event_it_cannot_encode_and_leaves_it_unacknowledged(
    tmp_path: Path, url: str
):
    async def publish_odd() -> None:
        async with EventBus.connect(url) as bus:
            try:  # an extension integer beyond the CloudEvents 32-bit range
                await bus.publish("odd", 1, key="k", extensions={"seq": 2**40})
            except InvalidEvent:
                pytest.skip("the bus refuses it now: nothing for tail to trip on")

    asyncio.run(publish_odd())
    user_error(shoal("tail", "odd", "-g", "g", "--json", "-n", "1", "--broker", url,
                     cwd=tmp_path), "cannot be written as a CloudEvent", "32-bit")
    assert topics_json(url, tmp_path)["odd"]["groups"]["g"]["lag"] == 1
    assert "key=k" in ok(shoal("tail", "odd", "-g", "g", "-n", "1", "--broker", url,
                               cwd=tmp_path))  # the readable form can show it
    assert topics_json(url, tmp_path)["odd"]["groups"]["g"]["lag"] == 0


# -- topics ------------------------------------------------------------------------------


def test_topics_table_and_json(tmp_path: Path, url: str):
    assert ok(shoal("topics", "--broker", url, cwd=tmp_path)).startswith("no topics")
    for n in range(4):
        ok(shoal("publish", "orders", "--key", f"k{n}", "--data", str(n), "--broker", url,
                 cwd=tmp_path))
    ok(shoal("tail", "orders", "-g", "billing", "-n", "3", "--from", "earliest", "--json",
             "--broker", url, cwd=tmp_path))
    rows = topics_json(url, tmp_path)
    orders = rows["orders"]
    assert orders["partitions"] == 8 and orders["events"] == 4 and orders["size_bytes"] > 0
    assert orders["groups"]["billing"]["lag"] == 1
    assert sum(orders["groups"]["billing"]["partitions"].values()) == 1
    assert rows["orders.dlq"]["events"] == 0
    table = ok(shoal("topics", "--broker", url, cwd=tmp_path))
    assert "orders" in table and "billing: 1" in table and "forever" in table


# -- dlq ---------------------------------------------------------------------------------


async def _dead_letter(url: str, topic: str, count: int) -> None:
    async with EventBus.connect(url) as bus:
        for n in range(count):
            await bus.publish(topic, {"n": n}, key=f"k{n}", id=f"pay-{n}")

        def fail(event: Any) -> None:
            raise ValueError(f"card declined for {event.data['n']}")

        await bus.subscribe(topic, "payments", fail, retry=RetryPolicy(attempts=1))
        dlq = f"{topic}.dlq"

        async def dead() -> int:
            return sum(r.end - r.start for r in await bus.broker.ranges(dlq))

        deadline = time.monotonic() + 20
        while await dead() < count:
            assert time.monotonic() < deadline, "events were not dead-lettered"
            await asyncio.sleep(0.05)


def test_dlq_lists_and_replays_once(tmp_path: Path, url: str):
    asyncio.run(_dead_letter(url, "pay", 2))
    letters = [from_structured(line) for line in
               ok(shoal("dlq", "pay", "--json", "--broker", url, cwd=tmp_path)).splitlines()]
    assert sorted(e.extensions["dlqreason"] for e in letters) == [
        "ValueError: card declined for 0", "ValueError: card declined for 1"]
    assert {e.extensions["dlqtopic"] for e in letters} == {"pay"}
    assert {e.extensions["dlqattempts"] for e in letters} == {1}
    table = ok(shoal("dlq", "pay", "--broker", url, cwd=tmp_path))
    assert "card declined" in table and "payments" in table

    replay = json.loads(ok(shoal("dlq", "pay", "--replay", "--json", "--broker", url,
                                 cwd=tmp_path)))
    assert replay == {"topic": "pay", "replayed": 2, "duplicates": 0, "skipped": 0}
    again = ok(shoal("dlq", "pay", "--replay", "--broker", url, cwd=tmp_path))
    assert again.strip() == "replayed 0 dead letters onto pay (2 replayed before)"
    assert events_in(url, tmp_path, "pay") == 4
    listing = ok(shoal("dlq", "pay", "--broker", url, cwd=tmp_path))
    assert "(0 not replayed)" in listing and listing.count("replayed") == 3

    out = ok(shoal("tail", "pay", "-g", "check", "--json", "-n", "4", "--broker", url,
                   cwd=tmp_path))
    both = [from_structured(line) for line in out.splitlines()]  # originals and replays
    assert sorted(e.id for e in both) == ["pay-0", "pay-0", "pay-1", "pay-1"]  # ids kept
    assert all(not k.startswith("dlq") for e in both for k in e.extensions)
    assert sorted((e.key, e.data["n"]) for e in both) == [
        ("k0", 0), ("k0", 0), ("k1", 1), ("k1", 1)]


def test_dlq_replay_interrupted_before_its_cursor_moved_adds_no_duplicate(
    tmp_path: Path, url: str
):
    asyncio.run(_dead_letter(url, "pay", 2))
    ok(shoal("dlq", "pay", "--replay", "--broker", url, cwd=tmp_path))

    async def forget_cursor() -> None:  # as if the replay died after publishing
        async with EventBus.connect(url) as bus:
            for p in range(8):
                await bus.store.delete(offset_key("pay.dlq", "shoal-replay", p))

    asyncio.run(forget_cursor())
    out = json.loads(ok(shoal("dlq", "pay", "--replay", "--json", "--broker", url,
                              cwd=tmp_path)))
    assert out["replayed"] == 0 and out["duplicates"] == 2
    assert events_in(url, tmp_path, "pay") == 4


def test_dlq_of_a_topic_without_dead_letters(tmp_path: Path, url: str):
    ok(shoal("publish", "fine", "--broker", url, cwd=tmp_path))
    assert ok(shoal("dlq", "fine", "--broker", url, cwd=tmp_path)).strip() == \
        "no dead letters for fine"
    user_error(shoal("dlq", "nosuch", "--broker", url, cwd=tmp_path),
               "topic 'nosuch' does not exist")


# -- where the broker is -----------------------------------------------------------------


@pytest.mark.parametrize("winner", ["flag", "env", "manifest", "default"])
def test_broker_resolution_order(tmp_path: Path, winner: str):
    places = {name: f"sqlite:///{name}/events.db" for name in ("flag", "env", "manifest")}
    places["default"] = DEFAULT_BROKER_URL
    order = ["flag", "env", "manifest", "default"]
    given = order[order.index(winner):]
    args = ["--broker", places["flag"]] if "flag" in given else []
    env = clean_env(SHOAL_BROKER=places["env"]) if "env" in given else clean_env()
    if "manifest" in given:
        (tmp_path / "shoal.yaml").write_text(f"broker: {places['manifest']}\nservices: {{}}\n")
    ok(shoal("publish", "here", *args, cwd=tmp_path, env=env))
    for name, place in places.items():
        db = tmp_path / place.removeprefix("sqlite:///")
        assert db.exists() == (name == winner), name
    store_dir = tmp_path / places[winner].removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert (store_dir / "store.db").exists()  # the Store beside the broker
    assert events_in(places[winner], tmp_path, "here") == 1


def test_store_flag_and_manifest_store(tmp_path: Path):
    (tmp_path / "shoal.yaml").write_text(
        "broker: sqlite:///m/events.db\nstore: sqlite:///m/coordination.db\n")
    ok(shoal("publish", "t", "--data", "1", cwd=tmp_path))
    ok(shoal("tail", "t", "-g", "g", "-n", "1", "--json", cwd=tmp_path))
    assert (tmp_path / "m/coordination.db").exists()
    assert not (tmp_path / "m/store.db").exists()
    ok(shoal("tail", "t", "-g", "g2", "-n", "1", "--json", "--store",
             "sqlite:///s/store.db", cwd=tmp_path))
    assert (tmp_path / "s/store.db").exists()


# -- hostile input -----------------------------------------------------------------------

HOSTILE: list[tuple[str, list[str], str | None, list[str]]] = [
    ("bad --data", ["publish", "t", "--data", '{"a": '], None, ["--data is not valid JSON"]),
    ("bad topic", ["publish", "no spaces"], None, ["topic name 'no spaces' is invalid"]),
    ("bad scheme", ["publish", "t", "--broker", "kafka://localhost"], None,
     ["unsupported scheme", "kafka://localhost", "from --broker"]),
    ("bad sqlite url", ["publish", "t", "--broker", "sqlite://host/x.db"], None,
     ["expected sqlite:///PATH"]),
    ("bad store scheme", ["publish", "t", "--store", "etcd://x"], None,
     ["store url", "etcd://x", "from --store"]),
    ("manifest not yaml", ["publish", "t"], "broker: [sqlite:///x\nstore: 1\n",
     ["shoal.yaml, line", "not valid YAML"]),
    ("manifest not a mapping", ["publish", "t"], "- broker\n- store\n",
     ["shoal.yaml, line 1", "must be a mapping", "not a list"]),
    ("manifest broker not a string", ["publish", "t"], "# hi\nbroker: 42\n",
     ["shoal.yaml, line 2", "broker: must be a URL string", "not an integer"]),
    ("manifest store empty", ["publish", "t"], "store:\n", ["store: must be a URL", "null"]),
    ("manifest bad scheme", ["publish", "t"], "\n\nbroker: kafka://x\n",
     ["unsupported scheme", "from shoal.yaml, line 3"]),
    ("unreachable nats", ["publish", "t", "--broker", "nats://127.0.0.1:1/x"], None,
     ["cannot connect", "nats://127.0.0.1:1/x"]),
    ("--lines with --data", ["publish", "t", "--lines", "--data", "1"], None,
     ["do not combine"]),
    ("bad group", ["tail", "t", "--group", "../etc"], None, ["group name '../etc'"]),
]


@pytest.mark.parametrize(("args", "manifest", "fragments"),
                         [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_one_clear_line_exit_2_and_nothing_appended(
    tmp_path: Path, args: list[str], manifest: str | None, fragments: list[str]
):
    if manifest is not None:
        (tmp_path / "shoal.yaml").write_text(manifest)
    user_error(shoal(*args, cwd=tmp_path, input=""), *fragments)
    for db in tmp_path.glob("**/events.db"):  # the bus may have opened the broker
        assert topics_json(f"sqlite:///{db}", tmp_path) == {}


# -- settings (pure) ---------------------------------------------------------------------


def test_resolve_precedence_flag_env_manifest_default():
    m = Manifest(Path("shoal.yaml"), "sqlite:///m/events.db", None, 1, None)
    env = {"SHOAL_BROKER": "sqlite:///e/events.db"}
    assert resolve(broker="memory://f", env=env, manifest=m).broker == "memory://f"
    assert resolve(env=env, manifest=m).broker == "sqlite:///e/events.db"
    assert resolve(manifest=m).broker == "sqlite:///m/events.db"
    s = resolve()
    assert (s.broker, s.store) == (DEFAULT_BROKER_URL, "sqlite:///.shoal/store.db")
    assert (s.broker_origin, s.store_origin) == ("the default", "beside the broker")
    assert resolve(manifest=m).broker_origin == "from shoal.yaml, line 1"
    assert resolve(env=env).broker_origin == "from $SHOAL_BROKER"


def test_resolve_store_and_its_default_beside_the_broker():
    m = Manifest(Path("shoal.yaml"), "sqlite:///m/events.db", "sqlite:///m/kv.db", 1, 2)
    assert resolve(manifest=m).store == "sqlite:///m/kv.db"
    assert resolve(store="memory://s", manifest=m).store == "memory://s"
    assert resolve(env={"SHOAL_STORE": "sqlite:///e/kv.db"}, manifest=m).store == \
        "sqlite:///e/kv.db"
    assert resolve(broker="sqlite:///data/x/events.db").store == "sqlite:///data/x/store.db"
    assert resolve(broker="sqlite:///events.db").store == "sqlite:///store.db"
    assert resolve(broker="memory://q").store == "memory://q"
    # the manifest's store belongs to the manifest's broker: not to one given elsewhere
    assert resolve(broker="sqlite:///other/events.db", manifest=m).store == \
        "sqlite:///other/store.db"
    assert resolve(env={"SHOAL_BROKER": "sqlite:///o/events.db"}, manifest=m).store == \
        "sqlite:///o/store.db"
    only_store = Manifest(Path("shoal.yaml"), None, "sqlite:///kv.db", None, 1)
    assert resolve(manifest=only_store).store == "sqlite:///kv.db"  # with the default broker


def test_parse_manifest_values_and_lines():
    m = parse_manifest("# comment\nservices: {}\nbroker:  sqlite:///b.db \n"
                       "store: memory://s\n", Path("shoal.yaml"))
    assert (m.broker, m.store, m.broker_line, m.store_line) == (
        "sqlite:///b.db", "memory://s", 3, 4)
    assert parse_manifest("", Path("x")) == Manifest(Path("x"))
    assert parse_manifest("# only a comment\n", Path("x")).broker is None


@pytest.mark.parametrize(("text", "message"), [
    ("broker: {\n", "shoal.yaml, line 2: not valid YAML"),
    ("a: 1\n  b: 2\nc: [\n", "shoal.yaml, line 2: not valid YAML"),
    ("just a string", "line 1: the manifest must be a mapping"),
    ("[1, 2]", "not a list"),
    ("broker: true\n", "line 1: broker: must be a URL string like"),
    ("\nstore: [a]\n", "line 2: store: must be a URL string"),
    ("broker: ''\n", "not an empty string"),
    ("broker: !!python/object:os.system x\n",
     "line 1: unsupported tag 'tag:yaml.org,2002:python/object"),
    ("services: {a: 1}\n", "line 1: services.a: expected a mapping"),
    ("a: 1\n---\nb: 2\n", "not valid YAML"),
])
def test_parse_manifest_errors_name_the_file_and_line(text: str, message: str):
    with pytest.raises(ConfigError) as info:
        parse_manifest(text, Path("shoal.yaml"))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_manifest_and_settings_from_files(tmp_path: Path):
    assert load_manifest(tmp_path / "shoal.yaml") is None
    (tmp_path / "shoal.yaml").write_bytes(b"broker: sqlite:///\xff\n")
    with pytest.raises(ConfigError, match="line 1: not valid UTF-8"):
        load_manifest(tmp_path / "shoal.yaml")
    (tmp_path / "shoal.yaml").write_text("broker: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(cwd=tmp_path, env={})
    # a broker given by flag or environment does not need the manifest: it is not read
    assert load_settings("memory://x", cwd=tmp_path, env={}).broker == "memory://x"
    assert load_settings(cwd=tmp_path, env={"SHOAL_BROKER": "memory://e"}).broker == \
        "memory://e"
    (tmp_path / "shoal.yaml").write_text("broker: sqlite:///m/events.db\n")
    s = load_settings(cwd=tmp_path, env={})
    assert s.broker == "sqlite:///m/events.db" and s.store == "sqlite:///m/store.db"
    assert s.broker_origin == f"from {tmp_path / 'shoal.yaml'}, line 1"


# -- the demo ----------------------------------------------------------------------------


def test_demo_runs_two_consumers_and_checks_out():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "shoal.demo"], cwd=ROOT, text=True,
                            capture_output=True, timeout=60, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("consumer-1", "consumer-2"):
        assert f"{name} partition" in out
    assert "each exactly once" in out and "FAIL" not in out
    assert time.monotonic() - started < 30


# -- the README --------------------------------------------------------------------------

README_EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("n", range(len(README_EXAMPLES)))
def test_readme_examples_run(tmp_path: Path, n: int):
    (tmp_path / "example.py").write_text(README_EXAMPLES[n])
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, text=True,
                            capture_output=True, timeout=60, env=clean_env())
    assert result.returncode == 0, result.stderr
