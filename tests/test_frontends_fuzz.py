"""Both front ends, end to end, on hostile input: diagnostics only, never an exception.

Whatever bytes sit in a policy file, `check_policy` (file reading, decoding,
the DSL parser or the YAML reader, includes, symbol tables, the checker)
returns a model or None and reports problems as registered diagnostics with
sane positions, and the three renderers render them. Any exception fails.

Inputs: arbitrary bytes as .vmi and .yaml; a token soup of the DSL's own
words, names, numbers, operators and strings (bare, and inside a valid
policy header so the later stages see it); YAML documents built from the
schema's vocabulary; and mutations of a valid YAML policy (keys renamed to
other schema words, values swapped, entries dropped).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyc import model as M
from policyc.check import check_policy
from policyc.diagnostics import CODES, Diagnostics, Severity, SourceCache, render_json, render_sarif, render_text

REPO = Path(__file__).resolve().parent.parent
SYSTEM_MAP = REPO / "examples" / "policies" / "linux-6.1.System.map"

# POLICYC_FUZZ_EXAMPLES=5000 for a longer campaign; the default keeps the file well under a minute.
FUZZ = settings(max_examples=int(os.environ.get("POLICYC_FUZZ_EXAMPLES", "120")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    shutil.copy(SYSTEM_MAP, d)
    # Something to include, and something that looks like a policy but is used as a symbol file.
    (d / "common.vmi").write_text("const NR_SYSCALLS = 451\nregion syscalls = symbol sys_call_table size 8 * 451\n",
                                  encoding="utf-8")
    (d / "common.yaml").write_text("constants: {NR_SYSCALLS: 451}\n", encoding="utf-8")
    return d


def check_never_raises(path: Path, data: bytes) -> Diagnostics:
    path.write_bytes(data)
    diags = Diagnostics()
    try:
        policy = check_policy(path, diags)
        rendered = [render_text(diags.sorted(), SourceCache()), render_json(diags.sorted()),
                    render_sarif(diags.sorted(), "0")]
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(exc).__name__}: {exc}\ninput ({path.name}, {len(data)} bytes): {data[:2000]!r}")
    if policy is not None:
        assert isinstance(policy, M.Policy)
        assert not diags.has_errors
    for d in diags:
        assert d.code in CODES
        assert isinstance(d.severity, Severity)
        assert d.message.strip()
        if d.span is not None:
            assert d.span.line >= 1 and d.span.col >= 1, d
            if d.span.end_line is not None:
                assert (d.span.end_line, d.span.end_col or 0) >= (d.span.line, 0), d
    json.loads(rendered[1])
    json.loads(rendered[2])
    return diags


# ---------------------------------------------------------------- the contract, on the smallest inputs

@pytest.mark.parametrize("name, text", [
    ("empty-block.vmi", 'policy "p" {\n}\n'),
    ("empty-block.yaml", "policy: p\n"),
    ("target-only.vmi", 'policy "p" {\n    target xen >= 4.17 on x86_64\n}\n'),
])
def test_smallest_policies_give_a_model_or_an_error(fuzz_dir, name, text):
    """check_policy returns a model exactly when there were no errors (compile relies on it: a None
    without an error makes `policyc compile` exit 1 having said nothing), and every diagnostic
    points into a real file."""
    diags = check_never_raises(fuzz_dir / name, text.encode("utf-8"))
    policy = check_policy(fuzz_dir / name, Diagnostics())
    assert (policy is None) == diags.has_errors, [(d.code, d.message) for d in diags]
    for d in diags:
        assert d.span is None or Path(d.span.file).name == name, f"{d.code} points at {d.span}"


def test_a_symbol_file_named_with_a_nul_character_is_an_error_not_a_traceback(fuzz_dir):
    """Found by test_token_soup_inside_a_policy: a string escape makes a NUL that os.stat refuses
    with ValueError, not OSError."""
    diags = check_never_raises(fuzz_dir / "nul.vmi", b'policy "p" {\n    target xen >= 4.17 on x86_64\n'
                                                   b'    symbols "\\xff\\x00"\n}\n')
    assert [(d.code, d.span.line) for d in diags if d.severity == "error"] == [("PC304", 3)]
    assert "NUL character" in next(d.message for d in diags if d.code == "PC304")


# ---------------------------------------------------------------- arbitrary bytes

@FUZZ
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_as_dsl(fuzz_dir, data):
    check_never_raises(fuzz_dir / "bytes.vmi", data)


@FUZZ
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_as_yaml(fuzz_dir, data):
    check_never_raises(fuzz_dir / "bytes.yaml", data)


@FUZZ
@given(st.text(max_size=1500))
def test_arbitrary_text_as_dsl_and_yaml(fuzz_dir, text):
    data = text.encode("utf-8", "surrogatepass")
    check_never_raises(fuzz_dir / "text.vmi", data)
    check_never_raises(fuzz_dir / "text.yaml", data)


# ---------------------------------------------------------------- DSL token soup

KEYWORDS = ["policy", "target", "xen", ">=", "4.17", "on", "x86_64", "x86_64-svm", "arm64", "symbols", "mode",
            "enforce", "audit", "const", "region", "rule", "include", "symbol", "symbol?", "percpu", "va", "pa",
            "size", "register", "where", "read of", "write to", "execute in", "access to", "execute", "read",
            "write", "msr", "cpuid", "leaf", "guest_request", "debug_exception", "smc", "allow", "deny", "feed",
            "with", "#UD", "#GP", "#XX", "log", "alert", "info", "high", "critical", "severe", "pause", "disarm",
            "limit", "per", "second", "then", "priority", "and", "or", "not", "in", "set", "cleared", "changed",
            "offsetof", "sizeof"]
NAMES = ["cr0", "cr3", "cr4", "xcr0", "idtr", "gdtr", "cr0.WP", "cr4.SMEP", "cr4.SMAP", "cr4.NOPE", "EFER.NXE",
         "LSTAR", "SYSENTER_EIP", "LSTARR", "rip", "rax", "pc", "x0", "new", "old", "gla", "gfn", "offset", "vcpu",
         "access.W", "leaf", "syscalls", "idt", "rodata", "kernel_text", "NR_SYSCALLS", "sys_call_table",
         "idt_table", "_stext", "_etext", "__start_rodata", "__end_rodata", "entry_SYSCALL_64", "commit_creds",
         "gdt_page", "cpu_tss_rw", "ia32_sys_call_table", "no_such_symbol", "task_struct", "cred", "uid", "a", "b"]
NUMBERS = ["0", "1", "8", "451", "4096", "0x1000", "0xffffffff81000000", "0xfffffe0000000000", "0xffffffffffffffff",
           "0x1_0000_0000_0000_0000", "18446744073709551616", "0b1011", "0o777", "1_000", "0x", "0b10f", "64"]
OPERATORS = ["+", "-", "*", "/", "%", "<<", ">>", "&", "|", "^", "~", "==", "!=", "<", "<=", ">", ">=", "=",
             "..", ",", ":", "(", ")", "{", "}", ".", "&&", "||", "!", ";", "$", "@", "\\"]
STRINGS = ['"linux-6.1.System.map"', '"nope.map"', '"common.vmi"', '"common.yaml"', '"soup.vmi"', '"../x.vmi"',
           '"/etc/hostname.vmi"', '"missing.vmi"', '"t"', '"{gla:#x} from {rip:#x}"', '"{nope}"', '"{gla:%d}"',
           '"{"', '"}"', '"\\x41\\n"', '"\\q"', '"\\x4"', '"unterminated', '""', '"\\xff\\x00"']
SPACING = [" ", " ", " ", "\n", "\n    ", "\t", "  # comment\n", "\r\n", "\u00a0", "\ufeff"]

TOKENS = st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(NAMES), st.sampled_from(NUMBERS),
                   st.sampled_from(OPERATORS), st.sampled_from(STRINGS))
SOUP = st.lists(st.tuples(TOKENS, st.sampled_from(SPACING)), max_size=120).map(
    lambda pairs: "".join(t + s for t, s in pairs))

HEADER = 'policy "soup" {\n    target xen >= 4.17 on x86_64\n    symbols "linux-6.1.System.map"\n'
ITEM_STARTS = ["const", "region", "rule", "include", "mode", "target", "symbols"]


@FUZZ
@given(SOUP)
def test_token_soup_bare(fuzz_dir, soup):
    check_never_raises(fuzz_dir / "soup.vmi", soup.encode("utf-8"))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(ITEM_STARTS), SOUP), max_size=6))
def test_token_soup_inside_a_policy(fuzz_dir, items):
    body = "".join(f"    {start} {soup}\n" for start, soup in items)
    check_never_raises(fuzz_dir / "soup.vmi", (HEADER + body + "}\n").encode("utf-8"))


RULE_SOUP = st.builds(
    lambda name, trigger, where, actions: f"    rule {name}: on {trigger}{where} {{\n{actions}    }}\n",
    st.sampled_from(["r1", "r2", "r1", "wp_guard"]),
    st.one_of(st.sampled_from(["write cr0", "write cr4", "write msr LSTAR", "write msr 0xc0000082", "read idtr",
                               "write to syscalls", "execute in rodata", "read of idt", "access to syscalls, idt",
                               "execute symbol commit_creds", "execute va 0xffffffff810d3bc0", "cpuid",
                               "cpuid leaf 0x40000000", "guest_request", "debug_exception", "smc",
                               "execute symbol gdt_page", "write to cr0", "write LSTAR"]), SOUP),
    st.one_of(st.just(""), SOUP.map(lambda s: " where " + s)),
    st.lists(st.one_of(st.sampled_from(["allow", "deny", "deny with #UD", 'deny feed "\\x90"', "pause", "disarm",
                                        'log info "{vcpu}"', 'alert critical "{new:#x}"', "priority 3",
                                        'limit 10 per second then log low "x"', "limit 0 per second then deny"]),
                       SOUP), max_size=4).map(lambda acts: "".join(f"        {a}\n" for a in acts)))

DEFINITIONS = ("    const NR_SYSCALLS = 451\n"
               "    region syscalls = symbol sys_call_table size 8 * NR_SYSCALLS\n"
               "    region idt = symbol idt_table size 4096\n"
               "    region rodata = symbol __start_rodata .. symbol __end_rodata\n")


@FUZZ
@given(st.lists(RULE_SOUP, max_size=5), st.booleans())
def test_rules_with_soup_parts(fuzz_dir, rules, with_include):
    include = '    include "common.vmi"\n' if with_include else ""
    text = HEADER + include + DEFINITIONS + "".join(rules) + "}\n"
    check_never_raises(fuzz_dir / "rules.vmi", text.encode("utf-8"))


# ---------------------------------------------------------------- YAML documents

SCHEMA_WORDS = ["policy", "target", "hypervisor", "version", "arch", "symbols", "mode", "include", "constants",
                "regions", "rules", "name", "on", "where", "priority", "do", "from", "to", "symbol", "size",
                "offset", "optional", "percpu", "va", "pa", "register", "read", "write", "execute", "access", "msr",
                "cpuid", "leaf", "guest_request", "debug_exception", "smc", "allow", "deny", "pause", "disarm",
                "feed", "with", "log", "alert", "severity", "message", "limit", "rate", "per", "then"]
VALUE_WORDS = ["xen", ">=4.17", "==4.17", "<4.17", "x86_64", "arm64", "riscv", "enforce", "audit",
               "linux-6.1.System.map", "nope.map", "common.yaml", "common.vmi", "../x.yaml", "cr0", "cr4", "idtr",
               "LSTAR", "LSTARR", "sys_call_table", "idt_table", "gdt_page", "ia32_sys_call_table", "syscalls",
               "idt", "critical", "high", "severe", "second", "#UD", "#XX", "8 * NR_SYSCALLS", "cleared(cr0.WP)",
               "new != symbol entry_SYSCALL_64", "new = 1", "rip in syscalls", "a &&", "((((", "{gla:#x}", "{nope}",
               "{", "0x1000", "-1", "0"]
SCALARS = st.one_of(st.sampled_from(VALUE_WORDS), st.sampled_from(SCHEMA_WORDS), st.booleans(), st.none(),
                    st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=10))
KEYS = st.one_of(st.sampled_from(SCHEMA_WORDS), st.sampled_from(SCHEMA_WORDS).map(lambda w: w + "s"),
                 st.sampled_from(["NR_SYSCALLS", "syscalls", "idt", "cr0"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=25)


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=8), st.booleans())
def test_generated_yaml_documents(fuzz_dir, document, flow):
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)
    check_never_raises(fuzz_dir / "doc.yaml", text.encode("utf-8"))


BASE = {
    "policy": "linux-kernel-integrity",
    "target": {"hypervisor": "xen", "version": ">=4.17", "arch": "x86_64"},
    "symbols": "linux-6.1.System.map",
    "mode": "enforce",
    "constants": {"NR_SYSCALLS": 451},
    "regions": {
        "kernel_text": {"from": {"symbol": "_stext"}, "to": {"symbol": "_etext"}},
        "syscalls": {"symbol": "sys_call_table", "size": "8 * NR_SYSCALLS"},
        "idt": {"symbol": "idt_table", "size": 4096},
        "both": ["syscalls", "idt"],
    },
    "rules": [
        {"name": "protect_tables", "on": {"write": ["syscalls", "idt"]},
         "do": ["deny", {"alert": {"severity": "critical", "message": "dispatch table write at {gla:#x}"}}]},
        {"name": "wp_guard", "on": {"write": "cr0"}, "where": "cleared(cr0.WP)",
         "do": ["deny", {"alert": {"severity": "critical", "message": "CR0.WP cleared"}}]},
        {"name": "syscall_entry_guard", "on": {"write": {"msr": "LSTAR"}},
         "where": "new != symbol entry_SYSCALL_64", "do": ["deny"]},
        {"on": {"execute": {"symbol": "commit_creds"}}, "priority": 2,
         "do": [{"log": {"severity": "info", "message": "commit_creds on {vcpu}"}},
                {"limit": {"rate": 100, "per": "second", "then": "pause"}}]},
        {"on": {"cpuid": {"leaf": 0x40000000}}, "do": ["allow"]},
    ],
}


def test_the_base_document_is_valid(fuzz_dir):
    diags = check_never_raises(fuzz_dir / "base.yaml", yaml.safe_dump(BASE).encode("utf-8"))
    assert not diags.has_errors, [(d.code, d.message) for d in diags]


def _containers(node, path=()):
    """Every (path, container) in a document."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                yield from _containers(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, (dict, list)):
                yield from _containers(v, path + (i,))


