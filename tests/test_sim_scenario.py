"""Scenarios: loading with positions, expressions, and running steps with a responder."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyc.native import abi
from policyc.runtime.sim import SimulatedXen, echo_response, echo_responder
from policyc.runtime.sim.scenario import (ScenarioError, ScenarioRunner, build_scenario, load_scenario,
                                          load_scenario_text, run_scenario)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "scenarios" / "rootkit-hooks-syscall-table.yaml"
MAP = ROOT / "examples" / "policies" / "linux-6.1.System.map"
F = abi.Flag
RS = abi.Reason
WP = 1 << 16
NR_SYSCALLS = 451


def _scenario(steps: str, vcpus: int = 2) -> str:
    return f"""
scenario: inline
guest: {{layout: linux-x86_64, symbols: "{MAP}", kaslr_slide: 0x1e00000, memory: 256M, vcpus: {vcpus}}}
steps:
{steps}
"""


# --------------------------------------------------------------------------- a tiny monitor

class TinyEnforcer:
    """Arms what linux-kernel-integrity.vmi needs and answers like its rules would:
    EMULATE|NOWRITE for writes inside sys_call_table, DENY for LSTAR hijacks and
    CR0.WP clears, a hidden breakpoint on commit_creds stepped over with
    ALTERNATE_P2M + FAST_SINGLESTEP, EMULATE for every other trapped access."""

    def __init__(self, xen: SimulatedXen) -> None:
        self.xen = xen
        self.log: list[str] = []
        self.verdicts: list[tuple[str, str]] = []
        g = xen.guest
        cr3 = xen.vcpu(0).cr3
        self.table = g.symbols["sys_call_table"]
        self.table_end = self.table + 8 * NR_SYSCALLS
        # the table's physical pieces (it spans two pages)
        self.table_pa: list[tuple[int, int]] = []
        a = self.table
        while a < self.table_end:
            n = min(self.table_end, (a | 0xFFF) + 1) - a
            self.table_pa.append((g.walk(cr3, a).pa, n))
            a += n
        gfns = sorted({pa >> 12 for pa, _ in self.table_pa})
        self.entry = g.symbols["entry_SYSCALL_64"]
        self.bp = g.symbols["commit_creds"]
        self.bp_gfn = bp_gfn = g.walk(cr3, self.bp).pa >> 12
        xen.set_access(0, gfns, "rx")
        xen.altp2m_set_state(True)
        self.exec_view = xen.create_view()
        xen.set_access(self.exec_view, gfns, "rx")
        shadow = xen.add_frame()
        xen.write_physical(shadow << 12, xen.read_physical(bp_gfn << 12, 4096))
        xen.write_physical(shadow << 12 | (self.bp & 0xFFF), b"\xCC")
        xen.change_gfn(self.exec_view, bp_gfn, shadow)
        xen.set_access(self.exec_view, [bp_gfn], "x")
        xen.monitor_write_ctrlreg("cr0", True, sync=True, onchangeonly=True)
        xen.monitor_mov_to_msr(0xC0000082, True)
        xen.monitor("software_breakpoint", True)
        xen.monitor("singlestep", True)
        xen.switch_view(self.exec_view)

    def _in_table(self, gfn: int, offset: int) -> bool:
        pa = gfn << 12 | offset
        return any(lo <= pa < lo + n for lo, n in self.table_pa)

    def _step_over(self, req: abi.Request) -> bytes:
        return abi.make_response(req, altp2m_idx=0,
                                 fields={"u.fast_singlestep.p2midx": self.exec_view},
                                 flags=F.FAST_SINGLESTEP).raw

    def decide(self, req: abi.Request) -> bytes:
        name = req.reason_name
        if name == "MEM_ACCESS":
            p = req.payload
            if p["flags"] & abi.MemAccess.W and self._in_table(p["gfn"], p["offset"]):
                self.verdicts.append(("deny", "protect_tables"))
                return echo_response(req.raw, F.EMULATE | F.EMULATE_NOWRITE)
            if p["gfn"] == self.bp_gfn and req.altp2m_idx == self.exec_view:
                return self._step_over(req)               # data access to the hidden page: view 0
            self.verdicts.append(("allow", "collateral"))
            return echo_response(req.raw, F.EMULATE)
        if name == "MOV_TO_MSR":
            if req.payload["msr"] == 0xC0000082 and req.payload["new_value"] != self.entry:
                self.verdicts.append(("deny", "syscall_entry_guard"))
                return echo_response(req.raw, F.DENY)
            return echo_response(req.raw, 0)
        if name == "WRITE_CTRLREG":
            p = req.payload
            if p["old_value"] & WP and not p["new_value"] & WP:
                self.verdicts.append(("deny", "wp_guard"))
                return echo_response(req.raw, F.DENY)
            return echo_response(req.raw, 0)
        if name == "SOFTWARE_BREAKPOINT":
            self.log.append(f"commit_creds on vcpu {req.vcpu_id} cr3={req.regs['cr3']:#x}")
            return self._step_over(req)
        return echo_response(req.raw, 0)

    def __call__(self, xen: SimulatedXen) -> None:
        while True:
            raw = xen.take_requests(8)
            if not raw:
                return
            xen.put_responses([self.decide(abi.parse_request(r)) for r in raw])
            xen.notify()


# --------------------------------------------------------------------------- loading

def test_the_example_scenario_loads_with_its_paths_and_positions():
    sc = load_scenario(EXAMPLE)
    assert sc.name == "rootkit-hooks-syscall-table"
    assert Path(sc.symbols).resolve() == MAP and Path(sc.policy).resolve().name == "linux-kernel-integrity.vmi"
    assert (sc.kaslr_slide, sc.memory, sc.vcpus, sc.layout) == (0x1E00000, 256 << 20, 2, "linux-x86_64")
    assert [s.op for s in sc.steps] == ["write", "wrmsr", "write_cr", "exec", "read", "write"]
    assert [s.vcpu for s in sc.steps] == [0, 1, 0, 0, 1, 0]
    assert sc.steps[1].msr == 0xC0000082 and sc.steps[2].cr == "cr0"
    first = next(i for i, text in enumerate(EXAMPLE.read_text().splitlines(), 1) if "op: write," in text)
    assert (sc.steps[0].line, sc.steps[0].col) == (first, 5) and len(sc.expect) == 9


@pytest.mark.parametrize("steps, message, line, col", [
    ("  - {op: jump, va: 0}", "unknown op 'jump'", 5, 10),
    ("  - {op: read}", "op read needs 'va'", 5, 5),
    ("  - {op: read, va: 0, colour: red}", "op read takes no 'colour'", 5, 23),
    ("  - {op: write_cr, cr: cr9, value: 0}", "cr: 'cr9'", 5, 24),
    ("  - {op: wrmsr, msr: NOPE, value: 0}", "unknown MSR 'NOPE'", 5, 22),
    ("  - {op: read, va: 0}\n  - {op: read, va: \"symbol sys_call_table +\"}", "read.va", 6, 44),
])
def test_bad_steps_are_reported_at_their_position(steps, message, line, col):
    with pytest.raises(ScenarioError) as e:
        load_scenario_text(_scenario(steps), "t.yaml")
    assert message in str(e.value) and e.value.path == "t.yaml"
    assert (e.value.line, e.value.col) == (line, col)


def test_yaml_errors_and_duplicate_keys_have_positions():
    with pytest.raises(ScenarioError) as e:
        load_scenario_text("scenario: x\nsteps: [\n", "t.yaml")
    assert e.value.line is not None
    with pytest.raises(ScenarioError) as e:
        load_scenario_text("scenario: x\nscenario: y\nsteps: []\n", "t.yaml")
    assert "duplicate key" in str(e.value) and e.value.line == 2


def test_expressions_see_symbols_registers_bits_and_percpu():
    sc = load_scenario_text(_scenario("  - {op: read, va: 0}"))
    runner = ScenarioRunner(sc)
    g = runner.xen.guest
    assert runner.evaluate("symbol sys_call_table + 8*59") == g.symbols["sys_call_table"] + 472
    cr0 = runner.xen.vcpu(0).cr0
    assert runner.evaluate("cr0 & ~cr0.WP") == cr0 & ~WP
    assert runner.evaluate("LSTAR") == g.symbols["entry_SYSCALL_64"] == runner.evaluate("msr_lstar")
    assert runner.evaluate("percpu symbol gdt_page", vcpu=1) == g.percpu_base[1] + 0xB000
    assert runner.evaluate("symbol? no_such_symbol") == 0
    assert runner.evaluate("cr4 & (cr4.SMEP | cr4.SMAP) == (cr4.SMEP | cr4.SMAP)") == 1
    with pytest.raises(ScenarioError):
        runner.evaluate("symbol no_such_symbol")


@pytest.mark.parametrize("text, value", [
    ("7 / 0", 0), ("7 % 0", 0), ("1 << 64", 0), ("-1 >> 63", 1), ("0 - 1", (1 << 64) - 1),
    ("~0 + 2", 1), ("(3 == 3) + (2 < 1)", 1), ("not 5", 0), ("4 and 0 or 9", 1)])
def test_scenario_arithmetic_is_the_plans_own(text, value):
    """A scenario value and a rule's `when` are one evaluator (condition_form's header: 64-bit
    wrapping, a shift by 64 or more and a division by zero give 0), so a scenario cannot drive a
    guest to a value the enforcer would compute differently."""
    runner = ScenarioRunner(load_scenario_text(_scenario("  - {op: read, va: 0}")))
    assert runner.evaluate(text) == value


# --------------------------------------------------------------------------- running

def test_the_example_against_a_tiny_enforcer():
    sc = load_scenario(EXAMPLE)
    xen = build_scenario(sc)
    enforcer = TinyEnforcer(xen)
    runner = ScenarioRunner(sc, xen, enforcer)
    table = xen.guest.symbols["sys_call_table"]
    res = runner.run()
    # step 0: .rodata is read-only and CR0.WP is set, so the hook is stored through the writable
    # direct-map alias of the table's frame (via: auto), which EPT traps: denied
    assert res[0].verdict == "deny" and res[0].events == 1 and not res[0].faults
    assert "direct-map alias" in res[0].note
    req = abi.parse_request(res[0].requests[0])
    assert req.payload["gla"] == xen.guest.direct_map_base + xen.guest.walk(xen.vcpu(0).cr3, table + 8 * 59).pa
    # step 1: LSTAR hijack denied (the write is held back, then dropped)
    assert res[1].verdict == "deny" and res[1].events == 1
    req = abi.parse_request(res[1].requests[0])
    assert req.reason == RS.MOV_TO_MSR and req.payload["new_value"] == 0xFFFFFFFFC0002000
    assert abi.parse_response(res[1].responses[0]).flags & F.DENY
    # step 2: CR0.WP clear denied
    assert res[2].verdict == "deny" and res[2].events == 1 and xen.vcpu(0).cr0 & WP
    # step 3: the hidden breakpoint fires, is logged, and commit_creds runs
    assert res[3].verdict == "allow" and res[3].events == 1
    assert abi.parse_request(res[3].requests[0]).reason == RS.SOFTWARE_BREAKPOINT
    assert enforcer.log and "commit_creds" in enforcer.log[0]
    assert xen.current_view(0) == enforcer.exec_view
    # step 4: reads are not trapped
    assert res[4].verdict == "allow" and res[4].events == 0
    assert res[4].value == runner.evaluate("symbol x64_sys_call")
    # step 5: two pages on, a page this monitor does not watch: the store lands, no event
    assert res[5].verdict == "allow" and res[5].events == 0 and "direct-map alias" in res[5].note
    # end state
    assert runner.read_memory(table + 8 * 59, 8) == runner.read_memory(table + 8 * 59, 8, initial=True)
    assert runner.register(1, "LSTAR") == runner.register(1, "LSTAR", initial=True)
    assert xen.paused_vcpus() == frozenset() and not any(r.livelock for r in res)
    assert enforcer.verdicts[1:] == [("deny", "syscall_entry_guard"), ("deny", "wp_guard")]


def test_a_write_via_va_is_the_guests_own_page_fault():
    sc = load_scenario_text(_scenario('''
  - {vcpu: 0, op: write, va: "symbol sys_call_table + 8*59", size: 8, value: 1, via: va}
  - {vcpu: 0, op: write, va: "symbol sys_call_table + 8*59", size: 8, value: 2, via: alias}
  - {vcpu: 0, op: write, va: "symbol init_task", size: 8, value: 3}
'''))
    runner = run_scenario(sc)
    va, alias, data = runner.results
    assert va.verdict == "deny" and va.faults[0].name == "#PF" and va.events == 0
    assert alias.verdict == "allow" and "direct-map alias" in alias.note
    assert data.verdict == "allow" and data.note == ""          # writable data: through va itself
    assert runner.read_memory(runner.evaluate("symbol sys_call_table + 8*59"), 8) == (2).to_bytes(8, "little")


def test_an_unknown_write_route_is_an_error_with_its_position():
    with pytest.raises(ScenarioError, match=r"via: 'sideways'") as exc:
        load_scenario_text(_scenario('  - {vcpu: 0, op: write, va: 0, value: 1, via: sideways}'))
    assert exc.value.line == 5


def test_the_hook_reaches_ept_through_the_direct_map_alias_and_once_wp_is_clear():
    alias = "0xffff888000000000 + (symbol sys_call_table + 8*59 - 0xffffffff80000000)"
    sc = load_scenario_text(_scenario(f"""
  - {{vcpu: 0, op: write, va: "{alias}", size: 8, value: 0xffffffffc0001000}}
  - {{vcpu: 1, op: write_cr, cr: cr0, value: "cr0 & ~cr0.WP"}}
  - {{vcpu: 0, op: write, va: "symbol sys_call_table + 8*59", size: 8, value: 0xffffffffc0001000, via: va}}
  - {{vcpu: 0, op: write, va: "symbol sys_call_table + 0x1000", size: 1, value: 7, via: va}}
