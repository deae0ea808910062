"""``nats://`` URLs: what they mean, and a clear ConfigError naming the URL for bad ones."""

from __future__ import annotations

import pytest

from shoal.errors import ConfigError
from shoal.events.brokers.connect import connect_broker
from shoal.natsio import parse_nats_url
from shoal.store.connect import connect_store


def test_servers_namespace_and_options() -> None:
    t = parse_nats_url("nats://a.example:4222,10.0.0.2:5000/prod?replicas=3", "broker url")
    assert t.servers == ("nats://a.example:4222", "nats://10.0.0.2:5000")
    assert (t.namespace, t.replicas, t.storage) == ("prod", 3, "file")
    default = parse_nats_url("nats://localhost", "store url")
    assert default.servers == ("nats://localhost:4222",)
    assert (default.namespace, default.replicas) == ("shoal", 1)
    assert parse_nats_url("nats://h:1/?storage=memory", "x").storage == "memory"


BAD = [
    ("nats://", "no server"),
    ("nats://h:99999", "bad server address"),
    ("nats://h:12/a/b", "namespace 'a/b'"),
    ("nats://h:12/" + "n" * 65, "namespace"),
    ("nats://h:12/ns.with.dots", "namespace"),
    ("nats://h:12/ns*", "namespace"),
    ("nats://h:12/ns?replicas=0", "replicas must be 1..5"),
    ("nats://h:12/ns?replicas=x", "replicas must be 1..5"),
    ("nats://h:12/ns?replicas=" + "9" * 5000, "replicas must be 1..5"),
    ("nats://h:12/ns?storage=tape", "storage must be file or memory"),
    ("nats://h:12/ns?fsync=1", "unknown option(s) fsync"),
    ("nats://h 1:12", "bad server address"),
    ("nats://h:12\r\nPUB x 1/ns", "bad server address"),
]


@pytest.mark.parametrize(("url", "match"), BAD, ids=[b[0][:40] for b in BAD])
def test_bad_urls_are_config_errors_naming_the_url(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match="broker url") as info:
        parse_nats_url(url, "broker url")
    assert match in str(info.value)


async def test_unreachable_server_is_a_clear_error_quickly() -> None:
    with pytest.raises(ConfigError, match=r"broker url 'nats://127.0.0.1:1/x': cannot connect"):
        await connect_broker("nats://127.0.0.1:1/x")
    with pytest.raises(ConfigError, match=r"store url 'nats://127.0.0.1:1/x': cannot connect"):
        await connect_store("nats://127.0.0.1:1/x")


def test_the_store_of_a_nats_bus_is_the_same_servers_and_namespace() -> None:
    from shoal.events.bus import default_store_for

    assert default_store_for("nats://h:1,h:2/ns?replicas=3") == "nats://h:1,h:2/ns?replicas=3"
