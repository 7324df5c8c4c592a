"""`policyc explain` and `policyc diff`: readable views of a plan, and semantic diffs of two."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from policyc.cli import main
from policyc.explain import explain_dot, explain_text
from policyc.plan_text import render_condition
from policyc.plan import dump_plan, load_plan, plan_schema
from policyc.plan_diff import diff_plans

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "policies"
GOLDEN = REPO / "tests" / "golden" / "plans"
GOLDEN_FILES = sorted(GOLDEN.glob("*.plan.json"))
KERNEL = "linux-kernel-integrity.vmi"


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.plan.json").read_text(encoding="utf-8"))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    for f in (KERNEL, "linux-6.1.System.map"):
        shutil.copy(EXAMPLES / f, tmp_path)
    return tmp_path


def variant(directory: Path, name: str, old: str, new: str) -> Path:
    text = (directory / KERNEL).read_text()
    assert text.count(old) == 1, old
    (directory / name).write_text(text.replace(old, new))
    return directory / name


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- explain

@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.name)
def test_explain_mentions_every_rule_and_where_it_landed(path: Path):
    plan = json.loads(path.read_text())
    text = explain_text(plan)
    assert text == explain_text(json.loads(path.read_text()))  # deterministic
    assert plan["target"]["arch"] in text and plan["policy"]["name"] in text
    blocks = _rule_blocks(text)
    assert set(blocks) == set(plan["rules"])
    for name, summary in plan["rules"].items():
        block = blocks[name]
        assert summary["at"] in block
        for view in plan["views"]:
            for rng in view["ranges"]:
                if name in rng["rules"]:
                    assert f"view {view['id']} ({view['role']}): range {rng['region']} " in block
        for bp in plan["breakpoints"]:
            if name in bp["rules"]:
                assert f"breakpoint {bp['id']} at {bp['address']}" in block
        for table, content in plan["dispatch"].items():
            keys = [None] if isinstance(content, list) else list(content)
            for key in keys:
                entries = content if key is None else content[key]
                if any(e["rule"] == name for e in entries):
                    assert f"dispatch {table}" + (f"[{key}]" if key else "") in block
    for w in plan["warnings"]:
        assert w["message"] in text


def _rule_blocks(text: str) -> dict[str, str]:
    section = text.split("\nrules (", 1)[1].split("\nwarnings (", 1)[0]
    blocks: dict[str, str] = {}
    current = None
    for line in section.splitlines()[1:]:
        m = re.match(r"^  (\S+)  \[", line)
        if m:
            current = m.group(1)
            blocks[current] = ""
        if current:
            blocks[current] += line + "\n"
    return blocks


def test_explain_shows_views_pages_monitors_and_conditions():
    text = explain_text(golden("linux-kernel-integrity.x86_64"))
    assert "view 2 restricted" in text and "3 regions, 2286 pages restricted" in text
    assert "contexts *" in text
    assert "cleared(cr0.WP)" in text and "cleared(cr4.SMEP | cr4.SMAP)" in text
    assert "new != va 0xffffffff81c00080" in text
    assert "write_ctrlreg cr0" in text and "bitmask 0xfffffffffffeffff" in text
    assert "mov_to_msr 0xc0000082 (LSTAR)" in text
    assert "deny:write -> EMULATE|EMULATE_NOWRITE" in text
    assert "deny -> DENY" in text
    text = explain_text(golden("linux-descriptors-and-msrs.x86_64"))
    assert "rip not in kernel_text" in text and "cleared(EFER.NXE)" in text
    assert "cleared(xcr0.SSE | xcr0.AVX)" in text
    windows = explain_text(golden("windows-kernel-integrity.x86_64"))
    assert "bound at install" in windows and "empty region" in windows


def test_explain_in_audit_mode_says_would_deny():
    text = explain_text(golden("linux-syscall-tracing.x86_64"))
    blocks = _rule_blocks(text)
    assert "would deny" in blocks["module_loads"]
    assert "answered with the allow response: ALTERNATE_P2M|FAST_SINGLESTEP" in blocks["module_loads"]
    assert "would deny" not in blocks["execs"]


def test_explain_shows_collateral_when_analysed():
    plan = golden("linux-kernel-integrity.x86_64")
    plan["analyses"] = {}
    assert "(not analysed)" in explain_text(plan)
    # The layout of policyc.analyses.collateral: per region, bytes watched vs trapped, partial pages.
    plan["analyses"] = {"collateral": {"note_threshold": 0.9, "regions": {"syscalls": {
        "accesses": "w", "pages": 2, "trapped_bytes": 8192, "watched_bytes": 3608, "unclaimed_bytes": 4584,
        "unclaimed_share": 0.5595703125,
        "partial_runs": [{"start": "0xffffffff82000000", "pages": 1, "space": "va", "trapped_bytes": 4096,
                          "watched_bytes": 3232},
                         {"start": "0xffffffff82001000", "pages": 3, "space": "va", "trapped_bytes": 4096,
                          "watched_bytes": 0}]}}}, "livelock": {"livelocks": [], "states": 3}}
    text = explain_text(plan)
    assert "syscalls" in text and "3608 bytes watched in 8192 trapped (56.0% collateral)" in text
    assert "partial page va 0xffffffff82000000: 3232 of 4096 bytes watched\n" in text
    assert "partial 3 pages from va 0xffffffff82001000: 0 of 4096 bytes watched each" in text
    assert "livelock: livelocks 0, states 3" in text
    # An unknown layout is still shown, generically.
    plan["analyses"] = {"collateral": [{"region": "syscalls", "bytes_outside": 7144}]}
    text = explain_text(plan)
    assert "- bytes_outside: 7144" in text and "region: syscalls" in text


@pytest.mark.parametrize("expected, form", [
    ("always", None),
    ("(a + b) * 0x2", ["*", ["+", ["field", "a"], ["field", "b"]], ["lit", "0x2"]]),
    ("a - (b - c)", ["-", ["field", "a"], ["-", ["field", "b"], ["field", "c"]]]),
    ("a - b - c", ["-", ["-", ["field", "a"], ["field", "b"]], ["field", "c"]]),
    ("not (x == 0x1 and y == 0x2)", ["not", ["and", ["==", ["field", "x"], ["lit", "0x1"]],
                                             ["==", ["field", "y"], ["lit", "0x2"]]]]),
    ("a == 0x1 or b == 0x2 and c == 0x3", ["or", ["==", ["field", "a"], ["lit", "0x1"]],
                                           ["and", ["==", ["field", "b"], ["lit", "0x2"]],
                                            ["==", ["field", "c"], ["lit", "0x3"]]]]),
    ("-(a + b) & ~c", ["&", ["neg", ["+", ["field", "a"], ["field", "b"]]], ["inv", ["field", "c"]]]),
    ("rip + 0x8 not in kernel_text", ["not_in", ["+", ["field", "rip"], ["lit", "0x8"]], "kernel_text"]),
    ("gla - percpu 0x6004 < 0x8", ["<", ["-", ["field", "gla"], ["addr", "0x6004", True]], ["lit", "0x8"]]),
    ("changed(0x6)", ["changed", "0x6"]),
])
def test_conditions_render_back_to_infix(expected, form):
    assert render_condition(form) == expected


def test_bit_masks_render_by_name_only_when_every_bit_has_one():
    bits = {"WP": 0x10000, "PG": 0x80000000}
    assert render_condition(["cleared", "0x80010000"], bits, "cr0") == "cleared(cr0.WP | cr0.PG)"
    assert render_condition(["cleared", "0x10001"], bits, "cr0") == "cleared(0x10001)"


# ---------------------------------------------------------------- dot

@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.name)
def test_dot_is_a_graph_and_deterministic(path: Path):
    plan = json.loads(path.read_text())
    dot = explain_dot(plan)
    assert dot.startswith("digraph ")
    assert dot.count("{") == dot.count("}") and dot.rstrip().endswith("}")
    assert len(re.findall(r'(?<!\\)"', dot)) % 2 == 0  # quoted strings are closed
    reordered = {k: plan[k] for k in reversed(list(plan))}  # key order must not matter
    assert explain_dot(reordered) == dot
    for view in plan["views"]:
        assert f"v{view['id']} [label=" in dot


def test_dot_shows_the_view_switches():
    dot = explain_dot(golden("linux-kernel-integrity.x86_64"))
    assert re.search(r'v2 -> v1 \[label="mem_access allow \(ALTERNATE_P2M\)"', dot)
    assert re.search(r'v1 -> v2 \[label="fast singlestep back"', dot)
    assert "breakpoint step back" in dot and "bp_bp0 -> v2" in dot
    svm = explain_dot(golden("linux-syscall-tracing.x86_64-svm"))
    assert "host p2m" in svm and "inline in the guest frame" in svm


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed")
def test_dot_parses_with_graphviz():
    for path in GOLDEN_FILES:
        proc = subprocess.run(["dot", "-Tsvg"], input=explain_dot(json.loads(path.read_text())),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- diff

def test_diff_of_a_plan_with_itself_is_empty(capsys):
    plan = golden("linux-kernel-integrity.x86_64")
    d = diff_plans(plan, json.loads(json.dumps(plan)))
    assert d.empty and "no differences" in d.render_text()
    assert json.loads(d.to_json())["empty"] is True
    path = str(EXAMPLES / KERNEL)
    code, out, _ = run(capsys, "diff", path, path, "--exit-code")
    assert code == 0 and "no differences" in out


def _single_rule_change(d, rule: str) -> tuple[str, ...]:
    assert not d.added and not d.removed
    assert [(c.section, c.name) for c in d.changed] == [("rule", rule)], d.render_text()
    return d.changed[0].details


def test_diff_reports_a_region_size_change(policy_dir: Path, capsys):
    new = variant(policy_dir, "bigger.vmi", "symbol sys_call_table size 8 * NR_SYSCALLS",
                  "symbol sys_call_table size 8 * 1024")
    code, out, _ = run(capsys, "diff", str(policy_dir / KERNEL), str(new), "--exit-code")
    assert code == 1
    assert "~ rule protect_tables" in out
    assert "region syscalls: va 0xffffffff82000360 (+slide) size 0xe18 (2 pages) -> " \
           "va 0xffffffff82000360 (+slide) size 0x2000 (3 pages)" in out
    assert "pages trapped: 2286 -> 2287" in out
    d = diff_plans(_compile(policy_dir / KERNEL), _compile(new))
    details = _single_rule_change(d, "protect_tables")
    assert len(details) == 1 and details[0].startswith("region syscalls:")


def test_diff_reports_a_condition_change(policy_dir: Path, capsys):
    new = variant(policy_dir, "cond.vmi", "where new != symbol entry_SYSCALL_64",
                  "where new != symbol entry_SYSCALL_64 and new != 0")
    d = diff_plans(_compile(policy_dir / KERNEL), _compile(new))
    details = _single_rule_change(d, "syscall_entry_guard")
    assert details == ("condition: new != va 0xffffffff81c00080 -> new != va 0xffffffff81c00080 and new != 0x0",)
    code, out, _ = run(capsys, "diff", str(policy_dir / KERNEL), str(new), "--exit-code")
    assert code == 1 and "~ changed" in out and "+ added" not in out


def test_diff_reports_a_verdict_change(policy_dir: Path, capsys):
    new = variant(policy_dir, "verdict.vmi", 'deny\n        alert high "execution in read-only data',
                  'alert high "execution in read-only data')
    d = diff_plans(_compile(policy_dir / KERNEL), _compile(new))
    assert _single_rule_change(d, "no_exec_rodata") == ("verdict: deny -> allow",)
    code, out, _ = run(capsys, "diff", str(policy_dir / KERNEL), str(new), "--exit-code")
    assert code == 1 and "verdict: deny -> allow" in out
    code, _, _ = run(capsys, "diff", str(policy_dir / KERNEL), str(new))
    assert code == 0  # without --exit-code a difference is not a failure


def test_diff_reports_rules_added_and_removed_and_monitor_changes(policy_dir: Path):
    new = variant(policy_dir, "rules.vmi", "rule trace_creds: on execute symbol commit_creds {",
                  "rule trace_prepare: on execute symbol prepare_creds {")
    d = diff_plans(_compile(policy_dir / KERNEL), _compile(new))
    assert [c.name for c in d.added] == ["trace_prepare"] and [c.name for c in d.removed] == ["trace_creds"]
    text = d.render_text()
    assert "+ added\n  + rule trace_prepare" in text and "- removed\n  - rule trace_creds" in text

    new = variant(policy_dir, "mask.vmi", "cleared(cr0.WP)", "cleared(cr0.WP | cr0.PG)")
    d = diff_plans(_compile(policy_dir / KERNEL), _compile(new))
    changed = {(c.section, c.name): c.details for c in d.changed}
    assert changed[("rule", "wp_guard")] == ("condition: cleared(cr0.WP) -> cleared(cr0.WP | cr0.PG)",)
    assert changed[("monitor", "write_ctrlreg cr0")] == ("bitmask: 0xfffffffffffeffff -> 0xffffffff7ffeffff",)


def test_diff_reports_mode_and_target_changes(policy_dir: Path):
    new = variant(policy_dir, "audit.vmi", "mode enforce ", "mode audit   ")
    d = diff_plans(_compile(policy_dir / KERNEL), _compile(new))
    assert [(c.section, c.details[0].split(" (")[0]) for c in d.changed] == [("policy", "mode: enforce -> audit")]
    a, b = golden("linux-syscall-tracing.x86_64"), golden("linux-syscall-tracing.x86_64-svm")
    d = diff_plans(a, b)
    sections = {c.section for c in d.changed}
    assert {"target", "strategy", "view", "monitor"} <= {c.section for c in d.changed + d.removed}
    assert "target" in sections
    assert "pages trapped: 0 (unchanged)" in d.render_text()


def test_diff_ignores_pure_position_changes(policy_dir: Path, capsys):
    new = variant(policy_dir, "moved.vmi", "    rule trace_creds:", "\n\n    rule trace_creds:")
    old_plan, new_plan = _compile(policy_dir / KERNEL), _compile(new)
    assert old_plan["content_hash"] != new_plan["content_hash"]
    d = diff_plans(old_plan, new_plan)
    assert d.empty and d.note == "same traps; only source positions changed"
    code, out, _ = run(capsys, "diff", str(policy_dir / KERNEL), str(new), "--exit-code")
    assert code == 0 and "same traps; only source positions changed" in out


def test_diff_json_output(policy_dir: Path, capsys):
    new = variant(policy_dir, "bigger.vmi", "8 * NR_SYSCALLS", "8 * 1024")
    code, out, _ = run(capsys, "diff", str(policy_dir / KERNEL), str(new), "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["empty"] is False
    assert doc["changed"][0]["what"] == "rule" and doc["changed"][0]["name"] == "protect_tables"
    assert doc["pages_trapped"] == {"before": 2286, "after": 2287}


def _compile(path: Path) -> dict:
    from policyc.check import check_policy
    from policyc.diagnostics import Diagnostics
    from policyc.compiler import compile_plan

    d = Diagnostics()
    policy = check_policy(path, d)
    assert policy is not None
    plan = compile_plan(policy, d)
    assert plan is not None
    return plan


# ---------------------------------------------------------------- CLI

def test_cli_compile_explain_diff_schema(tmp_path: Path, capsys):
    out_a = tmp_path / "a.json"
    code, out, _ = run(capsys, "compile", str(EXAMPLES / KERNEL), "-o", str(out_a))
    assert code == 0 and out == ""
    assert out_a.read_text() == (GOLDEN / "linux-kernel-integrity.x86_64.plan.json").read_text()
    assert load_plan(out_a)["policy"]["name"] == "linux-kernel-integrity"

    code, out, _ = run(capsys, "compile", str(EXAMPLES / "linux-syscall-tracing.vmi"), "--target", "x86_64-svm")
    assert code == 0 and out == (GOLDEN / "linux-syscall-tracing.x86_64-svm.plan.json").read_text()

    code, out, _ = run(capsys, "explain", str(out_a))
    assert code == 0 and out == explain_text(load_plan(out_a))
    code, out, _ = run(capsys, "explain", str(out_a), "--dot")
    assert code == 0 and out.startswith("digraph")
    code, out, _ = run(capsys, "explain", str(EXAMPLES / KERNEL))  # a policy, compiled on the fly
    assert code == 0 and "protect_tables" in out

    out_b = tmp_path / "b.json"
    run(capsys, "compile", str(EXAMPLES / KERNEL), "-o", str(out_b))
    code, out, _ = run(capsys, "diff", str(out_a), str(out_b), "--exit-code")
    assert code == 0 and "no differences" in out
    other = tmp_path / "c.json"
    run(capsys, "compile", str(EXAMPLES / "linux-exec-from-data.vmi"), "-o", str(other))
    code, out, _ = run(capsys, "diff", str(out_a), str(other), "--exit-code")
    assert code == 1 and "+ added" in out and "- removed" in out

    code, out, _ = run(capsys, "schema", "--plan")
    assert code == 0 and json.loads(out) == plan_schema()


def test_cli_rejects_edited_plans_and_bad_targets(tmp_path: Path, capsys):
    plan = golden("linux-kernel-integrity.x86_64")
    plan["policy"]["mode"] = "audit"
    edited = tmp_path / "edited.json"
    edited.write_text(dump_plan(plan))
    code, _, err = run(capsys, "explain", str(edited))
    assert code == 1 and "hash mismatch" in err
    code, _, err = run(capsys, "compile", str(EXAMPLES / KERNEL), "--target", "mips")
    assert code == 2 and "unknown target" in err
    code, _, err = run(capsys, "compile", str(EXAMPLES / KERNEL), "--target", "x86_64-svm")
    assert code == 1 and "PC500" in err
