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
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..symbols import SymbolTable
from ..targets import access_name, runs_on
from .guest_kernel import (PTI_USER_PGD_BIT, Arm64Space, BindError, BindFailure, GuestSpace, arm64_roots,
                           arm64_slide_problem, check_arm64_regs, check_linux_banner, find_slide, find_slide_arm64,
                           lookup_symbol,
                           slide_alignment, symbol_file_problems)
from .guest_memory import FRAME_SHIFT, FRAME_SIZE, PhysicalAddressError
from .paging import NonCanonicalAddress, PageFault

__all__ = ["BindError", "BindFailure", "BoundPlan", "BoundBreakpoint", "BindDelta", "ViewBinding",
           "bind_plan", "intersect_access", "find_slide", "PT_WATCH_ACCESS"]

U64 = (1 << 64) - 1
PAGE = FRAME_SIZE
PT_WATCH_ACCESS = "rx"          # write-trap a page-table frame (EPT cannot say "r w-trap x-trap" any better)
_INSN_BYTES = 16                 # data.emul.insn.data

_ACCESS_BITS = {"n": "", "r": "r", "w": "w", "rw": "rw", "x": "x", "rx": "rx", "wx": "wx", "rwx": "rwx"}



# --------------------------------------------------------------------------- access sets

def intersect_access(a: str, b: str, *, x86: bool = True) -> str:
    """The accesses both allow, as a Xen mem_access name (W without R dropped on x86)."""
    return access_name(frozenset(_ACCESS_BITS[a]) & frozenset(_ACCESS_BITS[b]), x86=x86)


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


def _arm64_percpu_bases(binder: "_Binder", need: bool) -> list[int]:
    """Each vCPU's per-CPU area: slid __per_cpu_start plus its offset (TPIDR_EL1 when the backend gives
    it, else __per_cpu_offset[i])."""
    tables, regs = binder.tables, binder.regs
    start, table = lookup_symbol(tables, "__per_cpu_start"), lookup_symbol(tables, "__per_cpu_offset")
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
        failures = symbol_file_problems(plan, tables)
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
    check_arm64_regs(regs)
    evidence: dict[str, Any] = {}
    notes: list[str] = []
    if slide is not None:
        problem = arm64_slide_problem(slide)
        if problem:
            raise BindError(BindFailure(None, None, f"slide {problem}"))
        evidence["given"] = hex(slide)
        root = arm64_roots(regs)[0]
        swapper = lookup_symbol(tables, "swapper_pg_dir")
        if swapper is not None:
            for cand in arm64_roots(regs):
                t = Arm64Space(backend, cand).pt.try_translate((swapper + slide) & U64)
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
    check_linux_banner(tables, binder.space, slide, evidence, binder.notes)
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
        self.space = Arm64Space(backend, cr3) if arch == "arm64" else GuestSpace(backend, cr3)
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
        link = lookup_symbol(self.tables, "__per_cpu_offset")
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
        if slide % slide_alignment(arch, tables[0].os if tables else "linux"):
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
            space = GuestSpace(backend, cr3 & ~PTI_USER_PGD_BIT)
            binder.slide, evidence, notes = find_slide(backend, tables, space, regs0, arch=arch)
            notes.append(f"vCPU 0's CR3 ({cr3:#x}) is the user half of a page-table isolation pair: "
                         "walked its kernel half")
            cr3 &= ~PTI_USER_PGD_BIT
            binder.space, binder.cr3 = space, cr3
        binder.notes.extend(notes)
    # Walk the kernel's own top-level table when the symbols name it: vCPU 0 may be running a process
    # whose page-global directory goes away with it (the kernel half of every PGD is copied from it).
    for name in ("init_top_pgt", "swapper_pg_dir"):
        link = lookup_symbol(tables, name)
        if link is not None and tables[0].os == "linux":
            try:
                kernel_cr3 = binder.space.pt.translate((link + binder.slide) & U64).pa & ~(PAGE - 1)
            except (PageFault, NonCanonicalAddress):
                break
            if kernel_cr3 != cr3 & 0x000FFFFFFFFFF000:
                binder.notes.append(f"walking {name} ({kernel_cr3:#x}), not vCPU 0's CR3 ({cr3:#x})")
                cr3 = kernel_cr3
                binder.space = GuestSpace(backend, cr3)
                binder.cr3 = cr3
            break
    binder.find_percpu_bases(_needs_percpu(plan))
    return _bind_all(binder, evidence)
