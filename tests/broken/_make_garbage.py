"""Regenerate the binary-garbage cases of the broken-policy corpus (deterministic).

    python tests/broken/_make_garbage.py

Writes garbage.vmi / garbage.yaml (random bytes with NULs and invalid UTF-8)
and, next to each, FILE.expect: a file of bytes cannot hold its own
`# expect:` header. The expected position is the first byte that is not
UTF-8 (line, and column counted in bytes from the line's start), computed
here independently of policyc.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def garbage(seed: int, size: int = 768) -> bytes:
    rng = random.Random(seed)
    data = bytearray(rng.getrandbits(8) for _ in range(size))
    # Make sure every kind of trouble is in there, wherever the dice fell.
    for i in range(40, size, 97):
        data[i] = 0x00
    data[size // 3] = 0xFF               # never valid in UTF-8
    data[size // 2:size // 2 + 2] = b"\xc3\x28"  # a broken two-byte sequence
    for i in range(5, size, 61):
        data[i] = 0x0A                   # some newlines, so the position has a line
    return bytes(data)


def first_bad(data: bytes) -> tuple[int, int]:
    """(line, byte column) of the first byte that is no UTF-8, or of the first NUL if all decodes."""
    try:
        data.decode("utf-8")
        offset = data.index(b"\x00")
    except UnicodeDecodeError as exc:
        offset = exc.start
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def main() -> None:
    for name, seed in (("garbage.vmi", 0x5EED_0001), ("garbage.yaml", 0x5EED_0002)):
        data = garbage(seed)
        (HERE / name).write_bytes(data)
        line, col = first_bad(data)
        (HERE / (name + ".expect")).write_text(f"# expect: PC101 at {line}:{col} \"not UTF-8\"\n", encoding="ascii")


if __name__ == "__main__":
    main()
