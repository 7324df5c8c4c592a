"""The native decision engine against the Python engine (the reference): same bound plans, same requests,
identical response bytes and identical decision records, for every example policy and every target it
compiles for, on the requests its example scenario's guest raises, on random requests from the plan's own
tables and on hostile ones.

POLICYC_DIFF_REQUESTS sets the total (1,000,000 in CI, 200,000 elsewhere). For a plan whose decisions
depend on nothing but the request (no rate limit, no disarm, not arm64's relax-and-rearm) the Python
engine decides each distinct request once and every native answer to it is compared with that; the
others are decided by both engines request by request (at most 6,000 a case, the Python engine is
slow); the plans without state take what is left of the total (test_at_least_the_total_is_compared).
"""

from __future__ import annotations

import io
import os
import random
import re
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan
from policyc.native import abi
from policyc.runtime.bind import BindError, bind_plan
from policyc.runtime.budget import Budget
from policyc.runtime.decide import DecisionEngine
from policyc.runtime.decision_log import DecisionLog
from policyc.runtime.native_engine import NativeEngine, native_available
from policyc.runtime.sim.ring_replay import record_requests
from policyc.runtime.sim.scenario import build_scenario, load_scenario
from policyc.symbols import load_symbol_table

pytestmark = pytest.mark.skipif(not native_available(), reason="the native extension is not built")

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "examples" / "policies"
SCENARIOS = ROOT / "examples" / "scenarios"
TARGETS = ("x86_64", "x86_64-svm", "x86_64-nomtf", "arm64")
TOTAL = int(os.environ.get("POLICYC_DIFF_REQUESTS", "1000000" if os.environ.get("CI") else "200000"))
C = abi.constants()
RS = abi.Reason
LATENCY = re.compile(r'"latency_ns":\d+')
ID_AND_TIME = re.compile(r'^\{"decision_id":"[^"]*","time":"[^"]*"')   # what a memoized answer may differ in


def _guests() -> dict[Path, Path]:
    """Example policy -> a scenario whose guest it protects."""
    out = {}
    for sc in sorted(SCENARIOS.glob("*.yaml")):
        scenario = load_scenario(sc)
        if scenario.policy and not scenario.reloads:     # a reload changes the plan under the comparison
            out.setdefault(Path(scenario.policy).resolve(), sc)
    return out


def _cases() -> list[tuple[str, str]]:
    guests = _guests()
    return [(p.name, t) for p in sorted(POLICIES.glob("*.vmi")) if p.resolve() in guests for t in TARGETS]


@lru_cache(maxsize=None)
def recorded(policy: str, target: str) -> tuple[bytes, ...]:
    """The requests the policy's example scenario raises on its guest (the Python engine answering)."""
    path = POLICIES / policy
    d = Diagnostics()
    model = check_policy(path, d, target_arch=target)
    plan = compile_plan(model, d, target=target)
    with tempfile.TemporaryDirectory() as state:
        return tuple(record_requests(plan, [load_symbol_table(s.path) for s in model.symbols],
                                     load_scenario(_guests()[path.resolve()]), state, profile=target))


@lru_cache(maxsize=None)
def bound_plan(policy: str, target: str):
    """(plan, binding) or None when the policy does not compile or bind for the target."""
    path = POLICIES / policy
    d = Diagnostics()
    model = check_policy(path, d, target_arch=target)
    plan = compile_plan(model, d, target=target) if model is not None else None
    if plan is None:
        return None
    scenario = load_scenario(_guests()[path.resolve()])
    try:
        xen = build_scenario(scenario, profile=target)
        bound = bind_plan(plan, xen, [load_symbol_table(s.path) for s in model.symbols])
    except (BindError, Exception) as exc:  # noqa: BLE001 - a guest of another architecture
        return ("skip", f"{type(exc).__name__}: {exc}")
    return plan, bound


