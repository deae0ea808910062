"""The gateway's routing as pure, deterministic logic: no sockets, randomness injected.

``RouteTable.from_config(routes)`` reads the ``gateway.routes:`` list of ``shoal.yaml``
(plain dicts), validates every route (a ``ConfigError`` names the route and the key), and
refuses a route that can never match because an earlier one takes all of its requests.
``RouteTable.match(method, host, path, headers, query)`` returns the first route in
declared order that matches, as a ``RouteMatch``, or None. One route::

    - name: orders-canary
      match:
        host: [shop.example.com, "*.shop.example.com"]
        path: {prefix: /api/orders}        # or {exact: ...}, or {regex: ...}
        methods: [GET, POST]
        headers: {x-canary: "1", x-user: {regex: "[0-9]+"}, x-debug: {present: true}}
        query: {preview: {present: true}}
      rewrite: {prefix: /orders, host: orders.internal}
      headers:
        request: {set: {x-route: canary}, add: {via: shoal}, remove: [x-debug]}
        response: {remove: [server]}
      destinations:
        - {service: orders, subset: {version: v1}, weight: 90}
        - {service: orders, subset: {version: v2}, weight: 10}
      mirror: {service: orders, subset: {version: v3}, percent: 5}
      fault: {delay: {percent: 1, fixed: 250ms}, abort: {percent: 0.1, status: 503}}
      timeout: 2s
      retries: {attempts: 1}

Decisions, written down once:

- **Paths are normalized before matching, and the normalized path is what is forwarded**, so
  the route that matched and the path the service sees never disagree: percent-escapes of
  unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded, other escapes are kept and
  upper-cased (``%2f`` -> ``%2F``, so an encoded ``/`` never splits a segment), then ``.``
  and ``..`` segments are resolved (RFC 3986). Repeated slashes are kept. A path that
  climbs above the root, holds a NUL (raw or ``%00``), a control character, a space or a
  malformed escape, does not start with ``/``, or is longer than ``MAX_PATH`` raises
  ``InvalidPath`` (answer 400, or 414 when too long). Route paths in config are
  normalized the same way; regexes see the normalized path. The query string is not
  normalized; query matchers compare decoded values (``+`` is a space).
- **Prefixes are segment-aware**: ``/api`` matches ``/api`` and ``/api/x``, not ``/apix``;
  a trailing ``/`` in a configured prefix is ignored (``/api/`` is ``/api``).
- **Regexes are anchored** (the whole path, header value or query value must match), at
  most ``MAX_REGEX`` characters, compiled once, and refused when they look catastrophic:
  backreferences, a repeated group that can match the empty string, a repeated group
  whose length varies where the next repetition can start (``(a+)+``, ``(a?a)+``) or
  whose alternatives can start alike (``(x|y|xy)+``) (exponential), and two repeats that
  one run of a character can feed both (``.*/.*x``, ``\\d+\\d+``: polynomial). Possessive
  repeats get no exemption (they still rescan). The checks are conservative and can refuse
  a safe pattern; keeping each repeat within one segment (``[^/]+``) satisfies them.
  Values longer than ``MAX_REGEX_SUBJECT`` never match a regex; with paths limited to
  ``MAX_PATH`` too, an accepted pattern's cost stays bounded.
- **Hosts** compare case-insensitively without the port or a trailing dot;
  ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``, not ``example.com``.
- **Methods** compare exactly (HTTP methods are case-sensitive); config is upper-cased.
- **Headers** named several times in a request are joined with ``", "`` before matching;
  a query parameter given several times is matched on its first value.
  ``{present: false}`` means the header (or parameter) must be absent.
- **Header edits** apply remove, then set (replacing every value), then add. Hop-by-hop
  and framing headers (``content-length``, ``transfer-encoding``, ...) cannot be edited,
  and ``host`` is changed with ``rewrite.host``: an edit must never smuggle a request.
- **Decisions are remembered** by (method, host, path) in a table without header or query
  matchers (at most ``MAX_DECISIONS``, forgotten whole when full): a path seen before is
  not normalized and matched again. Refused paths are refused every time.
- **Policy**: a route's ``timeout`` (short for ``timeouts: {request: ...}``), ``retries``,
  ``circuit_breaker``, ``outlier_detection`` and ``load_balancer`` override the service's
  settings key by key (``merge_policy``); a route naming another load-balancing policy
  replaces the service's ``load_balancer`` section whole, since options belong to a policy.

Overlaps, checked when the table is built (pairwise, in declared order):

- a later route every request of which an earlier route matches too (identical matchers,
  ``/api`` before ``/api/x``, no method list before ``[GET]``, a catch-all before anything)
  is a ``ConfigError`` naming both;
- an earlier route that is narrower than a later one (the usual "specific first": a canary
  header before the plain route) is fine and not reported, nor is one with a narrower path
  and other conditions broader (``/api/users`` for any host before ``*.example.com``
  for any path): a more specific path first is how such a table reads;
- an earlier route that takes *part* of a later one's requests otherwise (``GET /api``
  before ``/api/users``: GETs never reach the later one), or may (regexes, whose languages
  cannot be compared at load time), is reported by ``RouteTable.overlaps()``.

Not detected: a route shadowed only by the union of several earlier routes (``GET`` then
``POST`` then ``[GET, POST]``), or one whose regex can match nothing; regex-against-regex
and regex-against-prefix are compared by their literal prefixes only (so they are either
provably disjoint or reported as "may overlap", never a shadowing error, except against a
catch-all or a prefix the regex's literal prefix lies under). A ``host`` header matcher
is not related to ``match.host``.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
import re
import re._constants as _sre  # the parse tree of a pattern, to refuse catastrophic ones
import re._parser as _sre_parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain
from typing import Any
from urllib.parse import unquote_plus

from shoal.errors import ConfigError, ShoalError
from shoal.mesh.registry import check_service_name
from shoal.mesh.resilience import TrafficPolicy, _suggestion, load_traffic_policy
from shoal.units import parse_duration

MAX_PATH = 8192
"""Longest request path routed (nginx's default buffer for a request line); longer: 414."""
MAX_REGEX = 1024
"""Longest regex accepted in route config."""
MAX_REGEX_SUBJECT = 8192
"""Longest header or query value tested against a regex; a longer one does not match."""
MAX_HEADER_VALUE = 8192
"""Longest header value a route may set or add."""
MAX_DECISIONS = 1024
"""Route decisions remembered per table (by method, host and path); when full, forgotten."""

Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]
"""Request headers: a mapping, or (name, value) pairs as read off the wire."""


