"""Policy tests: a scenario run against a policy on the simulated guest, and its `expect:` checked.

`run_on_simulator(scenario, plan, symbols)` is what `policyc run --guest sim:S`
and `policyc test` share: build the scenario's guest (runtime/sim), snapshot
it, start the enforcer (runtime/enforce.py: bind, install), run the steps with
the enforcer answering every event, tear down, snapshot again. The result
keeps each step's decisions (matched to the step by the requests it caused).

`check_expectations(run)` evaluates the scenario's `expect:` list
(shared/spec/SCENARIOS.md):

* per step: ``verdict`` (allow/deny: whether the operation took effect in the
  guest), ``rule`` (the rule whose verdict decided one of the step's events),
  ``log`` / ``alert`` (a substring of a rendered log / alert message of the
  step), ``collateral`` (the step touched a page the plan traps and no rule
  decided it: an event answered as collateral, or no event at all because
  the page is trapped only for other kinds of access), ``events`` (vm_event
  requests the step caused), ``would_deny`` (audit mode);
* end state: ``memory: {va, size}`` and ``register: {vcpu, msr|cr|NAME}``
  with ``unchanged: true`` (equal to the start of the scenario) or
  ``value: N``; ``paused_vcpus: N`` (counted after teardown).

Two checks are implicit in every policy test, since a user would not think to
write them and both are the enforcer's promise: every request got one
response and one decision record, and teardown left the domain as it found it
(every frame's access in every view, views, altp2m, monitors, per-vCPU view,
single-step and pause state).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .decide import Decision
from .decision_log import DecisionLog, render_template
from .budget import Budget
from .enforce import Enforcer
from .reload import scenario_reloader
from .sim.scenario import Scenario, ScenarioError, ScenarioRunner, StepResult, build_scenario
from .sim.xen import SimulatedXen

__all__ = ["SimulatedRun", "Expectation", "ExpectationResult", "run_on_simulator", "check_expectations",
           "describe_decision", "diff_snapshots", "STEP_KEYS", "END_KEYS"]

DECISIONS_KEPT_PER_STEP = 4096
STEP_KEYS = ("step", "verdict", "rule", "log", "alert", "collateral", "events", "would_deny", "reload", "comment")
END_KEYS = ("memory", "register", "paused_vcpus", "unchanged", "value", "comment")


@dataclass
class SimulatedRun:
    """One scenario run under the enforcer on the simulator."""

    scenario: Scenario
    xen: SimulatedXen
    runner: ScenarioRunner
    enforcer: Enforcer
    results: list[StepResult]
    decisions: dict[int, list[Decision]]         # step index -> its decisions, in order
    unmatched: list[Decision]                    # decisions no step claims (async events, settle)
    before: dict[str, Any]
    after: dict[str, Any]
    teardown_errors: list[str]
    trapped: dict[int, str]                      # gfn -> access in the default restricted view
    reloads: list[tuple[int, Any]] = field(default_factory=list)    # (step index, ReloadResult) of reload steps
    # the plan hash each decision's record named, in decision order, and the engine's that decided it
    decided_by: list[tuple[str, str]] = field(default_factory=list)

    def step_decisions(self, index: int) -> list[Decision]:
        return self.decisions.get(index, [])


def run_on_simulator(scenario: Scenario, plan: Mapping[str, Any], symbols: Any, *,
                     log: DecisionLog | None = None, recorder: Any = None,
                     on_start: Callable[[Enforcer], None] | None = None,
                     on_step: Callable[[StepResult, list[Decision]], None] | None = None,
                     on_log_failure: str = "fail-closed",
                     budget: tuple[float, str] | None = None) -> SimulatedRun:
    """Build the scenario's guest, enforce `plan` on it while its steps run, tear down.
    Raises `EnforcerError` (nothing installed) when the plan cannot be bound or installed.
    With `on_log_failure="stop"` a log that cannot be written ends the run after that step. `budget`:
    (events per second, over-budget mode) for the enforcer's global budget (runtime/budget.py)."""
    target = (plan.get("target") or {}).get("arch", scenario.profile)
    xen = build_scenario(scenario, profile=target)
    before = xen.state_snapshot(memory=False)
    log = log if log is not None else DecisionLog(None, plan_hash=plan.get("content_hash", ""))
    by_request: dict[bytes, deque[Decision]] = defaultdict(deque)
    kept = [0]

    reloads: list[tuple[int, Any]] = []
    decided_by: list[tuple[str, str]] = []
    reloading = scenario.reloads

    def observe(pairs: Sequence[tuple[bytes, Decision]], requests: Sequence[bytes]) -> None:
        # A storm step keeps the raw requests of its first iterations only (LOOP_KEEP_RAW): keep as
        # many decisions as a step can claim, not a million.
        if reloading:
            decided_by.extend([(log.plan_hash, enforcer.engine.plan_hash)] * len(pairs))
        for raw, (_rsp, d) in zip(requests, pairs):
            if kept[0] < DECISIONS_KEPT_PER_STEP:
                by_request[bytes(raw)].append(d)
                kept[0] += 1

    with tempfile.TemporaryDirectory(prefix="policyc-sim-") as state_dir:
        enforcer = Enforcer(plan, xen, symbols, guest=f"sim-{scenario.name}", log=log, recorder=recorder,
                            state_dir=state_dir, observer=observe)
        enforcer.on_log_failure = on_log_failure
        if budget is not None:
            enforcer.budget = Budget(budget[0], enforcer.clock, over_budget=budget[1])
        enforcer.start()
        if on_start is not None:
            on_start(enforcer)
        runner = ScenarioRunner(scenario, xen, lambda _xen: enforcer.service())
        runner.reloader = scenario_reloader(enforcer, target, reloads)
        decisions: dict[int, list[Decision]] = {}
        unmatched: list[Decision] = []
        try:
            for step in scenario.steps:
                try:
                    res = runner.run_step(step)
                except ValueError as exc:          # an operation this guest cannot do (smc on x86 ...)
                    raise ScenarioError(str(exc), scenario.path, step.line, step.col) from None
                enforcer.idle()          # between steps the guest is quiet (arm64 re-arms here)
                runner.results.append(res)
                mine = [by_request[bytes(r)].popleft() for r in res.requests if by_request.get(bytes(r))]
                decisions[res.index] = mine
                unmatched.extend(d for q in by_request.values() for d in q)
                by_request.clear()
                kept[0] = 0
                if on_step is not None:
                    on_step(res, mine)
                if enforcer.stop_requested:
                    break
            runner.settle()
        finally:
            trapped = _trapped_pages(enforcer)
            teardown_errors = enforcer.stop()
    unmatched.extend(d for q in by_request.values() for d in q)
    after = xen.state_snapshot(memory=False)
    return SimulatedRun(scenario, xen, runner, enforcer, runner.results, decisions, unmatched, before, after,
                        teardown_errors, trapped, reloads, decided_by)


