"""`policyc test --coverage`: rules fired, conditions true and false, region pages touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from policyc.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

POLICY = '''policy "cov" {
    target xen >= 4.17 on x86_64
    symbols "linux-6.1.System.map"

    region syscalls = symbol sys_call_table size 8

    rule table_write: on write to syscalls {
        deny
    }

    rule lstar: on write msr LSTAR where new != symbol entry_SYSCALL_64 {
        deny
    }

    rule never: on write cr4 where cleared(cr4.SMEP) {
        deny
    }
}
'''

SCENARIO = '''scenario: cov
guest:
  layout: linux-x86_64
  symbols: linux-6.1.System.map
  kaslr_slide: 0
  memory: 256M
  vcpus: 1
policy: cov.vmi
steps:
  - {vcpu: 0, op: write, va: "symbol sys_call_table", size: 8, value: 1}
  - {vcpu: 0, op: write, va: "symbol sys_call_table", size: 8, value: 2}
  - {vcpu: 0, op: wrmsr, msr: LSTAR, value: 0xffffffffc0002000}
  - {vcpu: 0, op: wrmsr, msr: LSTAR, value: "symbol entry_SYSCALL_64"}
expect:
  - {step: 0, verdict: deny, rule: table_write}
  - {step: 2, verdict: deny, rule: lstar}
  - {step: 3, verdict: allow}
'''


def _scenario(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLES / "policies" / "linux-6.1.System.map", tmp_path)
    (tmp_path / "cov.vmi").write_text(POLICY)
    (tmp_path / "cov.yaml").write_text(SCENARIO)
    return tmp_path / "cov.yaml"


def _row(rule: str) -> int:
    return next(i for i, line in enumerate(POLICY.splitlines(), 1) if f"rule {rule}:" in line)


def test_coverage_counts_hits_conditions_and_pages(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _scenario(tmp_path)
    assert main(["test", "--coverage", "--format", "json", "cov.yaml"]) == 0
    report = json.loads(capsys.readouterr().out)
    f = report["files"]["cov.vmi"]
    assert f["rules"]["table_write"] == {"row": _row("table_write"), "hits": 2, "decided": 2}
    assert f["rules"]["lstar"] == {"row": _row("lstar"), "hits": 1, "decided": 1,
                                   "condition": {"true": 1, "false": 1}}
    assert f["rules"]["never"]["hits"] == 0 and f["rules"]["never"]["condition"] == {"true": 0, "false": 0}
    assert f["not_covered"] == [{"rule": "never", "start": {"row": _row("never")}, "end": {"row": _row("never")}}]
    assert [c["rule"] for c in f["covered"]] == ["table_write", "lstar"]
    assert f["regions"] == {"syscalls": {"pages": 1, "touched": 1}}
    assert report["coverage"] == f["coverage"] == 66.67
    assert report["scenarios"][0]["scenario"] == "cov.yaml" and report["scenarios"][0]["policy"] == "cov.vmi"
    assert report["failed"] == 0


def test_coverage_text_lists_uncovered_rules_and_fail_under_gates(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _scenario(tmp_path)
    assert main(["test", "--coverage", "cov.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"cov.vmi:{_row('never')}: rule never never fired" in out
    assert "2 of 3 rules fired: 66.7% coverage" in out
    assert main(["test", "--coverage", "--fail-under", "70", "cov.yaml"]) == 1
    assert "coverage 66.7% is under --fail-under 70%" in capsys.readouterr().err
    assert main(["test", "--coverage", "--fail-under", "66", "cov.yaml"]) == 0
    assert main(["test", "--fail-under", "66", "cov.yaml"]) == 2  # a usage error without --coverage


def test_a_policy_no_scenario_runs_is_listed_uncovered(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _scenario(tmp_path)
    (tmp_path / "untested.vmi").write_text(POLICY.replace('"cov"', '"untested"'))
    assert main(["test", "--coverage", "--format", "json", "."]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert set(files) == {"cov.vmi", "untested.vmi"}
    assert files["untested.vmi"]["scenarios"] == 0 and "scenarios" not in files["cov.vmi"]
    assert files["untested.vmi"]["covered"] == [] and len(files["untested.vmi"]["not_covered"]) == 3
    assert files["cov.vmi"]["covered_rules"] == 2  # the run policy is counted once, from its run


def test_coverage_of_the_examples_lists_every_rule_with_its_hits(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["test", "--coverage", "--format", "json", "examples/"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == 0
    from policyc import Diagnostics, check_policy

    expected_rules: dict[str, set[str]] = {}
    for policy in sorted((EXAMPLES / "policies").rglob("*")):      # reload/: the plans a scenario reloads
        if policy.suffix in (".vmi", ".yaml") and policy.name != "linux-common.vmi":  # include-only
            diagnostics = Diagnostics()
            model = check_policy(policy.relative_to(ROOT), diagnostics)
            assert model is not None, diagnostics.items
            expected_rules[str(policy.relative_to(ROOT))] = {r.name for r in model.rules}
    assert {f: set(v["rules"]) for f, v in report["files"].items()} == expected_rules
    run: set[str] = set()
    named: set[tuple[str, str]] = set()
    for path in sorted((EXAMPLES / "scenarios").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        policy = str(Path("examples/scenarios", doc["policy"]).resolve().relative_to(ROOT))
        run.add(policy)
        named |= {(policy, e["rule"]) for e in doc.get("expect", []) if "rule" in e}
    for file, rule in named:  # a rule an expectation names decided an event: it fired
        assert report["files"][file]["rules"][rule]["hits"] >= 1, (file, rule)
    for file, f in report["files"].items():  # the YAML twins of the examples have no scenario of their own
        assert (f.get("scenarios") == 0) == (file not in run), file
        assert file in run or f["covered_rules"] == 0
    rules = [r for f in report["files"].values() for r in f["rules"].values()]
    assert report["covered_rules"] == sum(1 for r in rules if r["hits"])
    assert report["covered_rules"] + report["not_covered_rules"] == sum(len(v) for v in expected_rules.values())
