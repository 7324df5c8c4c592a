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

from bisect import bisect_left, bisect_right
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
    total = 0
    for lo, hi in a:  # (a loop, not sum() over a generator: this is asked once a region in several passes)
        total += hi - lo
    return total


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
    if len(region.extents) == 1:  # most regions: nothing to group, sort or merge
        e = region.extents[0]
        lo, hi = extent_interval(e)
        return {extent_space(e): [(lo, hi)] if hi > lo else []}
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
    total = 0
    for ivs in m.values():
        for lo, hi in ivs:
            total += hi - lo
    return total


class IntervalSet:
    """A growing set of points kept as merged [lo, hi) intervals, with bisect look-ups. The intervals are
    kept in blocks of at most `BLOCK` (with each block's first start and last end indexed): an add moves
    at most one block's entries and the index's, whatever order intervals come in (one flat list made an
    add before all the others move every entry, and rules in descending address order quadratic)."""

    __slots__ = ("_los", "_his", "_firsts", "_lasts")
    BLOCK = 512

    def __init__(self) -> None:
        self._los: list[list[int]] = []  # block -> its intervals' starts
        self._his: list[list[int]] = []  # block -> its intervals' ends
        self._firsts: list[int] = []  # block -> its first start
        self._lasts: list[int] = []  # block -> its last end

    def add(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        los, his, lasts = self._los, self._his, self._lasts
        b = bisect_left(lasts, lo)  # the block of the first interval ending at or after lo (touching merges)
        if b == len(lasts):  # after every interval
            if not los:
                los.append([lo])
                his.append([hi])
                self._firsts.append(lo)
                lasts.append(hi)
                return
            b -= 1
            los[b].append(lo)
            his[b].append(hi)
            lasts[b] = hi
            self._split(b)
            return
        i = bisect_left(his[b], lo)
        e = bisect_right(self._firsts, hi) - 1  # the block of the last interval starting at or before hi
        j = bisect_right(los[e], hi) - 1 if e >= 0 else -1
        if e < b or e == b and j < i:  # nothing to merge with: insert before (b, i)
            los[b].insert(i, lo)
            his[b].insert(i, hi)
            if i == 0:
                self._firsts[b] = lo
            self._split(b)
            return
        lo, hi = min(lo, los[b][i]), max(hi, his[e][j])
        if b == e:
            los[b][i:j + 1] = [lo]
            his[b][i:j + 1] = [hi]
        else:
            los[b][i:] = [lo]
            his[b][i:] = [hi]
            del los[e][:j + 1], his[e][:j + 1]
            gone = e + 1 if not los[e] else e  # the blocks emptied: those between b and e, and e when all of it merged
            if los[e]:
                self._firsts[e] = los[e][0]
            del los[b + 1:gone], his[b + 1:gone], self._firsts[b + 1:gone], lasts[b + 1:gone]
        self._firsts[b] = los[b][0]
        lasts[b] = his[b][-1]

    def _split(self, b: int) -> None:
        los, his = self._los[b], self._his[b]
        if len(los) <= 2 * self.BLOCK:
            return
        half = len(los) // 2
        self._los[b + 1:b + 1] = [los[half:]]
        self._his[b + 1:b + 1] = [his[half:]]
        del los[half:], his[half:]
        self._firsts.insert(b + 1, self._los[b + 1][0])
        self._lasts.insert(b, his[-1])

    def overlaps(self, lo: int, hi: int) -> bool:
        b = bisect_right(self._lasts, lo)  # the block of the first interval ending after lo
        if b == len(self._lasts):
            return False
        return self._los[b][bisect_right(self._his[b], lo)] < hi

    def covers(self, lo: int, hi: int) -> bool:
        if hi <= lo:
            return True
        b = bisect_right(self._firsts, lo) - 1  # the block of the last interval starting at or before lo
        if b < 0:
            return False
        return self._his[b][bisect_right(self._los[b], lo) - 1] >= hi

    def intervals(self) -> list[tuple[int, int]]:
        """The merged intervals, in order."""
        return [(lo, hi) for los, his in zip(self._los, self._his) for lo, hi in zip(los, his)]

    def block_sizes(self) -> list[int]:
        """How many intervals each block holds (an add keeps each at most twice `BLOCK`)."""
        return [len(los) for los in self._los]

    def __bool__(self) -> bool:
        return bool(self._los)


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
    if _REGION_INDEX[0] is policy:  # (asked once a region by each analysis: the common case, inline)
        found = _REGION_INDEX[2].get(name)
        if found is not None:
            return found
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
