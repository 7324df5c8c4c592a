"""The bare C floor of the vm_event ring: requests per second.

Runs ``vm_ring_floor_loop`` (native/ring.c): on one in-memory ring page, the
simulated Xen side puts a request and publishes it, the monitor side takes
it, answers with the echo Xen needs (version, vcpu_id, reason, the paused
flag) and publishes the answer, and the Xen side takes it back; every step
with the ring protocol's barriers. No policy, no Python per event: nothing
built on the ring can answer faster than this on this machine.

    python bench/ring_floor.py [--rounds N] [--repeat K] [--python]

``--python`` also measures the same round trip through ``abi.Ring`` in
batches of one ring's worth of events, for comparison.

This is a measurement, not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

from policyc.native import abi


def c_floor(rounds: int) -> float:
    t0 = time.perf_counter()
    ok = abi.floor_loop(rounds)
    dt = time.perf_counter() - t0
    if ok != rounds:
        raise SystemExit(f"floor loop: {ok} of {rounds} round trips echoed correctly")
    return rounds / dt


def python_ring(rounds: int) -> float:
    ring = abi.Ring()
    batch = [
        abi.make_request(
            abi.Reason.MEM_ACCESS, i, flags=abi.Flag.VCPU_PAUSED,
            payload={"gfn": i, "flags": abi.MemAccess.W},
        )
        for i in range(ring.slots)
    ]
    done = 0
    t0 = time.perf_counter()
    while done < rounds:
        ring.put_requests(batch)
        ring.push_requests()
        reqs = ring.take_requests()
        ring.put_responses(
            abi.make_response(r, flags=abi.Flag.EMULATE) for r in reqs
        )
        ring.push_responses()
        done += len(ring.take_responses())
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5_000_000,
                    help="round trips per run of the C loop")
    ap.add_argument("--repeat", type=int, default=5, help="runs to take the median of")
    ap.add_argument("--python", action="store_true",
                    help="also measure the round trip through abi.Ring")
    args = ap.parse_args()

    c_floor(min(args.rounds, 100_000))  # warm up
    rates = [c_floor(args.rounds) for _ in range(args.repeat)]
    print(
        f"vm_event ring C floor: {statistics.median(rates):,.0f} requests/s "
        f"(median of {args.repeat} x {args.rounds:,} round trips; "
        f"best {max(rates):,.0f}; {1e9 / statistics.median(rates):.0f} ns each)"
    )
    if args.python:
        n = max(8, args.rounds // 100)
        prates = [python_ring(n) for _ in range(args.repeat)]
        print(
            f"vm_event ring through abi.Ring (Python values, batches of 8): "
            f"{statistics.median(prates):,.0f} requests/s"
        )


if __name__ == "__main__":
    main()
