"""The YAML front end: YAML text -> syntax tree, or diagnostics.

The YAML spelling (docs/YAML.md) says what the DSL says, so this module ends
in the same `policyc.syntax` nodes the DSL parser builds. It runs in four
steps, each of which only reports (it never raises on bad input):

1. Compose. PyYAML's SafeLoader scans, parses and composes the text into a
   node graph with positions; nothing is constructed from tags. The composer
   is bounded: the number of nodes written and the nesting depth are counted
   while composing, so an oversized or absurdly deep file stops early.
2. Convert. The node graph becomes a positioned value tree (`_PMap`,
   `_PSeq`, `_PScalar`, each with its 1-based line and column) and, in the
   same walk, the plain value tree (dicts, lists, str, int, bool, None,
   float) the JSON Schema sees. Scalars are resolved as YAML 1.1 / SafeLoader
   resolves them (so `on:` would be a boolean as a *value*; mapping keys keep
   their text). Aliases are expanded by sharing already converted subtrees:
   the expansion is counted (each reuse adds the reused subtree's size) and
   refused past `MAX_NODES`, so a "billion laughs" file costs a few
   microseconds and no memory. Duplicate keys, non-standard tags and
   recursive aliases are reported here.
3. Validate against `policyc/schemas/policy.schema.json` (Draft 2020-12),
   reporting every error at the line:column of the offending node, with one
   readable message per `anyOf` (the branch is picked by the keys present).
4. Build syntax nodes, exactly as the DSL builder builds them for the same
   policy; expression strings go through `policyc.dsl.parse_expression`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import syntax as S
from .diagnostics import Diagnostics, Span, closest_names
from .schema_subset import accepts

__all__ = [
    "parse_yaml_text",
    "policy_schema",
    "MAX_DOCUMENT_BYTES",
    "MAX_NODES",
    "MAX_DEPTH",
    "BoundedLoader",
    "YamlBoundError",
    "REGISTERS",
]

# Bounds on what a YAML policy may cost to read.
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024  # the text, UTF-8 encoded (PC202)
MAX_NODES = 200_000                   # nodes written, and nodes after alias expansion (PC202)
MAX_DEPTH = 64                        # nesting of mappings and lists (PC203)
MAX_EXPR_DEPTH = 200                  # nesting of one expression string (PC203)

# Register names: reserved, never region names (docs/YAML.md).
REGISTERS = ("cr0", "cr3", "cr4", "xcr0", "idtr", "gdtr", "ldtr", "tr")

_T = "tag:yaml.org,2002:"
_STR, _INT, _BOOL, _NULL, _FLOAT = _T + "str", _T + "int", _T + "bool", _T + "null", _T + "float"
_MAP, _SEQ, _MERGE, _VALUE, _TIMESTAMP = _T + "map", _T + "seq", _T + "merge", _T + "value", _T + "timestamp"
_SCALAR_TAGS = {_STR, _INT, _BOOL, _NULL, _FLOAT, _MERGE, _VALUE, _TIMESTAMP}
_BOOL_VALUES = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FLOAT_TEXT = re.compile(r"\s*[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*|[0-9][0-9_]*(?=[eE]))"
                         r"(?:[eE][-+]?[0-9]+)?\s*\Z")
_VERSION = re.compile(r"\s*(==|!=|<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)*)\s*\Z")


# ---------------------------------------------------------------- the schema

@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    try:
        return resources.files("policyc").joinpath("schemas").joinpath("policy.schema.json").read_text("utf-8")
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError, TypeError, AttributeError):
        return (Path(__file__).parent / "schemas" / "policy.schema.json").read_text("utf-8")


def policy_schema() -> dict:
    """The JSON Schema (Draft 2020-12) of the YAML spelling, as a fresh dict (cached text)."""
    return json.loads(_schema_text())


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The schema, parsed once (shared: not to be changed)."""
    return policy_schema()


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts 4000.0 as an integer; YAML's 4.0e+3 is a float and has no place in a policy.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    strict = validators.extend(Draft202012Validator, type_checker=checker)
    return strict(_schema())


# ---------------------------------------------------------------- positioned values

class _PNode:
    __slots__ = ("line", "col", "end_line", "end_col", "plain")

    def span(self, path: str) -> Span:
        if self.end_line is not None:
            return Span(path, self.line, self.col, self.end_line, self.end_col)
        return Span(path, self.line, self.col)


class _PScalar(_PNode):
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


class _PMap(_PNode):
    """A mapping: key text -> (key scalar, value), in source order."""
    __slots__ = ("entries",)

    def __init__(self, node: Node, entries: dict[str, tuple[_PScalar, "_P"]]) -> None:
        self.entries = entries
        self.plain = {k: v.plain for k, (_, v) in entries.items()}
        self.line, self.col = node.start_mark.line + 1, node.start_mark.column + 1
        self.end_line = self.end_col = None

    def get(self, key: str) -> "_P | None":
        hit = self.entries.get(key)
        return hit[1] if hit else None

    def __contains__(self, key: str) -> bool:
        return key in self.entries


