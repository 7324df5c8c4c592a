"""policyc: a declarative policy compiler and enforcer for VMI on Xen.

The stages, one module each: `dsl` / `yaml_form` (text -> syntax tree),
`check` (syntax tree -> checked `model.Policy`), `fmt` (syntax tree -> text).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "check_policy"]


def check_policy(path, diagnostics=None, *, target_arch=None):
    """Check a policy file; returns (policy or None, diagnostics)."""
    from .check import check_policy as _check
    from .diagnostics import Diagnostics

    diagnostics = diagnostics if diagnostics is not None else Diagnostics()
    return _check(path, diagnostics, target_arch=target_arch), diagnostics
