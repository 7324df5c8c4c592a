"""What the guest layouts share: sizes as written (``256M``), alignment, and mapping a range the way
the kernels do (large pages where they fit, 4 KiB at the edges).
"""

from __future__ import annotations

import re
from typing import Iterator

from ..paging import PAGE_2M, PAGE_4K, PageTables

__all__ = ["parse_size", "align_up", "align_down", "page_runs", "map_range"]


def parse_size(text: int | str) -> int:
    """``256M``, ``1G``, ``4096``, ``512K`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([KMGT]i?B?)?\s*", str(text))
    if not m:
        raise ValueError(f"'{text}' is not a size (e.g. 256M)")
    value = int(m.group(1), 0)
    unit = (m.group(2) or "").upper()[:1]
    return value << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def align_down(x: int, a: int) -> int:
    return x & ~(a - 1)


def page_runs(va: int, pa: int, size: int, *, large: bool = True) -> Iterator[tuple[int, int, int, int]]:
    """``(va, pa, length, page size)`` runs that map [va, va+size) to [pa, pa+size) the way the
    kernels do: 2 MiB pages (x86-64) or blocks (AArch64) where va, pa and the range allow and ``large``,
    4 KiB pages elsewhere. Small pages stop at each 2 MiB boundary, so that an aligned stretch after a
    misaligned head still gets large pages."""
    end = va + size
    cur = va
    while cur < end:
        p = pa + (cur - va)
        if large and cur % PAGE_2M == 0 and p % PAGE_2M == 0 and cur + PAGE_2M <= end:
            n = align_down(end - cur, PAGE_2M)
            yield cur, p, n, PAGE_2M
            cur += n
            continue
        nxt = min(end, align_up(cur + 1, PAGE_2M)) if large else end
        yield cur, p, nxt - cur, PAGE_4K
        cur = nxt


def map_range(pt: PageTables, va: int, pa: int, size: int, *, writable: bool, executable: bool,
               large: bool = True) -> None:
    """Map [va, va+size) as :func:`page_runs` splits it, global (kernel mappings)."""
    for v, p, n, page_size in page_runs(va, pa, size, large=large):
        pt.map(v, p, n, page_size, writable=writable, executable=executable, global_=True)
