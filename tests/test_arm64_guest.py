"""The AArch64 guest: the stage-1 walker (runtime/paging_arm64.py), the linux-arm64 layout
(runtime/sim/layout_arm64.py), the simulator's arm64 accesses, binding an arm64 plan
(runtime/bind.py) and install/teardown on it.

Descriptors in the walker tests are written by hand from the Arm ARM's format (D8.3: bits 1:0 valid
and table/page, AttrIndx 4:2, AP 7:6, SH 9:8, AF 10, nG 11, the output address 47:12, PXN 53, UXN 54,
PXNTable 59, UXNTable 60, APTable 62:61), not built with the code under test. The layout and binding
tests compute where things must be from the System.map the test parses itself and the load address
(physical = link - _text + 0x40000000), not from the walker.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from policyc.native import abi
from policyc.runtime.backend import InvalidArgument
from policyc.runtime.bind import BindError, bind_plan
from policyc.runtime.guest_memory import GuestMemory
from policyc.runtime.install import install
from policyc.runtime.paging import AlignmentError, MappingConflict, PageFault
from policyc.runtime.paging_arm64 import (BLOCK_1G, BLOCK_2M, LINUX_TCR_48, PAGE_4K, TCR_EPD0, TCR_TBI0,
                                          AccessFlagFault, AddressSizeFault, Level, PermissionFault,
                                          Stage1Tables, TranslationFault, permissions)
from policyc.runtime.policy_test import check_expectations, run_on_simulator
from policyc.runtime.sim import Op, SimulatedXen, build_guest
from policyc.runtime.sim.guest_arm64 import ARM64_REGISTERS, Arm64Guest
from policyc.runtime.sim.layout_arm64 import ARM64_NOP, USER_CODE, USER_STACK, build_linux_arm64
from policyc.runtime.sim.scenario import ScenarioError, build_scenario, load_scenario, load_scenario_text
from policyc.cli import main as cli_main
from policyc.symbols import SymbolFileError, load_symbol_table

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "examples" / "policies" / "linux-6.1-arm64.System.map"
X86_MAP = ROOT / "examples" / "policies" / "linux-6.1.System.map"
PLAN = ROOT / "tests" / "golden" / "plans" / "linux-arm64-integrity.arm64.plan.json"
SCENARIO = ROOT / "examples" / "scenarios" / "linux-arm64-integrity.yaml"
RAM = 0x4000_0000
SLIDE = 0x2AB5_2C60_0000
F = abi.Flag
MA = abi.MemAccess
RS = abi.Reason
GiB = 1 << 30


def _map_file() -> dict[str, int]:
    out = {}
    for line in MAP.read_text().splitlines():
        if line and not line.startswith("#"):
            addr, _kind, name = line.split()[:3]
            out.setdefault(name, int(addr, 16))
    return out


LINK = _map_file()


def phys(name: str, plus: int = 0) -> int:
    """Where the layout loads a symbol: the image is contiguous from _text at the start of RAM."""
    return LINK[name] + plus - LINK["_text"] + RAM


@functools.lru_cache(maxsize=None)
def _template(slide: int = SLIDE, vcpus: int = 2) -> Arm64Guest:
    return build_linux_arm64(MAP, kaslr_slide=slide, memory="256M", vcpus=vcpus)


def mk(slide: int = SLIDE, vcpus: int = 2, **kw: Any) -> SimulatedXen:
    return SimulatedXen(_template(slide, vcpus).clone(), "arm64", **kw)


def plan() -> dict:
    return copy.deepcopy(_plan())


@functools.lru_cache(maxsize=None)
def _plan() -> dict:
    return json.loads(PLAN.read_text())


@pytest.fixture(scope="module")
def symbols():
    return load_symbol_table(MAP)


def take(xen: SimulatedXen) -> list[abi.Request]:
    return [abi.parse_request(r) for r in xen.take_requests(8)]


def respond(xen: SimulatedXen, req: abi.Request, *, pc: int | None = None) -> None:
    if pc is None:
        raw = abi.make_response(req).raw
    else:
        raw = abi.make_response(req, flags=F.SET_REGISTERS,
                                fields={"data.regs.arm": dict(req.regs_arm, pc=pc)}).raw
    xen.put_responses([raw])
    xen.notify()


# =========================================================================== the walker, by hand

VA = 0xFFFF_8000_0801_2345           # TTBR1; indexes 256, 0, 64, 18; offset 0x345
L0, L1, L2, L3 = 0x1000, 0x2000, 0x3000, 0x4000
TABLE = 0b11
PAGE_RO_X = 0x0040_0000_4567_8000 | 0x400 | 0x300 | 0x80 | 0b11   # page: AF, SH inner, AP[2], UXN


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory(2 * GiB)


@pytest.fixture
def hand(mem: GuestMemory) -> Stage1Tables:
    mem.write_u64(L0 + 256 * 8, L1 | TABLE)        # 0x1800
    mem.write_u64(L1 + 0 * 8, L2 | TABLE)          # 0x2000
    mem.write_u64(L2 + 64 * 8, L3 | TABLE)         # 0x3200
    mem.write_u64(L3 + 18 * 8, PAGE_RO_X)          # 0x4090
    return Stage1Tables(mem, L0 | 0x0005 << 48, 0x8000, tcr=LINUX_TCR_48)   # an ASID in TTBR1's top bits


def test_a_hand_made_walk_translates_to_the_page_descriptor(hand: Stage1Tables) -> None:
    t = hand.translate(VA)
    assert t.pa == 0x4567_8345 and t.page_size == PAGE_4K and t.level is Level.L3
    assert (t.writable, t.executable, t.user, t.user_executable, t.global_) == (False, True, False, False, True)
    assert t.descriptor_address == 0x4090 and t.descriptor == PAGE_RO_X
    assert hand.walk_entries(VA) == [0x1800, 0x2000, 0x3200, 0x4090]
    assert [s.entry_address for s in t.steps] == [0x1800, 0x2000, 0x3200, 0x4090]
    with pytest.raises(PermissionFault) as exc:
        hand.translate(VA, "write")
    assert exc.value.fsc == 0b001111 and exc.value.level is Level.L3
    assert hand.translate(VA, "exec").pa == 0x4567_8345
    with pytest.raises(PermissionFault):
        hand.translate(VA, "read", el=0)               # AP[1] clear: EL0 has no access


def test_blocks_at_levels_1_and_2(mem: GuestMemory, hand: Stage1Tables) -> None:
    # 0xffff800040234567: indexes 256, 1, 1, 52
    mem.write_u64(L1 + 1 * 8, 0x0000_0001_8000_0000 | 0x400 | 0b01)         # 1 GiB block at 6 GiB... RW, no PXN
    t = hand.translate(0xFFFF_8000_4023_4567)
    assert (t.pa, t.page_size, t.level) == (0x1_8023_4567, BLOCK_1G, Level.L1)
    assert t.writable and t.executable and t.user_executable
    mem.write_u64(L1 + 1 * 8, 0x5000 | TABLE)
    mem.write_u64(0x5000 + 1 * 8, 0x0060_0000_7A40_0000 | 0x400 | 0x80 | 0b01)  # 2 MiB block, RO, PXN+UXN
    t = hand.translate(0xFFFF_8000_4023_4567)
    assert (t.pa, t.page_size, t.level) == (0x7A43_4567, BLOCK_2M, Level.L2)
    assert not t.writable and not t.executable
    with pytest.raises(PermissionFault) as exc:
        hand.translate(0xFFFF_8000_4023_4567, "exec")
    assert exc.value.fsc == 0b001110


def test_translation_faults_name_their_level(mem: GuestMemory, hand: Stage1Tables) -> None:
    with pytest.raises(TranslationFault) as exc:
        hand.translate(0xFFFF_8000_0801_3000)            # L3 index 19: invalid
    assert exc.value.fsc == 0b000111 and exc.value.entry_address == L3 + 19 * 8
    assert [s.entry_address for s in exc.value.steps] == [0x1800, 0x2000, 0x3200, L3 + 19 * 8]
    mem.write_u64(L0 + 257 * 8, 0x4000_0000 | 0x400 | 0b01)   # a block at level 0: not with 4 KiB pages
    with pytest.raises(TranslationFault) as exc:
        hand.translate(0xFFFF_8080_0000_0000)
    assert exc.value.level is Level.L0 and exc.value.fsc == 0b000100
    mem.write_u64(L3 + 20 * 8, 0x6000 | 0x400 | 0b01)          # 0b01 at level 3 is reserved
    with pytest.raises(TranslationFault):
        hand.translate(0xFFFF_8000_0801_4000)
    assert isinstance(exc.value, PageFault)                   # binding catches the x86 walker's base class


def test_access_flag_and_address_size_faults(mem: GuestMemory) -> None:
    mem.write_u64(L0 + 256 * 8, L1 | TABLE)
    mem.write_u64(L1, L2 | TABLE)
    mem.write_u64(L2 + 64 * 8, L3 | TABLE)
    mem.write_u64(L3 + 18 * 8, 0x4567_8000 | 0x300 | 0b11)     # AF clear
    pt = Stage1Tables(mem, L0, 0x8000)
    with pytest.raises(AccessFlagFault) as exc:
        pt.translate(VA)
    assert exc.value.fsc == 0b001011
    mem.write_u64(L3 + 18 * 8, 0x0000_8000_0000_0000 | 0x400 | 0b11)   # bit 47 with a 40-bit IPS
    pt40 = Stage1Tables(mem, L0, 0x8000, tcr=LINUX_TCR_48 & ~(7 << 32) | 2 << 32)
    with pytest.raises(AddressSizeFault) as exc:
        pt40.translate(VA)
    assert exc.value.fsc == 0b000011
    assert pt.translate(VA).pa == 0x0000_8000_0000_0345       # 48 bits: fine


def test_address_ranges_top_byte_ignore_and_disabled_walks(mem: GuestMemory, hand: Stage1Tables) -> None:
    for bad in (0x0001_0000_0000_0000, 0xFFFE_8000_0801_2345, 0x7FFF_8000_0801_2345):
        with pytest.raises(TranslationFault) as exc:
            hand.translate(bad)
        assert exc.value.level is Level.L0
    mem.write_u64(0x8000, L1 | TABLE)                          # TTBR0 index 0 -> the same lower tables
    mem.write_u64(L1 + 0, L2 | TABLE)
    low = 0x0000_0000_0801_2345
    assert hand.translate(low).pa == 0x4567_8345
    assert hand.translate(0x5A00_0000_0801_2345).pa == 0x4567_8345      # TBI0: the tag byte is ignored
    with pytest.raises(TranslationFault):
        hand.translate(0x5AFF_8000_0801_2345)                  # no TBI1 for kernel addresses
    off = Stage1Tables(mem, L0, 0x8000, tcr=LINUX_TCR_48 | TCR_EPD0)
    with pytest.raises(TranslationFault, match="EPD0"):
        off.translate(low)
    strict = Stage1Tables(mem, L0, 0x8000, tcr=LINUX_TCR_48 & ~TCR_TBI0)
    with pytest.raises(TranslationFault):
        strict.translate(0x5A00_0000_0801_2345)


def test_permission_rules_of_the_architecture() -> None:
    RW_EL1, RO, EL0, PXN, UXN = 0, 0x80, 0x40, 1 << 53, 1 << 54
    assert permissions(RW_EL1 | UXN) == permissions(RW_EL1 | UXN, 0)
    p = permissions(EL0 | UXN)                         # EL0 read-write: never executable at EL1
    assert p.el0_write and not p.el1_exec
    p = permissions(EL0 | RO | PXN)                    # user code: EL0 read-execute
    assert p.el0_read and not p.el0_write and p.el0_exec and not p.el1_exec
    p = permissions(0, 1 << 62)                        # APTable[1]: read-only below
    assert not p.el1_write
    p = permissions(EL0, 1 << 61)                      # APTable[0]: no EL0 access below
    assert not p.el0_read
    assert not permissions(0, 1 << 59).el1_exec and not permissions(0, 1 << 60).el0_exec
    assert not permissions(PXN | UXN, wxn=True).el1_exec
    assert not permissions(0, wxn=True).el1_exec and permissions(RO, wxn=True).el1_exec


def test_pan_refuses_kernel_data_accesses_to_user_pages(mem: GuestMemory) -> None:
    pt = Stage1Tables(mem, 0x1000, 0x8000)
    pt.map(0x0000_AAAA_0000_0000, 0x10_0000, PAGE_4K, writable=True, user=True)
    assert pt.translate(0x0000_AAAA_0000_0010, "read", el=1).pa == 0x10_0010
    with pytest.raises(PermissionFault, match="PAN"):
        pt.translate(0x0000_AAAA_0000_0010, "read", el=1, pan=True)
    assert pt.translate(0x0000_AAAA_0000_0010, "write", el=0, pan=True).pa == 0x10_0010


def test_the_builder_writes_the_descriptors_the_architecture_defines(mem: GuestMemory) -> None:
    pt = Stage1Tables(mem, 0x1000, 0x8000)             # tables come from the allocator (top of memory)
    pt.map(VA & ~0xFFF, 0x4567_8000, PAGE_4K, writable=False, executable=True)
    steps = pt.walk(VA)
    assert steps[0].entry_address == 0x1800 and steps[0].entry & ~0xFFF_FFFF_F000 == TABLE
    assert steps[-1].entry == PAGE_RO_X                 # same bits as the hand-made descriptor
    pt.map(0xFFFF_8000_4000_0000, 0x8000_0000, BLOCK_1G, BLOCK_1G, writable=True, executable=False, global_=False)
    leaf = pt.walk(0xFFFF_8000_4000_0000)[-1]
    assert leaf.level is Level.L1 and leaf.entry == 0x8000_0000 | 0b01 | 0x400 | 0x300 | 0x800 | 1 << 53 | 1 << 54
    pt.map(0xFFFF_8000_8000_0000, 0x9000_0000, BLOCK_2M, BLOCK_2M, user=True, writable=False, user_executable=True,
           table_flags=1 << 59)
    assert pt.walk(0xFFFF_8000_8000_0000)[-2].entry & 1 << 59                     # PXNTable on the new table
    t = pt.translate(0xFFFF_8000_8000_1234)
    assert t.user and t.user_executable and not t.executable and t.pa == 0x9000_1234
    with pytest.raises(MappingConflict):
        pt.map(VA & ~0xFFF, 0x1000_0000, PAGE_4K)
    with pytest.raises(AlignmentError):
        pt.map(0xFFFF_8000_0020_1000, 0x20_0000, BLOCK_2M, BLOCK_2M)
    with pytest.raises(ValueError, match="never executable"):
        pt.map(0xFFFF_8000_0000_0000, 0, PAGE_4K, user=True, writable=True, executable=True)
    with pytest.raises(ValueError, match="outside the ranges"):
        pt.map(0x0001_0000_0000_0000, 0, PAGE_4K)


def test_split_unmap_remap_and_enumeration(mem: GuestMemory) -> None:
    pt = Stage1Tables(mem, 0x1000, 0x8000)
    base = 0xFFFF_8000_0820_0000
    pt.map(base, 0x4020_0000, BLOCK_2M, BLOCK_2M, writable=False, executable=True)
    before = {off: pt.translate(base + off) for off in (0, 0x1234, 0x1F_F000)}
    table = pt.split(base + 0x1234)
    assert pt.walk(base)[-2].entry & ~0xFFF == table
    for off, t in before.items():
        after = pt.translate(base + off)
        assert (after.pa, after.writable, after.executable) == (t.pa, t.writable, t.executable)
        assert after.page_size == PAGE_4K
    addr = pt.set_descriptor_address(base + 0x5000, 0x7000_0000)
    assert pt.translate(base + 0x5123).pa == 0x7000_0123 and addr == table + 5 * 8
    assert pt.unmap(base + 0x5000, 0x2000) == 2 and not pt.is_mapped(base + 0x6000)
    assert pt.translate_range(base + 0xFF0, 0x20) == [(base + 0xFF0, 0x4020_0FF0, 0x20)]
    frames = pt.page_table_frames()
    assert 0x1 in frames and 0x8 in frames and table >> 12 in frames
    maps = [m for m in pt.mappings() if m.va >= base]
    assert len(maps) == 510 and maps[0].va == base and maps[0].executable


def test_unsupported_translation_control_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(ValueError, match="48-bit"):
        Stage1Tables(mem, 0x1000, 0x8000, tcr=LINUX_TCR_48 & ~0x3F | 25)          # T0SZ 25: 39-bit
    with pytest.raises(ValueError, match="4 KiB"):
        Stage1Tables(mem, 0x1000, 0x8000, tcr=LINUX_TCR_48 & ~(3 << 30) | 3 << 30)  # TG1 64 KiB


# =========================================================================== the layout

def test_the_image_sits_where_the_loader_puts_it_with_6_1s_permissions() -> None:
    g = _template()
    pt = g.vcpus[0].tables(g.memory)
    s = lambda name: LINK[name] + SLIDE                   # noqa: E731
    assert g.symbols["_stext"] == s("_stext") and g.kaslr_slide == SLIDE and g.layout == "linux-arm64"
    cases = [("_stext", False, True), ("commit_creds", False, True), ("sys_call_table", False, False),
             ("swapper_pg_dir", False, False), ("modprobe_path", True, False), ("selinux_state", True, False)]
    for name, writable, executable in cases:
        t = pt.translate(s(name))
        assert t.pa == phys(name), name
        assert (t.writable, t.executable, t.user) == (writable, executable, False), name
    for name in ("_text", "__init_begin", "_sinittext", "__per_cpu_start"):    # head and init: not mapped
        assert not pt.is_mapped(s(name)), name
    header = g.memory.read(RAM, 64)                       # but the head's frames keep the Image header
    assert header[0x38:0x3C] == b"ARM\x64" and int.from_bytes(header[16:24], "little") == LINK["_end"] - LINK["_text"]
    assert int.from_bytes(header[8:16], "little") == 0 and header[:2] == b"MZ"
    assert g.memory.read_u32(phys("commit_creds")) == ARM64_NOP


def test_the_linear_map_covers_ram_with_a_read_only_kernel_alias() -> None:
    g = _template()
    pt = g.vcpus[0].tables(g.memory)
    lin = lambda pa: 0xFFFF_0000_0000_0000 + pa - RAM      # noqa: E731
    for pa, writable in ((RAM, True), (phys("_stext"), False), (phys("sys_call_table"), False),
                         (phys("modprobe_path"), True), (RAM + (256 << 20) - PAGE_4K, True)):
        t = pt.translate(lin(pa))
        assert (t.pa, t.writable, t.executable, t.page_size) == (pa, writable, False, PAGE_4K)
    steps = pt.walk(lin(RAM))
    assert all(s.entry & (1 << 59 | 1 << 60) == 1 << 59 | 1 << 60 for s in steps[1:-1])  # PXN/UXNTable
    assert g.direct_map_base + phys("modprobe_path") == lin(phys("modprobe_path"))
    assert not pt.is_mapped(lin(RAM + (256 << 20)))


def test_vcpus_boot_state() -> None:
    g = _template()
    for i, v in enumerate(g.vcpus):
        assert v.ttbr1 == phys("swapper_pg_dir") | (i + 1) << 48
        assert v.vbar == LINK["vectors"] + SLIDE and v.rip == LINK["invoke_syscall"] + SLIDE
        assert v.el == 1 and v.pan and v.tcr == LINUX_TCR_48
        pt = v.tables(g.memory)
        code = pt.translate(USER_CODE, "exec", el=0)
        assert code.user_executable and not code.executable and not code.global_
        assert pt.translate(USER_STACK, "write", el=0).user_writable
        offset = int.from_bytes(g.memory.read(phys("__per_cpu_offset", 8 * i), 8), "little")
        assert offset == v.tpidr_el1 and (LINK["__per_cpu_start"] + SLIDE + offset) % 2**64 == g.percpu_base[i]
    entries = struct.unpack("<451Q", g.memory.read(phys("sys_call_table"), 451 * 8))
    assert entries[221] == LINK["__arm64_sys_execve"] + SLIDE and entries[0] == LINK["_stext"] + SLIDE
    assert g.memory.read(phys("modprobe_path"), 15) == b"/sbin/modprobe\0"
    assert g.vcpus[0].ttbr0 != g.vcpus[1].ttbr0


@pytest.mark.parametrize("kwargs, message", [
    ({"kaslr_slide": 0x1000}, "64 KiB aligned"),
    ({"kaslr_slide": -0x10000}, "non-negative"),
    ({"memory": "16M"}, "too small"),
    ({"vcpus": 0}, "vcpus"),
])
def test_bad_layout_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    args = {"kaslr_slide": 0, "memory": "256M", "vcpus": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        build_linux_arm64(MAP, **args)


def test_an_x86_map_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arm64 System.map"):
        build_linux_arm64(X86_MAP)
    with pytest.raises((ValueError, OSError)):
        build_linux_arm64(tmp_path / "nope.map")
    assert isinstance(build_guest("linux-arm64", symbols=MAP, memory="64M"), Arm64Guest)


def test_a_scenario_names_the_layout_and_its_profile(tmp_path: Path) -> None:
    text = f"""
