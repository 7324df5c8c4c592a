"""Writing the CLI's output files (`compile -o`, `fmt -w`, `bundle build -o`): one writer for all.

A failure is one clear line on stderr and a False return, never a traceback, and no partial file
is left behind.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

__all__ = ["write_output"]


def write_output(path: Path, text: str | bytes, command: str) -> bool:
    """Write an output file (text, or bytes such as a bundle); a failure is one clear line, and no
    partial file is left behind.

    `-` is stdout. A regular file (or a new one) is replaced atomically: a temporary file in the
    same directory, then a rename. A symlink is followed, so the link stays and its target gets
    the text. Anything else at the path (a character device, a FIFO, a socket) is written through,
    never replaced: `-o /dev/null` as root must not turn the device into a file.
    """
    if str(path) == "-":
        if isinstance(text, bytes):
            sys.stdout.buffer.write(text)
        else:
            sys.stdout.write(text)
        sys.stdout.flush()
        return True
    try:
        target = path.resolve(strict=False) if path.is_symlink() else path
        existing = target.stat() if target.exists() else None
    except (OSError, RuntimeError) as exc:   # RuntimeError: a symlink loop on older Pythons
        print(f"policyc {command}: cannot write '{path}': {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return False
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        print(f"policyc {command}: cannot write '{path}': it is a directory", file=sys.stderr)
        return False
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        return _write_through(path, text, command)
    return _replace_atomically(target, text, command, existing)


def _write_through(path: Path, text: str | bytes, command: str) -> bool:
    try:
        with _open_for(path, text) as f:
            f.write(text)
        return True
    except OSError as exc:
        print(f"policyc {command}: cannot write '{path}': {exc.strerror or exc}", file=sys.stderr)
        return False


def _open_for(path: Path | int, data: str | bytes):
    return open(path, "wb") if isinstance(data, bytes) else open(path, "w", encoding="utf-8")


def _replace_atomically(target: Path, text: str | bytes, command: str, existing: os.stat_result | None) -> bool:
    import tempfile

    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".policyc-tmp", dir=target.parent)
        with _open_for(fd, text) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; keep the replaced file's mode, or the usual one for a new file.
        os.chmod(tmp, stat.S_IMODE(existing.st_mode) if existing else 0o666 & ~_umask())
        os.replace(tmp, target)
        return True
    except OSError as exc:
        print(f"policyc {command}: cannot write '{target}': {exc.strerror or exc}", file=sys.stderr)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
