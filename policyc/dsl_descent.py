"""A recursive-descent reader for well-formed DSL files: the fast path of `policyc.dsl`.

Lark's LALR parser (`grammar/policy.lark`) stays the definition of the
language and the only source of syntax diagnostics; in pure Python it costs
about 30 µs a token, so a generated policy of 80,000 rules took over a
minute to parse. This reader covers the same grammar in one pass over the
text, building `policyc.syntax` nodes directly (no parse tree), and gives up
(returns None) at the first thing it does not expect: a syntax error, a bad
string escape or number, an expression nested deeper than `MAX_NESTING`.
The caller then parses the file with Lark, which reports what is wrong, so
diagnostics are exactly what they were.

What it must reproduce, and how:

- the contextual lexer: a word is a keyword only where the LALR parser could
  accept that keyword (`not` starts an expression but is a name after `+`;
  `va`/`pa` are a space only where a region or breakpoint address starts;
  `on` right after `rule` is the keyword); `read of`, `write to`,
  `access to` are one token where a trigger starts; `#UD` is a vector right
  after `with` and a comment anywhere else;
- the spans: Lark's `propagate_positions` places a node from its first
  token (keywords included) to its last, and a parenthesised operand counts
  with its parentheses for the node that holds it (its "container"), while
  the operand's own node keeps the span without them. Every parse function
  here returns (node, container start, container end) as text offsets.

`tests/test_grammar.py` parses every policy of the repository both ways and
compares the trees span by span.
"""

from __future__ import annotations

import re
from bisect import bisect_right

from . import syntax as S
from .diagnostics import Span

__all__ = ["read_well_formed", "read_expression", "decode_string", "join_spans", "MAX_NESTING"]

# Deeper than this the reader hands over to Lark, whose path reports PC115 where it applies.
MAX_NESTING = 50

_SKIP = re.compile(r"[ \t\f\r\n]*")
_COMMENT = re.compile(r"#[^\n]*")
# Whitespace, then one token; a `#` stops it (a comment, or a vector where one may stand).
_TOKEN = re.compile(r"""[ \t\f\r\n]*(?:
    (?P<HASH>\#)
  | (?P<STRING>"(?:[^"\\\n]|\\.)*")
  | (?P<OSYM>symbol\?)
  | (?P<WORD>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<INT>[0-9][0-9A-Za-z_]*)
  | (?P<OP>\.\.|==|!=|<=|>=|<<|>>|[-+*/%&|^~(){},:=.<>])
  | (?P<EOF>\Z))""", re.X)
_SIGNS = frozenset("-+*")
_DIGITS = frozenset("0123456789")
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")
_ARCH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(-[A-Za-z0-9_]+)*")
_VECTOR = re.compile(r"#[A-Z]{2,3}\b")
_ACCESS_PREP = re.compile(r"read\s+of\b|write\s+to\b|access\s+to\b")

_CMP = frozenset({"==", "!=", "<=", ">=", "<", ">"})
# Binary operators by binding strength (all chains are left-associative).
_BINARY = {"|": 1, "^": 2, "&": 3, "<<": 4, ">>": 4, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6}
_ITEMS = frozenset({"target", "symbols", "mode", "const", "region", "rule", "include"})
_EVENTS = {"guest_request": "guest_request", "debug_exception": "debug_exception", "smc": "smc"}
_EOF = ("EOF", "", -1, -1)
LEX_AHEAD = 2048  # characters lexed in one scan (to the end of the line this far on)

class _Lazy:
    """A regex compiled when first used: the line forms below took a cold start 20 ms to compile, and
    files under `LINES_WHOLE_FROM` characters never use them."""

    __slots__ = ("source", "flags", "compiled")

    def __init__(self, source: str, flags: int = 0) -> None:
        self.source, self.flags, self.compiled = source, flags, None

    def compile(self) -> re.Pattern:
        if self.compiled is None:
            self.compiled = re.compile(self.source, self.flags)
        return self.compiled

    def match(self, text: str, pos: int) -> re.Match | None:
        return (self.compiled or self.compile()).match(text, pos)

    def findall(self, text: str, pos: int, endpos: int) -> list:
        return (self.compiled or self.compile()).findall(text, pos, endpos)


# Lines are read whole (`_Reader.line_item`) in files of this many characters or more; in smaller ones
# the time saved is less than compiling the patterns costs.
LINES_WHOLE_FROM = 64 * 1024

