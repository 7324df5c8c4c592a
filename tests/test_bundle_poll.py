"""`policyc run --bundle URL` polls the URL while enforcing (runtime/bundle_poll.py).

Across processes, on loopback: a simulated host whose writers never stop attacking the system call
table, `policyc run --bundle URL --bundle-poll 0.1 --metrics` on it, and a static HTTP server
(tests/helpers.BundleServer) that publishes, in turn, an unchanged bundle (answered 304), a
tampered one, an expired one, an older revision replayed, nothing (down), a good bundle this host
cannot run, and a good new revision.
Every assertion is on what the run shows (its decision log, /status, /metrics, the kept bundle),
each waited for, never on how long it took. Then a restart with the server down enforces the last
good bundle at once.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="bundles need the 'cryptography' package (the bundle extra)")
prometheus_parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is not installed")

from helpers import BundleServer, flip_bit, http_get, start_simhost, tar_members, tar_of, wait_for
from policyc.bundle import Bundle, BundleError, BundleStore, build_bundle, verify_bundle
from policyc.cli import main
from policyc.runtime.bundle_poll import JITTER, BundlePoller

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "examples" / "policies"
PLAN_A = POLICIES / "linux-kernel-integrity.vmi"
PLAN_B = POLICIES / "reload" / "syscalls-only.vmi"
PLAN_ARM64 = POLICIES / "linux-arm64-integrity.vmi"
WRITERS = ROOT / "tests" / "data" / "scenarios" / "reload-writers.yaml"
NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Two compiled plans, both protecting the system call table, with their symbol files beside."""
    out = {}
    for name, policy in (("A", PLAN_A), ("B", PLAN_B), ("arm64", PLAN_ARM64)):
        d = tmp_path_factory.mktemp(f"plan{name}")
        text = policy.read_text()
        symbols = re.search(r'symbols "([^"]*)"', text)[1]
        (d / Path(symbols).name).write_bytes((policy.parent / symbols).read_bytes())
        source = d / policy.name                 # its symbol file beside it, as a bundle lays them out
        source.write_text(text.replace(f'"{symbols}"', f'"{Path(symbols).name}"'))
        assert main(["compile", str(source), "-o", str(d / "plan.json")]) == 0
        out[name] = d / "plan.json"
    return out


def _bundle(plans, keys, which: str, revision: int, *, days: float = 30.0) -> bytes:
    return build_bundle(plans[which], key_pem=keys[0], revision=revision, not_after=NOW + dt.timedelta(days=days))


def _plan_hash(plans, which: str) -> str:
    return json.loads(plans[which].read_text())["content_hash"]


def _tampered(raw: bytes) -> bytes:
    """The bundle with one bit of its signature flipped."""
    members = tar_members(raw)
    return tar_of({**members, "manifest.sig": flip_bit(members["manifest.sig"], 5)})


class _Run:
    """One `policyc run --bundle URL` on the simulated host, its stderr in a file."""

    def __init__(self, tmp_path: Path, name: str, url: str, trusted: Path, host_sock: str) -> None:
        self.err_path = tmp_path / f"{name}.err"
        self.log = tmp_path / f"{name}.jsonl"
        self.err_file = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "policyc", "run", "--bundle", url, "--trust", str(trusted),
             "--bundle-cache", str(tmp_path / "cache"), "--bundle-poll", "0.1", "--guest", f"simhost:{host_sock}",
             "--state-dir", str(tmp_path / "state"), "--log", str(self.log), "--metrics", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=self.err_file, text=True)
        wait_for(lambda: "metrics on http" in self.stderr() or self.proc.poll() is not None, what="the metrics line")
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", self.stderr())
        assert m, self.stderr()
        self.base = f"http://127.0.0.1:{m[1]}"
        wait_for(lambda: http_get(self.base + "/health")[0] == 200, what="protection")

    def stderr(self) -> str:
        return self.err_path.read_text()

    def status(self) -> dict:
        return json.loads(http_get(self.base + "/status")[1])

    def polls(self) -> dict:
        return self.status()["bundle"]["polls"]

    def metrics(self) -> dict:
        text = http_get(self.base + "/metrics")[1]
        return {f.name: f.samples for f in prometheus_parser.text_string_to_metric_families(text)}

    def decisions(self) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [r for r in map(json.loads, lines[:-1]) if "decision_id" in r]   # the last may be half-written

    def more_decisions(self, than: int) -> list[dict]:
        """Decisions after the first `than`, once there are some."""
        wait_for(lambda: len(self.decisions()) > than + 5, what="more decisions")
        return self.decisions()[than:]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.err_file.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.err_file.close()


