"""Diagnostics: errors and warnings as values with positions.

Every stage reports problems by appending `Diagnostic`s to a `Diagnostics`
collector instead of raising, so one run reports every problem in a file.
They are rendered once, at the edge (the CLI), as text, JSON or SARIF 2.1.0.

Codes are stable: tools and CI configurations match on them. The table
`CODES` is the registry; a code is never reused for another meaning.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

__all__ = [
    "CODES",
    "Diagnostic",
    "Diagnostics",
    "Severity",
    "Span",
    "SourceCache",
    "closest_names",
    "render_json",
    "render_sarif",
    "render_text",
]


# Not frozen, though never changed once made: a frozen dataclass's constructor sets each field through
# object.__setattr__ and costs four times as much, and reading a 10 MB policy makes a million spans.
@dataclass(slots=True, unsafe_hash=True)
class Span:
    """A range in a source file. Lines and columns are 1-based; end is inclusive of the last character."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def shifted(self, lines: int, cols: int) -> "Span":
        """The span moved into an enclosing text (used for expressions inside YAML strings)."""
        first_col = self.col + cols if self.line == 1 else self.col
        end_col = None
        if self.end_col is not None:
            end_col = self.end_col + cols if (self.end_line or self.line) == 1 else self.end_col
        return Span(
            self.file,
            self.line + lines,
            first_col,
            None if self.end_line is None else self.end_line + lines,
            end_col,
        )


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class Diagnostic:
    code: str
    severity: Severity
    span: Span | None
    message: str
    hint: str | None = None

    def sort_key(self) -> tuple:
        s = self.span
        return (s.file, s.line, s.col) if s else ("", 0, 0)


@dataclass
class Diagnostics:
    """A collector. Stages append; the driver decides when to stop."""

    items: list[Diagnostic] = field(default_factory=list)
    # Membership for `add`'s dedupe: a list scan made a plan with 100,000 collateral notes quadratic.
    _seen: set[Diagnostic] = field(default_factory=set, init=False, repr=False, compare=False)
    # Passes ask for the error count per region and per rule: counting the list each time was quadratic.
    _errors: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._seen.update(self.items)
        self._errors = sum(d.severity is Severity.ERROR for d in self.items)

    def error(self, code: str, span: Span | None, message: str, hint: str | None = None) -> None:
        self.add(Diagnostic(code, Severity.ERROR, span, message, hint))

    def warning(self, code: str, span: Span | None, message: str, hint: str | None = None) -> None:
        self.add(Diagnostic(code, Severity.WARNING, span, message, hint))

    def note(self, code: str, span: Span | None, message: str, hint: str | None = None) -> None:
        self.add(Diagnostic(code, Severity.NOTE, span, message, hint))

    def add(self, diagnostic: Diagnostic) -> None:
        if diagnostic.code not in CODES:
            raise KeyError(f"unregistered diagnostic code {diagnostic.code}")
        if diagnostic not in self._seen:
            self._seen.add(diagnostic)
            self.items.append(diagnostic)
            self._errors += diagnostic.severity is Severity.ERROR

    def extend(self, other: Iterable[Diagnostic]) -> None:
        for d in other:
            self.add(d)

    @property
    def has_errors(self) -> bool:
        return self._errors > 0

    @property
    def error_count(self) -> int:
        return self._errors

    def sorted(self) -> list[Diagnostic]:
        return sorted(self.items, key=Diagnostic.sort_key)

    def __iter__(self) -> Iterator[Diagnostic]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


# The registry of stable codes: code -> short title (the SARIF rule name).
CODES: dict[str, str] = {
    # 1xx: reading and parsing
    "PC100": "file cannot be read",
    "PC101": "file is not UTF-8 text",
    "PC102": "empty policy file",
    "PC110": "syntax error: unexpected token",
    "PC111": "syntax error: unexpected character",
    "PC112": "syntax error: unexpected end of file",
    "PC113": "invalid string literal",
    "PC114": "invalid number literal",
    "PC115": "expression nested too deeply",
    # 2xx: the YAML spelling
    "PC200": "YAML syntax error",
    "PC201": "YAML schema violation",
    "PC202": "YAML document too large (alias expansion or size)",
    "PC203": "YAML nesting too deep",
    "PC204": "duplicate YAML key",
    "PC205": "unsupported YAML construct",
    # 3xx: names and files
    "PC300": "unknown name",
    "PC301": "duplicate definition",
    "PC302": "unknown symbol",
    "PC303": "optional symbol absent",
    "PC304": "symbol file cannot be loaded",
    "PC305": "per-CPU symbol used as an address",
    "PC306": "include escapes the policy tree",
    "PC307": "include cycle",
    "PC308": "included file not found",
    "PC309": "unknown type or member",
    "PC310": "no policy block",
    "PC311": "more than one policy block",
    "PC312": "symbol used but no symbol file declared",
    "PC313": "reserved name",
    "PC314": "constant defined in terms of itself",
    "PC315": "region defined in terms of itself",
    "PC316": "duplicate setting",
    "PC317": "unused definition",
    "PC318": "symbol defined more than once in a symbol file",
    # 4xx: types and values
    "PC400": "type mismatch",
    "PC401": "field not available for this trigger",
    "PC402": "unknown register or event field",
    "PC403": "unknown named bit",
    "PC404": "unknown MSR",
    "PC405": "size is not positive",
    "PC406": "integer out of range",
    "PC407": "division by zero",
    "PC408": "invalid address arithmetic",
    "PC409": "unknown template field",
    "PC410": "malformed message template",
    "PC411": "unknown target",
    "PC412": "unsupported hypervisor version",
    "PC413": "contradictory actions in one rule",
    "PC414": "unknown exception vector",
    "PC415": "unknown severity",
    "PC416": "rate limit is not positive",
    "PC417": "empty or inverted range",
    "PC418": "trigger not available on this architecture",
    "PC419": "unknown function",
    "PC420": "wrong number of arguments",
    "PC421": "condition is constant",
    "PC422": "unknown mode",
    # 5xx: lowering for a target
    "PC500": "the target cannot enforce this rule",
    "PC501": "the target enforces this rule with a weakness",
    "PC502": "views merged to fit the target's view limit",
    "PC503": "conflicting rules",
    "PC504": "rule can never match",
    "PC505": "livelock: the access can never complete",
    "PC506": "sub-page collateral",
    "PC507": "plan file cannot be used",
}


