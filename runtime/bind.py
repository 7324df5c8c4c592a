"""Binding: a trap plan made concrete for one running guest.

`bind_plan(plan, backend, symbols)` finds what the plan could not know at
compile time and returns a `BoundPlan`:

1. **Symbols.** Every symbol file the plan names (name + sha256) must be one
   of the tables given; a file whose bytes differ is refused (addresses from
   another kernel build would protect the wrong bytes).
2. **The slide** (KASLR; the image base for a Windows ISF, whose addresses
   are RVAs), found from the guest itself: MSR LSTAR minus the link-time
   syscall entry (`entry_SYSCALL_64`; `KiSystemCall64[Shadow]`), cross-checked
   with the IDT: the handlers of vectors 3, 13 and 14 read through IDTR give
   a second estimate, and IDTR's page (Linux: the read-only CPU-entry-area
   alias) must be `idt_table`'s frame. Disagreement is an error (one of the
   two is hooked): binding refuses rather than protect the wrong addresses.
   The slide must be 2 MiB aligned for Linux x86-64 (CONFIG_PHYSICAL_ALIGN),
   4 KiB otherwise. `slide=` overrides discovery (an operator who knows).
   A Windows ISF without those symbols (MemProcFS-derived ones have none) is
   bound by ntoskrnl's own PE header instead: scanning down from LSTAR and
   from the IDT handlers for the image whose CodeView record carries the
   ISF's PDB GUID and age; its base is the slide, every starting point must
   lie in it, and another GUID or age is refused as another kernel build.
   A slide found from symbols is checked against that record too.
3. **Frames.** Every extent of every region is translated through the
   guest's own page tables (CR3 of vCPU 0; the kernel half is shared by all
   address spaces) into byte ranges per guest frame, `(gfn, first, last)`.
   Relocatable extents get the slide; per-CPU extents are offsets into each
   vCPU's per-CPU area (kernel GS base: `gs_base`, or `shadow_gs` when the
   vCPU is in user mode, else `__per_cpu_offset[i]`); register extents
   (`idtr`, `gdtr`) start at each vCPU's register base; `pa` extents are
   frames already. A byte that does not translate is a `BindError` naming
   the region and the address (all such failures are collected first).
4. **Views.** Per plan view, gfn -> access: where several ranges of one view
   share a page, the page gets the intersection of their accesses (the plan
   schema's rule); on x86 a result with W but not R loses W (EPT cannot
   express it, XEN-SEMANTICS §3).
5. **Page-table watch.** Every paging-structure frame read to translate a
   protected page (PML4, PDPT, PD, PT) is collected with the exact entries
   used, so the installer can write-trap those frames ("rx": EPT has no
   write-only, and the hardware walk needs R) in the restricted views. A
   remap of a protected page then traps; `BoundPlan.rebind(backend)` re-walks
   after such a write and returns what moved (`BindDelta`), updating the
   binding in place. `pt_entry_users(gfn, offset)` says which regions depend
   on the entry a write hit, before it is allowed.
6. **Breakpoints.** Each site's slid address, frame, offset and its original
   16 bytes (what `SET_EMUL_INSN_DATA` needs for inline breakpoints).

`BoundPlan` is the `Binding` the decision engine expects (runtime/decide.py):
`slide`, `region_frames`, `percpu_base`, `breakpoint_sites`, `in_region`,
`breakpoint_insn_bytes`.

arm64 guests (Linux, 4 KiB pages, 48-bit VAs) are bound by `_bind_arm64`:
the slide from where TTBR1_EL1's own table (swapper_pg_dir) is mapped in the
kernel image region, cross-checked with VBAR_EL1 against ``vectors`` when the
backend offers that register (Xen's vCPU context does not) and with the Image
header when its frame still holds it; regions and breakpoints (4 original
bytes, the SMC's size) translated through the guest's own stage-1 tables
(`runtime/paging_arm64.py`); the page-table watch as on x86.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..symbols import SymbolTable
from ..targets import access_name, runs_on
from .backend import BackendError
from .guest_memory import FRAME_SHIFT, FRAME_SIZE, PhysicalAddressError
from .paging import PAGE_2M, NonCanonicalAddress, PageFault, PageTables
from .paging_arm64 import LINUX_TCR_48, TCR_EPD0, TTBR_BADDR_MASK, Stage1Tables
from ..errors import PolicycError

__all__ = ["BindError", "BindFailure", "BoundPlan", "BoundBreakpoint", "BindDelta", "ViewBinding",
           "bind_plan", "intersect_access", "find_slide", "PT_WATCH_ACCESS"]

U64 = (1 << 64) - 1
PAGE = FRAME_SIZE
PT_WATCH_ACCESS = "rx"          # write-trap a page-table frame (EPT cannot say "r w-trap x-trap" any better)
_INSN_BYTES = 16                 # data.emul.insn.data

_ACCESS_BITS = {"n": "", "r": "r", "w": "w", "rw": "rw", "x": "x", "rx": "rx", "wx": "wx", "rwx": "rwx"}

# Syscall entry points (LSTAR) and IDT handlers, by symbol-table OS; first found wins.
_ENTRY = {"linux": ("entry_SYSCALL_64",), "windows": ("KiSystemCall64Shadow", "KiSystemCall64")}
_IDT_HANDLERS = {
    "linux": {3: ("asm_exc_int3",), 13: ("asm_exc_general_protection",), 14: ("asm_exc_page_fault",)},
    "windows": {3: ("KiBreakpointTrapShadow", "KiBreakpointTrap"),
                13: ("KiGeneralProtectionFaultShadow", "KiGeneralProtectionFault"),
                14: ("KiPageFaultShadow", "KiPageFault")},
}
_IDT_GATE = struct.Struct("<HHBBHII")


# --------------------------------------------------------------------------- errors

@dataclass(frozen=True)
class BindFailure:
    """One thing that could not be bound: `region` (None for the slide or symbols), the address that
    failed (None when no address is involved) and why."""

    region: str | None
    address: int | None
    reason: str

    def __str__(self) -> str:
        where = f"region '{self.region}'" if self.region else "binding"
        at = f" at {self.address:#x}" if self.address is not None else ""
        return f"{where}{at}: {self.reason}"


class BindError(PolicycError):
    """The plan cannot be bound to this guest. `failures` lists every cause; `region` and `address`
    are those of the first (the common case is one)."""

    def __init__(self, failures: Sequence[BindFailure] | BindFailure) -> None:
        if isinstance(failures, BindFailure):
            failures = [failures]
        self.failures = list(failures)
        first = self.failures[0]
        self.region = first.region
        self.address = first.address
        more = f" (and {len(self.failures) - 1} more: " + "; ".join(map(str, self.failures[1:4])) + \
            (" ..." if len(self.failures) > 4 else "") + ")" if len(self.failures) > 1 else ""
        super().__init__(str(first) + more)


# --------------------------------------------------------------------------- access sets

def intersect_access(a: str, b: str, *, x86: bool = True) -> str:
    """The accesses both allow, as a Xen mem_access name (W without R dropped on x86)."""
    return access_name(frozenset(_ACCESS_BITS[a]) & frozenset(_ACCESS_BITS[b]), x86=x86)


# --------------------------------------------------------------------------- physical reads

class _PhysReader:
    """What `PageTables` reads from `GuestMemory` (read_u64, read, size), over `backend.read_physical`,
    one frame at a time and cached for one binding pass."""

    size = 1 << 52

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._frames: dict[int, bytes] = {}

    def frame(self, gfn: int) -> bytes:
        data = self._frames.get(gfn)
        if data is None:
            try:
                data = self._backend.read_physical(gfn << FRAME_SHIFT, FRAME_SIZE)
            except BackendError as exc:
                raise PhysicalAddressError(f"gfn {gfn:#x}: {exc}") from None
            self._frames[gfn] = data
        return data

    def read(self, pa: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            off = pa & (PAGE - 1)
            n = min(length, PAGE - off)
            out += self.frame(pa >> FRAME_SHIFT)[off:off + n]
            pa += n
            length -= n
        return bytes(out)

    def read_u64(self, pa: int) -> int:
        off = pa & (PAGE - 1)
        if off > PAGE - 8:
            return int.from_bytes(self.read(pa, 8), "little")
        return struct.unpack_from("<Q", self.frame(pa >> FRAME_SHIFT), off)[0]


class _Space:
    """One address space (a CR3) read through the backend."""

    def __init__(self, backend: Any, cr3: int) -> None:
        self.reader = _PhysReader(backend)
        self.pt = PageTables(self.reader, cr3)  # type: ignore[arg-type]

    def translate_range(self, va: int, size: int) -> tuple[list[tuple[int, int, int]], set[int]]:
        """[(gfn, first, last)] covering [va, va+size) and the paging-structure entries (guest-physical
        addresses) the translation used. Raises PageFault / NonCanonicalAddress at the first bad byte."""
        pieces: list[tuple[int, int, int]] = []
        entries: set[int] = set()
        end = va + size
        cur = va
        while cur < end:
            t = self.pt.translate(cur)
            entries.update(step.entry_address for step in self.pt.walk(cur))
            chunk_end = min(end, (cur | (t.page_size - 1)) + 1)
            pa = t.pa
            while cur < chunk_end:
                n = min(chunk_end - cur, PAGE - (cur & (PAGE - 1)))
                off = pa & (PAGE - 1)
                pieces.append((pa >> FRAME_SHIFT, off, off + n - 1))
                cur += n
                pa += n
        return pieces, entries

    def read_virtual(self, va: int, size: int) -> bytes:
        return self.pt.read_virtual(va, size)


# --------------------------------------------------------------------------- the result

@dataclass
class ViewBinding:
    """One plan view: its id in the plan, role, contexts, default access and the gfn -> access map
    (region ranges intersected, page-table watch included)."""

    id: int
    role: str
    default_access: str
    contexts: tuple[str, ...] = ()
    access: dict[int, str] = field(default_factory=dict)
    visible_to_guest: bool | None = None


@dataclass(frozen=True)
class BoundBreakpoint:
    id: str
    address: int                 # slid virtual address
    gfn: int
    offset: int
    original: bytes              # 16 bytes from the site (fewer if the next page is unmapped)
    mechanism: str | None
    views: tuple[int, ...]       # plan view ids the breakpoint is planted in (shadow frames)
    step_view: int | None

    @property
    def pa(self) -> int:
        return (self.gfn << FRAME_SHIFT) | self.offset


@dataclass(frozen=True)
class _Extent:
    region: str
    va: int | None               # first virtual address (None for a pa extent)
    size: int
    vcpu: int | None             # the vCPU whose instance this is (per-CPU and register extents)
    pieces: tuple[tuple[int, int, int], ...]
    entries: frozenset[int]      # page-table entries (guest-physical) the translation used


@dataclass
class BindDelta:
    """What a re-walk changed: region frames, per-view access, the watched page-table frames and
    breakpoint frames. `unmapped`: regions that no longer translate (their old frames stay bound)."""

    regions: dict[str, tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]] = field(default_factory=dict)
    views: dict[int, dict[int, tuple[str | None, str | None]]] = field(default_factory=dict)
    pt_added: set[int] = field(default_factory=set)
    pt_removed: set[int] = field(default_factory=set)
    breakpoints: dict[str, tuple[BoundBreakpoint, BoundBreakpoint]] = field(default_factory=dict)
    unmapped: list[BindFailure] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.regions or self.views or self.pt_added or self.pt_removed or self.breakpoints
                    or self.unmapped)


class BoundPlan:
    """A plan bound to one guest. Implements the decision engine's `Binding` protocol."""

    def __init__(self, plan: Mapping[str, Any], *, arch: str, slide: int, cr3: int,
                 percpu_bases: list[int], extents: dict[str, list[_Extent]], views: dict[int, ViewBinding],
                 breakpoints: list[BoundBreakpoint], pt_entries: dict[int, set[str]],
                 bp_entries: dict[str, frozenset[int]], notes: list[str], slide_evidence: dict[str, Any]) -> None:
        self.plan = plan
        self.arch = arch
        self.slide = slide
        self.cr3 = cr3
        self.percpu_bases = percpu_bases
        self.notes = notes
        self.slide_evidence = slide_evidence
        self._adopt(extents, views, breakpoints, pt_entries, bp_entries)

    # ------------------------------------------------------------------ internal state
    def _adopt(self, extents: dict[str, list[_Extent]], views: dict[int, ViewBinding],
               breakpoints: list[BoundBreakpoint], pt_entries: dict[int, set[str]],
               bp_entries: dict[str, frozenset[int]]) -> None:
        self.extents = extents
        self.views = views
        self.breakpoints = breakpoints
        self._bp_entries = bp_entries
        self._frames = {name: _merge_pieces(p for e in es for p in e.pieces) for name, es in extents.items()}
        self._va_ranges: dict[str, tuple[list[int], list[int]]] = {}
        for name, es in extents.items():
            spans = _merge_spans((e.va, e.va + e.size - 1) for e in es if e.va is not None and e.size)
            self._va_ranges[name] = ([s for s, _ in spans], [t for _, t in spans])
        self.pt_entries = pt_entries
        self.pt_frames: dict[int, set[str]] = {}
        for ea, users in pt_entries.items():
            self.pt_frames.setdefault(ea >> FRAME_SHIFT, set()).update(users)

    # ------------------------------------------------------------------ the engine's Binding protocol
    def region_frames(self, name: str) -> list[tuple[int, int, int]]:
        """(gfn, first byte offset, last byte offset inclusive) of every frame the region covers (every
        vCPU's instance for per-CPU and register extents). KeyError for an unknown region."""
        return list(self._frames[name])

    def percpu_base(self, vcpu: int) -> int:
        return self.percpu_bases[vcpu]

    def breakpoint_sites(self) -> dict[int, str]:
        """Slid virtual address and guest-physical address of every site -> its plan id."""
        out: dict[int, str] = {}
        for bp in self.breakpoints:
            out[bp.address] = bp.id
            out[bp.pa] = bp.id
        return out

    def breakpoint_insn_bytes(self, site_id: str) -> bytes:
        """The original instruction bytes at a site, padded to 16 (SET_EMUL_INSN_DATA)."""
        for bp in self.breakpoints:
            if bp.id == site_id:
                return bp.original.ljust(_INSN_BYTES, b"\x90")
        raise KeyError(site_id)

    def in_region(self, name: str, address: int) -> bool:
        """Whether a (slid) virtual address lies in the region: any vCPU's instance for per-CPU and
        register extents. `pa` extents have no virtual address and never match."""
        spans = self._va_ranges.get(name)
        if spans is None:
            return False
        starts, ends = spans
        i = bisect.bisect_right(starts, address) - 1
        return i >= 0 and address <= ends[i]

    # ------------------------------------------------------------------ for the installer
    def view(self, plan_id: int) -> ViewBinding:
        return self.views[plan_id]

    def view_access(self, plan_id: int) -> dict[int, str]:
        return dict(self.views[plan_id].access)

    @property
    def pt_watch(self) -> frozenset[int]:
        """Page-table frames mapping protected pages (write-trapped in the restricted views)."""
        return frozenset(self.pt_frames)

    def pt_entry_users(self, gfn: int, offset: int | None = None) -> set[str]:
        """Regions (and breakpoints) whose translation uses an entry of this page-table frame that an
        access at `offset` may touch (an 8-byte store starting up to 7 bytes before it counts);
        every user of the frame when `offset` is None."""
        if offset is None:
            return set(self.pt_frames.get(gfn, ()))
        base = gfn << FRAME_SHIFT
        users: set[str] = set()
        for entry in {((offset + d) & ~7) for d in (-7, 0, 7) if 0 <= offset + d < PAGE}:
            users |= self.pt_entries.get(base | entry, set())
        return users

    def default_view(self) -> int | None:
        """The restricted view every vCPU runs in (context "*"), or None without altp2m."""
        restricted = [v for v in self.views.values() if v.role == "restricted"]
        for v in restricted:
            if "*" in v.contexts:
                return v.id
        return restricted[0].id if restricted else None

    def rebind(self, backend: Any) -> BindDelta:
        """Re-walk every region with the same slide and per-CPU bases (after a write to a watched
        page-table frame) and adopt the result; returns what changed. Regions that no longer translate
        keep their old frames and are listed in `BindDelta.unmapped` (the caller alerts)."""
        binder = _Binder(self.plan, backend, arch=self.arch, cr3=self.cr3)
        binder.slide = self.slide
        binder.percpu_bases = list(self.percpu_bases)
        binder.read_vcpu_registers()
        extents, failures = binder.bind_regions()
        for f in failures:
            if f.region in self.extents:
                extents[f.region] = self.extents[f.region]
        breakpoints, bp_entries, bp_failures = binder.bind_breakpoints()
        old_by_id = {bp.id: bp for bp in self.breakpoints}
        for f in bp_failures:
            site = f.region.split(" ", 1)[1] if f.region else ""
            if site in old_by_id:
                breakpoints.append(old_by_id[site])
                bp_entries[site] = self._bp_entries.get(site, frozenset())
        breakpoints.sort(key=lambda b: b.id)
        views, pt_entries = binder.bind_views(extents, bp_entries)
        delta = BindDelta(unmapped=failures + bp_failures)
        old_frames = dict(self._frames)
        old_views = {vid: dict(v.access) for vid, v in self.views.items()}
        old_pt = set(self.pt_frames)
        self._adopt(extents, views, breakpoints, pt_entries, bp_entries)
        for name, frames in self._frames.items():
            if frames != old_frames.get(name):
                delta.regions[name] = (list(old_frames.get(name, [])), list(frames))
        for vid, v in self.views.items():
            old = old_views.get(vid, {})
            changes = {g: (old.get(g), v.access.get(g)) for g in set(old) | set(v.access)
                       if old.get(g) != v.access.get(g)}
            if changes:
                delta.views[vid] = changes
        delta.pt_added = set(self.pt_frames) - old_pt
        delta.pt_removed = old_pt - set(self.pt_frames)
        for bp in self.breakpoints:
            old = old_by_id.get(bp.id)
            if old is not None and (old.gfn, old.offset) != (bp.gfn, bp.offset):
                delta.breakpoints[bp.id] = (old, bp)
        return delta

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (for logs, the state record and `policyc explain`)."""
        return {
            "slide": hex(self.slide), "arch": self.arch, "cr3": hex(self.cr3),
            "percpu_bases": [hex(b) for b in self.percpu_bases],
            "regions": {n: len(f) for n, f in self._frames.items()},
            "views": {vid: len(v.access) for vid, v in self.views.items()},
            "pt_watch": sorted(self.pt_frames),
            "breakpoints": {bp.id: {"address": hex(bp.address), "gfn": hex(bp.gfn), "offset": bp.offset}
                            for bp in self.breakpoints},
            "slide_evidence": self.slide_evidence, "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        return (f"BoundPlan(slide={self.slide:#x}, regions={len(self.extents)}, "
                f"pt_watch={len(self.pt_frames)}, breakpoints={len(self.breakpoints)})")


def plan_views(plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(plan.get("views") or [])


def _merge_pieces(pieces: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sort and merge overlapping or touching byte ranges on the same frame."""
    out: list[tuple[int, int, int]] = []
    for gfn, first, last in sorted(pieces):
        if out and out[-1][0] == gfn and first <= out[-1][2] + 1:
            if last > out[-1][2]:
                out[-1] = (gfn, out[-1][1], last)
        else:
            out.append((gfn, first, last))
    return out


