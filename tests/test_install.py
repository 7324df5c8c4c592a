"""Install and teardown as transactions, and recovery (runtime/install.py), against the simulated Xen.

The property under test is "exactly as before": `guest_snapshot` captures
guest memory, every populated frame's access in every view, the views and
altp2m state, each vCPU's view, registers and single-step state, the
monitors, paused vCPUs and the ring; install+teardown, a failed install (a
failure injected at every backend call that changes something, and at reads)
and recovery after a kill must all leave it equal.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from policyc.native import abi
from policyc.runtime.backend import BackendError
from policyc.runtime.bind import bind_plan
from policyc.runtime.install import (InstallError, Installation, TeardownError, install, remap_view_ids,
                                     run_with_teardown)
from policyc.runtime.paging import PageTables
from policyc.runtime.recover import recover
from policyc.runtime.sim import Guest, Op, SimulatedXen, build_linux_x86_64
from policyc.runtime.state_record import state_path_for
from policyc.symbols import load_symbol_table

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "examples" / "policies" / "linux-6.1.System.map"
PLANS = ROOT / "tests" / "golden" / "plans"
SLIDE = 0x1E00000
WP = 1 << 16
F = abi.Flag
RS = abi.Reason
KERNEL_INTEGRITY = "linux-kernel-integrity.x86_64.plan.json"
# XEN-SEMANTICS §7 step 5 (bare VCPU_PAUSED responses after re-enabling the ring) works on Xen, which
# matches responses to nothing; the simulator's ring (native/abi.Ring) refuses a response for which no
# request is pending, so a vCPU whose request died with the old ring stays paused there.

@functools.lru_cache(maxsize=None)
def _template(vcpus: int = 2, split_syscall_page: bool = False) -> Guest:
    g = build_linux_x86_64(MAP, kaslr_slide=SLIDE, memory="256M", vcpus=vcpus)
    if split_syscall_page:
        # As a kernel that changed permissions inside the 2 MiB page at boot (set_memory_*) leaves it:
        # the syscall table mapped by a 4 KiB PTE.
        PageTables(g.memory, g.vcpus[0].cr3).split(g.symbols["sys_call_table"])
    return g


def mk(profile: str = "x86_64", *, split: bool = False, **kw) -> SimulatedXen:
    return SimulatedXen(_template(2, split).clone(), profile, **kw)


@functools.lru_cache(maxsize=None)
def _plan(name: str) -> dict:
    return json.loads((PLANS / name).read_text())


def plan(name: str = KERNEL_INTEGRITY) -> dict:
    return copy.deepcopy(_plan(name))


@pytest.fixture(scope="module")
def symbols():
    return load_symbol_table(MAP)


# --------------------------------------------------------------------------- snapshots

def guest_snapshot(xen: SimulatedXen, *, guest_state: bool = True) -> dict[str, Any]:
    """Everything install may touch. `guest_state=False` leaves out memory and registers (for tests
    where the guest itself ran and changed them)."""
    return xen.state_snapshot(memory=guest_state)


def assert_same(before: dict, after: dict) -> None:
    differing = [k for k in before if before[k] != after[k]]
    detail = ""
    if "memory" in differing:
        detail = f" (frames {before['memory'].changed_frames(after['memory'])[:8]})"
    if "access" in differing:
        b, a = before["access"], after["access"]
        detail += f" (views before {sorted(b)}, after {sorted(a)}"
        for v in set(a) & set(b):
            diff = [(hex(before['frames'][i]), x, y) for i, (x, y) in enumerate(zip(b[v], a[v])) if x != y]
            detail += f"; view {v}: {diff[:4]}"
        detail += ")"
    assert not differing, f"guest state differs in {differing}{detail}"


class Flaky:
    """The real simulator behind a wrapper that fails chosen calls (before they take effect), as a
    hypercall that returns an error would. Not a mock: every other call goes to the simulator."""

    MUTATING = frozenset({"pause", "unpause", "set_access", "altp2m_set_state", "create_view", "destroy_view",
                          "switch_view", "change_gfn", "add_frame", "remove_frame", "monitor_write_ctrlreg",
                          "monitor_mov_to_msr", "monitor", "write_physical", "put_responses", "notify"})

    def __init__(self, inner: SimulatedXen, fail_at: set[int] = frozenset(),
                 fail_named: dict[str, set[int]] | None = None) -> None:
        self._inner = inner
        self.fail_at = set(fail_at)          # indices among mutating calls (1-based)
        self.fail_named = fail_named or {}   # method -> indices among its own calls (1-based)
        self.calls = 0
        self.by_name: dict[str, int] = {}
        self.log: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kw):
            n = self.by_name[name] = self.by_name.get(name, 0) + 1
            if name in self.MUTATING:
                self.calls += 1
                self.log.append(name)
                if self.calls in self.fail_at:
                    raise BackendError(name, f"injected failure (mutating call {self.calls})", errno.EIO)
            if n in self.fail_named.get(name, ()):
                raise BackendError(name, f"injected failure ({name} call {n})", errno.EIO)
            return attr(*args, **kw)
        return call


def respond_allow(xen: SimulatedXen, req_raw: bytes, unrestricted: int = 1) -> None:
    """The plan's allow for memory and breakpoints: step in the unrestricted view, come back."""
    req = abi.parse_request(req_raw)
    rsp = abi.make_response(req, altp2m_idx=unrestricted, fast_singlestep_p2midx=req.altp2m_idx)
    xen.put_responses([rsp.raw])
    xen.notify()


