"""The `policyc` command.

Exit codes: 0 clean (warnings allowed), 1 problems found, 2 usage errors.
Bad input never ends in a traceback: diagnostics are rendered once, here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from .version import __version__
from .diagnostics import Diagnostics, Severity
from .errors import PolicycError
from .cli_shared import POLICY_SUFFIXES, FileResult, emit_diagnostics, policy_files, root_results
from .output_writer import write_output

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser(_command_word(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ends_without_teardown = argv is None and args.command in ("check", "compile")
    if ends_without_teardown:
        # The cyclic collector stays off for the whole command: the process ends at once, and each time a
        # pass's pause ended, one full collection walked the whole checked policy (a second or more for a
        # 10 MB policy, twice) to free nothing. Reference counting frees what the passes drop.
        import gc
        gc.disable()
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except PolicycError as exc:     # each command reports its own; this is the net under them all
        print(f"policyc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    if ends_without_teardown:
        _exit_now(status)
    return status


def _exit_now(status: int) -> NoReturn:
    """End the process without the interpreter's teardown. A checked 10 MB policy is a gigabyte of
    small objects, and freeing them one by one at exit took a third of the command's CPU time. check
    and compile leave nothing to clean up (their files are closed, their worker processes joined,
    nothing of theirs is registered with atexit); the runtime commands do, and exit normally."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        pass
    os._exit(status)


# Commands defined in this module. Any other word (a runtime or bundle command, a typo, --help) builds
# the whole parser; these need neither policyc.cli_runtime nor policyc.cli_bundle (their modules take a
# twentieth of `policyc check`'s start when bytecode is not cached).
_OWN_COMMANDS = frozenset({"check", "fmt", "schema", "compile", "explain", "diff", "lsp"})


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="policyc",
        description="Compile, check, test and enforce VMI policies for Xen: watched memory, control "
                    "registers, MSRs, breakpoints, and what to do when they are touched.")
    p.add_argument("--version", action="version", version=f"policyc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser("check", help="validate policy files (DSL or YAML) and report every problem",
                           description="Validate policy files: syntax, names, types, and whether the target can "
                                       "enforce every rule (the compiler's checks, without writing a plan). "
                                       "Directories are searched for *.vmi, *.yaml, *.yml. Files with other "
                                       "suffixes (symbol maps, ISF JSON) are skipped, and so are include-only "
                                       "files that a checked policy includes.")
    check.add_argument("paths", nargs="+", metavar="PATH", help="policy files or directories")
    check.add_argument("--format", choices=("text", "json", "sarif"), default="text",
                       help="diagnostics format (json and sarif go to stdout; text to stderr)")
    check.add_argument("--target", metavar="ARCH", help="override the policy's target architecture "
                       "(x86_64, x86_64-nomtf, x86_64-svm, arm64)")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.add_argument("-q", "--quiet", action="store_true", help="print diagnostics only, no summary")
    check.add_argument("-j", "--jobs", type=_jobs, default=1, metavar="N",
                       help="check files in N processes (0: one per CPU); the output is the same as with 1")
    check.set_defaults(run=_cmd_check)

    fmt = sub.add_parser("fmt", help="print policies in the one canonical layout, or convert DSL <-> YAML",
                         description="Format policy files. Without --write the result goes to stdout.")
    fmt.add_argument("paths", nargs="+", metavar="PATH")
    fmt.add_argument("--check", action="store_true",
                     help="change nothing; list files that are not formatted and exit 1 if any")
    fmt.add_argument("--to", choices=("dsl", "yaml"), help="convert to this spelling (default: keep)")
    fmt.add_argument("-w", "--write", action="store_true",
                     help="write the result back (with --to, next to the source with the new suffix)")
    fmt.set_defaults(run=_cmd_fmt)

    schema = sub.add_parser("schema", help="print the JSON Schema of the YAML spelling (for editors), or of plans")
    schema.add_argument("--plan", action="store_true", help="print the trap plan's schema instead")
    schema.set_defaults(run=_cmd_schema)

    comp = sub.add_parser("compile", help="lower a policy into a trap plan for a target",
                          description="Lower a policy into a trap plan (deterministic JSON), or with --emit xsm "
                                      "into the FLASK rules an introspection domain needs for it.")
    comp.add_argument("policy", metavar="POLICY")
    comp.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    comp.add_argument("--target", metavar="ARCH", help="override the policy's target (x86_64, x86_64-nomtf, x86_64-svm, arm64)")
    comp.add_argument("--emit", choices=("plan", "xsm"), default="plan",
                      help="plan: the trap plan (default); xsm: FLASK allow rules for an introspection domain")
    comp.add_argument("--format", choices=("text", "json", "sarif"), default="text", help="diagnostics format")
    comp.set_defaults(run=_cmd_compile)

    expl = sub.add_parser("explain", help="show what a policy or plan traps, where each rule landed, and why",
                          description="Explain a policy (compiled on the fly) or a plan file: views and their "
                                      "page counts, monitors, breakpoints, where each rule landed, warnings, "
                                      "and sub-page collateral.")
    expl.add_argument("source", metavar="POLICY|PLAN")
    expl.add_argument("--target", metavar="ARCH", help="target when explaining a policy")
    expl.add_argument("--dot", action="store_true", help="print the views and view switches as a Graphviz graph")
    expl.set_defaults(run=_cmd_explain)

    diff = sub.add_parser("diff", help="semantic diff of two policies or plans: traps added, removed, changed",
                          description="Compare two policies or plans by what they trap, rule by rule.")
    diff.add_argument("old", metavar="OLD")
    diff.add_argument("new", metavar="NEW")
    diff.add_argument("--target", metavar="ARCH", help="target when comparing policies")
    diff.add_argument("--format", choices=("text", "json"), default="text")
    diff.add_argument("--exit-code", action="store_true", help="exit 1 when the two differ (for CI)")
    diff.set_defaults(run=_cmd_diff)

    lsp = sub.add_parser("lsp", help="run the language server (LSP over stdio) for editors",
                         description="A Language Server for .vmi and policy .yaml files over stdin/stdout: "
                                     "diagnostics as you type, hover, completion, go to definition, "
                                     "formatting and quick fixes. Needs the lsp extra: pip install 'policyc[lsp]'.")
    lsp.set_defaults(run=_cmd_lsp)

    if command in _OWN_COMMANDS:
        return p
    from .cli_runtime import add_runtime_commands
    add_runtime_commands(sub)
    from .cli_bundle import add_bundle_commands
    add_bundle_commands(sub)
    return p


# ---------------------------------------------------------------- check

def _cmd_check(args: argparse.Namespace) -> int:
    from .check import check_policy
    from .arch import ARCHES

    if args.target and args.target not in ARCHES:
        print(f"policyc check: unknown target '{args.target}' (targets: {', '.join(ARCHES)})", file=sys.stderr)
        return EXIT_USAGE
    files, skipped, problems = policy_files(args.paths)
    if problems:
        for m in problems:
            print(f"policyc check: {m}", file=sys.stderr)
        return EXIT_USAGE
    results = _check_files(files, args.target, args.jobs or os.cpu_count() or 1)
    # Drop include-only files that another file in the run includes: they are checked through it.
    roots = root_results(results)
    diagnostics = Diagnostics()
    for r in roots:
        diagnostics.extend(r.diagnostics)
    items = diagnostics.sorted()
    errors = sum(d.severity is Severity.ERROR for d in items)
    warnings = sum(d.severity is Severity.WARNING for d in items)
    emit_diagnostics(items, args.format)
    if args.format == "text" and not args.quiet:
        summary = f"checked {len(roots)} polic{'y' if len(roots) == 1 else 'ies'}: " \
                  f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
        if skipped:
            summary += f" ({len(skipped)} non-policy file{'s' * (len(skipped) != 1)} skipped)"
        print(summary, file=sys.stderr)
    return EXIT_PROBLEMS if errors or (args.strict and warnings) else EXIT_OK


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of processes") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the number of processes is 0 (one per CPU) or more")
    return value


