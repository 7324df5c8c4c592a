"""The scenario and trace loaders, and replay, on hostile or mismatched input: clear errors, no traceback.

The policy loader's bounds (policyc/yaml_form/compose.py: size, nodes, depth, alias expansion) hold for
scenarios too; loops and guest memory have their own; a trace is checked line by line and against
its own header; a replay under another policy names what the trace lacks.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from policyc.cli import main
from policyc.runtime.sim.scenario import MAX_LOOP_COUNT, ScenarioError, load_scenario_text
from policyc.runtime.trace import TraceError, read_trace

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "examples" / "policies"
MAP = POLICIES / "linux-6.1.System.map"
KERNEL_INTEGRITY = POLICIES / "linux-kernel-integrity.vmi"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    text = out.getvalue() + err.getvalue()
    assert "Traceback" not in text
    return code, out.getvalue(), err.getvalue()


def scenario(guest: str = "", steps: str = "  - {op: read, va: 0, size: 8}") -> str:
    return (f'scenario: s\nguest: {{layout: linux-x86_64, symbols: "{MAP}"{guest}}}\n'
            f"steps:\n{steps}\n")


def loop(count: str, inner: str = "      - {op: read, va: 0, size: 8}") -> str:
    return f"  - op: loop\n    count: {count}\n    steps:\n{inner}"


# --------------------------------------------------------------------------- scenarios

BILLION_LAUGHS = "".join(f"{n}: &{n} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
                         for p, n in zip([None, *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "expands to more than 200,000 YAML nodes"),
    ("steps: " + "[" * 5000 + "]" * 5000, "nesting is deeper than 64 levels"),
    ("a: " + "{b: " * 3000 + "1" + "}" * 3000, "nesting is deeper than 64 levels"),
    (scenario(", memory: 1T"), "guest.memory: 1T is outside 1 byte .. 8G"),
    (scenario(", memory: 0"), "guest.memory: 0 is outside"),
    (scenario(steps=loop("1000000000")), "count 1000000000 is outside 1..1,000,000"),
    (scenario(steps=loop("-5")), "count -5 is outside 1..1,000,000"),
    (scenario(steps=loop("0")), "count 0 is outside"),
    (scenario(steps=loop(str(10 ** 400))), "count of 401 digits is outside"),
    (scenario(steps=loop("2000", "      - op: loop\n        count: 2000\n        steps:\n"
                                 "          - {op: read, va: 0, size: 8}")),
     "nested loops run 4,000,000 iterations; at most 1,000,000"),
])
def test_hostile_scenarios_are_refused_quickly(text, message):
    started = time.monotonic()
    with pytest.raises(ScenarioError) as err:
        load_scenario_text(text, "s.yaml")
    assert message in str(err.value)
    assert time.monotonic() - started < 5


def test_a_loop_count_computed_at_run_time_is_bounded_too(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(scenario(steps=loop('"0 - 5"')).replace("scenario: s",
                                                            f"scenario: s\npolicy: {KERNEL_INTEGRITY}"))
    code, _out, err = cli("run", "--guest", f"sim:{path}")
    assert code == 2 and "loop: count 18446744073709551611 is outside 1..1,000,000" in err


def test_the_largest_loop_loads():
    assert load_scenario_text(scenario(steps=loop(str(MAX_LOOP_COUNT))), "s.yaml").steps[0].op == "loop"


# --------------------------------------------------------------------------- traces

@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    trace = tmp_path_factory.mktemp("trace") / "t.trace"
    code, _out, err = cli("run", str(KERNEL_INTEGRITY), "--guest", "sim:rootkit-hooks-syscall-table",
                          "--record", str(trace))
    assert code == 0, err
    return trace


def _edited(recording: Path, tmp_path: Path, edit) -> Path:
    lines = recording.read_text().splitlines()
    header = json.loads(lines[0])
    edit(header["capabilities"])
    out = tmp_path / "edited.trace"
    out.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(vcpus="two"), "capabilities.vcpus is 'two', not a number in 1..4096"),
    (lambda c: c.update(vcpus=-1), "capabilities.vcpus is -1"),
    (lambda c: c.update(altp2m="yes"), "capabilities.altp2m is 'yes', not true or false"),
    (lambda c: c.update(monitors="all"), "capabilities.monitors is not a list of names"),
    (lambda c: c.update(extra=1), "capabilities has unknown field(s) extra"),
    (lambda c: c.pop("arch"), "capabilities.arch is missing"),
    (lambda c: c.update(vcpus=4), "registers of vCPU(s) 0, 1, but the header says the guest has 4 vCPU(s)"),
    (lambda c: c.update(vcpus=1), "registers of vCPU(s) 0, 1, but the header says the guest has 1 vCPU(s)"),
], ids=["vcpus-text", "vcpus-negative", "altp2m-text", "monitors-text", "unknown-field", "no-arch",
        "more-vcpus", "fewer-vcpus"])
def test_a_trace_header_that_does_not_match_its_records_is_refused(recording, tmp_path, edit, message):
    trace = _edited(recording, tmp_path, edit)
    with pytest.raises(TraceError) as err:
        read_trace(trace)
    assert message in str(err.value)
    code, _out, err_text = cli("replay", str(trace), "--policy", str(KERNEL_INTEGRITY))
    assert code == 2 and message in err_text


@pytest.mark.parametrize("content, message", [
    (bytes(range(128, 256)) + bytes(range(256)) * 8, ":1: not UTF-8 text"),
    (b"\xff\xfe garbage", ":1: not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: JSON nested too deep"),
], ids=["random-bytes", "utf16-bom", "deep-json"])
def test_a_trace_of_garbage_is_refused_with_its_line(tmp_path, content, message):
    trace = tmp_path / "junk.trace"
    trace.write_bytes(content)
    code, _out, err = cli("replay", str(trace), "--policy", str(KERNEL_INTEGRITY))
    assert code == 2 and message in err


def test_a_deep_record_after_a_good_header_is_refused_with_its_line(recording, tmp_path):
    trace = tmp_path / "deep.trace"
    trace.write_bytes(recording.read_bytes().splitlines(keepends=True)[0] + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(TraceError, match=":2: JSON nested too deep"):
        read_trace(trace)


# --------------------------------------------------------------------------- replay under another policy

@pytest.mark.parametrize("flags", [
    ("--policy", str(POLICIES / "linux-exec-from-data.vmi")),
    ("--policy", str(KERNEL_INTEGRITY), "--baseline", str(POLICIES / "linux-exec-from-data.vmi")),
])
def test_replay_under_a_policy_the_recording_cannot_bind_says_what_is_missing(recording, flags):
    code, _out, err = cli("replay", str(recording), *flags)
    assert code == 2
    assert "lacks what binding policy 'linux-exec-from-data' needs" in err
    assert "was not read while recording" in err and "recorded under 'linux-kernel-integrity'" in err
