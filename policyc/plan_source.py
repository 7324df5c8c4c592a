"""A plan to run, from what the operator gave: a policy (compiled here) or a compiled plan file.

`load_plan_source(path, target)` is what `policyc run`, `test`, `replay` and a hot reload share
(runtime/reload.py compiles a reloaded policy with it). A plan file runs as `policyc compile`
wrote it: schema and content hash checked, for the target it was compiled for (never recompiled),
with the very symbol files it was compiled against (beside it, or in `symbols_dir`, checked by their
SHA-256). A policy is checked and compiled for its own target (or `target`). Anything wrong is a
`PlanSourceError` with the diagnostics that explain it; nothing is ever half-loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .diagnostics import Diagnostic, Diagnostics
from .errors import PolicycError

__all__ = ["Compiled", "PlanSourceError", "load_plan_source", "audited"]


@dataclass
class Compiled:
    plan: dict
    symbols: list
    diagnostics: list[Diagnostic] = field(default_factory=list)     # warnings and notes of a policy


class PlanSourceError(PolicycError):
    """The source gives no plan to run; `diagnostics` (a policy's) say why, with positions."""

    def __init__(self, message: str, diagnostics: list[Diagnostic] | None = None, *, unusable: bool = False) -> None:
        super().__init__(message)
        self.diagnostics = list(diagnostics or ())
        self.unusable = unusable        # the file is no policy or plan at all (it does not compile, load)

    def first_error(self) -> str:
        """The message and the first error diagnostic, on one line (for a log record)."""
        from .diagnostics import Severity

        first = next((d for d in self.diagnostics if d.severity is Severity.ERROR), None)
        if first is None:
            return str(self)
        return f"{self}: {first.span.file}:{first.span.line}:{first.span.col}: {first.message}"


def load_plan_source(policy: str, target: str | None, *, audit: bool = False,
                     symbols_dir: str | None = None) -> Compiled:
    """The plan and symbols of a policy file or a compiled plan (.json); `audit` reseals it in audit mode."""
    from .check import check_policy
    from .compiler import compile_plan
    from .symbols import SymbolFileError, load_symbol_table

    path = Path(policy)
    if not path.is_file():
        raise PlanSourceError(f"no such policy file: {policy}")
    if path.suffix.lower() == ".json":
        compiled = _compiled_plan(path, target, symbols_dir=symbols_dir)
        return Compiled(audited(compiled.plan) if audit else compiled.plan, compiled.symbols)
    diagnostics = Diagnostics()
    model = check_policy(path, diagnostics, target_arch=target)
    plan = compile_plan(model, diagnostics, target=target) if model is not None else None
    if plan is None or model is None:
        raise PlanSourceError(f"{policy} does not compile", diagnostics.sorted(), unusable=True)
    if audit:
        plan = audited(plan)
    try:
        symbols = [load_symbol_table(s.path) for s in model.symbols]
    except (OSError, SymbolFileError) as exc:
        raise PlanSourceError(f"cannot load the policy's symbols: {exc}", diagnostics.sorted()) from None
    return Compiled(plan, symbols, diagnostics.sorted())


def audited(plan: dict) -> dict:
    """The plan in audit mode (`--audit`), resealed: every deny answered allow and logged as would-deny."""
    from .plan import seal

    if plan["policy"].get("mode") == "audit":
        return plan
    return seal({**plan, "policy": {**plan["policy"], "mode": "audit"}})


def _compiled_plan(path: Path, target: str | None, *, symbols_dir: str | None) -> Compiled:
    from .plan import PlanError, load_plan
    from .symbols import SymbolFileError, load_symbol_table

    try:
        plan = load_plan(path)
    except PlanError as exc:
        raise PlanSourceError(str(exc), unusable=True) from None
    planned = plan["target"]["arch"]
    if target and target != planned:
        raise PlanSourceError(f"{path} is a plan compiled for {planned}: a plan runs on the target it was "
                              f"compiled for; compile the policy with --target {target}")
    where = Path(symbols_dir) if symbols_dir else path.parent
    symbols = []
    for ref in plan["policy"].get("symbols", ()):
        file = where / ref["name"]
        try:
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
        except OSError as exc:
            raise PlanSourceError(f"the plan needs its symbol file {ref['name']}: {exc.strerror} in {where}"
                                  + ("" if symbols_dir else " (give --symbols DIR)")) from None
        if digest != ref["sha256"]:
            raise PlanSourceError(f"{file} is not the symbol file the plan was compiled against (sha256 "
                                  f"{digest[:12]}…, the plan names {ref['sha256'][:12]}…)")
        try:
            symbols.append(load_symbol_table(file))
        except SymbolFileError as exc:
            raise PlanSourceError(f"cannot load the plan's symbols: {exc}") from None
    return Compiled(plan, symbols)
