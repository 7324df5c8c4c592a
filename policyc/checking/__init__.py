"""The checker: the syntax trees of a policy and its includes checked into one `policyc.model.Policy`.

Stage: syntax trees -> the checked model, every problem a diagnostic (`PASSES`, over one `Checking` context).
May import: syntax, model, diagnostics, source, symbols, arch, plan (format bounds), plan_expr, condition_form, gc_pause; never the lowering, the analyses or the runtime.
"""

from .checker import PASSES, check_file_tree, check_policy, run
from .context import Checking, Unit
from .gather import gather_files, included_files
from .settings import SUPPORTED_XEN

__all__ = ["PASSES", "Checking", "Unit", "check_policy", "check_file_tree", "run", "gather_files",
           "included_files", "SUPPORTED_XEN"]
