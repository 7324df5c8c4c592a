"""policyc: a declarative policy compiler and enforcer for VMI on Xen.

Stage: the package root, the compiler's public surface (source -> checked model -> trap plan).
May import: its own stages, lazily, for the names below; nothing of policyc's imports it.

The public API, and all of it (anything else may change without notice):

``check_policy(path, diagnostics, *, target_arch=None) -> Policy | None``
    Check a policy file (DSL or YAML) with its includes. Every problem is added to `diagnostics`
    (a `Diagnostics`, which keeps them in order); the checked model comes back only when there were
    no errors, else None. The diagnostics are the caller's: one collection can gather several files.
``compile_plan(policy, diagnostics, *, target=None, sealed=True) -> dict | None``
    Lower a checked policy into a trap plan (plain JSON data) for a target (default: the policy's).
``load_plan(path) -> dict``
    Read a plan file and validate it (schema, references, content hash); raises `PlanError`.
``Diagnostic``, ``Diagnostics``
    One problem (code, severity, span, message, hint), and the ordered collection of them.
``PolicycError``, ``PlanError``
    The root of every error policyc raises, and the plan loader's.

The stages, one module (or package) each: `dsl` / `yaml_form` (text -> syntax tree), `check` (syntax tree ->
checked `model.Policy`), `compiler` (model -> trap plan: `lowering`'s passes, then `analyses`), `plan` (the plan's schema, hash and file form),
`fmt` (syntax tree -> text); the enforcer is `policyc.runtime`.
"""

from __future__ import annotations

from typing import Any

from .version import __version__

__all__ = ["__version__", "check_policy", "compile_plan", "load_plan", "Diagnostic", "Diagnostics",
           "PolicycError", "PlanError"]


def __getattr__(name: str) -> Any:
    # Resolved on first use: `import policyc` (which every `policyc.*` import runs) stays cheap for the
    # CLI and the runtime, which need none of the compiler.
    if name == "check_policy":
        from .check import check_policy as value
    elif name == "compile_plan":
        from .compiler import compile_plan as value
    elif name == "load_plan":
        from .plan import load_plan as value
    elif name == "PlanError":
        from .plan import PlanError as value
    elif name in ("Diagnostic", "Diagnostics"):
        from . import diagnostics
        value = getattr(diagnostics, name)
    elif name == "PolicycError":
        from .errors import PolicycError as value
    else:
        raise AttributeError(f"module 'policyc' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
