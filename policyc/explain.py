"""`policyc explain`: a trap plan as a readable report, or its views as a Graphviz graph.

Everything here reads only the plan (a dict as `policyc.compiler.compile_plan`
builds it, or as `policyc.plan.load_plan` reads it back), so a plan file can be
explained without the policy or the symbol files it came from. The output is a
pure function of the plan: stable across runs and machines.

Conditions are rendered back from their plan form into the DSL's infix
spelling, with the DSL's operator precedence, so that `explain` and `diff`
show what a rule tests the way a policy author wrote it. Two spellings have
no DSL source to go back to: a relocatable link-time address is shown as
`va 0x...` (the guest's slide is added at install) and a per-CPU offset as
`percpu 0x...`. Bit masks of `set`/`cleared`/`changed` are shown by name
(`cr0.WP`) when every bit has one.
"""

from __future__ import annotations

from typing import Any

from .plan_text import (action_text, bits_for, dispatch_entries, extent_text, region_pages, render_condition,
                        view_pages)

__all__ = ["explain_text", "explain_dot", "rule_landings", "TRIGGER_RESPONSES"]

# The responses table each trigger kind is answered from.
TRIGGER_RESPONSES = {
    "memory": "mem_access", "breakpoint": "breakpoint", "control_register": "write_ctrlreg",
    "msr": "mov_to_msr", "descriptor": "descriptor_access", "cpuid": "cpuid",
    "guest_request": "guest_request", "debug_exception": "debug_exception", "smc": "privileged_call",
}

_MEMORY_DENY = {"read": ["deny:read"], "write": ["deny:write"], "execute": ["deny:execute"],
                "access": ["deny:read", "deny:write", "deny:execute"]}


# ---------------------------------------------------------------- reading a plan

def _pages_text(pages: int | None) -> str:
    if pages is None:
        return "bound at install"
    return f"{pages} page{'s' * (pages != 1)}"


