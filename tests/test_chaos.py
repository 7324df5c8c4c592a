"""Fault injection (python -m policyc.runtime.sim.chaos): one backend call fails per trial, and
the guest must come out whole."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from policyc.runtime.backend import BackendError
from policyc.runtime.sim.chaos import BACKEND_CALLS, FaultyBackend, InjectedFault, run_trials

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "examples" / "scenarios"


class _Inner:
    name = "inner"

    def pause(self) -> str:
        return "paused"

    def unpause(self) -> str:
        return "unpaused"

    helper = "not a backend call"


def test_the_nth_backend_call_fails_with_the_chosen_errno():
    b = FaultyBackend(_Inner(), fail_at=2, errno=errno.EBUSY)
    assert b.pause() == "paused"
    with pytest.raises(InjectedFault) as exc:
        b.unpause()
    assert isinstance(exc.value, BackendError) and exc.value.errno == errno.EBUSY
    assert b.injected == "attach:unpause" and b.sequence == ["attach:pause", "attach:unpause"]
    assert b.pause() == "paused"                 # one fault per trial
    assert b.helper == "not a backend call" and b.calls == 3
    assert {"pause", "put_responses", "notify", "set_access", "take_requests"} <= BACKEND_CALLS


def test_a_fault_while_binding_is_a_clean_refusal_not_a_traceback(tmp_path):
    from policyc.runtime.enforce import Enforcer, EnforcerError
    from policyc.runtime.policy_test import diff_snapshots
    from policyc.runtime.sim.scenario import build_scenario, load_scenario
    from policyc.plan_source import load_plan_source

    scenario = load_scenario(SCENARIOS / "rootkit-hooks-syscall-table.yaml")
    compiled = load_plan_source(str(ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"), None)
    xen = build_scenario(scenario)
    before = xen.state_snapshot(memory=False)
    # the binder's first call (reading the guest) fails: before, a BackendError escaped start()
    b = FaultyBackend(xen, fail_at=1, errno=errno.ESRCH)
    with pytest.raises(EnforcerError, match="cannot bind"):
        Enforcer(compiled.plan, b, compiled.symbols, guest="t", state_dir=tmp_path).start()
    assert b.injected is not None
    assert diff_snapshots(before, xen.state_snapshot(memory=False)) == []


def test_every_call_site_of_every_example_leaves_the_guest_whole():
    # each (scenario, call site) pair in turn, then random ones: install, enforce, teardown and
    # recover faults all end with the domain as it was (or still enforcing), nothing paused
    summary = run_trials(int(os.environ.get("POLICYC_CHAOS_TRIALS", "120")), 1)
    assert summary["violations"] == []
    assert summary["faults_injected"] == summary["trials"]
    phases = {site.split(":")[0] for site in summary["call_sites"]}
    assert {"install", "enforce", "teardown"} <= phases
    assert summary["restored_exactly"] and summary["still_enforcing"] and summary["recovered"]