def _trapped_pages(enforcer: Enforcer) -> dict[int, str]:
    bound = enforcer.bound
    if bound is None:
        return {}
    view = bound.default_view()
    access = dict(bound.view_access(view if view is not None else 0))
    return {g: a for g, a in access.items() if a != "rwx"}


# --------------------------------------------------------------------------- expectations

@dataclass
class Expectation:
    index: int
    spec: Mapping[str, Any]
    line: int | None

    @property
    def label(self) -> str:
        s = self.spec
        if "step" in s:
            parts = [f"step {s['step']}"] + [f"{k} {s[k]!r}" if isinstance(s[k], str) else f"{k} {s[k]}"
                                              for k in STEP_KEYS[1:] if k in s and k != "comment"]
            return ", ".join(parts)
        if "memory" in s:
            return f"memory {dict(s['memory'])} " + ("unchanged" if s.get("unchanged") else f"== {s.get('value')}")
        if "register" in s:
            return f"register {dict(s['register'])} " + ("unchanged" if s.get("unchanged")
                                                        else f"== {s.get('value')}")
        if "paused_vcpus" in s:
            return f"paused_vcpus {s['paused_vcpus']}"
        return str(dict(s))


@dataclass
class ExpectationResult:
    expectation: Expectation | None           # None for the implicit checks
    label: str
    passed: bool
    detail: str = ""
    step: int | None = None                   # the step whose decision trace explains a failure


def parse_expectations(scenario: Scenario) -> list[Expectation]:
    """The `expect:` entries, checked for shape (ScenarioError at the entry's position)."""
    out = []
    items = scenario.expect
    positions = getattr(items, "item_pos", [None] * len(items))
    for i, (spec, pos) in enumerate(zip(items, positions)):
        line, col = pos if pos else (None, None)
        if not isinstance(spec, Mapping):
            raise ScenarioError("an expectation is a mapping ({step: N, verdict: ...}, {memory: ...}, ...)",
                                scenario.path, line, col)
        keys = STEP_KEYS if "step" in spec else END_KEYS
        kinds = [k for k in ("step", "memory", "register", "paused_vcpus") if k in spec]
        if len(kinds) != 1:
            raise ScenarioError("an expectation names exactly one of: step, memory, register, paused_vcpus",
                                scenario.path, line, col)
        for key in spec:
            if key not in keys:
                kp = getattr(spec, "key_pos", {}).get(key, (line, col))
                raise ScenarioError(f"unknown key '{key}' in a{'' if 'step' in spec else 'n end-state'} "
                                    f"expectation (known: {', '.join(k for k in keys if k != 'comment')})",
                                    scenario.path, *kp)
        if "step" in spec:
            n = spec["step"]
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(scenario.steps):
                raise ScenarioError(f"step: {n!r} is not a step of this scenario (0..{len(scenario.steps) - 1})",
                                    scenario.path, line, col)
            if "verdict" in spec and spec["verdict"] not in ("allow", "deny"):
                raise ScenarioError("verdict: allow or deny", scenario.path, line, col)
            if "reload" in spec and spec["reload"] not in ("ok", "failed"):
                raise ScenarioError("reload: ok or failed", scenario.path, line, col)
        elif "memory" in spec or "register" in spec:
            if not spec.get("unchanged") and "value" not in spec:
                raise ScenarioError("an end-state expectation needs 'unchanged: true' or 'value: N'",
                                    scenario.path, line, col)
        out.append(Expectation(i, spec, line))
    return out


