"""The ``windows-x86_64`` layout: a booted 64-bit Windows kernel, as introspection meets it.

Built from a Windows ISF (symbol addresses are RVAs) and an image base, it
leaves what matters to a policy about ntoskrnl where a booted Windows 11 puts
it:

* **the ntoskrnl image** at ``image_base`` (2 MiB aligned, in the kernel-image
  range 0xfffff800'00000000 .. 0xfffff880'00000000), physically at
  ``image_pa``, with a PE header a scanner can parse: "MZ", ``e_lfanew``,
  "PE\\0\\0", a PE32+ optional header (``SizeOfImage``, the relocated
  ``ImageBase``), a section table, and a debug directory whose
  IMAGE_DEBUG_TYPE_CODEVIEW entry points to an "RSDS" record with the PDB
  GUID, age and name the ISF's ``metadata.windows.pdb`` carries. That record
  is how Volatility, LibVMI and our binder (runtime/bind.py) recognise the
  build, so it comes from the symbol file, never from here.
* **sections** headers + ``.text`` read-execute, ``.rdata`` read-only, ``.data``
  read-write non-executable, 2 MiB pages where a whole aligned 2 MiB lies in
  one section (Windows maps ntoskrnl with large pages when it can), 4 KiB at
  the edges. The ISF has no section table, so the boundaries are this
  layout's: chosen so that every symbol of the shipped ISF (RVAs 0xC021A0 ..
  0xE018E0) is data, as in the real image. ``.text`` is filled with NOPs so
  fetches execute.
* **the symbols' contents**: KeServiceDescriptorTable (and the first entry of
  KeServiceDescriptorTableShadow) describe a KiServiceTable of 4-byte
  ``(offset << 4) | argc`` entries; PsLoadedModuleList heads a list holding
  ntoskrnl's own loader entry; PsActiveProcessHead and PsInitialSystemProcess
  lead to the System process (an _EPROCESS laid out with the ISF's own
  member offsets: PID 4, "System", the kernel's CR3); KiWaitNever and
  ObHeaderCookie hold boot-time random values; MmPfnDatabase points into the
  kernel's dynamic address space. KdDebuggerDataBlock is left zero (Windows
  keeps it encoded unless a debugger is attached).
* **per-processor memory outside the image**: Windows gives each processor its
  own GDT, IDT and TSS (the boot processor's from the loader, the others'
  from nonpaged pool). Each vCPU here has a block in nonpaged memory: its
  KPCR (GS base) with GdtBase, TssBase, Self and IdtBase filled in, a GDT, an
  IDT, a TSS and a kernel stack, mapped read-write and non-executable.
  IDTR and GDTR point at them; every IDT gate points into ``.text``.
* **registers as booted**: CR0 PE|MP|ET|NE|WP|AM|PG (0x80050033), CR4
  DE|PSE|PAE|MCE|PGE|OSFXSR|OSXMMEXCPT|UMIP|FSGSBASE|OSXSAVE|SMEP|SMAP, EFER
  SCE|LME|LMA|NXE, STAR/SFMASK as Windows sets them, LSTAR and CSTAR into
  ``.text``, GS base = the KPCR, XCR0 = x87|SSE|AVX.

Stand-ins (documented as such, not data about the build). The shipped ISF
has no KiSystemCall64[Shadow], KiSystemCall32, KiServiceTable, KiArgumentTable
nor any interrupt handler (tools/windows_isf_provenance.md), so their RVAs
below are this layout's own choices inside ``.text``; so are the number of
system services and the entry point. A binder must not need them: it finds
the image base from the PE header (runtime/bind.py).

Not modelled: the page-table self-map PML4 entry, the KVA-shadow user
address space, session space and win32k (KeServiceDescriptorTableShadow's
second descriptor stays zero, as before win32k.sys loads), a direct map of
physical memory (Windows has none; scenario writes go through the virtual
address).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from ...symbols import PdbIdentity, SymbolFileError, SymbolTable, load_symbol_table
from ..guest_memory import GuestMemory
from ..paging import PAGE_2M, PAGE_4K, PageTables
from .guest import CR0, CR4, EFER, MSR, Guest
from .layout_pages import align_up, map_range, parse_size

__all__ = ["build_windows_x86_64", "KERNEL_IMAGE_RANGE", "IMAGE_PA", "SECTIONS", "SIZE_OF_IMAGE",
           "LSTAR_RVA", "CSTAR_RVA", "IDT_STUB_RVA", "KI_SERVICE_TABLE_RVA", "NONPAGED_POOL_VA",
           "PROCESSOR_BLOCK_SIZE", "KPCR_OFFSET", "GDT_OFFSET", "IDT_OFFSET", "TSS_OFFSET", "GDT_LIMIT",
           "pdb_guid_bytes"]

# ntoskrnl goes into the kernel-image region (one PML4 slot) at a 2 MiB-aligned base.
KERNEL_IMAGE_RANGE = (0xFFFFF80000000000, 0xFFFFF88000000000)
IMAGE_PA = 0x200000

# name -> (first RVA, end RVA, writable, executable, characteristics). See the module docstring:
# the ISF has no section table, these boundaries are this layout's.
_SCN_CODE, _SCN_IDATA = 0x00000020, 0x00000040
_SCN_EXEC, _SCN_READ, _SCN_WRITE, _SCN_NOT_PAGED = 0x20000000, 0x40000000, 0x80000000, 0x08000000
SECTIONS = {
    ".text": (0x1000, 0x800000, False, True, _SCN_CODE | _SCN_EXEC | _SCN_READ | _SCN_NOT_PAGED),
    ".rdata": (0x800000, 0xC00000, False, False, _SCN_IDATA | _SCN_READ | _SCN_NOT_PAGED),
    ".data": (0xC00000, 0xF00000, True, False, _SCN_IDATA | _SCN_READ | _SCN_WRITE | _SCN_NOT_PAGED),
}
SIZE_OF_IMAGE = 0xF00000
HEADERS_SIZE = 0x1000

# Stand-ins inside .text for routines and tables the shipped ISF does not have (see the docstring).
LSTAR_RVA = 0x400100                # stand-in for KiSystemCall64Shadow (KVA shadowing on)
CSTAR_RVA = 0x400000                # stand-in for KiSystemCall32Shadow
IDT_STUB_RVA = 0x402000             # stand-in handlers: vector v at IDT_STUB_RVA + 0x40 * v
KI_SERVICE_TABLE_RVA = 0x410000     # stand-in for KiServiceTable
KI_ARGUMENT_TABLE_RVA = 0x411000    # stand-in for KiArgumentTable
NUMBER_OF_SERVICES = 0x1D0          # stand-in count (22621's exact number is not in the ISF)
ENTRY_POINT_RVA = 0x7F0000          # stand-in for KiSystemStartup

# PE and CodeView constants (the PE/COFF specification).
_E_LFANEW = 0x108
_MACHINE_AMD64 = 0x8664
_OPTIONAL_MAGIC_PE32_PLUS = 0x20B
_SUBSYSTEM_NATIVE = 1
_DEBUG_TYPE_CODEVIEW, _DEBUG_TYPE_REPRO = 2, 16
_DEBUG_DIR_RVA = SECTIONS[".rdata"][0] + 0x100
_CODEVIEW_RVA = _DEBUG_DIR_RVA + 0x40

# Nonpaged memory for everything that is not the image: per-processor blocks, the System process,
# loader entries. Windows randomizes its dynamic kernel address space; any canonical kernel
# address outside the image region would do.
NONPAGED_POOL_VA = 0xFFFFA08000000000
PROCESSOR_BLOCK_SIZE = 0x20000      # per vCPU; what lies past the stack stays unmapped (a guard)
KPCR_OFFSET = 0x0                   # KPCR + KPRCB: 16 pages, mostly zero
GDT_OFFSET = 0x10000
IDT_OFFSET = 0x11000
TSS_OFFSET = 0x12000
STACK_OFFSET = 0x13000              # 0x6000 bytes: KERNEL_STACK_SIZE on x64
_PROCESSOR_MAPPED = 0x19000
_POOL_MISC_SIZE = 0x4000            # after the processor blocks: System's EPROCESS, token, loader entry
MM_PFN_DATABASE = 0xFFFFE20000000000  # an address in the dynamic kernel space (randomized on real boots)

# x64 selectors (KGDT64_*): R0 code 0x10, R0 data 0x18, R3 compat code 0x20, R3 data 0x28,
# R3 code 0x30, TSS 0x40 (16 bytes), R3 compat TEB 0x50.
KGDT64_R0_CODE, KGDT64_R0_DATA, KGDT64_R3_CMCODE, KGDT64_R3_DATA = 0x10, 0x18, 0x20, 0x28
KGDT64_R3_CODE, KGDT64_SYS_TSS, KGDT64_R3_CMTEB = 0x30, 0x40, 0x50
GDT_LIMIT = 0x57
_TSS_LIMIT = 0x67

# The public x64 _KPCR layout (not in the ISF): NT_TIB-overlaid fields and IdtBase.
_KPCR_GDT_BASE, _KPCR_TSS_BASE, _KPCR_SELF, _KPCR_IDT_BASE = 0x0, 0x8, 0x18, 0x38


def pdb_guid_bytes(guid: str) -> bytes:
    """The 16 bytes of a GUID as a CodeView record stores it, from the symbol-server spelling
    (Data1 Data2 Data3 as little-endian integers, then Data4's 8 bytes as they are)."""
    return struct.pack("<IHH", int(guid[0:8], 16), int(guid[8:12], 16), int(guid[12:16], 16)) \
        + bytes.fromhex(guid[16:32])


def _pe_headers(image_base: int, pdb: PdbIdentity) -> tuple[bytes, bytes]:
    """(the header page, the debug directory + CodeView record placed at _DEBUG_DIR_RVA)."""
    name = (pdb.database or "ntkrnlmp.pdb").encode("ascii", "replace") + b"\0"
    rsds = b"RSDS" + pdb_guid_bytes(pdb.guid) + struct.pack("<I", pdb.age) + name
    # IMAGE_DEBUG_DIRECTORY: Characteristics, TimeDateStamp, Major, Minor, Type, SizeOfData,
    # AddressOfRawData, PointerToRawData (file offsets equal RVAs in this image's section table).
    # A reproducible build also has a REPRO entry.
    debug = struct.pack("<IIHHIIII", 0, 0, 0, 0, _DEBUG_TYPE_CODEVIEW, len(rsds), _CODEVIEW_RVA, _CODEVIEW_RVA) \
        + struct.pack("<IIHHIIII", 0, 0, 0, 0, _DEBUG_TYPE_REPRO, 0, 0, 0)
    assert _DEBUG_DIR_RVA + len(debug) <= _CODEVIEW_RVA
    blob = debug.ljust(_CODEVIEW_RVA - _DEBUG_DIR_RVA, b"\0") + rsds

    text, rdata, data = SECTIONS[".text"], SECTIONS[".rdata"], SECTIONS[".data"]
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<HHHHH", dos, 2, 0x90, 3, 0, 4, 0)      # the usual DOS header counters
    struct.pack_into("<I", dos, 0x3C, _E_LFANEW)
    coff = struct.pack("<HHIIIHH", _MACHINE_AMD64, len(SECTIONS), 0, 0, 0, 0xF0, 0x0022)
    data_dirs = [(0, 0)] * 16
    data_dirs[6] = (_DEBUG_DIR_RVA, len(debug))                 # IMAGE_DIRECTORY_ENTRY_DEBUG
    opt = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        _OPTIONAL_MAGIC_PE32_PLUS, 14, 0,                       # magic, linker version
        text[1] - text[0], (rdata[1] - rdata[0]) + (data[1] - data[0]), 0,
        ENTRY_POINT_RVA, text[0],
        image_base,                                             # the loader writes the base it relocated to
        0x1000, 0x200,                                          # section / file alignment
        10, 0, 10, 0, 10, 0,                                    # OS, image, subsystem versions
        0, SIZE_OF_IMAGE, HEADERS_SIZE, 0,                      # Win32VersionValue, sizes, CheckSum
        _SUBSYSTEM_NATIVE, 0x4160,                              # HIGH_ENTROPY_VA|DYNAMIC_BASE|NX_COMPAT|GUARD_CF
        0x80000, 0x2000, 0x100000, 0x1000,                      # stack/heap reserve and commit
        0, 16)                                                  # LoaderFlags, NumberOfRvaAndSizes
    opt += b"".join(struct.pack("<II", rva, size) for rva, size in data_dirs)
    assert len(opt) == 0xF0
    sections = b""
    for sname, (start, end, _w, _x, chars) in SECTIONS.items():
        sections += struct.pack("<8sIIIIIIHHI", sname.encode(), end - start, start, end - start, start,
                                0, 0, 0, 0, chars)
    page = bytearray(HEADERS_SIZE)
    page[:0x40] = dos
    at = _E_LFANEW
    for part in (b"PE\0\0", coff, opt, sections):
        page[at:at + len(part)] = part
        at += len(part)
    return bytes(page), blob


