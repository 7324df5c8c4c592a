"""The lab's check (tests/lab/dom0_check.py) cannot be fooled: fed results that agree, it passes;
fed each way a live run could go wrong, it fails.

The check runs in the lab's dom0; its comparison is plain functions of the run's figures, so they
are exercised here on results shaped like a real run's (the QEMU tiny guest with the register
policy, and the Bochs Linux guest with linux-kernel-integrity.vmi)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "dom0_check", Path(__file__).resolve().parent / "lab" / "dom0_check.py")
dom0_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dom0_check)


def _benign_landed(n: int) -> dict:
    """The tiny guest's allowed work in a window of n rounds: the unwatched write, the lldt and the
    probe page's write, each landed every round."""
    return {k: v for g in ("unw", "lldt", "acc_wr") for k, v in ((f"{g}_landed", n), (f"{g}_blocked", 0))}


def _tiny_qemu() -> tuple[str, object, dict]:
    kind = dom0_check.GUESTS["tiny"]
    res = {
        "rc": 0, "teardown_clean": True, "exited_before_sigterm": False, "decisions": 1503,
        "policy_rules": ["cr4_guard", "hypervisor_probe", "sysenter_eip"],
        "decisions_by_kind_rule_verdict": {"cpuid/hypervisor_probe/allow": 501, "mov_to_msr/sysenter_eip/deny": 501,
                                           "write_ctrlreg/cr4_guard/deny": 501},
        "decisions_in_window": {"cr4_guard/deny": 480, "hypervisor_probe/allow": 481, "sysenter_eip/deny": 480},
        "guest_delta_whole_run": {"round": 90000, "cr4_landed": 89000, "cr4_blocked": 501, "msr_landed": 89000,
                                  "msr_blocked": 501, "cpuid": 90000, "unw_landed": 90000, "unw_blocked": 0},
        "guest_delta_enforced_window": {"round": 480, "cr4_landed": 0, "cr4_blocked": 480, "msr_landed": 0,
                                        "msr_blocked": 480, "cpuid": 481} | _benign_landed(480),
    }
    return "qemu", kind, res


def _linux_bochs() -> tuple[str, object, dict]:
    kind = dom0_check.GUESTS["linux"]
    res = {
        "rc": 0, "teardown_clean": True, "exited_before_sigterm": False, "decisions": 2805,
        "policy_rules": ["no_exec_rodata", "protect_tables", "smep_smap_guard", "syscall_entry_guard",
                         "trace_creds", "wp_guard"],
        "decisions_by_kind_rule_verdict": {
            "mem_access/protect_tables/deny": 560, "write_ctrlreg/smep_smap_guard/deny": 560,
            "mov_to_msr/syscall_entry_guard/deny": 560, "software_breakpoint/trace_creds/allow": 562,
            "mem_access/None/allow": 560},
        "decisions_in_window": {"None/allow": 526, "protect_tables/deny": 526, "smep_smap_guard/deny": 526,
                                "syscall_entry_guard/deny": 526, "trace_creds/allow": 527},
        "guest_delta_whole_run": {"cr4_blocked": 560, "msr_blocked": 560, "sct_blocked": 560, "creds": 2000},
        "guest_delta_enforced_window": {"cr4_landed": 0, "cr4_blocked": 526, "msr_landed": 0, "msr_blocked": 526,
                                        "sct_landed": 0, "sct_blocked": 526, "benign_landed": 526,
                                        "benign_blocked": 0, "cr4_ok_landed": 526, "cr4_ok_blocked": 0,
                                        "creds": 526, "collateral": 526},
    }
    return "bochs", kind, res


