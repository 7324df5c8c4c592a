"""Built-in guest layouts: memory and vCPUs as a booted kernel leaves them.

``linux-x86_64`` (SCENARIOS.md) builds, from a real System.map and a KASLR
slide, what Linux 6.1 on x86-64 has set up once it has booted:

* the kernel image at the slid addresses, physically at
  ``LOAD_PHYSICAL_ADDR + phys_slide`` (the physical slide defaults to the
  virtual one): text ``_stext.._etext`` read-execute, rodata
  ``__start_rodata..__end_rodata`` read-only, data ``_sdata..__init_begin``
  and bss ``__bss_start.._end`` read-write and non-executable; init memory
  is freed (unmapped), as after boot. 2 MiB pages where a whole aligned
  2 MiB lies inside a section, 4 KiB pages at the edges;
* the direct map of all RAM at ``page_offset_base`` (1 GiB pages for whole
  gigabytes, 2 MiB pages for the rest), read-write, non-executable;
* the CPU entry area's read-only IDT alias at 0xfffffe0000000000 mapping
  ``idt_table``'s frame, which every vCPU's IDTR points at;
* one per-CPU area per vCPU in the direct map (2 MiB apart, above the
  image); GS base = that area, GDTR = its ``gdt_page``; ``__per_cpu_offset``
  holds the areas;
* the page tables themselves with CR3 = the physical address of
  ``init_top_pgt`` (lower tables from the top quarter of RAM);
* kernel text filled with NOPs (0x90) so fetches execute; ``sys_call_table``
  filled with pointers into text, ``idt_table`` with interrupt gates,
  each GDT with Linux's descriptors, ``phys_base`` and ``page_offset_base``
  with their values;
* registers as booted: CR0 PE|MP|ET|NE|WP|AM|PG, CR4
  PSE|PAE|MCE|PGE|OSFXSR|OSXMMEXCPT|FSGSBASE|OSXSAVE|SMEP|SMAP, EFER
  SCE|LME|LMA|NXE, LSTAR = ``entry_SYSCALL_64``, STAR/CSTAR/SFMASK and the
  SYSENTER MSRs as Linux sets them, XCR0 = x87|SSE|AVX.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ...symbols import SymbolTable, load_symbol_table

from ..paging import PAGE_1G, PAGE_2M, PAGE_4K, PageTables
from .guest import CR0, CR4, EFER, MSR, Guest
from .layout_arm64 import build_linux_arm64
from .layout_pages import align_down, align_up, map_range, parse_size
from .layout_windows import build_windows_x86_64

__all__ = ["LAYOUTS", "build_guest", "build_linux_x86_64", "build_bare",
           "START_KERNEL_MAP", "LOAD_PHYSICAL_ADDR", "CPU_ENTRY_AREA_IDT", "DEFAULT_PAGE_OFFSET"]

START_KERNEL_MAP = 0xFFFFFFFF80000000
LOAD_PHYSICAL_ADDR = 0x1000000
CPU_ENTRY_AREA_IDT = 0xFFFFFE0000000000
DEFAULT_PAGE_OFFSET = 0xFFFF888000000000
VMEMMAP_BASE = 0xFFFFEA0000000000
PERCPU_STRIDE = PAGE_2M

KERNEL_CS, KERNEL_DS, USER_CS, USER32_CS = 0x10, 0x18, 0x33, 0x23
GDT_ENTRIES = 16

# Linux 6.1 syscall numbers of the handlers the trimmed map keeps.
_SYSCALLS = {"__x64_sys_mprotect": 10, "__x64_sys_execve": 59, "__x64_sys_kill": 62,
             "__x64_sys_ptrace": 101, "__x64_sys_setuid": 105, "__x64_sys_init_module": 175,
             "__x64_sys_getdents64": 217, "__x64_sys_process_vm_writev": 311,
             "__x64_sys_finit_module": 313, "__x64_sys_memfd_create": 319, "__x64_sys_bpf": 321}
NR_SYSCALLS = 451


def build_bare(memory: int | str = 64 << 20, vcpus: int = 1) -> Guest:
    """A guest with identity-mapped low memory (2 MiB pages, RWX) and paging on:
    enough for unit tests that don't need a kernel."""
    size = parse_size(memory)
    g = Guest(size, vcpus)
    pt = PageTables(g.memory)
    pt.map(0, 0, size, PAGE_2M if size % PAGE_2M == 0 else PAGE_4K, writable=True, executable=True)
    g.layout = "bare"
    g.direct_map_base = 0
    for v in g.vcpus:
        v.cr3 = pt.cr3
        v.cr0 = CR0.PE | CR0.MP | CR0.ET | CR0.NE | CR0.WP | CR0.AM | CR0.PG
        v.cr4 = CR4.PAE | CR4.PGE | CR4.OSFXSR | CR4.OSXMMEXCPT
        v.msrs[MSR["EFER"]] = EFER.SCE | EFER.LME | EFER.LMA | EFER.NXE
        v.xcr0 = 0x7
    return g


