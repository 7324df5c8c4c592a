"""The compiler's back half: a checked policy lowered for a target, analysed, warnings listed, sealed.

Stages, in order: `policyc.lowering.lower` (its `PASSES`), `policyc.analyses.run_analyses` (its
`ANALYSES`), then the plan's warnings and `policyc.plan.seal`. May import: lowering, analyses, plan.
"""

from __future__ import annotations

from . import model as M
from .analyses import run_analyses
from .diagnostics import Diagnostics
from .gc_pause import gc_paused
from .lowering import PLAN_FORMAT, PLAN_VERSION, lower
from .plan import seal
from .targets import TARGETS

__all__ = ["compile_plan", "PLAN_FORMAT", "PLAN_VERSION"]


def compile_plan(policy: M.Policy, diagnostics: Diagnostics, *, target: str | None = None,
                 sealed: bool = True, report: bool = True) -> dict | None:
    """Lower a checked policy for a target (default: the policy's). None when there were errors.

    `sealed=False` is for `policyc check`, which wants the diagnostics and throws the plan away: the
    policy hash and the plan's content hash (a canonical serialisation of each) are left out.
    `report=False`, for the same use, also leaves out whatever of the analyses' report no diagnostic
    is made from (`run_analyses(report=False)`): the diagnostics are the same, the plan is not one to
    keep."""
    arch = target or policy.target.arch
    if arch not in TARGETS:
        diagnostics.error("PC411", policy.span, f"unknown target '{arch}'", f"targets: {', '.join(TARGETS)}")
        return None
    with gc_paused():
        return _compile(policy, diagnostics, arch, sealed, report)


def _compile(policy: M.Policy, diagnostics: Diagnostics, arch: str, sealed: bool, report: bool) -> dict | None:
    errors_before = diagnostics.error_count
    seen_before = len(diagnostics.items)
    low = lower(policy, diagnostics, TARGETS[arch], sealed=sealed, report=report)
    plan = low.plan
    plan["analyses"] = run_analyses(plan, policy, low.target, diagnostics, layout=low.layout, report=report)
    if diagnostics.error_count != errors_before:
        return None
    own = sorted(diagnostics.items[seen_before:], key=lambda x: x.sort_key())
    plan["warnings"] = [{"code": w.code, "message": w.message, "at": low.at(w.span) if w.span else None}
                        for w in own if w.severity.value == "warning" and w.code.startswith("PC5")]
    return seal(plan) if sealed else plan