class Clocks:
    """Both engines' clocks: the test moves them between batches."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 1_765_000_000_123_456_789

    def clock(self) -> float:
        return self.now

    def wall_ns(self) -> int:
        return self.wall


def engines(plan, bound, clocks: Clocks, budget: tuple[float, str] | None = None
            ) -> tuple[DecisionEngine, DecisionEngine, NativeEngine]:
    """The reference, the Python engine the native one wraps, and the native one; with `budget`
    (events a second, over_budget) each Python engine has a global budget of its own."""
    def mk() -> DecisionEngine:
        engine = DecisionEngine(bound.plan, bound, clock=clocks.clock, wall_clock_ns=clocks.wall_ns, id_prefix="diff")
        if budget is not None:
            engine.budget = Budget(budget[0], clocks.clock, over_budget=budget[1])
        return engine
    reference, wrapped = mk(), mk()
    return reference, wrapped, NativeEngine(wrapped)


# --------------------------------------------------------------------------- requests

_HDR = struct.Struct("<IIIIH6x")
_REGS = struct.Struct("<33Q4I2Q6IQ8H")


class Requests:
    """Random requests aimed at one engine's tables, and hostile ones."""

    def __init__(self, engine: DecisionEngine, native: NativeEngine, seed: int) -> None:
        self.r = random.Random(seed)
        self.e = engine
        keys = engine.table_keys()
        self.gfns = sorted(keys["gfns"]) or [0x1000]
        self.sites = sorted(keys["sites"]) or [0xFFFFFFFF81000000]
        self.msrs = sorted(keys["msrs"]) + [0xC0000080, 0x176, 0x1B]
        self.leaves = sorted(keys["cpuid_leaves"]) + [0, 7, 0x40000000]
        self.values = [native.e.consts[i] for i in range(native.e.nconsts)] or [0]
        self.arm = engine.arm

    def word(self) -> int:
        r = self.r
        pick = r.random()
        if pick < 0.3:
            return r.choice(self.values)
        if pick < 0.5:
            return r.choice(self.values) ^ (1 << r.randrange(64))
        if pick < 0.6:
            return r.choice((0, 1, (1 << 64) - 1))
        return r.getrandbits(64)

    def regs(self, rip: int | None = None) -> bytes:
        r = self.r
        words = [self.word() if r.random() < 0.3 else r.getrandbits(64) for _ in range(33)]
        if rip is not None:
            words[19] = rip
        rest = [r.getrandbits(32) for _ in range(4)] + [r.getrandbits(64) for _ in range(2)] + \
            [r.getrandbits(32) for _ in range(6)] + [r.getrandbits(64)] + [r.getrandbits(16) for _ in range(7)] + [0]
        return _REGS.pack(*words, *rest)

    def one(self) -> bytes:
        r = self.r
        flags = C["VM_EVENT_FLAG_VCPU_PAUSED"] if r.random() < 0.9 else 0
        if r.random() < 0.3:
            flags |= C["VM_EVENT_FLAG_ALTERNATE_P2M"]
        vcpu = r.randrange(8) if r.random() < 0.95 else r.getrandbits(32)
        altp2m = r.randrange(4)
        kind = r.random()
        rip = None
        if kind < 0.45:
            reason = RS.MEM_ACCESS
            gfn = r.choice(self.gfns) if r.random() < 0.9 else r.getrandbits(20)
            off = r.choice((0, 8, 0x100, 0x1F8, 0x200, 0xFF0, 0xFF8, 0xFFC, 0xFFF)) if r.random() < 0.5 \
                else r.randrange(4096)
            acc = r.choice((1, 2, 3, 4, 5, 6, 7))
            acc |= r.choice((0, 0, C["MEM_ACCESS_GLA_VALID"], C["MEM_ACCESS_FAULT_IN_GPT"]))
            u = struct.pack("<QQQI4x", gfn, off, self.word(), acc)
        elif kind < 0.55:
            reason = RS.WRITE_CTRLREG
            old = self.word()
            new = old ^ r.choice((1 << 16, 1 << 20, 1 << 21, 3 << 20, 0, 1 << r.randrange(64)))
            u = struct.pack("<I4xQQ", r.choice((0, 1, 2, 3, 3, 9)), new, old)
        elif kind < 0.65:
            reason = RS.MOV_TO_MSR
            u = struct.pack("<QQQ", r.choice(self.msrs), self.word(), self.word())
        elif kind < 0.8:
            reason = RS.SOFTWARE_BREAKPOINT
            rip = r.choice(self.sites) if r.random() < 0.8 else self.word()
            gfn = (rip >> 12) & 0xFFFFF if r.random() < 0.5 else (1 << 64) - 1
            u = struct.pack("<QQIB3x", gfn, 0, r.choice((1, 4)), 6)
        elif kind < 0.88:
            reason = RS.CPUID
            u = struct.pack("<III", r.choice((2, 3)), r.choice(self.leaves), r.randrange(3))
        elif kind < 0.94:
            reason = RS.DESCRIPTOR_ACCESS
            u = struct.pack("<I4xQBB", r.getrandbits(32), r.getrandbits(64), r.randrange(6), r.choice((0, 1, 2)))
        else:
            reason = r.choice((RS.GUEST_REQUEST, RS.GUEST_REQUEST, RS.DEBUG_EXCEPTION, RS.PRIVILEGED_CALL,
                               RS.SINGLESTEP, RS.INTERRUPT, 0, 99))
            u = struct.pack("<QQIB3x", r.getrandbits(20), r.getrandbits(64), r.choice((1, 2)), r.choice((3, 5, 6)))
        u = u.ljust(32, b"\0")
        data = self.regs(rip)
        if self.arm:
            data = struct.pack("<5Q", r.getrandbits(64), r.getrandbits(64), r.getrandbits(64),
                               rip if rip is not None else r.getrandbits(64), r.getrandbits(32))
        raw = _HDR.pack(C["VM_EVENT_INTERFACE_VERSION"], flags, int(reason), vcpu, altp2m) + u + data
        raw = raw.ljust(400, b"\0")
        hostile = r.random()
        if hostile < 0.02:
            raw = struct.pack("<I", r.choice((0, 6, 8, r.getrandbits(32)))) + raw[4:]   # wrong version
        elif hostile < 0.03:
            raw = raw[:r.randrange(400)]                                                 # truncated
        elif hostile < 0.035:
            raw = raw + b"\0"                                                            # too long
        elif hostile < 0.045:
            raw = bytes(r.getrandbits(8) for _ in range(400))                            # random bytes
        return raw


