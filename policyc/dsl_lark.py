"""The reference DSL parser: Lark's LALR parser of grammar/policy.lark, with its error reporting.

One parser, built once per process (and cached on disk by Lark across
processes). Lark's exceptions never leave this module: they become
`Diagnostic`s. After a syntax error the parser recovers by blanking the
broken item and parsing again, so one run reports every broken item in a
file. `policyc.dsl` sends here only what its descent reader gives up on.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import syntax as S
from .diagnostics import Diagnostics, Span
from .dsl_descent import decode_string, join_spans

__all__ = ["parse_with_lark", "parse_expression_with_lark", "MAX_ERRORS", "MAX_EXPR_DEPTH"]

MAX_ERRORS = 25
# Deeper expressions are no policy anyone writes, and later stages walk them recursively.
MAX_EXPR_DEPTH = 200


def parse_with_lark(text: str, path: str, diagnostics: Diagnostics) -> S.PolicyFile:
    """Parse with the LALR parser of grammar/policy.lark: the reference, and the one that reports
    syntax errors (recovering item by item) for files the descent reader gives up on."""
    comments: list[S.Comment] = []
    poisoned: set[str] = set()
    work = text
    for _ in range(MAX_ERRORS):
        _lexed_comments.clear()
        try:
            tree = _parser().parse(work, start="file", on_error=None)
        except UnexpectedInput as err:
            diagnostics.add(_syntax_diagnostic(err, work, path))
            repaired = _blank_broken_item(work, err, poisoned)
            if repaired is None or repaired == work:
                return S.PolicyFile(path, [], [], "dsl", poisoned)
            work = repaired
            continue
        _prune_deep_items(tree, path, diagnostics, poisoned)
        try:
            items = _build(tree, path, diagnostics)
        except RecursionError:
            diagnostics.error("PC115", Span(path, 1, 1), f"an expression in '{path}' is nested too deeply",
                              f"expressions may nest at most {MAX_EXPR_DEPTH} levels")
            return S.PolicyFile(path, [], [], "dsl", poisoned)
        items = _drop_deep_items(items, diagnostics, poisoned)
        comments = [S.Comment(str(t).rstrip(), _tok_span(t, path)) for t in _lexed_comments]
        return S.PolicyFile(path, items, comments, "dsl", poisoned)
    return S.PolicyFile(path, [], [], "dsl", poisoned)


def parse_expression_with_lark(text: str, span: Span, diagnostics: Diagnostics) -> S.Expr | None:
    """Parse an expression written inside a YAML string with Lark. `span` locates its first character."""
    try:
        tree = _parser().parse(text, start="expr")
        expr = _build_expr(tree, span, diagnostics)
    except RecursionError:
        diagnostics.error("PC115", span, "expression nested too deeply",
                          f"expressions may nest at most {MAX_EXPR_DEPTH} levels")
        return None
    except UnexpectedInput as err:
        d = _syntax_diagnostic(err, text, span.file)
        if d.span is not None:
            d = type(d)(d.code, d.severity, d.span.shifted(span.line - 1, span.col - 1), d.message, d.hint)
        diagnostics.add(d)
        return None
    if _depth(expr) > MAX_EXPR_DEPTH:
        diagnostics.error("PC115", span, "expression nested too deeply",
                          f"expressions may nest at most {MAX_EXPR_DEPTH} levels")
        return None
    return expr


def _depth(node: object, limit: int = MAX_EXPR_DEPTH) -> int:
    """Nesting depth of a syntax subtree, without recursion (stops counting past `limit`)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(node, 1)]
    while stack:
        current, level = stack.pop()
        if not hasattr(current, "__dataclass_fields__"):
            continue
        deepest = max(deepest, level)
        if level > limit:
            return level
        for name in current.__dataclass_fields__:  # type: ignore[attr-defined]
            value = getattr(current, name)
            for child in (value if isinstance(value, list) else [value]):
                if hasattr(child, "__dataclass_fields__"):
                    stack.append((child, level + 1))
    return deepest


