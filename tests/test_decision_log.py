"""The decision log and alert stream (runtime/decision_log.py).

Decisions come from the real engine over a compiled plan and requests laid
out as Xen lays them out (`abi.make_request`); the binding is a fixed one
(the frames of Debian 12's sys_call_table with no KASLR slide).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan
from policyc.native import abi
from policyc.runtime.decide import DecisionEngine, Message
from policyc.runtime.decision_log import (DecisionLog, Histogram, Progress, escape_guest, progress_line,
                                          render_template)
from helpers import reads_missing_field

REPO = Path(__file__).resolve().parents[1]
MAP = REPO / "examples" / "policies" / "linux-6.1.System.map"
F = abi.Flag
MA = abi.MemAccess
RS = abi.Reason
PAUSED = int(F.VCPU_PAUSED)

TABLE = 0xFFFFFFFF82000360          # sys_call_table, unslid
TABLE_PA = 0x2000360                # where a slide-0 kernel has it (LOAD_PHYSICAL_ADDR + offset)
LSTAR_OK = 0xFFFFFFFF81C00080       # entry_SYSCALL_64

POLICY = """policy "logged" {
    target xen >= 4.17 on x86_64
    symbols "linux-6.1.System.map"
    mode MODE
    region syscalls = symbol sys_call_table size 8 * 451
    rule protect_tables: on write to syscalls {
        deny
        alert critical "dispatch table write at {gla:#x} from {rip:#x}"
    }
    rule watch_reads: on read of syscalls {
        log info "table read at {gla:#x}"
    }
    rule syscall_entry_guard: on write msr LSTAR where new != symbol entry_SYSCALL_64 {
        deny
        alert critical "LSTAR hijack to {new:#x}"
    }
    rule odd: on guest_request where r15 == 1 {
        log low "never: Xen's request carries no CSTAR"
    }
}
"""



def compile_policy(tmp_path: Path, mode: str = "enforce") -> dict:
    shutil.copy(MAP, tmp_path / MAP.name)
    path = tmp_path / "logged.vmi"
    path.write_text(POLICY.replace("MODE", mode), encoding="utf-8")
    d = Diagnostics()
    policy = check_policy(path, d)
    assert policy is not None, [str(x) for x in d.items]
    plan = compile_plan(policy, d)
    assert plan is not None, [str(x) for x in d.items]
    return reads_missing_field(plan, "r15", "msr_cstar")


class StaticBinding:
    slide = 0

    def region_frames(self, name: str) -> list[tuple[int, int, int]]:
        assert name == "syscalls"
        end = TABLE_PA + 8 * 451 - 1
        return [(TABLE_PA >> 12, TABLE_PA & 0xFFF, 0xFFF), (end >> 12, 0, end & 0xFFF)]

    def percpu_base(self, vcpu: int) -> int:
        return 0

    def breakpoint_sites(self) -> dict[int, str]:
        return {}

    def in_region(self, name: str, address: int) -> bool:
        return TABLE <= address < TABLE + 8 * 451


def mem(offset_from_table: int, flags: int, vcpu: int = 0):
    pa, va = TABLE_PA + offset_from_table, TABLE + offset_from_table
    return abi.make_request(RS.MEM_ACCESS, vcpu, flags=PAUSED | F.ALTERNATE_P2M, altp2m_idx=2,
                            payload={"gfn": pa >> 12, "offset": pa & 0xFFF, "gla": va,
                                     "flags": flags | MA.GLA_VALID | MA.FAULT_WITH_GLA},
                            regs={"rip": 0xFFFFFFFFC0000010, "cr3": 0x1234000})


def lstar(value: int):
    return abi.make_request(RS.MOV_TO_MSR, 1, flags=PAUSED,
                            payload={"msr": 0xC0000082, "new_value": value, "old_value": LSTAR_OK},
                            regs={"rip": 0xFFFFFFFF81000100})


@pytest.fixture
def plan(tmp_path):
    return compile_policy(tmp_path)


@pytest.fixture
def engine(plan):
    return DecisionEngine(plan, StaticBinding(), id_prefix="t")


def batch(engine) -> list:
    reqs = [mem(8 * 59, MA.W | MA.R), mem(-0x100, MA.W | MA.R), mem(16, MA.R), lstar(0xFFFFFFFFC0002000),
            lstar(LSTAR_OK), abi.make_request(RS.GUEST_REQUEST, 0, flags=PAUSED)]
    return engine.decide_batch([r.raw for r in reqs])


def test_records_are_json_lines_one_per_decision(plan, engine):
    out, alerts = io.StringIO(), io.StringIO()
    log = DecisionLog(out, alerts, plan["content_hash"])
    pairs = batch(engine)
    assert log.write_batch(pairs) == len(pairs)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(pairs)
    recs = [json.loads(line) for line in lines]
    assert [r["decision_id"] for r in recs] == [d.id for _, d in pairs]
    assert len({r["decision_id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["plan_hash"] == plan["content_hash"] and r["time"].endswith("Z")
        assert {"rule", "rules", "verdict", "would_deny", "collateral", "event", "response_flags"} <= r.keys()
    deny, collateral, read, hijack, fine, gr = recs
    assert deny["rule"] == "protect_tables" and deny["verdict"] == "deny" and deny["would_deny"] is False
    assert deny["response"] == "deny:write" and deny["response_flags"] == ["VCPU_PAUSED", "EMULATE", "EMULATE_NOWRITE"]
    assert deny["event"] == {"vcpu": 0, "rip": "0xffffffffc0000010", "cr3": "0x1234000", "access": 3,
                             "gfn": hex(TABLE_PA >> 12), "offset": hex((TABLE_PA + 8 * 59) & 0xFFF),
                             "gla": hex(TABLE + 8 * 59), "gla_valid": 1, "in_gpt": 0}
    assert deny["messages"] == [{"kind": "alert", "severity": "critical", "rule": "protect_tables",
                                 "message": f"dispatch table write at {TABLE + 8 * 59:#x} from 0xffffffffc0000010"}]
    assert collateral["collateral"] is True and collateral["rule"] is None and collateral["verdict"] == "allow"
    assert read["rule"] == "watch_reads" and read["verdict"] == "allow"
    assert hijack["kind"] == "mov_to_msr" and hijack["event"]["new"] == "0xffffffffc0002000"
    assert hijack["response_flags"] == ["VCPU_PAUSED", "DENY"] and hijack["vcpu"] == 1
    assert fine["rules"] == [] and fine["verdict"] == "allow"
    assert gr["errors"] and "msr_cstar" in gr["errors"][0]


def test_a_guest_controlled_value_cannot_forge_a_record(plan, engine):
    out = io.StringIO()
    log = DecisionLog(out, None, plan["content_hash"])
    _r, d = engine.decide(lstar(0xFFFFFFFFC0002000).raw)
    forged = '\n{"verdict":"allow","decision_id":"x"}'
    d.event["comm"] = forged                                   # e.g. a task name read from the guest
    d.event["path"] = b"/tmp/\r\n\x1b[2K\xff\\x41"
    d.event["bidi"] = "a\u2028b\u202ec"
    d.messages.append(Message("log", "info", "syscall_entry_guard", 0, "task {comm} path {path} {bidi}"))
    log.write([d])
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["verdict"] == "deny"
    message = rec["messages"][-1]["message"]
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert message == ('task \\x0a{"verdict":"allow","decision_id":"x"} '
                       'path /tmp/\\x0d\\x0a\\x1b[2K\\xff\\\\x41 a\\u2028b\\u202ec')
    # escaping is unambiguous: a literal backslash in the value cannot imitate an escape
    assert escape_guest("\\x0a") == "\\\\x0a" and escape_guest("\n") == "\\x0a"


def test_templates_render_numbers_as_the_spec_says():
    ev = {"gla": 0xFFFFFFFF82000360, "vcpu": 3, "name": "x\ny"}
    assert render_template("at {gla:#x} on vcpu {vcpu}", ev) == "at 0xffffffff82000360 on vcpu 3"
    assert render_template("{name:#x} {missing}", ev) == "x\\x0ay <missing?>"
    assert render_template("{gla:08x}", {"gla": 0x10}) == "00000010"


def test_alerts_go_to_their_own_stream_too(plan, engine):
    out, alerts = io.StringIO(), io.StringIO()
    log = DecisionLog(out, alerts, plan["content_hash"])
    pairs = batch(engine)
    log.write_batch(pairs)
    recs = [json.loads(x) for x in out.getvalue().splitlines()]
    alert_recs = [json.loads(x) for x in alerts.getvalue().splitlines()]
    expected = [(r["decision_id"], m["rule"], m["message"]) for r in recs for m in r.get("messages", ())
                if m["kind"] == "alert"]
    assert [(a["decision_id"], a["rule"], a["message"]) for a in alert_recs] == expected
    assert {a["rule"] for a in alert_recs} == {"protect_tables", "syscall_entry_guard"}
    assert all(a["severity"] == "critical" and a["plan_hash"] == plan["content_hash"] for a in alert_recs)
    # logs are not alerts
    assert not any(a["rule"] == "watch_reads" for a in alert_recs)


def test_each_batch_is_on_disk_when_write_returns(tmp_path, plan, engine):
    path, apath = tmp_path / "log" / "decisions.jsonl", tmp_path / "log" / "alerts.jsonl"
    log = DecisionLog(path, apath, plan["content_hash"], fsync=True)
    first = batch(engine)
    log.write_batch(first)
    # read back through another file object while the log is still open: nothing is buffered
    assert len(path.read_text().splitlines()) == len(first)
    assert len(apath.read_text().splitlines()) == 2
    log.write_batch(batch(engine))
    assert len(path.read_text().splitlines()) == 2 * len(first)
    log.close()
    # appending, not truncating, when a log is reopened
    with DecisionLog(path, apath, plan["content_hash"]) as again:
        again.write_batch(batch(engine))
    assert len(path.read_text().splitlines()) == 3 * len(first)


def test_summary_counts_equal_decisions(plan, engine):
    out = io.StringIO()
    log = DecisionLog(out, None, plan["content_hash"])
    n = 0
    for _ in range(5):
        pairs = batch(engine)
        log.write_batch(pairs)
        n += len(pairs)
    s = log.stats
    assert s.decisions == n == len(out.getvalue().splitlines())
    assert sum(s.verdicts.values()) == n and sum(s.by_kind.values()) == n
    assert s.verdicts["deny"] == 10 and s.collateral == 5 and s.alerts == 10 and s.errors == 5
    assert s.rules["protect_tables"].matches == 5 and s.rules["protect_tables"].deny == 5
    assert s.rules["syscall_entry_guard"].alerts == 5 and s.rules["watch_reads"].logs == 5
    assert s.rules["odd"].errors == 5
    assert s.latency.count == n
    text = log.summary()
    assert text.startswith(f"decisions: {n} ")
    assert "deny 10" in text and "collateral 5" in text and "protect_tables" in text
    assert "latency histogram" in text
    assert str(n) in progress_line(s)


def test_audit_records_would_deny(tmp_path):
    plan = compile_policy(tmp_path, "audit")
    engine = DecisionEngine(plan, StaticBinding())
    out = io.StringIO()
    log = DecisionLog(out, None, plan["content_hash"])
    pairs = engine.decide_batch([mem(0, MA.W | MA.R).raw])
    log.write_batch(pairs)
    rec = json.loads(out.getvalue())
    assert rec["verdict"] == "deny" and rec["would_deny"] is True and rec["response"] == "allow"
    assert rec["response_flags"] == ["VCPU_PAUSED", "ALTERNATE_P2M", "FAST_SINGLESTEP"]
    assert log.stats.verdicts == {"would_deny": 1}
    assert log.stats.rules["protect_tables"].would_deny == 1


def test_latency_histogram_log2_buckets():
    h = Histogram()
    for ns in (0, 1, 2, 3, 1000, 1023, 1024, 50_000):
        h.add(ns)
    assert h.count == 8 and h.max == 50_000
    assert h.buckets[0] == 1 and h.buckets[1] == 1 and h.buckets[2] == 2
    assert h.buckets[10] == 2 and h.buckets[11] == 1 and h.buckets[16] == 1
    assert h.percentile(50) == 3 and h.percentile(100) == (1 << 16) - 1
    assert Histogram().percentile(99) == 0


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_only_on_a_terminal(plan, engine):
    log = DecisionLog(io.StringIO(), None, plan["content_hash"])
    log.write_batch(batch(engine))
    plain = io.StringIO()
    p = Progress(plain)
    assert not p.update(log, force=True)
    p.finish()
    assert plain.getvalue() == ""
    tty = _Tty()
    p = Progress(tty, interval=3600)
    assert p.update(log)
    assert not p.update(log)                 # not due yet
    assert p.update(log, force=True)
    p.finish()
    text = tty.getvalue()
    assert text.startswith("\r6 decisions") and text.count("\r") == 2 and text.endswith("\n")
    assert "\n" not in text[:-1]


def test_progress_first_line_on_a_host_just_booted(plan, engine, monkeypatch):
    # time.monotonic() counts from boot: on a host up for less than the interval the first
    # update must still draw (it once compared against a start of 0.0 and drew nothing).
    import policyc.runtime.decision_log as dl
    log = DecisionLog(io.StringIO(), None, plan["content_hash"])
    log.write_batch(batch(engine))
    monkeypatch.setattr(dl.time, "monotonic", lambda: 5.0)
    p = Progress(_Tty(), interval=3600)
    assert p.update(log)
    assert not p.update(log)