scenario: t
guest: {{layout: linux-arm64, symbols: {MAP}, kaslr_slide: 0x200000, vcpus: 1{{profile}}}}
steps:
  - {{op: read, va: "symbol sys_call_table"}}
"""
    with pytest.raises(ScenarioError, match="arm64 profile"):
        build_scenario(load_scenario_text(text.replace("{profile}", ""), str(tmp_path / "a.yaml")))
    xen = build_scenario(load_scenario_text(text.replace("{profile}", ", profile: arm64"), str(tmp_path / "a.yaml")))
    assert xen.profile == "arm64" and xen.guest.kaslr_slide == 0x200000
    with pytest.raises(ScenarioError, match="not used by the linux-arm64"):
        build_scenario(load_scenario_text(text.replace("{profile}", ", profile: arm64, phys_slide: 0"),
                                          str(tmp_path / "a.yaml")))


# =========================================================================== the simulator

def test_registers_are_aarch64s() -> None:
    xen = mk()
    regs = xen.get_registers(1)
    assert set(regs) == set(ARM64_REGISTERS) and regs["ttbcr"] == LINUX_TCR_48
    xen.set_registers(1, {"pc": 0x1234, "x3": 7})
    assert xen.vcpu(1).rip == 0x1234 and xen.get_registers(1)["x3"] == 7
    with pytest.raises(InvalidArgument):
        xen.set_registers(1, {"rax": 1})
    with pytest.raises(ValueError, match="arm64 profile"):
        SimulatedXen(_template().clone(), "x86_64")
    with pytest.raises(ValueError, match="x86 instruction"):
        xen.execute(0, Op("cpuid", 0))


def test_a_stage_1_fault_is_the_guests_before_stage_2_is_consulted() -> None:
    xen = mk()
    sct = LINK["sys_call_table"] + SLIDE
    xen.set_access(0, [phys("sys_call_table") >> 12], "r")
    op = xen.write(0, sct, 1)
    assert op.done and not op.took_effect and op.events == 0 and xen.unconsumed_requests() == 0
    (fault,) = op.faults
    esr = fault.error_code
    assert fault.vector == 0x25 and esr >> 26 == 0x25 and esr & 0x3F == 0b001111 and esr & 1 << 6
    assert xen.vcpu(0).far == sct and xen.vcpu(0).esr == esr
    op = xen.exec_at(0, LINK["modprobe_path"] + SLIDE)       # data is execute-never at EL1
    assert op.faults[0].vector == 0x21 and op.faults[0].error_code & 0x3F == 0b001111
    op = xen.read(0, LINK["_sinittext"] + SLIDE)             # init memory was freed and unmapped
    assert op.faults[0].error_code & 0x3C == 0b000100


def test_stage_2_reports_a_write_as_w_and_a_skip_denies_it() -> None:
    xen = mk()
    va = LINK["modprobe_path"] + SLIDE
    xen.set_access(0, [phys("modprobe_path") >> 12], "rx")
    op = xen.write(0, va, 0x782F706D742F)
    (req,) = take(xen)
    assert req.reason == RS.MEM_ACCESS and req.payload["gfn"] == phys("modprobe_path") >> 12
    assert req.payload["flags"] == MA.W | MA.GLA_VALID | MA.FAULT_WITH_GLA and req.payload["gla"] == va
    regs = req.regs_arm
    v = xen.vcpu(0)
    assert (regs["ttbr0"], regs["ttbr1"], regs["ttbcr"], regs["pc"], regs["cpsr"]) == (v.ttbr0, v.ttbr1, v.tcr,
                                                                                      v.rip, v.cpsr)
    respond(xen, req, pc=regs["pc"] + 4)
    assert op.done and not op.took_effect and xen.read_guest(0, va, 8) == b"/sbin/mo"


def test_a_stage_2_fault_on_a_table_read_comes_first_and_names_the_table() -> None:
    xen = mk()
    g = xen.guest
    va = LINK["modprobe_path"] + SLIDE
    table = g.walk_vcpu(g.vcpus[0], va)[0].descriptor_address >> 12
    xen.set_access(0, [table], "n")
    op = xen.read(0, va)
    (req,) = take(xen)
    assert req.payload["gfn"] == table and req.payload["flags"] == MA.R | MA.GLA_VALID | MA.FAULT_IN_GPT
    xen.set_access(0, [table], "rw")
    respond(xen, req)
    assert op.done and op.took_effect and op.result == int.from_bytes(b"/sbin/mo", "little")
    code = LINK["commit_creds"] + SLIDE
    table = g.walk_vcpu(g.vcpus[0], code)[0].descriptor_address >> 12
    xen.set_access(0, [table], "w")
    op = xen.exec_at(0, code)
    (req,) = take(xen)                                      # Xen tells a fetch's walk by X
    assert req.payload["gfn"] == table and req.payload["flags"] == MA.X | MA.GLA_VALID | MA.FAULT_IN_GPT


def test_an_smc_in_the_instruction_stream_is_a_privileged_call() -> None:
    xen = mk()
    xen.monitor("privileged_call", True)
    site = LINK["commit_creds"] + SLIDE
    xen.write_physical(phys("commit_creds"), (0xD4000003).to_bytes(4, "little"))
    op = xen.exec_at(1, site)
    (req,) = take(xen)
    assert req.reason == RS.PRIVILEGED_CALL and req.regs_arm["pc"] == site and not op.done
    xen.write_physical(phys("commit_creds"), ARM64_NOP.to_bytes(4, "little"))   # put the original back
    respond(xen, req)
    assert op.done and op.took_effect and op.result == ARM64_NOP and xen.vcpu(1).rip == site + 4
    assert xen.exec_at(1, site + 2).faults[0].name == "PC alignment fault"


def test_remap_splits_a_block_as_a_guest_would_and_is_one_store() -> None:
    xen = mk()
    g = xen.guest
    va = LINK["__start_rodata"] + SLIDE + 0x100000             # inside a 2 MiB block of rodata
    t = g.walk_vcpu(g.vcpus[0], va)[0]
    assert t.page_size == BLOCK_2M
    target = phys("modprobe_path") & ~0xFFF
    op = xen.execute(0, Op("remap", 0, va=va, to_pa=target))
    assert op.done and op.took_effect and op.result == t.descriptor_address
    assert g.walk_vcpu(g.vcpus[0], va)[0].pa == target
    assert g.walk_vcpu(g.vcpus[0], va + PAGE_4K)[0].pa == t.pa + PAGE_4K       # its neighbours stay


def test_pan_and_user_pages() -> None:
    xen = mk()
    op = xen.read(0, USER_STACK)
    assert op.faults and "permission" in op.faults[0].name
    xen.vcpu(0).cpsr &= ~(1 << 22)
    assert xen.read(0, USER_STACK).took_effect


# =========================================================================== binding

class HiddenRegisters:
    """The simulator with only what Xen's arm64 vCPU context carries (no VBAR_EL1, TPIDR_EL1)."""

    def __init__(self, inner: SimulatedXen) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_registers(self, vcpu: int) -> dict[str, int]:
        regs = self._inner.get_registers(vcpu)
        for name in ("vbar_el1", "tpidr_el1", "far_el1", "esr_el1"):
            regs.pop(name)
        return regs