def test_a_polled_bundle_url_refuses_bad_bundles_and_activates_a_good_new_revision(plans, bundle_keys, tmp_path):
    keys = bundle_keys
    from policyc.runtime.sim.host import connect

    trusted = tmp_path / "ci.pub"
    trusted.write_bytes(keys[1])
    scenario = tmp_path / "writers.yaml"
    scenario.write_text(WRITERS.read_text().replace("../../../examples/", f"{ROOT / 'examples'}/"))
    sock = str(tmp_path / "host.sock")
    hash_a, hash_b = _plan_hash(plans, "A"), _plan_hash(plans, "B")
    assert hash_a != hash_b
    server = BundleServer()
    server.body = _bundle(plans, keys, "A", 2)
    host_proc = start_simhost(scenario, sock)
    run = restarted = None
    try:
        host = connect(sock)
        run = _Run(tmp_path, "run", server.url, trusted, sock)
        assert "bundle revision 2 from" in run.stderr()
        host.start_workload()
        status = run.status()
        assert status["plan"]["plan_hash"] == hash_a and status["bundle"]["revision"] == 2

        # unchanged: each poll asks with the ETag it has, the server answers 304, nothing is downloaded
        wait_for(lambda: run.polls().get("not_modified", 0) >= 3, what="304s")
        assert server.statuses().count(200) == 1 and server.statuses()[1:4] == [304, 304, 304]
        assert all(asked is not None for asked, _ in server.answers[1:])

        seen = len(run.decisions())
        refusals = [("tampered", _tampered(_bundle(plans, keys, "B", 3)), "bad signature"),
                    ("expired", build_bundle(plans["B"], key_pem=keys[0], revision=4,
                                             not_after=NOW - dt.timedelta(seconds=1)), "expired"),
                    ("replayed", _bundle(plans, keys, "B", 1), "not newer than the active revision 2")]
        for n, (why, body, message) in enumerate(refusals, 1):
            fetched = server.statuses().count(200)
            server.body = body
            wait_for(lambda: run.polls().get("refused", 0) == n, what=why)
            status = run.status()
            assert message in status["bundle"]["last_error"], (why, status)
            assert status["plan"]["plan_hash"] == hash_a and status["bundle"]["revision"] == 2, why
            later = run.more_decisions(seen)                    # the old plan goes on deciding
            assert {d["plan_hash"] for d in later} == {hash_a} and all(d["verdict"] == "deny" for d in later), why
            seen += len(later)
            # the refused body is not fetched again: its ETag is asked for, and answered 304
            wait_for(lambda: server.answers[-1][1] == 304, what=f"a 304 after {why}")
            assert server.statuses().count(200) == fetched + 1, why
            assert run.polls()["refused"] == n, why
        assert BundleStore(tmp_path / "cache").load(keys[1]).revision == 2

        # the server down: polls fail and are retried; protection stays
        server.close()
        before = run.polls().get("unreachable", 0)
        wait_for(lambda: run.polls().get("unreachable", 0) >= before + 3, what="retries while down")
        assert http_get(run.base + "/health")[0] == 200 and run.status()["plan"]["plan_hash"] == hash_a
        later = run.more_decisions(seen)
        assert {d["plan_hash"] for d in later} == {hash_a}
        seen += len(later)

        # back, with a bundle that verifies but cannot be activated here (a plan for arm64 on this
        # x86_64 host): the reload fails before any switch, the old plan and bundle stay
        server = server.reopen()
        server.body = _bundle(plans, keys, "arm64", 4)
        wait_for(lambda: run.polls().get("new", 0) == 1, what="revision 4 fetched")
        wait_for(lambda: "did not activate" in (run.status()["bundle"]["last_error"] or ""), what="revision 4 tried")
        status = run.status()
        assert status["plan"]["plan_hash"] == hash_a and status["bundle"]["revision"] == 2
        assert "the plan is for arm64 but the host is x86_64" in status["bundle"]["last_error"]
        assert status["activations"] == {"success": 1, "failure": 1}
        later = run.more_decisions(seen)
        assert {d["plan_hash"] for d in later} == {hash_a}
        seen += len(later)
        assert BundleStore(tmp_path / "cache").load(keys[1]).revision == 2

        # a good new revision: verified, bound and switched to, kept as the last good one
        server.body = _bundle(plans, keys, "B", 5)
        wait_for(lambda: run.status()["bundle"]["revision"] == 5, what="revision 5 activated")
        status = run.status()
        assert status["plan"]["plan_hash"] == hash_b and status["bundle"]["last_error"] is not None
        fams = run.metrics()
        assert [s.labels for s in fams["policyc_plan_info"]] == \
            [{"policy": "syscalls-only", "plan_hash": hash_b, "target": "x86_64"}]
        assert {s.labels["result"]: s.value for s in fams["policyc_plan_activations"]} == \
            {"success": 2.0, "failure": 1.0}
        polls = {s.labels["result"]: s.value for s in fams["policyc_bundle_polls"]}
        assert polls["new"] == 2 and polls["refused"] == 3 and polls["unreachable"] >= 3 and polls["not_modified"] >= 3
        later = run.more_decisions(seen)
        assert later[-1]["plan_hash"] == hash_b and all(d["verdict"] == "deny" for d in later)
        assert BundleStore(tmp_path / "cache").load(keys[1]).revision == 5
        assert "bundle revision 5: reloaded" in run.stderr()
        assert host.stop_workload()
        assert run.stop() == 0, run.stderr()
        assert "reloads: 1 applied, 1 failed" in run.stderr() and "teardown clean" in run.stderr()

        # every decision names the plan that made it: A until the one reload, B after
        records = [json.loads(line) for line in run.log.read_text().splitlines()]
        reloads = [r for r in records if r.get("record") == "reload"]
        assert [(r["result"], r["old_plan"], r["new_plan"]) for r in reloads] == \
            [("failed", hash_a, _plan_hash(plans, "arm64")), ("ok", hash_a, hash_b)]
        hashes = [r["plan_hash"] for r in records if "decision_id" in r]
        switch = hashes.index(hash_b)
        assert set(hashes[:switch]) == {hash_a} and set(hashes[switch:]) == {hash_b}

        # a restart with the server down enforces the last good bundle before asking the network
        server.close()
        restarted = _Run(tmp_path, "restart", server.url, trusted, sock)
        assert "the last good bundle, revision 5" in restarted.stderr()
        assert restarted.status()["plan"]["plan_hash"] == hash_b
        wait_for(lambda: restarted.polls().get("unreachable", 0) >= 1, what="a poll of the server that is down")
        assert restarted.stop() == 0, restarted.stderr()
        assert host.status()["paused_vcpus"] == [] and host.status()["error"] is None
    finally:
        for r in (run, restarted):
            if r is not None:
                r.kill()
        server.close()
        host_proc.terminate()
        host_proc.wait(10)


