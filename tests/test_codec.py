"""CloudEvents wire formats: interop with the `cloudevents` SDK, round trips, hostile input."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import InvalidEvent
from shoal.events.codec import (
    JSON_BATCH_FORMAT,
    JSON_EVENT_FORMAT,
    MAX_EVENT_SIZE,
    from_binary,
    from_http,
    from_http_batch,
    from_structured,
    to_binary,
    to_structured,
    validate,
)
from shoal.events.event import Event

try:  # cloudevents >= 2 keeps the classic API under cloudevents.v1
    from cloudevents.v1.conversion import to_binary as sdk_to_binary
    from cloudevents.v1.conversion import to_structured as sdk_to_structured
    from cloudevents.v1.http import CloudEvent as SdkEvent
    from cloudevents.v1.http import from_http as sdk_from_http
except ImportError:  # cloudevents 1.x
    from cloudevents.conversion import to_binary as sdk_to_binary  # type: ignore[no-redef]
    from cloudevents.conversion import to_structured as sdk_to_structured  # type: ignore[no-redef]
    from cloudevents.http import CloudEvent as SdkEvent  # type: ignore[no-redef]
    from cloudevents.http import from_http as sdk_from_http  # type: ignore[no-redef]

TIME = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
TIME_TEXT = "2024-05-01T12:30:15.123456Z"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EXTENSIONS: dict[str, Any] = {
    "partitionkey": "order-42",
    "traceparent": TRACEPARENT,
    "attempt": 3,
    "replayed": True,
}


def core_sdk() -> Any:
    """The spec-compliant (percent-encoding) bindings of cloudevents >= 2, or skip."""
    http = pytest.importorskip("cloudevents.core.bindings.http")
    formats = pytest.importorskip("cloudevents.core.formats.json")
    event = pytest.importorskip("cloudevents.core.v1.event")
    return http, formats.JSONFormat(), event.CloudEvent


def canonical(value: Any) -> str:
    """The canonical string form of an extension value (what binary mode carries)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_binary_received(event: Event) -> Event:
    """What binary mode delivers for ``event``: canonical-string extensions, an explicit
    content type when there is data, and no data for an empty body."""
    ct = event.datacontenttype
    data = event.data
    if data is not None and ct is None:
        ct = "application/octet-stream" if isinstance(data, bytes) else "application/json"
    if data == b"":
        data = None
    return msgspec.structs.replace(
        event,
        datacontenttype=ct,
        data=data,
        extensions={k: canonical(v) for k, v in event.extensions.items()},
    )


