"""`policyc diff`: a semantic diff of two trap plans, rule by rule.

Two plans are compared by what they trap, not by their bytes: rules added and
removed; for a rule in both, its trigger (access, the regions' extents, the
register, MSR or breakpoint address), its condition (rendered back to infix),
its verdict, its actions and its priority; the monitors; the views and the
access of each range; the target, mode, strategies and responses; and the
pages trapped before and after.

Source positions (`at`), hashes, the compiler version, warnings and analyses
are not differences in what is trapped. When they are all that changed, the
diff is empty and says so ("same traps; only source positions changed").
Breakpoint site ids (`bp0`, ...) are numbering, not meaning: a rule's
breakpoint is compared by its address.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from .plan_text import action_text, bits_for, dispatch_entries, extent_text, render_condition, view_pages

__all__ = ["Change", "PlanDiff", "diff_plans"]

# Order of sections in the output.
_SECTIONS = ("target", "policy", "strategy", "rule", "monitor", "view", "response")


@dataclass(frozen=True)
class Change:
    """One difference: `section` (rule, monitor, view, ...), the thing's `name`, and readable `details`."""
    section: str
    name: str
    details: tuple[str, ...] = ()

    def sort_key(self) -> tuple:
        return (_SECTIONS.index(self.section) if self.section in _SECTIONS else len(_SECTIONS), self.section,
                self.name)

    def to_dict(self) -> dict:
        return {"what": self.section, "name": self.name, "details": list(self.details)}


