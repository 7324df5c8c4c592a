"""The decision engine (runtime/decide.py) against real requests.

Plans are compiled from small policies; requests come either from the
simulated Xen (guest operations that really trap, answered through the real
ring) or from `abi.make_request` laid out as Xen lays them out. The binding is
a small one computed from the simulated guest's own page tables (the slide is
given, not found: finding it is the binder's job).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import pytest

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan
from policyc.native import abi
from policyc.runtime.decide import AFTER, BEFORE, DATA_SLACK, Binding, Decision, DecisionEngine, classify_access
from policyc.runtime.decision_log import DecisionLog
from policyc.runtime.vm_event_layout import pack_response
from policyc.runtime.sim import SimulatedXen, build_linux_x86_64
from policyc.runtime.sim.guest import MSR
from helpers import reads_missing_field

REPO = Path(__file__).resolve().parents[1]
MAP = REPO / "examples" / "policies" / "linux-6.1.System.map"
SLIDE = 0x1E00000
F = abi.Flag
MA = abi.MemAccess
RS = abi.Reason
PAUSED = int(F.VCPU_PAUSED)
ALTP2M = int(F.ALTERNATE_P2M)
WP = 1 << 16

HEADER = """policy "t" {{
    target xen >= 4.17 on {target}
    symbols "linux-6.1.System.map"
    mode {mode}
{body}
}}
"""

TABLES = """
    region syscalls = symbol sys_call_table size 8 * 451
    region idt = symbol idt_table size 4096
    region kernel_text = symbol _stext .. symbol _etext

    rule protect_tables: on write to syscalls, idt {
        deny
        alert critical "dispatch table write at {gla:#x} from {rip:#x}"
    }
    rule table_readers: on read of syscalls where rip not in kernel_text {
        deny feed "\\x11\\x22\\x33\\x44\\x55\\x66\\x77\\x88"
        log medium "sys_call_table read from {rip:#x}"
    }
    rule no_exec_idt: on execute in idt {
        deny with #UD
    }
    region ptrace_entry = symbol __x64_sys_ptrace size 16
    rule no_ptrace: on execute in ptrace_entry {
        deny with #UD
    }
    rule syscall_entry_guard: on write msr LSTAR where new != symbol entry_SYSCALL_64 {
        deny
        alert critical "LSTAR hijack to {new:#x}"
    }
    rule wp_guard: on write cr0 where cleared(cr0.WP) {
        deny
        alert critical "CR0.WP cleared on vcpu {vcpu}"
    }
    rule trace_creds: on execute symbol commit_creds {
        log info "commit_creds on vcpu {vcpu} cr3={cr3:#x}"
    }
    rule hv_probe: on cpuid leaf 0x40000000 {
        log low "hypervisor leaf from {rip:#x}"
    }
    rule lidt: on write idtr {
        deny
        alert critical "lidt on vcpu {vcpu}"
    }