# =========================================================================== install + teardown

def test_install_then_teardown_leaves_the_guest_exactly_as_before(symbols, tmp_path):
    xen = mk()
    before = guest_snapshot(xen)
    bound = bind_plan(plan(), xen, symbols)
    inst = install(bound, xen, state_dir=tmp_path)
    g = xen.guest
    # what install did
    assert inst.view_map == {0: 0, 1: 1, 2: 2}
    assert xen.altp2m_get_state() and [xen.current_view(i) for i in range(2)] == [2, 2]
    assert not xen.paused_vcpus()
    mons = xen.monitors()
    assert set(mons) == {"write_ctrlreg", "mov_to_msr", "software_breakpoint", "singlestep"}
    assert mons["write_ctrlreg"]["cr0"] == {"sync": True, "onchangeonly": True, "bitmask": 0xFFFFFFFFFFFEFFFF}
    sct = g.symbols["sys_call_table"]
    syscall_gfn = g.walk(xen.vcpu(0).cr3, sct).pa >> 12
    assert xen.get_access(2, syscall_gfn) == "r" and xen.get_access(1, syscall_gfn) == "rwx"
    assert xen.get_access(0, syscall_gfn) == "rwx"                 # the host p2m is never touched
    for gfn in bound.pt_watch:
        assert xen.get_access(2, gfn) in ("rx", "r")
    # the hidden breakpoint: execute in view 2 hits 0xCC, reads see the original, view 1 is clean
    cc = g.symbols["commit_creds"]
    cc_gfn = g.walk(xen.vcpu(0).cr3, cc).pa >> 12
    shadow = inst.shadow_frames[cc_gfn]
    assert xen.read_guest(0, cc, 1, view=2) == b"\xcc" and xen.read_guest(0, cc, 1, view=1) == b"\x90"
    assert xen.read_physical(cc_gfn << 12 | (cc & 0xFFF), 1) == b"\x90"   # the guest's frame is untouched
    assert xen.get_access(2, cc_gfn) == "x"
    op = xen.exec_at(1, cc)
    (req,) = [abi.parse_request(r) for r in xen.take_requests()]
    assert req.reason == RS.SOFTWARE_BREAKPOINT and req.altp2m_idx == 2 and not op.done
    respond_allow(xen, req.raw)
    assert op.done and op.took_effect and xen.current_view(1) == 2
    read = xen.read(0, cc, 8)                                     # reading the patched page traps ...
    (req,) = [abi.parse_request(r) for r in xen.take_requests()]
    assert req.reason == RS.MEM_ACCESS and req.payload["gfn"] == cc_gfn
    respond_allow(xen, req.raw)
    assert read.result == 0x9090909090909090                     # ... and sees the original bytes
    # the state record exists while installed
    path = state_path_for(xen.name, tmp_path)
    assert path.exists() and json.loads(path.read_text())["phase"] == "installed"
    inst.teardown()
    assert not path.exists()
    assert shadow not in set(xen.populated_frames())
    after = guest_snapshot(xen, guest_state=False)
    assert_same({k: v for k, v in before.items() if k not in ("memory", "registers")}, after)
    # the guest ran two instructions; nothing else of its memory changed
    assert not before["memory"].changed_frames(xen.guest.memory.snapshot())


def test_install_teardown_with_no_guest_activity_is_an_identity(symbols, tmp_path):
    for name in (KERNEL_INTEGRITY, "linux-descriptors-and-msrs.x86_64.plan.json",
                 "linux-exec-from-data.x86_64.plan.json", "guest-agent-and-probes.x86_64.plan.json"):
        xen = mk()
        before = guest_snapshot(xen)
        inst = install(bind_plan(plan(name), xen, symbols), xen, state_dir=tmp_path)
        assert inst.installed
        inst.teardown()
        inst.teardown()                                     # idempotent
        assert_same(before, guest_snapshot(xen))
        assert not list(tmp_path.iterdir())


def test_svm_plan_plants_inline_breakpoints_and_restores_the_bytes(symbols, tmp_path):
    # slide 0: the policy's `execute va 0xffffffff81c00080` is where the running guest has it
    xen = SimulatedXen(build_linux_x86_64(MAP, kaslr_slide=0, memory="256M", vcpus=2), "x86_64-svm")
    before = guest_snapshot(xen)
    bound = bind_plan(plan("linux-syscall-tracing.x86_64-svm.plan.json"), xen, symbols)
    inst = install(bound, xen, state_dir=tmp_path)
    for bp in bound.breakpoints:
        assert xen.read_physical(bp.pa, 1) == b"\xcc"
    entry = xen.guest.symbols["entry_SYSCALL_64"]
    op = xen.exec_at(0, entry)
    (req,) = [abi.parse_request(r) for r in xen.take_requests()]
    assert req.reason == RS.SOFTWARE_BREAKPOINT
    # the engine emulates the original instruction from the binding's bytes
    xen.put_responses([abi.make_response(req, emul_insn=bound.breakpoint_insn_bytes("bp6")).raw])
    xen.notify()
    assert op.done and op.took_effect
    inst.teardown()
    after = guest_snapshot(xen)
    before["registers"] = after["registers"]                # the guest executed one instruction
    assert_same(before, after)


