"""The checker: syntax trees of a policy and its includes -> one checked `Policy`.

Passes, in order (each needs the ones before it):

1. `gather_files`     read the root file and its includes (confined to the
                      root's directory tree, cycles reported), in order
2. `read_settings`    target, symbols, mode: one of each
3. `load_symbols`     System.map / ISF tables, relative to the file naming them
4. `fold_constants`   constants in dependency order (a cycle is an error)
5. `resolve_regions`  regions to extents (symbols looked up, sizes positive)
6. `check_rules`      triggers per architecture, conditions typed per trigger,
                      actions and templates validated

Every problem is a diagnostic and checking goes on, so one run reports all
of them; `check_policy` returns a model only when there were no errors.
"""

from __future__ import annotations

import operator
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from . import model as M
from . import syntax as S
from .arch import (ARCHES, CONTROL_REGISTERS, DESCRIPTOR_REGISTERS, EVENT_FIELDS, EXCEPTION_VECTORS,
                   RESERVED_REGION_NAMES, SEVERITIES, ArchInfo)
from .diagnostics import Diagnostics, Span, did_you_mean
from .gc_pause import gc_paused
from .plan import MAX_FORMAT_WIDTH, format_width_over_bound
from .source import display_path, read_policy_file
from .symbols import SymbolFileError, SymbolTable, load_symbol_table

__all__ = ["check_policy", "check_file_tree", "included_files", "SUPPORTED_XEN"]

SUPPORTED_XEN = (4, 17)
# Words the DSL reads as keywords exactly where a name would stand (at the start of an
# expression, a region term, or after `rule`): a name spelled so, possible in YAML, could
# never be written back in the DSL. Other keywords stay usable as names (contextual lexing).
KEYWORD_NAMES = frozenset({"va", "pa", "register", "symbol", "percpu", "not", "on"})
U64 = (1 << 64) - 1
META_TEMPLATE_FIELDS = ("rule", "verdict", "policy", "domain", "time", "decision")
_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv,
               "%": operator.mod, "<<": operator.lshift, ">>": operator.rshift, "&": operator.and_,
               "|": operator.or_, "^": operator.xor}


def check_policy(path: str | Path, diagnostics: Diagnostics, *, target_arch: str | None = None) -> M.Policy | None:
    """Check one root policy file and everything it includes. Returns None when there were errors."""
    root = Path(path)
    errors_before = diagnostics.error_count
    with gc_paused():
        tree = read_policy_file(root, diagnostics)
        if tree is None:
            return None
        files = gather_files(root, diagnostics, tree)
        if files is None:
            return None
        policy = _Checker(files, root, diagnostics, target_arch, tree).run()
    return None if diagnostics.error_count != errors_before else policy


def check_file_tree(tree: S.PolicyFile, root: Path, diagnostics: Diagnostics,
                    target_arch: str | None = None) -> M.Policy | None:
    """Check an already parsed root file (used by fmt's round-trip checks). Includes are read from disk."""
    errors_before = diagnostics.error_count
    with gc_paused():
        files = _Gatherer(root.parent.resolve(), diagnostics).expand(tree, root.resolve(), [])
        policy = _Checker(files, root, diagnostics, target_arch, tree).run()
    return None if diagnostics.error_count != errors_before else policy


def included_files(path: Path) -> set[Path]:
    """Every file `path` includes, directly or not (resolved paths; unreadable ones left out)."""
    found: set[Path] = set()
    todo = [path.resolve()]
    while todo:
        current = todo.pop()
        tree = read_policy_file(current, Diagnostics(), allow_empty=True)
        if tree is None:
            continue
        for top in tree.items:
            for item in (top.items if isinstance(top, S.PolicyBlock) else [top]):
                if isinstance(item, S.Include):
                    target = _resolved(current.parent / item.path)
                    if target is not None and target not in found and target.is_file():
                        found.add(target)
                        todo.append(target)
    return found


