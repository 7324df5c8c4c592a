"""The simulated AArch64 guest: its vCPUs and the hardware's stage-1 walk.

`Arm64Guest` is a `Guest` (sparse memory, frames, holes, symbols) whose
vCPUs are `Arm64VCpu`s and whose guest-physical RAM starts where Xen puts an
arm64 domU's first bank, GUEST_RAM0_BASE = 0x40000000 (xen/include/public/
arch-arm.h:454 at RELEASE-4.17.7); the frames below it are a hole.

Every access the guest makes is translated by `runtime.paging_arm64` with
the vCPU's own TTBR0_EL1, TTBR1_EL1, TCR_EL1 and SCTLR_EL1, reading the
descriptors out of guest memory each time (no TLB). `walk_vcpu` returns the
translation together with the table frames it read, so the hypervisor can
check its stage-2 permissions on them (a stage-2 fault on a table read is a
"fault in the guest page tables", reported before any stage-1 fault); a
stage-1 fault raises `Arm64TranslationFault`, which carries the synchronous
exception the guest takes (a data or instruction abort with its ESR_EL1 and
FAR_EL1).

Registers. The names are those of Xen's arm64 vCPU context
(`struct vcpu_guest_context`: x0..x30, sp_el0, sp_el1, pc, cpsr, spsr_el1,
elr_el1, sctlr, ttbcr = TCR_EL1, ttbr0, ttbr1). The simulator also keeps
vbar_el1, tpidr_el1, far_el1 and esr_el1, which Xen 4.17's
XEN_DOMCTL_getvcpucontext does not return: a production backend cannot
offer them, so nothing may depend on them alone (binding treats VBAR_EL1 as
optional evidence).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..guest_memory import FRAME_SHIFT
from ..paging import WalkStep
from ..paging_arm64 import LINUX_TCR_48, PSTATE_PAN, SCTLR_M, Stage1Fault, Stage1Tables, Translation
from .guest import Guest, GuestFault, TranslationFault, Walk

__all__ = ["Arm64VCpu", "Arm64Guest", "Arm64TranslationFault", "GUEST_RAM0_BASE", "EC_DABT_CUR", "EC_IABT_CUR",
           "EC_DABT_LOW", "EC_IABT_LOW", "EC_PC_ALIGN", "CPSR_EL1H", "ARM64_REGISTERS"]

GUEST_RAM0_BASE = 0x4000_0000

# Exception classes (ESR_ELx.EC) of the synchronous exceptions the walk can cause.
EC_IABT_LOW, EC_IABT_CUR = 0x20, 0x21
EC_PC_ALIGN = 0x22
EC_DABT_LOW, EC_DABT_CUR = 0x24, 0x25
_ESR_IL = 1 << 25            # a 32-bit instruction
_ESR_WNR = 1 << 6

#: PSTATE of a kernel running on SP_EL1 with interrupts unmasked and PAN set (Linux enables PAN).
CPSR_EL1H = 0b0101 | PSTATE_PAN

_XREGS = tuple(f"x{i}" for i in range(31))
_CORE = ("sp_el0", "sp_el1", "cpsr", "spsr_el1", "elr_el1")
_SYSREGS = {"ttbr0": "ttbr0", "ttbr1": "ttbr1", "ttbcr": "tcr", "sctlr": "sctlr",
            "vbar_el1": "vbar", "tpidr_el1": "tpidr_el1", "far_el1": "far", "esr_el1": "esr"}
_ALIASES = {"tcr": "ttbcr", "tcr_el1": "ttbcr", "sctlr_el1": "sctlr", "ttbr0_el1": "ttbr0",
            "ttbr1_el1": "ttbr1", "vbar": "vbar_el1", "sp": "sp_el1", "lr": "x30"}
#: Every register name `Arm64VCpu.registers()` returns.
ARM64_REGISTERS = _XREGS + _CORE + ("pc",) + tuple(_SYSREGS)
_MASK = (1 << 64) - 1


class Arm64TranslationFault(TranslationFault):
    """A stage-1 fault on the guest's own walk: the guest takes ``fault`` (a data or instruction abort).
    ``reads`` are the descriptors read, as ``(table gfn, byte offset)``; ``stage1`` the walker's fault."""

    def __init__(self, fault: GuestFault, reads: list[tuple[int, int]], stage1: Stage1Fault | None) -> None:
        super().__init__(fault, reads)
        self.stage1 = stage1


