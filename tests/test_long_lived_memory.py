"""What an enforcer holds is given back: after a reload the old plan's graph, after teardown the
enforcer's own (policyc/gc_pause.py). The enforcer freezes its graph from the cyclic collector at
start; before the fix nothing thawed it, so every replaced plan and every finished enforcer of a
process stayed in memory for good (the chaos harness grew by ~30 MB a trial, 20 GB over 2,000).

Asserted on objects, not time or RSS: weak references to what was replaced must die at the next
collection, and the number of frozen objects must come back down.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from policyc.plan_source import load_plan_source
from policyc.runtime.enforce import Enforcer
from policyc.runtime.sim.chaos import Trial, _learn_clean_run, _prepare, _run_one
from policyc.runtime.sim.scenario import ScenarioRunner, build_scenario, load_scenario

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
V1 = EXAMPLES / "policies" / "linux-kernel-integrity.vmi"
V2 = EXAMPLES / "policies" / "reload" / "syscalls-and-text.vmi"
ATTACK = EXAMPLES / "scenarios" / "rootkit-hooks-syscall-table.yaml"
RELOADS = 8


def test_reloads_leave_no_replaced_plan_in_memory(tmp_path):
    scenario = load_scenario(ATTACK)
    xen = build_scenario(scenario)
    v1, v2 = load_plan_source(str(V1), None), load_plan_source(str(V2), None)
    enf = Enforcer(v1.plan, xen, v1.symbols, guest="memory", state_dir=tmp_path)
    enf.start()
    runner = ScenarioRunner(scenario, xen, lambda _x: enf.service())
    replaced: list[weakref.ref] = []
    frozen = []
    for i in range(RELOADS):
        replaced += [weakref.ref(enf.engine), weakref.ref(enf.bound)]
        new = v2 if i % 2 == 0 else v1
        assert enf.reload(new.plan, new.symbols).ok
        assert runner.run_step(scenario.steps[0]).verdict == "deny"     # the new plan enforces
        gc.collect()
        frozen.append(gc.get_freeze_count())
    alive = [r() for r in replaced if r() is not None]
    assert alive == [], f"{len(alive)} of {len(replaced)} replaced engines/bindings still in memory"
    # each reload's freeze holds the running plan, not every plan so far
    assert max(frozen[2:]) <= frozen[1] * 1.05, frozen
    assert enf.stop() == []


def test_enforcers_one_after_another_leave_nothing_in_memory(tmp_path):
    """The chaos harness's pattern: many short enforcers in one process, reloads among them."""
    prepared = _prepare(EXAMPLES / "scenarios" / "reload-under-writes.yaml")
    _learn_clean_run(prepared)
    gc.collect()
    frozen_before = gc.get_freeze_count()
    finished: list[weakref.ref] = []
    for seed in range(3):
        trial = Trial(seed, str(prepared.path), 0, 5)
        backend = _run_one(prepared, trial)
        assert trial.outcome == "still_enforcing", trial.problems
        finished.append(weakref.ref(backend.inner))           # the trial's simulated guest
        del backend
    gc.collect()
    alive = sum(1 for r in finished if r() is not None)
    assert alive == 0, f"{alive} of {len(finished)} finished trials' guests still in memory"
    assert gc.get_freeze_count() <= frozen_before
