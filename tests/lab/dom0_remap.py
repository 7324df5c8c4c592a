"""The lab's page-table remap run, in the Bochs 3.0 boot after tests/lab/dom0_check.py (tests/lab/init.sh):

    python3 dom0_remap.py --domid D --policy lab-remap-vmx.vmi [--seconds N]

The long-mode guest (tests/lab/guest/labguest64.S) writes through one virtual address every round; the
policy (policies/lab-remap-vmx.vmi) denies writes to that address's page, bound through the guest's own
4-level page tables. Once enough writes were refused the guest remaps the address to another frame
(only the leaf entry changes) and writes on through it. `policyc run` must follow the remap: its
decision log has a `rebind` record moving the region from frame A to frame B, every write through the
address is refused on either frame (the guest's counts against the log's denies per frame), none
lands while enforced, and frame A, no longer the address's, takes the guest's writes again.

Prints `LAB remap_summary {...}` and the whole result as `LAB-REMAP i/n PART` lines (tests/test_lab.py
reads them from the console log). Only the standard library and policyc (it runs in the lab's dom0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # beside it in dom0 (/lab) and in tests/lab
import dom0_check as check  # noqa: E402

# tests/lab/guest/labguest64.S's report page (gfn 0x200, u32 each): counters first, then what it never
# changes (its fault word, there being no IDT to write it, and the addresses it works with).
REMAP_GUEST = check.GuestKind(
    "labguest64", ("magic", "round", "pre_landed", "pre_blocked", "post_landed", "post_blocked", "alias_landed",
                   "alias_blocked", "remapped", "remap_round", "fault", "va", "frame_a", "frame_b", "pt_v"),
    counters=10, magic=0x34364C50, no_fault=0xFFFFFFFF, denies={}, memory_deny=("watched_write", "pre"),
    benign=(), counted={})
RULE = "watched_write"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--seconds", type=float, default=8, help="seconds enforced from the first decision")
    ap.add_argument("--startup", type=float, default=300, help="seconds allowed until the first decision")
    a = ap.parse_args()
    result: dict = {"domid": a.domid}
    try:
        page = check.ReportPage(a.domid, check.TINY_REPORT_GFN, REMAP_GUEST)
        first = page.read()
    except Exception as e:  # record, go on: the comparison then fails
        result["error"] = f"{type(e).__name__}: {e}"
        page, first = None, {}
    result["guest_before"] = {"magic_ok": first.get("magic") == REMAP_GUEST.magic, "report": first,
                              "state": check.domain_state(a.domid)}
    check.emit("remap_guest", result["guest_before"])
    # the binding has no symbols to find a slide with, and the guest has no KASLR: the operator says 0
    enf = check.step_enforce(a.policy, a.domid, a.seconds, page, a.startup, extra=("--slide", "0"))
    enf.pop("sequence_sample", None)
    result["enforce"] = enf
    decisions = check.read_decisions(check.DECISION_LOG)
    result["log"] = log_facts(decisions)
    result["after_teardown"] = after_teardown(a.domid, page)
    result["compare"] = compare(first, enf, result["log"], result["after_teardown"])
    check.emit("remap_summary", {k: result["compare"][k] for k in ("ok", "why", "counts") if k in result["compare"]})
    check.print_parts("LAB-REMAP", json.dumps(result, sort_keys=True), check.RESULT_PACE)
    return 0


def log_facts(decisions: list[dict]) -> dict:
    """From the decision log: the rule's denies per frame, the rebind records, the memory accesses no rule
    claimed (the remap's page-table write among them) and the other decisions by kind/rule/verdict."""
    denies, others = collections.Counter(), collections.Counter()
    rebinds, pt_writes = [], []
    for d in decisions:
        if "record" in d:
            if d["record"] == "rebind":
                rebinds.append({k: d.get(k) for k in ("time", "gfn", "offset", "regions", "pt_added")})
            else:
                others[f"record:{d['record']}"] += 1
            continue
        ev = d.get("event") or {}
        gfn = _int(ev.get("gfn"))
        if d.get("rule") == RULE and d.get("verdict") == "deny":
            denies[gfn] += 1
        elif d.get("rule") is None and d.get("kind") == "mem_access":      # the remap's page-table write
            pt_writes.append({"time": d.get("time"), "gfn": ev.get("gfn"), "offset": ev.get("offset"),
                              "gla": ev.get("gla"), "response_flags": d.get("response_flags")})
        else:
            others[f"{d.get('kind')}/{d.get('rule')}/{d.get('verdict')}"] += 1
    return {"denies_by_gfn": {hex(g) if g is not None else "none": n for g, n in sorted(denies.items(), key=str)},
            "rebinds": rebinds, "unclaimed_writes": pt_writes[:8], "unclaimed_write_count": len(pt_writes),
            "other": dict(others)}


def after_teardown(domid: int, page: check.ReportPage | None) -> dict:
    """The guest runs on with nothing watched: its writes through the address land again."""
    res: dict = {"state": check.domain_state(domid)}
    if page is None:
        return res | {"ok": False}
    a = page.read()
    time.sleep(2.0)
    b = page.read()
    res["delta"] = d = page.delta(a, b)
    res["ok"] = d["round"] > 0 and d["post_landed"] > 0 and not d["post_blocked"] and check.state_ok(res["state"])
    return res


def compare(first: dict, enf: dict, log: dict, aft: dict) -> dict:
    """Both sides: each write through the address refused by a deny on the frame it then mapped, none
    landed while enforced, the rebind moved the region from A to B once, frame A released."""
    whole, win = enf.get("guest_delta_whole_run") or {}, enf.get("guest_delta_enforced_window") or {}
    fa, fb = first.get("frame_a", 0) >> 12, first.get("frame_b", 0) >> 12
    by_gfn = log["denies_by_gfn"]
    counts = {"denies_frame_a": by_gfn.get(hex(fa), 0), "guest_refused_before_remap": whole.get("pre_blocked"),
              "denies_frame_b": by_gfn.get(hex(fb), 0), "guest_refused_after_remap": whole.get("post_blocked"),
              "landed_while_enforced_before_remap": win.get("pre_landed"),
              "landed_while_enforced_after_remap": win.get("post_landed"),
              "frame_a_writes_landed_after_remap": win.get("alias_landed"),
              "frame_a_writes_refused_after_remap": whole.get("alias_blocked"),
              "rebinds": len(log["rebinds"]), "remapped_in_window": win.get("remapped"),
              "teardown_clean": enf.get("teardown_clean"), "rc": enf.get("rc"),
              "window_seconds": (enf.get("window") or {}).get("seconds"), "decisions": enf.get("decisions")}
    why = []
    if not whole or not win:
        why.append("no comparison window (the enforcer made no decision, or exited early)")
    else:
        if counts["denies_frame_a"] != whole["pre_blocked"] or not whole["pre_blocked"]:
            why.append(f"{counts['denies_frame_a']} denies on frame A against {whole['pre_blocked']} refusals "
                       "before the remap")
        if counts["denies_frame_b"] != whole["post_blocked"] or not whole["post_blocked"]:
            why.append(f"{counts['denies_frame_b']} denies on frame B against {whole['post_blocked']} refusals "
                       "after the remap")
        if win["pre_landed"] > check.INSTALL_EDGE:
            why.append(f"{win['pre_landed']} writes landed on frame A while enforced")
        if win["post_landed"]:
            why.append(f"{win['post_landed']} writes through the remapped address landed while enforced")
        if win["remapped"] != 1:
            why.append("the guest did not remap while enforced")
        if not win["alias_landed"] or whole["alias_blocked"]:
            why.append(f"frame A after the remap: {win['alias_landed']} writes landed, {whole['alias_blocked']} "
                       "refused (it should be released)")
    moved = [r["regions"].get("watched") for r in log["rebinds"] if "watched" in (r.get("regions") or {})]
    if moved != [{"from": [hex(fa)], "to": [hex(fb)]}]:
        why.append(f"rebind records {moved}: one moving the region from {hex(fa)} to {hex(fb)} expected")
    if enf.get("rc") != 0 or not enf.get("teardown_clean"):
        why.append(f"enforcer rc {enf.get('rc')}, teardown clean {enf.get('teardown_clean')}")
    if not aft.get("ok"):
        why.append("after teardown the guest's writes did not land again")
    out = {"ok": not why, "counts": counts}
    if why:
        out["why"] = "; ".join(why)
    return out


def _int(v: object) -> int | None:
    """A decision log's number (hex text, or an int)."""
    if isinstance(v, int):
        return v
    try:
        return int(str(v), 0)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
