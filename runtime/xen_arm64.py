"""What Xen on arm64 does differently for the libxenctrl backend (runtime/xen_backend.py), measured in
the arm64 lab (tests/lab/lab_arm64.sh): registers come from a vcpu_guest_context (Arm keeps no HVM
save records), and stage-2 access is set over ranges (Arm has no XENMEM_access_op_set_access_multi)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["ARM64_VCPU_CONTEXT", "ARM64_VCPU_CONTEXT_SIZE", "ARM64_VCPU_CONTEXT_C", "registers_from_arm64_context",
           "access_runs"]

# struct vcpu_guest_context of xen/arch-arm.h (aarch64), as xc_vcpu_getcontext fills it: field ->
# (offset, size). Arm has no HVM save records, so this is where an arm64 vCPU's registers come from.
# tests/test_xen_backend.py checks every offset against Debian's libxen-dev:arm64 headers.
ARM64_VCPU_CONTEXT: dict[str, tuple[int, int]] = {
    **{f"x{i}": (8 + 8 * i, 8) for i in range(31)},
    "pc": (256, 8), "cpsr": (264, 8), "sp_el0": (296, 8), "sp_el1": (304, 8), "elr_el1": (312, 8),
    "sctlr": (320, 8), "ttbcr": (328, 8), "ttbr0": (336, 8), "ttbr1": (344, 8),
}
ARM64_VCPU_CONTEXT_SIZE = 352
# The C spelling of each field, for the header check.
ARM64_VCPU_CONTEXT_C = {**{f"x{i}": f"user_regs.x{i}" for i in range(31)}, "pc": "user_regs.pc64",
                        "cpsr": "user_regs.cpsr", "sp_el0": "user_regs.sp_el0", "sp_el1": "user_regs.sp_el1",
                        "elr_el1": "user_regs.elr_el1", "sctlr": "sctlr", "ttbcr": "ttbcr", "ttbr0": "ttbr0",
                        "ttbr1": "ttbr1"}


def registers_from_arm64_context(blob: bytes) -> dict[str, int]:
    """The backend's arm64 register names (the request's ttbr0/ttbr1/ttbcr/pc/cpsr, plus x0..x30, the
    stack pointers, ELR_EL1 and SCTLR_EL1) from a vcpu_guest_context."""
    return {name: int.from_bytes(blob[off:off + size], "little") for name, (off, size) in ARM64_VCPU_CONTEXT.items()}


def access_runs(gfns: Sequence[int], codes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first gfn, count, access code) for each run of consecutive frames with the same access, in gfn
    order: what xc_set_mem_access (one access over a range) takes."""
    runs: list[tuple[int, int, int]] = []
    for g, c in sorted(zip(gfns, codes)):
        if runs and runs[-1][2] == c and runs[-1][0] + runs[-1][1] == g:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, c)
        elif not (runs and runs[-1][0] + runs[-1][1] > g):       # a repeated gfn is set once (the lowest code)
            runs.append((g, 1, c))
    return runs