"""



def compile_text(tmp_path: Path, body: str, *, mode: str = "enforce", target: str = "x86_64") -> dict:
    shutil.copy(MAP, tmp_path / MAP.name)
    path = tmp_path / "t.vmi"
    path.write_text(HEADER.format(target=target, mode=mode, body=body), encoding="utf-8")
    d = Diagnostics()
    policy = check_policy(path, d)
    assert policy is not None, [str(x) for x in d.items]
    plan = compile_plan(policy, d)
    assert plan is not None, [str(x) for x in d.items]
    if body is ERRORS:
        plan = reads_missing_field(plan, "r15", "msr_cstar")
    return plan


# --------------------------------------------------------------------------- a binding and an installer

class GuestBinding:
    """The plan's regions on a simulated guest, through its page tables (vCPU 0's CR3)."""

    def __init__(self, plan: dict, guest) -> None:
        self.guest = guest
        self.slide = guest.kaslr_slide
        self.plan = plan
        self._extents: dict[str, list[tuple[str, int, int]]] = {}
        for name, region in plan["regions"].items():
            out = []
            for e in region["extents"]:
                if "register" in e:
                    base = guest.vcpus[0].get(f"{e['register']}_base")
                    out.append(("va", base, int(e["size"], 16)))
                    continue
                start, size = int(e["start"], 16), int(e["size"], 16)
                if e["percpu"]:
                    out.extend(("va", base + start, size) for base in guest.percpu_base)
                elif e["space"] == "pa":
                    out.append(("pa", start, size))
                else:
                    out.append(("va", start + (self.slide if e["relocatable"] else 0), size))
            self._extents[name] = out

    def region_frames(self, name: str) -> list[tuple[int, int, int]]:
        frames: dict[int, tuple[int, int]] = {}
        cr3 = self.guest.vcpus[0].cr3
        for space, start, size in self._extents[name]:
            a, end = start, start + size
            while a < end:
                n = min(end - a, 0x1000 - (a & 0xFFF))
                pa = a if space == "pa" else self.guest.walk(cr3, a).pa
                gfn, off = pa >> 12, pa & 0xFFF
                lo, hi = frames.get(gfn, (off, off + n - 1))
                frames[gfn] = (min(lo, off), max(hi, off + n - 1))
                a += n
        return [(g, lo, hi) for g, (lo, hi) in sorted(frames.items())]

    def percpu_base(self, vcpu: int) -> int:
        return self.guest.percpu_base[vcpu]

    def breakpoint_sites(self) -> dict[int, str]:
        return {int(b["address"], 16) + (self.slide if b["relocatable"] else 0): b["id"]
                for b in self.plan["breakpoints"]}

    def in_region(self, name: str, address: int) -> bool:
        return any(space == "va" and start <= address < start + size
                   for space, start, size in self._extents.get(name, ()))


_ALLOWED = {"n": set(), "r": set("r"), "rw": set("rw"), "x": set("x"), "rx": set("rx"), "rwx": set("rwx"),
            "w": set("w"), "wx": set("wx")}
_NAME = {frozenset(v): k for k, v in _ALLOWED.items()}


def install(xen: SimulatedXen, plan: dict, binding: GuestBinding) -> None:
    """Just enough of an installer for these tests (views, page access, monitors)."""
    xen.altp2m_set_state(True)
    for view in plan["views"][1:]:
        assert xen.create_view(view["default_access"]) == view["id"]
    for view in plan["views"]:
        per_gfn: dict[int, set[str]] = {}
        for rng in view["ranges"]:
            for gfn, _lo, _hi in binding.region_frames(rng["region"]):
                per_gfn.setdefault(gfn, set("rwx"))
                per_gfn[gfn] &= _ALLOWED[rng["access"]]
        for gfn, allowed in per_gfn.items():
            if "w" in allowed and "r" not in allowed:
                allowed.discard("w")
            xen.set_access(view["id"], [gfn], _NAME[frozenset(allowed)])
    xen.switch_view(plan["analyses"]["views"]["default_view"])
    mon = plan["monitors"]
    for m in mon.get("write_ctrlreg", ()):
        xen.monitor_write_ctrlreg(m["index"], True, sync=m["sync"], onchangeonly=m["onchangeonly"],
                                  bitmask=int(m["bitmask"], 16))
    for m in mon.get("mov_to_msr", ()):
        xen.monitor_mov_to_msr(int(m["msr"], 16), True, onchangeonly=m["onchangeonly"])
    for kind in ("cpuid", "descriptor_access", "singlestep", "guest_request", "debug_exception"):
        if mon.get(kind):
            xen.monitor(kind, True)


class Enforced:
    """A simulated guest under a compiled plan, answered by the engine through the real ring."""

    def __init__(self, tmp_path: Path, body: str = TABLES, *, mode: str = "enforce", vcpus: int = 1,
                 clock=None) -> None:
        self.plan = compile_text(tmp_path, body, mode=mode)
        self.guest = build_linux_x86_64(MAP, kaslr_slide=SLIDE, memory="256M", vcpus=vcpus)
        self.xen = SimulatedXen(self.guest)
        self.binding = GuestBinding(self.plan, self.guest)
        install(self.xen, self.plan, self.binding)
        kw = {"clock": clock} if clock is not None else {}
        self.engine = DecisionEngine(self.plan, self.binding, **kw)
        self.out = io.StringIO()
        self.alerts = io.StringIO()
        self.log = DecisionLog(self.out, self.alerts, self.plan["content_hash"])
        self.decisions: list[Decision] = []
        self.pairs: list[tuple[bytes, Decision]] = []

    def serve(self) -> None:
        xen = self.xen
        while xen.unconsumed_requests():
            requests = xen.take_requests(8)
            pairs = self.engine.decide_batch(requests)
            assert len(pairs) == len(requests)
            self.log.write_batch(pairs)
            for _r, d in pairs:
                for e in d.effects:
                    if e.when == BEFORE:
                        e.apply(xen)
            xen.put_responses([r for r, _ in pairs])
            xen.notify()
            for _r, d in pairs:
                for e in d.effects:
                    if e.when == AFTER:
                        e.apply(xen)
            self.pairs.extend(pairs)
            self.decisions.extend(d for _, d in pairs)

    def run(self, op):
        self.serve()
        return op

    def sym(self, name: str) -> int:
        return self.guest.symbol(name)

    def alias(self, va: int) -> int:
        """The direct-map alias of a kernel address: writable, as rootkits use it (the kernel's own
        mapping of rodata is read-only). Same frame, so the same trap."""
        return self.guest.direct_map_base + self.guest.walk(self.guest.vcpus[0].cr3, va).pa

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


@pytest.fixture
def enforced(tmp_path):
    return Enforced(tmp_path)


def one(e: Enforced) -> Decision:
    assert len(e.decisions) == 1, e.decisions
    return e.decisions[0]


def req_for(e: Enforced, reason, *, payload=None, regs=None, flags=PAUSED | ALTP2M, altp2m_idx=2, vcpu=0):
    base = e.xen.get_registers(vcpu)
    full = {k: v for k, v in base.items() if k in _REG_FIELDS}
    full.update(regs or {})
    return abi.make_request(reason, vcpu, flags=flags, altp2m_idx=altp2m_idx, payload=payload, regs=full)


_REG_FIELDS = ("rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15 rflags dr6 dr7 rip cr0 cr2 cr3 "
               "cr4 sysenter_cs sysenter_esp sysenter_eip msr_efer msr_star msr_lstar gdtr_base").split()


def mem_req(e: Enforced, va: int, flags: int, *, rip: int | None = None, **kw):
    pa = e.guest.walk(e.guest.vcpus[0].cr3, va).pa
    regs = {"rip": rip} if rip is not None else {}
    return req_for(e, RS.MEM_ACCESS, payload={"gfn": pa >> 12, "offset": pa & 0xFFF, "gla": va,
                                              "flags": flags | MA.GLA_VALID | MA.FAULT_WITH_GLA},
                   regs=regs, **kw)


def flags_of(response: bytes) -> int:
    return struct.unpack_from("<I", response, 4)[0]


# --------------------------------------------------------------------------- responses are the ABI's

def test_responses_equal_abi_make_response(enforced):
    e = enforced
    text = e.sym("_stext")
    cases = [
        # allowed (collateral) write: view 1 for one step, then back to the faulting view
        (mem_req(e, e.sym("sys_call_table") - 0x100, MA.W | MA.R),
         lambda r: abi.make_response(r, altp2m_idx=1, fast_singlestep_p2midx=2)),
        (mem_req(e, e.sym("sys_call_table"), MA.W | MA.R),
         lambda r: abi.make_response(r, flags=F.EMULATE | F.EMULATE_NOWRITE)),
        (mem_req(e, e.sym("sys_call_table"), MA.R, rip=0xFFFFFFFFC0000000),
         lambda r: abi.make_response(r, emul_read=bytes.fromhex("1122334455667788"))),
        (mem_req(e, e.sym("sys_call_table"), MA.R, rip=text + 0x10),
         lambda r: abi.make_response(r, altp2m_idx=1, fast_singlestep_p2midx=2)),
        (req_for(e, RS.CPUID, payload={"insn_length": 2, "leaf": 0x40000000, "subleaf": 0}, regs={"rip": text}),
         lambda r: abi.make_response(r, regs={"rip": text + 2})),
        (req_for(e, RS.WRITE_CTRLREG, payload={"index": 0, "new_value": 0x80000011, "old_value": 0x80010011}),
         lambda r: abi.make_response(r, flags=F.DENY)),
        (req_for(e, RS.MOV_TO_MSR, payload={"msr": MSR["LSTAR"], "new_value": 0xFFFFFFFFC0002000,
                                            "old_value": e.sym("entry_SYSCALL_64")}),
         lambda r: abi.make_response(r, flags=F.DENY)),
        (req_for(e, RS.GUEST_REQUEST), lambda r: abi.make_response(r)),
    ]
    for request, expected in cases:
        response, d = e.engine.decide(request.raw)
        assert response == expected(request).raw, (d.kind, d.response, d.rules)
        parsed = abi.parse_response(response)
        assert (parsed.version, parsed.vcpu_id, parsed.reason) == (request.version, request.vcpu_id, request.reason)
        assert parsed.flags & F.VCPU_PAUSED


def test_pack_response_of_an_async_request_has_no_paused_flag(enforced):
    r = req_for(enforced, RS.GUEST_REQUEST, flags=0)
    assert flags_of(pack_response(r.raw, 0)) == 0
    response, d = enforced.engine.decide(r.raw)
    assert not d.paused and flags_of(response) == 0


# --------------------------------------------------------------------------- memory rules in the simulator

def test_write_to_protected_table_is_denied_with_emulate_nowrite(enforced):
    e = enforced
    target = e.sym("sys_call_table") + 8 * 59
    before = e.xen.read_guest(0, target, 8)
    op = e.run(e.xen.write(0, e.alias(target), 0xFFFFFFFFC0001000, rip=0xFFFFFFFFC0000010))
    d = one(e)
    assert d.kind == "mem_access" and d.rule == "protect_tables" and d.verdict == "deny"
    assert d.event["gla"] == e.alias(target)
    assert d.regions == ("syscalls",) and not d.collateral and not d.conservative
    assert d.event["access"] == int(MA.W | MA.R)          # the simulator reports W|R, as VMX does
    assert flags_of(e.pairs[0][0]) == PAUSED | int(F.EMULATE) | int(F.EMULATE_NOWRITE)
    assert d.response == "deny:write"
    assert op.done and not op.took_effect
    assert e.xen.read_guest(0, target, 8) == before
    assert e.xen.paused_vcpus() == frozenset()
    [m] = d.messages
    assert m.kind == "alert" and m.rule == "protect_tables"


def test_w_or_r_is_a_write_never_a_read(enforced):
    e = enforced
    assert classify_access(int(MA.W | MA.R)) == classify_access(int(MA.W)) == 1
    assert classify_access(int(MA.R)) == 0 and classify_access(int(MA.X)) == 2
    outside = 0xFFFFFFFFC0000000           # not in kernel text: table_readers would deny a read
    _r, d = e.engine.decide(mem_req(e, e.sym("sys_call_table"), MA.W | MA.R, rip=outside).raw)
    assert d.rules == ("protect_tables",) and d.response == "deny:write"
    _r, d = e.engine.decide(mem_req(e, e.sym("sys_call_table"), MA.R, rip=outside).raw)
    assert d.rules == ("table_readers",) and d.response == "deny:read"


def test_reads_are_untouched_by_write_rules(enforced):
    e = enforced
    # idt has a write rule and an execute rule, no read rule: a read there concerns no rule
    response, d = e.engine.decide(mem_req(e, e.sym("idt_table") + 0x40, MA.R).raw)
    assert d.rules == () and d.verdict == "allow" and d.collateral
    assert flags_of(response) == PAUSED | ALTP2M | int(F.FAST_SINGLESTEP)
    # in the simulator, reads of the write-protected table are not even trapped
    op = e.run(e.xen.read(0, e.sym("idt_table") + 0x40, 8))
    assert op.took_effect and op.events == 0 and e.decisions == []


def test_read_denied_is_fed_the_rules_bytes(enforced):
    e = enforced
    # the page holding sys_call_table is write-protected only (rx): a read there is not trapped,
    # so use the request Xen sends when some rule traps reads on that frame
    req = mem_req(e, e.sym("sys_call_table") + 16, MA.R, rip=0xFFFFFFFFC0000000)
    response, d = e.engine.decide(req.raw)
    assert d.rule == "table_readers" and d.verdict == "deny"
    parsed = abi.parse_response(response)
    assert parsed.flags == PAUSED | int(F.EMULATE) | int(F.SET_EMUL_READ_DATA)
    assert parsed.get("data.emul.read.size") == 8
    assert parsed.get("data.emul.read.data")[:8] == bytes.fromhex("1122334455667788")
    # the same read from kernel text: the condition is false, the access is allowed
    response, d = e.engine.decide(mem_req(e, e.sym("sys_call_table") + 16, MA.R, rip=e.sym("_stext")).raw)
    assert d.rules == () and not d.collateral and d.verdict == "allow"


def test_collateral_write_outside_the_region_is_allowed_and_counted(enforced):
    e = enforced
    table = e.sym("sys_call_table")
    end = table + 8 * 451
    ops = [e.run(e.xen.write(0, e.alias(table - 0x40), 7)),  # same page, before the region
           e.run(e.xen.write(0, e.alias(end + 0x100), 7))]   # same (second) page, after it
    assert all(op.took_effect for op in ops)
    assert [d.collateral for d in e.decisions] == [True, True]
    assert all(d.rules == () and d.verdict == "allow" for d in e.decisions)
    assert e.xen.read_guest(0, table - 0x40, 8) == (7).to_bytes(8, "little")
    assert e.xen.current_view(0) == 2          # back in the restricted view after the fast step
    e.log.write([])
    assert e.log.stats.collateral == 2


def test_conservative_rule_for_unknown_access_size(enforced):
    e = enforced
    table = e.sym("sys_call_table")
    before = e.xen.read_guest(0, table, 8)
    # an 8-byte write starting 4 bytes before the region overlaps it: claimed, denied
    op = e.run(e.xen.write(0, e.alias(table - 4), 0x4141414141414141))
    d = e.decisions[-1]
    assert d.rule == "protect_tables" and d.conservative and not op.took_effect
    assert e.xen.read_guest(0, table, 8) == before
    # one that starts 8 bytes before ends just before it: collateral
    op = e.run(e.xen.write(0, e.alias(table - 8), 0x4242424242424242))
    d = e.decisions[-1]
    assert d.collateral and op.took_effect
    # the boundary, without the simulator: 7 bytes before is claimed, 8 is not
    claimed = [e.engine.decide(mem_req(e, table - k, MA.W | MA.R).raw)[1] for k in (0, 1, DATA_SLACK, DATA_SLACK + 1)]
    assert [d.rules for d in claimed] == [("protect_tables",)] * 3 + [()]
    assert [d.conservative for d in claimed] == [False, True, True, False]
    # execute is exact: the fault offset is the instruction's first byte
    _r, d = e.engine.decide(mem_req(e, e.sym("idt_table"), MA.X).raw)
    assert d.rule == "no_exec_idt"


def test_conservative_rule_crosses_into_the_next_page(enforced):
    e = enforced
    idt = e.sym("idt_table")               # page aligned: a write at the previous page's end reaches it
    response, d = e.engine.decide(mem_req(e, idt - 4, MA.W | MA.R).raw)
    assert d.rule == "protect_tables" and d.conservative and d.regions == ("idt",)
    assert flags_of(response) & F.EMULATE_NOWRITE
    _r, d = e.engine.decide(mem_req(e, idt - 8, MA.W | MA.R).raw)
    assert d.rules == ()


def test_execute_denied_injects_the_rules_exception(enforced):
    e = enforced
    req = mem_req(e, e.sym("idt_table") + 0x10, MA.X, rip=e.sym("idt_table") + 0x10)
    response, d = e.engine.decide(req.raw)
    assert d.rule == "no_exec_idt" and d.response == "deny:execute"
    assert flags_of(response) == PAUSED                   # no flags: the exception comes first
    [inject] = [x for x in d.effects if x.kind == "inject"]
    assert (inject.vector, inject.when, inject.vcpu, inject.error_code) == (6, BEFORE, 0, None)
    # in the simulator (the IDT is NX in the guest's own page tables: use kernel text)
    op = e.run(e.xen.exec_at(0, e.sym("__x64_sys_ptrace") + 4))
    d = e.decisions[-1]
    assert d.rule == "no_ptrace" and [f.vector for f in op.faults] == [6]     # #UD instead of running
    assert op.done and not op.took_effect
    # the same page outside the region: collateral, it runs
    op = e.run(e.xen.exec_at(0, e.sym("__x64_sys_ptrace") + 0x40))
    assert e.decisions[-1].collateral and op.took_effect and e.xen.current_view(0) == 2


def test_audit_mode_answers_allow_and_records_would_deny(tmp_path):
    e = Enforced(tmp_path, mode="audit")
    target = e.sym("sys_call_table") + 8 * 59
    op = e.run(e.xen.write(0, e.alias(target), 0xFFFFFFFFC0001000))
    d = one(e)
    assert d.verdict == "deny" and d.would_deny and d.rule == "protect_tables" and d.response == "allow"
    assert flags_of(e.pairs[0][0]) == PAUSED | ALTP2M | int(F.FAST_SINGLESTEP)
    assert op.took_effect
    assert e.xen.read_guest(0, target, 8) == (0xFFFFFFFFC0001000).to_bytes(8, "little")
    op = e.run(e.xen.wrmsr(0, "LSTAR", 0xFFFFFFFFC0002000))
    assert op.took_effect and e.decisions[-1].would_deny and not flags_of(e.pairs[-1][0]) & F.DENY
    [rec, rec2] = e.records()
    assert rec["would_deny"] is True and rec["verdict"] == "deny" and rec["response_flags"] == [
        "VCPU_PAUSED", "ALTERNATE_P2M", "FAST_SINGLESTEP"]
    assert e.log.stats.verdicts["would_deny"] == 2 and e.log.stats.verdicts["deny"] == 0


# --------------------------------------------------------------------------- registers, cpuid, descriptors

def test_lstar_write_denied_with_deny_and_union_echoed(enforced):
    e = enforced
    lstar = e.xen.vcpu(0).msrs[MSR["LSTAR"]]
    op = e.run(e.xen.wrmsr(0, "LSTAR", 0xFFFFFFFFC0002000))
    d = one(e)
    response = e.pairs[0][0]
    request = op.requests[0]
    assert d.rule == "syscall_entry_guard" and d.verdict == "deny" and d.kind == "mov_to_msr"
    assert flags_of(response) == PAUSED | int(F.DENY)
    assert response[24:56] == request[24:56]              # u.mov_to_msr echoed
    assert e.xen.vcpu(0).msrs[MSR["LSTAR"]] == lstar
    # writing the expected value again matches no rule: allowed
    op = e.run(e.xen.wrmsr(0, "LSTAR", e.sym("entry_SYSCALL_64")))
    assert e.decisions[-1].rules == () and op.took_effect


def test_cr0_wp_clear_denied_with_index_echoed(enforced):
    e = enforced
    cr0 = e.xen.vcpu(0).cr0
    op = e.run(e.xen.write_cr(0, "cr0", cr0 & ~WP))
    d = one(e)
    response = abi.parse_response(e.pairs[0][0])
    assert d.rule == "wp_guard" and response.flags == PAUSED | int(F.DENY)
    assert response.get("u.write_ctrlreg") == abi.parse_request(op.requests[0]).get("u.write_ctrlreg")
    assert response.get("u.write_ctrlreg.index") == int(abi.CtrlReg.CR0)
    assert e.xen.vcpu(0).cr0 == cr0 and not op.took_effect


def test_cpuid_answered_with_set_registers_rip_advanced(enforced):
    e = enforced
    rip = e.sym("_stext") + 0x100
    op = e.run(e.xen.execute(0, __import__("policyc.runtime.sim", fromlist=["Op"]).Op(
        "cpuid", 0, leaf=0x40000000, rip=rip)))
    d = one(e)
    response = abi.parse_response(e.pairs[0][0])
    assert d.rule == "hv_probe" and d.event["leaf"] == 0x40000000
    assert response.flags == PAUSED | int(F.SET_REGISTERS)
    assert response.regs["rip"] == rip + 2 == rip + d.event["insn_length"]
    assert response.regs["rbx"] == abi.parse_request(op.requests[0]).regs["rbx"]   # results kept
    assert op.done and op.took_effect and e.xen.vcpu(0).rip == rip + 2
    # a leaf no rule names: still answered, rip still advanced
    from policyc.runtime.sim import Op
    op = e.run(e.xen.execute(0, Op("cpuid", 0, leaf=0, rip=rip)))
    assert e.decisions[-1].rules == () and op.took_effect and e.xen.vcpu(0).rip == rip + 2


def test_lidt_denied_by_injecting_gp(enforced):
    e = enforced
    from policyc.runtime.sim import Op
    idtr = e.xen.vcpu(0).idtr_base
    op = e.run(e.xen.execute(0, Op("lidt", 0, base=0xFFFFFFFFC0003000, limit=0xFFF)))
    d = one(e)
    assert d.rule == "lidt" and d.kind == "descriptor_access" and flags_of(e.pairs[0][0]) == PAUSED
    assert [x.vector for x in d.effects if x.kind == "inject"] == [13]
    assert [f.vector for f in op.faults] == [13] and e.xen.vcpu(0).idtr_base == idtr
    # a store (sidt) is not what the rule watches: emulated, allowed
    op = e.run(e.xen.execute(0, Op("sidt", 0)))
    assert e.decisions[-1].rules == () and flags_of(e.pairs[-1][0]) == PAUSED | int(F.EMULATE)
    assert op.took_effect


# --------------------------------------------------------------------------- breakpoints

def test_breakpoint_at_a_site_and_a_guests_own_int3(enforced):
    e = enforced
    site = e.sym("commit_creds")
    pa = e.guest.walk(e.guest.vcpus[0].cr3, site).pa
    payload = {"gfn": pa >> 12, "pending_dbg": 0, "insn_length": 1, "type": int(abi.X86EventType.SW_EXCEPTION)}
    req = req_for(e, RS.SOFTWARE_BREAKPOINT, payload=payload, regs={"rip": site}, altp2m_idx=2)
    response, d = e.engine.decide(req.raw)
    assert d.rule == "trace_creds" and d.kind == "software_breakpoint"
    assert response == abi.make_response(req, altp2m_idx=1, fast_singlestep_p2midx=2).raw
    assert [m.template for m in d.messages] == ["commit_creds on vcpu {vcpu} cr3={cr3:#x}"]
    # an int3 the guest planted itself: re-injected, nothing else
    req = req_for(e, RS.SOFTWARE_BREAKPOINT, payload=payload, regs={"rip": site + 5})
    response, d = e.engine.decide(req.raw)
    assert d.rules == () and d.response == "not_ours" and flags_of(response) == PAUSED
    [inj] = d.effects
    assert (inj.kind, inj.vector, inj.software, inj.insn_length) == ("inject", 3, True, 1)


# --------------------------------------------------------------------------- robustness

ERRORS = """
    rule needs_cstar: on guest_request where r15 == 0 {
        alert high "cstar is zero"
    }
    rule heartbeat: on guest_request where rax == 1 {
        log info "heartbeat {rax:#x}"
    }