def _resolved(path: Path) -> Path | None:
    """The real path, or None when resolving runs into a symlink loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):   # RuntimeError: Python < 3.13's report of a loop
        return None


# ---------------------------------------------------------------- 1. files

@dataclass
class _Unit:
    """One item with the file it came from."""
    item: S.Item
    file: Path
    tree: S.PolicyFile


def gather_files(root: Path, diagnostics: Diagnostics, tree: S.PolicyFile) -> list[_Unit] | None:
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
    return _Gatherer(root.parent.resolve(), diagnostics).expand(tree, root.resolve(), [])


class _Gatherer:
    def __init__(self, tree_root: Path, diagnostics: Diagnostics) -> None:
        self.tree_root = tree_root
        self.diagnostics = diagnostics
        self.seen: set[Path] = set()

    def expand(self, tree: S.PolicyFile, path: Path, stack: list[Path]) -> list[_Unit]:
        self.seen.add(path)
        units: list[_Unit] = []
        items: list = []
        for top in tree.items:
            items.extend(top.items if isinstance(top, S.PolicyBlock) else [top])
        for item in items:
            if isinstance(item, S.Include):
                units.extend(self._include(item, path, stack + [path]))
            else:
                units.append(_Unit(item, path, tree))
        return units

    def _include(self, inc: S.Include, from_path: Path, stack: list[Path]) -> list[_Unit]:
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


# ---------------------------------------------------------------- the checker

class _Absent:
    """The value of an optional symbol that is not in the tables."""


ABSENT = _Absent()
Value = int | M.Address | _Absent | None  # None: an error was already reported


@dataclass
class _RuleContext:
    kind: str
    register: str | None = None  # the CR/MSR a write trigger watches
    msr_name: str | None = None


class _Checker:
    def __init__(self, units: list[_Unit], root: Path, diagnostics: Diagnostics, target_arch: str | None,
                 root_tree: S.PolicyFile) -> None:
        self.units = units
        self.root_tree = root_tree
        self.root = root
        self.d = diagnostics
        self.target_arch = target_arch
        self.broken: set[str] = set()
        for u in units:
            self.broken |= u.tree.broken_names
        self.tables: list[SymbolTable] = []
        self.symbol_sources: list[M.SymbolSource] = []
        self.const_defs: dict[str, S.Const] = {}
        self.const_values: dict[str, Value] = {}
        self.region_defs: dict[str, S.Region] = {}
        self.regions: dict[str, M.Region] = {}
        self.arch: ArchInfo = ARCHES["x86_64"]
        self.symbols_decl_span: Span | None = None
        self.reported_no_symbols = False

    def run(self) -> M.Policy | None:
        target, mode, name, span = self.read_settings()
        self.load_symbols()
        self.fold_constants()
        self.resolve_regions()
        rules = self.check_rules()
        if self.root_tree.policy is not None and not any(isinstance(u.item, S.Rule) for u in self.units):
            self.d.warning("PC504", span, f"policy '{name}' has no rules: it traps nothing")
        # Once per file, not per item: a policy may hold 100,000 items from a handful of files.
        files = [display_path(f) for f in dict.fromkeys([self.root] + [u.file for u in self.units])]
        return M.Policy(
            name=name, target=target, mode=mode, symbols=tuple(self.symbol_sources),
            constants=tuple(sorted((k, v.value if isinstance(v, M.Address) else v) for k, v in self.const_values.items()
                                   if isinstance(v, int))),
            regions=tuple(sorted(self.regions.values(), key=lambda r: r.name)),
            rules=tuple(rules), files=tuple(dict.fromkeys(files)), span=span)

    # -- 2. settings
    def read_settings(self) -> tuple[M.Target, str, str, Span]:
        block = self.root_tree.policy
        name, span = (block.name, block.span) if block else (self.root.stem, Span(display_path(self.root), 1, 1))
        targets = [u.item for u in self.units if isinstance(u.item, S.Target)]
        modes = [u.item for u in self.units if isinstance(u.item, S.Mode)]
        for dup in targets[1:]:
            self.d.error("PC316", dup.span, "target is set twice", f"the first is at {targets[0].span}")
        for dup in modes[1:]:
            self.d.error("PC316", dup.span, "mode is set twice", f"the first is at {modes[0].span}")
        target = self._target(targets[0] if targets else None, span)
        mode = "enforce"
        if modes:
            if modes[0].mode not in ("enforce", "audit"):
                self.d.error("PC422", modes[0].span, f"unknown mode '{modes[0].mode}'",
                             did_you_mean(modes[0].mode, ["enforce", "audit"]) or "the modes are enforce and audit")
            else:
                mode = modes[0].mode
        return target, mode, name, span

    def _target(self, t: S.Target | None, policy_span: Span) -> M.Target:
        if t is None:
            arch = self.target_arch or "x86_64"
            self.arch = ARCHES.get(arch, ARCHES["x86_64"])
            if self.target_arch is None:
                self.d.warning("PC411", policy_span, "no target given: assuming 'target xen >= 4.17 on x86_64'",
                               "say it: target xen >= 4.17 on x86_64 | x86_64-nomtf | x86_64-svm | arm64")
            return M.Target("xen", SUPPORTED_XEN, arch)
        if t.hypervisor != "xen":
            self.d.error("PC411", t.span, f"unknown hypervisor '{t.hypervisor}'", "policyc targets xen")
        version = SUPPORTED_XEN
        if t.version is not None:
            version = tuple(int(p) for p in t.version.split("."))
            if t.op not in (">=", "=="):
                self.d.error("PC412", t.span, f"version constraint '{t.op} {t.version}' is not supported",
                             "write: target xen >= 4.17 on ARCH")
            elif version < SUPPORTED_XEN:
                self.d.error("PC412", t.span, f"Xen {t.version} is older than 4.17",
                             "policyc speaks the vm_event interface version 7 of Xen 4.17 and later")
        arch = self.target_arch or t.arch
        if arch not in ARCHES:
            self.d.error("PC411", t.span, f"unknown architecture '{arch}'",
                         did_you_mean(arch, ARCHES) or f"the targets are {', '.join(ARCHES)}")
            arch = "x86_64"
        self.arch = ARCHES[arch]
        return M.Target("xen", version, arch)

    # -- 3. symbols
    def load_symbols(self) -> None:
        for u in self.units:
            if not isinstance(u.item, S.Symbols):
                continue
            self.symbols_decl_span = self.symbols_decl_span or u.item.span
            for name in u.item.paths:
                path = (u.file.parent / name)
                try:
                    table = load_symbol_table(path)
                except SymbolFileError as exc:
                    hint = None
                    if "\x00" not in name and not path.exists() and path.parent.is_dir():
                        hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir()])
                    self.d.error("PC304", u.item.span, str(exc), hint)
                    continue
                self.tables.append(table)
                self.symbol_sources.append(M.SymbolSource(display_path(path), name, table.sha256))

    def lookup_symbol(self, ref: S.SymbolRef) -> Value:
        if not self.tables:
            if self.symbols_decl_span is None and not self.reported_no_symbols:
                self.reported_no_symbols = True
                self.d.error("PC312", ref.span, f"'symbol {ref.name}' needs a symbol file",
                             'declare one: symbols "System.map" (a System.map or a Volatility 3 ISF)')
            return None
        for table in self.tables:
            sym = table.lookup(ref.name)
            if sym is None:
                continue
            if sym.percpu and not ref.percpu:
                self.d.error("PC305", ref.span, f"'{ref.name}' is a per-CPU symbol (0x{sym.address:x} is an offset "
                             "into each CPU's per-CPU area), not an address",
                             f"write 'percpu symbol {ref.name}' for the instance of the vCPU that raised the event")
                return None
            if ref.percpu and not sym.percpu:
                self.d.error("PC305", ref.span, f"'{ref.name}' is not a per-CPU symbol",
                             f"write 'symbol {ref.name}'")
                return None
            others = table.duplicates.get(ref.name)
            if others:
                self.d.warning("PC318", ref.span, f"'{ref.name}' is defined {len(others) + 1} times in "
                               f"{Path(table.source).name}; the first, 0x{sym.address:x}, is used "
                               f"(also at {', '.join(f'0x{a:x}' for a in others)})",
                               "check that the map matches the guest's kernel, or use an ISF")
            return M.Address(sym.address, sym.percpu, f"symbol {ref.name}")
        files = ", ".join(Path(t.source).name for t in self.tables)
        if ref.optional:
            self.d.warning("PC303", ref.span, f"optional symbol '{ref.name}' is not in {files}: "
                           "what uses it is empty")
            return ABSENT
        near: list[str] = []
        for t in self.tables:
            near += t.near_names(ref.name)
        hint = did_you_mean(ref.name, near) if near else None
        hint = (hint + " " if hint else "") + f"(if some kernels lack it, write 'symbol? {ref.name}')"
        self.d.error("PC302", ref.span, f"unknown symbol '{ref.name}' (not in {files})", hint)
        return None

    def _keyword_name(self, name: str, kind: str, span: Span) -> bool:
        if name not in KEYWORD_NAMES:
            return False
        self.d.error("PC313", span, f"'{name}' is a keyword of the policy language and cannot name a {kind}",
                     f"rename it, e.g. '{name}_{kind}'")
        self.broken.add(name)
        return True

    # -- 4. constants
    def fold_constants(self) -> None:
        for u in self.units:
            if isinstance(u.item, S.Const):
                c = u.item
                if self._keyword_name(c.name, "constant", c.span):
                    continue
                if c.name in self.const_defs:
                    self.d.error("PC301", c.span, f"constant '{c.name}' is defined twice",
                                 f"the first is at {self.const_defs[c.name].span}")
                    continue
                self.const_defs[c.name] = c
        for name in self.const_defs:
            self._const(name, [])

    def _const(self, name: str, stack: list[str]) -> Value:
        if name in self.const_values:
            return self.const_values[name]
        c = self.const_defs[name]
        if name in stack:
            chain = " -> ".join(stack[stack.index(name):] + [name])
            self.d.error("PC314", c.span, f"constant '{name}' is defined in terms of itself: {chain}")
            self.const_values[name] = None
            return None
        value = self.fold(c.value, stack + [name])
        if value is ABSENT:
            self.d.error("PC400", c.value.span, f"constant '{name}' is an absent optional symbol")
            value = None
        self.const_values[name] = value
        return value

    def fold(self, e: S.Expr, stack: list[str] | None = None) -> Value:
        """Fold an expression that must be known at compile time: a number or an address."""
        stack = stack or []
        if isinstance(e, S.Num):
            if e.value > U64:
                self.d.error("PC406", e.span, "number does not fit in 64 bits", f"the largest is 0x{U64:x}")
                return None
            return e.value
        if isinstance(e, S.Name):
            if e.name in self.const_defs:
                return self._const(e.name, stack)
            if e.name in self.broken:
                return None
            hint = did_you_mean(e.name, self.const_defs)
            if e.name in self.arch.registers or any(e.name in f for f in EVENT_FIELDS.values()):
                hint = f"'{e.name}' is only known when an event arrives: use it in a rule's 'where'"
            self.d.error("PC300", e.span, f"unknown constant '{e.name}'", hint)
            return None
        if isinstance(e, S.Attr):
            return self._named_bit(e)
        if isinstance(e, S.SymbolRef):
            return self.lookup_symbol(e)
        if isinstance(e, S.Unary):
            if e.op == "not":
                self.d.error("PC400", e.span, "'not' gives true/false; a number is needed here")
                return None
            v = self.fold(e.operand, stack)
            if v is None or v is ABSENT:
                return v
            if isinstance(v, M.Address):
                self.d.error("PC408", e.span, f"'{e.op}' cannot apply to an address")
                return None
            return -v if e.op == "-" else (~v) & U64
        if isinstance(e, S.Binary):
            if e.op in S.COMPARISONS or e.op in ("and", "or"):
                self.d.error("PC400", e.span, f"'{e.op}' gives true/false; a number is needed here")
                return None
            left, right = self.fold(e.left, stack), self.fold(e.right, stack)
            if left is None or right is None:
                return None
            if left is ABSENT or right is ABSENT:
                return ABSENT
            return self._arith(e, left, right)
        if isinstance(e, S.Call):
            return self._call_value(e)
        if isinstance(e, S.InRegion):
            self.d.error("PC400", e.span, "'in' gives true/false; a number is needed here")
            return None
        raise TypeError(e)

    def _arith(self, e: S.Binary, left: int | M.Address, right: int | M.Address) -> Value:
        la, ra = isinstance(left, M.Address), isinstance(right, M.Address)
        if la or ra:
            if e.op == "+" and not (la and ra):
                a, n = (left, right) if la else (right, left)
                return M.Address(a.value + n, a.percpu, f"{a.origin} + 0x{n:x}")  # type: ignore[union-attr,operator]
            if e.op == "-" and la and not ra:
                return M.Address(left.value - right, left.percpu, f"{left.origin} - 0x{right:x}")  # type: ignore
            if e.op == "-" and la and ra:
                if left.percpu != right.percpu:  # type: ignore[union-attr]
                    self.d.error("PC408", e.span, "subtracting a per-CPU offset from an address means nothing")
                    return None
                return left.value - right.value  # type: ignore[union-attr]
            self.d.error("PC408", e.span, f"'{e.op}' cannot combine these: an address only takes + or - a number",
                         "addresses move by the KASLR slide at install; only offsets from them keep their meaning")
            return None
        a, b = int(left), int(right)  # type: ignore[arg-type]
        if e.op in ("/", "%") and b == 0:
            self.d.error("PC407", e.span, "division by zero")
            return None
        if e.op in ("<<", ">>") and not 0 <= b < 64:
            self.d.error("PC406", e.span, f"shift by {b}: shifts take 0..63")
            return None
        result = _ARITHMETIC[e.op](a, b)
        if not -(1 << 63) <= result <= U64:
            self.d.error("PC406", e.span, f"the result {result:#x} does not fit in 64 bits")
            return None
        return result

    def _named_bit(self, e: S.Attr) -> Value:
        bits = self.arch.named_bits.get(e.base)
        if bits is None:
            lowered = {k.lower(): k for k in self.arch.named_bits}
            if e.base.lower() in lowered:
                bits = self.arch.named_bits[lowered[e.base.lower()]]
            else:
                self.d.error("PC402", e.span, f"'{e.base}' has no named bits on {self.arch.name}",
                             did_you_mean(e.base, self.arch.named_bits) or
                             f"named bits exist for: {', '.join(self.arch.named_bits)}")
                return None
        if e.attr not in bits:
            self.d.error("PC403", e.span, f"{e.base} has no bit '{e.attr}'",
                         did_you_mean(e.attr, bits) or f"its bits: {', '.join(bits)}")
            return None
        return bits[e.attr]

    def _call_value(self, e: S.Call) -> Value:
        if e.func in ("offsetof", "sizeof"):
            want = 2 if e.func == "offsetof" else 1
            if len(e.args) != want:
                self.d.error("PC420", e.span, f"{e.func} takes {want} argument{'s' if want > 1 else ''}")
                return None
            type_name = _plain_name(e.args[0])
            if type_name is None:
                self.d.error("PC400", e.args[0].span, f"{e.func} takes a type name")
                return None
            tables = [t for t in self.tables if t.types]
            if not tables:
                self.d.error("PC309", e.span, f"{e.func} needs type information",
                             "declare a Volatility 3 ISF symbol file (a System.map has no types)")
                return None
            member_path = _member_path(e.args[1]) if want == 2 else []
            if want == 2 and member_path is None:
                self.d.error("PC400", e.args[1].span, "offsetof takes a member name (or a.b for nested members)")
                return None
            errors = []
            for t in tables:
                try:
                    return t.offsetof(type_name, member_path) if want == 2 else t.sizeof(type_name)
                except KeyError as exc:
                    errors.append(str(exc.args[0]))
            near = did_you_mean(type_name, [n for t in tables for n in t.types if abs(len(n) - len(type_name)) < 4])
            if member_path and type_name in tables[0].types:
                near = did_you_mean(member_path[-1], tables[0].types[type_name].fields)
            self.d.error("PC309", e.span, errors[0], near)
            return None
        if e.func in ("set", "cleared", "changed"):
            self.d.error("PC400", e.span, f"{e.func}() gives true/false and is only meaningful in a rule's 'where'")
            return None
        self.d.error("PC419", e.span, f"unknown function '{e.func}'",
                     did_you_mean(e.func, ["offsetof", "sizeof", "set", "cleared", "changed"]))
        return None

    # -- 5. regions
    def resolve_regions(self) -> None:
        for u in self.units:
            if isinstance(u.item, S.Region):
                r = u.item
                if self._keyword_name(r.name, "region", r.span):
                    continue
                if r.name in RESERVED_REGION_NAMES:
                    self.d.error("PC313", r.span, f"'{r.name}' is a register name and cannot name a region",
                                 f"rename it, e.g. '{r.name}_region'")
                    continue
                if r.name in self.region_defs:
                    self.d.error("PC301", r.span, f"region '{r.name}' is defined twice",
                                 f"the first is at {self.region_defs[r.name].span}")
                    continue
                self.region_defs[r.name] = r
        for name in self.region_defs:
            self._region(name, [])

    def _region(self, name: str, stack: list[str]) -> M.Region | None:
        if name in self.regions:
            return self.regions[name]
        r = self.region_defs[name]
        if name in stack:
            chain = " -> ".join(stack[stack.index(name):] + [name])
            self.d.error("PC315", r.span, f"region '{name}' is defined in terms of itself: {chain}")
            return None
        extents: list = []
        for term in r.terms:
            extents += self._terms(term, stack + [name])
        region = M.Region(name, tuple(extents), r.span)
        self.regions[name] = region
        return region

    def _terms(self, term: S.RegionTerm, stack: list[str]) -> list:
        if isinstance(term, S.RegionRef):
            if term.name in self.region_defs:
                sub = self._region(term.name, stack)
                return list(sub.extents) if sub else []
            if term.name not in self.broken:
                self.d.error("PC300", term.span, f"unknown region '{term.name}'",
                             did_you_mean(term.name, self.region_defs))
            return []
        if isinstance(term, S.RegisterRegion):
            if term.register not in ("idtr", "gdtr"):
                self.d.error("PC402", term.span, f"a region can take its base from idtr or gdtr, not "
                             f"'{term.register}'", did_you_mean(term.register, ["idtr", "gdtr"]))
                return []
            size = self._size(term.size)
            return [M.RegisterExtent(term.register, size, term.span)] if size else []
        if isinstance(term, S.SizedRegion):
            base, size = self.fold(term.base), self._size(term.size)
            if base is ABSENT or base is None or size is None:
                return []
            return self._extent(term, term.space, base, size)
        if isinstance(term, S.RangeRegion):
            start, end = self.fold(term.start), self.fold(term.end)
            if start is ABSENT or end is ABSENT or start is None or end is None:
                return []
            if isinstance(start, M.Address) != isinstance(end, M.Address):
                self.d.error("PC408", term.span, "a range from an address to a plain number (or back)",
                             "give both ends as symbols, or both as numbers with va/pa")
                return []
            s_val = start.value if isinstance(start, M.Address) else start
            e_val = end.value if isinstance(end, M.Address) else end
            if e_val <= s_val:
                self.d.error("PC417", term.span, f"the range ends (0x{e_val:x}) before or where it starts "
                             f"(0x{s_val:x})", "a range is START .. END with END above START")
                return []
            return self._extent(term, term.space, start, e_val - s_val)
        raise TypeError(term)

    def _extent(self, term, space: str | None, base: int | M.Address, size: int) -> list:
        space = space or "va"
        if space == "pa":
            if isinstance(base, M.Address):
                self.d.error("PC408", term.span, "a 'pa' region takes a guest-physical number, not a symbol",
                             "symbols are virtual addresses: drop 'pa'")
                return []
            start: int | M.Address = base
        else:
            start = base if isinstance(base, M.Address) else M.Address(base, False, f"va 0x{base:x}")
        value = start.value if isinstance(start, M.Address) else start
        if value < 0 or value + size > U64 + 1:
            self.d.error("PC406", term.span, "the region does not fit in the 64-bit address space")
            return []
        return [M.Extent(space, start, size, term.span)]

    def _size(self, e: S.Expr) -> int | None:
        v = self.fold(e)
        if v is None or v is ABSENT:
            return None
        if isinstance(v, M.Address):
            self.d.error("PC400", e.span, "a size must be a number, not an address",
                         "for the distance between two symbols write 'symbol A .. symbol B'")
            return None
        if v <= 0:
            self.d.error("PC405", e.span, f"size must be positive, not {v}")
            return None
        return v

    # -- 6. rules
    def check_rules(self) -> list[M.Rule]:
        rules: list[M.Rule] = []
        names: dict[str, Span] = {}
        for u in self.units:
            if not isinstance(u.item, S.Rule):
                continue
            r = u.item
            if r.name is not None and self._keyword_name(r.name, "rule", r.span):
                continue
            generated = r.name is None
            name = r.name or _generated_rule_name(u.file, r.span)
            if name in names:
                self.d.error("PC301", r.span, f"rule '{name}' is defined twice", f"the first is at {names[name]}")
                continue
            names[name] = r.span
            rule = self._rule(r, name, generated)
            if rule is not None:
                rules.append(rule)
        return rules

    def _rule(self, r: S.Rule, name: str, generated: bool) -> M.Rule | None:
        errors_before = self.d.error_count
        trigger, ctx = self._trigger(r.trigger, name)
        condition = None
        if r.where is not None and ctx is not None:
            condition = self._condition(r.where, ctx)
            if condition is not None and not _reads_event(condition) and self.d.error_count == errors_before:
                self.d.warning("PC421", r.where.span, "this condition does not depend on the event: "
                               "it is always true or always false")
        actions, priority = self._actions(r, ctx)
        if trigger is None or self.d.error_count != errors_before:
            return None
        return M.Rule(name, trigger, condition, tuple(actions), priority, generated, r.span)

    def _trigger(self, t: S.Trigger, rule_name: str) -> tuple[M.Trigger | None, _RuleContext | None]:
        result: M.Trigger | None = None
        ctx: _RuleContext | None = None
        if isinstance(t, S.MemoryTrigger):
            names = []
            for i, term in enumerate(t.regions):
                if isinstance(term, S.RegionRef):
                    if term.name in self.regions:
                        names.append(term.name)
                    elif term.name in RESERVED_REGION_NAMES:
                        self.d.error("PC400", term.span, f"'{term.name}' is a register, not a region",
                                     f"for register writes write 'on write {term.name}'")
                    elif term.name not in self.broken and term.name not in self.region_defs:
                        self.d.error("PC300", term.span, f"unknown region '{term.name}'",
                                     did_you_mean(term.name, self.region_defs))
                    continue
                inline = f"{rule_name}#{i + 1}"
                self.regions[inline] = M.Region(inline, tuple(self._terms(term, [])), term.span)
                names.append(inline)
            result, ctx = M.MemoryTrigger(t.access, tuple(names), t.span), _RuleContext("memory")
        elif isinstance(t, S.ExecuteTrigger):
            v = self.fold(t.address)
            literal = isinstance(v, int)
            if literal:
                v = M.Address(v, False, f"{t.space or 'va'} 0x{v:x}")
            if isinstance(v, M.Address) and v.percpu:
                self.d.error("PC305", t.span, "a breakpoint needs a code address, not a per-CPU offset")
            elif v is ABSENT:
                self.d.error("PC302", t.span, "the breakpoint's optional symbol is absent: nothing to execute")
            elif isinstance(v, M.Address):
                result = M.Breakpoint(v, t.span, relocatable=not literal, physical=t.space == "pa")
            ctx = _RuleContext("breakpoint")
        elif isinstance(t, S.RegisterTrigger):
            reg = t.register
            if reg in CONTROL_REGISTERS:
                if t.access == "read":
                    self.d.error("PC418", t.span, f"Xen cannot trap reads of {reg}",
                                 f"monitor writes instead: 'on write {reg}'")
                else:
                    result = M.ControlRegisterTrigger(reg, t.span)
                ctx = _RuleContext("control_register", reg)
            elif reg in DESCRIPTOR_REGISTERS:
                result, ctx = M.DescriptorTrigger(t.access, reg, t.span), _RuleContext("descriptor", reg)
            else:
                hint = did_you_mean(reg, CONTROL_REGISTERS + DESCRIPTOR_REGISTERS)
                if reg in self.regions or reg in self.region_defs:
                    hint = f"for writes to the region write 'on {t.access} {'to' if t.access == 'write' else 'of'} {reg}'"
                elif reg in self.arch.msrs or reg.upper() in self.arch.msrs:
                    hint = f"'{reg}' is an MSR: write 'on write msr {reg}'"
                self.d.error("PC402", t.span, f"cannot trap {t.access}s of '{reg}'",
                             hint or "registers: cr0 cr3 cr4 xcr0 (write); idtr gdtr ldtr tr (read, write)")
        elif isinstance(t, S.MsrTrigger):
            index, name = self._msr(t.msr)
            if index is not None:
                result = M.MsrTrigger(index, name, t.span)
            ctx = _RuleContext("msr", name, name)
        elif isinstance(t, S.CpuidTrigger):
            leaf = None
            if t.leaf is not None:
                v = self.fold(t.leaf)
                if isinstance(v, int) and not 0 <= v <= 0xFFFFFFFF:
                    self.d.error("PC406", t.leaf.span, "a CPUID leaf is a 32-bit number")
                elif isinstance(v, int):
                    leaf = v
                elif v is not None:
                    self.d.error("PC400", t.leaf.span, "a CPUID leaf is a number")
            result, ctx = M.CpuidTrigger(leaf, t.span), _RuleContext("cpuid")
        elif isinstance(t, S.EventTrigger):
            result, ctx = M.EventTrigger(t.kind, t.span), _RuleContext(t.kind)
        if result is not None and result.kind not in self.arch.triggers:
            where = [a for a, info in ARCHES.items() if result.kind in info.triggers]
            self.d.error("PC418", t.span, f"'{_trigger_words(result)}' triggers do not exist on {self.arch.name}",
                         f"they exist on: {', '.join(where)}" if where else None)
            return None, ctx
        return result, ctx

    def _msr(self, e: S.Expr) -> tuple[int | None, str | None]:
        if isinstance(e, S.Name):
            if e.name in self.arch.msrs:
                return self.arch.msrs[e.name], e.name
            upper = e.name.upper().removeprefix("MSR_").removeprefix("IA32_")
            if upper in self.arch.msrs and e.name not in self.const_defs:
                return self.arch.msrs[upper], upper
            if e.name in self.const_defs:
                v = self.fold(e)
                if isinstance(v, int):
                    return v, self.arch.msr_name(v)
                return None, None
            self.d.error("PC404", e.span, f"unknown MSR '{e.name}'",
                         did_you_mean(e.name, self.arch.msrs) or "give its number: 'on write msr 0xc0000082'")
            return None, None
        v = self.fold(e)
        if isinstance(v, int):
            if not 0 <= v <= 0xFFFFFFFF:
                self.d.error("PC406", e.span, "an MSR index is a 32-bit number")
                return None, None
            return v, self.arch.msr_name(v)
        return None, None

    # -- conditions
    def _condition(self, e: S.Expr, ctx: _RuleContext) -> M.Condition | None:
        cond, kind = self._cond(e, ctx)
        if cond is None:
            return None
        if kind != "bool":
            self.d.error("PC400", e.span, "a condition must be true or false, not a number",
                         "compare it, e.g. 'rax != 0'")
            return None
        return cond

    def _cond(self, e: S.Expr, ctx: _RuleContext) -> tuple[M.Condition | None, str]:
        """Typed condition: returns (node, "bool"|"int")."""
        if isinstance(e, (S.Num, S.SymbolRef)):
            v = self.fold(e)
            return self._value_node(v, e), "int"
        if isinstance(e, S.Attr):
            v = self._named_bit(e)
            return (M.Literal(v) if isinstance(v, int) else None), "int"
        if isinstance(e, S.Name):
            return self._name(e, ctx), "int"
        if isinstance(e, S.Unary):
            inner, kind = self._cond(e.operand, ctx)
            if inner is None:
                return None, "bool" if e.op == "not" else "int"
            if e.op == "not":
                if kind != "bool":
                    self.d.error("PC400", e.span, "'not' takes a condition; for bits use '~'")
                    return None, "bool"
                return M.Not(inner), "bool"
            if kind != "int":
                self.d.error("PC400", e.span, f"'{e.op}' takes a number")
                return None, "int"
            return _fold_node(M.Unary(e.op, inner)), "int"
        if isinstance(e, S.Binary):
            left, lk = self._cond(e.left, ctx)
            right, rk = self._cond(e.right, ctx)
            if e.op in ("and", "or"):
                for side, k in ((e.left, lk), (e.right, rk)):
                    if k != "bool":
                        self.d.error("PC400", side.span, f"'{e.op}' joins conditions, and this is a number",
                                     "compare it, e.g. 'x != 0'")
                        return None, "bool"
                return (M.Logic(e.op, left, right) if left and right else None), "bool"
            for side, k in ((e.left, lk), (e.right, rk)):
                if k != "int":
                    self.d.error("PC400", side.span, f"'{e.op}' takes numbers, and this is a condition")
                    return None, "bool" if e.op in S.COMPARISONS else "int"
            if left is None or right is None:
                return None, "bool" if e.op in S.COMPARISONS else "int"
            if e.op in S.COMPARISONS:
                return M.Compare(e.op, left, right), "bool"
            if isinstance(left, (M.Address,)) or isinstance(right, M.Address):
                if e.op not in ("+", "-"):
                    self.d.error("PC408", e.span, f"'{e.op}' cannot apply to an address")
                    return None, "int"
            if e.op in ("/", "%") and isinstance(right, M.Literal) and right.value == 0:
                self.d.error("PC407", e.span, "division by zero")
                return None, "int"
            return _fold_node(M.Binary(e.op, left, right)), "int"
        if isinstance(e, S.InRegion):
            value, kind = self._cond(e.value, ctx)
            if e.region not in self.regions:
                if e.region not in self.broken:
                    self.d.error("PC300", e.region_span, f"unknown region '{e.region}'",
                                 did_you_mean(e.region, self.region_defs))
                return None, "bool"
            if kind != "int":
                self.d.error("PC400", e.value.span, "'in' tests a number (an address) against a region")
                return None, "bool"
            return (M.InRegion(value, e.region, e.negated) if value else None), "bool"
        if isinstance(e, S.Call):
            if e.func in ("set", "cleared", "changed"):
                return self._bit_test(e, ctx), "bool"
            v = self._call_value(e)
            return (M.Literal(v) if isinstance(v, int) else None), "int"
        raise TypeError(e)

    def _value_node(self, v: Value, e: S.Expr) -> M.Condition | None:
        if v is None:
            return None
        if v is ABSENT:
            self.d.error("PC302", e.span, "an absent optional symbol cannot be compared with",
                         "use 'symbol' if the rule needs it, or move the test into a region")
            return None
        if isinstance(v, M.Address):
            return v
        return M.Literal(v)

    def _name(self, e: S.Name, ctx: _RuleContext) -> M.Condition | None:
        name = e.name
        if name in self.const_defs:
            return self._value_node(self._const(name, []), e)
        fields = EVENT_FIELDS[ctx.kind]
        if name in fields or name in self.arch.registers:
            return M.Field(name)
        if name in self.arch.msrs:
            return M.Literal(self.arch.msrs[name])
        elsewhere = [k for k, fs in EVENT_FIELDS.items() if name in fs]
        if elsewhere:
            self.d.error("PC401", e.span, f"'{name}' is not available on {_kind_words(ctx.kind)} triggers",
                         f"it belongs to {', '.join(_kind_words(k) for k in elsewhere)} triggers; here: "
                         f"{', '.join(fields)} and the registers")
            return None
        other_arch = [a for a, info in ARCHES.items() if name in info.registers and a != self.arch.name]
        hint = did_you_mean(name, list(fields) + list(self.arch.registers) + list(self.const_defs))
        if other_arch:
            hint = f"'{name}' is a register on {', '.join(other_arch)}, not on {self.arch.name}" + (
                f"; {hint}" if hint else "")
        self.d.error("PC402", e.span, f"unknown name '{name}'", hint)
        return None

    def _bit_test(self, e: S.Call, ctx: _RuleContext) -> M.Condition | None:
        if ctx.kind not in ("control_register", "msr"):
            self.d.error("PC401", e.span, f"{e.func}() compares the old and new value of a register write; "
                         f"{_kind_words(ctx.kind)} triggers have none",
                         "use it on 'on write cr0|cr4|xcr0' or 'on write msr ...'")
            return None
        if len(e.args) != 1:
            self.d.error("PC420", e.span, f"{e.func}() takes one argument: the bits, e.g. {e.func}(cr0.WP)")
            return None
        mask = self.fold(e.args[0])
        if not isinstance(mask, int) or isinstance(mask, bool):
            if mask is not None:
                self.d.error("PC400", e.args[0].span, f"{e.func}() takes bits (a number), e.g. cr4.SMEP | cr4.SMAP")
            return None
        for attr in _attrs(e.args[0]):
            owner = attr.base.lower()
            if owner == "access" or owner == (ctx.register or "").lower():
                continue
            self.d.error("PC400", attr.span, f"{attr.base}.{attr.attr} is a bit of {attr.base}, but this rule "
                         f"watches writes to {ctx.register or 'an MSR'}")
            return None
        if mask == 0:
            self.d.error("PC405", e.args[0].span, f"{e.func}() of no bits is never true")
            return None
        return M.BitTest(e.func, mask)

    # -- actions
    def _actions(self, r: S.Rule, ctx: _RuleContext | None) -> tuple[list[M.Action], int]:
        out: list[M.Action] = []
        priority = 0
        priorities = [a for a in r.actions if isinstance(a, S.Priority)]
        for dup in priorities[1:]:
            self.d.error("PC316", dup.span, "priority is set twice in one rule")
        if priorities:
            v = self.fold(priorities[0].value)
            if isinstance(v, int):
                priority = v
            elif v is not None:
                self.d.error("PC400", priorities[0].value.span, "a priority is a number")
        verdicts: list[S.Action] = []
        for a in r.actions:
            if isinstance(a, S.Priority):
                continue
            action = self._action(a, ctx, verdicts)
            if action is not None:
                out.append(action)
        kinds = {type(v) for v in verdicts}
        if S.Allow in kinds and S.Deny in kinds:
            self.d.error("PC413", verdicts[-1].span, "this rule says both allow and deny",
                         "a rule has one verdict; split it into two rules with conditions that tell them apart")
        return out, priority

    def _action(self, a: S.Action, ctx: _RuleContext | None, verdicts: list) -> M.Action | None:
        if isinstance(a, S.Allow):
            verdicts.append(a)
            return M.Verdict("allow", span=a.span)
        if isinstance(a, S.Deny):
            verdicts.append(a)
            feed = None
            if a.feed is not None and ctx is not None and ctx.kind != "memory":
                self.d.error("PC400", a.span, "'deny feed' gives data to a denied memory read; this is no memory trigger")
            if a.exception is not None and ctx is not None and ctx.kind not in ("memory", "breakpoint"):
                self.d.error("PC400", a.span, "'deny with' injects an exception for a denied execute; "
                             f"{_kind_words(ctx.kind)} writes are refused without one")
            if a.feed is not None:
                try:
                    feed = a.feed.encode("latin-1")
                except UnicodeEncodeError:
                    self.d.error("PC113", a.span, "fed bytes must be \\x00-\\xff", "write bytes as \\xNN")
            if a.exception is not None and a.exception not in EXCEPTION_VECTORS:
                self.d.error("PC414", a.span, f"unknown exception vector '{a.exception}'",
                             did_you_mean(a.exception, EXCEPTION_VECTORS) or "e.g. #UD or #GP")
            return M.Verdict("deny", feed, a.exception, a.span)
        if isinstance(a, S.Report):
            if a.severity not in SEVERITIES:
                self.d.error("PC415", a.span, f"unknown severity '{a.severity}'",
                             did_you_mean(a.severity, SEVERITIES) or f"severities: {' '.join(SEVERITIES)}")
            fields = self._template(a, ctx)
            return M.LogAction(a.kind, a.severity, a.template, tuple(fields), a.span)
        if isinstance(a, S.Pause):
            return M.Pause(a.span)
        if isinstance(a, S.Disarm):
            return M.Disarm(a.span)
        if isinstance(a, S.Limit):
            rate = self.fold(a.rate)
            then = self._action(a.then, ctx, verdicts)
            if not isinstance(rate, int) or rate <= 0:
                if rate is not None:
                    self.d.error("PC416", a.rate.span, "a rate limit must be a positive number of events per second")
                return None
            return M.RateLimit(rate, then, a.span) if then is not None else None
        raise TypeError(a)

    def _template(self, a: S.Report, ctx: _RuleContext | None) -> list[str]:
        allowed = list(META_TEMPLATE_FIELDS) + list(self.arch.registers)
        if ctx is not None:
            allowed += list(EVENT_FIELDS[ctx.kind])
        found: list[str] = []
        try:
            parsed = list(string.Formatter().parse(a.template))
        except ValueError as exc:
            self.d.error("PC410", a.template_span, f"malformed message template: {exc}",
                         "fields are written {name} or {name:#x}; a literal brace is {{ or }}")
            return []
        for _, field_name, spec, conversion in parsed:
            if field_name is None:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field_name) or conversion:
                self.d.error("PC410", a.template_span, f"'{{{field_name}}}' is not a field reference",
                             "fields are written {name} or {name:#x}")
                continue
            if field_name not in allowed:
                self.d.error("PC409", a.template_span, f"the message uses '{{{field_name}}}', which "
                             f"{_kind_words(ctx.kind) if ctx else 'this'} events do not carry",
                             did_you_mean(field_name, allowed))
                continue
            too_wide = format_width_over_bound(spec or "")
            if too_wide:
                self.d.error("PC410", a.template_span, f"'{spec}' pads to {too_wide} characters",
                             f"a field's width and precision are at most {MAX_FORMAT_WIDTH}: each record "
                             "is written per event")
                continue
            try:
                format(0, spec or "")
            except ValueError:
                self.d.error("PC410", a.template_span, f"'{spec}' is not a number format", "e.g. {gla:#x} or {vcpu}")
                continue
            found.append(field_name)
        return list(dict.fromkeys(found))


def _generated_rule_name(file: Path, span: Span) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", file.stem)
    return f"{stem}_L{span.line}"


def _plain_name(e: S.Expr) -> str | None:
    return e.name if isinstance(e, S.Name) else None


def _member_path(e: S.Expr) -> list[str] | None:
    if isinstance(e, S.Name):
        return [e.name]
    if isinstance(e, S.Attr):
        return [e.base, e.attr]
    return None


def _attrs(e: S.Expr) -> list[S.Attr]:
    if isinstance(e, S.Attr):
        return [e]
    if isinstance(e, S.Binary):
        return _attrs(e.left) + _attrs(e.right)
    if isinstance(e, S.Unary):
        return _attrs(e.operand)
    return []


def _reads_event(c: M.Condition) -> bool:
    if isinstance(c, (M.Field, M.BitTest, M.InRegion)):
        return True
    if isinstance(c, (M.Literal, M.Address)):
        return False
    if isinstance(c, (M.Unary, M.Not)):
        return _reads_event(c.operand)
    return _reads_event(c.left) or _reads_event(c.right)  # type: ignore[union-attr]


def _fold_node(node: M.Condition) -> M.Condition:
    """Fold arithmetic on literals so the plan's expressions stay small."""
    if isinstance(node, M.Unary) and isinstance(node.operand, M.Literal):
        v = node.operand.value
        return M.Literal(-v if node.op == "-" else (~v) & U64)
    if isinstance(node, M.Binary) and isinstance(node.left, M.Literal) and isinstance(node.right, M.Literal):
        a, b = node.left.value, node.right.value
        ops = {"+": a + b, "-": a - b, "*": a * b, "&": a & b, "|": a | b, "^": a ^ b}
        if node.op in ops:
            return M.Literal(ops[node.op] & U64)
    return node


def _trigger_words(t: M.Trigger) -> str:
    return {"memory": "memory access", "breakpoint": "execute (breakpoint)", "control_register": "control register",
            "msr": "MSR write", "descriptor": "descriptor register", "cpuid": "cpuid",
            "guest_request": "guest_request", "debug_exception": "debug_exception", "smc": "smc"}[t.kind]


def _kind_words(kind: str) -> str:
    return {"memory": "memory", "breakpoint": "breakpoint", "control_register": "control-register",
            "msr": "MSR", "descriptor": "descriptor", "cpuid": "cpuid", "guest_request": "guest_request",
            "debug_exception": "debug_exception", "smc": "smc"}[kind]
