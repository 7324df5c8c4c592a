"""The checker: syntax trees of a policy and its includes -> one checked `Policy`.

Before the passes, `gather_files` reads the root file and its includes into
units (confined to the root's directory tree, cycles reported). Then the
passes, in order (`PASSES`, at the end of this module, is the order as data;
each needs the ones before it):

1. `read_settings`    target, symbols, mode: one of each
2. `load_symbols`     System.map / ISF tables, relative to the file naming them
3. `fold_constants`   constants in dependency order (a cycle is an error)
4. `resolve_regions`  regions to extents (symbols looked up, sizes positive)
5. `check_rules`      triggers per architecture, conditions typed per trigger,
                      actions and templates validated
6. `assemble`         the checked `Policy`

Every problem is a diagnostic and checking goes on, so one run reports all
of them; `check_policy` returns a model only when there were no errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import model as M
from .. import syntax as S
from ..diagnostics import Diagnostics
from ..gc_pause import gc_paused
from ..source import display_path, read_policy_file
from .constants import fold_constants
from .context import Checking
from .gather import expand_includes, gather_files
from .regions import resolve_regions
from .rules import check_rules
from .settings import read_settings
from .symbols import load_symbols

__all__ = ["check_policy", "check_file_tree", "run", "PASSES"]


def check_policy(path: str | Path, diagnostics: Diagnostics, *, target_arch: str | None = None) -> M.Policy | None:
    """Check one root policy file and everything it includes. Returns None when there were errors."""
    root = Path(path)
    errors_before = diagnostics.error_count
    with gc_paused():
        tree = read_policy_file(root, diagnostics)
        if tree is None:
            return None
        units = gather_files(root, diagnostics, tree)
        if units is None:
            return None
        policy = run(Checking(units, root, tree, diagnostics, target_arch))
    return None if diagnostics.error_count != errors_before else policy


def check_file_tree(tree: S.PolicyFile, root: Path, diagnostics: Diagnostics,
                    target_arch: str | None = None) -> M.Policy | None:
    """Check an already parsed root file (used by fmt's round-trip checks). Includes are read from disk."""
    errors_before = diagnostics.error_count
    with gc_paused():
        units = expand_includes(root, diagnostics, tree)
        policy = run(Checking(units, root, tree, diagnostics, target_arch))
    return None if diagnostics.error_count != errors_before else policy


def run(chk: Checking) -> M.Policy | None:
    """Run the passes (`PASSES`, in order) over `chk`: the policy they assembled."""
    for step in PASSES:
        step(chk)
    return chk.policy


def assemble(chk: Checking) -> None:
    """`chk.policy` from what the passes found; a policy block with no rules is worth a warning."""
    if chk.root_tree.policy is not None and not chk.units_of(S.Rule):
        chk.d.warning("PC504", chk.span, f"policy '{chk.name}' has no rules: it traps nothing")
    # Once per file, not per item: a policy may hold 100,000 items from a handful of files.
    # A file's units share its Path: compared by identity first (hashing a Path is a Python call).
    distinct = [chk.root]
    for u in chk.units:
        if u.file is not distinct[-1]:
            distinct.append(u.file)
    files = [display_path(f) for f in dict.fromkeys(distinct)]
    chk.policy = M.Policy(
        name=chk.name, target=chk.target, mode=chk.mode, symbols=tuple(chk.symbol_sources),
        constants=tuple(sorted((k, v.value if isinstance(v, M.Address) else v)
                               for k, v in chk.const_values.items() if isinstance(v, int))),
        regions=tuple(sorted(chk.regions.values(), key=lambda r: r.name)),
        rules=tuple(chk.rules), files=tuple(dict.fromkeys(files)), span=chk.span)


PASSES: tuple[Callable[[Checking], None], ...] = (
    read_settings,
    load_symbols,
    fold_constants,
    resolve_regions,
    check_rules,
    assemble,
)
