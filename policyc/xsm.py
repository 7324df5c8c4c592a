"""FLASK (XSM) rules that let one introspection domain run a trap plan on one guest.

`policyc compile --emit xsm` prints a `.te` fragment in the language of Xen's
`tools/flask/policy/modules` (m4 macros from `xen.if`): the allow rules the
introspection domain (SOURCE, default `introspect_t`) needs on the guest
(TARGET, default `domU_t`) to do what this plan does, and nothing more.

What each permission is for, and which Xen hook checks it, is in
docs/XEN-SEMANTICS.md section 6. In short (Xen 4.17):

=====================  ================================  ==============================
plan feature           class: permissions                 why
=====================  ================================  ==============================
always                 domain2: vm_event                  vm_event_op, every monitor_op,
                                                          set_access_required
always                 domain: getdomaininfo getvcpuinfo  ring setup pauses the guest;
                       pause unpause getvcpucontext       registers a request lacks
always                 domxen_t domain: getdomaininfo     xc_domain_getinfolist
always                 hvm: getparam (+ gethvmc on x86)   the ring's gfn; HVM state
always                 mmu: map_read map_write adjust     map guest frames and the ring;
                       stat (+ pageinfo on x86)           repopulate/remove the ring gfn
always                 event: the ring's event channel    Xen allocates the guest's end,
                                                          the agent binds and notifies
memory rules           domain2: mem_access                XENMEM_access_op (per view)
altp2m views           hvm: altp2mhvm_op                  views, per-view access,
                                                          change_gfn, visibility
shadow-frame bps       domain: setdomainmaxmem,           a spare gfn per hidden
                       mmu: physmap                       breakpoint's shadow copy
singlestep monitor     domain: setdebugging               single-step off at teardown
inject / reinject      hvm: dm                            xendevicemodel_inject_event
=====================  ================================  ==============================

Register writes through a vm_event response (SET_REGISTERS) need no
`setvcpucontext`, and single-step, fast single-step and view switches requested
in a response are covered by `domain2:vm_event`; a plan never needs
`setvcpucontext`/`sethvmc`.

`gethvmcontext` and `getpageframeinfo3` are x86-only domctls (on arm64 Xen
answers -ENOSYS after the check), so arm64 plans do without `hvm:gethvmc` and
`mmu:pageinfo`.  An arm64 agent maps guest frames through its own physmap
(`mmu:physmap` on itself), which `declare_domain` already grants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["emit_flask", "plan_rules", "POSSIBLE_PERMISSIONS", "XEN_FLASK_SOURCE"]

# Where the class and permission names were checked (tests/data/xen-flask-access-vectors.txt).
XEN_FLASK_SOURCE = ("xen-project/xen RELEASE-4.17.7 (9373a593c5a6ef57db1302eb1dca58cc3eb51c07): "
                    "xen/xsm/flask/policy/access_vectors, security_classes")

# Xen's own order of the security classes (security_classes): the emitted groups follow it.
_CLASS_ORDER = ("xen", "xen2", "domain", "domain2", "hvm", "mmu", "resource", "shadow", "event", "grant",
                "security", "version", "argo")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Rule:
    """One `allow` line: `allow source target:cls { perms };` with its one-line reason."""
    source: str
    target: str
    cls: str
    perms: tuple[str, ...]
    why: str

    def render(self) -> str:
        return f"allow {self.source} {self.target}:{self.cls} {{ {' '.join(self.perms)} }};\n"


# (feature, source, target, class, perms, x86 only). "S"/"T" stand for the source and target
# types, "S_channel"/"T_channel" for the event-channel labels `declare_domain` creates.
_TABLE: tuple[tuple[str, str, str, str, tuple[str, ...], bool], ...] = (
    ("ring", "S", "T", "domain", ("getdomaininfo", "getvcpucontext", "getvcpuinfo", "pause", "unpause"), False),
    ("ring", "S", "domxen_t", "domain", ("getdomaininfo",), False),
    ("shadow", "S", "T", "domain", ("setdomainmaxmem",), False),
    ("singlestep", "S", "T", "domain", ("setdebugging",), False),
    ("ring", "S", "T", "domain2", ("vm_event",), False),
    ("mem_access", "S", "T", "domain2", ("mem_access",), False),
    ("ring", "S", "T", "hvm", ("getparam",), False),
    ("ring-x86", "S", "T", "hvm", ("gethvmc",), True),
    ("altp2m", "S", "T", "hvm", ("altp2mhvm_op",), True),
    ("inject", "S", "T", "hvm", ("dm",), True),
    ("ring", "S", "T", "mmu", ("adjust", "map_read", "map_write", "stat"), False),
    ("ring-x86", "S", "T", "mmu", ("pageinfo",), True),
    ("shadow", "S", "T", "mmu", ("physmap",), False),
    ("evtchn-xen", "S", "T_channel", "event", ("create",), False),
    ("evtchn-xen", "T_channel", "S", "event", ("bind",), False),
    ("evtchn-agent", "S", "S_channel", "event", ("create", "send"), False),
    ("evtchn-agent", "S_channel", "T", "event", ("bind",), False),
)

#: Every (class, permission) the emitter can produce: tests check them against Xen's access vectors.
POSSIBLE_PERMISSIONS: frozenset[tuple[str, str]] = frozenset(
    (cls, perm) for _, _, _, cls, perms, _ in _TABLE for perm in perms)


def plan_rules(plan: dict, source_type: str = "introspect_t", target_type: str = "domU_t") -> list[Rule]:
    """The allow rules this plan needs, in output order (by class in Xen's order, then as in the table)."""
    for name, value in (("source_type", source_type), ("target_type", target_type)):
        if not isinstance(value, str) or not _IDENT.match(value):
            raise ValueError(f"{name} must be a FLASK type name (letters, digits, '_'), not {value!r}")
    if source_type == target_type:
        raise ValueError("the introspection domain and the guest need different types")
    arch = str(plan.get("target", {}).get("arch", ""))
    x86 = arch.startswith("x86")
    why = _features(plan)
    names = {"S": source_type, "T": target_type,
             "S_channel": f"{source_type}_channel", "T_channel": f"{target_type}_channel"}
    rules = []
    for feature, src, tgt, cls, perms, x86_only in _TABLE:
        if feature not in why or (x86_only and not x86):
            continue
        reason = why[feature]
        if feature == "ring-x86":
            reason = ("always (x86): full HVM state (gethvmcontext)" if cls == "hvm" else
                      "always (x86): ring setup checks the ring gfn's type (getpageframeinfo3)")
        elif feature == "ring":
            reason = _RING_WHY[(tgt, cls)]
            if cls == "domain2":
                reason += f" (monitors: {', '.join(sorted(plan.get('monitors') or {})) or 'none'})"
        rules.append(Rule(names.get(src, src), names.get(tgt, tgt), cls, perms, reason))
    order = {c: i for i, c in enumerate(_CLASS_ORDER)}
    # Stable sort: within a class the table's order stands.
    return sorted(rules, key=lambda r: order.get(r.cls, len(order)))


_RING_WHY = {
    ("T", "domain"): "always: pause/unpause around ring setup, domain and vCPU info, vCPU registers a request lacks",
    ("domxen_t", "domain"): "always: xc_domain_getinfolist (the sysctl checks dom_xen's label)",
    ("T", "domain2"): "always: vm_event ring enable/resume/disable, access_required, every monitor_op",
    ("T", "hvm"): "always: read the ring's gfn (HVM_PARAM_MONITOR_RING_PFN)",
    ("T", "mmu"): "always: map guest frames and the ring read-write; repopulate/remove the ring gfn; max gpfn",
}


def _features(plan: dict) -> dict[str, str]:
    """Plan feature -> the one-line reason shown above its rules. Absent features grant nothing."""
    monitors = plan.get("monitors") or {}
    views = plan.get("views") or []
    breakpoints = plan.get("breakpoints") or []
    responses = plan.get("responses") or {}
    dispatch = plan.get("dispatch") or {}
    arch = str(plan.get("target", {}).get("arch", ""))

    out: dict[str, str] = {"ring": "", "ring-x86": ""}
    out["evtchn-xen"] = "always: the ring's event channel; Xen allocates the guest's end with the agent as current"
    out["evtchn-agent"] = "always: the agent binds its end of the ring's channel and notifies Xen"

    memory = dispatch.get("mem_access")
    if memory or "mem_access" in responses:
        count = _count_rules(memory)
        out["mem_access"] = (f"dispatch.mem_access ({count} memory rule{'s' if count != 1 else ''}): "
                             "set/get page access with XENMEM_access_op")
    altp2m_views = [v for v in views if isinstance(v, dict) and v.get("id", 0) != 0]
    if arch.startswith("x86") and (altp2m_views or _uses_altp2m(responses, breakpoints)):
        out["altp2m"] = (f"views ({len(views)} altp2m views incl. the host's): create/switch views, "
                         "per-view access, change_gfn, visibility")
    shadow = [b for b in breakpoints if isinstance(b, dict) and b.get("mechanism") == "int3-shadow-frame"]
    if shadow:
        out["shadow"] = (f"breakpoints ({len(shadow)} int3-shadow-frame site{'s' if len(shadow) != 1 else ''}): "
                         "spare gfns for the hidden shadow copies")
    if monitors.get("singlestep"):
        out["singlestep"] = "monitors.singlestep: turn single-stepping off at teardown (xc_domain_debug_control)"
    injects = _injections(plan)
    if injects:
        out["inject"] = "responses inject an exception (" + ", ".join(injects) + "): xendevicemodel_inject_event"
    return out


def _count_rules(table: object) -> int:
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("rule"), str):
                names.add(node["rule"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(table)
    return len(names)


def _uses_altp2m(responses: dict, breakpoints: list) -> bool:
    def walk(node: object) -> bool:
        if isinstance(node, dict):
            if "ALTERNATE_P2M" in (node.get("flags") or []) or "altp2m_idx" in node:
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(responses) or any(isinstance(b, dict) and "view" in b for b in breakpoints)


def _injections(plan: dict) -> list[str]:
    """Where the plan's responses inject or re-inject an event, as `trigger.case`. In audit mode a
    deny is answered with the allow response, so injections on deny paths are never made."""
    audit = (plan.get("policy") or {}).get("mode") == "audit"
    found = []
    for trigger, cases in sorted((plan.get("responses") or {}).items()):
        if not isinstance(cases, dict):
            continue
        for case, response in sorted(cases.items()):
            if not isinstance(response, dict):
                continue
            if "reinject" in response or ("inject" in response and not (audit and case.startswith("deny"))):
                found.append(f"{trigger}.{case}")
    return found


def emit_flask(plan: dict, source_type: str = "introspect_t", target_type: str = "domU_t") -> str:
    """A `.te` fragment granting `source_type` exactly what `plan` needs on `target_type`."""
    rules = plan_rules(plan, source_type, target_type)
    policy = plan.get("policy") or {}
    target = plan.get("target") or {}
    arch = str(target.get("arch", "?"))
    module = source_type[:-2] if source_type.endswith("_t") else source_type
    lines = [
        f"# {module}.te: FLASK rules for the introspection domain {source_type} over {target_type}",
        f"# generated by {plan.get('compiler', 'policyc')} from a trap plan; regenerate, do not edit",
        f"# policy: {policy.get('name', '?')} ({policy.get('mode', '?')}, {policy.get('hash', '?')})",
        f"# plan:   {plan.get('content_hash', '?')}",
        f"# target: xen >= {target.get('min_version', '?')} on {arch}",
        "#",
        f"# Add as tools/flask/policy/modules/{module}.te with \"{module} = on\" in modules.conf.",
        f"# Label the guest seclabel='system_u:system_r:{target_type}' and the introspection domain",
        f"# seclabel='system_u:system_r:{source_type}' in their xl.cfg. {target_type} must be declared",
        f"# with declare_domain(), which also creates the {target_type}_channel label used below.",
    ]
    if arch.startswith("x86"):
        lines += [
            "# On x86 the introspection domain must be PV: Xen refuses PVH/HVM domains other than",
            "# the hardware domain foreign mappings of guest frames, the vm_event ring included.",
        ]
    elif arch == "arm64":
        lines += [
            "# On arm64 the introspection domain maps guest frames through its own physmap",
            "# (mmu:physmap on itself, which declare_domain grants).",
        ]
        if any(r.cls == "domain2" and "mem_access" in r.perms for r in rules):
            lines.append("# Memory rules need a Xen built with CONFIG_MEM_ACCESS (off by default on arm64).")
    if any(r.cls == "hvm" and "altp2mhvm_op" in r.perms for r in rules):
        lines += [
            "# altp2m also needs altp2m=1 on Xen's command line (default off) and altp2m=\"external\"",
            "# in the guest's xl.cfg; the stock create_domain() already lets dom0 set HVM_PARAM_ALTP2M.",
        ]
    lines += [
        "# Only what this plan needs: registers are written through vm_event responses, so no",
        "# setvcpucontext/sethvmc.",
        "",
        f"# The introspection domain's type (skip if {source_type} is declared elsewhere); dom0 builds it.",
        f"declare_domain({source_type})",
        f"create_domain(dom0_t, {source_type})",
        f"manage_domain(dom0_t, {source_type})",
        f"domain_comms(dom0_t, {source_type})",
    ]
    text = "\n".join(lines) + "\n"
    # Grouped by class (a blank line between classes); each run of rules with one reason gets
    # that reason as a one-line comment.
    previous: tuple[str, str] | None = None
    for rule in rules:
        if previous is None or rule.cls != previous[0]:
            text += "\n"
        if (rule.cls, rule.why) != previous:
            text += f"# {rule.why}\n"
        previous = (rule.cls, rule.why)
        text += rule.render()
    return text
