"""What the CLI's command modules share: finding policy and scenario files among the paths given,
telling a run's own policies from the files they include, and printing diagnostics.

`cli` (check, compile, fmt ...) and `cli_runtime` (run, test, replay ...) both import this module,
and neither imports the other for it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .diagnostics import Diagnostic, Diagnostics, SourceCache, render_json, render_sarif, render_text
from .source import is_yaml_path
from .version import __version__

__all__ = ["POLICY_SUFFIXES", "FileResult", "emit_diagnostics", "policy_files", "policy_roots", "root_results",
           "is_scenario_file"]

POLICY_SUFFIXES = (".vmi", ".yaml", ".yml")


def emit_diagnostics(items: Iterable[Diagnostic], fmt: str) -> None:
    """Diagnostics as the commands print them: JSON or SARIF on stdout, text (coloured on a terminal) on stderr."""
    if fmt == "json":
        print(render_json(items))
    elif fmt == "sarif":
        print(render_sarif(items, __version__))
    elif items:
        color = sys.stderr.isatty() and os.environ.get("NO_COLOR") is None
        print(render_text(items, SourceCache(), color=color), file=sys.stderr)


def policy_files(paths: list[str]) -> tuple[list[Path], list[Path], list[str]]:
    """The policy files named or found under directories, skipped non-policy files, and what is
    wrong with the paths (a missing path, a directory holding no policy file) as messages."""
    files: list[Path] = []
    skipped: list[Path] = []
    problems: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            # A directory search passes over scenario files (YAML too, but not policies); named files are kept.
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in POLICY_SUFFIXES
                           and not (is_yaml_path(f) and is_scenario_file(f)))
            if not found:
                problems.append(f"no policy files ({', '.join(POLICY_SUFFIXES)}) under {raw}")
            files += found
        elif p.is_file():
            (files if p.suffix.lower() in POLICY_SUFFIXES else skipped).append(p)
        elif p.is_symlink():
            problems.append(f"{raw} is a symbolic link to nothing (or a loop)")
        else:
            problems.append(f"no such file or directory: {raw}")
    return list(dict.fromkeys(files)), skipped, problems


def is_scenario_file(path: Path) -> bool:
    """A scenario file has a top-level `scenario:` key (policies in YAML start with `policy:`)."""
    try:
        with open(path, encoding="utf-8") as f:
            return any(line.startswith("scenario:") for line in f)
    except (OSError, UnicodeDecodeError):
        return False


@dataclass
class FileResult:
    """One file checked as if alone (one file's errors must not hide another's)."""
    resolved: Path
    diagnostics: list[Diagnostic]
    includes: set[Path]
    has_policy_block: bool


def root_results(results: list[FileResult]) -> list[FileResult]:
    """Drop include-only files that another file in the run includes: they are checked through it."""
    included = set().union(*(r.includes for r in results))
    return [r for r in results if r.resolved not in included or r.has_policy_block]


def policy_roots(files: list[Path]) -> list[Path]:
    """The files of a run that are policies of their own (not included by another file of the run)."""
    from .check import included_files
    from .source import read_policy_file

    results = []
    for f in files:
        tree = read_policy_file(f, Diagnostics())
        results.append(FileResult(f.resolve(), [], included_files(f), tree is not None and tree.policy is not None))
    keep = {r.resolved for r in root_results(results)}
    return [f for f in files if f.resolve() in keep]
