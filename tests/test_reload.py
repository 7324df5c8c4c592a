"""Hot reload (runtime/reload.py): keep last good, no gap, every decision names its plan.

In process: each way a reload can fail (source, bind, capability, install) leaves the running plan
enforcing and armed exactly as before; a successful one changes what the plan diff says. Across
processes: `policyc run --guest simhost:` under writers that never stop, reloaded by SIGHUP after
the policy file is edited, by `policyc reload --pid` and `--socket`, a broken policy among them.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from helpers import start_simhost
from policyc.cli import main
from policyc.plan_source import load_plan_source
from policyc.runtime.enforce import Enforcer
from policyc.runtime.policy_test import check_expectations, diff_snapshots, run_on_simulator
from policyc.runtime.sim.chaos import FaultyBackend
from policyc.runtime.sim.scenario import ScenarioRunner, build_scenario, load_scenario, load_scenario_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
POLICIES = EXAMPLES / "policies"
V1 = POLICIES / "linux-kernel-integrity.vmi"
V2 = POLICIES / "reload" / "syscalls-and-text.vmi"
V3_PLAN = POLICIES / "reload" / "syscalls-only.plan.json"
BROKEN = EXAMPLES / "scenarios" / "reload" / "broken-syscalls.edit"
SCENARIO = EXAMPLES / "scenarios" / "reload-under-writes.yaml"
WRITERS = ROOT / "tests" / "data" / "scenarios" / "reload-writers.yaml"
REMAP_DURING_RELOAD = ROOT / "tests" / "data" / "scenarios" / "reload-during-remap.yaml"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def armed(xen) -> dict:
    snap = xen.state_snapshot(memory=False)
    return {k: snap[k] for k in ("access", "altp2m", "views", "monitors", "single_step")}


def started(tmp_path, backend=None, **xen_options):
    scenario = load_scenario(EXAMPLES / "scenarios" / "rootkit-hooks-syscall-table.yaml")
    xen = build_scenario(scenario, **xen_options)
    v1 = load_plan_source(str(V1), None)
    enf = Enforcer(v1.plan, backend(xen) if backend else xen, v1.symbols, guest="reload", state_dir=tmp_path)
    enf.start()
    return scenario, xen, enf


# --------------------------------------------------------------------------- in process

def test_the_example_scenario_reloads_three_times_under_parallel_writes():
    code, out, _err = cli("test", str(SCENARIO), "--format", "json")
    report = json.loads(out)
    results = {r["expectation"]: r for r in report["scenarios"][0]["results"]}
    assert code == 0 and report["failed"] == 0, out
    assert results["every decision names the plan that made it"]["passed"]
    assert "decisions per plan" in results["every decision names the plan that made it"]["detail"]


def test_a_decision_record_names_the_plan_that_made_it(tmp_path):
    log = tmp_path / "log.jsonl"
    code, out, err = cli("run", "--guest", f"sim:{SCENARIO}", "--log", str(log))
    assert code == 0, out + err
    assert "reloads: 3 applied, 1 failed (old plan kept)" in out
    hashes = [load_plan_source(str(p), None).plan["content_hash"] for p in (V1, V2, V3_PLAN, V1)]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    reloads = [r for r in records if r.get("record") == "reload"]
    assert [r["result"] for r in reloads] == ["ok", "ok", "failed", "ok"]
    assert [r["new_plan"] for r in reloads if r["result"] == "ok"] == hashes[1:]
    assert "broken-syscalls.edit:12:9" in reloads[2]["error"]         # where the broken policy is wrong
    # every in-flight write is answered by the plan running when the reload began, the rest by the new one
    decisions = [r for r in records if "decision_id" in r]
    assert len(decisions) == 16 and all(d["verdict"] == "deny" for d in decisions)
    # step 0's writes were in flight at reload 1 (plan 1); steps 1-2 plan 2 (step 2's writes in flight at
    # reload 2); steps 3-6 plan 3 (the broken reload of step 4 changed nothing; step 6's writes in flight
    # at reload 3); step 7 the first plan again
    v1, v2, v3 = hashes[:3]
    assert [d["plan_hash"] for d in decisions] == [v1] * 3 + [v2] * 4 + [v3] * 8 + [v1]


def test_a_failed_reload_keeps_the_running_plan_armed_as_it_was(tmp_path):
    _scenario, xen, enf = started(tmp_path, max_views=4)      # room for 2 views beside 1: not for 2 more
    old = enf.plan["content_hash"]
    v2 = load_plan_source(str(V2), None)
    before = armed(xen)
    result = enf.reload(v2.plan, v2.symbols)
    assert not result.ok and result.stage == "capability" and "views" in result.error
    assert enf.plan["content_hash"] == old and armed(xen) == before
    # a plan whose symbols do not match this guest's kernel: bind fails, nothing touched
    tracing = load_plan_source(str(POLICIES / "linux-syscall-tracing.vmi"), None)
    result = enf.reload(tracing.plan, tracing.symbols)
    assert not result.ok and result.stage == "bind"
    assert enf.plan["content_hash"] == old and armed(xen) == before
    assert enf.counters()["reload_failures"] == 2 and enf.stop() == []


# Reloading linux-kernel-integrity -> syscalls-only builds views and access (a fault there: rolled back)
# and switches; then releases the old plan's shadow frame, CR4 monitor and views (a fault there: the new
# plan enforces, the piece stays for teardown).
AFTER_THE_SWITCH = ("change_gfn", "monitor_write_ctrlreg", "destroy_view")


@pytest.mark.parametrize("call", ["create_view", "set_access", "switch_view", *AFTER_THE_SWITCH])
def test_a_fault_during_a_reload_keeps_one_plan_enforcing(tmp_path, call):
    faulty: list[FaultyBackend] = []

    def wrap(xen):
        faulty.append(FaultyBackend(xen))
        return faulty[0]
    scenario, xen, enf = started(tmp_path, backend=wrap)
    before_install = build_scenario(scenario).state_snapshot(memory=False)
    v2 = load_plan_source(str(POLICIES / "reload" / "syscalls-only.vmi"), None)
    backend = faulty[0]
    n = backend.calls
    backend.fail_at = -1
    real = getattr(xen, call)
    seen = [0]

    def failing(*args, **kwargs):          # the first such call of the reload fails
        seen[0] += 1
        if seen[0] == 1:
            from policyc.runtime.sim.chaos import InjectedFault
            raise InjectedFault(call, "injected", 5)
        return real(*args, **kwargs)
    setattr(xen, call, failing)
    armed_before = armed(xen)
    result = enf.reload(v2.plan, v2.symbols)
    setattr(xen, call, real)
    assert backend.calls > n and seen[0] >= 1
    if call in AFTER_THE_SWITCH:
        assert result.ok and result.released_late and call in result.released_late[0]
    else:
        assert not result.ok and result.stage == "install", result.describe()
        assert enf.plan["content_hash"] != v2.plan["content_hash"] and armed(xen) == armed_before
    # the old plan still denies the attack, and the next reload goes through
    runner = ScenarioRunner(scenario, xen, lambda _x: enf.service())
    assert runner.run_step(scenario.steps[0]).verdict == "deny"
    assert enf.reload(v2.plan, v2.symbols).ok        # (unchanged, after a fault past the switch)
    assert enf.plan["content_hash"] == v2.plan["content_hash"]
    assert runner.run_step(scenario.steps[0]).verdict == "deny"
    assert enf.stop() == []
    assert diff_snapshots(before_install, xen.state_snapshot(memory=False)) == []


def test_a_failure_right_after_the_switch_puts_the_vcpus_back_in_the_running_plans_view(tmp_path):
    """The switch to the new plan's view has happened when the enforcer fails to take the new plan's
    engines: the rollback must first put every vCPU back in the running plan's view, or it destroys
    views in use and the old plan enforces in a view it does not own."""
    scenario, xen, enf = started(tmp_path)
    before_install = build_scenario(scenario).state_snapshot(memory=False)
    armed_before, view_before = armed(xen), xen.current_view(0)
    v2 = load_plan_source(str(POLICIES / "reload" / "syscalls-only.vmi"), None)
    real = enf.adopt_plan

    def failing(*args, **kwargs):
        raise RuntimeError("injected: the new engines cannot be taken")
    enf.adopt_plan = failing
    result = enf.reload(v2.plan, v2.symbols)
    enf.adopt_plan = real
    assert not result.ok and result.stage == "install" and "injected" in result.error, result.describe()
    assert "rolling back" not in result.error
    assert xen.current_view(0) == view_before and armed(xen) == armed_before
    runner = ScenarioRunner(scenario, xen, lambda _x: enf.service())
    assert runner.run_step(scenario.steps[0]).verdict == "deny"
    assert enf.reload(v2.plan, v2.symbols).ok
    assert enf.stop() == []
    assert diff_snapshots(before_install, xen.state_snapshot(memory=False)) == []


@pytest.mark.parametrize("target, backend_says_who_steps", [
    ("x86_64", True),          # the write stepped with an event (runtime/pt_step.py), the simulator's view
    ("x86_64", False),         # the same, as on Xen: the backend cannot say which vCPUs single-step
    ("x86_64-nomtf", True),    # no MTF: the store completes when the vCPU runs on, after the switch
])
def test_a_remap_in_flight_across_a_reload_is_followed_by_the_new_plan(target, backend_says_who_steps):
    """A page-table write the running plan answered (and followed, for its own binding) while the new
    plan was being built: the new plan was bound before it landed, and must still watch the frame the
    protected address maps after it, so the hook written through it is denied."""
    scenario = load_scenario(REMAP_DURING_RELOAD)
    compiled = load_plan_source(str(V1), target)

    hidden = []

    def as_on_xen(enforcer: Enforcer) -> None:
        if not backend_says_who_steps:           # for the reload only: the snapshots after teardown ask
            hidden.append(enforcer.installation.backend)
            hidden[0].single_stepping = None

    def after_step(_result, _decisions) -> None:
        for backend in hidden:
            vars(backend).pop("single_stepping", None)
    run = run_on_simulator(scenario, compiled.plan, compiled.symbols, on_start=as_on_xen, on_step=after_step)
    failed = [r for r in check_expectations(run) if not r.passed]
    assert not failed, failed
    assert run.results[0].note.endswith("the new plan enforces"), run.results[0].note
    assert not run.teardown_errors


def test_reloading_the_running_plan_changes_nothing(tmp_path):
    _scenario, xen, enf = started(tmp_path)
    before = armed(xen)
    result = enf.reload(enf.plan, enf.symbols)
    assert result.ok and result.unchanged and armed(xen) == before
    assert enf.stop() == []


@pytest.mark.parametrize("step, message", [
    ("{op: reload}", "reload needs one of 'policy: FILE' or 'plan: FILE'"),
    ("{op: reload, policy: a.vmi, plan: b.json}", "reload needs one of"),
    ("{op: parallel, steps: [{op: reload, policy: a.vmi}, {op: reload, policy: b.vmi}]}", "one reload at most"),
])
def test_a_malformed_reload_step_is_a_scenario_error(step, message):
    from policyc.runtime.sim.scenario import ScenarioError

    with pytest.raises(ScenarioError, match=message):
        load_scenario_text(f"scenario: x\nsteps:\n  - {step}\n")


# --------------------------------------------------------------------------- across processes

def _policy_copy(source: Path, dest: Path) -> None:
    """A policy file elsewhere, its symbol file named by absolute path."""
    text = source.read_text()
    sym = next(line for line in text.splitlines() if line.strip().startswith("symbols "))
    name = sym.split('"')[1]
    dest.write_text(text.replace(f'"{name}"', f'"{(source.parent / name).resolve()}"'))


def test_sighup_and_policyc_reload_on_a_simhost_run_keep_every_write_out(tmp_path):
    from policyc.runtime.sim.host import connect

    scenario = tmp_path / "writers.yaml"
    scenario.write_text(WRITERS.read_text().replace("../../../examples/", f"{EXAMPLES}/"))
    sock, control, state, log = (str(tmp_path / "host.sock"), str(tmp_path / "control.sock"),
                                 tmp_path / "state", tmp_path / "log.jsonl")
    policy = tmp_path / "policy.vmi"
    _policy_copy(V1, policy)
    host_proc = start_simhost(scenario, sock)
    enf = None
    try:
        host = connect(sock)
        before = host.snapshot(("rip",))
        enf = subprocess.Popen([sys.executable, "-m", "policyc", "run", str(policy), "--guest", f"simhost:{sock}",
                                "--state-dir", str(state), "--log", str(log), "--control-socket", control],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: host.monitors() != {})
        host.start_workload()

        def answered() -> int:
            return host.status()["responses_consumed"]

        def reloads() -> list[dict]:
            return [r for r in _records(log) if r.get("record") == "reload"]

        def after_some_writes() -> None:
            n = answered()
            wait_for(lambda: answered() > n + 30)

        after_some_writes()
        _policy_copy(V2, policy)                                   # edited in place, then SIGHUP
        enf.send_signal(signal.SIGHUP)
        wait_for(lambda: len(reloads()) == 1)
        after_some_writes()
        _policy_copy(BROKEN, policy)                               # a broken edit: the old plan stays
        enf.send_signal(signal.SIGHUP)
        wait_for(lambda: len(reloads()) == 2)
        after_some_writes()
        code, out, err = cli("reload", "--pid", str(enf.pid), str(V3_PLAN), "--state-dir", str(state))
        assert code == 0 and "reloaded" in out, out + err
        after_some_writes()
        code, out, err = cli("reload", "--socket", control)        # the broken file again: exit 1
        assert code == 1 and "reload FAILED" in err and "unexpected 'dney'" in err, out + err
        _policy_copy(V1, policy)
        code, out, err = cli("reload", "--socket", control)
        assert code == 0, out + err
        after_some_writes()
        assert host.stop_workload()            # while protected: after teardown a write would land
        enf.send_signal(signal.SIGTERM)
        enf.wait(60)
        err = enf.stderr.read()
        assert enf.returncode == 0, err
        assert "reloads: 3 applied, 2 failed (old plan kept), 0 unchanged" in err and "teardown clean" in err
        assert diff_snapshots(before, host.snapshot(("rip",))) == []     # memory included: no write landed
        assert host.status()["paused_vcpus"] == [] and host.status()["error"] is None
    finally:
        if enf is not None and enf.poll() is None:
            enf.kill()
        host_proc.terminate()
        host_proc.wait(10)
    records = _records(log)
    results = [r["result"] for r in records if r.get("record") == "reload"]
    assert results == ["ok", "failed", "ok", "failed", "ok"]
    hashes = [r["new_plan"] for r in records if r.get("record") == "reload" and r["result"] == "ok"]
    first = next(r["old_plan"] for r in records if r.get("record") == "reload")
    order = [first] + hashes
    decisions = [r for r in records if "decision_id" in r]
    assert len(decisions) > 150 and all(d["verdict"] == "deny" for d in decisions)
    at = 0
    for d in decisions:                        # each names a plan that enforced, in the order they did
        assert d["plan_hash"] in order[at:], d
        at = order.index(d["plan_hash"], at)
    assert at == len(order) - 1


def test_policyc_reload_says_when_there_is_nobody_to_ask(tmp_path):
    code, _out, err = cli("reload", "--socket", str(tmp_path / "nobody.sock"))
    assert code == 2 and "cannot ask the run to reload" in err
    code, _out, err = cli("reload", "--pid", "999999999", "--state-dir", str(tmp_path))
    assert code == 2
    code, _out, err = cli("reload", "--pid", "1", str(tmp_path / "missing.vmi"))
    assert code == 2 and "no such policy or plan file" in err


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass                               # a record being written
    return out