"""))
    xen = build_scenario(sc)
    enforcer = TinyEnforcer(xen)
    xen.monitor_write_ctrlreg("cr0", False)                 # this run lets WP be cleared
    runner = ScenarioRunner(sc, xen, enforcer)
    res = runner.run()
    table = xen.guest.symbols["sys_call_table"]
    assert res[0].verdict == "deny" and res[0].events == 1   # through the writable alias
    p = abi.parse_request(res[0].requests[0]).payload
    assert p["gla"] == runner.evaluate(alias) and p["flags"] & abi.MemAccess.W
    assert res[1].verdict == "allow" and res[1].events == 0
    # CR0 is per vCPU: vCPU 0 still has WP, so its stores to .rodata are guest #PFs
    assert res[2].verdict == "deny" and res[2].events == 0 and res[2].faults[0].name == "#PF"
    assert res[3].verdict == "deny" and res[3].events == 0 and res[3].faults[0].name == "#PF"
    # vCPU 1 cleared WP; its write reaches EPT and is discarded
    more = load_scenario_text(_scenario("""
  - {vcpu: 1, op: write, va: "symbol sys_call_table + 8*59", size: 8, value: 0x41}
  - {vcpu: 1, op: write, va: "symbol sys_call_table + 8*451", size: 8, value: 0x41}
