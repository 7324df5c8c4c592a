"""The enforcer on the simulator: policy tests, teardown, recovery, the remap attack, record/replay."""

from __future__ import annotations

import io
import json
import os
import threading
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from policyc.check import check_policy
from policyc.cli import main
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan
from policyc.runtime.decision_log import DecisionLog
from policyc.runtime.enforce import Enforcer, EnforcerError
from policyc.runtime.policy_test import check_expectations, diff_snapshots, run_on_simulator
from policyc.runtime.pt_step import LANDED_RESPONSE, STEP_RESPONSE
from policyc.native.constants import F_ALTP2M, F_FAST_SS, F_TOGGLE_SS
from policyc.native import abi
from policyc.runtime.sim.ring_replay import ReplayBackend, record_requests
from policyc.runtime.reload import scenario_reloader
from policyc.runtime.sim.scenario import ScenarioRunner, build_scenario, load_scenario, load_scenario_text
from policyc.symbols import load_symbol_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCENARIOS = EXAMPLES / "scenarios"
POLICIES = EXAMPLES / "policies"
KERNEL_INTEGRITY = POLICIES / "linux-kernel-integrity.vmi"
STORM = ROOT / "tests" / "data" / "scenarios" / "storm.yaml"
STEADY = ROOT / "tests" / "data" / "scenarios" / "steady.yaml"
SPEC = ROOT.parent / "shared" / "spec" / "SCENARIOS.md"


def compiled(policy: Path | str, target: str | None = None) -> tuple[dict, list]:
    d = Diagnostics()
    model = check_policy(Path(policy), d, target_arch=target)
    assert model is not None, [x.message for x in d]
    plan = compile_plan(model, d, target=target)
    assert plan is not None, [x.message for x in d]
    return plan, [load_symbol_table(s.path) for s in model.symbols]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def storm(count: int, tmp_path: Path) -> Path:
    text = STORM.read_text().replace("count: 1000", f"count: {count}")
    text = text.replace("../../../examples/", f"{EXAMPLES}/")
    p = tmp_path / "storm.yaml"
    p.write_text(text)
    return p


def steady(tmp_path: Path) -> Path:
    p = tmp_path / "steady.yaml"
    p.write_text(STEADY.read_text().replace("../../../examples/", f"{EXAMPLES}/"))
    return p


# =========================================================================== policy tests

def test_the_scenarios_md_example_is_there_verbatim():
    if not SPEC.is_file():
        pytest.skip(f"the spec is not beside this checkout ({SPEC})")
    block = re.search(r"```yaml\n(.*?)```", SPEC.read_text(), re.S).group(1)
    ours = (SCENARIOS / "rootkit-hooks-syscall-table.yaml").read_text()
    assert yaml.safe_load(block) == yaml.safe_load(ours)
    assert block in ours                      # comments included: only our header comes before it


def test_policyc_test_examples_passes_and_covers_every_example_policy():
    code, out, _err = cli("test", str(EXAMPLES), "--format", "json")
    report = json.loads(out)
    failed = [(s["scenario"], r) for s in report["scenarios"] for r in s.get("results", []) if not r["passed"]]
    assert code == 0 and report["failed"] == 0 and not failed, failed
    assert not [s for s in report["scenarios"] if "error" in s]
    covered = {Path(s["policy"]).resolve() for s in report["scenarios"]}
    roots = {p.resolve() for p in POLICIES.glob("*.vmi") if p.name != "linux-common.vmi"}
    assert roots - covered == set(), f"example policies without a scenario: {sorted(roots - covered)}"


def test_a_failing_expectation_fails_with_the_decision_trace(tmp_path):
    text = (SCENARIOS / "rootkit-hooks-syscall-table.yaml").read_text()
    text = text.replace("{step: 1, verdict: deny, rule: syscall_entry_guard}",
                        "{step: 1, verdict: allow, rule: wp_guard}")
    text = text.replace("../policies/", f"{POLICIES}/").replace("symbols: linux-6.1", f"symbols: {POLICIES}/linux-6.1")
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    code, out, _ = cli("test", str(p))
    assert code == 1
    assert "FAIL  step 1, verdict 'allow', rule 'wp_guard'" in out
    assert "verdict deny, expected allow; decided by syscall_entry_guard, expected wp_guard" in out
    assert "mov_to_msr [vcpu=1" in out and "-> deny by syscall_entry_guard" in out   # the trace
    assert "1 failed" in out


