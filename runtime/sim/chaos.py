"""Fault injection: one backend call fails, and the guest must still come out whole.

    python -m policyc.runtime.sim.chaos --trials N --seed S [--json] [SCENARIO ...]

Each trial takes an example scenario (`examples/scenarios/`, or those given) and its policy, and
makes exactly one call the enforcer makes to the simulated Xen fail: the N-th call of the whole
run (every `Backend` method: discovery, pausing, access, altp2m, monitors, memory, registers,
injection, the ring and its event channel), with an errno drawn from those Xen's calls return.
The phase the call falls in (install, enforce, reload, teardown) is whatever the N-th call turns out to be;
N is drawn over the calls a clean run of the same scenario makes (runs are deterministic, so the
N-th call is the same call again): first a (scenario, call site) pair, the first trials taking
each pair in turn, then one of that site's calls, so every call site is injected.
Then the trial lets the run go on as a user's would: a failed start installs nothing; a failed
enforcement step is reported and the enforcer is torn down; a teardown that fails leaves its
journal, and `recover` runs (without a fault) as the operator would.

The invariant, after every trial: the domain equals its pre-install snapshot (every frame's access
in every view, views and altp2m, monitors, per-vCPU view and single-step, nothing paused, no
request left on the ring, not crashed), or the enforcer is still enforcing (the fault was absorbed
and the run went on to its end); and in both cases no vCPU is left paused and no request
unanswered. A scenario's reload steps are a phase of their own: a reload the fault made fail must
leave the last good plan enforcing, armed exactly as before it (checked at once), and one that
succeeded must have the new plan enforcing. A trial that breaks it is a violation, printed with its seed and call site so that
`--trials 1 --seed S` replays it.

Output: `trials`, `faults_injected`, `restored_exactly`, `still_enforcing`, `recovered` (of the
restored, how many needed `recover`), `call_sites` (each site and how often it was hit), and
`violations`.
"""

from __future__ import annotations

import argparse
import errno as _errno
import json
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..backend import Backend, BackendError

__all__ = ["FaultyBackend", "InjectedFault", "run_trials", "main"]

# What Xen's calls fail with (libxc returns -1 and sets errno): resources, a busy ring, a dead
# domain, bad arguments, no such feature.
ERRNOS = (_errno.EIO, _errno.ENOMEM, _errno.EBUSY, _errno.EAGAIN, _errno.EINVAL, _errno.ESRCH, _errno.EPERM,
          _errno.ENODEV, _errno.EOPNOTSUPP, _errno.EFAULT)

# Every operation of the Backend protocol: the calls a fault can be injected into.
BACKEND_CALLS = frozenset(name for name in dir(Backend) if not name.startswith("_") and name != "name")


class InjectedFault(BackendError):
    """The fault this harness injected (a BackendError, as a real failing Xen call raises)."""


@dataclass
class FaultyBackend:
    """A backend whose `fail_at`-th call (counting every Backend call, from 1) raises instead of
    reaching the hypervisor. `fail_at=0` injects nothing and only counts."""

    inner: Any
    fail_at: int = 0
    errno: int = _errno.EIO
    calls: int = 0
    phase: str = "attach"
    injected: str | None = None         # "phase:method" of the injected fault
    sequence: list = field(default_factory=list)        # the site of every call, in order

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.inner, attr)
        if attr not in BACKEND_CALLS or not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            site = f"{self.phase}:{attr}"
            self.sequence.append(site)
            if self.calls == self.fail_at:
                self.injected = site
                raise InjectedFault(attr, f"injected fault: {_errno.errorcode.get(self.errno, self.errno)}",
                                    self.errno)
            return value(*args, **kwargs)

        return call


@dataclass
class Trial:
    seed: int
    scenario: str
    fail_at: int
    errno: int
    site: str | None = None
    outcome: str = ""                  # restored_exactly | still_enforcing | violation
    recovered: bool = False
    problems: list[str] = field(default_factory=list)
    intended_pause: tuple = ()