def raises(attribute: str, fn: Any, *args: Any, **kwargs: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        fn(*args, **kwargs)
    assert info.value.attribute == attribute, str(info.value)
    assert str(info.value).startswith(f"{attribute}: ")
    return info.value


# -- the cloudevents SDK as an independent oracle ----------------------------------------

SDK_CASES = {
    "json": (
        {"datacontenttype": "application/json", "subject": "orders/42",
         "dataschema": "https://example.com/schemas/order.json", **EXTENSIONS},
        {"order": 42, "items": [{"sku": "a", "qty": 2}], "note": "naïve ✓", "paid": None},
    ),
    "json-implied": ({"partitionkey": "k"}, {"a": [1, 2.5, "x"]}),
    "bytes": ({"datacontenttype": "application/octet-stream"}, b"\x00\x01\xfe\xff payload"),
    "text": ({"datacontenttype": "text/plain; charset=utf-8"}, "plain text, ünïcode ✓"),
    "no-data": ({"subject": "ping"}, None),
}  # fmt: skip


def sdk_event(case: str) -> tuple[Any, dict[str, Any], Any]:
    extra, data = SDK_CASES[case]
    attributes = {"id": "evt-1", "source": "/orders", "type": "com.example.order.created",
                  "time": TIME_TEXT, **extra}  # fmt: skip
    return SdkEvent(dict(attributes), data), attributes, data


def assert_matches(ours: Event, attributes: dict[str, Any], data: Any, *, strings: bool) -> None:
    """``ours`` has the SDK event's attributes (extensions as strings if ``strings``)."""
    core = {"id", "source", "type", "specversion", "datacontenttype", "dataschema", "subject"}
    for name in core & attributes.keys():
        assert getattr(ours, name) == attributes[name], name
    assert ours.time == TIME
    expected = {k: v for k, v in attributes.items() if k not in core | {"time"}}
    if strings:
        expected = {k: str(v) for k, v in expected.items()}  # the SDK sends str(True)
    assert ours.extensions == expected
    assert ours.data == data


@pytest.mark.parametrize("case", SDK_CASES)
def test_sdk_structured_is_parsed(case: str) -> None:
    ce, attributes, data = sdk_event(case)
    headers, body = sdk_to_structured(ce)
    ours = from_http(headers, body)
    assert_matches(ours, attributes, data, strings=False)
    assert from_structured(body) == ours


@pytest.mark.parametrize("case", SDK_CASES)
def test_sdk_binary_is_parsed(case: str) -> None:
    ce, attributes, data = sdk_event(case)
    marshal = (lambda d: d.encode()) if case == "text" else None  # SDK would JSON-quote text
    headers, body = sdk_to_binary(ce, data_marshaller=marshal)
    headers = {k: str(v) for k, v in headers.items()}  # HTTP sends text; the SDK leaves ints
    ours = from_http(headers, body or b"")  # the SDK gives None for no data
    assert_matches(ours, attributes, data, strings=True)


def our_event(case: str) -> Event:
    extra, data = SDK_CASES[case]
    core = {k: v for k, v in extra.items() if k in ("datacontenttype", "subject", "dataschema")}
    exts = {k: v for k, v in extra.items() if k not in core}
    return Event(id="evt-1", source="/orders", type="com.example.order.created", time=TIME,
                 data=data, extensions=exts, **core)  # fmt: skip


def sdk_attributes(ce: Any) -> dict[str, Any]:
    return {name: ce[name] for name in ce}


@pytest.mark.parametrize("case", SDK_CASES)
def test_our_structured_is_parsed_by_sdk(case: str) -> None:
    event = our_event(case)
    ce = sdk_from_http({"content-type": JSON_EVENT_FORMAT}, to_structured(event))
    attrs = sdk_attributes(ce)
    assert attrs.pop("time") == TIME_TEXT
    expected = {"specversion": "1.0", "id": event.id, "source": event.source,
                "type": event.type, **SDK_CASES[case][0]}  # fmt: skip
    assert attrs == expected  # ints and booleans keep their JSON types
    assert ce.data == event.data


@pytest.mark.parametrize("case", SDK_CASES)
def test_our_binary_is_parsed_by_sdk(case: str) -> None:
    event = our_event(case)
    headers, body = to_binary(event)
    text = case == "text"
    ce = sdk_from_http(headers, body, data_unmarshaller=(lambda b: b.decode()) if text else None)
    attrs = sdk_attributes(ce)
    assert attrs.pop("time") == TIME_TEXT
    received = as_binary_received(event)
    assert attrs.pop("datacontenttype", None) == received.datacontenttype
    expected = {"specversion": "1.0", "id": event.id, "source": event.source,
                "type": event.type, **{k: v for k, v in SDK_CASES[case][0].items()
                                       if k != "datacontenttype"}}  # fmt: skip
    assert attrs == {k: canonical(v) for k, v in expected.items()}
    assert ce.data == event.data


UNICODE = {
    "subject": 'Euro € 😀 "quoted" 100% done',
    "source": "urn:shoal:café/ß",
    "partitionkey": "клиент 42",
}


def test_percent_encoding_matches_the_spec_example() -> None:
    event = Event(id="1", source="/s", type="t", subject="Euro \u20ac \U0001f600")
    headers, _ = to_binary(event)
    assert headers["ce-subject"] == "Euro%20%E2%82%AC%20%F0%9F%98%80"  # HTTP binding 3.1.3.2
    assert from_binary(headers, b"").subject == "Euro \u20ac \U0001f600"
    # printable ASCII other than space, '"' and '%' is left alone
    event = Event(id="a!#$&'()*+,-./:;<=>?@[\\]^_`{|}~z", source="/s", type="t")
    assert to_binary(event)[0]["ce-id"] == event.id


def test_unicode_headers_from_the_spec_compliant_sdk() -> None:
    http, fmt, CoreEvent = core_sdk()
    attributes = {"id": "1", "type": "t", "time": TIME, "datacontenttype": "application/json",
                  "subject": UNICODE["subject"], "source": UNICODE["source"],
                  "partitionkey": UNICODE["partitionkey"], "attempt": 7}  # fmt: skip
    message = http.to_binary(CoreEvent(dict(attributes), {"k": "ü"}), fmt)
    assert "%" in message.headers["ce-subject"]
    ours = from_http(message.headers, message.body)
    assert (ours.subject, ours.source, ours.time) == (UNICODE["subject"], UNICODE["source"], TIME)
    assert ours.extensions == {"partitionkey": UNICODE["partitionkey"], "attempt": "7"}
    assert ours.data == {"k": "ü"}
    message = http.to_structured(CoreEvent(dict(attributes), b"\x00\xff"), fmt)
    ours = from_http(message.headers, message.body)
    assert ours.extensions == {"partitionkey": UNICODE["partitionkey"], "attempt": 7}
    assert (ours.subject, ours.data) == (UNICODE["subject"], b"\x00\xff")


def test_unicode_headers_to_the_spec_compliant_sdk() -> None:
    http, fmt, _ = core_sdk()
    event = Event(id="1", source=UNICODE["source"], type="t", subject=UNICODE["subject"],
                  time=TIME, data={"k": "ü"},
                  extensions={"partitionkey": UNICODE["partitionkey"]})  # fmt: skip
    headers, body = to_binary(event)
    assert all(v.isascii() and " " not in v for v in headers.values() if v != "application/json")
    ce = http.from_binary(http.HTTPMessage(headers=headers, body=body), fmt)
    assert ce.get_subject() == UNICODE["subject"]
    assert ce.get_source() == UNICODE["source"]
    assert ce.get_extension("partitionkey") == UNICODE["partitionkey"]
    assert ce.get_time() == TIME
    assert ce.get_data() == {"k": "ü"}


def test_header_decoding_is_lenient_where_the_spec_says_so() -> None:
    base = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}
    lower_hex = from_binary({**base, "ce-subject": "caf%c3%a9"}, b"")
    assert lower_hex.subject == "café"
    assert from_binary({**base, "ce-subject": "%41%42c"}, b"").subject == "ABc"  # unnecessary
    quoted = from_binary({**base, "ce-subject": '"hello \\"world\\""'}, b"")  # RFC 7230
    assert quoted.subject == 'hello "world"'
    mixed_case = from_binary({"CE-SpecVersion": "1.0", "Ce-Id": "1", "cE-sOURCE": "/s",
                              "CE-TYPE": "t", "Ce-PartitionKey": "k", "Content-Type":
                              "Application/JSON; Charset=UTF-8"}, b"[1]")  # fmt: skip
    assert mixed_case.key == "k" and mixed_case.data == [1]
    asgi = [(b"ce-specversion", b"1.0"), (b"ce-id", b"1"), (b"ce-source", b"/s"),
            (b"ce-type", b"t"), (b"content-type", b"text/plain")]  # fmt: skip
    assert from_http(asgi, b"hi").data == "hi"
    assert from_http(iter(asgi), b"hi").data == "hi"  # any iterable of pairs, read once
    assert from_binary(base, b'{"a": 1}').data == {"a": 1}  # no Content-Type: implied JSON
    assert from_binary(base, b'{"a": 1}').datacontenttype is None


