"""Independent check of our x86-64 page walk against Volatility 3's Intel32e layer.

A randomised but seeded layout (4 KiB, 2 MiB and 1 GiB pages in both canonical
halves, holes, split large pages, rootkit-style PTE rewrites, PAT / accessed /
dirty / ignored bits in the entries, non-present entries that still carry an
address) is built with ``PageTables`` in a ``GuestMemory``.  Volatility then
walks the very same bytes through a physical layer that serves the guest
memory, and both walkers translate well over 100,000 addresses.  The test's
own bookkeeping of what it mapped is a third, trivially simple oracle.

Known, deliberate differences between the two walkers (not disagreements):

* Volatility's Intel32e layer is a 48-bit space: it ignores bits 63:48 and
  so "translates" non-canonical addresses through the alias given by bits
  47:0.  Architecturally such an access is a #GP; ours raises
  ``NonCanonicalAddress``.  For every non-canonical address the test checks
  that ours raises that error and that Volatility's answer equals ours for
  the canonical alias, i.e. the walks agree and the only difference is the
  canonicality check Volatility does not do.
* Volatility does not check reserved bits, and it treats a paging-structure
  page whose 512 entries are all identical as invalid (a heuristic against
  Windows' mapping of unused pages).  The layout therefore has no reserved
  bits set and no such table; the latter is asserted so that a future layout
  change fails with a clear message instead of a confusing disagreement.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest

try:
    from volatility3.framework import contexts, interfaces
    from volatility3.framework import exceptions as vol_exceptions
    from volatility3.framework.layers.intel import Intel32e
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"volatility3 is not importable ({exc!r}); install it with "
                "`pip install volatility3` (or the project's [crosscheck] extra)",
                allow_module_level=True)

from policyc.runtime.guest_memory import GuestMemory
from policyc.runtime.paging import (
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PAT,
    PTE_PAT_LARGE,
    PTE_PCD,
    PTE_PWT,
    NonCanonicalAddress,
    PageFault,
    PageTables,
    canonicalize,
    is_canonical,
)

SEED = 0x5EED_2024
GiB = 1 << 30
MiB = 1 << 20
PHYS_LIMIT = 1 << 52
MIN_ADDRESSES = 100_000


# ------------------------------------------------------------ Volatility side
class GuestPhysicalLayer(interfaces.layers.DataLayerInterface):
    """A Volatility data layer serving the bytes of a GuestMemory.

    The whole 52-bit physical space is valid (pages above guest RAM, such as
    MMIO, read as zeros), so Volatility's validity check of the final physical
    address never masks a translation difference.
    """

    def __init__(self, context, config_path: str, name: str, memory: GuestMemory,
                 metadata=None) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        self._memory = memory

    @property
    def minimum_address(self) -> int:
        return 0

    @property
    def maximum_address(self) -> int:
        return PHYS_LIMIT - 1

    def is_valid(self, offset: int, length: int = 1) -> bool:
        return 0 <= offset and offset + length <= PHYS_LIMIT

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        if not self.is_valid(offset, length):
            raise vol_exceptions.InvalidAddressException(self.name, offset, "outside physical space")
        size = self._memory.size
        if offset >= size:
            return bytes(length)
        head = min(length, size - offset)
        return self._memory.read(offset, head) + bytes(length - head)

    def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError("the cross-check never writes through Volatility")

    @classmethod
    def get_requirements(cls):
        return []


def volatility_layer(memory: GuestMemory, cr3: int) -> Intel32e:
    ctx = contexts.Context()
    ctx.add_layer(GuestPhysicalLayer(ctx, "crosscheck.physical", "guest_physical", memory))
    ctx.config["crosscheck.virtual.memory_layer"] = "guest_physical"
    ctx.config["crosscheck.virtual.page_map_offset"] = cr3
    layer = Intel32e(ctx, "crosscheck.virtual", "guest_virtual")
    ctx.add_layer(layer)
    return layer


# ------------------------------------------------------ the test's own oracle
@dataclass
class Layout:
    """What the test believes it mapped: (page size, page va) -> page pa."""

    pages: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, va: int, pa: int, size: int, page: int) -> None:
        for i in range(size // page):
            self.pages[(page, va + i * page)] = pa + i * page

    def remove_range(self, start: int, end: int) -> None:
        for key in [k for k in self.pages if start <= k[1] < end]:
            del self.pages[key]

    def lookup(self, va: int) -> tuple[int, int] | None:
        for page in (PAGE_4K, PAGE_2M, PAGE_1G):
            pa = self.pages.get((page, va & ~(page - 1)))
            if pa is not None:
                return pa | (va & (page - 1)), page
        return None


def build_layout(rng: random.Random) -> tuple[GuestMemory, PageTables, Layout, list[str]]:
    mem = GuestMemory(64 * GiB)
    pt = PageTables(mem)
    lay = Layout()
    notes: list[str] = []

    def frame(page: int, limit: int = 48 * GiB) -> int:
        return rng.randrange(0, limit // page) * page

    def extra_bits(page: int) -> int:
        bits = 0
        if rng.random() < 0.3:
            bits |= PTE_PAT if page == PAGE_4K else PTE_PAT_LARGE
        if rng.random() < 0.3:
            bits |= PTE_A | (PTE_D if rng.random() < 0.5 else 0)
        if rng.random() < 0.2:
            bits |= PTE_PWT | PTE_PCD
        if rng.random() < 0.3:
            bits |= rng.randrange(1, 1 << 7) << 52  # ignored bits 58:52
        if rng.random() < 0.2:
            bits |= rng.randrange(1, 8) << 9  # ignored bits 11:9
        return bits

    def do_map(va: int, pa: int, size: int, page: int) -> None:
        pt.map(va, pa, size, page, writable=rng.random() < 0.6, executable=rng.random() < 0.3,
               user=rng.random() < 0.5, global_=rng.random() < 0.2, leaf_flags=extra_bits(page))
        lay.add(va, pa, size, page)

    def map_4k_region(va: int, npages: int) -> None:
        if rng.random() < 0.5:  # physically contiguous
            do_map(va, frame(PAGE_4K), npages * PAGE_4K, PAGE_4K)
        else:  # scattered frames, as for a vmalloc area
            for i in range(npages):
                do_map(va + i * PAGE_4K, frame(PAGE_4K), PAGE_4K, PAGE_4K)

    # 1 GiB "slots" of linear address space; each holds one kind of mix.
    # (PML4 slots 254/255, 256, 273 and 511 hold the fixed areas below)
    low_slots = rng.sample(range(1, 254 * 512), 40)
    high_slots = [canonicalize((s // 512 << 39) | ((s % 512) << 30))
                  for s in rng.sample(range(320 * 512, 511 * 512), 20)]
    slots = [s << 30 for s in low_slots] + high_slots
    for n, base in enumerate(slots):
        kind = n % 4
        if kind == 0:    # only 4 KiB pages, several regions
            for _ in range(rng.randrange(2, 6)):
                start = base + rng.randrange(0, 480) * PAGE_2M + rng.randrange(0, 400) * PAGE_4K
                npages = rng.randrange(1, 100)
                if all(lay.lookup(start + i * PAGE_4K) is None for i in range(npages)):
                    map_4k_region(start, npages)
        elif kind == 1:  # one PD mixing 2 MiB pages and 4 KiB page tables
            for i in rng.sample(range(512), 40):
                v = base + i * PAGE_2M
                if rng.random() < 0.6:
                    do_map(v, frame(PAGE_2M), PAGE_2M, PAGE_2M)
                else:
                    map_4k_region(v + rng.randrange(0, 256) * PAGE_4K, rng.randrange(1, 200))
        elif kind == 2:  # a 1 GiB page
            do_map(base, frame(PAGE_1G), PAGE_1G, PAGE_1G)
        else:            # runs of 2 MiB pages
            start = base + rng.randrange(0, 400) * PAGE_2M
            do_map(start, frame(PAGE_2M), rng.randrange(1, 100) * PAGE_2M, PAGE_2M)

    # Linux-like fixed areas and the edges of both canonical halves.
    do_map(0xFFFF_8880_0000_0000, 0, 32 * GiB, PAGE_1G)               # direct map
    do_map(0xFFFF_FFFF_8000_0000, 0x100_0000, 32 * PAGE_2M, PAGE_2M)  # kernel image
    do_map(0xFFFF_FFFF_FF5F_0000, frame(PAGE_4K), 16 * PAGE_4K, PAGE_4K)  # fixmap
    do_map(0xFFFF_FFFF_FFFF_F000, frame(PAGE_4K), PAGE_4K, PAGE_4K)   # very last page
    do_map(0xFFFF_8000_0000_0000, frame(PAGE_4K), 2 * PAGE_4K, PAGE_4K)  # first high page
    do_map(0x7FFF_FFFF_E000, frame(PAGE_4K), 2 * PAGE_4K, PAGE_4K)      # last low page
    do_map(0, frame(PAGE_4K), PAGE_4K, PAGE_4K)                         # page zero
    do_map(0x7F00_0000_0000, PHYS_LIMIT - 2 * GiB, 2 * GiB, PAGE_1G)    # top of 52-bit space
    do_map(0x7F80_0000_0000, PHYS_LIMIT - PAGE_2M, PAGE_2M, PAGE_2M)
    do_map(0x7F80_4000_0000, PHYS_LIMIT - PAGE_4K, PAGE_4K, PAGE_4K)

    # Holes: unmap some 4 KiB pages, 2 MiB pages and a 1 GiB page.
    keys = sorted(lay.pages)
    small = [k for k in keys if k[0] == PAGE_4K]
    for key in rng.sample(small, len(small) // 10):
        assert pt.unmap(key[1], PAGE_4K) == 1
        del lay.pages[key]
    for page, count in ((PAGE_2M, 20), (PAGE_1G, 2)):
        for key in rng.sample([k for k in keys if k[0] == page], count):
            assert pt.unmap(key[1], page) == 1
            del lay.pages[key]
    # Splits: 1 GiB -> 2 MiB and 2 MiB -> 4 KiB, translation unchanged.
    for page, count in ((PAGE_1G, 3), (PAGE_2M, 10)):
        for key in rng.sample(sorted(k for k in lay.pages if k[0] == page), count):
            pa = lay.pages.pop(key)
            pt.split(key[1])
            lay.add(key[1], pa, page, page >> 9)
    # Rootkit-style PTE rewrites.
    small = sorted(k for k in lay.pages if k[0] == PAGE_4K)
    for key in rng.sample(small, 500):
        pa = frame(PAGE_4K, PHYS_LIMIT)
        pt.set_pte(key[1], pa)
        lay.pages[key] = pa
    # Raw edits of upper-level entries: ignored / XD / A bits must not change
    # the table address; a cleared P bit hides everything below it even
    # though the entry still holds an address.
    for key in rng.sample(sorted(lay.pages), 300):
        if key not in lay.pages:
            continue
        entries = pt.walk_entries(key[1])
        addr = entries[rng.randrange(0, len(entries) - 1)] if len(entries) > 1 else entries[0]
        if addr == entries[-1]:
            continue
        e = mem.read_u64(addr)
        mem.write_u64(addr, e | (rng.randrange(0, 1 << 7) << 52) | PTE_A
                      | (PTE_NX if rng.random() < 0.5 else 0))
    hidden = 0
    for n, key in enumerate(rng.sample(sorted(lay.pages), 160)):
        if key not in lay.pages:
            continue
        steps = pt.walk(key[1])
        # mostly leaf entries, some upper-level ones (only a few whole PML4 slots)
        step = steps[-1] if n % 4 else rng.choice(steps if n % 32 == 0 else steps[1:] or steps)
        mem.write_u64(step.entry_address, step.entry & ~PTE_P)
        span = step.level.coverage
        start = key[1] & ~(span - 1)
        lay.remove_range(start, start + span)
        hidden += 1
    notes.append(f"{hidden} entries made not-present with their address kept")

    # Volatility skips a table whose 512 entries are all identical; make sure
    # the layout has none that holds present entries (see module docstring).
    for gfn in pt.page_table_frames():
        raw = mem.read(gfn << 12, PAGE_4K)
        assert not (raw[:8] == raw[8:16] and raw == raw[:8] * 512 and raw[0] & PTE_P), (
            f"table at gfn {gfn:#x} has 512 identical present entries; Volatility ignores such tables")
    return mem, pt, lay, notes


def generate_addresses(rng: random.Random, lay: Layout) -> tuple[list[int], list[int]]:
    """(canonical addresses, non-canonical addresses), sorted and unique."""
    canon: set[int] = set()
    keys = sorted(lay.pages)
    for page, va in keys:                          # page boundaries and neighbours
        for a in (va, va + page - 1, va - 1, va + page, va + rng.randrange(page)):
            if 0 <= a < 1 << 64:
                canon.add(a)
    by_size = [[k for k in keys if k[0] == size] for size in (PAGE_4K, PAGE_2M, PAGE_1G)]
    for i in range(30_000):                        # random bytes in mapped pages of each size
        group = by_size[i % 3] or keys
        page, va = group[rng.randrange(len(group))]
        canon.add(va + rng.randrange(page))
    for _ in range(20_000):                        # near mapped pages: holes, gaps
        page, va = keys[rng.randrange(len(keys))]
        a = va + rng.randrange(-8 * PAGE_2M, 8 * PAGE_2M)
        if 0 <= a < 1 << 64:
            canon.add(a)
    for _ in range(20_000):                        # anywhere in the canonical space
        canon.add(canonicalize(rng.getrandbits(48)))
    canon = {a for a in canon if 0 <= a < 1 << 64}

    noncanon: set[int] = {0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF,
                          0x0000_FFFF_FFFF_FFFF, 0xFFFF_0000_0000_0000,
                          0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF}
    while len(noncanon) < 12_000:
        top = rng.randrange(1, (1 << 17) - 1)        # bits 63:47 neither all 0 nor all 1
        if rng.random() < 0.5:                       # alias a mapped page
            page, va = keys[rng.randrange(len(keys))]
            low = (va + rng.randrange(page)) & ((1 << 47) - 1)
        else:
            low = rng.getrandbits(47)
        noncanon.add((top << 47) | low)
    # classify the neighbours that fell off a canonical edge
    moved = {a for a in canon if not is_canonical(a)}
    return sorted(canon - moved), sorted(noncanon | moved)


def ours(pt: PageTables, va: int):
    try:
        t = pt.translate(va)
    except NonCanonicalAddress:
        return "non-canonical"
    except PageFault:
        return None
    return t.pa, t.page_size


def theirs(layer: Intel32e, va: int):
    try:
        pa, _layer = layer.translate(va)
    except vol_exceptions.InvalidAddressException:
        return None
    # page size through Volatility's (long-stable) internal walk, when present
    size = layer._translate(va)[1] if hasattr(layer, "_translate") else None
    return pa, size


def test_page_walk_matches_volatility(capsys) -> None:
    t0 = time.perf_counter()
    rng = random.Random(SEED)
    mem, pt, lay, notes = build_layout(rng)
    canon, noncanon = generate_addresses(rng, lay)
    layer = volatility_layer(mem, pt.cr3)
    t_built = time.perf_counter()

    disagreements: list[str] = []
    mapped = unmapped = alias_hits = 0
    kinds = {PAGE_4K: 0, PAGE_2M: 0, PAGE_1G: 0}
    for va in canon:
        a, b, want = ours(pt, va), theirs(layer, va), lay.lookup(va)
        if b is not None and b[1] is None:
            b = (b[0], a[1] if a else None)
        if a == "non-canonical" or a != b or a != want:
            disagreements.append(f"{va:#018x}: ours={_fmt(a)} volatility={_fmt(b)} layout={_fmt(want)}")
        elif a is None:
            unmapped += 1
        else:
            mapped += 1
            kinds[a[1]] += 1
    for va in noncanon:
        a = ours(pt, va)
        alias = canonicalize(va)
        b, want = theirs(layer, va), ours(pt, alias)
        if b is not None and b[1] is None:
            b = (b[0], want[1] if want else None)
        if a != "non-canonical" or b != want or want != lay.lookup(alias):
            disagreements.append(f"{va:#018x} (non-canonical): ours={_fmt(a)} volatility={_fmt(b)} "
                                 f"ours for alias {alias:#x}={_fmt(want)}")
        elif b is not None:
            alias_hits += 1
    elapsed = time.perf_counter() - t0
    total = len(canon) + len(noncanon)

    with capsys.disabled():
        print(f"\n[paging cross-check vs volatility3 Intel32e] compared {total} addresses "
              f"({mapped} mapped: {kinds[PAGE_4K]} in 4K, {kinds[PAGE_2M]} in 2M, {kinds[PAGE_1G]} in 1G pages; "
              f"{unmapped} unmapped; {len(noncanon)} non-canonical, of which Volatility translated "
              f"{alias_hits} through their 48-bit alias as expected); {len(lay.pages)} pages in layout, "
              f"{len(pt.page_table_frames())} table frames; {'; '.join(notes)}; "
              f"disagreements: {len(disagreements)}; build {t_built - t0:.1f}s, total {elapsed:.1f}s")

    assert not disagreements, (f"{len(disagreements)} of {total} addresses disagree; first ones:\n"
                               + "\n".join(disagreements[:25]))
    assert total >= MIN_ADDRESSES
    assert mapped > 50_000 and unmapped > 20_000 and alias_hits > 1_000
    assert all(kinds.values())


def _fmt(r) -> str:
    if r is None:
        return "invalid"
    if isinstance(r, str):
        return r
    return f"{r[0]:#x}/{r[1]:#x}" if r[1] is not None else f"{r[0]:#x}"


def test_volatility_sees_pte_rewrite_and_hole() -> None:
    """A small, readable case of the same comparison (fresh layer per state,
    since Volatility caches its walks)."""
    mem = GuestMemory(4 * GiB)
    pt = PageTables(mem)
    pt.map(0xFFFF_FFFF_8100_0000, 0x100_0000, 4 * PAGE_4K, executable=True, writable=False)
    pt.map(0xFFFF_FFFF_8120_0000, 0x120_0000, PAGE_2M, PAGE_2M)
    va = 0xFFFF_FFFF_8100_1234
    assert volatility_layer(mem, pt.cr3).translate(va)[0] == pt.translate(va).pa == 0x100_1234
    pt.set_pte(va & ~0xFFF, 0xBEEF_0000)
    assert volatility_layer(mem, pt.cr3).translate(va)[0] == pt.translate(va).pa == 0xBEEF_0234
    pt.unmap(va & ~0xFFF, PAGE_4K)
    with pytest.raises(vol_exceptions.InvalidAddressException):
        volatility_layer(mem, pt.cr3).translate(va)
    assert pt.try_translate(va) is None
    large = 0xFFFF_FFFF_8120_0000 + 0x1F_FFFF
    assert volatility_layer(mem, pt.cr3).translate(large)[0] == pt.translate(large).pa == 0x13F_FFFF
