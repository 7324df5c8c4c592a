"""The simulated guest: memory, vCPUs, registers and address translation.

The guest is what the simulated Xen (`policyc.runtime.sim.xen`) runs: sparse
guest-physical memory (`GuestMemory`), one or more x86-64 vCPUs with the
registers a booted kernel has, and a page walker that reads the 4-level
page tables out of guest memory on every access (no TLB: a page-table write
is seen at once, as `runtime/paging.py` documents).

The walker here is the hardware's, not the builder's: it reads each
paging-structure entry through the *view* the vCPU runs in (an altp2m view
may map a gfn to another frame, `change_gfn`), and it returns the
paging-structure frames it read so the hypervisor can check EPT read
permission on each of them (a violation there is a ``FAULT_IN_GPT``
mem_access event). Building page tables is `runtime/paging.PageTables`'
job (layouts use it).

Everything a guest operation does to guest state (data read/write, register
writes, faults) lives here; *whether* it may happen (EPT permissions,
monitors, the vm_event ring, pausing) is the hypervisor's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..guest_memory import FRAME_MASK, FRAME_SHIFT, FRAME_SIZE, GuestMemory
from ...errors import PolicycError

__all__ = [
    "GuestFault", "Guest", "VCpu", "Walk", "TranslationFault",
    "GPRS", "MSR", "MSR_NAMES", "CR0", "CR4", "EFER",
    "PF_P", "PF_W", "PF_U", "PF_RSVD", "PF_I",
]

# ------------------------------------------------------------------ constants

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# MSR indices (asm/msr-index.h); the names match policyc.arch.
MSR = {
    "EFER": 0xC0000080, "STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083,
    "SFMASK": 0xC0000084, "FS_BASE": 0xC0000100, "GS_BASE": 0xC0000101,
    "KERNEL_GS_BASE": 0xC0000102, "TSC_AUX": 0xC0000103,
    "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175, "SYSENTER_EIP": 0x176,
    "APIC_BASE": 0x1B, "SPEC_CTRL": 0x48, "MISC_ENABLE": 0x1A0, "DEBUGCTL": 0x1D9,
    "PAT": 0x277, "U_CET": 0x6A0, "S_CET": 0x6A2, "XSS": 0xDA0, "TSC_DEADLINE": 0x6E0,
}
MSR_NAMES = {index: name for name, index in MSR.items()}

# Register-file names of the MSRs Xen's vm_event register block carries.
_MSR_REGISTER_NAMES = {
    "msr_efer": MSR["EFER"], "msr_star": MSR["STAR"], "msr_lstar": MSR["LSTAR"],
    "msr_cstar": MSR["CSTAR"], "fs_base": MSR["FS_BASE"], "gs_base": MSR["GS_BASE"],
    "shadow_gs": MSR["KERNEL_GS_BASE"], "sysenter_cs": MSR["SYSENTER_CS"],
    "sysenter_esp": MSR["SYSENTER_ESP"], "sysenter_eip": MSR["SYSENTER_EIP"],
}


class CR0:
    PE, MP, EM, TS, ET, NE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
    WP, AM, NW, CD, PG = 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1 << 31


class CR4:
    PSE, PAE, MCE, PGE = 1 << 4, 1 << 5, 1 << 6, 1 << 7
    OSFXSR, OSXMMEXCPT, UMIP, LA57 = 1 << 9, 1 << 10, 1 << 11, 1 << 12
    FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP, PKE, CET = 1 << 16, 1 << 17, 1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 23
    # Bits a guest may set (everything else #GPs): bits 0-25 except reserved bit 15.
    VALID = ((1 << 26) - 1) & ~(1 << 15)


class EFER:
    SCE, LME, LMA, NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11


# #PF error-code bits.
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16

_ADDR = 0x000F_FFFF_FFFF_F000
_PTE_P, _PTE_RW, _PTE_US, _PTE_PS = 1, 2, 4, 0x80
_NX = 1 << 63
_U64 = struct.Struct("<Q")


# ------------------------------------------------------------------ faults

@dataclass(frozen=True)
class GuestFault:
    """An exception delivered to the guest (its own business, not the monitor's)."""

    vector: int
    name: str
    error_code: int | None = None
    address: int | None = None     # CR2 for #PF
    injected: bool = False         # put there by the monitor (inject_exception)

    def __str__(self) -> str:
        where = f" at {self.address:#x}" if self.address is not None else ""
        code = f" (error code {self.error_code:#x})" if self.error_code is not None else ""
        return f"{self.name}{where}{code}{' [injected]' if self.injected else ''}"


class TranslationFault(PolicycError):
    """The guest's own page walk failed: a #PF (or #GP for a non-canonical address).

    ``reads`` are the paging-structure entries read before the walk stopped,
    as ``(table gfn, byte offset of the entry)``; the hypervisor checks EPT
    read permission on them first (an EPT violation there precedes the #PF).
    """

    def __init__(self, fault: GuestFault, reads: list[tuple[int, int]]) -> None:
        super().__init__(str(fault))
        self.fault = fault
        self.reads = reads


@dataclass(frozen=True)
class Walk:
    """A successful translation of one linear address."""

    va: int
    pa: int
    page_size: int
    writable: bool
    executable: bool
    user: bool
    reads: tuple[tuple[int, int], ...]   # (table gfn, entry offset) top level first
    pte_address: int                      # guest-physical address of the leaf entry


def _canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF


# ------------------------------------------------------------------ the vCPU

class VCpu:
    """One x86-64 vCPU's architectural state.

    General registers, RIP and RFLAGS, the control registers, the descriptor
    table registers and the MSRs. `get` / `set` speak the register names of
    `policyc.arch` (``rax`` .. ``r15``, ``rip``, ``cr0`` .. ``cr4``, ``xcr0``,
    ``msr_lstar``, ``gs_base``, ``idtr_base`` ...); MSRs by index live in
    `msrs`.
    """

    __slots__ = ("index", "gpr", "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "xcr0",
                 "dr6", "dr7", "msrs", "idtr_base", "idtr_limit", "gdtr_base", "gdtr_limit",
                 "sel", "ldtr", "tr", "cpl", "faults")

    def __init__(self, index: int) -> None:
        self.index = index
        self.gpr: dict[str, int] = dict.fromkeys(GPRS, 0)
        self.rip = 0
        self.rflags = 0x2
        self.cr0 = CR0.ET | CR0.NE
        self.cr2 = 0
        self.cr3 = 0
        self.cr4 = 0
        self.xcr0 = 1
        self.dr6 = 0xFFFF0FF0
        self.dr7 = 0x400
        self.msrs: dict[int, int] = {MSR["EFER"]: 0, MSR["STAR"]: 0, MSR["LSTAR"]: 0,
                                     MSR["CSTAR"]: 0, MSR["SFMASK"]: 0, MSR["FS_BASE"]: 0,
                                     MSR["GS_BASE"]: 0, MSR["KERNEL_GS_BASE"]: 0,
                                     MSR["SYSENTER_CS"]: 0, MSR["SYSENTER_ESP"]: 0,
                                     MSR["SYSENTER_EIP"]: 0, MSR["PAT"]: 0x0007040600070406,
                                     MSR["APIC_BASE"]: 0xFEE00900, MSR["TSC_AUX"]: 0}
        self.idtr_base = 0
        self.idtr_limit = 0xFFFF
        self.gdtr_base = 0
        self.gdtr_limit = 0xFFFF
        self.sel = {"cs": 0x10, "ss": 0x18, "ds": 0, "es": 0, "fs": 0, "gs": 0}
        self.ldtr = 0
        self.tr = 0x40
        self.cpl = 0
        self.faults: list[GuestFault] = []   # every exception delivered to this vCPU, in order

    # -- named access ---------------------------------------------------------
    def get(self, name: str) -> int:
        gpr = self.gpr
        if name in gpr:
            return gpr[name]
        if name in _DIRECT:
            return getattr(self, name)
        if name in _MSR_REGISTER_NAMES:
            return self.msrs.get(_MSR_REGISTER_NAMES[name], 0)
        if name.endswith("_sel") and name[:-4] in self.sel:
            return self.sel[name[:-4]]
        if name in ("ldtr_sel", "tr_sel"):
            return getattr(self, name[:-4])
        if name == "cs_arbytes":
            return 0xA09B
        if name.upper() in MSR:
            return self.msrs.get(MSR[name.upper()], 0)
        raise KeyError(f"no register '{name}'")

    def set(self, name: str, value: int) -> None:
        value &= (1 << 64) - 1
        if name in self.gpr:
            self.gpr[name] = value
        elif name in _DIRECT:
            setattr(self, name, value)
        elif name in _MSR_REGISTER_NAMES:
            self.msrs[_MSR_REGISTER_NAMES[name]] = value
        elif name.endswith("_sel") and name[:-4] in self.sel:
            self.sel[name[:-4]] = value & 0xFFFF
        elif name in ("ldtr_sel", "tr_sel"):
            setattr(self, name[:-4], value & 0xFFFF)
        elif name.upper() in MSR:
            self.msrs[MSR[name.upper()]] = value
        else:
            raise KeyError(f"no register '{name}'")

    def registers(self) -> dict[str, int]:
        """Every register by name (what `Backend.get_registers` returns)."""
        out = dict(self.gpr)
        for name in _DIRECT:
            out[name] = getattr(self, name)
        for name, index in _MSR_REGISTER_NAMES.items():
            out[name] = self.msrs.get(index, 0)
        for seg, value in self.sel.items():
            out[f"{seg}_sel"] = value
        out["ldtr_sel"] = self.ldtr
        out["tr_sel"] = self.tr
        return out

    @property
    def efer(self) -> int:
        return self.msrs[MSR["EFER"]]

    def __repr__(self) -> str:
        return f"VCpu({self.index}, rip={self.rip:#x}, cr3={self.cr3:#x})"


_DIRECT = ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "xcr0", "dr6", "dr7",
           "idtr_base", "idtr_limit", "gdtr_base", "gdtr_limit", "cpl")