@dataclass
class PlanDiff:
    old_label: str
    new_label: str
    added: list[Change] = field(default_factory=list)
    removed: list[Change] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    pages_before: int = 0
    pages_after: int = 0
    note: str | None = None

    @property
    def empty(self) -> bool:
        """True when the two plans trap the same things the same way."""
        return not (self.added or self.removed or self.changed)

    def render_text(self) -> str:
        out = [f"old: {self.old_label}", f"new: {self.new_label}"]
        if self.empty:
            out.append(self.note or "no differences")
            return "\n".join(out) + "\n"
        for title, sign, items in (("+ added", "+", self.added), ("- removed", "-", self.removed),
                                   ("~ changed", "~", self.changed)):
            if not items:
                continue
            out.append(title)
            for c in items:
                out.append(f"  {sign} {c.section} {c.name}")
                out.extend(f"      {d}" for d in c.details)
        if self.pages_before != self.pages_after:
            out.append(f"pages trapped: {self.pages_before} -> {self.pages_after}")
        else:
            out.append(f"pages trapped: {self.pages_before} (unchanged)")
        return "\n".join(out) + "\n"

    def to_json(self) -> str:
        doc = {
            "old": self.old_label,
            "new": self.new_label,
            "empty": self.empty,
            "note": self.note,
            "added": [c.to_dict() for c in self.added],
            "removed": [c.to_dict() for c in self.removed],
            "changed": [c.to_dict() for c in self.changed],
            "pages_trapped": {"before": self.pages_before, "after": self.pages_after},
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def diff_plans(old: dict, new: dict) -> PlanDiff:
    """The semantic difference between two plans."""
    result = PlanDiff(_label(old), _label(new), pages_before=_pages_trapped(old), pages_after=_pages_trapped(new))
    added: list[Change] = []
    removed: list[Change] = []
    changed: list[Change] = []

    _diff_settings(old, new, changed)
    _diff_rules(old, new, added, removed, changed)
    _diff_monitors(old, new, added, removed, changed)
    _diff_views(old, new, added, removed, changed)
    _diff_responses(old, new, added, removed, changed)

    result.added = sorted(added, key=Change.sort_key)
    result.removed = sorted(removed, key=Change.sort_key)
    result.changed = sorted(changed, key=Change.sort_key)
    if result.empty:
        result.note = _same_traps_note(old, new)
    return result


# ---------------------------------------------------------------- pieces

def _label(plan: dict) -> str:
    pol, tgt = plan.get("policy", {}), plan.get("target", {})
    return f"{pol.get('name')} on {tgt.get('arch')} ({pol.get('mode')}), {plan.get('content_hash')}"


def _pages_trapped(plan: dict) -> int:
    return sum(view_pages(plan, v)[0] for v in plan.get("views", []))


def _same_traps_note(old: dict, new: dict) -> str:
    if _positions(old) != _positions(new):
        return "same traps; only source positions changed"
    if old.get("content_hash") == new.get("content_hash") and old == new:
        return "no differences"
    what = []
    if old.get("compiler") != new.get("compiler"):
        what.append("compiler version")
    if old.get("policy", {}).get("hash") != new.get("policy", {}).get("hash"):
        what.append("policy hash")
    if old.get("policy", {}).get("symbols") != new.get("policy", {}).get("symbols"):
        what.append("symbol files")
    if old.get("warnings") != new.get("warnings"):
        what.append("warnings")
    if old.get("analyses") != new.get("analyses"):
        what.append("analyses")
    if not what:
        return "no differences"
    return "same traps; only " + ", ".join(what) + " changed"


def _positions(plan: dict) -> dict:
    at = {name: r.get("at") for name, r in plan.get("rules", {}).items()}
    at.update({("entry", e["rule"]): e.get("at") for _, _, e in dispatch_entries(plan)})
    at["warnings"] = [w.get("at") for w in plan.get("warnings", [])]
    return at


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _field_changes(old: dict, new: dict, skip: Iterable[str] = ()) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k in skip:
            continue
        if old.get(k) != new.get(k):
            out.append(f"{k}: {_fmt(old.get(k))} -> {_fmt(new.get(k))}")
    return out


def _diff_settings(old: dict, new: dict, changed: list[Change]) -> None:
    tgt = _field_changes(old.get("target", {}), new.get("target", {}), skip=("description",))
    if tgt:
        changed.append(Change("target", old.get("target", {}).get("arch", "?"), tuple(tgt)))
    o_pol, n_pol = old.get("policy", {}), new.get("policy", {})
    pol = []
    if o_pol.get("mode") != n_pol.get("mode"):
        pol.append(f"mode: {o_pol.get('mode')} -> {n_pol.get('mode')}"
                   + (" (denies are now only logged as \"would deny\")" if n_pol.get("mode") == "audit" else
                      " (denies are now enforced)" if n_pol.get("mode") == "enforce" else ""))
    if o_pol.get("name") != n_pol.get("name"):
        pol.append(f"name: {o_pol.get('name')} -> {n_pol.get('name')}")
    if pol:
        changed.append(Change("policy", str(n_pol.get("name")), tuple(pol)))
    o_str, n_str = old.get("strategies", {}), new.get("strategies", {})
    for k in sorted(set(o_str) | set(n_str)):
        if o_str.get(k) != n_str.get(k):
            changed.append(Change("strategy", k, (f"{_fmt(o_str.get(k))} -> {_fmt(n_str.get(k))}",)))


# ---------------------------------------------------------------- rules

def _extents_sig(plan: dict, region: str) -> tuple[tuple[str, ...], Any]:
    r = plan.get("regions", {}).get(region)
    if r is None:
        return (("(unknown region)",), None)
    return tuple(extent_text({k: v for k, v in e.items() if k != "origin"}) for e in r.get("extents", [])), \
        r.get("pages")


def _condition_regions(form: Any) -> set[str]:
    if not isinstance(form, list) or not form:
        return set()
    if form[0] in ("in", "not_in"):
        return {form[2]} | _condition_regions(form[1])
    out: set[str] = set()
    for part in form[1:]:
        out |= _condition_regions(part)
    return out


def _rule_records(plan: dict) -> dict[str, dict]:
    bps = {b["id"]: b for b in plan.get("breakpoints", [])}
    msr_names = {m["msr"]: m.get("name") for m in plan.get("monitors", {}).get("mov_to_msr", [])}
    out: dict[str, dict] = {}
    for table, key, entry in dispatch_entries(plan):
        if table == "mem_access":
            trigger = {"kind": "memory", "access": entry["access"], "regions": list(entry["regions"])}
            text = f"{entry['access']} in {', '.join(entry['regions'])}"
        elif table == "software_breakpoint":
            bp = bps.get(key, {})
            trigger = {"kind": "breakpoint", "address": bp.get("address"), "relocatable": bp.get("relocatable")}
            text = f"execute at {bp.get('address')}" + (" (+slide)" if bp.get("relocatable") else "")
        elif table == "write_ctrlreg":
            trigger, text = {"kind": "control_register", "register": key}, f"write {key}"
        elif table == "mov_to_msr":
            trigger = {"kind": "msr", "msr": key}
            text = f"write msr {key}" + (f" ({msr_names[key]})" if msr_names.get(key) else "")
        elif table == "descriptor_access":
            reg, access = key.split(":")  # type: ignore[union-attr]
            trigger, text = {"kind": "descriptor", "register": reg, "access": access}, f"{access} {reg}"
        elif table == "cpuid":
            trigger, text = {"kind": "cpuid", "leaf": key}, "cpuid" + ("" if key == "*" else f" leaf {key}")
        else:
            trigger, text = {"kind": table}, table
        bits, register = bits_for(plan, table, key)
        cond_regions = sorted(_condition_regions(entry["condition"]))
        out[entry["rule"]] = {
            "trigger": trigger,
            "trigger_text": text,
            "region_extents": {r: _extents_sig(plan, r) for r in trigger.get("regions", [])},
            "condition": entry["condition"],
            "condition_text": render_condition(entry["condition"], bits, register),
            "condition_regions": {r: _extents_sig(plan, r) for r in cond_regions},
            "verdict": entry["verdict"],
            "actions": entry["actions"],
            "priority": entry["priority"],
            "at": entry.get("at"),
        }
    return out


def _verdict_text(v: dict) -> str:
    extra = []
    if "feed" in v:
        extra.append(f"feed {v['feed'] or '(nothing)'}")
    if "exception" in v:
        extra.append(f"with {v['exception']}")
    return v["verdict"] + (" " + ", ".join(extra) if extra else "")


def _rule_summary(rec: dict) -> tuple[str, ...]:
    lines = [f"on {rec['trigger_text']}"]
    if rec["condition"] is not None:
        lines.append(f"where {rec['condition_text']}")
    lines.append(f"verdict {_verdict_text(rec['verdict'])}, priority {rec['priority']}")
    lines += [f"then {action_text(a)}" for a in rec["actions"]]
    if rec.get("at"):
        lines.append(f"at {rec['at']}")
    return tuple(lines)


def _extents_text(sig: tuple[tuple[str, ...], Any]) -> str:
    extents, pages = sig
    body = "; ".join(extents) if extents else "(empty)"
    return f"{body} ({'bound at install' if pages is None else f'{pages} pages'})"


def _added_removed(kind: str, a: dict, b: dict, describe: Any, added: list, removed: list) -> list:
    """Record what only `b` has as added and what only `a` has as removed; return the keys of both."""
    for k in sorted(set(b) - set(a)):
        added.append(Change(kind, k, describe(b[k])))
    for k in sorted(set(a) - set(b)):
        removed.append(Change(kind, k, describe(a[k])))
    return sorted(set(a) & set(b))


def _diff_rules(old: dict, new: dict, added: list, removed: list, changed: list) -> None:
    o_rules, n_rules = _rule_records(old), _rule_records(new)
    for name in _added_removed("rule", o_rules, n_rules, _rule_summary, added, removed):
        a, b = o_rules[name], n_rules[name]
        details: list[str] = []
        ta, tb = a["trigger"], b["trigger"]
        if ta["kind"] != tb["kind"]:
            details.append(f"trigger: {a['trigger_text']} -> {b['trigger_text']}")
        else:
            for k in sorted(set(ta) | set(tb)):
                if k in ("kind", "regions"):
                    continue
                if ta.get(k) != tb.get(k):
                    details.append(f"trigger {k}: {_fmt(ta.get(k))} -> {_fmt(tb.get(k))}")
            if ta.get("regions") != tb.get("regions"):
                details.append(f"trigger regions: {', '.join(ta.get('regions', []))} -> "
                               f"{', '.join(tb.get('regions', []))}")
            for region in sorted(set(a["region_extents"]) & set(b["region_extents"])):
                ea, eb = a["region_extents"][region], b["region_extents"][region]
                if ea != eb:
                    details.append(f"region {region}: {_extents_text(ea)} -> {_extents_text(eb)}")
        if a["condition"] != b["condition"]:
            details.append(f"condition: {a['condition_text']} -> {b['condition_text']}")
        for region in sorted(set(a["condition_regions"]) & set(b["condition_regions"])):
            ea, eb = a["condition_regions"][region], b["condition_regions"][region]
            if ea != eb:
                details.append(f"condition region {region}: {_extents_text(ea)} -> {_extents_text(eb)}")
        if a["verdict"] != b["verdict"]:
            details.append(f"verdict: {_verdict_text(a['verdict'])} -> {_verdict_text(b['verdict'])}")
        if a["actions"] != b["actions"]:
            ia = [action_text(x) for x in a["actions"]]
            ib = [action_text(x) for x in b["actions"]]
            gone, came = Counter(ia) - Counter(ib), Counter(ib) - Counter(ia)
            for text in ia:
                if gone[text]:
                    gone[text] -= 1
                    details.append(f"action removed: {text}")
            for text in ib:
                if came[text]:
                    came[text] -= 1
                    details.append(f"action added: {text}")
            if Counter(ia) == Counter(ib):
                details.append("actions reordered: " + "; ".join(ib))
        if a["priority"] != b["priority"]:
            details.append(f"priority: {a['priority']} -> {b['priority']}")
        if details:
            changed.append(Change("rule", name, tuple(details)))


# ---------------------------------------------------------------- monitors, views, responses

def _monitor_map(plan: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in plan.get("monitors", {}).items():
        if name == "write_ctrlreg":
            for m in value:
                out[f"write_ctrlreg {m['index']}"] = {k: v for k, v in m.items() if k != "index"}
        elif name == "mov_to_msr":
            for m in value:
                label = f"mov_to_msr {m['msr']}" + (f" ({m['name']})" if m.get("name") else "")
                out[label] = {k: v for k, v in m.items() if k not in ("msr", "name")}
        else:
            out[name] = value
    return out


def _describe(value: Any) -> tuple[str, ...]:
    if isinstance(value, dict):
        return tuple(f"{k}: {_fmt(v)}" for k, v in sorted(value.items()))
    return () if value is True else (_fmt(value),)


def _diff_monitors(old: dict, new: dict, added: list, removed: list, changed: list) -> None:
    a, b = _monitor_map(old), _monitor_map(new)
    for k in _added_removed("monitor", a, b, _describe, added, removed):
        if a[k] != b[k]:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                details = _field_changes(a[k], b[k])
            else:
                details = [f"{_fmt(a[k])} -> {_fmt(b[k])}"]
            changed.append(Change("monitor", k, tuple(details)))


def _view_map(plan: dict) -> dict[str, tuple[dict, dict[str, dict]]]:
    return {f"{v['id']} ({v['role']})": (v, {r["region"]: r for r in v.get("ranges", [])})
            for v in plan.get("views", [])}


def _view_text(entry: tuple[dict, dict]) -> tuple[str, ...]:
    view, ranges = entry
    return tuple([f"default {view['default_access']}"] +
                 [f"range {n}: {_range_text(r)}" for n, r in sorted(ranges.items())])


def _range_text(r: dict) -> str:
    return f"allows {r['access']}, traps {r['traps']}, rules {', '.join(r['rules'])}"


def _diff_views(old: dict, new: dict, added: list, removed: list, changed: list) -> None:
    a, b = _view_map(old), _view_map(new)
    for k in _added_removed("view", a, b, _view_text, added, removed):
        (va, ra), (vb, rb) = a[k], b[k]
        details = _field_changes({x: y for x, y in va.items() if x != "ranges"},
                                 {x: y for x, y in vb.items() if x != "ranges"})
        for region in sorted(set(rb) - set(ra)):
            details.append(f"range {region} added: {_range_text(rb[region])}")
        for region in sorted(set(ra) - set(rb)):
            details.append(f"range {region} removed: {_range_text(ra[region])}")
        for region in sorted(set(ra) & set(rb)):
            x, y = ra[region], rb[region]
            if x["access"] != y["access"] or x["traps"] != y["traps"]:
                details.append(f"range {region}: allows {x['access']} (traps {x['traps']}) -> "
                               f"allows {y['access']} (traps {y['traps']})")
            if x["rules"] != y["rules"]:
                details.append(f"range {region} rules: {', '.join(x['rules'])} -> {', '.join(y['rules'])}")
        pa, pb = view_pages(old, va), view_pages(new, vb)
        if details and pa != pb:
            details.append(f"pages restricted: {pa[0]} -> {pb[0]}")
        if details:
            changed.append(Change("view", k, tuple(details)))


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and "flags" not in value:
        for k, v in value.items():
            _flatten(f"{prefix} {k}".strip(), v, out)
    else:
        out[prefix] = value


def _diff_responses(old: dict, new: dict, added: list, removed: list, changed: list) -> None:
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten("", old.get("responses", {}), a)
    _flatten("", new.get("responses", {}), b)
    # A trigger kind appearing or vanishing is already told by its rules; only report changed answers.
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                details = _field_changes(a[k], b[k])
            else:
                details = [f"{_fmt(a[k])} -> {_fmt(b[k])}"]
            changed.append(Change("response", k, tuple(details)))