def _prune_deep_items(tree: Tree, path: str, diagnostics: Diagnostics, poisoned: set[str]) -> None:
    """Drop items whose parse tree is deeper than any policy needs, before the (recursive)
    tree builder sees them, and report each at its own position."""
    def too_deep(node: Tree) -> bool:
        stack = [(node, 1)]
        while stack:
            current, level = stack.pop()
            if level > MAX_EXPR_DEPTH + 8:
                return True
            stack.extend((c, level + 1) for c in current.children if isinstance(c, Tree))
        return False

    containers = [tree] + [c for c in tree.children if isinstance(c, Tree) and c.data == "policy_block"]
    for container in containers:
        kept = []
        for child in container.children:
            if isinstance(child, Tree) and child.data != "policy_block" and too_deep(child):
                meta = child.meta
                span = Span(path, meta.line, meta.column) if not getattr(meta, "empty", True) else Span(path, 1, 1)
                diagnostics.error("PC115", span, "an expression here is nested too deeply",
                                  f"expressions may nest at most {MAX_EXPR_DEPTH} levels")
                name = child.children[0] if child.children else None
                if isinstance(name, Token) and name.type == "NAME":
                    poisoned.add(str(name))
                continue
            kept.append(child)
        container.children = kept


def _has_bad_number(node: object) -> bool:
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, S.Num):
            if current.radix == 0:
                return True
            continue
        if hasattr(current, "__dataclass_fields__") and not isinstance(current, Span):
            for name in current.__dataclass_fields__:  # type: ignore[attr-defined]
                value = getattr(current, name)
                stack.extend(value if isinstance(value, list) else [value])
    return False


def _drop_deep_items(items: list, diagnostics: Diagnostics, poisoned: set[str]) -> list:
    """Report and drop items holding an expression deeper than MAX_EXPR_DEPTH; drop (already
    reported) items holding a malformed number, so nothing downstream reads it as 0."""
    kept = []
    for top in items:
        inner = top.items if isinstance(top, S.PolicyBlock) else None
        if inner is not None:
            top.items = _drop_deep_items(inner, diagnostics, poisoned)
            kept.append(top)
            continue
        if _has_bad_number(top):
            name = getattr(top, "name", None)
            if isinstance(name, str):
                poisoned.add(name)
            continue
        # An item adds up to a few levels above its expressions (rule -> action -> limit -> ...).
        if _depth(top, MAX_EXPR_DEPTH + 4) > MAX_EXPR_DEPTH + 4:
            diagnostics.error("PC115", top.span, "an expression here is nested too deeply",
                              f"expressions may nest at most {MAX_EXPR_DEPTH} levels")
            name = getattr(top, "name", None)
            if isinstance(name, str):
                poisoned.add(name)
            continue
        kept.append(top)
    return kept


# ---------------------------------------------------------------- the parser

@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("policyc.grammar").joinpath("policy.lark").read_text(encoding="utf-8")
    # Comments are not in the tree; the lexer hands them over so the formatter can keep them.
    return Lark(grammar, parser="lalr", start=["file", "expr"], propagate_positions=True,
                maybe_placeholders=True, cache=True, lexer_callbacks={"COMMENT": _lexed_comments.append})


_lexed_comments: list[Token] = []


# ---------------------------------------------------------------- errors

_TOKEN_WORDS = {
    "NAME": "a name", "INT": "a number", "STRING": "a string", "VERSION": "a version number",
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "COMMA": "','", "COLON": "':'",
    "EQUAL": "'='", "DOT": "'.'", "CMP_OP": "a comparison", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/' or '%'",
    "SHIFT_OP": "'<<' or '>>'", "VBAR": "'|'", "AMPERSAND": "'&'", "CIRCUMFLEX": "'^'", "TILDE": "'~'",
    "MINUS": "'-'", "SPACE": "'va' or 'pa'", "ACCESS_PREP": "'read of', 'write to' or 'access to'",
    "VECTOR": "an exception vector such as #UD", "OPTIONAL_SYMBOL": "'symbol?'", "$END": "end of file",
}