"""


def test_every_request_gets_one_response_even_when_a_condition_raises(tmp_path):
    e = Enforced(tmp_path, ERRORS)
    from policyc.runtime.sim import Op
    e.xen.vcpu(0).gpr["rax"] = 1
    op = e.run(e.xen.execute(0, Op("guest_request", 0)))
    d = one(e)
    assert op.done and e.xen.paused_vcpus() == frozenset()
    assert d.rules == ("heartbeat",) and d.verdict == "allow"
    assert d.errors and "needs_cstar" in d.errors[0] and "msr_cstar" in d.errors[0]
    [rec] = e.records()
    assert rec["errors"] and rec["verdict"] == "allow"
    # a mixed batch, garbage included: one response each, 400 bytes, in order
    good = req_for(e, RS.GUEST_REQUEST, regs={"rax": 1})
    batch = [good.raw, b"\x07" * 10, bytes(400), good.raw[:399] + b"\xff", None]
    out = e.engine.decide_batch(batch)  # type: ignore[arg-type]
    assert len(out) == len(batch)
    assert all(len(r) == abi.EVENT_SIZE for r, _ in out)
    assert out[0][1].rules == ("heartbeat",)
    assert out[1][1].errors and out[4][1].errors
    e.log.write_batch(out)
    assert len(e.records()) == 1 + len(batch)


LIMITS = """
    rule hv_probe: on cpuid leaf 0x40000000 {
        log low "probe from {rip:#x}"
        limit 2 per second then log low "probes saturated"
    }
    rule once: on cpuid leaf 0x1 {
        alert medium "leaf 1"
        limit 1 per second then disarm
    }
    rule strict: on write msr LSTAR {
        log info "lstar"
        limit 1 per second then deny
    }
