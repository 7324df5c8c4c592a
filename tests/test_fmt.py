"""The formatter: canonical layout, comments kept, idempotence, and round trips through both front ends."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policyc import syntax as S
from policyc.diagnostics import Diagnostics, Span
from policyc.dsl import parse_expression, parse_policy_text
from policyc.fmt import FormatError, check_format, format_dsl, format_expr, format_yaml

try:
    from policyc.yaml_form import parse_yaml_text
except ImportError:  # pragma: no cover - the YAML front end is written separately
    parse_yaml_text = None

needs_yaml = pytest.mark.skipif(parse_yaml_text is None, reason="policyc.yaml_form.parse_yaml_text is not there yet")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"

# The whole policy of LANGUAGE.md, as written there (aligned comments and `=`).
WHOLE = '''\
# linux-kernel-integrity.vmi
policy "linux-kernel-integrity" {
    target xen >= 4.17 on x86_64          # x86_64 = Intel VT-x with EPT; also x86_64-svm, arm64
    symbols "linux-6.1.System.map"        # System.map or a Volatility 3 ISF JSON file
    mode enforce                          # or: audit (deny is logged as "would deny", never applied)

    const NR_SYSCALLS = 451

    region kernel_text = symbol _stext .. symbol _etext
    region rodata      = symbol __start_rodata .. symbol __end_rodata
    region syscalls    = symbol sys_call_table size 8 * NR_SYSCALLS
    region idt         = symbol idt_table size 4096

    rule protect_tables: on write to syscalls, idt {
        deny
        alert critical "dispatch table write at {gla:#x} from {rip:#x}"
    }

    rule no_exec_rodata: on execute in rodata {
        deny
        alert high "execution in read-only data at {rip:#x}"
    }

    rule wp_guard: on write cr0 where cleared(cr0.WP) {
        deny
        alert critical "CR0.WP cleared on vcpu {vcpu}"
    }

    rule smep_smap_guard: on write cr4 where cleared(cr4.SMEP | cr4.SMAP) {
        deny
        alert critical "SMEP/SMAP disabled: {old:#x} -> {new:#x}"
    }

    rule syscall_entry_guard: on write msr LSTAR where new != symbol entry_SYSCALL_64 {
        deny
        alert critical "LSTAR hijack to {new:#x}"
    }

    rule trace_creds: on execute symbol commit_creds {     # an exact address: a breakpoint
        log info "commit_creds on vcpu {vcpu} cr3={cr3:#x}"
    }
}
'''

# Its canonical layout.
CANONICAL = '''\
# linux-kernel-integrity.vmi
policy "linux-kernel-integrity" {
    target xen >= 4.17 on x86_64  # x86_64 = Intel VT-x with EPT; also x86_64-svm, arm64
    symbols "linux-6.1.System.map"  # System.map or a Volatility 3 ISF JSON file
    mode enforce  # or: audit (deny is logged as "would deny", never applied)

    const NR_SYSCALLS = 451

    region kernel_text = symbol _stext .. symbol _etext
    region rodata = symbol __start_rodata .. symbol __end_rodata
    region syscalls = symbol sys_call_table size 8 * NR_SYSCALLS
    region idt = symbol idt_table size 4096

    rule protect_tables: on write to syscalls, idt {
        deny
        alert critical "dispatch table write at {gla:#x} from {rip:#x}"
    }

    rule no_exec_rodata: on execute in rodata {
        deny
        alert high "execution in read-only data at {rip:#x}"
    }

    rule wp_guard: on write cr0 where cleared(cr0.WP) {
        deny
        alert critical "CR0.WP cleared on vcpu {vcpu}"
    }

    rule smep_smap_guard: on write cr4 where cleared(cr4.SMEP | cr4.SMAP) {
        deny
        alert critical "SMEP/SMAP disabled: {old:#x} -> {new:#x}"
    }

    rule syscall_entry_guard: on write msr LSTAR where new != symbol entry_SYSCALL_64 {
        deny
        alert critical "LSTAR hijack to {new:#x}"
    }

    rule trace_creds: on execute symbol commit_creds {  # an exact address: a breakpoint
        log info "commit_creds on vcpu {vcpu} cr3={cr3:#x}"
    }
}
'''

CANONICAL_YAML = '''\
# linux-kernel-integrity.vmi
policy: linux-kernel-integrity
target: {hypervisor: xen, version: ">=4.17", arch: x86_64}  # x86_64 = Intel VT-x with EPT; also x86_64-svm, arm64
symbols: linux-6.1.System.map  # System.map or a Volatility 3 ISF JSON file
mode: enforce  # or: audit (deny is logged as "would deny", never applied)

constants: {NR_SYSCALLS: 451}

regions:
  kernel_text: {from: {symbol: _stext}, to: {symbol: _etext}}
  rodata: {from: {symbol: __start_rodata}, to: {symbol: __end_rodata}}
  syscalls: {symbol: sys_call_table, size: "8 * NR_SYSCALLS"}
  idt: {symbol: idt_table, size: 4096}

rules:
  - name: protect_tables
    on: {write: [syscalls, idt]}
    do:
      - deny
      - {alert: {severity: critical, message: "dispatch table write at {gla:#x} from {rip:#x}"}}

  - name: no_exec_rodata
    on: {execute: rodata}
    do: [deny, {alert: {severity: high, message: "execution in read-only data at {rip:#x}"}}]

  - name: wp_guard
    on: {write: cr0}
    where: "cleared(cr0.WP)"
    do: [deny, {alert: {severity: critical, message: "CR0.WP cleared on vcpu {vcpu}"}}]

  - name: smep_smap_guard
    on: {write: cr4}
    where: "cleared(cr4.SMEP | cr4.SMAP)"
    do: [deny, {alert: {severity: critical, message: "SMEP/SMAP disabled: {old:#x} -> {new:#x}"}}]

  - name: syscall_entry_guard
    on: {write: {msr: LSTAR}}
    where: "new != symbol entry_SYSCALL_64"
    do: [deny, {alert: {severity: critical, message: "LSTAR hijack to {new:#x}"}}]

  - name: trace_creds  # an exact address: a breakpoint
    on: {execute: {symbol: commit_creds}}
    do: [{log: {severity: info, message: "commit_creds on vcpu {vcpu} cr3={cr3:#x}"}}]
'''


# ---------------------------------------------------------------- helpers

def parse(text: str, path: str = "t.vmi") -> S.PolicyFile:
    d = Diagnostics()
    tree = parse_policy_text(text, path, d)
    assert [f"{x.span}: {x.message} ({x.hint})" for x in d] == [], text
    return tree


def parse_yaml(text: str, path: str = "t.yaml") -> S.PolicyFile:
    d = Diagnostics()
    tree = parse_yaml_text(text, path, d)
    assert [f"{x.span}: {x.message} ({x.hint})" for x in d] == [], text
    return tree


def fmt(text: str) -> str:
    return format_dsl(parse(text))


def expr(text: str) -> S.Expr:
    d = Diagnostics()
    e = parse_expression(text, Span("e", 1, 1), d)
    assert list(d) == [], text
    return e


def comment_texts(text: str) -> list[str]:
    return [c.text for c in parse(text).comments]


def assert_comments_kept(before: str, after: str) -> None:
    for c in comment_texts(before):
        assert after.count(c) == 1, (c, after)


# ---------------------------------------------------------------- golden

def test_whole_policy_formats_to_the_canonical_text():
    out = fmt(WHOLE)
    assert out == CANONICAL
    assert_comments_kept(WHOLE, out)
    assert fmt(out) == out


def test_canonical_text_is_a_fixed_point():
    assert fmt(CANONICAL) == CANONICAL


def strip_comments(text: str) -> str:
    """The text without its comments (found by the parser, so a '#' inside a string stays)."""
    lines = text.split("\n")
    drop = set()
    for c in parse(text).comments:
        i, col = c.span.line - 1, c.span.col - 1
        if lines[i][:col].strip():
            lines[i] = lines[i][:col].rstrip()
        else:
            drop.add(i)
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


def test_all_on_one_line_formats_to_the_canonical_text():
    one_line = " ".join(strip_comments(WHOLE).split())
    assert "\n" not in one_line and "#x}" in one_line
    assert fmt(one_line) == strip_comments(CANONICAL)


def test_extra_blank_lines_and_weird_spacing_format_to_the_canonical_text():
    lines = WHOLE.split("\n")
    comment_at = {c.span.line - 1: c.span.col - 1 for c in parse(WHOLE).comments}
    odd = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        code, comment = line, ""
        if i in comment_at:
            code, comment = line[:comment_at[i]], line[comment_at[i]:]
        # weird spacing (outside strings and comments): indentation, squeezed or doubled blanks
        parts = code.strip().split('"')
        parts[::2] = [p.replace(" = ", "=").replace(", ", " ,  ").replace(" {", "{").replace(": on", " :on")
                      for p in parts[::2]]
        odd.append(" " * (i % 7) + '"'.join(parts) + ("   " if i % 2 else "\t") + comment)
        # extra blank lines, but never between a comment line and the statement it precedes
        if stripped and not stripped.startswith("#"):
            odd.append("")
            odd.append("   ")
    text = "\n".join(odd)
    assert fmt(text) == CANONICAL


def test_weird_spacing_inside_expressions_and_numbers():
    text = 'policy "p"{const A=(1+2)*( 3 ) const B=0XFF_FF|0B1010 const C=0O17<<( 2 )\n}'
    assert fmt(text) == ('policy "p" {\n    const A = (1 + 2) * 3\n    const B = 0xffff | 0b1010\n'
                         '    const C = 0o17 << 2\n}\n')


def test_examples_format_idempotently_and_keep_their_comments():
    files = sorted(EXAMPLES.glob("*.vmi"))
    if not files:
        pytest.skip("no example policies")
    for path in files:
        text = path.read_text()
        out = format_dsl(parse(text, str(path)))
        assert format_dsl(parse(out, str(path))) == out, path
        assert parse(out, str(path)) == parse(text, str(path))
        assert_comments_kept(text, out)


# ---------------------------------------------------------------- layout

def test_item_kinds_are_grouped_by_blank_lines_and_rules_surrounded():
    text = ('policy "p" { target xen on x86_64 mode audit include "c.vmi" const A = 1 const B = 2 region r = a '
            'rule x: on smc { } region s = b rule on guest_request { allow } }')
    assert fmt(text) == '''\
policy "p" {
    target xen on x86_64
    mode audit

    include "c.vmi"

    const A = 1
    const B = 2

    region r = a

    rule x: on smc { }

    region s = b

    rule on guest_request {
        allow
    }
}
'''


def test_every_trigger_and_action_spelling():
    text = '''policy "p" {
rule on read of r { allow }
rule on write to a, b { deny }
rule on execute in r { deny with #UD }
rule on access to r { deny feed "\\x00\\x7F\\n\\"" }
rule on execute symbol S { pause }
rule on execute symbol? S + 4 { disarm }
rule on execute va 0xFFFFFFFF81000000 { log info "x" }
rule on write cr0 { alert critical "y" }
rule on read idtr { limit 10 per second then deny }
rule on write msr LSTAR { priority 2 }
rule on write msr 0xC0000082 { }
rule on cpuid { }
rule on cpuid leaf 1 { }
rule on guest_request { }
rule on debug_exception { }
rule on smc { }
}'''
    out = fmt(text)
    body = [line.strip() for line in out.split("\n") if line.startswith("    rule")]
    assert body == [
        "rule on read of r {", "rule on write to a, b {", "rule on execute in r {", "rule on access to r {",
        "rule on execute symbol S {", "rule on execute symbol? S + 4 {", "rule on execute va 0xffffffff81000000 {",
        "rule on write cr0 {", "rule on read idtr {", "rule on write msr LSTAR {",
        "rule on write msr 0xc0000082 { }", "rule on cpuid { }", "rule on cpuid leaf 1 { }",
        "rule on guest_request { }", "rule on debug_exception { }", "rule on smc { }"]
    for action in ["allow", "deny", "deny with #UD", 'deny feed "\\x00\\x7f\\n\\""', "pause", "disarm",
                   'log info "x"', 'alert critical "y"', "limit 10 per second then deny", "priority 2"]:
        assert f"        {action}\n" in out
    assert parse(out) == parse(text)


def test_every_region_form():
    text = ('region a = symbol _stext .. symbol _etext, symbol? x + 8 size 16, percpu symbol gdt_page size 4096\n'
            'region b = va 0xFFFFFFFF81000000 size 0x200000, pa 4096 .. 8192, register idtr size 4096, other\n'
            'region c = 0x1000 size 0x10')
    assert fmt(text) == (
        'region a = symbol _stext .. symbol _etext, symbol? x + 8 size 16, percpu symbol gdt_page size 4096\n'
        'region b = va 0xffffffff81000000 size 0x200000, pa 4096 .. 8192, register idtr size 4096, other\n'
        'region c = 0x1000 size 0x10\n')


def test_long_region_unions_wrap_and_align():
    terms = ", ".join(f"symbol very_long_symbol_name_{i} size 4096" for i in range(6))
    out = fmt(f'policy "p" {{ region r = {terms}  # note\n}}')
    lines = out.split("\n")
    assert lines[1].startswith("    region r = symbol very_long_symbol_name_0 size 4096, ")
    assert lines[1].endswith(",  # note")
    assert all(len(line) <= 110 for line in lines if "#" not in line)
    assert lines[2].startswith(" " * len("    region r = ") + "symbol")
    assert fmt(out) == out


def test_names_the_parser_would_take_for_keywords_are_parenthesized():
    # Trees the YAML spelling can give: `{from: "va + 1", ...}` means the name `va`, not the keyword.
    tree = S.PolicyFile("k.vmi", [
        S.Region("r", [S.SizedRegion(S.Binary("+", S.Name("va"), S.Num(1)), S.Num(4)),
                       S.RangeRegion(S.Attr("register", "x"), S.Num(9))]),
        S.Rule(S.ExecuteTrigger(S.Name("in")), []),
        S.Rule(S.ExecuteTrigger(S.Name("pa")), []),
        S.Rule(S.ExecuteTrigger(S.Name("va"), "va"), []),
        S.Const("size", S.Binary("and", S.Name("size"), S.Name("leaf"))),
    ])
    out = format_dsl(tree)
    assert "region r = (va + 1) size 4, (register.x) .. 9\n" in out
    assert "rule on execute (in) { }" in out and "rule on execute (pa) { }" in out
    assert "rule on execute va va { }" in out
    assert "const size = size and leaf\n" in out
    assert parse(out, "k.vmi") == tree


def test_target_symbols_include_strings():
    text = 'target xen on arm64\nsymbols "a.map", "b \\"q\\".json"\ninclude "dir/common.vmi"'
    assert fmt(text) == 'target xen on arm64\nsymbols "a.map", "b \\"q\\".json"\n\ninclude "dir/common.vmi"\n'


def test_empty_inputs():
    assert format_dsl(S.PolicyFile("e.vmi", [])) == ""
    assert format_yaml(S.PolicyFile("e.vmi", [])) == ""
    assert fmt('policy "p" {}') == 'policy "p" { }\n'


# ---------------------------------------------------------------- comments

def test_own_line_comments_go_before_the_next_statement_reindented():
    text = '''policy "p" {
# about A
        # and more
const A = 1
rule r: on smc {
  # before deny
              deny
}
}'''
    assert fmt(text) == '''\
policy "p" {
    # about A
    # and more
    const A = 1

    rule r: on smc {
        # before deny
        deny
    }
}
'''


def test_end_of_line_comments_stay_at_the_end_of_the_statements_first_line():
    text = '''policy "p" {  # p
    const A = 1 +   # first line of A
        2           # second line of A
    rule r: on write cr0  # header
        where cleared(cr0.WP) {
        deny      # deny
    }  # after the rule
}  # after the policy'''
    out = fmt(text)
    assert out == '''\
policy "p" {  # p
    # second line of A
    const A = 1 + 2  # first line of A

    rule r: on write cr0 where cleared(cr0.WP) {  # header
        deny  # deny
    }  # after the rule
}  # after the policy
'''
    assert fmt(out) == out


def test_comments_before_a_closing_brace_stay_inside_the_block():
    text = '''policy "p" {
    rule r: on smc {
        deny
        # end of rule
    }
    rule s: on smc {
        # only a comment
    }
    # end of policy
}
# after everything'''
    out = fmt(text)
    assert out == '''\
policy "p" {
    rule r: on smc {
        deny
        # end of rule
    }

    rule s: on smc {
        # only a comment
    }

    # end of policy
}
# after everything
'''
    assert fmt(out) == out


def test_a_detached_comment_block_stays_detached():
    text = '''# file header

# policy header
policy "p" {
    const A = 1
    # about B, detached

    const B = 2

    # section

    # about C
    const C = 3
}

# trailer one

# trailer two
'''
    out = fmt(text)
    assert out == '''\
# file header

# policy header
policy "p" {
    const A = 1
    # about B, detached

    const B = 2

    # section

    # about C
    const C = 3
}

# trailer one

# trailer two
'''


def test_comments_of_an_empty_rule_and_a_one_line_rule():
    text = 'rule a: on smc { }  # one-liner\nrule b: on smc {  # header\n}\nrule c: on smc { deny }  # closed\n'
    out = fmt(text)
    assert out == ('rule a: on smc { }  # one-liner\n\nrule b: on smc {  # header\n}\n\n'
                   'rule c: on smc {\n    deny\n}  # closed\n')
    assert fmt(out) == out


def test_only_comments():
    assert fmt("# just a note\n\n# and another\n") == "# just a note\n\n# and another\n"


def test_a_comment_text_is_kept_verbatim_but_for_trailing_blanks():
    text = 'const A = 1 #no space   \n  #\tTAB "quoted" { } # nested #\nconst B = 2\n'
    out = fmt(text)
    assert out == 'const A = 1  #no space\n#\tTAB "quoted" { } # nested #\nconst B = 2\n'
    assert fmt(out) == out


def test_no_comment_is_ever_dropped_even_when_nothing_claims_it():
    tree = S.PolicyFile("x.vmi", [S.Const("A", S.Num(1))],
                        [S.Comment("# nowhere"), S.Comment("# far away", Span("x.vmi", 99, 1))])
    out = format_dsl(tree)
    assert out.count("# nowhere") == 1 and out.count("# far away") == 1
    y = format_yaml(tree)
    assert y.count("# nowhere") == 1 and y.count("# far away") == 1


# ---------------------------------------------------------------- expressions

@pytest.mark.parametrize("text, canonical", [
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("a + (b * c)", "a + b * c"),
    ("(a + b) * c", "(a + b) * c"),
    ("a | (b & c)", "a | b & c"),
    ("(a | b) & c", "(a | b) & c"),
    ("a & b == 0", "a & b == 0"),
    ("(a == b) == c", "(a == b) == c"),
    ("a == (b == c)", "a == (b == c)"),
    ("not (a == b)", "not a == b"),
    ("(not a) == b", "(not a) == b"),
    ("not (a and b)", "not (a and b)"),
    ("(not a) and b", "not a and b"),
    ("a or (b and c)", "a or b and c"),
    ("(a or b) and c", "(a or b) and c"),
    ("a and (b and c)", "a and (b and c)"),
    ("-(a + 1)", "-(a + 1)"),
    ("(-a) + 1", "-a + 1"),
    ("~(~a)", "~~a"),
    ("- -1", "--1"),
    ("a - -1", "a - -1"),
    ("(a | b) in r", "a | b in r"),
    ("(a in r) == 1", "(a in r) == 1"),
    ("not (x not in r)", "not x not in r"),
    ("(a < b) < c", "(a < b) < c"),
    ("a << (b << c)", "a << (b << c)"),
    ("(a ^ b) | (c ^ d)", "a ^ b | c ^ d"),
    ("0XFF + 0B11 + 0O17 + 1_000", "0xff + 0b11 + 0o17 + 1000"),
    ("symbol a + symbol? b - percpu symbol c", "symbol a + symbol? b - percpu symbol c"),
    ("f() + g(a, (b), c + 1)", "f() + g(a, b, c + 1)"),
    ("cleared(cr0.WP | cr4.SMEP)", "cleared(cr0.WP | cr4.SMEP)"),
    ("(((x)))", "x"),
])
def test_format_expr_minimal_parentheses(text, canonical):
    e = expr(text)
    assert format_expr(e) == canonical
    assert expr(canonical) == e


def test_format_expr_of_built_trees():
    one = S.Num(1)
    assert format_expr(S.Binary("-", S.Name("a"), S.Binary("-", S.Name("b"), one))) == "a - (b - 1)"
    assert format_expr(S.Unary("-", S.Binary("*", S.Name("a"), one))) == "-(a * 1)"
    assert format_expr(S.Unary("not", S.InRegion(S.Name("rip"), "text", negated=True))) == "not rip not in text"
    assert format_expr(S.InRegion(S.Unary("not", S.Name("a")), "r")) == "(not a) in r"
    assert format_expr(S.Num(0xFFFFFFFF81000000, 16)) == "0xffffffff81000000"
    assert format_expr(S.Num(5, 2)) == "0b101"
    assert format_expr(S.Num(8, 8)) == "0o10"
    with pytest.raises(ValueError):
        format_expr(S.Binary("**", one, one))


# ---------------------------------------------------------------- check_format

def test_check_format_reports_change():
    assert check_format(CANONICAL, "p.vmi") == (CANONICAL, False)
    assert check_format(WHOLE, "p.vmi") == (CANONICAL, True)
    with pytest.raises(FormatError) as err:
        check_format('policy "p" { rule on { } }', "p.vmi")
    assert err.value.diagnostics.has_errors


@needs_yaml
def test_check_format_converts_both_ways():
    out, changed = check_format(WHOLE, "p.vmi", to="yaml")
    assert changed and out == CANONICAL_YAML
    assert check_format(CANONICAL_YAML, "p.yaml") == (CANONICAL_YAML, False)
    back, changed = check_format(CANONICAL_YAML, "p.yaml", to="dsl")
    assert changed and parse(back) == parse(CANONICAL)


# ---------------------------------------------------------------- YAML

def test_whole_policy_yaml_golden():
    assert format_yaml(parse(WHOLE)) == CANONICAL_YAML


def test_yaml_scalars_that_could_be_misread_are_quoted():
    tree = parse('policy "yes" { symbols "on", "No.map", "1.5", "a b", "-x", "ok.map"\n'
                 'region r = va 0xffffffff81000000 size 18446744073709551615 }')
    y = format_yaml(tree)
    assert 'policy: "yes"' in y
    assert 'symbols: ["on", No.map, "1.5", "a b", "-x", ok.map]' in y
    assert 'r: {va: "0xffffffff81000000", size: "18446744073709551615"}' in y
    import yaml
    data = yaml.safe_load(y)
    assert data["policy"] == "yes" and data["symbols"][0] == "on"
    assert data["regions"]["r"] == {"va": "0xffffffff81000000", "size": "18446744073709551615"}


def test_yaml_strings_are_json_compatible():
    import json

    tree = parse('rule on smc { log info "tab\\tquote\\" back\\\\ nul\\x00 del\\x7f \\xff \u00e9 \u2028" }')
    y = format_yaml(tree)
    message = re.search(r'message: ("(?:[^"\\]|\\.)*")', y).group(1)
    assert json.loads(message) == "tab\tquote\" back\\ nul\x00 del\x7f \xff \u00e9 \u2028"
    import yaml
    assert yaml.safe_load(y)["rules"][0]["do"][0]["log"]["message"] == json.loads(message)


# The same things said in both spellings; YAML groups items by kind, merges `symbols`, and puts `priority` first.
_ORDER = [S.Target, S.Symbols, S.Mode, S.Include, S.Const, S.Region, S.Rule]


def _normalise(items: list) -> list:
    out = []
    for item in items:
        if isinstance(item, S.PolicyBlock):
            out.append(S.PolicyBlock(item.name, _normalise(item.items)))
    flat = sorted((i for i in items if not isinstance(i, S.PolicyBlock)), key=lambda i: _ORDER.index(type(i)))
    symbols = [p for i in flat if isinstance(i, S.Symbols) for p in i.paths]
    merged: list = []
    for item in flat:
        if isinstance(item, S.Symbols):
            if symbols:
                merged.append(S.Symbols(symbols))
                symbols = []
        elif isinstance(item, S.Rule):
            actions = sorted(item.actions, key=lambda a: not isinstance(a, S.Priority))
            merged.append(S.Rule(item.trigger, actions, item.name, item.where))
        else:
            merged.append(item)
    return merged + out


def _yaml_round_trip(tree: S.PolicyFile) -> S.PolicyFile:
    text = format_yaml(tree)
    back = parse_yaml(text)
    assert format_yaml(back) == text, "YAML formatting is not idempotent"
    return back


YAML_CASES = [
    WHOLE,
    '''policy "all" {
    target xen >= 4.17 on arm64
    symbols "a.map"
    symbols "b.json", "c.json"
    mode audit
    include "common.vmi"
    include "more.vmi"
    const A = 0x10 << 2
    const BIG = 0xffffffff81000000
    const DEC = 18446744073709551615
    const NEG = -5
    region r1 = symbol a .. symbol b
    region r2 = symbol? x + 0x10 size 4, percpu symbol gdt_page + 8 size 8
    region r3 = va 0xffffffff81000000 size 0x200000, pa 0x1000 .. 0x2000, register gdtr size 4096
    region r4 = r1, r2
    region r5 = symbol a + 8 .. 0xffffffff82000000
    rule r: on read of r1 { allow }
    rule on write to r1, r2 where rip not in r3 and not (new & 0x3 == 0) { deny feed "\\x00ab" with #UD }
    rule on execute in r4 { priority 2 deny }
    rule on access to symbol a size 8 { pause disarm }
    rule on execute symbol commit_creds { log info "{rip:#x}" }
    rule on execute symbol? x + 4 { alert low "a" }
    rule on execute percpu symbol y { }
    rule on execute va 0xffffffff81000000 { limit 5 per second then alert medium "m" }
    rule on write cr3 { limit 0x10 per second then limit 1 per second then deny }
    rule on read gdtr { }
    rule on write msr LSTAR where changed(EFER.NXE) { }
    rule on write msr 0xc0000082 { }
    rule on write msr 3 { }
    rule on cpuid { }
    rule on cpuid leaf 0x40000000 { }
    rule on guest_request where 1 { }
    rule on debug_exception { }
    rule on smc { }
}''',
    # an include-only file: bare items
    'const PAGE = 4096\nregion common_text = symbol _stext .. symbol _etext\n'
    'rule shared: on execute in common_text { }\n',
]


@needs_yaml
@pytest.mark.parametrize("text", YAML_CASES)
def test_dsl_to_yaml_to_tree_equals_dsl_to_tree(text):
    tree = parse(text)
    back = _yaml_round_trip(tree)
    assert _normalise(back.items) == _normalise(tree.items)
    # and back to the DSL: a fixed point after one conversion
    dsl = format_dsl(back)
    assert _normalise(parse(dsl).items) == _normalise(tree.items)
    assert format_dsl(parse(dsl)) == dsl


@needs_yaml
def test_yaml_comments_survive_yaml_formatting():
    y = format_yaml(parse(WHOLE))
    back = parse_yaml(y)
    assert format_yaml(back) == y
    for c in comment_texts(WHOLE):
        assert y.count(c) == 1


@needs_yaml
@pytest.mark.parametrize("char", ["\x01", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\ufeff", "\r"])
def test_a_comment_with_a_control_character_converts_to_valid_yaml(char):
    """YAML refuses C0/C1 controls raw and reads NEL, LS and PS as line breaks: they are escaped."""
    import yaml

    text = f'policy "p" {{\n    # before {char} after\n    mode audit\n}}\n'
    y = format_yaml(parse(text))
    assert yaml.safe_load(y) == {"policy": "p", "mode": "audit"}
    assert f"# before \\u{ord(char):04x} after" in y
    assert format_yaml(parse_yaml(y)) == y


# ---------------------------------------------------------------- random trees

KEYWORDS = {
    "policy", "target", "symbols", "mode", "const", "include", "region", "register", "size", "va", "pa", "rule",
    "on", "where", "in", "of", "to", "read", "write", "execute", "access", "msr", "cpuid", "leaf", "guest_request",
    "debug_exception", "smc", "allow", "deny", "feed", "with", "log", "alert", "pause", "disarm", "limit", "per",
    "second", "then", "priority", "not", "and", "or", "symbol", "percpu",
}
REGISTERS = ["cr0", "cr3", "cr4", "xcr0", "idtr", "gdtr", "ldtr", "tr"]
BINARY_OPS = ["or", "and", "==", "!=", "<", "<=", ">", ">=", "|", "^", "&", "<<", ">>", "+", "-", "*", "/", "%"]

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
# Keywords are names wherever the parser cannot take them for keywords (the lexer is contextual),
# so they are drawn too, except where they would clash: `not x`, `symbol x`, `percpu symbol x` are
# operators anywhere; a region term cannot be a region called `va`, `pa` or `register`; `rule on:`
# cannot name a rule `on`.
PREFIX_WORDS = {"not", "symbol", "percpu"}
names = (identifiers | st.sampled_from(sorted(KEYWORDS))).filter(lambda s: s not in PREFIX_WORDS)
rule_names = names.filter(lambda s: s != "on")
# Region names in YAML must not be register names either.
region_names = names.filter(lambda s: s not in REGISTERS and s not in {"va", "pa", "register"})
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
radixes = st.sampled_from([10, 16, 2, 8])
numbers = st.builds(S.Num, st.integers(0, 2 ** 64 - 1), radixes)
symbols = st.builds(S.SymbolRef, names, st.booleans()) | st.builds(S.SymbolRef, names, st.just(False), st.just(True))

atoms = numbers | st.builds(S.Name, names) | st.builds(S.Attr, names, names) | symbols


def _compound(children):
    return (st.builds(S.Unary, st.sampled_from(["-", "~", "not"]), children)
            | st.builds(S.Binary, st.sampled_from(BINARY_OPS), children, children)
            | st.builds(S.InRegion, children, region_names, st.booleans())
            | st.builds(S.Call, names, st.lists(children, max_size=3)))


exprs = st.recursive(atoms, _compound, max_leaves=10)
spaces = st.sampled_from([None, "va", "pa"])

region_terms = st.one_of(
    st.builds(S.RegionRef, region_names),
    st.builds(S.RangeRegion, exprs, exprs, spaces),
    st.builds(S.SizedRegion, exprs, exprs, spaces),
    st.builds(S.RegisterRegion, st.sampled_from(["idtr", "gdtr"]), exprs),
)
term_lists = st.lists(region_terms, min_size=1, max_size=3)

triggers = st.one_of(
    st.builds(S.MemoryTrigger, st.sampled_from(["read", "write", "execute", "access"]), term_lists),
    st.builds(S.ExecuteTrigger, exprs, st.sampled_from([None, "va"])),
    st.builds(S.RegisterTrigger, st.sampled_from(["read", "write"]), st.sampled_from(REGISTERS)),
    st.builds(S.MsrTrigger, st.builds(S.Name, names) | numbers),
    st.builds(S.CpuidTrigger, st.none() | exprs),
    st.builds(S.EventTrigger, st.sampled_from(S.EVENT_TRIGGERS)),
)

severities = st.sampled_from(["info", "low", "medium", "high", "critical"])
simple_actions = st.one_of(
    st.builds(S.Allow), st.builds(S.Pause), st.builds(S.Disarm),
    st.builds(S.Deny, st.none() | texts, st.none() | st.from_regex(r"#[A-Z]{2,3}", fullmatch=True)),
    st.builds(S.Report, st.sampled_from(["log", "alert"]), severities, texts),
)
actions = st.recursive(simple_actions, lambda then: st.builds(S.Limit, exprs, then), max_leaves=3) | st.builds(
    S.Priority, exprs)

rules = st.builds(S.Rule, triggers, st.lists(actions, max_size=4), st.none() | rule_names, st.none() | exprs)
version = st.from_regex(r"[0-9]{1,2}(\.[0-9]{1,2}){0,2}", fullmatch=True)
items = st.one_of(
    st.builds(S.Target, names, names, st.none(), st.none()),
    st.builds(lambda h, a, op, v: S.Target(h, a, op, v), names, names,
              st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), version),
    st.builds(S.Symbols, st.lists(texts, min_size=1, max_size=3)),
    st.builds(S.Mode, names),
    st.builds(S.Const, names, exprs),
    st.builds(S.Region, region_names, term_lists),
    st.builds(S.Include, texts),
    rules,
)
files = st.one_of(
    st.builds(lambda name, its: S.PolicyFile("r.vmi", [S.PolicyBlock(name, its)]), texts,
              st.lists(items, max_size=6)),
    st.builds(lambda its: S.PolicyFile("r.vmi", its), st.lists(items, max_size=6)),
)

# POLICYC_FMT_EXAMPLES=5000 for a longer hunt.
RANDOM = settings(max_examples=int(os.environ.get("POLICYC_FMT_EXAMPLES", "120")), deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])


@RANDOM
@given(exprs)
def test_random_expressions_round_trip(e):
    text = format_expr(e)
    assert expr(text) == e
    assert format_expr(expr(text)) == text


@RANDOM
@given(files)
def test_random_trees_print_and_parse_back(tree):
    text = format_dsl(tree)
    back = parse(text, "r.vmi")
    assert back == tree
    assert format_dsl(back) == text


@RANDOM
@given(files, st.data())
def test_random_comments_are_kept_once_and_formatting_is_idempotent(tree, data):
    text = format_dsl(tree)
    lines = text.split("\n")[:-1]
    out = []
    n = 0
    for line in lines:
        where = data.draw(st.sampled_from(["none", "none", "before", "after", "both", "blank"]))
        if where in ("before", "both", "blank"):
            out.append(f"  # c{n}")
            n += 1
            if where == "blank":
                out.append("")
        if where in ("after", "both") and '"' not in line.split("#")[0][-1:]:
            line += f" # c{n}"
            n += 1
        out.append(line)
    if data.draw(st.booleans()):
        out.append(f"# c{n}")
        n += 1
    commented = "\n".join(out) + "\n"
    back = parse(commented, "r.vmi")
    assert back == tree
    assert len(back.comments) == n
    once = format_dsl(back)
    for i in range(n):
        assert len(re.findall(rf"# c{i}\b", once)) == 1, (i, commented, once)
    again = parse(once, "r.vmi")
    assert again == tree
    assert format_dsl(again) == once


# Trees both spellings can say: what the YAML schema admits.
y_numbers = st.builds(S.Num, st.integers(0, 2 ** 64 - 1), radixes)
y_symbols = st.builds(S.SymbolRef, names, st.booleans()) | st.builds(S.SymbolRef, names, st.just(False), st.just(True))
y_sym_forms = y_symbols | st.builds(lambda s, off: S.Binary("+", s, off), y_symbols, exprs)
y_addr = y_sym_forms | exprs
y_terms = st.one_of(
    st.builds(S.RegionRef, region_names),
    st.builds(S.RangeRegion, y_addr, y_addr, st.none()),
    st.builds(S.RangeRegion, exprs, exprs, st.sampled_from(["va", "pa"])),
    st.builds(S.SizedRegion, y_sym_forms, exprs, st.none()),
    st.builds(S.SizedRegion, exprs, exprs, st.sampled_from(["va", "pa"])),
    st.builds(S.RegisterRegion, st.sampled_from(["idtr", "gdtr"]), exprs),
)
y_term_lists = st.lists(y_terms, min_size=1, max_size=3)
y_triggers = st.one_of(
    st.builds(S.MemoryTrigger, st.sampled_from(["read", "write", "execute", "access"]), y_term_lists),
    st.builds(S.ExecuteTrigger, y_sym_forms, st.none()),
    st.builds(S.ExecuteTrigger, exprs, st.just("va")),
    st.builds(S.RegisterTrigger, st.just("write"), st.sampled_from(REGISTERS)),
    st.builds(S.RegisterTrigger, st.just("read"), st.sampled_from(["idtr", "gdtr", "ldtr", "tr"])),
    st.builds(S.MsrTrigger, st.builds(S.Name, names) | st.builds(S.Num, st.integers(0, 2 ** 64 - 1),
                                                                  st.sampled_from([10, 16]))),
    st.builds(S.CpuidTrigger, st.none() | exprs),
    st.builds(S.EventTrigger, st.sampled_from(S.EVENT_TRIGGERS)),
)
y_simple_actions = st.one_of(
    st.builds(S.Allow), st.builds(S.Pause), st.builds(S.Disarm),
    st.builds(S.Deny, st.none() | texts, st.none() | st.from_regex(r"#[A-Z]{2,3}", fullmatch=True)),
    st.builds(S.Report, st.sampled_from(["log", "alert"]), severities, texts),
)
y_actions = st.recursive(y_simple_actions, lambda then: st.builds(S.Limit, exprs, then), max_leaves=3)
y_rules = st.builds(lambda trig, acts, prio, name, where: S.Rule(trig, ([S.Priority(prio)] if prio else []) + acts,
                                                                   name, where),
                    y_triggers, st.lists(y_actions, max_size=4), st.none() | exprs, st.none() | rule_names,
                    st.none() | exprs)
nonempty_texts = texts.filter(lambda s: s != "")


@st.composite
def yaml_files(draw):
    its: list = []
    if draw(st.booleans()):
        op_version = draw(st.none() | st.tuples(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), version))
        op, ver = op_version or (None, None)
        its.append(S.Target("xen", draw(st.sampled_from(["x86_64", "arm64"])), op, ver))
    paths = draw(st.lists(nonempty_texts, max_size=3))
    if paths:
        its.append(S.Symbols(paths))
    if draw(st.booleans()):
        its.append(S.Mode(draw(st.sampled_from(["enforce", "audit"]))))
    its += [S.Include(p) for p in draw(st.lists(nonempty_texts, max_size=2))]
    its += [S.Const(n, e) for n, e in draw(st.dictionaries(names, exprs, max_size=3)).items()]
    its += [S.Region(n, t) for n, t in draw(st.dictionaries(region_names, y_term_lists, max_size=3)).items()]
    its += draw(st.lists(y_rules, max_size=3))
    if draw(st.booleans()):
        return S.PolicyFile("y.vmi", [S.PolicyBlock(draw(nonempty_texts), its)])
    return S.PolicyFile("y.vmi", its)


@needs_yaml
@RANDOM
@given(yaml_files())
def test_random_trees_through_yaml_are_the_same_trees(tree):
    assume(tree.items)  # an empty file is "" in both spellings, and an empty YAML file is an error
    back = _yaml_round_trip(tree)
    assert back.items == tree.items
    # and the DSL printed from the YAML's tree parses to that tree
    assert parse(format_dsl(back)).items == tree.items


HAND_WRITTEN_YAML = '''\
# top
policy: p   # name
target: {hypervisor: xen, arch: x86_64}
# about consts
constants:
  A: 1  # a
  # before B
  B: "A + 1"
regions:
  r:   # union
    - {symbol: a, size: 8}
    # second term
    - {va: 0x1000, size: 4}
rules:
  # rule one
  - name: one   # trailing name
    on: {write: r}  # trig
    where: "A == 1"
    do:
      - deny   # d
      # before log
      - {log: {severity: info, message: "x"}}
  # between
  - on: smc
    do: [] # empty
# the end
'''


def _count_comment(text: str, comment: str) -> int:
    return len(re.findall(re.escape(comment) + r"$", text, re.M))


@needs_yaml
def test_yaml_comments_are_kept_in_both_spellings():
    tree = parse_yaml(HAND_WRITTEN_YAML)
    y = format_yaml(tree)
    d = format_dsl(tree)
    for c in tree.comments:
        assert _count_comment(y, c.text) == 1, (c.text, y)
        assert _count_comment(d, c.text) == 1, (c.text, d)
    assert format_yaml(parse_yaml(y)) == y
    assert format_dsl(parse(d)) == d
    assert "policy: p  # name\n" in y and "  A: 1  # a\n" in y and "  - name: one  # trailing name\n" in y
    assert '    region r = symbol a size 8, va 0x1000 size 4  # union\n' in d


@needs_yaml
@RANDOM
@given(yaml_files(), st.data())
def test_random_yaml_comments_are_kept_once_and_formatting_is_idempotent(tree, data):
    assume(tree.items)
    lines = format_yaml(tree).split("\n")[:-1]
    out = []
    n = 0
    for line in lines:
        where = data.draw(st.sampled_from(["none", "none", "before", "after", "both"]))
        if where in ("before", "both"):
            out.append(" " * data.draw(st.integers(0, 6)) + f"# c{n}")
            n += 1
        if where in ("after", "both") and line.strip():
            line += f"  # c{n}"
            n += 1
        out.append(line)
    back = parse_yaml("\n".join(out) + "\n")
    assert back.items == tree.items
    assert len(back.comments) == n
    y = format_yaml(back)
    d = format_dsl(back)
    for i in range(n):
        assert len(re.findall(rf"# c{i}\b", y)) == 1, (i, y)
        assert len(re.findall(rf"# c{i}\b", d)) == 1, (i, d)
    assert format_yaml(parse_yaml(y)) == y
    assert format_dsl(parse(d)) == d