class InvalidPath(ShoalError, ValueError):
    """A request path that cannot be routed; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(f"invalid path: {message}")
        self.status = status


# -- paths and hosts ------------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_PATH_WORK = re.compile(r"[\x00-\x20\x7f%]|/\.\.?(?=/|$)")  # nothing found: already normal
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_ESCAPE = re.compile(r"%(.?.?)", re.S)


def normalize_path(path: str) -> str:
    """The form routes match and the service receives (see the module docstring)."""
    if len(path) > MAX_PATH:
        raise InvalidPath(f"longer than {MAX_PATH} characters", status=414)
    if not path.startswith("/"):
        raise InvalidPath(f"must start with '/', got {path[:64]!r}")
    if _PATH_WORK.search(path) is None:
        return path
    bad = _CONTROL.search(path)
    if bad is not None:
        what = "a NUL" if bad.group() == "\0" else f"the character {bad.group()!r}"
        raise InvalidPath(f"contains {what}")
    if "%" in path:
        path = _ESCAPE.sub(_decode_escape, path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _decode_escape(m: re.Match[str]) -> str:
    digits = m.group(1)
    if len(digits) != 2 or digits[0] not in _HEX or digits[1] not in _HEX:
        raise InvalidPath(f"malformed percent-escape {m.group()!r}")
    char = chr(int(digits, 16))
    if char in _UNRESERVED:
        return char
    if char == "\0":
        raise InvalidPath("contains an encoded NUL (%00)")
    return "%" + digits.upper()


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    last = len(segments) - 1
    out: list[str] = []
    for i, segment in enumerate(segments):
        if segment == ".":
            if i == last:
                out.append("")
        elif segment == "..":
            if not out:
                raise InvalidPath("'..' climbs above the root")
            out.pop()
            if i == last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def normalize_host(host: str) -> str:
    """Lower-cased, without the port and a trailing dot: the form host matchers compare."""
    host = host.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        end = host.find("]")
        return host[:end + 1] if end != -1 else host
    name, colon, port = host.rpartition(":")
    if colon and ":" not in name and (port.isdigit() or not port):
        host = name
    return host.rstrip(".")


# -- regexes --------------------------------------------------------------------------------
#
# Python's ``re`` backtracks, so a pattern can take exponential or polynomial time on a
# hostile path. Before accepting one, its parse tree is read as a sequence of steps, each
# with the set of characters it may consume (over-approximated), and these shapes are
# refused: a repeated group that can match empty, whose varying length lets repetitions
# split a text in many ways, or whose alternatives start alike (exponential); and two
# repeats that text made of characters both take (and the steps between them match) lets
# trade places (polynomial). Backreferences are refused outright. A random-pattern test
# (tests/gateway/test_routes.py) times what is accepted on hostile inputs.

_CATEGORIES = {
    _sre.CATEGORY_DIGIT: re.compile(r"\d"), _sre.CATEGORY_NOT_DIGIT: re.compile(r"\D"),
    _sre.CATEGORY_SPACE: re.compile(r"\s"), _sre.CATEGORY_NOT_SPACE: re.compile(r"\S"),
    _sre.CATEGORY_WORD: re.compile(r"\w"), _sre.CATEGORY_NOT_WORD: re.compile(r"\W"),
}
_MEMBERS_LIMIT = 1024
_PROBES = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\u00a0", "\u00e9", "\u0663", "\u4e2d"]


class _Chars:
    """An over-approximation of the characters a part of a regex can consume."""

    __slots__ = ("anything", "cats", "chars", "negated", "ranges")

    def __init__(self, chars: Iterable[str] = (), ranges: Iterable[tuple[int, int]] = (),
                 cats: Iterable[Any] = (), *, negated: bool = False,
                 anything: bool = False) -> None:
        self.chars = frozenset(chars)
        self.ranges = tuple(ranges)
        self.cats = frozenset(cats)
        self.negated = negated
        self.anything = anything

    @property
    def empty(self) -> bool:
        return not (self.anything or self.negated or self.chars or self.ranges or self.cats)

    def contains(self, char: str) -> bool:
        if self.anything:
            return True
        inside = (char in self.chars or any(lo <= ord(char) <= hi for lo, hi in self.ranges)
                  or any(_CATEGORIES[c].match(char) if c in _CATEGORIES else True
                         for c in self.cats))
        return inside != self.negated

    def union(self, other: _Chars) -> _Chars:
        if self.empty:
            return other
        if other.empty:
            return self
        if self.anything or other.anything or self.negated or other.negated:
            return _ANY
        return _Chars(self.chars | other.chars, self.ranges + other.ranges,
                      self.cats | other.cats)

    def members(self) -> list[str] | None:
        """Every character of a small, explicit set; None when it is not one."""
        if self.anything or self.negated or self.cats:
            return None
        if sum(hi - lo + 1 for lo, hi in self.ranges) + len(self.chars) > _MEMBERS_LIMIT:
            return None
        return [*self.chars, *(chr(c) for lo, hi in self.ranges for c in range(lo, hi + 1))]


_ANY = _Chars(anything=True)
_NONE = _Chars()


def _common(*sets: _Chars) -> bool:
    """Whether one character is in every set: exact when one set is small and explicit,
    else tried on printable ASCII and a few other characters."""
    if any(s.empty for s in sets):
        return False
    explicit = [m for m in (s.members() for s in sets) if m is not None]
    candidates = min(explicit, key=len) if explicit else _PROBES
    return any(all(s.contains(c) for s in sets) for c in candidates)


@dataclass(slots=True)
class _Step:
    """One step of a regex as the hazard check sees it."""

    chars: _Chars
    optional: bool  # can match the empty string
    loop: bool = False  # repeats, or holds a repeat, over a variable length
    varies: bool = False  # holds a part of varying length
    ambiguous: bool = False  # alternatives that can start with the same character
    first: _Chars | None = None  # what it can start with, when narrower than ``chars``
    parts: list[list[_Step]] | None = None  # alternatives, or a repeat's body
    repeated: bool = False  # a repeat of more than one copy of ``parts[0]``

    @property
    def variable(self) -> bool:
        return self.optional or self.loop or self.varies

    @property
    def dot_run(self) -> bool:
        """A repeat of ``.`` alone (``.*``, ``.+``): with DOTALL it takes any text."""
        parts = self.parts
        return (self.repeated and parts is not None and len(parts[0]) == 1
                and parts[0][0].parts is None and parts[0][0].chars.anything)

    def feeds(self, a: _Chars, b: _Chars) -> bool:
        """Whether it can match some text made only of characters in both sets."""
        if self.parts is None:
            return _common(self.chars, a, b)
        return any(all(s.feeds(a, b) for s in part if not s.optional) for part in self.parts)


class RegexHazard(Exception):
    """Internal: why a pattern is refused."""


def _first(steps: Sequence[_Step]) -> _Chars:
    chars = _NONE
    for step in steps:
        chars = chars.union(step.first or step.chars)
        if not step.optional:
            break
    return chars


def _union(steps: Iterable[_Step]) -> _Chars:
    chars = _NONE
    for step in steps:
        chars = chars.union(step.chars)
    return chars


def _literal(code: int, flags: int) -> _Chars:
    char = chr(code)
    if flags & re.IGNORECASE:
        return _Chars({char, char.lower(), char.upper(), char.swapcase()})
    return _Chars({char})


def _charset(items: Iterable[tuple[Any, Any]], flags: int) -> _Chars:
    chars: set[str] = set()
    ranges: list[tuple[int, int]] = []
    cats: list[Any] = []
    negated = False
    for op, av in items:
        if op is _sre.NEGATE:
            negated = True
        elif op is _sre.LITERAL:
            chars |= _literal(av, flags).chars
        elif op is _sre.RANGE:
            ranges.append((0, 0x10FFFF) if flags & re.IGNORECASE else av)  # folding: widen
        elif op is _sre.CATEGORY:
            cats.append(av)
        else:
            return _ANY
    return _Chars(chars, ranges, cats, negated=negated)


def _steps(items: Iterable[tuple[Any, Any]], flags: int) -> list[_Step]:
    """The steps of a (sub)pattern; repeats are checked here, sequences by the caller."""
    out: list[_Step] = []
    for op, av in items:
        if op is _sre.LITERAL:
            out.append(_Step(_literal(av, flags), False))
        elif op is _sre.NOT_LITERAL:
            out.append(_Step(_Chars(_literal(av, flags).chars, negated=True), False))
        elif op is _sre.ANY:
            out.append(_Step(_ANY, False))
        elif op is _sre.IN:
            out.append(_Step(_charset(av, flags), False))
        elif op is _sre.AT:
            out.append(_Step(_NONE, True))
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            _check_sequence(_steps(av[1], flags), at_end=True)
            out.append(_Step(_NONE, True))
        elif op is _sre.SUBPATTERN:
            _group, add, remove, sub = av
            out.extend(_steps(sub, (flags | add) & ~remove))
        elif op is _sre.ATOMIC_GROUP:
            out.extend(_steps(av, flags))
        elif op is _sre.BRANCH:
            out.append(_branch(av[1], flags))
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            out.append(_repeat(*av, flags))  # possessive ones still rescan: no exemption
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS, _sre.GROUPREF_IGNORE):
            raise RegexHazard("uses a backreference, which cannot be matched in linear time")
        else:
            out.append(_Step(_ANY, False, loop=True))
    return out


def _branch(alternatives: Sequence[Any], flags: int) -> _Step:
    alts = [_steps(alt, flags) for alt in alternatives]
    firsts = [_first(alt) for alt in alts]
    nullable = [all(s.optional for s in alt) for alt in alts]
    ambiguous = any(_common(firsts[i], firsts[j]) or (nullable[i] and nullable[j])
                    for i in range(len(alts)) for j in range(i + 1, len(alts)))
    first = _NONE
    for chars in firsts:
        first = first.union(chars)
    return _Step(_union(chain.from_iterable(alts)), any(nullable),
                 loop=any(s.loop for alt in alts for s in alt),
                 varies=any(s.variable for alt in alts for s in alt),
                 ambiguous=ambiguous, first=first, parts=alts)


def _repeat(lo: int, hi: int, sub: Any, flags: int) -> _Step:
    body = _steps(sub, flags)
    variable = hi > lo or any(s.variable for s in body)
    repeated = hi > 1 and variable
    if repeated:
        if all(s.optional for s in body):
            raise RegexHazard("repeats a group that can match the empty string")
        if _shifting(body):
            raise RegexHazard("repeats a group whose length varies where the next repetition "
                              "can start (like (a+)+ or (a?a)+); the number of ways to match "
                              "grows exponentially")
        if any(s.ambiguous for s in body):
            raise RegexHazard("repeats alternatives that can start with the same character "
                              "(like (x|y|xy)+); the number of ways to match grows exponentially")
    return _Step(_union(body), lo == 0 or all(s.optional for s in body),
                 loop=repeated or any(s.loop for s in body),
                 varies=any(s.variable for s in body), first=_first(body), parts=[body],
                 repeated=hi > 1)


def _shifting(body: Sequence[_Step]) -> bool:
    """Whether repetitions of ``body`` can split a text in many ways: a part of varying
    length takes characters the body starts with, and no mandatory part after it (that
    it cannot take) pins where it ends."""
    first = _first(body)
    for k, step in enumerate(body):
        if step.variable and _common(step.chars, first):
            follower = next((s for s in body[k + 1:] if not s.optional), None)
            if follower is None or _common(follower.first or follower.chars, step.chars):
                return True
    return False


def _check_sequence(steps: Sequence[_Step], *, at_end: bool) -> None:
    """Refuse two repeats where text both can take (and the steps between them can match)
    lets the second take over wherever the first stops: polynomial time. A last repeat of
    ``.`` is exempt at the very end (``at_end``): it cannot fail on a path or header value,
    which hold no newline. Nested sequences are checked too."""
    loops = [i for i, step in enumerate(steps) if step.loop]
    for n, i in enumerate(loops):
        for j in loops[n + 1:]:
            a, b = steps[i].chars, steps[j].chars
            if at_end and steps[j].dot_run and all(s.optional for s in steps[j + 1:]):
                continue
            if _common(a, steps[j].first or b) and all(
                    s.feeds(a, b) for s in steps[i + 1:j] if not s.optional):
                raise RegexHazard(
                    "has two repeats that can match the same text (like .*/.*x or \\d+\\d+), "
                    "which takes time growing with the square of the input; keep each "
                    "repeat within one segment ([^/]+) or separate them with a character "
                    "they cannot match")
    for k, step in enumerate(steps):
        if step.parts is not None:
            tail = at_end and not step.repeated and all(s.optional for s in steps[k + 1:])
            for part in step.parts:
                _check_sequence(part, at_end=tail)


def compile_regex(pattern: object, *, what: str) -> re.Pattern[str]:
    """``pattern`` compiled, or a ``ConfigError`` naming ``what`` when it is invalid,
    longer than ``MAX_REGEX`` or looks catastrophic (see the module docstring)."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{what}: must be a regular expression (a string), got {pattern!r}")
    if len(pattern) > MAX_REGEX:
        raise ConfigError(f"{what}: regular expression of {len(pattern)} characters, more "
                          f"than {MAX_REGEX}")
    try:
        compiled = re.compile(pattern, re.DOTALL)  # paths and header values hold no newline
        parsed = _sre_parse.parse(pattern, 0)
        _check_sequence(_steps(parsed, parsed.state.flags), at_end=True)
    except re.error as exc:
        raise ConfigError(f"{what}: invalid regular expression {pattern!r}: {exc}") from None
    except RegexHazard as exc:
        raise ConfigError(f"{what}: regular expression {pattern!r} {exc}") from None
    except RecursionError:
        raise ConfigError(f"{what}: regular expression {pattern!r} is nested too deeply") \
            from None
    return compiled


