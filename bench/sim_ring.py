"""Requests per second through the simulated Xen's vm_event ring.

A storm of guest writes to one trapped page (access ``rx``) on N vCPUs of the
``linux-x86_64`` guest. Every write is an EPT violation: the simulated Xen
walks the guest page tables, packs a MEM_ACCESS request (the real ABI
bytes) onto the 8-slot ring and pauses the vCPU. A trivial responder takes
the requests, answers each with the xen-access echo plus EMULATE and
notifies; Xen consumes the responses, emulates the writes and the vCPUs
run their next write. So each request is one full round trip: fault, ring,
response, emulation.

The floor beside it is `policyc.native.abi.floor_loop` (bench/ring_floor.py):
the same request/response echo through a ring page in C with no guest and
no policy. The ratio says how far the simulator is from that floor.

    python bench/sim_ring.py [--events N] [--vcpus 1,2,4,8] [--repeat K] [--json]

This is a measurement, not a test: it prints figures (with --json, the figures
as JSON on stdout and the lines on stderr) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ring_floor import c_floor  # noqa: E402

from policyc.runtime.sim import Op, SimulatedXen, build_linux_x86_64, echo_response  # noqa: E402
from policyc.native.constants import F_EMULATE  # noqa: E402

MAP = Path(__file__).resolve().parents[1] / "examples" / "policies" / "linux-6.1.System.map"


def storm(template, vcpus: int, events: int) -> tuple[float, SimulatedXen]:
    xen = SimulatedXen(template.clone(), "x86_64", record=False)
    g = xen.guest
    target = g.symbols["init_task"]
    gfn = g.walk(g.vcpus[0].cr3, target).pa >> 12
    xen.set_access(0, [gfn], "rx")
    per_vcpu = events // vcpus
    ops = []
    take, put, notify = xen.take_requests, xen.put_responses, xen.notify
    t0 = time.perf_counter()
    for i in range(vcpus):
        for k in range(per_vcpu):
            ops.append(xen.execute(i, Op("write", i, va=target + 8 * i, value=k, record=False)))
    done = 0
    while True:                                  # the trivial responder
        reqs = take(8)
        if not reqs:
            break
        put([echo_response(r, F_EMULATE) for r in reqs])
        notify()
        done += len(reqs)
    dt = time.perf_counter() - t0
    assert done == per_vcpu * vcpus == xen.responses_consumed, (done, xen.responses_consumed)
    assert all(op.done and op.took_effect for op in ops)
    assert not xen.paused_vcpus()
    return done / dt, xen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=40_000, help="requests per run")
    ap.add_argument("--vcpus", default="1,2,4,8,16", help="comma-separated vCPU counts")
    ap.add_argument("--repeat", type=int, default=3, help="runs to take the median of")
    ap.add_argument("--floor-rounds", type=int, default=2_000_000, help="round trips of the C floor")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (the lines to stderr)")
    args = ap.parse_args()
    lines = sys.stderr if args.json else sys.stdout

    c_floor(100_000)                              # warm up
    floor = statistics.median(c_floor(args.floor_rounds) for _ in range(args.repeat))
    print(f"C floor (abi.floor_loop, bench/ring_floor.py): {floor:,.0f} requests/s "
          f"({1e9 / floor:.0f} ns each)", file=lines, flush=True)
    counts = [int(x) for x in args.vcpus.split(",")]
    template = build_linux_x86_64(MAP, kaslr_slide=0x1E00000, memory="256M", vcpus=max(counts))
    runs = []
    for n in counts:
        t = template if n == max(counts) else build_linux_x86_64(
            MAP, kaslr_slide=0x1E00000, memory="256M", vcpus=n)
        storm(t, n, 2_000)                        # warm up
        rates = [storm(t, n, args.events)[0] for _ in range(args.repeat)]
        rate = statistics.median(rates)
        runs.append({"vcpus": n, "requests_per_s": round(rate), "us_per_request": round(1e6 / rate, 2),
                     "floor_over_sim": round(floor / rate, 1), "rates": [round(r) for r in rates]})
        print(f"simulated ring, {n:2d} vCPU(s), trapped-page write storm, echo+EMULATE responder: "
              f"{rate:,.0f} requests/s ({1e6 / rate:.1f} us each); floor/sim = {floor / rate:,.0f}x",
              file=lines, flush=True)
    if args.json:
        report = {"command": "python bench/sim_ring.py " + " ".join(sys.argv[1:]),
                  "events": args.events, "repeat": args.repeat, "floor_rounds": args.floor_rounds,
                  "floor_per_s": round(floor), "runs": runs,
                  "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