def _merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


# --------------------------------------------------------------------------- symbols

def _file_sha256(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _check_symbols(plan: Mapping[str, Any], tables: Sequence[SymbolTable]) -> list[BindFailure]:
    wanted = (plan.get("policy") or {}).get("symbols") or []
    have = [(t, Path(t.source).name, _file_sha256(t.source)) for t in tables]
    failures = []
    for sym in wanted:
        match = [t for t, _name, digest in have if digest == sym["sha256"]]
        if match:
            continue
        same_name = [(name, digest) for _t, name, digest in have if name == sym["name"]]
        if same_name:
            name, digest = same_name[0]
            failures.append(BindFailure(None, None, f"symbol file '{name}' has sha256 {digest}, the plan was "
                                        f"compiled against {sym['sha256']}: a different kernel build"))
        else:
            failures.append(BindFailure(None, None, f"the plan needs symbol file '{sym['name']}' "
                                        f"(sha256 {sym['sha256'][:16]}...), which was not given"))
    return failures


def _lookup(tables: Sequence[SymbolTable], name: str) -> int | None:
    for t in tables:
        s = t.lookup(name)
        if s is not None and not s.percpu:
            return s.address
    return None


# --------------------------------------------------------------------------- slide discovery

# Linux's page-table isolation allocates each PGD as an 8 KiB pair: the kernel half, then the user
# half (CR3 bit 12 set) that maps only the entry text and the CPU entry area.
PTI_USER_PGD_BIT = 1 << 12


def _slide_alignment(arch: str, os_name: str) -> int:
    return PAGE_2M if arch.startswith("x86_64") and os_name == "linux" else PAGE


def find_slide(backend: Any, tables: Sequence[SymbolTable], space: _Space, regs0: Mapping[str, int], *,
               arch: str) -> tuple[int, dict[str, Any], list[str]]:
    """The slide from LSTAR, cross-checked with the IDT. Returns (slide, evidence, notes); raises
    BindError when the guest's own registers disagree or the slide is implausible."""
    os_name = tables[0].os if tables else "linux"
    align = _slide_alignment(arch, os_name)
    evidence: dict[str, Any] = {}
    notes: list[str] = []
    lstar_slide = None
    lstar = regs0.get("msr_lstar")
    for name in _ENTRY.get(os_name, ()):
        link = _lookup(tables, name)
        if link is not None and lstar is not None:
            lstar_slide = (lstar - link) & U64
            evidence["lstar"] = {"msr_lstar": hex(lstar), "symbol": name, "slide": hex(lstar_slide)}
            break
    # The IDT: handler addresses of well-known vectors, through IDTR (a virtual address).
    idt_votes: Counter[int] = Counter()
    idtr = regs0.get("idtr_base")
    if idtr is not None:
        for vector, names in _IDT_HANDLERS.get(os_name, {}).items():
            try:
                gate = space.read_virtual((idtr + 16 * vector) & U64, 16)
            except (PageFault, NonCanonicalAddress, PhysicalAddressError):
                break
            lo, _sel, _ist, kind, mid, hi, _ = _IDT_GATE.unpack(gate)
            if not kind & 0x80:
                continue
            handler = lo | mid << 16 | hi << 32
            for name in names:
                link = _lookup(tables, name)
                if link is not None:
                    idt_votes[(handler - link) & U64] += 1
                    break
    idt_slide = idt_votes.most_common(1)[0][0] if idt_votes else None
    if idt_votes:
        evidence["idt"] = {"idtr_base": hex(idtr or 0), "votes": {hex(k): n for k, n in idt_votes.items()}}
    if os_name == "windows" and lstar_slide is None and idt_slide is None:
        # An ISF without KiSystemCall64 or IDT handler symbols: find ntoskrnl by its own PE header.
        return _windows_image_base(backend, tables, space, regs0)

    def plausible(s: int | None) -> str | None:
        if s is None:
            return "unknown"
        if s % align:
            return f"{s:#x} is not {align >> 10} KiB aligned"
        if os_name == "linux" and s >= 1 << 30:
            return f"{s:#x} puts the kernel outside the 1 GiB kernel-image window"
        return None

    lstar_bad, idt_bad = plausible(lstar_slide), plausible(idt_slide)
    if lstar_bad is None and idt_slide is not None and idt_slide != lstar_slide:
        raise BindError(BindFailure(None, lstar, f"LSTAR implies slide {lstar_slide:#x} but the IDT implies "
                                    f"{idt_slide:#x}: the syscall entry or the IDT is hooked; refusing to bind "
                                    "(pass the slide explicitly to override)"))
    if lstar_bad is None:
        slide = lstar_slide
        if idt_slide is None:
            notes.append("slide from LSTAR only: the IDT gave no cross-check")
    elif idt_bad is None and lstar_slide is not None:
        raise BindError(BindFailure(None, lstar, f"LSTAR does not point into the kernel image at the slide the "
                                    f"IDT implies ({idt_slide:#x}; LSTAR gives {lstar_bad}): the syscall entry "
                                    "is hooked; refusing to bind (pass the slide explicitly to override)"))
    elif idt_bad is None:
        slide = idt_slide
        notes.append("slide from the IDT only: no syscall-entry symbol or LSTAR")
    else:
        raise BindError(BindFailure(None, lstar, f"cannot find the slide: LSTAR gives {lstar_bad}, the IDT gives "
                                    f"{idt_bad}"))
    assert slide is not None
    # idt_table's frame must be what IDTR maps (Linux maps a read-only alias in the CPU entry area).
    idt_link = _lookup(tables, "idt_table")
    if idt_link is not None and idtr is not None:
        try:
            a = space.pt.translate((idt_link + slide) & U64).pa >> FRAME_SHIFT
            b = space.pt.translate(idtr).pa >> FRAME_SHIFT
        except (PageFault, NonCanonicalAddress) as exc:
            raise BindError(BindFailure("idt_table", (idt_link + slide) & U64,
                                        f"cross-check of slide {slide:#x} failed: {exc}")) from None
        evidence["idt_table_frame"] = hex(a)
        if a != b:
            raise BindError(BindFailure(None, idtr, f"IDTR's page is frame {b:#x} but idt_table at slide "
                                        f"{slide:#x} is frame {a:#x}: the IDT was moved or the slide is wrong"))
    if os_name == "windows":
        _check_windows_build(tables, space, slide, evidence, notes)
    return slide, evidence, notes


# --------------------------------------------------------------------------- Windows: ntoskrnl's PE header
#
# A Windows ISF holds RVAs and names its PDB (GUID + age); the kernel image in memory carries the same
# pair in the CodeView ("RSDS") record its debug directory points to. Scanning down from an address
# known to be inside ntoskrnl (LSTAR, IDT handlers) for a page that starts a PE image with that record
# finds the image base, which is the slide, and proves the symbols are for this very build.

_PE_SCAN_WINDOW = 32 << 20      # ntoskrnl is about 16 MiB: a scan that goes further has left it
_DEBUG_TYPE_CODEVIEW = 2
_MAX_DEBUG_ENTRIES = 32
_KERNEL_PDB_NAMES = frozenset({"ntkrnlmp.pdb", "ntoskrnl.pdb", "ntkrnlpa.pdb", "ntkrpamp.pdb"})
_WINDOWS_IDT_VECTORS = (3, 13, 14)
_READ_ERRORS = (PageFault, NonCanonicalAddress, PhysicalAddressError)


@dataclass(frozen=True)
class _PeImage:
    """A PE32+ image found in guest memory; `guid`/`age`/`pdb` from its CodeView record, or None with
    `problem` saying why not."""

    base: int
    size: int
    guid: str | None
    age: int | None
    pdb: str | None
    problem: str | None = None

    def contains(self, va: int) -> bool:
        return self.base <= va < self.base + self.size

    def identity(self) -> str:
        if self.guid is None:
            return f"the image at {self.base:#x} ({self.problem})"
        return f"the image at {self.base:#x} ({self.pdb or '?'} GUID {self.guid} age {self.age})"


def _u16(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 2], "little")


