"""The global event budget (runtime/budget.py) and the ring_full count, on a storm wider than the ring."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from helpers import storm_scenario
from policyc.check import check_policy
from policyc.cli import main
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan
from policyc.plan_source import load_plan_source
from policyc.runtime.budget import Budget
from policyc.runtime.decision_log import DecisionLog
from policyc.runtime.enforce import Enforcer
from policyc.runtime.native_engine import native_available
from policyc.runtime.sim.ring_replay import ReplayBackend, record_requests
from policyc.runtime.sim.scenario import ScenarioRunner, build_scenario, load_scenario
from policyc.symbols import load_symbol_table

ROOT = Path(__file__).resolve().parents[1]
STORM = ROOT / "tests" / "data" / "scenarios" / "ring-storm.yaml"       # 12 vCPUs x 100 rounds, 8 slots
KERNEL_INTEGRITY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"


def test_the_bucket_holds_a_second_of_events_and_refills_at_its_rate():
    now = [0.0]
    b = Budget(10, lambda: now[0])
    assert b.take(4) == 4 and b.take(10) == 6 and b.over == 4
    now[0] = 0.5                                   # half a second: five tokens back
    assert b.take(10) == 5 and b.over == 9
    now[0] = 100.0                                 # never more than a second's worth
    assert b.take(30) == 10
    with pytest.raises(ValueError):
        Budget(0, lambda: 0.0)
    with pytest.raises(ValueError):
        Budget(5, lambda: 0.0, over_budget="drop")


def storm(tmp_path, over_budget: str, *, native: bool = True):
    scenario = load_scenario(STORM)
    xen = build_scenario(scenario)
    v = load_plan_source(str(KERNEL_INTEGRITY), None)
    decisions = []
    enf = Enforcer(v.plan, xen, v.symbols, guest="storm", state_dir=tmp_path, clock=lambda: 1000.0,  # no refill
                   native=native, log=DecisionLog(None, plan_hash=v.plan["content_hash"]),
                   observer=None if native else lambda pairs, _reqs: decisions.extend(d for _r, d in pairs))
    enf.budget = Budget(100, enf.clock, over_budget=over_budget)
    enf.start()
    runner = ScenarioRunner(scenario, xen, lambda _x: enf.service())
    runner.run()
    table = runner.read_memory(runner.evaluate("symbol sys_call_table"), 96)
    initial = runner.read_memory(runner.evaluate("symbol sys_call_table"), 96, initial=True)
    assert enf.stop() == []
    return enf, xen, decisions, table == initial


@pytest.mark.parametrize("native", [True, False])
def test_past_the_budget_a_deny_rule_without_then_still_denies(tmp_path, native):
    enf, xen, decisions, unchanged = storm(tmp_path, "then", native=native)
    c = enf.counters()
    assert c["requests"] == c["responses"] == c["records"] == 1200
    assert enf.budget.over == 1100                  # a second's worth (100) decided in full
    assert unchanged                                # no write landed
    assert enf.stats.verdicts["deny"] == 1200 and enf.stats.alerts == 100   # alerts: only within the budget
    if not native:
        full = [d for d in decisions if not d.limited]
        past = [d for d in decisions if d.limited]
        assert len(full) == 100 and len(past) == 1100
        assert all(d.verdict == "deny" and d.messages for d in full)
        # past the budget: the rule's verdict, none of its actions (protect_tables has no `then`)
        assert all(d.verdict == "deny" and d.limited == ("protect_tables",) and not d.messages for d in past)
    # the storm is wider than the ring: four vCPUs a round wait for a slot
    assert xen.ring_full_stalls == 400 and c["ring_full_stalls"] == 400 and c["ring_full_seen"] >= 100


def test_over_budget_allow_lets_the_storm_through_and_counts_it(tmp_path):
    enf, _xen, decisions, unchanged = storm(tmp_path, "allow", native=False)
    assert enf.budget.over == 1100 and not unchanged          # availability over protection, as asked
    past = [d for d in decisions if d.limited]
    assert len(past) == 1100 and all(d.would_deny and d.response == "allow" for d in past)
    assert enf.counters()["requests"] == enf.counters()["responses"] == 1200


def test_the_run_summary_reports_the_budget_and_ring_full_stalls():
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["run", "--guest", f"sim:{STORM}", "--budget", "100"])
    text = out.getvalue()
    assert code == 0, text + err.getvalue()
    assert "budget 100 events/s:" in text and "event(s) past it, answered by their rules' then" in text
    assert "ring_full: 100 ring read(s) found all 8 slots taken; 400 vCPU stall(s) waiting for a slot" in text
    with redirect_stdout(io.StringIO()), redirect_stderr(err := io.StringIO()):
        assert main(["run", "--guest", f"sim:{STORM}", "--budget", "0"]) == 2
    assert "--budget 0: a positive number" in err.getvalue()


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
@pytest.mark.parametrize("over_budget", ["then", "allow"])
def test_the_budget_is_taken_per_event_inside_the_native_wait(tmp_path, over_budget):
    """`run` with a native kick and wait answers batch after batch in one native call (up to 4,096, for
    up to `wait` seconds): the budget is taken per event in C, not checked between those calls. With the
    clock standing still, exactly the bucket's 1,000 events are decided in full."""
    d = Diagnostics()
    model = check_policy(KERNEL_INTEGRITY, d)
    plan = compile_plan(model, d)
    symbols = [load_symbol_table(s.path) for s in model.symbols]
    recorded = record_requests(plan, symbols, load_scenario(storm_scenario(tmp_path, 5)), tmp_path / "record")
    count = 2_000 * 7                                  # 7 requests a round
    backend = ReplayBackend(build_scenario(load_scenario(storm_scenario(tmp_path, 1))), recorded, count)
    log = DecisionLog(None, plan_hash=plan["content_hash"])
    enf = Enforcer(plan, backend, symbols, guest="budget", log=log, state_dir=tmp_path / "state",
                   clock=lambda: 1000.0)
    enf.budget = Budget(1000, enf.clock, over_budget=over_budget)
    enf.start()
    enf.run(stop=backend.done, wait=0.05)
    assert enf.requests == enf.responses == backend.answered == count and backend.wrong == 0
    assert enf.native.decided_natively() == count        # all of it in C
    assert enf.budget.over == count - 1000 and enf.budget.tokens == 0.0
    stats = log.stats
    guard = stats.rules["protect_tables"]              # past the budget: limited, and silent
    assert guard.matches > 1000 and guard.limited + guard.alerts == guard.matches
    assert 0 < guard.alerts < 1000
    if over_budget == "then":                          # protect_tables has no `then`: its deny stays
        assert guard.deny == guard.matches and guard.would_deny == 0
    else:                                              # past the budget the writes are let through
        assert guard.deny == guard.alerts and guard.would_deny == guard.limited
    assert enf.stop() == []