def _describe_expected(expected: set[str]) -> str:
    words = []
    for t in sorted(expected):
        if t in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[t])
        elif t.startswith("__ANON") or t.startswith("_"):
            continue
        else:
            words.append(f"'{t.lower()}'")
    words = sorted(dict.fromkeys(words))
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _syntax_diagnostic(err: UnexpectedInput, text: str, path: str):
    from .diagnostics import Diagnostic, Severity

    line, col = max(1, err.line or 1), max(1, err.column or 1)
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        if ch == '"':
            return Diagnostic("PC113", Severity.ERROR, Span(path, line, col, line, col), "unterminated string",
                              "strings end with '\"' on the same line; write a newline as \\n")
        shown = ch if ch.isprintable() else f"\\x{ord(ch):02x}"
        if ch == "!":
            return Diagnostic("PC111", Severity.ERROR, Span(path, line, col, line, col), "unexpected '!'",
                              "use 'not' (and '!=' for inequality)")
        return Diagnostic("PC111", Severity.ERROR, Span(path, line, col, line, col),
                          f"unexpected character '{shown}'",
                          ("expected " + _describe_expected(set(err.allowed))) if err.allowed else None)
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        expected = set(getattr(err, "expected", ()) or ())
        last = text.rstrip()
        eline = last.count("\n") + 1
        ecol = len(last) - (last.rfind("\n") + 1) + 1
        hint = "a '{' was opened and never closed" if "RBRACE" in expected else None
        if expected and not hint:
            hint = "expected " + _describe_expected(expected)
        return Diagnostic("PC112", Severity.ERROR, Span(path, eline, max(ecol, 1)), "unexpected end of file", hint)
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    pos = getattr(tok, "start_pos", None)
    if pos is not None and pos > 0 and text[pos - 1:pos + 1] in ("&&", "||"):
        # The lexer reads '&&' as '&' '&': point at the first and name the word to use.
        pair = text[pos - 1:pos + 1]
        return Diagnostic("PC110", Severity.ERROR, Span(path, line, col - 1, line, col), f"unexpected '{pair}'",
                          f"use '{'and' if pair == '&&' else 'or'}'")
    shown = str(tok).replace("\n", "\\n")
    end_col = col + max(len(str(tok)), 1) - 1
    expected = set(err.expected)
    hint = _hint_for(err, expected)
    unfinished = _unfinished_item(text.split("\n"), line - 1, col)
    if unfinished is not None:
        keyword = _ITEM_START.match(text.split("\n")[unfinished]).group(1)
        missing = ": is its '}' missing?" if "RBRACE" in expected else ""
        hint = f"the {keyword} on line {unfinished + 1} is not finished{missing}" + (f" ({hint})" if hint else "")
    return Diagnostic("PC110", Severity.ERROR, Span(path, line, col, line, end_col),
                      f"unexpected '{shown}'", hint)


def _hint_for(err: UnexpectedToken, expected: set[str]) -> str:
    prev = getattr(err, "token_history", None) or []
    prev_tok = prev[-1] if prev else None
    tok = err.token
    if prev_tok is not None and prev_tok.type == "NAME" and "COLON" in expected and str(tok) == "on":
        return "a rule name is followed by ':' (rule NAME: on ...)"
    if tok.type == "NAME" and str(tok) in ("to", "of", "in"):
        return "memory triggers read 'on read of R', 'on write to R', 'on execute in R', 'on access to R'"
    if "ACCESS_PREP" in expected and tok.type == "NAME":
        return ("a trigger is one of: read of R, write to R, execute in R, access to R, execute symbol S, "
                "write cr0|cr3|cr4|xcr0, write msr M, read|write idtr|gdtr|ldtr|tr, cpuid, guest_request, "
                "debug_exception, smc")
    if tok.type == "CMP_OP" and "CMP_OP" not in expected:
        return "comparisons do not chain: write 'a < b and b < c'"
    if tok.type == "EQUAL" and "CMP_OP" in expected:
        return "compare with '==' ('=' only defines constants and regions)"
    if str(tok) in ("&&", "||", "!"):
        return "use 'and', 'or', 'not'"
    return "expected " + _describe_expected(expected)


_ITEM_START = re.compile(r"^[ \t]*(rule|region|const|include|target|symbols|mode|policy)\b", re.M)
_NAME_AFTER = re.compile(r"^[ \t]*(?:rule|region|const)\s+([A-Za-z_][A-Za-z0-9_]*)")


