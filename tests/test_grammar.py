"""The grammar itself: conflict-free, loadable from the installed package, operators lexed right."""

from __future__ import annotations

import dataclasses
import tempfile
from importlib import resources
from pathlib import Path

import pytest
from lark import Lark

from policyc import syntax as S
from policyc.diagnostics import Diagnostics, Span
from policyc.dsl import parse_expression
from policyc.dsl_descent import read_expression, read_well_formed
from policyc.dsl_lark import parse_expression_with_lark, parse_with_lark


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


# ---------------------------------------------------------------- the descent reader against Lark

REPO = Path(__file__).resolve().parent.parent
TRICKY = '''
# a comment before the block
policy "tricky" {
    target xen >= 4.17 on x86_64-nomtf
    symbols "a.map", "b\\x41.map"
    const K = (1 + 2) * ~3 - -(4) << 2 | 0x10 & 0b1 ^ 0o7
    const N = size + msr + leaf + to + a.b + f(1, (2)) + not
    region r = va 0x1000 size 4096, pa 0x2000 .. 0x3000, symbol? x + 8 .. (symbol y), register idtr size 16
    region u = r, (0x5000) size (K)
    rule on write
        to r, va 0x9000 size 8 where (rip in r) == 1 and not cr3 not in u or rax < 3 { deny feed "\\x00" with #UD }
    rule x: on execute in u where percpu symbol foo != (rsp) { log info "x {rip:#x}" alert warn "y" }  # trailing
    rule y: on execute pa 0x1234 { limit (10) per second then deny with # a comment first
        #GP pause disarm priority -1 }
    rule z: on write msr 0xc0000082 { allow }
    rule on write msr lstar { allow }
    rule on read idtr { allow }
    rule on write cr0 where changed(cr0.WP) { deny }
    rule on cpuid leaf (1) { allow }
    rule on cpuid { allow }
    rule on guest_request { allow } rule on debug_exception { allow } rule on smc { allow }
}
'''


