"""The windows-x86_64 simulated guest (runtime/sim/layout_windows.py) and binding a Windows plan to it
(runtime/bind.py: ntoskrnl's image base found from its PE header's CodeView record).

The symbols are the shipped ISF excerpt of ntkrnlmp.pdb 9074FC2B82ED2B7E1CB3366B64BE62F9/1, whose
addresses are RVAs. The tests read that file's JSON themselves rather than trust the loader, parse
the PE header with their own struct code (and with pefile when it is installed), and compare bound
frames with the simulated hardware's page walk (`Guest.walk`), which is separate code from the
binder's walker.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan
from policyc.runtime.bind import BindError, bind_plan
from policyc.runtime.install import install
from policyc.runtime.paging import PageTables
from policyc.runtime.sim import Guest, SimulatedXen, build_guest
from policyc.runtime.sim.guest import TranslationFault
from policyc.runtime.sim.layout_windows import (CSTAR_RVA, IDT_STUB_RVA, KI_SERVICE_TABLE_RVA, LSTAR_RVA,
                                                NONPAGED_POOL_VA, NUMBER_OF_SERVICES, SECTIONS, SIZE_OF_IMAGE,
                                                build_windows_x86_64)
from policyc.runtime.sim.scenario import ScenarioError, build_scenario, load_scenario, load_scenario_text
from policyc.symbols import load_symbol_table

from helpers import expected_frames

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "examples" / "policies"
ISF = POLICIES / "ntoskrnl-22621-9074FC2B.isf.json"
POLICY = POLICIES / "windows-kernel-integrity.vmi"
SCENARIO = ROOT / "examples" / "scenarios" / "windows-kernel-integrity.yaml"
GUID, AGE = "9074FC2B82ED2B7E1CB3366B64BE62F9", 1
# Another real ntkrnlmp.pdb identity (a 19041 kernel, tools/windows_isf_provenance.md).
OTHER_GUID = "3789767E34B7A48A3FC80CE12DE18E65"
BASE = 0xFFFFF80305800000       # the Kernel Base of the transcript the ISF was matched with
PAGE = 4096
LSTAR, EFER_MSR = 0xC0000082, 0xC0000080


def isf_doc() -> dict:
    return json.loads(ISF.read_text())


RVAS = {name: entry["address"] for name, entry in isf_doc()["symbols"].items()}


@functools.lru_cache(maxsize=None)
def _template(base: int = BASE, vcpus: int = 2, symbols: str = str(ISF)) -> Guest:
    return build_windows_x86_64(symbols, image_base=base, memory="256M", vcpus=vcpus)


def mk(base: int = BASE, vcpus: int = 2, symbols: Path = ISF) -> SimulatedXen:
    return SimulatedXen(_template(base, vcpus, str(symbols)).clone(), "x86_64")


@functools.lru_cache(maxsize=None)
def _compiled(policy: str) -> str:
    d = Diagnostics()
    checked = check_policy(Path(policy), d)
    assert checked is not None, [str(x) for x in d]
    plan = compile_plan(checked, d)
    assert plan is not None, [str(x) for x in d]
    return json.dumps(plan)


def plan(policy: Path = POLICY) -> dict:
    return json.loads(_compiled(str(policy)))


@pytest.fixture(scope="module")
def symbols():
    return load_symbol_table(ISF)


def isf_copy(tmp_path: Path, *, guid: str | None = GUID, age: int = AGE, extra: dict | None = None,
             name: str = ISF.name) -> Path:
    """The shipped ISF with another PDB identity (or none) and, for tests only, extra symbols."""
    doc = isf_doc()
    if guid is None:
        del doc["metadata"]["windows"]["pdb"]
    else:
        doc["metadata"]["windows"]["pdb"].update(GUID=guid, age=age)
    for sym, rva in (extra or {}).items():
        doc["symbols"][sym] = {"address": rva}
    out = tmp_path / name
    out.write_text(json.dumps(doc))
    return out


def policy_copy(tmp_path: Path, isf: Path) -> Path:
    """The example policy next to another symbol file of the same name (compiled against it)."""
    assert isf.parent == tmp_path and isf.name == ISF.name
    (tmp_path / POLICY.name).write_text(POLICY.read_text())
    return tmp_path / POLICY.name


def read(xen_or_guest: Any, va: int, size: int) -> bytes:
    g = xen_or_guest.guest if isinstance(xen_or_guest, SimulatedXen) else xen_or_guest
    return g.read_virtual(g.vcpus[0].cr3, va, size)


def u64(g: Any, va: int) -> int:
    return struct.unpack("<Q", read(g, va, 8))[0]


# =========================================================================== the layout

def parse_pe(g: Guest, base: int) -> dict:
    """Our own reading of the PE header and CodeView record at `base` (the spec's offsets)."""
    dos = read(g, base, 0x40)
    assert dos[:2] == b"MZ"
    e_lfanew = struct.unpack_from("<I", dos, 0x3C)[0]
    nt = read(g, base + e_lfanew, 24 + 0xF0)
    assert nt[:4] == b"PE\0\0"
    machine, nsections, _ts, _p, _n, opt_size, _chars = struct.unpack_from("<HHIIIHH", nt, 4)
    opt = nt[24:24 + opt_size]
    magic = struct.unpack_from("<H", opt, 0)[0]
    image_base, = struct.unpack_from("<Q", opt, 24)
    size_of_image, = struct.unpack_from("<I", opt, 56)
    debug_rva, debug_size = struct.unpack_from("<II", opt, 112 + 6 * 8)
    sections = {}
    raw = read(g, base + e_lfanew + 24 + opt_size, 40 * nsections)
    for i in range(nsections):
        name, vsize, rva, *_rest, chars = struct.unpack_from("<8sIIIIIIHHI", raw, 40 * i)
        sections[name.rstrip(b"\0").decode()] = (rva, vsize, chars)
    cv = None
    entries = read(g, base + debug_rva, debug_size)
    for at in range(0, debug_size, 28):
        kind, length, rva = struct.unpack_from("<III", entries, at + 12)
        if kind == 2:
            rec = read(g, base + rva, length)
            d1, d2, d3 = struct.unpack_from("<IHH", rec, 4)
            cv = {"sig": rec[:4], "guid": f"{d1:08X}{d2:04X}{d3:04X}{rec[12:20].hex().upper()}",
                  "age": struct.unpack_from("<I", rec, 20)[0], "name": rec[24:].split(b"\0")[0].decode()}
    return {"machine": machine, "magic": magic, "image_base": image_base, "size": size_of_image,
            "sections": sections, "codeview": cv}


@pytest.mark.parametrize("base", [BASE, 0xFFFFF80000000000])
def test_pe_header_and_codeview_record_carry_the_isf_pdb_identity(base):
    g = _template(base)
    pe = parse_pe(g, base)
    assert pe["machine"] == 0x8664 and pe["magic"] == 0x20B
    assert pe["size"] == SIZE_OF_IMAGE and pe["image_base"] == base
    assert pe["codeview"] == {"sig": b"RSDS", "guid": GUID, "age": AGE, "name": "ntkrnlmp.pdb"}
    assert set(pe["sections"]) == {".text", ".rdata", ".data"}
    for name, (rva, vsize, _chars) in pe["sections"].items():
        assert (rva, rva + vsize) == SECTIONS[name][:2]


def test_pe_header_parses_with_pefile_too():
    pefile = pytest.importorskip("pefile")
    g = _template()
    pe = pefile.PE(data=read(g, BASE, SECTIONS[".rdata"][0] + 2 * PAGE), fast_load=True)
    pe.parse_data_directories(directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"]])
    assert pe.OPTIONAL_HEADER.SizeOfImage == SIZE_OF_IMAGE
    (cv,) = [d.entry for d in pe.DIRECTORY_ENTRY_DEBUG if d.struct.Type == 2]
    assert cv.CvSignature == b"RSDS" and cv.Age == AGE and cv.PdbFileName.rstrip(b"\0") == b"ntkrnlmp.pdb"
    assert f"{cv.Signature_Data1:08X}{cv.Signature_Data2:04X}{cv.Signature_Data3:04X}" == GUID[:16]


def test_symbols_sit_at_base_plus_rva_in_writable_data():
    g = _template()
    assert g.symbols == {name: BASE + rva for name, rva in RVAS.items()}
    assert g.kaslr_slide == BASE and g.layout == "windows-x86_64"
    cr3 = g.vcpus[0].cr3
    data_lo, data_hi = SECTIONS[".data"][:2]
    for name, rva in RVAS.items():
        assert data_lo <= rva < data_hi
        w = g.walk(cr3, BASE + rva)
        assert w.writable and not w.executable, name
    # header + text read-execute, rdata read-only
    for rva, writable, executable in ((0, False, True), (LSTAR_RVA, False, True),
                                      (SECTIONS[".rdata"][0], False, False)):
        w = g.walk(cr3, BASE + rva)
        assert (w.writable, w.executable) == (writable, executable), hex(rva)
    # nothing mapped right below the image or past its end
    for va in (BASE - PAGE, BASE + SIZE_OF_IMAGE):
        with pytest.raises(TranslationFault):
            g.walk(cr3, va)


def test_symbols_hold_plausible_contents():
    g = _template()
    doc = isf_doc()["user_types"]
    ksdt = read(g, g.symbols["KeServiceDescriptorTable"], 32)
    base, count, limit, number = struct.unpack("<QQI4xQ", ksdt)
    lo, hi = g.text_range
    assert lo <= base < hi and base == BASE + KI_SERVICE_TABLE_RVA and count == 0 and lo <= number < hi
    assert limit == NUMBER_OF_SERVICES
    assert read(g, g.symbols["KeServiceDescriptorTableShadow"], 32) == ksdt
    assert read(g, g.symbols["KeServiceDescriptorTableShadow"] + 32, 32) == bytes(32)   # win32k not loaded
    entries = struct.unpack(f"<{limit}I", read(g, base, 4 * limit))
    assert all(lo <= base + (e >> 4) < hi for e in entries)
    # PsLoadedModuleList: head <-> ntoskrnl's entry, whose DllBase is the image
    head = g.symbols["PsLoadedModuleList"]
    flink, blink = struct.unpack("<QQ", read(g, head, 16))
    assert flink == blink and struct.unpack("<QQ", read(g, flink, 16)) == (head, head)
    assert u64(g, flink + 0x30) == BASE
    # PsActiveProcessHead -> System, laid out with the ISF's offsets
    links = doc["_EPROCESS"]["fields"]["ActiveProcessLinks"]["offset"]
    pid = doc["_EPROCESS"]["fields"]["UniqueProcessId"]["offset"]
    name = doc["_EPROCESS"]["fields"]["ImageFileName"]["offset"]
    dtb = doc["_KPROCESS"]["fields"]["DirectoryTableBase"]["offset"]
    system = u64(g, g.symbols["PsInitialSystemProcess"])
    assert u64(g, g.symbols["PsActiveProcessHead"]) == system + links
    assert u64(g, system + pid) == 4 and read(g, system + name, 7) == b"System\0"
    assert u64(g, system + dtb) == g.vcpus[0].cr3


def test_per_vcpu_idt_gdt_outside_the_image_and_registers_as_booted():
    g = _template(vcpus=3)
    lo, hi = g.text_range
    idts, gdts = set(), set()
    for v in g.vcpus:
        cr3 = v.cr3
        assert not BASE <= v.idtr_base < BASE + SIZE_OF_IMAGE and not BASE <= v.gdtr_base < BASE + SIZE_OF_IMAGE
        assert v.idtr_base % PAGE == 0 and v.gdtr_base % PAGE == 0 and v.idtr_limit == 0xFFF
        for va in (v.idtr_base, v.gdtr_base):
            w = g.walk(cr3, va)
            assert w.writable and not w.executable
        idts.add(v.idtr_base)
        gdts.add(v.gdtr_base)
        idt = g.read_virtual(cr3, v.idtr_base, 4096)
        for vec in range(256):
            off_lo, sel, _ist, kind, mid, high, _ = struct.unpack_from("<HHBBHII", idt, 16 * vec)
            handler = off_lo | mid << 16 | high << 32
            assert sel == 0x10 and kind & 0x80 and lo <= handler < hi
            assert handler == BASE + IDT_STUB_RVA + 0x40 * vec
        gdt = g.read_virtual(cr3, v.gdtr_base, v.gdtr_limit + 1)
        code = struct.unpack_from("<Q", gdt, 0x10)[0]
        assert code >> 53 & 1 and code >> 47 & 1            # L=1, present: 64-bit kernel code at 0x10
        tss_lo, tss_hi = struct.unpack_from("<QQ", gdt, 0x40)
        tss = (tss_lo >> 16 & 0xFFFFFF) | (tss_lo >> 56 & 0xFF) << 24 | tss_hi << 32
        kpcr = v.msrs[0xC0000101]
        assert [u64(g, kpcr + off) for off in (0x0, 0x8, 0x18, 0x38)] == [v.gdtr_base, tss, kpcr, v.idtr_base]
        assert kpcr >= NONPAGED_POOL_VA
        # the boot state
        assert v.msrs[LSTAR] == BASE + LSTAR_RVA and v.msrs[0xC0000083] == BASE + CSTAR_RVA
        assert lo <= v.msrs[LSTAR] < hi
        assert v.cr0 == 0x80050033
        assert v.cr4 & (1 << 5 | 1 << 7 | 1 << 20 | 1 << 21) == (1 << 5 | 1 << 7 | 1 << 20 | 1 << 21)
        assert v.msrs[EFER_MSR] == 0xD01
        assert v.msrs[0xC0000081] == 0x0023001000000000 and v.sel["cs"] == 0x10 and v.tr == 0x40
    assert len(idts) == len(gdts) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"image_base": BASE + 0x1000}, "2 MiB aligned"),
    ({"image_base": 0xFFFFF78000000000}, "not in the kernel image range"),
    ({"image_base": BASE, "memory": "16M"}, "too small"),
    ({"image_base": BASE, "symbols": POLICIES / "linux-6.1.System.map"}, "not a Windows ISF"),
    ({"image_base": BASE, "symbols": POLICIES / "no-such.isf.json"}, "cannot read symbol file"),
])
def test_bad_layout_input_is_a_clear_error(kwargs, message):
    args = {"symbols": ISF, "memory": "256M", **kwargs}
    with pytest.raises(ValueError, match=message):
        build_windows_x86_64(**args)


