"""The back end: a checked `Policy` lowered for one target into a trap plan.

Passes, in order (`PASSES`, at the end of this module, is the order as data):

1. `check_capabilities`  every rule against the target: an error names the rule,
                         the target, the missing capability and what works
                         instead; a weakness is a warning
2. `describe_regions`    regions as symbolic extents with their page counts
3. `layout_views`        altp2m views (x86_64) or the host p2m alone
4. `enable_monitors`     monitor_op settings, CR bitmasks folded from conditions
5. `place_breakpoints`   breakpoint sites and how each is planted
6. `build_dispatch`      per-trigger tables of rules, conditions in plan form
7. `lower_responses`     verdicts -> response flags, per trigger, target, mode

The plan is plain JSON data (see `policyc.plan` for its schema, hashing and
serialisation); this module only decides what goes in it. `policyc.compiler` runs these
passes, then the analyses (`policyc.analyses`), then seals the plan.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..version import __version__
from .. import model as M
from ..arch import EXCEPTION_VECTORS
from ..diagnostics import Diagnostics, Span
from ..plan_expr import compile_condition
from ..targets import TargetInfo
from .views import VIEW_HOST, VIEW_RESTRICTED, VIEW_UNRESTRICTED, Layout, allowed_access, breakpoint_views, \
    context_monitors, layout

__all__ = ["Lowering", "PASSES", "PLAN_FORMAT", "PLAN_VERSION", "lower"]

PLAN_FORMAT = "policyc.trap-plan"
# 2: the collateral analysis lists partially watched pages as runs (partial_runs), not page by page.
PLAN_VERSION = 2
PAGE = 4096

_TRAPS = {"read": "r", "write": "w", "execute": "x", "access": "rwx"}


@dataclass
class Lowering:
    """What the passes share: the policy and target, what earlier passes decided, and the plan."""
    policy: M.Policy
    target: TargetInfo
    d: Diagnostics
    strategies: dict[str, str] = field(default_factory=dict)
    unusable: set[str] = field(default_factory=set)  # rules that cannot be lowered

    relative: dict[str, str] = field(default_factory=dict)  # source file -> as the plan names it
    layout: Layout | None = None  # the view layout `layout_views` made: the analyses report it
    report: bool = True  # compile_plan(report=False): no figures nothing is made from
    plan: dict = field(default_factory=dict)  # the sections the passes made, once `lower` has run them

    def at(self, span: Span) -> str:
        """A source position relative to the root policy's folder: plans must not depend on the cwd."""
        shown = self.relative.get(span.file)
        if shown is None:
            root = os.path.dirname(self.policy.files[0]) if self.policy.files else ""
            shown = self.relative[span.file] = os.path.relpath(span.file, root or ".")
        return f"{shown}:{span.line}:{span.col}"


def lower(policy: M.Policy, diagnostics: Diagnostics, target: TargetInfo, *, sealed: bool = True,
          report: bool = True) -> Lowering:
    """Run the lowering's passes (`PASSES`, in order) for one target: `Lowering.plan` is the trap plan
    without its analyses, warnings and seal (`policyc.compiler.compile_plan` adds those). Errors go to
    `diagnostics`; the caller decides from them whether the plan is kept.

    `sealed=False` leaves the policy hash out (`policyc check` throws the plan away); `report=False`
    leaves out figures no diagnostic is made from."""
    low = Lowering(policy, target, diagnostics, report=report)
    low.plan = {
        "plan_format": PLAN_FORMAT,
        "plan_version": PLAN_VERSION,
        "compiler": f"policyc {__version__}",
        "target": {"hypervisor": "xen", "min_version": ".".join(map(str, policy.target.min_version)),
                   "arch": target.name, "description": target.description,
                   "max_views": target.max_views},
        "policy": {"name": policy.name, "hash": "sha256:" + policy.content_hash() if sealed else None,
                   "mode": policy.mode,
                   "symbols": [{"name": s.name, "sha256": s.sha256} for s in policy.symbols]},
    }
    for section, step in PASSES:
        made = step(low)
        if section is not None:
            low.plan[section] = made
    low.plan["strategies"] = dict(sorted(low.strategies.items()))
    low.plan["rules"] = {r.name: _rule_summary(r, low) for r in policy.rules}
    return low


