"""What the language server spends on a policy over a full distribution ISF (160,000 symbols).

Measured in-process, on the functions `policyc lsp` answers with (`policyc.authoring`):

- the first `analyze` of a policy naming the ISF (decompressing and loading the
  table, sorting its names once, checking and compiling the policy);
- a re-analysis, as on every keystroke (the table cached);
- `complete` after `symbol P` for several prefixes: median and worst of
  ``--repeat`` calls each, and how many names matched.

The protocol round trip (JSON over stdio) is measured by tests/test_lsp.py, which
drives the real server; this reports where the time goes. Nothing is asserted.

    python bench/lsp_completion.py [--isf PATH] [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_ISF = Path("/work/shared/data/debian12-6.1.0-56-amd64.json.xz")
PREFIXES = ("s", "sys_", "sys_c", "__x64_sys_", "commit_cr", "zzz")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isf", type=Path, default=DEFAULT_ISF, help=f"symbol file (default {DEFAULT_ISF})")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.isf.is_file():
        print(f"no symbol file at {args.isf}: pass --isf", file=sys.stderr)
        return 2
    from policyc.authoring import analyze, complete

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.vmi"
        head = f'policy "bench" {{\n    target xen >= 4.17 on x86_64\n    symbols "{args.isf.resolve()}"\n\n'
        text = head + "    region r = symbol sys_call_table size 8\n\n    rule w: on write to r {\n        deny\n    }\n}\n"
        t0 = time.perf_counter()
        analysis = analyze(text, path)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyze(text, path)
        again = time.perf_counter() - t0
        names = sum(len(t.symbols) for t in analysis.tables)
        results = {}
        for prefix in PREFIXES:
            line = f"    region x = symbol {prefix}"
            probe = analyze(head + line + "\n}\n", path)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                found, cut = complete(probe, 5, len(line) + 1)
                times.append(time.perf_counter() - t0)
            results[prefix] = {"median_ms": round(statistics.median(times) * 1000, 3),
                               "max_ms": round(max(times) * 1000, 3), "items": len(found), "cut_short": cut}
    report = {"symbols": names, "first_analysis_s": round(first, 3), "reanalysis_s": round(again, 3),
              "completion": results, "repeat": args.repeat}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{names:,} symbols; first analysis {first:.2f} s (load, sort, check), re-analysis {again * 1000:.0f} ms")
    for prefix, r in results.items():
        print(f"  complete 'symbol {prefix}': median {r['median_ms']:.2f} ms, worst {r['max_ms']:.2f} ms, "
              f"{r['items']} items{' (cut short)' if r['cut_short'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