def test_isf_without_pdb_identity_cannot_build_the_image(tmp_path):
    with pytest.raises(ValueError, match="no PDB GUID and age"):
        build_windows_x86_64(isf_copy(tmp_path, guid=None), image_base=BASE)


def test_pdb_identity_is_loaded_and_malformed_ones_are_dropped(tmp_path):
    pdb = load_symbol_table(ISF).pdb
    assert (pdb.guid, pdb.age, pdb.database) == (GUID, AGE, "ntkrnlmp.pdb")
    assert load_symbol_table(isf_copy(tmp_path, guid="0x" + GUID[2:])).pdb is None
    assert load_symbol_table(POLICIES / "linux-6.1.System.map").pdb is None


def test_layout_is_registered_for_scenarios(tmp_path):
    g = build_guest("windows-x86_64", symbols=ISF, image_base=BASE, memory="256M", vcpus=1)
    assert g.symbols["PsLoadedModuleList"] == BASE + RVAS["PsLoadedModuleList"]
    sc = load_scenario(SCENARIO)
    assert sc.layout == "windows-x86_64" and sc.vcpus >= 2
    xen = build_scenario(sc)
    assert xen.guest.symbols["KeServiceDescriptorTable"] == sc.kaslr_slide + RVAS["KeServiceDescriptorTable"]
    # the scenario's policy binds to its guest, the image base found, not told
    bound = bind_plan(plan(Path(sc.policy)), xen, load_symbol_table(sc.symbols))
    assert bound.slide == sc.kaslr_slide
    bad = "scenario: x\nguest: {layout: windows-x86_64, kaslr_slide: 0x1000}\nsteps: []\n"
    with pytest.raises(ScenarioError, match="needs guest.symbols"):
        build_scenario(load_scenario_text(bad, str(tmp_path / "x.yaml")))
    bad = (f"scenario: x\nguest: {{layout: windows-x86_64, symbols: {ISF}, kaslr_slide: {BASE + 0x1000:#x}}}\n"
           "steps: []\n")
    with pytest.raises(ScenarioError, match="2 MiB aligned"):
        build_scenario(load_scenario_text(bad, str(tmp_path / "x.yaml")))


