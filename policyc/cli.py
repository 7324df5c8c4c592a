"""The `policyc` command.

Exit codes: 0 clean (warnings allowed), 1 problems found, 2 usage errors.
Bad input never ends in a traceback: diagnostics are rendered once, here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .diagnostics import Diagnostics, Severity, SourceCache, render_json, render_sarif, render_text

__all__ = ["main"]

POLICY_SUFFIXES = (".vmi", ".yaml", ".yml")
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="policyc",
        description="Compile and check VMI policies for Xen: watched memory, control registers, MSRs, "
                    "breakpoints, and what to do when they are touched.")
    p.add_argument("--version", action="version", version=f"policyc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser("check", help="validate policy files (DSL or YAML) and report every problem",
                           description="Validate policy files. Directories are searched for *.vmi, *.yaml, "
                                       "*.yml. Files with other suffixes (symbol maps, ISF JSON) are skipped, "
                                       "and so are include-only files that a checked policy includes.")
    check.add_argument("paths", nargs="+", metavar="PATH", help="policy files or directories")
    check.add_argument("--format", choices=("text", "json", "sarif"), default="text",
                       help="diagnostics format (json and sarif go to stdout; text to stderr)")
    check.add_argument("--target", metavar="ARCH", help="override the policy's target architecture "
                       "(x86_64, x86_64-svm, arm64)")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.add_argument("-q", "--quiet", action="store_true", help="print diagnostics only, no summary")
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

    schema = sub.add_parser("schema", help="print the JSON Schema of the YAML spelling (for editors)")
    schema.set_defaults(run=_cmd_schema)
    return p


# ---------------------------------------------------------------- check

def _cmd_check(args: argparse.Namespace) -> int:
    from .check import check_policy
    from .arch import ARCHES

    if args.target and args.target not in ARCHES:
        print(f"policyc check: unknown target '{args.target}' (targets: {', '.join(ARCHES)})", file=sys.stderr)
        return EXIT_USAGE
    files, skipped, missing = _policy_files(args.paths)
    if missing:
        for m in missing:
            print(f"policyc check: no such file or directory: {m}", file=sys.stderr)
        return EXIT_USAGE
    roots = _exclude_included(files)
    diagnostics = Diagnostics()
    for path in roots:
        check_policy(path, diagnostics, target_arch=args.target)
    items = diagnostics.sorted()
    errors = sum(d.severity is Severity.ERROR for d in items)
    warnings = sum(d.severity is Severity.WARNING for d in items)
    _emit(items, args.format)
    if args.format == "text" and not args.quiet:
        summary = f"checked {len(roots)} polic{'y' if len(roots) == 1 else 'ies'}: " \
                  f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
        if skipped:
            summary += f" ({len(skipped)} non-policy file{'s' * (len(skipped) != 1)} skipped)"
        print(summary, file=sys.stderr)
    return EXIT_PROBLEMS if errors or (args.strict and warnings) else EXIT_OK


def _emit(items, fmt: str) -> None:
    if fmt == "json":
        print(render_json(items))
    elif fmt == "sarif":
        print(render_sarif(items, __version__))
    elif items:
        color = sys.stderr.isatty() and os.environ.get("NO_COLOR") is None
        print(render_text(items, SourceCache(), color=color), file=sys.stderr)


def _policy_files(paths: list[str]) -> tuple[list[Path], list[Path], list[str]]:
    files: list[Path] = []
    skipped: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in POLICY_SUFFIXES)
        elif p.is_file():
            (files if p.suffix.lower() in POLICY_SUFFIXES else skipped).append(p)
        else:
            missing.append(raw)
    return list(dict.fromkeys(files)), skipped, missing


def _exclude_included(files: list[Path]) -> list[Path]:
    """Drop include-only files that another file in the run includes: they are checked through it."""
    from .check import included_files

    included: set[Path] = set()
    for f in files:
        included |= included_files(f)
    return [f for f in files if f.resolve() not in included or _has_policy_block(f)]


def _has_policy_block(path: Path) -> bool:
    from .source import read_policy_file

    tree = read_policy_file(path, Diagnostics())
    return tree is not None and tree.policy is not None


# ---------------------------------------------------------------- fmt

def _cmd_fmt(args: argparse.Namespace) -> int:
    files, skipped, missing = _policy_files(args.paths)
    for m in missing:
        print(f"policyc fmt: no such file or directory: {m}", file=sys.stderr)
    if missing:
        return EXIT_USAGE
    for s in skipped:
        print(f"policyc fmt: skipped {s}: not a policy file ({', '.join(POLICY_SUFFIXES)})", file=sys.stderr)
    status = EXIT_OK
    for path in files:
        diagnostics = Diagnostics()
        result = _format_file(path, diagnostics, args.to)
        if result is None or diagnostics.has_errors:
            _emit(diagnostics.sorted(), "text")
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
                out_path.write_text(text, encoding="utf-8")
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


# ---------------------------------------------------------------- schema

def _cmd_schema(args: argparse.Namespace) -> int:
    import json
    from .yaml_form import policy_schema

    print(json.dumps(policy_schema(), indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
