"""Sparse guest-physical memory for the simulated Xen guest.

Guest-physical memory is modelled as 4 KiB frames indexed by guest frame
number (gfn).  A frame is only backed by storage once it is written to (or
handed out by the frame allocator); reading an unpopulated frame yields zeros,
exactly as a freshly ballooned-in page would, but :meth:`GuestMemory.is_populated`
still tells the two cases apart.

The module also provides a tiny frame allocator (used by the paging model to
place page-table pages away from the kernel image) and snapshots, so a test can
check precisely which bytes an operation changed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from ..errors import PolicycError

__all__ = [
    "FRAME_SHIFT",
    "FRAME_SIZE",
    "FRAME_MASK",
    "GuestMemory",
    "GuestMemoryError",
    "PhysicalAddressError",
    "OutOfFramesError",
    "MemorySnapshot",
]

FRAME_SHIFT = 12
FRAME_SIZE = 1 << FRAME_SHIFT
FRAME_MASK = FRAME_SIZE - 1

#: Architectural upper bound of a physical address on x86-64 (MAXPHYADDR <= 52).
MAX_PHYS_BITS = 52

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_ZERO_FRAME = bytes(FRAME_SIZE)


class GuestMemoryError(PolicycError):
    """Base class for guest-memory errors."""


class PhysicalAddressError(GuestMemoryError, ValueError):
    """An access touched a guest-physical address outside the guest's memory."""


class OutOfFramesError(GuestMemoryError):
    """The frame allocator has no free frame left in its range."""


