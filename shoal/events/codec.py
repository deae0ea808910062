"""CloudEvents 1.0 on the wire: the JSON event format and the HTTP binary binding, strictly.

Everything that turns bytes into an ``Event`` checks the envelope against the CloudEvents
1.0.2 core spec, the JSON event format and the HTTP protocol binding, and raises
``InvalidEvent(attribute, message)`` naming the offending attribute; nothing else escapes
(no ``KeyError``, ``UnicodeDecodeError``, ``RecursionError``...). Problems with the input as
a whole (not JSON, not an object, not UTF-8) name the attribute ``"event"``
(``WHOLE_EVENT``); an oversized input names ``"data"``.

Decisions, where the spec leaves room (Shoal picks the strict reading and says so):

- Extension values are String, Integer (signed 32-bit) or Boolean. In JSON, ``null`` means
  unset (JSON format 2.2) and is dropped; numbers with a fraction or exponent, integers out
  of the 32-bit range, arrays and objects are rejected, never coerced: coercing ``1.0`` or
  ``{"a": 1}`` to a string would silently change what the producer meant.
- HTTP headers carry only canonical strings, so binary mode delivers every extension value
  as ``str`` (``5`` arrives as ``"5"``, ``True`` as ``"true"``). No type is guessed back:
  guessing would turn a string extension ``"00123"`` into the integer ``123``.
- String attributes may not hold control characters, Unicode noncharacters or lone
  surrogates (spec "Type System"); ``id``, ``source``, ``type``, ``subject``,
  ``dataschema`` and ``datacontenttype`` may not be empty; ``dataschema`` must be an
  absolute URI (it has a scheme); ``datacontenttype`` must be an RFC 2046 media type
  (ASCII, so it can be sent as ``Content-Type`` unencoded); ``source`` is any non-empty
  string (real producers use non-URI sources). ``time`` must be RFC 3339 with an offset
  (``T``/``Z`` in either case, any number of fraction digits, kept to microseconds); leap
  seconds are rejected because ``datetime`` cannot hold them.
- ``data`` with a JSON ``datacontenttype`` (absent, ``*/json``, ``*/*+json``) is any JSON
  value; with another content type it must be a string (or ``bytes``, sent as
  ``data_base64`` / a raw body). ``data: null`` and an absent ``data`` are the same
  (``Event.data is None``), as are an empty binary-mode body and no data.
- Binary mode: a body without ``Content-Type`` is read as JSON, the type CloudEvents
  implies when ``datacontenttype`` is unset (as both CloudEvents Python SDKs send it), and
  ``datacontenttype`` stays unset; ``text/*`` or any type with a ``charset`` gives ``str``;
  other non-JSON types give ``bytes``. ``to_binary`` always sends a ``Content-Type`` with
  data: the event's ``datacontenttype``, else ``application/json`` (the implied type, made
  explicit as JSON format 3.1.2 asks) or ``application/octet-stream`` for ``bytes`` data;
  decoding then shows that type explicitly. Header values are percent-encoded
  exactly as the HTTP binding 3.1.3.2 says; on receipt, double-quoted strings are
  unescaped, then one round of percent-decoding must give valid UTF-8; raw non-ASCII,
  malformed ``%`` escapes and a ``ce-datacontenttype`` header are rejected.
- Duplicate JSON keys: the last one wins (as in every mainstream JSON parser); duplicate
  HTTP headers for the same attribute are rejected.
- JSON nested deeper than the interpreter's recursion limit (about 1000 levels) is
  rejected (attribute ``data``): msgspec recurses, and a hostile body must not crash us.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import msgspec

from shoal.errors import InvalidEvent
from shoal.events.event import SPECVERSION, Event, ExtensionValue

__all__ = [
    "JSON_BATCH_FORMAT",
    "JSON_EVENT_FORMAT",
    "MAX_EVENT_SIZE",
    "WHOLE_EVENT",
    "from_binary",
    "from_http",
    "from_http_batch",
    "from_structured",
    "to_binary",
    "to_structured",
    "validate",
]

JSON_EVENT_FORMAT = "application/cloudevents+json"
JSON_BATCH_FORMAT = "application/cloudevents-batch+json"
MAX_EVENT_SIZE = 1 << 20  # 1 MiB, the default ``max_size`` of every decoder
WHOLE_EVENT = "event"  # the ``attribute`` of errors about the input as a whole

Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]

_REQUIRED = ("id", "source", "type")
_OPTIONAL = ("datacontenttype", "dataschema", "subject", "time")
_CORE = frozenset(("specversion", *_REQUIRED, *_OPTIONAL))
_RESERVED = frozenset(("data", "data_base64"))
_INT32 = range(-(2**31), 2**31)

_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
_NONCHARACTERS = "".join(chr(p + c) for p in range(0, 0x110000, 0x10000) for c in (0xFFFE, 0xFFFF))
_DISALLOWED = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef" + re.escape(_NONCHARACTERS) + "]"
)
_TCHAR = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED_VALUE = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e]|\\[\t \x21-\x7e])*"'  # RFC 7230 quoted-string
_MEDIA_TYPE = re.compile(
    rf"({_TCHAR})/({_TCHAR})((?:[ \t]*;[ \t]*{_TCHAR}=(?:{_TCHAR}|{_QUOTED_VALUE}))*)[ \t]*"
)
_PARAMETER = re.compile(rf"({_TCHAR})=({_TCHAR}|\"(?:[^\"\\]|\\.)*\")")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
# printable ASCII except space, '"' and '%' goes into a header as is (HTTP binding 3.1.3.2)
_HEADER_SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in '"%')
_HEADER_VERBATIM = re.compile(r"[!#$&-~]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUOTED_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_QUOTED_PAIR = re.compile(r"\\(.)")

_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder()


# -- validation helpers ------------------------------------------------------------------


def _show(value: object, limit: int = 60) -> str:
    """``repr`` of a value, cut short so hostile input cannot flood an error message."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _name(name: object) -> str:
    """An attribute name fit for ``InvalidEvent.attribute`` (long hostile names are cut)."""
    s = name if isinstance(name, str) else repr(name)
    return s if len(s) <= 64 else s[:61] + "..."


