"""What an editor asks about a policy being written: the language server's answers, without the protocol.

`analyze` checks an unsaved buffer exactly as `policyc check` checks a file
(the same parser, checker and lowering, so the same codes, spans and hints,
including what the policy's target cannot enforce) and keeps what the other
questions need: the syntax trees of the buffer and its includes, the symbol
tables, and the plan when the policy compiled. `hover`, `complete`,
`definition` and `replacements` answer from that; positions are 1-based
lines and columns, as in every `Span`. `policyc.lsp` speaks the protocol.

Symbol completion must stay fast on a 160,000-name ISF: each table's names
are sorted once (`SymbolIndex`) and a prefix is two bisections.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import model as M
from . import syntax as S
from .arch import ARCHES, CONTROL_REGISTERS, DESCRIPTOR_REGISTERS, EVENT_FIELDS, EXCEPTION_VECTORS, SEVERITIES, \
    TRIGGER_KINDS
from .diagnostics import Diagnostic, Diagnostics, Span
from .source import display_path, is_yaml_path, read_policy_file
from .symbols import Symbol, SymbolFileError, SymbolTable, load_symbol_table

__all__ = ["Analysis", "Completion", "SymbolIndex", "analyze", "complete", "definition", "hover",
           "keywords", "replacements", "word_at"]

COMPLETION_LIMIT = 200
# System.map type letters (nm(1)) -> the section a symbol lives in.
SECTIONS = {"t": ".text", "d": ".data", "b": ".bss", "r": ".rodata", "a": "absolute", "w": "weak",
            "v": "weak object", "u": "undefined"}
PAGE = 4096


@dataclass
class Analysis:
    """One check of one buffer, and what it found."""
    path: Path
    shown: str  # the file name diagnostics use for this buffer
    text: str
    diagnostics: list[Diagnostic]
    trees: list[tuple[Path, S.PolicyFile]]  # the buffer first, then its includes
    tables: list[SymbolTable] = field(default_factory=list)
    policy: M.Policy | None = None
    plan: dict | None = None

    @property
    def arch(self) -> str:
        for _, item in self.items():
            if isinstance(item, S.Target) and item.arch in ARCHES:
                return item.arch
        return "x86_64"

    def items(self) -> list[tuple[Path, S.Item]]:
        """Every item of the buffer and its includes, with the file it is in."""
        return [(path, item) for path, tree in self.trees for item in _items(tree)]

    def include_leading_to(self, shown: str) -> Span | None:
        """The buffer's own `include` through which the file `shown` (a diagnostic's file) is read."""
        target = Path(shown).resolve()
        own = [item for item in _items(self.trees[0][1]) if isinstance(item, S.Include)] if self.trees else []
        for inc in own:
            start = (self.path.parent / inc.path).resolve()
            if start == target or target in _reachable(start):
                return inc.span
        return None

    def named(self, name: str) -> tuple[Path, S.Item] | None:
        """The constant, region or rule called `name`."""
        for path, item in self.items():
            if isinstance(item, (S.Const, S.Region, S.Rule)) and item.name == name:
                return path, item
        return None


@dataclass(frozen=True)
class Completion:
    label: str
    kind: str  # "keyword" | "region" | "constant" | "rule" | "register" | "msr" | "symbol" | "field" | "value"
    detail: str = ""


def analyze(text: str, path: str | Path) -> Analysis:
    """Check `text` as the contents of `path` (includes and symbol files are read from disk)."""
    from .check import check_file_tree
    from .compiler import compile_plan

    path = Path(path)
    shown = display_path(path)
    diagnostics = Diagnostics()
    tree = _parse(text, shown, diagnostics)
    analysis = Analysis(path, shown, text, [], [(path, tree)] if tree is not None else [])
    if tree is not None:
        analysis.trees += _included_trees(tree, path)
        analysis.tables = _tables(analysis)
        # An include-only file is checked through the policies including it, as `check` does.
        if tree.policy is not None:
            analysis.policy = check_file_tree(tree, path, diagnostics)
            if analysis.policy is not None:
                analysis.plan = compile_plan(analysis.policy, diagnostics)
    analysis.diagnostics = diagnostics.sorted()
    return analysis


def word_at(text: str, line: int, col: int) -> tuple[str, int, int]:
    """The name under (line, col) and its columns [start, end); '' when there is none."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return "", col, col
    src = lines[line - 1]
    i = min(col - 1, len(src))
    start = i
    while start > 0 and _NAME_CHAR.match(src[start - 1]):
        start -= 1
    end = i
    while end < len(src) and _NAME_CHAR.match(src[end]):
        end += 1
    return src[start:end], start + 1, end + 1