# =========================================================================== binding finds the image base

@pytest.mark.parametrize("base", [BASE, 0xFFFFF80000000000, 0xFFFFF8071BE00000, 0xFFFFF87FFEE00000])
def test_image_base_found_without_being_told(symbols, base):
    xen = mk(base)
    bound = bind_plan(plan(), xen, symbols)
    assert bound.slide == base
    ev = bound.slide_evidence
    assert ev["image_base"] == hex(base) and ev["pdb"]["guid"] == GUID
    assert set(ev["pe_scan"]) == {"LSTAR", "IDT vector 3", "IDT vector 13", "IDT vector 14"}
    assert {e["image_base"] for e in ev["pe_scan"].values()} == {hex(base)}
    assert not bound.notes


def test_wrong_guid_symbols_are_refused_with_both_identities(tmp_path):
    # the guest runs another build of ntkrnlmp.pdb; the plan and symbols are for 9074FC2B.../1
    xen = mk(symbols=isf_copy(tmp_path, guid=OTHER_GUID))
    with pytest.raises(BindError) as e:
        bind_plan(plan(), xen, load_symbol_table(ISF))
    msg = str(e.value)
    assert f"the guest runs ntoskrnl with PDB GUID {OTHER_GUID} age 1" in msg
    assert f"the symbols are for {GUID} age 1" in msg and ISF.name in msg