"""))
    r2 = ScenarioRunner(more, xen, enforcer).run()
    assert r2[0].verdict == "deny" and r2[0].events == 1
    assert r2[1].verdict == "allow" and r2[1].events == 1    # trapped page, outside the table
    assert int.from_bytes(runner.read_memory(table + 8 * 59, 8), "little") == \
        xen.guest.symbols["__x64_sys_execve"]
    assert enforcer.verdicts[-1] == ("allow", "collateral") and not xen.paused_vcpus()


def test_a_step_without_a_responder_leaves_its_vcpu_paused():
    sc = load_scenario_text(_scenario("""
  - {vcpu: 0, op: wrmsr, msr: LSTAR, value: 0xffffffffc0002000}
  - {vcpu: 0, op: read, va: "symbol init_task"}
  - {vcpu: 1, op: read, va: "symbol init_task"}
"""))
    xen = build_scenario(sc)
    xen.monitor_mov_to_msr(0xC0000082, True)
    res = ScenarioRunner(sc, xen).run()
    assert res[0].paused and res[0].events == 1 and not res[0].took_effect
    assert res[1].paused and not res[1].took_effect and "never ran" in res[1].note
    assert res[2].verdict == "allow" and not res[2].paused
    assert xen.paused_vcpus() == {0}


def test_loop_storm_and_every_op():
    sc = load_scenario_text(_scenario("""
  - op: loop
    count: 200
    steps:
      - {vcpu: 0, op: write, va: "symbol init_task + 8", value: 5}
      - {vcpu: 1, op: rmw, va: "symbol init_task + 16", value: 1}
  - {op: cpuid, leaf: 0x40000000}
  - {op: lidt, base: 0xfffffe0000000000, limit: 0xfff}
  - {op: sgdt}
  - {op: guest_request}
  - {op: int3, va: "symbol commit_creds"}
  - {op: write_cr, cr: cr4, value: "cr4 | cr4.PCE"}
  - {op: exec, va: "symbol vfs_read"}
  - {op: remap, va: "symbol vfs_write", to_pa: 0x100000}
  - {op: exec, va: "symbol vfs_write"}
