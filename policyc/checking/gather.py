"""Before the passes: the root file and its includes read into one list of units.

Includes are confined to the root's directory tree; a cycle, a file included
twice, a missing or looping path is reported (or, for a second inclusion,
quietly read once).
"""

from __future__ import annotations

from pathlib import Path

from .. import syntax as S
from ..diagnostics import Diagnostics, Span, did_you_mean
from ..source import display_path, read_policy_file
from .context import Unit

__all__ = ["gather_files", "expand_includes", "included_files"]


def gather_files(root: Path, diagnostics: Diagnostics, tree: S.PolicyFile) -> list[Unit] | None:
    """The units of a root file and its includes, in order; None when the file holds no policy block."""
    blocks = [i for i in tree.items if isinstance(i, S.PolicyBlock)]
    if not blocks:
        if tree.items or not diagnostics.has_errors:
            diagnostics.error("PC310", Span(display_path(root), 1, 1),
                              f"'{display_path(root)}' has no policy block",
                              'a root policy reads: policy "NAME" { ... }; a file of shared definitions '
                              "is meant to be included from one")
        return None
    for extra in blocks[1:]:
        diagnostics.error("PC311", extra.span, f"a second policy block ('{extra.name}') in one file",
                          "put each policy in its own file; share definitions with include")
    return expand_includes(root, diagnostics, tree)


def expand_includes(root: Path, diagnostics: Diagnostics, tree: S.PolicyFile) -> list[Unit]:
    """The units of an already parsed root file and of everything it includes, read from disk."""
    return _Gatherer(root.parent.resolve(), diagnostics).expand(tree, root.resolve(), [])


def included_files(path: Path) -> set[Path]:
    """Every file `path` includes, directly or not (resolved paths; unreadable ones left out)."""
    found: set[Path] = set()
    todo = [path.resolve()]
    while todo:
        current = todo.pop()
        tree = read_policy_file(current, Diagnostics(), allow_empty=True)
        if tree is None:
            continue
        for item in _items(tree):
            if isinstance(item, S.Include):
                target = _resolved(current.parent / item.path)
                if target is not None and target not in found and target.is_file():
                    found.add(target)
                    todo.append(target)
    return found


def _items(tree: S.PolicyFile) -> list:
    """A file's items, those of its policy block in place of the block."""
    items: list = []
    for top in tree.items:
        items.extend(top.items if isinstance(top, S.PolicyBlock) else [top])
    return items


def _resolved(path: Path) -> Path | None:
    """The real path, or None when resolving runs into a symlink loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):   # RuntimeError: Python < 3.13's report of a loop
        return None


class _Gatherer:
    def __init__(self, tree_root: Path, diagnostics: Diagnostics) -> None:
        self.tree_root = tree_root
        self.diagnostics = diagnostics
        self.seen: set[Path] = set()

    def expand(self, tree: S.PolicyFile, path: Path, stack: list[Path]) -> list[Unit]:
        self.seen.add(path)
        units: list[Unit] = []
        for item in _items(tree):
            if isinstance(item, S.Include):
                units.extend(self._include(item, path, stack + [path]))
            else:
                units.append(Unit(item, path, tree))
        return units

    def _include(self, inc: S.Include, from_path: Path, stack: list[Path]) -> list[Unit]:
        target = (from_path.parent / inc.path)
        resolved = _resolved(target)
        if resolved is None:
            self.diagnostics.error("PC308", inc.span, f"included file '{inc.path}' is a symbolic link loop")
            return []
        if not resolved.is_relative_to(self.tree_root):
            self.diagnostics.error("PC306", inc.span, f"include '{inc.path}' leaves the policy's directory tree",
                                   f"includes must stay under {display_path(self.tree_root)}/")
            return []
        if resolved in stack:
            chain = " -> ".join(display_path(p) for p in stack[stack.index(resolved):] + [resolved])
            self.diagnostics.error("PC307", inc.span, f"include cycle: {chain}")
            return []
        if resolved in self.seen:
            return []  # included twice along different paths: once is enough
        if not resolved.is_file():
            hint = None
            if resolved.parent.is_dir():
                hint = did_you_mean(resolved.name, [p.name for p in resolved.parent.iterdir()])
            self.diagnostics.error("PC308", inc.span, f"included file '{inc.path}' not found", hint)
            return []
        tree = read_policy_file(resolved, self.diagnostics, at=inc.span, allow_empty=True)
        if tree is None:
            return []
        for top in tree.items:
            if isinstance(top, S.PolicyBlock):
                self.diagnostics.error("PC311", top.span, f"included file '{inc.path}' defines its own policy "
                                       f"'{top.name}'", "an included file holds bare definitions, no policy block")
        return self.expand(tree, resolved, stack)