class Arm64VCpu:
    """One AArch64 vCPU at EL1 (or EL0). ``rip`` holds the PC: the hypervisor's generic code calls the
    instruction pointer that."""

    __slots__ = ("index", "x", "sp_el0", "sp_el1", "rip", "cpsr", "spsr_el1", "elr_el1", "ttbr0", "ttbr1",
                 "tcr", "sctlr", "vbar", "tpidr_el1", "far", "esr", "msrs", "faults")

    def __init__(self, index: int) -> None:
        self.index = index
        self.x = [0] * 31
        self.sp_el0 = 0
        self.sp_el1 = 0
        self.rip = 0
        self.cpsr = CPSR_EL1H
        self.spsr_el1 = 0
        self.elr_el1 = 0
        self.ttbr0 = 0
        self.ttbr1 = 0
        self.tcr = LINUX_TCR_48
        self.sctlr = SCTLR_M
        self.vbar = 0
        self.tpidr_el1 = 0
        self.far = 0
        self.esr = 0
        self.msrs: dict[int, int] = {}        # none on AArch64; kept empty for code that looks MSRs up
        self.faults: list[GuestFault] = []

    # What x86 code calls the per-process table root: TTBR0_EL1 here (the kernel half, TTBR1, is shared).
    @property
    def cr3(self) -> int:
        return self.ttbr0

    @cr3.setter
    def cr3(self, value: int) -> None:
        self.ttbr0 = value & _MASK

    @property
    def pc(self) -> int:
        return self.rip

    @property
    def el(self) -> int:
        """The exception level PSTATE.M says the vCPU runs at (0 or 1)."""
        return (self.cpsr >> 2) & 0b11

    @property
    def pan(self) -> bool:
        return bool(self.cpsr & PSTATE_PAN)

    # -- named access ----------------------------------------------------------------------------
    def get(self, name: str) -> int:
        name = _ALIASES.get(name, name)
        if name == "pc":
            return self.rip
        if name in _SYSREGS:
            return getattr(self, _SYSREGS[name])
        if name in _CORE:
            return getattr(self, name)
        if name.startswith("x") and name[1:].isdigit() and int(name[1:]) < 31:
            return self.x[int(name[1:])]
        raise KeyError(f"no register '{name}'")

    def set(self, name: str, value: int) -> None:
        value &= _MASK
        name = _ALIASES.get(name, name)
        if name == "pc":
            self.rip = value
        elif name in _SYSREGS:
            setattr(self, _SYSREGS[name], value)
        elif name in _CORE:
            setattr(self, name, value)
        elif name.startswith("x") and name[1:].isdigit() and int(name[1:]) < 31:
            self.x[int(name[1:])] = value
        else:
            raise KeyError(f"no register '{name}'")

    def registers(self) -> dict[str, int]:
        """Every register by name (what `Backend.get_registers` returns for this vCPU)."""
        out = dict(zip(_XREGS, self.x))
        for name in _CORE:
            out[name] = getattr(self, name)
        out["pc"] = self.rip
        for name, attr in _SYSREGS.items():
            out[name] = getattr(self, attr)
        return out

    def tables(self, memory: Any) -> Stage1Tables:
        """This vCPU's translation regime over ``memory``."""
        return Stage1Tables(memory, self.ttbr1, self.ttbr0, tcr=self.tcr, sctlr=self.sctlr)

    def __repr__(self) -> str:
        return f"Arm64VCpu({self.index}, pc={self.rip:#x}, ttbr0={self.ttbr0:#x}, ttbr1={self.ttbr1:#x})"


def _reads(steps: tuple[WalkStep, ...] | list[WalkStep]) -> list[tuple[int, int]]:
    """The table reads of a walk as (table gfn, entry offset)."""
    return [(s.entry_address >> FRAME_SHIFT, s.entry_address & 0xFFF) for s in steps]