# ---------------------------------------------------------------- 1. capabilities

def check_capabilities(low: Lowering) -> None:
    t = low.target
    for rule in low.policy.rules:
        kind = rule.trigger.kind
        denies = rule.verdict == "deny"
        if kind == "memory":
            _memory_capabilities(low, rule, denies)
        elif kind == "breakpoint":
            _breakpoint_capabilities(low, rule, denies)
        elif kind == "control_register":
            reg = rule.trigger.register  # type: ignore[union-attr]
            _need(low, rule, "write_ctrlreg", "trap control-register writes")
            if denies and reg == "xcr0":
                _cannot(low, rule, f"refuse an XCR0 write on {t.name}",
                        "Xen's DENY covers CR0, CR3, CR4 and MSR writes, not XCR0",
                        "log or alert the XCR0 write instead of denying it")
            elif denies:
                _need(low, rule, "deny_cr", "refuse a control-register write")
        elif kind == "msr":
            _need(low, rule, "mov_to_msr", "trap MSR writes")
            if denies:
                _need(low, rule, "deny_msr", "refuse an MSR write")
        elif kind == "descriptor":
            _need(low, rule, "descriptor_access", "trap descriptor-register loads and stores")
            if denies:
                _need(low, rule, "inject_exception", "refuse a descriptor-register load")
        elif kind == "cpuid":
            _need(low, rule, "cpuid", "trap CPUID")
            if denies:
                _cannot(low, rule, "deny a CPUID", "there is nothing to refuse: CPUID always completes",
                        "log or alert it")
        elif kind in ("guest_request", "debug_exception"):
            _need(low, rule, kind, f"receive {kind} events")
            if denies:
                _cannot(low, rule, f"deny a {kind}", "there is nothing to refuse", "log, alert or pause")
        elif kind == "smc":
            _need(low, rule, "privileged_call", "trap SMC instructions")
            if t.has("privileged_call"):
                _weak(low, rule, "Xen does not execute a trapped SMC: the enforcer skips it (pc += 4) whatever "
                      "the verdict, and cannot set its return registers (Xen on arm64 takes only pc from a "
                      "response); trap SMCs only where no firmware call the guest needs goes through SMC "
                      "(Xen guests call PSCI through HVC)")


def _memory_capabilities(low: Lowering, rule: M.Rule, denies: bool) -> None:
    t = low.target
    access = rule.trigger.access  # type: ignore[union-attr]
    if not t.has("mem_access"):
        instead = ("on Xen with AMD SVM, CR/MSR/descriptor/CPUID monitors and int3 breakpoints work; "
                   "watching memory needs an Intel VT-x host (target x86_64)")
        _cannot(low, rule, f"watch memory {access}s on {t.name}",
                "Xen keeps no access bits in AMD's nested page tables: set_mem_access fails with EINVAL", instead)
        return
    if t.has("altp2m") and t.has("fast_singlestep"):
        low.strategies["mem_access.allow"] = "altp2m-fast-singlestep"
        low.strategies["mem_access.deny_write"] = "emulate-nowrite"
        low.strategies["mem_access.deny_read"] = "emulate-read-data"
        low.strategies["mem_access.deny_execute"] = "inject-exception"
        return
    if t.has("emulate"):
        # No single-step to step over in another view: Xen's emulator performs the allowed access.
        low.strategies["mem_access.allow"] = "emulate"
        low.strategies["mem_access.deny_write"] = "emulate-nowrite"
        low.strategies["mem_access.deny_read"] = "emulate-read-data"
        low.strategies["mem_access.deny_execute"] = "inject-exception"
        _weak(low, rule, f"on {t.name} an allowed access on a trapped page is performed by Xen's instruction "
              "emulator (no single-step to run it natively): an instruction it cannot emulate fails")
        return
    # arm64: no emulation, no single-stepping, no altp2m.
    low.strategies["mem_access.allow"] = "relax-and-rearm"
    _weak(low, rule, f"on {t.name} an allowed access cannot complete while the trap stays armed (no "
          "single-stepping, no emulation): the page is relaxed for it and re-armed at the enforcer's next event, "
          "so accesses in between are not seen")
    if access in ("execute", "access"):
        _weak(low, rule, f"on {t.name} Xen translates the faulting address with a data-side walk: execution "
              "tracing is ambiguous under split instruction/data TLBs (a guest can show fetches and reads "
              "different pages)")
    if denies:
        if access in ("execute", "access"):
            _cannot(low, rule, f"deny an execute on {t.name}", "Xen cannot inject an exception into an arm64 guest",
                    "alert on it, or deny writes to the code instead")
        else:
            low.strategies["mem_access.deny_write"] = "skip-instruction"
            if access == "read" or any(isinstance(a, M.Verdict) and a.feed for a in rule.actions):
                _weak(low, rule, f"on {t.name} a denied read is skipped (pc += 4): its destination register "
                      "keeps its old value instead of being fed data")


