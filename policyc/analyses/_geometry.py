"""Byte and page geometry shared by the analyses: address spaces and half-open interval lists.

Everything here works on merged interval lists, never on per-byte or per-page
structures, so a region of a million pages costs as much as a region of one.

Address spaces. Extents are compared only within one space; across spaces the
analyses know nothing (overlap is neither proven nor excluded):

    "va"        link-time kernel virtual addresses (symbols). The enforcer adds one
                slide to all of them, and slides are page aligned, so overlaps and
                page offsets computed on link-time values hold after binding.
    "va-fixed"  literal `va 0x...` extents (not relocated)
    "pa"        guest-physical extents
    "percpu"    offsets into the per-CPU area of the vCPU that raised the event
                (the areas are page aligned)
    "idtr", "gdtr"  extents based on a descriptor-table register, read at install;
                the base is taken as 0 (assumed page aligned) for page counts
"""

from __future__ import annotations

from typing import Iterable

from .. import model as M

PAGE = 4096

Interval = tuple[int, int]  # [lo, hi)
Intervals = list[Interval]  # sorted, disjoint, non-adjacent


def norm(ivs: Iterable[Interval]) -> Intervals:
    """Sort and merge (overlapping or adjacent) intervals; drop empty ones."""
    if type(ivs) is list and len(ivs) == 1 and ivs[0][1] > ivs[0][0]:
        return list(ivs)  # most regions are one extent: nothing to sort or merge
    out: Intervals = []
    for lo, hi in sorted(iv for iv in ivs if iv[1] > iv[0]):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def union(a: Intervals, b: Intervals) -> Intervals:
    return norm(list(a) + list(b))


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Both normalised."""
    out: Intervals = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """a minus b; both normalised."""
    out: Intervals = []
    j = 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < hi:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            if cur >= hi:
                break
            k += 1
        if cur < hi:
            out.append((cur, hi))
    return out


def overlaps(a: Intervals, b: Intervals) -> bool:
    return bool(intersect(a, b))


def covers(a: Intervals, b: Intervals) -> bool:
    """Every point of b is in a."""
    return not subtract(b, a)


def measure(a: Intervals) -> int:
    return sum(hi - lo for lo, hi in a)


def to_pages(byte_ivs: Intervals) -> Intervals:
    """Byte intervals -> the page-number intervals they touch."""
    if len(byte_ivs) == 1:  # most regions are one extent
        lo, hi = byte_ivs[0]
        return [(lo // PAGE, (hi + PAGE - 1) // PAGE)] if hi > lo else []
    return norm(((lo // PAGE, (hi + PAGE - 1) // PAGE) for lo, hi in byte_ivs))


def pages_to_bytes(page_ivs: Intervals) -> Intervals:
    return [(lo * PAGE, hi * PAGE) for lo, hi in page_ivs]


# ---------------------------------------------------------------- extents and spaces

def extent_space(e: M.Extent | M.RegisterExtent) -> str:
    if isinstance(e, M.RegisterExtent):
        return e.register
    if isinstance(e.start, M.Address):
        return "percpu" if e.start.percpu else "va"
    return "va-fixed" if e.space == "va" else e.space


def extent_interval(e: M.Extent | M.RegisterExtent) -> Interval:
    if isinstance(e, M.RegisterExtent):
        return (0, e.size)
    start = e.start.value if isinstance(e.start, M.Address) else e.start
    return (start, start + e.size)


def address_space(a: M.Address) -> str:
    return "percpu" if a.percpu else "va"


SpaceMap = dict[str, Intervals]  # space -> normalised byte (or page) intervals


def region_bytes(region: M.Region) -> SpaceMap:
    """A region's bytes, per address space."""
    acc: dict[str, list[Interval]] = {}
    for e in region.extents:
        acc.setdefault(extent_space(e), []).append(extent_interval(e))
    return {space: norm(ivs) for space, ivs in sorted(acc.items())}


def regions_bytes(policy: M.Policy, names: Iterable[str]) -> SpaceMap:
    acc: dict[str, list[Interval]] = {}
    for name in names:
        for space, ivs in named_region_bytes(policy, name).items():
            acc.setdefault(space, []).extend(ivs)
    return {space: norm(ivs) for space, ivs in sorted(acc.items())}


