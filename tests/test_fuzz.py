"""The fuzz campaign's targets in CI: every input kept in tests/fuzz/corpus/ still holds its target's
contract, and a short coverage-guided run of each target (atheris) finds nothing.

The long campaign is `python3 tests/fuzz/campaign.py --seconds N --json` (see tests/fuzz/README.md).
POLICYC_FUZZ_RUNS sets the executions per target here (default 1,000).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz_targets  # noqa: E402 - the targets live beside their corpora

RUNS = int(os.environ.get("POLICYC_FUZZ_RUNS", "1000"))
TARGETS = sorted(fuzz_targets.targets())


def test_every_target_has_a_seed_corpus():
    assert sorted(p.name for p in (FUZZ / "corpus").iterdir() if p.is_dir()) == TARGETS
    for name in TARGETS:
        assert any((FUZZ / "corpus" / name).iterdir()), name


@pytest.mark.parametrize("name", TARGETS)
def test_the_corpus_holds_each_contract(name):
    fuzz_targets.prepare(name)
    target = fuzz_targets.targets()[name]
    for path in sorted((FUZZ / "corpus" / name).iterdir()):
        target(path.read_bytes())


@pytest.mark.parametrize("name", TARGETS)
def test_a_short_coverage_guided_run_finds_nothing(name, tmp_path):
    if importlib.util.find_spec("atheris") is None:
        print("SKIP: atheris is not installed (python3 -m pip install atheris)")
        pytest.skip("atheris is not installed")
    done = subprocess.run([sys.executable, str(FUZZ / "campaign.py"), "--targets", name, "--runs", str(RUNS),
                           "--artifacts", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    summary = json.loads(done.stdout)
    assert summary["crashes"] == [], summary["crashes"][0]["detail"]
    assert done.returncode == 0, done.stderr
    assert summary["executions"] >= RUNS


def test_the_engine_target_catches_engines_that_answer_differently():
    # the differential check itself: with the reference in audit mode (deny rules answered allow),
    # the syscall-table write the example guest makes is answered differently, and that is a break
    plan, bound = fuzz_targets.engine_plan()
    try:
        reference, *_ = fuzz_targets.engine_pair(plan, bound)
        reference.audit = True
        with pytest.raises(fuzz_targets.ContractBroken):
            for raw in fuzz_targets.recorded_requests():
                fuzz_targets.decide_both(plan, bound, [raw])
    finally:
        fuzz_targets.forget_engine_pairs()
