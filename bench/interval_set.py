"""How the cost of `IntervalSet.add` (policyc/lowering/geometry.py) grows with the set, by the order the
intervals come in. The conflict and shadowing sweeps add every rule's intervals in policy order, so a
policy listing its rules from the highest address down adds each interval before all the others.

    python bench/interval_set.py [--sizes 10000,100000,400000] [--json]

For each order (ascending, descending, random) and size n: CPU seconds for n adds of disjoint
one-point intervals into an empty set, and µs per add. A per-add cost that stays flat as n grows is
near-linear; one that grows tenfold with n is quadratic.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def measure(order: str, n: int) -> float:
    from policyc.lowering.geometry import IntervalSet

    starts = [2 * k for k in range(n)]
    if order == "descending":
        starts.reverse()
    elif order == "random":
        random.Random(n).shuffle(starts)
    s = IntervalSet()
    clock = time.process_time()
    for lo in starts:
        s.add(lo, lo + 1)
    return time.process_time() - clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,400000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for order in ("ascending", "descending", "random"):
        for n in (int(x) for x in args.sizes.split(",")):
            cpu = measure(order, n)
            rows.append({"order": order, "adds": n, "cpu_s": round(cpu, 3), "us_per_add": round(cpu / n * 1e6, 2)})
    figures = {"rows": rows, "load_average": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for r in rows:
            print(f"{r['order']:<11} {r['adds']:>9,} adds  {r['cpu_s']:>8.3f} s CPU  {r['us_per_add']:>7.2f} µs/add")
        print(f"load average {figures['load_average']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