def _u32(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 4], "little")


def _pe_image_at(space: _Space, va: int) -> _PeImage | None:
    """The PE32+ image whose headers start at `va`, or None when there is none (so a page that merely
    begins with "MZ" is passed over)."""
    try:
        dos = space.read_virtual(va, 0x40)
        if dos[:2] != b"MZ":
            return None
        e_lfanew = _u32(dos, 0x3C)
        if not 0x40 <= e_lfanew <= PAGE - 24:
            return None
        nt = space.read_virtual(va + e_lfanew, 24)
        if nt[:4] != b"PE\0\0":
            return None
        opt_size = _u16(nt, 20)
        opt = space.read_virtual(va + e_lfanew + 24, min(opt_size, 240))
    except _READ_ERRORS:
        return None
    if len(opt) < 112 or _u16(opt, 0) != 0x20B:
        return None
    size = _u32(opt, 56)
    if size < PAGE:
        return None

    def problem(why: str) -> _PeImage:
        return _PeImage(va, size, None, None, None, why)

    if _u32(opt, 108) <= 6 or len(opt) < 112 + 7 * 8:
        return problem("no debug directory")
    dir_rva, dir_size = _u32(opt, 160), _u32(opt, 164)
    if not dir_rva or not dir_size or dir_rva + dir_size > size:
        return problem("no debug directory")
    try:
        raw = space.read_virtual(va + dir_rva, min(dir_size, 28 * _MAX_DEBUG_ENTRIES))
    except _READ_ERRORS as exc:
        return problem(f"debug directory unreadable: {exc}")
    for at in range(0, len(raw) - 27, 28):
        kind, length, rva = _u32(raw, at + 12), _u32(raw, at + 16), _u32(raw, at + 20)
        if kind != _DEBUG_TYPE_CODEVIEW:
            continue
        if not 24 <= length <= 24 + 1024 or not rva or rva + length > size:
            return problem("malformed CodeView entry")
        try:
            cv = space.read_virtual(va + rva, length)
        except _READ_ERRORS as exc:
            return problem(f"CodeView record unreadable: {exc}")
        if cv[:4] != b"RSDS":
            return problem(f"CodeView record is {cv[:4]!r}, not RSDS")
        d1, d2, d3 = struct.unpack_from("<IHH", cv, 4)
        guid = f"{d1:08X}{d2:04X}{d3:04X}{cv[12:20].hex().upper()}"
        name = cv[24:].split(b"\0", 1)[0].decode("ascii", "replace")
        return _PeImage(va, size, guid, _u32(cv, 20), name.rsplit("\\", 1)[-1])
    return problem("no CodeView debug entry")