class _PSeq(_PNode):
    __slots__ = ("items",)

    def __init__(self, node: Node, items: list["_P"]) -> None:
        self.items = items
        self.plain = [i.plain for i in items]
        self.line, self.col = node.start_mark.line + 1, node.start_mark.column + 1
        self.end_line = self.end_col = None


_P = Union[_PScalar, _PMap, _PSeq]


# ---------------------------------------------------------------- composing

class _Stop(Exception):
    """A bound was hit: report it and stop reading the file."""

    def __init__(self, code: str, mark: Any, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.mark, self.message, self.hint = code, mark, message, hint


class _Loader(yaml.SafeLoader):
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
            raise _Stop("PC202", self.peek_event().start_mark,
                        f"YAML document has more than {MAX_NODES:,} nodes",
                        "a policy this large is almost certainly generated by mistake")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Stop("PC203", self.peek_event().start_mark,
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
BoundedLoader = _Loader
YamlBoundError = _Stop


def _mark_span(path: str, mark: Any, text: str | None = None) -> Span:
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
    return message, _mark_span(path, mark, text), hint


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


def _radix(text: str) -> int:
    t = text.replace("_", "").lstrip("+-").lower()
    if t.startswith("0x"):
        return 16
    if t.startswith("0b"):
        return 2
    if t.startswith("0o") or (t.startswith("0") and len(t) > 1 and t.isdigit()):
        return 8
    return 10


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

    def __init__(self, path: str, diagnostics: Diagnostics) -> None:
        self.path = path
        self.diagnostics = diagnostics
        self.count = 0
        self.memo: dict[int, tuple[_P, int, int]] = {}
        self.active: set[int] = set()
        self.blocking = False  # an error after which the tree must not be used
        self.duplicates = False  # reported; the schema still checks the rest, nothing is built

    def _span(self, node: Node) -> Span:
        return _mark_span(self.path, node.start_mark)

    def _charge(self, n: int, node: Node) -> None:
        self.count += n
        if self.count > MAX_NODES:
            raise _Stop("PC202", node.start_mark,
                        f"alias expansion exceeds {MAX_NODES:,} nodes",
                        "aliases (*name) repeat their anchor's whole content; a policy never needs this many")

    def convert(self, node: Node, depth: int) -> _P:
        nid = id(node)
        hit = self.memo.get(nid)
        if hit is not None:
            pnode, size, height = hit
            self._charge(size, node)
            if depth + height - 1 > MAX_DEPTH:
                raise _Stop("PC203", node.start_mark, f"YAML nesting (through aliases) is deeper than {MAX_DEPTH} levels")
            return pnode
        if nid in self.active:
            raise _Stop("PC202", node.start_mark, "an alias refers to a node that contains it: its expansion never ends")
        if depth > MAX_DEPTH:
            raise _Stop("PC203", node.start_mark, f"YAML nesting is deeper than {MAX_DEPTH} levels")
        self.active.add(nid)
        before = self.count
        self._charge(1, node)
        height = 1
        if isinstance(node, ScalarNode):
            pnode: _P = self._scalar(node)
        elif isinstance(node, SequenceNode):
            if node.tag != _SEQ:
                self._bad_tag(node)
            items = []
            for child in node.value:
                items.append(self.convert(child, depth + 1))
                height = max(height, 1 + self.memo[id(child)][2])
            pnode = _PSeq(node, items)
        elif isinstance(node, MappingNode):
            pnode, height = self._mapping(node, depth)
        else:  # pragma: no cover - PyYAML has no other node kinds
            raise _Stop("PC205", node.start_mark, "unsupported YAML node")
        self.active.discard(nid)
        self.memo[nid] = (pnode, self.count - before, height)
        return pnode

    def _bad_tag(self, node: Node) -> None:
        self.blocking = True
        tag = _short_tag(node.tag or "?")
        self.diagnostics.error(
            "PC205", self._span(node), f"unsupported YAML tag '{tag}' on a {_kind(node)}",
            "policies use plain YAML only: strings, integers, booleans, mappings and lists; "
            "tags never construct objects here")

    def _scalar(self, node: ScalarNode) -> _PScalar:
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
        return _PScalar(value, node)

    def _key(self, knode: Node) -> _PScalar | None:
        if not isinstance(knode, ScalarNode):
            self.blocking = True
            self.diagnostics.error("PC205", self._span(knode), f"a {_kind(knode)} used as a mapping key",
                                   "keys are plain names such as 'rules' or 'size'")
            return None
        if knode.tag not in _SCALAR_TAGS:
            self._bad_tag(knode)
            return None
        return _PScalar(knode.value, knode)  # keys keep their text: `on:` is the key "on", not true

    def _mapping(self, node: MappingNode, depth: int) -> tuple[_PMap, int]:
        if node.tag != _MAP:
            self._bad_tag(node)
        entries: dict[str, tuple[_PScalar, _P]] = {}
        merged: dict[str, tuple[_PScalar, _P]] = {}
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
        return _PMap(node, entries), height

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
            if isinstance(psrc, _PMap):
                for k, entry in psrc.entries.items():
                    merged.setdefault(k, entry)
        return height


# ---------------------------------------------------------------- the entry point

def parse_yaml_text(text: str, path: str, diagnostics: Diagnostics) -> S.PolicyFile:
    """Read a YAML policy. Problems go to `diagnostics`; the tree holds what could be built."""
    empty = S.PolicyFile(path, [], [], "yaml")
    if len(text) > MAX_DOCUMENT_BYTES or (
            len(text) * 4 > MAX_DOCUMENT_BYTES
            and len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES):
        diagnostics.error("PC202", Span(path, 1, 1),
                          f"YAML document is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB")
        return empty

    loader = None
    try:
        loader = _Loader(text)
        root, comments = _compose(loader, path, text, diagnostics)
    except _Stop as stop:
        diagnostics.error(stop.code, _mark_span(path, stop.mark, text), stop.message, stop.hint)
        return empty
    except RecursionError:
        diagnostics.error("PC203", Span(path, 1, 1), "YAML nesting is too deep")
        return empty
    except yaml.YAMLError as err:
        _yaml_error(err, path, text, diagnostics)
        return empty
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, UnicodeError) as err:
        # PyYAML's pure-Python reader can trip on odd input in ways it does not wrap.
        diagnostics.error("PC200", Span(path, 1, 1), f"the YAML text cannot be read: {err}")
        return empty
    finally:
        if loader is not None:
            try:
                loader.dispose()
            except Exception:  # pragma: no cover - disposing never matters for the result
                pass
    if root is None:
        return empty

    converter = _Converter(path, diagnostics)
    try:
        tree = converter.convert(root, 1)
    except _Stop as stop:
        diagnostics.error(stop.code, _mark_span(path, stop.mark, text), stop.message, stop.hint)
        return empty
    except RecursionError:
        diagnostics.error("PC203", Span(path, 1, 1), "YAML nesting is too deep")
        return empty
    if converter.blocking:
        return empty
    if not isinstance(tree, _PMap):
        got = "a list" if isinstance(tree, _PSeq) else f"the scalar {_show(tree.value)}"
        diagnostics.error("PC201", tree.span(path), f"a YAML policy is a mapping (policy:, target:, rules: ...), "
                          f"but this document is {got}",
                          "start with 'policy: NAME' and the keys of docs/YAML.md")
        return empty

    before = diagnostics.error_count
    _validate(tree, path, diagnostics)
    if diagnostics.error_count > before or converter.duplicates:
        return S.PolicyFile(path, [], comments, "yaml")
    try:
        return _Builder(path, text, diagnostics).file(tree, comments)
    except RecursionError:
        diagnostics.error("PC203", Span(path, 1, 1), "an expression is nested too deeply")
        return S.PolicyFile(path, [], comments, "yaml")


def _compose(loader: _Loader, path: str, text: str, diagnostics: Diagnostics):
    """The single document's root node (None when there is nothing to read) and the comments."""
    loader.get_event()  # STREAM-START
    if loader.check_event(yaml.StreamEndEvent):
        diagnostics.error("PC102", Span(path, 1, 1), "empty YAML policy file",
                          "a policy starts with 'policy: NAME'; see docs/YAML.md")
        return None, []
    root = loader.compose_document()
    if not loader.check_event(yaml.StreamEndEvent):
        event = loader.peek_event()
        diagnostics.error("PC205", _mark_span(path, event.start_mark), "more than one YAML document in the file",
                          "a policy file holds one document: remove the '---' separator or split the file")
        return None, []
    comments = [S.Comment(c, Span(path, line, col)) for line, col, c in loader.comments]
    if isinstance(root, ScalarNode) and root.tag == _NULL and root.value == "":
        diagnostics.error("PC102", _mark_span(path, root.start_mark), "empty YAML policy file",
                          "a policy starts with 'policy: NAME'; see docs/YAML.md")
        return None, []
    return root, comments


# ---------------------------------------------------------------- schema errors

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}
_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "boolean": "a boolean",
               "integer": "an integer", "number": "a number", "null": "nothing"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "string")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return str(value)


