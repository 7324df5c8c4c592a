"""(d) Sub-page collateral: bytes trapped versus bytes some rule watches.

Permissions are per 4 KiB page, regions per byte: every page a watched region
touches is trapped whole, for each access kind its rules trap (on x86, a read
trap traps writes too: EPT has no write-without-read). For each watched
region and access kind:

    trapped  = 4096 x the region's pages
    watched  = bytes of those pages inside any region some rule watches for
               that access kind (the region itself or a neighbour)
    unclaimed share = 1 - watched / trapped

which is the expected share of the region's trap events that no rule claims
(allowed silently, counted as collateral) if accesses fall uniformly over the
trapped bytes. Link-time addresses are used: slides and per-CPU areas are
page aligned, so page offsets survive binding. Extents based on IDTR/GDTR are
counted as if their base were page aligned (it is read only at install).

Everything is computed on merged interval lists, so a million pages cost as
much as one. A region whose unclaimed share exceeds 90% gets a PC506 note.
"""

from __future__ import annotations

from .. import model as M
from ..diagnostics import Diagnostics
from ..lowering import geometry as G

__all__ = ["analyse", "NOTE_THRESHOLD"]

NOTE_THRESHOLD = 0.9
RUNS_LISTED = 16  # runs of partially watched pages listed per region
_ACCESS = {"read": "r", "write": "w", "execute": "x", "access": "rwx"}
_NAMES = {"r": "read", "w": "write", "x": "execute"}


def analyse(policy: M.Policy, target, usable: set[str], diagnostics: Diagnostics | None, *,
            report: bool = True) -> dict:
    """Per region and overall figures, PC506 notes. Without `report`, only the figures of the regions a
    note may come from (`_no_note` rules the others out from their own bytes): no partially watched runs,
    no overall figures."""
    x86 = target.name.startswith("x86_64")
    traps: dict[str, set[str]] = {}  # region -> access letters trapped on its pages
    watched_regions: dict[str, set[str]] = {a: set() for a in "rwx"}
    # Per access kind, once: its letters and what its traps take (on x86, a read trap traps writes too).
    kinds = {kind: (letters, letters | ({"w"} if x86 and "r" in letters else set()))
             for kind, letters in ((k, set(v)) for k, v in _ACCESS.items())}
    for rule in policy.rules:
        t = rule.trigger
        if rule.name not in usable or not isinstance(t, M.MemoryTrigger):
            continue
        letters, trapped_letters = kinds[t.access]
        for region in t.regions:
            here = traps.get(region)
            if here is None:
                traps[region] = set(trapped_letters)
            else:
                here.update(trapped_letters)
            for a in letters:
                watched_regions[a].add(region)
    index = _WatchedIndex(policy, watched_regions)
    nothing = G.Indexed([])

    regions: dict[str, dict] = {}
    trapped_by_access: dict[str, dict[str, list]] = {a: {} for a in "rwx"}
    table = G.region_table(policy)
    for name in sorted(traps):
        region = table[name]
        if not region.extents:  # (empty: the property, inline)
            continue
        if not report and _no_note(name, traps[name], watched_regions, G.named_region_bytes(policy, name)):
            continue
        pages = G.named_region_pages(policy, name)
        n_pages = G.space_map_measure(pages)
        span = {space: G.pages_to_bytes(ivs) for space, ivs in pages.items()}
        # A region of whole pages that a rule watches for an access has every byte it traps for that
        # access watched: no look-up (with none, the watched bytes are not even indexed).
        whole = span == G.named_region_bytes(policy, name)
        by_access = {}
        gaps: dict[str, list] = {}
        for a in sorted(traps[name]):
            t = n_pages * G.PAGE
            if whole and name in watched_regions[a]:
                w = t
            else:
                w = sum(index.get((a, space), nothing).measure_within(ivs) for space, ivs in span.items())
            by_access[_NAMES[a]] = _numbers(t, w)
            if not report:
                continue
            for space, ivs in span.items():
                trapped_by_access[a].setdefault(space, []).extend(ivs)
                gaps.setdefault(space, []).extend(index.get((a, space), nothing).gaps_within(ivs))
        trapped = sum(v["trapped_bytes"] for v in by_access.values())
        claimed = sum(v["watched_bytes"] for v in by_access.values())
        entry = {"accesses": "".join(sorted(traps[name])), "pages": n_pages, **_numbers(trapped, claimed),
                 "by_access": by_access}
        if report:
            partial = {space: G.to_pages(G.norm(ivs)) for space, ivs in sorted(gaps.items())}
            entry["partial_page_count"] = G.space_map_measure(partial)
            entry["partial_runs"] = _list_runs(partial, sorted(traps[name]), index)
        assumed = sorted(s for s in pages if s in ("idtr", "gdtr"))
        if assumed:
            entry["assumes_page_aligned"] = assumed
        regions[name] = entry
        if diagnostics is not None and entry["unclaimed_share"] > NOTE_THRESHOLD:
            diagnostics.note(
                "PC506", region.span,
                f"region '{name}': {entry['unclaimed_bytes']} of {entry['trapped_bytes']} trapped bytes "
                f"({entry['unclaimed_share']:.1%}) are watched by no rule: their events are collateral, "
                "allowed after a round trip to the enforcer",
                "sub-page regions trap whole 4 KiB pages; a busy neighbour on the same page costs every time")
    if not report:
        return {"regions": regions}

    total_t = total_w = 0
    overall_by_access = {}
    for a in "rwx":
        t_ivs = {space: G.norm(ivs) for space, ivs in trapped_by_access[a].items()}
        if not t_ivs:
            continue
        t = G.space_map_measure(t_ivs)
        w = sum(index.get((a, space), nothing).measure_within(ivs) for space, ivs in t_ivs.items())
        overall_by_access[_NAMES[a]] = _numbers(t, w)
        total_t, total_w = total_t + t, total_w + w
    return {"regions": regions, "overall": {**_numbers(total_t, total_w), "by_access": overall_by_access},
            "note_threshold": NOTE_THRESHOLD}