@st.composite
def mutated_documents(draw):
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        spots = list(_containers(doc))
        _, node = spots[draw(st.integers(0, len(spots) - 1))]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            op = draw(st.sampled_from(["rename", "replace", "drop", "add"]))
            if op == "rename":
                node[draw(KEYS)] = node.pop(key)
            elif op == "replace":
                node[key] = draw(VALUES)
            elif op == "drop":
                del node[key]
            else:
                node[draw(KEYS)] = draw(VALUES)
        elif isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            op = draw(st.sampled_from(["replace", "drop", "duplicate"]))
            if op == "replace":
                node[i] = draw(VALUES)
            elif op == "drop":
                del node[i]
            else:
                node.append(copy.deepcopy(node[i]))
    return doc


@FUZZ
@given(mutated_documents(), st.booleans())
def test_mutated_yaml_policies(fuzz_dir, document, flow):
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True, sort_keys=False)
    check_never_raises(fuzz_dir / "mutated.yaml", text.encode("utf-8"))


@FUZZ
@given(mutated_documents(), st.integers(0, 400), st.sampled_from(["", "#", ":", "- ", "\t", "&a ", "*a", "!!str ",
                                                                 "'", '"', "{", "[", "\n", "---\n", "<<: "]))
def test_mutated_yaml_text(fuzz_dir, document, at, insert):
    text = yaml.safe_dump(document, sort_keys=False)
    at = min(at, len(text))
    check_never_raises(fuzz_dir / "spliced.yaml", (text[:at] + insert + text[at:]).encode("utf-8"))
