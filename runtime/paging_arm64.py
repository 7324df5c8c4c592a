"""AArch64 stage-1 translation (VMSAv8-64, the EL1&0 regime) over :class:`GuestMemory`.

The model covers what a Linux arm64 kernel configured for 4 KiB pages and
48-bit virtual addresses uses (Arm ARM, chapter D8, "The AArch64 Virtual
Memory System Architecture"):

* two translation table bases: TTBR0_EL1 translates the low half (VA bit 55
  clear), TTBR1_EL1 the high half (bit 55 set). With TCR_EL1.T0SZ = T1SZ = 16
  a low address must have bits 63:48 all zero and a high one all ones, except
  that the top byte (63:56) is ignored when TCR_EL1.TBI0/TBI1 is set. An
  address outside both ranges, or in a half whose walks are disabled
  (TCR_EL1.EPD0/EPD1), is a level 0 Translation fault;
* four levels of 512 eight-byte descriptors: level 0 (VA bits 47:39), level 1
  (38:30), level 2 (29:21), level 3 (20:12). Bits 1:0 of a descriptor: 0bx0
  invalid, 0b11 a table (levels 0-2) or a page (level 3), 0b01 a block at
  levels 1 (1 GiB) and 2 (2 MiB); a block at level 0 or 0b01 at level 3 is a
  Translation fault;
* the output address is bits 47:12 of the descriptor (47:30 for a 1 GiB block,
  47:21 for a 2 MiB one); output-address bits beyond the physical size that
  TCR_EL1.IPS selects are an Address size fault;
* access permissions AP[2:1] (bits 7:6): AP[2] set means read-only, AP[1] set
  means EL0 may access the page too. EL1 can always read, unless PSTATE.PAN is
  set and the page is EL0-accessible;
* execute-never: PXN (bit 53) for EL1, UXN (bit 54) for EL0; a page EL0 can
  write is never executable at EL1, and with SCTLR_EL1.WXN a writable page is
  never executable at all;
* hierarchical controls in table descriptors: APTable (bits 62:61: 0b1x
  forbids writes below, 0bx1 forbids EL0 access below), UXNTable (bit 60) and
  PXNTable (bit 59) apply to everything the table maps;
* the Access flag (bit 10): a block or page with AF clear is an Access flag
  fault (TCR_EL1.HA, hardware update of the flag, is not modelled).

Not modelled: TLBs (a change to the tables takes effect at once), the
Contiguous hint (bit 52; the translation is the same without it), dirty-state
management (DBM, bit 51, and TCR_EL1.HD: AP[2] alone decides writability),
the attribute index and shareability beyond storing them, and granules other
than 4 KiB. :class:`Stage1Tables` refuses a TCR_EL1 it cannot honour.

Faults are :class:`Stage1Fault` subclasses, which are also
`runtime.paging.PageFault`, so code written against the x86 walker (binding)
catches them unchanged. Each carries the descriptors read before the walk
stopped (``steps``): a hypervisor checks its stage-2 permissions on those
table reads before the stage-1 fault reaches the guest.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

from .guest_memory import FRAME_SHIFT, FRAME_SIZE, PhysicalAddressError
from .paging import AddressSpace, AlignmentError, MappingConflict, PageFault, WalkStep

__all__ = [
    "PAGE_4K", "BLOCK_2M", "BLOCK_1G", "PAGE_SIZES",
    "DESC_VALID", "DESC_TABLE", "DESC_PAGE", "DESC_NS", "DESC_AP_EL0", "DESC_AP_RO", "DESC_SH_INNER",
    "DESC_AF", "DESC_NG", "DESC_DBM", "DESC_CONT", "DESC_PXN", "DESC_UXN",
    "TABLE_PXN", "TABLE_UXN", "TABLE_AP_NOEL0", "TABLE_AP_RO", "TABLE_NS", "OA_MASK",
    "TCR_EPD0", "TCR_EPD1", "TCR_A1", "TCR_AS", "TCR_TBI0", "TCR_TBI1", "TCR_HA", "TCR_HD",
    "LINUX_TCR_48", "SCTLR_M", "SCTLR_WXN", "PSTATE_PAN", "TTBR_BADDR_MASK",
    "Level", "WalkStep", "is_table", "is_leaf", "Translation", "Permissions", "Stage1Tables",
    "Stage1Fault", "TranslationFault", "AccessFlagFault", "PermissionFault", "AddressSizeFault",
    "WalkExternalAbort", "permissions", "ttbr_base", "is_high", "attr_index",
]

PAGE_4K = 1 << 12
BLOCK_2M = 1 << 21
BLOCK_1G = 1 << 30
PAGE_SIZES = (PAGE_4K, BLOCK_2M, BLOCK_1G)

# -- block and page descriptors (D8.3)
DESC_VALID = 1 << 0
DESC_TABLE = 1 << 1          # levels 0-2: table (set) or block (clear)
DESC_PAGE = 1 << 1           # level 3: must be set for a page
_ATTR_INDX_SHIFT = 2
DESC_NS = 1 << 5
DESC_AP_EL0 = 1 << 6         # AP[1]
DESC_AP_RO = 1 << 7          # AP[2]
DESC_SH_INNER = 0b11 << 8
DESC_AF = 1 << 10
DESC_NG = 1 << 11
DESC_DBM = 1 << 51
DESC_CONT = 1 << 52
DESC_PXN = 1 << 53
DESC_UXN = 1 << 54
# -- table descriptors: hierarchical controls
TABLE_PXN = 1 << 59
TABLE_UXN = 1 << 60
TABLE_AP_NOEL0 = 1 << 61     # APTable[0]
TABLE_AP_RO = 1 << 62        # APTable[1]
TABLE_NS = 1 << 63
_TABLE_ATTRS = TABLE_PXN | TABLE_UXN | TABLE_AP_NOEL0 | TABLE_AP_RO | TABLE_NS

#: Output-address field of a descriptor (bits 47:12) with a 4 KiB granule.
OA_MASK = 0x0000_FFFF_FFFF_F000
#: BADDR of TTBRn_EL1 for a 48-bit range with a 4 KiB granule: the ASID (63:48) and CnP (bit 0) are not
#: part of the table address.
TTBR_BADDR_MASK = 0x0000_FFFF_FFFF_F000
_LOWER_ATTRS = (1 << 12) - 1 & ~0b11          # bits 11:2
_UPPER_ATTRS = ((1 << 64) - 1) ^ ((1 << 50) - 1)   # bits 63:50

# -- TCR_EL1 fields (D17.2)
_TCR_T0SZ = 0x3F
TCR_EPD0 = 1 << 7
_TCR_TG0_SHIFT = 14
_TCR_T1SZ_SHIFT = 16
TCR_A1 = 1 << 22
TCR_EPD1 = 1 << 23
_TCR_TG1_SHIFT = 30
_TCR_IPS_SHIFT = 32
TCR_AS = 1 << 36
TCR_TBI0 = 1 << 37
TCR_TBI1 = 1 << 38
TCR_HA = 1 << 39
TCR_HD = 1 << 40
_TG0_4K, _TG1_4K = 0b00, 0b10
_IPS_BITS = {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52}

#: TCR_EL1 of a Linux 6.1 kernel with 4 KiB pages and 48-bit VAs: T0SZ = T1SZ = 16, write-back
#: cacheable inner-shareable walks, TG0 = TG1 = 4 KiB, 48-bit IPS, 16-bit ASIDs taken from TTBR1 (A1),
#: top-byte-ignore for user addresses (TBI0).
LINUX_TCR_48 = (16 | 16 << _TCR_T1SZ_SHIFT
                | 0b01 << 8 | 0b01 << 10 | 0b11 << 12          # IRGN0 ORGN0 SH0
                | 0b01 << 24 | 0b01 << 26 | 0b11 << 28         # IRGN1 ORGN1 SH1
                | _TG1_4K << _TCR_TG1_SHIFT | 5 << _TCR_IPS_SHIFT | TCR_A1 | TCR_AS | TCR_TBI0)

SCTLR_M = 1 << 0             # stage-1 translation on
SCTLR_WXN = 1 << 19          # writable implies execute-never
PSTATE_PAN = 1 << 22         # privileged access never (bit 22 of SPSR/CPSR)

_ENTRIES = struct.Struct("<512Q")
_TOP_SHIFT = 48
_HIGH_TOP = (1 << 16) - 1


def ttbr_base(ttbr: int) -> int:
    """The table address a TTBRn_EL1 value holds (ASID and CnP dropped)."""
    return ttbr & TTBR_BADDR_MASK


def is_high(va: int) -> bool:
    """Whether TTBR1 translates ``va`` (VA bit 55 selects the table base, whatever the top byte)."""
    return bool((va >> 55) & 1)


def attr_index(entry: int) -> int:
    """AttrIndx[2:0] of a block or page descriptor: the MAIR_EL1 slot of its memory type."""
    return (entry >> _ATTR_INDX_SHIFT) & 0b111


class Level(enum.IntEnum):
    """Translation levels with a 4 KiB granule, level 0 first."""

    L0 = 0
    L1 = 1
    L2 = 2
    L3 = 3

    @property
    def shift(self) -> int:
        return 39 - 9 * self.value

    @property
    def coverage(self) -> int:
        """Bytes of VA space one descriptor at this level covers."""
        return 1 << self.shift

    @property
    def entry_name(self) -> str:
        return f"level {self.value} descriptor"


_LEAF_LEVEL = {PAGE_4K: Level.L3, BLOCK_2M: Level.L2, BLOCK_1G: Level.L1}


def _size_name(size: int) -> str:
    return {PAGE_4K: "4 KiB page", BLOCK_2M: "2 MiB block", BLOCK_1G: "1 GiB block"}.get(size, f"{size:#x} bytes")


# --------------------------------------------------------------------- faults
class Stage1Fault(PageFault):
    """A stage-1 fault at ``level``. ``entry_address``/``entry`` are the descriptor that decided it (the
    table base and 0 when the address is outside both ranges); ``steps`` every descriptor read."""

    kind = "fault"
    _fsc_base = 0

    def __init__(self, va: int, level: Level, entry_address: int, entry: int, reason: str, *,
                 steps: tuple["WalkStep", ...] = (), access: str | None = None) -> None:
        self.steps = steps
        self.access = access
        super().__init__(va, level, entry_address, entry, reason)  # type: ignore[arg-type]

    def _message(self) -> str:
        return (f"{self.kind} fault, level {int(self.level)}, at {self.va:#x}: {self.level.entry_name} at "
                f"{self.entry_address:#x} = {self.entry:#018x}: {self.reason}")

    @property
    def fsc(self) -> int:
        """The fault status code an ESR_EL1 would carry (DFSC/IFSC)."""
        return self._fsc_base | int(self.level)


class AddressSizeFault(Stage1Fault):
    kind = "address size"
    _fsc_base = 0b000000


class TranslationFault(Stage1Fault):
    kind = "translation"
    _fsc_base = 0b000100


class AccessFlagFault(Stage1Fault):
    kind = "access flag"
    _fsc_base = 0b001000


class PermissionFault(Stage1Fault):
    kind = "permission"
    _fsc_base = 0b001100


class WalkExternalAbort(Stage1Fault):
    """A table read that reached no memory (synchronous External abort on a translation table walk)."""

    kind = "external abort on walk"
    _fsc_base = 0b010100


# --------------------------------------------------------------------- results
def is_table(step: WalkStep) -> bool:
    """A valid table descriptor (levels 0-2)."""
    return step.present and step.level < Level.L3 and bool(step.entry & DESC_TABLE)


def is_leaf(step: WalkStep) -> bool:
    """A valid block (levels 1-2) or page (level 3) descriptor."""
    if not step.present:
        return False
    if step.level is Level.L3:
        return bool(step.entry & DESC_PAGE)
    return step.level in (Level.L1, Level.L2) and not step.entry & DESC_TABLE


@dataclass(frozen=True)
class Permissions:
    """Effective stage-1 permissions of a mapping (table controls folded in)."""

    el1_write: bool
    el1_exec: bool
    el0_read: bool
    el0_write: bool
    el0_exec: bool

    el1_read = True


def permissions(entry: int, table_bits: int = 0, *, wxn: bool = False) -> Permissions:
    """The permissions of the block or page descriptor ``entry`` under the OR of the hierarchical
    control bits of the table descriptors above it (``table_bits``)."""
    read_only = bool(entry & DESC_AP_RO) or bool(table_bits & TABLE_AP_RO)
    el0 = bool(entry & DESC_AP_EL0) and not table_bits & TABLE_AP_NOEL0
    pxn = bool(entry & DESC_PXN) or bool(table_bits & TABLE_PXN)
    uxn = bool(entry & DESC_UXN) or bool(table_bits & TABLE_UXN)
    el0_write = el0 and not read_only
    # Code EL0 can write is never run at EL1, whatever PXN says; WXN extends that to any writable page.
    el1_exec = not pxn and not el0_write and not (wxn and not read_only)
    el0_exec = not uxn and not (wxn and el0_write)
    return Permissions(not read_only, el1_exec, el0, el0_write, el0_exec)


@dataclass(frozen=True)
class Translation:
    """A successful stage-1 translation. Permissions are the effective ones; ``descriptor_address`` is
    the guest-physical address of the block or page descriptor."""

    va: int
    pa: int
    page_size: int
    level: Level
    writable: bool
    executable: bool
    user: bool
    user_writable: bool
    user_executable: bool
    global_: bool
    descriptor_address: int
    descriptor: int
    steps: tuple[WalkStep, ...] = field(default=(), compare=False, repr=False)

    @property
    def page_base(self) -> int:
        return self.pa & ~(self.page_size - 1)

    @property
    def pte_address(self) -> int:
        """The x86 walker's name for the leaf entry's address."""
        return self.descriptor_address

    @property
    def attr_index(self) -> int:
        return attr_index(self.descriptor)


@dataclass(frozen=True)
class Mapping:
    """One leaf descriptor, as enumerated by :meth:`Stage1Tables.mappings` (effective permissions)."""

    va: int
    pa: int
    page_size: int
    writable: bool
    executable: bool
    user: bool
    user_writable: bool
    user_executable: bool
    global_: bool
    entry_address: int


# --------------------------------------------------------------------- the tables
class Stage1Tables(AddressSpace):
    """The EL1&0 translation regime of one vCPU: TTBR0_EL1, TTBR1_EL1 and TCR_EL1 over guest memory.

    Args:
        memory: guest memory holding the tables (anything with ``read_u64``, ``read`` and ``size``;
            building also needs ``write``, ``write_u64`` and ``alloc_frame``).
        ttbr1, ttbr0: TTBRn_EL1 register values (the ASID and CnP bits are ignored). None takes a
            zeroed table from ``memory.alloc_frame()``.
        tcr: TCR_EL1. Only T0SZ = T1SZ = 16 with 4 KiB granules is supported (ValueError otherwise).
        sctlr: SCTLR_EL1; M (translation on) and WXN are honoured.
    """

    def __init__(self, memory: Any, ttbr1: int | None = None, ttbr0: int | None = None, *,
                 tcr: int = LINUX_TCR_48, sctlr: int = SCTLR_M) -> None:
        _check_tcr(tcr)
        self.memory = memory
        self.tcr = tcr
        self.sctlr = sctlr
        ips = (tcr >> _TCR_IPS_SHIFT) & 0b111
        # Output addresses beyond 48 bits need FEAT_LPA2 with a 4 KiB granule: 48 is the ceiling here.
        self.oa_bits = min(_IPS_BITS.get(ips, 48), 48)
        self._oa_limit = OA_MASK & ((1 << self.oa_bits) - 1)
        self.ttbr1 = self._new_table() if ttbr1 is None else _check_ttbr("ttbr1", ttbr1)
        self.ttbr0 = self._new_table() if ttbr0 is None else _check_ttbr("ttbr0", ttbr0)

    def _new_table(self) -> int:
        return self.memory.alloc_frame() << FRAME_SHIFT

    # ------------------------------------------------------------ registers
    @property
    def ttbr1_table(self) -> int:
        return ttbr_base(self.ttbr1)

    @property
    def ttbr0_table(self) -> int:
        return ttbr_base(self.ttbr0)

    @property
    def mmu_enabled(self) -> bool:
        return bool(self.sctlr & SCTLR_M)

    def root_for(self, va: int) -> int:
        """The level 0 table that translates ``va``; a level 0 TranslationFault when none does."""
        _check_va(va)
        high = is_high(va)
        tbi = self.tcr & (TCR_TBI1 if high else TCR_TBI0)
        top = (va >> _TOP_SHIFT) & (0xFF if tbi else _HIGH_TOP)
        want = (0xFF if tbi else _HIGH_TOP) if high else 0
        base = self.ttbr1_table if high else self.ttbr0_table
        if top != want:
            raise TranslationFault(va, Level.L0, base, 0, "the address is outside the ranges of TTBR0 and TTBR1 "
                                   "(bits 63:48 must all equal bit 55)")
        if self.tcr & (TCR_EPD1 if high else TCR_EPD0):
            raise TranslationFault(va, Level.L0, base, 0,
                                   f"walks through TTBR{int(high)} are disabled (TCR_EL1.EPD{int(high)})")
        return base

    # -------------------------------------------------------------- walking
    def _read(self, va: int, level: Level, addr: int, steps: list[WalkStep]) -> int:
        try:
            return self.memory.read_u64(addr)
        except PhysicalAddressError:
            raise WalkExternalAbort(va, level, addr, 0, "the table lies outside guest memory",
                                    steps=tuple(steps)) from None

    def walk(self, va: int) -> list[WalkStep]:
        """The descriptors read to translate ``va``, level 0 first; the walk stops at the block or page
        descriptor, or at the first one that faults (included). Raises TranslationFault (level 0) for an
        address outside both ranges."""
        table = self.root_for(va)
        steps: list[WalkStep] = []
        for level in Level:
            addr = table + (((va >> level.shift) & 0x1FF) << 3)
            try:
                entry = self.memory.read_u64(addr)
            except PhysicalAddressError:
                break
            step = WalkStep(level, addr, entry)
            steps.append(step)
            if not is_table(step) or entry & ~self._oa_limit & OA_MASK:
                break
            table = entry & OA_MASK
        return steps

    def walk_entries(self, va: int) -> list[int]:
        """Guest-physical addresses of the descriptors the translation of ``va`` depends on."""
        return [s.entry_address for s in self.walk(va)]

    def translate(self, va: int, access: str | None = None, *, el: int = 1, pan: bool = False) -> Translation:
        """Translate ``va``. With ``access`` ("read", "write" or "exec") the permissions are checked as
        for an access from exception level ``el`` (0 or 1) with PSTATE.PAN = ``pan``; without it only
        the walk can fault.

        Raises TranslationFault, AddressSizeFault, AccessFlagFault, PermissionFault or
        WalkExternalAbort (all Stage1Fault)."""
        if access not in (None, "read", "write", "exec"):
            raise ValueError(f"access must be read, write or exec, not {access!r}")
        if not self.mmu_enabled:
            _check_va(va)
            return Translation(va, va, PAGE_4K, Level.L3, True, True, True, True, True, True, 0, 0)
        table = self.root_for(va)
        steps: list[WalkStep] = []
        table_bits = 0
        for level in Level:
            addr = table + (((va >> level.shift) & 0x1FF) << 3)
            entry = self._read(va, level, addr, steps)
            step = WalkStep(level, addr, entry)
            steps.append(step)
            if not entry & DESC_VALID:
                raise TranslationFault(va, level, addr, entry, "descriptor not valid", steps=tuple(steps),
                                       access=access)
            if level is not Level.L3 and entry & DESC_TABLE:
                if entry & OA_MASK & ~self._oa_limit:
                    raise AddressSizeFault(va, level, addr, entry, f"next-level table beyond the {self.oa_bits}-bit "
                                           "output address size", steps=tuple(steps), access=access)
                table_bits |= entry & _TABLE_ATTRS
                table = entry & OA_MASK
                continue
            if level is Level.L0:
                raise TranslationFault(va, level, addr, entry, "a block descriptor at level 0 (not allowed with a "
                                       "4 KiB granule)", steps=tuple(steps), access=access)
            if level is Level.L3 and not entry & DESC_PAGE:
                raise TranslationFault(va, level, addr, entry, "reserved encoding 0b01 at level 3",
                                       steps=tuple(steps), access=access)
            size = level.coverage
            if entry & OA_MASK & ~self._oa_limit:
                raise AddressSizeFault(va, level, addr, entry, f"output address beyond {self.oa_bits} bits",
                                       steps=tuple(steps), access=access)
            if not entry & DESC_AF:
                raise AccessFlagFault(va, level, addr, entry, "access flag clear", steps=tuple(steps),
                                      access=access)
            perms = permissions(entry, table_bits, wxn=bool(self.sctlr & SCTLR_WXN))
            t = Translation(va=va, pa=(entry & OA_MASK & ~(size - 1)) | (va & (size - 1)), page_size=size,
                            level=level, writable=perms.el1_write, executable=perms.el1_exec,
                            user=perms.el0_read, user_writable=perms.el0_write, user_executable=perms.el0_exec,
                            global_=not entry & DESC_NG, descriptor_address=addr, descriptor=entry,
                            steps=tuple(steps))
            if access is not None:
                why = _denied(t, access, el, pan)
                if why:
                    raise PermissionFault(va, level, addr, entry, why, steps=tuple(steps), access=access)
            return t
        raise AssertionError("unreachable")  # pragma: no cover

    def try_translate(self, va: int) -> Translation | None:
        """Like :meth:`translate` (no permission check) but None instead of a fault."""
        try:
            return self.translate(va)
        except Stage1Fault:
            return None

    def is_mapped(self, va: int) -> bool:
        return self.try_translate(va) is not None

    # ----------------------------------------------------------- enumerating
    def _roots(self) -> list[tuple[int, int]]:
        """(level 0 table, VA base) of each half whose walks are enabled."""
        out = []
        if not self.tcr & TCR_EPD0:
            out.append((self.ttbr0_table, 0))
        if not self.tcr & TCR_EPD1:
            out.append((self.ttbr1_table, 0xFFFF_0000_0000_0000))
        return out

    def _table_entries(self, table: int) -> tuple[int, ...]:
        return _ENTRIES.unpack(self.memory.read(table, FRAME_SIZE))

    def page_table_frames(self) -> list[int]:
        """Sorted gfns of every frame holding a table reachable from TTBR0 or TTBR1 (walked live, so
        tables the guest built itself are included)."""
        seen: set[int] = set()
        todo: list[tuple[int, Level]] = []
        for root, _base in self._roots():
            if root >> FRAME_SHIFT not in seen:
                seen.add(root >> FRAME_SHIFT)
                todo.append((root, Level.L0))
        while todo:
            table, level = todo.pop()
            if level is Level.L3:
                continue
            try:
                entries = self._table_entries(table)
            except PhysicalAddressError:
                continue
            for entry in entries:
                if entry & (DESC_VALID | DESC_TABLE) != DESC_VALID | DESC_TABLE or entry & OA_MASK & ~self._oa_limit:
                    continue
                child = entry & OA_MASK
                if child + FRAME_SIZE > self.memory.size or child >> FRAME_SHIFT in seen:
                    continue
                seen.add(child >> FRAME_SHIFT)
                todo.append((child, Level(level + 1)))
        return sorted(seen)

    def mappings(self, *, high_only: bool = False, start: int = 0) -> Iterator[Mapping]:
        """Every block and page descriptor with its effective permissions, in increasing VA order (TTBR0
        first). ``high_only``: TTBR1 only. ``start``: skip level 0 entries wholly below this address."""
        wxn = bool(self.sctlr & SCTLR_WXN)
        for root, base in self._roots():
            if high_only and not base:
                continue
            yield from self._mappings(root, Level.L0, base, 0, wxn, frozenset(), start)

    def _mappings(self, table: int, level: Level, base: int, bits: int, wxn: bool, path: frozenset[int],
                  start: int) -> Iterator[Mapping]:
        if table in path:          # a table that points back up: do not loop
            return
        path = path | {table}
        try:
            entries = self._table_entries(table)
        except PhysicalAddressError:
            return                 # a table outside memory maps nothing a walk could reach
        for index, entry in enumerate(entries):
            if not entry & DESC_VALID:
                continue
            va = base | (index << level.shift)
            if va + level.coverage <= start:
                continue
            if level is not Level.L3 and entry & DESC_TABLE:
                child = entry & OA_MASK
                if child & ~self._oa_limit or child + FRAME_SIZE > self.memory.size:
                    continue
                yield from self._mappings(child, Level(level + 1), va, bits | (entry & _TABLE_ATTRS), wxn, path,
                                          start)
                continue
            if level is Level.L0 or (level is Level.L3 and not entry & DESC_PAGE) or not entry & DESC_AF:
                continue
            size = level.coverage
            p = permissions(entry, bits, wxn=wxn)
            yield Mapping(va=va, pa=entry & OA_MASK & ~(size - 1), page_size=size, writable=p.el1_write,
                          executable=p.el1_exec, user=p.el0_read, user_writable=p.el0_write,
                          user_executable=p.el0_exec, global_=not entry & DESC_NG,
                          entry_address=table + index * 8)

    # -------------------------------------------------------------- building
    def _check_range(self, va: int, size: int, page_size: int, what: str) -> None:
        if page_size not in PAGE_SIZES:
            raise ValueError(f"{what}: page_size must be 4 KiB, 2 MiB or 1 GiB, got {page_size:#x}")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{what}: size must be a positive int, got {size!r}")
        last = va + size - 1
        try:
            self.root_for(va)
            self.root_for(last)
        except TranslationFault as exc:
            raise ValueError(f"{what}: [{va:#x}, {last:#x}]: {exc.reason}") from None
        if is_high(va) != is_high(last):
            raise ValueError(f"{what}: [{va:#x}, {last:#x}] spans both halves")
        if va % page_size:
            raise AlignmentError(f"{what}: virtual address {va:#x} is not aligned to the {_size_name(page_size)}")
        if size % page_size:
            raise AlignmentError(f"{what}: size {size:#x} is not a multiple of the {_size_name(page_size)}")

    def _table_for(self, va: int, leaf_level: Level, create: bool, table_flags: int = 0) -> int | None:
        """The table at ``leaf_level`` holding the descriptor for ``va``; missing tables are allocated
        (their descriptors get ``table_flags``) when ``create``, else None."""
        table = self.root_for(va)
        level = Level.L0
        while level < leaf_level:
            addr = table + (((va >> level.shift) & 0x1FF) << 3)
            entry = self.memory.read_u64(addr)
            if entry & DESC_VALID:
                if not entry & DESC_TABLE:
                    raise MappingConflict(f"{va:#x} is already mapped by a {_size_name(level.coverage)} "
                                          f"({level.entry_name} at {addr:#x})")
                table = entry & OA_MASK
            else:
                if not create:
                    return None
                child = self._new_table()
                self.memory.write_u64(addr, child | DESC_VALID | DESC_TABLE | table_flags)
                table = child
            level = Level(level + 1)
        return table

    def leaf_flags(self, page_size: int, *, writable: bool = True, executable: bool = False, user: bool = False,
                   user_executable: bool = False, global_: bool = True, attr_index: int = 0,
                   extra: int = 0) -> int:
        """The attribute bits :meth:`map` puts in a block or page descriptor (the output address aside)."""
        if user and writable and executable:
            raise ValueError("a page EL0 can write is never executable at EL1 (the architecture forces PXN)")
        if not 0 <= attr_index < 8:
            raise ValueError(f"attr_index must be 0..7, got {attr_index}")
        bad = extra & ~(DESC_NS | DESC_SH_INNER | DESC_DBM | DESC_CONT | (0xF << 55))
        if bad:
            raise ValueError(f"extra descriptor bits {bad:#x} are not allowed (NS, SH, DBM, Contiguous and the "
                             "software bits 58:55 are)")
        flags = DESC_VALID | DESC_AF | attr_index << _ATTR_INDX_SHIFT | extra
        if not extra & DESC_SH_INNER:
            flags |= DESC_SH_INNER
        if page_size == PAGE_4K:
            flags |= DESC_PAGE
        if not writable:
            flags |= DESC_AP_RO
        if user:
            flags |= DESC_AP_EL0
        if not executable:
            flags |= DESC_PXN
        if not user_executable:
            flags |= DESC_UXN
        if not global_:
            flags |= DESC_NG
        return flags

    def map(self, va: int, pa: int, size: int, page_size: int = PAGE_4K, writable: bool = True,
            executable: bool = False, user: bool = False, global_: bool = True, *, user_executable: bool = False,
            attr_index: int = 0, extra: int = 0, table_flags: int = 0) -> int:
        """Map ``[va, va+size)`` to ``[pa, pa+size)`` with pages or blocks of ``page_size``.

        ``writable``: AP[2] clear; ``executable``: PXN clear (EL1 may run it); ``user``: AP[1] (EL0
        may access it); ``user_executable``: UXN clear; ``global_``: nG clear; ``attr_index``: the MAIR
        slot; ``extra``: NS, SH, DBM, Contiguous or software bits. AF is always set and SH defaults to
        inner shareable. Missing tables are allocated with ``table_flags`` (PXNTable, UXNTable,
        APTable) in the descriptors that point to them.

        Every target descriptor is checked before any is written: an overlap raises MappingConflict
        having changed nothing but, possibly, new empty tables. Returns the number of descriptors
        written.
        """
        self._check_range(va, size, page_size, "map")
        if not isinstance(pa, int) or pa < 0:
            raise ValueError(f"map: physical address must be a non-negative int, got {pa!r}")
        if pa % page_size:
            raise AlignmentError(f"map: physical address {pa:#x} is not aligned to the {_size_name(page_size)}")
        if pa + size > 1 << self.oa_bits:
            raise ValueError(f"map: physical range ends at {pa + size:#x}, beyond {self.oa_bits} bits")
        if table_flags & ~_TABLE_ATTRS:
            raise ValueError(f"map: table_flags {table_flags & ~_TABLE_ATTRS:#x} are not table attributes")
        flags = self.leaf_flags(page_size, writable=writable, executable=executable, user=user,
                                user_executable=user_executable, global_=global_, attr_index=attr_index,
                                extra=extra)
        leaf = _LEAF_LEVEL[page_size]
        # One run per table: the descriptors of a run are read and written as one block of bytes.
        runs: list[tuple[int, int]] = []
        span = leaf.coverage * 512
        cur, end = va, va + size
        while cur < end:
            stop = min(end, (cur | (span - 1)) + 1)
            runs.append((cur, (stop - cur) // page_size))
            cur = stop
        for v, n in runs:
            table = self._table_for(v, leaf, create=False)
            if table is None:
                continue
            first = table + (((v >> leaf.shift) & 0x1FF) << 3)
            for i, entry in enumerate(struct.unpack(f"<{n}Q", self.memory.read(first, 8 * n))):
                if entry & DESC_VALID:
                    where = v + i * page_size
                    if page_size != PAGE_4K and entry & DESC_TABLE:
                        raise MappingConflict(f"cannot map a {_size_name(page_size)} at {where:#x}: a table "
                                              f"already hangs off the {leaf.entry_name} at {first + 8 * i:#x}")
                    raise MappingConflict(f"{where:#x} is already mapped ({leaf.entry_name} at {first + 8 * i:#x})")
        for v, n in runs:
            table = self._table_for(v, leaf, create=True, table_flags=table_flags)
            assert table is not None
            first = table + (((v >> leaf.shift) & 0x1FF) << 3)
            p0 = pa + (v - va)
            self.memory.write(first, struct.pack(f"<{n}Q", *((p0 + i * page_size) | flags for i in range(n))))
        return size // page_size

    def _leaves_in(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(descriptor address, block/page base VA, size) of valid leaves touching [start, end)."""
        cur = start
        while cur < end:
            steps = self.walk(cur)
            last = steps[-1] if steps else None
            span = last.level.coverage if last is not None else Level.L0.coverage
            base = cur & ~(span - 1)
            if last is not None and is_leaf(last):
                yield last.entry_address, base, span
            cur = base + span

    def _leaf_name(self, size: int) -> str:
        return _size_name(size)

    def split(self, va: int) -> int:
        """Replace the block mapping ``va`` by a table of 512 smaller blocks or pages with the same
        translation and attributes (the Contiguous hint dropped: it described the old size). The new
        table is filled first and linked by one descriptor write. Returns the new table's address."""
        steps = self.walk(va)
        last = steps[-1] if steps else None
        if last is None or not is_leaf(last) or last.level is Level.L3:
            raise MappingConflict(f"{va:#x} is not mapped by a block")
        size = last.level.coverage
        child_size = size >> 9
        base_pa = last.entry & OA_MASK & ~(size - 1)
        attrs = last.entry & (_LOWER_ATTRS | _UPPER_ATTRS) & ~DESC_CONT
        kind = DESC_VALID | (DESC_PAGE if child_size == PAGE_4K else 0)
        table = self._new_table()
        self.memory.write(table, struct.pack("<512Q", *((base_pa + i * child_size) | attrs | kind
                                                        for i in range(512))))
        self.memory.write_u64(last.entry_address, table | DESC_VALID | DESC_TABLE)
        return table

    def set_descriptor_address(self, va: int, pa: int) -> int:
        """Point the valid page descriptor of ``va`` at the frame ``pa``, keeping its attributes (a
        rootkit's remap). Returns the descriptor's address. MappingConflict when a block maps ``va``."""
        if not isinstance(pa, int) or pa < 0 or pa >= 1 << self.oa_bits or pa % PAGE_4K:
            raise ValueError(f"set_descriptor_address: {pa!r} is not a 4 KiB aligned physical address")
        steps = self.walk(va)
        last = steps[-1] if steps else None
        if last is None or not is_leaf(last):
            where = last or WalkStep(Level.L0, self.root_for(va), 0)
            raise TranslationFault(va, where.level, where.entry_address, where.entry, "no page descriptor to rewrite",
                                   steps=tuple(steps))
        if last.level is not Level.L3:
            raise MappingConflict(f"{va:#x} is mapped by a {_size_name(last.level.coverage)}; split() it first")
        self.memory.write_u64(last.entry_address, (last.entry & ~OA_MASK) | pa)
        return last.entry_address

    def update_entry(self, va: int, level: Level | int, *, writable: bool | None = None,
                     executable: bool | None = None, user: bool | None = None,
                     user_executable: bool | None = None) -> int:
        """Change the permission bits of the valid leaf descriptor at ``level`` on the walk of ``va``.
        Returns its address."""
        level = Level(level)
        step = next((s for s in self.walk(va) if s.level is level), None)
        if step is None or not is_leaf(step):
            raise MappingConflict(f"the walk of {va:#x} has no block or page descriptor at level {int(level)}")
        e = step.entry
        for value, bit, when_true in ((writable, DESC_AP_RO, False), (executable, DESC_PXN, False),
                                      (user, DESC_AP_EL0, True), (user_executable, DESC_UXN, False)):
            if value is not None:
                e = e | bit if value == when_true else e & ~bit
        self.memory.write_u64(step.entry_address, e)
        return step.entry_address

    def __repr__(self) -> str:
        return f"Stage1Tables(ttbr0={self.ttbr0:#x}, ttbr1={self.ttbr1:#x}, tcr={self.tcr:#x})"


