"""The package's layout rules, checked: no import cycles, no module over 1,000 lines, no function
over 100 lines unless a comment on its first lines says why it must be one piece.

    python tools/check_layout.py [--json] [--baseline tools/layout_baseline.json] [--write-baseline]

The import graph is built from the installed package's source (every `import` and `from ... import`
of a `policyc` module, at module level or inside a function: an import moved into a function to
dodge a cycle is still a cycle). Source folders map to installed names as pyproject.toml says.

With --baseline, only problems not in the baseline fail (exit 1), and problems the baseline lists
that are gone are reported so the baseline is shrunk (`--write-baseline`): the rules hold for new
code at once, and the old exceptions can only go away.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (pyproject.toml's package-dir)
PACKAGE_DIRS = {"policyc": "policyc", "grammar": "policyc.grammar", "runtime": "policyc.runtime",
                "native": "policyc.native"}
MAX_MODULE_LINES = 1000
MAX_FUNCTION_LINES = 100
# A long function says why it is one piece with a comment containing this on one of its first lines.
ONE_PIECE = "one piece"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> source file."""
    out = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def problems(root: Path = ROOT) -> list[str]:
    """Every breach of the rules, one line each: stable text (no line counts, so an edit to a module
    already over the bound is not a new problem), usable as a baseline."""
    mods = modules(root)
    graph = nx.DiGraph()
    out: list[str] = []
    for name, path in mods.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        graph.add_node(name)
        for target in _imports(name, path, tree, mods):
            if target != name:
                graph.add_edge(name, target)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            out.append(f"module {name} is over {MAX_MODULE_LINES} lines")
        out.extend(_long_functions(name, text, tree))
    for cycle in sorted(sorted(c) for c in nx.simple_cycles(graph) if len(c) > 1):
        out.append("import cycle: " + " <-> ".join(cycle))
    return sorted(set(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", type=Path, help="known problems allowed to remain (JSON list)")
    ap.add_argument("--write-baseline", action="store_true", help="write the current problems to --baseline")
    a = ap.parse_args(argv)
    found = problems()
    if a.write_baseline:
        if not a.baseline:
            ap.error("--write-baseline needs --baseline FILE")
        a.baseline.write_text(json.dumps(found, indent=1) + "\n")
        print(f"wrote {len(found)} known problem(s) to {a.baseline}")
        return 0
    known = set(json.loads(a.baseline.read_text())) if a.baseline else set()
    new, gone = [p for p in found if p not in known], sorted(known - set(found))
    if a.json:
        print(json.dumps({"problems": found, "new": new, "fixed_since_baseline": gone}, indent=1))
    else:
        for p in new:
            print(f"NEW   {p}")
        for p in found:
            if p in known:
                print(f"known {p}")
        for p in gone:
            print(f"fixed {p} (shrink the baseline: --write-baseline)")
    return 1 if new else 0


def _imports(name: str, path: Path, tree: ast.AST, mods: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(_resolve(alias.name, mods) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:      # `from . import x` may import the submodule x
                full = f"{mod}.{alias.name}"
                out.add(full if full in mods else _resolve(mod, mods))
    out.discard("")
    return out


def _resolve(mod: str, mods: dict[str, Path]) -> str:
    """The longest known module `mod` names (a package's __init__ or one of its modules)."""
    while mod and mod not in mods:
        mod = mod.rpartition(".")[0]
    return mod


def _long_functions(name: str, text: str, tree: ast.AST) -> list[str]:
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            head = " ".join(lines[node.lineno - 1:node.lineno + 5]).lower()
            if ONE_PIECE in head:
                continue
            out.append(f"function {name}.{node.name} is over {MAX_FUNCTION_LINES} lines, with no "
                       f"'{ONE_PIECE}' comment saying why")
    return out


if __name__ == "__main__":
    sys.exit(main())
