"""Semantic tests of the simulated Xen: one per response flag and per caveat.

Each test asserts what the guest observes (memory, registers, paused state)
and what the ring carried (decoded with `abi.parse_request`). The semantics
are Xen 4.17's as docs/XEN-SEMANTICS.md cites them from the source.
"""

from __future__ import annotations

import errno
import functools
import struct
from pathlib import Path

import pytest

from policyc.native import abi
from policyc.runtime.backend import Backend, BackendError, InvalidArgument, Unsupported
from policyc.runtime.paging import PAGE_1G, PAGE_2M, PAGE_4K, PageTables
from policyc.runtime.sim import Guest, Op, SimulatedXen, build_linux_x86_64, echo_response
from policyc.runtime.sim.layouts import CPU_ENTRY_AREA_IDT, DEFAULT_PAGE_OFFSET

MAP = Path(__file__).resolve().parents[1] / "examples" / "policies" / "linux-6.1.System.map"
SLIDE = 0x1E00000
F = abi.Flag
MA = abi.MemAccess
RS = abi.Reason
WP = 1 << 16


@functools.lru_cache(maxsize=None)
def _template(vcpus: int) -> Guest:
    return build_linux_x86_64(MAP, kaslr_slide=SLIDE, memory="256M", vcpus=vcpus)


def mk(profile: str = "x86_64", vcpus: int = 2, **kw) -> SimulatedXen:
    return SimulatedXen(_template(vcpus).clone(), profile, **kw)


def sym(xen: SimulatedXen, name: str) -> int:
    return xen.guest.symbols[name]


def gfn_of(xen: SimulatedXen, va: int) -> int:
    return xen.guest.walk(xen.vcpu(0).cr3, va).pa >> 12


def u64(xen: SimulatedXen, va: int, vcpu: int = 0) -> int:
    return int.from_bytes(xen.read_guest(vcpu, va, 8), "little")


def take(xen: SimulatedXen) -> list[abi.Request]:
    return [abi.parse_request(r) for r in xen.take_requests(8)]


def answer(xen: SimulatedXen, reqs: list[abi.Request], raw: list[bytes]) -> None:
    xen.put_responses(raw)
    xen.notify()


def reply(xen: SimulatedXen, flags: int = 0, **kw) -> list[abi.Request]:
    """Take every request and answer each with the xen-access echo plus ``flags``."""
    reqs = take(xen)
    answer(xen, reqs, [_rsp(r, flags, **kw) for r in reqs])
    return reqs


def _rsp(req: abi.Request, flags: int, **kw) -> bytes:
    if not kw:
        return echo_response(req.raw, flags)
    fields = {}
    member = abi.PAYLOAD_MEMBER.get(req.reason_name or "")
    if member and req.payload:
        fields[f"u.{member}"] = req.payload
    fields.update(kw.pop("fields", {}))
    fast = kw.pop("fast_singlestep_p2midx", None)
    if fast is not None:      # shares the union with u.mem_access: written after the echo
        fields["u.fast_singlestep.p2midx"] = fast
        flags |= F.FAST_SINGLESTEP
    return abi.make_response(req, flags=flags, fields=fields, **kw).raw


def writable_syscall_table(xen: SimulatedXen, vcpu: int = 0) -> int:
    """Trap writes to sys_call_table's first page; clear WP as a rootkit would."""
    va = sym(xen, "sys_call_table")
    xen.set_access(0, [gfn_of(xen, va)], "rx")
    xen.vcpu(vcpu).cr0 &= ~WP
    return va


# =========================================================================== the layout

def test_backend_protocol_and_capabilities():
    xen = mk()
    assert isinstance(xen, Backend)
    caps = xen.capabilities()
    assert (caps.arch, caps.vm_event_version, caps.vcpus, caps.ring_slots) == ("x86_64", 7, 2, 8)
    assert caps.mem_access and caps.altp2m and caps.singlestep and caps.max_views == 10
    assert "singlestep" in caps.monitors and "privileged_call" not in caps.monitors
    svm = mk("x86_64-svm").capabilities()
    assert not (svm.mem_access or svm.altp2m or svm.singlestep) and svm.max_views == 0
    assert "singlestep" not in svm.monitors and "software_breakpoint" in svm.monitors
    arm = mk("arm64").capabilities()
    assert arm.mem_access and not arm.altp2m and not arm.singlestep
    assert arm.monitors == {"guest_request", "privileged_call"}


def test_layout_registers_as_a_booted_kernel():
    xen = mk(vcpus=2)
    g = xen.guest
    table_pa = g.walk(xen.vcpu(0).cr3, sym(xen, "init_top_pgt")).pa
    for i in range(2):
        r = xen.get_registers(i)
        assert r["msr_lstar"] == sym(xen, "entry_SYSCALL_64") == 0xFFFFFFFF81C00080 + SLIDE
        assert r["idtr_base"] == CPU_ENTRY_AREA_IDT and r["idtr_limit"] == 0xFFF
        assert r["gs_base"] == g.percpu_base[i]
        assert r["gdtr_base"] == g.percpu_base[i] + 0xB000 and r["gdtr_limit"] == 0x7F
        assert r["cr0"] & 0x80010001 == 0x80010001            # PG | WP | PE
        assert r["cr4"] & 0x3000A0 == 0x3000A0                # SMAP | SMEP | PGE | PAE
        assert r["msr_efer"] & 0xD01 == 0xD01                 # NXE | LMA | LME | SCE
        assert r["cr3"] == table_pa                           # CR3 = init_top_pgt's frame
    assert g.percpu_base[0] != g.percpu_base[1]
    assert g.percpu_base[0] >= DEFAULT_PAGE_OFFSET
    # GDT: __KERNEL_CS at 0x10 in each vCPU's own gdt_page
    for i in range(2):
        raw = xen.read_guest(i, xen.get_registers(i)["gdtr_base"] + 0x10, 8)
        assert int.from_bytes(raw, "little") == 0x00AF9B000000FFFF
    # __per_cpu_offset holds the areas
    offs = xen.read_guest(0, sym(xen, "__per_cpu_offset"), 16)
    assert struct.unpack("<2Q", offs) == tuple(g.percpu_base)


def test_layout_permissions_follow_the_sections():
    xen = mk()
    g, cr3 = xen.guest, xen.vcpu(0).cr3
    text = g.walk(cr3, sym(xen, "commit_creds"))
    assert text.executable and not text.writable and text.page_size == PAGE_2M
    assert text.pa == 0x10D3BC0 + SLIDE                  # physical slide = virtual slide
    ro = g.walk(cr3, sym(xen, "sys_call_table"))
    assert not ro.executable and not ro.writable
    data = g.walk(cr3, sym(xen, "init_task"))
    assert data.writable and not data.executable
    bss = g.walk(cr3, sym(xen, "selinux_state"))
    assert bss.writable and not bss.executable
    etext_page = g.walk(cr3, sym(xen, "_etext"))
    assert etext_page.page_size == PAGE_4K and etext_page.executable
    with pytest.raises(Exception):                          # init memory is freed after boot
        g.walk(cr3, sym(xen, "_sinittext"))
    # the direct map: RW, NX, large pages, maps physical 0 at page_offset_base
    dm = g.walk(cr3, DEFAULT_PAGE_OFFSET + 0x1234567)
    assert dm.pa == 0x1234567 and dm.writable and not dm.executable and dm.page_size == PAGE_2M
    # the read-only IDT alias maps idt_table's frame
    alias = g.walk(cr3, CPU_ENTRY_AREA_IDT)
    assert not alias.writable and alias.pa == g.walk(cr3, sym(xen, "idt_table")).pa
    gate = xen.read_guest(0, CPU_ENTRY_AREA_IDT + 3 * 16, 16)
    lo, sel, _ist, typ, mid, hi, _ = struct.unpack("<HHBBHII", gate)
    assert sel == 0x10 and typ == 0x8E and lo | mid << 16 | hi << 32 == sym(xen, "asm_exc_int3")
    # text holds instructions; the syscall table points into text; phys_base is the slide
    assert xen.read_guest(0, sym(xen, "commit_creds"), 4) == b"\x90" * 4
    assert u64(xen, sym(xen, "sys_call_table") + 8 * 59) == sym(xen, "__x64_sys_execve")
    assert u64(xen, sym(xen, "phys_base")) == SLIDE


def test_walker_agrees_with_page_tables_on_4k_2m_1g():
    g = Guest(2 << 30, 1)
    pt = PageTables(g.memory)
    pt.map(0xFFFF888000000000, 0, PAGE_1G, PAGE_1G, writable=True)
    pt.map(0xFFFFFFFF80000000, 0x40000000, PAGE_2M, PAGE_2M, executable=True, writable=False)
    pt.map(0x400000, 0x7000, PAGE_4K, PAGE_4K, writable=True, user=True)
    for va in (0xFFFF888000000000 + 0x12345678, 0xFFFFFFFF80000000 + 0x1FFFFF, 0x400ABC):
        a, b = pt.translate(va), g.walk(pt.cr3, va)
        assert (a.pa, a.page_size, a.writable, a.executable, a.user) == \
               (b.pa, b.page_size, b.writable, b.executable, b.user)
        assert [s.entry_address for s in pt.walk(va)] == [gfn << 12 | off for gfn, off in b.reads]


# =========================================================================== mem_access

def test_write_violation_is_reported_w_r_and_pauses_until_the_response():
    xen = mk()
    va = writable_syscall_table(xen)
    target = va + 8 * 59
    before = u64(xen, target)
    op = xen.write(0, target, 0xFFFFFFFFC0001000, rip=0xFFFFFFFFC0000010)
    assert not op.done and xen.paused_vcpus() == {0}
    assert u64(xen, target) == before                       # nothing landed yet
    reqs = take(xen)
    assert len(reqs) == 1 and op.requests == [reqs[0].raw]
    r = reqs[0]
    assert r.reason == RS.MEM_ACCESS and r.version == 7 and r.vcpu_id == 0
    assert r.flags & F.VCPU_PAUSED and not r.flags & F.ALTERNATE_P2M
    p = r.payload
    assert p["flags"] == MA.R | MA.W | MA.GLA_VALID | MA.FAULT_WITH_GLA   # W|R since Xen 4.5
    assert p["gfn"] == gfn_of(xen, target) and p["offset"] == target & 0xFFF and p["gla"] == target
    assert r.regs["rip"] == 0xFFFFFFFFC0000010 and r.regs["cr3"] == xen.vcpu(0).cr3
    assert r.regs["msr_lstar"] == sym(xen, "entry_SYSCALL_64") and r.regs["cr0"] & WP == 0
    assert r.regs["cs_sel"] == 0x10 and r.regs["gs_base"] == xen.guest.percpu_base[0]
    # the slot in the shared page holds exactly these bytes
    assert xen.ring.slot_bytes(0) == r.raw


def test_read_and_execute_violations_carry_r_and_x():
    xen = mk()
    va = sym(xen, "commit_creds")
    xen.set_access(0, [gfn_of(xen, va)], "n")
    xen.read(0, va + 8, size=4)
    xen.exec_at(1, va)
    reqs = take(xen)
    assert [r.payload["flags"] & MA.RWX for r in reqs] == [MA.R, MA.X]
    assert [r.vcpu_id for r in reqs] == [0, 1] and reqs[0].payload["offset"] == (va + 8) & 0xFFF
    assert reqs[1].regs["rip"] == va
    assert xen.paused_vcpus() == {0, 1}


def test_permissions_are_per_page_so_sub_page_neighbours_trap_too():
    xen = mk()
    va = writable_syscall_table(xen)
    page = va & ~0xFFF
    xen.write(0, page + 0x10, 7, size=1)                    # outside sys_call_table, same page
    (r,) = reply(xen, F.EMULATE)
    assert r.payload["offset"] == 0x10 and r.payload["gfn"] == gfn_of(xen, va)
    assert xen.read_guest(0, page + 0x10, 1) == b"\x07"


def test_fault_in_guest_page_table_walk():
    xen = mk()
    va = sym(xen, "init_task")
    walk = xen.guest.walk(xen.vcpu(0).cr3, va)
    pd_gfn, pd_off = walk.reads[2]                          # the PD holding init_task's 2M entry
    xen.set_access(0, [pd_gfn], "n")
    op = xen.read(0, va)
    (r,) = take(xen)
    p = r.payload
    assert p["flags"] == MA.R | MA.GLA_VALID | MA.FAULT_IN_GPT
    assert (p["gfn"], p["offset"], p["gla"]) == (pd_gfn, pd_off, va)
    answer(xen, [r], [_rsp(r, F.EMULATE)])
    assert op.done and op.took_effect and op.emulated


def test_guest_page_fault_comes_before_ept_and_wp_matters():
    xen = mk()
    va = sym(xen, "sys_call_table")
    xen.set_access(0, [gfn_of(xen, va)], "rx")
    op = xen.write(0, va, 0x41)                             # .rodata is read-only, CR0.WP set
    assert op.done and not op.took_effect and xen.unconsumed_requests() == 0
    (fault,) = op.faults
    assert (fault.name, fault.error_code, fault.address) == ("#PF", 0x3, va)
    assert xen.vcpu(0).cr2 == va
    xen.vcpu(0).cr0 &= ~WP                                  # a rootkit clears WP first
    op = xen.write(0, va, 0x41)
    assert not op.done and xen.unconsumed_requests() == 1   # now EPT sees the write


def test_altp2m_requests_carry_the_view():
    xen = mk()
    va = writable_syscall_table(xen)
    xen.altp2m_set_state(True)
    view = xen.create_view()
    xen.set_access(view, [gfn_of(xen, va)], "rx")
    xen.switch_view(view)
    xen.write(0, va, 1)
    (r,) = take(xen)
    assert r.flags & F.ALTERNATE_P2M and r.altp2m_idx == view


# =========================================================================== response flags

def test_emulate_completes_the_write_without_relaxing_access():
    xen = mk()
    va = writable_syscall_table(xen) + 8 * 59
    op = xen.write(0, va, 0xFFFFFFFFC0001000, rip=0xFFFFFFFFC0000010)
    reply(xen, F.EMULATE)
    assert op.done and op.took_effect and op.emulated and not xen.paused_vcpus()
    assert u64(xen, va) == 0xFFFFFFFFC0001000
    assert xen.vcpu(0).rip == 0xFFFFFFFFC0000010 + op.insn_len
    assert xen.get_access(0, gfn_of(xen, va)) == "rx"
    xen.write(0, va, 0)                                     # still trapped
    assert xen.unconsumed_requests() == 1


def _without_u(response: abi.Response) -> abi.Response:
    """A response whose `u` union was not echoed (make_response echoes it; a careless agent might not)."""
    raw = bytearray(response.raw)
    raw[24:56] = bytes(32)  # u: offset 24, 32 bytes in interface version 7
    return abi.parse_response(bytes(raw))


def test_make_response_echoes_the_union_xen_reads_back():
    xen = mk()
    va = writable_syscall_table(xen) + 8 * 59
    xen.write(0, va, 0xDEAD)
    (r,) = take(xen)
    echoed = abi.make_response(r, flags=F.EMULATE)
    assert echoed.get("u.mem_access.gfn") == r.payload["gfn"] != 0
    assert echoed.get("u.mem_access.flags") == r.payload["flags"]


def test_emulate_is_ignored_unless_the_response_echoes_u_mem_access():
    xen = mk()
    va = writable_syscall_table(xen) + 8 * 59
    before = u64(xen, va)
    op = xen.write(0, va, 0xDEAD)
    (r,) = take(xen)
    bare = _without_u(abi.make_response(r, flags=F.EMULATE))   # echoes only the header
    assert bare.get("u.mem_access.gfn") == 0
    answer(xen, [r], [bare.raw])
    assert not op.done and u64(xen, va) == before           # re-executed and faulted again
    (again,) = take(xen)
    assert again.payload == r.payload and xen.paused_vcpus() == {0}


def test_emulate_after_the_monitor_relaxed_access_runs_natively():
    xen = mk()
    va = writable_syscall_table(xen)
    op = xen.write(0, va, 5)
    (r,) = take(xen)
    xen.set_access(0, [r.payload["gfn"]], "rwx")
    answer(xen, [r], [_rsp(r, F.EMULATE)])
    assert op.done and op.took_effect and not op.emulated and u64(xen, va) == 5


def test_emulate_nowrite_discards_the_write_and_retires_the_instruction():
    xen = mk()
    va = writable_syscall_table(xen) + 8 * 59
    before = u64(xen, va)
    op = xen.write(0, va, 0xFFFFFFFFC0001000, rip=0xFFFFFFFFC0000010)
    reply(xen, F.EMULATE | F.EMULATE_NOWRITE)
    assert op.done and not op.took_effect and u64(xen, va) == before
    assert xen.vcpu(0).rip == 0xFFFFFFFFC0000010 + op.insn_len and not xen.paused_vcpus()


def test_set_emul_read_data_feeds_the_read():
    xen = mk()
    va = sym(xen, "sys_call_table")
    xen.set_access(0, [gfn_of(xen, va)], "n")
    op = xen.read(0, va, size=8)
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, 0, emul_read=b"\x11\x22\x33")])   # 3 bytes: the rest reads as zero
    assert op.done and op.result == 0x332211 and xen.vcpu(0).gpr["rax"] == 0x332211
    assert u64(xen, va) == sym(xen, "x64_sys_call")           # memory untouched


def test_read_data_takes_precedence_over_nowrite():
    xen = mk()
    va = writable_syscall_table(xen)
    op = xen.write(0, va, 0x99)
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, F.EMULATE_NOWRITE, emul_read=b"\0")])
    assert op.done and op.took_effect and u64(xen, va) == 0x99  # the write was NOT discarded


def test_deny_refuses_a_cr0_wp_clear():
    xen = mk()
    xen.monitor_write_ctrlreg("cr0", True, sync=True)
    old = xen.vcpu(0).cr0
    op = xen.write_cr(0, "cr0", old & ~WP, rip=0xFFFFFFFFC0000020)
    assert not op.done and xen.paused_vcpus() == {0}
    (r,) = take(xen)
    assert r.reason == RS.WRITE_CTRLREG and r.flags & F.VCPU_PAUSED
    assert r.payload["index"] == abi.CtrlReg.CR0
    assert (r.payload["old_value"], r.payload["new_value"]) == (old, old & ~WP)
    assert r.regs["cr0"] == old and r.regs["rip"] == 0xFFFFFFFFC0000020
    answer(xen, [r], [_rsp(r, F.DENY)])
    assert op.done and not op.took_effect and xen.vcpu(0).cr0 == old
    assert xen.vcpu(0).rip == 0xFFFFFFFFC0000020 + op.insn_len     # MOV CR retired anyway


def test_deny_refuses_an_lstar_write_and_without_deny_it_lands():
    xen = mk()
    xen.monitor_mov_to_msr(0xC0000082, True)
    lstar = xen.get_registers(1)["msr_lstar"]
    op = xen.wrmsr(1, "LSTAR", 0xFFFFFFFFC0002000)
    (r,) = take(xen)
    assert r.reason == RS.MOV_TO_MSR and r.vcpu_id == 1
    assert r.payload == {"msr": 0xC0000082, "new_value": 0xFFFFFFFFC0002000, "old_value": lstar}
    answer(xen, [r], [_rsp(r, F.DENY)])
    assert op.done and not op.took_effect and xen.get_registers(1)["msr_lstar"] == lstar
    op = xen.wrmsr(1, "LSTAR", 0xFFFFFFFFC0002000)
    reply(xen)
    assert op.took_effect and xen.get_registers(1)["msr_lstar"] == 0xFFFFFFFFC0002000


def test_deny_does_nothing_without_control_register_values():
    xen = mk(control_register_values=False)                 # op 4 never issued [doc §0.1]
    xen.monitor_write_ctrlreg("cr0", True)
    old = xen.vcpu(0).cr0
    op = xen.write_cr(0, "cr0", old & ~WP)
    assert xen.vcpu(0).cr0 == old & ~WP                     # written during the exit
    assert xen.paused_vcpus() == {0}
    (r,) = reply(xen, F.DENY)
    assert r.payload["new_value"] == old & ~WP and r.regs["cr0"] == old
    assert op.took_effect and xen.vcpu(0).cr0 == old & ~WP


def test_deny_reads_the_cr_index_from_the_response():
    xen = mk()
    xen.monitor_write_ctrlreg("cr4", True)
    old = xen.vcpu(0).cr4
    op = xen.write_cr(0, "cr4", old & ~(1 << 20))           # clear SMEP
    (r,) = take(xen)
    assert r.payload["index"] == abi.CtrlReg.CR4
    answer(xen, [r], [_without_u(abi.make_response(r, flags=F.DENY)).raw])   # u zeroed: index reads as CR0
    assert op.took_effect and xen.vcpu(0).cr4 == old & ~(1 << 20)


def test_deny_on_xcr0_does_nothing():
    xen = mk()
    xen.monitor_write_ctrlreg("xcr0", True)
    op = xen.write_cr(0, "xcr0", 0x3)
    assert xen.vcpu(0).xcr0 == 0x3                          # XSETBV writes regardless
    (r,) = reply(xen, F.DENY)
    assert r.payload["index"] == abi.CtrlReg.XCR0
    assert op.took_effect and xen.vcpu(0).xcr0 == 0x3


def test_deny_needs_a_sync_monitor():
    xen = mk()
    xen.monitor_write_ctrlreg("cr0", True, sync=False)
    old = xen.vcpu(0).cr0
    op = xen.write_cr(0, "cr0", old & ~WP)
    assert op.done and op.took_effect and not xen.paused_vcpus()
    (r,) = reply(xen, F.DENY)
    assert not r.flags & F.VCPU_PAUSED and xen.vcpu(0).cr0 == old & ~WP


def test_alternate_p2m_resumes_in_the_permissive_view():
    xen = mk()
    va = writable_syscall_table(xen) + 8
    xen.vcpu(1).cr0 &= ~WP
    xen.set_access(0, [gfn_of(xen, va)], "rwx")             # host first: it would clobber the view
    xen.altp2m_set_state(True)
    restricted = xen.create_view()
    xen.set_access(restricted, [gfn_of(xen, va)], "rx")
    xen.switch_view(restricted)
    op = xen.write(0, va, 0x77)
    (r,) = take(xen)
    assert r.altp2m_idx == restricted
    answer(xen, [r], [_rsp(r, 0, altp2m_idx=0)])
    assert op.done and op.took_effect and u64(xen, va) == 0x77
    assert xen.current_view(0) == 0 and xen.current_view(1) == restricted
    xen.write(1, va, 0x78)                                  # the other vCPU still traps
    assert xen.unconsumed_requests() == 1 and u64(xen, va) == 0x77


def _views_for_stepping(xen: SimulatedXen, va: int) -> int:
    xen.altp2m_set_state(True)
    restricted = xen.create_view()
    xen.set_access(restricted, [gfn_of(xen, va)], "rx")
    xen.switch_view(restricted)
    return restricted


def test_fast_singlestep_steps_once_then_returns_without_an_event():
    xen = mk()
    va = writable_syscall_table(xen)
    xen.set_access(0, [gfn_of(xen, va)], "rwx")
    restricted = _views_for_stepping(xen, va)
    xen.monitor("singlestep", True)                         # required in 4.17 [doc §0.3]
    op = xen.write(0, va, 0x55)
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, 0, altp2m_idx=0, fast_singlestep_p2midx=restricted)])
    assert op.done and op.took_effect and u64(xen, va) == 0x55
    assert xen.current_view(0) == restricted and not xen.single_stepping(0)
    assert xen.unconsumed_requests() == 0 and op.events == 1


def test_fast_singlestep_without_the_singlestep_monitor_never_returns():
    xen = mk()
    va = writable_syscall_table(xen)
    xen.set_access(0, [gfn_of(xen, va)], "rwx")
    restricted = _views_for_stepping(xen, va)
    op = xen.write(0, va, 0x55)
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, 0, altp2m_idx=0, fast_singlestep_p2midx=restricted)])
    assert op.done and u64(xen, va) == 0x55
    xen.write(0, va + 8, 0x66)                              # and the next write is unprotected
    assert xen.current_view(0) == 0 and xen.single_stepping(0)
    assert xen.unconsumed_requests() == 0 and u64(xen, va + 8) == 0x66


def test_toggle_singlestep_raises_singlestep_events_until_toggled_off():
    xen = mk()
    va = writable_syscall_table(xen)
    xen.set_access(0, [gfn_of(xen, va)], "rwx")
    restricted = _views_for_stepping(xen, va)
    xen.monitor("singlestep", True)
    op = xen.write(0, va, 0x55, rip=0xFFFFFFFFC0000010)
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, F.TOGGLE_SINGLESTEP, altp2m_idx=0)])   # the xen-access pattern
    assert op.done and op.took_effect and xen.paused_vcpus() == {0}
    (step,) = take(xen)
    assert step.reason == RS.SINGLESTEP and step.flags & F.VCPU_PAUSED
    assert step.regs["rip"] == 0xFFFFFFFFC0000010 + op.insn_len and step.altp2m_idx == 0
    answer(xen, [step], [_rsp(step, F.TOGGLE_SINGLESTEP, altp2m_idx=restricted)])
    assert xen.current_view(0) == restricted and not xen.single_stepping(0)
    xen.read(0, sym(xen, "init_task"))
    assert xen.unconsumed_requests() == 0 and not xen.paused_vcpus()


def test_set_registers_passes_cpuid_results_and_skips_the_instruction():
    xen = mk()
    xen.monitor("cpuid", True)
    op = xen.execute(0, Op("cpuid", leaf=0x40000000, rip=0xFFFFFFFF81000100))
    (r,) = take(xen)
    assert r.reason == RS.CPUID and r.payload["leaf"] == 0x40000000 and r.payload["insn_length"] == 2
    assert r.regs["rax"] == 0x40000005                      # CPUID already executed [doc §0.6]
    assert r.regs["rip"] == 0xFFFFFFFF81000100
    answer(xen, [r], [_rsp(r, 0, regs={"rip": r.regs["rip"] + 2, "rbx": 0x1234})])
    assert op.done and op.took_effect and xen.vcpu(0).gpr["rbx"] == 0x1234
    assert xen.vcpu(0).rip == 0xFFFFFFFF81000102 and xen.vcpu(0).gpr["rax"] == 0x40000005


def test_set_registers_moving_rip_skips_a_faulting_write():
    xen = mk()
    va = writable_syscall_table(xen)
    before = u64(xen, va)
    op = xen.write(0, va, 0xBAD, rip=0xFFFFFFFFC0000010)
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, 0, regs={"rip": 0xFFFFFFFFC0000010 + 4})])
    assert op.done and not op.took_effect and u64(xen, va) == before


def test_a_response_without_vcpu_paused_leaves_the_vcpu_paused_forever():
    xen = mk()
    va = writable_syscall_table(xen)
    op = xen.write(0, va, 1)
    (r,) = take(xen)
    raw = bytearray(echo_response(r.raw, F.EMULATE))
    struct.pack_into("<I", raw, 4, F.EMULATE)               # flags without VCPU_PAUSED
    answer(xen, [r], [bytes(raw)])
    assert xen.paused_vcpus() == {0} and not op.done and xen.unconsumed_requests() == 0


def test_a_response_with_the_wrong_version_is_dropped():
    xen = mk()
    va = writable_syscall_table(xen)
    op = xen.write(0, va, 1)
    (r,) = take(xen)
    raw = bytearray(echo_response(r.raw, F.EMULATE))
    struct.pack_into("<I", raw, 0, 6)
    answer(xen, [r], [bytes(raw)])
    assert xen.paused_vcpus() == {0} and not op.done and len(xen.dropped_responses) == 1


def test_a_response_acts_on_whatever_vcpu_it_names():
    xen = mk()
    va = writable_syscall_table(xen)
    xen.vcpu(1).cr0 &= ~WP
    op1 = xen.write(1, va, 1)
    (r,) = take(xen)
    raw = bytearray(echo_response(r.raw, F.EMULATE))
    struct.pack_into("<I", raw, 12, 0)                      # names vCPU 0, which is not paused
    answer(xen, [r], [bytes(raw)])
    assert xen.paused_vcpus() == {1} and not op1.done


# =========================================================================== the ring

def test_a_full_ring_blocks_the_next_faulting_vcpu():
    xen = mk(vcpus=10)
    va = sym(xen, "init_task")
    xen.set_access(0, [gfn_of(xen, va)], "rx")
    ops = [xen.write(i, va + 8 * i, i + 1) for i in range(10)]
    assert xen.free_slots() == 0 and xen.unconsumed_requests() == 8
    assert xen.paused_vcpus() == set(range(10))             # 8 on events, 2 waiting for a slot
    assert not any(o.events for o in ops[8:])
    reqs = take(xen)
    assert [r.vcpu_id for r in reqs] == list(range(8))
    answer(xen, reqs[:1], [_rsp(reqs[0], F.EMULATE)])
    assert ops[0].done and xen.unconsumed_requests() == 1   # vCPU 8 got the freed slot
    (r8,) = take(xen)
    assert r8.vcpu_id == 8 and ops[8].events == 1 and xen.paused_vcpus() == set(range(1, 10))
    answer(xen, reqs[1:] + [r8], [_rsp(r, F.EMULATE) for r in reqs[1:] + [r8]])
    reply(xen, F.EMULATE)
    assert all(o.done and o.took_effect for o in ops) and not xen.paused_vcpus()
    assert [u64(xen, va + 8 * i) for i in range(10)] == list(range(1, 11))


def test_ring_pressure_pauses_a_vcpu_producing_async_events():
    xen = mk(vcpus=4)
    xen.monitor_write_ctrlreg("cr4", True, sync=False)
    cr4 = xen.vcpu(0).cr4
    for i in range(4):                                      # free slots 7, 6, 5, 4 >= 4 vCPUs
        op = xen.write_cr(0, "cr4", cr4 ^ (1 << 2) if i % 2 == 0 else cr4)
        assert op.done and op.took_effect and not xen.paused_vcpus()
    op = xen.write_cr(0, "cr4", cr4 ^ (1 << 2))             # free slots 3 < 4: a black eye
    assert op.done and op.took_effect and xen.paused_vcpus() == {0}
    reqs = take(xen)
    assert len(reqs) == 5 and not any(r.flags & F.VCPU_PAUSED for r in reqs)
    queued = xen.write_cr(0, "cr4", cr4)
    assert not queued.started
    answer(xen, reqs[:1], [_rsp(reqs[0], 0)])               # one slot frees: the vCPU wakes
    assert queued.done and xen.unconsumed_requests() == 1
    assert xen.paused_vcpus() == {0}                        # free slots 3 < 4 again
    # the next producer's put wakes the throttled vCPU and takes the black eye itself
    xen.write_cr(1, "cr4", cr4 ^ (1 << 2))
    assert xen.paused_vcpus() == {1}
    # a vCPU paused for a sync event never gets the black eye
    sync = mk(vcpus=4)
    sync.monitor_write_ctrlreg("cr4", True, sync=True)
    sync.write_cr(1, "cr4", cr4 ^ 4)
    assert sync.paused_vcpus() == {1}


def test_livelock_is_caught_and_a_near_miss_is_not():
    xen = mk(livelock_limit=5)
    va = writable_syscall_table(xen)
    before = u64(xen, va)
    op = xen.write(0, va, 1)
    while not op.done:
        reply(xen)                                          # echo only: no progress
    assert op.livelock and not op.took_effect and op.events == 5
    assert u64(xen, va) == before and not xen.paused_vcpus()
    op = xen.write(0, va, 2)
    for _ in range(4):
        reply(xen)
    reply(xen, F.EMULATE)                                   # progress on the 5th answer
    assert op.done and not op.livelock and op.took_effect and op.events == 5 and u64(xen, va) == 2


# =========================================================================== monitors

def test_cr_events_only_when_bits_outside_the_mask_change():
    xen = mk()
    cr4 = xen.vcpu(0).cr4
    xen.monitor_write_ctrlreg("cr4", True, onchangeonly=False, bitmask=1 << 7)   # ignore PGE
    assert xen.write_cr(0, "cr4", cr4 ^ (1 << 7)).took_effect and xen.unconsumed_requests() == 0
    assert xen.write_cr(0, "cr4", cr4).took_effect and xen.unconsumed_requests() == 0  # same value
    xen.write_cr(0, "cr4", cr4 & ~(1 << 21))
    (r,) = reply(xen)
    assert r.payload["new_value"] == cr4 & ~(1 << 21)


def test_msr_onchangeonly_is_honoured():
    xen = mk()
    lstar = xen.get_registers(0)["msr_lstar"]
    xen.monitor_mov_to_msr(0xC0000082, True, onchangeonly=True)
    assert xen.wrmsr(0, "LSTAR", lstar).took_effect and xen.unconsumed_requests() == 0
    xen.monitor_mov_to_msr(0xC0000082, False)
    xen.monitor_mov_to_msr(0xC0000082, True, onchangeonly=False)
    xen.wrmsr(0, "LSTAR", lstar)
    assert xen.unconsumed_requests() == 1


def test_monitor_errors_are_xens():
    xen = mk()
    xen.monitor("cpuid", True)
    with pytest.raises(BackendError) as e:
        xen.monitor("cpuid", True)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(InvalidArgument):
        xen.monitor_mov_to_msr(0x80000000, True)
    with pytest.raises(Unsupported):
        xen.monitor("privileged_call", True)


def _plant_int3(xen: SimulatedXen, va: int) -> None:
    pa = xen.guest.walk(xen.vcpu(0).cr3, va).pa
    xen.write_physical(pa, b"\xCC")


def test_software_breakpoint_event_and_what_the_guest_sees():
    xen = mk()
    va = sym(xen, "commit_creds")
    _plant_int3(xen, va)
    xen.monitor("software_breakpoint", True)
    op = xen.exec_at(0, va)
    (r,) = take(xen)
    assert r.reason == RS.SOFTWARE_BREAKPOINT and r.flags & F.VCPU_PAUSED
    assert r.payload["gfn"] == gfn_of(xen, va) and r.payload["insn_length"] == 1
    assert r.payload["type"] == abi.X86EventType.SW_EXCEPTION and r.regs["rip"] == va
    answer(xen, [r], [_rsp(r, 0)])                          # no flags: INT3 runs again
    assert not op.done and xen.unconsumed_requests() == 1
    (r,) = take(xen)
    xen.inject_exception(0, 3, insn_length=1, software=True)   # hand the #BP to the guest
    answer(xen, [r], [_rsp(r, 0)])
    assert op.done and not op.took_effect and [f.name for f in op.faults] == ["#BP"]
    assert op.faults[0].injected and not xen.paused_vcpus()
    # with the monitor off the #BP goes straight to the guest
    xen.monitor("software_breakpoint", False)
    op = xen.exec_at(1, va)
    assert op.done and op.faults[0].name == "#BP" and not op.faults[0].injected
    assert xen.unconsumed_requests() == 0


def test_emulate_with_insn_data_runs_the_original_instruction():
    xen = mk()
    va = sym(xen, "commit_creds")
    _plant_int3(xen, va)
    xen.monitor("software_breakpoint", True)
    op = xen.exec_at(0, va)
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, F.EMULATE)])                  # bare EMULATE: ignored
    assert not op.done
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, 0, emul_insn=b"\x90" * 16)])
    assert op.done and op.took_effect and xen.vcpu(0).rip == va + 1


def test_hidden_breakpoint_with_change_gfn_and_fast_singlestep():
    xen = mk()
    va = sym(xen, "commit_creds")
    gfn = gfn_of(xen, va)
    xen.altp2m_set_state(True)
    exec_view = xen.create_view()
    shadow = xen.add_frame()
    xen.write_physical(shadow << 12, xen.read_physical(gfn << 12, 4096))
    xen.write_physical((shadow << 12) | (va & 0xFFF), b"\xCC")
    xen.change_gfn(exec_view, gfn, shadow)
    xen.set_access(exec_view, [gfn], "x")                   # reads in the exec view trap
    xen.monitor("software_breakpoint", True)
    xen.monitor("singlestep", True)
    xen.switch_view(exec_view)
    # reads see the original: in view 0 directly, and the guest never reads the shadow
    assert xen.read_guest(0, va, 1, view=0) == b"\x90"
    assert xen.read_guest(0, va, 1, view=exec_view) == b"\xCC"
    assert xen.read_physical(gfn << 12 | (va & 0xFFF), 1) == b"\x90"
    op = xen.exec_at(0, va)
    (r,) = take(xen)
    assert r.reason == RS.SOFTWARE_BREAKPOINT and r.payload["gfn"] == gfn and r.altp2m_idx == exec_view
    answer(xen, [r], [_rsp(r, 0, altp2m_idx=0, fast_singlestep_p2midx=exec_view)])
    assert op.done and op.took_effect and xen.current_view(0) == exec_view
    assert xen.vcpu(0).rip == va + 1 and xen.unconsumed_requests() == 0
    rd = xen.read(1, va, size=1)                            # a read in the exec view: x only
    (r,) = take(xen)
    assert r.payload["flags"] & MA.RWX == MA.R
    answer(xen, [r], [_rsp(r, 0, altp2m_idx=0, fast_singlestep_p2midx=exec_view)])
    assert rd.done and rd.result == 0x90 and xen.current_view(1) == exec_view


def test_descriptor_access_needs_emulate_and_nowrite_cannot_refuse_lidt():
    xen = mk()
    xen.monitor("descriptor_access", True)
    idtr = xen.get_registers(0)["idtr_base"]
    op = xen.execute(0, Op("lidt", base=0xFFFFFFFFC0003000, limit=0xFFF, rip=0xFFFFFFFFC0000040))
    (r,) = take(xen)
    assert r.reason == RS.DESCRIPTOR_ACCESS
    assert r.payload["descriptor"] == abi.Desc.IDTR and r.payload["is_write"] == 1
    answer(xen, [r], [_rsp(r, 0)])                          # no EMULATE: runs again, traps again
    assert not op.done
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, F.EMULATE | F.EMULATE_NOWRITE)])
    assert op.done and op.took_effect and xen.get_registers(0)["idtr_base"] == 0xFFFFFFFFC0003000
    # refusing it: skip the instruction
    xen.vcpu(0).idtr_base = idtr
    op = xen.execute(0, Op("lidt", base=0xFFFFFFFFC0003000, limit=0xFFF, rip=0xFFFFFFFFC0000040))
    (r,) = take(xen)
    answer(xen, [r], [_rsp(r, 0, regs={"rip": 0xFFFFFFFFC0000043})])
    assert op.done and not op.took_effect and xen.get_registers(0)["idtr_base"] == idtr
    # sgdt answered with EMULATE returns the register
    op = xen.execute(1, Op("sgdt"))
    reply(xen, F.EMULATE)
    assert op.result == (xen.guest.percpu_base[1] + 0xB000, 0x7F)


def test_cpuid_without_set_registers_livelocks():
    xen = mk(livelock_limit=3)
    xen.monitor("cpuid", True)
    op = xen.execute(0, Op("cpuid", leaf=0))
    while not op.done:
        reply(xen)
    assert op.livelock and op.events >= 3


def test_guest_request_has_retired_when_the_event_arrives():
    xen = mk()
    xen.monitor("guest_request", True, sync=True)
    op = xen.execute(0, Op("guest_request", rip=0xFFFFFFFF81000200))
    assert op.done and op.took_effect and xen.paused_vcpus() == {0}
    assert xen.vcpu(0).rip == 0xFFFFFFFF81000203
    (r,) = reply(xen)
    assert r.reason == RS.GUEST_REQUEST and r.regs["rip"] == 0xFFFFFFFF81000200
    assert not xen.paused_vcpus()


def test_debug_exception_sync_swallows_the_db():
    xen = mk()
    xen.monitor("debug_exception", True, sync=True)
    op = xen.execute(0, Op("icebp"))
    (r,) = take(xen)
    assert r.reason == RS.DEBUG_EXCEPTION and r.payload["type"] == abi.X86EventType.PRI_SW_EXCEPTION
    xen.inject_exception(0, 1, insn_length=1)
    answer(xen, [r], [_rsp(r, 0)])
    assert op.done and op.took_effect and op.faults[0].name == "#DB" and op.faults[0].injected


