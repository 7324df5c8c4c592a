"""The DSL front end: policy text -> syntax tree, or diagnostics.

Two readers of one grammar (grammar/policy.lark). A well-formed file is read
by the recursive-descent reader of `policyc.dsl_descent` (one pass, no parse
tree); anything it does not plainly accept goes to the LALR parser of
`policyc.dsl_lark`, which is the reference, reports every syntax error with
its position, and is only imported when needed (Lark costs a tenth of a
second to import).
"""

from __future__ import annotations

from typing import Callable

from . import syntax as S
from .diagnostics import Diagnostics, Span
from .dsl_descent import decode_string, read_expression, read_well_formed

__all__ = ["parse_policy_text", "parse_expression", "decode_string", "encode_string", "quote_string"]


def parse_policy_text(text: str, path: str, diagnostics: Diagnostics) -> S.PolicyFile:
    """Parse a whole DSL file. Syntax errors go to `diagnostics`; the tree holds what parsed."""
    well_formed = read_well_formed(text, path)
    if well_formed is not None:
        items, comments = well_formed
        return S.PolicyFile(path, items, comments, "dsl", set())
    from .dsl_lark import parse_with_lark
    return parse_with_lark(text, path, diagnostics)


def parse_expression(text: str, span: Span, diagnostics: Diagnostics) -> S.Expr | None:
    """Parse an expression written inside a YAML string. `span` locates the string's first character."""
    expr = read_expression(text, span)
    if expr is not None:
        return expr
    from .dsl_lark import parse_expression_with_lark
    return parse_expression_with_lark(text, span, diagnostics)


def encode_string(value: str) -> str:
    """The canonical quoted spelling of a string (inverse of `decode_string`)."""
    return quote_string(value, _dsl_escape)


def _dsl_escape(o: int) -> str | None:
    # control characters and unprintable Latin-1 as \xNN; everything else as itself
    return f"\\x{o:02x}" if o < 0x20 or 0x7f <= o < 0x100 and not chr(o).isprintable() else None


_COMMON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def quote_string(value: str, escape_other: Callable[[int], str | None]) -> str:
    """`value` in double quotes with the escapes the DSL and YAML (JSON) spellings share; any other
    character is what `escape_other(code point)` returns, or itself when that is None."""
    out = ['"']
    for ch in value:
        esc = _COMMON_ESCAPES.get(ch)
        if esc is None:
            esc = escape_other(ord(ch))
        out.append(ch if esc is None else esc)
    out.append('"')
    return "".join(out)
