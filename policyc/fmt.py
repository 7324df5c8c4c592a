"""The formatter: syntax tree -> text, in one canonical layout per spelling.

`format_dsl` prints the DSL, `format_yaml` the YAML spelling, `format_expr` one
expression. The layout depends only on the tree (and, for the DSL, on where
the comments were), so formatting is idempotent: formatting the parse of a
formatted text gives that text back.

The DSL layout: 4-space indentation; items in their written order, a blank
line between items of different kinds (settings, includes, constants,
regions) and around every rule; one statement a line (a long region union
wraps, its terms aligned); an empty block is `{ }`.

Comments are not in the tree proper: both front ends hand them over in
`PolicyFile.comments` with their spans, and `_attach` decides, from the spans
of the statements around each one, which statement it belongs to:

- a comment on its own line(s) goes before the next statement (item or
  action), re-indented to that statement's level; a blank line between the
  comment block and the statement, or before the block, is kept as one blank
  line;
- a comment at the end of a line stays at the end of that statement's first
  line (`  # ...`); further ones from later lines of the same statement go on
  their own lines before it;
- a comment before a closing `}` stays inside that block, at its end; one
  after a `}` on the same line stays after it;
- comments after the last item stay at the end of the file.

Nothing is ever dropped: a comment no rule places is printed at the end. The
YAML has no braces and groups items by kind, so there a comment goes on the
line of its item or on the lines before it, and block-end comments go last.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Iterable

from . import syntax as S
from .diagnostics import Diagnostics
from .dsl import encode_string, quote_string
from .errors import PolicycError

__all__ = ["FormatError", "check_format", "format_dsl", "format_expr", "format_yaml"]

INDENT = "    "
WIDTH = 110  # a region union longer than this continues on the next lines, one or more terms a line


class FormatError(PolicycError, ValueError):
    """The text did not parse, so it cannot be formatted. `diagnostics` says why."""

    def __init__(self, diagnostics: Diagnostics) -> None:
        super().__init__(f"{diagnostics.error_count} error(s): not formatted")
        self.diagnostics = diagnostics


def check_format(text: str, path: str, to: str | None = None) -> tuple[str, bool]:
    """Parse `text` (the spelling chosen by `path`'s extension) and format it.

    Returns the formatted text (in the spelling `to`, by default the input's)
    and whether it differs from `text`. Raises `FormatError` if it does not parse.
    """
    from .source import is_yaml_path

    diagnostics = Diagnostics()
    if is_yaml_path(path):
        from .yaml_form import parse_yaml_text
        tree = parse_yaml_text(text, path, diagnostics)
    else:
        from .dsl import parse_policy_text
        tree = parse_policy_text(text, path, diagnostics)
    if tree is None or diagnostics.has_errors:
        raise FormatError(diagnostics)
    to = to or tree.form
    if to not in ("dsl", "yaml"):
        raise ValueError(f"unknown spelling {to!r}: expected 'dsl' or 'yaml'")
    formatted = format_dsl(tree) if to == "dsl" else format_yaml(tree)
    return formatted, formatted != text


# ---------------------------------------------------------------- expressions

_ATOM = 12
_UNARY = S.PRECEDENCE["neg"]
_CMP = S.PRECEDENCE["=="]
_NOT = S.PRECEDENCE["not"]


def _binary_prec(e: S.Binary) -> int:
    try:
        return S.PRECEDENCE[e.op]
    except KeyError:
        raise ValueError(f"unknown binary operator {e.op!r}") from None


# How tightly each kind of expression binds (every kind not here is an atom).
_PREC_OF = {
    S.Binary: _binary_prec,
    S.Unary: lambda e: _NOT if e.op == "not" else _UNARY,
    S.InRegion: lambda e: _CMP,
    S.Num: lambda e: _UNARY if e.value < 0 else _ATOM,
}


def _prec(e: S.Expr) -> int:
    prec = _PREC_OF.get(type(e))
    return _ATOM if prec is None else prec(e)


def _spelled(spellings: dict, node: object, what: str) -> str:
    """`node` in the spelling its kind has in `spellings`; TypeError for a kind without one."""
    spell = spellings.get(type(node))
    if spell is None:
        raise TypeError(f"not {what}: {node!r}")
    return spell(node)


def _num(n: S.Num) -> str:
    sign, v = ("-", -n.value) if n.value < 0 else ("", n.value)
    if n.radix == 16:
        return f"{sign}0x{v:x}"
    if n.radix == 2:
        return f"{sign}0b{v:b}"
    if n.radix == 8:
        return f"{sign}0o{v:o}"
    return f"{sign}{v}"


def _paren(e: S.Expr, needs: bool) -> str:
    text = format_expr(e)
    return f"({text})" if needs else text


def format_expr(expr: S.Expr) -> str:
    """The canonical spelling of an expression, with the fewest parentheses that keep its tree."""
    return _spelled(_EXPR_SPELLINGS, expr, "an expression")


def _symbol_ref(e: S.SymbolRef) -> str:
    # The DSL has no spelling for an optional per-CPU symbol; this is the nearest.
    return ("percpu " if e.percpu else "") + ("symbol? " if e.optional else "symbol ") + e.name


def _unary(e: S.Unary) -> str:
    if e.op == "not":
        return "not " + _paren(e.operand, _prec(e.operand) < _NOT)
    if e.op in ("-", "~"):
        return e.op + _paren(e.operand, _prec(e.operand) < _UNARY)
    raise ValueError(f"unknown unary operator {e.op!r}")


def _in_region(e: S.InRegion) -> str:
    op = "not in" if e.negated else "in"
    return f"{_paren(e.value, _prec(e.value) <= _CMP)} {op} {e.region}"


def _binary(e: S.Binary) -> str:
    p = _prec(e)
    if e.op in S.COMPARISONS:  # not associative: `a < b < c` does not parse
        left, right = _prec(e.left) <= p, _prec(e.right) <= p
    else:  # left-associative chains
        left, right = _prec(e.left) < p, _prec(e.right) <= p
    return f"{_paren(e.left, left)} {e.op} {_paren(e.right, right)}"


_EXPR_SPELLINGS = {
    S.Num: _num,
    S.Name: lambda e: e.name,
    S.Attr: lambda e: f"{e.base}.{e.attr}",
    S.SymbolRef: _symbol_ref,
    S.Call: lambda e: f"{e.func}({', '.join(format_expr(a) for a in e.args)})",
    S.Unary: _unary,
    S.InRegion: _in_region,
    S.Binary: _binary,
}


# ---------------------------------------------------------------- DSL pieces

# Words the parser takes for keywords at the start of a region term or of an
# `execute` address even when the tree means a name there (`va + 1 .. x`, a
# YAML spelling, would read as `va` then `+ 1`): such an expression is parenthesized.
_TERM_START = re.compile(r"(va|pa|register)\b")
_EXECUTE_START = re.compile(r"(va|pa|in)\b")


def _guarded(e: S.Expr, words: re.Pattern) -> str:
    text = format_expr(e)
    return f"({text})" if words.match(text) else text


def _region_term(t: S.RegionTerm) -> str:
    return _spelled(_REGION_TERM_SPELLINGS, t, "a region term")


def _range_region(t: S.RangeRegion) -> str:
    start = f"{t.space} {format_expr(t.start)}" if t.space else _guarded(t.start, _TERM_START)
    return f"{start} .. {format_expr(t.end)}"


def _sized_region(t: S.SizedRegion) -> str:
    base = f"{t.space} {format_expr(t.base)}" if t.space else _guarded(t.base, _TERM_START)
    return f"{base} size {format_expr(t.size)}"


_REGION_TERM_SPELLINGS = {
    S.RegionRef: lambda t: t.name,
    S.RangeRegion: _range_region,
    S.SizedRegion: _sized_region,
    S.RegisterRegion: lambda t: f"register {t.register} size {format_expr(t.size)}",
}


def _region_terms(terms: Iterable[S.RegionTerm]) -> str:
    return ", ".join(_region_term(t) for t in terms)


_MEMORY_PREP = {"read": "read of", "write": "write to", "execute": "execute in", "access": "access to"}


def _trigger(t: S.Trigger) -> str:
    return _spelled(_TRIGGER_SPELLINGS, t, "a trigger")


def _execute_trigger(t: S.ExecuteTrigger) -> str:
    if t.space:
        return f"execute {t.space} {format_expr(t.address)}"
    return f"execute {_guarded(t.address, _EXECUTE_START)}"


_TRIGGER_SPELLINGS = {
    S.MemoryTrigger: lambda t: f"{_MEMORY_PREP[t.access]} {_region_terms(t.regions)}",
    S.ExecuteTrigger: _execute_trigger,
    S.RegisterTrigger: lambda t: f"{t.access} {t.register}",
    S.MsrTrigger: lambda t: f"write msr {format_expr(t.msr)}",
    S.CpuidTrigger: lambda t: "cpuid" if t.leaf is None else f"cpuid leaf {format_expr(t.leaf)}",
    S.EventTrigger: lambda t: t.kind,
}


def _action(a: S.Action) -> str:
    return _spelled(_ACTION_SPELLINGS, a, "an action")


def _deny(a: S.Deny) -> str:
    text = "deny"
    if a.feed is not None:
        text += f" feed {encode_string(a.feed)}"
    if a.exception is not None:
        text += f" with {a.exception}"
    return text


_ACTION_SPELLINGS = {
    S.Allow: lambda a: "allow",
    S.Deny: _deny,
    S.Report: lambda a: f"{a.kind} {a.severity} {encode_string(a.template)}",
    S.Pause: lambda a: "pause",
    S.Disarm: lambda a: "disarm",
    S.Limit: lambda a: f"limit {format_expr(a.rate)} per {a.per} then {_action(a.then)}",
    S.Priority: lambda a: f"priority {format_expr(a.value)}",
}


def _item(item: S.Item) -> str:
    """The one line of an item other than a rule or a policy block."""
    return _spelled(_ITEM_SPELLINGS, item, "an item")


def _target(item: S.Target) -> str:
    version = f" {item.op} {item.version}" if item.version is not None else ""
    return f"target {item.hypervisor}{version} on {item.arch}"


_ITEM_SPELLINGS = {
    S.Target: _target,
    S.Symbols: lambda item: "symbols " + ", ".join(encode_string(p) for p in item.paths),
    S.Mode: lambda item: f"mode {item.mode}",
    S.Const: lambda item: f"const {item.name} = {format_expr(item.value)}",
    S.Region: lambda item: f"region {item.name} = {_region_terms(item.terms)}",
    S.Include: lambda item: f"include {encode_string(item.path)}",
}


def _region_lines(region: S.Region, indent: str) -> list[str]:
    """`region NAME = TERM, TERM`, filled greedily to WIDTH; continuation lines align under the first term."""
    head = f"region {region.name} = "
    terms = [_region_term(t) for t in region.terms]
    lines = [head + terms[0]]
    for term in terms[1:]:
        if len(indent) + len(lines[-1]) + len(term) + 2 <= WIDTH:
            lines[-1] += ", " + term
        else:
            lines[-1] += ","
            lines.append(" " * len(head) + term)
    return lines


def _rule_header(rule: S.Rule) -> str:
    name = f" {rule.name}:" if rule.name is not None else ""
    where = f" where {format_expr(rule.where)}" if rule.where is not None else ""
    return f"rule{name} on {_trigger(rule.trigger)}{where} {{"


# Items of one kind sit together; a blank line separates kinds (and surrounds rules and blocks).
_KIND_OF = {S.Target: "settings", S.Symbols: "settings", S.Mode: "settings", S.Include: "include",
            S.Const: "const", S.Region: "region", S.Rule: "rule"}


def _kind(item: object) -> str:
    return _KIND_OF.get(type(item), "block")


# ---------------------------------------------------------------- comments

@dataclass
class _Lead:
    """The comment lines before a statement: (comment, blank line before it) and a blank line after them."""
    lines: list[tuple[S.Comment, bool]] = field(default_factory=list)
    detached: bool = False


@dataclass
class _Comments:
    lead: dict[int, _Lead] = field(default_factory=dict)        # before a statement
    trail: dict[int, list[S.Comment]] = field(default_factory=dict)  # at the end of its first line
    close_lead: dict[int, _Lead] = field(default_factory=dict)  # inside a block, before its `}`
    close_trail: dict[int, list[S.Comment]] = field(default_factory=dict)  # after its `}`
    end: _Lead = field(default_factory=_Lead)                   # after everything
    printed: set[int] = field(default_factory=set)
    order: list[S.Comment] = field(default_factory=list)

    def take_lead(self, node: object) -> _Lead:
        """The leading comments of `node`, with all but the first end-of-line comment moved in front of it."""
        lead = self.lead.pop(id(node), None) or _Lead()
        extra = self.trail.get(id(node), [])[1:]
        if extra:
            lead = _Lead(list(lead.lines), lead.detached)
            lead.lines += [(c, lead.detached and i == 0) for i, c in enumerate(extra)]
            lead.detached = False
            self.trail[id(node)] = self.trail[id(node)][:1]
        return lead

    def take_trail(self, node: object) -> S.Comment | None:
        found = self.trail.pop(id(node), [])
        return found[0] if found else None

    def take_close_trail(self, node: object) -> S.Comment | None:
        found = self.close_trail.pop(id(node), [])
        if len(found) > 1:  # cannot happen in parsed text: a comment runs to the end of its line
            self.end.lines += [(c, False) for c in found[1:]]
        return found[0] if found else None

    def leftovers(self) -> list[S.Comment]:
        return [c for c in self.order if id(c) not in self.printed]


@dataclass
class _Anchor:
    pos: tuple[int, int]
    end_line: int
    node: object
    close: bool = False


def _real(span: S.Span | None) -> bool:
    return span is not None and span is not S.NOWHERE and span != S.NOWHERE


def _last_line(node: object) -> int:
    """The last line any span in `node` reaches (0 if none). In DSL trees a node's span covers its
    parts; in YAML trees a span is often only where the node starts, so the parts are looked at too."""
    last = 0
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack += n
            continue
        span = getattr(n, "span", None)
        if span is None:
            continue
        if _real(span):
            last = max(last, span.end_line or span.line)
        stack += [getattr(n, f) for f in getattr(n, "__dataclass_fields__", ()) if f != "span"]
    return last


def _close(item: object, span: S.Span, out: list[_Anchor], first: int) -> None:
    """The anchor of a block's closing brace: the end of its span, when that is after all it holds."""
    if span.end_line is None or span.end_col is None:
        return
    pos = (span.end_line, span.end_col)
    if all(a.pos < pos for a in out[first:]):
        out.append(_Anchor(pos, span.end_line, item, close=True))


def _anchors(items: Iterable[object], out: list[_Anchor]) -> None:
    for item in items:
        span = getattr(item, "span", None)
        if not _real(span):
            if isinstance(item, S.PolicyBlock):
                _anchors(item.items, out)
            continue
        first = len(out)
        if isinstance(item, S.PolicyBlock):
            out.append(_Anchor((span.line, span.col), span.line, item))
            _anchors(item.items, out)
            _close(item, span, out, first)
        elif isinstance(item, S.Rule):
            header_end = max(span.line, _last_line(item.trigger), _last_line(item.where), _last_line(item.name))
            out.append(_Anchor((span.line, span.col), header_end, item))
            for action in item.actions:
                if _real(action.span):
                    out.append(_Anchor((action.span.line, action.span.col), _last_line(action), action))
            _close(item, span, out, first)
        else:
            out.append(_Anchor((span.line, span.col), max(span.line, _last_line(item)), item))


def _attach(file: S.PolicyFile) -> _Comments:
    """Decide which statement each comment belongs to (see the module docstring)."""
    slots = _Comments()
    anchors: list[_Anchor] = []
    _anchors(file.items, anchors)
    anchors.sort(key=lambda a: a.pos)
    positions = [a.pos for a in anchors]
    comments = sorted((c for c in file.comments if _real(c.span)), key=lambda c: (c.span.line, c.span.col))
    slots.order = comments + [c for c in file.comments if not _real(c.span)]
    # Where the previous thing in the source ended, for blank lines before a comment block.
    prev_line: dict[int, int] = {}
    for c in comments:
        line = c.span.line
        i = bisect.bisect_right(positions, (line, c.span.col)) - 1
        before = anchors[i] if i >= 0 else None
        if before is not None and not before.close and line <= before.end_line:
            slots.trail.setdefault(id(before.node), []).append(c)
            continue
        if before is not None and before.close and line == before.end_line:
            slots.close_trail.setdefault(id(before.node), []).append(c)
            continue
        after = anchors[i + 1] if i + 1 < len(anchors) else None
        if after is None:
            lead = slots.end
        else:
            table = slots.close_lead if after.close else slots.lead
            lead = table.setdefault(id(after.node), _Lead())
        last = prev_line.get(id(lead), before.end_line if before is not None else line)
        lead.lines.append((c, line - last > 1))
        prev_line[id(lead)] = line
        lead.detached = after is not None and after.pos[0] - line > 1
    for c in file.comments:
        if not _real(c.span):
            slots.end.lines.append((c, False))
    return slots


# ---------------------------------------------------------------- DSL layout

class _DslWriter:
    def __init__(self, comments: _Comments) -> None:
        self.lines: list[str] = []
        self.c = comments
        self.fresh = True  # at the start of the file or of a block: no blank line here

    def blank(self) -> None:
        if not self.fresh and self.lines and self.lines[-1] != "":
            self.lines.append("")

    def comment(self, indent: str, c: S.Comment) -> None:
        self.lines.append(indent + c.text.strip())
        self.c.printed.add(id(c))
        self.fresh = False

    def lead(self, indent: str, lead: _Lead) -> None:
        for c, blank_before in lead.lines:
            if blank_before:
                self.blank()
            self.comment(indent, c)
        if lead.detached and lead.lines:
            self.blank()

    def line(self, indent: str, text: str, trail: S.Comment | None = None) -> None:
        if trail is not None:
            text += "  " + trail.text.strip()
            self.c.printed.add(id(trail))
        self.lines.append(indent + text)
        self.fresh = False

    def items(self, items: list, depth: int) -> str | None:
        prev = None
        for item in items:
            kind = _kind(item)
            if prev is not None and (kind != prev or kind in ("rule", "block")):
                self.blank()
            self.item(item, depth)
            prev = kind
        return prev

    def item(self, item: object, depth: int) -> None:
        indent = INDENT * depth
        self.lead(indent, self.c.take_lead(item))
        if isinstance(item, S.PolicyBlock):
            self.block(item, f"policy {encode_string(item.name)} {{", item.items, depth, self.items)
        elif isinstance(item, S.Rule):
            self.block(item, _rule_header(item), item.actions, depth, self.actions)
        elif isinstance(item, S.Region) and item.terms:
            first, *rest = _region_lines(item, indent)
            self.line(indent, first, self.c.take_trail(item))
            for more in rest:
                self.line(indent, more)
        else:
            self.line(indent, _item(item), self.c.take_trail(item))

    def actions(self, actions: list, depth: int) -> str | None:
        indent = INDENT * depth
        for action in actions:
            self.lead(indent, self.c.take_lead(action))
            self.line(indent, _action(action), self.c.take_trail(action))
        return "action" if actions else None

    def block(self, node: object, header: str, body: list, depth: int, emit) -> None:
        indent = INDENT * depth
        trail = self.c.take_trail(node)
        closing = self.c.close_lead.pop(id(node), _Lead())
        if not body and not closing.lines and trail is None:
            self.line(indent, header + " }", self.c.take_close_trail(node))
            return
        self.line(indent, header, trail)
        self.fresh = True
        last = emit(body, depth + 1)
        if closing.lines and last == "rule":
            self.blank()
        self.lead(indent + INDENT, _Lead(closing.lines, False))
        self.fresh = False
        if self.lines[-1] == "":
            self.lines.pop()
        self.line(indent, "}", self.c.take_close_trail(node))


def format_dsl(file: S.PolicyFile) -> str:
    """The DSL text of a file, in the canonical layout, with every comment kept."""
    comments = _attach(file)
    w = _DslWriter(comments)
    last = w.items(list(file.items), 0)
    end = comments.end
    if end.lines:
        if last == "rule":  # a blank line around every rule; after a policy block, as written
            w.blank()
        w.lead("", _Lead(end.lines, False))
    left = comments.leftovers()
    if left:  # the fallback: a comment nothing claimed is kept at the end
        w.blank()
        for c in left:
            w.comment("", c)
    while w.lines and w.lines[-1] == "":
        w.lines.pop()
    return "\n".join(w.lines) + "\n" if w.lines else ""


# ---------------------------------------------------------------- YAML

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*\Z")
# Words some YAML reader (1.1 or 1.2) takes for a boolean or null; quoted whatever their case.
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
_REGISTERS = frozenset({"cr0", "cr3", "cr4", "xcr0", "idtr", "gdtr", "ldtr", "tr"})
_MAX_PLAIN_INT = 2 ** 53  # beyond this some readers go through floats
_FLOW_WIDTH = 100


def _yquote(s: str) -> str:
    """A double-quoted scalar, escaped so that it is also a valid JSON string."""
    return quote_string(s, _json_escape)


def _json_escape(o: int) -> str | None:
    # what YAML and JSON readers must not see raw (C0, DEL, C1, line separators, BOM, non-characters,
    # lone surrogates) as \uXXXX; everything else as itself
    if (o < 0x20 or 0x7f <= o <= 0x9f or o in (0x2028, 0x2029, 0xfeff, 0xfffe, 0xffff)
            or 0xd800 <= o <= 0xdfff):
        return f"\\u{o:04x}"
    return None


def _ycomment(c: S.Comment) -> str:
    """A comment YAML can hold: a character no YAML reader accepts raw, or one that it reads as a
    line break (which would turn the rest of the comment into YAML), is written as its \\u escape."""
    return "".join(ch if ch == "\t" else _json_escape(ord(ch)) or ch for ch in c.text.strip())


def _ystr(s: str) -> str:
    """A name or path: plain when no YAML reader can misread it, quoted otherwise."""
    if _PLAIN.match(s) and s.lower() not in _YAML_WORDS:
        return s
    return _yquote(s)


def _yexpr(e: S.Expr) -> str:
    """A small decimal literal as a YAML integer; anything else as the DSL expression in a string."""
    if isinstance(e, S.Num) and e.radix == 10 and 0 <= e.value < _MAX_PLAIN_INT:
        return str(e.value)
    return _yquote(format_expr(e))


def _flow(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


def _symbol_form(e: S.Expr) -> tuple[S.SymbolRef, S.Expr | None] | None:
    """`symbol S` or `symbol S + OFF`: the shapes the YAML writes as {symbol: S, offset: OFF}."""
    if isinstance(e, S.SymbolRef):
        return e, None
    if isinstance(e, S.Binary) and e.op == "+" and isinstance(e.left, S.SymbolRef):
        return e.left, e.right
    return None


def _symbol_pairs(sym: S.SymbolRef, offset: S.Expr | None) -> list[tuple[str, str]]:
    pairs = [("symbol", _ystr(sym.name))]
    if offset is not None:
        pairs.append(("offset", _yexpr(offset)))
    if sym.optional:
        pairs.append(("optional", "true"))
    if sym.percpu:
        pairs.append(("percpu", "true"))
    return pairs


def _yaddr(e: S.Expr, space: str | None) -> str:
    if space:
        return _flow([(space, _yexpr(e))])
    sym = _symbol_form(e)
    if sym is not None:
        return _flow(_symbol_pairs(*sym))
    return _yexpr(e)


def _yregion(t: S.RegionTerm) -> str:
    return _spelled(_YAML_REGION_TERMS, t, "a region term")


def _ysized_region(t: S.SizedRegion) -> str:
    sym = _symbol_form(t.base) if t.space is None else None
    if sym is not None:
        return _flow(_symbol_pairs(*sym) + [("size", _yexpr(t.size))])
    # A base with no space is virtual, which is what `va` says.
    return _flow([(t.space or "va", _yexpr(t.base)), ("size", _yexpr(t.size))])


_YAML_REGION_TERMS = {
    S.RegionRef: lambda t: _ystr(t.name),
    S.RangeRegion: lambda t: _flow([("from", _yaddr(t.start, t.space)), ("to", _yaddr(t.end, t.space))]),
    S.SizedRegion: _ysized_region,
    S.RegisterRegion: lambda t: _flow([("register", _ystr(t.register)), ("size", _yexpr(t.size))]),
}


def _yregions(terms: list[S.RegionTerm], access: str | None = None) -> str:
    if len(terms) == 1:
        t = terms[0]
        # A lone name that is a register would read as a register trigger, and a lone
        # mapping under `execute` as a breakpoint: a list of one says "regions".
        ambiguous = access is not None and (
            (isinstance(t, S.RegionRef) and t.name in _REGISTERS)
            or (access == "execute" and not isinstance(t, S.RegionRef)))
        if not ambiguous:
            return _yregion(t)
    return "[" + ", ".join(_yregion(t) for t in terms) + "]"


def _ytrigger(t: S.Trigger) -> str:
    return _spelled(_YAML_TRIGGERS, t, "a trigger")


def _yexecute_trigger(t: S.ExecuteTrigger) -> str:
    sym = _symbol_form(t.address) if t.space is None else None
    if sym is not None:
        return _flow([("execute", _flow(_symbol_pairs(*sym)))])
    return _flow([("execute", _flow([(t.space or "va", _yexpr(t.address))]))])


def _ymsr_trigger(t: S.MsrTrigger) -> str:
    msr = _ystr(t.msr.name) if isinstance(t.msr, S.Name) else _yexpr(t.msr)
    return _flow([("write", _flow([("msr", msr)]))])


_YAML_TRIGGERS = {
    S.MemoryTrigger: lambda t: _flow([(t.access, _yregions(t.regions, t.access))]),
    S.ExecuteTrigger: _yexecute_trigger,
    S.RegisterTrigger: lambda t: _flow([(t.access, _ystr(t.register))]),
    S.MsrTrigger: _ymsr_trigger,
    S.CpuidTrigger: lambda t: "cpuid" if t.leaf is None else _flow([("cpuid", _flow([("leaf", _yexpr(t.leaf))]))]),
    S.EventTrigger: lambda t: _ystr(t.kind),
}


def _yaction(a: S.Action) -> str:
    return _spelled(_YAML_ACTIONS, a, "an action")


def _ydeny(a: S.Deny) -> str:
    pairs = []
    if a.feed is not None:
        pairs.append(("feed", _yquote(a.feed)))
    if a.exception is not None:
        pairs.append(("with", _yquote(a.exception)))
    return _flow([("deny", _flow(pairs))]) if pairs else "deny"


_YAML_ACTIONS = {
    S.Allow: lambda a: "allow",
    S.Pause: lambda a: "pause",
    S.Disarm: lambda a: "disarm",
    S.Deny: _ydeny,
    S.Report: lambda a: _flow([(a.kind, _flow([("severity", _ystr(a.severity)), ("message", _yquote(a.template))]))]),
    S.Limit: lambda a: _flow([("limit", _flow([("rate", _yexpr(a.rate)), ("per", _ystr(a.per)),
                                                ("then", _yaction(a.then))]))]),
    S.Priority: lambda a: _flow([("priority", _yexpr(a.value))]),  # only a second `priority` in one rule
}


def _ytarget(t: S.Target) -> str:
    pairs = [("hypervisor", _ystr(t.hypervisor))]
    if t.version is not None:
        pairs.append(("version", _yquote(f"{t.op or ''}{t.version}")))
    pairs.append(("arch", _ystr(t.arch)))
    return _flow(pairs)


class _YamlWriter:
    def __init__(self, comments: _Comments) -> None:
        self.lines: list[str] = []
        self.c = comments

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def comments_of(self, node: object, indent: str, inline: bool = False) -> str:
        """Every comment attached in or around `node`, as comment lines before it (source order).

        With `inline`, the node's own end-of-line comment is returned instead, to end its line.
        """
        found: list[S.Comment] = []
        suffix = ""
        if inline and self.c.trail.get(id(node)):
            first = self.c.trail[id(node)].pop(0)
            suffix = "  " + _ycomment(first)
            self.c.printed.add(id(first))
        for n in _nodes(node):
            lead = self.c.lead.pop(id(n), None)
            if lead:
                found += [c for c, _ in lead.lines]
            found += self.c.trail.pop(id(n), [])
            closing = self.c.close_lead.pop(id(n), None)
            if closing:
                found += [c for c, _ in closing.lines]
            found += self.c.close_trail.pop(id(n), [])
        found.sort(key=lambda c: (c.span.line, c.span.col))
        for c in found:
            self.lines.append(indent + _ycomment(c))
            self.c.printed.add(id(c))
        return suffix

    def document(self, block: S.PolicyBlock | None, items: list) -> None:
        if block is not None:
            lead = self.c.lead.pop(id(block), None)
            for c in (lead.lines if lead else []):
                self.lines.append(_ycomment(c[0]))
                self.c.printed.add(id(c[0]))
            trail = self.c.trail.pop(id(block), [])
            for c in trail[1:]:
                self.lines.append(_ycomment(c))
                self.c.printed.add(id(c))
            end = ""
            if trail:
                end = "  " + _ycomment(trail[0])
                self.c.printed.add(id(trail[0]))
            self.lines.append(f"policy: {_ystr(block.name)}{end}")
        by_kind: dict[type, list] = {}
        for item in items:
            by_kind.setdefault(type(item), []).append(item)
        for target in by_kind.get(S.Target, []):  # more than one is an error the reader reports
            end = self.comments_of(target, "", inline=True)
            self.lines.append(f"target: {_ytarget(target)}{end}")
        self.list_key("symbols", by_kind.get(S.Symbols, []), lambda s: s.paths)
        for mode in by_kind.get(S.Mode, []):
            end = self.comments_of(mode, "", inline=True)
            self.lines.append(f"mode: {_ystr(mode.mode)}{end}")
        self.list_key("include", by_kind.get(S.Include, []), lambda i: [i.path])
        self.constants(by_kind.get(S.Const, []))
        regions = by_kind.get(S.Region, [])
        if regions:
            self.blank()
            self.lines.append("regions:")
            for r in regions:
                end = self.comments_of(r, "  ", inline=True)
                key = f"  {_ystr(r.name)}:"
                if len(r.terms) == 1:
                    self.lines.append(f"{key} {_yregion(r.terms[0])}{end}")
                    continue
                flow = f"{key} {_yregions(r.terms)}"
                if len(flow) <= _FLOW_WIDTH:
                    self.lines.append(flow + end)
                else:
                    self.lines.append(key + end)
                    self.lines += [f"    - {_yregion(t)}" for t in r.terms]
        rules = by_kind.get(S.Rule, [])
        if rules:
            self.blank()
            self.lines.append("rules:")
            for i, rule in enumerate(rules):
                if i:
                    self.blank()
                self.rule(rule)

    def block_tail(self, block: S.PolicyBlock) -> list[S.Comment]:
        """The comments before and after the block's closing brace: YAML has no brace, they go at the end."""
        closing = self.c.close_lead.pop(id(block), None)
        tail = [c for c, _ in closing.lines] if closing else []
        return tail + self.c.close_trail.pop(id(block), [])

    def tail(self, comments: list[S.Comment]) -> None:
        comments = [c for c in comments if id(c) not in self.c.printed]
        if comments:
            self.blank()
        for c in comments:
            self.lines.append(_ycomment(c))
            self.c.printed.add(id(c))

    def list_key(self, key: str, items: list, values) -> None:
        if not items:
            return
        for item in items:
            end = self.comments_of(item, "", inline=len(items) == 1)
        paths = [p for item in items for p in values(item)]
        value = _ystr(paths[0]) if len(paths) == 1 else "[" + ", ".join(_ystr(p) for p in paths) + "]"
        self.lines.append(f"{key}: {value}{end}")

    def constants(self, consts: list[S.Const]) -> None:
        if not consts:
            return
        self.blank()
        flow = f"constants: {_flow([(_ystr(c.name), _yexpr(c.value)) for c in consts])}"
        if len(flow) <= _FLOW_WIDTH and not any(_has_comments(self.c, c) for c in consts):
            self.lines.append(flow)
            return
        self.lines.append("constants:")
        for c in consts:
            end = self.comments_of(c, "  ", inline=True)
            self.lines.append(f"  {_ystr(c.name)}: {_yexpr(c.value)}{end}")

    def rule(self, rule: S.Rule) -> None:
        end = self.comments_of(rule, "  ", inline=True)
        pairs: list[tuple[str, str]] = []
        if rule.name is not None:
            pairs.append(("name", _ystr(rule.name)))
        pairs.append(("on", _ytrigger(rule.trigger)))
        if rule.where is not None:
            pairs.append(("where", _yquote(format_expr(rule.where))))
        actions = list(rule.actions)
        priority = next((a for a in actions if isinstance(a, S.Priority)), None)
        if priority is not None:
            actions.remove(priority)
            pairs.append(("priority", _yexpr(priority.value)))
        for i, (k, v) in enumerate(pairs):
            self.lines.append(f"  {'- ' if i == 0 else '  '}{k}: {v}{'' if i else end}")
        done = [_yaction(a) for a in actions]
        flow = f"    do: [{', '.join(done)}]"
        if len(flow) <= _FLOW_WIDTH or not done:
            self.lines.append(flow)
        else:
            self.lines.append("    do:")
            self.lines += [f"      - {a}" for a in done]


def _nodes(node: object) -> list[object]:
    """A statement and the statements inside it (a rule's actions)."""
    if isinstance(node, S.Rule):
        return [node, *node.actions]
    return [node]


def _has_comments(c: _Comments, node: object) -> bool:
    return any(id(n) in table for n in _nodes(node) for table in (c.lead, c.trail, c.close_lead, c.close_trail))


def format_yaml(file: S.PolicyFile) -> str:
    """The YAML spelling of a file (docs/YAML.md), in the canonical layout.

    DSL comments become YAML comments before the item they were attached to.
    Several policy blocks in one file become several YAML documents.
    """
    comments = _attach(file)
    w = _YamlWriter(comments)
    blocks = [i for i in file.items if isinstance(i, S.PolicyBlock)]
    bare = [i for i in file.items if not isinstance(i, S.PolicyBlock)]
    if not blocks:
        if bare:
            w.document(None, bare)
    tail: list[S.Comment] = []
    for i, block in enumerate(blocks):
        if i:
            w.tail(tail)
            w.blank()
            w.lines.append("---")
        w.document(block, (bare if i == 0 else []) + list(block.items))
        tail = w.block_tail(block)
    # After the last item; then the fallback: a comment nothing claimed is kept at the end.
    w.tail(tail + [c for c, _ in comments.end.lines])
    w.tail(comments.leftovers())
    while w.lines and w.lines[-1] == "":
        w.lines.pop()
    return "\n".join(w.lines) + "\n" if w.lines else ""
