"""Analyses over a lowered plan: the plan's "analyses" section and diagnostics PC502-PC506.

Stage: after lowering, over the plan being built: reports (the plan's "analyses") and diagnostics.
May import: the compiler's model, diagnostics, targets and the lowering (its view layout and geometry).

`run_analyses` runs four passes, in this order:

1. views       (views.py)      the view layout report: contexts (`cr3 == K` rules), which view serves
                               each, merges and their extra trap cost, the monitors the layout needs.
                               The layout itself is made once, during lowering
                               (`policyc.lowering.views.layout`, which emits PC502); this pass
                               reports it.
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

from ..lowering import views
from . import collateral, conflicts, livelock

__all__ = ["run_analyses", "usable_rules"]


def usable_rules(plan: dict) -> set[str]:
    """The rules the lowering kept: those in the plan's dispatch tables."""
    names: set[str] = set()
    for table in plan.get("dispatch", {}).values():
        groups = table.values() if isinstance(table, dict) else [table]
        for entries in groups:
            names.update(e["rule"] for e in entries)
    return names


def run_analyses(plan: dict, policy: Any, target: Any, diagnostics: Any, *, layout: views.Layout,
                 report: bool = True) -> dict:
    """The plan's "analyses" section, diagnostics to `diagnostics` (None: none). `layout`: the view
    layout the lowering made the plan's views from (`Lowering.layout`): its report is the views pass.
    `report=False` (policyc check, which throws the plan away) computes only what diagnostics are made
    from: the section then holds the findings, not the figures (no views report, no collateral runs)."""
    usable = usable_rules(plan)
    findings = {
        "conflicts": conflicts.analyse(plan, policy, usable, diagnostics),
        "livelock": livelock.analyse(plan, policy, target, diagnostics, report=report),
        "collateral": collateral.analyse(policy, target, usable, diagnostics, report=report),
    }
    if not report:
        return findings
    view_report = dict(layout.report)
    # False when the plan's views were changed after the layout was made (by a later pass, or by hand in
    # a test): the report then describes the layout, not the plan.
    keys = ("id", "role", "contexts", "default_access", "ranges")
    view_report["matches_plan"] = [{k: v.get(k) for k in keys} for v in layout.views] == \
        [{k: v.get(k) for k in keys} for v in plan.get("views", [])]
    return {"order": ["views", "conflicts", "livelock", "collateral"], "views": view_report, **findings}