def check_expectations(run: SimulatedRun) -> list[ExpectationResult]:
    """Every `expect:` entry, then the two implicit checks."""
    out = [_check_one(run, e) for e in parse_expectations(run.scenario)]
    enf = run.enforcer
    out.append(ExpectationResult(None, "every request answered and logged", enf.requests == enf.responses ==
                                 enf.records, f"requests {enf.requests}, responses {enf.responses}, "
                                 f"decision records {enf.records}"))
    if run.reloads:
        out.append(_check_decision_plans(run))
    diff, note = teardown_differences(run)
    out.append(ExpectationResult(None, "teardown restored the domain", not diff, "; ".join(diff) or note))
    return out


def _check_decision_plans(run: SimulatedRun) -> ExpectationResult:
    """With reloads: every decision's record names the plan whose engine made it, one of the plans
    that enforced, and no decision comes from a plan after the next one took over."""
    first = run.reloads[0][1].old_hash
    order = [first] + [r.new_hash for _i, r in run.reloads if r.result == "ok"]
    problems = []
    at = 0
    for named, engine in run.decided_by:
        if named != engine:
            problems.append(f"a record names plan {named[:19]}… but plan {engine[:19]}… decided it")
        elif named not in order[at:]:
            problems.append(f"a decision by plan {named[:19]}… " + ("after a later plan took over" if named in order
                                                                     else "which never enforced"))
        else:
            at = order.index(named, at)
        if len(problems) >= 3:
            break
    counts = {h[:19] + "…": sum(1 for n, _e in run.decided_by if n == h) for h in dict.fromkeys(order)}
    return ExpectationResult(None, "every decision names the plan that made it", not problems,
                             "; ".join(problems) or f"decisions per plan: {counts}")


def teardown_differences(run: SimulatedRun) -> tuple[list[str], str]:
    """What teardown left different from before install, and a note on what differs on purpose.

    The policy's `pause` action stops the whole domain for an operator: teardown keeps that pause.
    It is told from a failure by the enforcer having applied a pause and by every vCPU being paused
    (a domain pause); a vCPU left paused alone, or a pause no rule asked for, is a difference."""
    before, after = dict(run.before), dict(run.after)
    pauses = run.enforcer.pauses
    every_vcpu = tuple(range(len(run.xen.guest.vcpus)))
    note = ""
    if pauses and tuple(after.get("paused", ())) == every_vcpu and not before.get("paused"):
        before.pop("paused", None)
        after.pop("paused", None)
        note = f"paused by the policy's pause action ({pauses}x), as asked"
    return run.teardown_errors + diff_snapshots(before, after), note


