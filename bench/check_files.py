"""`policyc check` as a CI job runs it: a tree of many generated policies, or one very large one.

Reports figures; asserts only that the command checked what was generated
(a generator bug would otherwise measure the wrong thing).

    python bench/check_files.py [--files 500] [--jobs 2] [--json]      # 500 policies, `policyc check -j 2 DIR`
    python bench/check_files.py --big [--rules 82000] [--json]          # one ~10 MB policy, `policyc check FILE`
    python bench/check_files.py --big --descending [--json]            # the same, rules from the highest address down

Many files: `--files` policies of `--rules` rules and `--regions` regions each
(bench/check_scale.py's generator, one seed per file, every form of region,
trigger, condition and action), all naming one real System.map, in one
directory. One big file: bench/compile_scale.py's generator (a region and a
rule a line, 1,000,000 watched pages) at `--rules` rules, about 10 MB at
82,000. Each is timed as a whole command in a fresh process (imports and
start-up included): wall seconds, CPU seconds of the command and its worker
processes, and the largest process's peak RSS.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import check_scale  # noqa: E402  (the generators live next to this file)
import compile_scale  # noqa: E402


def generate_many(directory: Path, files: int, rules: int, regions: int) -> None:
    shutil.copy(check_scale.SYSTEM_MAP, directory)
    for i in range(files):
        text = check_scale.Generator(rules, regions, seed=i + 1, symbols_file=check_scale.SYSTEM_MAP.name).text()
        (directory / f"policy-{i:04d}.vmi").write_text(text.replace('"check-scale"', f'"policy-{i:04d}"', 1),
                                                        encoding="utf-8")


def run_check(args: list[str]) -> dict:
    """Wall and CPU time and peak RSS of one `policyc check` run in a fresh interpreter."""
    command = [sys.executable, "-m", "policyc", "check", "--format", "json", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    try:
        diagnostics = json.loads(done.stdout)["diagnostics"]
    except (ValueError, KeyError):
        raise SystemExit(f"policyc check did not report JSON (exit {done.returncode}): {done.stderr[-2000:]}")
    errors = [d for d in diagnostics if d["severity"] == "error"]
    if errors:
        raise SystemExit("the generated policies do not check: " + "; ".join(d["message"] for d in errors[:5]))
    return {"check_s": round(wall, 2), "cpu_s": round(cpu, 2),
            # ru_maxrss of the children is the largest single process among them (KiB on Linux).
            "peak_rss_mib": round(after.ru_maxrss / 1024, 1), "exit": done.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--rules", type=int, default=None, help="rules per file (default 20), or in the big file "
                        "(default 82,000)")
    parser.add_argument("--regions", type=int, default=60, help="regions per file (many files)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--big", action="store_true", help="one large policy instead of many files")
    parser.add_argument("--descending", action="store_true", help="(--big) the rules listed from the highest "
                        "address down")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        if args.big:
            rules = args.rules or 82_000
            path = compile_scale.generate(directory, rules, 1_000_000, descending=args.descending)
            generated = time.perf_counter() - start
            figures = {"case": "one policy", "rules": rules, "order": "descending" if args.descending else "ascending",
                       "policy_bytes": path.stat().st_size,
                       **run_check([str(path)])}
        else:
            rules = args.rules or 20
            generate_many(directory, args.files, rules, args.regions)
            generated = time.perf_counter() - start
            size = sum(p.stat().st_size for p in directory.glob("*.vmi"))
            figures = {"case": "many files", "files": args.files, "rules_per_file": rules,
                       "regions_per_file": args.regions, "policy_bytes": size, "jobs": args.jobs,
                       **run_check(["-j", str(args.jobs), str(directory)])}
        figures["generate_s"] = round(generated, 2)
        figures["cpus"] = os.cpu_count()
        figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
    compile_scale.report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
