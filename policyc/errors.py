"""The one root of every error policyc raises as an exception: `PolicycError`.

A policy's own problems are values (`diagnostics.Diagnostic`, with a position), never exceptions.
What is raised instead is a failure to go on: a plan that does not load, a bundle that does not
verify, a plan that does not bind to the guest, a hypervisor call that fails, an install or a
teardown that cannot complete, a scenario or trace that does not parse. Each of those has its own
class (near the code that raises it, e.g. `policyc.plan.PlanError`,
`policyc.runtime.backend.BackendError`), and every one of them is a `PolicycError`, so a caller
that only needs "policyc refused" catches one class. Classes that were an `OSError`, `ValueError`,
`RuntimeError` or `ImportError` before stay one as well (existing `except` clauses keep working).

This module imports nothing of policyc's: every stage, compiler or runtime, may import it.
"""

from __future__ import annotations

__all__ = ["PolicycError"]


class PolicycError(Exception):
    """Something policyc (the compiler's loaders or the runtime) could not do; the message says what."""
