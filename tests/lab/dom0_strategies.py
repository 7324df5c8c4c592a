"""The parts of the lab's check (tests/lab/dom0_check.py) that the x86_64 strategies policy needs beyond
a deny or a counted instruction: the policy's `pause` (the check is the operator who unpauses), its
`disarm` (the rule fires once, later events go unclaimed), the breakpoint's shadow frame (the guest reads
its own code and must see the original bytes), audit mode's would-deny (policies/lab-audit-vmx.vmi, a
second run in the same boot) and, from the decision log, what no rule claimed and where.

Plain functions of the run's figures, so tests/test_lab_check.py can feed them altered results. Only the
standard library (it runs in the lab's dom0).
"""

from __future__ import annotations

import collections
from typing import Callable

# The audit policy's deny rules and the guest counters of the attacks they would deny
# (policies/lab-audit-vmx.vmi against tests/lab/guest/labguest.S).
AUDIT_PAIRS = {"watched_write": "wat", "cr4_guard": "cr4"}
# Decisions the run's sequence sample keeps (from the first one in the comparison window): two or three
# rounds of the tiny guest, to read which event follows which.
SEQUENCE_SAMPLE = 80


class PauseWatch:
    """The policy's `pause` action leaves the domain paused for an operator; here the check is that
    operator. Once protection is in place (the enforcer pauses the domain only while installing and
    tearing down), a guest whose round counter stood still between two samples while `xl list` shows the
    domain paused was paused by the policy: recorded with the guest's counters, then unpaused."""

    def __init__(self, domid: int, state: Callable[[int], str], run: Callable[[list[str]], tuple[int, str]]) -> None:
        self.domid, self.state, self.run = domid, state, run
        self.seen: list[dict] = []

    def __call__(self, samples: list[dict], in_place: bool) -> None:
        if not in_place or len(samples) < 2 or samples[-1]["round"] != samples[-2]["round"]:
            return
        state = self.state(self.domid)
        if state.startswith("?") or "p" not in state:
            return
        rc, out = self.run(["xl", "unpause", str(self.domid)])
        self.seen.append({"round": samples[-1]["round"], "qreq": samples[-1].get("qreq"), "state": state,
                          "wall": samples[-1]["wall"], "unpause_rc": rc, "unpause_output": out.strip()[-200:]})


def decision_facts(decisions: list[dict], start: float, end: float, epoch: Callable[[str | None], float]) -> dict:
    """From the decision log: would-deny decisions per rule (the whole run and the window start..end), the
    decisions past a rule's `limit` per rule, the
    decisions no rule claimed per kind (the same two), the unclaimed ones that are not memory accesses by
    kind, address and response, the log's other records by kind, and a sample of the sequence of
    decisions from the window's start (kind/rule/rip/response)."""
    would, would_win = collections.Counter(), collections.Counter()
    unclaimed, unclaimed_win, limited = collections.Counter(), collections.Counter(), collections.Counter()
    where, records, pages = collections.Counter(), collections.Counter(), collections.Counter()
    sequence: list[str] = []
    for d in decisions:
        if "record" in d:
            records[d["record"]] += 1
            continue
        rule, kind, ev = d.get("rule"), d.get("kind"), d.get("event") or {}
        in_win = start <= epoch(d.get("time")) <= end
        if d.get("limited"):         # past a rule's `limit`: its `then` ran instead
            limited[rule] += 1
        if d.get("would_deny"):
            would[rule] += 1
            would_win[rule] += in_win
        if rule is None:
            unclaimed[kind] += 1
            unclaimed_win[kind] += in_win
            if kind == "mem_access":
                pages[f"gfn={ev.get('gfn')} access={ev.get('access')} rip={ev.get('rip')}"] += 1
            else:
                where[f"{kind} rip={ev.get('rip')} gfn={ev.get('gfn')} response={d.get('response')} "
                      f"effects={[e.get('kind') for e in d.get('effects') or ()]}"] += 1
        if in_win and len(sequence) < SEQUENCE_SAMPLE:
            sequence.append(f"{kind}/{rule}/{ev.get('rip')}/{d.get('response')}")
    return {"would_deny": dict(would), "would_deny_in_window": dict(would_win),
            "unclaimed": dict(unclaimed), "unclaimed_in_window": dict(unclaimed_win),
            "unclaimed_not_memory": dict(where.most_common(12)), "unclaimed_memory": dict(pages.most_common(12)),
            "log_records": dict(records), "limited": dict(limited),
            "sequence_sample": sequence}


def compare_more(mode: str, res: dict, win: dict, whole: dict, in_win: dict, edge: int,
                 count: Callable[[dict, str], int], first_touch: int = 0) -> dict:
    """The verdicts `compare` cannot give rule by rule: the quarantine rule (`pause` then `disarm`), the
    breakpoint's shadow frame as the guest reads it, and the guest's hypercalls. Each entry has `ok`."""
    out: dict = {}
    rules = res.get("policy_rules", ())
    if "quarantine" in rules and "qreq" in win:
        out["quarantine"] = _quarantine(res, win, in_win, edge, count)
    if "bp_site" in rules and "bp_read_ok" in win:
        out["bp_site_read"] = _bp_read(mode, win)
    if "bp_site" in rules and "int3" in win:
        out["guest_int3"] = _guest_int3(res, win, edge, first_touch)
    if "greq_failed" in whole and any(r in rules for r in ("agent_request", "quarantine")):
        c = {"guest_requests_failed": whole["greq_failed"]}
        out["guest_request_calls"] = _verdict(c, [f"{whole['greq_failed']} guest requests failed (the hypercall "
                                                  "returned an error)"] * bool(whole["greq_failed"]))
    return out


