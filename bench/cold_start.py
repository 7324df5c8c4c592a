"""Cold start of `policyc check examples/policies/*`: a fresh interpreter each run.

Measures, from the repository root:

1. the wall time of the command with Lark's grammar cache present (the
   normal case): N runs (default 10) after one warm-up run, min/median/max;
2. the same after deleting the cache first, every run (the first-ever run on
   a machine): Lark's ``cache=True`` file lives in ``tempfile.gettempdir()``
   as ``.lark_cache_*``. Only policyc's own cache file is deleted (its name is
   read from Lark's debug log); other programs' caches are left alone, unless
   ``--all-lark-caches`` says to delete every ``.lark_cache_*`` file;
3. for scale: a bare interpreter (``python -c pass``) and the imports alone
   (``python -c "import policyc.cli, policyc.check"``);
4. ``python -X importtime`` of the command: the 10 modules with the largest
   cumulative and the 10 with the largest own ("self") import time (median
   of ``--importtime-runs`` runs).

Uses ``hyperfine`` when it is installed (``--no-hyperfine`` to use its own
timing, a ``time.perf_counter`` around ``subprocess.run``). The command is the
console script installed next to this interpreter, so a version manager's
shim (pyenv) does not count; ``--via-path`` also times the ``policyc`` found on
PATH when it is a different file.

The examples' own exit status is reported, not asserted: this is a
measurement, not a test.

    python bench/cold_start.py [--runs N] [--cold-runs K] [--json] [--no-hyperfine]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = "examples/policies"


def console_script() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "policyc"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from policyc.cli import main; sys.exit(main())"]


def check_args() -> list[str]:
    """`check examples/policies/*`, expanded as a shell would (sorted, no dot files)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / EXAMPLES).iterdir() if not p.name.startswith("."))
    return ["check", *files]


# ---------------------------------------------------------------- Lark's cache

def policyc_lark_cache() -> Path | None:
    """The file Lark caches policyc's parser in, from Lark's own debug log in a fresh interpreter."""
    code = (
        "import logging, lark\n"
        "lark.logger.setLevel(logging.DEBUG)\n"
        "try:\n"  # the Lark parser itself: policyc.dsl reads well-formed files without building it
        "    from policyc.dsl_lark import parse_with_lark as parse\n"
        "except ImportError:\n"
        "    from policyc.dsl import parse_policy_text as parse\n"
        "from policyc.diagnostics import Diagnostics\n"
        "parse('policy \"x\" {}', 'x', Diagnostics())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    for line in out.stderr.splitlines():
        for marker in ("Loading grammar from cache: ", "Saving grammar to cache: "):
            if marker in line:
                return Path(line.split(marker, 1)[1].strip())
    return None


def all_lark_caches() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(".lark_cache_*"))


# ---------------------------------------------------------------- timing

def own_timing(cmd: list[str], runs: int, prepare=None, env: dict | None = None,
               cpu: list[float] | None = None) -> tuple[list[float], int]:
    """Wall seconds of each run (and, into `cpu`, the CPU seconds of each: user + system of the child,
    which a shared machine's load moves much less than the wall time)."""
    times: list[float] = []
    status = 0
    for _ in range(runs):
        if prepare is not None:
            prepare()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        status = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env).returncode
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if cpu is not None:
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return times, status


def hyperfine_timing(cmd: list[str], runs: int, prepare_cmd: str | None,
                     env: dict | None = None) -> list[float] | None:
    exe = shutil.which("hyperfine")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf.json"
        base = [exe, "--runs", str(runs), "--export-json", str(out), "--style", "none", "--ignore-failure"]
        base += ["--prepare", prepare_cmd] if prepare_cmd else ["--warmup", "1"]
        for shell_opt in (["-N"], []):  # -N (no intermediate shell) needs hyperfine >= 1.13
            proc = subprocess.run(base + shell_opt + [shlex.join(cmd)], cwd=REPO, capture_output=True, text=True,
                                  env=env)
            if proc.returncode == 0 and out.exists():
                return list(json.loads(out.read_text())["results"][0]["times"])
    return None