"""


def test_limit_switches_to_then_past_n_per_second(tmp_path):
    now = [100.0]
    e = Enforced(tmp_path, LIMITS, clock=lambda: now[0])
    text = e.sym("_stext")

    def cpuid(leaf):
        req = req_for(e, RS.CPUID, payload={"insn_length": 2, "leaf": leaf, "subleaf": 0}, regs={"rip": text})
        return e.engine.decide(req.raw)[1]

    ds = [cpuid(0x40000000) for _ in range(3)]
    assert [d.limited for d in ds] == [(), (), ("hv_probe",)]
    assert [m.template for m in ds[2].messages] == ["probes saturated"]
    now[0] += 0.5                              # one token back
    assert cpuid(0x40000000).limited == ()
    assert cpuid(0x40000000).limited == ("hv_probe",)
    now[0] += 1.0
    assert cpuid(0x40000000).limited == ()
    # then disarm: the rule is gone after its limit
    assert cpuid(1).rules == ("once",)
    d = cpuid(1)
    assert d.limited == ("once",) and [x.kind for x in d.effects] == ["disarm"] and d.messages == []
    now[0] += 10
    assert cpuid(1).rules == ()
    # then deny: the verdict itself changes past the limit
    msr = lambda: e.engine.decide(req_for(e, RS.MOV_TO_MSR, payload={  # noqa: E731
        "msr": MSR["LSTAR"], "new_value": 1, "old_value": 2}).raw)
    (r1, d1), (r2, d2) = msr(), msr()
    assert (d1.verdict, d2.verdict) == ("allow", "deny") and flags_of(r2) & F.DENY and not flags_of(r1) & F.DENY


PRIORITIES = """
    region syscalls = symbol sys_call_table size 8 * 451
    region kernel_text = symbol _stext .. symbol _etext
    rule watch: on access to syscalls {
        log info "touched at {gla:#x}"
    }
    rule guard: on write to syscalls where rip not in kernel_text {
        priority 10
        deny
        alert critical "hooked from {rip:#x}"
    }
