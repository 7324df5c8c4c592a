"""The ``linux-arm64`` guest layout: Linux 6.1 on AArch64 as it stands once booted under Xen.

`build_linux_arm64(symbols, kaslr_slide=..., memory=..., vcpus=...)` builds,
from a real System.map (`examples/policies/linux-6.1-arm64.System.map`, Debian
12's 6.1.0-56-arm64) and a KASLR slide, what the kernel has set up after
boot, with 4 KiB pages and 48-bit virtual addresses:

* guest RAM at Xen's GUEST_RAM0_BASE (0x40000000). Xen's toolstack loads an
  arm64 Image at the start of RAM plus the header's text_offset
  (tools/libs/guest/xg_dom_armzimageloader.c, xc_dom_parse_zimage64_kernel),
  and text_offset is 0 in 6.1: ``_text`` is at physical 0x40000000 and the
  image is physically contiguous from there. KASLR moves the image only
  virtually (the physical placement is the loader's);
* the kernel image mapped through TTBR1 as 6.1's ``map_kernel`` leaves it:
  ``[_stext, _etext)`` read-only and executable at EL1, ``[__start_rodata,
  __init_begin)`` (rodata, then idmap_pg_dir .. swapper_pg_dir) read-only and
  execute-never, ``[_sdata, _end)`` (data and bss; ``_sdata`` is where 6.1's
  ``_data`` is) read-write and execute-never; init memory unmapped, as
  after ``free_initmem``. The 64 KiB head ``[_text, _stext)`` is not in the
  permanent mapping either (6.1 maps from ``_stext`` and reserves memory
  from ``_stext`` only), but its frames still hold the Image header: magic
  "ARM\\x64" at 0x38, text_offset 0, image_size ``_end - _text``, flags 0xa
  (little-endian, 4 KiB pages, placed anywhere). 2 MiB blocks wherever a
  whole aligned 2 MiB of a segment allows, 4 KiB pages elsewhere;
* the linear map of all RAM at PAGE_OFFSET = 0xffff000000000000 (physical
  RAM start at its bottom), read-write and execute-never, with 4 KiB pages
  only (``rodata=full``, the Kconfig default, forbids blocks there so that
  permissions can change per page); the alias of ``[_stext, __init_begin)``
  is read-only (``mark_linear_text_alias_ro``). Its table descriptors carry
  PXNTable and UXNTable, the image's UXNTable (6.1's NO_EXEC_MAPPINGS and
  PMD_TABLE_UXN);
* TTBR1_EL1 = the physical address of ``swapper_pg_dir`` (its level 0
  table) with vCPU i's ASID (i + 1) in bits 63:48 (TCR_EL1.A1 = 1); lower
  tables from the top of RAM, as memblock allocates them;
* per vCPU an EL0 process (TTBR0_EL1): one code page, read-only and
  executable at EL0, and one stack page, read-write at EL0, both non-global,
  under table descriptors with PXNTable;
* contents: kernel text filled with NOP (0xd503201f); ``sys_call_table``
  with pointers to ``_stext`` except the handlers the map keeps, at their
  generic syscall numbers; ``modprobe_path`` "/sbin/modprobe" and
  ``core_pattern`` "core" (the defaults); ``linux_banner`` the banner the
  symbol file records (empty when it records none); per-CPU areas in the linear map,
  2 MiB apart above the image, ``__per_cpu_offset[i]`` = area - slid
  ``__per_cpu_start``;
* registers: PC at ``invoke_syscall`` (each vCPU is serving a system call:
  ELR_EL1 and SPSR_EL1 hold the EL0 return state), PSTATE EL1h with PAN,
  VBAR_EL1 = slid ``vectors``, TPIDR_EL1 = the vCPU's per-CPU offset,
  TCR_EL1 as `paging_arm64.LINUX_TCR_48`, SCTLR_EL1 with the MMU on.

Not modelled: kpti (with KASLR, 6.1 makes kernel mappings non-global and
swaps TTBR1 to the trampoline table while EL0 runs); the linear map's
KASLR offset (memstart randomisation); the Contiguous hint; module and
vmalloc space; the kernel's own data beyond the tables named above.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ...symbols import SymbolFileError, SymbolTable, load_symbol_table
from ..guest_memory import FRAME_SHIFT
from ..paging_arm64 import (BLOCK_2M, DESC_DBM, LINUX_TCR_48, PAGE_4K, SCTLR_M, TABLE_PXN, TABLE_UXN,
                            Stage1Tables)
from .guest_arm64 import CPSR_EL1H, GUEST_RAM0_BASE, Arm64Guest
from .layout_pages import align_down, align_up, page_runs, parse_size

__all__ = ["build_linux_arm64", "PAGE_OFFSET", "KIMAGE_REGION", "ARM64_NOP", "IMAGE_MAGIC", "SLIDE_ALIGN",
           "image_header", "SYSCALL_NUMBERS", "NR_SYSCALLS"]

PAGE_OFFSET = 0xFFFF_0000_0000_0000      # 48-bit VAs: the linear map is the lower half of TTBR1's range
KIMAGE_REGION = 0xFFFF_8000_0000_0000    # the upper half: modules, the kernel image, vmalloc
MEMSTART_ALIGN = 1 << 30                 # ARM64_MEMSTART_ALIGN with 4 KiB pages and 48-bit VAs
SLIDE_ALIGN = 0x10000                    # the image's segments are 64 KiB aligned; KASLR keeps that
ARM64_NOP = 0xD503201F
IMAGE_MAGIC = b"ARM\x64"
_EFI_NOP = 0xFA405A4D                    # "ccmp x18, #0, #0xd, pl": reads as "MZ" for PE/COFF loaders
_IMAGE_FLAGS = 0b1010                    # bit 0 little-endian, bits 2:1 = 1 (4 KiB pages), bit 3 placed anywhere
PERCPU_STRIDE = BLOCK_2M
USER_CODE = 0x0000_AAAA_AAAA_0000
USER_STACK = 0x0000_FFFF_FFFF_0000
_SCTLR_KERNEL = SCTLR_M | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 12   # M, C, SA, SA0, I

# asm-generic/unistd.h numbers of the handlers the trimmed map keeps (arm64 uses the generic table).
SYSCALL_NUMBERS = {"__arm64_sys_init_module": 105, "__arm64_sys_ptrace": 117, "__arm64_sys_kill": 129,
                   "__arm64_sys_execve": 221, "__arm64_sys_finit_module": 273, "__arm64_sys_bpf": 280}
NR_SYSCALLS = 451


def image_header(image_size: int) -> bytes:
    """The 64-byte arm64 Image header of Documentation/arm64/booting.rst as 6.1 emits it. code1, the
    branch to ``primary_entry``, is left 0: that symbol's address is not in the trimmed map."""
    return struct.pack("<IIQQQQQQ4sI", _EFI_NOP, 0, 0, image_size, _IMAGE_FLAGS, 0, 0, 0, IMAGE_MAGIC, 0x40) + b"PE\0\0"