@pytest.mark.parametrize("slide", [0, 0x30000, 0x2A00000, SLIDE])
def test_the_slide_is_found_from_the_guest_at_any_slide(symbols, slide: int) -> None:
    xen = mk(slide)
    b = bind_plan(plan(), xen, symbols)
    assert b.slide == slide and b.arch == "arm64" and b.cr3 == phys("swapper_pg_dir")
    assert set(b.slide_evidence) == {"ttbr1", "vbar_el1", "image_header", "linux_banner"} and not b.notes
    assert b.slide_evidence["linux_banner"]["compared"]
    b2 = bind_plan(plan(), HiddenRegisters(xen), symbols)
    assert b2.slide == slide and "vbar_el1" not in b2.slide_evidence
    assert any("TTBR1 only" in n for n in b2.notes)
    assert b2.percpu_bases == b.percpu_bases == xen.guest.percpu_base


def test_a_hooked_vbar_is_refused(symbols) -> None:
    for vbar in (LINK["vectors"] + SLIDE + 0x100000, LINK["vectors"] + SLIDE + 0x800, 0xFFFF_8000_0010_0000):
        xen = mk()
        for i in range(2):
            xen.vcpu(i).vbar = vbar
        with pytest.raises(BindError, match="hooked|below the link address"):
            bind_plan(plan(), xen, symbols)
    assert bind_plan(plan(), xen, symbols, slide=SLIDE).slide == SLIDE       # an operator may override
    xen = mk()
    xen.vcpu(1).vbar += 0x10000                            # one CPU's vectors moved
    with pytest.raises(BindError, match="VBAR_EL1 differ"):
        bind_plan(plan(), xen, symbols)