"""


def test_every_match_runs_and_the_strongest_verdict_wins(tmp_path):
    e = Enforced(tmp_path, PRIORITIES)
    op = e.run(e.xen.write(0, e.alias(e.sym("sys_call_table")), 1, rip=0xFFFFFFFFC0000000))
    d = one(e)
    assert d.rules == ("guard", "watch") and d.rule == "guard" and d.verdict == "deny"
    assert [m.rule for m in d.messages] == ["guard", "watch"]      # priority orders alerts
    assert not op.took_effect
    op = e.run(e.xen.write(0, e.alias(e.sym("sys_call_table")), 1, rip=e.sym("_stext")))
    d = e.decisions[-1]
    assert d.rules == ("watch",) and d.verdict == "allow" and op.took_effect


def test_the_binding_protocol_is_satisfied_by_the_test_binding(enforced):
    assert isinstance(enforced.binding, Binding)


CONTEXTS = """
    region syscalls = symbol sys_call_table size 8 * 451
    rule one_process: on write to syscalls where cr3 == 0x5000 {
        deny
    }
"""


def test_cr3_writes_switch_to_the_contexts_view(tmp_path):
    plan = compile_text(tmp_path, CONTEXTS)
    ctx = {c: v["id"] for v in plan["views"] for c in v.get("contexts", ())}
    assert "cr3=0x5000" in ctx
    guest = build_linux_x86_64(MAP, kaslr_slide=SLIDE, memory="256M")
    engine = DecisionEngine(plan, GuestBinding(plan, guest))
    req = abi.make_request(RS.WRITE_CTRLREG, 0, flags=PAUSED | ALTP2M, altp2m_idx=0,
                           payload={"index": int(abi.CtrlReg.CR3), "new_value": 0x5000, "old_value": 0x9000})
    response, d = engine.decide(req.raw)
    assert response == abi.make_response(req, altp2m_idx=ctx["cr3=0x5000"]).raw
    req = abi.make_request(RS.WRITE_CTRLREG, 0, flags=PAUSED | ALTP2M, altp2m_idx=ctx["cr3=0x5000"],
                           payload={"index": int(abi.CtrlReg.CR3), "new_value": 0x9000, "old_value": 0x5000})
    response, _d = engine.decide(req.raw)
    assert abi.parse_response(response).altp2m_idx == ctx.get("*", 0)


# --------------------------------------------------------------------------- every plan, every reason

class _AnyBinding:
    """Every region on one frame (offsets 0x100-0x1ff), no slide: enough to build any plan's tables."""

    slide = 0

    def __init__(self, plan: dict) -> None:
        self.plan = plan

    def region_frames(self, name):
        return [(0x1234, 0x100, 0x1FF)]

    def percpu_base(self, vcpu):
        return 0xFFFF888000000000 + vcpu * 0x200000

    def breakpoint_sites(self):
        return {int(b["address"], 16): b["id"] for b in self.plan["breakpoints"]}

    def in_region(self, name, address):
        return False

    def breakpoint_insn_bytes(self, site):
        return bytes.fromhex("0f1f440000") + bytes(11)     # the original bytes under an inline int3


