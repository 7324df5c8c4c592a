"""The plan analyses (policyc.analyses): view layout, conflicts, livelock, collateral.

Small hand-made policies over the real symbol table of Debian 12's 6.1.0-56-amd64
kernel (examples/policies/linux-6.1.System.map); every symbol used here is in it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyc import lowering
from policyc.analyses import collateral, livelock, run_analyses, usable_rules
from policyc.lowering import views
from policyc.check import check_policy
from policyc.diagnostics import Diagnostics, Severity
from policyc.compiler import compile_plan
from policyc.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "policies"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLES / "linux-6.1.System.map", tmp_path)
    return tmp_path


def write_policy(directory: Path, body: str, arch: str = "x86_64", name: str = "p.vmi", mode: str = "enforce") -> Path:
    text = (f'policy "t" {{\n    target xen >= 4.17 on {arch}\n    symbols "linux-6.1.System.map"\n'
            f"    mode {mode}\n{body}\n}}\n")
    path = directory / name
    path.write_text(text)
    return path


def compile_text(directory: Path, body: str, arch: str = "x86_64", **kw):
    path = write_policy(directory, body, arch, **kw)
    d = Diagnostics()
    policy = check_policy(path, d)
    assert policy is not None, [(x.code, x.message) for x in d]
    return policy, compile_plan(policy, d), d


def of(d: Diagnostics, code: str) -> list:
    return [x for x in d.sorted() if x.code == code]


def contexts_body(n: int, with_global: bool = False) -> str:
    """n cr3 contexts, each watching writes to its own 8-byte region on its own page of kernel data."""
    lines = []
    for i in range(n):
        lines.append(f"    region p{i} = symbol _sdata + {2 * i} * 0x1000 size 8")
        lines.append(f"    rule r{i}: on write to p{i} where cr3 == {0x1000 * (i + 1):#x} {{ deny }}")
    if with_global:
        lines.append("    region tbl = symbol sys_call_table size 8")
        lines.append("    rule everyone: on write to tbl { deny }")
    return "\n".join(lines)


def restricted(plan: dict) -> list[dict]:
    return [v for v in plan["views"] if v["role"] == "restricted"]


# ---------------------------------------------------------------- (a) view layout

def test_twelve_contexts_are_merged_into_the_view_limit_with_a_cost_report(policy_dir: Path):
    policy, plan, d = compile_text(policy_dir, contexts_body(12))
    assert plan is not None
    assert len(plan["views"]) <= TARGETS["x86_64"].max_views == 10
    assert [v["id"] for v in plan["views"]] == list(range(10))
    rv = restricted(plan)
    assert len(rv) == 8
    # Every context lands in exactly one restricted view.
    placed = sorted(c for v in rv for c in v["contexts"])
    assert placed == sorted(f"cr3={0x1000 * (i + 1):#x}" for i in range(12))

    report = plan["analyses"]["views"]
    assert report["mechanism"] == "altp2m" and report["available"] == 8
    merges = report["merges"]
    assert len(merges) == 4  # 12 contexts, 8 views
    # Merging two one-page contexts traps one more page for each of them: 2 pages.
    assert [m["extra_trapped_pages"] for m in merges] == [2, 2, 2, 2]
    assert report["extra_trapped_pages"] == 8
    first = merges[0]
    assert first == {"contexts": [["cr3=0x1000"], ["cr3=0x2000"]], "view": 2, "extra_trapped_pages": 2}
    merged_view = next(v for v in rv if v["id"] == 2)
    assert merged_view["contexts"] == ["cr3=0x1000", "cr3=0x2000"]
    # The stricter permission: both contexts' regions are restricted in the merged view.
    assert [(r["region"], r["access"], r["rules"]) for r in merged_view["ranges"]] == [
        ("p0", "rx", ["r0"]), ("p1", "rx", ["r1"])]

    warnings = of(d, "PC502")
    assert len(warnings) == 4 and all(w.severity is Severity.WARNING for w in warnings)
    assert "cr3=0x1000 and cr3=0x2000 share view 2" in warnings[0].message
    assert "2 more page(s)" in warnings[0].message
    assert [w["code"] for w in plan["warnings"]].count("PC502") == 4
    # View switching on CR3 writes needs a sync CR3 monitor that sees every write.
    needed = {"write_ctrlreg": [{"index": "cr3", "sync": True, "onchangeonly": False, "bitmask": "0x0"}]}
    assert report["monitors_needed"] == needed
    assert views.context_monitors(plan["views"]) == needed
    assert report["matches_plan"] is True


def test_exactly_eight_contexts_fit_without_merging(policy_dir: Path):
    _, plan, d = compile_text(policy_dir, contexts_body(8))
    assert plan is not None
    assert of(d, "PC502") == []
    rv = restricted(plan)
    assert [v["contexts"] for v in rv] == [[f"cr3={0x1000 * (i + 1):#x}"] for i in range(8)]
    report = plan["analyses"]["views"]
    assert report["merges"] == [] and report["extra_trapped_pages"] == 0
    # Nothing is global: CR3 values of no context run in the host view, untouched.
    assert report["default_view"] == 0
    assert [v["pages_restricted"] for v in report["views"]] == [1] * 8


def test_a_global_map_needs_a_view_of_its_own(policy_dir: Path):
    _, plan, d = compile_text(policy_dir, contexts_body(8, with_global=True))
    assert plan is not None
    # 9 distinct maps (the global one and 8 contexts) for 8 views: the cheapest merge is the global view
    # with one context, trapping that context's page for every other CR3 (1 page).
    assert plan["analyses"]["views"]["merges"] == [
        {"contexts": [["*"], ["cr3=0x1000"]], "view": 2, "extra_trapped_pages": 1}]
    assert len(of(d, "PC502")) == 1
    rv = restricted(plan)
    assert rv[0]["contexts"] == ["*", "cr3=0x1000"]
    # Each context view carries the global restriction too.
    assert all("tbl" in [r["region"] for r in v["ranges"]] for v in rv)
    assert plan["analyses"]["views"]["default_view"] == 2


def test_contexts_with_identical_maps_share_a_view_for_free(policy_dir: Path):
    body = "\n".join(f"    rule r{i}: on write to tbl where cr3 == {i + 1} {{ deny }}" for i in range(12))
    _, plan, d = compile_text(policy_dir, "    region tbl = symbol sys_call_table size 8\n" + body)
    assert plan is not None
    assert of(d, "PC502") == []
    rv = restricted(plan)
    assert len(rv) == 1 and len(rv[0]["contexts"]) == 12
    assert rv[0]["ranges"][0]["rules"] == sorted(f"r{i}" for i in range(12))
    assert plan["analyses"]["views"]["conflict_graph"] == {"nodes": 12, "edges": 0, "colours": 1}


def test_without_context_rules_the_layout_is_one_restricted_view(policy_dir: Path):
    _, plan, d = compile_text(policy_dir, "    region tbl = symbol sys_call_table size 8\n"
                                          "    rule t: on write to tbl { deny }")
    assert [(v["id"], v["role"], v.get("contexts")) for v in plan["views"]] == [
        (0, "host", None), (1, "unrestricted", None), (2, "restricted", ["*"])]
    assert plan["analyses"]["views"]["monitors_needed"] == {}
    assert views.context_monitors(plan["views"]) == {}


def test_without_altp2m_all_contexts_share_the_host_map(policy_dir: Path):
    body = ("    region a = symbol sys_call_table size 8\n    region b = symbol init_cred size 8\n"
            "    rule r1: on write to a where ttbr0 == 0x1000 { deny }\n"
            "    rule r2: on write to b where ttbr0 == 0x2000 { deny }")
    _, plan, d = compile_text(policy_dir, body, arch="arm64")
    assert plan is not None
    assert [v["id"] for v in plan["views"]] == [0]
    report = plan["analyses"]["views"]
    assert report["mechanism"] == "host-p2m"
    # Each context traps the other's page (1 + 1); CR3 values of no context trap both (2).
    assert report["merges"] == [{"contexts": [["*"], ["ttbr0=0x1000"], ["ttbr0=0x2000"]], "view": 0,
                                 "extra_trapped_pages": 4}]
    (w,) = of(d, "PC502")
    assert "no altp2m" in w.message and "4 more page(s)" in w.message
    assert report["monitors_needed"] == {}


def test_breakpoint_views_follow_contexts(policy_dir: Path):
    body = contexts_body(2) + "\n    rule bp: on execute symbol commit_creds where cr3 == 0x2000 { log info \"x\" }"
    policy, plan, d = compile_text(policy_dir, body)
    assert plan is not None
    commit_creds = 0xFFFFFFFF810D3BC0
    # The shadow-frame breakpoint belongs to cr3=0x2000's view only.
    assert views.breakpoint_views(policy, plan["views"], commit_creds) == [3]
    assert plan["analyses"]["views"]["views"][1]["breakpoints"] == [hex(commit_creds)]
    assert plan["analyses"]["views"]["views"][0]["breakpoints"] == []


# ---------------------------------------------------------------- (b) conflicts and unreachable rules

def test_allow_and_deny_on_one_target_with_nothing_between_them_is_a_conflict(policy_dir: Path):
    body = ("    region tbl = symbol sys_call_table size 16\n"
            "    region tail = symbol sys_call_table + 8 size 16\n"
            "    rule guard: on write to tbl { deny }\n"
            "    rule open_up: on access to tail { allow }\n"
            "    rule lstar_a: on write msr LSTAR where new != symbol entry_SYSCALL_64 { deny }\n"
            "    rule lstar_b: on write msr LSTAR where new != symbol entry_SYSCALL_64 { allow }")
    _, plan, d = compile_text(policy_dir, body)
    assert plan is None
    errors = of(d, "PC503")
    assert len(errors) == 2 and all(e.severity is Severity.ERROR for e in errors)
    mem, msr = errors
    # At the later rule, naming both with their positions.
    assert (mem.span.line, msr.span.line) == (8, 10)
    assert "'guard' (p.vmi:7:5)" in mem.message and "'open_up' (p.vmi:8:5)" in mem.message
    assert "write of tbl overlaps access of tail" in mem.message
    assert "'lstar_a' (p.vmi:9:5)" in msr.message and "MSR LSTAR" in msr.message
    assert "add a condition" in mem.hint


def test_near_misses_are_not_conflicts(policy_dir: Path):
    body = ("    region kernel_text = symbol _stext .. symbol _etext\n"
            "    region tbl = symbol sys_call_table size 8\n"
            "    region next_door = symbol sys_call_table + 8 size 8\n"
            "    rule patching: on write to tbl where rip in kernel_text { allow }\n"
            "    rule tampering: on write to tbl where rip not in kernel_text { deny }\n"
            "    rule process_a: on write to tbl where cr3 == 1 { allow }\n"
            "    rule process_b: on write to tbl where cr3 == 2 { deny }\n"
            "    rule readers: on read of tbl { allow }\n"          # other access kind than the denies
            "    rule neighbour: on write to next_door { allow }\n"  # same page, other bytes
            "    rule watcher: on write to tbl { log info \"w\" }\n"  # no verdict of its own
            "    rule throttled: on write to next_door { log info \"d\" limit 1 per second then deny }")
    _, plan, d = compile_text(policy_dir, body)
    assert plan is not None, [(x.code, x.message) for x in d]
    assert of(d, "PC503") == [] and of(d, "PC504") == []
    assert plan["analyses"]["conflicts"] == {"conflicts": [], "unreachable": [], "shadowed": []}


def test_the_overlap_sweep_finds_every_interval_that_shares_a_point_with_another():
    from policyc.analyses import conflicts
    rng = random.Random(12)
    for _ in range(500):
        ivs = []
        for _ in range(rng.randint(0, 14)):
            lo = rng.randint(0, 40)
            ivs.append((rng.choice("rw"), rng.choice(["va", "pa"]), lo, lo + rng.randint(1, 8), f"r{rng.randint(0, 9)}"))
        brute = {x[4] for i, x in enumerate(ivs) for j, y in enumerate(ivs)
                 if i != j and x[:2] == y[:2] and max(x[2], y[2]) < min(x[3], y[3])}
        places: dict = {}
        for letter, space, lo, hi, owner in ivs:
            places.setdefault((letter, space), []).append((lo, hi, owner))
        found = set().union(*(conflicts.overlapping_owners(v) for v in places.values()))
        assert found == brute, ivs


def test_conflicts_and_shadowing_are_found_among_many_rules_on_pages_of_their_own(policy_dir: Path):
    # The sweeps consider only rules whose bytes another rule watches: the pairs here are far apart in
    # the policy, with 60 rules on disjoint pages between them.
    lines = [f"    region own{i} = symbol _sdata + {2 * i} * 0x1000 size 0x1000" for i in range(60)]
    lines += ["    region tbl = symbol sys_call_table size 16", "    region tail = symbol sys_call_table + 8 size 8",
              "    rule guard: on write to tbl { deny }", "    rule first_read: on read of tail { deny }"]
    lines += [f"    rule w{i}: on write to own{i} {{ {'deny' if i % 2 else 'allow'} }}" for i in range(60)]
    lines += ["    rule open_up: on write to tail { allow }", "    rule again: on read of tail { deny }"]
    path = write_policy(policy_dir, "\n".join(lines))
    for report in (True, False):
        d = Diagnostics()
        policy = check_policy(path, d)
        assert compile_plan(policy, d, report=report) is None
        assert [(x.code, x.span.line) for x in d.sorted() if x.code in ("PC503", "PC504")] == \
            [("PC503", 129), ("PC504", 130)]
        assert "'again' has no effect" in of(d, "PC504")[0].message


def test_rules_that_can_never_match_are_flagged(policy_dir: Path):
    body = ("    region kernel_text = symbol _stext .. symbol _etext\n"
            "    region tbl = symbol sys_call_table size 8\n"
            "    region creds = symbol init_cred size 8\n"
            "    region gone = symbol? ia32_sys_call_table size 8\n"
            "    rule absent: on write to gone { deny }\n"
            "    rule two_cr3s: on write to tbl where cr3 == 1 and cr3 == 2 { deny }\n"
            "    rule past_the_page: on read of tbl where offset >= 4096 { deny }\n"
            "    rule elsewhere: on write to tbl where gla in creds { deny }\n"
            "    rule outside: on execute symbol commit_creds where rip not in kernel_text { log info \"x\" }\n"
            "    rule both_ways: on write cr0 where set(cr0.WP) and cleared(cr0.WP) { deny }\n"
            "    rule in_and_out: on write to tbl where rip in kernel_text and not (rip in kernel_text) { deny }\n"
            "    rule twice: on write to tbl { deny }\n"
            "    rule again: on write to tbl { deny }")
    _, plan, d = compile_text(policy_dir, body)
    assert plan is not None  # warnings only
    found = {u["rule"]: u["reason"] for u in plan["analyses"]["conflicts"]["unreachable"]}
    assert sorted(found) == ["absent", "both_ways", "elsewhere", "in_and_out", "outside", "past_the_page",
                             "two_cr3s"]
    assert "empty" in found["absent"]
    assert "0x1 and 0x2" in found["two_cr3s"]
    assert "0x0..0xfff" in found["past_the_page"]
    assert plan["analyses"]["conflicts"]["shadowed"] == [
        {"rule": "again", "at": "p.vmi:17:5", "by": ["twice"], "by_at": ["p.vmi:16:5"]}]
    assert len(of(d, "PC504")) == 8
    assert all(w.severity is Severity.WARNING for w in of(d, "PC504"))


def test_reachable_look_alikes_are_not_flagged(policy_dir: Path):
    body = ("    region kernel_text = symbol _stext .. symbol _etext\n"
            "    region tbl = symbol sys_call_table size 8\n"
            "    region same_page = symbol sys_call_table + 0x100 size 8\n"
            "    rule one_cr3: on write to tbl where cr3 == 1 and rip not in kernel_text { deny }\n"
            "    rule in_page: on read of tbl where offset >= 0x360 and offset < 0x368 { deny }\n"
            "    rule neighbour_gla: on write to tbl where gla in same_page { deny }\n"
            "    rule inside: on execute symbol commit_creds where rip in kernel_text { log info \"x\" }\n"
            "    rule wp: on write cr0 where set(cr0.WP) or cleared(cr0.WP) { deny }\n"
            "    rule logs_too: on write to tbl where cr3 == 1 and rip not in kernel_text { deny log info \"y\" }")
    _, plan, d = compile_text(policy_dir, body)
    assert plan is not None
    assert of(d, "PC504") == []


# ---------------------------------------------------------------- (c) livelock

LIVELOCK_BODY = ("    region tbl = symbol sys_call_table size 8\n"
                 "    region creds = symbol init_cred size 8\n"
                 "    rule guard: on write to tbl { deny }\n"
                 "    rule lidt: on write idtr { deny }")


def test_the_compiled_plans_complete_every_access(policy_dir: Path):
    _, plan, d = compile_text(policy_dir, LIVELOCK_BODY)
    assert plan is not None and of(d, "PC505") == []
    assert plan["analyses"]["livelock"]["livelocks"] == []


def test_stepping_into_a_view_that_traps_the_same_access_is_a_livelock(policy_dir: Path):
    policy, plan, _ = compile_text(policy_dir, LIVELOCK_BODY)
    bad = copy.deepcopy(plan)
    # View 1 (where an allowed access is stepped) restricts the very region view 2 traps.
    bad["views"][1]["ranges"] = [{"region": "tbl", "access": "rx", "traps": "w", "rules": ["guard"]}]
    d = Diagnostics()
    result = livelock.analyse(bad, policy, TARGETS["x86_64"], d)
    (found,) = result["livelocks"]
    assert found["rules"] == ["guard"]
    assert found["view"] == 1
    assert found["path"][:2] == ["running in view 2", "view 2: write in tbl"]
    assert found["cycle"][0] == found["cycle"][-1] == "view 1: write in tbl"
    assert "ALTERNATE_P2M+FAST_SINGLESTEP to view 1" in found["cycle"][1]
    (err,) = of(d, "PC505")
    assert err.severity is Severity.ERROR and "view 1" in err.message and "guard" in err.message


def test_an_unrestricted_view_that_restricts_other_pages_is_no_livelock(policy_dir: Path):
    policy, plan, _ = compile_text(policy_dir, LIVELOCK_BODY)
    near = copy.deepcopy(plan)
    near["views"][1]["ranges"] = [{"region": "creds", "access": "rx", "traps": "w", "rules": []}]
    d = Diagnostics()
    assert livelock.analyse(near, policy, TARGETS["x86_64"], d)["livelocks"] == []
    assert of(d, "PC505") == []


def test_livelocks_are_the_same_without_the_report(policy_dir: Path):
    # policyc check leaves out the fault states all of whose answers complete: the livelocks stay.
    policy, plan, _ = compile_text(policy_dir, LIVELOCK_BODY)
    stepping = copy.deepcopy(plan)
    stepping["views"][1]["ranges"] = [{"region": "tbl", "access": "rx", "traps": "w", "rules": ["guard"]}]
    pending = copy.deepcopy(plan)
    pending["responses"]["mem_access"]["deny:write"] = {"flags": []}
    repeating = copy.deepcopy(plan)
    repeating["responses"]["mem_access"]["allow"] = {"flags": []}
    for bad, count in ((plan, 0), (stepping, 1), (pending, 1), (repeating, 1)):
        runs = []
        for report in (True, False):
            d = Diagnostics()
            runs.append((livelock.analyse(bad, policy, TARGETS["x86_64"], d, report=report)["livelocks"],
                         [(x.code, x.span, x.message) for x in d.sorted()]))
        assert runs[0] == runs[1] and len(runs[0][0]) == count


def test_a_descriptor_answer_without_emulate_is_a_livelock(policy_dir: Path, monkeypatch):
    def no_emulate(low):
        out = real(low)
        out["descriptor_access"]["allow"] = {"flags": []}
        return out

    (real,) = [step for section, step in lowering.PASSES if section == "responses"]
    passes = tuple((section, no_emulate if step is real else step) for section, step in lowering.PASSES)
    monkeypatch.setattr(lowering.trap_plan, "PASSES", passes)
    path = write_policy(policy_dir, LIVELOCK_BODY)
    d = Diagnostics()
    policy = check_policy(path, d)
    assert compile_plan(policy, d) is None
    (err,) = of(d, "PC505")
    assert "lidt" in err.message and "descriptor_access idtr:write" in err.message


def test_answers_that_leave_the_access_pending_are_livelocks(policy_dir: Path):
    policy, plan, _ = compile_text(policy_dir, LIVELOCK_BODY)
    # A deny that neither emulates nor injects nor skips re-executes the write forever...
    bad = copy.deepcopy(plan)
    bad["responses"]["mem_access"]["deny:write"] = {"flags": []}
    found = livelock.analyse(bad, policy, TARGETS["x86_64"], None)["livelocks"]
    assert [(f["view"], f["state"]) for f in found] == [(2, "view 2: write in tbl")]
    # ...but only where a deny can happen: in audit mode the deny answer is never given.
    audit = copy.deepcopy(bad)
    audit["policy"]["mode"] = "audit"
    assert livelock.analyse(audit, policy, TARGETS["x86_64"], None)["livelocks"] == []


def test_cpuid_and_inline_breakpoints_need_answers_that_move_on(policy_dir: Path):
    body = ('    rule probe: on cpuid leaf 0x40000000 { log info "p" }\n'
            '    rule creds: on execute symbol commit_creds { log info "c" }')
    policy, plan, d = compile_text(policy_dir, body, arch="x86_64-svm")
    assert plan is not None and plan["analyses"]["livelock"]["livelocks"] == []
    # Xen has run the CPUID but left rip alone: an answer that does not advance it runs CPUID forever.
    bad = copy.deepcopy(plan)
    bad["responses"]["cpuid"]["allow"] = {"flags": []}
    # An inline int3 that is neither restored nor emulated fires again at once.
    bad["responses"]["breakpoint"]["allow"] = {"flags": []}
    found = livelock.analyse(bad, policy, TARGETS["x86_64-svm"], None)["livelocks"]
    assert sorted(f["state"] for f in found) == ["breakpoint bp0 (guest frame)", "cpuid 0x40000000"]
    assert sorted(r for f in found for r in f["rules"]) == ["creds", "probe"]


def test_no_example_policy_livelocks():
    for path in sorted(EXAMPLES.glob("*.vmi")):
        if path.name == "linux-common.vmi":
            continue  # an include-only file
        d = Diagnostics()
        policy = check_policy(path, d)
        assert policy is not None, path.name
        plan = compile_plan(policy, d)
        assert plan is not None, (path.name, [(x.code, x.message) for x in d if x.severity is Severity.ERROR])
        assert plan["analyses"]["livelock"]["livelocks"] == [], path.name


# ---------------------------------------------------------------- (d) collateral

def test_an_eight_byte_region_leaves_most_of_its_page_unclaimed(policy_dir: Path):
    _, plan, d = compile_text(policy_dir, "    region pin = symbol cr4_pinned_bits size 8\n"
                                          "    rule pinning: on write to pin { deny }")
    report = plan["analyses"]["collateral"]
    pin = report["regions"]["pin"]
    assert (pin["pages"], pin["trapped_bytes"], pin["watched_bytes"], pin["unclaimed_bytes"]) == (1, 4096, 8, 4088)
    assert pin["unclaimed_share"] == 0.998046875
    assert pin["partial_runs"] == [{"space": "va", "start": "0xffffffff8241c000", "pages": 1, "trapped_bytes": 4096,
                                    "watched_bytes": 8, "watched_by_access": {"write": 8}}]
    assert report["overall"]["unclaimed_share"] == 0.998046875
    (note,) = of(d, "PC506")
    assert note.severity is Severity.NOTE and "4088 of 4096" in note.message
    # A note, not a warning: it is not copied into the plan's warnings.
    assert all(w["code"] != "PC506" for w in plan["warnings"])


def test_neighbours_on_one_page_claim_each_others_bytes(policy_dir: Path):
    body = ("    region tbl = symbol sys_call_table size 0x800\n"
            "    region before = symbol __start_rodata size 0x360\n"
            "    rule a: on write to tbl { deny }\n"
            "    rule b: on write to before { log info \"w\" }\n"
            "    rule c: on read of tbl { deny }")
    _, plan, d = compile_text(policy_dir, body)
    tbl = plan["analyses"]["collateral"]["regions"]["tbl"]
    # One page (0x...000..0x...fff): writes watched over before+tbl = 0x360 + 0x800 bytes; reads over tbl only.
    # On x86 the read trap traps writes too, which are watched anyway.
    assert tbl["accesses"] == "rw" and tbl["pages"] == 1
    assert tbl["by_access"]["write"]["watched_bytes"] == 0x360 + 0x800
    assert tbl["by_access"]["read"]["watched_bytes"] == 0x800
    assert tbl["trapped_bytes"] == 2 * 4096
    assert tbl["unclaimed_share"] == (2 * 4096 - 0xB60 - 0x800) / (2 * 4096)
    assert all("'tbl'" not in n.message for n in of(d, "PC506"))


def test_a_million_pages_stay_fast(policy_dir: Path):
    body = ("    region physmap = va 0xffff888000000000 size 0x100000000\n"
            "    region tbl = symbol sys_call_table size 8\n"
            "    rule huge: on write to physmap where cr3 == 0x1000 { deny }\n"
            "    rule reads: on read of physmap where cr3 == 0x2000 { deny }\n"
            "    rule t: on write to tbl { deny }")
    started = time.perf_counter()
    _, plan, _ = compile_text(policy_dir, body)
    assert time.perf_counter() - started < 10
    physmap = plan["analyses"]["collateral"]["regions"]["physmap"]
    assert physmap["pages"] == 1 << 20 and physmap["unclaimed_bytes"] == 0
    assert [v["pages_restricted"] for v in plan["analyses"]["views"]["views"]] == [1, (1 << 20) + 1, (1 << 20) + 1]


# ---------------------------------------------------------------- the section as a whole

def test_the_section_is_plain_deterministic_json(policy_dir: Path):
    write_policy(policy_dir, contexts_body(12, with_global=True)
                 + "\n    rule lidt: on write idtr { deny }"
                 + "\n    rule bp: on execute symbol commit_creds where cr3 == 0x3000 { log info \"x\" }")
    env = dict(os.environ)
    outputs = []
    for seed in ("1", "2"):
        env["PYTHONHASHSEED"] = seed
        run = subprocess.run([sys.executable, "-m", "policyc.cli", "compile", str(policy_dir / "p.vmi")],
                             capture_output=True, text=True, env=env, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    plan = json.loads(outputs[0])
    assert plan["analyses"]["order"] == ["views", "conflicts", "livelock", "collateral"]


def test_compiling_twice_gives_identical_plans():
    for path in sorted(EXAMPLES.glob("*.vmi")):
        first, second = [], []
        for out in (first, second):
            d = Diagnostics()
            policy = check_policy(path, d)
            if policy is None:
                break
            out.append(json.dumps(compile_plan(policy, d), sort_keys=True))
        assert first == second, path.name


def test_run_analyses_on_a_plan_reports_every_pass(policy_dir: Path):
    policy, plan, _ = compile_text(policy_dir, LIVELOCK_BODY)
    lowered = lowering.lower(policy, Diagnostics(), TARGETS["x86_64"])
    again = run_analyses(lowered.plan, policy, TARGETS["x86_64"], Diagnostics(), layout=lowered.layout)
    assert again == plan["analyses"] and again["views"]["matches_plan"]
    assert usable_rules(plan) == {"guard", "lidt"}
    assert collateral.analyse(policy, TARGETS["x86_64"], {"lidt"}, None)["regions"] == {}
