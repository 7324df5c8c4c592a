"""What the checker's passes share (`Checking`), and the small vocabulary they all use.

A pass is a function of one `Checking`: it reads what the passes before it
left there (the target's architecture, the symbol tables, the constants'
values, the regions), adds what it finds, and reports every problem to
`Checking.d` without stopping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import model as M
from .. import syntax as S
from ..arch import ARCHES, ArchInfo
from ..diagnostics import Diagnostics, Span
from ..symbols import SymbolTable

__all__ = ["Checking", "Unit", "RuleContext", "ABSENT", "Value", "U64", "KEYWORD_NAMES", "keyword_name",
           "collect_definitions", "cycle", "kind_words"]

U64 = (1 << 64) - 1
# Words the DSL reads as keywords exactly where a name would stand (at the start of an
# expression, a region term, or after `rule`): a name spelled so, possible in YAML, could
# never be written back in the DSL. Other keywords stay usable as names (contextual lexing).
KEYWORD_NAMES = frozenset({"va", "pa", "register", "symbol", "percpu", "not", "on"})


@dataclass(slots=True)
class Unit:
    """One item with the file it came from."""
    item: S.Item
    file: Path
    tree: S.PolicyFile


class _Absent:
    """The value of an optional symbol that is not in the tables."""


ABSENT = _Absent()
Value = int | M.Address | _Absent | None  # None: an error was already reported


@dataclass
class RuleContext:
    """What a rule's trigger makes available to its condition and actions."""
    kind: str
    register: str | None = None  # the CR/MSR a write trigger watches
    msr_name: str | None = None


@dataclass
class Checking:
    """The units being checked, the diagnostics, and what each pass found, in pass order."""
    units: list[Unit]
    root: Path
    root_tree: S.PolicyFile
    d: Diagnostics
    target_arch: str | None = None  # `policyc check --target`: overrides the policy's
    broken: set[str] = field(default_factory=set)  # names whose definition failed to parse

    # read_settings
    arch: ArchInfo = field(default_factory=lambda: ARCHES["x86_64"])
    target: M.Target | None = None
    mode: str = "enforce"
    name: str = ""
    span: Span | None = None  # the policy block's
    # load_symbols
    tables: list[SymbolTable] = field(default_factory=list)
    symbol_sources: list[M.SymbolSource] = field(default_factory=list)
    symbols_decl_span: Span | None = None
    # (name, percpu) -> the address of a symbol looked up without a diagnostic: regions by the 100,000
    # name the same few symbols, and a look-up goes through every table
    symbol_addresses: dict[tuple[str, bool], M.Address] = field(default_factory=dict)
    reported_no_symbols: bool = False
    # fold_constants
    const_defs: dict[str, S.Const] = field(default_factory=dict)
    const_values: dict[str, Value] = field(default_factory=dict)
    # resolve_regions (and check_rules, for a trigger's inline regions)
    region_defs: dict[str, S.Region] = field(default_factory=dict)
    regions: dict[str, M.Region] = field(default_factory=dict)
    # check_rules
    rules: list[M.Rule] = field(default_factory=list)
    # (template, trigger kind) -> the fields of a message template checked without an error
    sound_templates: dict[tuple[str, str | None], tuple[str, ...]] = field(default_factory=dict)
    # assemble
    policy: M.Policy | None = None

    by_kind: dict[type, list[Unit]] = field(default_factory=dict)  # the units by their item's class, in order

    def __post_init__(self) -> None:
        trees = {}  # (by identity: a file's units share its tree)
        for u in self.units:
            trees[id(u.tree)] = u.tree
            self.by_kind.setdefault(type(u.item), []).append(u)
        for tree in trees.values():
            self.broken |= tree.broken_names

    def units_of(self, kind: type) -> list[Unit]:
        """The units whose item is a `kind` (`S.Rule`, `S.Const`, ...), in source order."""
        return self.by_kind.get(kind, [])


def keyword_name(chk: Checking, name: str, kind: str, span: Span) -> bool:
    """True (and an error) when `name`, naming a `kind`, is one of the language's keywords."""
    if name not in KEYWORD_NAMES:
        return False
    chk.d.error("PC313", span, f"'{name}' is a keyword of the policy language and cannot name a {kind}",
                f"rename it, e.g. '{name}_{kind}'")
    chk.broken.add(name)
    return True


def collect_definitions(chk: Checking, kind: type, word: str, defs: dict,
                        refused: Callable[[Checking, Any], bool] | None = None) -> None:
    """Every `kind` item (a constant, a region) into `defs` by name; a keyword for a name, a name
    `refused` reports, or a name defined twice is an error (the first definition stays)."""
    for u in chk.units_of(kind):
        item = u.item
        if (item.name in KEYWORD_NAMES and keyword_name(chk, item.name, word, item.span)) or \
                (refused is not None and refused(chk, item)):
            continue
        if item.name in defs:
            chk.d.error("PC301", item.span, f"{word} '{item.name}' is defined twice",
                        f"the first is at {defs[item.name].span}")
            continue
        defs[item.name] = item


def cycle(stack: list[str], name: str) -> str | None:
    """`a -> b -> a` when `name` is already being resolved (`stack`), else None."""
    if name not in stack:
        return None
    return " -> ".join(stack[stack.index(name):] + [name])


_KIND_WORDS = {"memory": "memory", "breakpoint": "breakpoint", "control_register": "control-register",
               "msr": "MSR", "descriptor": "descriptor", "cpuid": "cpuid", "guest_request": "guest_request",
               "debug_exception": "debug_exception", "smc": "smc"}


def kind_words(kind: str) -> str:
    """A trigger kind as a diagnostic names it."""
    return _KIND_WORDS[kind]