def _requests_of_every_reason(plan: dict) -> list:
    arm = plan["target"]["arch"] == "arm64"
    regs = None if arm else {"rip": 0xFFFFFFFF81000000}
    fields = {"data.regs.arm.pc": 0xFFFF800008010000} if arm else None
    site = int(plan["breakpoints"][0]["address"], 16) if plan["breakpoints"] else 0xFFFFFFFF81000000
    bp_regs = None if arm else {"rip": site}
    mk = lambda reason, payload=None, r=regs, fl=fields, flags=PAUSED: abi.make_request(  # noqa: E731
        reason, 0, flags=flags, payload=payload, regs=r, fields=fl)
    out = [mk(RS.MEM_ACCESS, {"gfn": 0x1234, "offset": off, "gla": 0xFFFF888001234000 + off, "flags": int(f)})
           for off in (0x0, 0x100, 0x1FF, 0x300) for f in (MA.R, MA.W | MA.R, MA.X)]
    out += [mk(RS.WRITE_CTRLREG, {"index": i, "new_value": 0, "old_value": 0xFFFFFFFF}) for i in range(4)]
    out += [mk(RS.MOV_TO_MSR, {"msr": m, "new_value": 0, "old_value": 1}) for m in (0xC0000082, 0xC0000080, 0x176)]
    out += [mk(RS.SOFTWARE_BREAKPOINT, {"gfn": 1, "insn_length": 1, "type": 6}, r=bp_regs),
            mk(RS.CPUID, {"insn_length": 2, "leaf": 0x40000000, "subleaf": 0}),
            mk(RS.CPUID, {"insn_length": 2, "leaf": 7, "subleaf": 0}),
            mk(RS.DESCRIPTOR_ACCESS, {"descriptor": 1, "is_write": 1}),
            mk(RS.DESCRIPTOR_ACCESS, {"descriptor": 3, "is_write": 0}),
            mk(RS.GUEST_REQUEST), mk(RS.GUEST_REQUEST, flags=0),
            mk(RS.DEBUG_EXCEPTION, {"gfn": 1, "insn_length": 1, "type": 5}),
            mk(RS.PRIVILEGED_CALL), mk(RS.SINGLESTEP, {"gfn": 5}), mk(RS.INTERRUPT)]
    return out