def _blank_broken_item(text: str, err: UnexpectedInput, poisoned: set[str]) -> str | None:
    """Blank out (keeping line breaks) the item holding the error, so the rest can be parsed.

    The item is the nearest line above the error that starts with an item
    keyword and is not the continuation of an unfinished line (`const X = 1 +`
    swallows the next line's `rule` as a name).
    """
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        return None
    lines = text.split("\n")
    err_idx = min(max(1, getattr(err, "line", 1) or 1), len(lines)) - 1
    start = _unfinished_item(lines, err_idx, getattr(err, "column", 1) or 1)
    if start is None:
        start = _item_at(lines, err_idx)
    if start is None:
        start, end = err_idx, err_idx + 1  # outside any item: blank just that line
    else:
        end = next((j for j in range(start + 1, len(lines)) if _ITEM_START.match(lines[j])), None)
        if end is None:
            closers = [j for j in range(len(lines)) if lines[j].strip() == "}"]
            end = closers[-1] if closers and closers[-1] >= err_idx else len(lines)
        end = max(end, start + 1)
    m = _NAME_AFTER.match(lines[start])
    if m:
        poisoned.add(m.group(1))
    return "\n".join(lines[:start] + [""] * (end - start) + lines[end:])


def _item_at(lines: list[str], idx: int) -> int | None:
    """The line where the item holding line `idx` starts (None outside any item)."""
    for i in range(idx, -1, -1):
        if lines[i].lstrip().startswith("policy"):
            return None
        if _ITEM_START.match(lines[i]) and not _continues(lines, i):
            return i
    return None


def _unfinished_item(lines: list[str], idx: int, col: int) -> int | None:
    """When the error is the keyword starting an item (line `idx`, column `col`), the item before it never
    finished (`region idt = symbol idt_table` without its size; a rule without its '}'): where that starts."""
    if idx < 1 or not _ITEM_START.match(lines[idx]) or lines[idx][:col - 1].strip():
        return None
    return _item_at(lines, idx - 1)


_OPEN_ENDINGS = ("+", "-", "*", "/", "%", "&", "|", "^", ",", "=", "(", "..", "<<", ">>", "<", ">", "~",
                 " and", " or", " not", " size", " where", " in", " to", " of")


def _continues(lines: list[str], i: int) -> bool:
    """Whether line i continues an unfinished previous line."""
    for j in range(i - 1, -1, -1):
        prev = lines[j].split("#", 1)[0].rstrip()
        if prev:
            return prev.endswith(_OPEN_ENDINGS)
    return False


# ---------------------------------------------------------------- tree -> syntax

def _span_of(meta: Any, path: str) -> Span:
    if getattr(meta, "empty", True):
        return S.NOWHERE
    return Span(path, meta.line, meta.column, meta.end_line, max(meta.end_column - 1, meta.column))


def _tok_span(tok: Token, path: str) -> Span:
    return Span(path, tok.line, tok.column, tok.end_line, max((tok.end_column or tok.column + 1) - 1, tok.column))


