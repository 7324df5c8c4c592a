"""The fuzz campaign's targets: each takes the fuzzer's bytes and holds the input's contract.

A target returns normally for every input the component handles as it should (a model, a plan, a
scenario, a trace or a clear error of the component's own kind) and raises for anything else: an
exception of another kind, a diagnostic with a bad position or code, or, for the decision engines, a
native answer or record that differs from the Python engine's (the reference). `campaign.py` drives
them with atheris (coverage-guided); `tests/test_fuzz.py` replays the corpora and runs each briefly.

Targets:
  dsl, yaml   the policy front ends end to end (`check_policy`: reading, parsing, includes, checks)
  plan        the plan loader, then binding and both engines on whatever loads (the input is sealed
              first, so edited plans get past the hash check, as a plan edited and re-sealed would)
  scenario    the scenario loader, then building the simulated guest it describes
  trace       the trace reader
  engine      the request decoder and both decision engines on hostile batches (bytes laid over
              requests the example guests really raise, and raw bytes of any length); an input of
              odd length goes to a pair under a global budget (runtime/budget.py; length 1 mod 4:
              over_budget then, 3 mod 4: allow) whose clock moves 10 ms an input, so events fall
              within it and past it
  native      the native engine alone, at volume: batches of up to 64 such requests decided and
              recorded in C; one response each, one record line each, every line valid JSON
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "examples" / "policies"
SCENARIOS = ROOT / "examples" / "scenarios"
ENGINE_POLICY = "linux-kernel-integrity.vmi"
ENGINE_SCENARIO = "rootkit-hooks-syscall-table.yaml"
REQUEST_SIZE = 400
_LATENCY = re.compile(r'"latency_ns":\d+')


class ContractBroken(AssertionError):
    """The component did something its contract rules out (not a clean error of its own kind)."""


def targets() -> dict[str, Callable[[bytes], None]]:
    return {"dsl": fuzz_dsl, "yaml": fuzz_yaml, "plan": fuzz_plan, "scenario": fuzz_scenario,
            "trace": fuzz_trace, "engine": fuzz_engine, "native": fuzz_native}


# --------------------------------------------------------------------------- front ends

def fuzz_dsl(data: bytes) -> None:
    _check_policy_bytes("policy.vmi", data)


def fuzz_yaml(data: bytes) -> None:
    _check_policy_bytes("policy.yaml", data)


def _check_policy_bytes(name: str, data: bytes) -> None:
    from policyc.check import check_policy
    from policyc.diagnostics import CODES, Diagnostics, SourceCache, render_json, render_sarif, render_text

    path = _workdir() / name
    path.write_bytes(data)
    diags = Diagnostics()
    policy = check_policy(path, diags)
    if policy is not None and diags.has_errors:
        raise ContractBroken("a model came back with errors reported")
    for d in diags:
        if d.code not in CODES or not d.message.strip():
            raise ContractBroken(f"diagnostic with an unregistered code or no message: {d}")
        if d.span is not None and (d.span.line < 1 or d.span.col < 1):
            raise ContractBroken(f"diagnostic outside the file: {d}")
    ordered = diags.sorted()
    render_text(ordered, SourceCache())
    json.loads(render_json(ordered))
    json.loads(render_sarif(ordered, "0"))


# --------------------------------------------------------------------------- plans

def fuzz_plan(data: bytes) -> None:
    from policyc.plan import PlanError, load_plan, seal
    from policyc.runtime.bind import BindError, bind_plan

    path = _workdir() / "plan.json"
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        try:
            data = json.dumps(seal(doc)).encode()       # past the hash check: an edited, re-sealed plan
        except (TypeError, ValueError, RecursionError, KeyError):
            pass
    path.write_bytes(data)
    try:
        plan = load_plan(path)
    except PlanError:
        return
    guest, symbols = _engine_guest()
    try:
        bound = bind_plan(plan, guest(), symbols)
    except BindError:
        return
    decide_both(plan, bound, recorded_requests()[:8])


# --------------------------------------------------------------------------- scenarios and traces

def fuzz_scenario(data: bytes) -> None:
    from policyc.runtime.sim.scenario import ScenarioError, build_scenario, load_scenario_text

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return                                           # load_scenario says "not UTF-8 text" for these
    try:
        scenario = load_scenario_text(text, str(_workdir() / "scenarios" / "scenario.yaml"))
        build_scenario(scenario)
    except ScenarioError:
        return


def fuzz_trace(data: bytes) -> None:
    from policyc.runtime.trace import TraceError, read_trace

    path = _workdir() / "run.trace"
    path.write_bytes(data)
    try:
        read_trace(path)
    except TraceError:
        return


# --------------------------------------------------------------------------- the decision engines

_PATCH = struct.Struct("<HQ")


def fuzz_engine(data: bytes) -> None:
    """A batch of up to 8 requests (see `_hostile_batch`); both engines must answer and record alike."""
    plan, bound = engine_plan()
    batch = _hostile_batch(data, 8)
    if batch:
        decide_both(plan, bound, batch, budget={1: "then", 3: "allow"}.get(len(data) % 4))


def fuzz_native(data: bytes) -> None:
    batch = _hostile_batch(data, 64)
    if not batch:
        return
    native, out, log = _native_alone()
    out.seek(0)
    out.truncate()
    got = native.decide_batch(batch, log)
    log.write_text(got.text, got.alerts)
    lines = out.getvalue().splitlines()
    if len(got.responses) != len(batch) or any(len(r) != REQUEST_SIZE for r in got.responses):
        raise ContractBroken(f"{len(got.responses)} responses to {len(batch)} requests")
    if len(lines) != len(batch):
        raise ContractBroken(f"{len(lines)} records for {len(batch)} requests")
    for line in lines:
        record = json.loads(line)
        if not isinstance(record, dict) or "decision_id" not in record or "verdict" not in record:
            raise ContractBroken(f"a record without its decision id or verdict: {line}")


def _hostile_batch(data: bytes, most: int) -> list[bytes]:
    """Requests from the fuzzer's bytes: each is either raw bytes (any length: truncated, oversized,
    random) or a request an example guest raised with fields overwritten (offset, 8 bytes), so most
    get past the version check and reach the tables."""
    base = recorded_requests()
    batch: list[bytes] = []
    view = memoryview(data)
    pos = 0
    while pos + 2 <= len(data) and len(batch) < most:
        how, choice = data[pos], data[pos + 1]
        pos += 2
        if how < 16:                                     # raw bytes, any length up to 512
            n = min(len(data) - pos, (how * 37 + choice) % 513)
            batch.append(bytes(view[pos:pos + n]))
            pos += n
            continue
        raw = bytearray(base[choice % len(base)])
        for _ in range(how % 5):
            if pos + _PATCH.size > len(data):
                break
            off, value = _PATCH.unpack_from(data, pos)
            pos += _PATCH.size
            off %= REQUEST_SIZE - 7
            raw[off:off + 8] = value.to_bytes(8, "little")
        batch.append(bytes(raw))
    return batch


def decide_both(plan: dict, bound: object, batch: list[bytes], *, budget: str | None = None) -> None:
    """The Python engine and the native engine on one batch: identical responses and records (and,
    with `budget`, identical global budgets after it). The pair lives as long as the process (one per
    bound plan), so state such as rate limits and decision ids carries from input to input in both,
    as it does in a run."""
    reference, native, ref_out, nat_out, ref_log, nat_log = engine_pair(plan, bound, budget)
    for out in (ref_out, nat_out):
        out.seek(0)
        out.truncate()
    pairs = reference.decide_batch(batch)
    ref_log.write_batch(pairs)
    got = native.decide_batch(batch, nat_log)
    nat_log.write_text(got.text, got.alerts)
    if got.responses != [rsp for rsp, _ in pairs]:
        raise ContractBroken(f"responses differ for {[r.hex() for r in batch]}")
    if _LATENCY.sub("", nat_out.getvalue()) != _LATENCY.sub("", ref_out.getvalue()):
        raise ContractBroken(f"records differ for {[r.hex() for r in batch]}:\n"
                             f"native: {nat_out.getvalue()}\npython: {ref_out.getvalue()}")
    if budget:
        ours, theirs = native.engine.budget, reference.budget
        if (ours.over, ours.tokens, ours.stamp) != (theirs.over, theirs.tokens, theirs.stamp):
            raise ContractBroken(f"budgets differ: native {ours.over} over, {ours.tokens} tokens; python "
                                 f"{theirs.over} over, {theirs.tokens} tokens")
        _BUDGET_CLOCK[0] += 0.01


_PAIRS: dict[tuple, tuple] = {}
_BUDGET_CLOCK = [1000.0]            # the budgeted pair's time: both engines', moved after each input


def forget_engine_pairs() -> None:
    """Drop every engine pair (`engine_pair` makes fresh ones), e.g. after a test changed one."""
    _PAIRS.clear()


def engine_pair(plan: dict, bound: object, budget: str | None = None) -> tuple:
    from policyc.runtime.budget import Budget
    from policyc.runtime.decide import DecisionEngine
    from policyc.runtime.decision_log import DecisionLog
    from policyc.runtime.native_engine import NativeEngine

    key = (id(bound), budget)
    if key not in _PAIRS:
        if len(_PAIRS) > 64:                             # plans from the plan target: keep a few
            _PAIRS.clear()
        clock = (lambda: _BUDGET_CLOCK[0]) if budget else (lambda: 1000.0)  # noqa: E731 - both engines
        wall = lambda: 1_765_000_000_123_456_789         # noqa: E731

        def make() -> DecisionEngine:
            engine = DecisionEngine(bound.plan, bound, clock=clock, wall_clock_ns=wall, id_prefix="fuzz")
            if budget:                                   # half a token an input, for up to 8 events
                engine.budget = Budget(50, clock, over_budget=budget)
            return engine
        ref_out, nat_out = io.StringIO(), io.StringIO()
        _PAIRS[key] = (make(), NativeEngine(make()), ref_out, nat_out,
                       DecisionLog(ref_out, io.StringIO(), plan["content_hash"]),
                       DecisionLog(nat_out, io.StringIO(), plan["content_hash"]), bound)
    return _PAIRS[key][:6]


# --------------------------------------------------------------------------- set-up, once a process

@lru_cache(maxsize=None)
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="policyc-fuzz-"))


@lru_cache(maxsize=None)
def _engine_guest() -> tuple[Callable[[], object], list]:
    from policyc.runtime.sim.scenario import build_scenario, load_scenario
    from policyc.symbols import load_symbol_table

    scenario = load_scenario(SCENARIOS / ENGINE_SCENARIO)
    symbols = [load_symbol_table(POLICIES / "linux-6.1.System.map")]
    return (lambda: build_scenario(scenario)), symbols


@lru_cache(maxsize=None)
def engine_plan() -> tuple[dict, object]:
    from policyc.check import check_policy
    from policyc.diagnostics import Diagnostics
    from policyc.compiler import compile_plan
    from policyc.runtime.bind import bind_plan

    d = Diagnostics()
    model = check_policy(POLICIES / ENGINE_POLICY, d)
    plan = compile_plan(model, d)
    guest, symbols = _engine_guest()
    return plan, bind_plan(plan, guest(), symbols)


@lru_cache(maxsize=None)
def _native_alone() -> tuple:
    from policyc.runtime.decide import DecisionEngine
    from policyc.runtime.decision_log import DecisionLog
    from policyc.runtime.native_engine import NativeEngine

    plan, bound = engine_plan()
    out = io.StringIO()
    return NativeEngine(DecisionEngine(bound.plan, bound)), out, DecisionLog(out, io.StringIO(), plan["content_hash"])


@lru_cache(maxsize=None)
def recorded_requests() -> tuple[bytes, ...]:
    from policyc.runtime.sim.ring_replay import record_requests
    from policyc.runtime.sim.scenario import load_scenario

    plan, _bound = engine_plan()
    _guest, symbols = _engine_guest()
    with tempfile.TemporaryDirectory() as state:
        return tuple(record_requests(plan, symbols, load_scenario(SCENARIOS / ENGINE_SCENARIO), state))


def prepare(name: str) -> None:
    """What a target needs built before its first input (so the fuzzer's timing is the input's)."""
    work = _workdir()
    if name in ("dsl", "yaml"):          # what the example policies include and name as symbols
        for f in ("linux-common.vmi", "linux-6.1.System.map", "linux-6.1-arm64.System.map",
                  "debian12-6.1.0-56-amd64.isf-excerpt.json", "ntoskrnl-22621-9074FC2B.isf.json"):
            shutil.copy(POLICIES / f, work / f)
    if name == "scenario":               # the example scenarios name guests' symbols beside them and in ../policies
        for d in ("scenarios", "policies"):
            (work / d).mkdir(exist_ok=True)
            for f in ("linux-6.1.System.map", "linux-6.1-arm64.System.map", "ntoskrnl-22621-9074FC2B.isf.json"):
                shutil.copy(POLICIES / f, work / d / f)
    if name in ("plan", "engine", "native"):
        engine_plan()
        recorded_requests()