def _distinct_pages(plan: dict, view: dict) -> int | None:
    """Pages the view's ranges span, counting a page shared by several extents once (None if some are unbound).
    Relocatable extents share the one slide and per-CPU ones the per-CPU base, so link-time pages compare."""
    seen: set[tuple] = set()
    for rng in view.get("ranges", []):
        region = plan.get("regions", {}).get(rng["region"], {})
        for e in region.get("extents", []):
            if "register" in e:
                return None
            start, size = int(e["start"], 16), int(e["size"], 16)
            key = (e["space"], e.get("relocatable", False), e.get("percpu", False))
            for page in range(start // 4096, (start + size - 1) // 4096 + 1):
                seen.add(key + (page,))
    return len(seen)


def rule_landings(plan: dict) -> dict[str, list[str]]:
    """Where each rule landed: view ranges, monitors, breakpoint sites, dispatch tables."""
    out: dict[str, list[str]] = {name: [] for name in plan.get("rules", {})}
    for view in plan.get("views", []):
        for rng in view.get("ranges", []):
            for rule in rng["rules"]:
                out.setdefault(rule, []).append(
                    f"view {view['id']} ({view['role']}): range {rng['region']} allows {rng['access']}, "
                    f"traps {rng['traps']} ({_pages_text(region_pages(plan, rng['region']))})")
    for bp in plan.get("breakpoints", []):
        where = (f" in view{'s' * (len(bp['views']) > 1)} {', '.join(map(str, bp['views']))}, "
                 f"stepped in view {bp['step_view']}") if "views" in bp else ""
        for rule in bp["rules"]:
            out.setdefault(rule, []).append(
                f"breakpoint {bp['id']} at {_address(bp['address'], bp['relocatable'])} ({bp['mechanism']}{where})")
    monitors = plan.get("monitors", {})
    for table, key, entry in dispatch_entries(plan):
        rule = entry["rule"]
        if table == "write_ctrlreg":
            mon = next((m for m in monitors.get("write_ctrlreg", []) if m["index"] == key), None)
            if mon:
                out.setdefault(rule, []).append(f"monitor write_ctrlreg {key}: {_cr_monitor_text(mon)}")
        elif table == "mov_to_msr":
            mon = next((m for m in monitors.get("mov_to_msr", []) if m["msr"] == key), None)
            if mon:
                out.setdefault(rule, []).append(f"monitor mov_to_msr {_msr_name(mon)}")
        elif table in ("descriptor_access", "cpuid", "guest_request", "debug_exception", "privileged_call"):
            if table in monitors:
                out.setdefault(rule, []).append(f"monitor {table}")
        out.setdefault(rule, []).append(f"dispatch {table}" + (f"[{key}]" if key is not None else ""))
    return out


def _address(hexval: str, relocatable: bool) -> str:
    return f"{hexval} (+slide)" if relocatable else hexval


def _msr_name(mon: dict) -> str:
    return f"{mon['msr']} ({mon['name']})" if mon.get("name") else mon["msr"]


def _cr_monitor_text(mon: dict) -> str:
    parts = ["sync" if mon["sync"] else "async"]
    if mon["onchangeonly"]:
        parts.append("onchangeonly")
    mask = int(mon["bitmask"], 16)
    if mask:
        watched = ~mask & ((1 << 64) - 1)
        parts.append(f"bitmask {mon['bitmask']} (raised when bits {hex(watched)} change)")
    else:
        parts.append("every write")
    return ", ".join(parts)


def _response_text(resp: dict) -> str:
    flags = "|".join(resp.get("flags", [])) or "no flags"
    extra = [f"{k} {_lower(v)}" for k, v in sorted(resp.items()) if k != "flags"]
    return flags + (f" ({', '.join(str(x) for x in extra)})" if extra else "")


def _trigger_text(plan: dict, table: str, key: str | None, entry: dict) -> str:
    if table == "mem_access":
        return f"{entry['access']} in {', '.join(entry['regions'])}"
    if table == "software_breakpoint":
        bp = next((b for b in plan.get("breakpoints", []) if b["id"] == key), None)
        return f"execute at {_address(bp['address'], bp['relocatable'])}" if bp else f"breakpoint {key}"
    if table == "write_ctrlreg":
        return f"write {key}"
    if table == "mov_to_msr":
        mon = next((m for m in plan.get("monitors", {}).get("mov_to_msr", []) if m["msr"] == key), None)
        return f"write msr {_msr_name(mon) if mon else key}"
    if table == "descriptor_access":
        reg, access = key.split(":")  # type: ignore[union-attr]
        return f"{access} {reg}"
    if table == "cpuid":
        return "cpuid" + ("" if key == "*" else f" leaf {key}")
    return table.replace("privileged_call", "smc")


def _verdict_lines(plan: dict, table: str, entry: dict) -> list[str]:
    """The verdict and the response flags it lowers to under the plan's mode."""
    mode = plan.get("policy", {}).get("mode", "enforce")
    verdict = entry["verdict"]
    kind = {"software_breakpoint": "breakpoint"}.get(table, table)
    responses = plan.get("responses", {}).get(kind, {})
    details = []
    if "feed" in verdict:
        details.append(f"feed {verdict['feed'] or '(nothing)'}")
    if "exception" in verdict:
        details.append(f"with {verdict['exception']} (vector {verdict['vector']})")
    head = verdict["verdict"] + (" " + ", ".join(details) if details else "")
    allow = responses.get("allow")
    if verdict["verdict"] == "allow":
        return [f"verdict   allow -> {_response_text(allow) if allow else 'no response needed'}"]
    if mode == "audit":
        return [f"verdict   {head}: audit mode, would deny -> answered with the allow response: "
                f"{_response_text(allow) if allow else 'no flags'}"]
    keys = _MEMORY_DENY.get(entry.get("access", ""), []) if table == "mem_access" else ["deny"]
    lines = [f"verdict   {head}"]
    for k in keys:
        if k in responses:
            lines.append(f"          {k} -> {_response_text(responses[k])}")
        else:
            lines.append(f"          {k} -> (no response in the plan)")
    return lines


# ---------------------------------------------------------------- text

def explain_text(plan: dict) -> str:
    """A readable report of a plan: its sections in order, a blank line between them."""
    out: list[str] = []
    for i, section in enumerate(_SECTIONS):
        if i:
            out.append("")
        out.extend(section(plan))
    return "\n".join(out) + "\n"


def _header_lines(plan: dict) -> list[str]:
    """The plan's identity: policy, target, compiler, hashes, symbol files, mode."""
    out: list[str] = []
    pol, tgt = plan.get("policy", {}), plan.get("target", {})
    out.append(f"policy {pol.get('name')!s} (mode {pol.get('mode')})")
    out.append(f"  target      {tgt.get('hypervisor')} >= {tgt.get('min_version')} on {tgt.get('arch')}: "
               f"{tgt.get('description')}; altp2m views available: {tgt.get('max_views')}")
    out.append(f"  compiler    {plan.get('compiler')}")
    out.append(f"  policy hash {pol.get('hash')}")
    out.append(f"  plan hash   {plan.get('content_hash')}")
    for sym in pol.get("symbols", []):
        out.append(f"  symbols     {sym['name']} (sha256 {sym['sha256'][:16]}...)")
    if pol.get("mode") == "audit":
        out.append("  audit mode: nothing is refused; every deny is logged as \"would deny\" and answered "
                   "with the allow response")
    return out


def _strategy_lines(plan: dict) -> list[str]:
    """How each kind of event is handled (the plan's strategies)."""
    out: list[str] = []
    out.append("strategies")
    strategies = plan.get("strategies", {})
    if not strategies:
        out.append("  (none: no memory or breakpoint rules)")
    for k, v in sorted(strategies.items()):
        out.append(f"  {k:<24} {v}")
    return out


def _view_lines(plan: dict) -> list[str]:
    """Each view with its regions, their pages and extents."""
    out: list[str] = []
    out.append("views")
    views = plan.get("views", [])
    if not views:
        out.append("  (none: no page permissions are changed)")
    for view in views:
        pages, unbound = view_pages(plan, view)
        ranges = view.get("ranges", [])
        desc = f"  view {view['id']} {view['role']:<12} default {view['default_access']}"
        if view.get("contexts"):
            desc += f", contexts {' '.join(view['contexts'])}"
        desc += f", {len(ranges)} region{'s' * (len(ranges) != 1)}"
        if ranges:
            desc += f", {pages} page{'s' * (pages != 1)} restricted"
            if unbound:
                desc += f" + {', '.join(unbound)} bound at install"
            distinct = _distinct_pages(plan, view)
            if distinct is not None and distinct != pages:
                desc += f" ({distinct} distinct: extents share pages)"
        out.append(desc)
        if view["role"] == "unrestricted":
            out.append("      allowed accesses are single-stepped here, then the vCPU returns to its view")
        if view["role"] == "host" and len(views) > 1:
            out.append("      the host p2m, untouched")
        for rng in ranges:
            region = plan.get("regions", {}).get(rng["region"], {})
            out.append(f"      {rng['region']:<24} allows {rng['access']:<3} traps {rng['traps']:<3} "
                       f"{_pages_text(region.get('pages')):<16} rules: {', '.join(rng['rules'])}")
            if region.get("extents") == []:
                out.append("          (empty region: nothing to trap)")
            for e in region.get("extents", []):
                out.append("          " + extent_text(e))
    return out


def _monitor_lines(plan: dict) -> list[str]:
    """The monitors the plan enables."""
    out: list[str] = []
    out.append("monitors")
    monitors = plan.get("monitors", {})
    if not monitors:
        out.append("  (none)")
    for name, value in sorted(monitors.items()):
        if name == "write_ctrlreg":
            for mon in value:
                out.append(f"  write_ctrlreg {mon['index']:<5} {_cr_monitor_text(mon)}")
        elif name == "mov_to_msr":
            for mon in value:
                out.append(f"  mov_to_msr {_msr_name(mon)}" + (", onchangeonly" if mon["onchangeonly"] else ""))
        elif isinstance(value, dict):
            out.append(f"  {name} " + ", ".join(f"{k}={_lower(v)}" for k, v in sorted(value.items())))
        else:
            out.append(f"  {name}")
    return out


def _breakpoint_lines(plan: dict) -> list[str]:
    """The breakpoints, where and how each is planted."""
    out: list[str] = []
    out.append("breakpoints")
    bps = plan.get("breakpoints", [])
    if not bps:
        out.append("  (none)")
    for bp in bps:
        where = (f", planted in view{'s' * (len(bp['views']) > 1)} {', '.join(map(str, bp['views']))}, "
                 f"stepped in view {bp['step_view']}") if "views" in bp else ""
        out.append(f"  {bp['id']:<4} {_address(bp['address'], bp['relocatable'])} {bp['mechanism']}{where}; "
                   f"rules: {', '.join(bp['rules'])}")
    return out


def _response_lines(plan: dict) -> list[str]:
    """The response flags per trigger and verdict."""
    out: list[str] = []
    out.append("responses")
    responses = plan.get("responses", {})
    if not responses:
        out.append("  (none)")
    for kind, table in sorted(responses.items()):
        for verdict, resp in sorted(table.items()):
            if isinstance(resp, dict) and "flags" in resp:
                out.append(f"  {kind + ' ' + verdict:<28} {_response_text(resp)}")
            elif isinstance(resp, dict):
                out.append(f"  {kind + ' ' + verdict:<28} " + ", ".join(f"{k} {v}" for k, v in sorted(resp.items())))
            else:
                out.append(f"  {kind + ' ' + verdict:<28} {resp}")
    return out


def _rule_lines(plan: dict) -> list[str]:
    """Each rule, in source order: trigger, landing, condition, verdict and actions."""
    out: list[str] = []
    rules = plan.get("rules", {})
    out.append(f"rules ({len(rules)})")
    landings = rule_landings(plan)
    entries = {entry["rule"]: (table, key, entry) for table, key, entry in dispatch_entries(plan)}
    for name in sorted(rules, key=lambda n: (_position_key(rules[n].get("at", "")), n)):
        summary = rules[name]
        out.append(f"  {name}  [{summary['trigger']}, {summary['verdict']}, priority {summary['priority']}] "
                   f"at {summary['at']}")
        if name not in entries:
            out.append("    (not in any dispatch table)")
            continue
        table, key, entry = entries[name]
        bits, register = bits_for(plan, table, key)
        out.append(f"    on        {_trigger_text(plan, table, key, entry)}")
        for landing in landings.get(name, []):
            out.append(f"    landed    {landing}")
        out.append(f"    where     {render_condition(entry['condition'], bits, register)}")
        out.extend("    " + line for line in _verdict_lines(plan, table, entry))
        for action in entry["actions"]:
            out.append(f"    then      {action_text(action)}")
    return out


def _warning_lines(plan: dict) -> list[str]:
    """The compiler's warnings."""
    out: list[str] = []
    warnings = plan.get("warnings", [])
    out.append(f"warnings ({len(warnings)})")
    for w in warnings:
        out.append(f"  {w['code']} at {w['at'] or '(policy)'}: {w['message']}")
    return out


def _analysis_lines(plan: dict) -> list[str]:
    """The analyses: collateral of sub-page regions, then a summary of the others."""
    out: list[str] = []
    analyses = plan.get("analyses", {}) or {}
    collateral = analyses.get("collateral")
    out.append("collateral (sub-page regions trap whole pages; the verdict filters the rest by offset)")
    if collateral is None:
        out.append("  (not analysed)")
    elif not collateral:
        out.append("  (none)")
    else:
        try:
            out.extend(_collateral(collateral))
        except (KeyError, TypeError, ValueError, AttributeError):
            out.extend(_generic(collateral, 1))
    others = sorted(k for k in analyses if k not in ("collateral", "order"))
    if others:
        out.append("")
        out.append("other analyses")
        for name in others:
            out.append(f"  {name}: {_summary(analyses[name])}")
    return out


_SECTIONS = (_header_lines, _strategy_lines, _view_lines, _monitor_lines, _breakpoint_lines, _response_lines, _rule_lines, _warning_lines, _analysis_lines)


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0.0%"


def _bytes_line(d: dict) -> str:
    watched, trapped = d["watched_bytes"], d["trapped_bytes"]
    unclaimed = d.get("unclaimed_bytes", trapped - watched)
    return f"{watched} bytes watched in {trapped} trapped ({_share(unclaimed, trapped)} collateral)"


def _collateral(c: dict) -> list[str]:
    """The collateral analysis (bytes trapped but not watched), region by region."""
    out = []
    threshold = c.get("note_threshold")
    overall = c.get("overall")
    if overall:
        out.append(f"  overall  {_bytes_line(overall)}")
        for access, d in sorted(overall.get("by_access", {}).items()):
            out.append(f"    {access:<8} {_bytes_line(d)}")
    for name, r in sorted(c["regions"].items()):
        mostly = ""
        share = r.get("unclaimed_share")
        if threshold is not None and share is not None and share >= threshold:
            mostly = "  <- mostly collateral"
        out.append(f"  {name:<24} traps {r.get('accesses', '?'):<3} {_pages_text(r.get('pages'))}: "
                   f"{_bytes_line(r)}{mostly}")
        for run in r.get("partial_runs", []):
            pages = f"{run['pages']} pages from" if run["pages"] != 1 else "page"
            each = " each" if run["pages"] != 1 else ""
            out.append(f"      partial {pages} {run.get('space', '')} {run['start']}: "
                       f"{run['watched_bytes']} of {run['trapped_bytes']} bytes watched{each}")
    return out


def _summary(value: Any) -> str:
    """One line for an analysis whose layout explain does not know in detail."""
    if not isinstance(value, dict):
        return _scalar(value) if not isinstance(value, list) else f"{len(value)} item(s)"
    parts = []
    for k, v in sorted(value.items()):
        if isinstance(v, list):
            parts.append(f"{k} {len(v)}")
        elif not isinstance(v, dict):
            parts.append(f"{k} {_scalar(v)}")
    return ", ".join(parts) or "(see the plan)"


def _position_key(at: str) -> tuple:
    file, _, rest = at.rpartition(":")
    file, _, line = file.rpartition(":")
    try:
        return (file, int(line), int(rest))
    except ValueError:
        return (at, 0, 0)


def _lower(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _generic(obj: Any, depth: int) -> list[str]:
    """Any JSON value as indented lines, keys sorted (for analyses whose layout this module does not know)."""
    pad = "  " * depth
    if isinstance(obj, dict):
        lines = []
        for k, v in sorted(obj.items()):
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines.extend(_generic(v, depth + 1))
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
        return lines
    if isinstance(obj, list):
        lines = []
        for item in obj:
            if isinstance(item, dict) and item:
                sub = _generic(item, depth + 1)
                lines.append(f"{pad}- {sub[0].strip()}")
                lines.extend(sub[1:])
            elif isinstance(item, list) and item:
                lines.append(f"{pad}-")
                lines.extend(_generic(item, depth + 1))
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return lines
    return [f"{pad}{_scalar(obj)}"]


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return str(v)


# ---------------------------------------------------------------- dot

def explain_dot(plan: dict) -> str:
    """The views and the view switches the responses perform, as a Graphviz digraph."""
    lines = [f"digraph {_dot_id('plan ' + str(plan.get('policy', {}).get('name', '')))} {{",
             "  rankdir=LR;",
             '  node [shape=box, fontname="monospace"];',
             '  edge [fontname="monospace"];',
             f"  label={_dot_id(_dot_title(plan))};",
             "  labelloc=t;"]
    views = plan.get("views", [])
    by_role = {v["role"]: v for v in views}
    if not views:
        lines.append(f"  host [label={_dot_id('host p2m (untouched: no memory traps)')}];")
    for view in views:
        pages, unbound = view_pages(plan, view)
        label = f"view {view['id']}: {view['role']}\\ndefault {view['default_access']}"
        if view.get("ranges"):
            label += f"\\n{len(view['ranges'])} regions, {pages} pages restricted"
            if unbound:
                label += " + bound at install"
        style = ', style="rounded,bold"' if view["role"] == "restricted" else ""
        lines.append(f"  v{view['id']} [label=\"{_dot_escape(label)}\"{style}];")
    strategies = plan.get("strategies", {})
    responses = plan.get("responses", {})
    restricted = [v for v in views if v["role"] == "restricted"]
    unrestricted = by_role.get("unrestricted")
    host = by_role.get("host")
    if host is not None and len(views) > 1:
        for view in restricted:
            lines.append(f"  v{host['id']} -> v{view['id']} [label={_dot_id('install: vCPUs switched in')}, "
                         f"style=dotted];")
    mem = responses.get("mem_access")
    if mem and unrestricted and strategies.get("mem_access.allow") == "altp2m-fast-singlestep":
        allow = mem["allow"]
        for view in restricted:
            lines.append(f"  v{view['id']} -> v{allow['altp2m_idx']} "
                         f"[label={_dot_id('mem_access allow (ALTERNATE_P2M)')}];")
            back = allow.get("fast_singlestep_p2midx")
            back_id = view["id"] if back == "faulting view" else back
            lines.append(f"  v{allow['altp2m_idx']} -> v{back_id} "
                         f"[label={_dot_id('fast singlestep back')}, style=dashed];")
    elif mem and views:
        host = views[0]
        lines.append(f"  v{host['id']} -> v{host['id']} "
                     f"[label={_dot_id('mem_access allow: relax to rwx, re-arm at the next event')}];")
    bp_resp = responses.get("breakpoint", {}).get("allow", {})
    for bp in plan.get("breakpoints", []):
        node = f"bp_{bp['id']}"
        label = f"{bp['id']} {bp['address']}\\n{bp['mechanism']}\\n{', '.join(bp['rules'])}"
        lines.append(f"  {node} [label=\"{_dot_escape(label)}\", shape=diamond];")
        if "views" in bp:
            for view_id in bp["views"]:
                lines.append(f"  {node} -> v{view_id} [label={_dot_id('planted in')}, style=dotted, arrowhead=none];")
        elif views:
            lines.append(f"  {node} -> v{views[0]['id']} [label={_dot_id('inline in the guest frame')}, "
                         f"style=dotted, arrowhead=none];")
        else:
            lines.append(f"  {node} -> host [label={_dot_id('inline in the guest frame')}, "
                         f"style=dotted, arrowhead=none];")
    if plan.get("breakpoints") and "ALTERNATE_P2M" in bp_resp.get("flags", []):
        planted = sorted({v for bp in plan["breakpoints"] for v in bp.get("views", [])})
        for src in planted:
            lines.append(f"  v{src} -> v{bp_resp['altp2m_idx']} [label={_dot_id('breakpoint allow: step the original')}];")
            lines.append(f"  v{bp_resp['altp2m_idx']} -> v{src} "
                         f"[label={_dot_id('breakpoint step back (fast singlestep)')}, style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_title(plan: dict) -> str:
    pol, tgt = plan.get("policy", {}), plan.get("target", {})
    return f"{pol.get('name')} on {tgt.get('arch')} ({pol.get('mode')})"


def _dot_escape(s: str) -> str:
    # Keeps "\n" line breaks written as the two characters backslash-n; escapes quotes.
    return s.replace('"', '\\"')


def _dot_id(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