def closest_names(name: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """Near names for a "did you mean" hint (edit distance, case-insensitive)."""
    import difflib

    pool = list(dict.fromkeys(candidates))
    lowered = {c.lower(): c for c in pool}
    exact_case = lowered.get(name.lower())
    # Short names need a looser cutoff: one swapped pair in 'itd' already costs a third of it.
    cutoff = 0.6 if len(name) <= 4 else 0.72
    found = difflib.get_close_matches(name.lower(), list(lowered), n=max(limit * 4, 12), cutoff=cutoff)
    # Among equally close names, those sharing the typed prefix come first ('#GF' -> '#GP').
    def rank(candidate: str) -> tuple[float, int]:
        prefix = len(os.path.commonprefix([candidate, name.lower()]))
        return (-round(difflib.SequenceMatcher(None, name.lower(), candidate).ratio(), 3), -prefix)
    result = [lowered[f] for f in sorted(found, key=rank)[:limit]]
    if exact_case and exact_case not in result:
        result.insert(0, exact_case)
    return result[:limit]


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    near = closest_names(name, candidates)
    if not near:
        return None
    return "did you mean " + " or ".join(f"'{n}'" for n in near) + "?"


class SourceCache:
    """Source lines for rendering carets. Files are read lazily, once."""

    def __init__(self) -> None:
        self._texts: dict[str, list[str] | None] = {}

    def register(self, file: str, text: str) -> None:
        self._texts[file] = text.splitlines()

    def line(self, file: str, number: int) -> str | None:
        if file not in self._texts:
            try:
                self._texts[file] = Path(file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError, ValueError):
                self._texts[file] = None
        lines = self._texts[file]
        if lines is None or not 1 <= number <= len(lines):
            return None
        return lines[number - 1]


def render_text(diagnostics: Iterable[Diagnostic], sources: SourceCache | None = None, color: bool = False) -> str:
    """Compiler-style text: header, location, the source line with a caret, hint."""
    sources = sources or SourceCache()
    out: list[str] = []
    for d in diagnostics:
        label = d.severity.value
        if color:
            tint = {"error": "\x1b[1;31m", "warning": "\x1b[1;33m", "note": "\x1b[1;36m"}[label]
            label = f"{tint}{label}\x1b[0m"
        out.append(f"{label}[{d.code}]: {d.message}")
        if d.span is not None:
            out.append(f"  --> {d.span}")
            text = sources.line(d.span.file, d.span.line)
            if text is not None:
                text = text.replace("\t", " ")
                gutter = str(d.span.line)
                pad = " " * len(gutter)
                width = 1
                if d.span.end_col is not None and (d.span.end_line in (None, d.span.line)):
                    width = max(1, d.span.end_col - d.span.col + 1)
                width = max(1, min(width, len(text) - d.span.col + 1))
                out.append(f"{pad} |")
                out.append(f"{gutter} | {text}")
                out.append(f"{pad} | {' ' * (d.span.col - 1)}{'^' * width}")
        if d.hint:
            out.append(f"  = hint: {d.hint}")
        out.append("")
    return "\n".join(out)


def _as_dict(d: Diagnostic) -> dict:
    entry: dict = {"code": d.code, "severity": d.severity.value, "message": d.message}
    if d.span is not None:
        entry.update(file=d.span.file, line=d.span.line, column=d.span.col)
        if d.span.end_line is not None:
            entry.update(end_line=d.span.end_line, end_column=d.span.end_col)
    if d.hint:
        entry["hint"] = d.hint
    return entry


def render_json(diagnostics: Iterable[Diagnostic]) -> str:
    return json.dumps({"diagnostics": [_as_dict(d) for d in diagnostics]}, indent=2)


def render_sarif(diagnostics: Iterable[Diagnostic], tool_version: str) -> str:
    """SARIF 2.1.0, so code-scanning UIs annotate the offending line."""
    diagnostics = list(diagnostics)
    used = sorted({d.code for d in diagnostics})
    rules = [{"id": c, "name": CODES[c], "shortDescription": {"text": CODES[c]}} for c in used]
    level = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.NOTE: "note"}
    results = []
    for d in diagnostics:
        message = d.message + (f" ({d.hint})" if d.hint else "")
        result: dict = {"ruleId": d.code, "ruleIndex": used.index(d.code), "level": level[d.severity],
                        "message": {"text": message}}
        if d.span is not None:
            region: dict = {"startLine": d.span.line, "startColumn": d.span.col}
            if d.span.end_line is not None:
                region.update(endLine=d.span.end_line, endColumn=(d.span.end_col or d.span.col) + 1)
            result["locations"] = [{"physicalLocation": {
                "artifactLocation": {"uri": Path(d.span.file).as_posix()}, "region": region}}]
        results.append(result)
    log = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "policyc", "version": tool_version,
                                "rules": rules}},
            "results": results,
        }],
    }
    return json.dumps(log, indent=2)