def _describe_value(node: _P | None, value: Any) -> str:
    kind = _json_type(value)
    if kind == "null":
        return "nothing (null)"
    if kind == "object":
        return "a mapping"
    if kind == "array":
        return "a list"
    text = node.text if isinstance(node, _PScalar) else _show(value)
    if kind == "number":
        return f"the float {text}"
    if kind == "boolean":
        return f"the boolean {text}"
    if kind == "integer":
        return f"the integer {text}"
    return f"the string {_show(value)}"


def _a(title: str) -> str:
    """'a region', 'an address', 'an MSR write'."""
    return ("an " if title[:1].lower() in "aeiou" or title.startswith(("MSR", "ISF")) else "a ") + title


def _dotted(path: Iterable) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _validate(tree: _PMap, path: str, diagnostics: Diagnostics) -> None:
    if accepts(_schema(), tree.plain):
        return  # certainly valid: jsonschema (a third of a check's start-up) is imported only to report
    try:
        errors = list(_validator().iter_errors(tree.plain))
    except RecursionError:
        diagnostics.error("PC203", tree.span(path), "the policy is nested too deeply to check")
        return
    reporter = _SchemaReporter(tree, path)
    found: list[tuple[Span, str, str | None]] = []
    for err in errors:
        found.extend(reporter.render(err))
    for span, message, hint in sorted(found, key=lambda f: (f[0].line, f[0].col)):
        diagnostics.error("PC201", span, message, hint)