def space_map_pages(m: SpaceMap) -> SpaceMap:
    return {space: to_pages(ivs) for space, ivs in m.items()}


def space_maps_overlap(a: SpaceMap, b: SpaceMap) -> bool:
    """Proven overlap: some space where both have common points."""
    return any(space in b and overlaps(ivs, b[space]) for space, ivs in a.items())


def space_map_measure(m: SpaceMap) -> int:
    return sum(measure(ivs) for ivs in m.values())


class IntervalSet:
    """A growing set of points kept as merged [lo, hi) intervals, with bisect look-ups: adding and
    querying cost O(log n) plus the intervals merged, so a rule-by-rule sweep stays near-linear."""

    __slots__ = ("_lo", "_hi")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def add(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        from bisect import bisect_left, bisect_right
        i = bisect_left(self._hi, lo)  # first interval ending at or after lo (touching merges)
        j = bisect_right(self._lo, hi)  # intervals starting at or before hi
        if i < j:
            lo, hi = min(lo, self._lo[i]), max(hi, self._hi[j - 1])
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]

    def overlaps(self, lo: int, hi: int) -> bool:
        from bisect import bisect_right
        i = bisect_right(self._hi, lo)  # first interval ending after lo
        return i < len(self._lo) and self._lo[i] < hi

    def covers(self, lo: int, hi: int) -> bool:
        from bisect import bisect_right
        if hi <= lo:
            return True
        i = bisect_right(self._lo, lo) - 1  # last interval starting at or before lo
        return i >= 0 and self._hi[i] >= hi

    def __bool__(self) -> bool:
        return bool(self._lo)


def interval_set(sets: dict, key: object) -> IntervalSet:
    """The set kept under `key`, made empty when there is none yet (setdefault would make one per call)."""
    found = sets.get(key)
    if found is None:
        found = sets[key] = IntervalSet()
    return found


class Indexed:
    """A fixed, normalised interval list with bisect queries (for looking many small ranges up in one
    large set without walking the whole set each time)."""

    __slots__ = ("lo", "hi")

    def __init__(self, ivs: Intervals) -> None:
        self.lo = [a for a, _ in ivs]
        self.hi = [b for _, b in ivs]

    def clip(self, lo: int, hi: int) -> Intervals:
        """The set's points inside [lo, hi)."""
        from bisect import bisect_right
        out = []
        j = bisect_right(self.hi, lo)
        while j < len(self.lo) and self.lo[j] < hi:
            out.append((max(lo, self.lo[j]), min(hi, self.hi[j])))
            j += 1
        return out

    def measure_within(self, ivs: Intervals) -> int:
        return sum(b - a for lo, hi in ivs for a, b in self.clip(lo, hi))

    def gaps_within(self, ivs: Intervals) -> Intervals:
        """The points of `ivs` (normalised) not in the set."""
        out = []
        for lo, hi in ivs:
            cur = lo
            for a, b in self.clip(lo, hi):
                if a > cur:
                    out.append((cur, a))
                cur = b
            if cur < hi:
                out.append((cur, hi))
        return out


_REGION_INDEX: list = [None, {}, {}, {}]  # policy; name -> region, -> bytes, -> pages


def region_table(policy: M.Policy) -> dict[str, M.Region]:
    """name -> region (Policy.region is a linear search; policies may have 100,000 regions)."""
    if _REGION_INDEX[0] is not policy:
        _REGION_INDEX[0] = policy
        _REGION_INDEX[1] = {r.name: r for r in policy.regions}
        _REGION_INDEX[2] = {}
        _REGION_INDEX[3] = {}
    return _REGION_INDEX[1]


def named_region_bytes(policy: M.Policy, name: str) -> SpaceMap:
    """The bytes of the policy's region `name` (KeyError when there is none), computed once per
    policy for every analysis that asks. Shared: callers must not change the lists."""
    table = region_table(policy)
    found = _REGION_INDEX[2].get(name)
    if found is None:
        found = _REGION_INDEX[2][name] = region_bytes(table[name])
    return found


def named_region_pages(policy: M.Policy, name: str) -> SpaceMap:
    """The pages of the policy's region `name`, like `named_region_bytes`."""
    region_table(policy)
    found = _REGION_INDEX[3].get(name)
    if found is None:
        found = _REGION_INDEX[3][name] = space_map_pages(named_region_bytes(policy, name))
    return found