def complete(analysis: Analysis, line: int, col: int) -> tuple[list[Completion], bool]:
    """Completions for the name before (line, col), and whether the list was cut short."""
    lines = analysis.text.splitlines()
    before = lines[line - 1][:col - 1] if 1 <= line <= len(lines) else ""
    prefix = re.search(r"[A-Za-z0-9_$.#]*$", before).group(0)
    after_symbol = re.search(r"\bsymbol\??\s+$", before[:len(before) - len(prefix)]) is not None
    found: list[Completion] = []
    if not after_symbol:
        found += [c for c in _language_names(analysis) if c.label.startswith(prefix)]
    cut = False
    if after_symbol or len(prefix) >= 2:
        for table in analysis.tables:
            names, more = SymbolIndex.of(table).starting_with(prefix, COMPLETION_LIMIT - len(found))
            found += [Completion(n, "symbol", _symbol_detail(table, table.symbols[n])) for n in names]
            cut = cut or more
    return found[:COMPLETION_LIMIT], cut or len(found) > COMPLETION_LIMIT


def hover(analysis: Analysis, line: int, col: int) -> str | None:
    """Markdown about the name under (line, col): a region, rule, constant, symbol, register or MSR."""
    word, _, _ = word_at(analysis.text, line, col)
    if not word:
        return None
    for candidate in dict.fromkeys([word, word.split(".")[0]]):
        found = analysis.named(candidate)
        if found is not None:
            return _hover_item(analysis, found[0], found[1])
        for table in analysis.tables:
            sym = table.lookup(candidate)
            if sym is not None:
                return f"**symbol** `{candidate}`\n\n{_symbol_detail(table, sym)}"
    arch = ARCHES[analysis.arch]
    base, _, bit = word.partition(".")
    mask = arch.named_bits.get(base.lower() if base.lower() in arch.named_bits else base, {}).get(bit)
    if mask is not None:
        return f"**bit** `{word}` = `{mask:#x}`"
    if word in arch.msrs:
        return f"**MSR** `{word}` = `{arch.msrs[word]:#x}`"
    if word in CONTROL_REGISTERS or word in DESCRIPTOR_REGISTERS or word in arch.registers:
        return f"**register** `{word}` ({arch.name})"
    return None


def definition(analysis: Analysis, line: int, col: int) -> tuple[Path, Span] | None:
    """Where the region, constant or rule under (line, col) is defined, or the file an include names."""
    for path, item in analysis.items():
        if isinstance(item, S.Include) and path == analysis.path and item.span.line == line:
            target = (path.parent / item.path).resolve()
            return (target, Span(str(target), 1, 1)) if target.is_file() else None
    word, _, _ = word_at(analysis.text, line, col)
    found = analysis.named(word) if word else None
    return (found[0], found[1].span) if found is not None else None


def replacements(d: Diagnostic) -> tuple[str, list[str]] | None:
    """For a diagnostic whose hint names replacements ("did you mean 'x'?"): the misspelled name and them."""
    if not d.hint:
        return None
    names = re.search(r"did you mean ((?:'[^']+'(?: or )?)+)\?", d.hint)
    wrong = re.search(r"'([^']+)'", d.message)
    if names is None or wrong is None:
        return None
    return wrong.group(1), re.findall(r"'([^']+)'", names.group(1))


@functools.cache
def keywords() -> list[str]:
    """The DSL's keywords, read from the grammar so the two never disagree."""
    grammar = resources.files("policyc.grammar").joinpath("policy.lark").read_text(encoding="utf-8")
    words = re.findall(r'"([a-z_]+)"', grammar) + re.findall(r"/\(?([a-z|]+)\)?\\b/", grammar)
    return sorted({w for group in words for w in group.split("|")} | {"symbol?"})


class SymbolIndex:
    """A table's names, sorted once, for prefix completion by bisection."""

    _built: dict[int, "SymbolIndex"] = {}

    def __init__(self, table: SymbolTable) -> None:
        self.names = sorted(table.symbols)

    @classmethod
    def of(cls, table: SymbolTable) -> "SymbolIndex":
        # Tables are cached for the life of the process (symbols._CACHE), so their ids are stable.
        index = cls._built.get(id(table))
        if index is None:
            index = cls._built[id(table)] = SymbolIndex(table)
        return index

    def starting_with(self, prefix: str, limit: int) -> tuple[list[str], bool]:
        lo = bisect.bisect_left(self.names, prefix)
        hi = bisect.bisect_left(self.names, prefix + "\U0010ffff", lo)
        return self.names[lo:min(hi, lo + max(limit, 0))], hi - lo > limit


# ---------------------------------------------------------------- helpers

_NAME_CHAR = re.compile(r"[A-Za-z0-9_$.#]")


def _parse(text: str, shown: str, diagnostics: Diagnostics) -> S.PolicyFile | None:
    if is_yaml_path(shown):
        from .yaml_form import parse_yaml_text
        return parse_yaml_text(text, shown, diagnostics)
    from .dsl import parse_policy_text
    return parse_policy_text(text, shown, diagnostics)