def build_linux_x86_64(symbols: str | Path, *, kaslr_slide: int = 0, memory: int | str = 256 << 20,
                       vcpus: int = 1, phys_slide: int | None = None,
                       page_offset_base: int = DEFAULT_PAGE_OFFSET) -> Guest:
    """The ``linux-x86_64`` layout (see the module docstring)."""
    size = parse_size(memory)
    if kaslr_slide % PAGE_2M:
        raise ValueError(f"kaslr_slide {kaslr_slide:#x} must be 2 MiB aligned (CONFIG_PHYSICAL_ALIGN)")
    phys_slide = kaslr_slide if phys_slide is None else phys_slide
    if phys_slide % PAGE_2M:
        raise ValueError(f"phys_slide {phys_slide:#x} must be 2 MiB aligned")
    image = _Image(load_symbol_table(symbols), kaslr_slide, phys_slide)
    image_pa_end = image.pa_of_link(image.link("_end"))
    percpu_pa0 = align_up(image_pa_end, PERCPU_STRIDE)
    frames = size >> 12
    alloc_lo = frames - min(max(frames // 4, 1), (64 << 20) >> 12)
    if percpu_pa0 + vcpus * PERCPU_STRIDE > alloc_lo << 12:
        raise ValueError(f"{size >> 20} MiB of memory is too small for the kernel image "
                         f"(ends at {image_pa_end:#x}) and {vcpus} per-CPU areas")

    table = image.table
    g = Guest(size, vcpus)
    g.symbols = image.slid
    g.percpu = {name: s.address for name, s in table.symbols.items() if s.percpu}
    g.kaslr_slide = kaslr_slide
    g.layout = "linux-x86_64"
    g.direct_map_base = page_offset_base
    g.holes = [(0xA0, 0xC0)]   # the VGA hole of an HVM guest

    # -- page tables: PML4 at init_top_pgt's frame
    pt = PageTables(g.memory, image.pa("init_top_pgt") if table.lookup("init_top_pgt") else None)
    _map_image(pt, image)
    _map_direct(pt, page_offset_base, size)
    idt_pa = None
    if table.lookup("idt_table"):                 # the CPU entry area's read-only IDT alias
        idt_pa = image.pa("idt_table")
        pt.map(CPU_ENTRY_AREA_IDT, align_down(idt_pa, PAGE_4K), PAGE_4K, PAGE_4K,
               writable=False, executable=False, global_=True)
    _fill_image(g, image, idt_pa, page_offset_base)
    _boot_vcpus(g, image, pt, percpu_pa0, page_offset_base)
    if "__per_cpu_offset" in image.slid:
        g.memory.write(image.pa("__per_cpu_offset"), struct.pack(f"<{vcpus}Q", *g.percpu_base))
    g.text_range = (image.va("_stext"), image.va("_etext"))     # type: ignore[attr-defined]
    g.page_tables = pt                             # type: ignore[attr-defined]
    return g


class _Image:
    """The kernel image's addresses: link-time (System.map), slid (virtual) and physical."""

    def __init__(self, table: SymbolTable, kaslr_slide: int, phys_slide: int) -> None:
        self.table = table
        self.kaslr_slide = kaslr_slide
        self.phys_slide = phys_slide
        self.slid = {name: s.address + kaslr_slide for name, s in table.symbols.items()
                     if not s.percpu and s.address >= START_KERNEL_MAP}

    def link(self, name: str) -> int:
        sym = self.table.lookup(name)
        if sym is None or sym.percpu:
            raise ValueError(f"the symbol map has no '{name}' (needed by the linux-x86_64 layout)")
        return sym.address

    def va(self, name: str) -> int:
        return self.link(name) + self.kaslr_slide

    def pa_of_link(self, address: int) -> int:
        return address - START_KERNEL_MAP + self.phys_slide

    def pa(self, name: str) -> int:
        return self.pa_of_link(self.link(name))


def _map_image(pt: PageTables, image: _Image) -> None:
    """Text read-execute, rodata read-only, data and bss read-write; init memory freed."""
    def section(start: str, end: str, *, writable: bool, executable: bool) -> None:
        s, e = align_down(image.va(start), PAGE_4K), align_up(image.va(end), PAGE_4K)
        if e > s:
            map_range(pt, s, image.pa_of_link(s - image.kaslr_slide), e - s, writable=writable,
                      executable=executable)

    section("_stext", "_etext", writable=False, executable=True)
    section("__start_rodata", "__end_rodata", writable=False, executable=False)
    data_end = "__init_begin" if image.table.lookup("__init_begin") else "_edata"
    section("_sdata", data_end, writable=True, executable=False)
    section("__bss_start", "_end", writable=True, executable=False)


def _map_direct(pt: PageTables, page_offset_base: int, size: int) -> None:
    """All RAM at page_offset_base: 1 GiB pages for whole gigabytes, 2 MiB, then 4 KiB for the rest."""
    cur = 0
    gib = align_down(size, PAGE_1G)
    if gib:
        pt.map(page_offset_base, 0, gib, PAGE_1G, writable=True, executable=False, global_=True)
        cur = gib
    if size - cur >= PAGE_2M:
        n = align_down(size - cur, PAGE_2M)
        pt.map(page_offset_base + cur, cur, n, PAGE_2M, writable=True, executable=False, global_=True)
        cur += n
    if size > cur:
        pt.map(page_offset_base + cur, cur, size - cur, PAGE_4K, writable=True, executable=False,
               global_=True)


def _fill_image(g: Guest, image: _Image, idt_pa: int | None, page_offset_base: int) -> None:
    """Text as NOPs, sys_call_table, the IDT's gates, and the variables the kernel set at boot."""
    mem, slid = g.memory, image.slid
    text_pa, text_end_pa = image.pa("_stext"), image.pa_of_link(align_up(image.link("_etext"), PAGE_4K))
    nop_frame = b"\x90" * PAGE_4K
    for pa in range(align_down(text_pa, PAGE_4K), text_end_pa, PAGE_4K):
        mem.write(pa, nop_frame)
    stext = image.va("_stext")
    if image.table.lookup("sys_call_table"):
        fallback = slid.get("x64_sys_call", stext)
        entries = [fallback] * NR_SYSCALLS
        for name, nr in _SYSCALLS.items():
            if name in slid:
                entries[nr] = slid[name]
        mem.write(image.pa("sys_call_table"), struct.pack(f"<{NR_SYSCALLS}Q", *entries))
    if idt_pa is not None:
        handlers = {3: "asm_exc_int3", 13: "asm_exc_general_protection", 14: "asm_exc_page_fault",
                    0x80: "asm_int80_emulation"}
        default = slid.get("asm_exc_general_protection", stext)
        gates = bytearray()
        for vec in range(256):
            h = slid.get(handlers.get(vec, ""), default)
            gates += struct.pack("<HHBBHII", h & 0xFFFF, KERNEL_CS, 0, 0x8E, (h >> 16) & 0xFFFF,
                                 h >> 32, 0)
        mem.write(idt_pa, bytes(gates))
    if "phys_base" in slid:
        mem.write_u64(image.pa("phys_base"), image.phys_slide)
    if "page_offset_base" in slid:
        mem.write_u64(image.pa("page_offset_base"), page_offset_base)
    if "vmemmap_base" in slid:
        mem.write_u64(image.pa("vmemmap_base"), VMEMMAP_BASE)


def _boot_vcpus(g: Guest, image: _Image, pt: PageTables, percpu_pa0: int, page_offset_base: int) -> None:
    """Each vCPU's per-CPU area and GDT, and its registers as Linux leaves them after boot."""
    gdt_off = g.percpu.get("gdt_page", 0xB000)
    gdt = struct.pack("<16Q", 0, 0x00CF9B000000FFFF, 0x00AF9B000000FFFF, 0x00CF93000000FFFF,
                      0x00CFFB000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF, 0,
                      0x00008B000000206F, 0, 0, 0, 0, 0, 0, 0)
    g.percpu_base = []
    for i, v in enumerate(g.vcpus):
        area_pa = percpu_pa0 + i * PERCPU_STRIDE
        area = page_offset_base + area_pa
        g.percpu_base.append(area)
        g.memory.write(area_pa + gdt_off, gdt)
        if "cpu_tss_rw" in g.percpu:
            g.memory.write_u64(area_pa + g.percpu["cpu_tss_rw"] + 4, area + PERCPU_STRIDE - 0x1000)  # sp0
        v.cr3 = pt.cr3
        v.cr0 = CR0.PE | CR0.MP | CR0.ET | CR0.NE | CR0.WP | CR0.AM | CR0.PG
        v.cr4 = (CR4.PSE | CR4.PAE | CR4.MCE | CR4.PGE | CR4.OSFXSR | CR4.OSXMMEXCPT | CR4.FSGSBASE
                 | CR4.OSXSAVE | CR4.SMEP | CR4.SMAP)
        v.xcr0 = 0x7
        v.msrs[MSR["EFER"]] = EFER.SCE | EFER.LME | EFER.LMA | EFER.NXE
        v.msrs[MSR["LSTAR"]] = image.va("entry_SYSCALL_64")
        v.msrs[MSR["STAR"]] = (USER32_CS - 3) << 48 | KERNEL_CS << 32
        v.msrs[MSR["CSTAR"]] = image.slid.get("entry_SYSCALL_compat", 0)
        v.msrs[MSR["SFMASK"]] = 0x47700
        v.msrs[MSR["SYSENTER_CS"]] = KERNEL_CS
        v.msrs[MSR["SYSENTER_EIP"]] = image.slid.get("entry_SYSENTER_compat", 0)
        v.msrs[MSR["SYSENTER_ESP"]] = CPU_ENTRY_AREA_IDT + 0x1000 + i * 0x3B000 + 0x2000
        v.msrs[MSR["GS_BASE"]] = area
        v.msrs[MSR["KERNEL_GS_BASE"]] = 0
        v.idtr_base, v.idtr_limit = CPU_ENTRY_AREA_IDT, 256 * 16 - 1
        v.gdtr_base, v.gdtr_limit = area + gdt_off, GDT_ENTRIES * 8 - 1
        v.sel.update(cs=KERNEL_CS, ss=KERNEL_DS, ds=0, es=0, fs=0, gs=0)
        v.tr = 8 * 8
        v.rip = image.slid.get("do_syscall_64", image.va("_stext"))
        v.gpr["rsp"] = area + PERCPU_STRIDE - 0x1100
        v.rflags = 0x246


LAYOUTS = {"linux-x86_64": build_linux_x86_64, "windows-x86_64": build_windows_x86_64,
           "linux-arm64": build_linux_arm64, "bare": build_bare}


def build_guest(layout: str, **kwargs) -> Guest:
    try:
        builder = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout '{layout}' (known: {', '.join(LAYOUTS)})") from None
    return builder(**kwargs)