GOLDEN = sorted((REPO / "tests" / "golden" / "plans").glob("*.plan.json"))


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_every_golden_plan_answers_every_reason(path):
    plan = json.loads(path.read_text(encoding="utf-8"))
    engine = DecisionEngine(plan, _AnyBinding(plan))
    requests = _requests_of_every_reason(plan)
    out = engine.decide_batch([r.raw for r in requests])
    assert len(out) == len(requests)
    for request, (response, d) in zip(requests, out):
        parsed = abi.parse_response(response)
        assert (parsed.version, parsed.vcpu_id, parsed.reason) == (request.version, request.vcpu_id, request.reason)
        assert bool(parsed.flags & F.VCPU_PAUSED) == bool(request.flags & F.VCPU_PAUSED)
        assert not [x for x in d.errors if not x.startswith("rule ")], (d.kind, d.errors)
        if not request.flags & F.VCPU_PAUSED:
            assert parsed.flags == 0
        if d.kind == "mem_access" and parsed.flags & F.EMULATE:
            assert parsed.get("u.mem_access") == request.get("u.mem_access")   # Xen re-checks it
        if d.kind == "write_ctrlreg" and parsed.flags & F.DENY:
            assert parsed.get("u.write_ctrlreg.index") == request.get("u.write_ctrlreg.index")
    log = DecisionLog(io.StringIO(), io.StringIO(), plan["content_hash"])
    assert log.write_batch(out) == len(out)


