"""An output stream of the enforcer (decision log, alert stream, trace) that fails whole and says which.

`OutputFile(path, role)` appends text; `flush()` writes what was appended since the last flush with
`os.write`. When a write fails (a full disk, EIO, a closed FIFO) a regular file is cut back to its
size before that flush, so the file ends with its last complete record, never a torn one; the
stream is then broken: later writes raise the same `OutputError` at once (the caller counts what
was lost), `flush()` and `close()` never raise. The error names the stream's role and path, so a
failing alert stream is not reported as the decision log.
"""

from __future__ import annotations

import errno as _errno
import os
import stat

from ..errors import PolicycError

__all__ = ["OutputError", "OutputFile"]


class OutputError(PolicycError, OSError):
    """A write to an output stream failed; `stream` is its role ("the alert stream")."""

    def __init__(self, code: int | None, message: str, stream: str) -> None:
        super().__init__(code if code is not None else _errno.EIO, message)
        self.stream = stream

    def __str__(self) -> str:
        return str(self.strerror)


class OutputFile:
    """A text stream over one file descriptor (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, role: str, *, truncate: bool = False) -> None:
        self.path = os.fspath(path)
        self.role = role
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else os.O_APPEND)
        self._fd: int | None = os.open(self.path, flags, 0o666)
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._pending: list[str] = []
        self.error: OutputError | None = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.role} '{self.path}' is closed")
        self.flush()
        return self._fd

    def write(self, text: str) -> int:
        if self.error is not None:
            raise self.error
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        """Write what is pending, all of it or (on a failure) nothing: raises `OutputError` once."""
        if self.error is not None or self._fd is None or not self._pending:
            return
        data = "".join(self._pending).encode("utf-8")
        self._pending.clear()
        size = os.fstat(self._fd).st_size if self._regular else 0
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._fail(exc, size)

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.flush()
        except OutputError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def _fail(self, exc: OSError, size: int) -> None:
        if self._regular:
            try:
                os.ftruncate(self._fd, size)   # the last complete record ends the file
            except OSError:
                pass
        self.error = OutputError(exc.errno, f"{self.role} '{self.path}' cannot be written: "
                                            f"{exc.strerror or exc}", self.role)
        raise self.error
