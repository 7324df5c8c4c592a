"""Helpers shared by the tests of more than one guest layout.

Imported as ``helpers``: tests/ is not a package, so pytest's default import mode puts this folder
on sys.path for the test modules.
"""

from __future__ import annotations

import json

from policyc.runtime.sim import SimulatedXen

PAGE = 4096


def expected_frames(xen: SimulatedXen, va: int, size: int) -> list[tuple[int, int, int]]:
    """(gfn, first, last) per page of [va, va+size), by the simulated hardware's walker.

    The binders' walkers are what the tests check, so the expectation comes from `Guest.walk`,
    separate code from them."""
    out = []
    cr3 = xen.vcpu(0).cr3
    end = va + size
    while va < end:
        n = min(end - va, PAGE - (va & (PAGE - 1)))
        pa = xen.guest.walk(cr3, va).pa
        out.append((pa >> 12, pa & 0xFFF, (pa & 0xFFF) + n - 1))
        va += n
    return out


def reads_missing_field(plan: dict, placeholder: str, missing: str) -> dict:
    """The plan with `placeholder` register reads turned into reads of `missing`, a field Xen's request
    does not carry. The checker refuses such a policy, but a plan from another compiler version (or an
    edited one) may still hold one: the engine must answer anyway."""
    text = json.dumps(plan).replace(json.dumps(["field", placeholder]), json.dumps(["field", missing]))
    return json.loads(text)


def start_simhost(scenario, socket_path: str):
    """`python -m policyc.runtime.sim.host SCENARIO --forever --no-start` on `socket_path`, once it serves."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "policyc.runtime.sim.host", str(scenario), "--socket",
                             socket_path, "--forever", "--no-start"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc
