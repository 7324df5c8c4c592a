"""Compile time and plan size for a policy watching 1,000,000 pages with 10,000 rules.

Reports figures; asserts only that the generated policy checks and compiles
(a generator bug would otherwise measure the wrong thing).

    python bench/compile_scale.py [--rules 10000] [--pages 1000000] [--target x86_64] [--json]

Regions are offsets from a real symbol of Debian's 6.1.0-56 kernel
(`_text`, 8 GiB below it onwards), so the symbol table is the real one; the
layout is synthetic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def generate(directory: Path, rules: int, pages: int) -> Path:
    pages_per_region = max(1, pages // rules)
    span = pages_per_region * PAGE
    lines = ['policy "compile-scale" {', "    target xen >= 4.17 on x86_64",
             '    symbols "linux-6.1.System.map"', "    mode enforce", ""]
    for i in range(rules):
        # A gap of one page between regions keeps every region on pages of its own; starting 8 GiB
        # below _text keeps 1,000,000 pages inside the address space.
        lines.append(f"    region r{i} = symbol _text - 0x200000000 + 0x{i * (span + PAGE):x} size 0x{span:x}")
    lines.append("")
    kinds = ["write to", "execute in", "read of", "write to"]
    for i in range(rules):
        kind = kinds[i % len(kinds)]
        where = f" where rip not in r{(i + 1) % rules}" if i % 5 == 0 else ""
        verdict = "deny" if kind != "read of" else 'log info "read {gla:#x}"'
        lines.append(f"    rule w{i}: on {kind} r{i}{where} {{ {verdict} }}")
    lines.append("}")
    path = directory / "compile-scale.vmi"
    path.write_text("\n".join(lines) + "\n")
    shutil.copy(ROOT / "examples" / "policies" / "linux-6.1.System.map", directory)
    return path


def measure(path: Path, target: str) -> dict:
    from policyc.check import check_policy
    from policyc.diagnostics import Diagnostics
    from policyc.lower import compile_plan
    from policyc.plan import dump_plan

    tracemalloc.start()
    d = Diagnostics()
    t0 = time.perf_counter()
    policy = check_policy(path, d)
    t1 = time.perf_counter()
    if policy is None:
        raise SystemExit("the generated policy does not check: " + "; ".join(x.message for x in d.sorted()[:5]))
    plan = compile_plan(policy, d, target=target)
    t2 = time.perf_counter()
    if plan is None:
        raise SystemExit("the generated policy does not compile: " + "; ".join(x.message for x in d.sorted()[:5]))
    text = dump_plan(plan)
    t3 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pages = sum(r["pages"] or 0 for r in plan["regions"].values())
    return {"rules": len(policy.rules), "regions": len(policy.regions), "pages_watched": pages,
            "check_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), "serialise_s": round(t3 - t2, 2),
            "plan_bytes": len(text.encode()), "peak_traced_mib": round(peak / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--pages", type=int, default=1_000_000)
    parser.add_argument("--target", default="x86_64")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(generate(Path(tmp), args.rules, args.pages), args.target)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:>16}: {value:,}" if isinstance(value, int) else f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