def test_the_image_header_must_describe_this_kernel(symbols) -> None:
    xen = mk()
    xen.write_physical(RAM + 16, (0x2020000).to_bytes(8, "little"))
    with pytest.raises(BindError, match="image_size 0x2020000"):
        bind_plan(plan(), xen, symbols)
    xen.write_physical(RAM, bytes(64))                     # a reused head frame: no header, no check
    b = bind_plan(plan(), xen, symbols)
    assert "image_header" not in b.slide_evidence and any("Image header" in n for n in b.notes)


BANNER_56 = load_symbol_table(MAP).banner


def test_the_guest_kernels_banner_must_be_the_symbol_files(symbols) -> None:
    assert BANNER_56 and "6.1.0-56-arm64" in BANNER_56 and "Debian 6.1.192-2" in BANNER_56
    xen = mk()
    b = bind_plan(plan(), xen, symbols)
    assert b.slide_evidence["linux_banner"]["banner"] == BANNER_56.rstrip("\n")
    # the next ABI's build at the same address (same layout, another version): refused, by name
    other = BANNER_56.replace("6.1.0-56-arm64", "6.1.0-57-arm64").replace("6.1.192-2", "6.1.192-3")
    xen.write_physical(phys("linux_banner"), other.encode() + b"\0")
    with pytest.raises(BindError) as exc:
        bind_plan(plan(), xen, symbols)
    msg = str(exc.value)
    assert "linux_banner" in msg and "6.1.0-57-arm64" in msg and "6.1.0-56-arm64" in msg
    assert "not this kernel's" in msg and "refusing to bind" in msg
    with pytest.raises(BindError, match="not this kernel's"):       # the operator's slide is checked too
        bind_plan(plan(), xen, symbols, slide=SLIDE)
    # symbols of another build point at something that is no banner at all
    xen.write_physical(phys("linux_banner"), b"\x1f\x20\x03\xd5" * 8)
    with pytest.raises(BindError, match=r"linux_banner says '\\x1f"):
        bind_plan(plan(), xen, symbols)


