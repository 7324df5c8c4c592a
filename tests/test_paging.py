"""Behaviour of the simulated guest's physical memory and x86-64 paging model."""

from __future__ import annotations

import pytest

from policyc.runtime.guest_memory import (
    FRAME_SIZE,
    GuestMemory,
    OutOfFramesError,
    PhysicalAddressError,
)
from policyc.runtime.paging import (
    ADDR_MASK,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PAT,
    PTE_PAT_LARGE,
    PTE_PS,
    PTE_RW,
    PTE_US,
    AlignmentError,
    Level,
    MappingConflict,
    NonCanonicalAddress,
    PageFault,
    PageNotPresent,
    PageTables,
    ReservedBitFault,
    canonicalize,
    is_canonical,
)

GiB = 1 << 30
MiB = 1 << 20
KERNEL_TEXT = 0xFFFF_FFFF_8100_0000
DIRECT_MAP = 0xFFFF_8880_0000_0000


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory(8 * GiB)


@pytest.fixture
def pt(mem: GuestMemory) -> PageTables:
    return PageTables(mem)


# ---------------------------------------------------------------- GuestMemory
class TestGuestMemory:
    def test_unpopulated_reads_zero_but_is_distinguishable(self, mem: GuestMemory) -> None:
        assert mem.read(0x5000, 16) == bytes(16)
        assert not mem.is_populated(5)
        mem.write(0x5000, bytes(16))  # writing zeros still populates
        assert mem.is_populated(5)
        assert mem.populated_frames() == [5]

    def test_cross_frame_read_write(self, mem: GuestMemory) -> None:
        data = bytes(range(256)) * 40  # 10240 bytes: spans 3 frames plus change
        mem.write(0x1FF0, data)
        assert mem.read(0x1FF0, len(data)) == data
        assert mem.populated_frames() == [1, 2, 3, 4]
        assert mem.read(0x1FEF, 2) == b"\x00" + data[:1]

    def test_u64_little_endian_and_straddling(self, mem: GuestMemory) -> None:
        mem.write_u64(0x3000, 0x1122334455667788)
        assert mem.read(0x3000, 8) == bytes.fromhex("8877665544332211")
        mem.write_u64(0x3FFC, 0xDEADBEEFCAFEF00D)  # straddles frames 3 and 4
        assert mem.read_u64(0x3FFC) == 0xDEADBEEFCAFEF00D
        assert mem.is_populated(4)
        with pytest.raises(ValueError):
            mem.write_u64(0, 1 << 64)

    def test_out_of_range_access_rejected(self, mem: GuestMemory) -> None:
        with pytest.raises(PhysicalAddressError):
            mem.read(mem.size - 4, 8)
        with pytest.raises(PhysicalAddressError):
            mem.write_u64(mem.size, 0)
        with pytest.raises(PhysicalAddressError):
            mem.read(-1, 1)

    def test_allocator_is_top_down_and_skips_populated(self) -> None:
        m = GuestMemory(1 * GiB)
        top = m.frame_count - 1
        m.write(top * FRAME_SIZE, b"kernel")  # someone's data at the very top
        first, second = m.alloc_frame(), m.alloc_frame()
        assert (first, second) == (top - 1, top - 2)
        assert m.read(top * FRAME_SIZE, 6) == b"kernel"
        assert m.is_populated(first) and m.read(first * FRAME_SIZE, FRAME_SIZE) == bytes(FRAME_SIZE)
        m.free_frame(first)
        assert not m.is_populated(first)
        assert m.alloc_frame() == first  # reused

    def test_allocator_range_exhaustion(self) -> None:
        m = GuestMemory(16 * MiB, alloc_range=(100, 103), alloc_top_down=False)
        assert [m.alloc_frame() for _ in range(3)] == [100, 101, 102]
        with pytest.raises(OutOfFramesError):
            m.alloc_frame()

    def test_snapshot_equality_and_diff(self, mem: GuestMemory) -> None:
        mem.write(0x10000, b"hello")
        before = mem.snapshot()
        assert mem.matches(before)
        mem.populate(0x99)  # populating with zeros is not a content change
        assert mem.snapshot() == before
        mem.write(0x10002, b"L")
        mem.write_u64(0x20FFC, 0xFFFF_FFFF_FFFF_FFFF)
        after = mem.snapshot()
        assert after != before
        assert before.changed_frames(after) == [0x10, 0x20, 0x21]
        assert before.changed_ranges(after) == [(0x10002, 1), (0x20FFC, 8)]
        mem.restore(before)
        assert mem.matches(before)
        assert mem.read(0x10000, 5) == b"hello"


