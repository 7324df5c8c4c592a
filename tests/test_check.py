"""The checked model: what a policy means after names, symbols and types are resolved.

Addresses below are from the real symbol table of Debian 12's 6.1.0-56-amd64
kernel (examples/policies/linux-6.1.System.map), not made up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from policyc import model as M
from policyc.check import check_policy
from policyc.condition_form import evaluate
from policyc.diagnostics import Diagnostics
from policyc.plan_expr import compile_condition

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
SYS_CALL_TABLE = 0xFFFFFFFF82000360
ENTRY_SYSCALL_64 = 0xFFFFFFFF81C00080
COMMIT_CREDS = 0xFFFFFFFF810D3BC0


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLES / "linux-6.1.System.map", tmp_path)
    shutil.copy(EXAMPLES / "debian12-6.1.0-56-amd64.isf-excerpt.json", tmp_path)
    return tmp_path


def check_text(directory: Path, body: str, name: str = "p.vmi", header: bool = True) -> tuple[M.Policy | None, Diagnostics]:
    text = body
    if header:
        text = ('policy "t" {\n    target xen >= 4.17 on x86_64\n    symbols "linux-6.1.System.map"\n'
                + body + "\n}\n")
    (directory / name).write_text(text)
    d = Diagnostics()
    return check_policy(directory / name, d), d


def codes(d: Diagnostics) -> list[str]:
    return [x.code for x in d.sorted()]


def test_linux_example_means_what_language_md_says():
    d = Diagnostics()
    p = check_policy(EXAMPLES / "linux-kernel-integrity.vmi", d)
    assert p is not None, [x.message for x in d]
    assert list(d) == []
    assert p.name == "linux-kernel-integrity"
    assert p.target == M.Target("xen", (4, 17), "x86_64")
    assert p.mode == "enforce"
    syscalls = p.region("syscalls")
    assert syscalls.extents == (M.Extent("va", M.Address(SYS_CALL_TABLE), 8 * 451),)
    text = p.region("kernel_text").extents[0]
    assert (text.start.value, text.size) == (0xFFFFFFFF81000000, 0xFFFFFFFF81E01D32 - 0xFFFFFFFF81000000)

    protect = p.rule("protect_tables")
    assert protect.trigger == M.MemoryTrigger("write", ("syscalls", "idt"))
    assert protect.verdict == "deny"
    assert protect.actions[1] == M.LogAction("alert", "critical", "dispatch table write at {gla:#x} from {rip:#x}",
                                             ("gla", "rip"))

    wp = p.rule("wp_guard")
    assert wp.trigger == M.ControlRegisterTrigger("cr0")
    assert wp.condition == M.BitTest("cleared", 1 << 16)
    smep = p.rule("smep_smap_guard")
    assert smep.condition == M.BitTest("cleared", (1 << 20) | (1 << 21))  # SMEP is bit 20, SMAP bit 21

    lstar = p.rule("syscall_entry_guard")
    assert lstar.trigger == M.MsrTrigger(0xC0000082, "LSTAR")
    # The symbol stays relocatable: the enforcer adds the guest's KASLR slide.
    assert lstar.condition == M.Compare("!=", M.Field("new"), M.Address(ENTRY_SYSCALL_64))

    trace = p.rule("trace_creds")
    assert trace.trigger == M.Breakpoint(M.Address(COMMIT_CREDS))
    assert trace.verdict == "allow"


def test_every_example_policy_checks_without_errors():
    roots = [f for f in sorted(EXAMPLES.iterdir()) if f.suffix in (".vmi", ".yaml") and f.name != "linux-common.vmi"]
    assert len(roots) >= 7
    for f in roots:
        d = Diagnostics()
        p = check_policy(f, d)
        assert p is not None, (f.name, [str(x.span) + " " + x.message for x in d])


def test_includes_share_constants_and_regions(policy_dir: Path):
    (policy_dir / "common.vmi").write_text("const N = 2\nregion t = symbol sys_call_table size 8 * N\n")
    p, d = check_text(policy_dir, '    include "common.vmi"\n    rule r: on write to t { deny }')
    assert p is not None, codes(d)
    assert p.region("t").extents[0].size == 16
    assert ("N", 2) in p.constants


def test_include_cycle_and_escape_are_reported(policy_dir: Path):
    sub = policy_dir / "sub"
    sub.mkdir()
    (sub / "a.vmi").write_text('include "b.vmi"\n')
    (sub / "b.vmi").write_text('include "a.vmi"\n')
    (policy_dir.parent / "outside.vmi").write_text("const X = 1\n")
    (sub / "root.vmi").write_text('policy "r" {\n  target xen >= 4.17 on x86_64\n  include "a.vmi"\n'
                                  '  include "../../outside.vmi"\n}\n')
    d = Diagnostics()
    assert check_policy(sub / "root.vmi", d) is None
    found = {(x.code, x.span.line) for x in d if x.span}
    assert ("PC307", 1) in found  # reported where the cycle closes (b.vmi includes a.vmi)
    assert ("PC306", 4) in found
    cycle = next(x for x in d if x.code == "PC307")
    assert "a.vmi -> " in cycle.message and "b.vmi" in cycle.message


def test_constants_fold_in_any_order_and_cycles_are_errors(policy_dir: Path):
    p, d = check_text(policy_dir, "    const A = B * 2\n    const B = 0x10 << 4\n"
                                  "    region r = symbol sys_call_table + A size B")
    assert p is not None, codes(d)
    assert dict(p.constants) == {"A": 0x200, "B": 0x100}
    assert p.region("r").extents[0].start == M.Address(SYS_CALL_TABLE + 0x200)
    _, d = check_text(policy_dir, "    const A = B + 1\n    const B = A + 1")
    assert "PC314" in codes(d)


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3 - 10", (1 << 64) - 3), ("~-1", 0), ("0x10 ^ 0x3 | 4", 0x17), ("-(-5)", 5),
    ("-5", (1 << 64) - 5), ("0xffffffffffffffff * 0xffffffffffffffff - 0x8000000000000000", (1 << 63) + 1),
])
def test_a_conditions_literal_arithmetic_folds_to_what_the_plan_computes(policy_dir: Path, expr: str, value: int):
    # Folded in the checker, decided by the plan's evaluator: the one literal left is the 64-bit value.
    p, d = check_text(policy_dir, f"    rule r: on write cr4 where rax == {expr} {{ deny }}")
    assert p is not None, codes(d)
    form = compile_condition(p.rule("r").condition)
    assert form[2][0] == "lit", form
    assert evaluate(form, {"rax": value}) and not evaluate(form, {"rax": value ^ 1})


def test_isf_offsets_and_sizes(policy_dir: Path):
    (policy_dir / "p.vmi").write_text(
        'policy "t" {\n  target xen >= 4.17 on x86_64\n  symbols "debian12-6.1.0-56-amd64.isf-excerpt.json"\n'
        "  region cred_ptr = symbol init_task + offsetof(task_struct, cred) size 8\n"
        "  region creds = symbol init_cred size sizeof(cred)\n"
        "  rule r: on write to cred_ptr, creds { deny }\n}\n")
    d = Diagnostics()
    p = check_policy(policy_dir / "p.vmi", d)
    assert p is not None, codes(d)
    assert p.region("cred_ptr").extents[0].start == M.Address(0xFFFFFFFF82A1AA40 + 2960)  # pahole: cred @ 2960
    assert p.region("creds").extents[0].size == 176


def test_percpu_symbols_bind_per_vcpu_and_refuse_plain_use(policy_dir: Path):
    p, d = check_text(policy_dir, "    region g = percpu symbol gdt_page size 4096\n    rule r: on write to g { deny }")
    assert p is not None, codes(d)
    assert p.region("g").extents[0].start == M.Address(0xB000, percpu=True)
    _, d = check_text(policy_dir, "    region g = symbol gdt_page size 4096\n    rule r: on write to g { deny }")
    assert codes(d) == ["PC305"]


def test_optional_symbol_absent_gives_empty_region_and_warning(policy_dir: Path):
    p, d = check_text(policy_dir, "    region compat = symbol? ia32_sys_call_table size 8\n"
                                  "    rule r: on write to compat { deny }")
    assert p is not None
    assert p.region("compat").empty
    assert codes(d) == ["PC303"]


def test_conditions_are_typed_per_trigger(policy_dir: Path):
    p, d = check_text(policy_dir, "    region t = symbol sys_call_table size 8\n"
                                  "    rule r: on write to t where gla in t and rip & 0xfff != 0 and not vcpu == 3 { deny }")
    assert p is not None, codes(d)
    c = p.rule("r").condition
    assert isinstance(c, M.Logic) and c.op == "and"
    # bitwise binds tighter than comparison: (rip & 0xfff) != 0
    assert M.Compare("!=", M.Binary("&", M.Field("rip"), M.Literal(0xFFF)), M.Literal(0)) == c.left.right
    _, d = check_text(policy_dir, "    region t = symbol sys_call_table size 8\n"
                                  "    rule r: on write to t where old == 1 { deny }")
    assert codes(d) == ["PC401"]
    _, d = check_text(policy_dir, "    rule r: on write cr4 where cleared(cr0.WP) { deny }")
    assert codes(d) == ["PC400"]


def test_constant_condition_warns(policy_dir: Path):
    p, d = check_text(policy_dir, "    rule r: on write cr0 where 1 == 1 { deny }")
    assert p is not None
    assert codes(d) == ["PC421"]


def test_target_override_changes_what_is_available(policy_dir: Path):
    (policy_dir / "p.vmi").write_text('policy "t" {\n  target xen >= 4.17 on x86_64\n'
                                      '  rule r: on smc { log info "smc on {vcpu}" }\n}\n')
    d = Diagnostics()
    assert check_policy(policy_dir / "p.vmi", d) is None
    assert [x.code for x in d] == ["PC418"]
    d = Diagnostics()
    p = check_policy(policy_dir / "p.vmi", d, target_arch="arm64")
    assert p is not None and p.target.arch == "arm64"


def test_unnamed_rules_get_a_name_from_file_and_line(policy_dir: Path):
    p, d = check_text(policy_dir, "    rule on cpuid leaf 1 { allow }", name="probe-rules.vmi")
    assert p is not None
    assert p.rules[0].name == "probe_rules_L4" and p.rules[0].generated_name


def test_model_hash_ignores_spelling(policy_dir: Path):
    a, _ = check_text(policy_dir, "    const N = 4\n    region r = symbol sys_call_table size N * 2\n"
                                  "    rule x: on write to r { deny }", name="a.vmi")
    b, _ = check_text(policy_dir, "\n\n    region r = symbol sys_call_table size 8   # same bytes\n"
                                  "    const N = 4\n    rule x: on write to r {\n deny\n }", name="b.vmi")
    assert a is not None and b is not None
    assert a.content_hash() == b.content_hash()


@pytest.mark.parametrize("spec", [">99999999", "099999999x", ".99999999f", "*^200"])
def test_message_format_widths_are_bounded(policy_dir: Path, spec: str):
    """`{gla:>99999999}` would write a 100 MB record per event; the checker refuses it, fast."""
    _, d = check_text(policy_dir, '    region r = symbol sys_call_table size 8\n'
                                  f'    rule w: on write to r {{ deny alert critical "T {{gla:{spec}}}" }}')
    assert "PC410" in codes(d)
    assert any("at most 128" in (x.hint or "") for x in d)


def test_message_format_width_within_the_bound_is_clean(policy_dir: Path):
    _, d = check_text(policy_dir, '    region r = symbol sys_call_table size 8\n'
                                  '    rule w: on write to r { deny alert critical "T {gla:>#20x} {rip:_>128}" }')
    assert codes(d) == []


@pytest.mark.parametrize("again, warns", [("ffffffff82100000", True), ("ffffffff82000360", False)])
def test_a_symbol_defined_twice_in_the_map_warns_and_names_the_address_used(policy_dir: Path, again: str, warns: bool):
    """The first definition is used; another at a different address is a warning (PC318) that names both."""
    with (policy_dir / "linux-6.1.System.map").open("a", encoding="ascii") as f:
        f.write(f"{again} D sys_call_table\n")
    policy, d = check_text(policy_dir, "    region r = symbol sys_call_table size 8\n"
                                       "    rule w: on write to r { deny }")
    assert policy is not None and policy.region("r").extents[0].start.value == SYS_CALL_TABLE
    if not warns:
        assert codes(d) == []
        return
    [warning] = list(d)
    assert warning.code == "PC318" and warning.severity.name == "WARNING"
    assert "0xffffffff82000360, is used" in warning.message and "0xffffffff82100000" in warning.message


def test_every_use_of_a_symbol_or_template_gets_its_own_diagnostics(policy_dir: Path):
    """The checker remembers symbols looked up and templates checked without a diagnostic
    (`Checking.symbol_addresses`, `sound_templates`); what is reported of a use must still be
    reported at every use, and a template sound for one kind of event is checked again for another."""
    uses = ("    region a = symbol gdt_page size 8\n    region b = symbol gdt_page size 8\n"
            "    region c = percpu symbol sys_call_table size 8\n    region d = percpu symbol sys_call_table size 8\n")
    _, d = check_text(policy_dir, uses + "    rule w: on write to a { deny }")
    assert [(x.code, x.span.line) for x in d.sorted()] == [("PC305", 4), ("PC305", 5), ("PC305", 6), ("PC305", 7)]
    with (policy_dir / "linux-6.1.System.map").open("a", encoding="ascii") as f:
        f.write("ffffffff82100000 D sys_call_table\n")
    _, d = check_text(policy_dir, "    region a = symbol sys_call_table size 8\n"
                                  "    region b = symbol sys_call_table + 8 size 8\n    rule w: on write to a { deny }")
    assert [(x.code, x.span.line) for x in d.sorted()] == [("PC318", 4), ("PC318", 5)]
    policy, d = check_text(policy_dir, "    region a = symbol _text size 8\n    region b = symbol _text size 8\n"
                                       "    rule w: on write to a { log info \"{gla:#x}\" }\n"
                                       "    rule x: on write to b { log info \"{gla:#x}\" }\n"
                                       "    rule y: on cpuid { log info \"{gla:#x}\" }\n"
                                       "    rule z: on cpuid { log info \"{gla:#x}\" }\n"
                                       "    rule v: on write to a { log info \"{nope}\" }\n"
                                       "    rule u: on write to b { log info \"{nope}\" }")
    assert [(x.code, x.span.line) for x in d.sorted()] == [("PC409", 8), ("PC409", 9), ("PC409", 10), ("PC409", 11)]
    _, d = check_text(policy_dir, "    region a = symbol _text size 8\n    region b = symbol _text size 8\n"
                                  "    rule w: on write to a { log info \"{gla:#x}\" }\n"
                                  "    rule x: on write to b { log info \"{gla:#x}\" }")
    assert list(d) == []
    p, _ = check_text(policy_dir, "    region a = symbol _text size 8\n"
                                  "    rule w: on write to a { log info \"{gla:#x} {vcpu}\" }\n"
                                  "    rule x: on write to a { log info \"{gla:#x} {vcpu}\" }")
    assert [a.fields for r in p.rules for a in r.actions] == [("gla", "vcpu"), ("gla", "vcpu")]


def test_chains_of_offsets_fold_as_step_by_step(policy_dir: Path, monkeypatch):
    """`policyc.checking.constants._offsets` folds `x + n - m ...` in one loop; with its operators
    taken away every step goes through `_binary` again: the same values, origins and diagnostics."""
    from policyc.checking import constants

    body = ("    const C = 5 + 3 - 1\n    const D = 0xffffffffffffffff + 1\n"
            "    const E = 1 + 0x1ffffffffffffffff - 2\n    const F = symbol _text - 8 + symbol _text\n"
            "    const G = 0 - 5 - 0xffffffffffffffff\n    const H = nope + 1 - 2\n"
            "    const J = symbol _text + 0x10\n    const K = (symbol _text + 1) - 1 + C\n"
            "    region a = symbol _text - 0x200000000 + 0x10 size 8\n    region b = va C + 0x1000 - 2 size 4\n"
            "    region c = symbol? no_such_symbol + 8 - 1 size 8\n    region d = percpu symbol gdt_page + 8 size 8\n"
            "    region e = J + 4 - 0x2 size 8\n    region f = symbol _text * 2 + 1 size 8\n"
            "    region g = symbol _text - symbol _stext + 4 size 8\n    region h = symbol gdt_page - 1 + 1 size 8\n"
            "    region i = K + 0 size C - 1 + 0x10\n    rule r: on write to a { deny }")

    bad = body

    def checked():
        policy, d = check_text(policy_dir, body)
        found = [(x.code, x.span.line, x.span.col, x.message) for x in d.sorted()]
        regions = {r.name: [(e.start.value, e.start.percpu, e.start.origin) if isinstance(e.start, M.Address)
                            else e.start for e in r.extents] for r in policy.regions} if policy else None
        return found, regions

    fast = checked()
    sound = body = "\n".join(line for line in body.splitlines()
                             if line.split()[1] in "CJKabcei" or line.split()[0] == "rule")
    fast_sound = checked()
    monkeypatch.setattr(constants, "OFFSETS", frozenset())
    assert checked() == fast_sound
    body = bad
    assert checked() == fast
    assert {code for code, *_ in fast[0]} >= {"PC300", "PC303", "PC305", "PC406", "PC408"}
    assert [code for code, *_ in fast_sound[0]] == ["PC303"] and sound
    assert fast_sound[1]["a"] == [(0xFFFFFFFF81000000 - 0x200000000 + 0x10, False, "symbol _text - 0x200000000 + 0x10")]
    assert fast_sound[1]["e"][0][2] == "symbol _text + 0x10 + 0x4 - 0x2"


def test_model_objects_hash_and_compare_as_values(policy_dir: Path):
    """Model classes are plain (not frozen) dataclasses for speed, with the hash a frozen one has: equal
    objects hash equal, spans and origins take no part, and conditions can key a dict (the conflicts
    analysis numbers them so)."""
    here, there = M.Address(0x10, False, "symbol a"), M.Address(0x10, False, "symbol b")
    assert here == there and hash(here) == hash(there)
    p, d = check_text(policy_dir, "    region t = symbol sys_call_table size 8\n"
                                  "    rule r: on write to t where gla in t { deny }\n"
                                  "    rule s: on write to t where gla in t { deny }")
    assert p is not None, codes(d)
    r, s = p.rules
    assert r.condition == s.condition and len({r.condition, s.condition}) == 1
    assert r.trigger == s.trigger and hash(r.trigger) == hash(s.trigger) and r.span != s.span
    assert hash(p) == hash(p) and {p.region("t"): 1}[p.region("t")] == 1