def _map_segment(pt: Stage1Tables, va: int, pa: int, size: int, *, writable: bool, executable: bool,
                 blocks: bool, table_flags: int) -> None:
    """Map one segment with 2 MiB blocks where VA, PA and the segment allow, 4 KiB pages elsewhere."""
    extra = DESC_DBM if writable else 0     # Linux's PTE_WRITE is the DBM bit
    for v, p, n, page_size in page_runs(va, pa, size, large=blocks):
        pt.map(v, p, n, page_size, writable=writable, executable=executable, extra=extra, table_flags=table_flags)


def build_linux_arm64(symbols: str | Path, *, kaslr_slide: int = 0, memory: int | str = 256 << 20,
                      vcpus: int = 1, ram_base: int = GUEST_RAM0_BASE) -> Arm64Guest:
    """The ``linux-arm64`` layout (see the module docstring). ValueError for anything it cannot build."""
    try:
        table = load_symbol_table(symbols)
    except SymbolFileError as exc:
        raise ValueError(str(exc)) from None
    size = parse_size(memory)
    _check_arguments(kaslr_slide, vcpus, size, ram_base)
    image = _Image(table, kaslr_slide, ram_base)
    percpu_pa0 = align_up(image.pa_of_link(image.end_link), PERCPU_STRIDE)
    frames = (ram_base + size) >> FRAME_SHIFT
    alloc_lo = frames - min(max(size // 4 >> FRAME_SHIFT, 1), (64 << 20) >> FRAME_SHIFT)
    if percpu_pa0 + vcpus * PERCPU_STRIDE > alloc_lo << FRAME_SHIFT:
        raise ValueError(f"{size >> 20} MiB of memory is too small for the kernel image "
                         f"({image.size >> 20} MiB), {vcpus} per-CPU areas and the page tables")

    g = Arm64Guest(size, vcpus, ram_base=ram_base)
    g.layout = "linux-arm64"
    g.symbols = {name: s.address + kaslr_slide for name, s in table.symbols.items() if not s.percpu}
    g.percpu = {name: s.address for name, s in table.symbols.items() if s.percpu}
    g.kaslr_slide = kaslr_slide
    g.direct_map_base = PAGE_OFFSET - align_down(ram_base, MEMSTART_ALIGN)
    g.kimage_voffset = image.va("_text") - ram_base            # type: ignore[attr-defined]

    # TTBR1: swapper_pg_dir is the level 0 table
    swapper_pa = image.pa("swapper_pg_dir")
    pt = Stage1Tables(g.memory, swapper_pa, 0, tcr=LINUX_TCR_48, sctlr=_SCTLR_KERNEL)
    _map_kernel(pt, image, g.direct_map_base, ram_base, size)
    _fill_kernel(g, image)
    # per-CPU areas
    pcpu_start = image.va("__per_cpu_start") if table.lookup("__per_cpu_start") else None
    g.percpu_base = [g.direct_map_base + percpu_pa0 + i * PERCPU_STRIDE for i in range(vcpus)]
    offsets = [(base - pcpu_start) & ((1 << 64) - 1) if pcpu_start is not None else 0 for base in g.percpu_base]
    if table.lookup("__per_cpu_offset"):
        g.memory.write(image.pa("__per_cpu_offset"), struct.pack(f"<{vcpus}Q", *offsets))
    _boot_vcpus(g, image, swapper_pa, offsets)
    g.text_range = (image.va("_stext"), image.va("_etext"))      # type: ignore[attr-defined]
    g.page_tables = g.vcpus[0].tables(g.memory)       # type: ignore[attr-defined, union-attr]
    return g


def _check_arguments(kaslr_slide: int, vcpus: int, size: int, ram_base: int) -> None:
    if isinstance(kaslr_slide, bool) or not isinstance(kaslr_slide, int) or kaslr_slide < 0:
        raise ValueError(f"kaslr_slide must be a non-negative number, got {kaslr_slide!r}")
    if kaslr_slide % SLIDE_ALIGN:
        raise ValueError(f"kaslr_slide {kaslr_slide:#x} must be 64 KiB aligned (the image's segment alignment)")
    if not isinstance(vcpus, int) or not 1 <= vcpus <= 64:
        raise ValueError(f"vcpus must be 1..64, got {vcpus!r}")
    if size <= 0 or size % PAGE_4K:
        raise ValueError("memory must be a positive multiple of 4 KiB")
    if ram_base % BLOCK_2M:
        raise ValueError(f"ram_base {ram_base:#x} must be 2 MiB aligned")


class _Image:
    """The kernel image's addresses: link-time (System.map), slid (virtual) and physical (at ram_base)."""

    def __init__(self, table: SymbolTable, kaslr_slide: int, ram_base: int) -> None:
        self.table = table
        self.kaslr_slide = kaslr_slide
        self.ram_base = ram_base
        self.text_link = self.link("_text")
        if self.text_link < KIMAGE_REGION:
            raise ValueError(f"_text is {self.text_link:#x}: not an arm64 kernel with 48-bit VAs (its image lives "
                             f"above {KIMAGE_REGION:#x})")
        self.end_link = self.link("_end")
        if self.end_link + kaslr_slide >= 1 << 64:
            raise ValueError(f"kaslr_slide {kaslr_slide:#x} moves the image past the top of the address space")
        self.size = self.end_link - self.text_link

    def link(self, name: str) -> int:
        sym = self.table.lookup(name)
        if sym is None or sym.percpu:
            raise ValueError(f"the symbol map has no '{name}', which the linux-arm64 layout needs (is it an arm64 "
                             "System.map?)")
        return sym.address

    def va(self, name: str) -> int:
        return self.link(name) + self.kaslr_slide

    def pa_of_link(self, address: int) -> int:
        return address - self.text_link + self.ram_base

    def pa(self, name: str) -> int:
        return self.pa_of_link(self.link(name))


def _map_kernel(pt: Stage1Tables, image: _Image, direct_map_base: int, ram_base: int, size: int) -> None:
    """The image's segments in TTBR1's range, and the linear map: RAM read-write, the kernel's text and
    rodata alias read-only, in 4 KiB pages."""
    def segment(start: str, end: str, *, writable: bool, executable: bool) -> None:
        s, e = align_down(image.va(start), PAGE_4K), align_up(image.va(end), PAGE_4K)
        if e > s:
            _map_segment(pt, s, image.pa_of_link(s - image.kaslr_slide), e - s, writable=writable,
                         executable=executable, blocks=True, table_flags=TABLE_UXN)

    segment("_stext", "_etext", writable=False, executable=True)
    segment("__start_rodata", "__init_begin", writable=False, executable=False)
    segment("_sdata", "_end", writable=True, executable=False)

    def linear(pa: int, n: int, *, writable: bool) -> None:
        if n > 0:
            _map_segment(pt, direct_map_base + pa, pa, n, writable=writable, executable=False, blocks=False,
                         table_flags=TABLE_PXN | TABLE_UXN)

    ro_lo, ro_hi = image.pa("_stext"), image.pa_of_link(align_up(image.link("__init_begin"), PAGE_4K))
    linear(ram_base, ro_lo - ram_base, writable=True)
    linear(ro_lo, ro_hi - ro_lo, writable=False)
    linear(ro_hi, ram_base + size - ro_hi, writable=True)


_NOPS = struct.pack("<I", ARM64_NOP) * (PAGE_4K // 4)


def _fill_kernel(g: Arm64Guest, image: _Image) -> None:
    """The Image header, text as NOPs, sys_call_table, and the strings an attacker overwrites."""
    mem, table = g.memory, image.table
    mem.write(image.pa_of_link(image.text_link), image_header(image.size))
    text_lo, text_hi = image.pa("_stext"), image.pa_of_link(align_up(image.link("_etext"), PAGE_4K))
    for pa in range(text_lo, text_hi, PAGE_4K):
        mem.write(pa, _NOPS)
    stext = image.va("_stext")
    if table.lookup("sys_call_table"):
        entries = [stext] * NR_SYSCALLS
        for name, nr in SYSCALL_NUMBERS.items():
            if name in g.symbols:
                entries[nr] = g.symbols[name]
        mem.write(image.pa("sys_call_table"), struct.pack(f"<{NR_SYSCALLS}Q", *entries))
    for name, text in (("modprobe_path", b"/sbin/modprobe\0"), ("core_pattern", b"core\0"),
                       ("linux_banner", (table.banner or "").encode("ascii") + b"\0")):
        if table.lookup(name):
            mem.write(image.pa(name), text)


def _boot_vcpus(g: Arm64Guest, image: _Image, swapper_pa: int, offsets: list[int]) -> None:
    """Each vCPU in the kernel on behalf of a process of its own (a user page table with code and a
    stack), with the registers Linux has then."""
    mem = g.memory
    pc = g.symbols.get("invoke_syscall", image.va("_stext"))
    for i, v in enumerate(g.vcpus):
        user = Stage1Tables(mem, swapper_pa, None, tcr=LINUX_TCR_48, sctlr=_SCTLR_KERNEL)
        code, stack = mem.alloc_frame() << FRAME_SHIFT, mem.alloc_frame() << FRAME_SHIFT
        mem.write(code, _NOPS)
        user.map(USER_CODE, code, PAGE_4K, writable=False, executable=False, user=True, global_=False,
                 user_executable=True, table_flags=TABLE_PXN)
        user.map(USER_STACK, stack, PAGE_4K, writable=True, executable=False, user=True, global_=False,
                 extra=DESC_DBM, table_flags=TABLE_PXN)
        v.ttbr0 = user.ttbr0
        v.ttbr1 = swapper_pa | (i + 1) << 48
        v.tcr = LINUX_TCR_48
        v.sctlr = _SCTLR_KERNEL
        v.cpsr = CPSR_EL1H
        v.rip = pc
        v.vbar = image.va("vectors")
        v.tpidr_el1 = offsets[i]
        v.sp_el1 = g.percpu_base[i] + PERCPU_STRIDE - 0x100
        v.sp_el0 = USER_STACK + PAGE_4K - 0x40
        v.elr_el1 = USER_CODE + 0x10       # the instruction after the SVC that entered the kernel
        v.spsr_el1 = 0                      # EL0t, nothing masked