# -------------------------------------------------------------------- paging
class TestTranslate:
    def test_4k_first_and_last_byte(self, pt: PageTables) -> None:
        pt.map(0x40_0000, 0x20_0000, 3 * PAGE_4K, writable=True, user=True)
        t = pt.translate(0x40_0000)
        assert (t.pa, t.page_size) == (0x20_0000, PAGE_4K)
        assert pt.translate(0x40_2FFF).pa == 0x20_2FFF
        assert pt.translate(0x40_1234).pa == 0x20_1234
        with pytest.raises(PageNotPresent):
            pt.translate(0x40_3000)
        with pytest.raises(PageNotPresent):
            pt.translate(0x3F_FFFF)

    def test_2m_first_and_last_byte(self, pt: PageTables) -> None:
        pt.map(KERNEL_TEXT - 0x100_0000, 0x100_0000, 2 * PAGE_2M, PAGE_2M, writable=False, executable=True)
        base = KERNEL_TEXT - 0x100_0000
        t = pt.translate(base)
        assert (t.pa, t.page_size, t.writable, t.executable) == (0x100_0000, PAGE_2M, False, True)
        last = pt.translate(base + 2 * PAGE_2M - 1)
        assert last.pa == 0x100_0000 + 2 * PAGE_2M - 1
        assert last.pte_address == t.pte_address + 8  # consecutive PDEs
        assert pt.memory.read_u64(t.pte_address) & PTE_PS

    def test_1g_first_and_last_byte(self, pt: PageTables) -> None:
        pt.map(DIRECT_MAP, 0, 4 * GiB, PAGE_1G)
        assert pt.translate(DIRECT_MAP).pa == 0
        t = pt.translate(DIRECT_MAP + 4 * GiB - 1)
        assert (t.pa, t.page_size) == (4 * GiB - 1, PAGE_1G)
        assert t.level is Level.PDPT
        with pytest.raises(PageNotPresent):
            pt.translate(DIRECT_MAP + 4 * GiB)

    def test_physical_address_above_guest_ram_and_high_bits(self, pt: PageTables) -> None:
        # MMIO-like mapping near the top of the 52-bit physical space
        top = (1 << 52) - PAGE_1G
        pt.map(0x7F00_0000_0000, top, PAGE_1G, PAGE_1G)
        assert pt.translate(0x7F00_3FFF_FFFF).pa == (1 << 52) - 1

    def test_unmapped_is_not_present(self, pt: PageTables) -> None:
        with pytest.raises(PageNotPresent) as exc:
            pt.translate(0x1234_5678)
        assert exc.value.level is Level.PML4
        assert pt.try_translate(0x1234_5678) is None
        assert not pt.is_mapped(0x1234_5678)

    @pytest.mark.parametrize("va", [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF,
                                    0x1000_0000_0000_0000, 0xFFFE_FFFF_8100_0000])
    def test_non_canonical_rejected(self, pt: PageTables, va: int) -> None:
        # even when the low 48 bits alias a mapped page
        pt.map(canonicalize(va) & ~0xFFF, 0x5000, PAGE_4K)
        with pytest.raises(NonCanonicalAddress) as exc:
            pt.translate(va)
        assert not isinstance(exc.value, PageFault)
        with pytest.raises(NonCanonicalAddress):
            pt.try_translate(va)
        with pytest.raises(NonCanonicalAddress):
            pt.walk_entries(va)
        assert not pt.is_mapped(va)
        assert not is_canonical(va)
        assert pt.translate(canonicalize(va)).pa == 0x5000 | (va & 0xFFF)

    def test_canonical_edges(self) -> None:
        assert is_canonical(0x0000_7FFF_FFFF_FFFF)
        assert is_canonical(0xFFFF_8000_0000_0000)
        assert not is_canonical(1 << 64)
        assert not is_canonical(-1)

    def test_non_canonical_map_range_rejected(self, pt: PageTables) -> None:
        with pytest.raises(NonCanonicalAddress):
            pt.map(0x0000_7FFF_FFFF_F000, 0, 2 * PAGE_4K)  # runs into the hole

    def test_flags_and_high_bits_do_not_leak_into_address(self, pt: PageTables) -> None:
        avl_high = 0x7F << 52
        pt.map(0x20_0000, 0x4000_0000, PAGE_2M, PAGE_2M, leaf_flags=PTE_PAT_LARGE | PTE_A | PTE_D | avl_high)
        pt.map(0x1000, 0x7000, PAGE_4K, leaf_flags=PTE_PAT | avl_high)
        assert pt.translate(0x3F_FFFF).pa == 0x401F_FFFF
        assert pt.translate(0x1ABC).pa == 0x7ABC
        with pytest.raises(ValueError):
            pt.map(0x3000, 0x8000, PAGE_4K, leaf_flags=0x5000)  # address bits


