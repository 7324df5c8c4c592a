"""Pass `resolve_regions`: each region's terms to extents (symbols looked up, sizes positive).

`region_terms` dispatches on the term's type through `_TERMS`; a trigger's
inline region (`on write to symbol x size 8`) is resolved by it too.
"""

from __future__ import annotations

from typing import Callable

from .. import model as M
from .. import syntax as S
from ..arch import RESERVED_REGION_NAMES
from ..diagnostics import did_you_mean
from .constants import fold
from .context import ABSENT, U64, Checking, collect_definitions, cycle

__all__ = ["resolve_regions", "region_terms"]

Extents = list  # of M.Extent and M.RegisterExtent


def resolve_regions(chk: Checking) -> None:
    """`chk.region_defs` (a name defined twice is an error) and `chk.regions`, each resolved once."""
    collect_definitions(chk, S.Region, "region", chk.region_defs, _register_name)
    for name in chk.region_defs:
        _region(chk, name, [])


def _register_name(chk: Checking, r: S.Region) -> bool:
    """True (and an error) when the region is named like a register (cr0, idtr, ...)."""
    if r.name not in RESERVED_REGION_NAMES:
        return False
    chk.d.error("PC313", r.span, f"'{r.name}' is a register name and cannot name a region",
                f"rename it, e.g. '{r.name}_region'")
    return True


def _region(chk: Checking, name: str, stack: list[str]) -> M.Region | None:
    if name in chk.regions:
        return chk.regions[name]
    r = chk.region_defs[name]
    chain = cycle(stack, name) if stack else None
    if chain is not None:
        chk.d.error("PC315", r.span, f"region '{name}' is defined in terms of itself: {chain}")
        return None
    extents: Extents = []
    inner = stack + [name]
    for term in r.terms:
        extents += region_terms(chk, term, inner)
    region = M.Region(name, tuple(extents), r.span)
    chk.regions[name] = region
    return region


def region_terms(chk: Checking, term: S.RegionTerm, stack: list[str]) -> Extents:
    """The extents of one region term; `stack`: the regions being resolved (a cycle is an error)."""
    resolve = _TERMS.get(type(term))
    if resolve is None:
        raise TypeError(term)
    return resolve(chk, term, stack)


def _region_ref(chk: Checking, term: S.RegionRef, stack: list[str]) -> Extents:
    if term.name in chk.region_defs:
        sub = _region(chk, term.name, stack)
        return list(sub.extents) if sub else []
    if term.name not in chk.broken:
        chk.d.error("PC300", term.span, f"unknown region '{term.name}'",
                    did_you_mean(term.name, chk.region_defs))
    return []


def _register_region(chk: Checking, term: S.RegisterRegion, stack: list[str]) -> Extents:
    if term.register not in ("idtr", "gdtr"):
        chk.d.error("PC402", term.span, f"a region can take its base from idtr or gdtr, not "
                    f"'{term.register}'", did_you_mean(term.register, ["idtr", "gdtr"]))
        return []
    size = _size(chk, term.size)
    return [M.RegisterExtent(term.register, size, term.span)] if size else []


def _sized_region(chk: Checking, term: S.SizedRegion, stack: list[str]) -> Extents:
    base, size = fold(chk, term.base), _size(chk, term.size)
    if base is ABSENT or base is None or size is None:
        return []
    return _extent(chk, term, term.space, base, size)  # type: ignore[arg-type]


def _range_region(chk: Checking, term: S.RangeRegion, stack: list[str]) -> Extents:
    start, end = fold(chk, term.start), fold(chk, term.end)
    if start is ABSENT or end is ABSENT or start is None or end is None:
        return []
    if isinstance(start, M.Address) != isinstance(end, M.Address):
        chk.d.error("PC408", term.span, "a range from an address to a plain number (or back)",
                    "give both ends as symbols, or both as numbers with va/pa")
        return []
    s_val = start.value if isinstance(start, M.Address) else start
    e_val = end.value if isinstance(end, M.Address) else end
    if e_val <= s_val:  # type: ignore[operator]
        chk.d.error("PC417", term.span, f"the range ends (0x{e_val:x}) before or where it starts "
                    f"(0x{s_val:x})", "a range is START .. END with END above START")
        return []
    return _extent(chk, term, term.space, start, e_val - s_val)  # type: ignore[arg-type,operator]


_TERMS: dict[type, Callable[[Checking, S.RegionTerm, list[str]], Extents]] = {
    S.RegionRef: _region_ref,
    S.RegisterRegion: _register_region,
    S.SizedRegion: _sized_region,
    S.RangeRegion: _range_region,
}


def _extent(chk: Checking, term: S.RangeRegion | S.SizedRegion, space: str | None, base: int | M.Address,
            size: int) -> Extents:
    space = space or "va"
    if space == "pa":
        if isinstance(base, M.Address):
            chk.d.error("PC408", term.span, "a 'pa' region takes a guest-physical number, not a symbol",
                        "symbols are virtual addresses: drop 'pa'")
            return []
        start: int | M.Address = base
    else:
        start = base if isinstance(base, M.Address) else M.Address(base, False, f"va 0x{base:x}")
    value = start.value if isinstance(start, M.Address) else start
    if value < 0 or value + size > U64 + 1:
        chk.d.error("PC406", term.span, "the region does not fit in the 64-bit address space")
        return []
    return [M.Extent(space, start, size, term.span)]


def _size(chk: Checking, e: S.Expr) -> int | None:
    v = fold(chk, e)
    if v is None or v is ABSENT:
        return None
    if isinstance(v, M.Address):
        chk.d.error("PC400", e.span, "a size must be a number, not an address",
                    "for the distance between two symbols write 'symbol A .. symbol B'")
        return None
    if v <= 0:  # type: ignore[operator]
        chk.d.error("PC405", e.span, f"size must be positive, not {v}")
        return None
    return v  # type: ignore[return-value]
