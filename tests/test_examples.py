"""The example policies: they check, their YAML twins mean the same, and together they use the whole language."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyc import syntax as S
from policyc.check import check_policy, included_files
from policyc.diagnostics import Diagnostics
from policyc.source import read_policy_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
TWINS = sorted(p for p in EXAMPLES.glob("*.yaml") if p.with_suffix(".vmi").exists())


def test_there_are_enough_examples_and_twins():
    roots = [p for p in EXAMPLES.glob("*.vmi") if p.resolve() not in _included()]
    assert len(roots) >= 8
    assert len(TWINS) >= 4


@pytest.mark.parametrize("yaml_path", TWINS, ids=lambda p: p.name)
def test_yaml_twin_means_what_the_dsl_policy_means(yaml_path: Path):
    dsl_model = check_policy(yaml_path.with_suffix(".vmi"), Diagnostics())
    yaml_model = check_policy(yaml_path, Diagnostics())
    assert dsl_model is not None and yaml_model is not None
    assert yaml_model == dsl_model
    assert yaml_model.content_hash() == dsl_model.content_hash()


def test_examples_use_every_trigger_and_action():
    triggers: set[str] = set()
    actions: set[str] = set()
    for path in sorted(EXAMPLES.glob("*.vmi")):
        tree = read_policy_file(path, Diagnostics())
        assert tree is not None
        for item in _items(tree):
            if not isinstance(item, S.Rule):
                continue
            triggers.add(_trigger_form(item.trigger))
            for a in item.actions:
                actions |= _action_forms(a)
    assert triggers >= {"read of", "write to", "execute in", "access to", "execute symbol", "execute va",
                        "write cr0", "write cr3", "write cr4", "write xcr0", "write msr", "write idtr",
                        "write gdtr", "write ldtr", "write tr", "read idtr", "cpuid", "cpuid leaf",
                        "guest_request", "debug_exception", "smc"}
    assert actions >= {"allow", "deny", "deny feed", "deny with", "log", "alert", "pause", "disarm", "limit",
                       "priority"}


def _included() -> set[Path]:
    out: set[Path] = set()
    for p in EXAMPLES.glob("*.vmi"):
        out |= included_files(p)
    return out


def _items(tree: S.PolicyFile):
    for top in tree.items:
        yield from (top.items if isinstance(top, S.PolicyBlock) else [top])


def _trigger_form(t: S.Trigger) -> str:
    if isinstance(t, S.MemoryTrigger):
        return {"read": "read of", "write": "write to", "execute": "execute in", "access": "access to"}[t.access]
    if isinstance(t, S.ExecuteTrigger):
        return "execute va" if t.space == "va" else "execute symbol"
    if isinstance(t, S.RegisterTrigger):
        return f"{t.access} {t.register}"
    if isinstance(t, S.MsrTrigger):
        return "write msr"
    if isinstance(t, S.CpuidTrigger):
        return "cpuid" if t.leaf is None else "cpuid leaf"
    return t.kind  # type: ignore[union-attr]


def _action_forms(a: S.Action) -> set[str]:
    if isinstance(a, S.Deny):
        return {"deny"} | ({"deny feed"} if a.feed is not None else set()) | \
            ({"deny with"} if a.exception else set())
    if isinstance(a, S.Report):
        return {a.kind}
    if isinstance(a, S.Limit):
        return {"limit"} | _action_forms(a.then)
    return {type(a).__name__.lower()}
