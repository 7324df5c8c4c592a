"""x86-64 4-level paging (IA-32e paging) over :class:`GuestMemory`.

The paging structures live in guest-physical memory exactly as the hardware
sees them: 512 eight-byte entries per 4 KiB table, PML4 -> PDPT -> PD -> PT,
with 48-bit canonical linear addresses.  Everything that reads a translation
walks the bytes in guest memory, so a rootkit-style rewrite of an entry (made
with :meth:`PageTables.set_pte` or a raw ``memory.write_u64``) is seen at once.

Architectural rules honoured by the walker (Intel SDM vol. 3A, 4.5):

* a linear address is canonical when bits 63:47 are all equal; others raise
  :class:`NonCanonicalAddress` before any table is read;
* an entry with P=0 ends the walk (:class:`PageNotPresent`);
* PS=1 in a PDPTE maps a 1 GiB page, in a PDE a 2 MiB page; PS in a PML4E is
  reserved, and bit 7 of a PTE is PAT, not PS;
* the physical address comes from bits 51:12 of the entry
  (``0x000ffffffffff000``), from bits 51:21 for a 2 MiB page and from bits
  51:30 for a 1 GiB page (bit 12 of a large-page entry is its PAT bit);
  bits 20:13 / 29:13 of large-page entries and bits 51:MAXPHYADDR of any
  entry are reserved and fault (:class:`ReservedBitFault`) when set;
* the effective access rights are the AND of RW and of U/S over all levels,
  and the page is non-executable if any level has XD (NX, bit 63).

Assumptions of the model: IA32_EFER.NXE=1 (so bit 63 is XD, not reserved),
CR0.WP=1 (so ``writable`` is what a supervisor write also needs), CR4.PKE=0
(bits 62:59 are ignored), 4-level paging (no LA57).  Accessed/dirty bits are
not updated by translations and there is no TLB: a change to the tables is
effective immediately.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from .guest_memory import FRAME_SHIFT, FRAME_SIZE, GuestMemory, PhysicalAddressError
from ..errors import PolicycError

__all__ = [
    "AddressSpace",
    "PAGE_4K", "PAGE_2M", "PAGE_1G", "PAGE_SIZES",
    "PTE_P", "PTE_RW", "PTE_US", "PTE_PWT", "PTE_PCD", "PTE_A", "PTE_D", "PTE_PS",
    "PTE_PAT", "PTE_G", "PTE_PAT_LARGE", "PTE_NX", "ADDR_MASK",
    "Level", "Translation", "WalkStep", "Mapping", "PageTables",
    "PagingError", "NonCanonicalAddress", "PageFault", "PageNotPresent",
    "ReservedBitFault", "AlignmentError", "MappingConflict",
    "is_canonical", "canonicalize",
]

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
PAGE_SIZES = (PAGE_4K, PAGE_2M, PAGE_1G)

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7     # in PDPTEs and PDEs
PTE_PAT = 1 << 7    # in PTEs (same bit as PS)
PTE_G = 1 << 8
PTE_PAT_LARGE = 1 << 12  # PAT bit of a 2 MiB / 1 GiB page entry
PTE_NX = 1 << 63

#: Bits 51:12, the physical-address field of an entry that references a 4 KiB
#: page or a paging structure.
ADDR_MASK = 0x000F_FFFF_FFFF_F000
_AVAILABLE_BITS = (0b111 << 9) | (((1 << 11) - 1) << 52)  # bits 11:9 and 62:52 (ignored)

_ENTRIES = struct.Struct("<512Q")

VA_BITS = 48
_VA_LIMIT = 1 << 64
_HALF = 1 << (VA_BITS - 1)
_HIGH_PREFIX = ((1 << 64) - 1) ^ ((1 << VA_BITS) - 1)  # bits 63:48

#: Rights of the entries that point to a lower-level table when this module
#: creates them: permissive, so that the leaf entry decides (as Linux does).
_TABLE_ENTRY_FLAGS = PTE_P | PTE_RW | PTE_US


class Level(enum.IntEnum):
    """Paging-structure levels (the number is how many levels remain)."""

    PT = 1
    PD = 2
    PDPT = 3
    PML4 = 4

    @property
    def shift(self) -> int:
        return 12 + 9 * (self.value - 1)

    @property
    def coverage(self) -> int:
        """Bytes of linear address space one entry at this level covers."""
        return 1 << self.shift

    @property
    def entry_name(self) -> str:
        return {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}[self.value]


_LEAF_LEVEL = {PAGE_4K: Level.PT, PAGE_2M: Level.PD, PAGE_1G: Level.PDPT}


def _size_name(size: int) -> str:
    return {PAGE_4K: "4 KiB", PAGE_2M: "2 MiB", PAGE_1G: "1 GiB"}.get(size, f"{size:#x}-byte")


# --------------------------------------------------------------------- errors
class PagingError(PolicycError):
    """Base class for errors of the paging model."""


class NonCanonicalAddress(PagingError, ValueError):
    """A linear address whose bits 63:47 are not all equal (a #GP, not a #PF)."""

    def __init__(self, va: int) -> None:
        self.va = va
        super().__init__(f"linear address {va:#x} is not canonical (bits 63:47 must all be equal)")


class PageFault(PagingError):
    """The walk for ``va`` stopped at ``level``; ``entry_address`` is the entry read."""

    def __init__(self, va: int, level: Level, entry_address: int, entry: int, reason: str) -> None:
        self.va = va
        self.level = level
        self.entry_address = entry_address
        self.entry = entry
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        return (f"page fault at {self.va:#x}: {self.level.entry_name} at {self.entry_address:#x} = "
                f"{self.entry:#018x}: {self.reason}")


class PageNotPresent(PageFault):
    """An entry on the walk has P=0."""


class ReservedBitFault(PageFault):
    """A present entry on the walk has a reserved bit set."""


class AlignmentError(PagingError, ValueError):
    """An address or size is not aligned to the requested page size."""


class MappingConflict(PagingError):
    """The requested change collides with the existing mappings."""


# -------------------------------------------------------------------- helpers
def is_canonical(va: int) -> bool:
    """True when ``va`` is a canonical 48-bit linear address."""
    if not 0 <= va < _VA_LIMIT:
        return False
    top = va >> (VA_BITS - 1)
    return top == 0 or top == (1 << (64 - VA_BITS + 1)) - 1


def canonicalize(va48: int) -> int:
    """Sign-extend a 48-bit linear address to its canonical 64-bit form."""
    va48 &= (1 << VA_BITS) - 1
    return va48 | _HIGH_PREFIX if va48 & _HALF else va48


def _check_va(va: int) -> None:
    if not isinstance(va, int):
        raise TypeError(f"linear address must be an int, not {type(va).__name__}")
    if not is_canonical(va):
        if not 0 <= va < _VA_LIMIT:
            raise ValueError(f"{va!r} is not a 64-bit linear address")
        raise NonCanonicalAddress(va)


@dataclass(frozen=True)
class Translation:
    """Result of a successful page walk.

    ``pte_address`` is the guest-physical address of the leaf entry (the PTE,
    or the PDE / PDPTE of a 2 MiB / 1 GiB page).
    """

    va: int
    pa: int
    page_size: int
    writable: bool
    executable: bool
    user: bool
    global_: bool
    pte_address: int

    @property
    def page_base(self) -> int:
        """Physical address of the start of the page."""
        return self.pa & ~(self.page_size - 1)

    @property
    def level(self) -> Level:
        return _LEAF_LEVEL[self.page_size]


@dataclass(frozen=True)
class WalkStep:
    """One paging-structure entry read during a walk: x86 (a `Level` of this module) or AArch64 stage 1
    (`paging_arm64.Level`; what else a descriptor says is read by `paging_arm64.is_table`/`is_leaf`)."""

    level: int
    entry_address: int
    entry: int

    @property
    def present(self) -> bool:
        """x86's P bit; AArch64's valid bit is the same bit 0."""
        return bool(self.entry & PTE_P)


@dataclass(frozen=True)
class Mapping:
    """One leaf entry, as enumerated by :meth:`PageTables.mappings`.

    Permissions are the effective ones (combined over all levels).
    """

    va: int
    pa: int
    page_size: int
    writable: bool
    executable: bool
    user: bool
    global_: bool
    entry_address: int


# ----------------------------------------------------------------- the model
class AddressSpace:
    """What every translation regime offers on top of its own `translate(va)` (x86-64 `PageTables`,
    AArch64 `paging_arm64.Stage1Tables`): ranges of pieces, and reads and writes through them; and
    on top of its own leaf decoding (`_leaves_in`), unmapping."""

    memory: Any

    def translate(self, va: int) -> Any:       # pragma: no cover - each regime has its own
        raise NotImplementedError

    def _check_range(self, va: int, size: int, page_size: int, what: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def _leaves_in(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:  # pragma: no cover
        """(entry address, page base va, page size) of the present leaves touching ``[start, end)``."""
        raise NotImplementedError

    def _leaf_name(self, size: int) -> str:     # pragma: no cover
        """What a leaf of ``size`` bytes is called in this regime's messages ("2 MiB page")."""
        raise NotImplementedError

    def translate_range(self, va: int, length: int) -> list[tuple[int, int, int]]:
        """Physical pieces ``(va, pa, length)`` backing ``[va, va+length)``, merged where contiguous;
        raises like :meth:`translate` at the first byte that does not translate."""
        pieces: list[tuple[int, int, int]] = []
        end = va + length
        while va < end:
            t = self.translate(va)
            chunk = min(end - va, t.page_size - (va & (t.page_size - 1)))
            if pieces and pieces[-1][1] + pieces[-1][2] == t.pa and pieces[-1][0] + pieces[-1][2] == va:
                pv, pp, pl = pieces[-1]
                pieces[-1] = (pv, pp, pl + chunk)
            else:
                pieces.append((va, t.pa, chunk))
            va += chunk
        return pieces

    def read_virtual(self, va: int, length: int) -> bytes:
        """Read guest memory through this address space, as a hypervisor would (no permission check)."""
        return b"".join(self.memory.read(pa, n) for _, pa, n in self.translate_range(va, length))

    def write_virtual(self, va: int, data: bytes) -> None:
        """Write guest memory through this address space, as a hypervisor would (read-only pages
        included)."""
        pos = 0
        for _, pa, n in self.translate_range(va, len(data)):
            self.memory.write(pa, data[pos:pos + n])
            pos += n

    def unmap(self, va: int, size: int) -> int:
        """Clear every leaf entry (page, large page or block) in ``[va, va+size)``; holes are skipped.

        ``va`` and ``size`` must be 4 KiB aligned; a large page or block that the range only partly
        covers raises :class:`MappingConflict` (:meth:`split` it first) and nothing is changed. Tables
        are kept. Returns the number of leaf entries cleared.
        """
        self._check_range(va, size, PAGE_4K, "unmap")
        leaves = list(self._leaves_in(va, va + size))
        for _, base, page in leaves:
            if base < va or base + page > va + size:
                raise MappingConflict(f"unmap [{va:#x}, {va + size:#x}) covers only part of the "
                                      f"{self._leaf_name(page)} at {base:#x}; split() it first")
        for addr, _, _ in leaves:
            self.memory.write_u64(addr, 0)
        return len(leaves)


class PageTables(AddressSpace):
    """One address space: a PML4 in guest memory and the tables below it.

    Args:
        memory: the guest memory holding the paging structures.
        cr3: physical address of an existing PML4 (bits 11:0, i.e. PCD/PWT
            or a PCID, are ignored).  When omitted a zeroed PML4 is taken
            from ``memory.alloc_frame()``.
        maxphyaddr: physical-address width; entry bits 51:maxphyaddr are
            reserved.  52 (the architectural maximum) by default.
    """

    def __init__(self, memory: GuestMemory, cr3: int | None = None, *, maxphyaddr: int = 52) -> None:
        if not 36 <= maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr must be in 36..52, got {maxphyaddr}")
        self.memory = memory
        self.maxphyaddr = maxphyaddr
        self._addr_mask = ADDR_MASK & ((1 << maxphyaddr) - 1)
        self._rsvd_high = ADDR_MASK & ~self._addr_mask  # bits 51:maxphyaddr
        if cr3 is None:
            cr3 = memory.alloc_frame() << FRAME_SHIFT
        elif not isinstance(cr3, int) or cr3 < 0:
            raise ValueError(f"cr3 must be a non-negative int, got {cr3!r}")
        self._pml4 = cr3 & self._addr_mask
        if self._pml4 + FRAME_SIZE > memory.size:
            raise PhysicalAddressError(f"PML4 at {self._pml4:#x} is outside guest memory")

    # ----------------------------------------------------------- properties
    @property
    def cr3(self) -> int:
        """The CR3 value for this address space (PML4 address, no PCID)."""
        return self._pml4

    @property
    def pml4_address(self) -> int:
        return self._pml4

    # --------------------------------------------------------------- walking
    def _read_entry(self, va: int, level: Level, entry_address: int) -> int:
        try:
            return self.memory.read_u64(entry_address)
        except PhysicalAddressError:
            raise PageFault(va, level, entry_address, 0,
                            "paging structure lies outside guest memory") from None

    def _reserved_bits(self, level: Level, entry: int) -> int:
        rsvd = entry & self._rsvd_high
        if level is Level.PML4:
            rsvd |= entry & PTE_PS
        elif entry & PTE_PS and level is not Level.PT:
            size = level.coverage
            # bits (log2(size)-1):13 of a large-page entry are reserved
            rsvd |= entry & (size - 1) & ~(PTE_PAT_LARGE | (FRAME_SIZE - 1))
        return rsvd

    def walk(self, va: int) -> list[WalkStep]:
        """The entries read to translate ``va``, top level first.

        The walk stops at the leaf entry, or at the first entry that is not
        present or has a reserved bit set (that entry is included).
        Raises :class:`NonCanonicalAddress` for a non-canonical ``va``.
        """
        _check_va(va)
        steps: list[WalkStep] = []
        table = self._pml4
        for level in (Level.PML4, Level.PDPT, Level.PD, Level.PT):
            addr = table + (((va >> level.shift) & 0x1FF) << 3)
            try:
                entry = self.memory.read_u64(addr)
            except PhysicalAddressError:
                break
            steps.append(WalkStep(level, addr, entry))
            if not entry & PTE_P or self._reserved_bits(level, entry):
                break
            if level is Level.PT or (entry & PTE_PS and level in (Level.PDPT, Level.PD)):
                break
            table = entry & self._addr_mask
        return steps

    def walk_entries(self, va: int) -> list[int]:
        """Guest-physical addresses of the paging-structure entries that the
        translation of ``va`` depends on (see :meth:`walk`).

        For an unmapped address this ends with the non-present entry, whose
        rewrite would make the address mapped.
        """
        return [step.entry_address for step in self.walk(va)]

    def translate(self, va: int) -> Translation:
        """Translate a linear address.

        Raises:
            NonCanonicalAddress: ``va`` is not canonical.
            PageNotPresent: an entry on the walk has P=0.
            ReservedBitFault: a present entry has a reserved bit set.
        """
        _check_va(va)
        table = self._pml4
        writable = user = True
        nx = False
        for level in (Level.PML4, Level.PDPT, Level.PD, Level.PT):
            addr = table + (((va >> level.shift) & 0x1FF) << 3)
            entry = self._read_entry(va, level, addr)
            if not entry & PTE_P:
                raise PageNotPresent(va, level, addr, entry, "entry not present")
            if self._reserved_bits(level, entry):
                raise ReservedBitFault(
                    va, level, addr, entry,
                    f"reserved bits {self._reserved_bits(level, entry):#x} set")
            writable = writable and bool(entry & PTE_RW)
            user = user and bool(entry & PTE_US)
            nx = nx or bool(entry & PTE_NX)
            leaf = level is Level.PT or (entry & PTE_PS and level is not Level.PML4)
            if leaf:
                size = level.coverage
                pa = (entry & self._addr_mask & ~(size - 1)) | (va & (size - 1))
                return Translation(va=va, pa=pa, page_size=size, writable=writable,
                                   executable=not nx, user=user,
                                   global_=bool(entry & PTE_G), pte_address=addr)
            table = entry & self._addr_mask
        raise AssertionError("unreachable")  # pragma: no cover

    def try_translate(self, va: int) -> Translation | None:
        """Like :meth:`translate` but returns None when the page is not mapped
        (any page fault).  Non-canonical addresses still raise."""
        try:
            return self.translate(va)
        except PageFault:
            return None

    def is_mapped(self, va: int) -> bool:
        """True when ``va`` is canonical and translates."""
        try:
            self.translate(va)
        except (PageFault, NonCanonicalAddress):
            return False
        return True

    # ----------------------------------------------------------- enumerating
    def _child_tables(self, table: int, level: Level) -> Iterator[tuple[int, int]]:
        """(index, child table address) for present non-leaf entries."""
        for index, entry in enumerate(_ENTRIES.unpack(self.memory.read(table, FRAME_SIZE))):
            if not entry & PTE_P or self._reserved_bits(level, entry):
                continue
            if level is Level.PT or (entry & PTE_PS and level is not Level.PML4):
                continue
            child = entry & self._addr_mask
            if child + FRAME_SIZE <= self.memory.size:
                yield index, child

    def page_table_frames(self) -> list[int]:
        """Sorted gfns of every frame that currently holds a paging structure
        reachable from CR3 (found by walking the live tables, so tables a
        guest built itself are included)."""
        seen: set[int] = {self._pml4 >> FRAME_SHIFT}
        todo: list[tuple[int, Level]] = [(self._pml4, Level.PML4)]
        while todo:
            table, level = todo.pop()
            if level is Level.PT:
                continue
            for _, child in self._child_tables(table, level):
                gfn = child >> FRAME_SHIFT
                if gfn not in seen:
                    seen.add(gfn)
                    todo.append((child, Level(level - 1)))
        return sorted(seen)

    def mappings(self) -> Iterator[Mapping]:
        """Every present leaf entry, in increasing canonical address order
        (low half first), with effective permissions."""
        yield from self._mappings(self._pml4, Level.PML4, 0, True, True, False, frozenset())

    def _mappings(self, table: int, level: Level, base: int, w: bool, u: bool, nx: bool,
                  path: frozenset[int]) -> Iterator[Mapping]:
        if table in path:  # a self-referencing table: do not loop
            return
        path = path | {table}
        for index, entry in enumerate(_ENTRIES.unpack(self.memory.read(table, FRAME_SIZE))):
            if not entry & PTE_P or self._reserved_bits(level, entry):
                continue
            va = base | (index << level.shift)
            if level is Level.PML4:
                va = canonicalize(va)
            ew, eu, enx = w and bool(entry & PTE_RW), u and bool(entry & PTE_US), nx or bool(entry & PTE_NX)
            if level is Level.PT or (entry & PTE_PS and level is not Level.PML4):
                size = level.coverage
                yield Mapping(va=va, pa=entry & self._addr_mask & ~(size - 1), page_size=size,
                              writable=ew, executable=not enx, user=eu,
                              global_=bool(entry & PTE_G),
                              entry_address=table + index * 8)
            else:
                child = entry & self._addr_mask
                if child + FRAME_SIZE <= self.memory.size:
                    yield from self._mappings(child, Level(level - 1), va, ew, eu, enx, path)

    # ------------------------------------------------------------- building
    def _check_range(self, va: int, size: int, page_size: int, what: str) -> None:
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size must be 4 KiB, 2 MiB or 1 GiB, got {page_size:#x}")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{what}: size must be a positive int, got {size!r}")
        _check_va(va)
        last = va + size - 1
        if not is_canonical(last) or (last >> 47) != (va >> 47):
            raise NonCanonicalAddress(last if not is_canonical(last) else va + size)
        if va % page_size:
            raise AlignmentError(
                f"{what}: virtual address {va:#x} is not aligned to the {_size_name(page_size)} page size")
        if size % page_size:
            raise AlignmentError(
                f"{what}: size {size:#x} is not a multiple of the {_size_name(page_size)} page size")

    def _table_for(self, va: int, leaf_level: Level, create: bool) -> int | None:
        """Address of the table at ``leaf_level`` that holds the entry for
        ``va``; intermediate tables are allocated when ``create``.  Returns
        None (without creating) when the path is missing."""
        table = self._pml4
        level = Level.PML4
        while level > leaf_level:
            addr = table + (((va >> level.shift) & 0x1FF) << 3)
            entry = self.memory.read_u64(addr)
            if entry & PTE_P:
                if entry & PTE_PS and level is not Level.PML4:
                    raise MappingConflict(
                        f"{va:#x} is already mapped by a {_size_name(level.coverage)} page "
                        f"({level.entry_name} at {addr:#x})")
                table = entry & self._addr_mask
            else:
                if not create:
                    return None
                child = self.memory.alloc_frame() << FRAME_SHIFT
                self.memory.write_u64(addr, child | _TABLE_ENTRY_FLAGS)
                table = child
            level = Level(level - 1)
        return table

    def _leaf_allowed_extra(self, page_size: int) -> int:
        pat = PTE_PAT if page_size == PAGE_4K else PTE_PAT_LARGE
        return PTE_PWT | PTE_PCD | PTE_A | PTE_D | pat | _AVAILABLE_BITS

    def map(self, va: int, pa: int, size: int, page_size: int = PAGE_4K,
            writable: bool = True, executable: bool = False, user: bool = False,
            global_: bool = False, *, leaf_flags: int = 0) -> int:
        """Map ``[va, va+size)`` to ``[pa, pa+size)`` with pages of ``page_size``.

        Leaf entries get P, RW (``writable``), US (``user``), G (``global_``),
        PS for large pages and XD (bit 63) unless ``executable``; any
        ``leaf_flags`` (PWT, PCD, A, D, the PAT bit of the page size, or the
        ignored bits 11:9 / 62:52) are ORed in.  Missing tables are allocated
        from the guest memory's frame allocator, with permissive entries
        (P|RW|US, no XD) so that the leaf decides.

        The whole range is checked before anything is written: a range that
        overlaps an existing mapping raises :class:`MappingConflict` and
        changes nothing but, possibly, new empty tables.
        Returns the number of leaf entries written.
        """
        self._check_range(va, size, page_size, "map")
        if not isinstance(pa, int) or pa < 0:
            raise ValueError(f"map: physical address must be a non-negative int, got {pa!r}")
        if pa % page_size:
            raise AlignmentError(
                f"map: physical address {pa:#x} is not aligned to the {_size_name(page_size)} page size")
        if pa + size > 1 << self.maxphyaddr:
            raise ValueError(
                f"map: physical range ends at {pa + size:#x}, beyond MAXPHYADDR ({self.maxphyaddr} bits)")
        extra_bad = leaf_flags & ~self._leaf_allowed_extra(page_size)
        if extra_bad:
            raise ValueError(f"map: leaf_flags {extra_bad:#x} are not allowed for {_size_name(page_size)} pages")
        leaf_level = _LEAF_LEVEL[page_size]
        flags = PTE_P | leaf_flags
        if writable:
            flags |= PTE_RW
        if user:
            flags |= PTE_US
        if global_:
            flags |= PTE_G
        if not executable:
            flags |= PTE_NX
        if page_size != PAGE_4K:
            flags |= PTE_PS

        count = size // page_size
        # First pass: every target entry must be free.
        for i in range(count):
            v = va + i * page_size
            table = self._table_for(v, leaf_level, create=False)
            if table is None:
                continue
            addr = table + (((v >> leaf_level.shift) & 0x1FF) << 3)
            entry = self.memory.read_u64(addr)
            if entry & PTE_P:
                if page_size != PAGE_4K and not entry & PTE_PS:
                    raise MappingConflict(
                        f"cannot map a {_size_name(page_size)} page at {v:#x}: a page table already "
                        f"exists below the {leaf_level.entry_name} at {addr:#x}; unmap it first")
                raise MappingConflict(f"{v:#x} is already mapped ({leaf_level.entry_name} at {addr:#x})")
        # Second pass: write.
        for i in range(count):
            v = va + i * page_size
            table = self._table_for(v, leaf_level, create=True)
            assert table is not None
            addr = table + (((v >> leaf_level.shift) & 0x1FF) << 3)
            self.memory.write_u64(addr, (pa + i * page_size) | flags)
        return count

    def _leaf_name(self, size: int) -> str:
        return f"{_size_name(size)} page"

    def _leaves_in(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(entry address, page base va, page size) for present leaves
        touching ``[start, end)`` (a canonical, same-half range)."""
        cur = start
        while cur < end:
            steps = self.walk(cur)
            last = steps[-1]
            span = last.level.coverage
            base = cur & ~(span - 1)
            is_leaf = last.level is Level.PT or (
                last.entry & PTE_PS and last.level in (Level.PDPT, Level.PD))
            if last.present and is_leaf and not self._reserved_bits(last.level, last.entry):
                yield last.entry_address, base, span
            cur = base + span

    def set_pte(self, va: int, pa: int, *, writable: bool | None = None,
                executable: bool | None = None, user: bool | None = None) -> int:
        """Point the present 4 KiB PTE for ``va`` at the frame ``pa``.

        This is the rootkit-style remap: only the leaf entry changes, its
        other bits are kept unless ``writable`` / ``executable`` / ``user``
        are given.  Returns the guest-physical address of the PTE written.

        Raises :class:`PageNotPresent` when ``va`` has no present PTE and
        :class:`MappingConflict` when it is mapped by a large page.
        """
        _check_va(va)
        if not isinstance(pa, int) or pa < 0 or pa >= 1 << self.maxphyaddr:
            raise ValueError(f"set_pte: {pa!r} is not a valid physical address")
        if pa % PAGE_4K:
            raise AlignmentError(f"set_pte: physical address {pa:#x} is not 4 KiB aligned")
        steps = self.walk(va)
        last = steps[-1]
        if not last.present:
            raise PageNotPresent(va, last.level, last.entry_address, last.entry,
                                 "no present PTE to rewrite")
        if last.level is not Level.PT:
            raise MappingConflict(
                f"{va:#x} is mapped by a {_size_name(last.level.coverage)} page "
                f"({last.level.entry_name} at {last.entry_address:#x}); split() it before set_pte")
        entry = (last.entry & ~self._addr_mask) | pa
        entry = _apply_rights(entry, writable, executable, user)
        self.memory.write_u64(last.entry_address, entry)
        return last.entry_address

    def update_entry(self, va: int, level: Level | int, *, writable: bool | None = None,
                     executable: bool | None = None, user: bool | None = None,
                     global_: bool | None = None) -> int:
        """Change the rights bits of the present entry at ``level`` on the
        walk of ``va`` (an upper-level entry restricts everything below it).
        Returns the address of the entry written."""
        level = Level(level)
        steps = self.walk(va)
        step = next((s for s in steps if s.level is level), None)
        if step is None or not step.present:
            where = steps[-1]
            raise PageNotPresent(va, where.level, where.entry_address, where.entry,
                                 f"walk does not reach a present {level.entry_name}")
        entry = _apply_rights(step.entry, writable, executable, user)
        if global_ is not None:
            entry = entry | PTE_G if global_ else entry & ~PTE_G
        self.memory.write_u64(step.entry_address, entry)
        return step.entry_address

    def split(self, va: int) -> int:
        """Replace the large page mapping ``va`` by a table of 512 smaller
        pages (1 GiB -> 2 MiB, 2 MiB -> 4 KiB) with the same translation and
        rights.  Returns the physical address of the new table."""
        steps = self.walk(va)
        last = steps[-1]
        if not last.present or last.level not in (Level.PDPT, Level.PD) or not last.entry & PTE_PS:
            raise MappingConflict(f"{va:#x} is not mapped by a large page")
        entry = last.entry
        size = last.level.coverage
        child_size = size >> 9
        base_pa = entry & self._addr_mask & ~(size - 1)
        flags = entry & ~self._addr_mask  # P, RW, US, PWT, PCD, A, D, PS, G, ignored, XD
        flags |= entry & PTE_PAT_LARGE
        if child_size == PAGE_4K:
            flags &= ~(PTE_PS | PTE_PAT_LARGE)
            if entry & PTE_PAT_LARGE:
                flags |= PTE_PAT
        table = self.memory.alloc_frame() << FRAME_SHIFT
        raw = b"".join(((base_pa + i * child_size) | flags).to_bytes(8, "little") for i in range(512))
        self.memory.write(table, raw)
        self.memory.write_u64(last.entry_address, table | _TABLE_ENTRY_FLAGS)
        return table

    def __repr__(self) -> str:
        return f"PageTables(cr3={self._pml4:#x})"


def _apply_rights(entry: int, writable: bool | None, executable: bool | None,
                  user: bool | None) -> int:
    if writable is not None:
        entry = entry | PTE_RW if writable else entry & ~PTE_RW
    if user is not None:
        entry = entry | PTE_US if user else entry & ~PTE_US
    if executable is not None:
        entry = entry & ~PTE_NX if executable else entry | PTE_NX
    return entry
