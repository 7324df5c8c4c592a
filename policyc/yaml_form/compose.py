"""Steps 1 and 2 of the YAML reader: compose the text into PyYAML's node graph (bounded in nodes and
depth, comments kept), then convert it into the positioned value tree (`PMap`, `PSeq`, `PScalar`,
each with its 1-based line and column) and, in the same walk, the plain tree the JSON Schema sees.

The bounded loader is shared with the scenario loader (runtime/sim/scenario.py); `describe_value`
and `show_value` word a value the same way for every step's messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .. import syntax as S
from ..diagnostics import Diagnostics, Span

__all__ = ["MAX_DOCUMENT_BYTES", "MAX_NODES", "MAX_DEPTH", "REGISTERS", "INT_TAG", "BoundedLoader",
           "YamlBoundError", "PNode", "PScalar", "PMap", "PSeq", "PValue", "Tree", "read_tree",
           "describe_yaml_error", "mark_span", "json_type", "show_value", "describe_value"]

# Bounds on what a YAML policy may cost to read.
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024  # the text, UTF-8 encoded (PC202)
MAX_NODES = 200_000                   # nodes written, and nodes after alias expansion (PC202)
MAX_DEPTH = 64                        # nesting of mappings and lists (PC203)

# Register names: reserved, never region names (docs/YAML.md).
REGISTERS = ("cr0", "cr3", "cr4", "xcr0", "idtr", "gdtr", "ldtr", "tr")

_T = "tag:yaml.org,2002:"
_STR, _INT, _BOOL, _NULL, _FLOAT = _T + "str", _T + "int", _T + "bool", _T + "null", _T + "float"
_MAP, _SEQ, _MERGE, _VALUE, _TIMESTAMP = _T + "map", _T + "seq", _T + "merge", _T + "value", _T + "timestamp"
INT_TAG = _INT  # the builder keeps an integer's radix
_SCALAR_TAGS = {_STR, _INT, _BOOL, _NULL, _FLOAT, _MERGE, _VALUE, _TIMESTAMP}
_BOOL_VALUES = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False}


# ---------------------------------------------------------------- positioned values

class PNode:
    __slots__ = ("line", "col", "end_line", "end_col", "plain")

    def span(self, path: str) -> Span:
        if self.end_line is not None:
            return Span(path, self.line, self.col, self.end_line, self.end_col)
        return Span(path, self.line, self.col)


class PScalar(PNode):
    """A scalar: its resolved value, its source text and style (None = plain, ' \" | >)."""
    __slots__ = ("value", "text", "style", "index", "tag")

    def __init__(self, value: Any, node: ScalarNode) -> None:
        self.value = self.plain = value
        self.text = node.value
        self.style = node.style
        self.tag = node.tag
        self.index = node.start_mark.index
        self.line, self.col = node.start_mark.line + 1, node.start_mark.column + 1
        end = node.end_mark
        if end is not None and end.line == node.start_mark.line and end.column > node.start_mark.column:
            self.end_line, self.end_col = end.line + 1, end.column
        else:
            self.end_line = self.end_col = None


class PMap(PNode):
    """A mapping: key text -> (key scalar, value), in source order."""
    __slots__ = ("entries",)

    def __init__(self, node: Node, entries: dict[str, tuple[PScalar, "PValue"]]) -> None:
        self.entries = entries
        self.plain = {k: v.plain for k, (_, v) in entries.items()}
        self.line, self.col = node.start_mark.line + 1, node.start_mark.column + 1
        self.end_line = self.end_col = None

    def get(self, key: str) -> "PValue | None":
        hit = self.entries.get(key)
        return hit[1] if hit else None

    def __contains__(self, key: str) -> bool:
        return key in self.entries


class PSeq(PNode):
    __slots__ = ("items",)

    def __init__(self, node: Node, items: list["PValue"]) -> None:
        self.items = items
        self.plain = [i.plain for i in items]
        self.line, self.col = node.start_mark.line + 1, node.start_mark.column + 1
        self.end_line = self.end_col = None


PValue = Union[PScalar, PMap, PSeq]


@dataclass
class Tree:
    """A document read and converted: its root mapping, its comments, and whether duplicate keys were
    reported (the schema still checks the rest; nothing is built)."""
    root: PMap
    comments: list[S.Comment]
    duplicates: bool


def read_tree(text: str, path: str, diagnostics: Diagnostics) -> Tree | None:
    """Compose and convert a YAML policy; None when there is nothing the schema could check (every
    reason is reported)."""
    if len(text) > MAX_DOCUMENT_BYTES or (
            len(text) * 4 > MAX_DOCUMENT_BYTES
            and len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES):
        diagnostics.error("PC202", Span(path, 1, 1),
                          f"YAML document is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB")
        return None

    loader = None
    try:
        loader = BoundedLoader(text)
        composed = _within_bounds(lambda: _compose(loader, path, text, diagnostics), path, text, diagnostics)
    except yaml.YAMLError as err:
        _yaml_error(err, path, text, diagnostics)
        return None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, UnicodeError) as err:
        # PyYAML's pure-Python reader can trip on odd input in ways it does not wrap.
        diagnostics.error("PC200", Span(path, 1, 1), f"the YAML text cannot be read: {err}")
        return None
    finally:
        if loader is not None:
            try:
                loader.dispose()
            except Exception:  # pragma: no cover - disposing never matters for the result
                pass
    if composed is None or composed[0] is None:
        return None
    root, comments = composed

    converter = _Converter(path, diagnostics)
    tree = _within_bounds(lambda: converter.convert(root, 1), path, text, diagnostics)
    if tree is None:
        return None
    if converter.blocking:
        return None
    if not isinstance(tree, PMap):
        got = "a list" if isinstance(tree, PSeq) else f"the scalar {show_value(tree.value)}"
        diagnostics.error("PC201", tree.span(path), f"a YAML policy is a mapping (policy:, target:, rules: ...), "
                          f"but this document is {got}",
                          "start with 'policy: NAME' and the keys of docs/YAML.md")
        return None
    return Tree(tree, comments, converter.duplicates)