def _tiny_bochs3_strategies() -> tuple[str, object, dict]:
    """The tiny guest under policies/lab-strategies-vmx.vmi: a fed read, an injected #UD, a CR0 refusal."""
    kind = dom0_check.GUESTS["tiny"]
    n, w = 300, 280
    res = {
        "rc": 0, "teardown_clean": True, "exited_before_sigterm": False, "decisions": 7 * n,
        "policy_rules": ["bp_site", "cr0_guard", "cr4_guard", "exec_guard", "secret_read", "sysenter_eip",
                         "watched_write"],
        "decisions_by_kind_rule_verdict": {
            "write_ctrlreg/cr0_guard/deny": n, "write_ctrlreg/cr4_guard/deny": n, "mov_to_msr/sysenter_eip/deny": n,
            "mem_access/watched_write/deny": n, "mem_access/secret_read/deny": n, "mem_access/exec_guard/deny": n,
            "software_breakpoint/bp_site/allow": n},
        "decisions_in_window": {"cr0_guard/deny": w, "cr4_guard/deny": w, "sysenter_eip/deny": w,
                                "watched_write/deny": w, "secret_read/deny": w, "exec_guard/deny": w,
                                "bp_site/allow": w},
        "guest_delta_whole_run": {g: n for g in ("cr0_blocked", "cr4_blocked", "msr_blocked", "wat_blocked",
                                                 "rd_blocked", "exec_blocked")},
        "guest_delta_enforced_window": {"round": w, "bp_passes": w} | _benign_landed(w)
        | {f"{g}_landed": 0 for g in ("cr0", "cr4", "msr", "wat", "rd", "exec")}
        | {f"{g}_blocked": w for g in ("cr0", "cr4", "msr", "wat", "rd", "exec")},
    }
    return "bochs3", kind, res


def _tiny_bochs3_every_strategy() -> tuple[str, object, dict]:
    """The tiny guest under the whole of policies/lab-strategies-vmx.vmi: beside the above, CR3, lgdt and ltr
    refused, descriptor stores and an lldt emulated, guest requests (one rule logs them, the quarantine rule
    pauses the domain once and disarms), every access to the probe page stepped over, bp_site's byte read."""
    mode, kind, res = _tiny_bochs3_strategies()
    n, w = 300, 280
    res["policy_rules"] += ["agent_request", "cr3_guard", "ldt_load", "lgdt_guard", "ltr_guard", "probe_access",
                            "quarantine", "sgdt_probe", "sldt_probe", "str_probe"]
    res["decisions_by_kind_rule_verdict"] |= {
        "write_ctrlreg/cr3_guard/deny": n, "descriptor_access/lgdt_guard/deny": n,
        "descriptor_access/ltr_guard/deny": n, "descriptor_access/sgdt_probe/allow": n,
        "descriptor_access/ldt_load/allow": n, "descriptor_access/sldt_probe/allow": n,
        "descriptor_access/str_probe/allow": n, "guest_request/agent_request/allow": n,
        "guest_request/quarantine/allow": 1, "guest_request/None/allow": 4, "mem_access/probe_access/allow": 3 * n}
    res["decisions_in_window"] |= {"cr3_guard/deny": w, "lgdt_guard/deny": w, "ltr_guard/deny": w,
                                   "sgdt_probe/allow": w, "ldt_load/allow": w, "sldt_probe/allow": w,
                                   "str_probe/allow": w, "agent_request/allow": w, "quarantine/allow": 1,
                                   "probe_access/allow": 3 * w, "None/allow": 3}
    res["guest_delta_whole_run"] |= {"cr3_blocked": n, "lgdt_blocked": n, "ltr_blocked": n, "greq_failed": 0}
    res["guest_delta_enforced_window"] |= {f"{g}_landed": 0 for g in ("cr3", "lgdt", "ltr")} | {
        f"{g}_blocked": w for g in ("cr3", "lgdt", "ltr")} | {
        "sgdt": w, "sldt": w, "str": w, "greq": w, "qreq": 4, "acc": 3 * w, "bp_read_ok": w, "bp_read_bad": 0}
    res["guest_delta_enforced_window"]["int3"] = w
    res["unclaimed_in_window"] = {"guest_request": 3, "mem_access": 2 * w, "software_breakpoint": w}
    res["policy_pauses"] = [{"round": 12, "qreq": 1, "state": "--p---", "wall": 0.0, "unpause_rc": 0}]
    return mode, kind, res


RUNS = {"qemu-tiny": _tiny_qemu, "bochs-linux": _linux_bochs, "bochs3-tiny-strategies": _tiny_bochs3_strategies,
        "bochs3-tiny-every-strategy": _tiny_bochs3_every_strategy}