"""))
    xen = build_scenario(sc)
    init_gfn = xen.guest.walk(xen.vcpu(0).cr3, xen.guest.symbols["init_task"]).pa >> 12
    xen.set_access(0, [init_gfn], "r")
    runner = ScenarioRunner(sc, xen, echo_responder(F.EMULATE))
    res = runner.run()
    loop = res[0]
    assert loop.op == "loop" and loop.iterations == 200 and loop.took_effect
    assert loop.events == 400 and len(loop.requests) == 8    # raw kept for 4 iterations
    assert int.from_bytes(runner.read_memory(xen.guest.symbols["init_task"] + 16, 8), "little") == 200
    assert res[1].value[1:] == tuple(int.from_bytes(b, "little") for b in (b"XenV", b"MMXe", b"nVMM"))
    assert res[1].took_effect and res[1].value[0] == 0x40000005
    assert res[3].value == (xen.guest.percpu_base[0] + 0xB000, 0x7F)
    assert res[4].took_effect and res[5].faults[0].name == "#BP" and res[5].took_effect
    assert res[6].took_effect and xen.vcpu(0).cr4 & (1 << 8)
    assert res[7].took_effect and res[7].value == 0x90
    assert res[8].took_effect                                 # the PTE now points at 0x100000
    assert xen.guest.walk(xen.vcpu(0).cr3, xen.guest.symbols["vfs_write"]).pa >> 12 == 0x100
    assert res[9].value == 0x00 and not xen.paused_vcpus()   # fetched from the new frame


def test_remap_of_a_write_protected_page_table_traps():
    sc = load_scenario_text(_scenario("""
  - {op: remap, va: "symbol vfs_write", to_pa: 0x100000}