def test_bad_expectations_are_errors_with_their_position(tmp_path):
    text = (SCENARIOS / "rootkit-hooks-syscall-table.yaml").read_text()
    text = text.replace("{step: 4, verdict: allow}", "{step: 4, verdit: allow}")
    text = text.replace("../policies/", f"{POLICIES}/").replace("symbols: linux-6.1", f"symbols: {POLICIES}/linux-6.1")
    p = tmp_path / "typo.yaml"
    p.write_text(text)
    code, out, _ = cli("test", str(p))
    assert code == 1
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "verdit" in l)
    assert f"typo.yaml:{line}:" in out and "unknown key 'verdit'" in out


# =========================================================================== policyc run

def test_run_on_the_simulator_shows_attacks_denied_and_benign_work_untouched():
    code, out, err = cli("run", str(KERNEL_INTEGRITY), "--guest", "sim:rootkit-hooks-syscall-table")
    assert code == 0, err
    lines = out.splitlines()
    step = {int(m.group(1)): l for l in lines if (m := re.match(r"\s+step (\d+)", l))}
    assert "DENIED  protect_tables" in step[0] and "DENIED  syscall_entry_guard" in step[1]
    assert "DENIED  wp_guard" in step[2] and "allowed  trace_creds" in step[3]
    assert "allowed  (no event)" in step[4]
    assert "bound: slide 0x1e00000 found from LSTAR and the IDT" in out
    assert "teardown: the domain is as it was before install; requests 4, responses 4, decision records 4" in out


def _step_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"\s+step \d+", line)]


def test_run_a_compiled_plan_as_ci_reviewed_it(tmp_path):
    plan = tmp_path / "ki.plan.json"
    code, _, err = cli("compile", str(KERNEL_INTEGRITY), "-o", str(plan))
    assert code == 0, err
    from_policy = cli("run", str(KERNEL_INTEGRITY), "--guest", "sim:rootkit-hooks-syscall-table")
    # its symbol file is not beside it: said, with the way out
    code, out, err = cli("run", str(plan), "--guest", "sim:rootkit-hooks-syscall-table")
    assert code == 2 and "needs its symbol file linux-6.1.System.map" in err and "--symbols DIR" in err
    code, out, err = cli("run", str(plan), "--guest", "sim:rootkit-hooks-syscall-table",
                         "--symbols", str(KERNEL_INTEGRITY.parent))
    assert code == 0, err
    assert _step_lines(out) == _step_lines(from_policy[1]) and len(_step_lines(out)) == 6
    # a symbol file of the same name but other contents is not the one the plan was compiled against
    (tmp_path / "linux-6.1.System.map").write_text("ffffffff81000000 T _stext\n")
    code, out, err = cli("run", str(plan), "--guest", "sim:rootkit-hooks-syscall-table")
    assert code == 2 and "is not the symbol file the plan was compiled against" in err
    # an edited plan, and a plan asked to run for another target, install nothing
    text = plan.read_text().replace('"mode": "enforce"', '"mode": "audit"')
    (tmp_path / "edited.json").write_text(text)
    code, out, err = cli("run", str(tmp_path / "edited.json"), "--guest", "sim:rootkit-hooks-syscall-table")
    assert code == 2 and "content hash mismatch" in err and "nothing was installed" in err
    code, out, err = cli("run", str(plan), "--guest", "sim:rootkit-hooks-syscall-table", "--target", "arm64",
                         "--symbols", str(KERNEL_INTEGRITY.parent))
    assert code == 2 and "a plan runs on the target it was compiled for" in err


def test_run_writes_the_decision_log_and_alerts(tmp_path):
    log, alerts = tmp_path / "d.jsonl", tmp_path / "a.jsonl"
    code, _out, err = cli("run", "--guest", "sim:rootkit-hooks-syscall-table", "--log", str(log),
                          "--alerts", str(alerts))
    assert code == 0, err
    records = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["rule"] for r in records] == ["protect_tables", "syscall_entry_guard", "wp_guard", "trace_creds"]
    assert len({r["decision_id"] for r in records}) == 4 and {r["plan_hash"] for r in records} != {""}
    assert [json.loads(l)["severity"] for l in alerts.read_text().splitlines()] == ["critical"] * 3


