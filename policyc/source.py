"""Reading policy files: bytes -> text -> syntax tree, with every failure a diagnostic.

The spelling is chosen by extension: `.yaml`/`.yml` is the YAML spelling,
anything else the DSL.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import syntax as S
from .diagnostics import Diagnostics, Span

__all__ = ["MAX_POLICY_BYTES", "display_path", "read_policy_file", "is_yaml_path"]

MAX_POLICY_BYTES = 64 * 1024 * 1024


def is_yaml_path(path: str | Path) -> bool:
    return str(path).lower().endswith((".yaml", ".yml"))


def display_path(path: Path) -> str:
    """The path as a user wants to read it in a diagnostic: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def read_policy_file(path: Path, diagnostics: Diagnostics, *, at: Span | None = None,
                     allow_empty: bool = False) -> S.PolicyFile | None:
    """Read and parse one file. `at` is where it was named (an include), for errors about the file itself."""
    shown = display_path(path)
    try:
        size = path.stat().st_size
        if size > MAX_POLICY_BYTES:
            diagnostics.error("PC100", at or Span(shown, 1, 1),
                              f"'{shown}' is {size:,} bytes; policy files are limited to {MAX_POLICY_BYTES:,}")
            return None
        raw = path.read_bytes()
    except IsADirectoryError:
        diagnostics.error("PC100", at or Span(shown, 1, 1), f"'{shown}' is a directory, not a policy file",
                          "pass the policy files, e.g. dir/*.vmi")
        return None
    except OSError as exc:
        diagnostics.error("PC100", at, f"cannot read '{shown}': {exc.strerror or exc}")
        return None
    # One run reads a file more than once (`check` first follows includes, then checks): parse
    # each content once, and replay its diagnostics into every collector that asks.
    # `allow_empty` changes the outcome only for a file with no content, which costs nothing to
    # read again: such files are not kept, so the include scan and the check share one parse.
    key = (shown, hashlib.sha1(raw).digest())
    if key in _PARSED:
        tree, found, _ = _PARSED[key]
        diagnostics.extend(found)
        return tree
    own = Diagnostics()
    tree = _parse(raw, path, shown, allow_empty, own)
    if tree is not None and tree.items:
        _PARSED[key] = (tree, list(own), len(raw))
        _PARSED_BYTES[0] += len(raw)
    while _PARSED and (len(_PARSED) > _PARSED_KEPT or _PARSED_BYTES[0] > _PARSED_KEPT_BYTES):
        _PARSED_BYTES[0] -= _PARSED.pop(next(iter(_PARSED)))[2]
    diagnostics.extend(own)
    return tree


# Recent parses by (shown path, content digest): tree, diagnostics, source bytes. Trees are never
# mutated after parsing. `check` over a tree of policies reads each file twice (includes first), so
# the cache holds a run's worth of files, bounded by their total size.
_PARSED: dict[tuple[str, bytes], tuple[S.PolicyFile | None, list, int]] = {}
_PARSED_BYTES = [0]
_PARSED_KEPT = 4096
_PARSED_KEPT_BYTES = 32 * 1024 * 1024


def _parse(raw: bytes, path: Path, shown: str, allow_empty: bool, diagnostics: Diagnostics) -> S.PolicyFile | None:
    text = _decode(raw, shown, diagnostics)
    if text is None:
        return None
    if not _has_content(text, is_yaml_path(path)):
        if allow_empty:
            return S.PolicyFile(shown, [], [], "yaml" if is_yaml_path(path) else "dsl")
        hint = ("a YAML policy starts with: policy: NAME" if is_yaml_path(path)
                else 'a policy file starts with: policy "NAME" { ... }')
        diagnostics.error("PC102", Span(shown, 1, 1), f"'{shown}' is empty: it holds no policy", hint)
        return None
    if is_yaml_path(path):
        from .yaml_form import parse_yaml_text
        return parse_yaml_text(text, shown, diagnostics)
    from .dsl import parse_policy_text
    return parse_policy_text(text, shown, diagnostics)


def _decode(raw: bytes, shown: str, diagnostics: Diagnostics) -> str | None:
    nul = raw.find(b"\x00")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _position(raw, exc.start)
        diagnostics.error("PC101", Span(shown, line, col), f"'{shown}' is not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                          "policy files are UTF-8 text; is this a binary file?")
        return None
    if nul >= 0:
        line, col = _position(raw, nul)
        diagnostics.error("PC101", Span(shown, line, col), f"'{shown}' contains a NUL byte: it is not a text file")
        return None
    return text.lstrip("\ufeff")


def _position(raw: bytes, offset: int) -> tuple[int, int]:
    """Line and column (in characters, as every diagnostic counts) of a byte offset."""
    before = raw[:offset]
    line = before.count(b"\n") + 1
    line_start = before.rfind(b"\n") + 1
    col = len(raw[line_start:offset].decode("utf-8", errors="replace")) + 1
    return line, col


def _has_content(text: str, yaml: bool) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not (yaml and stripped in ("---", "...")):
            return True
    return False