def test_time_keeps_offset_and_precision() -> None:
    doc = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    for text, expected in [
        ("2024-05-01T12:30:15Z", datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)),
        ("2024-05-01t12:30:15.5z", datetime(2024, 5, 1, 12, 30, 15, 500000, tzinfo=UTC)),
        ("2024-05-01T12:30:15.123456789+05:30",
         datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5.5)))),
        ("2024-05-01T00:00:00-00:00", datetime(2024, 5, 1, tzinfo=UTC)),
    ]:  # fmt: skip
        event = from_structured(msgspec.json.encode({**doc, "time": text}))
        assert event.time == expected and event.time.utcoffset() == expected.utcoffset()
        assert from_structured(to_structured(event)).time.utcoffset() == expected.utcoffset()


def test_null_attributes_mean_unset() -> None:
    doc = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "subject": None,
           "time": None, "datacontenttype": None, "myext": None, "data": None}  # fmt: skip
    event = from_structured(msgspec.json.encode(doc))
    assert event == Event(id="1", source="/s", type="t")


def test_batches() -> None:
    events = [
        Event(id=str(i), source="/s", type="t", data={"i": i}, extensions={"partitionkey": "k"})
        for i in range(3)
    ]
    body = b"[" + b",".join(to_structured(e) for e in events) + b"]"
    headers = {"Content-Type": f"{JSON_BATCH_FORMAT}; charset=utf-8"}
    assert from_http_batch(headers, body) == events
    assert from_http_batch(headers, b"[]") == []
    assert from_http_batch({"content-type": JSON_EVENT_FORMAT}, to_structured(events[0])) == [
        events[0]
    ]
    assert from_http_batch(*to_binary(events[1])) == [as_binary_received(events[1])]
    second_empty = b"[" + to_structured(events[0]) + b", {}]"
    error = raises("specversion", from_http_batch, headers, second_empty)
    assert "event #1" in str(error)
    raises("event", from_http_batch, headers, to_structured(events[0]))  # not an array
    raises("event", from_http_batch, headers, b"[1]")
    raises("event", from_http, headers, body)  # one-event API refuses batches
    raises("data", from_http_batch, headers, body, max_size=len(body) - 1)