def _within_bounds(step: Callable[[], Any], path: str, text: str, diagnostics: Diagnostics) -> Any:
    """`step()`, or None when a bound stopped it (reported)."""
    try:
        return step()
    except YamlBoundError as stop:
        diagnostics.error(stop.code, mark_span(path, stop.mark, text), stop.message, stop.hint)
    except RecursionError:
        diagnostics.error("PC203", Span(path, 1, 1), "YAML nesting is too deep")
    return None


def _compose(loader: BoundedLoader, path: str, text: str, diagnostics: Diagnostics):
    """The single document's root node (None when there is nothing to read) and the comments."""
    loader.get_event()  # STREAM-START
    if loader.check_event(yaml.StreamEndEvent):
        diagnostics.error("PC102", Span(path, 1, 1), "empty YAML policy file",
                          "a policy starts with 'policy: NAME'; see docs/YAML.md")
        return None, []
    root = loader.compose_document()
    if not loader.check_event(yaml.StreamEndEvent):
        event = loader.peek_event()
        diagnostics.error("PC205", mark_span(path, event.start_mark), "more than one YAML document in the file",
                          "a policy file holds one document: remove the '---' separator or split the file")
        return None, []
    comments = [S.Comment(c, Span(path, line, col)) for line, col, c in loader.comments]
    if isinstance(root, ScalarNode) and root.tag == _NULL and root.value == "":
        diagnostics.error("PC102", mark_span(path, root.start_mark), "empty YAML policy file",
                          "a policy starts with 'policy: NAME'; see docs/YAML.md")
        return None, []
    return root, comments


# ---------------------------------------------------------------- describing values

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "string")


def show_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return str(value)


