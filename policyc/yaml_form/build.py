"""Step 4 of the YAML reader: the validated tree into `policyc.syntax` nodes, exactly as the DSL
builder builds them for the same policy; expression strings go through `policyc.dsl.parse_expression`.
"""

from __future__ import annotations

import re
from typing import Any, Union

from .. import syntax as S
from ..diagnostics import Diagnostics, Span
from .compose import INT_TAG, REGISTERS, PMap, PScalar, PSeq, PValue, describe_value

__all__ = ["SyntaxBuilder", "MAX_EXPR_DEPTH"]

MAX_EXPR_DEPTH = 200                  # nesting of one expression string (PC203)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FLOAT_TEXT = re.compile(r"\s*[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*|[0-9][0-9_]*(?=[eE]))"
                         r"(?:[eE][-+]?[0-9]+)?\s*\Z")
_VERSION = re.compile(r"\s*(==|!=|<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)*)\s*\Z")


class _Broken(Exception):
    """An item cannot be built (already reported): drop it."""


class SyntaxBuilder:
    def __init__(self, path: str, text: str, diagnostics: Diagnostics) -> None:
        self.path = path
        self.text = text
        self.diagnostics = diagnostics
        self.broken: set[str] = set()

    def span(self, node: PValue) -> Span:
        return node.span(self.path)

    def unexpected(self, node: PValue | None) -> _Broken:
        """A value the schema should have refused: say so rather than drop it silently."""
        span = node.span(self.path) if node is not None else Span(self.path, 1, 1)
        shown = describe_value(node, node.plain) if node is not None else "nothing"
        self.diagnostics.error("PC201", span, f"unexpected {shown} here", "see docs/YAML.md for the accepted forms")
        return _Broken()

    def key_span(self, pmap: PMap, key: str) -> Span:
        return pmap.entries[key][0].span(self.path)

    # -- file
    def file(self, root: PMap, comments: list[S.Comment]) -> S.PolicyFile:
        items: list[S.Item] = []
        target = root.get("target")
        if isinstance(target, PMap):
            items.append(self.target(target, self.key_span(root, "target")))
        symbols = root.get("symbols")
        if symbols is not None:
            paths = [s.value for s in self.as_list(symbols)]
            items.append(S.Symbols(paths, self.key_span(root, "symbols")))
        mode = root.get("mode")
        if isinstance(mode, PScalar):
            items.append(S.Mode(mode.value, self.key_span(root, "mode")))
        include = root.get("include")
        if include is not None:
            for p in self.as_list(include):
                items.append(S.Include(p.value, self.span(p)))
        constants = root.get("constants")
        if isinstance(constants, PMap):
            for name, (key, value) in constants.entries.items():
                try:
                    items.append(S.Const(name, self.expr(value), key.span(self.path)))
                except _Broken:
                    self.broken.add(name)
        regions = root.get("regions")
        if isinstance(regions, PMap):
            for name, (key, value) in regions.entries.items():
                try:
                    terms = [self.region_term(t) for t in self.as_list(value)]
                    items.append(S.Region(name, terms, key.span(self.path)))
                except _Broken:
                    self.broken.add(name)
        rules = root.get("rules")
        if isinstance(rules, PSeq):
            for rule in rules.items:
                if not isinstance(rule, PMap):
                    continue
                try:
                    items.append(self.rule(rule))
                except _Broken:
                    name = rule.get("name")
                    if isinstance(name, PScalar) and isinstance(name.value, str):
                        self.broken.add(name.value)
        name = root.get("policy")
        top: list[Union[S.PolicyBlock, S.Item]]
        if isinstance(name, PScalar):
            top = [S.PolicyBlock(str(name.value), items, self.key_span(root, "policy"))]
        else:
            top = list(items)
        return S.PolicyFile(self.path, top, comments, "yaml", self.broken)

    @staticmethod
    def as_list(node: PValue) -> list[PValue]:
        return list(node.items) if isinstance(node, PSeq) else [node]

    def target(self, t: PMap, span: Span) -> S.Target:
        op = version = None
        v = t.get("version")
        if isinstance(v, PScalar) and isinstance(v.value, str):
            m = _VERSION.match(v.value)
            if m:
                op, version = m.group(1), m.group(2)
        return S.Target(str(t.get("hypervisor").value), str(t.get("arch").value), op, version, span)

    # -- expressions
    def content_span(self, node: PScalar) -> Span:
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

    def expr(self, node: PValue) -> S.Expr:
        from ..dsl import parse_expression

        if not isinstance(node, PScalar):  # the schema rules this out
            raise self.unexpected(node)
        value = node.value
        span = self.span(node)
        if isinstance(value, int) and not isinstance(value, bool):
            radix = _radix(node.text) if node.tag == INT_TAG else 10
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
    def symbol(self, m: PMap) -> S.Expr:
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

    def address(self, node: PValue) -> tuple[S.Expr, str | None]:
        if isinstance(node, PMap):
            if "symbol" in node:
                return self.symbol(node), None
            if "va" in node:
                return self.expr(node.get("va")), "va"
            if "pa" in node:
                return self.expr(node.get("pa")), "pa"
        return self.expr(node), None

    def region_term(self, node: PValue) -> S.RegionTerm:
        span = self.span(node)
        if isinstance(node, PScalar):
            return S.RegionRef(str(node.value), span)
        if not isinstance(node, PMap):
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

    def regions(self, node: PValue) -> list[S.RegionTerm]:
        return [self.region_term(t) for t in self.as_list(node)]

    # -- rules
    def rule(self, r: PMap) -> S.Rule:
        trigger = self.trigger(r.get("on"))
        where = r.get("where")
        actions: list[S.Action] = []
        priority = r.get("priority")
        if priority is not None:
            actions.append(S.Priority(self.expr(priority), self.key_span(r, "priority")))
        do = r.get("do")
        if isinstance(do, PSeq):
            actions += [self.action(a) for a in do.items]
        name = r.get("name")
        return S.Rule(trigger, actions, str(name.value) if isinstance(name, PScalar) else None,
                      self.expr(where) if where is not None else None, self.span(r))

    def trigger(self, node: PValue) -> S.Trigger:
        span = self.span(node)
        if isinstance(node, PScalar):
            if node.value == "cpuid":
                return S.CpuidTrigger(None, span)
            return S.EventTrigger(str(node.value), span)
        if not isinstance(node, PMap) or len(node.entries) != 1:
            raise self.unexpected(node)
        (kind, (_, value)), = node.entries.items()
        if kind == "cpuid":
            leaf = value.get("leaf") if isinstance(value, PMap) else None
            return S.CpuidTrigger(self.expr(leaf) if leaf is not None else None, span)
        if kind in ("read", "write") and isinstance(value, PScalar) and value.value in REGISTERS:
            return S.RegisterTrigger(kind, value.value, span)
        if kind == "write" and isinstance(value, PMap) and "msr" in value:
            msr = value.get("msr")
            if isinstance(msr, PScalar) and isinstance(msr.value, str) and _IDENT.match(msr.value):
                return S.MsrTrigger(S.Name(msr.value, self.span(msr)), span)
            return S.MsrTrigger(self.expr(msr), span)
        if kind == "execute" and isinstance(value, PMap) and "size" not in value:
            if "symbol" in value:
                return S.ExecuteTrigger(self.symbol(value), None, span)
            for space in ("va", "pa"):
                if space in value:
                    return S.ExecuteTrigger(self.expr(value.get(space)), space, span)
        return S.MemoryTrigger(kind, self.regions(value), span)

    def action(self, node: PValue) -> S.Action:
        span = self.span(node)
        if isinstance(node, PScalar):
            if node.value not in _WORD_ACTIONS:
                raise self.unexpected(node)
            return _WORD_ACTIONS[node.value](span=span)
        if not isinstance(node, PMap) or len(node.entries) != 1:
            raise self.unexpected(node)
        (kind, (_, value)), = node.entries.items()
        build = _ACTIONS.get(kind)
        if build is None:
            raise self.unexpected(node)
        return build(self, kind, value, span)

    def deny(self, _kind: str, value: PValue, span: Span) -> S.Action:
        feed = value.get("feed") if isinstance(value, PMap) else None
        vector = value.get("with") if isinstance(value, PMap) else None
        return S.Deny(feed.value if feed is not None else None, vector.value if vector is not None else None, span)

    def report(self, kind: str, value: PMap, span: Span) -> S.Action:
        message = value.get("message")
        return S.Report(kind, str(value.get("severity").value), message.value, span, self.span(message))

    def limit(self, _kind: str, value: PMap, span: Span) -> S.Action:
        per = value.get("per")
        return S.Limit(self.expr(value.get("rate")), self.action(value.get("then")),
                       str(per.value) if per is not None else "second", span)


# An action written as one word, and one written as a one-key mapping, by its key.
_WORD_ACTIONS = {"allow": S.Allow, "deny": S.Deny, "pause": S.Pause, "disarm": S.Disarm}
_ACTIONS = {"deny": SyntaxBuilder.deny, "log": SyntaxBuilder.report, "alert": SyntaxBuilder.report,
            "limit": SyntaxBuilder.limit}
# The sub-expressions of each kind of expression node (every other kind is a leaf).
_CHILDREN = {S.Unary: lambda n: (n.operand,), S.Binary: lambda n: (n.left, n.right),
             S.InRegion: lambda n: (n.value,), S.Call: lambda n: n.args}


def _expr_depth(expr: S.Expr) -> int:
    """How deep an expression tree is (without recursion: the tree may be very deep)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = _CHILDREN.get(type(node))
        if children is not None:
            stack += [(child, depth + 1) for child in children(node)]
    return deepest


def _radix(text: str) -> int:
    t = text.replace("_", "").lstrip("+-").lower()
    if t.startswith("0x"):
        return 16
    if t.startswith("0b"):
        return 2
    if t.startswith("0o") or (t.startswith("0") and len(t) > 1 and t.isdigit()):
        return 8
    return 10