def timed(cmd: list[str], runs: int, use_hyperfine: bool, prepare=None, prepare_cmd: str | None = None,
          warmup: bool = True, env: dict | None = None) -> dict:
    tool = "own"
    cpu: list[float] = []
    times = hyperfine_timing(cmd, runs, prepare_cmd, env) if use_hyperfine else None
    status = None
    if times is not None:
        tool = "hyperfine"
    else:
        if warmup and prepare is None:
            own_timing(cmd, 1, env=env)
        times, status = own_timing(cmd, runs, prepare, env, cpu)
    return {"tool": tool, "runs": len(times), "min_s": min(times), "median_s": statistics.median(times),
            "cpu_median_s": statistics.median(cpu) if cpu else None,
            "max_s": max(times), "times_s": times, "exit_status": status}


# ---------------------------------------------------------------- -X importtime

def importtime(cmd_args: list[str], runs: int) -> dict:
    """Per module: median self and cumulative import time (microseconds) over `runs` runs."""
    code = "import sys; from policyc.cli import main; sys.exit(main(sys.argv[1:]))"
    samples: dict[str, list[tuple[int, int]]] = {}
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *cmd_args], cwd=REPO,
                              capture_output=True, text=True)
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "imported package" in line:
                continue
            _, self_us, cum_us, name = [p.strip() for p in line.replace("import time:", "|", 1).split("|")]
            samples.setdefault(name.strip(), []).append((int(self_us), int(cum_us)))
    table = {name: (statistics.median(s for s, _ in v), statistics.median(c for _, c in v))
             for name, v in samples.items()}
    top_cum = sorted(table.items(), key=lambda kv: -kv[1][1])[:10]
    top_self = sorted(table.items(), key=lambda kv: -kv[1][0])[:10]
    total = sum(s for s, _ in table.values())
    return {
        "runs": runs, "modules": len(table), "total_self_ms": total / 1000,
        "top_cumulative": [{"module": n, "self_ms": s / 1000, "cumulative_ms": c / 1000} for n, (s, c) in top_cum],
        "top_self": [{"module": n, "self_ms": s / 1000, "cumulative_ms": c / 1000} for n, (s, c) in top_self],
    }


# ---------------------------------------------------------------- output

def fmt_row(label: str, m: dict) -> str:
    cpu = f"{m['cpu_median_s'] * 1000:.0f} ms" if m.get("cpu_median_s") is not None else "-"
    return (f"| {label} | {m['min_s'] * 1000:.0f} ms | {m['median_s'] * 1000:.0f} ms | {m['max_s'] * 1000:.0f} ms "
            f"| {cpu} | {m['runs']} | {m['tool']} |")