def _scan_for_image(backend: Any, space: _Space, address: int) -> _PeImage | None:
    """The nearest PE image whose header page is at or below `address`, within _PE_SCAN_WINDOW, read
    through the guest's own page tables (unmapped stretches are skipped a whole table entry at once)."""
    va = address & ~(PAGE - 1) & U64
    floor = va - _PE_SCAN_WINDOW
    while va >= floor:
        try:
            t = space.pt.translate(va)
        except PageFault as exc:
            va = (va & ~(exc.level.coverage - 1)) - PAGE
            continue
        except NonCanonicalAddress:
            return None
        try:
            head = backend.read_physical(t.pa, 2)
        except BackendError:
            head = b""
        if head == b"MZ":
            image = _pe_image_at(space, va)
            if image is not None:
                return image
        va -= PAGE
    return None


def _wrong_build(image: _PeImage, want: Any, source: str, found_from: str) -> BindFailure:
    return BindFailure(None, image.base, f"the guest runs ntoskrnl with PDB GUID {image.guid} age {image.age} "
                       f"({image.pdb} at {image.base:#x}, found from {found_from}); the symbols are for "
                       f"{want.guid} age {want.age} ({source}): use the ISF made from the guest's own PDB")


def _windows_pdb(tables: Sequence[SymbolTable]) -> tuple[Any, str]:
    for t in tables:
        if t.os == "windows":
            return t.pdb, Path(t.source).name
    return None, "the symbol file"


