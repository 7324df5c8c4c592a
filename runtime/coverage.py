"""Policy test coverage: which rules the scenarios exercised (`policyc test --coverage`).

Counted from the decisions of each simulated run (`policy_test.SimulatedRun`):

* a rule is **hit** by every event it matched (its trigger and condition held),
  and **decides** the events whose verdict it gave;
* a rule with a `where` condition counts the condition **true** for each event
  it matched and **false** for each event that reached its trigger (the same
  dispatch table and key: the register, MSR, breakpoint site, CPUID leaf,
  descriptor; for memory, an access of its kind inside one of its regions)
  without matching;
* a region's pages **touched** are its guest frames that a memory event hit.

The report is per scenario and, per policy file, summed over every scenario
that ran it; a policy file among the tested paths that no scenario runs is
listed with every rule uncovered, as OPA lists a file without tests. Its JSON follows OPA's coverage report (`files` -> `covered` /
`not_covered` with `start.row` / `end.row`, `coverage` in percent), with
rules where OPA has lines. Counts are over the decisions a run keeps
(`policy_test.DECISIONS_KEPT_PER_STEP` a step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .decide import Decision, classify_access

__all__ = ["Coverage", "RuleCoverage"]

_ACCESS_NAMES = ("read", "write", "execute")


@dataclass
class RuleCoverage:
    name: str
    file: str
    row: int
    hits: int = 0
    decided: int = 0
    condition: dict[str, int] | None = None  # {"true": n, "false": m} for a rule with a condition

    def add(self, other: "RuleCoverage") -> None:
        self.hits += other.hits
        self.decided += other.decided
        if other.condition is not None:
            self.condition = self.condition or {"true": 0, "false": 0}
            for k in ("true", "false"):
                self.condition[k] += other.condition[k]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"row": self.row, "hits": self.hits, "decided": self.decided}
        if self.condition is not None:
            out["condition"] = dict(self.condition)
        return out


@dataclass
class _Run:
    scenario: str
    policy: str
    rules: dict[str, RuleCoverage]
    regions: dict[str, dict[str, int]]  # name -> {"pages": n, "touched": m}
    touched: dict[str, set[int]] = field(default_factory=dict)


class Coverage:
    """Coverage collected over scenario runs; `add` one run at a time, then `report` or `render_text`."""

    def __init__(self) -> None:
        self.runs: list[_Run] = []
        self.unrun: dict[str, dict[str, RuleCoverage]] = {}  # policy files no scenario ran

    def add_unrun(self, policy: str, rules: Iterable[tuple[str, str, int]]) -> None:
        """A policy file found among the tested paths that no scenario ran: its rules (name, file, line)
        count as never fired, as a policy without tests does in OPA's report."""
        ran = {os.path.realpath(r.policy) for r in self.runs}
        if os.path.realpath(policy) not in ran:
            self.unrun[os.path.normpath(policy)] = {name: RuleCoverage(name, os.path.normpath(file), row)
                                                    for name, file, row in rules}

    def add(self, scenario: str, policy: str, plan: Mapping[str, Any], run: Any) -> None:
        """Count one run (`policy_test.SimulatedRun`) of `plan`, compiled from the policy file `policy`."""
        bound = run.enforcer.bound
        root = os.path.dirname(policy)
        rules = {name: RuleCoverage(name, *_position(root, info["at"])) for name, info in plan.get("rules", {}).items()}
        reached = _Reach(plan, bound, rules)
        frames = {name: {g for g, _first, _last in bound.region_frames(name)} if bound is not None else set()
                  for name in plan.get("regions", {})}
        touched: dict[str, set[int]] = {name: set() for name in frames}
        for d in _decisions(run):
            for name in d.rules:
                if name in rules:
                    rules[name].hits += 1
            if d.rule in rules:
                rules[d.rule].decided += 1
            for name in reached.conditional(d):
                rules[name].condition["true" if name in d.rules else "false"] += 1
            if d.kind == "mem_access":
                gfn = d.event.get("gfn")
                for name, gfns in frames.items():
                    if gfn in gfns:
                        touched[name].add(gfn)
        regions = {name: {"pages": len(frames[name]), "touched": len(touched[name])} for name in frames}
        self.runs.append(_Run(scenario, os.path.normpath(policy), rules, regions, touched))

    @property
    def percent(self) -> float:
        rules = self._by_file_rules()
        total = sum(len(rs) for rs in rules.values())
        covered = sum(1 for rs in rules.values() for r in rs.values() if r.hits)
        return round(100.0 * covered / total, 2) if total else 100.0

    def report(self) -> dict[str, Any]:
        """The coverage report as JSON-ready data (OPA's shape, with rules for lines)."""
        files: dict[str, Any] = {}
        for file, rules in sorted(self._by_file_rules().items()):
            covered = [r for r in rules.values() if r.hits]
            missed = [r for r in rules.values() if not r.hits]
            files[file] = {
                "covered": [_row_range(r) for r in sorted(covered, key=lambda r: r.row)],
                "not_covered": [_row_range(r) for r in sorted(missed, key=lambda r: r.row)],
                "covered_rules": len(covered),
                "not_covered_rules": len(missed),
                "coverage": _percent(len(covered), len(rules)),
                "rules": {r.name: r.as_dict() for r in sorted(rules.values(), key=lambda r: r.row)},
                "regions": self._file_regions(file),
            }
            if file in self.unrun:
                files[file]["scenarios"] = 0  # no scenario runs this policy
        covered = sum(f["covered_rules"] for f in files.values())
        missed = sum(f["not_covered_rules"] for f in files.values())
        return {
            "files": files,
            "scenarios": [{"scenario": r.scenario, "policy": r.policy,
                           "rules": {n: c.as_dict() for n, c in sorted(r.rules.items())},
                           "regions": dict(sorted(r.regions.items())),
                           "coverage": _percent(sum(1 for c in r.rules.values() if c.hits), len(r.rules))}
                          for r in self.runs],
            "covered_rules": covered,
            "not_covered_rules": missed,
            "coverage": _percent(covered, covered + missed),
        }

    def render_text(self) -> str:
        report = self.report()
        out = ["coverage"]
        for s in report["scenarios"]:
            fired = sum(1 for r in s["rules"].values() if r["hits"])
            out.append(f"  {s['scenario']}: {fired} of {len(s['rules'])} rules fired ({s['coverage']:.1f}%)")
        for file, f in report["files"].items():
            unrun = " (no scenario runs this policy)" if f.get("scenarios") == 0 else ""
            out.append(f"  {file}: {f['covered_rules']} of {f['covered_rules'] + f['not_covered_rules']} rules "
                       f"fired ({f['coverage']:.1f}%){unrun}")
            for name, r in f["rules"].items():
                cond = r.get("condition")
                cond_text = f", condition true {cond['true']} / false {cond['false']}" if cond else ""
                out.append(f"    {name:<28} line {r['row']:<4} hits {r['hits']:<6} decided {r['decided']}{cond_text}")
            for name, g in f["regions"].items():
                out.append(f"    region {name:<21} {g['touched']} of {g['pages']} page{'s' * (g['pages'] != 1)} touched")
        uncovered = [(file, name, r["row"]) for file, f in report["files"].items()
                     for name, r in f["rules"].items() if not r["hits"]]
        if uncovered:
            out.append("uncovered rules")
            out += [f"  {file}:{row}: rule {name} never fired" for file, name, row in uncovered]
        out.append(f"{report['covered_rules']} of {report['covered_rules'] + report['not_covered_rules']} rules "
                   f"fired: {report['coverage']:.1f}% coverage")
        return "\n".join(out) + "\n"

    # -- sums over runs of one policy file
    def _by_file_rules(self) -> dict[str, dict[str, RuleCoverage]]:
        files: dict[str, dict[str, RuleCoverage]] = {}
        for rule in (r for rules in self.unrun.values() for r in rules.values()):
            files.setdefault(rule.file, {})[rule.name] = rule
        for run in self.runs:
            for rule in run.rules.values():
                into = files.setdefault(rule.file, {})
                if rule.name not in into:
                    into[rule.name] = RuleCoverage(rule.name, rule.file, rule.row)
                into[rule.name].add(rule)
        return files

    def _file_regions(self, file: str) -> dict[str, dict[str, int]]:
        """Regions of the policies whose root is `file`: pages, and frames touched in any run.
        Frames are compared per run (a guest's frames are its own), so touched counts add up per run,
        capped at the region's pages."""
        out: dict[str, dict[str, int]] = {}
        for run in self.runs:
            if run.policy != file:
                continue
            for name, g in run.regions.items():
                into = out.setdefault(name, {"pages": g["pages"], "touched": 0})
                into["pages"] = max(into["pages"], g["pages"])
                into["touched"] = min(into["pages"], into["touched"] + g["touched"])
        return dict(sorted(out.items()))