# -- property tests ----------------------------------------------------------------------

# CloudEvents strings: no control characters, surrogates or noncharacters (nor unassigned)
ce_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Cn")), min_size=1)
json_text = st.text(st.characters(blacklist_categories=("Cs",)))
scalars = st.none() | st.booleans() | st.integers() | json_text
json_values = st.recursive(
    scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)
CORE_NAMES = {"specversion", "id", "source", "type", "datacontenttype", "dataschema", "subject",
              "time", "data"}  # fmt: skip
extension_names = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
    lambda n: n not in CORE_NAMES
)
extension_values = (
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Cn")))
    | st.integers(-(2**31), 2**31 - 1)
    | st.booleans()
)
timestamps = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11, minutes=15))]
    ),
)
payloads = st.one_of(
    st.tuples(st.sampled_from([None, "application/json", "application/vnd.shoal+json",
                               "text/json; charset=utf-8"]), json_values),
    st.tuples(st.sampled_from([None, "application/octet-stream", "image/png"]),
              st.binary(min_size=1)),
    st.tuples(st.sampled_from(["text/plain", "text/csv; charset=utf-8",
                               "application/xml; charset=utf-16"]), json_text.filter(bool)),
    st.tuples(st.sampled_from([None, "text/plain"]), st.none()),
)  # fmt: skip


@st.composite
def events(draw: st.DrawFn) -> Event:
    datacontenttype, data = draw(payloads)
    return Event(
        id=draw(ce_text),
        source=draw(ce_text),
        type=draw(ce_text),
        subject=draw(st.none() | ce_text),
        dataschema=draw(st.none() | ce_text.map(lambda s: "urn:schema:" + s)),
        time=draw(st.none() | timestamps),
        datacontenttype=datacontenttype,
        data=data,
        extensions=draw(st.dictionaries(extension_names, extension_values, max_size=5)),
    )


@given(events())
def test_structured_round_trip(event: Event) -> None:
    body = to_structured(event)
    assert from_structured(body) == event
    assert from_http({"content-type": JSON_EVENT_FORMAT}, body) == event


@given(events())
def test_binary_round_trip(event: Event) -> None:
    headers, body = to_binary(event)
    assert all(v.isascii() and v.isprintable() for v in headers.values())
    received = from_binary(headers, body)
    assert received == as_binary_received(event)
    assert from_http(headers, body) == received
    assert from_binary(*to_binary(received)) == received  # a fixed point after one hop


# -- malformed and hostile input ---------------------------------------------------------

VALID = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
WITHOUT = object()