def _windows_image_base(backend: Any, tables: Sequence[SymbolTable], space: _Space,
                        regs0: Mapping[str, int]) -> tuple[int, dict[str, Any], list[str]]:
    """ntoskrnl's image base from LSTAR and the IDT handlers: each is scanned down from for the image
    holding it, which must carry the ISF's PDB GUID and age. Every starting point must land in that
    one image: one that does not is hooked, and binding refuses (as the Linux path does)."""
    want, source = _windows_pdb(tables)
    if want is None:
        raise BindError(BindFailure(None, None, f"cannot find ntoskrnl's image base: '{source}' names no "
                                    "syscall-entry or IDT-handler symbol and no PDB GUID and age "
                                    "(metadata.windows.pdb) to recognise the image by"))
    starts: list[tuple[str, int]] = []
    lstar = regs0.get("msr_lstar") or 0
    if lstar >> 47 == 0x1FFFF:
        starts.append(("LSTAR", lstar))
    idtr = regs0.get("idtr_base")
    if idtr is not None:
        for vector in _WINDOWS_IDT_VECTORS:
            try:
                gate = space.read_virtual((idtr + 16 * vector) & U64, 16)
            except _READ_ERRORS:
                break
            lo, _sel, _ist, kind, mid, hi, _ = _IDT_GATE.unpack(gate)
            if kind & 0x80:
                starts.append((f"IDT vector {vector}", lo | mid << 16 | hi << 32))
    results = [(label, addr, _scan_for_image(backend, space, addr)) for label, addr in starts]
    evidence: dict[str, Any] = {"pdb": {"guid": want.guid, "age": want.age, "database": want.database},
                                "pe_scan": {label: {"address": hex(addr),
                                                    "image_base": hex(img.base) if img else None,
                                                    "pdb": f"{img.pdb} {img.guid} {img.age}" if img and img.guid
                                                    else (img.problem if img else None)}
                                            for label, addr, img in results}}

    def ours(img: _PeImage | None) -> bool:
        return img is not None and (img.guid, img.age) == (want.guid, want.age)

    hits = {img.base for _label, addr, img in results if ours(img) and img.contains(addr)}
    if not hits:
        for label, addr, img in results:
            if img is not None and img.guid and img.contains(addr) and (img.pdb or "").lower() in _KERNEL_PDB_NAMES:
                raise BindError(_wrong_build(img, want, source, label))
        if not starts:
            raise BindError(BindFailure(None, None, "cannot find ntoskrnl's image base: LSTAR is not a kernel "
                                        "address and the IDT gives no handler to scan from"))
        seen = "; ".join(f"{label} {addr:#x}: " + (img.identity() if img else "no PE image")
                         for label, addr, img in results)
        raise BindError(BindFailure(None, lstar or None, f"cannot find ntoskrnl's image base: no PE image with "
                                    f"PDB GUID {want.guid} age {want.age} within {_PE_SCAN_WINDOW >> 20} MiB "
                                    f"below LSTAR or the IDT handlers ({seen})"))
    if len(hits) > 1:
        raise BindError(BindFailure(None, None, "LSTAR and the IDT handlers lead to different copies of "
                                    f"ntoskrnl ({', '.join(hex(b) for b in sorted(hits))}): one of them is "
                                    "hooked; refusing to bind (pass the slide explicitly to override)"))
    base = hits.pop()
    for label, addr, img in results:
        if img is not None and img.base == base and img.contains(addr):
            continue
        where = ("lies in no PE image" if img is None else f"lies past the end of {img.identity()}"
                 if not img.contains(addr) else f"lies in {img.identity()}")
        what = "the syscall entry" if label == "LSTAR" else "the IDT"
        raise BindError(BindFailure(None, addr, f"{label} ({addr:#x}) is not in ntoskrnl (image base {base:#x}): "
                                    f"it {where}; {what} is hooked; refusing to bind (pass the slide "
                                    "explicitly to override)"))
    notes: list[str] = []
    if not any(label == "LSTAR" for label, _a, _i in results):
        notes.append("image base from the IDT only: LSTAR is not a kernel address")
    elif len(results) == 1:
        notes.append("image base from LSTAR only: the IDT gave no cross-check")
    evidence["image_base"] = hex(base)
    return base, evidence, notes


def _check_windows_build(tables: Sequence[SymbolTable], space: _Space, slide: int, evidence: dict[str, Any],
                         notes: list[str]) -> None:
    """With a slide found from symbols, the image there must still be the ISF's build."""
    want, source = _windows_pdb(tables)
    if want is None:
        return
    image = _pe_image_at(space, slide)
    if image is None or image.guid is None:
        notes.append(f"no readable CodeView record at the image base {slide:#x}: the kernel build was not "
                     "checked against the symbols' PDB GUID")
        return
    evidence["image"] = {"base": hex(slide), "pdb": f"{image.pdb} {image.guid} {image.age}"}
    if (image.guid, image.age) != (want.guid, want.age):
        raise BindError(_wrong_build(image, want, source, "the slide"))


# --------------------------------------------------------------------------- arm64
#
# Linux on arm64 (4 KiB pages, 48-bit VAs): TTBR1_EL1 holds the physical address of swapper_pg_dir, and
# the kernel image maps swapper_pg_dir at its slid link address (it lies in the image's read-only part).
# So the slide is where TTBR1's own table appears in the image region, minus the symbol's link address:
# found from the one register Xen always gives (the vCPU context and every vm_event request carry
# TTBR1), read through the guest's own tables. VBAR_EL1, when a backend offers it (the simulator does;
# Xen 4.17's XEN_DOMCTL_getvcpucontext does not), must agree: vectors that moved elsewhere are hooked.
# The Image header, when its frame (just before _stext's; the 64 KiB head is freed after boot) still
# holds it, must describe an image as long as the symbols' _text.._end.

_ARM64_SLIDE_ALIGN = 0x10000          # the image's segments are 64 KiB aligned and KASLR keeps that
_ARM64_KIMAGE = 0xFFFF_8000_0000_0000  # with 48-bit VAs the image lives in the upper half of TTBR1's range
_ARM64_IMAGE_MAGIC = b"ARM\x64"


class _Arm64Space(_Space):
    """The kernel half of an AArch64 guest (TTBR1 = `cr3`, the swapper_pg_dir frame) read through the
    backend; user addresses do not translate (TTBR0 walks disabled)."""

    def __init__(self, backend: Any, cr3: int) -> None:
        self.reader = _PhysReader(backend)
        self.pt = Stage1Tables(self.reader, cr3 & TTBR_BADDR_MASK, 0, tcr=LINUX_TCR_48 | TCR_EPD0)  # type: ignore[assignment]


def _arm64_roots(regs: Sequence[Mapping[str, int]]) -> list[int]:
    """TTBR1 table addresses of the vCPUs, those running at EL1 first (a vCPU at EL0 may have the kpti
    trampoline table in TTBR1 instead of swapper_pg_dir)."""
    order = sorted(range(len(regs)), key=lambda i: ((regs[i].get("cpsr", 0) >> 2) & 3) == 0)
    out: list[int] = []
    for i in order:
        base = regs[i]["ttbr1"] & TTBR_BADDR_MASK
        if base not in out:
            out.append(base)
    return out


def _check_arm64_regs(regs: Sequence[Mapping[str, int]]) -> None:
    for i, r in enumerate(regs):
        missing = [n for n in ("ttbr1", "ttbcr") if n not in r]
        if missing:
            raise BindError(BindFailure(None, None, f"vCPU {i}: the backend gives no {' or '.join(missing)}: "
                                        "not an AArch64 vCPU context"))
        tcr = r["ttbcr"]
        t1sz, tg1 = (tcr >> 16) & 0x3F, (tcr >> 30) & 3
        if (t1sz, tg1) != (16, 0b10):
            raise BindError(BindFailure(None, None, f"vCPU {i}: TCR_EL1 {tcr:#x} has T1SZ={t1sz}, TG1={tg1:#b}: "
                                        "binding supports 48-bit kernel addresses with 4 KiB pages only"))


def _arm64_slide_problem(slide: int) -> str | None:
    if slide % _ARM64_SLIDE_ALIGN:
        return f"{slide:#x} is not 64 KiB aligned"
    if slide >= 1 << 47:
        return f"{slide:#x} leaves the kernel half of the address space"
    return None


