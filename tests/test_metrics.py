"""`policyc run --metrics`: /metrics agrees with the decision log, /health follows protection,
/status says which plan and since when; the figures are taken on the loop's thread, by snapshot."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from policyc.runtime.metrics import MetricsServer, Snapshot, parse_address, record_activation

from helpers import http_get, storm_scenario, wait_for

prometheus_parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is not installed")

ROOT = Path(__file__).resolve().parents[1]
KERNEL_INTEGRITY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in prometheus_parser.text_string_to_metric_families(text)}


def test_metrics_count_what_the_decision_log_holds_and_health_follows_protection(tmp_path):
    host_sock = str(tmp_path / "host.sock")
    host = subprocess.Popen([sys.executable, "-m", "policyc.runtime.sim.host", str(storm_scenario(tmp_path, 1000)), "--socket",
                             host_sock, "--forever", "--no-start"], stdout=subprocess.PIPE, text=True)
    enf = None
    log = tmp_path / "log.jsonl"
    try:
        assert host.stdout.readline().strip() == "ready"
        # The guest cannot be attached while its host is stopped: protection is not in place yet.
        os.kill(host.pid, signal.SIGSTOP)
        enf = subprocess.Popen([sys.executable, "-m", "policyc", "run", str(KERNEL_INTEGRITY), "--guest",
                                f"simhost:{host_sock}", "--state-dir", str(tmp_path / "state"), "--log", str(log),
                                "--metrics", "127.0.0.1:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = enf.stderr.readline()
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        assert m, line
        base = f"http://127.0.0.1:{m[1]}"
        assert int(m[1]) > 0
        assert http_get(base + "/health") == (503, "not protected\n")
        status = json.loads(http_get(base + "/status")[1])
        assert status["protected"] is False and status["plan"] is None
        os.kill(host.pid, signal.SIGCONT)
        wait_for(lambda: http_get(base + "/health")[0] == 200)

        from policyc.runtime.sim.host import connect
        connect(host_sock).start_workload()
        wait_for(lambda: log.exists() and log.stat().st_size > 400_000)
        fams = _families(http_get(base + "/metrics")[1])
        status = json.loads(http_get(base + "/status")[1])
        enf.send_signal(signal.SIGTERM)
        assert enf.wait(60) == 0, enf.stderr.read()
    finally:
        if enf is not None and enf.poll() is None:
            enf.kill()
        if host.poll() is None:
            os.kill(host.pid, signal.SIGCONT)
            host.terminate()
            host.wait(10)

    for name in ("policyc_decisions", "policyc_events", "policyc_events_lost", "policyc_decision_log_failures",
                 "policyc_plan_info", "policyc_plan_activations", "policyc_decision_seconds",
                 "policyc_paused_vcpus"):
        assert name in fams, name
    # The scrape's snapshot was taken between two batches: the log's first N decision records are
    # exactly the decisions it counted (the log is written in answer order, before each answer).
    decided = {(s.labels["rule"], s.labels["verdict"]): s.value for s in fams["policyc_decisions"]}
    n = int(sum(decided.values()))
    assert n > 300
    records = [json.loads(l) for l in log.read_text().splitlines()]
    records = [r for r in records if "decision_id" in r][:n]
    assert len(records) == n
    from_log = Counter((r.get("rule") or "(none)", "would_deny" if r["would_deny"] else r["verdict"])
                       for r in records)
    assert decided == {k: float(v) for k, v in from_log.items()}
    assert {s.labels["policy"] for s in fams["policyc_decisions"]} == {"linux-kernel-integrity"}
    assert {(s.labels["reason"], s.value) for s in fams["policyc_events"]} == \
        {(k, float(v)) for k, v in Counter(r["kind"] for r in records).items()}
    hist = {s.labels.get("le"): s.value for s in fams["policyc_decision_seconds"] if s.name.endswith("_bucket")}
    assert hist["+Inf"] == n
    for le in ("1.6384e-05", "6.5536e-05", "0.000262144"):      # 2^14, 2^16, 2^18 ns
        assert hist[le] == sum(1 for r in records if r["latency_ns"] < float(le) * 1e9), le
    total = next(s.value for s in fams["policyc_decision_seconds"] if s.name.endswith("_sum"))
    assert total == pytest.approx(sum(r["latency_ns"] for r in records) / 1e9)
    plan_hash = records[0]["plan_hash"]
    assert [(s.labels, s.value) for s in fams["policyc_plan_info"]] == \
        [({"policy": "linux-kernel-integrity", "plan_hash": plan_hash, "target": "x86_64"}, 1.0)]
    assert {s.labels["result"]: s.value for s in fams["policyc_plan_activations"]} == {"success": 1.0, "failure": 0.0}
    assert sum(s.value for s in fams["policyc_decision_log_failures"]) == 0
    assert sum(s.value for s in fams["policyc_events_lost"]) == 0
    assert [s.value for s in fams["policyc_paused_vcpus"]][0] >= 0
    # no label value comes from the guest: rules are the policy's, reasons the kinds
    policy_rules = set(re.findall(r"^\s*rule (\w+):", KERNEL_INTEGRITY.read_text(), re.M))
    assert {k for k, _v in decided} <= policy_rules | {"(none)"} and len(policy_rules) >= 5
    assert status["plan"]["plan_hash"] == plan_hash and status["since"] and status["protected"] is True
    assert status["counters"]["decisions"] >= n and status["last_error"] is None


def test_a_scrape_gets_the_loops_snapshot_or_the_last_one_when_the_loop_is_busy():
    server = MetricsServer(("127.0.0.1", 0))
    port = server.start()
    try:
        taken = []

        def source() -> Snapshot:
            taken.append(1)
            return Snapshot(taken=time.time(), decisions={("r", "deny"): len(taken)})

        server.serve_snapshots(source)
        assert len(taken) == 1
        # nobody refreshes (a loop in a long batch): the scrape waits a little, then shows the last one
        t0 = time.monotonic()
        fams = _families(http_get(f"http://127.0.0.1:{port}/metrics")[1])
        assert time.monotonic() - t0 >= 0.4 and len(taken) == 1
        assert [s.value for s in fams["policyc_decisions"]] == [1.0]
        server.refresh()                       # the loop's next turn answers the scrape that gave up
        assert len(taken) == 2
        server.refresh()                       # no scrape waiting: the loop's turn costs a flag test
        assert len(taken) == 2
        record_activation({"policy": {"name": "p"}, "content_hash": "sha256:ab", "target": {"arch": "arm64"}},
                          "success")
        record_activation(None, "failure")
        fams = _families(http_get(f"http://127.0.0.1:{port}/metrics")[1])
        assert [s.labels for s in fams["policyc_plan_info"]] == [{"policy": "p", "plan_hash": "sha256:ab",
                                                                  "target": "arm64"}]
        assert {s.labels["result"]: s.value for s in fams["policyc_plan_activations"]} == {"success": 1, "failure": 1}
        assert http_get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    finally:
        server.close()
    record_activation(None, "failure")         # no server: nothing to count, no error


@pytest.mark.parametrize("text", ["9464", "host:", ":99999", "a:b"])
def test_a_bad_metrics_address_is_one_usage_line(text):
    with pytest.raises(ValueError):
        parse_address(text)
    p = subprocess.run([sys.executable, "-m", "policyc", "run", str(KERNEL_INTEGRITY), "--guest", "simhost:/nowhere",
                        "--metrics", text], capture_output=True, text=True)
    assert p.returncode == 2 and "expected ADDR:PORT" in p.stderr and "Traceback" not in p.stderr


def test_metrics_need_a_guest_that_keeps_running():
    p = subprocess.run([sys.executable, "-m", "policyc", "run", "--guest", "sim:rootkit-hooks-syscall-table",
                        "--metrics", "127.0.0.1:0"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "simhost: or xen:" in p.stderr


@pytest.mark.parametrize("ending", ["stop", "teardown only"])
def test_requests_teardown_releases_undecided_are_counted_as_events_lost(tmp_path, ending):
    """A request that arrives after the enforcer's last batch is released by teardown with no decision:
    `policyc_events_lost_total{reason="teardown"}` counts it. `stop()` answers the ring first, so
    there it is decided and nothing is lost."""
    from policyc.plan_source import load_plan_source
    from policyc.runtime.enforce import Enforcer
    from policyc.runtime.metrics import take_snapshot
    from policyc.runtime.sim.scenario import ScenarioRunner, build_scenario, load_scenario

    scenario = load_scenario(ROOT / "examples" / "scenarios" / "rootkit-hooks-syscall-table.yaml")
    xen = build_scenario(scenario)
    compiled = load_plan_source(str(KERNEL_INTEGRITY), None)
    enf = Enforcer(compiled.plan, xen, compiled.symbols, guest="lost", state_dir=tmp_path)
    enf.start()
    server = MetricsServer(("127.0.0.1", 0))
    port = server.start()
    try:
        server.serve_snapshots(lambda: take_snapshot(enf, xen))
        ScenarioRunner(scenario, xen).start_step(scenario.steps[0])     # the table write traps
        assert xen.paused_vcpus() == {0}
        if ending == "stop":
            assert enf.stop() == []
        else:
            assert enf.installation.teardown() == []         # the loop never took it
        assert xen.paused_vcpus() == frozenset()
        server.refresh(now=True)
        fams = _families(http_get(f"http://127.0.0.1:{port}/metrics")[1])
        lost = {s.labels["reason"]: s.value for s in fams["policyc_events_lost"]}
        status = json.loads(http_get(f"http://127.0.0.1:{port}/status")[1])
    finally:
        server.close()
    if ending == "stop":
        assert enf.records == 1 and lost == {} and enf.events_lost == {}
    else:
        assert enf.records == 0 and lost == {"teardown": 1.0} and enf.events_lost == {"teardown": 1}
        assert status["events_lost"] == {"teardown": 1} and status["counters"]["events_lost"] == 1