STRUCTURED_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing specversion", {"specversion": WITHOUT}, "specversion"),
    ("missing id", {"id": WITHOUT}, "id"),
    ("missing source", {"source": WITHOUT}, "source"),
    ("missing type", {"type": WITHOUT}, "type"),
    ("null id", {"id": None}, "id"),
    ("empty id", {"id": ""}, "id"),
    ("empty source", {"source": ""}, "source"),
    ("empty type", {"type": ""}, "type"),
    ("numeric id", {"id": 7}, "id"),
    ("source object", {"source": {"a": 1}}, "source"),
    ("specversion 0.3", {"specversion": "0.3"}, "specversion"),
    ("specversion 2.0", {"specversion": "2.0"}, "specversion"),
    ("specversion number", {"specversion": 1.0}, "specversion"),
    ("control char in type", {"type": "a\nb"}, "type"),
    ("noncharacter in id", {"id": "a\ufffe"}, "id"),
    ("empty subject", {"subject": ""}, "subject"),
    ("numeric subject", {"subject": 5}, "subject"),
    ("relative dataschema", {"dataschema": "/schemas/x"}, "dataschema"),
    ("empty dataschema", {"dataschema": ""}, "dataschema"),
    ("datacontenttype not a media type", {"datacontenttype": "json"}, "datacontenttype"),
    ("datacontenttype empty", {"datacontenttype": ""}, "datacontenttype"),
    ("datacontenttype bad param", {"datacontenttype": "text/plain; charset"}, "datacontenttype"),
    ("datacontenttype non-ascii", {"datacontenttype": "text/plâin"}, "datacontenttype"),
    ("uppercase extension", {"Partitionkey": "k"}, "Partitionkey"),
    ("underscore extension", {"my_ext": "v"}, "my_ext"),
    ("dash extension", {"my-ext": "v"}, "my-ext"),
    ("21-char extension", {"a" * 21: "v"}, "a" * 21),
    ("empty extension name", {"": "v"}, ""),
    ("non-ascii extension", {"ünï": "v"}, "ünï"),
    ("float extension", {"ratio": 1.5}, "ratio"),
    ("integral float extension", {"count": 5.0}, "count"),
    ("int64 extension", {"big": 2**31}, "big"),
    ("negative int64 extension", {"small": -(2**31) - 1}, "small"),
    ("array extension", {"tags": ["a", "b"]}, "tags"),
    ("object extension", {"meta": {"a": 1}}, "meta"),
    ("control char in extension", {"partitionkey": "a\x00b"}, "partitionkey"),
    ("data and data_base64", {"data": {"a": 1}, "data_base64": "AAEC"}, "data"),
    ("invalid base64", {"data_base64": "not base64!"}, "data_base64"),
    ("base64 without padding", {"data_base64": "AAE"}, "data_base64"),
    ("base64 with newline", {"data_base64": "AAEC\nAAEC"}, "data_base64"),
    ("base64 not a string", {"data_base64": [1, 2]}, "data_base64"),
    ("object data, text type", {"datacontenttype": "text/plain", "data": {"a": 1}}, "data"),
    ("number data, xml type", {"datacontenttype": "application/xml", "data": 5}, "data"),
    ("time words", {"time": "yesterday"}, "time"),
    ("time date only", {"time": "2024-05-01"}, "time"),
    ("time without offset", {"time": "2024-05-01T12:00:00"}, "time"),
    ("time basic format", {"time": "20240501T120000Z"}, "time"),
    ("time month 13", {"time": "2024-13-01T12:00:00Z"}, "time"),
    ("time february 30", {"time": "2024-02-30T12:00:00Z"}, "time"),
    ("time hour 24", {"time": "2024-05-01T24:00:00Z"}, "time"),
    ("time leap second", {"time": "2016-12-31T23:59:60Z"}, "time"),
    ("time offset 24h", {"time": "2024-05-01T12:00:00+24:00"}, "time"),
    ("time year 0", {"time": "0000-01-01T00:00:00Z"}, "time"),
    ("time unicode digits", {"time": "\uff12\uff10\uff12\uff14-05-01T12:00:00Z"}, "time"),
    ("time number", {"time": 1714564800}, "time"),
]


def document(changes: dict[str, Any]) -> dict[str, Any]:
    doc = {**VALID, **changes}
    return {k: v for k, v in doc.items() if v is not WITHOUT}


@pytest.mark.parametrize(
    ("changes", "attribute"),
    [pytest.param(c, a, id=name) for name, c, a in STRUCTURED_CASES],
)
def test_structured_rejects(changes: dict[str, Any], attribute: str) -> None:
    body = msgspec.json.encode(document(changes))
    error = raises(attribute, from_structured, body)
    assert attribute in str(error)
    raises(attribute, from_http, {"content-type": JSON_EVENT_FORMAT}, body)


@pytest.mark.parametrize(
    ("body", "attribute"),
    [
        pytest.param(b"[]", "event", id="array"),
        pytest.param(b'"event"', "event", id="string"),
        pytest.param(b"null", "event", id="null"),
        pytest.param(b"42", "event", id="number"),
        pytest.param(b"", "event", id="empty"),
        pytest.param(b'{"specversion": "1.0",', "event", id="truncated"),
        pytest.param(b"{'id': 1}", "event", id="not json"),
        pytest.param(b'{"id": "1"} {}', "event", id="trailing"),
        pytest.param(b"\xef\xbb\xbf{}", "event", id="bom"),
        pytest.param(b'{"specversion": "1.0", "id": "\xff\xfe"}', "event", id="not utf-8"),
        pytest.param(b'{"specversion": "1.0", "id": "\xc0\xa0"}', "event", id="overlong utf-8"),
        pytest.param(b'{"specversion": "1.0", "id": "\\udead"}', "event", id="lone surrogate"),
        pytest.param(b'{"data": 1e999}', "event", id="number out of range"),
        pytest.param('{"id": "\udead"}', "event", id="str with lone surrogate"),
        pytest.param(b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "data", id="deep"),
    ],
)
def test_structured_rejects_bad_documents(body: bytes | str, attribute: str) -> None:
    raises(attribute, from_structured, body)