def _check_one(run: SimulatedRun, e: Expectation) -> ExpectationResult:
    s = e.spec
    try:
        if "step" in s:
            return _check_step(run, e)
        if "paused_vcpus" in s:
            paused = list(run.after["paused"])
            return ExpectationResult(e, e.label, len(paused) == s["paused_vcpus"],
                                     f"paused vCPUs: {paused or 'none'}")
        if "memory" in s:
            m = s["memory"]
            runner = run.runner
            vcpu = int(m.get("vcpu", 0))
            va = runner.evaluate(m["va"], vcpu)
            size = runner.evaluate(m.get("size", 8), vcpu)
            now = runner.read_memory(va, size, vcpu=vcpu)
            want = runner.read_memory(va, size, vcpu=vcpu, initial=True) if s.get("unchanged") else \
                (runner.evaluate(s["value"], vcpu) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            return ExpectationResult(e, e.label, now == want,
                                     f"at {va:#x}: {now.hex()} (expected {want.hex()})")
        if "register" in s:
            r = s["register"]
            vcpu = int(r.get("vcpu", 0))
            name = next((str(r[k]) for k in ("msr", "cr", "name", "reg") if k in r), None)
            if name is None:
                raise ScenarioError("register: needs msr:, cr: or name:", run.scenario.path, e.line)
            now = run.runner.register(vcpu, name)
            want = run.runner.register(vcpu, name, initial=True) if s.get("unchanged") else \
                run.runner.evaluate(s["value"], vcpu)
            return ExpectationResult(e, e.label, now == want, f"vCPU {vcpu} {name} = {now:#x} (expected {want:#x})")
    except (ScenarioError, KeyError, ValueError) as exc:
        return ExpectationResult(e, e.label, False, f"cannot evaluate: {exc}")
    return ExpectationResult(e, e.label, False, "unknown expectation")


def _check_step(run: SimulatedRun, e: Expectation) -> ExpectationResult:
    s = e.spec
    index = s["step"]
    res = next((r for r in run.results if r.index == index), None)
    if res is None:
        return ExpectationResult(e, e.label, False, "the step did not run", index)
    ds = run.step_decisions(index)
    problems: list[str] = []
    if "verdict" in s and res.verdict != s["verdict"]:
        why = f" ({res.note})" if res.note else ""
        if res.faults:
            why += f" (the guest got {', '.join(f.name for f in res.faults)})"
        problems.append(f"verdict {res.verdict}{why}, expected {s['verdict']}")
    if "rule" in s:
        deciding = [d.rule for d in ds if d.rule]
        if s["rule"] not in deciding:
            problems.append(f"decided by {', '.join(deciding) if deciding else 'no rule'}, expected {s['rule']}")
    for kind in ("log", "alert"):
        if kind in s:
            texts = [render_template(m.template, d.event) for d in ds for m in d.messages if m.kind == kind]
            if not any(str(s[kind]) in t for t in texts):
                problems.append(f"no {kind} message contains {str(s[kind])!r}"
                                + (f" (messages: {texts})" if texts else ""))
    if "events" in s and res.events != s["events"]:
        problems.append(f"{res.events} event(s), expected {s['events']}")
    if "collateral" in s:
        got = _collateral(run, res, ds)
        if got != bool(s["collateral"]):
            problems.append(f"collateral is {str(got).lower()}, expected {str(bool(s['collateral'])).lower()}")
    if "reload" in s:
        mine = [r for i, r in run.reloads if i == index]
        want_ok = s["reload"] == "ok"
        if not mine:
            problems.append("the step reloads nothing")
        elif any(r.ok != want_ok for r in mine):
            problems.append("; ".join(r.describe() for r in mine))
    if "would_deny" in s:
        got = any(d.would_deny for d in ds)
        if got != bool(s["would_deny"]):
            problems.append(f"would_deny is {str(got).lower()}")
    return ExpectationResult(e, e.label, not problems, "; ".join(problems), index)


def _collateral(run: SimulatedRun, res: StepResult, ds: list[Decision]) -> bool:
    if any(d.rule for d in ds):
        return False
    if any(d.collateral for d in ds):
        return True
    return bool(set(res.frames) & set(run.trapped))


# --------------------------------------------------------------------------- rendering helpers

def describe_decision(d: Decision) -> str:
    """One line per decision: the trace printed under a failing step and by `policyc run -v`."""
    ev = d.summary()
    where = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and k not in ("vcpu", "access") else f"{k}={v}"
                      for k, v in ev.items())
    head = f"{d.kind} [{where}] -> {d.verdict}{' (would deny)' if d.would_deny else ''}"
    head += f" by {d.rule}" if d.rule else (" (collateral)" if d.collateral else " (no rule)")
    head += f", response {d.response}"
    extra = [f"{m.kind} {m.severity}: {render_template(m.template, d.event)}" for m in d.messages]
    if d.note:
        extra.append(f"note: {d.note}")
    extra += [f"error: {x}" for x in d.errors]
    return head + "".join(f"\n    {x}" for x in extra)


def diff_snapshots(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What differs between two `SimulatedXen.state_snapshot`s, in words (empty when equal)."""
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if key == "access" and isinstance(a, Mapping) and isinstance(b, Mapping):
            frames = before.get("frames") or ()
            for view in sorted(set(a) | set(b)):
                va, vb = a.get(view), b.get(view)
                if va == vb:
                    continue
                if va is None or vb is None:
                    out.append(f"view {view} {'appeared' if va is None else 'disappeared'}")
                    continue
                changed = [frames[i] for i, (x, y) in enumerate(zip(va, vb)) if x != y]
                out.append(f"access of {len(changed)} frame(s) in view {view} differs (first gfn "
                           f"{changed[0]:#x})" if changed else f"access in view {view} differs")
        else:
            out.append(f"{key}: {a!r} before, {b!r} after")
    return out
