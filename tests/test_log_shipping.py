"""Logs that ship: `--log-format ocsf` events validate against the published OCSF 1.8.0 schema, and
`--syslog` delivers one RFC 5424 record per decision to a real rsyslog on loopback."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyc.runtime.log_shipping import ShipperProcess, pipe_for_log
from policyc.runtime.ocsf import OCSF_VERSION, OcsfContext, ocsf_events
from policyc.runtime.syslog_sink import parse_syslog_address, rfc5424

from helpers import run_storm_on_simhost

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "examples" / "scenarios"
# mem_access with alerts and denies; a remap (rebind records); every other kind of trap; audit mode
OCSF_RUNS = [("rootkit-hooks-syscall-table.yaml", []), ("rootkit-remaps-syscall-table.yaml", []),
             ("linux-descriptors-and-msrs.yaml", []), ("guest-agent-and-probes.yaml", []),
             ("linux-exec-from-data.yaml", ["--audit"])]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "policyc", "run", *args], capture_output=True, text=True, cwd=ROOT)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# =========================================================================== OCSF

@pytest.fixture(scope="module")
def ocsf_schemas():
    """JSON Schemas (draft 2020-12) for the classes policyc writes, generated from the OCSF 1.8.0
    schema (as schema.ocsf.io exports it) that the `ocsf-json-schema` package ships."""
    lib = pytest.importorskip("ocsf_json_schema", reason="ocsf-json-schema is not installed (pip install "
                                                          "'policyc[test]')")
    from jsonschema import Draft202012Validator

    schema = lib.OcsfJsonSchemaEmbedded(lib.get_ocsf_schema(version=OCSF_VERSION))
    out = {}
    for uid, name in ((1004, "memory_activity"), (2004, "detection_finding"), (0, "base_event")):
        cls = schema.get_class_schema(class_name=name, profiles=["host", "security_control"])
        Draft202012Validator.check_schema(cls)
        out[uid] = Draft202012Validator(cls)
    return out


@pytest.mark.parametrize("scenario,flags", OCSF_RUNS, ids=[s for s, _f in OCSF_RUNS])
def test_ocsf_events_validate_and_say_what_the_decision_log_says(tmp_path, ocsf_schemas, scenario, flags):
    jsonl, ocsf = tmp_path / "log.jsonl", tmp_path / "log.ocsf.jsonl"
    p = _run("--guest", f"sim:{SCENARIOS / scenario}", "--log", str(jsonl), *flags)
    assert p.returncode in (0, 1), p.stderr
    q = _run("--guest", f"sim:{SCENARIOS / scenario}", "--log", str(ocsf), "--log-format", "ocsf", *flags)
    assert q.returncode == p.returncode, q.stderr
    records, events = _records(jsonl), _records(ocsf)
    for e in events:
        errors = sorted(ocsf_schemas[e["class_uid"]].iter_errors(e), key=str)
        assert not errors, (e, [x.message for x in errors[:3]])
    decisions = [r for r in records if "decision_id" in r]
    activity = [e for e in events if e["class_uid"] != 2004 and "decision_id" in e["unmapped"]["policyc"]]
    findings = [e for e in events if e["class_uid"] == 2004]
    # one activity event per decision, one finding per alert, in the same order (ids differ per run)
    assert [(r["kind"], r["rule"], r["verdict"], r["would_deny"]) for r in decisions] == \
        [tuple(e["unmapped"]["policyc"].get(k) for k in ("kind", "rule", "verdict", "would_deny")) for e in activity]
    alerts = [(m["rule"], m["message"]) for r in decisions for m in r.get("messages", ()) if m["kind"] == "alert"]
    assert [(f["finding_info"]["analytic"]["name"], f["finding_info"]["title"]) for f in findings] == alerts
    assert len([e for e in events if "record" in e["unmapped"]["policyc"]]) == \
        len([r for r in records if "record" in r])
    for e, r in zip(activity, decisions):
        assert e["class_uid"] == (1004 if r["kind"] == "mem_access" else 0)
        assert e["policy"]["uid"] == r["plan_hash"] and e["policy"]["name"] == q.stdout.split()[1]
        assert (e["action_id"], e["disposition_id"]) == \
            ((1, 15) if r["would_deny"] else (2, 2) if r["verdict"] == "deny" else (1, 1))
    assert findings or "hooks" not in scenario


def test_memory_activity_fields_and_the_guest_uuid():
    rec = {"decision_id": "a.b.7", "time": "2026-12-07T00:39:04.283501Z", "plan_hash": "sha256:ab",
           "kind": "mem_access", "vcpu": 3, "rule": "protect_tables", "rules": ["protect_tables"], "verdict": "deny",
           "would_deny": False, "event": {"access": 2, "gfn": "0x3e00", "offset": "0x538", "gla_valid": 0},
           "messages": [{"kind": "alert", "severity": "high", "rule": "protect_tables", "message": "m"}]}
    ctx = OcsfContext("kernel-integrity", "xen:web1", "0c5b2b6e-1111-2222-3333-444455556666", "0.1.0")
    activity, finding = ocsf_events(rec, ctx)
    assert (activity["class_uid"], activity["activity_id"], activity["type_uid"]) == (1004, 8, 100408)
    assert activity["base_address"] == hex(0x3e00 << 12 | 0x538)          # no linear address: the physical one
    assert activity["device"] == {"type_id": 6, "type": "Virtual", "name": "xen:web1",
                                  "uid": "0c5b2b6e-1111-2222-3333-444455556666"}
    when = datetime.datetime(2026, 12, 7, 0, 39, 4, 283501, tzinfo=datetime.timezone.utc)
    assert activity["time"] == int(when.timestamp() * 1000) and activity["severity_id"] == 4
    assert activity["process"]["uid"] == "vcpu:3"
    assert finding["finding_info"]["uid"] == "a.b.7#0" and finding["severity_id"] == 4
    assert finding["metadata"]["version"] == OCSF_VERSION == "1.8.0"


def test_ocsf_needs_a_log_file():
    p = _run("--guest", "sim:rootkit-hooks-syscall-table", "--log-format", "ocsf")
    assert p.returncode == 2 and "--log-format ocsf formats the --log FILE" in p.stderr


# =========================================================================== syslog

def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rsyslog(tmp_path):
    """rsyslogd in the foreground with a configuration of this test's own: UDP and TCP inputs on
    loopback, every record written as 'MSGID SD MSG' to a file."""
    daemon = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)
    if daemon is None:
        print("SKIP: rsyslogd is not installed (apt-get install rsyslog)")
        pytest.skip("rsyslogd is not installed (apt-get install rsyslog)")
    udp, tcp = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    work = tmp_path / "rsyslog"
    work.mkdir()
    out = work / "out.log"
    conf = work / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
template(name="rec" type="list") {{
    property(name="msgid") constant(value=" ") property(name="structured-data") constant(value=" ")
    property(name="msg") constant(value="\\n")
}}
ruleset(name="policyc") {{ action(type="omfile" file="{out}" template="rec") }}
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="policyc")
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="policyc")
""")
    check = subprocess.run([daemon, "-N1", "-f", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([daemon, "-n", "-f", str(conf), "-i", str(work / "pid")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "rsyslogd did not start"
            time.sleep(0.05)
    yield {"udp": udp, "tcp": tcp, "out": out}
    proc.terminate()
    proc.wait(10)


def _received(out: Path, want: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = out.read_text().splitlines() if out.exists() else []
        if len(lines) >= want or time.monotonic() > deadline:
            time.sleep(0.3)                  # anything beyond `want` would show now
            return out.read_text().splitlines() if out.exists() else []
        time.sleep(0.05)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_rsyslog_receives_one_rfc5424_record_per_decision(tmp_path, rsyslog, transport):
    log = tmp_path / "log.jsonl"
    scenario = SCENARIOS / "rootkit-remaps-syscall-table.yaml"
    p = _run("--guest", f"sim:{scenario}", "--log", str(log), "--syslog",
             f"{transport}://127.0.0.1:{rsyslog[transport]}")
    assert p.returncode == 0, p.stderr
    records = _records(log)
    assert len(records) >= 5
    got = _received(rsyslog["out"], len(records))
    assert len(got) == len(records), got
    received = []
    for line in got:
        msgid, _sp, rest = line.partition(" ")
        sd, _sp, msg = rest.partition("] ")
        rec = json.loads(msg.strip())
        received.append(rec)
        assert msgid == (rec.get("kind") or rec.get("record"))
        assert sd.startswith("[policyc@32473 policy=\"linux-kernel-integrity\"")
        assert f'plan_hash="{rec["plan_hash"]}"' in sd and 'guest="sim:' in sd
    assert received == records                     # every record, whole, in order


def test_the_rfc5424_header_and_structured_data():
    rec = {"decision_id": "x.1", "time": "2026-12-07T00:39:04.283501Z", "plan_hash": "sha256:ab", "kind": "mem_access",
           "rule": 'we"ird]\\', "verdict": "allow", "would_deny": True,
           "messages": [{"kind": "alert", "severity": "high", "rule": "r", "message": "m"}]}
    msg = rfc5424(rec, json.dumps(rec), hostname="h1", pid=42, policy="p", guest="xen:web1").decode()
    assert msg.startswith("<131>1 2026-12-07T00:39:04.283501Z h1 policyc 42 mem_access [policyc@32473 "
                          'policy="p" rule="we\\"ird\\]\\\\" verdict="would_deny" plan_hash="sha256:ab" '
                          'guest="xen:web1"] {')        # local0 (16) * 8 + error (3): a high alert
    assert parse_syslog_address("10.0.0.1:514") == ("udp", "10.0.0.1", 514)
    assert parse_syslog_address("tcp://[::1]:6514") == ("tcp", "::1", 6514)
    for bad in ("syslog.example", "tls://h:1", "udp://h:0", "h:x"):
        with pytest.raises(ValueError):
            parse_syslog_address(bad)


def test_a_syslog_daemon_that_is_not_there_is_a_usage_error_for_tcp():
    port = _free_port(socket.SOCK_STREAM)
    p = _run("--guest", "sim:rootkit-hooks-syscall-table", "--syslog", f"tcp://127.0.0.1:{port}")
    assert p.returncode == 2 and "cannot reach the syslog daemon" in p.stderr and "Traceback" not in p.stderr


def test_a_syslog_daemon_that_stops_reading_costs_counted_drops_never_a_wait():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    read_end, writer = pipe_for_log()         # what the native engine writes the records to
    sink = ShipperProcess({"input": {"fd": read_end}, "outputs": [
        {"kind": "syslog", "address": f"tcp://127.0.0.1:{port}", "policy": "p", "guest": "g", "pid": 1}]},
        pass_fds=(read_end,), writer=writer)
    os.close(read_end)
    conn, _addr = server.accept()          # accepted, never read: the socket's buffers fill, then the queue
    record = {"decision_id": "x.1", "time": "2026-12-07T00:39:04.283501Z", "plan_hash": "sha256:ab",
              "kind": "mem_access", "rule": "r", "verdict": "deny", "would_deny": False, "pad": "x" * 200}
    batch = (json.dumps(record) + "\n") * 64
    t0 = time.monotonic()
    for _ in range(4000):                  # 256,000 records, about 80 MB
        writer.write(batch)
        writer.flush()
    assert time.monotonic() - t0 < 20      # the writer (the answering loop) never waited for the daemon
    conn.close()
    server.close()                         # the daemon is gone: what the child still holds fails fast
    sink.close()
    assert sink.failures["syslog_queue_full"] > 0
    assert sink.delivered + sum(sink.failures.values()) == 4000 * 64
    assert sink.failures["syslog_send"] > 0 and "cannot send to tcp://127.0.0.1" in sink.last_error


def test_ocsf_to_standard_output(tmp_path):
    p = _run("--guest", "sim:rootkit-hooks-syscall-table", "--log", "-", "--log-format", "ocsf")
    assert p.returncode == 0, p.stderr
    events = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert {1004, 2004} <= {e["class_uid"] for e in events}


def test_records_that_could_not_be_shipped_are_said_and_fail_the_run():
    port = _free_port(socket.SOCK_DGRAM)          # nobody listens: the sends after the first are refused
    p = _run("--guest", "sim:rootkit-remaps-syscall-table", "--syslog", f"udp://127.0.0.1:{port}")
    assert p.returncode == 1, p.stdout + p.stderr
    line = next(l for l in p.stdout.splitlines() if l.startswith("NOT RECORDED:"))
    assert "record(s) not shipped (syslog_send " in line and "Connection refused" in line


def test_syslog_follows_the_log_file_across_rotations_under_a_storm(tmp_path, rsyslog):
    log = tmp_path / "log.jsonl"
    log.write_text('{"decision_id":"an older run"}\n')      # the shipper starts where the log ends
    requests = run_storm_on_simhost(tmp_path, 300, ["--log", str(log), "--log-rotate-size", "64K", "--log-keep",
                                                    "1000", "--syslog", f"tcp://127.0.0.1:{rsyslog['tcp']}"])
    assert len(list(tmp_path.glob("log.jsonl.*"))) >= 3
    got = _received(rsyslog["out"], requests)
    ids = [json.loads(line.partition("] ")[2])["decision_id"] for line in got]
    assert len(ids) == len(set(ids)) == requests and "an older run" not in ids