def test_trap_flag_single_step_trap_is_a_hardware_db():
    # the #DB after an instruction retired with RFLAGS.TF: hardware type, no length, pending_dbg 0
    # (XEN-SEMANTICS §1.9); seen live under Bochs 3.0 (tests/lab, replay_live)
    xen = mk()
    xen.monitor("debug_exception", True, sync=True)
    op = xen.execute(0, Op("trap_flag", rip=0xFFFFFFFF81000204))
    (r,) = take(xen)
    assert r.reason == RS.DEBUG_EXCEPTION and r.payload["type"] == abi.X86EventType.HW_EXCEPTION
    assert r.payload["insn_length"] == 0 and r.payload["pending_dbg"] == 0
    assert r.regs["rip"] == 0xFFFFFFFF81000204
    xen.inject_exception(0, 1)
    answer(xen, [r], [_rsp(r, 0)])
    assert op.done and op.took_effect and op.faults[0].name == "#DB" and op.faults[0].injected


# =========================================================================== views, access values

def test_altp2m_view_limit_and_destroy_rules():
    xen = mk()
    with pytest.raises(Unsupported):
        xen.create_view()                                   # altp2m not active yet
    xen.altp2m_set_state(True)
    views = [xen.create_view() for _ in range(9)]
    assert views == list(range(1, 10))
    with pytest.raises(InvalidArgument):
        xen.create_view()                                   # the 11th, counting view 0
    xen.switch_view(3)
    with pytest.raises(BackendError) as e:
        xen.destroy_view(3)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(BackendError):
        xen.destroy_view(0)
    xen.switch_view(0)
    xen.destroy_view(3)
    assert xen.create_view() == 3


def test_lazily_populated_view_entries_inherit_host_access_in_4_17():
    for version, traps in (((4, 17), False), ((4, 19), True)):
        xen = mk(xen_version=version)
        va = sym(xen, "init_task")
        xen.altp2m_set_state(True)
        view = xen.create_view("rx")
        xen.switch_view(view)
        op = xen.write(0, va, 1)
        assert (xen.unconsumed_requests() == 1) is traps, version
        assert op.done is not traps


def test_host_access_changes_overwrite_populated_view_entries():
    xen = mk()
    va = sym(xen, "init_task")
    gfn = gfn_of(xen, va)
    xen.altp2m_set_state(True)
    view = xen.create_view()
    xen.set_access(view, [gfn], "rx")
    xen.set_access(0, [gfn], "rwx")                         # clobbers the view's restriction
    assert xen.get_access(view, gfn) == "rwx"
    xen.switch_view(view)
    assert xen.write(0, va, 1).took_effect and xen.unconsumed_requests() == 0


def test_rx2rw_flips_silently_and_n2rwx_sends_an_async_event():
    xen = mk()
    va = sym(xen, "init_task")
    gfn = gfn_of(xen, va)
    xen.set_access(0, [gfn], "rx2rw")
    assert xen.write(0, va, 1).took_effect and xen.unconsumed_requests() == 0
    assert xen.get_access(0, gfn) == "rw"
    xen.set_access(0, [gfn], "n2rwx")
    op = xen.write(0, va, 2)
    assert op.done and op.took_effect and not xen.paused_vcpus()
    (r,) = reply(xen)
    assert r.reason == RS.MEM_ACCESS and not r.flags & F.VCPU_PAUSED
    assert xen.get_access(0, gfn) == "rwx" and u64(xen, va) == 2


def test_write_only_access_is_an_ept_misconfiguration():
    xen = mk()
    va = sym(xen, "init_task")
    xen.set_access(0, [gfn_of(xen, va)], "w")
    op = xen.read(0, va)
    assert xen.crashed and not op.done and xen.paused_vcpus() == {0, 1}


def test_no_listener_resets_access_and_leftover_breakpoints_hit_the_guest():
    xen = mk()
    va = writable_syscall_table(xen)
    bp = sym(xen, "commit_creds")
    _plant_int3(xen, bp)
    xen.monitor("software_breakpoint", True)
    xen.close()
    assert xen.monitors() == {}                             # disable clears every monitor
    op = xen.write(0, va, 0x31)                             # fails open: the page becomes rwx
    assert op.took_effect and u64(xen, va) == 0x31
    op = xen.exec_at(1, bp)
    assert op.done and op.faults[0].name == "#BP"           # a #BP the guest never planted
    xen.reattach()
    assert xen.get_access(0, gfn_of(xen, va)) == "rwx"      # the restriction is gone for good
    strict = mk(access_required=True)
    va = writable_syscall_table(strict)
    strict.close()
    strict.write(0, va, 1)
    assert strict.crashed and strict.paused_vcpus() == {0, 1}


def test_close_leaves_vcpus_paused_on_sync_events_and_refuses_with_waiters():
    xen = mk()
    va = writable_syscall_table(xen)
    op = xen.write(0, va, 1)
    xen.close()
    assert xen.paused_vcpus() == {0} and not op.done       # nothing unpauses it [doc §7]
    with pytest.raises(BackendError) as e:
        xen.take_requests()
    assert e.value.errno == errno.ENODEV
    xen.reattach()                                          # a new agent: still paused
    assert xen.paused_vcpus() == {0} and xen.take_requests() == []
    busy = mk(vcpus=10)
    g = gfn_of(busy, sym(busy, "init_task"))
    busy.set_access(0, [g], "rx")
    for i in range(9):
        busy.write(i, sym(busy, "init_task"), 1)            # the 9th sleeps for a slot
    with pytest.raises(BackendError) as e:
        busy.close()
    assert e.value.errno == errno.EBUSY


def test_domain_pause_holds_every_vcpu():
    xen = mk()
    xen.pause()
    assert xen.paused_vcpus() == {0, 1}
    op = xen.read(0, sym(xen, "init_task"))
    assert not op.started
    xen.unpause()
    assert op.done and op.took_effect and not xen.paused_vcpus()
    with pytest.raises(InvalidArgument):
        xen.unpause()


# =========================================================================== profiles

def test_svm_has_no_mem_access_altp2m_or_singlestep_but_deny_works():
    xen = mk("x86_64-svm")
    with pytest.raises(InvalidArgument) as e:
        xen.set_access(0, [0x1000], "rx")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(InvalidArgument):
        xen.get_access(0, 0x1000)
    with pytest.raises(Unsupported) as e:
        xen.altp2m_set_state(True)
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(Unsupported):
        xen.monitor("singlestep", True)
    xen.monitor_write_ctrlreg("cr0", True)
    old = xen.vcpu(0).cr0
    op = xen.write_cr(0, "cr0", old & ~WP)
    (r,) = reply(xen, F.DENY | F.TOGGLE_SINGLESTEP)         # TOGGLE is a no-op without MTF
    assert op.done and not op.took_effect and xen.vcpu(0).cr0 == old
    assert not xen.single_stepping(0)