def _literal_prefix(pattern: re.Pattern[str]) -> str:
    """The text every match of ``pattern`` starts with ('' when unknown)."""
    return _literal_prefix_of(pattern.pattern)


@functools.lru_cache(maxsize=4096)
def _literal_prefix_of(pattern: str) -> str:
    parsed = _sre_parse.parse(pattern, 0)
    if parsed.state.flags & re.IGNORECASE:
        return ""
    prefix: list[str] = []

    def walk(items: Iterable[tuple[Any, Any]]) -> bool:
        for op, av in items:
            if op is _sre.LITERAL:
                prefix.append(chr(av))
            elif op is _sre.AT and av is _sre.AT_BEGINNING:
                continue
            elif op is _sre.SUBPATTERN and not av[1] and not av[2]:
                if not walk(av[3]):
                    return False
            else:
                return False
        return True

    walk(parsed)
    return "".join(prefix)


# -- config helpers -------------------------------------------------------------------------


def _mapping(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected a mapping, got {type(data).__name__} {data!r}")
    return data


def _keys(data: Mapping[str, Any], known: Iterable[str], what: str) -> None:
    allowed = set(known)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{what}.{key}: unknown key{_suggestion(str(key), allowed)}; "
                              f"expected one of {', '.join(sorted(allowed))}")


def _percent(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0.0 <= value <= 100.0):
        raise ConfigError(f"{what}: must be a percentage between 0 and 100, got {value!r}")
    return float(value)


def _text(value: Any, what: str, *, limit: int = MAX_HEADER_VALUE) -> str:
    """A config string; integers are accepted as written, floats and booleans are not."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}: must be a string (quote it in YAML), got {value!r}")
    if len(value) > limit or _CONTROL_TEXT.search(value):
        raise ConfigError(f"{what}: must be at most {limit} characters without control "
                          "characters (CR, LF, NUL...)")
    return value


_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but tab


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOSTNAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                       r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?|\[[0-9a-f:.]+\]")
_LABEL_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
UNEDITABLE_HEADERS = frozenset({
    "connection", "content-length", "host", "keep-alive", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade"})


def _header_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ConfigError(f"{what}: {name!r} is not a valid header name")
    return name.lower()


def _config_path(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: must be a path starting with '/', got {value!r}")
    if not value.startswith("/"):
        raise ConfigError(f"{what}: must start with '/', got {value!r}")
    if "?" in value:
        raise ConfigError(f"{what}: {value!r} holds a query string; match parameters with "
                          "match.query")
    try:
        return normalize_path(value)
    except InvalidPath as exc:
        raise ConfigError(f"{what}: {value!r}: {exc}") from None


def _config_host(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: must be a host name, got {value!r}")
    host = value.lower().rstrip(".")
    name = host[2:] if host.startswith("*.") else host
    if host != "*" and not _HOSTNAME.fullmatch(name):
        hint = " (match host names without the port)" if ":" in name and "[" not in name \
            else ""
        raise ConfigError(f"{what}: {value!r} is not a host name, '*.domain' or '*'{hint}")
    return host


# -- matchers -------------------------------------------------------------------------------


_PATH = 1  # where the path's relation is in ``RouteMatcher.relations``


class Relation(Enum):
    """How the requests matched by an earlier matcher relate to a later one's."""

    EQUAL = "equal"
    COVERS = "covers"  # the earlier takes every request of the later
    INSIDE = "inside"  # the earlier is narrower than the later
    DISJOINT = "disjoint"
    OVERLAP = "overlap"  # some requests match both, some only one
    UNKNOWN = "unknown"  # cannot be told at load time (regexes)