class Arm64Guest(Guest):
    """An AArch64 guest: RAM of ``memory_size`` bytes at ``ram_base``, ``vcpus`` Arm64VCpus."""

    arch = "arm64"

    def __init__(self, memory_size: int, vcpus: int = 1, *, ram_base: int = GUEST_RAM0_BASE,
                 spare_frames: int = 4096) -> None:
        if ram_base < 0 or ram_base & 0xFFF:
            raise ValueError(f"ram_base {ram_base:#x} must be a 4 KiB aligned guest-physical address")
        super().__init__(ram_base + memory_size, vcpus, spare_frames=spare_frames)
        self.memory_size = memory_size
        self.ram_base = ram_base
        self.holes = [(0, ram_base >> FRAME_SHIFT)] if ram_base else []
        self.vcpus = [Arm64VCpu(i) for i in range(vcpus)]   # type: ignore[misc]

    # -- translation --------------------------------------------------------------------------------
    def walk_vcpu(self, v: Arm64VCpu, va: int, access: str | None = None, *,
                  el: int | None = None) -> tuple[Translation, list[tuple[int, int]]]:
        """Translate ``va`` as vCPU ``v`` would for ``access`` ("read", "write", "exec"; None: no
        permission check) at its current exception level (or ``el``). Returns the translation and the
        table reads; raises `Arm64TranslationFault` with the abort the guest takes."""
        level = v.el if el is None else el
        try:
            t = v.tables(self.memory).translate(va, access, el=1 if level else 0, pan=v.pan)
        except Stage1Fault as exc:
            raise Arm64TranslationFault(self.abort(v, exc, access), _reads(exc.steps), exc) from None
        return t, _reads(t.steps)

    def abort(self, v: Arm64VCpu, exc: Stage1Fault, access: str | None) -> GuestFault:
        """The synchronous exception a stage-1 fault raises in the guest (and its ESR value)."""
        fetch = access == "exec"
        low = v.el == 0
        ec = (EC_IABT_LOW if low else EC_IABT_CUR) if fetch else (EC_DABT_LOW if low else EC_DABT_CUR)
        iss = exc.fsc | (_ESR_WNR if access == "write" else 0)
        name = f"{'instruction' if fetch else 'data'} abort ({exc.kind} fault, level {int(exc.level)})"
        return GuestFault(ec, name, ec << 26 | _ESR_IL | iss, exc.va)

    def walk(self, cr3: int, va: int, remap: Mapping[int, int] | None = None, *, write: bool = False,
             fetch: bool = False, wp: bool = True, nxe: bool = True) -> Walk:
        """The x86 walker's entry point, for code that only has a table root: ``cr3`` is taken as
        TTBR0_EL1 and the kernel half is translated with vCPU 0's TTBR1_EL1 (the same for every vCPU
        in Linux). No permission checks unless ``write``/``fetch``."""
        v = Arm64VCpu(-1)
        v0 = self.vcpus[0]
        v.ttbr0, v.ttbr1, v.tcr, v.sctlr, v.cpsr = cr3, v0.ttbr1, v0.tcr, v0.sctlr, v0.cpsr   # type: ignore[union-attr]
        access = "write" if write else "exec" if fetch else None
        t, reads = self.walk_vcpu(v, va, access)
        return Walk(va, t.pa, t.page_size, t.writable, t.executable, t.user, tuple(reads), t.descriptor_address)

    def read_virtual(self, cr3: int, va: int, size: int) -> bytes:
        return self._tables0(cr3).read_virtual(va, size)

    def write_virtual(self, cr3: int, va: int, data: bytes) -> None:
        self._tables0(cr3).write_virtual(va, data)

    def _tables0(self, ttbr0: int) -> Stage1Tables:
        v0 = self.vcpus[0]
        return Stage1Tables(self.memory, v0.ttbr1, ttbr0, tcr=v0.tcr, sctlr=v0.sctlr)  # type: ignore[union-attr]

    def virt_to_phys(self, cr3: int, va: int) -> int:
        return self._tables0(cr3).translate(va).pa

    def clone(self) -> "Arm64Guest":
        new = super().clone()
        assert isinstance(new, Arm64Guest)
        if hasattr(self, "page_tables"):
            v0 = new.vcpus[0]
            new.page_tables = v0.tables(new.memory)   # type: ignore[attr-defined, union-attr]
        return new