def _agrees(mode: str, kind: object, res: dict) -> bool:
    return all(c["ok"] is True for c in dom0_check.compare(mode, kind, res).values())


@pytest.mark.parametrize("run", sorted(RUNS))
def test_results_that_agree_pass(run):
    mode, kind, res = RUNS[run]()
    out = dom0_check.compare(mode, kind, res)
    assert all(c["ok"] is True for c in out.values()), out
    # every rule of the policy was compared with something the guest counted
    assert set(res["policy_rules"]) <= set(out)


def _set(path: str, value):
    def alter(res: dict) -> None:
        *keys, last = path.split(".")
        d = res
        for k in keys:
            d = d[k]
        d[last] = value
    return alter


def _bump(path: str, by: int):
    def alter(res: dict) -> None:
        *keys, last = path.split(".")
        d = res
        for k in keys:
            d = d[k]
        d[last] += by
    return alter


def _drop(key: str):
    return lambda res: res.pop(key)


# Each way a live run can go wrong that the old check let through (issue 13), on both runs.
ALTERATIONS = {
    "qemu-tiny": {
        "deny count off by two": _bump("decisions_by_kind_rule_verdict.write_ctrlreg/cr4_guard/deny", 2),
        "a deny lost (the write landed)": _bump("guest_delta_whole_run.msr_blocked", -1),
        "refusals beyond the teardown drop": _bump("guest_delta_whole_run.cr4_blocked", 2),
        "a deny lost at teardown": _bump("decisions_by_kind_rule_verdict.mov_to_msr/sysenter_eip/deny", 1),
        "attacks landed while enforced": _set("guest_delta_enforced_window.cr4_landed", 2),
        "no attempt while enforced": _set("guest_delta_enforced_window.msr_blocked", 0),
        "cpuid decisions short of the guest's": _bump("decisions_in_window.hypervisor_probe/allow", -3),
        "cpuid decisions beyond the guest's": _bump("decisions_in_window.hypervisor_probe/allow", 3),
        "allowed work refused": _set("guest_delta_enforced_window.unw_blocked", 1),
        "allowed work never landed": _set("guest_delta_enforced_window.unw_landed", 0),
        "enforcer exit status 1": _set("rc", 1),
        "teardown not clean": _set("teardown_clean", False),
        "recover was needed": _set("recover", {"rc": 0, "output_tail": []}),
        "killed": _set("killed", True),
        "exited before SIGTERM": _set("exited_before_sigterm", True),
        "no comparison window": _drop("guest_delta_enforced_window"),
        "a rule nothing on the guest counts": lambda r: r["policy_rules"].append("mystery_rule"),
    },
    "bochs3-tiny-strategies": {
        "a fed read answered with the real word": _bump("guest_delta_whole_run.rd_blocked", -1),
        "the real word read while enforced": _set("guest_delta_enforced_window.rd_landed", 2),
        "an injected #UD the guest never took": _bump("guest_delta_whole_run.exec_blocked", -1),
        "the guarded function ran while enforced": _set("guest_delta_enforced_window.exec_landed", 2),
        "a CR0 write landed while enforced": _set("guest_delta_enforced_window.cr0_landed", 2),
        "CR0 refusals beyond the teardown drop": _bump("guest_delta_whole_run.cr0_blocked", 2),
    },
    "bochs3-tiny-every-strategy": {
        "a CR3 write landed while enforced": _set("guest_delta_enforced_window.cr3_landed", 2),
        "an lgdt refusal the guest never took": _bump("guest_delta_whole_run.lgdt_blocked", -1),
        "an ltr landed while enforced": _set("guest_delta_enforced_window.ltr_landed", 2),
        "sgdt decisions short of the guest's": _bump("decisions_in_window.sgdt_probe/allow", -3),
        "an allowed lldt refused": _set("guest_delta_enforced_window.lldt_blocked", 1),
        "an allowed lldt that never landed": _set("guest_delta_enforced_window.lldt_landed", 0),
        "guest requests beyond the guest's": _bump("decisions_in_window.agent_request/allow", 3),
        "a guest request failed": _set("guest_delta_whole_run.greq_failed", 1),
        "quarantine decided again (no disarm)": _bump("decisions_by_kind_rule_verdict.guest_request/quarantine/allow", 1),
        "the pause never seen": _set("policy_pauses", []),
        "paused twice": lambda r: r["policy_pauses"].append(dict(r["policy_pauses"][0])),
        "the unpause failed": _set("policy_pauses", [{"round": 12, "unpause_rc": 1}]),
        "quarantine requests after the disarm not answered": _set("unclaimed_in_window.guest_request", 0),
        "the guest's int3 delivered twice (a re-injection dropped)": _set("unclaimed_in_window.software_breakpoint",
                                                                          2 * 280),
        "the guest's int3 never re-injected": _set("unclaimed_in_window.software_breakpoint", 0),
        "the guest's int3 trapped beyond the first-touch bound": _bump("unclaimed_in_window.software_breakpoint",
                                                                       2 + 3 + 1),
        "the shadow frame leaked the int3": _set("guest_delta_enforced_window.bp_read_bad", 1),
        "bp_site never read while enforced": _set("guest_delta_enforced_window.bp_read_ok", 0),
        "probe accesses short of the guest's": _bump("decisions_in_window.probe_access/allow", -3),
        "the probe write refused": _set("guest_delta_enforced_window.acc_wr_blocked", 1),
    },
    "bochs-linux": {
        "sys_call_table deny count off by one": _bump("guest_delta_whole_run.sct_blocked", 1),
        "breakpoint logged far beyond the guest's calls": _bump("decisions_in_window.trace_creds/allow", 40),
        "breakpoint logged short of the guest's calls": _bump("decisions_in_window.trace_creds/allow", -5),
        "collateral writes not decided": _set("decisions_in_window.None/allow", 0),
        "a never-triggered rule decided": _set("decisions_by_kind_rule_verdict.write_ctrlreg/wp_guard/deny", 1),
        "permitted CR4 write refused": _set("guest_delta_enforced_window.cr4_ok_blocked", 3),
    },
}


