"""Teardown tells the pause a policy asked for (`pause`: the domain stops for an operator) from a failure.

guest-agent-and-probes.vmi pauses the guest on the agent's alarm: `policyc run` on its example used
to end "teardown: NOT CLEAN" and exit 1 every time.
"""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from policyc.check import check_policy
from policyc.cli import main
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan
from policyc.runtime.decision_log import DecisionLog
from policyc.runtime.policy_test import run_on_simulator, teardown_differences
from policyc.runtime.sim.scenario import load_scenario
from policyc.symbols import load_symbol_table

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "examples" / "scenarios" / "guest-agent-and-probes.yaml"


def test_the_example_runs_clean_and_says_the_pause_was_asked_for():
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["run", "--guest", "sim:guest-agent-and-probes"])
    text = out.getvalue() + err.getvalue()
    assert code == 0, text
    assert ("teardown: the domain is as it was before install, but for: paused by the policy's pause action "
            "(1x), as asked") in text


@pytest.fixture(scope="module")
def paused_run():
    scenario = load_scenario(SCENARIO)
    d = Diagnostics()
    model = check_policy(Path(scenario.policy), d)
    plan = compile_plan(model, d)
    symbols = [load_symbol_table(s.path) for s in model.symbols]
    return run_on_simulator(scenario, plan, symbols, log=DecisionLog(None))


def test_a_domain_pause_the_policy_asked_for_is_no_difference(paused_run):
    assert paused_run.enforcer.pauses == 1 and paused_run.after["paused"] == (0, 1)
    assert teardown_differences(paused_run) == ([], "paused by the policy's pause action (1x), as asked")


def test_one_vcpu_left_paused_is_a_difference_even_after_a_pause_action(paused_run):
    alone = dataclasses.replace(paused_run, after={**paused_run.after, "paused": (1,)})
    diff, _note = teardown_differences(alone)
    assert diff == ["paused: () before, (1,) after"]


def test_a_pause_no_rule_asked_for_is_a_difference(paused_run):
    paused_run.enforcer.pauses, saved = 0, paused_run.enforcer.pauses
    try:
        diff, note = teardown_differences(paused_run)
    finally:
        paused_run.enforcer.pauses = saved
    assert diff == ["paused: () before, (0, 1) after"] and note == ""
