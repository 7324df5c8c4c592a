"""Size- and time-based rotation of the enforcer's output files, between batches.

`Rotation(out, max_bytes=..., every=..., keep=...)` watches one `OutputFile` (the decision log, the
alert stream, an OCSF log). `check()` is called by whoever writes the file, between two batches
(the answering loop for the decision log, whose records the native engine writes straight to the
file's descriptor; a shipper's thread for the files it writes); when the file has reached
`max_bytes`, or is `every` seconds old and not empty, it is rotated:

1. what is pending in the stream is flushed (every batch ends with a newline: the file ends with a
   whole record);
2. FILE.{keep-1} → FILE.{keep} ... FILE → FILE.1 (renames; the oldest beyond `keep` is removed);
3. a fresh FILE is opened and `dup2`'d onto the stream's descriptor, so whatever writes to that
   descriptor number (the native engine keeps it) writes to the new file from its next batch.

No line is lost (nothing is written between 1 and 3: the writer is the caller) and none is torn
(a rotation happens only between batches, and batches are whole lines). Names are those of
logrotate and Python's RotatingFileHandler; a collector following FILE by name (Vector, the
OpenTelemetry filelog receiver, rsyslog imfile) reads the rotated file to its end first.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

__all__ = ["Rotation", "parse_duration", "parse_size"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Rotation:
    """Rotation of one output file (see the module docstring)."""

    def __init__(self, out: Any, *, max_bytes: int | None = None, every: float | None = None, keep: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if keep < 1:
            raise ValueError("keep at least one rotated file")
        self.out = out
        self.max_bytes = max_bytes
        self.every = every
        self.keep = keep
        self.clock = clock
        self.opened = clock()
        self.rotations = 0
        self.errors = 0
        self.last_error: str | None = None

    def check(self) -> bool:
        """Rotate when due (between batches only); True when it did. A failed rotation is counted
        and the file kept: losing records to a rename that failed would be worse than a big file."""
        out = self.out
        if out.closed or getattr(out, "error", None) is not None:
            return False
        try:
            fd = out.fileno()                         # flushes what is pending
            size = os.fstat(fd).st_size
        except (OSError, ValueError):
            return False
        due = (self.max_bytes is not None and size >= self.max_bytes) or \
              (self.every is not None and size > 0 and self.clock() - self.opened >= self.every)
        if not due:
            return False
        try:
            self._rotate(fd)
        except OSError as exc:
            self.errors += 1
            self.last_error = f"cannot rotate {out.path}: {exc.strerror or exc}"
            return False
        self.rotations += 1
        self.opened = self.clock()
        return True

    def _rotate(self, fd: int) -> None:
        path = self.out.path
        oldest = f"{path}.{self.keep}"
        if os.path.lexists(oldest):
            os.unlink(oldest)
        for n in range(self.keep - 1, 0, -1):
            if os.path.lexists(f"{path}.{n}"):
                os.rename(f"{path}.{n}", f"{path}.{n + 1}")
        os.rename(path, f"{path}.1")
        fresh = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        try:
            os.dup2(fresh, fd, inheritable=False)
        finally:
            os.close(fresh)


def parse_size(text: str) -> int:
    """``1048576``, ``512K``, ``100M``, ``1G`` → bytes (ValueError when it is none of these)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    if not num.isdigit() or int(num) * _UNITS[unit] <= 0:
        raise ValueError(f"expected a size such as 100M, 512K or 1G, not '{text}'")
    return int(num) * _UNITS[unit]


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``1h``, ``1d`` (or seconds) → seconds (ValueError when it is none of these)."""
    t = text.strip().lower()
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _SECONDS else (t, "s")
    try:
        value = float(num) * _SECONDS[unit]
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"expected a duration such as 30s, 15m, 1h or 1d, not '{text}'")
    return value