@pytest.mark.parametrize("run,name", [(r, n) for r in sorted(ALTERATIONS) for n in sorted(ALTERATIONS[r])])
def test_each_alteration_fails(run, name):
    mode, kind, res = RUNS[run]()
    assert _agrees(mode, kind, copy.deepcopy(res))
    ALTERATIONS[run][name](res)
    out = dom0_check.compare(mode, kind, res)
    failing = {k: c for k, c in out.items() if c["ok"] is not True}
    assert failing, f"{name}: the check passed {out}"
    assert all(c.get("why") for c in failing.values()), failing


def test_one_register_write_dropped_at_teardown_is_the_named_race_and_no_more():
    mode, kind, res = _tiny_qemu()
    res["guest_delta_whole_run"]["msr_blocked"] += 1          # seen live under Bochs 3.0
    assert _agrees(mode, kind, res)
    mode, kind, res = _linux_bochs()
    res["guest_delta_whole_run"]["sct_blocked"] += 1          # a memory write has no such drop
    assert not _agrees(mode, kind, res)


def test_xl_failure_is_not_a_running_domain():
    assert dom0_check.state_ok("-b----") and dom0_check.state_ok("r-----")
    for state in ("? rc=-1", "? rc=1", "--p---", "---s--", "----c-", ""):
        assert not dom0_check.state_ok(state), state


def test_summary_does_not_count_a_skipped_check_or_a_missing_side():
    mode, kind, res = _tiny_qemu()
    result = {"environment": {"import_policyc": "ok", "check_rc": 0},
              "guest_before": {"magic_ok": True, "rounds_per_second": 3000.0},
              "enforce": res, "compare": dom0_check.compare(mode, kind, res), "after_teardown": {"ok": True}}
    s = dom0_check.summarize(result)
    assert s["policyc_check"] and s["verdicts_agree"] and s["guest_runs_after_teardown"]
    assert not s["disagreements"]
    skipped = copy.deepcopy(result)
    skipped["environment"]["check_rc"] = "skipped"
    assert not dom0_check.summarize(skipped)["policyc_check"]
    missing = copy.deepcopy(result)
    missing["after_teardown"] = {"state": "? rc=-1", "ok": False}
    assert not dom0_check.summarize(missing)["guest_runs_after_teardown"]
    broken = copy.deepcopy(result)
    broken["compare"]["hypervisor_probe"]["ok"] = None
    assert not dom0_check.summarize(broken)["verdicts_agree"]