def table(report: dict) -> str:
    lines = [f"policyc cold start ({report['machine']['cpus']} CPUs, Python {report['machine']['python']}); "
             f"command: {report['command']}", "",
             f"the command says: {report.get('command_summary', '?')}", "",
             "| run | min | median | max | CPU median | runs | timing |", "|---|---|---|---|---|---|---|"]
    for key, label in (("python_bare", "python -c pass"),
                       ("imports", "python -c 'import policyc.cli, policyc.check, policyc.dsl'"),
                       ("warm_cache", "policyc check examples/policies/* (Lark cache present)"),
                       ("warm_cache_pyc", "the same, bytecode cached (PYTHONPYCACHEPREFIX)"),
                       ("no_cache", "policyc check examples/policies/* (Lark cache deleted first)"),
                       ("via_path", "the same through the PATH entry (shim)")):
        if key in report:
            lines.append(fmt_row(label, report[key]))
    if report.get("dont_write_bytecode") and not report.get("policyc_pycache_in_tree"):
        lines += ["", "PYTHONDONTWRITEBYTECODE is set and policyc/ has no __pycache__: the runs above other "
                      "than the 'bytecode cached' one compile policyc's modules at every start"]
    it = report.get("importtime")
    if it:
        lines += ["", f"-X importtime (median of {it['runs']} runs; {it['modules']} modules, "
                      f"{it['total_self_ms']:.0f} ms of own import time in all):", "",
                  "| module (top 10 cumulative) | cumulative | self |", "|---|---|---|"]
        lines += [f"| {m['module']} | {m['cumulative_ms']:.1f} ms | {m['self_ms']:.1f} ms |"
                  for m in it["top_cumulative"]]
        lines += ["", "| module (top 10 self) | self | cumulative |", "|---|---|---|"]
        lines += [f"| {m['module']} | {m['self_ms']:.1f} ms | {m['cumulative_ms']:.1f} ms |" for m in it["top_self"]]
    for note in report["notes"]:
        lines += ["", f"note: {note}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="runs with the cache present (default 10)")
    ap.add_argument("--cold-runs", type=int, default=5, help="runs after deleting Lark's cache (default 5)")
    ap.add_argument("--importtime-runs", type=int, default=5, help="runs of -X importtime (default 5)")
    ap.add_argument("--no-hyperfine", action="store_true", help="use this script's own timing even if "
                                                                 "hyperfine is installed")
    ap.add_argument("--all-lark-caches", action="store_true",
                    help="delete every .lark_cache_* file in the temp directory, not only policyc's")
    ap.add_argument("--via-path", action="store_true", help="also time the 'policyc' found on PATH")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (the table to stderr)")
    args = ap.parse_args()
    use_hf = not args.no_hyperfine and shutil.which("hyperfine") is not None

    cmd = console_script() + check_args()
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": "policyc check examples/policies/*", "argv": cmd,
        "hyperfine": shutil.which("hyperfine"), "notes": [],
    }
    if not use_hf:
        report["notes"].append("hyperfine is not installed: timed with time.perf_counter around subprocess.run"
                               if shutil.which("hyperfine") is None else "hyperfine not used (--no-hyperfine)")

    report["python_bare"] = timed([sys.executable, "-c", "pass"], args.runs, use_hf)
    report["imports"] = timed([sys.executable, "-c", "import policyc.cli, policyc.check, policyc.dsl"], args.runs,
                              use_hf)
    once = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)  # what the command says it did
    report["command_summary"] = (once.stderr.strip().splitlines() or [""])[-1]
    report["warm_cache"] = timed(cmd, args.runs, use_hf)  # warms (and so writes) the cache first
    if report["warm_cache"]["exit_status"] not in (None, 0):
        report["notes"].append(f"the command exits {report['warm_cache']['exit_status']} "
                               "(the examples report errors); timed all the same")

    # Bytecode: with PYTHONDONTWRITEBYTECODE set (as in some containers) and no
    # __pycache__ next to the sources (an editable install), every start
    # compiles policyc's own modules again. The same command with bytecode
    # cached in a private PYTHONPYCACHEPREFIX (nothing written into the tree):
    report["dont_write_bytecode"] = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    report["policyc_pycache_in_tree"] = (REPO / "policyc" / "__pycache__").is_dir()
    with tempfile.TemporaryDirectory(prefix="policyc-pycache-") as prefix:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = prefix
        report["warm_cache_pyc"] = timed(cmd, args.runs, use_hf, env=env)  # its warm-up writes the bytecode

    cache = policyc_lark_cache()
    if args.all_lark_caches or cache is None:
        if cache is None:
            report["notes"].append("policyc's Lark cache file was not found in Lark's log: deleting every "
                                   ".lark_cache_* file in the temp directory instead")

        def prepare() -> None:
            for p in all_lark_caches():
                p.unlink(missing_ok=True)
        # Through sh: with -N hyperfine runs the prepare command without a shell, and the glob needs one.
        prepare_cmd = "sh -c " + shlex.quote(f"rm -f {shlex.quote(tempfile.gettempdir())}/.lark_cache_*")
    else:
        report["lark_cache_file"] = str(cache)

        def prepare() -> None:
            cache.unlink(missing_ok=True)
        prepare_cmd = f"rm -f {shlex.quote(str(cache))}"
    report["no_cache"] = timed(cmd, args.cold_runs, use_hf, prepare=prepare, prepare_cmd=prepare_cmd)
    # Leave the cache in place again for everyone after us.
    own_timing(cmd, 1)

    if args.via_path:
        on_path = shutil.which("policyc")
        if on_path and Path(on_path).resolve() != Path(cmd[0]).resolve():
            report["via_path"] = timed([on_path, *check_args()], args.runs, use_hf)
            report["via_path_argv0"] = on_path
        else:
            report["notes"].append("the policyc on PATH is the console script itself: no shim to time")

    report["importtime"] = importtime(check_args(), args.importtime_runs)

    text = table(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    logging.getLogger("lark").setLevel(logging.CRITICAL)
    sys.exit(main())
