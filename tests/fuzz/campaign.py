"""A coverage-guided fuzz campaign over policyc's input handlers (atheris: libFuzzer for Python).

    python3 tests/fuzz/campaign.py [--targets dsl,yaml,...] [--runs N | --seconds S] [--json]

Each target (see fuzz_targets.py) runs in a process of its own, starting from its seed corpus in
tests/fuzz/corpus/<target>/ (read-only: what the run finds goes to a temporary directory, or to
--keep DIR). A crash is an input that broke the target's contract; it is kept in --artifacts (the
current directory by default) and reported with its target. The summary gives, per target,
executions, seconds, executions per second and crashes; the exit status is 1 when any crashed.

Run as a target's worker (`--worker TARGET`), the script is the libFuzzer entry point itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
MAX_LEN = {"dsl": 8192, "yaml": 4096, "plan": 16384, "scenario": 4096, "trace": 8192, "engine": 2048, "native": 8192}
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_CRASH = re.compile(r"Test unit written to (\S+)")
_SLOW = "slow-unit-"                 # libFuzzer keeps its slowest inputs too: reported, not crashes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return _work(args.worker, args.libfuzzer)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("campaign: atheris is not installed (python3 -m pip install atheris)", file=sys.stderr)
        return 2
    from fuzz_targets import targets

    names = list(targets()) if args.targets == "all" else args.targets.split(",")
    unknown = [n for n in names if n not in targets()]
    if unknown:
        print(f"campaign: unknown target(s) {', '.join(unknown)} (known: {', '.join(targets())})", file=sys.stderr)
        return 2
    results = [_run(name, args) for name in names]
    summary = {"targets": results, "executions": sum(r["executions"] for r in results),
               "crashes": [c for r in results for c in r["crashes"]]}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for r in results:
            print(f"{r['target']:>9}: {r['executions']:>10,} executions in {r['seconds']:7.1f} s "
                  f"({r['per_second']:,.0f}/s), {len(r['crashes'])} crash(es)")
        print(f"{'all':>9}: {summary['executions']:>10,} executions, {len(summary['crashes'])} crash(es)")
    return 1 if summary["crashes"] else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="all", help="comma-separated targets, or all (default)")
    p.add_argument("--runs", type=int, default=0, help="executions per target (libFuzzer -runs)")
    p.add_argument("--seconds", type=int, default=0, help="time per target (libFuzzer -max_total_time)")
    p.add_argument("--keep", type=Path, help="keep each target's grown corpus under DIR/<target>")
    p.add_argument("--artifacts", type=Path, default=Path("."), help="where crashing inputs go")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("libfuzzer", nargs="*", help=argparse.SUPPRESS)
    return p


def _run(name: str, args: argparse.Namespace) -> dict:
    """One target in its own process; parses libFuzzer's final stats and crash lines."""
    grown = Path(tempfile.mkdtemp(prefix=f"policyc-fuzz-{name}-"))
    if args.keep:
        grown = args.keep / name
        grown.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    flags = [f"-max_len={MAX_LEN[name]}", "-print_final_stats=1", f"-artifact_prefix={args.artifacts}/{name}-",
             "-rss_limit_mb=3072", "-timeout=30"]
    if args.runs:
        flags.append(f"-runs={args.runs}")
    if args.seconds:
        flags.append(f"-max_total_time={args.seconds}")
    seeds = CORPUS / name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--", *flags, str(grown)]
    if seeds.is_dir():
        cmd.append(str(seeds))
    t0 = time.monotonic()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          cwd=HERE, check=False)
    seconds = time.monotonic() - t0
    out = done.stdout
    executed = sum(int(n) for n in _EXECUTED.findall(out))
    units = _CRASH.findall(out)
    slow = [path for path in units if _SLOW in path]
    crashes = [{"target": name, "input": path, "detail": _crash_detail(out)} for path in units if _SLOW not in path]
    if done.returncode and not crashes:
        crashes.append({"target": name, "input": None, "detail": f"exit {done.returncode}: {out[-2000:]}"})
    if not args.keep:
        shutil.rmtree(grown, ignore_errors=True)
    return {"target": name, "executions": executed, "seconds": round(seconds, 1),
            "per_second": round(executed / seconds, 1) if seconds else 0.0, "crashes": crashes, "slow_units": slow}


def _crash_detail(out: str) -> str:
    start = out.find("=== Uncaught Python exception")
    return out[start:start + 3000] if start >= 0 else out[-3000:]


def _work(name: str, libfuzzer: list[str]) -> int:
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["policyc"]):
        import policyc.check  # noqa: F401 - imported instrumented; the targets import lazily
        import policyc.plan  # noqa: F401
        import policyc.runtime.bind  # noqa: F401
        import policyc.runtime.decide  # noqa: F401
        import policyc.runtime.decision_log  # noqa: F401
        import policyc.runtime.sim.scenario  # noqa: F401
        import policyc.runtime.trace  # noqa: F401
        import policyc.yaml_form  # noqa: F401
    from fuzz_targets import prepare, targets

    prepare(name)
    target = targets()[name]
    atheris.Setup([sys.argv[0], *libfuzzer], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
