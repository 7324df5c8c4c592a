"""Pass `load_symbols`: the System.map / ISF tables the policy names, and symbol lookup in them."""

from __future__ import annotations

from pathlib import Path

from .. import model as M
from .. import syntax as S
from ..diagnostics import did_you_mean
from ..source import display_path
from ..symbols import SymbolFileError, load_symbol_table
from .context import ABSENT, Checking, Value

__all__ = ["load_symbols", "lookup_symbol"]


def load_symbols(chk: Checking) -> None:
    """`chk.tables` and `chk.symbol_sources`, each path relative to the file naming it."""
    for u in chk.units_of(S.Symbols):
        chk.symbols_decl_span = chk.symbols_decl_span or u.item.span
        for name in u.item.paths:
            path = (u.file.parent / name)
            try:
                table = load_symbol_table(path)
            except SymbolFileError as exc:
                hint = None
                if "\x00" not in name and not path.exists() and path.parent.is_dir():
                    hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir()])
                chk.d.error("PC304", u.item.span, str(exc), hint)
                continue
            chk.tables.append(table)
            chk.symbol_sources.append(M.SymbolSource(display_path(path), name, table.sha256))


def lookup_symbol(chk: Checking, ref: S.SymbolRef) -> Value:
    """The symbol's address in the first table that has it; ABSENT for a missing optional symbol."""
    known = chk.symbol_addresses.get((ref.name, ref.percpu))
    if known is not None:  # looked up before, and nothing to report of it
        return known
    if not chk.tables:
        if chk.symbols_decl_span is None and not chk.reported_no_symbols:
            chk.reported_no_symbols = True
            chk.d.error("PC312", ref.span, f"'symbol {ref.name}' needs a symbol file",
                        'declare one: symbols "System.map" (a System.map or a Volatility 3 ISF)')
        return None
    for table in chk.tables:
        sym = table.lookup(ref.name)
        if sym is None:
            continue
        if sym.percpu and not ref.percpu:
            chk.d.error("PC305", ref.span, f"'{ref.name}' is a per-CPU symbol (0x{sym.address:x} is an offset "
                        "into each CPU's per-CPU area), not an address",
                        f"write 'percpu symbol {ref.name}' for the instance of the vCPU that raised the event")
            return None
        if ref.percpu and not sym.percpu:
            chk.d.error("PC305", ref.span, f"'{ref.name}' is not a per-CPU symbol",
                        f"write 'symbol {ref.name}'")
            return None
        others = table.duplicates.get(ref.name)
        if others:
            chk.d.warning("PC318", ref.span, f"'{ref.name}' is defined {len(others) + 1} times in "
                          f"{Path(table.source).name}; the first, 0x{sym.address:x}, is used "
                          f"(also at {', '.join(f'0x{a:x}' for a in others)})",
                          "check that the map matches the guest's kernel, or use an ISF")
        address = M.Address(sym.address, sym.percpu, f"symbol {ref.name}")
        if not others:  # (a symbol defined more than once is warned of at each use)
            chk.symbol_addresses[(ref.name, ref.percpu)] = address
        return address
    files = ", ".join(Path(t.source).name for t in chk.tables)
    if ref.optional:
        chk.d.warning("PC303", ref.span, f"optional symbol '{ref.name}' is not in {files}: "
                      "what uses it is empty")
        return ABSENT
    near: list[str] = []
    for t in chk.tables:
        near += t.near_names(ref.name)
    hint = did_you_mean(ref.name, near) if near else None
    hint = (hint + " " if hint else "") + f"(if some kernels lack it, write 'symbol? {ref.name}')"
    chk.d.error("PC302", ref.span, f"unknown symbol '{ref.name}' (not in {files})", hint)
    return None