class TestPermissions:
    def test_leaf_rights(self, pt: PageTables) -> None:
        pt.map(0x1000, 0x1000, PAGE_4K, writable=False, executable=True, user=True, global_=True)
        e = pt.memory.read_u64(pt.translate(0x1000).pte_address)
        assert e & PTE_P and not e & PTE_RW and e & PTE_US and not e & PTE_NX and e & (1 << 8)
        pt.map(0x2000, 0x2000, PAGE_4K, writable=True, executable=False)
        e = pt.memory.read_u64(pt.translate(0x2000).pte_address)
        assert e & PTE_RW and e & PTE_NX and not e & PTE_US and (e & ADDR_MASK) == 0x2000

    @pytest.mark.parametrize("level", [Level.PML4, Level.PDPT, Level.PD])
    def test_rights_are_anded_across_levels(self, pt: PageTables, level: Level) -> None:
        pt.map(0x40_0000, 0x40_0000, 2 * PAGE_4K, writable=True, executable=True, user=True)
        t = pt.translate(0x40_0000)
        assert (t.writable, t.executable, t.user) == (True, True, True)
        pt.update_entry(0x40_0000, level, writable=False)
        t = pt.translate(0x40_1000)  # sibling page under the same upper entry
        assert (t.writable, t.executable, t.user) == (False, True, True)
        pt.update_entry(0x40_0000, level, executable=False)  # NX at an upper level
        assert pt.translate(0x40_0000).executable is False
        pt.update_entry(0x40_0000, level, user=False)
        assert pt.translate(0x40_0000).user is False
        # the leaf still says RW/X/US: only the combination is restricted
        leaf = pt.memory.read_u64(t.pte_address)
        assert leaf & PTE_RW and leaf & PTE_US and not leaf & PTE_NX

    def test_nx_on_upper_level_of_large_page(self, pt: PageTables) -> None:
        pt.map(KERNEL_TEXT & ~(PAGE_2M - 1), 0x20_0000, PAGE_2M, PAGE_2M, executable=True)
        assert pt.translate(KERNEL_TEXT).executable
        pt.update_entry(KERNEL_TEXT, Level.PDPT, executable=False)
        assert not pt.translate(KERNEL_TEXT).executable