def _breakpoint_capabilities(low: Lowering, rule: M.Rule, denies: bool) -> None:
    t = low.target
    if t.has("software_breakpoint") and t.has("altp2m") and t.has("fast_singlestep"):
        low.strategies["breakpoint"] = "int3-shadow-frame"
    elif t.has("software_breakpoint") and t.has("emulate_insn"):
        # Without altp2m and single-stepping, Xen can still emulate the original bytes in place of
        # the 0xCC (EMULATE|SET_EMUL_INSN_DATA), so the breakpoint stays armed.
        low.strategies["breakpoint"] = "int3-inline-emulate"
        _weak(low, rule, f"on {t.name} the int3 is written into the guest's own frame (no altp2m to hide it): "
              "the guest's own reads of that code see 0xCC, which integrity checkers notice")
    elif t.has("smc_breakpoint"):
        low.strategies["breakpoint"] = "smc-inline"
        _weak(low, rule, f"on {t.name} the breakpoint is an injected SMC in the guest's own frame (visible to "
              "its reads) and cannot be re-armed after a hit without single-stepping: it fires once")
    else:
        _cannot(low, rule, f"place a breakpoint on {t.name}", "the target has no breakpoint mechanism", None)
        return
    if denies and not t.has("inject_exception"):
        _cannot(low, rule, f"deny an execute on {t.name}", "Xen cannot inject an exception into this guest",
                "alert on it instead")


def _need(low: Lowering, rule: M.Rule, capability: str, doing: str) -> None:
    from ..targets import CAPABILITIES
    if not low.target.has(capability):
        _cannot(low, rule, f"{doing} on {low.target.name}",
                f"{low.target.name} ({low.target.description}) has no {CAPABILITIES[capability]}", None)


def _cannot(low: Lowering, rule: M.Rule, what: str, why: str, instead: str | None) -> None:
    low.unusable.add(rule.name)
    low.d.error("PC500", rule.span, f"rule '{rule.name}' needs to {what}: {why}",
                f"what works instead: {instead}" if instead else None)


def _weak(low: Lowering, rule: M.Rule, message: str) -> None:
    low.d.warning("PC501", rule.span, f"rule '{rule.name}': {message}")


# ---------------------------------------------------------------- 2. regions