def _set_relation(a: frozenset[str] | None, b: frozenset[str] | None) -> Relation:
    if a == b:
        return Relation.EQUAL
    if a is None:
        return Relation.COVERS
    if b is None:
        return Relation.INSIDE
    if b <= a:
        return Relation.COVERS
    if a <= b:
        return Relation.INSIDE
    return Relation.OVERLAP if a & b else Relation.DISJOINT


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A condition on one header or query parameter: exact, regex, present or absent."""

    kind: str  # "exact" | "regex" | "present" | "absent"
    value: str | None = None
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    @classmethod
    def from_config(cls, data: Any, what: str) -> ValueMatch:
        """From ``"value"`` (exact), ``{exact: v}``, ``{regex: r}`` or ``{present: bool}``."""
        if not isinstance(data, Mapping):
            return cls("exact", _text(data, what))
        kinds = ("exact", "regex", "present")
        _keys(data, kinds, what)
        if len(data) != 1:
            raise ConfigError(f"{what}: give exactly one of {', '.join(kinds)}, got "
                              f"{sorted(data) or 'none'}")
        (kind, value), = data.items()
        if kind == "present":
            if not isinstance(value, bool):
                raise ConfigError(f"{what}.present: must be true or false, got {value!r}")
            return cls("present" if value else "absent")
        if kind == "regex":
            compiled = compile_regex(value, what=f"{what}.regex")
            return cls("regex", value, compiled)
        return cls("exact", _text(value, f"{what}.exact"))

    def test(self, value: str | None) -> bool:
        """Whether a request's value (None: absent) meets the condition."""
        kind = self.kind
        if kind == "exact":
            return value == self.value
        if kind == "present":
            return value is not None
        if kind == "absent":
            return value is None
        return (value is not None and len(value) <= MAX_REGEX_SUBJECT
                and self.regex.fullmatch(value) is not None)  # type: ignore[union-attr]

    def relation(self, later: ValueMatch | None) -> Relation:
        """How this (earlier) condition relates to a later route's on the same name."""
        if later is None:
            return Relation.INSIDE
        a, b = self.kind, later.kind
        if self == later:
            return Relation.EQUAL
        if "absent" in (a, b):
            return Relation.DISJOINT
        if a == "present":
            return Relation.COVERS
        if b == "present":
            return Relation.INSIDE
        if a == "regex" and b == "exact":
            return Relation.COVERS if self.test(later.value) else Relation.DISJOINT
        if a == "exact" and b == "regex":
            return Relation.INSIDE if later.test(self.value) else Relation.DISJOINT
        if a == "exact":
            return Relation.DISJOINT  # two different exact values
        return _regex_relation(self.regex, later.regex)  # type: ignore[arg-type]

    def describe(self) -> str:
        """Short text for messages."""
        return {"present": "present", "absent": "absent"}.get(self.kind) or \
            f"{self.kind} {self.value!r}"


def _regex_relation(a: re.Pattern[str], b: re.Pattern[str]) -> Relation:
    if a.pattern == b.pattern:
        return Relation.EQUAL
    pa, pb = _literal_prefix(a), _literal_prefix(b)
    return Relation.UNKNOWN if pa.startswith(pb) or pb.startswith(pa) else Relation.DISJOINT


@dataclass(frozen=True, slots=True)
class PathMatch:
    """A path condition: ``any``, ``exact``, ``prefix`` (segment-aware) or ``regex``."""

    kind: str
    value: str = "/"
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    @classmethod
    def from_config(cls, data: Any, what: str) -> PathMatch:
        """From ``{exact: p}``, ``{prefix: p}`` or ``{regex: r}``."""
        if data is None:
            return cls("any")
        if not isinstance(data, Mapping):
            raise ConfigError(f"{what}: expected a mapping with one of exact, prefix, regex "
                              f"(like {{prefix: /api}}), got {data!r}")
        _keys(data, ("exact", "prefix", "regex"), what)
        if len(data) != 1:
            raise ConfigError(f"{what}: give exactly one of exact, prefix, regex, got "
                              f"{sorted(data) or 'none'}")
        (kind, value), = data.items()
        if kind == "regex":
            return cls("regex", value, compile_regex(value, what=f"{what}.regex"))
        path = _config_path(value, f"{what}.{kind}")
        if kind == "prefix":
            path = path.rstrip("/") or "/"
            return cls("any") if path == "/" else cls("prefix", path)
        return cls("exact", path)

    def test(self, path: str) -> bool:
        """Whether a normalized path meets the condition."""
        kind = self.kind
        if kind == "any":
            return True
        if kind == "exact":
            return path == self.value
        if kind == "prefix":
            return _under(path, self.value)
        return self.regex.fullmatch(path) is not None  # type: ignore[union-attr]

    def relation(self, later: PathMatch) -> Relation:
        """How this (earlier) path condition relates to a later route's."""
        a, b = self.kind, later.kind
        if self == later:
            return Relation.EQUAL
        if a == "any":
            return Relation.COVERS
        if b == "any":
            return Relation.INSIDE
        if b == "exact":
            return Relation.COVERS if self.test(later.value) else Relation.DISJOINT
        if a == "exact":
            return Relation.INSIDE if later.test(self.value) else Relation.DISJOINT
        if a == b == "prefix":
            if _under(later.value, self.value):
                return Relation.COVERS
            return Relation.INSIDE if _under(self.value, later.value) else Relation.DISJOINT
        if a == b == "regex":
            return _regex_relation(self.regex, later.regex)  # type: ignore[arg-type]
        if a == "prefix":
            return _prefix_regex(self.value, later.regex, Relation.COVERS)  # type: ignore[arg-type]
        return _prefix_regex(later.value, self.regex, Relation.INSIDE)  # type: ignore[arg-type]

    def describe(self) -> str:
        """Short text for messages."""
        return "any path" if self.kind == "any" else f"{self.kind} {self.value}"


def _under(path: str, prefix: str) -> bool:
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


def _prefix_regex(prefix: str, regex: re.Pattern[str], inside: Relation) -> Relation:
    """Relation of a prefix and a regex from its literal prefix; ``inside`` is the answer
    when every match of the regex lies under the prefix."""
    literal = _literal_prefix(regex)
    if literal.startswith(prefix):
        rest = literal[len(prefix):]
        if rest.startswith("/"):
            return inside
        return Relation.UNKNOWN if not rest else Relation.DISJOINT
    return Relation.UNKNOWN if prefix.startswith(literal) else Relation.DISJOINT


@dataclass(frozen=True, slots=True)
class HostMatch:
    """Host names: exact ones and ``*.suffix`` wildcards (lower case)."""

    exact: frozenset[str]
    suffixes: tuple[str, ...]  # ".example.com" for "*.example.com"

    @classmethod
    def from_config(cls, data: Any, what: str) -> HostMatch | None:
        """From one host or a list; None (any host) for ``*`` or nothing."""
        if data is None:
            return None
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{what}: expected a host name or a non-empty list of them, "
                              f"got {data!r}")
        hosts = [_config_host(h, f"{what}[{i}]" if isinstance(data, list) else what)
                 for i, h in enumerate(items)]
        if "*" in hosts:
            return None
        return cls(frozenset(h for h in hosts if not h.startswith("*.")),
                   tuple(sorted({h[1:] for h in hosts if h.startswith("*.")})))

    def test(self, host: str) -> bool:
        """Whether a normalized host is one of these."""
        if host in self.exact:
            return True
        return bool(self.suffixes) and host.endswith(self.suffixes) and host[:1] != "."

    def _covers(self, other: HostMatch) -> bool:
        return all(self.test(h) for h in other.exact) and all(
            any(s == t or s.endswith(t) for t in self.suffixes) for s in other.suffixes)

    def _meets(self, other: HostMatch) -> bool:
        return (any(other.test(h) for h in self.exact) or any(self.test(h) for h in other.exact)
                or any(s.endswith(t) or t.endswith(s)
                       for s in self.suffixes for t in other.suffixes))

    def relation(self, later: HostMatch | None) -> Relation:
        """How this (earlier) host condition relates to a later route's."""
        if later is None:
            return Relation.INSIDE
        covers, inside = self._covers(later), later._covers(self)
        if covers and inside:
            return Relation.EQUAL
        if covers:
            return Relation.COVERS
        if inside:
            return Relation.INSIDE
        return Relation.OVERLAP if self._meets(later) else Relation.DISJOINT

    def describe(self) -> str:
        """Short text for messages."""
        return ",".join(sorted(self.exact) + [f"*{s}" for s in self.suffixes])


