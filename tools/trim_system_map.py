#!/usr/bin/env python3
"""Write a small System.map subset holding only the symbols a policy needs.

    python tools/trim_system_map.py SOURCE_MAP OUT \
        [--names-from FILE ...] [--names N1,N2,...]

The output keeps the System.map format (``address type name``, one symbol a
line, sorted by address) and starts with ``# `` comment lines saying where the
data came from, that it is a subset, and the exact command that made it.
policyc's System.map reader skips lines that begin with '#'.

The kept names are:
  * the section markers (_text, _etext, __start_rodata, ...) and the per-CPU
    area markers, always;
  * every name given with --names (comma separated, repeatable);
  * every identifier that follows the words ``symbol``, ``symbol?`` or
    ``percpu symbol`` in the files given with --names-from (policy files or
    YAML scenarios; '#' comments are ignored, and so are double-quoted
    strings except in .yaml/.yml files, where expressions are strings).

Requested names that the source map does not have are reported on stderr and
listed in the header. That is not an error: some are absent on purpose
(e.g. ia32_sys_call_table on kernels with the 6.9 / 6.1.85 syscall-dispatch
change). Use --strict to make it one.

With --image (a flat kernel Image of the same build, e.g. Debian's arm64
vmlinuz, which is the uncompressed Image), the text at linux_banner is read
from the Image at linux_banner - _text and written to the header as
``# linux_banner: "<JSON string>"``. policyc's reader takes it as the banner the
symbols were made for, and binding compares it with the guest kernel's own.

This is a development tool, not part of the policyc package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

# Always kept: layout of the kernel image and of the per-CPU area.
SECTION_MARKERS = (
    "_text", "_stext", "_etext",
    "__start_rodata", "__end_rodata",
    "_sdata", "_edata",
    "__bss_start", "__bss_stop", "_end",
    "__init_begin", "__init_end", "_sinittext", "_einittext",
    "__start___ex_table", "__stop___ex_table",
)
PERCPU_MARKERS = ("__per_cpu_start", "__per_cpu_end")

# Defaults describe the map this project uses; override for another kernel.
DEFAULT_ORIGIN = (
    "Debian 12 (bookworm) package linux-image-6.1.0-56-amd64-dbg, "
    "file usr/lib/debug/boot/System.map-6.1.0-56-amd64"
)
DEFAULT_KERNEL = "Linux 6.1.0-56-amd64, Debian kernel version 6.1.192-2"

_LINE_RE = re.compile(r"^([0-9A-Fa-f]+)\s+(\S)\s+(\S+)(?:\s+(.*))?$")
# `symbol NAME`, `symbol? NAME`, `percpu symbol NAME` (the last is covered by
# the first). Not `symbols "file"`: \b after `symbol` rejects `symbols`.
_REF_RE = re.compile(r"(?<![A-Za-z0-9_.])symbol\b\??\s*([A-Za-z_][A-Za-z0-9_]*)")
# The header line policyc's System.map reader takes the recorded banner from (policyc/symbols.py).
BANNER_HEADER = "linux_banner: "
_NAME_RE = re.compile(r"^[A-Za-z_.$][A-Za-z0-9_.$]*$")


def strip_comments(text: str, drop_strings: bool = False) -> str:
    """Drop '#' comments that are not inside a double-quoted string.

    With drop_strings, also blank out the double-quoted strings themselves
    (in a policy file they hold file names and messages, never expressions).
    """
    out_lines = []
    for line in text.splitlines():
        in_str = False
        escaped = False
        kept = []
        for ch in line:
            if escaped:
                escaped = False
            elif ch == "\\" and in_str:
                escaped = True
            elif ch == '"':
                in_str = not in_str
                kept.append(ch)
                continue
            elif ch == "#" and not in_str:
                break
            kept.append(" " if (in_str and drop_strings) else ch)
        out_lines.append("".join(kept))
    return "\n".join(out_lines)


def names_in_policy_text(text: str, yaml: bool = False) -> list[str]:
    """Identifiers after `symbol`, `symbol?` or `percpu symbol`, in order.

    In YAML the expressions live inside strings, so strings are scanned;
    in the policy language they are not.
    """
    seen: dict[str, None] = {}
    for m in _REF_RE.finditer(strip_comments(text, drop_strings=not yaml)):
        seen.setdefault(m.group(1), None)
    return list(seen)


def read_map(path: Path) -> list[tuple[int, int, str, str]]:
    """(address, line number, name, original line) for each symbol line."""
    entries = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = _LINE_RE.match(line.strip())
            if not m:
                raise SystemExit(f"{path}:{lineno}: not a System.map line: {line!r}")
            entries.append((int(m.group(1), 16), lineno, m.group(3), line.strip()))
    return entries


def banner_from_image(image: Path, entries: list[tuple[int, int, str, str]]) -> str:
    """The NUL-terminated text at linux_banner in a flat Image that starts at _text."""
    addr = {name: a for a, _line, name, _raw in entries}
    if "linux_banner" not in addr or "_text" not in addr:
        raise SystemExit("--image needs linux_banner and _text in the source map")
    data = image.read_bytes()
    at = addr["linux_banner"] - addr["_text"]
    end = data.find(b"\0", at, at + 1024)
    if not 0 <= at < len(data) or end < 0 or not data[at:end].startswith(b"Linux version "):
        raise SystemExit(f"{image}: no 'Linux version ...' text at linux_banner's offset {at:#x}: not this build's Image")
    return data[at:end].decode("ascii")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wrap_command(argv: list[str], width: int = 96) -> list[str]:
    """shlex-quoted command split into shell continuation lines.

    Each option starts a new line, together with the value after it.
    """
    groups: list[str] = []
    i = 0
    while i < len(argv):
        word = shlex.quote(argv[i])
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            word += " " + shlex.quote(argv[i + 1])
            i += 1
        groups.append(word)
        i += 1
    lines: list[str] = []
    cur = ""
    for word in groups:
        if cur and (word.startswith("-") or len(cur) + 1 + len(word) > width):
            lines.append(cur + " \\")
            cur = "    " + word
        else:
            cur = f"{cur} {word}" if cur else word
    lines.append(cur)
    return lines


def split_names(values: list[str]) -> list[str]:
    names: list[str] = []
    for v in values:
        for n in v.split(","):
            n = n.strip()
            if n:
                if not _NAME_RE.match(n):
                    raise SystemExit(f"not a symbol name: {n!r}")
                names.append(n)
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="full System.map to take symbols from")
    p.add_argument("out", type=Path, help="System.map subset to write")
    p.add_argument("--names-from", nargs="+", action="extend", default=[], type=Path,
                   metavar="FILE", help="policy/scenario files whose `symbol NAME` references to keep")
    p.add_argument("--names", action="append", default=[], metavar="N1,N2,...",
                   help="comma-separated symbol names to keep (repeatable)")
    p.add_argument("--origin", default=DEFAULT_ORIGIN, help="where SOURCE came from (header text)")
    p.add_argument("--kernel", default=DEFAULT_KERNEL, help="which kernel SOURCE belongs to (header text)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a requested name is missing")
    p.add_argument("--image", type=Path, metavar="IMAGE",
                   help="flat kernel Image of the same build: record the text at linux_banner in the header")
    args = p.parse_args(argv)

    wanted: dict[str, str] = {}          # name -> why it is wanted
    for n in SECTION_MARKERS + PERCPU_MARKERS:
        wanted.setdefault(n, "marker")
    for n in split_names(args.names):
        wanted.setdefault(n, "--names")
    for f in args.names_from:
        is_yaml = f.suffix.lower() in (".yaml", ".yml")
        for n in names_in_policy_text(f.read_text(encoding="utf-8"), yaml=is_yaml):
            wanted.setdefault(n, str(f))

    entries = read_map(args.source)
    kept = [e for e in entries if e[2] in wanted]
    kept.sort(key=lambda e: (e[0], e[1]))   # by address, then source order
    present = {e[2] for e in kept}
    missing = [n for n in wanted if n not in present]
    counts = Counter(e[2] for e in kept)
    dup = sorted(n for n, c in counts.items() if c > 1)

    command = ["python", "tools/trim_system_map.py", *argv]
    header = [
        f"Subset of the real System.map of {args.kernel}.",
        f"Source: {args.origin}",
        f"  ({args.source.name}, {len(entries)} symbols, sha256 {sha256_of(args.source)}).",
        f"This file keeps only {len(kept)} of them: the section and per-CPU markers plus the",
        "names that policies and tests refer to. Lines are the source's own lines,",
        "sorted by address. Addresses are link-time (no KASLR slide); per-CPU symbols",
        "(between __per_cpu_start and __per_cpu_end) are offsets into the per-CPU area.",
        "Made with:",
        *("  " + line for line in wrap_command(command)),
    ]
    if args.image is not None:
        header.append(f"linux_banner's text, read from {args.image.name} (sha256 {sha256_of(args.image)}) at "
                      "linux_banner - _text:")
        header.append(BANNER_HEADER + json.dumps(banner_from_image(args.image, entries)))
    if missing:
        header.append("Requested but absent from the source map: " + ", ".join(missing))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for line in header:
            f.write(f"# {line}\n")
        for e in kept:
            f.write(e[3] + "\n")

    for n in missing:
        print(f"trim_system_map: absent from {args.source.name}: {n} (wanted by {wanted[n]})",
              file=sys.stderr)
    for n in dup:
        print(f"trim_system_map: note: {n} appears more than once in the source; all kept",
              file=sys.stderr)
    print(f"trim_system_map: wrote {len(kept)} symbols to {os.fspath(args.out)}"
          f" ({len(missing)} requested name(s) absent)", file=sys.stderr)
    return 1 if (missing and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