def test_like_for_like_ratio_uses_the_guests_own_count_and_the_median_round():
    def side(rate: float, cpu: float, key: str) -> dict:
        return {key: {"cpuid": rate}, "seconds": 10.0, "cpu_seconds_in_window": cpu}

    rounds = [{"first": "policyc", "policyc": side(450.0, 0.9, "guest_rate_from_first_decision"),
               "xen_access": side(300.0, 0.3, "guest_rate_from_first_event")},
              {"first": "xen_access", "policyc": side(200.0, 0.4, "guest_rate_from_first_decision"),
               "xen_access": side(400.0, 0.4, "guest_rate_from_first_event")},
              {"first": "policyc", "policyc": side(330.0, 0.33, "guest_rate_from_first_decision"),
               "xen_access": side(300.0, 0.3, "guest_rate_from_first_event")}]
    like = dom0_check.summarize({"like_for_like_rounds": rounds})["like_for_like_cpuid"]
    assert [r["ratio"] for r in like["rounds"]] == [1.5, 0.5, 1.1]
    assert like["ratio"] == 1.1                       # the median round, not the first
    assert like["rounds"][0]["policyc_cpu_ms_per_event"] == 0.2      # 0.9 s over 4,500 events
    assert like["rounds"][1]["xen_access_cpu_ms_per_event"] == 0.1
    assert dom0_check.summarize({"like_for_like_rounds": rounds[:2]})["like_for_like_cpuid"]["ratio"] == 1.0
    assert dom0_check.summarize({})["like_for_like_cpuid"] is None


def test_rate_counts_from_the_first_decision():
    times = ["2026-12-06T10:00:00.000000Z", "2026-12-06T10:00:00.500000Z", "2026-12-06T10:00:01.900000Z",
             "2026-12-06T10:00:02.100000Z"]
    decisions = [{"time": t} for t in times]
    # 3 decisions fall within 2 s of the first one
    assert dom0_check.rate_from_first(decisions, 2.0) == 1.5


# =========================================================================== arm64: the split-TLB experiment

_SPEC_ARM64 = importlib.util.spec_from_file_location(
    "dom0_check_arm64", Path(__file__).resolve().parent / "lab" / "dom0_check_arm64.py")
dom0_check_arm64 = importlib.util.module_from_spec(_SPEC_ARM64)
_SPEC_ARM64.loader.exec_module(dom0_check_arm64)

_PROBE = {"probe_gfn": "0x434a5", "probe_va": "0xffff800000d01000"}


def _split_run() -> dict:
    """Shaped like a live run: 700 enforced rounds, each with one refused table write and one trapped
    execute of the probe page, which the guest also read every round."""
    before = {"round": 5000, "sct_blocked": 0, "probe_execs_enforced": 0, "probe_reads_enforced": 0,
              "probe_read_wrong": 0, "probe_exec_wrong": 0}
    after = dict(before, round=6100, sct_blocked=700, probe_execs_enforced=700, probe_reads_enforced=700)
    return {"guest_before": before, "guest_after": after,
            "decisions": {"protect_tables:deny": 700, "probe_exec:allow": 700, "None:allow": 700},
            "exec_watch_events": {"probe_exec": {"access": {"4": 700}, "gfn": {"0x434a5": 700},
                                                 "pc": {"0xffff800000d01000": 700},
                                                 "gla": {"0xffff800000d01000": 700}}}}


def test_the_split_tlb_comparison_passes_when_both_sides_agree() -> None:
    out = dom0_check_arm64.compare_split(_split_run(), _PROBE)
    assert out["ok"] and out["decisions"] == 700 and out["events_not_execute"] == 0, out
    run = _split_run()
    run["decisions"]["probe_exec:allow"] = 699               # the install landed between a round's write and call
    assert dom0_check_arm64.compare_split(run, _PROBE)["ok"]