class TestRemap:
    def test_set_pte_changes_translation_and_reports_pte(self, pt: PageTables) -> None:
        pt.map(KERNEL_TEXT, 0x100_0000, 4 * PAGE_4K, writable=False, executable=True)
        before = pt.translate(KERNEL_TEXT + 0x1010)
        snap = pt.memory.snapshot()
        pte = pt.set_pte(KERNEL_TEXT + 0x1000, 0x6666_6000)
        assert pte == before.pte_address == pt.walk_entries(KERNEL_TEXT + 0x1000)[-1]
        after = pt.translate(KERNEL_TEXT + 0x1010)
        assert after.pa == 0x6666_6010
        assert (after.writable, after.executable) == (before.writable, before.executable)
        assert pt.translate(KERNEL_TEXT).pa == 0x100_0000  # neighbours untouched
        # only bytes of that one PTE changed in the whole of guest memory
        changed = snap.changed_ranges(pt.memory.snapshot())
        assert changed and all(pte <= a and a + n <= pte + 8 for a, n in changed)

    def test_set_pte_can_change_rights(self, pt: PageTables) -> None:
        pt.map(0x1000, 0x1000, PAGE_4K, writable=False)
        pt.set_pte(0x1000, 0x9000, writable=True, executable=True)
        t = pt.translate(0x1000)
        assert (t.pa, t.writable, t.executable) == (0x9000, True, True)

    def test_set_pte_errors(self, pt: PageTables) -> None:
        with pytest.raises(PageNotPresent):
            pt.set_pte(0x1000, 0x2000)
        pt.map(0x20_0000, 0x20_0000, PAGE_2M, PAGE_2M)
        with pytest.raises(MappingConflict, match="2 MiB page"):
            pt.set_pte(0x20_1000, 0x2000)
        pt.map(0x1000, 0x1000, PAGE_4K)
        with pytest.raises(AlignmentError):
            pt.set_pte(0x1000, 0x2001)
        with pytest.raises(NonCanonicalAddress):
            pt.set_pte(0x8000_0000_0000, 0x2000)

    def test_raw_pte_write_is_seen(self, pt: PageTables) -> None:
        pt.map(0x5000, 0x5000, PAGE_4K)
        pte = pt.walk_entries(0x5000)[-1]
        pt.memory.write_u64(pte, 0xABC000 | PTE_P)
        assert pt.translate(0x5123).pa == 0xABC123
        pt.memory.write_u64(pte, 0)
        with pytest.raises(PageNotPresent):
            pt.translate(0x5000)

    def test_split_keeps_translation(self, pt: PageTables) -> None:
        pt.map(DIRECT_MAP, 0x4000_0000, PAGE_1G, PAGE_1G, writable=False, leaf_flags=PTE_PAT_LARGE)
        probes = [DIRECT_MAP, DIRECT_MAP + 0x12_3456, DIRECT_MAP + PAGE_1G - 1]
        expect = [pt.translate(v) for v in probes]
        pt.split(DIRECT_MAP)
        assert [pt.translate(v).page_size for v in probes] == [PAGE_2M] * 3
        pt.split(DIRECT_MAP + 0x12_3456)
        assert pt.translate(DIRECT_MAP + 0x12_3456).page_size == PAGE_4K
        for v, old in zip(probes, expect):
            new = pt.translate(v)
            assert (new.pa, new.writable, new.executable) == (old.pa, old.writable, old.executable)
        # the PAT bit moved from bit 12 to bit 7 in the 4 KiB entries
        e = pt.memory.read_u64(pt.translate(DIRECT_MAP + 0x12_3456).pte_address)
        assert e & PTE_PAT and (e & ADDR_MASK) == 0x4012_3000
        pt.set_pte(DIRECT_MAP + 0x12_3000, 0x7000)
        assert pt.translate(DIRECT_MAP + 0x12_3456).pa == 0x7456