def test_oversized_input() -> None:
    padding = "x" * MAX_EVENT_SIZE
    body = msgspec.json.encode({**VALID, "data": padding})
    error = raises("data", from_structured, body)
    assert str(error).endswith("exceeds 1 MiB")
    headers, binary_body = to_binary(Event(id="1", source="/s", type="t", data=padding))
    assert str(raises("data", from_binary, headers, binary_body)).endswith("exceeds 1 MiB")
    assert str(raises("data", from_http, headers, binary_body)).endswith("exceeds 1 MiB")
    small = msgspec.json.encode({**VALID, "data": "x" * 2000})
    assert str(raises("data", from_structured, small, max_size=1024)).endswith("exceeds 1 KiB")
    assert from_structured(small, max_size=len(small)).data == "x" * 2000
    exact = msgspec.json.encode({**VALID, "data": "x" * 100})
    assert from_structured(exact, max_size=len(exact)).data == "x" * 100


def test_deeply_nested_json_in_binary_mode() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t",
               "content-type": "application/json"}  # fmt: skip
    raises("data", from_binary, headers, b"[" * 50_000 + b"]" * 50_000)
    nested: list[Any] = []
    for _ in range(50_000):
        nested = [nested]
    raises("data", to_structured, Event(id="1", source="/s", type="t", data=nested))
    raises("data", to_binary, Event(id="1", source="/s", type="t", data=nested))


BINARY = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}

BINARY_CASES: list[tuple[str, dict[str, Any], bytes, str]] = [
    ("missing ce-specversion", {"ce-specversion": WITHOUT}, b"", "specversion"),
    ("missing ce-id", {"ce-id": WITHOUT}, b"", "id"),
    ("missing ce-source", {"ce-source": WITHOUT}, b"", "source"),
    ("missing ce-type", {"ce-type": WITHOUT}, b"", "type"),
    ("empty ce-id", {"ce-id": ""}, b"", "id"),
    ("empty ce-type after decoding", {"ce-type": '""'}, b"", "type"),
    ("specversion 0.3", {"ce-specversion": "0.3"}, b"", "specversion"),
    ("ce-datacontenttype", {"ce-datacontenttype": "application/json"}, b"", "datacontenttype"),
    ("ce-data", {"ce-data": "x"}, b"", "data"),
    ("ce-data_base64", {"ce-data_base64": "AAEC"}, b"", "data_base64"),
    ("underscore extension", {"ce-my_ext": "v"}, b"", "my_ext"),
    ("21-char extension", {"ce-" + "b" * 21: "v"}, b"", "b" * 21),
    ("empty extension name", {"ce-": "v"}, b"", ""),
    ("non-ascii header name", {"ce-\u212a": "v"}, b"", "\u212a"),
    ("bare percent", {"ce-subject": "100%"}, b"", "subject"),
    ("bad percent escape", {"ce-subject": "a%zzb"}, b"", "subject"),
    ("overlong utf-8", {"ce-subject": "a%C0%A0b"}, b"", "subject"),
    ("encoded surrogate", {"ce-subject": "%ED%A0%80"}, b"", "subject"),
    ("truncated utf-8", {"ce-partitionkey": "%E2%82"}, b"", "partitionkey"),
    ("raw non-ascii", {"ce-subject": "café"}, b"", "subject"),
    ("encoded newline", {"ce-subject": "a%0D%0Ab"}, b"", "subject"),
    ("encoded nul in extension", {"ce-traceparent": "%00"}, b"", "traceparent"),
    ("unterminated quoted-string", {"ce-subject": '"abc'}, b"", "subject"),
    ("bad time", {"ce-time": "not a time"}, b"", "time"),
    ("relative dataschema", {"ce-dataschema": "schema.json"}, b"", "dataschema"),
    ("header value not text", {"ce-attempt": 5}, b"", "attempt"),
    ("content-type not a media type", {"content-type": "json"}, b"{}", "datacontenttype"),
    ("empty content-type", {"content-type": ""}, b"{}", "datacontenttype"),
    ("json type, non-json body", {"content-type": "application/json"}, b"{nope", "data"),
    ("json suffix type, non-json body", {"content-type": "application/x+json"}, b"1 2", "data"),
    ("implied json, non-json body", {}, b"raw bytes", "data"),
    ("json type, not utf-8", {"content-type": "application/json"}, b'"\xff"', "data"),
    ("text, not utf-8", {"content-type": "text/plain"}, b"caf\xe9", "data"),
    ("unknown charset", {"content-type": "text/plain; charset=klingon"}, b"x", "datacontenttype"),
    ("non-text codec", {"content-type": "text/plain; charset=zlib"}, b"x", "datacontenttype"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "body", "attribute"),
    [pytest.param(c, b, a, id=name) for name, c, b, a in BINARY_CASES],
)
def test_binary_rejects(changes: dict[str, Any], body: bytes, attribute: str) -> None:
    headers = {k: v for k, v in {**BINARY, **changes}.items() if v is not WITHOUT}
    raises(attribute, from_binary, headers, body)
    raises(attribute, from_http, headers, body)