def test_without_a_recorded_banner_only_its_presence_is_checked(tmp_path) -> None:
    bare = tmp_path / MAP.name
    bare.write_text("".join(l for l in MAP.read_text().splitlines(True) if not l.startswith("# linux_banner: ")))
    table = load_symbol_table(bare)
    assert table.banner is None
    p = plan()                  # compiled against the map with the banner: the sha256 check is not this test's
    b = bind_plan(p, mk(), table, check_symbols=False)
    assert not b.slide_evidence["linux_banner"]["compared"] and any("no linux_banner text" in n for n in b.notes)
    xen = mk()
    xen.write_physical(phys("linux_banner"), b"not a banner\0")
    with pytest.raises(BindError, match="not a 'Linux version ...' banner"):
        bind_plan(p, xen, table, check_symbols=False)
    bad = tmp_path / "bad.System.map"
    bad.write_text('# linux_banner: "Linux version 6.1 \n' + "ffff800008000000 T _text\n")
    with pytest.raises(SymbolFileError, match="line 1: the linux_banner header"):
        load_symbol_table(bad)


def test_a_symbol_file_of_another_build_is_refused_by_policyc_run(tmp_path, capsys) -> None:
    """policyc run on the simulator: the guest runs 6.1.0-56's kernel, the policy names a symbol file
    recorded for another build at the same addresses: a clear error, exit 1, no traceback."""
    pol = tmp_path / "policies"
    pol.mkdir()
    shutil.copy(ROOT / "examples" / "policies" / "linux-arm64-integrity.vmi", pol)
    (pol / MAP.name).write_text(MAP.read_text().replace("6.1.0-56-arm64 (debian", "6.1.0-57-arm64 (debian"))
    scen = tmp_path / "s.yaml"
    scen.write_text(SCENARIO.read_text().replace("../policies/linux-6.1-arm64.System.map", str(MAP))
                    .replace("../policies/linux-arm64-integrity.vmi", str(pol / "linux-arm64-integrity.vmi")))
    rc = cli_main(["run", "--guest", f"sim:{scen}"])
    out, err = capsys.readouterr()
    assert rc == 2, out + err                                  # the run's error, as any failed bind
    assert "linux_banner" in err and "6.1.0-57-arm64" in err and "not this kernel's" in err, err
    assert "Traceback" not in out + err
    rc = cli_main(["run", "--guest", f"sim:{SCENARIO}"])      # its own build: bound, and said so
    out, err = capsys.readouterr()
    assert rc == 0 and "guest kernel: linux_banner at 0xffffaab5354f3be0 matches the symbol file: 'Linux version " \
        "6.1.0-56-arm64 " in out, out + err