@pytest.mark.parametrize("spoil", ["execute_missed", "read_reported", "other_frame", "wrong_bytes", "no_rounds",
                                   "denies_differ", "no_after"])
def test_the_split_tlb_comparison_fails_each_way_a_run_can_go_wrong(spoil: str) -> None:
    run = _split_run()
    ev = run["exec_watch_events"]["probe_exec"]
    if spoil == "execute_missed":
        run["decisions"]["probe_exec:allow"] = 690
    elif spoil == "read_reported":                   # a read of the page attributed to the execute watch
        ev["access"] = {"4": 700, "1": 3}
    elif spoil == "other_frame":                     # an execute Xen's data-side walk put on another frame
        ev["gfn"] = {"0x434a5": 698, "0x51000": 2}
    elif spoil == "wrong_bytes":
        run["guest_after"]["probe_read_wrong"] = 1
    elif spoil == "no_rounds":
        run["guest_after"].update(probe_execs_enforced=0, sct_blocked=0)
        run["decisions"] = {"probe_exec:allow": 0, "protect_tables:deny": 0}
    elif spoil == "denies_differ":
        run["decisions"]["protect_tables:deny"] = 701
    elif spoil == "no_after":
        run["guest_after"] = {}
    assert not dom0_check_arm64.compare_split(run, _PROBE)["ok"]


def test_strace_counts_reads_calls_per_system_call():
    table = ("% time     seconds  usecs/call     calls    errors syscall\n"
             "------ ----------- ----------- --------- --------- ----------------\n"
             " 40.00    0.000400          10        40           poll\n"
             " 30.00    0.000300          10        30         2 ioctl\n"
             "------ ----------- ----------- --------- --------- ----------------\n"
             "100.00    0.000700                    70         2 total\n")
    assert dom0_check.strace_counts(table) == {"poll": 40, "ioctl": 30}


# =========================================================================== audit mode

def _audit_run() -> dict:
    """policies/lab-audit-vmx.vmi on the tiny guest: every deny answered as allow, logged as would-deny."""
    n, w = 300, 280
    return {"rc": 0, "teardown_clean": True, "exited_before_sigterm": False, "decisions": 2 * n,
            "policy_rules": ["cr4_guard", "watched_write"],
            "decisions_by_kind_rule_verdict": {"write_ctrlreg/cr4_guard/deny": n, "mem_access/watched_write/deny": n},
            "would_deny": {"cr4_guard": n, "watched_write": n},
            "would_deny_in_window": {"cr4_guard": w, "watched_write": w},
            "guest_delta_whole_run": {"cr4_blocked": 0, "wat_blocked": 0},
            "guest_delta_enforced_window": {"cr4_landed": w + 1, "wat_landed": w}}


def _audit_agrees(res: dict) -> bool:
    out = dom0_check.strategies.compare_audit(res, dom0_check.SAMPLE_EDGE, dom0_check.decision_count,
                                              dom0_check._enforcer_exit(res))
    return all(c["ok"] is True for c in out.values())


AUDIT_ALTERATIONS = {
    "a deny enforced in audit mode": _bump("guest_delta_whole_run.wat_blocked", 1),
    "a deny not marked would-deny": _bump("would_deny.cr4_guard", -1),
    "would-deny short of what landed": _bump("would_deny_in_window.watched_write", -3),
    "would-deny beyond what landed": _bump("would_deny_in_window.cr4_guard", 4),
    "nothing landed": _set("guest_delta_enforced_window.wat_landed", 0),
    "a rule the guest has no counter for": lambda r: r["policy_rules"].append("mystery_rule"),
    "teardown not clean": _set("teardown_clean", False),
    "no window": _drop("guest_delta_enforced_window"),
}


def test_audit_results_that_agree_pass():
    assert _audit_agrees(_audit_run())


@pytest.mark.parametrize("name", sorted(AUDIT_ALTERATIONS))
def test_each_audit_alteration_fails(name):
    res = _audit_run()
    AUDIT_ALTERATIONS[name](res)
    assert not _audit_agrees(res), name


