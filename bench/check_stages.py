"""Where `policyc check` spends its time on one policy file: CPU seconds per pass, in this process.

    python bench/check_stages.py POLICY [--repeat 3] [--json]
    python bench/check_stages.py --big [--rules 82000] [--json]     # bench/compile_scale.py's 10 MB policy

Runs what the command runs for one file (`policyc.cli._check_file`: check_policy, then compile_plan
without sealing or report) with the cyclic GC off, as the command does, and times each pass by wrapping
it: parse (`read_policy_file`), the checker's passes, the lowering, and the conflicts, livelock and
collateral analyses. CPU time (`time.process_time`), so a shared machine moves it less than wall time;
with `--repeat`, the run with the least total. Reports figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import check_scale  # noqa: E402  (the generators live next to this file)


def measure(path: Path) -> dict:
    import policyc.check as check
    import policyc.cli as cli
    import policyc.compiler as compiler
    from policyc.analyses import collateral, conflicts, livelock

    times: dict[str, float] = {}
    undo = []

    def wrap(owner, name: str, label: str) -> None:
        real = getattr(owner, name, None)
        if real is None:  # (a pass that has moved: not timed)
            return

        @functools.wraps(real)
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                times[label] = times.get(label, 0.0) + time.process_time() - start
        setattr(owner, name, timed)
        undo.append((owner, name, real))

    try:  # the checker as a package of passes (policyc.checking), or as one class in policyc.check
        from policyc.checking import checker as passes, gather
        wrap(passes, "read_policy_file", "parse_s")
        wrap(gather, "read_policy_file", "parse_s")
        wrap(passes, "run", "checker_s")
    except ImportError:
        wrap(check, "read_policy_file", "parse_s")
        if hasattr(check, "_Checker"):
            wrap(check._Checker, "run", "checker_s")
    wrap(compiler, "lower", "lower_s")
    for module, label in ((conflicts, "conflicts_s"), (livelock, "livelock_s"), (collateral, "collateral_s")):
        wrap(module, "analyse", label)
    try:
        start = time.process_time()
        result = cli._check_file(path, None)
        times["total_s"] = time.process_time() - start
    finally:
        for owner, name, real in undo:
            setattr(owner, name, real)
    times = {k: round(v, 3) for k, v in times.items()}
    times["diagnostics"] = len(result.diagnostics)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", nargs="?", type=Path)
    parser.add_argument("--big", action="store_true", help="generate bench/compile_scale.py's policy")
    parser.add_argument("--rules", type=int, default=82_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if (args.policy is None) == (not args.big):
        parser.error("give a POLICY or --big")
    gc.disable()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.policy
        if args.big:
            import compile_scale
            path = compile_scale.generate(Path(tmp), args.rules, 1_000_000)
        runs = []
        for _ in range(args.repeat):
            check_scale._forget_parses()  # each run parses (symbol files stay loaded after the first)
            runs.append(measure(path))
    best = min(runs, key=lambda r: r["total_s"])
    best["runs_total_s"] = [r["total_s"] for r in runs]
    if args.json:
        print(json.dumps(best, indent=2))
    else:
        for key, value in best.items():
            print(f"{key:>14}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
