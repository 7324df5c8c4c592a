"""Binding a trap plan to a running guest (runtime/bind.py), against the simulated Xen.

The guest is the simulator's linux-x86_64 layout with a KASLR slide the binder
is not told; expected frames come from the simulated hardware's own page walk
(`Guest.walk`), which is separate code from the binder's walker
(`runtime/paging.PageTables` over `backend.read_physical`).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import pytest

from policyc.runtime.bind import BindError, BoundPlan, bind_plan, intersect_access
from policyc.runtime.paging import PageTables
from policyc.runtime.sim import Guest, SimulatedXen, build_linux_x86_64
from policyc.runtime.sim.layouts import CPU_ENTRY_AREA_IDT
from policyc.symbols import load_symbol_table

from helpers import expected_frames

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "examples" / "policies" / "linux-6.1.System.map"
PLANS = ROOT / "tests" / "golden" / "plans"
SLIDE = 0x1E00000
PAGE = 4096


@functools.lru_cache(maxsize=None)
def _template(slide: int = SLIDE, vcpus: int = 2) -> Guest:
    return build_linux_x86_64(MAP, kaslr_slide=slide, memory="256M", vcpus=vcpus)


def mk(profile: str = "x86_64", slide: int = SLIDE, vcpus: int = 2, **kw) -> SimulatedXen:
    return SimulatedXen(_template(slide, vcpus).clone(), profile, **kw)


@functools.lru_cache(maxsize=None)
def _plan(name: str) -> dict:
    return json.loads((PLANS / name).read_text())


def plan(name: str = "linux-kernel-integrity.x86_64.plan.json") -> dict:
    return copy.deepcopy(_plan(name))


@pytest.fixture(scope="module")
def symbols():
    return load_symbol_table(MAP)


def merged(pieces):
    out = []
    for g, a, b in sorted(pieces):
        if out and out[-1][0] == g and a <= out[-1][2] + 1:
            out[-1] = (g, out[-1][1], max(b, out[-1][2]))
        else:
            out.append((g, a, b))
    return out


# =========================================================================== the slide

@pytest.mark.parametrize("slide", [SLIDE, 0x2A00000, 0])
def test_slide_found_without_being_told(symbols, slide):
    xen = mk(slide=slide)
    bound = bind_plan(plan(), xen, symbols)
    assert bound.slide == slide
    ev = bound.slide_evidence
    assert ev["lstar"]["symbol"] == "entry_SYSCALL_64" and int(ev["lstar"]["slide"], 16) == slide
    # the IDT agreed: three handler votes for the same slide, and IDTR maps idt_table's frame
    assert ev["idt"]["votes"] == {hex(slide): 3}
    assert int(ev["idt_table_frame"], 16) == xen.guest.walk(xen.vcpu(0).cr3, CPU_ENTRY_AREA_IDT).pa >> 12
    assert not bound.notes


def test_hooked_lstar_is_refused_not_believed(symbols):
    xen = mk()
    xen.vcpu(0).msrs[0xC0000082] = 0xFFFFFFFFC0002000        # a rootkit's syscall entry
    with pytest.raises(BindError) as e:
        bind_plan(plan(), xen, symbols)
    assert "LSTAR" in str(e.value) and "hooked" in str(e.value)
    # LSTAR moved by a whole 2 MiB looks like a slide; the IDT disagrees
    xen.vcpu(0).msrs[0xC0000082] = xen.guest.symbols["entry_SYSCALL_64"] + 0x200000
    with pytest.raises(BindError, match="IDT implies"):
        bind_plan(plan(), xen, symbols)
    # an operator who knows the slide can still bind
    assert bind_plan(plan(), xen, symbols, slide=SLIDE).slide == SLIDE


def test_slide_must_be_aligned(symbols):
    xen = mk()
    with pytest.raises(BindError, match="not aligned"):
        bind_plan(plan(), xen, symbols, slide=SLIDE + 0x1000)


def test_idtr_elsewhere_fails_the_cross_check(symbols):
    xen = mk()
    # IDTR pointing at some other mapped page (an attacker's copy of the IDT, say, in the direct map)
    fake = xen.guest.direct_map_base + 0x200000
    table = xen.read_guest(0, CPU_ENTRY_AREA_IDT, 4096)
    xen.guest.memory.write(0x200000, table)
    xen.vcpu(0).idtr_base = fake
    with pytest.raises(BindError, match="IDTR's page"):
        bind_plan(plan(), xen, symbols)


def test_symbol_file_must_be_the_one_the_plan_names(symbols, tmp_path):
    xen = mk()
    other = tmp_path / MAP.name
    shutil.copy(MAP, other)
    with other.open("a") as f:
        f.write("ffffffff81000001 T one_more_symbol\n")
    with pytest.raises(BindError, match="different kernel build"):
        bind_plan(plan(), xen, load_symbol_table(other))
    with pytest.raises(BindError, match="was not given"):
        bind_plan(plan(), xen, [])


def test_mismatched_hosts_are_refused(symbols):
    with pytest.raises(BindError, match="the plan is for arm64 but the host is x86_64"):
        bind_plan(plan("linux-arm64-integrity.arm64.plan.json"), mk(), symbols)
    with pytest.raises(BindError, match="host is x86_64-svm"):
        bind_plan(plan(), mk("x86_64-svm"), symbols)


# =========================================================================== regions -> frames

@pytest.mark.parametrize("name", ["linux-kernel-integrity.x86_64.plan.json",
                                  "linux-descriptors-and-msrs.x86_64.plan.json",
                                  "linux-exec-from-data.x86_64.plan.json"])
def test_every_region_binds_to_the_frames_the_hardware_walk_gives(symbols, name):
    xen = mk()
    p = plan(name)
    bound = bind_plan(p, xen, symbols)
    g = xen.guest
    for region, body in p["regions"].items():
        want = []
        for ext in body["extents"]:
            start, size = int(ext["start"], 16), int(ext["size"], 16)
            if ext["percpu"]:
                for base in g.percpu_base:
                    want += expected_frames(xen, base + start, size)
            else:
                want += expected_frames(xen, start + (SLIDE if ext["relocatable"] else 0), size)
        assert bound.region_frames(region) == merged(want), region
        assert len({gfn for gfn, _, _ in bound.region_frames(region)}) >= 1


def test_syscall_table_frames_and_sub_page_offsets(symbols):
    xen = mk()
    bound = bind_plan(plan(), xen, symbols)
    va = xen.guest.symbols["sys_call_table"]
    pa = xen.guest.walk(xen.vcpu(0).cr3, va).pa
    assert bound.region_frames("syscalls") == [(pa >> 12, 0x360, 0xFFF), ((pa >> 12) + 1, 0, 0x177)]
    assert bound.in_region("syscalls", va) and bound.in_region("syscalls", va + 0xE17)
    assert not bound.in_region("syscalls", va - 1) and not bound.in_region("syscalls", va + 0xE18)
    assert not bound.in_region("no_such_region", va)


def test_percpu_regions_use_each_vcpus_gs_base(symbols):
    xen = mk()
    bound = bind_plan(plan("linux-descriptors-and-msrs.x86_64.plan.json"), xen, symbols)
    g = xen.guest
    assert [bound.percpu_base(i) for i in range(2)] == g.percpu_base
    gdt = [g.walk(xen.vcpu(i).cr3, g.percpu_base[i] + 0xB000).pa >> 12 for i in range(2)]
    assert [f[0] for f in bound.region_frames("gdt")] == sorted(gdt)
    assert bound.in_region("gdt", g.percpu_base[1] + 0xB010)
    # a vCPU in user mode: GS_BASE is the user's, the kernel's is in KERNEL_GS_BASE (swapgs)
    xen2 = mk()
    v = xen2.vcpu(1)
    v.msrs[0xC0000102], v.msrs[0xC0000101] = v.msrs[0xC0000101], 0x7F0000001000
    bound2 = bind_plan(plan("linux-descriptors-and-msrs.x86_64.plan.json"), xen2, symbols)
    assert bound2.percpu_base(1) == g.percpu_base[1]


def test_unmapped_region_is_an_error_naming_it(symbols):
    xen = mk()
    p = plan()
    # init memory is freed (unmapped) after boot in this layout; and one absolute module address
    init = int(load_symbol_table(MAP).lookup("__init_begin").address)
    p["regions"]["init_data"] = {"extents": [{"space": "va", "start": hex(init), "size": "0x10",
                                              "relocatable": True, "percpu": False}], "pages": 1}
    p["regions"]["module_hook"] = {"extents": [{"space": "va", "start": "0xffffffffc0001000", "size": "0x8",
                                                "relocatable": False, "percpu": False}], "pages": 1}
    with pytest.raises(BindError) as e:
        bind_plan(p, xen, symbols)
    err = e.value
    assert err.region == "init_data" and err.address == init + SLIDE
    assert {f.region for f in err.failures} == {"init_data", "module_hook"}
    assert "region 'init_data'" in str(err) and "not present" in str(err)
    mod = next(f for f in err.failures if f.region == "module_hook")
    assert mod.address == 0xFFFFFFFFC0001000


def test_a_region_partly_mapped_is_an_error_too(symbols):
    xen = mk()
    p = plan()
    etext = load_symbol_table(MAP).lookup("_etext").address
    # runs from the last page of text into the hole after it
    p["regions"]["syscalls"]["extents"][0].update(start=hex(etext - 0x10), size=hex(0x3000))
    with pytest.raises(BindError) as e:
        bind_plan(p, xen, symbols)
    assert e.value.region == "syscalls" and e.value.address > etext + SLIDE


def test_idt_register_extent_maps_idt_tables_frame_through_the_cea_alias(symbols):
    xen = mk()
    p = plan()
    p["regions"]["descriptor_tables"] = {"extents": [{"register": "idtr", "size": "0x1000"},
                                                     {"register": "gdtr", "size": "0x80"}], "pages": None}
    p["views"][2]["ranges"].append({"region": "descriptor_tables", "access": "rx", "traps": "w",
                                    "rules": ["protect_tables"]})
    bound = bind_plan(p, xen, symbols)
    g = xen.guest
    idt_frame = g.walk(xen.vcpu(0).cr3, g.symbols["idt_table"]).pa >> 12
    gdt_frames = {g.walk(xen.vcpu(0).cr3, g.percpu_base[i] + 0xB000).pa >> 12 for i in range(2)}
    frames = bound.region_frames("descriptor_tables")
    assert idt_frame in {f for f, _, _ in frames}
    assert {f for f, _, _ in frames} == {idt_frame} | gdt_frames
    assert (idt_frame, 0, 0xFFF) in frames                      # both vCPUs' IDTR: the same frame, merged
    # the symbolic idt region and the register one protect the same page
    assert bound.region_frames("idt") == [(idt_frame, 0, 0xFFF)]
    assert bound.in_region("descriptor_tables", CPU_ENTRY_AREA_IDT + 0x80)
    assert bound.view_access(2)[idt_frame] == "rx"
    # the alias's page-table pages are watched along with idt_table's
    alias_walk = g.walk(xen.vcpu(0).cr3, CPU_ENTRY_AREA_IDT)
    assert {gfn for gfn, _ in alias_walk.reads} <= bound.pt_watch


# =========================================================================== views

def test_views_intersect_overlapping_ranges_per_page(symbols):
    xen = mk()
    p = plan()
    p["regions"]["syscall_slot"] = {"extents": [{"space": "va", "start": hex(0xFFFFFFFF82000360 + 8 * 59),
                                                 "size": "0x8", "relocatable": True, "percpu": False}],
                                    "pages": 1}
    # the same page: rx from the table, rw from the slot -> r
    p["views"][2]["ranges"].append({"region": "syscall_slot", "access": "rw", "traps": "x", "rules": ["x"]})
    rodata = next(r for r in p["views"][2]["ranges"] if r["region"] == "rodata")
    p["views"][2]["ranges"].remove(rodata)
    bound = bind_plan(p, xen, symbols)
    first, second = [g for g, _, _ in bound.region_frames("syscalls")]
    acc = bound.view_access(2)
    assert acc[first] == "r" and acc[second] == "rx"
    # with rodata (rw: execute traps), which contains the table, every page of it is r
    p["views"][2]["ranges"].append(rodata)
    acc = bind_plan(p, mk(), symbols).view_access(2)
    assert acc[first] == acc[second] == "r"
    assert sum(1 for a in acc.values() if a == "rw") > 2000
    # unrestricted and host views restrict nothing
    assert bound.view_access(0) == {} and bound.view_access(1) == {}
    assert bound.default_view() == 2


def test_intersection_never_leaves_write_without_read_on_x86():
    assert intersect_access("rw", "wx") == "n"
    assert intersect_access("rw", "wx", x86=False) == "w"
    assert intersect_access("rwx", "rx") == "rx" and intersect_access("x", "rx") == "x"


def test_page_table_frames_of_protected_pages_are_write_trapped(symbols):
    xen = mk()
    bound = bind_plan(plan(), xen, symbols)
    g = xen.guest
    walk = g.walk(xen.vcpu(0).cr3, g.symbols["sys_call_table"])
    tables = {gfn for gfn, _ in walk.reads}                      # PML4, PDPT, PD (a 2 MiB page)
    assert len(tables) == 3 and tables <= bound.pt_watch
    acc = bound.view_access(2)
    for gfn in tables:
        assert acc[gfn] == "rx"
    pml4 = xen.vcpu(0).cr3 >> 12
    assert "syscalls" in bound.pt_entry_users(pml4) and "idt" in bound.pt_entry_users(pml4)
    pd_gfn, pd_off = walk.reads[-1]
    assert "syscalls" in bound.pt_entry_users(pd_gfn, pd_off)
    assert bound.pt_entry_users(pd_gfn, (pd_off + 0x100) % 4096) == set()   # a neighbour's PDE
    # the unrestricted view watches nothing: accesses are stepped there
    assert bound.view_access(1) == {}


def test_breakpoint_sites_by_virtual_and_physical_address(symbols):
    xen = mk()
    bound = bind_plan(plan(), xen, symbols)
    g = xen.guest
    va = g.symbols["commit_creds"]
    pa = g.walk(xen.vcpu(0).cr3, va).pa
    assert bound.breakpoint_sites() == {va: "bp0", pa: "bp0"}
    bp = bound.breakpoints[0]
    assert (bp.gfn, bp.offset, bp.views, bp.step_view) == (pa >> 12, pa & 0xFFF, (2,), 1)
    assert bound.breakpoint_insn_bytes("bp0") == b"\x90" * 16        # the layout's text is NOPs
    # the site's page tables are watched too (a remapped text page would move the breakpoint)
    assert {gfn for gfn, _ in g.walk(xen.vcpu(0).cr3, va).reads} <= bound.pt_watch


def test_bound_plan_is_the_decision_engines_binding(symbols):
    from policyc.runtime.decide import Binding, DecisionEngine
    xen = mk()
    p = plan()
    bound = bind_plan(p, xen, symbols)
    assert isinstance(bound, Binding)
    engine = DecisionEngine(p, bound)
    assert {g for g, _, _ in bound.region_frames("syscalls")} <= engine.trapped_gfns


def test_svm_plan_binds_inline_breakpoints_without_views(symbols):
    xen = mk("x86_64-svm", slide=0)       # the policy's `execute va 0xffffffff81c00080` is not slid
    bound = bind_plan(plan("linux-syscall-tracing.x86_64-svm.plan.json"), xen, symbols)
    assert bound.views == {} and bound.pt_watch == frozenset()
    assert len(bound.breakpoints) == 7 and all(b.mechanism == "int3-inline-emulate" for b in bound.breakpoints)
    site = next(b for b in bound.breakpoints if b.id == "bp6")
    assert site.address == xen.guest.symbols["entry_SYSCALL_64"]


# =========================================================================== rebinding

def test_rebind_follows_a_remap_of_a_protected_page(symbols):
    xen = mk()
    bound = bind_plan(plan(), xen, symbols)
    g = xen.guest
    va = g.symbols["sys_call_table"]
    old = [f for f, _, _ in bound.region_frames("syscalls")]
    pt = PageTables(g.memory, xen.vcpu(0).cr3)
    new_pt = pt.split(va) >> 12                                    # a 4 KiB table now maps the page
    pt.set_pte(va, 0x200000)                                       # and its PTE points elsewhere
    delta = bound.rebind(xen)
    assert delta.regions["syscalls"][1] == [(0x200, 0x360, 0xFFF), (old[1], 0, 0x177)]
    assert bound.region_frames("syscalls")[0][0] == 0x200
    v2 = delta.views[2]
    # the page is in rodata (rw) and the table (rx): r, now on the new frame; the old one is free
    assert v2[0x200] == (None, "r") and v2[old[0]] == ("r", None)
    assert delta.regions["rodata"][1][0] == (0x200, 0, 0xFFF)
    assert new_pt in delta.pt_added and new_pt in bound.pt_watch
    assert bound.view_access(2)[new_pt] == "rx"
    assert not delta.unmapped
    # nothing changed: an empty delta
    assert not bound.rebind(xen)


def test_rebind_keeps_old_frames_of_a_region_that_vanished(symbols):
    xen = mk()
    bound = bind_plan(plan(), xen, symbols)
    frames = bound.region_frames("idt")
    pt = PageTables(xen.guest.memory, xen.vcpu(0).cr3)
    va = xen.guest.symbols["idt_table"]
    if pt.translate(va).page_size != PAGE:
        pt.split(va)
    pt.unmap(va & ~0xFFF, 0x1000)
    delta = bound.rebind(xen)
    assert [f.region for f in delta.unmapped] == ["idt"]
    assert bound.region_frames("idt") == frames
    assert isinstance(bound, BoundPlan) and bound.slide == SLIDE


def test_binding_walks_the_kernels_own_tables_when_vcpu0_runs_a_process(symbols):
    xen = mk()
    g = xen.guest
    kernel_pgd = xen.vcpu(0).cr3
    # a process's PGD: a copy of the kernel's (the kernel half is shared, as in Linux)
    proc = g.memory.alloc_frame() << 12
    g.memory.write(proc, g.memory.read(kernel_pgd, 4096))
    xen.vcpu(0).cr3 = proc
    bound = bind_plan(plan(), xen, symbols)
    assert bound.cr3 == kernel_pgd and bound.slide == SLIDE
    assert any("init_top_pgt" in n for n in bound.notes)
    assert kernel_pgd >> 12 in bound.pt_watch and proc >> 12 not in bound.pt_watch


def test_breakpoints_by_symbol_move_with_the_slide_but_literal_va_and_pa_do_not(symbols, tmp_path):
    from policyc.check import check_policy
    from policyc.diagnostics import Diagnostics
    from policyc.compiler import compile_plan

    xen = mk()
    g = xen.guest
    cc = g.symbols["commit_creds"]                                  # already slid
    entry_pa = g.walk(xen.vcpu(0).cr3, g.symbols["entry_SYSCALL_64"]).pa
    src = tmp_path / "bp.vmi"
    shutil.copy(MAP, tmp_path / MAP.name)
    src.write_text(f'''policy "bp" {{
    target xen >= 4.17 on x86_64
    symbols "{MAP.name}"
    rule by_symbol: on execute symbol commit_creds {{ log info "s" }}
    rule by_va: on execute va {cc + 0x10:#x} {{ log info "v" }}
    rule by_pa: on execute pa {entry_pa:#x} {{ log info "p" }}
}}
''')
    d = Diagnostics()
    plan = compile_plan(check_policy(src, d), d)
    assert plan is not None, [x.message for x in d]
    sites = {s["rules"][0]: s for s in plan["breakpoints"]}
    assert sites["by_symbol"]["relocatable"] and not sites["by_va"]["relocatable"]
    assert sites["by_pa"]["physical"] and not sites["by_pa"]["relocatable"]
    bound = bind_plan(plan, xen, load_symbol_table(tmp_path / MAP.name))
    by_id = {b.id: b for b in bound.breakpoints}
    assert by_id[sites["by_symbol"]["id"]].address == cc                      # link-time + slide
    assert by_id[sites["by_va"]["id"]].address == cc + 0x10                   # as written
    phys = by_id[sites["by_pa"]["id"]]
    assert (phys.gfn, phys.offset) == (entry_pa >> 12, entry_pa & 0xFFF)      # no translation


def test_vcpu_in_user_mode_under_pti_binds_through_the_kernel_half(symbols):
    """A kernel with page-table isolation (every Intel CPU before Cascade Lake) runs user code on
    the user half of an 8 KiB PGD pair, where the kernel image is not mapped: only the entry text
    and the CPU entry area are. vCPU 0 paused in user mode is the common case on a busy guest; the
    binder then walks the kernel half (CR3 with bit 12 clear), and says so."""
    xen = mk()
    g = xen.guest
    kernel_cr3 = xen.vcpu(0).cr3
    assert not kernel_cr3 & PAGE
    g.memory.write(kernel_cr3 + PAGE, bytes(PAGE))
    user = PageTables(g.memory, kernel_cr3 + PAGE)
    entry = g.symbols["entry_SYSCALL_64"] & ~(PAGE - 1)
    for va, x in ((entry, True), (CPU_ENTRY_AREA_IDT, False)):
        user.map(va, g.walk(kernel_cr3, va).pa & ~(PAGE - 1), PAGE, PAGE, writable=False, executable=x,
                 global_=True)
    with pytest.raises(Exception):
        g.walk(kernel_cr3 + PAGE, g.symbols["sys_call_table"])    # the table is not mapped there
    xen.vcpu(0).cr3 = kernel_cr3 + PAGE
    bound = bind_plan(plan(), xen, symbols)
    assert bound.slide == SLIDE
    assert any("page-table isolation" in n for n in bound.notes), bound.notes
    ref = bind_plan(plan(), mk(), symbols)
    assert all(bound.region_frames(r) == ref.region_frames(r) for r in plan()["regions"])
    assert bound.pt_watch == ref.pt_watch
    # a CR3 with bit 12 set whose kernel half is no better is still refused, not guessed at
    xen.vcpu(0).cr3 = kernel_cr3 + 3 * PAGE
    with pytest.raises(BindError):
        bind_plan(plan(), xen, symbols)