def test_without_swapper_in_ttbr1_vbar_alone_binds_and_nothing_is_refused(symbols) -> None:
    xen = mk()
    g = xen.guest
    copy_frame = g.memory.alloc_frame()
    g.memory.write(copy_frame << 12, g.memory.read(phys("swapper_pg_dir"), PAGE_4K))
    for v in g.vcpus:
        v.ttbr1 = copy_frame << 12                         # a table the image does not map (kpti's trampoline)
    b = bind_plan(plan(), xen, symbols)
    assert b.slide == SLIDE and any("VBAR_EL1 only" in n for n in b.notes)
    with pytest.raises(BindError, match="cannot find the slide"):
        bind_plan(plan(), HiddenRegisters(xen), symbols)


def test_a_non_arm64_context_or_granule_is_refused(symbols) -> None:
    xen = mk()
    xen.vcpu(0).tcr = LINUX_TCR_48 & ~(0x3F << 16) | 25 << 16
    with pytest.raises(BindError, match="48-bit kernel addresses"):
        bind_plan(plan(), xen, symbols)
    with pytest.raises(BindError, match="slide 0x1000 is not 64 KiB aligned"):
        bind_plan(plan(), mk(), symbols, slide=0x1000)


def test_every_region_binds_to_the_frames_the_load_address_gives(symbols) -> None:
    xen = mk()
    p = plan()
    b = bind_plan(p, xen, symbols)
    for name, region in p["regions"].items():
        want = set()
        for ext in region["extents"]:
            start, size = int(ext["start"], 16), int(ext["size"], 16)
            first = phys_of_link(start)
            want |= {(first + off) >> 12 for off in range(0, size, PAGE_4K)} | {(first + size - 1) >> 12}
        assert {g for g, _f, _l in b.region_frames(name)} == want, name
    (sct,) = [p for p in b.region_frames("syscalls") if p[0] == phys("sys_call_table") >> 12]
    assert sct == (phys("sys_call_table") >> 12, phys("sys_call_table") & 0xFFF, 0xFFF)
    assert b.in_region("kernel_text", LINK["commit_creds"] + SLIDE)
    assert not b.in_region("kernel_text", LINK["commit_creds"])
    # the page-table watch: the tables on the walks of the protected pages, the level 0 table included
    assert phys("swapper_pg_dir") >> 12 in b.pt_watch
    walk = xen.guest.walk_vcpu(xen.guest.vcpus[0], LINK["modprobe_path"] + SLIDE)[1]
    assert {gfn for gfn, _off in walk} <= b.pt_watch
    assert all(b.view_access(0)[g] == "rx" for g in b.pt_watch)
    bps = {bp.id: bp for bp in b.breakpoints}
    assert bps["bp0"].pa == phys("commit_creds") and bps["bp0"].original == ARM64_NOP.to_bytes(4, "little")