def test_summary_counts_the_audit_run():
    mode, kind, res = _tiny_qemu()
    audit = _audit_run()
    result = {"environment": {"import_policyc": "ok", "check_rc": 0},
              "guest_before": {"magic_ok": True, "rounds_per_second": 30.0}, "enforce": res,
              "compare": dom0_check.compare(mode, kind, res), "after_teardown": {"ok": True},
              "compare_audit": dom0_check.strategies.compare_audit(audit, 2, dom0_check.decision_count,
                                                                   dom0_check._enforcer_exit(audit)),
              "after_audit": {"ok": True}}
    assert dom0_check.summarize(result)["verdicts_agree"]
    audit["guest_delta_whole_run"]["cr4_blocked"] = 1
    result["compare_audit"] = dom0_check.strategies.compare_audit(audit, 2, dom0_check.decision_count,
                                                                  dom0_check._enforcer_exit(audit))
    s = dom0_check.summarize(result)
    assert not s["verdicts_agree"] and "audit:cr4_guard" in s["disagreements"]
    result["compare_audit"]["cr4_guard"]["ok"] = True
    result["after_audit"] = {"ok": False}
    assert not dom0_check.summarize(result)["guest_runs_after_teardown"]


def test_the_pause_watch_unpauses_only_a_stopped_paused_guest_after_install():
    calls = []
    states = {"now": "--p---"}
    watch = dom0_check.strategies.PauseWatch(7, lambda d: states["now"], lambda cmd: calls.append(cmd) or (0, ""))
    still = [{"round": 5, "wall": 1.0, "qreq": 1}, {"round": 5, "wall": 1.25, "qreq": 1}]
    watch(still, in_place=False)                     # installing: the enforcer's own pause
    watch([still[0], dict(still[1], round=6)], in_place=True)   # the guest moves: not paused
    states["now"] = "? rc=1"
    watch(still, in_place=True)                      # `xl list` failed: not read as paused
    assert calls == [] and watch.seen == []
    states["now"] = "--p---"
    watch(still, in_place=True)
    assert calls == [["xl", "unpause", "7"]] and watch.seen[0]["qreq"] == 1


def test_the_first_touch_of_a_fresh_view_is_the_named_bound_and_no_more():
    mode, kind, res = _tiny_bochs3_every_strategy()
    res["unclaimed_in_window"]["software_breakpoint"] += dom0_check.SAMPLE_EDGE + dom0_check.DELIVERY_FIRST_TOUCH
    assert _agrees(mode, kind, res)           # seen live: 243 events against 240 int3
    res["unclaimed_in_window"]["software_breakpoint"] = res["guest_delta_enforced_window"]["int3"] - 3
    assert not _agrees(mode, kind, res)       # fewer events than int3 is never a first touch


def test_decision_facts_count_would_deny_limited_and_unclaimed_in_and_out_of_the_window():
    t_in, t_out = "2026-12-07T10:00:01Z", "2026-12-07T09:00:00Z"
    decisions = [
        {"time": t_in, "kind": "cpuid", "rule": "hypervisor_probe", "limited": ["hypervisor_probe"]},
        {"time": t_in, "kind": "write_ctrlreg", "rule": "cr4_guard", "would_deny": True},
        {"time": t_out, "kind": "write_ctrlreg", "rule": "cr4_guard", "would_deny": True},
        {"time": t_in, "kind": "software_breakpoint", "rule": None, "event": {"rip": "0x100153", "gfn": "0x100"},
         "response": "not_ours", "effects": [{"kind": "inject"}]},
        {"time": t_in, "kind": "mem_access", "rule": None, "event": {"rip": "0x100397", "gfn": "0x100", "access": 1}},
        {"record": "effect_error", "time": t_in}]
    start = dom0_check._epoch("2026-12-07T10:00:00Z")
    facts = dom0_check.strategies.decision_facts(decisions, start, start + 10, dom0_check._epoch)
    assert facts["would_deny"] == {"cr4_guard": 2} and facts["would_deny_in_window"] == {"cr4_guard": 1}
    assert facts["limited"] == {"hypervisor_probe": 1}
    assert facts["unclaimed_in_window"] == {"software_breakpoint": 1, "mem_access": 1}
    assert facts["unclaimed_memory"] == {"gfn=0x100 access=1 rip=0x100397": 1}
    assert facts["log_records"] == {"effect_error": 1}
    assert facts["sequence_sample"][0] == "cpuid/hypervisor_probe/None/None" and len(facts["sequence_sample"]) == 4


