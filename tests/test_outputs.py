"""The enforcer's output streams (decision log, alert stream, trace) when they cannot be written.

A full disk, a device that refuses writes, two outputs on one file, an output on an input: the run
goes on answering every request, says which stream failed, ends with a summary and exit 1, and a
regular file ends at its last whole record.
"""

from __future__ import annotations

import errno
import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from policyc.cli import main
from policyc.runtime.output_file import OutputError, OutputFile

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"
SCENARIO = ROOT / "examples" / "scenarios" / "rootkit-hooks-syscall-table.yaml"
FULL = "/dev/full"
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full on this host")


def cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    text = out.getvalue() + err.getvalue()
    assert "Traceback" not in text
    return code, text


def run(*flags: str) -> tuple[int, str]:
    return cli("run", str(POLICY), "--guest", f"sim:{SCENARIO}", *flags)


@needs_dev_full
@pytest.mark.parametrize("flag, stream", [
    ("--log", "the decision log '/dev/full'"),
    ("--alerts", "the alert stream '/dev/full'"),
    ("--record", "the trace '/dev/full'"),
])
def test_an_output_on_a_full_device_is_named_and_the_run_still_answers_everything(flag, stream):
    code, text = run(flag, FULL)
    assert code == 1
    assert f"{stream} cannot be written: No space left on device" in text
    assert "requests 4, responses 4" in text and "the domain is as it was before install" in text
    assert "NOT RECORDED: " in text
    if flag == "--alerts":
        assert "decision log" not in text.split("NOT RECORDED")[0]


def test_a_clean_run_records_everything_and_exits_0(tmp_path):
    code, text = run("--log", str(tmp_path / "d.jsonl"), "--alerts", str(tmp_path / "a.jsonl"),
                     "--record", str(tmp_path / "t.trace"))
    assert code == 0 and "NOT RECORDED" not in text
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 4
    assert all(json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines())


@pytest.mark.parametrize("flags, message", [
    (("--log", "{tmp}/x", "--record", "{tmp}/x"), "--record and --log name the same file"),
    (("--log", "{tmp}/x", "--alerts", "{tmp}/x"), "--alerts and --log name the same file"),
    (("--log", str(POLICY)), "is the input file"),
    (("--record", str(POLICY)), "is the input file"),
    (("--alerts", str(SCENARIO)), "is the input file"),
])
def test_outputs_on_one_file_or_on_an_input_are_refused_before_anything_runs(tmp_path, flags, message):
    before = POLICY.read_bytes(), SCENARIO.read_bytes()
    code, text = run(*(f.format(tmp=tmp_path) for f in flags))
    assert code == 2 and message in text
    assert (POLICY.read_bytes(), SCENARIO.read_bytes()) == before
    assert "bound:" not in text


def test_two_streams_may_share_a_device(tmp_path):
    code, text = run("--log", os.devnull, "--alerts", os.devnull)
    assert code == 0, text


def test_a_disk_that_fills_mid_write_leaves_the_last_whole_record(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    out = OutputFile(path, "the decision log")
    out.write('{"n": 1}\n')
    out.flush()
    real_write = os.write
    calls = []

    def filling(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:5]))      # part of the record lands...
        raise OSError(errno.ENOSPC, "No space left on device")   # ...then the disk is full

    monkeypatch.setattr(os, "write", filling)
    out.write('{"n": 2}\n{"n": 3}\n')
    with pytest.raises(OutputError) as err:
        out.flush()
    assert err.value.stream == "the decision log" and "No space left on device" in str(err.value)
    assert path.read_text() == '{"n": 1}\n'
    with pytest.raises(OutputError):
        out.write('{"n": 4}\n')      # broken: the caller counts what is lost
    out.flush()                       # never raises again
    out.close()
    assert path.read_text() == '{"n": 1}\n'


def test_replay_with_its_log_on_a_full_device_is_one_line(tmp_path):
    trace = tmp_path / "t.trace"
    assert run("--record", str(trace))[0] == 0
    if not os.path.exists(FULL):
        pytest.skip("no /dev/full on this host")
    code, text = cli("replay", str(trace), "--policy", str(POLICY), "--log", FULL)
    assert code == 2 and "the decision log '/dev/full' cannot be written" in text
    code, text = cli("replay", str(trace), "--policy", str(POLICY), "--log", str(trace))
    assert code == 2 and "is the input file" in text


@needs_dev_full
@pytest.mark.parametrize("mode, verdicts, requests", [
    ("fail-closed", "allow 1, deny 3, would deny 0", 4),        # the policy still denies
    ("allow-and-count", "allow 1, deny 1, would deny 2", 4),    # denies after the failure are allowed
    ("stop", "allow 0, deny 1, would deny 0", 1),               # torn down after the failing batch
])
def test_each_log_failure_mode_answers_every_request_and_leaves_nothing_paused(mode, verdicts, requests):
    code, text = run("--log", FULL, "--on-log-failure", mode)
    assert code == 1
    assert f"requests {requests}, responses {requests}" in text
    assert "teardown: the domain is as it was before install" in text     # no vCPU left paused
    assert verdicts in text
    assert f"NOT RECORDED: {requests} decision(s) answered but not recorded" in text
    assert ("STOPPED after step 0 of 6 (--on-log-failure stop)" in text) == (mode == "stop")


def test_the_default_mode_is_fail_closed():
    from policyc.runtime.enforce import Enforcer
    assert Enforcer.on_log_failure == "fail-closed"
    code, text = cli("run", "--help")
    assert "fail-closed (default)" in " ".join(text.split())