# --------------------------------------------------------------------------- in process

def test_the_poller_never_raises_jitters_its_waits_and_hands_over_only_newer_verified_bundles(plans, bundle_keys,
                                                                                               tmp_path):
    keys = bundle_keys
    active = verify_bundle(_bundle(plans, keys, "A", 2), trusted_pem=keys[1])
    answers: list = []

    def fetch(source, *, etag=None, timeout=30.0):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    draws = iter([0.0, 1.0, 0.5])
    poller = BundlePoller("http://bundles.invalid/b", keys[1], BundleStore(tmp_path), active, every=10.0,
                          fetch=fetch, rand=lambda: next(draws))
    assert [poller.next_wait() for _ in range(3)] == [10.0 * (1 - JITTER), 10.0 * (1 + JITTER), 10.0]
    answers += [BundleError("http://bundles.invalid/b: [Errno 111] Connection refused"), RuntimeError("odd server"),
                (None, '"e1"'), (active.raw, '"e1"'), (_bundle(plans, keys, "B", 1), '"e2"'),
                (_bundle(plans, keys, "B", 3), '"e3"'), (_bundle(plans, keys, "A", 4), '"e4"')]
    results = [poller.check_once() for _ in range(7)]
    assert results == ["unreachable", "unreachable", "not_modified", "unchanged", "refused", "new", "new"]
    assert poller.etag == '"e4"' and poller.status()["pending_revision"] == 4     # the newest waits
    assert "revision 1 is not newer than the active revision 2" in poller.status()["last_error"]
    answers.append((_bundle(plans, keys, "B", 3), '"e5"'))          # older than the one waiting
    assert poller.check_once() == "refused" and "revision 3 is not newer than the active revision 4" in \
        poller.status()["last_error"]
    assert poller.poll_counts() == {"unreachable": 2, "not_modified": 1, "unchanged": 1, "refused": 2, "new": 2}
    assert isinstance(active, Bundle) and poller.active is active      # nothing activates off the loop