class TestWalk:
    def test_walk_entries_and_page_table_frames(self, pt: PageTables, mem: GuestMemory) -> None:
        pt.map(0x40_0000, 0x40_0000, PAGE_4K)
        entries = pt.walk_entries(0x40_0000)
        assert len(entries) == 4
        assert entries[0] == pt.cr3 + 8 * 0
        assert entries[3] == pt.translate(0x40_0000).pte_address
        frames = pt.page_table_frames()
        assert sorted({e >> 12 for e in entries}) == frames
        assert all(mem.is_populated(f) for f in frames)
        assert all(f >= mem.alloc_range[0] for f in frames)  # away from a low kernel image
        pt.map(KERNEL_TEXT & ~(PAGE_2M - 1), 0x20_0000, PAGE_2M, PAGE_2M)
        assert len(pt.walk_entries(KERNEL_TEXT)) == 3
        assert len(pt.page_table_frames()) == 6  # PML4 + 2 PDPT + 2 PD + 1 PT

    def test_walk_entries_of_unmapped_address_end_at_missing_entry(self, pt: PageTables) -> None:
        pt.map(0x40_0000, 0x40_0000, PAGE_4K)
        entries = pt.walk_entries(0x40_1000)
        assert len(entries) == 4 and entries[-1] == pt.walk_entries(0x40_0000)[-1] + 8
        assert pt.walk_entries(0x7000_0000_0000) == [pt.cr3 + 8 * 0xE0]

    def test_page_table_frames_follow_live_tables(self, pt: PageTables, mem: GuestMemory) -> None:
        # a guest-built table (not allocated by PageTables) is found by walking
        rogue_pt = 0x30_0000
        mem.write_u64(rogue_pt, 0x9000 | PTE_P)
        pt.map(0x40_0000, 0x40_0000, PAGE_4K)
        pde = pt.walk_entries(0x40_0000)[2]
        mem.write_u64(pde + 8, rogue_pt | PTE_P | PTE_RW)
        assert rogue_pt >> 12 in pt.page_table_frames()
        assert pt.translate(0x60_0123).pa == 0x9123
        assert pt.walk_entries(0x60_0000)[-1] == rogue_pt

    def test_self_referencing_pml4_does_not_loop(self, pt: PageTables, mem: GuestMemory) -> None:
        mem.write_u64(pt.cr3 + 8 * 0x1ED, pt.cr3 | PTE_P | PTE_RW)
        pt.map(0x1000, 0x1000, PAGE_4K)
        assert pt.cr3 >> 12 in pt.page_table_frames()
        assert sum(1 for m in pt.mappings() if m.va == 0x1000) == 1

    def test_mappings_enumerates_leaves(self, pt: PageTables) -> None:
        pt.map(0x1000, 0x1000, 2 * PAGE_4K, user=True)
        pt.map(DIRECT_MAP, 0, PAGE_1G, PAGE_1G)
        got = [(m.va, m.pa, m.page_size, m.user) for m in pt.mappings()]
        assert got == [(0x1000, 0x1000, PAGE_4K, True), (0x2000, 0x2000, PAGE_4K, True),
                       (DIRECT_MAP, 0, PAGE_1G, False)]

    def test_existing_cr3(self, pt: PageTables, mem: GuestMemory) -> None:
        pt.map(0x1000, 0xF000, PAGE_4K)
        again = PageTables(mem, cr3=pt.cr3 | 0x18)  # PWT|PCD bits ignored
        assert again.translate(0x1000).pa == 0xF000