class _SchemaReporter:
    """jsonschema errors -> (span, message, hint), one readable message per failed choice."""

    def __init__(self, tree: _PMap, path: str) -> None:
        self.tree = tree
        self.path = path
        self.schema = _validator().schema

    # -- locating
    def node_at(self, where: Iterable) -> _P:
        node: _P = self.tree
        for step in where:
            if isinstance(node, _PMap) and isinstance(step, str) and step in node.entries:
                node = node.entries[step][1]
            elif isinstance(node, _PSeq) and isinstance(step, int) and 0 <= step < len(node.items):
                node = node.items[step]
            else:
                break
        return node

    def key_at(self, where: Iterable, key: str) -> Span:
        node = self.node_at(where)
        if isinstance(node, _PMap) and key in node.entries:
            return node.entries[key][0].span(self.path)
        return node.span(self.path)

    # -- schema helpers
    def resolve(self, schema: Any) -> dict:
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 20:
            ref = schema["$ref"]
            if not ref.startswith("#/$defs/"):
                break
            schema = self.schema["$defs"].get(ref[len("#/$defs/"):], {})
            seen += 1
        return schema if isinstance(schema, dict) else {}

    def types(self, schema: Any) -> set[str] | None:
        """JSON types a schema can accept; None when it does not say."""
        schema = self.resolve(schema)
        if "type" in schema:
            t = schema["type"]
            return set(t) if isinstance(t, list) else {t}
        if "enum" in schema:
            return {_json_type(v) for v in schema["enum"]}
        if "const" in schema:
            return {_json_type(schema["const"])}
        for word in ("anyOf", "oneOf"):
            if word in schema:
                out: set[str] = set()
                for branch in schema[word]:
                    t = self.types(branch)
                    if t is None:
                        return None
                    out |= t
                return out
        return None

    def type_ok(self, schema: Any, value: Any) -> bool:
        t = self.types(schema)
        if t is None:
            return True
        kind = _json_type(value)
        return kind in t or (kind == "integer" and "number" in t)

    def keys(self, schema: Any) -> set[str]:
        schema = self.resolve(schema)
        out = set(schema.get("properties", {}))
        for word in ("anyOf", "oneOf"):
            for branch in schema.get(word, ()):
                out |= self.keys(branch)
        return out

    def required(self, schema: Any) -> set[str]:
        return set(self.resolve(schema).get("required", ()))

    def title(self, schema: Any, fallback: str = "value") -> str:
        return self.resolve(schema).get("title") or fallback

    # -- rendering
    def render(self, err) -> list[tuple[Span, str, str | None]]:
        if err.validator in ("anyOf", "oneOf"):
            return self.render_choice(err)
        return self.render_leaf(err)

    def render_many(self, errors: list) -> list[tuple[Span, str, str | None]]:
        # A missing key whose near-miss is present (`symbl:` for `symbol:`) is one mistake, not two.
        typos: set[tuple[tuple, str]] = set()
        for e in errors:
            if e.validator == "additionalProperties" and isinstance(e.instance, dict):
                allowed = list(e.schema.get("properties", {}))
                for extra in self.extras(e):
                    for near in closest_names(extra, allowed, limit=1):
                        typos.add((tuple(e.absolute_path), near))
        out = []
        for e in errors:
            if e.validator == "required" and isinstance(e.instance, dict):
                missing = self.missing(e)
                if missing and all((tuple(e.absolute_path), m) in typos for m in missing):
                    continue
            out.extend(self.render(e))
        return out

    def extras(self, err) -> list[str]:
        props = err.schema.get("properties", {})
        patterns = err.schema.get("patternProperties", {})
        return [k for k in err.instance
                if k not in props and not any(re.search(p, k) for p in patterns)]

    def missing(self, err) -> list[str]:
        return [k for k in err.validator_value if k not in err.instance]

    def render_choice(self, err) -> list[tuple[Span, str, str | None]]:
        value = err.instance
        node = self.node_at(err.absolute_path)
        branches = err.validator_value
        groups: dict[int, list] = defaultdict(list)
        for sub in err.context:
            if sub.relative_schema_path:
                groups[sub.relative_schema_path[0]].append(sub)
        title = self.title(err.schema, self.label(err.absolute_path))
        description = self.resolve(err.schema).get("description")
        fitting = [i for i, b in enumerate(branches) if self.type_ok(b, value) and groups.get(i)]
        prefix = self.where(err.absolute_path)
        if not fitting:
            titled = self.resolve(err.schema).get("title")
            expected = _a(titled) if titled else self.expected_words(err.schema)
            return [(node.span(self.path), f"{prefix}expected {expected}, got {_describe_value(node, value)}",
                     self.type_hint(node, value, err.absolute_path, description, self.type_ok(err.schema, 0)))]
        if len(fitting) == 1:
            return self.render_many(groups[fitting[0]])
        if isinstance(value, dict):
            def score(i: int) -> tuple:
                known = self.keys(branches[i])
                exact = sum(1 for k in value if k in known)
                near = sum(1 for k in value if k not in known and closest_names(k, known, limit=1))
                missing = len(self.required(branches[i]) - set(value))
                return (2 * exact + near, -missing, -self.weight(groups[i]), -i)
            best = max(fitting, key=score)
            if score(best)[0] == 0:
                # No branch knows any of these keys: one message for the whole choice.
                if not value:
                    return [(node.span(self.path), f"{prefix}empty mapping where {_a(title)} belongs", description)]
                keys = list(value)
                words = ", ".join(f"'{k}'" for k in keys)
                span = self.key_at(err.absolute_path, keys[0])
                return [(span, f"{prefix}unknown key{'s' if len(keys) > 1 else ''} {words} for {_a(title)}",
                         description)]
            return self.render_many(groups[best])
        # A scalar that several branches could take: prefer one with a near-miss suggestion.
        for i in fitting:
            for leaf in self.leaves(groups[i]):
                if leaf.validator == "enum" and isinstance(value, str) and \
                        closest_names(value, [str(v) for v in leaf.validator_value]):
                    return self.render_many([leaf])
        hint = description
        reserved = any(leaf.validator == "not" for i in fitting for leaf in self.leaves(groups[i]))
        if reserved and value in REGISTERS:
            hint = f"'{value}' is a register name, reserved: it cannot name a region. " + (description or "")
        return [(node.span(self.path), f"{prefix}{_show(value)} is not a valid {title}", hint)]

    def leaves(self, errors: list) -> list:
        out = []
        for e in errors:
            if e.context:
                out.extend(self.leaves(e.context))
            else:
                out.append(e)
        return out

    def weight(self, errors: list) -> int:
        return len(self.leaves(errors))

    def expected_words(self, schema: Any) -> str:
        schema = self.resolve(schema)
        types = self.types(schema) or set()
        words = []
        enum_values: list[str] = []
        for branch in schema.get("anyOf", schema.get("oneOf", [])):
            b = self.resolve(branch)
            if "enum" in b:
                enum_values += [str(v) for v in b["enum"]]
        if enum_values:
            words.append("one of " + ", ".join(enum_values))
            types = types - {"string"}
        for t in ("string", "integer", "object", "array", "boolean"):
            if t in types:
                words.append(_TYPE_WORDS[t])
        if not words:
            return "something else"
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]

    def label(self, where: Iterable) -> str:
        steps = [p for p in where]
        for p in reversed(steps):
            if isinstance(p, str):
                return f"'{p}'"
        return "value"

    def where(self, where: Iterable) -> str:
        dotted = _dotted(where)
        return f"{dotted}: " if dotted else ""

    def type_hint(self, node: _P | None, value: Any, where: Iterable, description: str | None,
                  integer_ok: bool = True) -> str | None:
        steps = list(where)
        last = steps[-1] if steps else None
        if value is None and last == "with":
            return "quote the vector: with: \"#UD\" (an unquoted # starts a YAML comment)"
        if value is None:
            return "a value is missing after the ':'" + (f". {description}" if description else "")
        if isinstance(value, float) and not integer_ok:
            text = node.text if isinstance(node, _PScalar) else str(value)
            return description or f"YAML reads {text} as a number; quote it (\"{text}\") to make it a string"
        if isinstance(value, float):
            return ("YAML reads this as a float; addresses, sizes and constants are integers "
                    "(write e.g. 4096, 0x1000 or an expression string such as \"8 * 512\")")
        if isinstance(value, bool) and isinstance(node, _PScalar):
            return (f"YAML 1.1 reads unquoted {node.text} as a boolean; quote it (\"{node.text}\") "
                    "if you meant the word")
        return description

    def render_leaf(self, err) -> list[tuple[Span, str, str | None]]:
        where = list(err.absolute_path)
        node = self.node_at(where)
        span = node.span(self.path)
        value = err.instance
        v = err.validator
        schema = err.schema if isinstance(err.schema, dict) else {}
        title = schema.get("title")
        in_names = "propertyNames" in err.relative_schema_path or "propertyNames" in err.schema_path
        prefix = self.where(where)

        if in_names:
            # The key itself is wrong: point at it.
            key = str(value)
            span = self.key_at(where, key)
            if v == "not" and key in REGISTERS:
                return [(span, f"'{key}' is a register name, reserved: it cannot name a region",
                         "pick another name, e.g. " + f"'{key}_region'")]
            what = title or "name"
            return [(span, f"{_show(key)} is not a valid {what}",
                     schema.get("description") or "names are letters, digits and '_', not starting with a digit")]
        if v == "additionalProperties":
            allowed = list(schema.get("properties", {}))
            out = []
            for extra in self.extras(err):
                near = closest_names(extra, allowed)
                if where:
                    msg = f"unknown key '{extra}' in {title or self.label(where)}"
                else:
                    msg = f"unknown top-level key '{extra}'"
                if near:
                    hint = "did you mean " + " or ".join(f"'{n}'" for n in near) + "?"
                else:
                    hint = "allowed keys: " + ", ".join(allowed)
                out.append((self.key_at(where, extra), msg, hint))
            return out
        if v == "required":
            out = []
            for key in self.missing(err):
                what = title or self.label(where)
                out.append((span, f"missing key '{key}' in {what}", schema.get("description")))
            return out
        if v == "type":
            expected = schema.get("type")
            expected = expected if isinstance(expected, list) else [expected]
            words = [_TYPE_WORDS.get(t, t) for t in expected]
            if set(expected) == {"integer", "string"}:
                words = ["an integer or an expression string"]
            want = " or ".join(words)
            return [(span, f"{prefix}expected {want}, got {_describe_value(node, value)}",
                     self.type_hint(node, value, where, schema.get("description"), "integer" in expected))]
        if v in ("enum", "const"):
            options = [str(o) for o in (err.validator_value if v == "enum" else [err.validator_value])]
            what = title or self.label(where)
            if not isinstance(value, str):
                return [(span, f"{prefix}expected one of {', '.join(options)}, got {_describe_value(node, value)}",
                         self.type_hint(node, value, where, None))]
            near = closest_names(value, options)
            hint = ("did you mean " + " or ".join(f"'{n}'" for n in near) + "?") if near \
                else "expected one of: " + ", ".join(options)
            return [(span, f"{prefix}{_show(value)} is not a valid {what}", hint)]
        if v == "not":
            if isinstance(value, str) and value in REGISTERS:
                return [(span, f"{prefix}'{value}' is a register name, reserved: it cannot name a region", None)]
            return [(span, f"{prefix}{_show(value)} is not allowed here", schema.get("description"))]
        if v in ("minLength", "pattern") and isinstance(value, str) and not value.strip():
            return [(span, f"{prefix}empty {title or 'value'}", schema.get("description"))]
        if v == "pattern":
            what = title or self.label(where)
            return [(span, f"{prefix}{_show(value)} is not a valid {what}", schema.get("description"))]
        if v == "minItems":
            return [(span, f"{prefix}the list is empty", f"give at least {err.validator_value} item(s)"
                     + (f"; {schema.get('description')}" if schema.get("description") else ""))]
        if v in ("minProperties", "maxProperties"):
            what = title or self.label(where)
            keys = list(value) if isinstance(value, dict) else []
            if v == "minProperties":
                msg = f"empty {what}"
            else:
                msg = f"one {what} per entry, but this mapping has {len(keys)}: " + ", ".join(keys)
            return [(span, f"{prefix}{msg}", schema.get("description"))]
        if v == "minimum":
            return [(span, f"{prefix}{_show(value)} is below {err.validator_value}", schema.get("description"))]
        return [(span, f"{prefix}{err.message}", schema.get("description"))]