def phys_of_link(address: int) -> int:
    return address - LINK["_text"] + RAM


# =========================================================================== install and teardown

def test_install_and_teardown_leave_the_guest_as_it_was(symbols, tmp_path: Path) -> None:
    xen = mk()
    before = xen.state_snapshot(memory=True)
    b = bind_plan(plan(), xen, symbols)
    inst = install(b, xen, state_dir=tmp_path)
    assert xen.read_physical(phys("commit_creds"), 4) == (0xD4000003).to_bytes(4, "little")
    assert xen.get_access(0, phys("sys_call_table") >> 12) == "r"        # write trap and rodata's exec trap
    assert xen.get_access(0, phys("commit_creds") >> 12) == "rx"
    assert xen.get_access(0, phys("__start_rodata", 0x100000) >> 12) == "rw"
    assert set(xen.monitors()) == {"guest_request", "privileged_call"}
    inst.teardown()
    after = xen.state_snapshot(memory=True)
    assert [k for k in before if before[k] != after[k]] == []


def test_the_example_scenario_passes_under_the_enforcer(symbols) -> None:
    scenario = load_scenario(SCENARIO)
    run = run_on_simulator(scenario, plan(), [symbols])
    failed = [r for r in check_expectations(run) if not r.passed]
    assert not failed, [(r.label, r.detail) for r in failed]
    assert len(run.enforcer.rebinds) == 1 and run.enforcer.effect_errors == []