def _same(a, b, where="file") -> str | None:
    """The first difference between two syntax trees, spans included (they never take part in ==)."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} != {type(b).__name__}"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            found = _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items != {len(b)}"
        return next((d for d in (_same(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))) if d), None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _both(text: str, path: str):
    d = Diagnostics()
    reference = parse_with_lark(text, path, d)
    return read_well_formed(text, path), reference, d


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in REPO.glob("**/*.vmi")
                                        if ".venv" not in p.parts))
def test_descent_reader_builds_the_tree_lark_builds(path):
    text = (REPO / path).read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
    fast, reference, d = _both(text, path)
    if d.has_errors:
        assert fast is None, "the descent reader accepted a file Lark rejects"
        return
    assert fast is not None, "the descent reader gave up on a well-formed file"
    items, comments = fast
    assert _same(items, reference.items) is None
    assert _same(comments, reference.comments) is None


def test_descent_reader_matches_lark_on_contextual_keywords_parentheses_and_vectors():
    fast, reference, d = _both(TRICKY, "tricky.vmi")
    assert not d.has_errors and fast is not None
    assert _same(fast[0], reference.items) is None
    assert _same(fast[1], reference.comments) is None
    rules = reference.items[0].items
    # `#GP` after a comment that follows `with` is the vector; the comment stays a comment
    assert [c.text for c in reference.comments] == ["# a comment before the block", "# trailing",
                                                    "# a comment first"]
    assert rules[-10].actions[0].then.exception == "#GP"


@pytest.mark.parametrize("text", ["policy \"p\" { rule on write to r { deny } ",  # unclosed
                                  "policy \"p\" { const x = 0b102 }",  # malformed number
                                  "policy \"p\" { rule on read of r { log info \"\\q\" } }",  # bad escape
                                  "policy \"p\" { const x = a == b == c }",  # comparisons do not chain
                                  "policy \"p\" { region on = va 1 size 2 rule on: on cpuid { allow } }",
                                  "policy \"p\" { const x = " + "(" * 120 + "1" + ")" * 120 + " }",
                                  "policy \"p\" { const x = " + "+".join(["1"] * 250) + " }"])
def test_descent_reader_gives_up_where_lark_reports_or_nesting_is_deep(text):
    fast, _, _ = _both(text, "p.vmi")
    assert fast is None


@pytest.mark.parametrize("text", ["a", "1", "(rip)", "not x in r and (cr4 & cr4.SMEP) == 0 or - ~ 3 * (4)",
                                  "set(cr0.WP) or changed(cr4.SMEP, x)", "symbol? f + 0x10 .. 3",
                                  "percpu symbol cur", "a # a comment\n + b", "a +", "0b12", "(((1)))",
                                  "+".join(["1"] * 250), " or ".join(["a"] * 250)])
def test_descent_reader_reads_yaml_expressions_as_lark_does(text):
    base = Span("p.yaml", 7, 12)
    d = Diagnostics()
    reference = parse_expression_with_lark(text, base, d)
    fast = read_expression(text, base)
    if d.has_errors:
        assert fast is None
    else:
        assert fast is not None and _same(fast, reference) is None


_WORDS = ["on", "rule", "region", "const", "not", "in", "and", "or", "size", "symbol", "symbol?", "percpu", "va",
          "pa", "register", "where", "deny", "with", "#UD", "feed", "log", "execute", "read", "write", "to", "of",
          "msr", "cpuid", "leaf", "limit", "per", "second", "then", "..", "(", ")", "{", "}", ",", ":", "=", "==",
          "<", "<<", "-", "~", "x", "0x10", "0b2", '"s"', "# c\n", "\n"]


@pytest.mark.parametrize("ahead", [0, 1, 40])
def test_descent_reader_lexes_ahead_across_lines_as_lark_does(monkeypatch, ahead):
    # The reader lexes a line-bounded chunk at a time: with chunks of a line or two, every line end of
    # the examples is a chunk end, and the trees (spans and comments included) must not change.
    import policyc.dsl_descent as descent
    monkeypatch.setattr(descent, "LEX_AHEAD", ahead)
    for path in sorted((REPO / "examples" / "policies").glob("*.vmi")):
        text = path.read_text(encoding="utf-8")
        fast, reference, d = _both(text, path.name)
        assert not d.has_errors and fast is not None, path
        assert _same(fast[0], reference.items) is None, path
        assert _same(fast[1], reference.comments) is None, path


def test_descent_reader_agrees_with_lark_on_mutated_examples():
    # Random token-level edits of the example policies: whatever the descent reader accepts, Lark must
    # accept too and build the same tree (spans included); what Lark rejects, the reader must give up on.
    import random
    import re

    rng = random.Random(12)
    sources = sorted(p for p in (REPO / "examples" / "policies").glob("*.vmi"))
    tokens_of = {p.name: re.findall(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*\n|\s+|[A-Za-z_0-9?#.]+|.', p.read_text())
                 for p in sources}
    accepted, rejected = _mutations_agree(tokens_of, rng, 150, edits=3)
    assert accepted and rejected  # both outcomes were exercised


def _mutations_agree(tokens_of: dict[str, list[str]], rng, rounds: int, edits: int) -> tuple[int, int]:
    """Apply 1..`edits` random token edits to one of the texts `rounds` times; each edited text the descent
    reader accepts must be Lark's tree, each Lark rejects the reader must give up on. (accepted, rejected)."""
    names = list(tokens_of)
    accepted = rejected = 0
    for _ in range(rounds):
        name = rng.choice(names)
        tokens = list(tokens_of[name])
        for _ in range(rng.randint(1, edits)):
            i = rng.randrange(len(tokens))
            edit = rng.randrange(3)
            if edit == 0:
                del tokens[i]
            elif edit == 1:
                tokens.insert(i, rng.choice(_WORDS) + rng.choice([" ", ""]))
            else:
                j = rng.randrange(len(tokens))
                tokens[i], tokens[j] = tokens[j], tokens[i]
        text = "".join(tokens)
        fast, reference, d = _both(text, name)
        if d.has_errors:
            assert fast is None, text
            rejected += 1
        elif fast is not None:
            assert _same(fast[0], reference.items) is None, text
            assert _same(fast[1], reference.comments) is None, text
            accepted += 1
    return accepted, rejected