def _check_string(name: str, value: object, *, empty_ok: bool = False) -> str:
    """A CloudEvents String: a ``str`` without control characters or noncharacters."""
    if not isinstance(value, str):
        raise InvalidEvent(name, f"must be a string, got {type(value).__name__} {_show(value)}")
    if not value and not empty_ok:
        raise InvalidEvent(name, "must not be empty")
    if value.isprintable():  # fast path: no Cc, Cs or Cn (noncharacters are Cn)
        return value
    bad = _DISALLOWED.search(value)
    if bad is not None:
        raise InvalidEvent(
            name,
            f"contains the disallowed character U+{ord(bad.group()):04X} at index {bad.start()}"
            " (control characters, noncharacters and lone surrogates are not allowed)",
        )
    return value


@functools.lru_cache(maxsize=256)
def _media_type(value: str) -> tuple[str, str | None]:
    """``(type/subtype lower-cased, charset or None)`` of an RFC 2046 media type."""
    m = _MEDIA_TYPE.fullmatch(value)
    if m is None:
        raise InvalidEvent(
            "datacontenttype",
            f"{_show(value)} is not a media type like 'application/json; charset=utf-8'",
        )
    charset = None
    for key, val in _PARAMETER.findall(m.group(3)):
        if key.lower() == "charset":
            charset = _QUOTED_PAIR.sub(r"\1", val[1:-1]) if val.startswith('"') else val
    return f"{m.group(1)}/{m.group(2)}".lower(), charset


def _is_json(essence: str) -> bool:
    """Whether a media type (without parameters) declares JSON: ``*/json`` or ``*/*+json``."""
    subtype = essence.partition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