def test_wrong_age_is_a_different_build_too(tmp_path):
    xen = mk(symbols=isf_copy(tmp_path, age=2))
    with pytest.raises(BindError, match=f"PDB GUID {GUID} age 2 .*the symbols are for {GUID} age 1"):
        bind_plan(plan(), xen, load_symbol_table(ISF))


def test_symbols_with_the_guests_guid_bind_when_compiled_against(tmp_path):
    other = isf_copy(tmp_path, guid=OTHER_GUID)
    xen = mk(symbols=other)
    assert bind_plan(plan(policy_copy(tmp_path, other)), xen, load_symbol_table(other)).slide == BASE


def test_isf_without_pdb_identity_is_a_clear_bind_error(tmp_path, symbols):
    anonymous = isf_copy(tmp_path, guid=None)
    with pytest.raises(BindError, match="no PDB GUID and age"):
        bind_plan(plan(policy_copy(tmp_path, anonymous)), mk(), load_symbol_table(anonymous))


def _plant_pe(xen: SimulatedXen, va: int, pa: int, *, guid: str, age: int, name: bytes, size: int = 0x3000) -> None:
    """A small PE32+ image (a driver, say) written with the PE/COFF spec's offsets, mapped at `va`."""
    pt = PageTables(xen.guest.memory, xen.vcpu(0).cr3)
    pt.map(va, pa, size, writable=True, executable=True)
    header = bytearray(PAGE)
    header[:2] = b"MZ"
    struct.pack_into("<I", header, 0x3C, 0x80)
    header[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", header, 0x84, 0x8664, 0, 0, 0, 0, 0xF0, 0x22)
    opt = 0x98
    struct.pack_into("<H", header, opt, 0x20B)
    struct.pack_into("<I", header, opt + 56, size)
    struct.pack_into("<I", header, opt + 108, 16)
    struct.pack_into("<II", header, opt + 112 + 6 * 8, 0x1000, 28)
    debug = bytearray(PAGE)
    struct.pack_into("<IIHHIIII", debug, 0, 0, 0, 0, 0, 2, 24 + len(name) + 1, 0x1040, 0)
    g = bytes.fromhex(guid)
    debug[0x40:0x44] = b"RSDS"
    debug[0x44:0x54] = g[3::-1] + g[5:3:-1] + g[7:5:-1] + g[8:]
    struct.pack_into("<I", debug, 0x54, age)
    debug[0x58:0x58 + len(name)] = name
    xen.guest.memory.write(pa, bytes(header))
    xen.guest.memory.write(pa + PAGE, bytes(debug))


DRIVER_VA, DRIVER_PA = 0xFFFFF8031A000000, 0x4000000
EVIL_GUID = "0123456789ABCDEF0123456789ABCDEF"


def mk_with_evil_driver() -> SimulatedXen:
    """The guest with a second PE image loaded (evil.pdb, not ntoskrnl) for hooks to point into."""
    xen = mk()
    _plant_pe(xen, DRIVER_VA, DRIVER_PA, guid=EVIL_GUID, age=3, name=b"evil.pdb")
    return xen


def test_lstar_into_another_image_is_a_hook(symbols):
    xen = mk_with_evil_driver()
    xen.vcpu(0).msrs[LSTAR] = DRIVER_VA + 0x1800
    with pytest.raises(BindError) as e:
        bind_plan(plan(), xen, symbols)
    msg = str(e.value)
    assert "LSTAR" in msg and "hooked" in msg and "evil.pdb" in msg and hex(BASE) in msg
    # an operator who knows the base can still bind
    assert bind_plan(plan(), xen, symbols, slide=BASE).slide == BASE


def test_lstar_into_pool_is_a_hook(symbols):
    xen = mk()
    xen.vcpu(0).msrs[LSTAR] = NONPAGED_POOL_VA + 0x20
    with pytest.raises(BindError, match=r"LSTAR .* lies in no PE image; the syscall entry is hooked"):
        bind_plan(plan(), xen, symbols)


def test_idt_gate_into_another_image_is_a_hook(symbols):
    xen = mk_with_evil_driver()
    v = xen.vcpu(0)
    h = DRIVER_VA + 0x1100
    gate = struct.pack("<HHBBHII", h & 0xFFFF, 0x10, 0, 0x8E, h >> 16 & 0xFFFF, h >> 32, 0)
    xen.guest.write_virtual(v.cr3, v.idtr_base + 16 * 14, gate)
    with pytest.raises(BindError, match=r"IDT vector 14 .*\(evil\.pdb .*; the IDT is hooked"):
        bind_plan(plan(), xen, symbols)


def test_everything_in_a_foreign_image_finds_no_ntoskrnl(symbols):
    xen = mk_with_evil_driver()
    v = xen.vcpu(0)
    v.msrs[LSTAR] = DRIVER_VA + 0x1800
    v.idtr_base = NONPAGED_POOL_VA + 0x7FF000          # unmapped: no gates to read
    with pytest.raises(BindError, match=f"cannot find ntoskrnl's image base: no PE image with PDB GUID {GUID}"):
        bind_plan(plan(), xen, symbols)


def test_lstar_alone_still_binds_with_a_note(symbols):
    xen = mk()
    v = xen.vcpu(0)
    v.idtr_base = NONPAGED_POOL_VA + 0x7FF000          # IDTR unreadable (vCPU 0 only: the region is per vCPU)
    from policyc.runtime.guest_kernel import GuestSpace, find_slide
    slide, ev, notes = find_slide(xen, [symbols], GuestSpace(xen, v.cr3), xen.get_registers(0), arch="x86_64")
    assert slide == BASE and notes == ["image base from LSTAR only: the IDT gave no cross-check"]
    assert list(ev["pe_scan"]) == ["LSTAR"]


def test_a_page_starting_with_mz_inside_the_image_is_passed_over(symbols):
    xen = mk()
    cr3 = xen.vcpu(0).cr3
    # text pages between the base and LSTAR that begin "MZ": one bare, one with a PE signature but a
    # 32-bit optional header; neither is an image
    a = BASE + LSTAR_RVA - 0x3000
    xen.guest.write_virtual(cr3, a, b"MZ")
    b = BASE + LSTAR_RVA - 0x5000
    fake = bytearray(0x200)
    fake[:2] = b"MZ"
    struct.pack_into("<I", fake, 0x3C, 0x80)
    fake[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", fake, 0x98, 0x10B)
    xen.guest.write_virtual(cr3, b, bytes(fake))
    assert bind_plan(plan(), xen, symbols).slide == BASE


def test_slide_from_a_syscall_entry_symbol_is_checked_against_the_build(tmp_path):
    # with a symbol for the syscall entry (the layout's stand-in RVA: test data, not a real address)
    # the slide comes from LSTAR, and the image there is still checked for the ISF's PDB identity
    named = isf_copy(tmp_path, extra={"KiSystemCall64": LSTAR_RVA})
    bound = bind_plan(plan(policy_copy(tmp_path, named)), mk(), load_symbol_table(named))
    assert bound.slide == BASE and bound.slide_evidence["lstar"]["symbol"] == "KiSystemCall64"
    assert bound.slide_evidence["image"]["pdb"] == f"ntkrnlmp.pdb {GUID} 1"
    other = tmp_path / "other"
    other.mkdir()
    xen = mk(symbols=isf_copy(other, guid=OTHER_GUID))
    with pytest.raises(BindError, match=f"the guest runs ntoskrnl with PDB GUID {OTHER_GUID}"):
        bind_plan(plan(policy_copy(tmp_path, named)), xen, load_symbol_table(named))


# =========================================================================== the plan binds

def test_every_region_of_the_windows_plan_translates_to_the_hardware_walks_frames(symbols):
    xen = mk()
    p = plan()
    bound = bind_plan(p, xen, symbols)
    g = xen.guest
    expected = {
        "service_descriptors": expected_frames(xen, g.symbols["KeServiceDescriptorTable"], 32)
        + expected_frames(xen, g.symbols["KeServiceDescriptorTableShadow"], 64),
        "loaded_modules_head": expected_frames(xen, g.symbols["PsLoadedModuleList"], 16),
        "descriptor_tables": [f for v in g.vcpus for base in (v.idtr_base, v.gdtr_base)
                              for f in expected_frames(xen, base, 4096)],
        "ki_service_table": [], "hal_dispatch": [],       # optional symbols the ISF does not have
    }
    assert set(p["regions"]) == set(expected)
    for name, frames in expected.items():
        assert bound.region_frames(name) == sorted(frames), name
    assert len(bound.region_frames("descriptor_tables")) == 4       # 2 vCPUs x (IDT page + GDT page)
    # the restricted view traps writes on exactly those pages (and the page tables mapping them)
    (restricted,) = [v for v in bound.views.values() if v.role == "restricted"]
    trapped = {gfn for gfn, access in restricted.access.items() if access == "rx"}
    region_gfns = {gfn for frames in expected.values() for gfn, _a, _b in frames}
    assert region_gfns <= trapped and trapped - region_gfns == bound.pt_watch
    assert bound.in_region("descriptor_tables", g.vcpus[1].idtr_base + 0xE0)
    assert not bound.in_region("loaded_modules_head", g.symbols["PsLoadedModuleList"] + 0x10)


def test_golden_windows_plan_binds_the_same(symbols):
    golden = json.loads((ROOT / "tests" / "golden" / "plans" / "windows-kernel-integrity.x86_64.plan.json").read_text())
    xen = mk()
    a, b = bind_plan(golden, xen, symbols), bind_plan(plan(), xen, symbols)
    assert a.slide == b.slide == BASE
    assert {n: a.region_frames(n) for n in golden["regions"]} == {n: b.region_frames(n) for n in golden["regions"]}


# =========================================================================== install + teardown

def test_install_then_teardown_leaves_the_windows_guest_as_it_was(symbols, tmp_path):
    xen = mk()
    before = xen.state_snapshot(memory=True)
    bound = bind_plan(plan(), xen, symbols)
    inst = install(bound, xen, state_dir=tmp_path)
    g = xen.guest
    restricted = bound.default_view()
    assert restricted is not None and all(xen.current_view(i) == inst.view_map[restricted] for i in range(2))
    ksdt_gfn = g.walk(xen.vcpu(0).cr3, g.symbols["KeServiceDescriptorTable"]).pa >> 12
    assert xen.get_access(inst.view_map[restricted], ksdt_gfn) == "rx"
    assert xen.get_access(0, ksdt_gfn) == "rwx"                   # the host p2m is never touched
    assert set(xen.monitors()) >= {"write_ctrlreg", "mov_to_msr", "descriptor_access"}
    inst.teardown()
    inst.teardown()                                               # idempotent
    after = xen.state_snapshot(memory=True)
    differing = [k for k in before if before[k] != after[k]]
    assert not differing, differing
    assert not list(tmp_path.iterdir())


# =========================================================================== the example scenario

def test_example_scenario_passes_under_policyc_test(capsys):
    pytest.importorskip("policyc.runtime.policy_test")       # `policyc test` (the enforcer's runner)
    from policyc.cli import main
    assert main(["test", str(SCENARIO)]) == 0, capsys.readouterr().out
    assert "all passed" in capsys.readouterr().out
