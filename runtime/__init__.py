"""The enforcer (installed as policyc.runtime): a trap plan bound to a guest, installed, enforced.

Stage: the last one: a loaded plan -> bound to a guest -> installed -> every vm_event answered.
May import: policyc.native and the compiler's shared facts (arch, targets, symbols, condition_form, errors),
never its stages (dsl, yaml_form, check, lower: a host runs plans without them); `sim` may, for scenarios.

The public API, and all of it:

``Backend``
    The hypervisor protocol (XenBackend on a dom0, SimulatedXen everywhere else).
``bind_plan(plan, backend, symbols, *, ...) -> BoundPlan``
    A loaded plan resolved against one guest (slide found, regions translated to frames).
``install(bound, backend, *, ...) -> Installation``
    The bound plan installed as one journalled transaction (rolled back on any failure).
``DecisionEngine``
    The reference interpreter: a request in, the response and decision record out.
``Enforcer``
    start / service / run / stop: the product's main loop over the above.
``SimulatedXen``
    A simulated Xen 4.17 domain (`policyc.runtime.sim`), a `Backend` for tests and scenarios.
"""

from __future__ import annotations

from typing import Any

# `install` is also the name of the module defining it: bound here, at import, so that the name is the
# function whichever of the two is imported first (a submodule import sets the package's attribute).
from .install import install

__all__ = ["Backend", "bind_plan", "install", "DecisionEngine", "Enforcer", "SimulatedXen"]


def __getattr__(name: str) -> Any:
    # Resolved on first use: importing one runtime module (the CLI does) loads the package first, and
    # must not load the enforcer, the decision engine and the simulator with it.
    if name == "Backend":
        from .backend import Backend as value
    elif name == "bind_plan":
        from .bind import bind_plan as value
    elif name == "DecisionEngine":
        from .decide import DecisionEngine as value
    elif name == "Enforcer":
        from .enforce import Enforcer as value
    elif name == "SimulatedXen":
        from .sim.xen import SimulatedXen as value
    else:
        raise AttributeError(f"module 'policyc.runtime' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
