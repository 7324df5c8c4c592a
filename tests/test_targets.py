"""Targets: each capability gap in XEN-FACTS.md gives its diagnostic, naming rule, target and what works."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics, Severity
from policyc.compiler import compile_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"


def compile_text(tmp_path: Path, body: str, arch: str, symbols: str = "linux-6.1.System.map"):
    shutil.copy(EXAMPLES / symbols, tmp_path)
    (tmp_path / "p.vmi").write_text(f'policy "t" {{\n    target xen >= 4.17 on {arch}\n    symbols "{symbols}"\n'
                                    f"{body}\n}}\n")
    d = Diagnostics()
    policy = check_policy(tmp_path / "p.vmi", d)
    assert policy is not None, [x.message for x in d]
    return compile_plan(policy, d), d


def errors(d: Diagnostics):
    return [x for x in d if x.severity is Severity.ERROR]


def test_svm_rejects_memory_rules_naming_rule_target_and_alternative(tmp_path):
    plan, d = compile_text(tmp_path, "    region t = symbol sys_call_table size 8\n"
                                     "    rule guard: on write to t { deny }", "x86_64-svm")
    assert plan is None
    (e,) = errors(d)
    assert e.code == "PC500" and e.span.line == 5
    assert "'guard'" in e.message and "x86_64-svm" in e.message and "EINVAL" in e.message
    assert "Intel VT-x" in e.hint and "CR/MSR" in e.hint


def test_svm_accepts_register_rules_and_keeps_breakpoints_armed_by_emulation(tmp_path):
    plan, d = compile_text(tmp_path, "    rule wp: on write cr0 where cleared(cr0.WP) { deny }\n"
                                     "    rule lstar: on write msr LSTAR { deny }\n"
                                     "    rule creds: on execute symbol commit_creds { log info \"x\" }",
                           "x86_64-svm")
    assert plan is not None and not errors(d)
    assert plan["views"] == [] and "dispatch" in plan and "mem_access" not in plan["dispatch"]
    assert plan["breakpoints"][0]["mechanism"] == "int3-inline-emulate"
    assert plan["responses"]["breakpoint"]["allow"]["flags"] == ["EMULATE", "SET_EMUL_INSN_DATA"]
    assert [w.code for w in d] == ["PC501"]  # the int3 is visible to the guest's reads


def test_arm64_warns_on_execute_watching_and_refuses_execute_deny(tmp_path):
    body = "    region ro = symbol __start_rodata .. symbol __end_rodata\n" \
           "    rule watch: on execute in ro { alert high \"exec at {pc:#x}\" }"
    plan, d = compile_text(tmp_path, body, "arm64", "linux-6.1-arm64.System.map")
    assert plan is not None
    messages = [w.message for w in d if w.code == "PC501"]
    assert any("split instruction/data TLBs" in m for m in messages)
    assert any("re-armed" in m for m in messages)
    plan, d = compile_text(tmp_path, body.replace('alert high "exec at {pc:#x}"', "deny"), "arm64",
                           "linux-6.1-arm64.System.map")
    assert plan is None and [e.code for e in errors(d)] == ["PC500"]


def test_xcr0_deny_is_refused_but_logging_it_is_fine(tmp_path):
    plan, d = compile_text(tmp_path, "    rule x: on write xcr0 { deny }", "x86_64")
    assert plan is None
    assert "XCR0" in errors(d)[0].message
    plan, d = compile_text(tmp_path, '    rule x: on write xcr0 { log info "xcr0 {new:#x}" }', "x86_64")
    assert plan is not None


def test_cr_and_msr_deny_defer_register_writes(tmp_path):
    plan, _ = compile_text(tmp_path, "    rule wp: on write cr0 where cleared(cr0.WP) { deny }", "x86_64")
    assert plan["monitors"]["defer_register_writes"] is True
    cr0 = plan["monitors"]["write_ctrlreg"][0]
    assert cr0["index"] == "cr0" and int(cr0["bitmask"], 16) == ~(1 << 16) & (1 << 64) - 1
    plan, _ = compile_text(tmp_path, '    rule wp: on write cr0 { log info "cr0 {new:#x}" }', "x86_64")
    assert "defer_register_writes" not in plan["monitors"]


@pytest.mark.parametrize("arch", ["x86_64", "x86_64-svm", "arm64"])
def test_target_override_on_the_command_line_wins(tmp_path, arch):
    from policyc.cli import main

    shutil.copy(EXAMPLES / "linux-6.1.System.map", tmp_path)
    (tmp_path / "p.vmi").write_text('policy "t" {\n target xen >= 4.17 on x86_64\n'
                                    ' rule g: on guest_request { log info "req" }\n}\n')
    out = tmp_path / "plan.json"
    assert main(["compile", str(tmp_path / "p.vmi"), "--target", arch, "-o", str(out)]) == 0
    assert f'"arch": "{arch}"' in out.read_text()
