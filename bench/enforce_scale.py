"""Decisions per second through the simulated ring: the enforcer against a trivial responder.

The Linux kernel-integrity example policy, extended with N extra watched
regions (8 bytes each, 64 bytes apart in .rodata, one
`deny` rule over all of them), enforced by `policyc.runtime.enforce.Enforcer`
on the simulated `linux-x86_64` guest with 8 vCPUs. The workload is the
storm of tests/data/scenarios/storm.yaml: per round, 8 vCPUs at once (the
`parallel` op, so requests meet on the ring and are answered in batches)
write a watched region (denied), hit the commit_creds breakpoint, rewrite
LSTAR with its own value (allowed), clear CR0.WP and CR4.SMEP (denied),
write the IDT (denied), read the table (no event) and write next to it
(collateral). A round is 7 requests.

Beside each figure: the same workload with the simulator's trivial
responder (an echo that lets everything through, as `bench/sim_ring.py`
measures), so the difference is what binding, deciding, logging and the
response strategies cost per event. And the decision engine alone on the
recorded requests (no guest, no ring): the policy's own share.

    python bench/enforce_scale.py [--regions 1,1000,100000] [--rounds 3000] [--log FILE]

A measurement, not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"
STORM = ROOT / "tests" / "data" / "scenarios" / "storm.yaml"
MAP = ROOT / "examples" / "policies" / "linux-6.1.System.map"

from policyc.check import check_policy  # noqa: E402
from policyc.diagnostics import Diagnostics  # noqa: E402
from policyc.compiler import compile_plan  # noqa: E402
from policyc.runtime.decide import DecisionEngine  # noqa: E402
from policyc.runtime.decision_log import DecisionLog  # noqa: E402
from policyc.runtime.enforce import Enforcer  # noqa: E402
from policyc.runtime.sim import echo_response  # noqa: E402
from policyc.runtime.sim.scenario import ScenarioRunner, build_scenario, load_scenario  # noqa: E402
from policyc.native.constants import F_EMULATE  # noqa: E402
from policyc.symbols import load_symbol_table  # noqa: E402

SPACING = 64          # 100,000 regions fit in .rodata (9.3 MiB), which the layout maps whole


def policy_with_regions(n: int, where: Path) -> Path:
    """The example policy plus `n` regions in one extra rule (n = 1 adds one region)."""
    text = POLICY.read_text().replace('symbols "linux-6.1.System.map"', f'symbols "{MAP}"')
    regions = [f"    region w{i} = symbol __start_rodata + {0x10000 + i * SPACING:#x} size 8" for i in range(n)]
    rule = ("    rule watched: on write to " + ", ".join(f"w{i}" for i in range(n)) + " {\n"
            "        deny\n        alert high \"watched write at {gla:#x}\"\n    }\n")
    head, tail = text.rsplit("}", 1)
    out = where / f"policy-{n}.vmi"
    out.write_text(head + "\n".join(regions) + "\n" + rule + "}" + tail)
    return out


def scenario(rounds: int, n: int, where: Path) -> Path:
    text = STORM.read_text().replace("count: 1000", f"count: {rounds}")
    text = text.replace("../../../examples/", f"{ROOT}/examples/")
    # vCPU 0 writes a watched region (the last one: any of them costs the same lookup)
    text = text.replace('va: "symbol sys_call_table + 8*59", size: 8, value: "symbol x64_sys_call"',
                        f'va: "symbol __start_rodata + {0x10000 + (n - 1) * SPACING:#x}", size: 8, value: 1')
    out = where / f"storm-{n}.yaml"
    out.write_text(text)
    return out


def measure(n: int, rounds: int, log_path: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        t0 = time.perf_counter()
        d = Diagnostics()
        model = check_policy(policy_with_regions(n, where), d)
        assert model is not None, [x.message for x in d if x.severity.name == "ERROR"][:3]
        plan = compile_plan(model, d)
        assert plan is not None
        t_compile = time.perf_counter() - t0
        symbols = [load_symbol_table(s.path) for s in model.symbols]
        sc = load_scenario(scenario(rounds, n, where))

        # the enforcer
        xen = build_scenario(sc, record=False)
        recorded: list[bytes] = []
        log_file = open(log_path, "w") if log_path else None   # noqa: SIM115
        log = DecisionLog(log_file, plan_hash=plan["content_hash"])
        enforcer = Enforcer(plan, xen, symbols, guest="bench", log=log, state_dir=where / "state",
                            observer=lambda pairs, reqs: recorded.extend(reqs) if len(recorded) < 20000 else None)
        t0 = time.perf_counter()
        enforcer.start()
        t_install = time.perf_counter() - t0
        runner = ScenarioRunner(sc, xen, lambda _x: enforcer.service())
        t0 = time.perf_counter()
        runner.run()
        t_run = time.perf_counter() - t0
        t0 = time.perf_counter()
        enforcer.stop()
        t_teardown = time.perf_counter() - t0
        if log_file:
            log_file.close()
        events = enforcer.requests
        assert events == enforcer.responses == enforcer.records

        # the trivial responder on the same workload
        xen2 = build_scenario(sc, record=False)
        bound_plan = enforcer.bound
        # the same traps, so the same events: install again on the fresh guest, answer with echoes
        e2 = Enforcer(plan, xen2, symbols, guest="bench2", state_dir=where / "state2")
        e2.start()
        inst = e2.installation

        def trivial(x) -> None:
            while True:
                reqs = inst.take_requests(64)
                if not reqs:
                    return
                inst.put_responses([echo_response(r, F_EMULATE) for r in reqs])

        runner2 = ScenarioRunner(sc, xen2, trivial)
        t0 = time.perf_counter()
        runner2.run()
        t_trivial = time.perf_counter() - t0
        trivial_events = xen2.responses_consumed
        e2.installation.teardown()

        # the engine alone on the recorded requests
        engine = DecisionEngine(enforcer.installation.engine_plan(), bound_plan)
        t0 = time.perf_counter()
        reps = 0
        while time.perf_counter() - t0 < 1.0:
            engine.decide_batch(recorded)
            reps += 1
        t_engine = (time.perf_counter() - t0) / (reps * len(recorded))

        return {"regions": n, "extents_bound": sum(len(bound_plan.region_frames(r)) for r in plan["regions"]),
                "compile_s": round(t_compile, 2), "install_s": round(t_install, 3),
                "teardown_s": round(t_teardown, 3), "events": events,
                "enforcer_events_per_s": round(events / t_run), "enforcer_us_per_event": round(1e6 * t_run / events, 1),
                "trivial_events": trivial_events, "trivial_events_per_s": round(trivial_events / t_trivial),
                "trivial_us_per_event": round(1e6 * t_trivial / trivial_events, 1),
                "engine_us_per_decision": round(1e6 * t_engine, 2),
                "log": bool(log_path)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", default="1,1000,100000")
    ap.add_argument("--rounds", type=int, default=3000, help="storm rounds (7 events each)")
    ap.add_argument("--log", help="write the decision log here (default: not written, only counted)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.regions.split(",")):
        row = measure(n, args.rounds, args.log)
        rows.append(row)
        print(f"regions {row['regions']:>7} ({row['extents_bound']} bound pieces; compile {row['compile_s']} s, "
              f"install {row['install_s']} s, teardown {row['teardown_s']} s): "
              f"enforcer {row['enforcer_events_per_s']:>6}/s ({row['enforcer_us_per_event']} µs/event), "
              f"trivial responder {row['trivial_events_per_s']:>6}/s ({row['trivial_us_per_event']} µs/event), "
              f"engine alone {row['engine_us_per_decision']} µs/decision", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
