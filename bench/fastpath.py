"""The native fast path against the C ring floor: decisions per second, in one run on one machine.

The Linux kernel-integrity example policy with N extra watched regions (as
`bench/enforce_scale.py` builds it; default 100,000), bound and installed on
the simulated `linux-x86_64` guest with 8 vCPUs. The requests are recorded
from that guest running the storm of tests/data/scenarios/storm.yaml (7
requests a round: a denied table write, a breakpoint, an allowed LSTAR write,
CR0.WP and CR4.SMEP clears, an IDT write, a collateral write). Then:

* ``floor_per_s``: the C ring floor (`abi.floor_loop`: a trivial responder in C);
* ``python_engine_per_s``: `DecisionEngine.decide_batch` alone on the recorded
  requests (no log);
* ``native_engine_per_s``: `NativeEngine.decide_blob` alone on the same
  requests, 4,096 a call packed in one buffer, responses likewise (no log;
  what it hands over goes to the Python engine as in the enforcer);
* ``enforcer_logged_per_s`` / ``enforcer_counted_per_s``: the whole
  `Enforcer` on a ring that `runtime.sim.ring_replay.ReplayBackend` keeps full
  in C with the recorded requests (no guest runs), the decision log written to
  a file, and only counted;
* ``native_share``: the fraction of the logged run's events decided natively;
  ``native_share_by_example``: the same for the storms of the kernel-integrity
  and syscall-tracing examples (no extra regions).

    python bench/fastpath.py [--regions 100000] [--events 1000000] [--json]

A measurement, not a test: it prints figures (JSON with --json) and exits 0.
Figures on a shared machine are noisy: quote `uptime` beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from enforce_scale import policy_with_regions, scenario  # noqa: E402

from policyc.check import check_policy  # noqa: E402
from policyc.diagnostics import Diagnostics  # noqa: E402
from policyc.compiler import compile_plan  # noqa: E402
from policyc.native import abi  # noqa: E402
from policyc.runtime.decide import DecisionEngine  # noqa: E402
from policyc.runtime.decision_log import DecisionLog  # noqa: E402
from policyc.runtime.enforce import Enforcer  # noqa: E402
from policyc.runtime.native_engine import NativeEngine  # noqa: E402
from policyc.runtime.sim.ring_replay import ReplayBackend, record_requests  # noqa: E402
from policyc.runtime.sim.scenario import build_scenario, load_scenario  # noqa: E402
from policyc.symbols import load_symbol_table  # noqa: E402

SYSCALL_TRACING = ROOT / "examples" / "policies" / "linux-syscall-tracing.vmi"
MAP = ROOT / "examples" / "policies" / "linux-6.1.System.map"
TRACED = ("__x64_sys_execve", "__x64_sys_kill", "__x64_sys_setuid", "bpf_prog_load", "__x64_sys_init_module",
          "__x64_sys_finit_module", "entry_SYSCALL_64", "__x64_sys_kill")


def compiled(policy: Path) -> tuple[dict, list]:
    d = Diagnostics()
    model = check_policy(policy, d)
    assert model is not None, [x.message for x in d if x.severity.name == "ERROR"][:3]
    plan = compile_plan(model, d)
    assert plan is not None
    return plan, [load_symbol_table(s.path) for s in model.symbols]


def record(plan: dict, symbols: list, scenario_path: Path, where: Path) -> list[bytes]:
    """The requests the guest raises running the scenario under the plan."""
    return record_requests(plan, symbols, load_scenario(scenario_path), where / "record", record=False)


def example_storm(rounds: int, where: Path) -> Path:
    """tests/data/scenarios/storm.yaml as it is (the kernel-integrity example's storm), `rounds` times."""
    text = (ROOT / "tests" / "data" / "scenarios" / "storm.yaml").read_text()
    p = where / "example-storm.yaml"
    p.write_text(text.replace("count: 1000", f"count: {rounds}").replace("../../../examples/", f"{ROOT}/examples/"))
    return p


def syscall_storm(rounds: int, where: Path) -> Path:
    """8 vCPUs at once calling the traced syscalls, `rounds` times (no KASLR: the policy names
    entry_SYSCALL_64 by its link-time address, as examples/scenarios/linux-syscall-tracing.yaml says)."""
    steps = "\n".join(f'        - {{vcpu: {v}, op: exec, va: "symbol {s}"}}' for v, s in enumerate(TRACED))
    p = where / "syscall-storm.yaml"
    p.write_text(f"""scenario: syscall-storm
guest: {{layout: linux-x86_64, symbols: {MAP}, kaslr_slide: 0, memory: 256M, vcpus: 8}}
policy: {SYSCALL_TRACING}
steps:
  - op: loop
    count: {rounds}
    steps:
      - op: parallel
        steps:
{steps}
""")
    return p


def rate(fn, events_per_call: int, seconds: float = 1.0) -> float:
    fn()                                   # warm up
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return calls * events_per_call / (time.perf_counter() - t0)


def enforcer_run(plan: dict, symbols: list, sc_path: Path, requests: list[bytes], events: int, where: Path,
                 log_path: Path | None) -> dict:
    """The whole enforcer on a ring the C producer keeps full with the recorded requests."""
    sc = load_scenario(sc_path)
    backend = ReplayBackend(build_scenario(sc, record=False), requests, events)
    log_file = open(log_path, "w") if log_path else None   # noqa: SIM115
    log = DecisionLog(log_file, plan_hash=plan["content_hash"])
    enforcer = Enforcer(plan, backend, symbols, guest="fastpath", log=log, state_dir=where / f"state-{bool(log_path)}")
    enforcer.start()
    t0 = time.perf_counter()
    while not backend.done():
        enforcer.service()
    elapsed = time.perf_counter() - t0
    native = enforcer.native.decided_natively() if enforcer.native else 0
    enforcer.stop()
    if log_file:
        log_file.close()
    assert enforcer.requests == enforcer.responses == enforcer.records == events, enforcer.counters()
    assert backend.wrong == 0 and not backend.paused_vcpus()
    if log_path:
        with open(log_path) as f:
            assert sum(1 for _ in f) == events
    return {"per_s": events / elapsed, "native_share": native / events,
            "handed_over": enforcer.native.punts if enforcer.native else {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", type=int, default=100_000, help="extra watched regions (default 100,000)")
    ap.add_argument("--events", type=int, default=1_000_000, help="events through the whole enforcer")
    ap.add_argument("--rounds", type=int, default=300, help="storm rounds recorded (7 requests each)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        t0 = time.perf_counter()
        plan, symbols = compiled(policy_with_regions(args.regions, where))
        sc_path = scenario(args.rounds, args.regions, where)
        requests = record(plan, symbols, sc_path, where)
        setup_s = time.perf_counter() - t0

        n = 5_000_000
        floor = max(n / _timed(lambda: abi.floor_loop(n)) for _ in range(3))

        sc = load_scenario(sc_path)
        from policyc.runtime.bind import bind_plan
        bound = bind_plan(plan, build_scenario(sc, record=False), symbols)
        python_engine = DecisionEngine(bound.plan, bound)
        py_rate = rate(lambda: python_engine.decide_batch(requests), len(requests))
        native = NativeEngine(DecisionEngine(bound.plan, bound))
        blob = b"".join((requests * (4096 // len(requests) + 1))[:4096])
        native_rate = rate(lambda: native.decide_blob(blob), 4096)

        logged = enforcer_run(plan, symbols, sc_path, requests, args.events, where, where / "decisions.jsonl")
        counted = enforcer_run(plan, symbols, sc_path, requests, args.events, where, None)

        shares = {}
        ki_plan, ki_symbols = compiled(ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi")
        ki_sc = example_storm(args.rounds, where)
        shares["linux-kernel-integrity"] = enforcer_run(
            ki_plan, ki_symbols, ki_sc, record(ki_plan, ki_symbols, ki_sc, where), 100_000, where, None)["native_share"]
        st_plan, st_symbols = compiled(SYSCALL_TRACING)
        st_sc = syscall_storm(args.rounds, where)
        shares["linux-syscall-tracing"] = enforcer_run(
            st_plan, st_symbols, st_sc, record(st_plan, st_symbols, st_sc, where), 100_000, where, None)["native_share"]

    out = {
        "regions": args.regions, "events": args.events, "recorded_requests": len(requests),
        "floor_per_s": round(floor), "python_engine_per_s": round(py_rate), "native_engine_per_s": round(native_rate),
        "enforcer_logged_per_s": round(logged["per_s"]), "enforcer_counted_per_s": round(counted["per_s"]),
        "native_share": round(logged["native_share"], 4),
        "native_share_by_example": {k: round(v, 4) for k, v in shares.items()},
        "handed_over": logged["handed_over"], "setup_s": round(setup_s, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"floor {out['floor_per_s']:,}/s; engines alone: python {out['python_engine_per_s']:,}/s, "
          f"native {out['native_engine_per_s']:,}/s; enforcer (ring fed in C): logged "
          f"{out['enforcer_logged_per_s']:,}/s, counted {out['enforcer_counted_per_s']:,}/s; native share "
          f"{out['native_share']} ({out['native_share_by_example']}); load {out['load_average']}",
          file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