def test_teardown_reads_back_what_it_restored(symbols, tmp_path):
    # the x86_64-nomtf plan: access on the host p2m and an int3 in the guest's own frame
    xen = mk("x86_64-nomtf")
    bound = bind_plan(plan("linux-kernel-integrity.x86_64-nomtf.plan.json"), xen, symbols)
    inst = install(bound, xen, state_dir=tmp_path)
    assert inst.teardown() == []
    frames = sum(len(v.access) for v in bound.views.values())
    assert inst.verified == {"frames": frames, "bytes": len(bound.breakpoints)} and frames > 1000


class SilentlyIgnored(Flaky):
    """A hypervisor that answers success to the restoring set_access without doing it (as a domctl
    can when the p2m entry changed under it): only reading back shows it."""

    def __init__(self, inner: SimulatedXen) -> None:
        super().__init__(inner)
        self.ignore = False

    def __getattr__(self, name: str) -> Any:
        if name == "set_access" and self.ignore:
            return lambda *a, **kw: None
        return super().__getattr__(name)


def test_a_restore_the_hypervisor_did_not_apply_fails_the_teardown(symbols, tmp_path):
    xen = mk("x86_64-nomtf")
    lying = SilentlyIgnored(xen)
    inst = install(bind_plan(plan("linux-kernel-integrity.x86_64-nomtf.plan.json"), xen, symbols), lying,
                   state_dir=tmp_path)
    lying.ignore = True
    with pytest.raises(TeardownError) as e:
        inst.teardown()
    assert "after teardown" in str(e.value) and "before install" in str(e.value)
    assert state_path_for(xen.name, tmp_path).exists()        # kept for `policyc recover`


class NarrowProbeOnly(Flaky):
    """A backend whose whole-physmap probe is too dear to call (a large Xen guest), and which answers
    `populated_among` for the frames asked about."""

    def __init__(self, inner: SimulatedXen) -> None:
        super().__init__(inner)
        self.asked: set[int] = set()

    def populated_frames(self):
        raise AssertionError("install probed the whole physmap")

    def populated_among(self, gfns):
        self.asked |= set(gfns)
        return set(gfns) & set(self._inner.populated_frames())


def test_install_asks_only_about_the_frames_the_plan_restricts(symbols, tmp_path):
    name = "linux-kernel-integrity.x86_64-nomtf.plan.json"
    ref = mk("x86_64-nomtf")
    inst = install(bind_plan(plan(name), ref, symbols), ref, state_dir=tmp_path / "a")
    xen = mk("x86_64-nomtf")
    narrow = NarrowProbeOnly(xen)
    bound = bind_plan(plan(name), xen, symbols)
    inst2 = install(bound, narrow, state_dir=tmp_path / "b")
    assert narrow.asked == {g for v in bound.views.values() for g in v.access}
    assert guest_snapshot(xen)["access"] == guest_snapshot(ref)["access"]
    assert inst2.teardown() == [] and inst.teardown() == []


# =========================================================================== failures roll back

def _count_mutating_calls(symbols, tmp_path, name=KERNEL_INTEGRITY) -> tuple[int, list[str]]:
    xen = mk()
    bound = bind_plan(plan(name), xen, symbols)
    flaky = Flaky(xen)
    inst = install(bound, flaky, state_dir=tmp_path)
    n, log = flaky.calls, list(flaky.log)
    inst.teardown()
    return n, log


@pytest.mark.parametrize("name", [KERNEL_INTEGRITY, "linux-exec-from-data.x86_64.plan.json"])
def test_a_failure_at_any_step_of_install_leaves_the_guest_exactly_as_before(symbols, tmp_path, name):
    total, log = _count_mutating_calls(symbols, tmp_path, name)
    assert log[0] == "pause" and log[-1] == "unpause"
    assert {"altp2m_set_state", "create_view", "set_access", "add_frame", "change_gfn", "switch_view"} <= set(log)
    before = guest_snapshot(mk())
    for k in range(1, total + 1):
        xen = mk()
        bound = bind_plan(plan(name), xen, symbols)
        with pytest.raises(InstallError) as e:
            install(bound, Flaky(xen, {k}), state_dir=tmp_path)
        assert "injected failure" in str(e.value) and not e.value.undo_errors, (k, log[k - 1])
        assert_same(before, guest_snapshot(xen))
        assert not list(tmp_path.iterdir()), f"state record left after a clean rollback (call {k})"