def test_binary_rejects_duplicate_headers() -> None:
    raises("id", from_binary, [*BINARY.items(), ("CE-ID", "2")], b"")
    pairs = [*BINARY.items(), ("content-type", "text/plain"), ("Content-Type", "text/html")]
    raises("datacontenttype", from_binary, pairs, b"x")


def test_http_mode_selection() -> None:
    event = Event(id="1", source="/s", type="t", data={"a": 1})
    body = to_structured(event)
    for ct in [JSON_EVENT_FORMAT, "Application/CloudEvents+JSON; charset=UTF-8"]:
        assert from_http({"Content-Type": ct, **BINARY, "ce-id": "ignored"}, body) == event
    raises("event", from_http, {"content-type": "application/cloudevents+avro"}, body)
    raises("event", from_http, {"content-type": JSON_BATCH_FORMAT}, b"[" + body + b"]")
    raises("specversion", from_http, {"content-type": "application/json"}, body)  # binary mode


@pytest.mark.parametrize(
    ("event", "attribute"),
    [
        pytest.param(Event(id="", source="/s", type="t"), "id", id="empty id"),
        pytest.param(Event(id="1", source="", type="t"), "source", id="empty source"),
        pytest.param(Event(id="1", source="/s", type=""), "type", id="empty type"),
        pytest.param(Event(id=5, source="/s", type="t"), "id", id="int id"),  # type: ignore[arg-type]
        pytest.param(Event(id="1", source="/s", type="t", specversion="0.3"), "specversion",
                     id="specversion"),
        pytest.param(Event(id="1", source="/s", type="t", subject=""), "subject", id="subject"),
        pytest.param(Event(id="1", source="/s", type="t", dataschema="x"), "dataschema",
                     id="dataschema"),
        pytest.param(Event(id="1", source="/s", type="t", datacontenttype="json"),
                     "datacontenttype", id="datacontenttype"),
        pytest.param(Event(id="1", source="/s", type="t", time=datetime(2024, 1, 1)), "time",
                     id="naive time"),
        pytest.param(Event(id="1", source="/s", type="t", time="2024-01-01T00:00:00Z"),  # type: ignore[arg-type]
                     "time", id="time as text"),
        pytest.param(Event(id="1", source="/s", type="t", time=datetime(
            2024, 1, 1, tzinfo=timezone(timedelta(seconds=90)))), "time", id="offset seconds"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"PartitionKey": "k"}),
                     "PartitionKey", id="uppercase extension"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"x" * 21: "k"}),
                     "x" * 21, id="long extension"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"data": "k"}), "data",
                     id="reserved data"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"data_base64": "k"}),
                     "data_base64", id="reserved data_base64"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"subject": "k"}),
                     "subject", id="core attribute as extension"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"ratio": 0.5}), "ratio",
                     id="float value"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"n": None}), "n",  # type: ignore[dict-item]
                     id="None value"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"n": 2**40}), "n",
                     id="int64 value"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"b": b"x"}), "b",  # type: ignore[dict-item]
                     id="bytes value"),
        pytest.param(Event(id="1", source="/s", type="t", extensions={"k": "a\r\nb"}), "k",
                     id="CRLF in value"),
    ],
)  # fmt: skip
def test_validate_rejects(event: Event, attribute: str) -> None:
    raises(attribute, validate, event)
    raises(attribute, to_structured, event)
    raises(attribute, to_binary, event)