# ---------------------------------------------------------------- building syntax

def _expr_depth(expr: S.Expr) -> int:
    """How deep an expression tree is (without recursion: the tree may be very deep)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, S.Unary):
            stack.append((node.operand, depth + 1))
        elif isinstance(node, S.Binary):
            stack += [(node.left, depth + 1), (node.right, depth + 1)]
        elif isinstance(node, S.InRegion):
            stack.append((node.value, depth + 1))
        elif isinstance(node, S.Call):
            stack += [(a, depth + 1) for a in node.args]
    return deepest


class _Broken(Exception):
    """An item cannot be built (already reported): drop it."""


class _Builder:
    def __init__(self, path: str, text: str, diagnostics: Diagnostics) -> None:
        self.path = path
        self.text = text
        self.diagnostics = diagnostics
        self.broken: set[str] = set()

    def span(self, node: _P) -> Span:
        return node.span(self.path)

    def unexpected(self, node: _P | None) -> _Broken:
        """A value the schema should have refused: say so rather than drop it silently."""
        span = node.span(self.path) if node is not None else Span(self.path, 1, 1)
        shown = _describe_value(node, node.plain) if node is not None else "nothing"
        self.diagnostics.error("PC201", span, f"unexpected {shown} here", "see docs/YAML.md for the accepted forms")
        return _Broken()

    def key_span(self, pmap: _PMap, key: str) -> Span:
        return pmap.entries[key][0].span(self.path)

    # -- file
    def file(self, root: _PMap, comments: list[S.Comment]) -> S.PolicyFile:
        items: list[S.Item] = []
        target = root.get("target")
        if isinstance(target, _PMap):
            items.append(self.target(target, self.key_span(root, "target")))
        symbols = root.get("symbols")
        if symbols is not None:
            paths = [s.value for s in self.as_list(symbols)]
            items.append(S.Symbols(paths, self.key_span(root, "symbols")))
        mode = root.get("mode")
        if isinstance(mode, _PScalar):
            items.append(S.Mode(mode.value, self.key_span(root, "mode")))
        include = root.get("include")
        if include is not None:
            for p in self.as_list(include):
                items.append(S.Include(p.value, self.span(p)))
        constants = root.get("constants")
        if isinstance(constants, _PMap):
            for name, (key, value) in constants.entries.items():
                try:
                    items.append(S.Const(name, self.expr(value), key.span(self.path)))
                except _Broken:
                    self.broken.add(name)
        regions = root.get("regions")
        if isinstance(regions, _PMap):
            for name, (key, value) in regions.entries.items():
                try:
                    terms = [self.region_term(t) for t in self.as_list(value)]
                    items.append(S.Region(name, terms, key.span(self.path)))
                except _Broken:
                    self.broken.add(name)
        rules = root.get("rules")
        if isinstance(rules, _PSeq):
            for rule in rules.items:
                if not isinstance(rule, _PMap):
                    continue
                try:
                    items.append(self.rule(rule))
                except _Broken:
                    name = rule.get("name")
                    if isinstance(name, _PScalar) and isinstance(name.value, str):
                        self.broken.add(name.value)
        name = root.get("policy")
        top: list[Union[S.PolicyBlock, S.Item]]
        if isinstance(name, _PScalar):
            top = [S.PolicyBlock(str(name.value), items, self.key_span(root, "policy"))]
        else:
            top = list(items)
        return S.PolicyFile(self.path, top, comments, "yaml", self.broken)

    @staticmethod
    def as_list(node: _P) -> list[_P]:
        return list(node.items) if isinstance(node, _PSeq) else [node]

    def target(self, t: _PMap, span: Span) -> S.Target:
        op = version = None
        v = t.get("version")
        if isinstance(v, _PScalar) and isinstance(v.value, str):
            m = _VERSION.match(v.value)
            if m:
                op, version = m.group(1), m.group(2)
        return S.Target(str(t.get("hypervisor").value), str(t.get("arch").value), op, version, span)

    # -- expressions
    def content_span(self, node: _PScalar) -> Span:
        """Where the scalar's text starts: after the quote, or on the first line of a block scalar."""
        if node.style in ("'", '"'):
            return Span(self.path, node.line, node.col + 1)
        if node.style in ("|", ">"):
            nl = self.text.find("\n", node.index)
            line = node.line
            while nl != -1:
                line += 1
                start = nl + 1
                nl = self.text.find("\n", start)
                row = self.text[start:nl if nl != -1 else len(self.text)]
                if row.strip():
                    return Span(self.path, line, len(row) - len(row.lstrip(" ")) + 1)
        return Span(self.path, node.line, node.col)

    def expr(self, node: _P) -> S.Expr:
        from .dsl import parse_expression

        if not isinstance(node, _PScalar):  # the schema rules this out
            raise self.unexpected(node)
        value = node.value
        span = self.span(node)
        if isinstance(value, int) and not isinstance(value, bool):
            radix = _radix(node.text) if node.tag == _INT else 10
            if value < 0:
                return S.Unary("-", S.Num(-value, radix, span), span)
            return S.Num(value, radix, span)
        if not isinstance(value, str):
            raise self.unexpected(node)
        if _FLOAT_TEXT.match(value):
            self.diagnostics.error("PC114", span, f"'{value.strip()}' is a float, not an integer",
                                   "addresses, sizes and constants are integers (e.g. 4096 or 0x1000)")
            raise _Broken
        before = self.diagnostics.error_count
        try:
            result = parse_expression(value, self.content_span(node), self.diagnostics)
        except RecursionError:
            self.diagnostics.error("PC203", span, "expression is nested too deeply")
            raise _Broken from None
        if result is None or self.diagnostics.error_count > before:
            raise _Broken
        if _expr_depth(result) > MAX_EXPR_DEPTH:
            self.diagnostics.error("PC203", span, f"expression is nested more than {MAX_EXPR_DEPTH} levels deep")
            raise _Broken
        return result

    # -- regions
    def symbol(self, m: _PMap) -> S.Expr:
        span = self.span(m)
        optional = m.get("optional")
        percpu = m.get("percpu")
        opt = bool(optional is not None and optional.value is True)
        per = bool(percpu is not None and percpu.value is True)
        if opt and per:
            self.diagnostics.error("PC201", span, "a symbol cannot be both optional and percpu",
                                   "the DSL has no spelling for it ('symbol? S' or 'percpu symbol S')")
            raise _Broken
        ref: S.Expr = S.SymbolRef(str(m.get("symbol").value), opt, per, self.span(m.get("symbol")))
        offset = m.get("offset")
        if offset is not None:
            ref = S.Binary("+", ref, self.expr(offset), span)
        return ref

    def address(self, node: _P) -> tuple[S.Expr, str | None]:
        if isinstance(node, _PMap):
            if "symbol" in node:
                return self.symbol(node), None
            if "va" in node:
                return self.expr(node.get("va")), "va"
            if "pa" in node:
                return self.expr(node.get("pa")), "pa"
        return self.expr(node), None

    def region_term(self, node: _P) -> S.RegionTerm:
        span = self.span(node)
        if isinstance(node, _PScalar):
            return S.RegionRef(str(node.value), span)
        if not isinstance(node, _PMap):
            raise self.unexpected(node)
        if "from" in node:
            start, s1 = self.address(node.get("from"))
            end, s2 = self.address(node.get("to"))
            if s1 and s2 and s1 != s2:
                self.diagnostics.error("PC201", span, f"a range cannot start at a {s1} address and end at a {s2} one",
                                       "write both ends as guest virtual (va) or both as guest physical (pa)")
                raise _Broken
            return S.RangeRegion(start, end, s1 or s2, span)
        if "register" in node:
            return S.RegisterRegion(str(node.get("register").value), self.expr(node.get("size")), span)
        base, space = self.address(node)
        return S.SizedRegion(base, self.expr(node.get("size")), space, span)

    def regions(self, node: _P) -> list[S.RegionTerm]:
        return [self.region_term(t) for t in self.as_list(node)]

    # -- rules
    def rule(self, r: _PMap) -> S.Rule:
        trigger = self.trigger(r.get("on"))
        where = r.get("where")
        actions: list[S.Action] = []
        priority = r.get("priority")
        if priority is not None:
            actions.append(S.Priority(self.expr(priority), self.key_span(r, "priority")))
        do = r.get("do")
        if isinstance(do, _PSeq):
            actions += [self.action(a) for a in do.items]
        name = r.get("name")
        return S.Rule(trigger, actions, str(name.value) if isinstance(name, _PScalar) else None,
                      self.expr(where) if where is not None else None, self.span(r))

    def trigger(self, node: _P) -> S.Trigger:
        span = self.span(node)
        if isinstance(node, _PScalar):
            if node.value == "cpuid":
                return S.CpuidTrigger(None, span)
            return S.EventTrigger(str(node.value), span)
        if not isinstance(node, _PMap) or len(node.entries) != 1:
            raise self.unexpected(node)
        (kind, (_, value)), = node.entries.items()
        if kind == "cpuid":
            leaf = value.get("leaf") if isinstance(value, _PMap) else None
            return S.CpuidTrigger(self.expr(leaf) if leaf is not None else None, span)
        if kind in ("read", "write") and isinstance(value, _PScalar) and value.value in REGISTERS:
            return S.RegisterTrigger(kind, value.value, span)
        if kind == "write" and isinstance(value, _PMap) and "msr" in value:
            msr = value.get("msr")
            if isinstance(msr, _PScalar) and isinstance(msr.value, str) and _IDENT.match(msr.value):
                return S.MsrTrigger(S.Name(msr.value, self.span(msr)), span)
            return S.MsrTrigger(self.expr(msr), span)
        if kind == "execute" and isinstance(value, _PMap) and "size" not in value:
            if "symbol" in value:
                return S.ExecuteTrigger(self.symbol(value), None, span)
            for space in ("va", "pa"):
                if space in value:
                    return S.ExecuteTrigger(self.expr(value.get(space)), space, span)
        return S.MemoryTrigger(kind, self.regions(value), span)

    def action(self, node: _P) -> S.Action:
        span = self.span(node)
        if isinstance(node, _PScalar):
            simple = {"allow": S.Allow, "deny": S.Deny, "pause": S.Pause, "disarm": S.Disarm}
            if node.value not in simple:
                raise self.unexpected(node)
            return simple[node.value](span=span)
        if not isinstance(node, _PMap) or len(node.entries) != 1:
            raise self.unexpected(node)
        (kind, (_, value)), = node.entries.items()
        if kind == "deny":
            feed = value.get("feed") if isinstance(value, _PMap) else None
            vector = value.get("with") if isinstance(value, _PMap) else None
            return S.Deny(feed.value if feed is not None else None, vector.value if vector is not None else None, span)
        if kind in ("log", "alert"):
            message = value.get("message")
            return S.Report(kind, str(value.get("severity").value), message.value, span, self.span(message))
        if kind == "limit":
            per = value.get("per")
            return S.Limit(self.expr(value.get("rate")), self.action(value.get("then")),
                           str(per.value) if per is not None else "second", span)
        raise self.unexpected(node)