# ------------------------------------------------------------------ the guest

class Guest:
    """Guest memory plus vCPUs.

    ``memory_size`` is the guest's RAM (what the scenario says); the
    `GuestMemory` behind it is larger by ``spare_frames`` so the hypervisor
    can populate frames beyond RAM for shadow pages (`add_frame`).

    ``symbols`` maps names to slid addresses (per-CPU symbols excluded) and
    ``percpu`` maps per-CPU symbol names to offsets; ``percpu_base[i]`` is
    vCPU i's per-CPU area. Layouts fill them; a bare guest leaves them empty.
    """

    def __init__(self, memory_size: int, vcpus: int = 1, *, spare_frames: int = 4096,
                 alloc_range: tuple[int, int] | None = None) -> None:
        if vcpus < 1:
            raise ValueError("a guest needs at least one vCPU")
        if memory_size <= 0 or memory_size & FRAME_MASK:
            raise ValueError("guest memory must be a positive multiple of 4 KiB")
        frames = memory_size >> FRAME_SHIFT
        if alloc_range is None:
            span = min(max(frames // 4, 1), (64 << 20) >> FRAME_SHIFT)
            alloc_range = (frames - span, frames)
        self.memory = GuestMemory(memory_size + spare_frames * FRAME_SIZE, alloc_range=alloc_range)
        self.memory_size = memory_size
        self.ram_frames = frames
        self.vcpus = [VCpu(i) for i in range(vcpus)]
        self.layout: str | None = None
        self.symbols: dict[str, int] = {}
        self.percpu: dict[str, int] = {}
        self.percpu_base: list[int] = []
        self.kaslr_slide = 0
        self.direct_map_base: int | None = None   # linear address of guest-physical 0, if mapped
        self.holes: list[tuple[int, int]] = []      # [start_gfn, end_gfn) not populated (e.g. the VGA hole)
        self._next_spare = frames
        self._spare_end = frames + spare_frames
        self.added_frames: set[int] = set()
        self._read_u64 = self.memory.read_u64

    # -- frames ----------------------------------------------------------------
    def is_ram(self, gfn: int) -> bool:
        if gfn in self.added_frames:
            return True
        if not 0 <= gfn < self.ram_frames:
            return False
        return not any(lo <= gfn < hi for lo, hi in self.holes)

    def populated_frames(self) -> Iterable[int]:
        lo = 0
        for hole_lo, hole_hi in sorted(self.holes):
            yield from range(lo, hole_lo)
            lo = hole_hi
        yield from range(lo, self.ram_frames)
        yield from sorted(self.added_frames)

    def add_frame(self) -> int:
        while self._next_spare < self._spare_end and self._next_spare in self.added_frames:
            self._next_spare += 1
        if self._next_spare >= self._spare_end:
            raise MemoryError("no spare frame left beyond guest RAM")
        gfn = self._next_spare
        self._next_spare += 1
        self.memory.populate(gfn)
        self.added_frames.add(gfn)
        return gfn

    def remove_frame(self, gfn: int) -> None:
        self.added_frames.discard(gfn)
        self.memory.write(gfn << FRAME_SHIFT, bytes(FRAME_SIZE))
        if gfn < self._next_spare:
            self._next_spare = gfn

    # -- translation -------------------------------------------------------------
    def walk(self, cr3: int, va: int, remap: Mapping[int, int] | None = None, *,
             write: bool = False, fetch: bool = False, wp: bool = True,
             nxe: bool = True) -> Walk:
        """Translate ``va`` with the tables at ``cr3``, reading them through ``remap``
        (an altp2m view's gfn -> frame map). Supervisor access rules: a write
        to a read-only page faults only with CR0.WP; a fetch from an XD page
        faults. Raises `TranslationFault`."""
        if not (va >> 47 == 0 or va >> 47 == 0x1FFFF):
            raise TranslationFault(GuestFault(13, "#GP", 0), [])
        read_u64 = self._read_u64
        table_gfn = (cr3 & _ADDR) >> FRAME_SHIFT
        reads: list[tuple[int, int]] = []
        writable = user = True
        nx = False
        shift = 39
        while True:
            offset = ((va >> shift) & 0x1FF) << 3
            reads.append((table_gfn, offset))
            frame = remap.get(table_gfn, table_gfn) if remap else table_gfn
            entry_pa = (frame << FRAME_SHIFT) | offset
            try:
                entry = read_u64(entry_pa)
            except ValueError:
                entry = 0
            if not entry & _PTE_P:
                code = (PF_W if write else 0) | (PF_I if fetch else 0)
                raise TranslationFault(GuestFault(14, "#PF", code, va), reads)
            if not entry & _PTE_RW:
                writable = False
            if not entry & _PTE_US:
                user = False
            if entry & _NX and nxe:
                nx = True
            if shift == 12 or (entry & _PTE_PS and shift in (30, 21)):
                size = 1 << shift
                pa = (entry & _ADDR & ~(size - 1)) | (va & (size - 1))
                if (write and not writable and wp) or (fetch and nx):
                    code = PF_P | (PF_W if write else 0) | (PF_I if fetch else 0)
                    raise TranslationFault(GuestFault(14, "#PF", code, va), reads)
                return Walk(va, pa, size, writable, not nx, user, tuple(reads),
                            (table_gfn << FRAME_SHIFT) | offset)
            table_gfn = (entry & _ADDR) >> FRAME_SHIFT
            shift -= 9

    def walk_fast(self, cr3: int, va: int, remap: Mapping[int, int] | None, write: bool,
                  fetch: bool, wp: bool, nxe: bool) -> tuple[int, list[tuple[int, int]]] | TranslationFault:
        """`walk` for the hot path: ``(pa, reads)`` or the `TranslationFault`
        (returned, not raised). Reads table entries straight from the frames."""
        if not (va >> 47 == 0 or va >> 47 == 0x1FFFF):
            return TranslationFault(GuestFault(13, "#GP", 0), [])
        frames = self.memory._frames          # GuestMemory's frame store (same package)
        unpack = _U64.unpack_from
        table_gfn = (cr3 & _ADDR) >> FRAME_SHIFT
        reads: list[tuple[int, int]] = []
        writable = True
        nx = False
        shift = 39
        while True:
            offset = ((va >> shift) & 0x1FF) << 3
            reads.append((table_gfn, offset))
            frame = frames.get(remap.get(table_gfn, table_gfn) if remap else table_gfn)
            entry = unpack(frame, offset)[0] if frame is not None else 0
            if not entry & _PTE_P:
                code = (PF_W if write else 0) | (PF_I if fetch else 0)
                return TranslationFault(GuestFault(14, "#PF", code, va), reads)
            if not entry & _PTE_RW:
                writable = False
            if entry & _NX and nxe:
                nx = True
            if shift == 12 or (entry & _PTE_PS and (shift == 30 or shift == 21)):
                size = 1 << shift
                if (write and not writable and wp) or (fetch and nx):
                    code = PF_P | (PF_W if write else 0) | (PF_I if fetch else 0)
                    return TranslationFault(GuestFault(14, "#PF", code, va), reads)
                return (entry & _ADDR & ~(size - 1)) | (va & (size - 1)), reads
            table_gfn = (entry & _ADDR) >> FRAME_SHIFT
            shift -= 9

    # -- hypervisor-side access (host p2m, no permission checks) ---------------------
    def read_virtual(self, cr3: int, va: int, size: int) -> bytes:
        out = bytearray()
        while size:
            w = self.walk(cr3, va)
            n = min(size, FRAME_SIZE - (va & FRAME_MASK))
            out += self.memory.read(w.pa, n)
            va += n
            size -= n
        return bytes(out)

    def write_virtual(self, cr3: int, va: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            w = self.walk(cr3, va + pos, wp=False)
            n = min(len(data) - pos, FRAME_SIZE - ((va + pos) & FRAME_MASK))
            self.memory.write(w.pa, data[pos:pos + n])
            pos += n

    def virt_to_phys(self, cr3: int, va: int) -> int:
        return self.walk(cr3, va).pa

    def clone(self) -> "Guest":
        """An independent copy (memory, vCPUs, layout facts): build a layout once,
        clone it per test or per run."""
        import copy
        new = copy.copy(self)
        new.memory = copy.copy(self.memory)
        new.memory._frames = {gfn: bytearray(f) for gfn, f in self.memory._frames.items()}
        new.memory._allocated = set(self.memory._allocated)
        new.memory._freed = list(self.memory._freed)
        new._read_u64 = new.memory.read_u64
        new.vcpus = []
        for v in self.vcpus:
            c = type(v)(v.index)             # an Arm64Guest's vCPUs are Arm64VCpus
            for name in type(v).__slots__:
                value = getattr(v, name)
                setattr(c, name, dict(value) if isinstance(value, dict) else
                        list(value) if isinstance(value, list) else value)
            new.vcpus.append(c)
        new.symbols = dict(self.symbols)
        new.percpu = dict(self.percpu)
        new.percpu_base = list(self.percpu_base)
        new.holes = list(self.holes)
        new.added_frames = set(self.added_frames)
        for attr in ("page_tables",):
            if hasattr(self, attr):
                from ..paging import PageTables
                setattr(new, attr, PageTables(new.memory, self.vcpus[0].cr3))
        return new

    def symbol(self, name: str) -> int:
        """A slid symbol address (KeyError if the layout has no such symbol)."""
        return self.symbols[name]

    def percpu_address(self, vcpu: int, name: str) -> int:
        return self.percpu_base[vcpu] + self.percpu[name]


@dataclass
class GuestConfig:
    """What a scenario's ``guest:`` block says."""

    layout: str = "linux-x86_64"
    symbols: str | None = None
    kaslr_slide: int = 0
    memory: int = 256 << 20
    vcpus: int = 1
    profile: str = "x86_64"
    extra: dict = field(default_factory=dict)