def _json_content(datacontenttype: str | None) -> bool:
    """Whether data with this ``datacontenttype`` is JSON (absent means application/json)."""
    return datacontenttype is None or _is_json(_media_type(datacontenttype)[0])


def _check_optional(name: str, value: object) -> str | None:
    """An optional String attribute: None (unset) or a valid non-empty string."""
    if value is None:
        return None
    s = _check_string(name, value)
    if name == "datacontenttype":
        _media_type(s)
    elif name == "dataschema" and _SCHEME.match(s) is None:
        raise InvalidEvent(name, f"must be an absolute URI (with a scheme), got {_show(s)}")
    return s


def _check_extension_name(name: object) -> str:
    """An extension name: 1-20 of a-z0-9, neither reserved nor a core attribute."""
    if name in _RESERVED:
        raise InvalidEvent(str(name), "is reserved by CloudEvents and cannot be an extension")
    if name in _CORE:
        raise InvalidEvent(str(name), f"is a core attribute; set Event.{name}, not an extension")
    if not isinstance(name, str) or _EXTENSION_NAME.fullmatch(name) is None:
        raise InvalidEvent(
            _name(name), "extension names must be 1 to 20 characters, each a-z or 0-9"
        )
    return name


def _check_extension_value(name: str, value: object) -> ExtensionValue:
    """An extension value: String, Boolean, or Integer in the signed 32-bit range."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value not in _INT32:
            raise InvalidEvent(
                name, f"integer {_show(value)} is outside the CloudEvents 32-bit Integer range"
            )
        return value
    if isinstance(value, str):
        return _check_string(name, value, empty_ok=True)
    if isinstance(value, float):
        raise InvalidEvent(
            name, f"CloudEvents integers have no fraction or exponent, got {_show(value)}"
        )
    raise InvalidEvent(
        name,
        f"extension values must be a string, integer or boolean, got {type(value).__name__}",
    )


def check_extensions(extensions: Mapping[str, object]) -> dict[str, ExtensionValue]:
    """Extension attributes as CloudEvents allows them, else ``InvalidEvent`` naming one."""
    return {
        _check_extension_name(name): _check_extension_value(name, value)
        for name, value in extensions.items()
    }


def _parse_time(value: object) -> datetime:
    """An RFC 3339 timestamp, as a timezone-aware ``datetime``."""
    if not isinstance(value, str):
        raise InvalidEvent("time", f"must be an RFC 3339 string, got {type(value).__name__}")
    m = _RFC3339.fullmatch(value)
    if m is not None:
        try:  # fast for what it accepts, now that the grammar is known to be RFC 3339
            return datetime.fromisoformat(value)
        except ValueError:
            pass  # lower-case t/z, or an invalid field: parse by hand for a precise error
        year, month, day, hour, minute, second, fraction, sign, oh, om = m.groups()
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        try:
            tz = UTC
            if sign is not None:
                if int(oh) > 23 or int(om) > 59:
                    raise ValueError("offset out of range")
                offset = timedelta(hours=int(oh), minutes=int(om))
                tz = timezone(-offset if sign == "-" else offset)
            return datetime(
                int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tz
            )
        except ValueError as exc:
            raise InvalidEvent("time", f"{_show(value)} is not a valid timestamp: {exc}") from None
    raise InvalidEvent(
        "time", f"{_show(value)} is not an RFC 3339 timestamp like '2024-05-01T12:00:00Z'"
    )


def _check_time(value: object) -> datetime | None:
    """``Event.time``: None, or an aware ``datetime`` whose offset is whole minutes."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidEvent("time", f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is UTC:
        return value
    offset = value.utcoffset()
    if offset is None:
        raise InvalidEvent("time", "must be timezone-aware (RFC 3339 needs an offset)")
    if offset % timedelta(minutes=1):
        raise InvalidEvent("time", f"RFC 3339 offsets are whole minutes, got {offset}")
    return value