def test_run_in_audit_mode_lets_everything_through_and_says_what_it_would_deny(tmp_path):
    log = tmp_path / "d.jsonl"
    code, out, _ = cli("run", "--guest", "sim:rootkit-hooks-syscall-table", "--audit", "--log", str(log))
    assert code == 0 and "(audit, x86_64)" in out
    records = [json.loads(l) for l in log.read_text().splitlines()]
    assert sum(r["would_deny"] for r in records) == 3 and all(r["response"] == "allow" for r in records)
    assert "allowed (would deny)  syscall_entry_guard" in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--guest", "nowhere"], "expected sim:SCENARIO, simhost:SOCKET or xen:NAME|DOMID"),
    (["run", str(KERNEL_INTEGRITY), "--guest", "xen:guest1"], "not a Xen dom0"),
    (["run", "--guest", "sim:no-such-scenario"], "no scenario 'no-such-scenario' (bundled: "),
    (["run", "missing.vmi", "--guest", "sim:rootkit-hooks-syscall-table"], "no such policy file: missing.vmi"),
    (["recover", "--guest", "sim:rootkit-hooks-syscall-table"], "nothing to recover"),
    (["replay", "no-trace.jsonl", "--policy", str(KERNEL_INTEGRITY)], "cannot read"),
    (["run", "--guest", "sim:rootkit-hooks-syscall-table", "--slide", "0"], "a simulated guest's slide is its scenario's"),
    (["run", "--guest", "xen:1", "--slide", "0x1z"], "--slide: invalid address value"),
    (["run", "--guest", "xen:1", "--slide", "0x10000000000000000"], "--slide: invalid address value"),
    (["run", "--guest", "xen:1", "--slide", "-4096"], "--slide: invalid address value"),
])
def test_usage_errors_are_one_clear_line(argv, message):
    code, _out, err = cli(*argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_policy_that_cannot_bind_installs_nothing(tmp_path):
    # the policy's symbols are another kernel's: binding finds LSTAR and the IDT disagree with them
    code, _out, err = cli("run", str(POLICIES / "linux-arm64-integrity.vmi"), "--target", "x86_64",
                          "--guest", "sim:rootkit-hooks-syscall-table")
    assert code == 2 and ("does not compile" in err or "cannot bind" in err) and "Traceback" not in err


# =========================================================================== teardown

def test_teardown_after_a_run_restores_memory_access_views_monitors_and_pause_state(tmp_path):
    scenario = load_scenario(storm(50, tmp_path))
    plan, symbols = compiled(KERNEL_INTEGRITY)
    xen = build_scenario(scenario)
    before = xen.state_snapshot(memory=True)
    state = tmp_path / "state"
    enforcer = Enforcer(plan, xen, symbols, guest="t", state_dir=state)
    enforcer.start()
    during = xen.state_snapshot(memory=True)
    assert diff_snapshots(before, during)              # installed: access, views, monitors changed
    from policyc.runtime.sim.scenario import ScenarioRunner
    ScenarioRunner(scenario, xen, lambda _x: enforcer.service()).run()
    assert enforcer.requests == 50 * 7
    assert enforcer.stop() == []
    after = xen.state_snapshot(memory=True)
    # the workload's instructions move rip, and its read loads rax: everything else must be as it was
    strip = lambda s: {**s, "registers": tuple(tuple(kv for kv in r if kv[0] not in ("rip", "rax"))
                                               for r in s["registers"])}
    assert diff_snapshots(strip(before), strip(after)) == []
    assert not list(state.iterdir())                   # the journal is gone


IGNORED = ("rip", "rax")          # moved by the workload's own instructions


def _simhost(tmp_path: Path, scenario: Path) -> tuple[subprocess.Popen, str]:
    sock = str(tmp_path / "host.sock")
    proc = subprocess.Popen([sys.executable, "-m", "policyc.runtime.sim.host", str(scenario), "--socket", sock,
                             "--forever", "--no-start"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc, sock


def _enforcer_process(tmp_path: Path, sock: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "policyc", "run", str(KERNEL_INTEGRITY), "--guest",
                             f"simhost:{sock}", "--state-dir", str(tmp_path / "state"),
                             "--log", str(tmp_path / "log.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_teardown_after_a_signal_mid_run(tmp_path, how):
    from policyc.runtime.sim.host import connect

    host_proc, sock = _simhost(tmp_path, steady(tmp_path))
    enf = None
    try:
        host = connect(sock)
        before = host.snapshot(IGNORED)
        enf = _enforcer_process(tmp_path, sock)
        _wait_for(lambda: host.monitors() != {})          # installed
        host.start_workload()
        _wait_for(lambda: host.status()["responses_consumed"] > 200)
        assert host.snapshot(IGNORED) != before
        enf.send_signal(getattr(signal, how))
        enf.wait(30)
        if how == "SIGTERM":
            assert enf.returncode == 0, enf.stderr.read()
            err = enf.stderr.read()
            assert "teardown clean" in err
            # how long the guest waited for protection, phase by phase
            m = re.search(r"in place after compile ([\d.]+) s, bind ([\d.]+) s, install ([\d.]+) s, "
                          r"engine ([\d.]+) s \(([\d.]+) s\)", err)
            assert m, err
            assert abs(sum(float(x) for x in m.groups()[:4]) - float(m[5])) < 0.03
        else:
            assert enf.returncode == -signal.SIGKILL
            state = tmp_path / "state"
            assert [p.suffix for p in state.iterdir()] == [".json"]      # the journal it left
            code, out, err = cli("recover", "--guest", f"simhost:{sock}", "--state-dir", str(state))
            assert code == 0, out + err
            assert "the guest is as it was before install" in out
            assert not list(state.iterdir())
        assert host.stop_workload()
        after = host.snapshot(IGNORED)
        assert diff_snapshots(before, after) == []
        assert host.status()["paused_vcpus"] == [] and host.status()["error"] is None
        # every decision the enforcer answered is in the log (it is written before the answer)
        records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert len(records) >= 200
    finally:
        if enf is not None and enf.poll() is None:
            enf.kill()
        host_proc.terminate()
        host_proc.wait(10)


# =========================================================================== the remap attack

def test_a_remapped_syscall_table_is_followed_and_the_hook_denied():
    plan, symbols = compiled(KERNEL_INTEGRITY)
    scenario = load_scenario(SCENARIOS / "rootkit-remaps-syscall-table.yaml")
    log = io.StringIO()
    run = run_on_simulator(scenario, plan, symbols, log=DecisionLog(log, plan_hash="x"))
    assert all(r.passed for r in check_expectations(run)), [r for r in check_expectations(run) if not r.passed]
    assert [r.verdict for r in run.results] == ["allow", "deny", "allow", "deny", "allow"]
    (remap, landed), hook = run.step_decisions(0), run.step_decisions(1)[0]
    assert "page-table write to an entry that maps" in remap.note and "syscalls" in remap.note
    # the write stepped with an event (runtime/pt_step.py): out of the restricted view with single-stepping
    # on, then at its single-step event the binding follows it and the vCPU goes back to the view it faulted in
    assert remap.response == STEP_RESPONSE and remap.response_flags & F_TOGGLE_SS and not remap.response_flags & F_FAST_SS
    assert landed.kind == "singlestep" and landed.response == LANDED_RESPONSE and landed.pt_write == (
        remap.event["gfn"], remap.event["offset"])
    assert landed.response_flags & F_TOGGLE_SS and landed.response_flags & F_ALTP2M
    assert hook.rule == "protect_tables" and hook.event["gfn"] == 0x8000
    rebinds = [json.loads(l) for l in log.getvalue().splitlines() if '"record":"rebind"' in l]
    assert [r["regions"]["syscalls"]["to"] for r in rebinds] == [["0x8000"], ["0x8001"]]
    # without the page-table watch the hook would have landed: the same steps, no enforcer
    from policyc.runtime.sim.scenario import ScenarioRunner
    bare = ScenarioRunner(scenario, build_scenario(scenario)).run()
    assert bare[1].verdict == "allow"


# =========================================================================== record and replay

def test_replay_re_decides_a_recording_and_shows_what_a_policy_change_alters(tmp_path):
    trace = tmp_path / "t.trace"
    code, _out, err = cli("run", "--guest", "sim:rootkit-remaps-syscall-table", "--record", str(trace))
    assert code == 0, err
    code, out, err = cli("replay", str(trace), "--policy", str(KERNEL_INTEGRITY))
    assert code == 0, err
    # two page-table writes (each with the single-step event it is followed at) and two hooks
    assert "replayed 6 request(s)" in out and "2 rebind(s) followed" in out
    assert "deny 2" in out
    # a weaker policy: the table rule only logs now
    weaker = tmp_path / "weaker.vmi"
    text = KERNEL_INTEGRITY.read_text().replace('symbols "linux-6.1.System.map"',
                                                f'symbols "{POLICIES}/linux-6.1.System.map"')
    weaker.write_text(text.replace("""        deny
        alert critical "dispatch table write""", """        alert critical "dispatch table write"""))
    code, out, err = cli("replay", str(trace), "--policy", str(weaker), "--baseline", str(KERNEL_INTEGRITY),
                         "--exit-code")
    assert code == 1, err
    assert "2 decision(s) differ" in out and out.count("deny by protect_tables -> allow by protect_tables") == 2


def test_a_corrupt_trace_is_refused_with_its_line(tmp_path):
    trace = tmp_path / "t.trace"
    assert cli("run", "--guest", "sim:rootkit-hooks-syscall-table", "--record", str(trace))[0] == 0
    lines = trace.read_text().splitlines()
    lines[2] = lines[2][:-5]
    trace.write_text("\n".join(lines) + "\n")
    code, _out, err = cli("replay", str(trace), "--policy", str(KERNEL_INTEGRITY))
    assert code == 2 and f"{trace}:3: not JSON" in err


# =========================================================================== the storm

STORM_EVENTS = int(os.environ.get("POLICYC_STORM_EVENTS", "1000000"))
STORM_SIM_ROUNDS = 300          # the guest itself runs this many rounds (7 events each)


def test_a_storm_of_mixed_traps_on_8_vcpus_answers_every_request(tmp_path):
    """The storm on the simulated guest (which must end as it began), then 1,000,000 of its requests
    replayed in C on the enforcer's ring (seconds; POLICYC_STORM_EVENTS sets the number): every
    request answered and recorded, no vCPU left paused, the verdicts the policy gives."""
    per_iteration = 7
    scenario = load_scenario(storm(STORM_SIM_ROUNDS, tmp_path))
    plan, symbols = compiled(KERNEL_INTEGRITY)
    log_path = tmp_path / "decisions.jsonl"
    with open(log_path, "w") as f:
        log = DecisionLog(f, plan_hash=plan["content_hash"])
        run = run_on_simulator(scenario, plan, symbols, log=log)
    enf = run.enforcer
    assert enf.requests == enf.responses == enf.records == STORM_SIM_ROUNDS * per_iteration
    assert run.xen.paused_vcpus() == frozenset()
    assert log.stats.verdicts["deny"] == 4 * STORM_SIM_ROUNDS and log.stats.collateral == STORM_SIM_ROUNDS
    assert diff_snapshots(run.before, run.after) == []
    recorded = record_requests(plan, symbols, load_scenario(storm(5, tmp_path)), tmp_path / "record")
    assert len(recorded) == 5 * per_iteration

    count = -(-STORM_EVENTS // per_iteration) * per_iteration
    print(f"storm: {count} events replayed (POLICYC_STORM_EVENTS={STORM_EVENTS})")
    backend = ReplayBackend(build_scenario(scenario), recorded, count)
    with open(log_path, "w") as f:
        log = DecisionLog(f, plan_hash=plan["content_hash"])
        enf = Enforcer(plan, backend, symbols, guest="storm", log=log, state_dir=tmp_path / "state")
        enf.start()
        while not backend.done():
            enf.service()
        assert enf.stop() == []
    assert enf.requests == enf.responses == enf.records == backend.answered == count
    assert backend.wrong == 0 and backend.paused_vcpus() == frozenset()
    with open(log_path) as f:
        assert sum(1 for _ in f) == count
    stats = log.stats
    assert stats.decisions == count and enf.native.decided_natively() == count
    assert stats.verdicts["deny"] == 4 * count // per_iteration and stats.collateral == count // per_iteration


def test_the_run_loop_waits_in_c_when_the_backend_has_a_native_wait(tmp_path):
    """With a native kick and wait (`native_wait()`), `run` answers, kicks and waits in one native call
    a turn: the backend's Python `wait` is never asked, and every request is answered and recorded."""
    per_iteration = 7
    plan, symbols = compiled(KERNEL_INTEGRITY)
    recorded = record_requests(plan, symbols, load_scenario(storm(5, tmp_path)), tmp_path / "record")
    count = 20_000 * per_iteration
    backend = ReplayBackend(build_scenario(load_scenario(storm(1, tmp_path))), recorded, count)

    def python_wait(timeout):
        raise AssertionError("the Python wait was asked")

    backend.wait = python_wait
    log_path = tmp_path / "decisions.jsonl"
    with open(log_path, "w") as f:
        log = DecisionLog(f, plan_hash=plan["content_hash"])
        enf = Enforcer(plan, backend, symbols, guest="storm", log=log, state_dir=tmp_path / "state")
        enf.start()
        enf.run(stop=backend.done, wait=0.05)
    assert enf.requests == enf.responses == enf.records == backend.answered == count
    assert backend.wrong == 0 and backend.paused_vcpus() == frozenset()
    with open(log_path) as f:
        assert sum(1 for _ in f) == count


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_the_run_loop_stops_while_the_ring_never_empties(tmp_path, native):
    """A guest that traps as fast as it is answered keeps the ring busy for ever; a stop request (as a
    SIGTERM sets) must still end the run and tear down, long before the replay runs dry (in the lab a
    busy guest kept one `service()` call going until the enforcer was killed)."""
    per_iteration = 7
    plan, symbols = compiled(KERNEL_INTEGRITY)
    recorded = record_requests(plan, symbols, load_scenario(storm(5, tmp_path)), tmp_path / "record")
    count = 50_000_000 * per_iteration
    backend = ReplayBackend(build_scenario(load_scenario(storm(1, tmp_path))), recorded, count)
    turns = []

    def stop() -> bool:
        turns.append(backend.answered)
        return backend.answered > 0 and len(turns) > 3

    with open(tmp_path / "decisions.jsonl", "w") as f:
        enf = Enforcer(plan, backend, symbols, guest="storm", log=DecisionLog(f), state_dir=tmp_path / "state",
                       native=native)
        enf.start()
        # in a thread, so that a run that never looks at its stop request fails here instead of hanging
        loop = threading.Thread(target=enf.run, kwargs={"stop": stop, "wait": 0.05}, daemon=True)
        loop.start()
        loop.join(120)
        assert not loop.is_alive(), "the run loop never saw its stop request"
    assert 0 < backend.answered < count
    assert enf.requests == enf.responses == enf.records
    # (no vCPU check: the replay has no monitor to disable, it refills the ring after teardown too)


@pytest.mark.parametrize("clock", ["auto", "system", "cycles"])
def test_native_records_carry_the_wall_time_and_a_latency(tmp_path, monkeypatch, clock):
    """The native engine reads the wall clock once a second and derives each record's time from the
    monotonic clock (the system's, or the cycle counter scaled by it where each read of the system
    clock is a system call): every record's time lies within the run, in order, and decisions are
    timed."""
    from datetime import datetime

    monkeypatch.setenv("POLICYC_NATIVE_CLOCK", clock)

    per_iteration = 7
    plan, symbols = compiled(KERNEL_INTEGRITY)
    recorded = record_requests(plan, symbols, load_scenario(storm(5, tmp_path)), tmp_path / "record")
    count = 3_000 * per_iteration
    backend = ReplayBackend(build_scenario(load_scenario(storm(1, tmp_path))), recorded, count)
    log_path = tmp_path / "decisions.jsonl"
    before = time.time()
    with open(log_path, "w") as f:
        enf = Enforcer(plan, backend, symbols, guest="storm", log=DecisionLog(f), state_dir=tmp_path / "state")
        enf.start()
        enf.run(stop=backend.done, wait=0.05)
    after = time.time()
    assert enf.native.decided_natively() == count
    assert enf.native.clock_source == ("system" if clock == "auto" else clock)   # this host's vDSO serves the clock
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    times = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp() for r in records]
    assert len(records) == count
    assert before - 0.001 <= min(times) and max(times) <= after + 0.001
    assert times == sorted(times)
    assert any(r["latency_ns"] > 0 for r in records)


def test_a_bad_native_clock_setting_is_refused_before_anything_is_installed(tmp_path, monkeypatch):
    from policyc.errors import PolicycError

    monkeypatch.setenv("POLICYC_NATIVE_CLOCK", "sundial")
    plan, symbols = compiled(KERNEL_INTEGRITY)
    xen = build_scenario(load_scenario(storm(1, tmp_path)))
    with pytest.raises(PolicycError, match="POLICYC_NATIVE_CLOCK='sundial': expected one of auto, system, cycles"):
        Enforcer(plan, xen, symbols, guest="storm", state_dir=tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_a_failed_native_kick_is_owed_and_retried_before_the_next_take(tmp_path):
    import ctypes

    plan, symbols = compiled(KERNEL_INTEGRITY)
    recorded = record_requests(plan, symbols, load_scenario(storm(1, tmp_path)), tmp_path / "record")
    backend = ReplayBackend(build_scenario(load_scenario(storm(1, tmp_path))), recorded, 70)
    kicks = []
    failing = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(lambda ctx: kicks.append(ctx) or -1)
    nffi, _ = abi.extension()
    backend.native_notify = lambda: (nffi.cast("int (*)(void *)", ctypes.cast(failing, ctypes.c_void_p).value),
                                     nffi.NULL)
    with open(tmp_path / "decisions.jsonl", "w") as f:
        enf = Enforcer(plan, backend, symbols, guest="storm", log=DecisionLog(f), state_dir=tmp_path / "state")
        inst = enf.start()
        first = backend.answered
        assert enf.service() > 0 and len(kicks) == 1       # one batch answered, its kick failed: stop there
        assert inst.notify_owed and inst.notify_failures == 1
        assert backend.answered == first                   # Xen was never told: its vCPUs still wait
        enf.service()                                      # the owed kick (a Python notify) goes first
        assert backend.answered > first and inst.notify_failures >= 1
        while not backend.done():
            enf.service()
        assert enf.stop() == []
    assert backend.answered == 70 and backend.paused_vcpus() == frozenset()


def test_a_decision_log_that_fails_does_not_leave_vcpus_paused(tmp_path):
    class Full(io.StringIO):
        def write(self, s):
            raise OSError(28, "No space left on device")

    plan, symbols = compiled(KERNEL_INTEGRITY)
    scenario = load_scenario(SCENARIOS / "rootkit-hooks-syscall-table.yaml")
    err = io.StringIO()
    with redirect_stderr(err):
        run = run_on_simulator(scenario, plan, symbols, log=DecisionLog(Full(), plan_hash="x"))
    enf = run.enforcer
    assert enf.requests == enf.responses == enf.unlogged == 4 and enf.records == 0
    assert [r.verdict for r in run.results[:3]] == ["deny"] * 3        # still enforced
    assert run.xen.paused_vcpus() == frozenset()
    assert err.getvalue().count("cannot be written") == 1


def test_an_operation_the_guest_cannot_do_is_an_error_at_its_step_and_nothing_is_left(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(f"""scenario: bad
guest: {{layout: linux-x86_64, symbols: {POLICIES}/linux-6.1.System.map, vcpus: 1}}
policy: {KERNEL_INTEGRITY}
steps:
  - {{vcpu: 0, op: read, va: "symbol sys_call_table"}}
  - {{vcpu: 0, op: smc}}
""")
    code, _out, err = cli("run", "--guest", f"sim:{p}")
    assert code == 2 and f"{p}:6:5: smc is an arm64 instruction" in err and "Traceback" not in err
    code, out, _ = cli("test", str(p))
    assert code == 1 and "ERROR" in out and "smc is an arm64 instruction" in out


def test_vt_x_without_mtf_enforces_with_emulation_and_inline_breakpoints(tmp_path):
    """Nested or emulated VT-x without the monitor trap flag (Bochs): the x86_64 plan cannot install
    (it steps over in another view), the x86_64-nomtf plan does, on the same host."""
    scenario = load_scenario(SCENARIOS / "rootkit-hooks-syscall-table.yaml")
    plan, symbols = compiled(KERNEL_INTEGRITY, "x86_64-nomtf")
    assert plan["strategies"]["mem_access.allow"] == "emulate"
    assert plan["strategies"]["breakpoint"] == "int3-inline-emulate"
    assert "singlestep" not in plan["monitors"] and len(plan["views"]) == 1
    run = run_on_simulator(scenario, plan, symbols)
    assert run.xen.capabilities().arch == "x86_64" and not run.xen.capabilities().singlestep
    results = check_expectations(run)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    x86_plan, _ = compiled(KERNEL_INTEGRITY)
    xen = build_scenario(scenario, profile="x86_64-nomtf")
    before = xen.state_snapshot()
    with pytest.raises(EnforcerError, match="singlestep"):
        Enforcer(x86_plan, xen, symbols, guest="g", state_dir=tmp_path).start()
    assert diff_snapshots(before, xen.state_snapshot()) == []          # nothing was left behind


def test_run_says_which_target_a_host_without_mtf_needs():
    from policyc.cli_runtime import host_refusal
    from policyc.plan_source import load_plan_source
    from policyc.runtime.backend import Capabilities

    class NoMtf:
        def capabilities(self) -> Capabilities:
            return Capabilities("x86_64", 7, 1, True, True, 10, False,
                                frozenset({"write_ctrlreg", "mov_to_msr", "software_breakpoint"}))

    plan = load_plan_source(str(KERNEL_INTEGRITY), None).plan
    assert "--target x86_64-nomtf" in host_refusal(plan, NoMtf(), "xen:bochs", str(KERNEL_INTEGRITY))
    probes = str(POLICIES / "guest-agent-and-probes.vmi")
    svm = load_plan_source(probes, "x86_64-svm").plan
    assert "does not run on xen:bochs" in host_refusal(svm, NoMtf(), "xen:bochs", probes)
    nomtf = load_plan_source(str(KERNEL_INTEGRITY), "x86_64-nomtf").plan
    assert host_refusal(nomtf, NoMtf(), "xen:bochs", str(KERNEL_INTEGRITY)) is None


def test_outputs_that_cannot_be_written_are_one_clear_line(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    for flag, what in (("--record", "cannot write the trace"), ("--log", "cannot open")):
        code, _out, err = cli("run", "--guest", "sim:rootkit-hooks-syscall-table", flag, str(missing / "f"))
        assert code == 2 and what in err and "Traceback" not in err


# =========================================================================== native and Python enforcers

_VARIABLE = re.compile(r'"(decision_id|time)":"[^"]*"|"(latency_ns|time_ns)":\d+|"seconds":[\d.]+')


def _enforce_scenario(path: Path, tmp_path: Path, native: bool) -> tuple[list[str], list[str], Enforcer]:
    scenario = load_scenario(path)
    d = Diagnostics()
    model = check_policy(Path(scenario.policy), d, target_arch=scenario.profile)
    plan = compile_plan(model, d, target=scenario.profile)
    symbols = [load_symbol_table(s.path) for s in model.symbols]
    xen = build_scenario(scenario, profile=scenario.profile)
    tag = "native" if native else "python"
    log_path, alerts_path = tmp_path / f"{tag}.jsonl", tmp_path / f"{tag}.alerts"
    with open(log_path, "w") as f, open(alerts_path, "w") as a:
        enf = Enforcer(plan, xen, symbols, guest=tag, log=DecisionLog(f, a, plan["content_hash"]),
                       state_dir=tmp_path / tag, native=native, clock=lambda: 1000.0)   # rate limits: no refill
        enf.start()
        runner = ScenarioRunner(scenario, xen, lambda _x: enf.service())
        runner.reloader = scenario_reloader(enf, scenario.profile)
        for step in scenario.steps:
            runner.results.append(runner.run_step(step))
            enf.idle()
        runner.settle()
        assert enf.stop() == []
    enf.paused_at_end = xen.paused_vcpus()      # a policy's `pause` action leaves the domain paused
    return ([_VARIABLE.sub("", line) for line in log_path.read_text().splitlines()],
            [_VARIABLE.sub("", line) for line in alerts_path.read_text().splitlines()], enf)


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_native_enforcer_logs_what_the_python_enforcer_logs(path, tmp_path):
    """Every example scenario, rebinds after page-table writes included: the same records and alerts."""
    want, want_alerts, py = _enforce_scenario(path, tmp_path, native=False)
    got, got_alerts, nat = _enforce_scenario(path, tmp_path, native=True)
    assert nat.native is not None and py.native is None
    assert got == want and got_alerts == want_alerts
    assert nat.counters() == py.counters() and nat.paused_at_end == py.paused_at_end


def test_a_native_log_write_that_fails_still_answers_every_request(tmp_path):
    """The native call writes the records itself; when the file refuses them (ENOSPC), the batch is
    answered all the same and the loss is counted, as with the Python engine."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to make writes fail with ENOSPC")
    plan, symbols = compiled(KERNEL_INTEGRITY)
    scenario = load_scenario(SCENARIOS / "rootkit-hooks-syscall-table.yaml")
    xen = build_scenario(scenario)
    err = io.StringIO()
    with open("/dev/full", "w") as full, redirect_stderr(err):
        enf = Enforcer(plan, xen, symbols, guest="full", log=DecisionLog(full, plan_hash="x"),
                       state_dir=tmp_path / "state")
        enf.start()
        results = ScenarioRunner(scenario, xen, lambda _x: enf.service()).run()
        assert enf.stop() == []
    assert enf.native is not None and enf.native.decided_natively() > 0
    assert enf.requests == enf.responses == enf.unlogged == 4 and enf.records == 0
    assert [r.verdict for r in results[:3]] == ["deny"] * 3
    assert xen.paused_vcpus() == frozenset() and err.getvalue().count("cannot be written") == 1


def test_the_operators_slide_binds_instead_of_the_one_found(tmp_path):
    """`policyc run --slide`: the plan's relocatable addresses slid by the operator's value (a guest with
    no symbols to find it with: the lab's long-mode guest); the right one binds and enforces, a wrong
    one is refused at bind, the guest untouched."""
    from helpers import run_storm_on_simhost, storm_scenario

    assert run_storm_on_simhost(tmp_path, 5, ["--slide", "0x3c00000"]) > 0       # storm.yaml's kaslr_slide
    from policyc.runtime.sim.host import connect
    host_proc, sock = _simhost(tmp_path, storm_scenario(tmp_path, 5))
    try:
        code, _out, err = cli("run", str(KERNEL_INTEGRITY), "--guest", f"simhost:{sock}", "--slide", "0x200000",
                              "--state-dir", str(tmp_path / "state2"))
        assert code == 2 and "cannot bind the plan" in err and "does not translate" in err, err
        assert connect(sock).monitors() == {}
    finally:
        host_proc.terminate()
        host_proc.wait(10)