def _slides_mapping(space: _Arm64Space, root: int, link: int) -> list[int]:
    """Every slide at which the image region maps the frame `root` where `link` (swapper_pg_dir) would
    be: candidate addresses are at or above the link address, 64 KiB apart from it."""
    found = []
    for m in space.pt.mappings(high_only=True, start=link):
        if m.pa <= root < m.pa + m.page_size:
            va = m.va + (root - m.pa)
            slide = (va - link) & U64
            if va >= link and _arm64_slide_problem(slide) is None:
                found.append(slide)
    return found


def find_slide_arm64(backend: Any, tables: Sequence[SymbolTable], regs: Sequence[Mapping[str, int]]
                     ) -> tuple[int, int, dict[str, Any], list[str]]:
    """The KASLR slide of an arm64 Linux guest and the swapper_pg_dir frame to walk (see the section
    comment). Returns (slide, table, evidence, notes); raises BindError when the guest's own state
    disagrees with itself or gives nothing to go on."""
    evidence: dict[str, Any] = {}
    notes: list[str] = []
    swapper, vectors = _lookup(tables, "swapper_pg_dir"), _lookup(tables, "vectors")
    roots = _arm64_roots(regs)
    found: dict[int, int] = {}                 # slide -> TTBR1 table that gave it
    if swapper is not None:
        for root in roots:
            for s in _slides_mapping(_Arm64Space(backend, root), root, swapper):
                found.setdefault(s, root)
            if found:
                evidence["ttbr1"] = {"table": hex(root), "symbol": "swapper_pg_dir",
                                     "slides": [hex(s) for s in sorted(found)]}
                break
    vbars = {r["vbar_el1"] for r in regs if r.get("vbar_el1") is not None}
    if len(vbars) > 1:
        raise BindError(BindFailure(None, None, "the vCPUs' VBAR_EL1 differ ("
                                    f"{', '.join(hex(v) for v in sorted(vbars))}; Linux gives every CPU the same "
                                    "vectors): one is hooked; refusing to bind (pass the slide explicitly to "
                                    "override)"))
    vbar = next(iter(vbars), None)
    vbar_slide: int | None = None
    vbar_problem: str | None = None
    if vbar is not None and vectors is not None:
        if vbar < vectors:
            vbar_problem = f"VBAR_EL1 {vbar:#x} lies below the link address of vectors ({vectors:#x})"
        else:
            vbar_slide = vbar - vectors
            vbar_problem = _arm64_slide_problem(vbar_slide)
            evidence["vbar_el1"] = {"vbar_el1": hex(vbar), "symbol": "vectors", "slide": hex(vbar_slide)}
    if found:
        if vbar_slide is not None or vbar_problem is not None:
            if vbar_problem is not None or vbar_slide not in found:
                implied = f"slide {vbar_slide:#x}" if vbar_problem is None else vbar_problem
                raise BindError(BindFailure(None, vbar, f"VBAR_EL1 {vbar:#x} gives {implied}, but TTBR1's table "
                                            f"(swapper_pg_dir) is mapped at slide "
                                            f"{', '.join(hex(s) for s in sorted(found))}: the exception vectors "
                                            "are hooked; refusing to bind (pass the slide explicitly to override)"))
            slide = vbar_slide
        elif len(found) == 1:
            slide = next(iter(found))
            notes.append("slide from TTBR1 only: " + ("the backend gives no VBAR_EL1 (Xen's vCPU context does "
                                                      "not carry it)" if vbar is None else
                                                      "no vectors symbol to check VBAR_EL1 against"))
        else:
            raise BindError(BindFailure(None, None, "TTBR1's table is mapped at several plausible slides ("
                                        f"{', '.join(hex(s) for s in sorted(found))}) and there is no VBAR_EL1 to "
                                        "choose: pass the slide explicitly"))
        assert slide is not None
        root = found[slide]
    elif vbar_slide is not None and vbar_problem is None:
        slide, root = vbar_slide, roots[0]
        notes.append("slide from VBAR_EL1 only: TTBR1's table is not mapped as swapper_pg_dir in the image "
                     "region, so nothing cross-checks it")
    else:
        why = vbar_problem or ("no VBAR_EL1 among the backend's registers" if vbar is None else "no vectors symbol")
        where = "the symbols have no swapper_pg_dir" if swapper is None else \
            "TTBR1's table is not mapped as swapper_pg_dir in the kernel image region"
        raise BindError(BindFailure(None, None, f"cannot find the slide: {where}, and {why}"))
    _check_arm64_image(backend, tables, _Arm64Space(backend, root), slide, evidence, notes)
    return slide, root, evidence, notes


def _check_arm64_image(backend: Any, tables: Sequence[SymbolTable], space: _Arm64Space, slide: int,
                       evidence: dict[str, Any], notes: list[str]) -> None:
    """_stext must translate at the slide; the Image header, if its frame still holds it, must agree."""
    text, stext, end = _lookup(tables, "_text"), _lookup(tables, "_stext"), _lookup(tables, "_end")
    if stext is None:
        return
    try:
        pa = space.pt.translate((stext + slide) & U64).pa
    except PageFault as exc:
        raise BindError(BindFailure("_stext", (stext + slide) & U64, f"does not translate at slide {slide:#x}: "
                                    f"{exc}")) from None
    if text is None or end is None or not 0 < stext - text <= _ARM64_SLIDE_ALIGN or pa < stext - text:
        return
    try:
        header = backend.read_physical(pa - (stext - text), 64)
    except BackendError:
        header = b""
    if header[0x38:0x3C] != _ARM64_IMAGE_MAGIC:
        notes.append("no arm64 Image header before _stext (the 64 KiB head is freed after boot): not used")
        return
    size = int.from_bytes(header[16:24], "little")
    evidence["image_header"] = {"pa": hex(pa - (stext - text)), "image_size": hex(size)}
    if size != end - text:
        raise BindError(BindFailure("_text", (text + slide) & U64, f"the Image header at physical "
                                    f"{pa - (stext - text):#x} gives image_size {size:#x}, the symbols give "
                                    f"_end - _text = {end - text:#x}: these symbols are not this kernel's"))


def _arm64_percpu_bases(binder: "_Binder", need: bool) -> list[int]:
    """Each vCPU's per-CPU area: slid __per_cpu_start plus its offset (TPIDR_EL1 when the backend gives
    it, else __per_cpu_offset[i])."""
    tables, regs = binder.tables, binder.regs
    start, table = _lookup(tables, "__per_cpu_start"), _lookup(tables, "__per_cpu_offset")
    offsets: list[int] | None = None
    if table is not None:
        try:
            raw = binder.space.read_virtual((table + binder.slide) & U64, 8 * len(regs))
            offsets = list(struct.unpack(f"<{len(regs)}Q", raw))
        except (PageFault, PhysicalAddressError):
            offsets = None
    bases = []
    for i, r in enumerate(regs):
        off = r.get("tpidr_el1")
        if off is None and offsets is not None:
            off = offsets[i]
        if off is None or start is None:
            if need:
                raise BindError(BindFailure(None, None, f"vCPU {i}: no TPIDR_EL1 and no readable __per_cpu_offset "
                                            "(or no __per_cpu_start): per-CPU regions cannot be placed"))
            bases.append(0)
            continue
        if offsets is not None and off != offsets[i]:
            binder.notes.append(f"vCPU {i}: TPIDR_EL1 {off:#x} differs from __per_cpu_offset[{i}] {offsets[i]:#x} "
                                "(vCPU and CPU numbers may differ)")
        bases.append((start + binder.slide + off) & U64)
    return bases


def _check_host_and_symbols(plan: Mapping[str, Any], backend: Any, tables: Sequence[SymbolTable], *, arch: str,
                            check_symbols: bool) -> Any:
    """The host's capabilities, after refusing a host of another architecture and (``check_symbols``)
    symbol tables other than those the plan was compiled against."""
    caps = backend.capabilities()
    if not runs_on(arch, caps.arch):
        raise BindError(BindFailure(None, None, f"the plan is for {arch} but the host is {caps.arch}"))
    if check_symbols:
        failures = _check_symbols(plan, tables)
        if failures:
            raise BindError(failures)
    return caps


