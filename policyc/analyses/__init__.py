"""Analyses over a lowered plan: the plan's "analyses" section and diagnostics PC502-PC506.

Stage: after lowering, over the plan being built: reports (the plan's "analyses") and diagnostics.
May import: the compiler's model, diagnostics, targets and (today, for the view layout) lower.

`run_analyses` runs four passes, in this order:

1. views       (views.py)      the view layout report: contexts (`cr3 == K` rules), which view serves
                               each, merges and their extra trap cost, the monitors the layout needs.
                               The layout itself is made during lowering (`lower.layout_views` calls
                               `views.layout`, which emits PC502); here it is recomputed, without
                               diagnostics, for the report (or the lowering's is reused when it was
                               made from the same usable rules and breakpoint strategy).
2. conflicts   (conflicts.py)  allow/deny pairs nothing tells apart (PC503 error); rules that can
                               never match or have no effect (PC504 warning)
3. livelock    (livelock.py)   a state graph of faults and responses; a cycle is an access that
                               never completes (PC505 error)
4. collateral  (collateral.py) per watched region, bytes trapped vs bytes watched and the expected
                               share of events no rule claims (PC506 note above 90%)

Each pass reads the plan and the checked policy and never changes the plan. The
section is plain JSON: deterministic (sorted, no sets, no machine state), addresses
as hex strings, counts as integers, shares as floats computed from integers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_analyses", "usable_rules"]


def usable_rules(plan: dict) -> set[str]:
    """The rules the lowering kept: those in the plan's dispatch tables."""
    names: set[str] = set()
    for table in plan.get("dispatch", {}).values():
        groups = table.values() if isinstance(table, dict) else [table]
        for entries in groups:
            names.update(e["rule"] for e in entries)
    return names


def run_analyses(plan: dict, policy: Any, target: Any, diagnostics: Any, *, layout: tuple | None = None,
                 report: bool = True) -> dict:
    """The plan's "analyses" section, diagnostics to `diagnostics` (None: none). `layout`: the lowering's
    (usable rules, shadow breakpoints, views.Layout), reused when the plan's inputs are the same.
    `report=False` (policyc check, which throws the plan away) computes only what diagnostics are made
    from: the section then holds the findings, not the figures (no views report, no collateral runs)."""
    from . import collateral, conflicts, livelock, views

    usable = usable_rules(plan)
    shadow = plan.get("strategies", {}).get("breakpoint") == "int3-shadow-frame"
    findings = {
        "conflicts": conflicts.analyse(plan, policy, usable, diagnostics),
        "livelock": livelock.analyse(plan, policy, target, diagnostics, report=report),
        "collateral": collateral.analyse(policy, target, usable, diagnostics, report=report),
    }
    if not report:
        return findings
    if layout is not None and layout[0] == usable and layout[1] == shadow:
        made = layout[2]
    else:
        made = views.layout(policy, target, usable=usable, shadow_breakpoints=shadow, diagnostics=None)
    view_report = dict(made.report)
    # The layout the lowering put in the plan, recomputed: a mismatch means the plan's views were changed
    # after layout (by hand or by a later pass), and this report describes the recomputed layout.
    keys = ("id", "role", "contexts", "default_access", "ranges")
    view_report["matches_plan"] = [{k: v.get(k) for k in keys} for v in made.views] == \
        [{k: v.get(k) for k in keys} for v in plan.get("views", [])]
    return {"order": ["views", "conflicts", "livelock", "collateral"], "views": view_report, **findings}
