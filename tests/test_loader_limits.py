"""The scenario and trace loaders, and replay, on hostile or mismatched input: clear errors, no traceback.

The policy loader's bounds (policyc/yaml_form.py: size, nodes, depth, alias expansion) hold for
scenarios too; loops and guest memory have their own; a trace is checked line by line and against
its own header; a replay under another policy names what the trace lacks.
"""

from __future__ import annotations

import io
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from policyc.cli import main
from policyc.runtime.sim.scenario import MAX_LOOP_COUNT, ScenarioError, load_scenario_text

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