def test_arm64_mem_access_reports_w_only_and_cannot_emulate():
    xen = mk("arm64", livelock_limit=3)
    va = sym(xen, "init_task")
    gfn = gfn_of(xen, va)
    xen.set_access(0, [gfn], "r")
    op = xen.write(0, va, 1)
    (r,) = take(xen)
    assert r.payload["flags"] == MA.W | MA.GLA_VALID | MA.FAULT_WITH_GLA
    assert r.regs_arm["pc"] == xen.vcpu(0).rip
    answer(xen, [r], [_rsp(r, F.EMULATE)])                  # no emulator on ARM: runs again
    assert not op.done and xen.unconsumed_requests() == 1
    take(xen)
    xen.set_access(0, [gfn], "rw")                          # the only way on: relax
    xen.put_responses([echo_response(r.raw, 0)])
    xen.notify()
    assert op.done and op.took_effect
    for call in (lambda: xen.altp2m_set_state(True), lambda: xen.monitor("singlestep", True),
                 lambda: xen.monitor_write_ctrlreg("cr0", True),
                 lambda: xen.monitor("software_breakpoint", True)):
        with pytest.raises(Unsupported):
            call()
    with pytest.raises(Unsupported):
        mk("arm64", arm_mem_access=False).set_access(0, [gfn], "r")


def test_arm64_smc_needs_pc_plus_4():
    xen = mk("arm64")
    xen.monitor("privileged_call", True)
    op = xen.execute(0, Op("smc", rip=0xFFFF800008010000))
    (r,) = take(xen)
    assert r.reason == RS.PRIVILEGED_CALL and r.regs_arm["pc"] == 0xFFFF800008010000
    answer(xen, [r], [_rsp(r, 0)])                          # PC not advanced: SMC again
    assert not op.done
    (r,) = take(xen)
    raw = bytearray(echo_response(r.raw, F.SET_REGISTERS))
    struct.pack_into("<Q", raw, 56 + 24, 0xFFFF800008010004)  # data.regs.arm.pc
    answer(xen, [r], [bytes(raw)])
    assert op.done and xen.vcpu(0).rip == 0xFFFF800008010004


def _gdt_unreadable_in_a_view(xen: SimulatedXen) -> tuple[int, int]:
    """vCPU 0 in a view where its GDT's page is execute-only (as a breakpoint's shadow frame on that
    page makes it); returns (the view, the gla of the kernel code segment's descriptor)."""
    v = xen.vcpu(0)
    desc = v.gdtr_base + (v.sel["cs"] & ~7)
    xen.altp2m_set_state(True)
    view = xen.create_view()
    xen.set_access(view, [gfn_of(xen, desc)], "x")
    xen.switch_view(view)
    xen.monitor("singlestep", True)
    return view, desc


def test_reinjected_int3_whose_delivery_traps_runs_again():
    # XEN-SEMANTICS §10.1, seen live under Bochs 3.0: the #BP's delivery reads the code segment's
    # descriptor through the view; after that read's event Xen does not re-inject a software
    # exception, the int3 runs again and is reported again, in the view the answer switched to
    xen = mk()
    view, desc = _gdt_unreadable_in_a_view(xen)
    xen.monitor("software_breakpoint", True)
    op = xen.execute(0, Op("int3", rip=0xFFFFFFFF81000100))
    (bp,) = take(xen)
    assert bp.reason == RS.SOFTWARE_BREAKPOINT and bp.altp2m_idx == view
    xen.inject_exception(0, 3, insn_length=1, software=True)
    answer(xen, [bp], [_rsp(bp, 0)])
    (rd,) = take(xen)
    assert rd.reason == RS.MEM_ACCESS and rd.payload["gla"] == desc and rd.regs["rip"] == 0xFFFFFFFF81000100
    assert rd.payload["flags"] & abi.MemAccess.R and not op.done
    answer(xen, [rd], [_rsp(rd, 0, altp2m_idx=0, fast_singlestep_p2midx=view)])
    (again,) = take(xen)
    assert again.reason == RS.SOFTWARE_BREAKPOINT and again.altp2m_idx == 0
    xen.inject_exception(0, 3, insn_length=1, software=True)
    answer(xen, [again], [_rsp(again, 0)])
    assert op.done and [f.name for f in op.faults] == ["#BP"] and xen.current_view(0) == view
    assert xen.unconsumed_requests() == 0


def test_injected_hardware_exception_whose_delivery_traps_is_injected_again():
    xen = mk()
    view, desc = _gdt_unreadable_in_a_view(xen)
    xen.monitor("debug_exception", True, sync=True)
    op = xen.execute(0, Op("trap_flag", rip=0xFFFFFFFF81000104))
    (db,) = take(xen)
    xen.inject_exception(0, 1)
    answer(xen, [db], [_rsp(db, 0)])
    (rd,) = take(xen)
    assert rd.reason == RS.MEM_ACCESS and rd.payload["gla"] == desc
    answer(xen, [rd], [_rsp(rd, 0, altp2m_idx=0, fast_singlestep_p2midx=view)])
    # delivered in the unrestricted view, no second #DB event; MTF brought the vCPU back
    assert op.done and [f.name for f in op.faults] == ["#DB"] and xen.unconsumed_requests() == 0
    assert xen.current_view(0) == view


@pytest.mark.parametrize("kind,desc,is_write,identity", [
    ("sldt", 3, 0, 0), ("str", 4, 0, 1), ("lldt", 3, 1, 2), ("ltr", 4, 1, 3), ("sidt", 1, 0, 1), ("lgdt", 2, 1, 2)])
def test_descriptor_register_instructions(kind, desc, is_write, identity):
    # LDTR/TR as IDTR/GDTR: one sync event naming the register, the direction, and (VMX) the instruction
    # in bits 29:28 of the instruction information, as seen live (XEN-SEMANTICS §10.2, §11.2)
    xen = mk()
    xen.monitor("descriptor_access", True)
    op = xen.execute(0, Op(kind, base=0x28, limit=0))
    (r,) = take(xen)
    assert r.reason == RS.DESCRIPTOR_ACCESS
    assert (r.payload["descriptor"], r.payload["is_write"]) == (desc, is_write)
    assert (r.payload["arch"]["vmx"]["instr_info"] >> 28) & 3 == identity
    answer(xen, [r], [_rsp(r, F.EMULATE)])
    assert op.done and op.took_effect
    if kind in ("lldt", "ltr"):
        assert xen.get_registers(0)["ldtr_sel" if kind == "lldt" else "tr_sel"] == 0x28