def _needs_percpu(plan: Mapping[str, Any]) -> bool:
    return any(e.get("percpu") for r in (plan.get("regions") or {}).values() for e in r.get("extents", ()))


def _bind_all(binder: "_Binder", evidence: dict[str, Any]) -> BoundPlan:
    """The bound plan, once ``binder`` has its table root, slide and per-CPU bases: regions and
    breakpoints fail together, so that one BindError lists every failure."""
    extents, failures = binder.bind_regions()
    breakpoints, bp_entries, bp_failures = binder.bind_breakpoints()
    if failures or bp_failures:
        raise BindError(failures + bp_failures)
    views, pt_entries = binder.bind_views(extents, bp_entries)
    return BoundPlan(binder.plan, arch=binder.arch, slide=binder.slide, cr3=binder.cr3,
                     percpu_bases=binder.percpu_bases, extents=extents, views=views, breakpoints=breakpoints,
                     pt_entries=pt_entries, bp_entries=bp_entries, notes=binder.notes, slide_evidence=evidence)


def _bind_arm64(plan: Mapping[str, Any], backend: Any, tables: list[SymbolTable], *, slide: int | None,
                check_symbols: bool) -> BoundPlan:
    arch = "arm64"
    caps = _check_host_and_symbols(plan, backend, tables, arch=arch, check_symbols=check_symbols)
    regs = [backend.get_registers(i) for i in range(caps.vcpus)]
    _check_arm64_regs(regs)
    evidence: dict[str, Any] = {}
    notes: list[str] = []
    if slide is not None:
        problem = _arm64_slide_problem(slide)
        if problem:
            raise BindError(BindFailure(None, None, f"slide {problem}"))
        evidence["given"] = hex(slide)
        root = _arm64_roots(regs)[0]
        swapper = _lookup(tables, "swapper_pg_dir")
        if swapper is not None:
            for cand in _arm64_roots(regs):
                t = _Arm64Space(backend, cand).pt.try_translate((swapper + slide) & U64)
                if t is not None and t.pa & ~(PAGE - 1) == cand:
                    root = cand
                    break
            else:
                notes.append(f"swapper_pg_dir at the given slide is no vCPU's TTBR1 table: walking {root:#x}")
    elif tables:
        slide, root, evidence, notes = find_slide_arm64(backend, tables, regs)
    else:
        raise BindError(BindFailure(None, None, "the plan has relocatable addresses but no symbol table was "
                                    "given to find the slide with"))
    binder = _Binder(plan, backend, arch=arch, cr3=root, tables=tables)
    binder.regs = regs
    binder.slide = slide
    binder.notes.extend(notes)
    binder.percpu_bases = _arm64_percpu_bases(binder, _needs_percpu(plan))
    return _bind_all(binder, evidence)


# --------------------------------------------------------------------------- the binder

class _Binder:
    def __init__(self, plan: Mapping[str, Any], backend: Any, *, arch: str, cr3: int,
                 tables: Sequence[SymbolTable] = ()) -> None:
        self.plan = plan
        self.backend = backend
        self.arch = arch
        self.x86 = arch.startswith("x86_64")
        self.tables = tables
        self.space = _Arm64Space(backend, cr3) if arch == "arm64" else _Space(backend, cr3)
        self.cr3 = cr3
        self.slide = 0
        self.percpu_bases: list[int] = []
        self.regs: list[Mapping[str, int]] = []
        self.notes: list[str] = []

    def read_vcpu_registers(self) -> None:
        n = self.backend.capabilities().vcpus
        self.regs = [self.backend.get_registers(i) for i in range(n)]

    def find_percpu_bases(self, need: bool) -> None:
        bases: list[int] = []
        table_bases: list[int] | None = None
        link = _lookup(self.tables, "__per_cpu_offset")
        if link is not None:
            try:
                raw = self.space.read_virtual((link + self.slide) & U64, 8 * len(self.regs))
                table_bases = list(struct.unpack(f"<{len(self.regs)}Q", raw))
            except (PageFault, NonCanonicalAddress, PhysicalAddressError):
                table_bases = None
        for i, r in enumerate(self.regs):
            # The kernel's GS base: GS_BASE in kernel mode, KERNEL_GS_BASE (swapped) in user mode.
            cands = [r.get("gs_base", 0), r.get("shadow_gs", 0)]
            kernel = [c for c in cands if c >> 47 == 0x1FFFF]
            if kernel:
                bases.append(kernel[0])
            elif table_bases is not None:
                bases.append(table_bases[i])
            else:
                bases.append(0)
                if need:
                    raise BindError(BindFailure(None, None, f"vCPU {i}: no kernel GS base (gs_base "
                                                f"{cands[0]:#x}, shadow_gs {cands[1]:#x}) and no "
                                                "__per_cpu_offset: per-CPU regions cannot be placed"))
            if table_bases is not None and bases[i] != table_bases[i]:
                self.notes.append(f"vCPU {i}: GS base {bases[i]:#x} differs from __per_cpu_offset[{i}] "
                                  f"{table_bases[i]:#x} (vCPU and CPU numbers may differ)")
        self.percpu_bases = bases

    # -- regions
    def _instances(self, name: str, ext: Mapping[str, Any]) -> list[tuple[int | None, int | None, int, str]]:
        """(vcpu, start, size, space) for one plan extent."""
        size = int(ext["size"], 16)
        if "register" in ext:
            reg = ext["register"] + "_base"
            return [(i, r[reg], size, "va") for i, r in enumerate(self.regs)]
        start = int(ext["start"], 16)
        if ext.get("percpu"):
            return [(i, (b + start) & U64, size, ext.get("space", "va")) for i, b in enumerate(self.percpu_bases)]
        if ext.get("relocatable"):
            start = (start + self.slide) & U64
        return [(None, start, size, ext.get("space", "va"))]

    def bind_regions(self) -> tuple[dict[str, list[_Extent]], list[BindFailure]]:
        out: dict[str, list[_Extent]] = {}
        failures: list[BindFailure] = []
        for name, region in sorted((self.plan.get("regions") or {}).items()):
            bound: list[_Extent] = []
            for ext in region.get("extents", ()):
                for vcpu, start, size, space in self._instances(name, ext):
                    if size <= 0:
                        continue
                    if space == "pa":
                        pieces = []
                        pa = start
                        while pa < start + size:
                            n = min(start + size - pa, PAGE - (pa & (PAGE - 1)))
                            pieces.append((pa >> FRAME_SHIFT, pa & (PAGE - 1), (pa & (PAGE - 1)) + n - 1))
                            pa += n
                        bound.append(_Extent(name, None, size, vcpu, tuple(pieces), frozenset()))
                        continue
                    try:
                        pieces, entries = self.space.translate_range(start, size)
                    except PageFault as exc:
                        who = f" (vCPU {vcpu}'s instance)" if vcpu is not None else ""
                        failures.append(BindFailure(name, exc.va, f"does not translate{who}: {exc.level.entry_name}"
                                                    f" at {exc.entry_address:#x} = {exc.entry:#x}: {exc.reason}"))
                        continue
                    except NonCanonicalAddress as exc:
                        failures.append(BindFailure(name, exc.va, "is not a canonical address"))
                        continue
                    bound.append(_Extent(name, start, size, vcpu, tuple(pieces), frozenset(entries)))
            out[name] = bound
        return out, failures

    # -- breakpoints
    def _physical_breakpoint(self, site: Mapping[str, Any], pa: int) -> BoundBreakpoint:
        """`execute pa`: the site is a guest frame; its address doubles as the site's virtual one (what a
        guest running with paging off reports in rip)."""
        size = 4 if self.arch == "arm64" else _INSN_BYTES
        original = self.backend.read_physical(pa, min(size, PAGE - (pa & (PAGE - 1))))
        return BoundBreakpoint(site["id"], pa, pa >> FRAME_SHIFT, pa & (PAGE - 1), original, site.get("mechanism"),
                               tuple(site.get("views", ())), site.get("step_view"))

    def bind_breakpoints(self) -> tuple[list[BoundBreakpoint], dict[str, frozenset[int]], list[BindFailure]]:
        out: list[BoundBreakpoint] = []
        entries: dict[str, frozenset[int]] = {}
        failures: list[BindFailure] = []
        for site in self.plan.get("breakpoints") or ():
            va = int(site["address"], 16)
            if site.get("physical"):
                out.append(self._physical_breakpoint(site, va))
                entries[site["id"]] = frozenset()          # no page tables involved: nothing to follow
                continue
            if site.get("relocatable", True):
                va = (va + self.slide) & U64
            if self.arch == "arm64" and va & 3:
                failures.append(BindFailure(f"breakpoint {site['id']}", va, "is not 4-byte aligned: no A64 "
                                            "instruction starts there"))
                continue
            try:
                t = self.space.pt.translate(va)
                used = frozenset(s.entry_address for s in self.space.pt.walk(va))
            except (PageFault, NonCanonicalAddress) as exc:
                failures.append(BindFailure(f"breakpoint {site['id']}", va, f"does not translate: {exc}"))
                continue
            try:
                # An A64 instruction is 4 bytes (what an inline SMC replaces); x86 needs 16 for emulation.
                original = self.space.read_virtual(va, 4 if self.arch == "arm64" else _INSN_BYTES)
            except (PageFault, PhysicalAddressError):
                original = self.space.read_virtual(va, PAGE - (va & (PAGE - 1)))
            out.append(BoundBreakpoint(site["id"], va, t.pa >> FRAME_SHIFT, t.pa & (PAGE - 1), original,
                                       site.get("mechanism"), tuple(site.get("views", ())), site.get("step_view")))
            entries[site["id"]] = used
        return out, entries, failures

    # -- views
    def bind_views(self, extents: dict[str, list[_Extent]], bp_entries: Mapping[str, frozenset[int]]
                   ) -> tuple[dict[int, ViewBinding], dict[int, set[str]]]:
        """Per plan view, gfn -> access; and the page-table entries to watch -> who depends on them."""
        frames = {name: _merge_pieces(p for e in es for p in e.pieces) for name, es in extents.items()}
        views: dict[int, ViewBinding] = {}
        pvs = plan_views(self.plan)
        has_restricted = any(v.get("role") == "restricted" for v in pvs)
        for v in pvs:
            vb = ViewBinding(v["id"], v["role"], v.get("default_access", "rwx"), tuple(v.get("contexts", ())),
                             visible_to_guest=v.get("visible_to_guest"))
            for rng in v.get("ranges", ()):
                for gfn, _first, _last in frames.get(rng["region"], ()):
                    old = vb.access.get(gfn)
                    vb.access[gfn] = rng["access"] if old is None else intersect_access(old, rng["access"],
                                                                                          x86=self.x86)
            views[v["id"]] = vb
        # The page-table watch: in every view that restricts pages, write-trap the paging structures
        # that map them, and those that map the breakpoint sites planted there.
        pt_entries: dict[int, set[str]] = {}
        for v in pvs:
            vb = views[v["id"]]
            if not (vb.role == "restricted" or (vb.role == "host" and not has_restricted and vb.access)):
                continue
            used: dict[int, set[str]] = {}
            for rng in v.get("ranges", ()):
                for e in extents.get(rng["region"], ()):
                    for ea in e.entries:
                        used.setdefault(ea, set()).add(rng["region"])
            for site in self.plan.get("breakpoints") or ():
                if vb.id in site.get("views", ()) or not site.get("views"):
                    for ea in bp_entries.get(site["id"], ()):
                        used.setdefault(ea, set()).add(f"breakpoint {site['id']}")
            for ea, users in used.items():
                pt_entries.setdefault(ea, set()).update(users)
            for gfn in {ea >> FRAME_SHIFT for ea in used}:
                old = vb.access.get(gfn)
                vb.access[gfn] = PT_WATCH_ACCESS if old is None else intersect_access(old, PT_WATCH_ACCESS,
                                                                                      x86=self.x86)
        return views, pt_entries