def test_a_failing_read_during_install_rolls_back_too(symbols, tmp_path):
    before = guest_snapshot(mk())
    xen0 = mk()
    counts = Flaky(xen0)
    inst = install(bind_plan(plan(), xen0, symbols), counts, state_dir=tmp_path)
    during_install = dict(counts.by_name)
    inst.teardown()
    for name in ("get_access", "read_physical", "monitors", "populated_frames", "capabilities"):
        n = during_install[name]
        # (the first get_access calls probe which views exist: a failure there reads as "none")
        for k in sorted({1 if name != "get_access" else 20, n // 2 or 1, n}):
            xen = mk()
            bound = bind_plan(plan(), xen, symbols)
            with pytest.raises(InstallError):
                install(bound, Flaky(xen, fail_named={name: {k}}), state_dir=tmp_path)
            assert_same(before, guest_snapshot(xen))


def test_a_failed_rollback_keeps_the_record_and_recover_finishes_it(symbols, tmp_path):
    total, log = _count_mutating_calls(symbols, tmp_path)
    before = guest_snapshot(mk())
    fail = log.index("switch_view") + 1                     # fail late: almost everything to undo
    for undo_failure in (1, 3, 6):                          # and fail again while undoing
        xen = mk()
        bound = bind_plan(plan(), xen, symbols)
        with pytest.raises(InstallError) as e:
            install(bound, Flaky(xen, {fail, fail + undo_failure}), state_dir=tmp_path)
        assert e.value.undo_errors and "policyc recover" in str(e.value)
        path = state_path_for(xen.name, tmp_path)
        assert path.exists()
        report = recover(xen, path)
        assert report.found and report.clean, report.errors
        assert not path.exists()
        assert_same(before, guest_snapshot(xen))


def test_install_refuses_what_the_host_cannot_do(symbols, tmp_path):
    # DENY of CR/MSR writes needs XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS: a backend that cannot issue it
    xen = mk(control_register_values=False)
    before = guest_snapshot(xen)

    class NoOp4(Flaky):
        def __getattr__(self, name: str) -> Any:
            if name == "monitor_control_registers":
                raise AttributeError(name)
            return super().__getattr__(name)
    with pytest.raises(InstallError, match="CONTROL_REGISTERS"):
        install(bind_plan(plan(), xen, symbols), NoOp4(xen), state_dir=tmp_path)
    assert_same(before, guest_snapshot(xen))
    # one that can gets the call (this attach had not issued it)
    install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path).teardown()
    assert xen.crv
    # more views than the host has
    xen = mk(max_views=2)
    with pytest.raises(InstallError, match="views"):
        install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_second_install_is_refused_while_a_record_exists(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    with pytest.raises(InstallError, match="is running"):
        install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path, guest=xen.name)
    inst.teardown()


# =========================================================================== view ids

def test_view_ids_the_backend_hands_out_are_mapped(symbols, tmp_path):
    xen = mk()
    xen.altp2m_set_state(True)
    other = xen.create_view("rwx")                          # someone else's view already exists
    assert other == 1
    before = guest_snapshot(xen)
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    assert inst.view_map == {0: 0, 1: 2, 2: 3}
    assert [xen.current_view(i) for i in range(2)] == [3, 3]
    ep = inst.engine_plan()
    assert [v["id"] for v in ep["views"]] == [0, 2, 3]
    assert ep["breakpoints"][0]["views"] == [3] and ep["breakpoints"][0]["step_view"] == 2
    assert ep["responses"]["mem_access"]["allow"]["altp2m_idx"] == 2
    assert remap_view_ids(plan(), {0: 0, 1: 1, 2: 2}) == plan()
    record = json.loads(state_path_for(xen.name, tmp_path).read_text())
    assert record["view_map"] == {"0": 0, "1": 2, "2": 3}
    inst.teardown()
    assert_same(before, guest_snapshot(xen))                # altp2m stays on, the other view stays


# =========================================================================== pending requests

def _events_on_both_vcpus(xen: SimulatedXen) -> tuple[Op, Op]:
    g = xen.guest
    xen.vcpu(0).cr0 &= ~WP
    w = xen.write(0, g.symbols["sys_call_table"] + 8 * 59, 0xFFFFFFFFC0001000)
    m = xen.wrmsr(1, "LSTAR", 0xFFFFFFFFC0002000)
    assert not w.done and not m.done and xen.paused_vcpus() == {0, 1}
    return w, m


def test_teardown_answers_every_pending_request(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    before = None
    w, m = _events_on_both_vcpus(xen)
    before = guest_snapshot(mk(), guest_state=False)
    taken = inst.take_requests(1)                           # the enforcer holds one, one is on the ring
    assert len(taken) == 1 and len(inst.in_flight) == 1 and xen.unconsumed_requests() == 1
    inst.teardown()
    assert not xen.paused_vcpus()
    assert w.done and m.done and not inst.in_flight
    assert_same(before, guest_snapshot(xen, guest_state=False))
    # teardown answers with a plain unpause: what was pending runs once nothing traps any more
    assert w.took_effect and m.took_effect


def test_teardown_turns_off_single_stepping_of_a_vcpu_paused_on_a_step(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    xen.vcpu(0).cr0 &= ~WP
    w = xen.write(0, xen.guest.symbols["sys_call_table"], 0)
    (req,) = [abi.parse_request(r) for r in inst.take_requests()]
    # step in view 1 with a plain TOGGLE (not FAST): the next instruction raises a SINGLESTEP event
    inst.put_responses([abi.make_response(req, flags=F.TOGGLE_SINGLESTEP, altp2m_idx=1).raw])
    assert w.done and xen.single_stepping(0)
    nxt = xen.read(0, xen.guest.symbols["_stext"], 1)
    (step,) = [abi.parse_request(r) for r in inst.take_requests()]     # held by the enforcer
    assert step.reason == RS.SINGLESTEP and not nxt.done
    inst.teardown()
    assert nxt.done and not xen.single_stepping(0) and not xen.paused_vcpus()


def test_a_teardown_failure_keeps_the_record_and_recover_completes(symbols, tmp_path):
    xen = mk()
    before = guest_snapshot(xen)
    flaky = Flaky(xen)
    inst = install(bind_plan(plan(), xen, symbols), flaky, state_dir=tmp_path)
    flaky.fail_named = {"destroy_view": {1}}
    with pytest.raises(TeardownError) as e:
        inst.teardown()
    assert "destroy_view" in str(e.value)
    path = state_path_for(xen.name, tmp_path)
    assert path.exists() and not xen.paused_vcpus()
    assert inst.teardown() == e.value.errors                # idempotent: nothing is done twice
    report = recover(xen, path)
    assert report.clean, report.errors
    assert_same(before, guest_snapshot(xen))


# =========================================================================== recovery after a kill

class NewProcess(Flaky):
    """The backend a fresh `policyc recover` process gets: it cannot map the dead agent's ring (the
    ring gfn left the guest's physmap, XEN-SEMANTICS §7) until it has disabled and re-enabled it."""

    def __init__(self, inner: SimulatedXen) -> None:
        super().__init__(inner)
        self.own_ring = False

    def __getattr__(self, name: str) -> Any:
        attr = super().__getattr__(name)
        if name in ("take_requests", "put_responses", "notify") and not self.own_ring:
            def refuse(*a, **kw):
                raise BackendError(name, "cannot map the previous agent's ring", errno.EPERM)
            return refuse
        if name == "reattach":
            def reattach():
                attr()
                self.own_ring = True
            return reattach
        return attr


@pytest.mark.parametrize("new_process", [False, True])
def test_recover_after_the_enforcer_was_killed(symbols, tmp_path, new_process):
    xen = mk()
    before = guest_snapshot(xen)
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    path = inst.record.path
    del inst                                                # SIGKILL: no teardown, only the record
    report = recover(NewProcess(xen) if new_process else xen, path)
    assert report.found and report.clean, report.errors
    assert report.ring_reenabled == new_process             # §7: disable, re-enable, bare responses
    assert not path.exists()
    assert_same(before, guest_snapshot(xen))
    assert not recover(xen, path).found                     # nothing left to do


def test_recover_in_a_new_process_unpauses_and_loses_held_back_writes(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    w, m = _events_on_both_vcpus(xen)
    path = inst.record.path
    del inst
    report = recover(NewProcess(xen), path)
    # the old ring's two requests went with it; the bare responses reached both vCPUs
    assert report.clean and report.ring_reenabled and report.answered == 0, report.errors
    assert report.unpaused_vcpus == [0, 1]
    assert not xen.paused_vcpus() and w.done and m.done
    assert_same(guest_snapshot(mk(), guest_state=False), guest_snapshot(xen, guest_state=False))
    # the memory write re-ran once nothing trapped; the LSTAR write held back for the response was
    # dropped by the ring disable (XEN-SEMANTICS §7): a guest write that silently did not happen
    assert w.took_effect and not m.took_effect


def test_recover_answers_what_the_dead_agent_left_on_the_ring(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    w, m = _events_on_both_vcpus(xen)
    path = inst.record.path
    del inst
    report = recover(xen, path)
    assert report.clean, report.errors
    assert report.answered == 2 and not report.ring_reenabled
    assert not xen.paused_vcpus() and w.done and m.done
    assert_same(guest_snapshot(mk(), guest_state=False), guest_snapshot(xen, guest_state=False))
    # answered with a plain unpause, then every trap removed: both instructions completed
    assert w.took_effect and m.took_effect


def test_recover_unpauses_a_vcpu_whose_request_the_dead_agent_had_taken(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    w, m = _events_on_both_vcpus(xen)
    inst.take_requests(1)                                   # taken, never answered: the agent died
    path = inst.record.path
    del inst
    report = recover(xen, path)
    assert not xen.paused_vcpus() and w.done and m.done
    assert report.clean, report.errors


def test_recover_reports_a_vcpu_it_could_not_unpause(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    _events_on_both_vcpus(xen)
    inst.take_requests(1)
    path = inst.record.path
    del inst

    class NoReattach(Flaky):                                # a backend that cannot re-enable the ring
        def __getattr__(self, name: str) -> Any:
            if name == "reattach":
                raise AttributeError(name)
            return super().__getattr__(name)
    report = recover(NoReattach(xen), path)
    assert report.answered == 1 and xen.paused_vcpus() == {0}
    assert any("cannot re-enable" in c for c in report.cannot)
    assert any("still paused" in e for e in report.errors) and path.exists()
    # everything else is restored
    snap = guest_snapshot(xen, guest_state=False)
    clean = guest_snapshot(mk(), guest_state=False)
    skip = ("paused", "access")           # the ring stays off (no reattach): access cannot be queried
    assert {k: v for k, v in snap.items() if k not in skip} == {k: v for k, v in clean.items() if k not in skip}


class _Died(BaseException):
    """Stands for SIGKILL: it passes every `except Exception`."""


class _Crash(Flaky):
    """The process dies at mutating call k: that call and every later one (install's own rollback
    included) never reach the hypervisor, and the state record stays as it was written last."""

    def __init__(self, inner: SimulatedXen, k: int, dead: dict) -> None:
        super().__init__(inner)
        self.k = k
        self.dead = dead

    def __getattr__(self, name: str) -> Any:
        attr = super().__getattr__(name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            if self.dead["yes"] or (name in self.MUTATING and self.calls + 1 == self.k):
                self.dead["yes"] = True
                raise _Died()
            return attr(*a, **kw)
        return call


def test_recover_after_a_kill_in_the_middle_of_install(symbols, tmp_path, monkeypatch):
    from policyc.runtime.state_record import StateRecord
    total, log = _count_mutating_calls(symbols, tmp_path)
    before = guest_snapshot(mk())
    save, delete = StateRecord.save, StateRecord.delete
    for k in sorted({2, log.index("create_view") + 2, log.index("set_access") + 1, log.index("change_gfn") + 1,
                     log.index("monitor_write_ctrlreg") + 2, total - 1, total}):
        xen = mk()
        bound = bind_plan(plan(), xen, symbols)
        dead = {"yes": False}
        monkeypatch.setattr(StateRecord, "save", lambda self, j: None if dead["yes"] else save(self, j))
        monkeypatch.setattr(StateRecord, "delete", lambda self: None if dead["yes"] else delete(self))
        with pytest.raises(_Died):
            install(bound, _Crash(xen, k, dead), state_dir=tmp_path)
        path = state_path_for(xen.name, tmp_path)
        assert path.exists(), k
        report = recover(xen, path)
        assert report.clean, (k, log[k - 1], report.errors)
        assert_same(before, guest_snapshot(xen))
        assert not path.exists()


# =========================================================================== run_with_teardown

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_with_teardown_on_a_signal(symbols, tmp_path, sig):
    xen = mk()
    before = guest_snapshot(xen)
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    steps = []

    def step():
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), sig)
        return True
    assert run_with_teardown(inst, step) == signal.Signals(sig).name
    assert len(steps) == 3 and inst.torn_down
    assert signal.getsignal(sig) is not None and signal.getsignal(sig) != signal.SIG_IGN
    assert_same(before, guest_snapshot(xen))


def test_run_with_teardown_on_an_exception_and_on_done(symbols, tmp_path):
    xen = mk()
    before = guest_snapshot(xen)
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)

    def boom():
        raise RuntimeError("bad event")
    with pytest.raises(RuntimeError, match="bad event"):
        run_with_teardown(inst, boom)
    assert inst.torn_down
    assert_same(before, guest_snapshot(xen))
    inst2 = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    assert run_with_teardown(inst2, lambda: False) == "done"
    assert_same(before, guest_snapshot(xen))


# =========================================================================== page-table watch

def _allow_pending(inst: Installation, xen: SimulatedXen) -> list[abi.Request]:
    reqs = [abi.parse_request(r) for r in inst.take_requests()]
    inst.put_responses([abi.make_response(r, altp2m_idx=1, fast_singlestep_p2midx=r.altp2m_idx).raw
                        for r in reqs])
    return reqs


def test_remapping_the_syscall_tables_page_moves_the_trap_with_it(symbols, tmp_path):
    xen = mk(split=True)
    before = guest_snapshot(xen, guest_state=False)
    bound = bind_plan(plan(), xen, symbols)
    inst = install(bound, xen, state_dir=tmp_path)
    g = xen.guest
    sct = g.symbols["sys_call_table"]
    walk = g.walk(xen.vcpu(0).cr3, sct)
    old_gfn, pt_gfn, pte_off = walk.pa >> 12, walk.pte_address >> 12, walk.pte_address & 0xFFF
    assert walk.page_size == 4096 and pt_gfn in inst.bound.pt_watch
    # the rootkit prepares a copy of the table with its hook, in a frame nobody watches ...
    evil = 0x200
    g.memory.write(evil << 12, g.memory.read(old_gfn << 12, 4096))
    g.memory.write_u64((evil << 12) + 0x360 + 8 * 59, 0xFFFFFFFFC0001000)
    # ... and points the table's PTE at it: a store to the page table, which traps
    remap = xen.execute(0, Op("remap", 0, va=sct, to_pa=evil << 12))
    assert not remap.done
    (req,) = _allow_pending(inst, xen)
    assert req.reason == RS.MEM_ACCESS and req.payload["gfn"] == pt_gfn
    assert req.payload["offset"] == pte_off and req.payload["flags"] & abi.MemAccess.W
    assert inst.bound.pt_entry_users(pt_gfn, pte_off) >= {"syscalls", "rodata"}
    assert remap.done and remap.took_effect and xen.current_view(0) == 2
    # the enforcer follows the remap
    delta = inst.rebind_after_pt_write(req.payload["gfn"], req.payload["offset"])
    assert delta.regions["syscalls"][1][0] == (evil, 0x360, 0xFFF)
    assert delta.views[2][evil] == (None, "r") and delta.views[2][old_gfn] == ("r", None)
    assert xen.get_access(2, evil) == "r" and xen.get_access(2, old_gfn) == "rwx"
    assert not xen.paused_vcpus()
    # a write to the table now lands on the new frame, and still traps
    xen.vcpu(0).cr0 &= ~WP
    w = xen.write(0, sct + 8 * 60, 0xFFFFFFFFC0003000)
    (req,) = [abi.parse_request(r) for r in inst.take_requests()]
    assert req.payload["gfn"] == evil and req.payload["offset"] == 0x360 + 8 * 60 and not w.done
    inst.put_responses([abi.make_response(req, flags=F.EMULATE | F.EMULATE_NOWRITE).raw])   # deny
    assert w.done and not w.took_effect
    # a write to a neighbouring PTE (no protected page behind it) needs no rebind
    assert not inst.rebind_after_pt_write(pt_gfn, (pte_off + 0x100) % 4096)
    inst.teardown()
    assert_same(before, guest_snapshot(xen, guest_state=False))


def test_a_rootkit_splitting_the_large_page_itself_is_followed_too(symbols, tmp_path):
    xen = mk()                                              # the table lies in a 2 MiB page
    bound = bind_plan(plan(), xen, symbols)
    inst = install(bound, xen, state_dir=tmp_path)
    g = xen.guest
    sct = g.symbols["sys_call_table"]
    walk = g.walk(xen.vcpu(0).cr3, sct)
    assert walk.page_size == 2 << 20
    pd_gfn, pde_off = walk.pte_address >> 12, walk.pte_address & 0xFFF
    # a new page table, built in an unwatched frame: 512 PTEs for the same 2 MiB, one of them redirected
    pde = g.memory.read_u64(walk.pte_address)
    base, flags = pde & 0x000FFFFFFFE00000, pde & ~0x000FFFFFFFFFF000 & ~0x80
    new_pt, evil = 0x300, 0x200
    ptes = [(base + (i << 12)) | flags for i in range(512)]
    ptes[(sct >> 12) & 0x1FF] = (evil << 12) | flags
    g.memory.write(new_pt << 12, b"".join(p.to_bytes(8, "little") for p in ptes))
    g.memory.write(evil << 12, g.memory.read(walk.pa & ~0xFFF, 4096))
    # the PDE store goes through the direct map and traps: the PD is watched
    w = xen.write(0, g.direct_map_base + walk.pte_address, (new_pt << 12) | 0x63)
    (req,) = _allow_pending(inst, xen)
    assert req.payload["gfn"] == pd_gfn and req.payload["offset"] == pde_off and w.took_effect
    delta = inst.rebind_after_pt_write(pd_gfn, pde_off)
    assert new_pt in delta.pt_added and new_pt in inst.bound.pt_watch
    assert inst.bound.region_frames("syscalls")[0][0] == evil
    assert xen.get_access(2, new_pt) == "rx" and xen.get_access(2, evil) == "r"
    # the next remap, of a PTE in the rootkit's own table, traps as well
    remap = xen.execute(0, Op("remap", 0, va=sct, to_pa=0x201 << 12))
    (req,) = [abi.parse_request(r) for r in inst.take_requests()]
    assert req.payload["gfn"] == new_pt and not remap.done
    inst.put_responses([abi.make_response(req, flags=F.EMULATE | F.EMULATE_NOWRITE).raw])   # refused
    assert remap.done and not remap.took_effect
    inst.teardown()
    assert not xen.paused_vcpus() and not xen.altp2m_get_state()


def test_remap_of_a_breakpoint_page_moves_the_shadow(symbols, tmp_path):
    xen = mk()
    bound = bind_plan(plan(), xen, symbols)
    g = xen.guest
    cc = g.symbols["commit_creds"]
    # split the text page by hand before install (as in the syscall test), then remap it after
    PageTables(g.memory, xen.vcpu(0).cr3).split(cc)
    bound = bind_plan(plan(), xen, symbols)
    before = guest_snapshot(xen, guest_state=False)
    inst = install(bound, xen, state_dir=tmp_path)
    old_gfn = g.walk(xen.vcpu(0).cr3, cc).pa >> 12
    new_gfn = 0x210
    g.memory.write(new_gfn << 12, g.memory.read(old_gfn << 12, 4096))
    remap = xen.execute(0, Op("remap", 0, va=cc, to_pa=new_gfn << 12))
    (req,) = _allow_pending(inst, xen)
    assert remap.took_effect
    delta = inst.rebind_after_pt_write(req.payload["gfn"], req.payload["offset"])
    old, new = delta.breakpoints["bp0"]
    assert (old.gfn, new.gfn) == (old_gfn, new_gfn)
    assert set(inst.shadow_frames) == {new_gfn}
    assert xen.read_guest(0, cc, 1, view=2) == b"\xcc" and xen.get_access(2, new_gfn) == "x"
    assert xen.get_access(2, old_gfn) == "rwx"
    op = xen.exec_at(1, cc)
    (req,) = [abi.parse_request(r) for r in xen.take_requests()]
    assert req.reason == RS.SOFTWARE_BREAKPOINT
    respond_allow(xen, req.raw)
    assert op.took_effect
    inst.teardown()
    assert_same(before, guest_snapshot(xen, guest_state=False))


def test_a_plan_on_the_host_p2m_alone_restores_host_access(symbols, tmp_path):
    """Without altp2m (the arm64 shape of plan): access is set in the host p2m and put back."""
    p = plan()
    restricted = p["views"][2]
    p["views"] = [{"id": 0, "role": "host", "default_access": "rwx", "ranges": restricted["ranges"]}]
    p["breakpoints"] = []
    p["monitors"] = {k: v for k, v in p["monitors"].items() if k != "software_breakpoint"}
    xen = mk()
    xen.set_access(0, [0x300], "rx")                        # something else's restriction, kept
    before = guest_snapshot(xen)
    bound = bind_plan(p, xen, symbols)
    inst = install(bound, xen, state_dir=tmp_path)
    gfn = bound.region_frames("syscalls")[0][0]
    assert not xen.altp2m_get_state() and xen.get_access(0, gfn) == "r"
    assert all(xen.get_access(0, t) in ("rx", "r") for t in bound.pt_watch)
    inst.teardown()
    assert_same(before, guest_snapshot(xen))
    assert xen.get_access(0, 0x300) == "rx"


def test_the_remap_op_on_a_large_page_traps(symbols, tmp_path):
    xen = mk()                                              # the syscall table lies in a 2 MiB page
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    g = xen.guest
    sct = g.symbols["sys_call_table"]
    pd_gfn = g.walk(xen.vcpu(0).cr3, sct).pte_address >> 12
    remap = xen.execute(0, Op("remap", 0, va=sct, to_pa=0x200 << 12))
    try:
        assert not remap.done                              # the PDE store linking the new table: trapped
        (req,) = _allow_pending(inst, xen)
        assert req.payload["gfn"] == pd_gfn and remap.took_effect
        walk = g.walk(xen.vcpu(0).cr3, sct)
        assert walk.page_size == 4096 and walk.pa >> 12 == 0x200
        delta = inst.rebind_after_pt_write(req.payload["gfn"], req.payload["offset"])
        assert inst.bound.region_frames("syscalls")[0][0] == 0x200 and delta.pt_added
        xen.vcpu(0).cr0 &= ~WP
        w = xen.write(0, sct + 8 * 59, 0xFFFFFFFFC0001000)  # the table's new frame traps
        (req,) = [abi.parse_request(r) for r in inst.take_requests()]
        assert req.payload["gfn"] == 0x200 and not w.done
        inst.put_responses([abi.make_response(req, flags=F.EMULATE | F.EMULATE_NOWRITE).raw])
        assert w.done and not w.took_effect
    finally:
        inst.teardown()


# =========================================================================== a journal names its domain

def test_recover_refuses_a_journal_of_another_domain_with_the_same_name(symbols, tmp_path):
    """A guest that took the dead enforcer's guest name (or socket) is another domain: recovering it
    from the journal would 'undo' changes it never had."""
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    path = inst.record.path
    assert json.loads(path.read_text())["domain"] == xen.domain_identity()
    del inst                                                # SIGKILL
    newcomer = mk()                                         # same name, another domain
    assert newcomer.name == xen.name and newcomer.domain_identity() != xen.domain_identity()
    before = guest_snapshot(newcomer)
    report = recover(newcomer, path)
    assert report.found and not report.clean
    assert "another guest took the name" in report.not_this_domain
    assert_same(before, guest_snapshot(newcomer))           # nothing touched
    assert path.exists()                                    # the journal stays for its own domain
    assert recover(xen, path).clean and not path.exists()


def test_recover_refuses_a_journal_that_names_no_domain(symbols, tmp_path):
    xen = mk()
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    path = inst.record.path
    del inst
    record = json.loads(path.read_text())
    record.pop("domain")                                    # as an older policyc wrote it
    path.write_text(json.dumps(record))
    report = recover(xen, path)
    assert "names no domain" in report.not_this_domain and path.exists()


def test_stray_temporary_journals_are_removed(symbols, tmp_path):
    xen = mk()
    path = state_path_for(xen.name, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stray = path.parent / (path.name + ".k1ll3d")           # StateRecord.save killed before its rename
    stray.write_text("{")
    other = path.parent / "another-guest.json.x"
    other.write_text("{")
    inst = install(bind_plan(plan(), xen, symbols), xen, state_dir=tmp_path)
    assert not stray.exists() and other.exists()
    stray.write_text("{")
    del inst
    assert recover(xen, path).clean
    assert not stray.exists() and not path.exists() and other.exists()


def test_the_recover_command_refuses_another_domain_and_changes_nothing(tmp_path):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from policyc.cli import main
    from policyc.runtime.state_record import StateRecord

    guest = "simhost:/nonexistent.sock"
    path = state_path_for(guest, tmp_path)
    record = StateRecord(path, guest, plan(), {"kind": "sim", "name": "sim-x86_64", "instance": "0" * 32})
    record.save([])

    class Hosted:      # what `connect` returns for a simhost that is another domain now
        def __init__(self) -> None:
            self.xen = mk()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.xen, name)

    import policyc.runtime.sim.host as host
    real = host.connect
    host.connect = lambda _socket: Hosted()
    try:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["recover", "--guest", guest, "--state-dir", str(tmp_path)])
    finally:
        host.connect = real
    assert code == 1, out.getvalue() + err.getvalue()
    assert "not applying" in err.getvalue() and "instance 00000000" in err.getvalue()
    assert "Traceback" not in out.getvalue() + err.getvalue() and path.exists()
