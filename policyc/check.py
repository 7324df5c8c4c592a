"""The checker's public entry points; the checker itself is the package `policyc.checking`.

`check_policy(path, diagnostics)` -> the checked `Policy`, or None when there were errors.
"""

from .checking import SUPPORTED_XEN, check_file_tree, check_policy, gather_files, included_files

__all__ = ["check_policy", "check_file_tree", "included_files", "gather_files", "SUPPORTED_XEN"]