def run_trials(trials: int, seed: int, scenarios: Sequence[Path] | None = None) -> dict[str, Any]:
    """Run `trials` trials (trial i uses seed `seed + i`); returns the summary the CLI prints."""
    paths = list(scenarios) if scenarios else sorted(_bundled_scenarios().glob("*.yaml"))
    prepared = [_prepare(p) for p in paths]
    for p in prepared:
        _learn_clean_run(p)
    results: list[Trial] = []
    sites: Counter = Counter()
    # Every (scenario, call site) pair is as likely as any other, then one of that site's calls:
    # drawing N over all calls would spend nearly every trial on the ring's calls.
    pairs = sorted((i, site) for i, p in enumerate(prepared) for site in p.at)
    for i in range(trials):
        rnd = random.Random(seed + i)
        which, site = pairs[rnd.randrange(len(pairs))] if i >= len(pairs) else pairs[(seed + i) % len(pairs)]
        p = prepared[which]
        t = Trial(seed + i, str(p.path), rnd.choice(p.at[site]), rnd.choice(ERRNOS))
        _run_one(p, t)
        results.append(t)
        if t.site:
            sites[t.site] += 1
    reachable = set().union(*(p.at for p in prepared))
    return {
        "trials": trials, "seed": seed, "scenarios": [str(p.path) for p in prepared],
        "faults_injected": sum(1 for t in results if t.site),
        "restored_exactly": sum(1 for t in results if t.outcome == "restored_exactly"),
        "still_enforcing": sum(1 for t in results if t.outcome == "still_enforcing"),
        "recovered": sum(1 for t in results if t.recovered),
        "call_sites": dict(sorted(sites.items())),
        "call_sites_not_injected": sorted(reachable - set(sites)),
        "violations": [{"seed": t.seed, "scenario": t.scenario, "call": t.fail_at, "site": t.site,
                        "errno": _errno.errorcode.get(t.errno, t.errno), "problems": t.problems}
                       for t in results if t.outcome == "violation"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m policyc.runtime.sim.chaos",
                                 description="Inject one backend fault per trial into the example scenarios and "
                                             "check that the guest comes out whole.")
    ap.add_argument("scenarios", nargs="*", type=Path, metavar="SCENARIO",
                    help="scenario files (default: examples/scenarios/*.yaml)")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    if a.trials < 1:
        ap.error("--trials must be at least 1")
    summary = run_trials(a.trials, a.seed, a.scenarios or None)
    if a.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(f"trials {summary['trials']}, faults injected {summary['faults_injected']}, restored exactly "
              f"{summary['restored_exactly']} (after recover: {summary['recovered']}), still enforcing "
              f"{summary['still_enforcing']}, violations {len(summary['violations'])}")
        print(f"call sites injected: {len(summary['call_sites'])}; reachable but not injected: "
              f"{', '.join(summary['call_sites_not_injected']) or 'none'}")
        for v in summary["violations"]:
            print(f"  VIOLATION seed {v['seed']} {v['scenario']} call {v['call']} ({v['site']}, {v['errno']}): "
                  + "; ".join(v["problems"]))
    return 1 if summary["violations"] else 0


# --------------------------------------------------------------------------- one trial

@dataclass
class _Prepared:
    path: Path
    scenario: Any
    plan: dict
    symbols: list
    calls: int = 0                       # backend calls a clean run makes
    at: dict = field(default_factory=dict)   # site -> the call numbers (from 1) where a clean run makes it
    # vCPUs a clean run leaves paused: the policy's own `pause` action pauses the domain on purpose
    intended_pause: tuple = ()
    sources: dict = field(default_factory=dict)   # reload steps' files, compiled once


def _prepare(path: Path) -> _Prepared:
    from ...check import check_policy
    from ...diagnostics import Diagnostics
    from ...compiler import compile_plan
    from ...symbols import load_symbol_table
    from .scenario import load_scenario

    scenario = load_scenario(path)
    diagnostics = Diagnostics()
    model = check_policy(Path(scenario.policy), diagnostics, target_arch=scenario.profile)
    plan = compile_plan(model, diagnostics, target=scenario.profile) if model is not None else None
    if plan is None:
        raise SystemExit(f"{path}: its policy does not compile")
    return _Prepared(path, scenario, plan, [load_symbol_table(s.path) for s in model.symbols])


def _learn_clean_run(p: _Prepared) -> None:
    """Run the scenario once without a fault: how many calls it makes, at which sites, and what
    pause its policy leaves on purpose."""
    t = Trial(0, str(p.path), 0, _errno.EIO)
    backend = _run_one(p, t)
    if t.outcome != "still_enforcing":
        raise SystemExit(f"{p.path}: the run without a fault is not clean: {t.problems}")
    p.calls, p.intended_pause = backend.calls, t.intended_pause
    for n, site in enumerate(backend.sequence, 1):
        p.at.setdefault(site, []).append(n)


def _run_one(p: _Prepared, t: Trial) -> FaultyBackend:
    from ..enforce import Enforcer, EnforcerError
    from ..recover import recover_guest
    from ..policy_test import diff_snapshots
    from .scenario import ScenarioRunner, build_scenario

    xen = build_scenario(p.scenario, profile=p.plan["target"]["arch"])
    before = xen.state_snapshot(memory=False)
    backend = FaultyBackend(xen, fail_at=t.fail_at, errno=t.errno)
    guest = f"chaos-{p.scenario.name}"
    with tempfile.TemporaryDirectory(prefix="policyc-chaos-") as state_dir:
        enforcer = Enforcer(p.plan, backend, p.symbols, guest=guest, state_dir=state_dir)
        backend.phase = "install"
        try:
            enforcer.start()
        except Exception as exc:  # noqa: BLE001 - anything but EnforcerError is a traceback for the user
            if not isinstance(exc, EnforcerError):
                t.problems.append(f"start raised {type(exc).__name__} (not EnforcerError): {exc}")
            t.site = backend.injected
            _judge(xen, before, t, diff_snapshots, enforcing=False, intended_pause=p.intended_pause)
            return backend
        backend.phase = "enforce"
        runner = ScenarioRunner(p.scenario, xen, lambda _x: enforcer.service())
        runner.reloader = _reloader(p, enforcer, backend, xen, t)
        aborted = None
        try:
            for step in p.scenario.steps:
                runner.run_step(step)
                enforcer.idle()
            runner.settle()
        except Exception as exc:  # noqa: BLE001 - the fault, or what it caused: judged below
            aborted = exc
        backend.phase = "teardown"
        try:
            errors = enforcer.stop()
        except Exception as exc:  # noqa: BLE001
            errors = [f"teardown raised {type(exc).__name__}: {exc}"]
        t.site = backend.injected
        if errors:
            # as the operator would: `policyc recover` from the journal the teardown kept
            backend.phase = "recover"
            try:
                report = recover_guest(backend, guest, state_dir)
                t.recovered = True
                if getattr(report, "errors", None):
                    t.problems.append(f"recover: {report.errors}")
            except Exception as exc:  # noqa: BLE001
                t.problems.append(f"recover raised {type(exc).__name__}: {exc}")
        if aborted is not None and backend.injected is None:
            t.problems.append(f"the run failed with no fault injected: {type(aborted).__name__}: {aborted}")
        # the fault was absorbed while enforcing: the run went on to its end under the plan
        enforcing = aborted is None and (t.fail_at == 0 or (t.site or "").startswith(("enforce:", "reload:")))
        _judge(xen, before, t, diff_snapshots, enforcing=enforcing, intended_pause=p.intended_pause)
    return backend


def _reloader(p: _Prepared, enforcer: Any, backend: FaultyBackend, xen: Any, t: Trial) -> Any:
    """A scenario's reload steps, as a call site of their own (phase `reload`), with the invariant of
    a reload checked at once: one that failed leaves the last good plan enforcing, armed as it was."""
    from ...plan_source import PlanSourceError, load_plan_source

    def reload_step(step: Any, _index: int) -> bool:
        if step.source not in p.sources:
            try:
                p.sources[step.source] = load_plan_source(step.source, p.plan["target"]["arch"])
            except PlanSourceError as exc:
                p.sources[step.source] = exc
        source = p.sources[step.source]
        if isinstance(source, PlanSourceError):
            return False                      # a broken policy: the reload never reaches the guest
        old = enforcer.plan.get("content_hash")
        armed = _armed(xen)
        backend.phase = "reload"
        try:
            result = enforcer.reload(source.plan, source.symbols)
        finally:
            backend.phase = "enforce"
        now = enforcer.plan.get("content_hash")
        if result.ok and now != source.plan.get("content_hash"):
            t.problems.append(f"reload said ok but plan {now} enforces")
        if not result.ok:
            if now != old:
                t.problems.append(f"a failed reload ({result.error}) left plan {now} enforcing, not {old}")
            elif _armed(xen) != armed:
                t.problems.append(f"a failed reload ({result.error}) changed what is armed: "
                                  + "; ".join(_diff_armed(armed, _armed(xen))))
        return result.ok
    return reload_step


def _armed(xen: Any) -> dict[str, Any]:
    """What a plan arms in the domain (the ring and pause state move with the events in flight)."""
    snap = xen.state_snapshot(memory=False)
    return {k: snap[k] for k in ("access", "altp2m", "views", "monitors", "single_step")}


def _diff_armed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    from ..policy_test import diff_snapshots

    return diff_snapshots(before, after)[:4]


def _judge(xen: Any, before: dict, t: Trial, diff: Any, *, enforcing: bool, intended_pause: tuple = ()) -> None:
    after = xen.state_snapshot(memory=False)
    if t.fail_at == 0 and enforcing:
        intended_pause = after["paused"]       # the clean run: what its policy pauses on purpose
        t.intended_pause = intended_pause
    if after["paused"] == intended_pause:
        after = {**after, "paused": before["paused"]}
    if after["paused"]:
        t.problems.append(f"vCPUs left paused: {list(after['paused'])}")
    if after["ring"]:
        t.problems.append(f"{after['ring']} request(s) left unanswered on the ring")
    differs = diff(before, after)
    if differs:
        t.problems.append("the domain differs from its pre-install snapshot: " + "; ".join(differs[:4]))
    if t.problems:
        t.outcome = "violation"
    else:
        t.outcome = "still_enforcing" if enforcing else "restored_exactly"


def _bundled_scenarios() -> Path:
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        cand = root / "examples" / "scenarios"
        if cand.is_dir():
            return cand
    raise SystemExit("no examples/scenarios found: give scenario files")


if __name__ == "__main__":
    sys.exit(main())