def test_relax_and_rearm_closes_the_window_once_the_guest_is_quiet(symbols, tmp_path: Path) -> None:
    """An allowed access relaxes its whole page (the plan's PC501 warning); the enforcer re-arms it at its
    next event or as soon as the guest goes quiet (Enforcer.idle), so the next step's write is seen."""
    text = f"""
scenario: relax-window
guest: {{layout: linux-arm64, symbols: {MAP}, kaslr_slide: {SLIDE:#x}, vcpus: 2, profile: arm64}}
steps:
  - {{vcpu: 1, op: write, va: "symbol modprobe_path - 0x100", size: 8, value: 1}}
  - {{vcpu: 1, op: write, va: "symbol modprobe_path", size: 8, value: 0x782f706d742f}}
  - {{vcpu: 0, op: guest_request, rip: "symbol invoke_syscall"}}
  - {{vcpu: 1, op: write, va: "symbol modprobe_path", size: 8, value: 0x782f706d742f}}
"""
    run = run_on_simulator(load_scenario_text(text, str(tmp_path / "w.yaml")), plan(), [symbols])
    assert [(r.verdict, r.events) for r in run.results] == [("allow", 1), ("deny", 1), ("allow", 1),
                                                             ("deny", 1)]
    (d,) = run.step_decisions(1)
    assert d.rule == "helper_path_overwrite"
    (d,) = run.step_decisions(2)
    assert not [e for e in d.effects if e.kind == "rearm"]       # re-armed already, while quiet


def test_the_trimmed_map_records_the_banner_its_image_holds(tmp_path) -> None:
    """tools/trim_system_map.py --image: the text at linux_banner - _text in the flat Image goes into the
    header, and policyc's reader gives it back; an Image of another layout has no banner there."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("trim_system_map", ROOT / "tools" / "trim_system_map.py")
    trim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trim)                                  # type: ignore[union-attr]
    source = tmp_path / "System.map"
    source.write_text("ffff800008000000 T _text\nffff800008000100 D linux_banner\nffff800008000200 B _end\n")
    image = tmp_path / "Image"
    text = "Linux version 9.9.9-test (x@y) #1 SMP\n"
    image.write_bytes(bytes(0x100) + text.encode() + b"\0" + bytes(64))
    out = tmp_path / "out.map"
    assert trim.main([str(source), str(out), "--names", "linux_banner", "--image", str(image)]) == 0
    assert load_symbol_table(out).banner == text
    image.write_bytes(bytes(0x200))
    with pytest.raises(SystemExit, match="no 'Linux version ...' text at linux_banner's offset 0x100"):
        trim.main([str(source), str(out), "--names", "linux_banner", "--image", str(image)])