# The two lines generated policies are made of, each read whole by one match (`_Reader.line_item`):
#   region NAME = symbol NAME (+|- INT)... size INT
#   rule NAME: on (write to|read of|access to|execute in) NAME [where NAME [not] in NAME] { VERDICT }
# with VERDICT `allow`, `deny`, or `log|alert SEVERITY "STRING"`. Names are no keyword of the grammar
# and numbers plain decimal or hex, so each token is what the reader's own lexer would make of it; a
# line that is anything else (a comment, an operator, a term over two lines) is read token by token.
_KEYWORDS = ("alert|allow|and|const|cpuid|debug_exception|deny|disarm|execute|feed|guest_request|in|include|"
             "leaf|limit|log|mode|msr|not|on|or|pause|per|percpu|policy|priority|read|region|register|rule|"
             "second|size|smc|symbol|symbols|target|then|where|with|write|va|pa|access|to|of")
_NAME = rf"(?!(?:{_KEYWORDS})(?![A-Za-z0-9_]))[A-Za-z_][A-Za-z0-9_]*"
_INT = r"(?:0[xX][0-9a-fA-F]+|[0-9]+)(?![A-Za-z0-9_])"
_ITEM_END = r"[ \t\r]*(?=\n|\Z)"
_SYMBOL_PLUS = rf"symbol[ \t]+{_NAME}(?:[ \t]*[-+][ \t]*{_INT}){{0,8}}"  # only + and -: no precedence to mind
_SIZE = rf"(?:{_INT}|{_NAME})(?:[ \t]*\*[ \t]*(?:{_INT}|{_NAME}))?"  # one * at most
_REGION_LINE = _Lazy(rf"""[ \t\r\n]*(?P<start>region)[ \t]+(?P<name>{_NAME})[ \t]*=[ \t]*(?:
    (?:(?P<space>va|pa)[ \t]+)?(?P<base>{_SYMBOL_PLUS}|{_INT})[ \t]+
        (?:size[ \t]+(?P<size>{_SIZE})|\.\.[ \t]*(?P<last>{_SYMBOL_PLUS}|{_INT}))
  | (?P<union>{_NAME}(?:[ \t]*,[ \t]*{_NAME})*)){_ITEM_END}
    # nothing on the next lines continues the region: an item, the policy's end or the text's
    (?=[ \t\r\n]*(?:\}}|(?:region|rule|const|target|symbols|mode|include)(?![A-Za-z0-9_])|\Z))""", re.X)
# The tokens of one group of `_REGION_LINE`, all found by one `findall` (the separators before each are its
# first field, so the tokens' columns follow from the lengths): a separator run, then an operator, a number,
# `symbol ` and its name, or a name.
_SIMPLE_TOKENS = _Lazy(rf"([ \t,]*)(?:([-+*])|({_INT})|(symbol[ \t]+)([A-Za-z_][A-Za-z0-9_]*)"
                       r"|([A-Za-z_][A-Za-z0-9_]*))")
_RULE_LINE = _Lazy(rf"""[ \t\r\n]*(?P<start>rule)[ \t]+(?P<name>{_NAME})[ \t]*:[ \t]*on[ \t]+
    (?P<access>write(?=[ \t]+to[ \t])|read(?=[ \t]+of[ \t])|access(?=[ \t]+to[ \t])|execute(?=[ \t]+in[ \t]))
    [ \t]+[a-z]{{2}}[ \t]+(?P<region>{_NAME})
    (?:[ \t]+where[ \t]+(?P<value>{_NAME})[ \t]+(?P<not>not[ \t]+)?in[ \t]+(?P<in>{_NAME}))?
    [ \t]*\{{[ \t]*(?:(?P<verdict>allow|deny)|(?P<report>log|alert)[ \t]+(?P<severity>{_NAME})[ \t]+
    (?P<string>"(?:[^"\\\n]|\\.)*"))[ \t]*(?P<end>\}})""", re.X)


def read_well_formed(text: str, path: str) -> tuple[list, list[S.Comment]] | None:
    """The items and comments of a DSL file, or None when anything in it is not plainly well formed."""
    reader = _Reader(text, path)
    try:
        items = reader.file()
    except (_GiveUp, RecursionError):
        return None
    return items, [S.Comment(text[s:e].rstrip(), reader.span(s, e)) for s, e in reader.comments]


