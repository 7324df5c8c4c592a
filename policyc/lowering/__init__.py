"""The lowering: a checked policy made into a trap plan's sections for one target.

Stage: checked model -> the plan's regions, views, monitors, breakpoints, dispatch, responses (`PASSES`).
May import: model, diagnostics, targets, arch, plan_expr, gc_pause; never the analyses, the plan file form or the runtime.
"""

from .trap_plan import PASSES, PLAN_FORMAT, PLAN_VERSION, Lowering, lower
from .views import VIEW_HOST, VIEW_RESTRICTED, VIEW_UNRESTRICTED, Layout

__all__ = ["PASSES", "PLAN_FORMAT", "PLAN_VERSION", "Lowering", "lower", "Layout", "VIEW_HOST",
           "VIEW_UNRESTRICTED", "VIEW_RESTRICTED"]