def test_a_bundle_whose_install_failed_on_a_host_fault_is_tried_again_at_the_next_poll(plans, bundle_keys, tmp_path):
    """A verified bundle whose activation failed on a fault of the host mid-install (rolled back, the
    old plan enforcing) is fetched again and retried at the next poll: the server's 304 for the same
    ETag must not leave the host on the old revision until the bundle's bytes change. A bundle that
    cannot run here (bind, capability) is not retried: the same bytes would fail the same way."""
    from policyc.runtime.enforce import Enforcer
    from policyc.runtime.sim.chaos import InjectedFault
    from policyc.runtime.sim.scenario import build_scenario, load_scenario
    keys = bundle_keys
    active = verify_bundle(_bundle(plans, keys, "A", 2), trusted_pem=keys[1])
    served = {"B": (_bundle(plans, keys, "B", 3), '"e3"')}

    def fetch(source, *, etag=None, timeout=30.0):
        raw, tag = served["B"]
        return (None, tag) if etag == tag else (raw, tag)
    xen = build_scenario(load_scenario(ROOT / "examples" / "scenarios" / "rootkit-hooks-syscall-table.yaml"))
    unpacked = active.unpack(tmp_path / "active")
    from policyc.plan_source import load_plan_source
    a = load_plan_source(str(unpacked), None, symbols_dir=str(tmp_path / "active"))
    enf = Enforcer(a.plan, xen, a.symbols, guest="retry", state_dir=tmp_path / "state")
    enf.start()
    real, calls = xen.create_view, [0]

    def create_view_failing_once(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise InjectedFault("create_view", "injected", 12)
        return real(*args, **kwargs)
    xen.create_view = create_view_failing_once
    poller = BundlePoller("http://bundles.invalid/b", keys[1], BundleStore(tmp_path / "store"), active,
                          every=10.0, fetch=fetch)
    assert poller.check_once() == "new"
    first = poller.poll(enf)
    assert first is not None and not first.ok and first.stage == "install"
    assert enf.plan["content_hash"] == _plan_hash(plans, "A") and poller.active.revision == 2
    assert poller.check_once() == "new"               # fetched again, not a 304 for the ETag it had
    second = poller.poll(enf)
    assert second is not None and second.ok, second.describe()
    assert enf.plan["content_hash"] == _plan_hash(plans, "B") and poller.active.revision == 3
    assert poller.check_once() == "not_modified" and enf.stop() == []


def test_a_bad_poll_interval_is_one_usage_line(tmp_path, capsys):
    assert main(["run", "--bundle", "http://127.0.0.1:9/b", "--trust", str(tmp_path / "k.pub"), "--bundle-poll", "-1",
                 "--guest", f"simhost:{tmp_path / 'none.sock'}"]) == 2
    err = capsys.readouterr().err
    assert "--bundle-poll -1: a number of seconds" in err and "Traceback" not in err