def _no_note(name: str, accesses: set[str], watched_regions: dict[str, set[str]], own: G.SpaceMap) -> bool:
    """No PC506 note can come of the region, whatever its neighbours: for each access a rule watches it
    for, its own bytes are watched, and that alone claims enough of what its pages trap. (The share is
    computed as the note's is: rounding is monotone, so the region's own share is no higher.)"""
    k = 0
    for a in accesses:
        if name in watched_regions[a]:
            k += 1
    if not k:
        return False
    n_pages = n_bytes = 0
    for ivs in own.values():  # its pages, not kept (only asked once); most regions are one interval
        if len(ivs) == 1:
            lo, hi = ivs[0]
            n_pages += (hi + G.PAGE - 1) // G.PAGE - lo // G.PAGE
            n_bytes += hi - lo
        else:
            n_pages += G.measure(G.to_pages(ivs))
            n_bytes += G.measure(ivs)
    if not n_pages:
        return False
    trapped = n_pages * G.PAGE * len(accesses)
    return (trapped - k * n_bytes) / trapped <= NOTE_THRESHOLD


class _WatchedIndex:
    """(access letter, space) -> the bytes some rule watches for that access there, indexed; each access's
    made when first asked."""

    def __init__(self, policy: M.Policy, watched_regions: dict[str, set[str]]) -> None:
        self.policy, self.watched_regions = policy, watched_regions
        self.made: dict[tuple[str, str], G.Indexed] = {}
        self.done: set[str] = set()

    def get(self, key: tuple[str, str], default: G.Indexed) -> G.Indexed:
        a = key[0]
        if a not in self.done:
            self.done.add(a)
            for space, ivs in G.regions_bytes(self.policy, sorted(self.watched_regions[a])).items():
                self.made[(a, space)] = G.Indexed(ivs)
        return self.made.get(key, default)


def _numbers(trapped: int, watched: int) -> dict:
    return {"trapped_bytes": trapped, "watched_bytes": watched, "unclaimed_bytes": trapped - watched,
            "unclaimed_share": (trapped - watched) / trapped if trapped else 0.0}


def _list_runs(partial: dict[str, G.Intervals], accesses: list[str], index: "_WatchedIndex"
               ) -> list[dict]:
    """The partially watched pages as runs of consecutive pages with the same figures (each figure is
    per page), at most RUNS_LISTED of them. Figures change only at pages holding an end of a watched
    interval, so each run costs one lookup per access, whatever its length."""
    nothing = G.Indexed([])
    out: list[dict] = []
    for space, ivs in partial.items():
        sets = [(a, index.get((a, space), nothing)) for a in accesses]
        for lo, hi in ivs:
            cuts = {lo, hi}
            for _, watched in sets:
                for a, b in watched.clip(lo * G.PAGE, hi * G.PAGE):
                    cuts.update((a // G.PAGE, -(-a // G.PAGE), b // G.PAGE, -(-b // G.PAGE)))
            edges = sorted(c for c in cuts if lo <= c <= hi)
            for first, end in zip(edges, edges[1:]):
                here = [(first * G.PAGE, (first + 1) * G.PAGE)]
                w = {_NAMES[a]: watched.measure_within(here) for a, watched in sets}
                run = {"space": space, "start": hex(first * G.PAGE), "pages": end - first,
                       "trapped_bytes": G.PAGE * len(accesses), "watched_bytes": sum(w.values()),
                       "watched_by_access": w}
                last = out[-1] if out else None
                if last is not None and last["space"] == space and last["watched_by_access"] == w and \
                        int(last["start"], 16) + last["pages"] * G.PAGE == first * G.PAGE:
                    last["pages"] += end - first
                    continue
                if len(out) >= RUNS_LISTED:
                    return out
                out.append(run)
    return out
