"""`IntervalSet` (policyc/lowering/geometry.py), the structure the conflict, shadowing and livelock
sweeps grow rule by rule: whatever order intervals are added in, it holds exactly the points added,
as merged intervals, and answers `overlaps` and `covers` as a set of points would. Blocks of two
intervals make every add cross, split or empty blocks. How its cost grows with the order of the
adds is a figure: `python bench/interval_set.py`."""

from __future__ import annotations

import random

import pytest

from policyc.lowering import geometry as G


def _intervals(s: G.IntervalSet) -> list[tuple[int, int]]:
    return s.intervals()


def _check_against_points(s: G.IntervalSet, points: set[int], rng: random.Random, bound: int) -> None:
    for _ in range(4):
        lo = rng.randrange(bound)
        hi = lo + rng.randint(1, 10)
        assert s.overlaps(lo, hi) == any(p in points for p in range(lo, hi)), (lo, hi)
        assert s.covers(lo, hi) == all(p in points for p in range(lo, hi)), (lo, hi)


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
@pytest.mark.parametrize("block", [1, 2, 512])
def test_an_interval_set_holds_exactly_the_points_added_in_any_order(monkeypatch, order, block):
    monkeypatch.setattr(G.IntervalSet, "BLOCK", block)
    rng = random.Random(f"{order}-{block}")
    for _ in range(300):
        bound = rng.choice([40, 200, 1000])
        adds = [(lo, lo + rng.randint(-1, 15)) for lo in (rng.randrange(bound) for _ in range(rng.randint(1, 60)))]
        if order != "random":
            adds.sort(reverse=order == "descending")
        s, points = G.IntervalSet(), set()
        for lo, hi in adds:
            s.add(lo, hi)
            points.update(range(lo, hi))
            _check_against_points(s, points, rng, bound)
        held = _intervals(s)
        assert all(a[1] < b[0] for a, b in zip(held, held[1:])), "sorted, disjoint, not touching"
        assert {p for lo, hi in held for p in range(lo, hi)} == points
        assert bool(s) == bool(points)


def test_adds_in_descending_order_keep_blocks_bounded(monkeypatch):
    monkeypatch.setattr(G.IntervalSet, "BLOCK", 4)
    s = G.IntervalSet()
    for k in range(1000, 0, -1):
        s.add(3 * k, 3 * k + 1)
    assert _intervals(s) == [(3 * k, 3 * k + 1) for k in range(1, 1001)]
    assert max(s.block_sizes()) <= 8
    s.add(0, 3 * 1000)  # one add that swallows every block but the last interval's end
    assert _intervals(s) == [(0, 3001)]
    assert len(s.block_sizes()) == 1