class GuestMemory:
    """Sparse, byte-addressable guest-physical memory.

    Args:
        size: size of guest-physical memory in bytes (a multiple of 4 KiB).
            Every access must lie in ``[0, size)``.  The memory is sparse, so a
            large size costs nothing until frames are touched.
        alloc_range: ``(low_gfn, high_gfn)``, inclusive-exclusive range of
            frames the allocator may hand out.  Defaults to the upper quarter
            of memory (at most the top 64 MiB), so page-table pages land far
            above a kernel image loaded low in memory.
        alloc_top_down: hand frames out from the top of ``alloc_range``
            downwards (the default) or from the bottom upwards.
    """

    __slots__ = ("_size", "_frames", "_alloc_lo", "_alloc_hi", "_alloc_top_down",
                 "_alloc_cursor", "_allocated", "_freed")

    def __init__(
        self,
        size: int = 4 << 30,
        *,
        alloc_range: tuple[int, int] | None = None,
        alloc_top_down: bool = True,
    ) -> None:
        if not isinstance(size, int) or size <= 0 or size & FRAME_MASK:
            raise ValueError(f"guest memory size must be a positive multiple of 4 KiB, got {size!r}")
        if size > 1 << MAX_PHYS_BITS:
            raise ValueError(f"guest memory size {size:#x} exceeds the 2^{MAX_PHYS_BITS} physical limit")
        self._size = size
        self._frames: dict[int, bytearray] = {}
        nframes = size >> FRAME_SHIFT
        if alloc_range is None:
            span = min(max(nframes // 4, 1), (64 << 20) >> FRAME_SHIFT)
            alloc_range = (nframes - span, nframes)
        lo, hi = alloc_range
        if not (0 <= lo < hi <= nframes):
            raise ValueError(
                f"alloc_range {alloc_range!r} must satisfy 0 <= low < high <= {nframes} (frames in memory)"
            )
        self._alloc_lo = lo
        self._alloc_hi = hi
        self._alloc_top_down = alloc_top_down
        self._alloc_cursor = hi - 1 if alloc_top_down else lo
        self._allocated: set[int] = set()
        self._freed: list[int] = []

    # ------------------------------------------------------------------ sizes
    @property
    def size(self) -> int:
        """Size of guest-physical memory in bytes."""
        return self._size

    @property
    def frame_count(self) -> int:
        return self._size >> FRAME_SHIFT

    @property
    def alloc_range(self) -> tuple[int, int]:
        return (self._alloc_lo, self._alloc_hi)

    # ----------------------------------------------------------------- checks
    def _check_range(self, pa: int, length: int) -> None:
        if not isinstance(pa, int) or not isinstance(length, int):
            raise TypeError("physical address and length must be integers")
        if length < 0:
            raise ValueError(f"negative length {length}")
        if pa < 0 or pa + length > self._size:
            raise PhysicalAddressError(
                f"guest-physical range [{pa:#x}, {pa + length:#x}) is outside guest memory "
                f"[0, {self._size:#x})"
            )

    def _check_gfn(self, gfn: int) -> None:
        if not isinstance(gfn, int):
            raise TypeError("gfn must be an integer")
        if not 0 <= gfn < self.frame_count:
            raise PhysicalAddressError(f"gfn {gfn:#x} is outside guest memory (0..{self.frame_count - 1:#x})")

    # ------------------------------------------------------------- frame info
    def is_populated(self, gfn: int) -> bool:
        """True when the frame has backing storage (written or allocated)."""
        return gfn in self._frames

    def populated_frames(self) -> list[int]:
        """Sorted list of populated gfns."""
        return sorted(self._frames)

    def __contains__(self, gfn: object) -> bool:
        return gfn in self._frames

    def frame_bytes(self, gfn: int) -> bytes:
        """Contents of one frame (zeros for an unpopulated frame)."""
        self._check_gfn(gfn)
        frame = self._frames.get(gfn)
        return _ZERO_FRAME if frame is None else bytes(frame)

    def populate(self, gfn: int) -> None:
        """Give a frame backing storage without changing its (zero) contents."""
        self._check_gfn(gfn)
        if gfn not in self._frames:
            self._frames[gfn] = bytearray(FRAME_SIZE)

    def _frame_for_write(self, gfn: int) -> bytearray:
        frame = self._frames.get(gfn)
        if frame is None:
            frame = self._frames[gfn] = bytearray(FRAME_SIZE)
        return frame

    # ------------------------------------------------------------ byte access
    def read(self, pa: int, length: int) -> bytes:
        """Read ``length`` bytes at guest-physical address ``pa`` (may span frames)."""
        self._check_range(pa, length)
        off = pa & FRAME_MASK
        if off + length <= FRAME_SIZE:  # fast path: a single frame
            frame = self._frames.get(pa >> FRAME_SHIFT)
            if frame is None:
                return bytes(length)
            return bytes(frame[off:off + length])
        out = bytearray()
        while length:
            gfn = pa >> FRAME_SHIFT
            off = pa & FRAME_MASK
            chunk = min(length, FRAME_SIZE - off)
            frame = self._frames.get(gfn)
            out += bytes(chunk) if frame is None else frame[off:off + chunk]
            pa += chunk
            length -= chunk
        return bytes(out)

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at guest-physical address ``pa`` (may span frames).

        Frames touched by a write become populated, even if the data is zero.
        """
        data = memoryview(bytes(data)) if not isinstance(data, memoryview) else data.cast("B")
        length = len(data)
        self._check_range(pa, length)
        pos = 0
        while pos < length:
            gfn = pa >> FRAME_SHIFT
            off = pa & FRAME_MASK
            chunk = min(length - pos, FRAME_SIZE - off)
            self._frame_for_write(gfn)[off:off + chunk] = data[pos:pos + chunk]
            pa += chunk
            pos += chunk

    def fill(self, pa: int, length: int, value: int = 0) -> None:
        """Set ``length`` bytes at ``pa`` to ``value``."""
        self.write(pa, bytes([value]) * length)

    def read_u64(self, pa: int) -> int:
        off = pa & FRAME_MASK
        if off <= FRAME_SIZE - 8 and 0 <= pa and pa + 8 <= self._size:
            frame = self._frames.get(pa >> FRAME_SHIFT)
            return 0 if frame is None else _U64.unpack_from(frame, off)[0]
        return _U64.unpack(self.read(pa, 8))[0]

    def write_u64(self, pa: int, value: int) -> None:
        if not 0 <= value < 1 << 64:
            raise ValueError(f"value {value!r} does not fit in 64 bits")
        off = pa & FRAME_MASK
        if off <= FRAME_SIZE - 8 and 0 <= pa and pa + 8 <= self._size:
            _U64.pack_into(self._frame_for_write(pa >> FRAME_SHIFT), off, value)
            return
        self.write(pa, _U64.pack(value))

    def read_u32(self, pa: int) -> int:
        return _U32.unpack(self.read(pa, 4))[0]

    def write_u32(self, pa: int, value: int) -> None:
        if not 0 <= value < 1 << 32:
            raise ValueError(f"value {value!r} does not fit in 32 bits")
        self.write(pa, _U32.pack(value))

    def read_u16(self, pa: int) -> int:
        return _U16.unpack(self.read(pa, 2))[0]

    def write_u16(self, pa: int, value: int) -> None:
        if not 0 <= value < 1 << 16:
            raise ValueError(f"value {value!r} does not fit in 16 bits")
        self.write(pa, _U16.pack(value))

    def read_u8(self, pa: int) -> int:
        return self.read(pa, 1)[0]

    def write_u8(self, pa: int, value: int) -> None:
        self.write(pa, bytes([value]))

    # -------------------------------------------------------------- allocator
    def alloc_frame(self) -> int:
        """Return a fresh, zeroed, populated frame from the allocator range.

        A frame is fresh when it was neither handed out before (and not freed
        since) nor populated by any write, so allocations never clobber data
        such as a kernel image that happens to sit in the allocator range.
        """
        while self._freed:
            gfn = self._freed.pop()
            if gfn not in self._frames:
                break
        else:
            gfn = self._next_fresh_gfn()
        self._allocated.add(gfn)
        self._frames[gfn] = bytearray(FRAME_SIZE)
        return gfn

    def _next_fresh_gfn(self) -> int:
        step = -1 if self._alloc_top_down else 1
        cur = self._alloc_cursor
        while self._alloc_lo <= cur < self._alloc_hi:
            if cur not in self._frames and cur not in self._allocated:
                self._alloc_cursor = cur + step
                return cur
            cur += step
        self._alloc_cursor = cur
        raise OutOfFramesError(
            f"no free frame left in allocator range [{self._alloc_lo:#x}, {self._alloc_hi:#x})"
        )

    def free_frame(self, gfn: int) -> None:
        """Return an allocated frame to the allocator; its contents are dropped."""
        if gfn not in self._allocated:
            raise GuestMemoryError(f"gfn {gfn:#x} was not handed out by alloc_frame()")
        self._allocated.discard(gfn)
        self._frames.pop(gfn, None)
        self._freed.append(gfn)

    def allocated_frames(self) -> list[int]:
        """Sorted list of frames currently handed out by the allocator."""
        return sorted(self._allocated)

    # -------------------------------------------------------------- snapshots
    def snapshot(self) -> "MemorySnapshot":
        """An immutable copy of the current contents (populated frames only)."""
        return MemorySnapshot({gfn: bytes(frame) for gfn, frame in self._frames.items()})

    def restore(self, snapshot: "MemorySnapshot") -> None:
        """Make memory contents and population equal to ``snapshot``.

        The allocator's bookkeeping is left alone.
        """
        self._frames = {gfn: bytearray(data) for gfn, data in snapshot.frames.items()}

    def matches(self, snapshot: "MemorySnapshot") -> bool:
        """True when the current contents equal ``snapshot`` (see MemorySnapshot.__eq__)."""
        return self.snapshot() == snapshot

    def changed_frames(self, snapshot: "MemorySnapshot") -> list[int]:
        """gfns whose contents differ from ``snapshot``."""
        return self.snapshot().changed_frames(snapshot)

    def __repr__(self) -> str:
        return f"GuestMemory(size={self._size:#x}, populated={len(self._frames)} frames)"


@dataclass(frozen=True, eq=False)
class MemorySnapshot:
    """Immutable copy of guest memory: populated gfn -> 4 KiB of bytes.

    Two snapshots compare equal when every frame holds the same bytes,
    treating an unpopulated frame as zeros (so populating a frame without
    writing non-zero data is not a content change).  Use :attr:`populated`
    to compare which frames have storage.
    """

    frames: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", MappingProxyType(dict(self.frames)))

    @property
    def populated(self) -> frozenset[int]:
        return frozenset(self.frames)

    def frame(self, gfn: int) -> bytes:
        return self.frames.get(gfn, _ZERO_FRAME)

    def read(self, pa: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            off = pa & FRAME_MASK
            chunk = min(length, FRAME_SIZE - off)
            out += self.frame(pa >> FRAME_SHIFT)[off:off + chunk]
            pa += chunk
            length -= chunk
        return bytes(out)

    def changed_frames(self, other: "MemorySnapshot") -> list[int]:
        """Sorted gfns whose contents differ between the two snapshots."""
        gfns = set(self.frames) | set(other.frames)
        return sorted(g for g in gfns if self.frame(g) != other.frame(g))

    def changed_ranges(self, other: "MemorySnapshot") -> list[tuple[int, int]]:
        """Sorted, merged ``(pa, length)`` byte ranges whose contents differ."""
        ranges: list[tuple[int, int]] = []
        for gfn in self.changed_frames(other):
            a, b = self.frame(gfn), other.frame(gfn)
            base = gfn << FRAME_SHIFT
            for start, end in _diff_runs(a, b):
                pa = base + start
                if ranges and ranges[-1][0] + ranges[-1][1] == pa:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + end - start)
                else:
                    ranges.append((pa, end - start))
        return ranges

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemorySnapshot):
            return NotImplemented
        return not self.changed_frames(other)

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.frames))

    def __len__(self) -> int:
        return len(self.frames)


def _diff_runs(a: bytes, b: bytes) -> Iterable[tuple[int, int]]:
    i, n = 0, len(a)
    while i < n:
        if a[i] != b[i]:
            j = i + 1
            while j < n and a[j] != b[j]:
                j += 1
            yield i, j
            i = j
        else:
            i += 1