class _SyntaxBuilder(Transformer):
    """Turns Lark's parse tree into `policyc.syntax` nodes."""

    def __init__(self, path: str, diagnostics: Diagnostics, base: Span | None = None) -> None:
        super().__init__()
        self.path = path
        self.diagnostics = diagnostics
        self.base = base

    def _span(self, meta: Any) -> Span:
        s = _span_of(meta, self.path)
        return s.shifted(self.base.line - 1, self.base.col - 1) if self.base and s is not S.NOWHERE else s

    def _tspan(self, tok: Token) -> Span:
        s = _tok_span(tok, self.path)
        return s.shifted(self.base.line - 1, self.base.col - 1) if self.base else s

    def _string(self, tok: Token) -> str:
        try:
            return decode_string(str(tok))
        except ValueError as exc:
            self.diagnostics.error("PC113", self._tspan(tok), f"invalid string: {exc}",
                                   "escapes are \\n \\t \\r \\0 \\\\ \\\" and \\xNN")
            return str(tok)[1:-1]

    # -- file structure
    def file(self, children):
        return list(children)

    @v_args(meta=True)
    def policy_block(self, meta, children):
        name_tok, *items = children
        return S.PolicyBlock(self._string(name_tok), list(items), self._span(meta))

    @v_args(meta=True)
    def target(self, meta, children):
        hyp, op, version, arch = children
        return S.Target(str(hyp), str(arch), str(op) if op else None, str(version) if version else None,
                        self._span(meta))

    @v_args(meta=True)
    def symbols(self, meta, children):
        return S.Symbols([self._string(t) for t in children], self._span(meta))

    @v_args(meta=True)
    def mode(self, meta, children):
        return S.Mode(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def const(self, meta, children):
        return S.Const(str(children[0]), children[1], self._span(meta))

    @v_args(meta=True)
    def include(self, meta, children):
        return S.Include(self._string(children[0]), self._span(meta))

    @v_args(meta=True)
    def region(self, meta, children):
        return S.Region(str(children[0]), children[1], self._span(meta))

    def region_terms(self, children):
        return list(children)

    @v_args(meta=True)
    def region_ref(self, meta, children):
        return S.RegionRef(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def range_region(self, meta, children):
        space, start, end = children
        return S.RangeRegion(start, end, str(space) if space else None, self._span(meta))

    @v_args(meta=True)
    def sized_region(self, meta, children):
        space, base, size = children
        return S.SizedRegion(base, size, str(space) if space else None, self._span(meta))

    @v_args(meta=True)
    def register_region(self, meta, children):
        return S.RegisterRegion(str(children[0]), children[1], self._span(meta))

    # -- rules
    @v_args(meta=True)
    def rule(self, meta, children):
        name, trigger, where, *actions = children
        return S.Rule(trigger, list(actions), str(name) if name else None, where, self._span(meta))

    def where(self, children):
        return children[0]

    @v_args(meta=True)
    def memory_trigger(self, meta, children):
        prep, regions = children
        return S.MemoryTrigger(str(prep).split()[0], regions, self._span(meta))

    @v_args(meta=True)
    def execute_in_trigger(self, meta, children):
        return S.MemoryTrigger("execute", children[0], self._span(meta))

    @v_args(meta=True)
    def execute_trigger(self, meta, children):
        space, address = children
        return S.ExecuteTrigger(address, str(space) if space else None, self._span(meta))

    @v_args(meta=True)
    def register_read_trigger(self, meta, children):
        return S.RegisterTrigger("read", str(children[0]), self._span(meta))

    @v_args(meta=True)
    def register_write_trigger(self, meta, children):
        return S.RegisterTrigger("write", str(children[0]), self._span(meta))

    @v_args(meta=True)
    def msr_trigger(self, meta, children):
        return S.MsrTrigger(children[0], self._span(meta))

    @v_args(meta=True)
    def msr_name(self, meta, children):
        return S.Name(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def cpuid_trigger(self, meta, children):
        return S.CpuidTrigger(children[0], self._span(meta))

    @v_args(meta=True)
    def guest_request_trigger(self, meta, children):
        return S.EventTrigger("guest_request", self._span(meta))

    @v_args(meta=True)
    def debug_exception_trigger(self, meta, children):
        return S.EventTrigger("debug_exception", self._span(meta))

    @v_args(meta=True)
    def smc_trigger(self, meta, children):
        return S.EventTrigger("smc", self._span(meta))

    # -- actions
    @v_args(meta=True)
    def allow(self, meta, children):
        return S.Allow(self._span(meta))

    @v_args(meta=True)
    def deny(self, meta, children):
        feed, vector = children
        return S.Deny(feed, vector, self._span(meta))

    def feed(self, children):
        return self._string(children[0])

    def with_exception(self, children):
        return str(children[0])

    @v_args(meta=True)
    def log(self, meta, children):
        return self._report("log", meta, children)

    @v_args(meta=True)
    def alert(self, meta, children):
        return self._report("alert", meta, children)

    def _report(self, kind, meta, children):
        severity, template = children
        return S.Report(kind, str(severity), self._string(template), self._span(meta), self._tspan(template))

    @v_args(meta=True)
    def pause(self, meta, children):
        return S.Pause(self._span(meta))

    @v_args(meta=True)
    def disarm(self, meta, children):
        return S.Disarm(self._span(meta))

    @v_args(meta=True)
    def limit(self, meta, children):
        return S.Limit(children[0], children[1], "second", self._span(meta))

    @v_args(meta=True)
    def priority(self, meta, children):
        return S.Priority(children[0], self._span(meta))

    # -- expressions
    @v_args(meta=True)
    def num(self, meta, children):
        tok = children[0]
        text = str(tok).replace("_", "").lower()
        radix = 16 if text.startswith("0x") else 2 if text.startswith("0b") else 8 if text.startswith("0o") else 10
        try:
            value = int(text, 0) if radix != 10 else int(text, 10)
        except ValueError:
            self.diagnostics.error("PC114", self._tspan(tok), f"invalid number '{tok}'",
                                   "numbers are decimal, 0x hex, 0b binary or 0o octal (with optional _)")
            value, radix = 0, 0  # radix 0 marks it: the item holding it is dropped, not misread as 0
        return S.Num(value, radix, self._span(meta) if not meta.empty else self._tspan(tok))

    @v_args(meta=True)
    def name(self, meta, children):
        return S.Name(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def attr(self, meta, children):
        return S.Attr(str(children[0]), str(children[1]), self._span(meta))

    @v_args(meta=True)
    def symbol(self, meta, children):
        return S.SymbolRef(str(children[0]), False, False, self._span(meta))

    @v_args(meta=True)
    def optional_symbol(self, meta, children):
        return S.SymbolRef(str(children[1]), True, False, self._span(meta))

    @v_args(meta=True)
    def percpu_symbol(self, meta, children):
        return S.SymbolRef(str(children[0]), False, True, self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, *args = children
        args = [a for a in args if a is not None]
        return S.Call(str(func), args, self._span(meta))

    @v_args(meta=True)
    def neg(self, meta, children):
        return S.Unary("-", children[0], self._span(meta))

    @v_args(meta=True)
    def invert(self, meta, children):
        return S.Unary("~", children[0], self._span(meta))

    @v_args(meta=True)
    def not_op(self, meta, children):
        return S.Unary("not", children[0], self._span(meta))

    @v_args(meta=True)
    def compare(self, meta, children):
        left, op, right = children
        return S.Binary(str(op), left, right, self._span(meta))

    @v_args(meta=True)
    def in_region(self, meta, children):
        return S.InRegion(children[0], str(children[1]), False, self._span(meta), self._tspan(children[1]))

    @v_args(meta=True)
    def not_in_region(self, meta, children):
        return S.InRegion(children[0], str(children[1]), True, self._span(meta), self._tspan(children[1]))

    def _chain(self, meta, children, op=None):
        # Left-associative chains: a op b op c; operators are tokens when they vary (ADD_OP...).
        items = list(children)
        left = items[0]
        i = 1
        while i < len(items):
            if isinstance(items[i], Token) and op is None:
                this_op, right = str(items[i]), items[i + 1]
                i += 2
            else:
                this_op, right = op, items[i]
                i += 1
            left = S.Binary(this_op, left, right, join_spans(left.span, right.span))
        return left

    @v_args(meta=True)
    def or_expr(self, meta, children):
        return self._chain(meta, children, "or")

    @v_args(meta=True)
    def and_expr(self, meta, children):
        return self._chain(meta, children, "and")

    @v_args(meta=True)
    def bor(self, meta, children):
        return self._chain(meta, children, "|")

    @v_args(meta=True)
    def bxor(self, meta, children):
        return self._chain(meta, children, "^")

    @v_args(meta=True)
    def band(self, meta, children):
        return self._chain(meta, children, "&")

    @v_args(meta=True)
    def shift(self, meta, children):
        return self._chain(meta, children)

    @v_args(meta=True)
    def sum(self, meta, children):
        return self._chain(meta, children)

    @v_args(meta=True)
    def product(self, meta, children):
        return self._chain(meta, children)


def _build(tree: Tree, path: str, diagnostics: Diagnostics) -> list:
    try:
        return _SyntaxBuilder(path, diagnostics).transform(tree)
    except VisitError as exc:  # a bug in the builder, not the user's input
        raise exc.orig_exc from None


def _build_expr(tree: Tree, base: Span, diagnostics: Diagnostics) -> S.Expr:
    if isinstance(tree, Token):  # a single terminal became the whole expression
        tree = Tree("num" if tree.type == "INT" else "name", [tree])
    try:
        return _SyntaxBuilder(base.file, diagnostics, base).transform(tree)
    except VisitError as exc:
        raise exc.orig_exc from None