# --------------------------------------------------------------------- helpers
def _denied(t: Translation, access: str, el: int, pan: bool) -> str | None:
    if el == 0:
        if access == "read" and not t.user:
            return "EL0 may not read this page (AP[1] clear)"
        if access == "write" and not t.user_writable:
            return "EL0 may not write this page"
        if access == "exec" and not t.user_executable:
            return "EL0 may not execute this page (UXN)"
        return None
    if access == "exec":
        return None if t.executable else "EL1 may not execute this page (PXN, or writable at EL0, or WXN)"
    if pan and t.user:
        return "PSTATE.PAN forbids EL1 data accesses to a page EL0 can access"
    if access == "write" and not t.writable:
        return "the page is read-only at EL1 (AP[2])"
    return None


def _check_va(va: int) -> None:
    if not isinstance(va, int) or isinstance(va, bool):
        raise TypeError(f"virtual address must be an int, not {type(va).__name__}")
    if not 0 <= va < 1 << 64:
        raise ValueError(f"{va!r} is not a 64-bit virtual address")


def _check_ttbr(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise ValueError(f"{name} must be a 64-bit register value, got {value!r}")
    return value


def _check_tcr(tcr: int) -> None:
    if not isinstance(tcr, int) or not 0 <= tcr < 1 << 64:
        raise ValueError(f"TCR_EL1 must be a 64-bit value, got {tcr!r}")
    t0sz, t1sz = tcr & _TCR_T0SZ, (tcr >> _TCR_T1SZ_SHIFT) & _TCR_T0SZ
    tg0, tg1 = (tcr >> _TCR_TG0_SHIFT) & 0b11, (tcr >> _TCR_TG1_SHIFT) & 0b11
    if (t0sz, t1sz) != (16, 16):
        raise ValueError(f"TCR_EL1 {tcr:#x}: T0SZ={t0sz}, T1SZ={t1sz}; only 48-bit ranges (16) are supported")
    if (tg0, tg1) != (_TG0_4K, _TG1_4K):
        raise ValueError(f"TCR_EL1 {tcr:#x}: TG0={tg0:#b}, TG1={tg1:#b}; only 4 KiB granules are supported")