class TestErrors:
    @pytest.mark.parametrize("va,pa,size,page", [
        (0x20_1000, 0x20_0000, PAGE_2M, PAGE_2M),   # va not 2M aligned
        (0x20_0000, 0x20_1000, PAGE_2M, PAGE_2M),   # pa not 2M aligned
        (0x20_0000, 0x20_0000, PAGE_2M + PAGE_4K, PAGE_2M),  # size
        (0x4000_0000, 0x20_0000, PAGE_1G, PAGE_1G),  # pa not 1G aligned
        (0x1000, 0x2800, PAGE_4K, PAGE_4K),
    ])
    def test_alignment_rejected(self, pt: PageTables, va: int, pa: int, size: int, page: int) -> None:
        snap = pt.memory.snapshot()
        with pytest.raises(AlignmentError, match="not aligned|not a multiple") as exc:
            pt.map(va, pa, size, page)
        assert {PAGE_4K: "4 KiB", PAGE_2M: "2 MiB", PAGE_1G: "1 GiB"}[page] in str(exc.value)
        assert pt.memory.snapshot() == snap

    def test_bad_page_size(self, pt: PageTables) -> None:
        with pytest.raises(ValueError, match="page_size"):
            pt.map(0, 0, 0x10000, 0x10000)

    def test_overlap_rejected_atomically(self, pt: PageTables) -> None:
        pt.map(0x20_0000, 0x20_0000, PAGE_4K)
        snap = pt.memory.snapshot()
        with pytest.raises(MappingConflict):
            pt.map(0x1F_E000, 0x1000, 4 * PAGE_4K)   # overlaps at 0x200000
        with pytest.raises(MappingConflict, match="page table already exists"):
            pt.map(0x20_0000, 0x20_0000, PAGE_2M, PAGE_2M)
        assert pt.memory.snapshot() == snap
        with pytest.raises(PageNotPresent):
            pt.translate(0x1F_E000)
        pt.map(0x4000_0000, 0x4000_0000, PAGE_1G, PAGE_1G)
        with pytest.raises(MappingConflict, match="1 GiB page"):
            pt.map(0x4000_0000, 0x1000, PAGE_4K)

    def test_unmap(self, pt: PageTables) -> None:
        pt.map(0x40_0000, 0x40_0000, 8 * PAGE_4K)
        pt.map(0x4000_0000, 0x4000_0000, 2 * PAGE_2M, PAGE_2M)
        assert pt.unmap(0x40_2000, 2 * PAGE_4K) == 2
        assert not pt.is_mapped(0x40_2000) and not pt.is_mapped(0x40_3FFF)
        assert pt.is_mapped(0x40_1FFF) and pt.is_mapped(0x40_4000)
        with pytest.raises(MappingConflict, match="split"):
            pt.unmap(0x4000_0000, PAGE_4K)
        assert pt.unmap(0x3FE0_0000, 2 * PAGE_2M) == 1  # holes are skipped
        assert not pt.is_mapped(0x4000_0000) and pt.is_mapped(0x4020_0000)
        assert pt.unmap(0x4020_0000, PAGE_1G) == 1
        assert not pt.is_mapped(0x4020_0000)
        pt.map(0x40_2000, 0x9000, PAGE_4K)  # remapping a hole works
        assert pt.translate(0x40_2000).pa == 0x9000

    def test_reserved_bits_fault(self, pt: PageTables, mem: GuestMemory) -> None:
        pt.map(0x20_0000, 0x20_0000, PAGE_2M, PAGE_2M)
        pde = pt.translate(0x20_0000).pte_address
        mem.write_u64(pde, mem.read_u64(pde) | (1 << 13))  # bit 13 of a 2 MiB PDE
        with pytest.raises(ReservedBitFault):
            pt.translate(0x20_0000)
        pml4e = pt.walk_entries(0x20_0000)[0]
        mem.write_u64(pml4e, mem.read_u64(pml4e) | PTE_PS)  # PS is reserved in a PML4E
        with pytest.raises(ReservedBitFault):
            pt.translate(0x20_0000)
        narrow = PageTables(mem, cr3=pt.cr3, maxphyaddr=39)
        with pytest.raises(ValueError, match="MAXPHYADDR"):
            narrow.map(0x8000_0000_0000 - PAGE_1G, 1 << 39, PAGE_1G, PAGE_1G)

    def test_table_outside_memory_faults(self, pt: PageTables, mem: GuestMemory) -> None:
        mem.write_u64(pt.cr3, (mem.size + 0x1000) | PTE_P)
        with pytest.raises(PageFault, match="outside guest memory"):
            pt.translate(0x1000)
        assert mem.size >> 12 not in pt.page_table_frames()