# --------------------------------------------------------------------------- entry point

def bind_plan(plan: Mapping[str, Any], backend: Any, symbols: SymbolTable | Sequence[SymbolTable] | None, *,
              slide: int | None = None, check_symbols: bool = True) -> BoundPlan:
    """Bind `plan` to the guest behind `backend`. `symbols`: the loaded symbol table(s) the plan names
    (verified by sha256). `slide`: skip discovery (an operator's override). Raises BindError."""
    tables: list[SymbolTable] = [] if symbols is None else [symbols] if isinstance(symbols, SymbolTable) \
        else list(symbols)
    arch = (plan.get("target") or {}).get("arch", "x86_64")
    if arch == "arm64":
        return _bind_arm64(plan, backend, tables, slide=slide, check_symbols=check_symbols)
    if not arch.startswith("x86_64"):
        raise BindError(BindFailure(None, None, f"binding {arch} guests is not implemented"))
    _check_host_and_symbols(plan, backend, tables, arch=arch, check_symbols=check_symbols)
    regs0 = backend.get_registers(0)
    cr3 = regs0["cr3"]
    binder = _Binder(plan, backend, arch=arch, cr3=cr3, tables=tables)
    binder.read_vcpu_registers()
    needs_slide = any(e.get("relocatable") for r in (plan.get("regions") or {}).values()
                      for e in r.get("extents", ())) or any(b.get("relocatable", True)
                                                            for b in plan.get("breakpoints") or ())
    evidence: dict[str, Any] = {}
    if slide is not None:
        if slide % _slide_alignment(arch, tables[0].os if tables else "linux"):
            raise BindError(BindFailure(None, None, f"slide {slide:#x} is not aligned"))
        binder.slide = slide
        evidence["given"] = hex(slide)
    elif needs_slide or tables:
        if not tables:
            raise BindError(BindFailure(None, None, "the plan has relocatable addresses but no symbol table was "
                                        "given to find the slide with"))
        try:
            binder.slide, evidence, notes = find_slide(backend, tables, binder.space, regs0, arch=arch)
        except BindError:
            if not (cr3 & PTI_USER_PGD_BIT and tables[0].os == "linux"):
                raise
            # Page-table isolation: vCPU 0 was paused in user mode, on the user half of the kernel's
            # 8 KiB PGD pair, where the image is not mapped. The kernel half is the frame below; the
            # slide found through it is cross-checked like any other, so a wrong guess still fails.
            space = _Space(backend, cr3 & ~PTI_USER_PGD_BIT)
            binder.slide, evidence, notes = find_slide(backend, tables, space, regs0, arch=arch)
            notes.append(f"vCPU 0's CR3 ({cr3:#x}) is the user half of a page-table isolation pair: "
                         "walked its kernel half")
            cr3 &= ~PTI_USER_PGD_BIT
            binder.space, binder.cr3 = space, cr3
        binder.notes.extend(notes)
    # Walk the kernel's own top-level table when the symbols name it: vCPU 0 may be running a process
    # whose page-global directory goes away with it (the kernel half of every PGD is copied from it).
    for name in ("init_top_pgt", "swapper_pg_dir"):
        link = _lookup(tables, name)
        if link is not None and tables[0].os == "linux":
            try:
                kernel_cr3 = binder.space.pt.translate((link + binder.slide) & U64).pa & ~(PAGE - 1)
            except (PageFault, NonCanonicalAddress):
                break
            if kernel_cr3 != cr3 & 0x000FFFFFFFFFF000:
                binder.notes.append(f"walking {name} ({kernel_cr3:#x}), not vCPU 0's CR3 ({cr3:#x})")
                cr3 = kernel_cr3
                binder.space = _Space(backend, cr3)
                binder.cr3 = cr3
            break
    binder.find_percpu_bases(_needs_percpu(plan))
    return _bind_all(binder, evidence)
