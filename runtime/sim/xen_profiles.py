"""The hosts the simulated Xen can be: what each profile offers (mem_access, altp2m, single-step,
emulation, monitors), the default length of each simulated instruction, and the CPUID a guest sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...native.constants import DESC_INDEX
from ...targets import TARGETS, runs_on

@dataclass(frozen=True)
class Profile:
    name: str
    x86: bool
    mem_access: bool
    altp2m: bool
    singlestep: bool
    monitors: frozenset[str]
    write_implies_read: bool     # VMX (and SVM) report writes as W|R; ARM reports W
    arch: str = ""               # what the host reports (Capabilities.arch); the name when empty


# The monitors among a target's capabilities (single-stepping is one where the host has MTF).
_MONITORS = ("write_ctrlreg", "mov_to_msr", "software_breakpoint", "descriptor_access", "cpuid", "guest_request",
             "debug_exception", "privileged_call", "singlestep")


def _host_capabilities(name: str) -> tuple[frozenset[str], str]:
    """What the host a target is named after can do, and the architecture it reports. One table says
    it (`policyc.targets.TARGETS`); a target that runs on another's host (x86_64-nomtf on x86_64) is that
    host without what the target lacks for want of the hardware: VT-x without MTF keeps EPT and altp2m,
    it only cannot step (the plan avoids altp2m because a step-over needs MTF, not because it is gone)."""
    host = next((h for h in TARGETS if h != name and runs_on(name, h)), None)
    if host is None:
        return TARGETS[name].capabilities, ""
    return TARGETS[host].capabilities - {"singlestep", "fast_singlestep"}, host


def _profile(name: str) -> Profile:
    caps, arch = _host_capabilities(name)
    x86 = "write_ctrlreg" in caps        # the x86 monitors every x86 target has
    return Profile(name, x86, "mem_access" in caps, "altp2m" in caps, "singlestep" in caps,
                   frozenset(m for m in _MONITORS if m in caps), write_implies_read=x86, arch=arch)


PROFILES: dict[str, Profile] = {name: _profile(name) for name in TARGETS}

# Default instruction lengths per operation (bytes): mov r/m64, NOP, mov cr, wrmsr,
# lidt [m], cpuid, int3, vmcall, icebp, smc; a single-step trap is no instruction of its own.
INSN_LENGTH = {"read": 4, "write": 4, "rmw": 5, "exec": 1, "write_cr": 3, "wrmsr": 2,
               "lidt": 3, "lgdt": 3, "sidt": 3, "sgdt": 3, "lldt": 3, "ltr": 3, "sldt": 3, "str": 3,
               "cpuid": 2, "int3": 1,
               "guest_request": 3, "icebp": 1, "trap_flag": 0, "smc": 4,
               "remap": 4}
# The descriptor-table instructions: (VM_EVENT_DESC_* index, a load, the identity VMX's instruction
# information gives it in bits 29:28: SGDT/SIDT/LGDT/LIDT, SLDT/STR/LLDT/LTR).
_IDTR, _GDTR, _LDTR, _TR = (DESC_INDEX[n] for n in ("idtr", "gdtr", "ldtr", "tr"))
DESC_OPS = {"sgdt": (_GDTR, False, 0), "sidt": (_IDTR, False, 1), "lgdt": (_GDTR, True, 2), "lidt": (_IDTR, True, 3),
            "sldt": (_LDTR, False, 0), "str": (_TR, False, 1), "lldt": (_LDTR, True, 2), "ltr": (_TR, True, 3)}
X86_ONLY = frozenset({"write_cr", "wrmsr", *DESC_OPS, "cpuid", "int3", "icebp",
                      "trap_flag"})


def cpuid_values(leaf: int, subleaf: int, profile: Profile) -> tuple[int, int, int, int]:
    """A small, plausible guest CPUID (what Xen's policy would give a PVH/HVM guest)."""
    if leaf == 0:
        vendor = "GenuineIntel" if profile.name == "x86_64" else "AuthenticAMD"
        b, d, c = _regs4(vendor)
        return 0xD, b, c, d
    if leaf == 1:
        return 0x000906EA, 0x00000800, 0xFEDA3203 | (1 << 31), 0x178BFBFF
    if leaf == 7 and subleaf == 0:
        return 0, (1 << 7) | (1 << 20) | (1 << 0), 0, 0       # SMEP, SMAP, FSGSBASE
    if leaf == 0x40000000:
        b, c, d = _regs4("XenVMMXenVMM")
        return 0x40000005, b, c, d
    if leaf == 0x80000000:
        return 0x80000008, 0, 0, 0
    if leaf == 0x80000001:
        return 0, 0, 0x121, 0x2C100800                         # LM, NX, SYSCALL
    return 0, 0, 0, 0


def _regs4(text: str) -> tuple[int, int, int]:
    raw = text.encode("ascii")
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]