# --------------------------------------------------------------------------- the comparison

def _normal(text: str) -> list[str]:
    return LATENCY.sub('"latency_ns":0', text).splitlines()


def _counters(log: DecisionLog) -> tuple:
    s = log.stats
    rules = {n: (r.matches, r.decided, r.deny, r.would_deny, r.limited, r.alerts, r.logs, r.latency.count)
             for n, r in s.rules.items()}
    return (s.decisions, dict(s.by_kind), dict(s.verdicts), s.collateral, s.conservative, s.unmatched, s.alerts,
            s.latency.count, rules)


CASES = _cases()


def test_every_example_policy_has_cases_and_x86_64_binds():
    assert {p for p, _t in CASES} == {p.name for p in POLICIES.glob("*.vmi") if p.name != "linux-common.vmi"}
    for policy, _t in CASES:
        if "arm64" not in policy:
            assert isinstance(bound_plan(policy, "x86_64")[0], dict), bound_plan(policy, "x86_64")


@pytest.mark.parametrize("policy,target", CASES, ids=[f"{p}-{t}" for p, t in CASES])
def test_native_and_python_engines_answer_and_record_identically(policy, target):
    got = bound_plan(policy, target)
    if got is None:
        pytest.skip(f"{policy} does not compile for {target}")
    if got[0] == "skip":
        pytest.skip(f"{policy} for {target} does not bind to its scenario's guest: {got[1]}")
    COMPARED[(policy, target)] = compare(policy, target, got, TOTAL // len(CASES), seed=0)


BUDGET_CASES = [(p, t, mode) for p, t in CASES if t in ("x86_64", "arm64") for mode in ("then", "allow")]


@pytest.mark.parametrize("policy, target, over_budget", BUDGET_CASES)
def test_native_and_python_engines_agree_past_a_global_budget(policy, target, over_budget):
    """A token per event, in C as in runtime/budget.py: which events are past the budget, what each
    rule does past it (its `then`, or its verdict without actions; `allow`: audit), and the bucket
    itself after every batch (both engines' Budgets end equal)."""
    got = bound_plan(policy, target)
    if got is None:
        pytest.skip(f"{policy} does not compile for {target}")
    if got[0] == "skip":
        pytest.skip(f"{policy} for {target} does not bind to its scenario's guest: {got[1]}")
    compare(policy, target, got, 3000, seed=2, budget=(200.0, over_budget))


def test_at_least_the_total_is_compared():
    """The plans without state take whatever the cases above left of the total (memoized: fast)."""
    stateless = [(p, t) for p, t in CASES if _stateless(p, t)]
    assert stateless
    left = TOTAL - sum(COMPARED.values())
    for i, (policy, target) in enumerate(stateless):
        if left > 0:
            share = -(-left // (len(stateless) - i))
            done = compare(policy, target, bound_plan(policy, target), share, seed=1)
            COMPARED[(policy, target, "more")] = done
            left -= done
    assert sum(COMPARED.values()) >= TOTAL


COMPARED: dict[tuple, int] = {}


def _stateless(policy: str, target: str) -> bool:
    got = bound_plan(policy, target)
    if got is None or got[0] == "skip":
        return False
    reference, _w, native = engines(*got, Clocks())
    return not native.stateful and not reference.arm


def compare(policy: str, target: str, got: tuple, share: int, seed: int,
            budget: tuple[float, str] | None = None) -> int:
    """Both engines on `share` requests for one bound plan (with `budget`, each under a global budget
    of its own); returns how many were compared."""
    plan, bound = got
    clocks = Clocks()
    reference, wrapped, native = engines(plan, bound, clocks, budget)
    gen = Requests(reference, native, seed=(hash((policy, target)) + seed) & 0xFFFF)
    stateless = not native.stateful and not reference.arm and budget is None
    if not stateless:
        share = min(share, 6000)          # the Python engine decides each of these too
    distinct = list(recorded(policy, target)) + [gen.one() for _ in range(min(share, 3000))]
    ref_out, ref_alerts = io.StringIO(), io.StringIO()
    ref_log = DecisionLog(ref_out, ref_alerts, plan["content_hash"])
    nat_out, nat_alerts = io.StringIO(), io.StringIO()
    nat_log = DecisionLog(nat_out, nat_alerts, plan["content_hash"])
    memo: dict[bytes, tuple[bytes, str]] = {}
    done = 0
    rnd = random.Random(7)
    while done < share:
        n = rnd.choice((1, 3, 8, 8, 64))
        batch = [rnd.choice(distinct) for _ in range(n)] if done >= len(distinct) else distinct[done:done + n]
        clocks.now += rnd.choice((0.0, 0.0004, 0.003, 0.2))
        clocks.wall += 1_000_123
        out = native.decide_batch(batch, nat_log)
        nat_log.write_text(out.text, out.alerts)
        lines = _normal(out.text)
        assert len(out.responses) == len(lines) == len(batch)
        if stateless and done >= len(distinct):
            for raw, rsp, line in zip(batch, out.responses, lines):
                want_rsp, want_line = memo[raw]
                assert rsp == want_rsp, (policy, target, raw.hex())
                assert ID_AND_TIME.sub("", line) == want_line, (policy, target)
        else:
            pos = ref_out.tell()
            pairs = reference.decide_batch(batch)
            ref_log.write_batch(pairs)
            ref_out.seek(pos)
            want = _normal(ref_out.read())
            for raw, (want_rsp, _d), rsp, want_line, line in zip(batch, pairs, out.responses, want, lines):
                assert rsp == want_rsp, (policy, target, raw.hex(), line)
                assert line == want_line, (policy, target)
                memo.setdefault(raw, (rsp, ID_AND_TIME.sub("", line)))
        done += n
    if not stateless or done <= len(distinct):
        assert _counters(nat_log) == _counters(ref_log)
        assert nat_alerts.getvalue() == ref_alerts.getvalue()
    if budget is not None:
        ours, theirs = wrapped.budget, reference.budget
        assert (ours.over, ours.tokens, ours.stamp) == (theirs.over, theirs.tokens, theirs.stamp)
        assert 0 < ours.over < done, "the budget was never reached, or never had room"
    print(f"{policy} {target}: {done} requests, native share "
          f"{native.decided_natively() / max(1, done):.3f}, handed over {native.punts}")
    return done


def test_decide_blob_answers_as_decide_batch_does():
    plan, bound = bound_plan("linux-kernel-integrity.vmi", "x86_64")
    clocks = Clocks()
    _ref, _w, by_batch = engines(plan, bound, clocks)
    _ref2, _w2, by_blob = engines(plan, bound, clocks)
    gen = Requests(_ref, by_batch, seed=3)
    requests = [r for r in (gen.one() for _ in range(3000)) if len(r) == 400]
    assert by_blob.decide_blob(b"".join(requests)) == b"".join(by_batch.decide_batch(requests).responses)
    assert by_blob.engine.next_id == by_batch.engine.next_id == len(requests) + 1
    assert by_blob.punts == by_batch.punts and sum(by_blob.punts.values()) > 0


NASTY = r'''policy "nasty" {
    target xen >= 4.17 on x86_64
    symbols "%s"
    mode enforce
    region syscalls = symbol sys_call_table size 8 * 451
    region idt = symbol idt_table size 4096
    rule loud: on write to syscalls, idt {
        deny
        priority 5
        alert critical "wrote \"{gla:#018x}\" \\ {rip:X} {rcx:08d} {rax:#X} {r8:12x} ☃ 😀   tab	end"
    }
    rule quiet: on write to syscalls {
        log info "{vcpu} then {rsp:x} {offset}"
    }
    rule odd_format: on write to idt {
        log info "{rax:>8}"
    }
    rule masks: on write cr0 where (new ^ old) & 0x10000 != 0 and new < old + 5 * 3 or -old / (new & 0) == 0 {
        alert high "cr0 {old:x} -> {new:#X}"
    }
    rule shifts: on write cr4 where (new >> 64) == 0 and (old << 3) %% 7 != 1 and not (new <= ~old) {
        log low "cr4 {new}"
    }
}
'''


def test_templates_escapes_and_arithmetic_render_identically(tmp_path):
    """Quotes, backslashes, control and astral characters, format specs, missing fields, odd
    operators: native records equal the Python engine's (a spec it cannot render hands over)."""
    path = tmp_path / "nasty.vmi"
    path.write_text(NASTY % (POLICIES / "linux-6.1.System.map"), encoding="utf-8")
    d = Diagnostics()
    model = check_policy(path, d)
    assert model is not None, [str(x) for x in d.items]
    plan = compile_plan(model, d)
    assert plan is not None, [str(x) for x in d.items]
    xen = build_scenario(load_scenario(SCENARIOS / "rootkit-hooks-syscall-table.yaml"))
    bound = bind_plan(plan, xen, [load_symbol_table(s.path) for s in model.symbols])
    clocks = Clocks()
    reference, _wrapped, native = engines(plan, bound, clocks)
    assert set(native.unexpressible) == {"odd_format"}
    gen = Requests(reference, native, seed=11)
    requests = [gen.one() for _ in range(4000)]
    ref_out, nat_out = io.StringIO(), io.StringIO()
    ref_log, nat_log = DecisionLog(ref_out, plan_hash="h"), DecisionLog(nat_out, plan_hash="h")
    pairs = reference.decide_batch(requests)
    ref_log.write_batch(pairs)
    batch = native.decide_batch(requests, nat_log)
    nat_log.write_text(batch.text, batch.alerts)
    assert batch.responses == [rsp for rsp, _d in pairs]
    assert _normal(nat_out.getvalue()) == _normal(ref_out.getvalue())
    assert '\\u2603 \\ud83d\\ude00' in nat_out.getvalue()
    assert native.decided_natively() > 1000 and native.punts.get("rule", 0) > 0


def test_register_denies_a_backend_must_hold_are_handed_to_python():
    # Xen's register-write DENY waits in put_responses until the vCPU left its pCPU: a native
    # monitor on its ring must hand those back instead of pushing them (python_denies)
    plan, bound = bound_plan("linux-kernel-integrity.vmi", "x86_64")
    clocks = Clocks()
    ref, _w, free = engines(plan, bound, clocks)
    _r2, wrapped, _n = engines(plan, bound, clocks)
    held = NativeEngine(wrapped, python_denies=("write_ctrlreg", "mov_to_msr"))
    gen = Requests(ref, free, seed=11)
    requests = [r for r in (gen.one() for _ in range(4000)) if len(r) == 400]
    a, b = free.decide_batch(requests), held.decide_batch(requests)
    assert a.responses == b.responses                       # the same answers, whoever gives them
    deny = abi.Flag.DENY
    reg_denies = [i for i, rsp in enumerate(b.responses)
                  if abi.parse_response(rsp).flags & deny and struct.unpack_from("<I", rsp, 8)[0]
                  in (abi.Reason.WRITE_CTRLREG, abi.Reason.MOV_TO_MSR)]
    assert reg_denies
    python_decided = {i for i, _rsp, _d in b.decisions}
    assert set(reg_denies) <= python_decided                 # every register DENY came back to Python
    assert set(reg_denies) - {i for i, _rsp, _d in a.decisions}       # without the flag: native ones
    assert held.punts.get("response", 0) >= len(reg_denies)