def read_expression(text: str, base: Span) -> S.Expr | None:
    """An expression written inside a YAML string whose first character is at `base`, or None."""
    reader = _Reader(text, base.file, base)
    try:
        expr = reader.expr()[0]
        if reader.peek() is not _EOF:
            return None
    except (_GiveUp, RecursionError):
        return None
    return expr


class _GiveUp(Exception):
    """Not for this reader: Lark parses the file (and reports what is wrong)."""


class _Reader:
    def __init__(self, text: str, path: str, base: Span | None = None) -> None:
        self.text = text
        self.base = base
        self.path = path
        self.pos = 0
        self.tok: tuple[str, str, int, int] | None = None
        self.ahead: list[tuple[str, str, int, int]] = []  # the tokens after self.tok, last first
        self.comments: list[tuple[int, int]] = []
        self.depth = 0
        self.line_hits = self.line_misses = 0  # items read by `line_item`, and not
        self.lines_whole = len(text) >= LINES_WHOLE_FROM and base is None
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.line_cache = (1, 0, self.line_starts[1] if len(self.line_starts) > 1 else len(text) + 1)

    # -- positions
    def span(self, start: int, end: int) -> Span:
        """Span of text[start:end] as Lark's positions give it (end column inclusive, never before the start)."""
        line, line_start, next_start = self._line_of(start)
        col = start - line_start + 1
        last = end - 1 if end > start else start
        if last >= next_start:  # ends on a later line
            starts = self.line_starts
            end_line = bisect_right(starts, last)
            end_col = last - starts[end_line - 1] + 1
        else:
            end_line, end_col = line, last - line_start + 1
        span = Span(self.path, line, col, end_line, end_col if end_col > col else col)
        return span if self.base is None else span.shifted(self.base.line - 1, self.base.col - 1)

    def _line_of(self, start: int) -> tuple[int, int, int]:
        """The line holding offset `start`: its number, its first offset and the next line's."""
        # Nodes are made in text order, so most spans start on the line the last one did: a bisection in
        # the line table only when they do not.
        cached = self.line_cache
        if cached[1] <= start < cached[2]:
            return cached
        starts = self.line_starts
        line = bisect_right(starts, start)
        cached = self.line_cache = (line, starts[line - 1], starts[line] if line < len(starts) else len(self.text) + 1)
        return cached

    # -- lexing
    def _skip(self, vector: bool = False) -> None:
        text, pos = self.text, self.pos
        while True:
            pos = _SKIP.match(text, pos).end()
            if pos < len(text) and text[pos] == "#":
                if vector and _VECTOR.match(text, pos):
                    break
                end = _COMMENT.match(text, pos).end()
                self.comments.append((pos, end))
                pos = end
                continue
            break
        self.pos = pos

    def peek(self) -> tuple[str, str, int, int]:
        if self.tok is None:
            if self.ahead:
                self.tok = self.ahead.pop()
                return self.tok
            m = _TOKEN.match(self.text, self.pos)
            if m is not None and m.lastgroup == "HASH":
                self._skip()
                m = _TOKEN.match(self.text, self.pos)
            if m is None:
                raise _GiveUp
            kind = m.lastgroup
            if kind == "EOF":
                self.pos = m.end()
                self.tok = _EOF
            else:
                self.tok = (kind, m.group(kind), m.start(kind), m.end())  # type: ignore[assignment]
                self._lex_ahead(m.end())
        return self.tok  # type: ignore[return-value]

    def _lex_ahead(self, pos: int) -> None:
        """Lex the tokens after `pos` up to a line end about LEX_AHEAD characters on, in one scan (a match
        a token cost a Python call each): into `ahead`, last first. It stops before a `#` (a comment, or a
        vector: `_skip` decides), before anything that is not a token (the single match gives up there),
        and before the end of the text. Tokens never span lines, so a chunk ending at one cuts none."""
        text = self.text
        end = text.find("\n", pos + LEX_AHEAD)
        if end < 0:
            end = len(text)
        found = []
        for m in _TOKEN.finditer(text, pos, end):
            kind = m.lastgroup
            if m.start() != pos or kind == "HASH" or kind == "EOF":
                break
            pos = m.end()
            found.append((kind, m.group(kind), m.start(kind), pos))
        found.reverse()
        self.ahead = found

    def take(self) -> tuple[str, str, int, int]:
        tok = (self.tok or self.peek())
        if tok is _EOF:
            raise _GiveUp
        self.pos = tok[3]
        self.tok = None
        return tok

    def take_if(self, kind: str, value: str) -> tuple[str, str, int, int] | None:
        tok = (self.tok or self.peek())
        return self.take() if tok[0] == kind and tok[1] == value else None

    def expect(self, kind: str, value: str | None = None) -> tuple[str, str, int, int]:
        tok = (self.tok or self.peek())
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise _GiveUp
        return self.take()

    def pattern(self, regex: re.Pattern, vector: bool = False) -> tuple[str, int, int]:
        """A token only one place of the grammar lexes (VERSION, ARCH, VECTOR)."""
        if self.tok is not None:
            raise _GiveUp
        self.ahead = []  # lexed as ordinary tokens: this token is lexed its own way, from self.pos
        self._skip(vector)
        m = regex.match(self.text, self.pos)
        if m is None:
            raise _GiveUp
        self.pos = m.end()
        return m.group(), m.start(), m.end()

    def string(self) -> tuple[str, int, int]:
        _, raw, s, e = self.expect("STRING")
        try:
            return decode_string(raw), s, e
        except ValueError:
            raise _GiveUp from None

    # -- file structure
    def file(self) -> list:
        items = []
        while (self.tok or self.peek()) is not _EOF:
            tok = (self.tok or self.peek())
            items.append(self.policy_block() if tok[:2] == ("WORD", "policy") else self.item())
        return items

    def policy_block(self) -> S.PolicyBlock:
        start = self.take()[2]
        name, _, _ = self.string()
        self.expect("OP", "{")
        items = []
        while True:
            tok = self.tok
            # Lines are tried whole while at least one in five is of the common forms: in a file of other
            # forms a failed match is all they would cost.
            if self.lines_whole and (tok is None or tok[0] == "WORD" and tok[1] in ("region", "rule")) and \
                    self.line_misses <= 4 * self.line_hits + 16:
                item = self.line_item()
                if item is not None:
                    self.line_hits += 1
                    items.append(item)
                    continue
                self.line_misses += 1
            if self.take_if("OP", "}") is not None:
                break
            items.append(self.item())
        return S.PolicyBlock(name, items, self.span(start, self.pos))

    def line_item(self) -> S.Region | S.Rule | None:
        """A region or rule of the common one-line forms (`_REGION_LINE`, `_RULE_LINE`) read by one match,
        the same nodes and spans as `item` makes of it; None (nothing read) for anything else."""
        text, pos = self.text, self.pos
        m = (_RULE_LINE.compiled or _RULE_LINE.compile()).match(text, pos)  # (no wrapper call: once a line)
        item = None if m is None else self._rule_line(m)
        if item is None:
            m = (_REGION_LINE.compiled or _REGION_LINE.compile()).match(text, pos)
            item = None if m is None else self._region_line(m)
        if item is not None:
            # The tokens lexed ahead of the line are read: the next one lexed is after it. (An expression
            # ends where the token after it says, so a region read token by token leaves that one lexed.)
            self.tok, ahead, end = None, self.ahead, self.pos
            while ahead and ahead[-1][2] < end:
                ahead.pop()
        return item

    def _region_line(self, m: re.Match) -> S.Region:
        line, line_start = self._on_line(m.start("start"))
        self.pos = m.end()
        path = self.path
        name, union, space, size = m.group("name", "union", "space", "size")
        if union is not None:
            a, b = m.span("union")
            refs = [S.RegionRef(e.name, e.span) for e in self._simple_operands(a, b, line, line_start)]
            return S.Region(name, refs, Span(path, line, m.start("start") - line_start + 1, line, b - line_start))
        a, b = m.span("base")
        base = self._simple_operands(a, b, line, line_start)[0]
        start = m.start("space") if space is not None else a
        if size is not None:
            a, end = m.span("size")
            term: S.RegionTerm = S.SizedRegion(base, self._simple_operands(a, end, line, line_start)[0], space,
                                               Span(path, line, start - line_start + 1, line, end - line_start))
        else:
            a, end = m.span("last")
            term = S.RangeRegion(base, self._simple_operands(a, end, line, line_start)[0], space,
                                 Span(path, line, start - line_start + 1, line, end - line_start))
        return S.Region(name, [term], Span(path, line, m.start("start") - line_start + 1, line, end - line_start))

    def _on_line(self, start: int) -> tuple[int, int]:
        """The line number of an item that is one line from `start` on (the line forms: their regexes match
        no line break after the item's first word), and the offset that line starts at: every span of the
        item is on it, from column (offset - line start + 1) to (end offset - line start), as `span` gives it
        for a non-empty range. (Line forms are read in files only, never with a `base`.)"""
        line, line_start, _ = self._line_of(start)
        return line, line_start

    def _simple_operands(self, start: int, end: int, line: int, line_start: int) -> list[S.Expr]:
        """The expressions in text[start:end], a group of `_REGION_LINE`: numbers, names, `symbol S`,
        separated by commas or joined left to right by operators of one strength (the regex allows no other)."""
        chunk = self.text[start:end]
        if "\t" not in chunk and "  " not in chunk and "," not in chunk:
            found = self._spaced_operands(chunk, start - line_start + 1, line)
            if found is not None:
                return found
        out: list[S.Expr] = []
        op = None
        path = self.path
        col = start - line_start + 1  # the column of the next token's separators
        for gap, sign, number, symbol, sym, name in _SIMPLE_TOKENS.findall(self.text, start, end):
            col += len(gap)
            if sign:
                op = sign
                col += 1
                continue
            if number:
                last = col + len(number) - 1
                radix = 16 if number[:2] in ("0x", "0X") else 10
                node: S.Expr = S.Num(int(number, radix), radix, Span(path, line, col, line, last))
            elif sym:
                last = col + len(symbol) + len(sym) - 1
                node = S.SymbolRef(sym, False, False, Span(path, line, col, line, last))
            else:
                last = col + len(name) - 1
                node = S.Name(name, Span(path, line, col, line, last))
            if op is not None:
                node, op = _joined(op, out.pop(), node, path, line, last), None
            out.append(node)
            col = last + 1
        if col != end - line_start + 1:  # (the regex covers every character of the group: never)
            raise _GiveUp
        return out

    def _spaced_operands(self, chunk: str, col: int, line: int) -> list[S.Expr] | None:
        """`_simple_operands` of a group whose tokens are one space apart (the common case, and split at
        five times the speed of the regex), from column `col`; None when a piece is more than one token
        (`a-1`, `8*PAGE`: a name, number or symbol name that is not one)."""
        out: list[S.Expr] = []
        op = None
        path = self.path
        pieces = iter(chunk.split(" "))
        for piece in pieces:
            if piece in _SIGNS:
                op = piece
                col += 2
                continue
            if piece[0] in _DIGITS:
                radix = 16 if piece[:2] in ("0x", "0X") else 10
                try:
                    value = int(piece, radix)
                except ValueError:
                    return None
                last = col + len(piece) - 1
                node: S.Expr = S.Num(value, radix, Span(path, line, col, line, last))
            elif piece == "symbol":
                sym = next(pieces, "")
                if not sym.isidentifier():
                    return None
                last = col + 6 + len(sym)
                node = S.SymbolRef(sym, False, False, Span(path, line, col, line, last))
            elif piece.isidentifier():
                last = col + len(piece) - 1
                node = S.Name(piece, Span(path, line, col, line, last))
            else:
                return None
            if op is not None:
                node, op = _joined(op, out.pop(), node, path, line, last), None
            out.append(node)
            col = last + 2
        return out

    def _rule_line(self, m: re.Match) -> S.Rule | None:
        name, access, region, value, negated, inside, verdict, report, severity, string = m.group(
            "name", "access", "region", "value", "not", "in", "verdict", "report", "severity", "string")
        if string is not None:
            try:
                template = decode_string(string)
            except ValueError:
                return None  # the token by token path gives up on it too, and Lark says why
        line, ls = self._on_line(m.start("start"))
        path = self.path
        ls -= 1  # (a column is offset - ls; a range's end column end offset - ls - 1)
        a, b = m.span("region")
        trigger = S.MemoryTrigger(access, [S.RegionRef(region, Span(path, line, a - ls, line, b - ls - 1))],
                                  Span(path, line, m.start("access") - ls, line, b - ls - 1))
        where = None
        if value is not None:
            a, b = m.span("value")
            s, e = m.span("in")
            where = S.InRegion(S.Name(value, Span(path, line, a - ls, line, b - ls - 1)), inside,
                               negated is not None, Span(path, line, a - ls, line, e - ls - 1),
                               Span(path, line, s - ls, line, e - ls - 1))
        if verdict is not None:
            a, b = m.span("verdict")
            at = Span(path, line, a - ls, line, b - ls - 1)
            action = S.Allow(at) if verdict == "allow" else S.Deny(None, None, at)
        else:
            a = m.start("report")
            s, e = m.span("string")
            action = S.Report(report, severity, template, Span(path, line, a - ls, line, e - ls - 1),
                              Span(path, line, s - ls, line, e - ls - 1))
        self.pos = end = m.end()
        return S.Rule(trigger, [action], name, where, Span(path, line, m.start("start") - ls, line, end - ls - 1))

    def item(self):
        kind, word, start, _ = (self.tok or self.peek())
        if kind != "WORD" or word not in _ITEMS:
            raise _GiveUp
        self.take()
        if word == "rule":
            return self.rule(start)
        if word == "target":
            hypervisor = self.expect("WORD")[1]
            op = version = None
            tok = (self.tok or self.peek())
            if tok[0] == "OP" and tok[1] in _CMP:
                op = self.take()[1]
                version = self.pattern(_VERSION)[0]
            self.expect("WORD", "on")
            arch, _, end = self.pattern(_ARCH)
            return S.Target(hypervisor, arch, op, version, self.span(start, end))
        if word == "symbols":
            paths = [self.string()]
            while self.take_if("OP", ","):
                paths.append(self.string())
            return S.Symbols([p for p, _, _ in paths], self.span(start, paths[-1][2]))
        if word == "mode":
            _, name, _, end = self.expect("WORD")
            return S.Mode(name, self.span(start, end))
        if word == "include":
            path, _, end = self.string()
            return S.Include(path, self.span(start, end))
        name = self.expect("WORD")[1]
        self.expect("OP", "=")
        if word == "const":
            value, _, end = self.expr()
            return S.Const(name, value, self.span(start, end))
        terms, _, end = self.region_terms()
        return S.Region(name, terms, self.span(start, end))

    def region_terms(self) -> tuple[list, int, int]:
        term, first, end = self.region_term()
        terms = [term]
        while self.take_if("OP", ","):
            term, _, end = self.region_term()
            terms.append(term)
        return terms, first, end

    def region_term(self) -> tuple[S.RegionTerm, int, int]:
        kind, word, start, _ = (self.tok or self.peek())
        if kind == "WORD" and word == "register":
            self.take()
            register = self.expect("WORD")[1]
            self.expect("WORD", "size")
            size, _, end = self.expr()
            return S.RegisterRegion(register, size, self.span(start, end)), start, end
        space = None
        if kind == "WORD" and word in ("va", "pa"):
            space = self.take()[1]
        base, base_start, end = self.expr()
        if space is None:
            start = base_start
        tok = (self.tok or self.peek())
        if tok[:2] == ("OP", ".."):
            self.take()
            last, _, end = self.expr()
            return S.RangeRegion(base, last, space, self.span(start, end)), start, end
        if tok[:2] == ("WORD", "size"):
            self.take()
            size, _, end = self.expr()
            return S.SizedRegion(base, size, space, self.span(start, end)), start, end
        if space is None and isinstance(base, S.Name) and self.text[start:end] == base.name:
            return S.RegionRef(base.name, base.span), start, end
        raise _GiveUp

    # -- rules
    def rule(self, start: int) -> S.Rule:
        name = None
        tok = (self.tok or self.peek())
        if tok[0] == "WORD" and tok[1] != "on":
            name = self.take()[1]
            self.expect("OP", ":")
        self.expect("WORD", "on")
        trigger = self.trigger()
        where = None
        if self.take_if("WORD", "where"):
            where = self.expr()[0]
        self.expect("OP", "{")
        actions = []
        while self.take_if("OP", "}") is None:
            actions.append(self.action()[0])
        return S.Rule(trigger, actions, name, where, self.span(start, self.pos))

    def trigger(self) -> S.Trigger:
        kind, word, start, end = (self.tok or self.peek())
        if kind != "WORD":
            raise _GiveUp
        if word in ("read", "write", "access"):
            prep = _ACCESS_PREP.match(self.text, start)
            if prep is not None:
                self.pos, self.tok = prep.end(), None
                ahead = self.ahead
                if ahead and ahead[-1][3] == prep.end():
                    ahead.pop()  # `of` or `to`, lexed ahead: the rest lexed ahead still follows
                else:
                    self.ahead = []
                terms, _, end = self.region_terms()
                return S.MemoryTrigger(word, terms, self.span(start, end))
        self.take()
        if word == "execute":
            if self.take_if("WORD", "in"):
                terms, _, end = self.region_terms()
                return S.MemoryTrigger("execute", terms, self.span(start, end))
            space = None
            tok = (self.tok or self.peek())
            if tok[0] == "WORD" and tok[1] in ("va", "pa"):
                space = self.take()[1]
            address, _, end = self.expr()
            return S.ExecuteTrigger(address, space, self.span(start, end))
        if word == "write" and self.take_if("WORD", "msr"):
            tok = self.take()
            if tok[0] == "WORD":
                msr: S.Expr = S.Name(tok[1], self.span(tok[2], tok[3]))
            elif tok[0] == "INT":
                msr = self.number(tok)
            else:
                raise _GiveUp
            return S.MsrTrigger(msr, self.span(start, tok[3]))
        if word in ("read", "write"):
            _, register, _, end = self.expect("WORD")
            return S.RegisterTrigger(word, register, self.span(start, end))
        if word == "cpuid":
            leaf = None
            if self.take_if("WORD", "leaf"):
                leaf, _, end = self.expr()
            return S.CpuidTrigger(leaf, self.span(start, end))
        if word in _EVENTS:
            return S.EventTrigger(_EVENTS[word], self.span(start, end))
        raise _GiveUp

    def action(self) -> tuple[S.Action, int, int]:
        kind, word, start, end = self.take()
        if kind != "WORD":
            raise _GiveUp
        if word == "allow":
            return S.Allow(self.span(start, end)), start, end
        if word == "deny":
            feed = vector = None
            if self.take_if("WORD", "feed"):
                feed, _, end = self.string()
            if self.take_if("WORD", "with"):
                vector, _, end = self.pattern(_VECTOR, vector=True)
            return S.Deny(feed, vector, self.span(start, end)), start, end
        if word in ("log", "alert"):
            severity = self.expect("WORD")[1]
            _, raw, s, end = (self.tok or self.peek())
            template = self.string()[0]
            return S.Report(word, severity, template, self.span(start, end), self.span(s, end)), start, end
        if word == "pause":
            return S.Pause(self.span(start, end)), start, end
        if word == "disarm":
            return S.Disarm(self.span(start, end)), start, end
        if word == "limit":
            rate = self.expr()[0]
            self.expect("WORD", "per")
            self.expect("WORD", "second")
            self.expect("WORD", "then")
            then, _, end = self.action()
            return S.Limit(rate, then, "second", self.span(start, end)), start, end
        if word == "priority":
            value, _, end = self.expr()
            return S.Priority(value, self.span(start, end)), start, end
        raise _GiveUp

    # -- expressions: each returns (node, container start, container end)
    def expr(self) -> tuple[S.Expr, int, int]:
        depth = self.depth
        self._deeper()
        result = self._logic("or")
        self.depth = depth
        return result

    def _deeper(self) -> None:
        """One more level of nesting in the tree being built; too deep is Lark's to judge (PC115)."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _GiveUp

    def _logic(self, op: str) -> tuple[S.Expr, int, int]:
        depth = self.depth
        left, start, end = self._logic("and") if op == "or" else self._not()
        while self.take_if("WORD", op):
            self._deeper()  # a chain is a left-deep tree: each link nests one level
            right, _, end = self._logic("and") if op == "or" else self._not()
            left = S.Binary(op, left, right, join_spans(left.span, right.span))
        self.depth = depth
        return left, start, end

    def _not(self) -> tuple[S.Expr, int, int]:
        tok = (self.tok or self.peek())
        if tok[:2] == ("WORD", "not"):
            self.take()
            self._deeper()
            operand, _, end = self._not()
            self.depth -= 1
            return S.Unary("not", operand, self.span(tok[2], end)), tok[2], end
        left, start, end = self._binary(1)
        kind, word, _, _ = (self.tok or self.peek())
        if kind == "OP" and word in _CMP:
            self.take()
            right, _, end = self._binary(1)
            return S.Binary(word, left, right, self.span(start, end)), start, end
        negated = kind == "WORD" and word == "not"
        if negated:
            self.take()
            if (self.tok or self.peek())[:2] != ("WORD", "in"):
                raise _GiveUp
        if negated or (kind == "WORD" and word == "in"):
            self.take()
            _, region, s, end = self.expect("WORD")
            return S.InRegion(left, region, negated, self.span(start, end), self.span(s, end)), start, end
        return left, start, end

    def _binary(self, weakest: int) -> tuple[S.Expr, int, int]:
        tok = (self.tok or self.peek())
        if tok[0] == "INT" and self.ahead:
            # A number no operator after it binds to (the next token, lexed ahead, says so): the operand
            # is the number alone, as the loop below would find after _unary.
            kind, op, _, _ = self.ahead[-1]
            if kind != "OP" or _BINARY.get(op, 0) < weakest:
                self.take()
                return self.number(tok), tok[2], tok[3]
        depth = self.depth
        left, start, end = self._unary()
        while True:
            kind, op, _, _ = (self.tok or self.peek())
            strength = _BINARY.get(op, 0) if kind == "OP" else 0
            if strength < weakest:
                self.depth = depth
                return left, start, end
            self.take()
            self._deeper()
            right, _, end = self._binary(strength + 1)
            left = S.Binary(op, left, right, join_spans(left.span, right.span))

    def _unary(self) -> tuple[S.Expr, int, int]:
        kind, word, start, end = self.take()
        if kind == "OP" and word in ("-", "~"):
            self._deeper()
            operand, _, end = self._unary()
            self.depth -= 1
            return S.Unary(word, operand, self.span(start, end)), start, end
        if kind == "INT":
            return self.number((kind, word, start, end)), start, end
        if kind == "OP" and word == "(":
            inner = self.expr()[0]
            end = self.expect("OP", ")")[3]
            return inner, start, end
        if kind == "OSYM":
            _, name, _, end = self.expect("WORD")
            return S.SymbolRef(name, True, False, self.span(start, end)), start, end
        if kind != "WORD":
            raise _GiveUp
        if word == "symbol":
            _, name, _, end = self.expect("WORD")
            return S.SymbolRef(name, False, False, self.span(start, end)), start, end
        if word == "percpu":
            self.expect("WORD", "symbol")
            _, name, _, end = self.expect("WORD")
            return S.SymbolRef(name, False, True, self.span(start, end)), start, end
        tok = (self.tok or self.peek())
        if tok[:2] == ("OP", "."):
            self.take()
            _, attr, _, end = self.expect("WORD")
            return S.Attr(word, attr, self.span(start, end)), start, end
        if tok[:2] == ("OP", "("):
            self.take()
            args = []
            if self.take_if("OP", ")") is None:
                args.append(self.expr()[0])
                while self.take_if("OP", ","):
                    args.append(self.expr()[0])
                self.expect("OP", ")")
            end = self.pos
            return S.Call(word, args, self.span(start, end)), start, end
        return S.Name(word, self.span(start, end)), start, end

    def number(self, tok: tuple[str, str, int, int]) -> S.Num:
        text = tok[1].replace("_", "").lower()
        radix = 16 if text.startswith("0x") else 2 if text.startswith("0b") else 8 if text.startswith("0o") else 10
        try:
            value = int(text, 0) if radix != 10 else int(text, 10)
        except ValueError:
            raise _GiveUp from None  # Lark's path reports PC114
        return S.Num(value, radix, self.span(tok[2], tok[3]))


def _joined(op: str, left: S.Expr, right: S.Expr, path: str, line: int, last: int) -> S.Binary:
    """`left op right` of a line form's operands, both on `line`: from the start of `left` to column `last`."""
    return S.Binary(op, left, right, Span(path, line, left.span.col, line, last))


def join_spans(a: Span, b: Span) -> Span:
    """From the start of `a` to the end of `b` (an operator chain's span)."""
    if a is S.NOWHERE or b is S.NOWHERE:
        return a if b is S.NOWHERE else b
    return Span(a.file, a.line, a.col, b.end_line or b.line, b.end_col or b.col)


def decode_string(raw: str) -> str:
    """Decode a quoted DSL string literal (with its quotes). Raises ValueError on a bad escape."""
    body = raw[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("string ends with a lone backslash")
        esc = body[i + 1]
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
            i += 2
        elif esc == "x":
            digits = body[i + 2:i + 4]
            if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"\\x needs two hex digits, got '{digits}'")
            out.append(chr(int(digits, 16)))
            i += 4
        else:
            raise ValueError(f"unknown escape '\\{esc}'")
    return "".join(out)


_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"'}