def test_encoders_reject_unencodable_data() -> None:
    def event(data: Any, ct: str | None = None) -> Event:
        return Event(id="1", source="/s", type="t", data=data, datacontenttype=ct)

    raises("data", to_structured, event(object()))
    raises("data", to_binary, event({1, object()}))
    raises("data", to_structured, event({"a": 1}, "text/plain"))  # not JSON: str or bytes
    raises("data", to_binary, event({"a": 1}, "text/plain"))
    raises("data", to_binary, event("naïve", "text/plain; charset=ascii"))
    raises("data", to_structured, event("\udead"))
    raises("datacontenttype", to_binary, event("x", "text/plain; charset=klingon"))
    validate(event(object()))  # validate() leaves data to the encoders


def test_accepted_events_are_valid() -> None:
    doc = {**VALID, "datacontenttype": "application/xml; charset=utf-8", "data": "<a/>",
           "partitionkey": "k", "n": -(2**31), "b": False, "unset": None}  # fmt: skip
    event = from_structured(msgspec.json.encode(doc))
    validate(event)
    assert event.extensions == {"partitionkey": "k", "n": -(2**31), "b": False}
    assert from_structured(to_structured(event)) == event
    b64 = from_structured(msgspec.json.encode({**VALID, "data_base64": base64.b64encode(b"")}))
    assert b64.data == b""


# -- fuzzing: nothing but InvalidEvent escapes -------------------------------------------

ATTRIBUTE_KEYS = st.sampled_from(
    ["specversion", "id", "source", "type", "subject", "time", "dataschema", "datacontenttype",
     "data", "data_base64", "partitionkey", "Bad_Name", ""]
)  # fmt: skip
FUZZ = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])


def check_accepted(event: Event) -> None:
    """Whatever a decoder accepts is a valid event that can be written back out."""
    validate(event)
    assert from_structured(to_structured(event)) == event
    try:
        to_binary(event)
    except InvalidEvent:  # e.g. text that the declared charset cannot encode
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_invalid_event(body: bytes) -> None:
    for decode in (
        from_structured,
        lambda b: from_http({"content-type": JSON_BATCH_FORMAT}, b),
        lambda b: from_http_batch({"content-type": JSON_BATCH_FORMAT}, b),
        lambda b: from_binary({**BINARY, "content-type": "application/json"}, b),
        lambda b: from_binary({**BINARY, "content-type": "text/plain"}, b),
    ):
        try:
            result = decode(body)
        except InvalidEvent:
            continue
        for event in result if isinstance(result, list) else [result]:
            check_accepted(event)


@FUZZ
@given(
    st.dictionaries(ATTRIBUTE_KEYS | st.text(max_size=8), json_values | ce_text, max_size=10),
    st.just(VALID),
)
def test_random_documents_only_raise_invalid_event(doc: dict[str, Any], base: dict) -> None:
    for candidate in (doc, {**base, **doc}):
        try:
            event = from_structured(msgspec.json.encode(candidate))
        except InvalidEvent:
            continue
        check_accepted(event)


header_names = st.sampled_from(
    ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-subject",
     "ce-dataschema", "ce-datacontenttype", "ce-partitionkey", "Content-Type", "CE-ID",
     "ce-data", "ce-", "x-other"]
) | st.text(max_size=10).map(lambda s: "ce-" + s)  # fmt: skip
header_values = st.sampled_from(
    ["1.0", "0.3", "application/json", "text/plain; charset=latin-1", "application/xml",
     "2024-05-01T12:00:00Z", "%", "%C3%A9", '"q"', ""]
) | st.text(max_size=12)  # fmt: skip


@FUZZ
@given(
    st.lists(st.tuples(header_names, header_values), max_size=8),
    st.booleans(),
    st.binary(max_size=64) | st.sampled_from([b"", b"{}", b'"s"', b"[1, 2]", b"null"]),
)
def test_random_headers_only_raise_invalid_event(
    pairs: list[tuple[str, str]], with_required: bool, body: bytes
) -> None:
    headers = [*BINARY.items(), *pairs] if with_required else pairs
    try:
        event = from_http(headers, body)
    except InvalidEvent:
        return
    check_accepted(event)