def _quarantine(res: dict, win: dict, in_win: dict, edge: int, count: Callable[[dict, str], int]) -> dict:
    """`pause` then `disarm`: one decision in the whole run, the check found the domain paused once (and
    unpaused it), and each quarantine request after it was answered with no rule."""
    decided = count(res, "quarantine")
    pauses = res.get("policy_pauses", [])
    in_window = sum(n for k, n in in_win.items() if k.split("/")[0] == "quarantine")
    after = res.get("unclaimed_in_window", {}).get("guest_request", 0)
    expected = win["qreq"] - in_window
    c = {"decisions": decided, "pauses_seen": len(pauses), "guest_requests_in_window": win["qreq"],
         "unclaimed_requests_in_window": after}
    why = []
    if decided != 1:
        why.append(f"{decided} decisions: `disarm` should leave exactly one")
    if len(pauses) != 1 or any(p.get("unpause_rc") != 0 for p in pauses):
        why.append(f"the domain was found paused by the policy {len(pauses)} times (once expected, and unpaused)")
    if not expected - edge <= after <= expected + edge:
        why.append(f"{after} quarantine requests answered with no rule in the window against {expected} the "
                   f"guest made after the disarm (SAMPLE_EDGE {edge})")
    if win["qreq"] == 0:
        why.append("the guest made no quarantine request while enforced")
    return _verdict(c, why)


def _guest_int3(res: dict, win: dict, edge: int, first_touch: int) -> dict:
    """The guest's own int3 (one a round; its #BP handler counts it): while the breakpoint monitor is on,
    Xen swallows the #BP and sends it as a software_breakpoint no rule claims, which the enforcer
    re-injects. One such event per int3 the guest's handler counted: a re-injection Xen dropped would
    make the guest run its int3 again (two events, one count), a lost one would leave it uncounted. The
    only extra events allowed are `first_touch` (DELIVERY_FIRST_TOUCH in dom0_check.py), once per page
    the #BP's delivery touches first in a freshly installed view."""
    events = res.get("unclaimed_in_window", {}).get("software_breakpoint", 0)
    c = {"unclaimed_breakpoints_in_window": events, "guest_int3_in_window": win["int3"]}
    why = [f"{events} breakpoint events no rule claims in the window against {win['int3']} int3 the guest's "
           f"handler counted (SAMPLE_EDGE {edge}, DELIVERY_FIRST_TOUCH {first_touch})"] * (
        not win["int3"] - edge <= events <= win["int3"] + edge + first_touch)
    return _verdict(c, why + ["the guest ran no int3 while enforced"] * (not win["int3"]))


def _bp_read(mode: str, win: dict) -> dict:
    """The guest reads its own code at bp_site while the breakpoint fires: in a shadow frame (x86_64)
    it sees the original byte every time; planted inline (Bochs 2.7's x86_64-nomtf) it sees 0xCC, the
    weakness the compiler warns of (PC501)."""
    ok, bad = win["bp_read_ok"], win["bp_read_bad"]
    c = {"original_bytes_read": ok, "breakpoint_read": bad}
    if mode == "bochs":
        why = [f"the inline breakpoint was not seen by {ok} reads"] * bool(ok) + ["no read while enforced"] * (not bad)
        return _verdict(c, why)
    why = [f"{bad} reads saw the breakpoint byte: the shadow frame leaked"] * bool(bad) + \
          ["no read while enforced"] * (not ok)
    return _verdict(c, why)


def compare_audit(res: dict, edge: int, count: Callable[[dict, str, str | None], int],
                  enforcer: dict) -> dict:
    """The audit-mode run: each deny rule's decisions are all would-deny, as many in the window as the
    attacks the guest saw land in it (within SAMPLE_EDGE), and the guest saw no refusal in the whole run."""
    out: dict = {"enforcer": enforcer}
    win, whole = res.get("guest_delta_enforced_window"), res.get("guest_delta_whole_run")
    if not (win and whole and res.get("decisions")):
        out["sides"] = {"ok": False, "why": "no comparison window for the audit run"}
        return out
    would, would_win = res.get("would_deny", {}), res.get("would_deny_in_window", {})
    for rule in res.get("policy_rules", ()):
        g = AUDIT_PAIRS.get(rule)
        if g is None:
            out[rule] = {"ok": False, "why": "no guest-side counterpart for this audit rule"}
            continue
        denies = count(res, rule, "deny")
        c = {"deny_decisions": denies, "would_deny": would.get(rule, 0), "would_deny_in_window": would_win.get(rule, 0),
             "guest_landed_in_window": win[f"{g}_landed"], "guest_blocked_whole_run": whole[f"{g}_blocked"]}
        why = []
        if denies != would.get(rule, 0):
            why.append(f"{denies} deny decisions but {would.get(rule, 0)} would-deny: audit mode enforced some")
        if abs(would_win.get(rule, 0) - win[f"{g}_landed"]) > edge:
            why.append(f"{would_win.get(rule, 0)} would-deny in the window against {win[f'{g}_landed']} attacks "
                       f"the guest saw land (SAMPLE_EDGE {edge})")
        if whole[f"{g}_blocked"]:
            why.append(f"the guest saw {whole[f'{g}_blocked']} refusals: audit mode refused")
        if not win[f"{g}_landed"]:
            why.append("no attack landed in the window")
        out[rule] = _verdict(c, why)
    return out


def _verdict(c: dict, why: list[str]) -> dict:
    c["ok"] = not why
    if why:
        c["why"] = "; ".join(why)
    return c