LINE_FORMS = '''policy "p" {
    region r0 = symbol _text - 0x200000000 + 0x0 size 0x19000
    region r1 = symbol _text + 0x10 size 16
        + 4
    region r2 = symbol _text size 0x10, symbol _stext size 8
    region r3 = symbol _text size 0x10 # trailing
    region r4 = symbol _text size 0x10
    , symbol _stext size 8
    rule w0: on write to r0 { deny }
    rule w1: on execute in r1 where rip not in r0 { deny }
    rule w2: on read of r2 { log info "read {gla:#x}" }
    rule w3: on access to r3 where rip in r2 { alert high "a\\tb" }
    rule w4: on write to r4 { allow } rule w5: on write to r4 { deny }
    region size2 = symbol _text size 010
    region r5 = symbol _text - 5 - 0X1F size 0
    rule w6  :  on  write to  r5 {deny}
    region in = symbol _text size 1
    rule w7: on write to in { deny }
    rule w8: on write to r5 where rip not in in { deny }
    region v0 = va 0xffffffff81000000 size 4096
    region v1 = pa 0x1000 .. 0x2000
    region v2 = symbol _text + 0x10 .. symbol _etext - 8
    region v3 = symbol _text size 8 * PAGE
    region v4 = symbol _text size PAGE * 2
    region v5 = symbol _text size PAGE
    region v6 = v0, v1 ,v2
    region v7 = v6
    region v8 = symbol _text size 2 * 3 + 1
    region t0 =\tsymbol\t_text-0x10+8\tsize\t0x10*PAGE
    region t1 = v0,v1,\tv2
    region t2 = pa 0x1000..0x2000
    region g0 = symbol _text-8 size 8*PAGE
    region g1 = symbol _text -8 + 0x10 size PAGE
    region g2 = symbol _text +0x10 size 16
    region g3 = symbol symbolic + 010 .. symbol _etext
    rule t3:\ton\twrite to\tt0\twhere\trip\tnot in t1{\tlog\tinfo\t"x"}
}
'''


@pytest.mark.parametrize("ahead", [0, 2048])
def test_descent_reader_reads_the_one_line_forms_as_lark_does(monkeypatch, ahead):
    # Region and rule lines that policyc.dsl_descent reads whole (_REGION_LINE, _RULE_LINE), beside
    # lines that only look like them (a term continued on the next line, a comment, a keyword as a name).
    # A line is read whole where nothing after it was lexed ahead: every line with chunks of a line.
    import policyc.dsl_descent as descent
    monkeypatch.setattr(descent, "LEX_AHEAD", ahead)
    monkeypatch.setattr(descent, "LINES_WHOLE_FROM", 0)
    fast, reference, d = _both(LINE_FORMS, "l.vmi")
    assert not d.has_errors and fast is not None
    assert _same(fast[0], reference.items) is None
    assert _same(fast[1], reference.comments) is None
    bad_escape = LINE_FORMS[:-2] + '    rule w9: on read  of r5 { log info "\\q" }\n}\n'
    assert _both(bad_escape, "l.vmi")[0] is None  # Lark's to report


def test_descent_reader_agrees_with_lark_on_mutated_one_line_forms(monkeypatch):
    import random
    import re

    import policyc.dsl_descent as descent
    monkeypatch.setattr(descent, "LEX_AHEAD", 0)
    monkeypatch.setattr(descent, "LINES_WHOLE_FROM", 0)
    tokens = re.findall(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*\n|\s+|[A-Za-z_0-9?#.]+|.', LINE_FORMS)
    accepted, rejected = _mutations_agree({"l.vmi": tokens}, random.Random(7), 200, edits=2)
    assert accepted and rejected


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_line_forms_read_generated_policies_as_the_token_path_does(monkeypatch, seed):
    # Large files are read a line at a time (`_REGION_LINE`, `_RULE_LINE`, spaced operands split on
    # spaces); the token-by-token reader, held to Lark above, must build the same tree, spans included,
    # from the generated policies of bench/check_scale.py (every form of region, trigger and action) and
    # bench/compile_scale.py (the 10 MB policy's lines).
    import sys

    import policyc.dsl_descent as descent
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import check_scale
        import compile_scale
    finally:
        sys.path.remove(str(REPO / "bench"))
    texts = [check_scale.Generator(300, 900, seed=seed, symbols_file="System.map").text()]
    with tempfile.TemporaryDirectory() as tmp:
        texts.append(compile_scale.generate(Path(tmp), 400 * seed, 4000).read_text())
    for text in texts:
        monkeypatch.setattr(descent, "LINES_WHOLE_FROM", 0)
        reader = descent._Reader(text, "g.vmi")
        whole = reader.file()
        assert reader.line_hits > 200
        monkeypatch.setattr(descent, "LINES_WHOLE_FROM", 1 << 60)
        tokens = descent._Reader(text, "g.vmi").file()
        assert _same(whole, tokens) is None