def _format_time(value: datetime) -> str:
    """RFC 3339 text of an aware ``datetime`` (``Z`` for UTC), as in the JSON format."""
    return _json_encoder.encode(value)[1:-1].decode()


def _check_size(size: int, max_size: int) -> None:
    if size > max_size:
        raise InvalidEvent("data", f"event of {size} bytes exceeds {_format_size(max_size)}")


def _format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _as_bytes(body: bytes | bytearray | memoryview | str) -> bytes | bytearray | memoryview:
    if isinstance(body, str):
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEvent(WHOLE_EVENT, f"is not valid Unicode text: {exc.reason}") from None
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise InvalidEvent(WHOLE_EVENT, f"body must be bytes or str, got {type(body).__name__}")
    return body


def _decode_json(raw: bytes | bytearray | memoryview, what: str) -> Any:
    """Any JSON value, or InvalidEvent naming ``what`` (the whole event, or its data)."""
    try:
        return _json_decoder.decode(raw)
    except RecursionError:
        raise InvalidEvent("data", "JSON is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise InvalidEvent(what, f"is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(what, f"is not valid JSON: {exc}") from None


def _encode_json(value: Any) -> bytes:
    try:
        return _json_encoder.encode(value)
    except RecursionError:
        raise InvalidEvent("data", "is nested too deeply to encode as JSON") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidEvent("data", f"cannot be encoded as JSON: {exc}") from None


# -- validation of events built in code --------------------------------------------------


def validate(event: Event) -> None:
    """Check an ``Event`` built in code: specversion, required and optional attributes,
    extension names and values (``data`` is checked when it is encoded)."""
    if event.specversion != SPECVERSION:
        raise InvalidEvent(
            "specversion",
            f"only CloudEvents {SPECVERSION} is supported, got {_show(event.specversion)}",
        )
    _check_string("id", event.id)
    _check_string("source", event.source)
    _check_string("type", event.type)
    _check_optional("datacontenttype", event.datacontenttype)
    _check_optional("dataschema", event.dataschema)
    _check_optional("subject", event.subject)
    _check_time(event.time)
    if not isinstance(event.extensions, dict):
        raise InvalidEvent("extensions", f"must be a dict, got {type(event.extensions).__name__}")
    for name, value in event.extensions.items():
        _check_extension_value(_check_extension_name(name), value)


# -- structured content mode (JSON event format) -----------------------------------------


def _to_document(event: Event) -> dict[str, Any]:
    """The JSON-format object of a validated event (``data`` not yet encoded to bytes)."""
    doc: dict[str, Any] = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type,
    }
    if event.datacontenttype is not None:
        doc["datacontenttype"] = event.datacontenttype
    if event.dataschema is not None:
        doc["dataschema"] = event.dataschema
    if event.subject is not None:
        doc["subject"] = event.subject
    if event.time is not None:
        doc["time"] = event.time
    doc.update(event.extensions)
    data = event.data
    if data is not None:
        if isinstance(data, (bytes, bytearray, memoryview)):
            doc["data_base64"] = base64.b64encode(data).decode("ascii")
        elif isinstance(data, str) or _json_content(event.datacontenttype):
            doc["data"] = data
        else:
            raise InvalidEvent(
                "data",
                f"datacontenttype {event.datacontenttype!r} is not JSON, so data must be str or"
                f" bytes, got {type(data).__name__}",
            )
    return doc


def to_structured(event: Event) -> bytes:
    """The event as ``application/cloudevents+json`` (JSON structured content mode)."""
    validate(event)
    return _encode_json(_to_document(event))