def _check_files(files: list[Path], target: str | None, jobs: int) -> list[FileResult]:
    """Every file's result, in the order given, whatever the number of processes. Each process
    keeps its own parser and symbol tables for all the files it is handed."""
    jobs = min(jobs, len(files) - 1)
    if jobs <= 1:
        return [_check_file(f, target) for f in files]
    import concurrent.futures
    import multiprocessing

    # The first file here, before the workers fork: they inherit the symbol tables it loaded (a
    # System.map is 160,000 symbols), so a tree of policies naming one map reads it once.
    first = _check_file(files[0], target)
    rest = files[1:]
    # Contiguous batches, a few per process: files of one directory tend to share symbol files.
    batch = max(1, -(-len(rest) // (jobs * 4)))
    batches = [rest[i:i + batch] for i in range(0, len(rest), batch)]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        done = pool.map(_check_batch, batches, [target] * len(batches))
        return [first] + [r for results in done for r in results]


def _check_batch(files: list[Path], target: str | None) -> list[FileResult]:
    return [_check_file(f, target) for f in files]


def _check_file(path: Path, target: str | None) -> FileResult:
    from .check import check_policy, included_files
    from .source import read_policy_file

    own = Diagnostics()
    policy = check_policy(path, own, target_arch=target)
    if policy is not None:
        # A policy its target cannot enforce, or with rules that contradict each other,
        # fails the check too: everything short of writing the plan.
        from .compiler import compile_plan
        compile_plan(policy, own, target=target, sealed=False, report=False)
    tree = read_policy_file(path, Diagnostics())  # the check's own parse, from the cache
    return FileResult(path.resolve(), list(own), included_files(path),
                       tree is not None and tree.policy is not None)


# ---------------------------------------------------------------- fmt

def _cmd_fmt(args: argparse.Namespace) -> int:
    files, skipped, problems = policy_files(args.paths)
    for m in problems:
        print(f"policyc fmt: {m}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    for s in skipped:
        print(f"policyc fmt: skipped {s}: not a policy file ({', '.join(POLICY_SUFFIXES)})", file=sys.stderr)
    status = EXIT_OK
    for path in files:
        diagnostics = Diagnostics()
        result = _format_file(path, diagnostics, args.to)
        if result is None or diagnostics.has_errors:
            emit_diagnostics(diagnostics.sorted(), "text")
            print(f"policyc fmt: {path}: not formatted (fix the errors above first)", file=sys.stderr)
            status = EXIT_PROBLEMS
            continue
        text, out_path = result
        original = path.read_text(encoding="utf-8")
        changed = text != original or out_path != path
        if args.check:
            if changed:
                print(f"{path}: would {'convert' if out_path != path else 'reformat'}")
                status = EXIT_PROBLEMS
        elif args.write:
            if out_path != path and out_path.exists():
                print(f"policyc fmt: {out_path} exists; not overwritten", file=sys.stderr)
                status = EXIT_PROBLEMS
                continue
            if changed:
                if not write_output(out_path, text, "fmt"):
                    status = EXIT_PROBLEMS
                    continue
                print(f"{'wrote' if out_path != path else 'formatted'} {out_path}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    return status


def _format_file(path: Path, diagnostics: Diagnostics, to: str | None) -> tuple[str, Path] | None:
    """The formatted text of one file and where it belongs (a new suffix when converting)."""
    from .fmt import format_dsl, format_yaml
    from .source import read_policy_file

    tree = read_policy_file(path, diagnostics, allow_empty=True)
    if tree is None or diagnostics.has_errors:
        return None
    to = to or tree.form
    text = format_dsl(tree) if to == "dsl" else format_yaml(tree)
    if to == tree.form:
        return text, path
    return text, path.with_suffix(".vmi" if to == "dsl" else ".yaml")


# ---------------------------------------------------------------- lsp

def _cmd_lsp(args: argparse.Namespace) -> int:
    from .lsp import main as serve

    return serve()


# ---------------------------------------------------------------- schema

def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    if args.plan:
        from .plan import plan_schema
        print(json.dumps(plan_schema(), indent=2))
    else:
        from .yaml_form import policy_schema
        print(json.dumps(policy_schema(), indent=2))
    return EXIT_OK


# ---------------------------------------------------------------- compile, explain, diff

def _plan_for(source: str, target: str | None, diagnostics: Diagnostics) -> dict | None:
    """A plan from a plan file (.json) or by compiling a policy."""
    from .plan import PlanError, load_plan

    path = Path(source)
    if path.is_dir():
        diagnostics.error("PC100", None, f"'{source}' is a directory: give one policy or plan file")
        return None
    if not path.is_file():
        diagnostics.error("PC100", None, f"no such file: {source}")
        return None
    if path.suffix.lower() == ".json":
        try:
            return load_plan(path)
        except PlanError as exc:
            diagnostics.error("PC507", None, str(exc))
            return None
    from .check import check_policy
    from .compiler import compile_plan

    policy = check_policy(path, diagnostics, target_arch=target)
    if policy is None:
        return None
    return compile_plan(policy, diagnostics, target=target)


def _target_ok(target: str | None, command: str) -> bool:
    from .targets import TARGETS

    if target and target not in TARGETS:
        print(f"policyc {command}: unknown target '{target}' (targets: {', '.join(TARGETS)})", file=sys.stderr)
        return False
    return True


def _cmd_compile(args: argparse.Namespace) -> int:
    from .plan import dump_plan

    if not _target_ok(args.target, "compile"):
        return EXIT_USAGE
    if Path(args.policy).suffix.lower() == ".json":
        print("policyc compile: takes a policy, not a plan", file=sys.stderr)
        return EXIT_USAGE
    diagnostics = Diagnostics()
    plan = _plan_for(args.policy, args.target, diagnostics)
    emit_diagnostics(diagnostics.sorted(), args.format if args.format != "text" else "text")
    if plan is None:
        return EXIT_PROBLEMS
    if args.emit == "xsm":
        from .xsm import emit_flask
        text = emit_flask(plan)
    else:
        text = dump_plan(plan)
    if args.output:
        return EXIT_OK if write_output(Path(args.output), text, "compile") else EXIT_PROBLEMS
    sys.stdout.write(text)
    return EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_dot, explain_text

    if not _target_ok(args.target, "explain"):
        return EXIT_USAGE
    diagnostics = Diagnostics()
    plan = _plan_for(args.source, args.target, diagnostics)
    emit_diagnostics(diagnostics.sorted(), "text")
    if plan is None:
        return EXIT_PROBLEMS
    sys.stdout.write(explain_dot(plan) if args.dot else explain_text(plan))
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from .plan_diff import diff_plans

    if not _target_ok(args.target, "diff"):
        return EXIT_USAGE
    diagnostics = Diagnostics()
    old = _plan_for(args.old, args.target, diagnostics)
    new = _plan_for(args.new, args.target, diagnostics)
    emit_diagnostics(diagnostics.sorted(), "text")
    if old is None or new is None:
        return EXIT_PROBLEMS
    result = diff_plans(old, new)
    sys.stdout.write(result.to_json() if args.format == "json" else result.render_text())
    return EXIT_PROBLEMS if args.exit_code and not result.empty else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
