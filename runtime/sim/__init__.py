"""The simulated Xen and its guest (installed as policyc.runtime.sim).

Stage: a stand-in for a Xen host and its guest, for tests, policy-test scenarios and the chaos harness.
May import: the runtime and policyc.native; the compiler's stages only in `scenario`/`chaos`, to compile.

`SimulatedXen` (xen.py) is a `policyc.runtime.backend.Backend` with Xen
4.17's semantics, caveats included; `Guest` (guest.py) is the machine it
runs; `layouts` builds guests as a booted kernel leaves them; `scenario`
loads SCENARIOS.md files and runs their steps against a responder.
"""

from .guest import Guest, GuestFault, VCpu
from .layout_pages import parse_size
from .layouts import build_bare, build_guest, build_linux_x86_64
from .xen import PROFILES, Op, SimulatedXen, echo_responder, echo_response

__all__ = ["Guest", "GuestFault", "VCpu", "SimulatedXen", "Op", "PROFILES", "echo_response",
           "echo_responder", "build_guest", "build_bare", "build_linux_x86_64", "parse_size"]