def _required(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if value is None:
        raise InvalidEvent(name, "missing required attribute")
    return _check_string(name, value)


def _from_document(doc: Any) -> Event:
    """An ``Event`` from one decoded JSON-format object, checked attribute by attribute."""
    if not isinstance(doc, dict):
        raise InvalidEvent(WHOLE_EVENT, f"must be a JSON object, got {type(doc).__name__}")
    specversion = _required(doc, "specversion")
    if specversion != SPECVERSION:
        raise InvalidEvent(
            "specversion", f"only CloudEvents {SPECVERSION} is supported, got {_show(specversion)}"
        )
    id_, source, type_ = (_required(doc, name) for name in _REQUIRED)
    datacontenttype = _check_optional("datacontenttype", doc.get("datacontenttype"))
    dataschema = _check_optional("dataschema", doc.get("dataschema"))
    subject = _check_optional("subject", doc.get("subject"))
    raw_time = doc.get("time")
    time = None if raw_time is None else _parse_time(raw_time)

    data = doc.get("data")
    data_base64 = doc.get("data_base64")
    if data_base64 is not None:
        if data is not None:
            raise InvalidEvent("data", "data and data_base64 are mutually exclusive; give one")
        if not isinstance(data_base64, str):
            raise InvalidEvent(
                "data_base64", f"must be a base64 string, got {type(data_base64).__name__}"
            )
        try:
            data = binascii.a2b_base64(data_base64, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidEvent("data_base64", f"is not valid base64 (RFC 4648): {exc}") from None
    elif data is not None and not isinstance(data, str) and not _json_content(datacontenttype):
        raise InvalidEvent(
            "data",
            f"datacontenttype {datacontenttype!r} is not JSON, so data must be a string"
            f" (or data_base64), got {type(data).__name__}",
        )

    extensions: dict[str, ExtensionValue] = {}
    for name, value in doc.items():
        if name in _CORE or name in _RESERVED:
            continue
        _check_extension_name(name)
        if value is not None:  # null means unset (JSON format 2.2)
            extensions[name] = _check_extension_value(name, value)
    return Event(
        id=id_, source=source, type=type_, specversion=specversion,
        datacontenttype=datacontenttype, dataschema=dataschema, subject=subject,
        time=time, data=data, extensions=extensions,
    )  # fmt: skip


def from_structured(
    body: bytes | bytearray | memoryview | str, *, max_size: int = MAX_EVENT_SIZE
) -> Event:
    """Parse and check one ``application/cloudevents+json`` event."""
    raw = _as_bytes(body)
    _check_size(len(raw), max_size)
    return _from_document(_decode_json(raw, WHOLE_EVENT))


# -- binary content mode (HTTP binding) --------------------------------------------------


def _encode_header(value: str) -> str:
    """Percent-encode a header value as the CloudEvents HTTP binding 3.1.3.2 says."""
    if _HEADER_VERBATIM.fullmatch(value):
        return value
    return quote(value, safe=_HEADER_SAFE)


def _decode_header(attr: str, raw: object) -> str:
    """Unquote (RFC 7230 quoted-string), then percent-decode once to valid UTF-8."""
    if type(raw) is str and _HEADER_VERBATIM.fullmatch(raw):
        return raw  # the common case: nothing to unquote or decode
    name = _name(attr)
    value = _header_text(name, raw).strip(" \t")
    if not value.isascii():
        raise InvalidEvent(
            name, "header values must be ASCII; percent-encode other characters as UTF-8"
        )
    if value.startswith('"'):
        m = _QUOTED_STRING.fullmatch(value)
        if m is None:
            raise InvalidEvent(name, f"malformed quoted-string header value {_show(value)}")
        value = _QUOTED_PAIR.sub(r"\1", m.group(1))
    if "%" in value:
        if _BAD_PERCENT.search(value):
            raise InvalidEvent(name, f"malformed percent-encoding in {_show(value)}")
        try:
            value = unquote_to_bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent(name, "percent-encoded bytes are not valid UTF-8") from None
    return value


def _header_items(headers: Headers) -> Iterable[tuple[object, object]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def _header_text(name: str, value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1")
    if not isinstance(value, str):
        raise InvalidEvent(name, f"HTTP headers must be strings, got {type(value).__name__}")
    return value


def _extension_header(value: ExtensionValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _encode_header(value)


def to_binary(event: Event) -> tuple[dict[str, str], bytes]:
    """``(headers, body)`` of the event in HTTP binary content mode (``ce-*`` headers)."""
    validate(event)
    headers = {
        "ce-specversion": event.specversion,
        "ce-id": _encode_header(event.id),
        "ce-source": _encode_header(event.source),
        "ce-type": _encode_header(event.type),
    }
    if event.dataschema is not None:
        headers["ce-dataschema"] = _encode_header(event.dataschema)
    if event.subject is not None:
        headers["ce-subject"] = _encode_header(event.subject)
    if event.time is not None:
        headers["ce-time"] = _format_time(event.time)
    for name, value in event.extensions.items():
        headers["ce-" + name] = _extension_header(value)

    content_type = event.datacontenttype
    data = event.data
    if data is None:
        body = b""
    elif isinstance(data, (bytes, bytearray, memoryview)):
        body = bytes(data)
        if content_type is None:
            content_type = "application/octet-stream"  # not the implied application/json
    else:
        if content_type is None:
            content_type = "application/json"  # the implied type, made explicit
        essence, charset = _media_type(content_type)
        if _is_json(essence):
            body = _encode_json(data)
        elif isinstance(data, str):
            body = _encode_text(data, charset)
        else:
            raise InvalidEvent(
                "data",
                f"datacontenttype {content_type!r} is not JSON, so data must be str or bytes,"
                f" got {type(data).__name__}",
            )
    if content_type is not None:
        headers["content-type"] = content_type
    return headers, body


def _encode_text(text: str, charset: str | None) -> bytes:
    try:
        return text.encode(charset or "utf-8")
    except LookupError:
        raise InvalidEvent("datacontenttype", f"unknown charset {_show(charset)}") from None
    except ValueError as exc:
        raise InvalidEvent("data", f"cannot be encoded as {charset or 'utf-8'}: {exc}") from None


def _decode_text(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8")
    except LookupError:
        raise InvalidEvent("datacontenttype", f"unknown charset {_show(charset)}") from None
    except ValueError as exc:
        raise InvalidEvent("data", f"is not valid {charset or 'utf-8'} text: {exc}") from None


def _decode_body(body: bytes, content_type: str | None) -> Any:
    """The event data of a binary-mode body, per its ``Content-Type``."""
    if not body:
        return None
    if content_type is None:
        return _decode_json(body, "data")  # an unset datacontenttype means application/json
    essence, charset = _media_type(content_type)
    if _is_json(essence):
        return _decode_json(body, "data")
    if essence.startswith("text/") or charset is not None:
        return _decode_text(body, charset)
    return body


def from_binary(
    headers: Headers, body: bytes | bytearray | memoryview, *, max_size: int = MAX_EVENT_SIZE
) -> Event:
    """Parse and check an event in HTTP binary content mode (header names in any case)."""
    raw_body = bytes(_as_bytes(body))
    _check_size(len(raw_body), max_size)
    values: dict[str, str] = {}
    content_type: str | None = None
    for raw_name, raw_value in _header_items(headers):
        name = raw_name if type(raw_name) is str else _header_text(WHOLE_EVENT, raw_name)
        lower = name.lower()
        if lower.startswith("ce-"):
            attr = lower[3:] if name.isascii() else name[3:]
            if attr in values:
                raise InvalidEvent(_name(attr), f"more than one ce-{attr} header")
            values[attr] = _decode_header(attr, raw_value)
        elif lower == "content-type":
            if content_type is not None:
                raise InvalidEvent("datacontenttype", "more than one Content-Type header")
            content_type = _header_text("datacontenttype", raw_value).strip(" \t")

    if "datacontenttype" in values:
        raise InvalidEvent(
            "datacontenttype",
            "binary mode carries it as Content-Type; ce-datacontenttype is not allowed",
        )
    for name in ("specversion", *_REQUIRED):
        if name not in values:
            raise InvalidEvent(name, f"missing required attribute (header ce-{name})")
    specversion = values["specversion"]
    if specversion != SPECVERSION:
        raise InvalidEvent(
            "specversion", f"only CloudEvents {SPECVERSION} is supported, got {_show(specversion)}"
        )
    id_ = _check_string("id", values["id"])
    source = _check_string("source", values["source"])
    type_ = _check_string("type", values["type"])
    datacontenttype = _check_optional("datacontenttype", content_type)
    dataschema = _check_optional("dataschema", values.get("dataschema"))
    subject = _check_optional("subject", values.get("subject"))
    time = _parse_time(values["time"]) if "time" in values else None
    extensions: dict[str, ExtensionValue] = {}
    for name, value in values.items():
        if name not in _CORE:
            extensions[_check_extension_name(name)] = _check_string(name, value, empty_ok=True)
    return Event(
        id=id_, source=source, type=type_, specversion=specversion,
        datacontenttype=datacontenttype, dataschema=dataschema, subject=subject,
        time=time, data=_decode_body(raw_body, datacontenttype), extensions=extensions,
    )  # fmt: skip


# -- HTTP: picking the content mode ------------------------------------------------------


def _content_mode(headers: Headers) -> str:
    """``"structured"``, ``"batch"`` or ``"binary"``, from the Content-Type header."""
    for name, value in _header_items(headers):
        if isinstance(name, (bytes, bytearray)):
            name = name.decode("latin-1")
        if isinstance(name, str) and name.lower() == "content-type":
            if isinstance(value, (bytes, bytearray)):
                value = value.decode("latin-1")
            if not isinstance(value, str):
                return "binary"  # from_binary reports the bad header
            essence = value.partition(";")[0].strip(" \t").lower()
            if essence == JSON_EVENT_FORMAT:
                return "structured"
            if essence == JSON_BATCH_FORMAT:
                return "batch"
            if essence.startswith("application/cloudevents"):
                raise InvalidEvent(
                    WHOLE_EVENT,
                    f"unsupported event format {essence!r}; Shoal reads {JSON_EVENT_FORMAT},"
                    f" {JSON_BATCH_FORMAT} and binary mode",
                )
            return "binary"
    return "binary"


def from_http(
    headers: Headers, body: bytes | bytearray | memoryview, *, max_size: int = MAX_EVENT_SIZE
) -> Event:
    """One event from an HTTP message: structured mode if Content-Type says
    ``application/cloudevents+json``, binary mode otherwise; batches are refused."""
    if not isinstance(headers, Mapping):
        headers = list(headers)  # read twice: for the mode, then by from_binary
    mode = _content_mode(headers)
    if mode == "structured":
        return from_structured(body, max_size=max_size)
    if mode == "batch":
        raise InvalidEvent(
            WHOLE_EVENT,
            f"a batch ({JSON_BATCH_FORMAT}) holds several events; read it with from_http_batch",
        )
    return from_binary(headers, body, max_size=max_size)


def from_http_batch(
    headers: Headers, body: bytes | bytearray | memoryview, *, max_size: int = MAX_EVENT_SIZE
) -> list[Event]:
    """The events of an HTTP message: all of a JSON batch, or the one event of any other
    mode. ``max_size`` bounds the whole body."""
    if not isinstance(headers, Mapping):
        headers = list(headers)
    if _content_mode(headers) != "batch":
        return [from_http(headers, body, max_size=max_size)]
    raw = _as_bytes(body)
    _check_size(len(raw), max_size)
    docs = _decode_json(raw, WHOLE_EVENT)
    if not isinstance(docs, list):
        raise InvalidEvent(WHOLE_EVENT, f"a batch must be a JSON array, got {type(docs).__name__}")
    events = []
    for index, doc in enumerate(docs):
        try:
            events.append(_from_document(doc))
        except InvalidEvent as exc:
            message = str(exc)[len(exc.attribute) + 2 :]  # drop the "attribute: " prefix
            raise InvalidEvent(
                exc.attribute, f"in event #{index} of the batch: {message}"
            ) from None
    return events