def _items(tree: S.PolicyFile) -> list[S.Item]:
    out: list[S.Item] = []
    for top in tree.items:
        out += top.items if isinstance(top, S.PolicyBlock) else [top]
    return out


def _included_trees(tree: S.PolicyFile, path: Path) -> list[tuple[Path, S.PolicyFile]]:
    """The files the buffer includes, directly or not; problems with them are the checker's to report."""
    files: list[Path] = []
    for item in _items(tree):
        if isinstance(item, S.Include):
            target = (path.parent / item.path).resolve()
            files += [target, *sorted(_reachable(target))]
    out = []
    for f in dict.fromkeys(files):
        included = read_policy_file(f, Diagnostics(), allow_empty=True) if f != path.resolve() else None
        if included is not None:
            out.append((f, included))
    return out


def _reachable(path: Path) -> set[Path]:
    from .check import included_files

    return included_files(path) if path.is_file() else set()


def _tables(analysis: Analysis) -> list[SymbolTable]:
    tables = []
    for path, item in analysis.items():
        if isinstance(item, S.Symbols):
            for name in item.paths:
                try:
                    table = load_symbol_table(path.parent / name)
                except SymbolFileError:
                    continue  # the checker reports it (PC304)
                SymbolIndex.of(table)  # sorted now, so the first completion is as fast as the rest
                tables.append(table)
    return tables


def _language_names(analysis: Analysis) -> list[Completion]:
    arch = ARCHES[analysis.arch]
    out = [Completion(k, "keyword") for k in keywords()]
    for _, item in analysis.items():
        if isinstance(item, S.Region):
            out.append(Completion(item.name, "region", "region"))
        elif isinstance(item, S.Const):
            out.append(Completion(item.name, "constant", "constant"))
    out += [Completion(r, "register", f"register ({arch.name})")
            for r in dict.fromkeys(CONTROL_REGISTERS + DESCRIPTOR_REGISTERS + arch.registers)]
    out += [Completion(name, "msr", f"MSR {index:#x}") for name, index in arch.msrs.items()]
    out += [Completion(f"{reg}.{bit}", "field", f"bit mask {mask:#x}")
            for reg, bits in arch.named_bits.items() for bit, mask in bits.items()]
    fields = dict.fromkeys(f for kind in EVENT_FIELDS.values() for f in kind)
    out += [Completion(f, "field", "event field") for f in fields]
    out += [Completion(s, "value", "severity") for s in SEVERITIES]
    out += [Completion(v, "value", "exception vector") for v in EXCEPTION_VECTORS]
    return out


def _symbol_detail(table: SymbolTable, sym: Symbol) -> str:
    where = Path(table.source).name
    if sym.percpu:
        return f"per-CPU offset {sym.address:#x} (in {where})"
    section = SECTIONS.get(sym.kind.lower(), f"type {sym.kind}") if table.format == "system.map" else "ISF"
    address = "RVA" if table.os == "windows" else "address"
    return f"{address} {sym.address:#x} before the slide, {section} (in {where})"


def _hover_item(analysis: Analysis, path: Path, item: S.Item) -> str:
    from .fmt import format_dsl

    source = format_dsl(S.PolicyFile(str(path), [item])).strip()
    kind = type(item).__name__.lower()
    lines = [f"**{kind}** `{item.name}` ({display_path(path)}:{item.span.line})", "", "```", source, "```"]
    if isinstance(item, S.Region) and analysis.policy is not None:
        try:
            region = analysis.policy.region(item.name)
        except KeyError:  # a region of an include that the policy does not use is not in the model
            region = None
        if region is not None:
            lines += ["", *(_extent_line(e) for e in region.extents)]
    if isinstance(item, S.Rule) and analysis.plan is not None:
        from .explain import rule_landings

        summary = analysis.plan.get("rules", {}).get(item.name)
        if summary is not None:
            kind = summary["trigger"]
            lines += ["", f"{kind} trigger, vm_event {TRIGGER_KINDS.get(kind, kind)}, verdict {summary['verdict']}, "
                          f"on {analysis.plan['target']['arch']}:"]
            lines += [f"- {landing}" for landing in rule_landings(analysis.plan).get(item.name, [])]
    return "\n".join(lines)


def _extent_line(e: M.Extent | M.RegisterExtent) -> str:
    if isinstance(e, M.RegisterExtent):
        return f"- base read from {e.register} at bind time, size {e.size:#x}"
    start = e.start.value if isinstance(e.start, M.Address) else e.start
    pages = (start + e.size - 1) // PAGE - start // PAGE + 1 if e.size else 0
    slide = " before the slide" if isinstance(e.start, M.Address) else ""
    origin = f" [{e.start.origin}]" if isinstance(e.start, M.Address) and e.start.origin else ""
    return f"- {e.space} {start:#x}{slide}, size {e.size:#x}, {pages} page{'s' * (pages != 1)}{origin}"