class _Request:
    """One request as matchers see it; host, headers and query parsed only when asked."""

    __slots__ = ("_headers", "_host", "_query", "method", "path", "raw_headers", "raw_host",
                 "raw_query", "wanted")

    def __init__(self, method: str, host: str, path: str, headers: Headers | None,
                 query: str, wanted: _Wanted | None = None) -> None:
        self.method = method
        self.raw_host = host
        self.path = path
        self.raw_headers = headers
        self.raw_query = query
        self.wanted = wanted
        self._host: str | None = None
        self._headers: dict[str, str] | None = None
        self._query: dict[str, str] | None = None

    @property
    def host(self) -> str:
        if self._host is None:
            self._host = normalize_host(self.raw_host)
        return self._host

    def header(self, name: str) -> str | None:
        if self._headers is None:
            self._headers = _header_dict(self.raw_headers, self.wanted)
        return self._headers.get(name)

    def param(self, name: str) -> str | None:
        if self._query is None:
            self._query = _query_dict(self.raw_query)
        return self._query.get(name)


@dataclass(frozen=True, slots=True)
class _Wanted:
    """The header names some route matches on, as str and as bytes (lower case)."""

    names: frozenset[str]
    raw: frozenset[bytes]


def _header_dict(headers: Headers | None, wanted: _Wanted | None) -> dict[str, str]:
    """Lower-cased names to values (repeats joined); only ``wanted`` names when given."""
    out: dict[str, str] = {}
    if not headers:
        return out
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if isinstance(name, bytes):
            low = name.lower()
            if wanted is not None and low not in wanted.raw:
                continue
            key = low.decode("latin-1")
        else:
            key = name.lower()
            if wanted is not None and key not in wanted.names:
                continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def _query_dict(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            out.setdefault(unquote_plus(name), unquote_plus(value))
    return out


@dataclass(frozen=True, slots=True)
class RouteMatcher:
    """Everything a request must meet for a route to take it."""

    methods: frozenset[str] | None = None
    hosts: HostMatch | None = None
    path: PathMatch = field(default_factory=lambda: PathMatch("any"))
    headers: tuple[tuple[str, ValueMatch], ...] = ()
    query: tuple[tuple[str, ValueMatch], ...] = ()

    @classmethod
    def from_config(cls, data: Any, what: str) -> RouteMatcher:
        """From a route's ``match:`` mapping (None or ``{}``: every request)."""
        if data is None:
            return cls()
        data = _mapping(data, what)
        _keys(data, ("host", "path", "methods", "headers", "query"), what)
        methods = data.get("methods")
        if methods is not None:
            items = [methods] if isinstance(methods, str) else methods
            if not isinstance(items, list) or not items or not all(
                    isinstance(m, str) and _TOKEN.fullmatch(m) for m in items):
                raise ConfigError(f"{what}.methods: expected a non-empty list of HTTP methods, "
                                  f"got {methods!r}")
            methods = frozenset(m.upper() for m in items)
        return cls(methods, HostMatch.from_config(data.get("host"), f"{what}.host"),
                   PathMatch.from_config(data.get("path"), f"{what}.path"),
                   _conditions(data.get("headers"), f"{what}.headers", header=True),
                   _conditions(data.get("query"), f"{what}.query", header=False))

    def test(self, req: _Request, *, path: bool = True) -> bool:
        """Whether the request meets every condition (``path=False``: the index did)."""
        if self.methods is not None and req.method not in self.methods:
            return False
        if self.hosts is not None and not self.hosts.test(req.host):
            return False
        for name, cond in self.headers:
            if not cond.test(req.header(name)):
                return False
        for name, cond in self.query:
            if not cond.test(req.param(name)):
                return False
        return not path or self.path.test(req.path)

    def relations(self, later: RouteMatcher) -> list[Relation]:
        """One relation per dimension: methods, path (``_PATH``), hosts, each header and
        query parameter."""
        rels = [_set_relation(self.methods, later.methods), self.path.relation(later.path)]
        if self.hosts is not None:
            rels.append(self.hosts.relation(later.hosts))
        elif later.hosts is not None:
            rels.append(Relation.COVERS)
        for mine, theirs in ((self.headers, later.headers), (self.query, later.query)):
            a, b = dict(mine), dict(theirs)
            for name in a.keys() | b.keys():
                rels.append(a[name].relation(b.get(name)) if name in a else Relation.COVERS)
        return rels

    def describe(self) -> str:
        """Short text for messages: ``GET,POST shop.example.com prefix /api x-canary=...``."""
        parts = [",".join(sorted(self.methods)) if self.methods else "any method",
                 self.hosts.describe() if self.hosts else "any host", self.path.describe()]
        parts += [f"header {n} {c.describe()}" for n, c in self.headers]
        parts += [f"query {n} {c.describe()}" for n, c in self.query]
        return " ".join(parts)


def _conditions(data: Any, what: str, *, header: bool) -> tuple[tuple[str, ValueMatch], ...]:
    if data is None:
        return ()
    data = _mapping(data, what)
    out = []
    for name, cond in data.items():
        if header:
            key = _header_name(name, what)
        elif not isinstance(name, str) or not name:
            raise ConfigError(f"{what}: {name!r} is not a query parameter name")
        else:
            key = name
        if any(key == seen for seen, _ in out):
            raise ConfigError(f"{what}: {key!r} is named twice (names ignore case)")
        out.append((key, ValueMatch.from_config(cond, f"{what}.{name}")))
    return tuple(sorted(out, key=lambda item: item[0]))


# -- what a route does ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """A service, optionally a subset of its instances (by labels), and its weight."""

    service: str
    subset: tuple[tuple[str, str], ...] = ()
    weight: float = 1.0

    @property
    def labels(self) -> dict[str, str]:
        """The subset as a dict: instances must carry all of these labels."""
        return dict(self.subset)

    @classmethod
    def from_config(cls, data: Any, what: str, *, weighted: bool) -> Destination:
        """From ``{service, subset, weight}`` (``percent`` instead of weight for mirrors)."""
        data = _mapping(data, what)
        extra = ("weight",) if weighted else ("percent",)
        _keys(data, ("service", "subset", *extra), what)
        if "service" not in data:
            raise ConfigError(f"{what}.service: missing; name the service to send to")
        try:
            service = check_service_name(data["service"])
        except ConfigError as exc:
            raise ConfigError(f"{what}.service: {exc}") from None
        weight = data.get("weight", 1) if weighted else 1
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
                math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"{what}.weight: must be a number >= 0, got {weight!r}")
        return cls(service, _subset(data.get("subset"), f"{what}.subset"), float(weight))

    def describe(self) -> str:
        """``orders{version=v2}``."""
        labels = ",".join(f"{k}={v}" for k, v in self.subset)
        return f"{self.service}{{{labels}}}" if labels else self.service