def test_arm64_skips_denied_writes_and_relaxes_then_rearms_allowed_ones():
    plan = json.loads((REPO / "tests/golden/plans/linux-arm64-integrity.arm64.plan.json").read_text())
    engine = DecisionEngine(plan, _AnyBinding(plan))
    pc = 0xFFFF800008010000
    mk = lambda flags, off=0x100: abi.make_request(  # noqa: E731
        RS.MEM_ACCESS, 0, flags=PAUSED, payload={"gfn": 0x1234, "offset": off, "gla": 0, "flags": int(flags)},
        fields={"data.regs.arm.pc": pc})
    req = mk(MA.W)                            # arm64 reports a write as W alone
    response, d = engine.decide(req.raw)
    assert d.verdict == "deny" and d.response == "deny:write"
    regs = dict(req.regs_arm, pc=pc + 4)      # no emulation on arm64: the store is skipped
    assert response == abi.make_response(req, flags=F.SET_REGISTERS, fields={"data.regs.arm": regs}).raw
    # an allowed access cannot complete in place: the page is relaxed now, re-armed at the next event
    _r, d = engine.decide(mk(MA.X, 0x300).raw)
    assert [(x.kind, x.when, x.gfn, x.access) for x in d.effects] == [("relax_access", BEFORE, 0x1234, "rwx")]
    _r, d = engine.decide(mk(MA.W).raw)
    assert [(x.kind, x.gfn) for x in d.effects] == [("rearm", 0x1234)]
    # an injected SMC at a breakpoint site: the original instruction goes back, the site is disarmed
    site = int(plan["breakpoints"][0]["address"], 16)
    req = abi.make_request(RS.PRIVILEGED_CALL, 0, flags=PAUSED, fields={"data.regs.arm.pc": site})
    response, d = engine.decide(req.raw)
    assert d.kind == "software_breakpoint" and d.rules == ("trace_creds",) and flags_of(response) == PAUSED
    assert [(x.kind, x.when, x.site) for x in d.effects] == [("restore_breakpoint", BEFORE, "bp0"),
                                                             ("disarm", AFTER, "bp0")]
    # the guest's own SMC: skipped (Xen does not run it), pc += 4
    req = abi.make_request(RS.PRIVILEGED_CALL, 0, flags=PAUSED, fields={"data.regs.arm.pc": pc})
    response, d = engine.decide(req.raw)
    assert abi.parse_response(response).regs_arm["pc"] == pc + 4 and d.kind == "privileged_call"