def describe_regions(low: Lowering) -> dict:
    """Each region's extents and page count. Without `low.report` (policyc check) none: no diagnostic is
    made from them and nothing after reads them."""
    if not low.report:
        return {}
    out = {}
    for region in low.policy.regions:
        extents = []
        bound_at_install = False
        spans: dict[tuple[str, bool, bool], list[tuple[int, int]]] = {}
        for e in region.extents:
            if isinstance(e, M.RegisterExtent):
                extents.append({"register": e.register, "size": hex(e.size)})
                bound_at_install = True  # pages known once the register is read at install
                continue
            start = e.start.value if isinstance(e.start, M.Address) else e.start
            entry = {"space": e.space, "start": hex(start), "size": hex(e.size),
                     "relocatable": isinstance(e.start, M.Address) and not e.start.percpu,
                     "percpu": isinstance(e.start, M.Address) and e.start.percpu}
            if isinstance(e.start, M.Address) and e.start.origin:
                entry["origin"] = e.start.origin
            extents.append(entry)
            # KASLR slides and image bases are page aligned, so page spans survive relocation.
            key = (e.space, entry["relocatable"], entry["percpu"])
            spans.setdefault(key, []).append((start // PAGE, (start + e.size - 1) // PAGE))
        pages = None if bound_at_install else sum(_count_pages(v) for v in spans.values())
        out[region.name] = {"extents": extents, "pages": pages}
    return dict(sorted(out.items()))


def _count_pages(page_spans: list[tuple[int, int]]) -> int:
    """Distinct pages covered by inclusive page spans (extents of one region may share pages)."""
    total, last = 0, -1
    for first, end in sorted(page_spans):
        first = max(first, last + 1)
        if end >= first:
            total += end - first + 1
        last = max(last, end)
    return total


# ---------------------------------------------------------------- 3. views

def layout_views(low: Lowering) -> list[dict]:
    """Permission maps. With altp2m: 0 host (untouched), 1 unrestricted (steps), 2.. restricted, one per
    group of execution contexts (`cr3 == K` rules; "*" for the rest), merged when there are more groups
    than the target has views (PC502). Without altp2m: the host p2m alone. See policyc.lowering.views;
    `policyc.lowering.views.context_monitors(views)` says which monitors the layout needs."""
    usable = {r.name for r in low.policy.rules if r.name not in low.unusable}
    shadow = low.strategies.get("breakpoint") == "int3-shadow-frame"
    made = layout(low.policy, low.target, usable=usable, shadow_breakpoints=shadow, diagnostics=low.d,
                  figures=low.report)
    low.layout = made
    return made.views


# ---------------------------------------------------------------- 4. monitors

def enable_monitors(low: Lowering) -> dict:
    views = low.plan["views"]
    rules = [r for r in low.policy.rules if r.name not in low.unusable]
    monitors: dict = {}
    crs: dict[str, list[M.Rule]] = {}
    msrs: dict[int, list[M.Rule]] = {}
    for r in rules:
        t = r.trigger
        if t.kind == "control_register":
            crs.setdefault(t.register, []).append(r)  # type: ignore[union-attr]
        elif t.kind == "msr":
            msrs.setdefault(t.index, []).append(r)  # type: ignore[union-attr]
        elif t.kind == "breakpoint":
            monitors["software_breakpoint" if low.target.has("software_breakpoint") else "privileged_call"] = True
        elif t.kind == "descriptor":
            monitors["descriptor_access"] = True
        elif t.kind == "cpuid":
            monitors["cpuid"] = True
        elif t.kind in ("guest_request", "debug_exception"):
            monitors[t.kind] = {"sync": True}
        elif t.kind == "smc":
            monitors["privileged_call"] = True
    if crs:
        monitors["write_ctrlreg"] = [_cr_monitor(reg, rs) for reg, rs in sorted(crs.items())]
    for extra in context_monitors(views).get("write_ctrlreg", []):
        # Context views: the enforcer switches a vCPU's view on its CR3 writes, so every
        # CR3 write must arrive, whatever the policy's own cr3 rules filter.
        mine = [m for m in monitors.get("write_ctrlreg", []) if m["index"] == extra["index"]]
        if mine:
            mine[0].update(sync=True, onchangeonly=False, bitmask="0x0")
        else:
            monitors.setdefault("write_ctrlreg", []).append(dict(extra))
            monitors["write_ctrlreg"].sort(key=lambda m: m["index"])
    if any(r.verdict == "deny" for rs in list(crs.values()) + list(msrs.values()) for r in rs):
        # Xen 4.17 performs CR/MSR writes during the exit unless writes are deferred to the
        # response (XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS); without it DENY has nothing to cancel.
        monitors["defer_register_writes"] = True
    if msrs:
        monitors["mov_to_msr"] = [{"msr": hex(i), "name": rs[0].trigger.name, "onchangeonly": False}  # type: ignore
                                  for i, rs in sorted(msrs.items())]
    if low.strategies.get("mem_access.allow") == "altp2m-fast-singlestep" or \
            low.strategies.get("breakpoint") == "int3-shadow-frame":
        monitors["singlestep"] = True
    return dict(sorted(monitors.items()))


def _cr_monitor(register: str, rules: list[M.Rule]) -> dict:
    """One write_ctrlreg setting. Xen raises the event only when bits outside `bitmask` change,
    so when every rule only cares about some bits, the rest are masked inside Xen."""
    watched = 0
    for r in rules:
        bits = _bits_that_matter(r.condition)
        if bits is None:
            watched = None
            break
        watched |= bits
    if watched is None:
        return {"index": register, "sync": True, "onchangeonly": False, "bitmask": "0x0"}
    return {"index": register, "sync": True, "onchangeonly": True, "bitmask": hex(~watched & ((1 << 64) - 1))}


def _bits_that_matter(c: M.Condition | None) -> int | None:
    """The bits a write must change for the condition to hold, or None when any write may match."""
    if isinstance(c, M.BitTest):
        return c.mask
    if isinstance(c, M.Logic):
        left, right = _bits_that_matter(c.left), _bits_that_matter(c.right)
        if c.op == "and":
            # Both sides must hold, so a matching write changes bits of each side: watching either
            # side's bits alone loses nothing. Watch the narrower one (fewer events).
            if left is None or right is None:
                return right if left is None else left
            return left if bin(left).count("1") <= bin(right).count("1") else right
        return None if left is None or right is None else left | right
    return None


# ---------------------------------------------------------------- 5. breakpoints

def place_breakpoints(low: Lowering) -> list[dict]:
    views = low.plan["views"]
    sites: dict[tuple[int, bool, bool, bool], list[str]] = {}
    for r in low.policy.rules:
        if r.trigger.kind == "breakpoint" and r.name not in low.unusable:
            t = r.trigger
            a = t.address  # type: ignore[union-attr]
            key = (a.value, a.percpu, t.relocatable, t.physical)  # type: ignore[union-attr]
            sites.setdefault(key, []).append(r.name)
    mechanism = low.strategies.get("breakpoint")
    out = []
    for i, ((value, percpu, relocatable, physical), rules) in enumerate(sorted(sites.items())):
        site = {"id": f"bp{i}", "address": hex(value), "relocatable": relocatable and not percpu,
                "mechanism": mechanism, "rules": sorted(rules)}
        if physical:
            site["physical"] = True
        if mechanism == "int3-shadow-frame":
            # Planted in every restricted view a rule on it runs in; stepped in the unrestricted one.
            site["views"] = breakpoint_views(low.policy, views, value, percpu) or [VIEW_RESTRICTED]
            site["step_view"] = VIEW_UNRESTRICTED
        out.append(site)
    return out


# ---------------------------------------------------------------- 6. dispatch

def build_dispatch(low: Lowering) -> dict:
    breakpoints = low.plan["breakpoints"]
    site_of = {(int(b["address"], 16)): b["id"] for b in breakpoints}
    tables: dict = {}
    for r in low.policy.rules:
        if r.name in low.unusable:
            continue
        entry = _entry(r, low)
        t = r.trigger
        if t.kind == "memory":
            entry["access"] = t.access  # type: ignore[union-attr]
            entry["regions"] = list(t.regions)  # type: ignore[union-attr]
            tables.setdefault("mem_access", []).append(entry)
        elif t.kind == "breakpoint":
            tables.setdefault("software_breakpoint", {}).setdefault(site_of[t.address.value], []).append(entry)  # type: ignore
        elif t.kind == "control_register":
            tables.setdefault("write_ctrlreg", {}).setdefault(t.register, []).append(entry)  # type: ignore
        elif t.kind == "msr":
            tables.setdefault("mov_to_msr", {}).setdefault(hex(t.index), []).append(entry)  # type: ignore
        elif t.kind == "descriptor":
            key = f"{t.register}:{t.access}"  # type: ignore[union-attr]
            tables.setdefault("descriptor_access", {}).setdefault(key, []).append(entry)
        elif t.kind == "cpuid":
            key = "*" if t.leaf is None else hex(t.leaf)  # type: ignore[union-attr]
            tables.setdefault("cpuid", {}).setdefault(key, []).append(entry)
        else:
            tables.setdefault(t.kind if t.kind != "smc" else "privileged_call", []).append(entry)
    return _sorted_tables(tables)


def _verdict(verdict: M.Verdict | None, default: str = "allow") -> dict:
    v: dict = {"verdict": verdict.verdict if verdict is not None else default}
    if verdict is not None and verdict.verdict == "deny":
        if verdict.feed is not None:
            v["feed"] = verdict.feed.hex()
        if verdict.exception is not None:
            v["exception"] = verdict.exception
            v["vector"] = EXCEPTION_VECTORS[verdict.exception]
    return v


def _entry(r: M.Rule, low: Lowering) -> dict:
    direct = next((a for a in r.actions if isinstance(a, M.Verdict)), None)
    v = _verdict(direct, r.verdict) if direct is not None else {"verdict": "allow"}
    if not low.report:  # policyc check: the analyses read the rule and its verdict, nothing else of it
        return {"rule": r.name, "priority": r.priority, "verdict": v}
    return {
        "rule": r.name,
        "priority": r.priority,
        "condition": compile_condition(r.condition) if r.condition is not None else None,
        "verdict": v,
        "actions": [_action(a) for a in r.actions if not isinstance(a, M.Verdict)],
        "at": low.at(r.span),
    }


def _action(a: M.Action) -> dict:
    if isinstance(a, M.LogAction):
        return {a.kind: {"severity": a.severity, "template": a.template, "fields": list(a.fields)}}
    if isinstance(a, M.Pause):
        return {"pause": True}
    if isinstance(a, M.Disarm):
        return {"disarm": True}
    if isinstance(a, M.RateLimit):
        then = {"verdict": _verdict(a.then)} if isinstance(a.then, M.Verdict) else _action(a.then)
        return {"limit": {"per_second": a.per_second, "then": then}}
    raise TypeError(a)


def _sorted_tables(tables: dict) -> dict:
    def order(entries: list) -> list:
        # Strongest first where it matters to readers; the enforcer runs every match anyway. By name, then
        # (stable) by priority where priorities differ: the order of the key (-priority, name), without a
        # tuple an entry.
        out = sorted(entries, key=_RULE_NAME)
        if len({e["priority"] for e in out}) > 1:
            out.sort(key=_NEGATED_PRIORITY)
        return out
    out = {}
    for kind, table in sorted(tables.items()):
        out[kind] = order(table) if isinstance(table, list) else {k: order(v) for k, v in sorted(table.items())}
    return out


_RULE_NAME = operator.itemgetter("rule")


def _NEGATED_PRIORITY(entry: dict) -> int:
    return -entry["priority"]


def _rule_summary(r: M.Rule, low: Lowering) -> dict:
    return {"trigger": r.trigger.kind, "verdict": r.verdict, "priority": r.priority, "at": low.at(r.span)}


# ---------------------------------------------------------------- 7. responses

def lower_responses(low: Lowering) -> dict:
    """For each trigger kind, the response for each verdict. Audit mode answers every deny with the
    allow response (the decision log records "would deny")."""
    t = low.target
    kinds = {r.trigger.kind for r in low.policy.rules if r.name not in low.unusable}
    out: dict = {}
    if "memory" in kinds:
        strategy = low.strategies.get("mem_access.allow")
        if strategy in ("altp2m-fast-singlestep", "emulate"):
            allow = {"flags": ["ALTERNATE_P2M", "FAST_SINGLESTEP"], "altp2m_idx": VIEW_UNRESTRICTED,
                     "fast_singlestep_p2midx": "faulting view"} if strategy != "emulate" else {"flags": ["EMULATE"]}
            out["mem_access"] = {
                "allow": allow,
                # Xen re-checks gfn and flags from the response's u.mem_access before emulating.
                "echo": ["u.mem_access.gfn", "u.mem_access.flags"],
                "deny:write": {"flags": ["EMULATE", "EMULATE_NOWRITE"]},
                "deny:read": {"flags": ["EMULATE", "SET_EMUL_READ_DATA"], "read_data": "rule feed, else zeros"},
                "deny:execute": {"flags": [], "inject": "rule exception, else #GP"},
                "classify": "W|R is a write (Xen reports every write violation as read too)",
            }
        else:
            out["mem_access"] = {
                "allow": {"flags": [], "relax_access": "rwx", "rearm": "at the next event"},
                "deny:write": {"flags": ["SET_REGISTERS"], "advance_ip": t.instruction_size},
                "deny:read": {"flags": ["SET_REGISTERS"], "advance_ip": t.instruction_size},
                "classify": "W|R is a write",
            }
    if "breakpoint" in kinds:
        mech = low.strategies.get("breakpoint")
        if mech == "int3-shadow-frame":
            allow = {"flags": ["ALTERNATE_P2M", "FAST_SINGLESTEP"], "altp2m_idx": VIEW_UNRESTRICTED,
                     "fast_singlestep_p2midx": "faulting view"}
        elif mech == "int3-inline-emulate":
            allow = {"flags": ["EMULATE", "SET_EMUL_INSN_DATA"], "insn_data": "the original bytes at the site"}
        else:
            allow = {"flags": [], "restore_original": True, "disarm": True}
        if mech == "smc-inline":
            # An SMC we did not plant is the guest's own firmware call: the `on smc` rules see it.
            out["breakpoint"] = {"allow": allow, "not_ours": {"dispatch": "privileged_call"}}
        else:
            # Xen swallows the #BP while the monitor is on: a guest's own int3 must be re-injected.
            out["breakpoint"] = {"allow": allow, "deny": {"flags": [], "inject": "rule exception, else #GP"},
                                 "not_ours": {"reinject": "int3"}}
    if "control_register" in kinds:
        # DENY reads u.write_ctrlreg.index from the response.
        out["write_ctrlreg"] = {"allow": {"flags": []}, "deny": {"flags": ["DENY"]},
                                "echo": ["u.write_ctrlreg.index"]}
    if "msr" in kinds:
        out["mov_to_msr"] = {"allow": {"flags": []}, "deny": {"flags": ["DENY"]}}
    if "descriptor" in kinds:
        # Xen emulates the instruction only when asked; EMULATE_NOWRITE would still load the register.
        out["descriptor_access"] = {"allow": {"flags": ["EMULATE"]}, "deny": {"flags": [], "inject": "#GP"}}
    if "cpuid" in kinds:
        # Xen has run CPUID already (the request's registers hold the results) but not moved rip.
        out["cpuid"] = {"allow": {"flags": ["SET_REGISTERS"], "advance_ip": "u.cpuid.insn_length"}}
    if "guest_request" in kinds:
        out["guest_request"] = {"allow": {"flags": []}}
    if "debug_exception" in kinds:
        out["debug_exception"] = {"allow": {"flags": [], "reinject": "#DB"}}
    if "smc" in kinds:
        # Xen neither executes a trapped SMC nor advances pc; it takes only pc from a response.
        out["privileged_call"] = {"allow": {"flags": ["SET_REGISTERS"], "advance_ip": 4}}
    return dict(sorted(out.items()))


# The passes in the order they run: (the plan section each makes, or None, the pass). Each reads the
# policy and the sections made before it.
PASSES: tuple[tuple[str | None, Callable[[Lowering], Any]], ...] = (
    (None, check_capabilities),
    ("regions", describe_regions),
    ("views", layout_views),
    ("monitors", enable_monitors),
    ("breakpoints", place_breakpoints),
    ("dispatch", build_dispatch),
    ("responses", lower_responses),
)