def _subset(data: Any, what: str) -> tuple[tuple[str, str], ...]:
    if data is None:
        return ()
    data = _mapping(data, what)
    out = []
    for key, value in data.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ConfigError(f"{what}: label name {key!r} must be 1-63 letters, digits, '.', "
                              "'_', '/' or '-'")
        out.append((key, _text(value, f"{what}.{key}", limit=256)))
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class Mirror:
    """A fire-and-forget copy of ``percent`` of the route's requests to ``destination``."""

    destination: Destination
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Fault:
    """Injected faults: delay ``percent_delay`` of requests by ``delay`` seconds, answer
    ``percent_abort`` of them with ``abort_status`` instead of forwarding."""

    delay: float = 0.0
    percent_delay: float = 0.0
    abort_status: int | None = None
    percent_abort: float = 0.0

    @classmethod
    def from_config(cls, data: Any, what: str) -> Fault | None:
        """From ``{delay: {percent, fixed}, abort: {percent, status}}``; percent: 100."""
        if data is None:
            return None
        data = _mapping(data, what)
        _keys(data, ("delay", "abort"), what)
        fault = cls()
        if data.get("delay") is not None:
            delay = _mapping(data["delay"], f"{what}.delay")
            _keys(delay, ("percent", "fixed"), f"{what}.delay")
            if "fixed" not in delay:
                raise ConfigError(f"{what}.delay.fixed: missing; give a duration like '250ms'")
            seconds = parse_duration(delay["fixed"], name=f"{what}.delay.fixed")
            if not seconds or seconds <= 0:
                raise ConfigError(f"{what}.delay.fixed: must be a duration greater than zero, "
                                  f"got {delay['fixed']!r}")
            fault = cls(seconds, _percent(delay.get("percent", 100), f"{what}.delay.percent"))
        if data.get("abort") is not None:
            abort = _mapping(data["abort"], f"{what}.abort")
            _keys(abort, ("percent", "status"), f"{what}.abort")
            status = abort.get("status")
            if isinstance(status, bool) or not isinstance(status, int) or not (
                    200 <= status <= 599):
                raise ConfigError(f"{what}.abort.status: must be an HTTP status 200-599, "
                                  f"got {status!r}")
            fault = cls(fault.delay, fault.percent_delay, status,
                        _percent(abort.get("percent", 100), f"{what}.abort.percent"))
        return fault


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What fault injection decided for one request: wait ``delay`` s, then abort or not."""

    delay: float = 0.0
    abort: int | None = None  # the status to answer with instead of forwarding


NO_FAULT = FaultDecision()


def _chance(rng: random.Random, percent: float) -> bool:
    """``percent`` of the time; draws from ``rng`` only when the answer is not certain."""
    if percent >= 100.0:
        return True
    return percent > 0.0 and rng.random() * 100.0 < percent


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Header changes: ``remove`` names, then ``set`` (replacing), then ``add``."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, data: Any, what: str) -> HeaderEdits:
        """From ``{set: {name: value}, add: {name: value | [values]}, remove: [names]}``."""
        if data is None:
            return cls()
        data = _mapping(data, what)
        _keys(data, ("set", "add", "remove"), what)
        edits: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
        for kind in edits:
            section = data.get(kind)
            if section is None:
                continue
            for name, value in _mapping(section, f"{what}.{kind}").items():
                key = _editable(name, f"{what}.{kind}")
                values = value if kind == "add" and isinstance(value, list) else [value]
                edits[kind] += [(key, _text(v, f"{what}.{kind}.{name}")) for v in values]
        remove = data.get("remove")
        if remove is None:
            remove = []
        if isinstance(remove, str):
            remove = [remove]
        if not isinstance(remove, list):
            raise ConfigError(f"{what}.remove: expected a list of header names, got {remove!r}")
        return cls(tuple(edits["set"]), tuple(edits["add"]),
                   frozenset(_editable(n, f"{what}.remove") for n in remove))

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def apply(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` with these edits made (names compared case-insensitively)."""
        drop = self.remove | {name for name, _ in self.set}
        kept = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
        return kept + list(self.set) + list(self.add)

    def apply_bytes(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``apply`` for headers as bytes, the way the proxy reads them off the wire."""
        drop = {n.encode("latin-1") for n in self.remove | {name for name, _ in self.set}}
        kept = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
        return kept + [(n.encode("latin-1"), v.encode("latin-1"))
                       for n, v in chain(self.set, self.add)]


def _editable(name: Any, what: str) -> str:
    key = _header_name(name, what)
    if key in UNEDITABLE_HEADERS:
        hint = "; change it with rewrite.host" if key == "host" else \
            ": it frames or carries the connection and is managed by the gateway"
        raise ConfigError(f"{what}: header {key!r} cannot be edited{hint}")
    return key


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Path and host rewrites: ``prefix`` replaces the matched prefix (or exact path);
    ``regex`` (anchored) turns the path into ``substitution`` (``\\1``, ``\\g<name>``)."""

    prefix: str | None = None
    regex: re.Pattern[str] | None = None
    substitution: str = ""
    host: str | None = None

    @classmethod
    def from_config(cls, data: Any, what: str, path: PathMatch) -> Rewrite | None:
        """From ``{prefix, regex: {pattern, substitution}, host}``."""
        if data is None:
            return None
        data = _mapping(data, what)
        _keys(data, ("prefix", "regex", "host"), what)
        if "prefix" in data and "regex" in data:
            raise ConfigError(f"{what}: give prefix or regex, not both")
        prefix = regex = None
        substitution = ""
        if "prefix" in data:
            if path.kind == "regex":
                raise ConfigError(f"{what}.prefix: needs match.path.prefix or exact; rewrite "
                                  "a regex match with rewrite.regex")
            prefix = _config_path(data["prefix"], f"{what}.prefix")
        if "regex" in data:
            spec = _mapping(data["regex"], f"{what}.regex")
            _keys(spec, ("pattern", "substitution"), f"{what}.regex")
            regex = compile_regex(spec.get("pattern"), what=f"{what}.regex.pattern")
            substitution = spec.get("substitution")
            if not isinstance(substitution, str) or _CONTROL.search(substitution):
                raise ConfigError(f"{what}.regex.substitution: must be a string without "
                                  f"spaces or control characters, got {substitution!r}")
            _check_template(regex, substitution, f"{what}.regex.substitution")
        host = None
        if "host" in data:
            host = _config_host(data["host"], f"{what}.host")
            if host.startswith("*"):
                raise ConfigError(f"{what}.host: must be one host name, got {data['host']!r}")
        return cls(prefix, regex, substitution, host)

    def path_for(self, path: str, matched: PathMatch) -> str:
        """The rewritten form of a normalized ``path`` that ``matched`` took."""
        if self.prefix is not None:
            if matched.kind == "exact":
                return self.prefix
            start = len(matched.value) if matched.kind == "prefix" else 0
            rest = path[start:] if path != "/" or start else ""
            new = self.prefix
            if new.endswith("/") and rest.startswith("/"):
                rest = rest[1:]
            return (new + rest) or "/"
        if self.regex is not None and len(path) <= MAX_REGEX_SUBJECT:
            m = self.regex.fullmatch(path)
            if m is not None:
                new = m.expand(self.substitution)
                return new if new.startswith("/") else "/" + new
        return path


def _check_template(regex: re.Pattern[str], template: str, what: str) -> None:
    """A bad group reference or escape in ``template`` fails now, not on a request."""
    flags = re.match(r"(?:\(\?[aiLmsux]+\))*", regex.pattern)
    head = flags.group() if flags else ""
    try:
        probe = re.compile(f"{head}(?:{regex.pattern[len(head):]})|").match("")
        if probe is not None:
            probe.expand(template)
    except (re.error, IndexError) as exc:
        raise ConfigError(f"{what}: {template!r}: {exc}") from None


# -- routes ---------------------------------------------------------------------------------

ROUTE_KEYS = ("name", "match", "rewrite", "headers", "service", "destinations", "mirror",
              "fault", "timeout", "timeouts", "retries", "circuit_breaker",
              "outlier_detection", "load_balancer")
POLICY_KEYS = ("timeout", "timeouts", "retries", "circuit_breaker", "outlier_detection",
               "load_balancer")


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One route: what it matches, where it sends, and what it changes on the way."""

    index: int
    name: str | None
    matcher: RouteMatcher
    destinations: tuple[Destination, ...]
    rewrite: Rewrite | None = None
    request_headers: HeaderEdits = field(default_factory=HeaderEdits)
    response_headers: HeaderEdits = field(default_factory=HeaderEdits)
    mirror: Mirror | None = None
    fault: Fault | None = None
    policy_config: Mapping[str, Any] = field(default_factory=dict)  # route-level overrides
    policy: TrafficPolicy = field(default_factory=TrafficPolicy)  # overrides on defaults
    _cumulative: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        """How messages name the route: ``route 'orders' (routes[2])`` or ``routes[2]``."""
        return f"route {self.name!r} (routes[{self.index}])" if self.name else \
            f"routes[{self.index}]"

    @classmethod
    def from_config(cls, data: Any, index: int) -> Route:
        """One entry of ``gateway.routes``; errors name the route and the key."""
        name = data.get("name") if isinstance(data, Mapping) else None
        label = f"route {name!r} (routes[{index}])" if isinstance(name, str) and name else \
            f"routes[{index}]"
        try:
            return cls._load(data, index)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None

    @classmethod
    def _load(cls, data: Any, index: int) -> Route:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping (a route), got {type(data).__name__} "
                              f"{data!r}")
        known = set(ROUTE_KEYS)
        for key in data:
            if key not in known:
                raise ConfigError(f"{key}: unknown key{_suggestion(str(key), known)}; expected "
                                  f"one of {', '.join(ROUTE_KEYS)}")
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or not name.isprintable()
                                 or not 0 < len(name) <= 128):
            raise ConfigError(f"name: must be a printable string of 1-128 characters, "
                              f"got {name!r}")
        matcher = RouteMatcher.from_config(data.get("match"), "match")
        destinations = _destinations(data)
        edits = data.get("headers")
        if edits is not None:
            _keys(_mapping(edits, "headers"), ("request", "response"), "headers")
        edits = edits or {}
        mirror = None
        if data.get("mirror") is not None:
            spec = _mapping(data["mirror"], "mirror")
            mirror = Mirror(Destination.from_config(spec, "mirror", weighted=False),
                            _percent(spec.get("percent", 100), "mirror.percent"))
        policy_config = _policy_section({k: v for k, v in data.items() if k in POLICY_KEYS},
                                        "")
        policy = load_traffic_policy(policy_config, where="")
        total = 0.0
        cumulative = []
        for d in destinations:
            total += d.weight
            cumulative.append(total)
        return cls(index, name, matcher, destinations,
                   Rewrite.from_config(data.get("rewrite"), "rewrite", matcher.path),
                   HeaderEdits.from_config(edits.get("request"), "headers.request"),
                   HeaderEdits.from_config(edits.get("response"), "headers.response"),
                   mirror, Fault.from_config(data.get("fault"), "fault"),
                   policy_config, policy, tuple(cumulative))

    def matches(self, method: str, host: str, path: str, headers: Headers | None = None,
                query: str = "") -> bool:
        """Whether this route alone takes the request (a normalized path and host)."""
        return self.matcher.test(_Request(method, host, path, headers, query))

    def choose_destination(self, rng: random.Random) -> Destination:
        """A destination by weight (no draw from ``rng`` when there is one)."""
        if len(self.destinations) == 1:
            return self.destinations[0]
        cumulative = self._cumulative
        i = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return self.destinations[min(i, len(self.destinations) - 1)]

    def policy_for(self, service_config: Mapping[str, Any] | None) -> TrafficPolicy:
        """This route's policy over a destination service's own (``merge_policy``)."""
        return merge_policy(service_config, self.policy_config, where=self.label)


def _destinations(data: Mapping[str, Any]) -> tuple[Destination, ...]:
    if "service" in data and "destinations" in data:
        raise ConfigError("service: give service (one destination) or destinations, not both")
    if "service" in data:
        return (Destination.from_config({"service": data["service"]}, "service",
                                        weighted=True),)
    items = data.get("destinations")
    if items is None:
        raise ConfigError("destinations: missing; give service: NAME or a destinations list")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"destinations: expected a non-empty list of "
                          f"{{service, subset, weight}}, got {items!r}")
    weighted = [isinstance(d, Mapping) and "weight" in d for d in items]
    if any(weighted) and not all(weighted):
        raise ConfigError("destinations: give every destination a weight, or none (equal "
                          "split)")
    out = tuple(Destination.from_config(d, f"destinations[{i}]", weighted=True)
                for i, d in enumerate(items))
    if sum(d.weight for d in out) <= 0:
        raise ConfigError("destinations: weights sum to 0; at least one must be above 0")
    return out


def _policy_section(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` in ``TrafficPolicy`` shape: ``timeout`` expanded, null sections dropped."""
    out = {k: v for k, v in data.items() if k != "timeout" and v is not None}
    if data.get("timeout") is not None:
        prefix = f"{where}." if where else ""
        if isinstance(out.get("timeouts"), Mapping) and "request" in out["timeouts"]:
            raise ConfigError(f"{prefix}timeout: give timeout or timeouts.request, not both")
        if not parse_duration(data["timeout"], name=f"{prefix}timeout"):
            raise ConfigError(f"{prefix}timeout: must be a duration greater than zero, got "
                              f"{data['timeout']!r}")
        timeouts = out.get("timeouts")
        out["timeouts"] = {**(timeouts if isinstance(timeouts, Mapping) else {}),
                           "request": data["timeout"]}
    return out


def merge_policy(service: Mapping[str, Any] | None, route: Mapping[str, Any] | None, *,
                 where: str = "route") -> TrafficPolicy:
    """A ``TrafficPolicy`` from a service's settings with a route's on top, key by key.

    Both are ``TrafficPolicy``-shaped dicts (``timeouts``, ``retries``, ``circuit_breaker``,
    ``outlier_detection``, ``load_balancer``; ``timeout`` is short for
    ``timeouts.request``). Within each section the route's keys win and the service's
    others stay; a route naming another load-balancing ``policy`` replaces the service's
    ``load_balancer`` whole, since balancer options belong to one policy.
    """
    base = _policy_section(_mapping(service, "service policy"), "service") if service else {}
    top = _policy_section(_mapping(route, where), where) if route else {}
    merged: dict[str, Any] = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if not (isinstance(value, Mapping) and isinstance(below, Mapping)):
            merged[key] = value
        elif key == "load_balancer" and value.get("policy", below.get("policy")) != \
                below.get("policy"):
            merged[key] = value
        else:
            merged[key] = {**below, **value}
    return load_traffic_policy(merged, where=where)


@dataclass(slots=True)
class RouteMatch:
    """A request's route and what to forward: the rewritten path and host, header edits,
    the destination choice, mirroring and faults."""

    route: Route
    path: str  # normalized, then rewritten
    host: str  # rewrite.host, else the request's Host as received
    query: str = ""  # as received, without '?'

    @property
    def target(self) -> str:
        """The request target to send upstream: path, then ``?query`` if any."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def request_headers(self) -> HeaderEdits:
        """Edits to the request headers before forwarding."""
        return self.route.request_headers

    @property
    def response_headers(self) -> HeaderEdits:
        """Edits to the response headers before answering."""
        return self.route.response_headers

    @property
    def policy(self) -> TrafficPolicy:
        """The route's traffic policy over the defaults (see ``Route.policy_for``)."""
        return self.route.policy

    def choose_destination(self, rng: random.Random) -> Destination:
        """Where to send this request, by weight."""
        return self.route.choose_destination(rng)

    def should_mirror(self, rng: random.Random) -> bool:
        """Whether to send a copy to ``route.mirror.destination`` too."""
        mirror = self.route.mirror
        return mirror is not None and _chance(rng, mirror.percent)

    def fault_decision(self, rng: random.Random) -> FaultDecision:
        """Delay and abort for this request: independent draws (delay first)."""
        fault = self.route.fault
        if fault is None:
            return NO_FAULT
        delay = fault.delay if fault.delay and _chance(rng, fault.percent_delay) else 0.0
        abort = fault.abort_status if fault.abort_status is not None and _chance(
            rng, fault.percent_abort) else None
        return FaultDecision(delay, abort) if delay or abort is not None else NO_FAULT


@dataclass(frozen=True, slots=True)
class Overlap:
    """An earlier route that takes some (``certain``) or maybe some of a later one's
    requests: legitimate, but worth knowing."""

    earlier: Route
    later: Route
    certain: bool

    def __str__(self) -> str:
        how = "takes some requests" if self.certain else \
            "may take some requests (regexes: not decidable at load time)"
        return (f"{self.earlier.label} [{self.earlier.matcher.describe()}] {how} that "
                f"{self.later.label} [{self.later.matcher.describe()}] would match; the "
                "earlier route wins")


class RouteTable:
    """Routes in declared order; ``match`` returns the first that takes a request."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._overlaps = _check_overlaps(self.routes)
        # Each index entry lists, in declared order, its own routes and those no path index
        # applies to (any path, or a regex): one hit is then the whole candidate list.
        exact: dict[str, list[int]] = {}
        prefix: dict[str, list[int]] = {}
        always: list[int] = []
        for i, route in enumerate(self.routes):
            path = route.matcher.path
            if path.kind == "exact":
                exact.setdefault(path.value, []).append(i)
            elif path.kind == "prefix":
                prefix.setdefault(path.value, []).append(i)
            else:
                always.append(i)
        self._exact = {k: tuple(sorted(v + always)) for k, v in exact.items()}
        self._prefix = {k: tuple(sorted(v + always)) for k, v in prefix.items()}
        self._always = tuple(always)
        self._prefix_lengths = sorted({len(p) for p in self._prefix})
        names = frozenset(n for r in self.routes for n, _ in r.matcher.headers)
        self._wanted = _Wanted(names, frozenset(n.encode("latin-1") for n in names))
        self._regex_path = [r.matcher.path.kind == "regex" for r in self.routes]
        # With no header or query matcher, a decision depends on method, host and path
        # only: it is remembered (a bounded dict, forgotten whole when full), so a request
        # seen before skips normalizing and matching. None: not cacheable.
        self._decisions: dict[tuple[Any, Any, Any], RouteMatch | None] | None = (
            {} if not any(r.matcher.headers or r.matcher.query for r in self.routes)
            else None)

    @classmethod
    def from_config(cls, data: Any, *, where: str = "gateway.routes") -> RouteTable:
        """From the ``gateway.routes`` list (None: no routes); a ``ConfigError`` names the
        route and the key of a bad one, or both routes when one shadows another."""
        if data is None:
            return cls(())
        if not isinstance(data, list):
            raise ConfigError(f"{where}: expected a list of routes, got "
                              f"{type(data).__name__} {data!r}")
        try:
            routes = [Route.from_config(item, i) for i, item in enumerate(data)]
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        names: dict[str, int] = {}
        for route in routes:
            if route.name is not None:
                if route.name in names:
                    raise ConfigError(f"{where}: {route.label}: name already used by "
                                      f"routes[{names[route.name]}]")
                names[route.name] = route.index
        try:
            return cls(routes)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def __len__(self) -> int:
        return len(self.routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def overlaps(self) -> list[Overlap]:
        """Partial overlaps found when the table was built (shadowing is an error)."""
        return list(self._overlaps)

    def match(self, method: str | bytes, host: str | bytes, path: str | bytes,
              headers: Headers | None = None, query: str | bytes | None = None
              ) -> RouteMatch | None:
        """The first route, in declared order, that takes the request; None if none does.

        ``path`` is the request target's path (with ``?query`` when ``query`` is None);
        raises ``InvalidPath`` for a path that must be refused (see ``normalize_path``).
        A table without header and query matchers remembers its decisions (the same
        ``RouteMatch`` for a request without a query: treat it as read-only).
        """
        decisions = self._decisions
        if decisions is None or query is None:
            return self._match(method, host, path, headers, query)
        key = (method, host, path)
        m = decisions.get(key, _UNDECIDED)
        if m is _UNDECIDED:
            m = self._match(method, host, path, None, b"")
            if len(decisions) >= MAX_DECISIONS:
                decisions.clear()
            decisions[key] = m
        if m is None or not query:
            return m  # type: ignore[return-value]
        return RouteMatch(m.route, m.path, m.host,  # type: ignore[union-attr]
                          query.decode("latin-1") if isinstance(query, bytes) else query)

    def _match(self, method: str | bytes, host: str | bytes, path: str | bytes,
               headers: Headers | None, query: str | bytes | None) -> RouteMatch | None:
        if isinstance(method, bytes):
            method = method.decode("latin-1")
        if isinstance(host, bytes):
            host = host.decode("latin-1")
        if isinstance(path, bytes):
            path = path.decode("latin-1")
        if query is None:
            path, _, query = path.partition("?")
        elif isinstance(query, bytes):
            query = query.decode("latin-1")
        norm = normalize_path(path)
        req = _Request(method, host, norm, headers, query, self._wanted)
        routes = self.routes
        regex_path = self._regex_path
        for i in self._candidates(norm):
            route = routes[i]
            if route.matcher.test(req, path=regex_path[i]):
                rewrite = route.rewrite
                if rewrite is None:
                    return RouteMatch(route, norm, host, query)
                return RouteMatch(route, rewrite.path_for(norm, route.matcher.path),
                                  rewrite.host or host, query)
        return None

    def _candidates(self, path: str) -> Iterable[int]:
        """Indices of routes whose exact or prefix path takes ``path``, and of routes the
        index cannot rule out, in declared order."""
        exact = self._exact.get(path)
        hits = [exact] if exact else []
        size = len(path)
        for length in self._prefix_lengths:
            if length > size:
                break
            if length == size or path[length] == "/":
                hit = self._prefix.get(path[:length])
                if hit:
                    hits.append(hit)
        if not hits:
            return self._always
        if len(hits) == 1:
            return hits[0]
        return sorted(set(chain.from_iterable(hits)))


_UNDECIDED: Any = object()


def _check_overlaps(routes: Sequence[Route]) -> list[Overlap]:
    """Raise naming every shadowed route; return the partial overlaps."""
    shadowed: list[str] = []
    overlaps: list[Overlap] = []
    related = _path_candidates(routes)
    for j, later in enumerate(routes):
        for i in related(j):
            earlier = routes[i]
            rels = earlier.matcher.relations(later.matcher)
            if Relation.DISJOINT in rels:
                continue
            if all(r in (Relation.EQUAL, Relation.COVERS) for r in rels):
                shadowed.append(
                    f"{later.label} [{later.matcher.describe()}] can never match: "
                    f"{earlier.label} [{earlier.matcher.describe()}] comes first and takes "
                    "every request it would; put the more specific route first")
                break
            if all(r in (Relation.EQUAL, Relation.INSIDE) for r in rels):
                continue  # the earlier route is narrower: the usual "specific first"
            if rels[_PATH] is Relation.INSIDE and Relation.UNKNOWN not in rels:
                continue  # a narrower path first is how first-match-wins tables read
            overlaps.append(Overlap(earlier, later, Relation.UNKNOWN not in rels))
    if shadowed:
        raise ConfigError("; ".join(shadowed))
    return overlaps



def _path_candidates(routes: Sequence[Route]) -> Callable[[int], list[int]]:
    """For route ``j``, the earlier routes whose path condition is not provably disjoint
    from its own, in declared order: any-path and regex routes, and exact or prefix paths
    that are a segment-ancestor of, equal to, or (for a prefix) under its path. Every other
    pair is DISJOINT on the path, so the overlap check skips it (near-linear, not
    quadratic, for the usual table of distinct prefixes)."""
    by_value: dict[str, list[int]] = {}
    wild: list[int] = []
    for i, route in enumerate(routes):
        path = route.matcher.path
        if path.kind in ("exact", "prefix"):
            by_value.setdefault(path.value, []).append(i)
        else:
            wild.append(i)
    values = sorted(by_value)

    def related(j: int) -> list[int]:
        path = routes[j].matcher.path
        if path.kind not in ("exact", "prefix"):
            return list(range(j))
        v = path.value
        found = {i for i in wild if i < j}
        for k in [k for k, c in enumerate(v) if c == "/" and k] + [len(v)]:
            found.update(i for i in by_value.get(v[:k], ()) if i < j)
        if path.kind == "prefix":
            lo, hi = bisect.bisect_left(values, v + "/"), bisect.bisect_left(values, v + "0")
            for value in values[lo:hi]:
                found.update(i for i in by_value[value] if i < j)
        return sorted(found)

    return related
