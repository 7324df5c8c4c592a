"""The grammar itself: conflict-free, loadable from the installed package, operators lexed right."""

from __future__ import annotations

from importlib import resources

import pytest
from lark import Lark

from policyc import syntax as S
from policyc.diagnostics import Diagnostics, Span
from policyc.dsl import parse_expression


def test_grammar_has_no_conflicts_or_terminal_collisions():
    pytest.importorskip("interegular", reason="Lark's strict mode needs interegular (in the test extra)")
    text = resources.files("policyc.grammar").joinpath("policy.lark").read_text()
    # strict: any shift/reduce conflict or regex collision raises
    Lark(text, parser="lalr", start=["file", "expr"], strict=True, maybe_placeholders=True)


@pytest.mark.parametrize("text, op", [("a << 4", "<<"), ("a >> 4", ">>"), ("a < 4", "<"), ("a <= 4", "<="),
                                      ("a > 4", ">"), ("a >= 4", ">="), ("a == 4", "=="), ("a != 4", "!=")])
def test_operators_lex_as_themselves(text, op):
    d = Diagnostics()
    e = parse_expression(text, Span("x", 1, 1), d)
    assert list(d) == [] and isinstance(e, S.Binary) and e.op == op


def test_keywords_stay_usable_as_names_where_no_keyword_fits():
    d = Diagnostics()
    e = parse_expression("size + msr + leaf + to", Span("x", 1, 1), d)
    assert list(d) == []
    assert isinstance(e, S.Binary) and e.right == S.Name("to")
