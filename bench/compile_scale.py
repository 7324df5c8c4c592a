"""Compile time and plan size for a policy watching 1,000,000 pages with 10,000 rules.

Reports figures; asserts only that the generated policy checks and compiles
(a generator bug would otherwise measure the wrong thing).

    python bench/compile_scale.py [--rules 10000] [--pages 1000000] [--target x86_64] [--json]
    python bench/compile_scale.py --contexts 200 [--json]   # every 10th rule in one of 200 `cr3 ==` contexts

The check, the compile and the serialisation run in a fresh interpreter; each
is timed alone (`check_s`, `compile_s`, `serialise_s`: wall seconds; the
`*_cpu_s` beside them are that process's CPU seconds, steadier on a shared
machine), `peak_rss_mib` is that interpreter's peak RSS, `plan_bytes` the
plan's size. `--rules 82000` makes a policy of about 10 MB.

Regions are offsets from a real symbol of Debian's 6.1.0-56 kernel
(`_text`, 8 GiB below it onwards), so the symbol table is the real one; the
layout is synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def generate(directory: Path, rules: int, pages: int, descending: bool = False, contexts: int = 0) -> Path:
    """The policy file; `descending`: the rules listed from the highest address down (the order of the
    rules is the order the analyses sweep them in); `contexts`: every tenth rule (the second of each ten)
    is in one of that many `cr3 == K` contexts, in turn, each with a view map of its own."""
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
    for i in (reversed(range(rules)) if descending else range(rules)):
        kind = kinds[i % len(kinds)]
        where = f" where rip not in r{(i + 1) % rules}" if i % 5 == 0 else ""
        if contexts and i % 10 == 1:
            where = f" where cr3 == {0x1000 * (1 + i // 10 % contexts):#x}"
        verdict = "deny" if kind != "read of" else 'log info "read {gla:#x}"'
        lines.append(f"    rule w{i}: on {kind} r{i}{where} {{ {verdict} }}")
    lines.append("}")
    path = directory / "compile-scale.vmi"
    path.write_text("\n".join(lines) + "\n")
    shutil.copy(ROOT / "examples" / "policies" / "linux-6.1.System.map", directory)
    return path


def measure(path: Path, target: str) -> dict:
    """check, compile and serialise in this process, each timed alone (wall and CPU)."""
    from policyc.check import check_policy
    from policyc.diagnostics import Diagnostics
    from policyc.compiler import compile_plan
    from policyc.plan import dump_plan

    d = Diagnostics()
    clocks = [(time.perf_counter(), time.process_time())]
    policy = check_policy(path, d)
    clocks.append((time.perf_counter(), time.process_time()))
    if policy is None:
        raise SystemExit("the generated policy does not check: " + "; ".join(x.message for x in d.sorted()[:5]))
    plan = compile_plan(policy, d, target=target)
    clocks.append((time.perf_counter(), time.process_time()))
    if plan is None:
        raise SystemExit("the generated policy does not compile: " + "; ".join(x.message for x in d.sorted()[:5]))
    text = dump_plan(plan)
    clocks.append((time.perf_counter(), time.process_time()))
    pages = sum(r["pages"] or 0 for r in plan["regions"].values())
    wall = [round(b[0] - a[0], 2) for a, b in zip(clocks, clocks[1:])]
    cpu = [round(b[1] - a[1], 2) for a, b in zip(clocks, clocks[1:])]
    return {"rules": len(policy.rules), "regions": len(policy.regions), "pages_watched": pages,
            "policy_bytes": path.stat().st_size,
            "check_s": wall[0], "compile_s": wall[1], "serialise_s": wall[2], "total_s": round(sum(wall), 2),
            "check_cpu_s": cpu[0], "compile_cpu_s": cpu[1], "serialise_cpu_s": cpu[2],
            "total_cpu_s": round(sum(cpu), 2), "plan_bytes": len(text.encode())}


def measure_in_fresh_process(path: Path, target: str) -> dict:
    """`measure` in a new interpreter, so that its peak RSS is the check, compile and serialise alone
    (plus the imports), not this process's generator."""
    done = subprocess.run([sys.executable, __file__, "--measure", str(path), "--target", target],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip() or done.stdout.strip())
    figures = json.loads(done.stdout)
    # ru_maxrss (KiB on Linux) of the children waited for: here, that one interpreter.
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return figures


def report(figures: dict, as_json: bool) -> None:
    """The figures as JSON on stdout, or as an aligned table."""
    if as_json:
        print(json.dumps(figures, indent=2))
        return
    for key, value in figures.items():
        print(f"{key:>18}: {value:,}" if isinstance(value, int) else f"{key:>18}: {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--pages", type=int, default=1_000_000)
    parser.add_argument("--target", default="x86_64")
    parser.add_argument("--contexts", type=int, default=0, help="`cr3 ==` contexts of every tenth rule (0: none)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", metavar="POLICY", help=argparse.SUPPRESS)  # the fresh process's part
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.target)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        policy = generate(Path(tmp), args.rules, args.pages, contexts=args.contexts)
        figures = measure_in_fresh_process(policy, args.target)
        figures["contexts"] = args.contexts
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