class _Reach:
    """Which rules with a condition an event reached (its trigger fired, whatever the condition said)."""

    def __init__(self, plan: Mapping[str, Any], bound: Any, rules: Mapping[str, RuleCoverage]) -> None:
        from ..native import abi

        self.constants = abi.constants()
        self.bound = bound
        self.by_kind: dict[str, list[tuple[str | None, Mapping[str, Any]]]] = {}
        for table, entries in plan.get("dispatch", {}).items():
            keyed = entries.items() if isinstance(entries, dict) else [(None, entries)]
            for key, group in keyed:
                for entry in group:
                    if entry.get("condition") is not None and entry["rule"] in rules:
                        rules[entry["rule"]].condition = {"true": 0, "false": 0}
                        self.by_kind.setdefault(table, []).append((key, entry))

    def conditional(self, d: Decision) -> Iterable[str]:
        for key, entry in self.by_kind.get(d.kind, ()):
            if entry["rule"] in d.rules or self._reached(d, key, entry):
                yield entry["rule"]

    def _reached(self, d: Decision, key: str | None, entry: Mapping[str, Any]) -> bool:
        ev = d.event
        get = dict.get  # the event's own get decodes the register block; these fields are decoded
        if d.kind == "mem_access":
            if entry["access"] != "access" and _ACCESS_NAMES[classify_access(get(ev, "access", 0))] != entry["access"]:
                return False
            gfn, offset = get(ev, "gfn"), get(ev, "offset", 0)
            return self.bound is not None and any(
                g == gfn and first <= offset <= last
                for region in entry["regions"] for g, first, last in self.bound.region_frames(region))
        if d.kind == "write_ctrlreg":
            return get(ev, "register") == self.constants.get(f"VM_EVENT_X86_{key.upper()}")
        if d.kind == "mov_to_msr":
            return get(ev, "msr") == int(key, 16)
        if d.kind == "software_breakpoint":
            return get(ev, "site") == key
        if d.kind == "cpuid":
            return key == "*" or get(ev, "leaf") == int(key, 16)
        if d.kind == "descriptor_access":
            register, access = key.split(":")
            return (get(ev, "descriptor") == self.constants.get(f"VM_EVENT_DESC_{register.upper()}")
                    and bool(get(ev, "is_write")) == (access == "write"))
        return key is None  # guest_request, debug_exception, privileged_call: one table, every event


def _decisions(run: Any) -> Iterable[Decision]:
    for index in sorted(run.decisions):
        yield from run.decisions[index]
    yield from run.unmatched


def _position(root: str, at: str) -> tuple[str, int]:
    """A plan's `at` (file:line:col relative to the root policy's folder) -> (file as the user names it, line)."""
    file, line, _col = at.rsplit(":", 2)
    return os.path.normpath(os.path.join(root, file)), int(line)


def _row_range(r: RuleCoverage) -> dict[str, Any]:
    return {"rule": r.name, "start": {"row": r.row}, "end": {"row": r.row}}


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 100.0