"""))
    xen = build_scenario(sc)
    vfs = xen.guest.symbols["vfs_write"]
    first = load_scenario_text(_scenario("  - {op: remap, va: \"symbol vfs_read\", to_pa: 0x200000}"))
    ScenarioRunner(first, xen).run()                          # splits the 2M text page
    pte = xen.guest.walk(xen.vcpu(0).cr3, vfs).pte_address
    xen.set_access(0, [pte >> 12], "r")
    seen = []

    def deny_pte_writes(x: SimulatedXen) -> None:
        for raw in x.take_requests(8):
            req = abi.parse_request(raw)
            seen.append(req.payload)
            x.put_responses([echo_response(raw, F.EMULATE | F.EMULATE_NOWRITE)])
        x.notify()
    res = ScenarioRunner(sc, xen, deny_pte_writes).run()
    assert res[0].verdict == "deny" and res[0].events == 1
    assert seen[0]["gfn"] == pte >> 12 and seen[0]["offset"] == pte & 0xFFF
    assert xen.guest.walk(xen.vcpu(0).cr3, vfs).pa != 0x100000 | (vfs & 0xFFF)


def test_run_scenario_convenience_and_svm_profile():
    runner = run_scenario(EXAMPLE, profile="x86_64-svm")
    # no monitor: everything the rootkit does lands (step 0 through the direct-map alias)
    assert [r.verdict for r in runner.results] == ["allow"] * 6
    assert runner.xen.profile == "x86_64-svm"


def test_a_character_yaml_refuses_is_a_scenario_error_at_its_position():
    with pytest.raises(ScenarioError, match=r"s\.yaml:2:1: unacceptable character #x00"):
        load_scenario_text("scenario: x\n\x00\n", "s.yaml")


def test_a_missing_guest_symbol_file_is_a_scenario_error(tmp_path):
    scenario = load_scenario_text("scenario: x\nguest:\n  layout: linux-x86_64\n  symbols: no-such.System.map\n"
                                  "steps: []\n", str(tmp_path / "s.yaml"))
    with pytest.raises(ScenarioError, match=r"guest: cannot read symbol file .*no-such\.System\.map"):
        build_scenario(scenario)


def test_a_symbols_or_policy_entry_that_is_not_a_file_name_is_a_scenario_error(tmp_path):
    # found by the fuzz campaign: a list here reached the file system as its repr (ENAMETOOLONG)
    with pytest.raises(ScenarioError, match=r"s\.yaml:2:18: guest\.symbols: must be a file name"):
        load_scenario_text("scenario: x\nguest: {symbols: [{vcpu: 1, op: sidt}]}\nsteps: []\n", str(tmp_path / "s.yaml"))
    with pytest.raises(ScenarioError, match=r"policy: must be a file name"):
        load_scenario_text("scenario: x\npolicy: [1]\nguest: {symbols: a.map}\nsteps: []\n", str(tmp_path / "s.yaml"))
    long_name = load_scenario_text("scenario: x\nguest: {symbols: " + "a" * 5000 + "}\nsteps: []\n",
                                   str(tmp_path / "s.yaml"))
    with pytest.raises(ScenarioError, match="guest: "):
        build_scenario(long_name)
