"""Finding the guest's kernel through the backend, before anything is bound: reading guest memory
(`PhysReader`, `GuestSpace`), checking the symbol files against the plan's, the KASLR slide of Linux
on x86_64 (LSTAR, cross-checked with the IDT) and arm64 (TTBR1's own table in the image), ntoskrnl's
image base on Windows (its PE header and CodeView record), and the failures (`BindFailure`, `BindError`).
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import PolicycError
from ..symbols import SymbolTable
from .backend import BackendError
from .guest_memory import FRAME_SHIFT, FRAME_SIZE, PhysicalAddressError
from .paging import PAGE_2M, NonCanonicalAddress, PageFault, PageTables
from .paging_arm64 import LINUX_TCR_48, TCR_EPD0, TTBR_BADDR_MASK, Stage1Tables

U64 = (1 << 64) - 1
PAGE = FRAME_SIZE

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


# --------------------------------------------------------------------------- physical reads

class PhysReader:
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


class GuestSpace:
    """One address space (a CR3) read through the backend."""

    def __init__(self, backend: Any, cr3: int) -> None:
        self.reader = PhysReader(backend)
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


# --------------------------------------------------------------------------- symbols

def _file_sha256(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def symbol_file_problems(plan: Mapping[str, Any], tables: Sequence[SymbolTable]) -> list[BindFailure]:
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


def lookup_symbol(tables: Sequence[SymbolTable], name: str) -> int | None:
    for t in tables:
        s = t.lookup(name)
        if s is not None and not s.percpu:
            return s.address
    return None


# --------------------------------------------------------------------------- slide discovery

# Linux's page-table isolation allocates each PGD as an 8 KiB pair: the kernel half, then the user
# half (CR3 bit 12 set) that maps only the entry text and the CPU entry area.
PTI_USER_PGD_BIT = 1 << 12


def slide_alignment(arch: str, os_name: str) -> int:
    return PAGE_2M if arch.startswith("x86_64") and os_name == "linux" else PAGE


def find_slide(backend: Any, tables: Sequence[SymbolTable], space: GuestSpace, regs0: Mapping[str, int], *,
               arch: str) -> tuple[int, dict[str, Any], list[str]]:
    """The slide from LSTAR, cross-checked with the IDT. Returns (slide, evidence, notes); raises
    BindError when the guest's own registers disagree or the slide is implausible."""
    os_name = tables[0].os if tables else "linux"
    align = slide_alignment(arch, os_name)
    evidence: dict[str, Any] = {}
    notes: list[str] = []
    lstar_slide = None
    lstar = regs0.get("msr_lstar")
    for name in _ENTRY.get(os_name, ()):
        link = lookup_symbol(tables, name)
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
                link = lookup_symbol(tables, name)
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
    idt_link = lookup_symbol(tables, "idt_table")
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


def _pe_image_at(space: GuestSpace, va: int) -> _PeImage | None:
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


def _scan_for_image(backend: Any, space: GuestSpace, address: int) -> _PeImage | None:
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