def describe_value(node: PValue | None, value: Any) -> str:
    kind = json_type(value)
    if kind == "null":
        return "nothing (null)"
    if kind == "object":
        return "a mapping"
    if kind == "array":
        return "a list"
    text = node.text if isinstance(node, PScalar) else show_value(value)
    if kind == "number":
        return f"the float {text}"
    if kind == "boolean":
        return f"the boolean {text}"
    if kind == "integer":
        return f"the integer {text}"
    return f"the string {show_value(value)}"


# ---------------------------------------------------------------- composing

class YamlBoundError(Exception):
    """A bound was hit: report it and stop reading the file."""

    def __init__(self, code: str, mark: Any, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.mark, self.message, self.hint = code, mark, message, hint


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts nodes and depth, and whose scanner keeps comments."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.node_count = 0
        self.depth = 0
        self.comments: list[tuple[int, int, str]] = []

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML's hook
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self.node_count += 1
        if self.node_count > MAX_NODES:
            raise YamlBoundError("PC202", self.peek_event().start_mark,
                                 f"YAML document has more than {MAX_NODES:,} nodes",
                                 "a policy this large is almost certainly generated by mistake")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise YamlBoundError("PC203", self.peek_event().start_mark,
                                     f"YAML nesting is deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def scan_to_next_token(self):
        # PyYAML's loop, keeping the comments it skips (the formatter puts them back).
        if self.index == 0 and self.peek() == "\uFEFF":
            self.forward()
        found = False
        while not found:
            while self.peek() == " ":
                self.forward()
            if self.peek() == "#":
                line, col, start = self.line, self.column, self.index
                length = 0
                while self.peek(length) not in "\0\r\n\x85\u2028\u2029":
                    length += 1
                text = self.prefix(length)
                self.forward(length)
                if len(self.comments) < MAX_NODES:
                    self.comments.append((line + 1, col + 1, text.rstrip()))
            if self.scan_line_break():
                if not self.flow_level:
                    self.allow_simple_key = True
            else:
                found = True


# The bounded reader under public names: the scenario loader (runtime/sim/scenario.py) shares it.

def mark_span(path: str, mark: Any, text: str | None = None) -> Span:
    if mark is None:
        return Span(path, 1, 1)
    line, col = getattr(mark, "line", None), getattr(mark, "column", None)
    if line is None or col is None:
        index = getattr(mark, "index", None) or getattr(mark, "position", None)
        if text is not None and isinstance(index, int):
            line = text.count("\n", 0, index)
            col = index - (text.rfind("\n", 0, index) + 1)
        else:
            line, col = 0, 0
    return Span(path, line + 1, col + 1)


def _yaml_error(err: yaml.YAMLError, path: str, text: str, diagnostics: Diagnostics) -> None:
    message, span, hint = describe_yaml_error(err, path, text)
    diagnostics.error("PC200", span, message, hint)


def describe_yaml_error(err: yaml.YAMLError, path: str, text: str) -> tuple[str, Span, str | None]:
    """PyYAML's error as (message, where, hint): the reader's too (a character YAML refuses, which
    has an index into the text rather than a line and column)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None and isinstance(err, yaml.reader.ReaderError):
        ch = err.character
        shown = f"#x{ord(ch):04x}" if isinstance(ch, str) else f"#x{ch:02x}"
        problem = f"unacceptable character {shown}: special characters are not allowed"
        mark = err
    context = getattr(err, "context", None)
    message = problem or str(err).splitlines()[0]
    hint = None
    if context:
        cmark = getattr(err, "context_mark", None)
        hint = context + (f" at line {cmark.line + 1}, column {cmark.column + 1}" if cmark is not None else "")
    if "'\\t'" in message:
        hint = (hint + "; " if hint else "") + "YAML indentation uses spaces, not tabs"
    return message, mark_span(path, mark, text), hint


def _kind(node: Node) -> str:
    return {ScalarNode: "scalar", SequenceNode: "list", MappingNode: "mapping"}.get(type(node), "node")


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_T):] if tag.startswith(_T) else tag


def _yaml_int(text: str) -> int:
    """YAML 1.1 integers as SafeLoader constructs them (0x.., 0b.., 0NNN octal, 1:30 base 60, _ separators)."""
    value = text.replace("_", "")
    sign = 1
    if value[:1] == "-":
        sign = -1
    if value[:1] in "+-":
        value = value[1:]
    if value == "0":
        return 0
    if value.startswith("0b"):
        return sign * int(value[2:], 2)
    if value.startswith("0x"):
        return sign * int(value[2:], 16)
    if value.startswith("0") and ":" not in value:
        return sign * int(value, 8)
    if ":" in value:
        digits = [int(part) for part in value.split(":")]
        total, base = 0, 1
        for d in reversed(digits):
            total += d * base
            base *= 60
        return sign * total
    return sign * int(value)



def _yaml_float(text: str) -> float:
    t = text.replace("_", "").lower()
    if t in (".inf", "+.inf"):
        return math.inf
    if t == "-.inf":
        return -math.inf
    try:
        return float(t)
    except ValueError:
        return math.nan


class _Converter:
    """Node graph -> positioned tree and plain tree, counting alias expansion."""

    _BY_KIND: dict[type, Any]  # node class -> its converter (set below the class)

    def __init__(self, path: str, diagnostics: Diagnostics) -> None:
        self.path = path
        self.diagnostics = diagnostics
        self.count = 0
        self.memo: dict[int, tuple[PValue, int, int]] = {}
        self.active: set[int] = set()
        self.blocking = False  # an error after which the tree must not be used
        self.duplicates = False  # reported; the schema still checks the rest, nothing is built

    def _span(self, node: Node) -> Span:
        return mark_span(self.path, node.start_mark)

    def _charge(self, n: int, node: Node) -> None:
        self.count += n
        if self.count > MAX_NODES:
            raise YamlBoundError("PC202", node.start_mark,
                                 f"alias expansion exceeds {MAX_NODES:,} nodes",
                                 "aliases (*name) repeat their anchor's whole content; a policy never needs this many")

    def convert(self, node: Node, depth: int) -> PValue:
        nid = id(node)
        hit = self.memo.get(nid)
        if hit is not None:
            pnode, size, height = hit
            self._charge(size, node)
            if depth + height - 1 > MAX_DEPTH:
                raise YamlBoundError("PC203", node.start_mark,
                                     f"YAML nesting (through aliases) is deeper than {MAX_DEPTH} levels")
            return pnode
        if nid in self.active:
            raise YamlBoundError("PC202", node.start_mark,
                                 "an alias refers to a node that contains it: its expansion never ends")
        if depth > MAX_DEPTH:
            raise YamlBoundError("PC203", node.start_mark, f"YAML nesting is deeper than {MAX_DEPTH} levels")
        self.active.add(nid)
        before = self.count
        self._charge(1, node)
        convert_kind = self._BY_KIND.get(type(node))
        if convert_kind is None:  # pragma: no cover - PyYAML has no other node kinds
            raise YamlBoundError("PC205", node.start_mark, "unsupported YAML node")
        pnode, height = convert_kind(self, node, depth)
        self.active.discard(nid)
        self.memo[nid] = (pnode, self.count - before, height)
        return pnode

    def _scalar_node(self, node: ScalarNode, depth: int) -> tuple[PScalar, int]:
        return self._scalar(node), 1

    def _sequence(self, node: SequenceNode, depth: int) -> tuple[PSeq, int]:
        if node.tag != _SEQ:
            self._bad_tag(node)
        items = []
        height = 1
        for child in node.value:
            items.append(self.convert(child, depth + 1))
            height = max(height, 1 + self.memo[id(child)][2])
        return PSeq(node, items), height

    def _bad_tag(self, node: Node) -> None:
        self.blocking = True
        tag = _short_tag(node.tag or "?")
        self.diagnostics.error(
            "PC205", self._span(node), f"unsupported YAML tag '{tag}' on a {_kind(node)}",
            "policies use plain YAML only: strings, integers, booleans, mappings and lists; "
            "tags never construct objects here")

    def _scalar(self, node: ScalarNode) -> PScalar:
        tag, text = node.tag, node.value
        value: Any = text
        if tag in (_STR, _MERGE, _VALUE, _TIMESTAMP):
            value = text
        elif tag == _NULL:
            value = None
        elif tag == _BOOL:
            value = _BOOL_VALUES.get(text.lower())
            if value is None:
                self.blocking = True
                self.diagnostics.error("PC205", self._span(node), f"'{text}' cannot be read as a boolean (!!bool)",
                                       "booleans are true/false (also yes/no, on/off)")
        elif tag == _INT:
            try:
                value = _yaml_int(text)
            except (ValueError, IndexError):
                self.blocking = True
                too_long = len(text) > 1000
                self.diagnostics.error("PC114", self._span(node),
                                       "integer literal is too long" if too_long else f"invalid integer '{text[:40]}'",
                                       None if too_long else "integers are decimal, 0x hex, 0b binary or 0o octal")
                value = 0
        elif tag == _FLOAT:
            value = _yaml_float(text)
        else:
            self._bad_tag(node)
            value = None
        return PScalar(value, node)

    def _key(self, knode: Node) -> PScalar | None:
        if not isinstance(knode, ScalarNode):
            self.blocking = True
            self.diagnostics.error("PC205", self._span(knode), f"a {_kind(knode)} used as a mapping key",
                                   "keys are plain names such as 'rules' or 'size'")
            return None
        if knode.tag not in _SCALAR_TAGS:
            self._bad_tag(knode)
            return None
        return PScalar(knode.value, knode)  # keys keep their text: `on:` is the key "on", not true

    def _mapping(self, node: MappingNode, depth: int) -> tuple[PMap, int]:
        if node.tag != _MAP:
            self._bad_tag(node)
        entries: dict[str, tuple[PScalar, PValue]] = {}
        merged: dict[str, tuple[PScalar, PValue]] = {}
        height = 1
        for knode, vnode in node.value:
            if isinstance(knode, ScalarNode) and knode.tag == _MERGE and knode.style is None:
                height = max(height, self._merge(vnode, depth, merged))
                continue
            key = self._key(knode)
            value = self.convert(vnode, depth + 1)
            height = max(height, 1 + self.memo[id(vnode)][2])
            if key is None:
                continue
            first = entries.get(key.value)
            if first is not None:
                self.duplicates = True
                self.diagnostics.error(
                    "PC204", Span(self.path, key.line, key.col, key.end_line, key.end_col),
                    f"duplicate key '{key.value}'",
                    f"'{key.value}' is already set at line {first[0].line}, column {first[0].col}; "
                    "a key may appear once in a mapping")
                continue
            entries[key.value] = (key, value)
        if merged:
            entries = {**{k: v for k, v in merged.items() if k not in entries}, **entries}
        return PMap(node, entries), height

    def _merge(self, vnode: Node, depth: int, merged: dict) -> int:
        """`<<: *base` or `<<: [*a, *b]`: keys not written here come from the merged mappings."""
        sources = [vnode]
        if isinstance(vnode, SequenceNode):
            self._charge(1, vnode)
            sources = list(vnode.value)
        height = 1
        for src in sources:
            if not isinstance(src, MappingNode):
                self.blocking = True
                self.diagnostics.error("PC205", self._span(src), f"a merge key ('<<') takes a mapping or a list of "
                                       f"mappings, not a {_kind(src)}")
                continue
            psrc = self.convert(src, depth + 1)
            height = max(height, self.memo[id(src)][2])
            if isinstance(psrc, PMap):
                for k, entry in psrc.entries.items():
                    merged.setdefault(k, entry)
        return height


# ---------------------------------------------------------------- the entry point


# One converter per kind of PyYAML node (the composer makes exactly these classes).
_Converter._BY_KIND = {ScalarNode: _Converter._scalar_node, SequenceNode: _Converter._sequence,
                       MappingNode: _Converter._mapping}