def _gdt(tss: int) -> bytes:
    """Windows' x64 GDT: the descriptors its selectors need (long-mode code has L=1; data and
    compat segments are flat), the TSS descriptor taking two slots."""
    entries = [0] * ((GDT_LIMIT + 1) // 8)
    entries[KGDT64_R0_CODE // 8] = 0x00209B0000000000
    entries[KGDT64_R0_DATA // 8] = 0x00CF93000000FFFF
    entries[KGDT64_R3_CMCODE // 8] = 0x00CFFB000000FFFF
    entries[KGDT64_R3_DATA // 8] = 0x00CFF3000000FFFF
    entries[KGDT64_R3_CODE // 8] = 0x0020FB0000000000
    entries[KGDT64_SYS_TSS // 8] = (_TSS_LIMIT | (tss & 0xFFFFFF) << 16 | 0x89 << 40
                                    | ((tss >> 24) & 0xFF) << 56)
    entries[KGDT64_SYS_TSS // 8 + 1] = tss >> 32
    entries[KGDT64_R3_CMTEB // 8] = 0x0040F30000003C00
    return struct.pack(f"<{len(entries)}Q", *entries)


def _idt(image_base: int) -> bytes:
    """256 interrupt gates into .text. NMI, #DF and #MC run on IST stacks; int3, int 0x29 (fast
    fail), 0x2C (assertion) and 0x2D (debug service) are callable from user mode (DPL 3)."""
    ist = {2: 3, 8: 1, 18: 2}
    user = {3, 0x29, 0x2C, 0x2D}
    out = bytearray()
    for vec in range(256):
        h = image_base + IDT_STUB_RVA + 0x40 * vec
        kind = 0xEE if vec in user else 0x8E
        out += struct.pack("<HHBBHII", h & 0xFFFF, KGDT64_R0_CODE, ist.get(vec, 0), kind,
                           (h >> 16) & 0xFFFF, h >> 32, 0)
    return bytes(out)


def _random64(image_base: int, what: str) -> int:
    """A boot-time random value, reproducible per layout (scenarios must be deterministic)."""
    return int.from_bytes(hashlib.sha256(f"{image_base:#x}/{what}".encode()).digest()[:8], "little")


def build_windows_x86_64(symbols: str | Path | SymbolTable, *, image_base: int, memory: int | str = 256 << 20,
                         vcpus: int = 1, image_pa: int = IMAGE_PA) -> Guest:
    """The ``windows-x86_64`` layout (see the module docstring). ``symbols``: a Windows ISF (path or
    loaded table) whose addresses are RVAs; ``image_base``: where ntoskrnl is loaded (the slide)."""
    try:
        table = symbols if isinstance(symbols, SymbolTable) else load_symbol_table(symbols)
    except SymbolFileError as exc:
        raise ValueError(str(exc)) from None
    _check_arguments(table, image_base, image_pa)
    size = parse_size(memory)
    if vcpus < 1:
        raise ValueError("a guest needs at least one vCPU")
    pool_pa = align_up(image_pa + SIZE_OF_IMAGE, PAGE_2M)
    pool_size = vcpus * PROCESSOR_BLOCK_SIZE + _POOL_MISC_SIZE
    frames = size >> 12
    alloc_lo = frames - min(max(frames // 4, 1), (64 << 20) >> 12)
    if pool_pa + pool_size > alloc_lo << 12:
        raise ValueError(f"{size >> 20} MiB of memory is too small for the kernel image "
                         f"({SIZE_OF_IMAGE >> 20} MiB at {image_pa:#x}) and {vcpus} processor blocks")

    g = Guest(size, vcpus)
    g.layout = "windows-x86_64"
    g.symbols = {name: image_base + s.address for name, s in table.symbols.items()}
    g.kaslr_slide = image_base
    g.direct_map_base = None
    g.holes = [(0xA0, 0xC0)]   # the VGA hole of an HVM guest
    image = _Image(table, image_base, image_pa)

    # -- page tables and the image's sections
    pt = PageTables(g.memory)
    map_range(pt, image_base, image_pa, SECTIONS[".text"][1], writable=False, executable=True)  # headers + .text
    for name in (".rdata", ".data"):
        start, end, writable, executable, _chars = SECTIONS[name]
        map_range(pt, image.va(start), image.pa(start), end - start, writable=writable, executable=executable)
    _fill_image(g.memory, image)
    misc_va, misc_pa = _map_pool(pt, vcpus, pool_pa)
    _write_system_process(g, image, misc_va, misc_pa, pt.cr3)
    _write_loaded_modules(g, image, misc_va, misc_pa)
    _boot_vcpus(g, image, pool_pa, pt.cr3)
    g.text_range = (image.va(SECTIONS[".text"][0]), image.va(SECTIONS[".text"][1]))   # type: ignore[attr-defined]
    g.image_base = image_base                                              # type: ignore[attr-defined]
    g.image_size = SIZE_OF_IMAGE                                           # type: ignore[attr-defined]
    g.pdb = table.pdb                                                      # type: ignore[attr-defined]
    g.page_tables = pt                                                     # type: ignore[attr-defined]
    return g


def _check_arguments(table: SymbolTable, image_base: int, image_pa: int) -> None:
    if table.os != "windows":
        raise ValueError(f"'{Path(table.source).name}' is not a Windows ISF (no metadata.windows): "
                         "the windows-x86_64 layout needs one")
    if table.pdb is None:
        raise ValueError(f"'{Path(table.source).name}' has no PDB GUID and age (metadata.windows.pdb): "
                         "the image's CodeView record needs them")
    lo, hi = KERNEL_IMAGE_RANGE
    if isinstance(image_base, bool) or not isinstance(image_base, int):
        raise ValueError("image_base must be a number")
    if not lo <= image_base <= hi - SIZE_OF_IMAGE - PAGE_2M:
        raise ValueError(f"image_base {image_base:#x} is not in the kernel image range {lo:#x}..{hi:#x}")
    if image_base % PAGE_2M:
        raise ValueError(f"image_base {image_base:#x} must be 2 MiB aligned (ntoskrnl is mapped with large pages)")
    if image_pa % PAGE_2M:
        raise ValueError(f"image_pa {image_pa:#x} must be 2 MiB aligned")
    outside = sorted(n for n, s in table.symbols.items() if not 0 <= s.address < SIZE_OF_IMAGE)
    if outside:
        raise ValueError(f"symbols outside the {SIZE_OF_IMAGE:#x}-byte image this layout builds: "
                         f"{', '.join(outside[:5])} (are the addresses RVAs?)")


class _Image:
    """ntoskrnl's addresses: RVAs (the ISF's), virtual at image_base, physical at image_pa."""

    def __init__(self, table: SymbolTable, image_base: int, image_pa: int) -> None:
        self.table, self.image_base, self.image_pa = table, image_base, image_pa

    def va(self, rva: int) -> int:
        return self.image_base + rva

    def pa(self, rva: int) -> int:
        return self.image_pa + rva

    def sym_pa(self, name: str) -> int | None:
        s = self.table.lookup(name)
        return self.pa(s.address) if s is not None else None


def _fill_image(mem: GuestMemory, image: _Image) -> None:
    """PE headers, text as NOPs, the service tables, and the variables set at boot."""
    table, image_base, va, pa, sym_pa = image.table, image.image_base, image.va, image.pa, image.sym_pa
    header, debug = _pe_headers(image_base, table.pdb)
    mem.write(pa(0), header)
    mem.write(pa(_DEBUG_DIR_RVA), debug)
    nops = b"\x90" * PAGE_4K
    for rva in range(SECTIONS[".text"][0], SECTIONS[".text"][1], PAGE_4K):
        mem.write(pa(rva), nops)
    # KiServiceTable: (offset from the table << 4) | stack-argument count; handlers are stand-in stubs.
    entries = [((0x20000 + 0x40 * i) << 4) | (i % 5) for i in range(NUMBER_OF_SERVICES)]
    mem.write(pa(KI_SERVICE_TABLE_RVA), struct.pack(f"<{NUMBER_OF_SERVICES}I", *entries))
    mem.write(pa(KI_ARGUMENT_TABLE_RVA), bytes(4 * (i % 5) for i in range(NUMBER_OF_SERVICES)))
    descriptor = struct.pack("<QQIIQ", va(KI_SERVICE_TABLE_RVA), 0, NUMBER_OF_SERVICES, 0,
                             va(KI_ARGUMENT_TABLE_RVA))
    for name in ("KeServiceDescriptorTable", "KeServiceDescriptorTableShadow"):
        where = sym_pa(name)
        if where is not None:
            mem.write(where, descriptor)     # the shadow's second descriptor waits for win32k.sys
    for name in ("KiWaitNever",):
        where = sym_pa(name)
        if where is not None:
            mem.write_u64(where, _random64(image_base, name))
    where = sym_pa("ObHeaderCookie")
    if where is not None:
        mem.write(where, bytes([_random64(image_base, "ObHeaderCookie") & 0xFF]))
    where = sym_pa("MmPfnDatabase")
    if where is not None:
        mem.write_u64(where, MM_PFN_DATABASE)


def _map_pool(pt: PageTables, vcpus: int, pool_pa: int) -> tuple[int, int]:
    """Nonpaged memory: the processor blocks, then the rest (System process, loader entries); returns
    where the rest starts (virtual, physical)."""
    pool_va = NONPAGED_POOL_VA
    for i in range(vcpus):
        off = i * PROCESSOR_BLOCK_SIZE
        pt.map(pool_va + off, pool_pa + off, _PROCESSOR_MAPPED, PAGE_4K, writable=True, executable=False,
               global_=True)
    misc_off = vcpus * PROCESSOR_BLOCK_SIZE
    pt.map(pool_va + misc_off, pool_pa + misc_off, _POOL_MISC_SIZE, PAGE_4K, writable=True,
           executable=False, global_=True)
    return pool_va + misc_off, pool_pa + misc_off


def _write_system_process(g: Guest, image: _Image, misc_va: int, misc_pa: int, cr3: int) -> None:
    """The System process: an _EPROCESS with the ISF's own member offsets (what Volatility walks)."""
    mem, table, sym_pa = g.memory, image.table, image.sym_pa
    eprocess_va = misc_va
    system_pa = misc_pa
    try:
        links = table.offsetof("_EPROCESS", ["ActiveProcessLinks"])
        pid = table.offsetof("_EPROCESS", ["UniqueProcessId"])
        image_name = table.offsetof("_EPROCESS", ["ImageFileName"])
        token = table.offsetof("_EPROCESS", ["Token"])
        dtb = table.offsetof("_KPROCESS", ["DirectoryTableBase"])
    except KeyError:
        links = None
    head_pa = sym_pa("PsActiveProcessHead")
    if links is not None and head_pa is not None:
        head_va = g.symbols["PsActiveProcessHead"]
        mem.write_u64(system_pa + pid, 4)
        mem.write(system_pa + image_name, b"System\0")
        token_va = misc_va + 0x1000
        mem.write_u64(system_pa + token, token_va | 0xF)          # _EX_FAST_REF: 4 reference-count bits
        mem.write_u64(system_pa + dtb, cr3)
        mem.write(system_pa + links, struct.pack("<QQ", head_va, head_va))
        mem.write(head_pa, struct.pack("<QQ", eprocess_va + links, eprocess_va + links))
        where = sym_pa("PsInitialSystemProcess")
        if where is not None:
            mem.write_u64(where, eprocess_va)


def _write_loaded_modules(g: Guest, image: _Image, misc_va: int, misc_pa: int) -> None:
    """PsLoadedModuleList and ntoskrnl's loader entry."""
    mem, image_base, va, sym_pa = g.memory, image.image_base, image.va, image.sym_pa
    # PsLoadedModuleList heads the loader entries; ntoskrnl's own is the first. The entry follows
    # the public x64 _KLDR_DATA_TABLE_ENTRY layout (not in the ISF): InLoadOrderLinks 0x0, DllBase
    # 0x30, EntryPoint 0x38, SizeOfImage 0x40, FullDllName 0x48, BaseDllName 0x58.
    head_pa = sym_pa("PsLoadedModuleList")
    if head_pa is not None:
        head_va = g.symbols["PsLoadedModuleList"]
        entry_va, entry_pa = misc_va + 0x2000, misc_pa + 0x2000
        full = "\\SystemRoot\\system32\\ntoskrnl.exe".encode("utf-16-le")
        base_name = "ntoskrnl.exe".encode("utf-16-le")
        mem.write(entry_pa, struct.pack("<QQ", head_va, head_va))
        mem.write(entry_pa + 0x30, struct.pack("<QQI", image_base, va(ENTRY_POINT_RVA), SIZE_OF_IMAGE))
        mem.write(entry_pa + 0x48, struct.pack("<HHIQ", len(full), len(full) + 2, 0, entry_va + 0x100))
        mem.write(entry_pa + 0x58, struct.pack("<HHIQ", len(base_name), len(base_name) + 2, 0,
                                              entry_va + 0x100 + len(full) - len(base_name)))
        mem.write(entry_pa + 0x100, full + b"\0\0")
        mem.write(head_pa, struct.pack("<QQ", entry_va, entry_va))



def _boot_vcpus(g: Guest, image: _Image, pool_pa: int, cr3: int) -> None:
    """Per vCPU: KPCR, GDT, IDT, TSS and stack in its processor block; registers as Windows has them."""
    mem, image_base, va = g.memory, image.image_base, image.va
    pool_va = NONPAGED_POOL_VA
    idt = _idt(image_base)
    g.percpu_base = []
    for i, v in enumerate(g.vcpus):
        block_va, block_pa = pool_va + i * PROCESSOR_BLOCK_SIZE, pool_pa + i * PROCESSOR_BLOCK_SIZE
        kpcr, gdt, idt_va, tss = (block_va + KPCR_OFFSET, block_va + GDT_OFFSET, block_va + IDT_OFFSET,
                                  block_va + TSS_OFFSET)
        stack_top = block_va + STACK_OFFSET + 0x6000
        mem.write(block_pa + GDT_OFFSET, _gdt(tss))
        mem.write(block_pa + IDT_OFFSET, idt)
        # TSS: RSP0, then IST1..IST3 (the #DF, #MC and NMI stacks share the stack's bottom here).
        mem.write_u64(block_pa + TSS_OFFSET + 4, stack_top)
        for n in (1, 2, 3):
            mem.write_u64(block_pa + TSS_OFFSET + 0x24 + 8 * (n - 1), stack_top - 0x1000 * n)
        for off, value in ((_KPCR_GDT_BASE, gdt), (_KPCR_TSS_BASE, tss), (_KPCR_SELF, kpcr),
                           (_KPCR_IDT_BASE, idt_va)):
            mem.write_u64(block_pa + KPCR_OFFSET + off, value)
        g.percpu_base.append(kpcr)
        v.cr3 = cr3
        v.cr0 = CR0.PE | CR0.MP | CR0.ET | CR0.NE | CR0.WP | CR0.AM | CR0.PG
        v.cr4 = (CR4.PSE | CR4.PAE | CR4.MCE | CR4.PGE | CR4.OSFXSR | CR4.OSXMMEXCPT | CR4.UMIP | CR4.FSGSBASE
                 | CR4.OSXSAVE | CR4.SMEP | CR4.SMAP | 1 << 3)   # bit 3: DE
        v.xcr0 = 0x7
        v.msrs[MSR["EFER"]] = EFER.SCE | EFER.LME | EFER.LMA | EFER.NXE
        v.msrs[MSR["LSTAR"]] = va(LSTAR_RVA)
        v.msrs[MSR["CSTAR"]] = va(CSTAR_RVA)
        # SYSCALL loads CS 0x10 / SS 0x18; SYSRET 64-bit CS 0x33, SS 0x2B (from base 0x23).
        v.msrs[MSR["STAR"]] = (KGDT64_R3_CMCODE | 3) << 48 | KGDT64_R0_CODE << 32
        v.msrs[MSR["SFMASK"]] = 0x4700            # TF, IF, DF, NT cleared on entry
        v.msrs[MSR["SYSENTER_CS"]] = v.msrs[MSR["SYSENTER_EIP"]] = v.msrs[MSR["SYSENTER_ESP"]] = 0
        v.msrs[MSR["GS_BASE"]] = kpcr
        v.msrs[MSR["KERNEL_GS_BASE"]] = 0
        v.idtr_base, v.idtr_limit = idt_va, 256 * 16 - 1
        v.gdtr_base, v.gdtr_limit = gdt, GDT_LIMIT
        v.sel.update(cs=KGDT64_R0_CODE, ss=KGDT64_R0_DATA, ds=KGDT64_R3_DATA | 3, es=KGDT64_R3_DATA | 3,
                     fs=KGDT64_R3_CMTEB | 3, gs=KGDT64_R3_DATA | 3)
        v.tr = KGDT64_SYS_TSS
        v.rip = va(LSTAR_RVA) + 0x80
        v.gpr["rsp"] = stack_top - 0x100
        v.rflags = 0x246
