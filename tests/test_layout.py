"""The package's layout rules (tools/check_layout.py): no import cycle, no module over 1,000
lines, no function over 100 lines without a comment saying why it is one piece. The problems the
code had when the rules came (tools/layout_baseline.json) may remain until they are fixed; a new
one fails, and a fixed one must leave the baseline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("check_layout", ROOT / "tools" / "check_layout.py")
check_layout = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check_layout)
BASELINE = ROOT / "tools" / "layout_baseline.json"


def test_no_new_layout_problem_and_the_baseline_only_shrinks():
    found = set(check_layout.problems())
    known = set(json.loads(BASELINE.read_text()))
    assert sorted(found - known) == [], "new layout problems (see tools/check_layout.py)"
    assert sorted(known - found) == [], "fixed: remove from tools/layout_baseline.json (--write-baseline)"


def test_the_checker_sees_a_cycle_a_long_module_and_an_unexplained_long_function(tmp_path):
    pkg = tmp_path / "policyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n" + "    y = 1\n" * 1001)
    (pkg / "c.py").write_text("def g():\n    # one piece: a table\n" + "    y = 1\n" * 120)
    for folder in ("grammar", "runtime", "native"):
        (tmp_path / folder).mkdir()
    found = check_layout.problems(tmp_path)
    assert "import cycle: policyc.a <-> policyc.b" in found
    assert "module policyc.b is over 1000 lines" in found
    assert any(p.startswith("function policyc.b.f is over 100 lines") for p in found)
    assert not any("policyc.c.g" in p for p in found)