# =========================================================================== the remap run (dom0_remap.py)

_RSPEC = importlib.util.spec_from_file_location(
    "dom0_remap", Path(__file__).resolve().parent / "lab" / "dom0_remap.py")
dom0_remap = importlib.util.module_from_spec(_RSPEC)
_RSPEC.loader.exec_module(dom0_remap)


def _remap_run(pre: int = 32, post: int = 200) -> tuple[dict, dict, list[dict], dict]:
    """A remap run that agrees: `pre` writes refused on frame A (gfn 0x206), the remap's page-table write
    followed (one rebind record), `post` refused on frame B (gfn 0x207), frame A's own writes landing."""
    first = {"frame_a": 0x206000, "frame_b": 0x207000}
    deny = {"kind": "mem_access", "rule": "watched_write", "verdict": "deny"}
    decisions = [dict(deny, event={"gfn": "0x206"}) for _ in range(pre)]
    decisions.append({"kind": "mem_access", "rule": None, "verdict": "allow", "event": {"gfn": "0x205"},
                      "response_flags": ["VCPU_PAUSED", "ALTERNATE_P2M", "TOGGLE_SINGLESTEP"]})
    decisions.append({"kind": "singlestep", "rule": None, "verdict": "allow", "event": {"gfn": "0x100"}})
    decisions.append({"record": "rebind", "gfn": "0x205", "offset": 0,
                      "regions": {"watched": {"from": ["0x206"], "to": ["0x207"]}}})
    decisions += [dict(deny, event={"gfn": "0x207"}) for _ in range(post)]
    enf = {"rc": 0, "teardown_clean": True, "decisions": len(decisions), "window": {"seconds": 8.0},
           "guest_delta_whole_run": {"round": 9000, "pre_landed": 8000, "pre_blocked": pre, "post_landed": 0,
                                     "post_blocked": post, "alias_landed": post, "alias_blocked": 0, "remapped": 1},
           "guest_delta_enforced_window": {"round": pre + post, "pre_landed": 0, "pre_blocked": pre,
                                           "post_landed": 0, "post_blocked": post, "alias_landed": post,
                                           "alias_blocked": 0, "remapped": 1}}
    return first, enf, decisions, {"ok": True}


def _remap_verdict(first: dict, enf: dict, decisions: list[dict], aft: dict) -> dict:
    return dom0_remap.compare(first, enf, dom0_remap.log_facts(decisions), aft)


def test_the_remap_check_passes_a_run_that_agrees_and_counts_each_side():
    c = _remap_verdict(*_remap_run())
    assert c["ok"], c
    assert c["counts"]["denies_frame_a"] == 32 and c["counts"]["denies_frame_b"] == 200
    assert c["counts"]["rebinds"] == 1


@pytest.mark.parametrize("spoil", ["landed_after_remap", "deny_lost_on_b", "no_rebind", "frame_a_kept",
                                   "no_remap_while_enforced", "teardown"])
def test_the_remap_check_fails_each_way_the_follow_could_go_wrong(spoil):
    first, enf, decisions, aft = _remap_run()
    win, whole = enf["guest_delta_enforced_window"], enf["guest_delta_whole_run"]
    if spoil == "landed_after_remap":          # a write through the address landed on frame B, unwatched
        win["post_landed"] = whole["post_landed"] = 1
    elif spoil == "deny_lost_on_b":
        decisions.pop()
    elif spoil == "no_rebind":
        decisions = [d for d in decisions if d.get("record") != "rebind"]
    elif spoil == "frame_a_kept":              # frame A still watched: its own writes refused
        whole["alias_blocked"] = 5
    elif spoil == "no_remap_while_enforced":
        win["remapped"] = 0
    else:
        enf["teardown_clean"] = False
    assert not _remap_verdict(first, enf, decisions, aft)["ok"]
