"""Shoal's one YAML loader for config (the manifest, the gateway section, the Store's routes):
``load_yaml(text, source)`` returns plain data and, for every key and list item, the line it
was written on, so a config error can say where it is (``YamlError``: source, line, message).

Hostile input is refused with a ``ConfigError`` naming the source and the line, never by
exhausting the machine: documents over ``MAX_YAML_BYTES``, more than ``MAX_YAML_NODES`` nodes
visited (aliases count each time they are expanded, so a "billion laughs" stops early),
nesting deeper than ``MAX_YAML_DEPTH``, several documents, tags outside YAML's safe core
(``!!python/object`` and friends), keys that are not strings, and a key given twice
(PyYAML would silently keep the last one). Merge keys (``<<: *base``) are supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from shoal.errors import ConfigError

MAX_YAML_BYTES = 1024 * 1024
"""Largest config document read (1 MiB: the Store's value limit too)."""
MAX_YAML_NODES = 100_000
"""Most nodes built from one document, alias expansions included."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of mappings and lists."""

Path = tuple[str | int, ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~7x
_BRACKETS = re.compile(r"[^\[\]{}]+")
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_SCALARS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null",
                                                "timestamp", "binary")}


@dataclass(slots=True)
class YamlDocument:
    """Plain data (dicts, lists, scalars) and the line of every key and list item."""

    data: Any
    source: str  # "shoal.yaml" or "store key 'shoal/gateway/routes'"
    lines: dict[Path, int] = field(default_factory=dict)

    def line(self, path: Path) -> int:
        """The line of ``path``, or of its nearest parent that has one (else 1)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def error(self, path: Path, message: str) -> YamlError:
        """A config error naming the source and the line of ``path``."""
        return YamlError(self.source, self.line(path), message)


class YamlError(ConfigError):
    """A config error placed in a document: ``source``, ``line`` (None: the whole document)
    and ``message``; reads ``"shoal.yaml, line 3: gateway.listen: ..."``."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        super().__init__(f"{source}, line {line}: {message}" if line is not None
                         else f"{source}: {message}")
        self.source = source
        self.line = line
        self.message = message


def dotted(path: Path) -> str:
    """``("gateway", "routes", 2, "match")`` -> ``gateway.routes[2].match``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def load_yaml(text: str | bytes, source: str) -> YamlDocument:
    """Parse one YAML document with line marks (see the module docstring)."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlError(source, None, f"{len(text)} bytes, more than the limit of "
                                      f"{MAX_YAML_BYTES} (1 MiB)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[:exc.start].count(b"\n") + 1
            raise YamlError(source, line, "not valid UTF-8") from None
    _check_flow_depth(text, source)
    doc = YamlDocument(None, source, {(): 1})
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            doc.data = _Builder(loader, doc).build(node, (), 0)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        if "expected a single document" in str(exc.context):
            problem = "more than one document (one config per file)"
        raise YamlError(source, line, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise YamlError(source, None, f"not valid YAML: {exc}") from None
    except RecursionError:
        raise YamlError(source, None, f"nested too deeply (more than {MAX_YAML_DEPTH} "
                                      "levels)") from None
    finally:
        loader.dispose()
    return doc


def _check_flow_depth(text: str, source: str) -> None:
    """Refuse ``[[[[...`` deeper than ``MAX_YAML_DEPTH`` before parsing: libyaml recurses
    on the C stack and crashes the process on a few tens of thousands of levels. (Counted
    over every bracket, quoted or not: a config never nests that deep.) Block nesting is
    bounded by the size limit (each level costs one more space of indentation)."""
    depth = 0
    for i, char in enumerate(_BRACKETS.sub("", text)):
        depth += 1 if char in "[{" else -1
        if depth > MAX_YAML_DEPTH:
            line = text[:_nth_bracket(text, i)].count("\n") + 1
            raise YamlError(source, line, f"nested more than {MAX_YAML_DEPTH} levels deep")
        depth = max(depth, 0)


def _nth_bracket(text: str, n: int) -> int:
    """The index in ``text`` of its ``n``-th bracket character (0-based)."""
    for m in re.finditer(r"[\[\]{}]", text):
        if n == 0:
            return m.start()
        n -= 1
    return len(text)


class _Builder:
    def __init__(self, loader: Any, doc: YamlDocument) -> None:
        self.loader = loader
        self.doc = doc
        self.budget = MAX_YAML_NODES

    def _fail(self, node: yaml.Node, message: str) -> YamlError:
        return YamlError(self.doc.source, node.start_mark.line + 1, message)

    def build(self, node: yaml.Node, path: Path, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise self._fail(node, f"more than {MAX_YAML_NODES} values (alias expansion?); "
                             "refused")
        if depth > MAX_YAML_DEPTH:
            raise self._fail(node, f"nested more than {MAX_YAML_DEPTH} levels deep")
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALARS:
                raise self._fail(node, f"unsupported tag {node.tag!r} (plain YAML only: no "
                                 "!!python or custom tags)")
            return self.loader.construct_object(node)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                raise self._fail(node, f"unsupported tag {node.tag!r} (plain lists only)")
            out = []
            for i, item in enumerate(node.value):
                self.doc.lines.setdefault((*path, i), item.start_mark.line + 1)
                out.append(self.build(item, (*path, i), depth + 1))
            return out
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                raise self._fail(node, f"unsupported tag {node.tag!r} (plain mappings only)")
            pairs = self._pairs(node)
            data: dict[str, Any] = {}
            for key_node, value_node in pairs:
                key = self.build(key_node, path, depth + 1)
                where = dotted(path) or "the top level"
                if not isinstance(key, str):
                    raise self._fail(key_node, f"{where}: keys must be strings, got "
                                     f"{type(key).__name__} {key!r}")
                if key in data:
                    raise self._fail(key_node, f"{dotted((*path, key))}: given twice (first on "
                                     f"line {self.doc.lines.get((*path, key), '?')})")
                self.doc.lines[(*path, key)] = key_node.start_mark.line + 1
                data[key] = self.build(value_node, (*path, key), depth + 1)
            return data
        raise self._fail(node, f"unsupported YAML node {type(node).__name__}")

    def _pairs(self, node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
        """The node's own pairs, after the pairs merge keys bring that it does not set
        itself (the last merged mapping wins among them, as PyYAML's merge does)."""
        own = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]
        if len(own) == len(node.value):
            return own
        self.loader.flatten_mapping(node)  # node.value: merged pairs, then its own
        merged = node.value[:len(node.value) - len(own)]
        own_keys = {k.value for k, _ in own if isinstance(k, yaml.ScalarNode)}
        last: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in merged:
            if isinstance(k, yaml.ScalarNode) and k.value not in own_keys:
                last.pop(k.value, None)
                last[k.value] = (k, v)
        node.value = [*last.values(), *own]  # an alias to this node sees it merged once
        return node.value