def _windows_image_base(backend: Any, tables: Sequence[SymbolTable], space: GuestSpace,
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


def _check_windows_build(tables: Sequence[SymbolTable], space: GuestSpace, slide: int, evidence: dict[str, Any],
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


class Arm64Space(GuestSpace):
    """The kernel half of an AArch64 guest (TTBR1 = `cr3`, the swapper_pg_dir frame) read through the
    backend; user addresses do not translate (TTBR0 walks disabled)."""

    def __init__(self, backend: Any, cr3: int) -> None:
        self.reader = PhysReader(backend)
        self.pt = Stage1Tables(self.reader, cr3 & TTBR_BADDR_MASK, 0, tcr=LINUX_TCR_48 | TCR_EPD0)  # type: ignore[assignment]


_BANNER_PREFIX = b"Linux version "
_BANNER_MAX = 512          # 6.1's banners are about 200 bytes; the read stops at the first NUL
_BANNER_SHOWN = 240


def check_linux_banner(tables: Sequence[SymbolTable], space: GuestSpace, slide: int, evidence: dict[str, Any],
                       notes: list[str]) -> None:
    """The guest kernel's own linux_banner, read at the slid symbol, must be the banner the symbols were
    made for (SymbolTable.banner); without a recorded one it must at least be a Linux banner. Symbols of
    another build point elsewhere or name another version: refused, as a wrong PDB is on Windows."""
    link = lookup_symbol(tables, "linux_banner")
    if link is None:
        notes.append("no linux_banner symbol: the guest kernel's build was not checked against the symbols")
        return
    want = next((t.banner for t in tables if t.banner is not None), None)
    source = next((t.source for t in tables if t.lookup("linux_banner") is not None), "the symbols")
    va = (link + slide) & U64
    first = min(_BANNER_MAX, PAGE - (va & (PAGE - 1)))     # the next page only if the text runs on into it
    try:
        raw = space.read_virtual(va, first)
        if b"\0" not in raw and first < _BANNER_MAX:
            raw += space.read_virtual((va + first) & U64, _BANNER_MAX - first)
    except _READ_ERRORS as exc:
        raise BindError(BindFailure(None, va, f"linux_banner does not translate at slide {slide:#x} ({exc}): "
                                    f"these symbols ({source}) are not this kernel's; refusing to bind")) from None
    got = raw.split(b"\0", 1)[0]
    shown = got[:_BANNER_SHOWN].decode("ascii", "replace").rstrip("\n")
    if want is not None and got != want.encode("ascii"):
        raise BindError(BindFailure(None, va, f"the guest kernel's linux_banner says {shown!r}, but {source} was made "
                                    f"for {want.rstrip(chr(10))!r}: these symbols are not this kernel's; refusing "
                                    "to bind (use the symbol file of the guest's own build)"))
    if not got.startswith(_BANNER_PREFIX):
        raise BindError(BindFailure(None, va, f"linux_banner holds {shown!r}, not a 'Linux version ...' banner: these "
                                    f"symbols ({source}) are not this kernel's; refusing to bind"))
    evidence["linux_banner"] = {"address": hex(va), "banner": got.decode("ascii", "replace").rstrip("\n"),
                                "compared": want is not None}
    if want is None:
        notes.append("the symbol file records no linux_banner text: only checked that the guest has a Linux "
                     "banner at the symbol")


def arm64_roots(regs: Sequence[Mapping[str, int]]) -> list[int]:
    """TTBR1 table addresses of the vCPUs, those running at EL1 first (a vCPU at EL0 may have the kpti
    trampoline table in TTBR1 instead of swapper_pg_dir)."""
    order = sorted(range(len(regs)), key=lambda i: ((regs[i].get("cpsr", 0) >> 2) & 3) == 0)
    out: list[int] = []
    for i in order:
        base = regs[i]["ttbr1"] & TTBR_BADDR_MASK
        if base not in out:
            out.append(base)
    return out


def check_arm64_regs(regs: Sequence[Mapping[str, int]]) -> None:
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


def arm64_slide_problem(slide: int) -> str | None:
    if slide % _ARM64_SLIDE_ALIGN:
        return f"{slide:#x} is not 64 KiB aligned"
    if slide >= 1 << 47:
        return f"{slide:#x} leaves the kernel half of the address space"
    return None


def _slides_mapping(space: Arm64Space, root: int, link: int) -> list[int]:
    """Every slide at which the image region maps the frame `root` where `link` (swapper_pg_dir) would
    be: candidate addresses are at or above the link address, 64 KiB apart from it."""
    found = []
    for m in space.pt.mappings(high_only=True, start=link):
        if m.pa <= root < m.pa + m.page_size:
            va = m.va + (root - m.pa)
            slide = (va - link) & U64
            if va >= link and arm64_slide_problem(slide) is None:
                found.append(slide)
    return found


def find_slide_arm64(backend: Any, tables: Sequence[SymbolTable], regs: Sequence[Mapping[str, int]]
                     ) -> tuple[int, int, dict[str, Any], list[str]]:
    """The KASLR slide of an arm64 Linux guest and the swapper_pg_dir frame to walk (see the section
    comment). Returns (slide, table, evidence, notes); raises BindError when the guest's own state
    disagrees with itself or gives nothing to go on."""
    evidence: dict[str, Any] = {}
    notes: list[str] = []
    swapper, vectors = lookup_symbol(tables, "swapper_pg_dir"), lookup_symbol(tables, "vectors")
    roots = arm64_roots(regs)
    found: dict[int, int] = {}                 # slide -> TTBR1 table that gave it
    if swapper is not None:
        for root in roots:
            for s in _slides_mapping(Arm64Space(backend, root), root, swapper):
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
            vbar_problem = arm64_slide_problem(vbar_slide)
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
    _check_arm64_image(backend, tables, Arm64Space(backend, root), slide, evidence, notes)
    return slide, root, evidence, notes


def _check_arm64_image(backend: Any, tables: Sequence[SymbolTable], space: Arm64Space, slide: int,
                       evidence: dict[str, Any], notes: list[str]) -> None:
    """_stext must translate at the slide; the Image header, if its frame still holds it, must agree."""
    text, stext, end = lookup_symbol(tables, "_text"), lookup_symbol(tables, "_stext"), lookup_symbol(tables, "_end")
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
