"""Symbol tables: System.map and Volatility 3 ISF JSON.

Addresses are link-time (unrandomized) values: guest virtual addresses for a
Linux System.map or ISF, image-relative (RVA) for a Windows ISF. Either way
the enforcer adds one slide at bind time, so the model treats them alike.
Per-CPU symbols (`gdt_page` = 0xb000) are offsets into each CPU's per-CPU
area, not addresses; the table marks them.

Values are Python ints throughout: symbol addresses are above 2^63 and must
never pass through a float or a signed 64-bit integer.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import lzma
import os
import stat
import string
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PolicycError

__all__ = ["Symbol", "SymbolTable", "SymbolFileError", "TypeInfo", "PdbIdentity", "load_symbol_table"]


class SymbolFileError(PolicycError):
    """A symbol file that cannot be used; `line` is set when one line is at fault."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    kind: str  # System.map type letter, or "isf"
    percpu: bool = False


@dataclass(frozen=True)
class TypeInfo:
    name: str
    size: int
    fields: dict[str, tuple[int, str | None]]  # member -> (offset, struct type name when it is one)


@dataclass(frozen=True)
class PdbIdentity:
    """Which PDB a Windows ISF was made from: the kernel image's CodeView record carries the same
    GUID and age, which is how binding tells that the guest runs this very build."""

    guid: str  # 32 upper-case hex digits, symbol-server order (Data1 Data2 Data3 Data4)
    age: int
    database: str  # e.g. "ntkrnlmp.pdb"


@dataclass
class SymbolTable:
    source: str
    format: str  # "system.map" | "isf"
    os: str  # "linux" | "windows"
    symbols: dict[str, Symbol]
    types: dict[str, TypeInfo] = field(default_factory=dict)
    pdb: PdbIdentity | None = None  # Windows ISF only: metadata.windows.pdb
    # System.map names defined again at another address: name -> the addresses not used.
    duplicates: dict[str, tuple[int, ...]] = field(default_factory=dict)
    sha256: str = ""  # of the file's bytes as stored (plans name the symbol files they were compiled against)
    # Linux only: the text at linux_banner in the build the symbols were made for ("Linux version ..."),
    # from an ISF's constant_data or a System.map's "# linux_banner: " header; binding compares the guest's.
    banner: str | None = None

    def lookup(self, name: str) -> Symbol | None:
        return self.symbols.get(name)

    def near_names(self, name: str, limit: int = 3) -> list[str]:
        """Names close to `name`, for "did you mean". Pre-filtered by length: tables hold 160,000 names."""
        from .diagnostics import closest_names

        pool = [n for n in self.symbols if abs(len(n) - len(name)) <= 3]
        return closest_names(name, pool, limit)

    def offsetof(self, type_name: str, member_path: list[str]) -> int:
        """Byte offset of a (possibly nested) member. Raises KeyError with a readable reason."""
        offset = 0
        current = type_name
        for member in member_path:
            info = self.types.get(current)
            if info is None:
                raise KeyError(f"no type '{current}' in {Path(self.source).name}")
            if member not in info.fields:
                raise KeyError(f"type '{current}' has no member '{member}'")
            member_offset, member_type = info.fields[member]
            offset += member_offset
            current = member_type or ""
        return offset

    def sizeof(self, type_name: str) -> int:
        info = self.types.get(type_name)
        if info is None:
            raise KeyError(f"no type '{type_name}' in {Path(self.source).name}")
        return info.size


_CACHE: dict[tuple[str, float, int], SymbolTable] = {}
# The full ISF of a distribution kernel is about 40 MB; anything far larger is no symbol file.
MAX_SYMBOL_FILE_BYTES = 512 * 1024 * 1024


def load_symbol_table(path: str | Path) -> SymbolTable:
    """Load a System.map or an ISF (optionally .xz/.gz compressed). Cached per file version."""
    p = Path(os.path.normpath(path))
    if "\x00" in str(p):           # no file system takes one; os.stat raises ValueError, not OSError
        raise SymbolFileError(f"cannot read symbol file {str(p)!r}: its name holds a NUL character")
    try:
        st = p.stat()
    except OSError as exc:
        raise SymbolFileError(f"cannot read symbol file '{p}': {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SymbolFileError(f"symbol file '{p}' is not a regular file")
    if st.st_size > MAX_SYMBOL_FILE_BYTES:
        raise SymbolFileError(f"symbol file '{p}' is {st.st_size:,} bytes; the limit is {MAX_SYMBOL_FILE_BYTES:,}")
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    if key not in _CACHE:
        table = _load(p)
        # Once per file version, not once per policy naming it: a CI run checks hundreds of policies
        # against one 2 MB System.map.
        table.sha256 = hashlib.sha256(p.read_bytes()).hexdigest()
        _CACHE[key] = table
    return _CACHE[key]


def _load(p: Path) -> SymbolTable:
    raw = _read_maybe_compressed(p)
    head = raw.lstrip()[:1]
    if head == b"{":
        return _load_isf(p, raw)
    return _load_system_map(p, raw)


def _read_maybe_compressed(p: Path) -> bytes:
    try:
        data = p.read_bytes()
        if data[:6] == b"\xfd7zXZ\x00":
            return _bounded(lzma.LZMADecompressor(), data, p)
        if data[:2] == b"\x1f\x8b":
            return _bounded(zlib.decompressobj(wbits=31), data, p)
        return data
    except OSError as exc:
        raise SymbolFileError(f"cannot read symbol file '{p}': {exc.strerror}") from None
    except (lzma.LZMAError, zlib.error, EOFError, gzip.BadGzipFile, ValueError) as exc:
        raise SymbolFileError(f"'{p}' is a damaged compressed file: {exc}") from None


def _bounded(decompressor, data: bytes, p: Path) -> bytes:
    """Decompress, refusing to grow past the size limit (a compression bomb gets an error)."""
    out = decompressor.decompress(data, MAX_SYMBOL_FILE_BYTES + 1)
    if len(out) > MAX_SYMBOL_FILE_BYTES:
        raise SymbolFileError(f"'{p}' decompresses to more than {MAX_SYMBOL_FILE_BYTES:,} bytes")
    return out


def _load_system_map(p: Path, raw: bytes) -> SymbolTable:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SymbolFileError(f"'{p}' is neither a System.map (text) nor an ISF (JSON)") from None
    symbols: dict[str, Symbol] = {}
    duplicates: dict[str, tuple[int, ...]] = {}
    banner: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.startswith(_MAP_BANNER):
            banner = _map_banner(p, lineno, line[len(_MAP_BANNER):])
            continue
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 3:
            raise SymbolFileError(f"'{p}' line {lineno}: expected 'ADDRESS TYPE NAME'", lineno)
        try:
            address = int(parts[0], 16)
        except ValueError:
            raise SymbolFileError(f"'{p}' line {lineno}: the address is not a hex number", lineno) from None
        name = parts[2]
        # Module symbols ("name [module]") and duplicates: the first core-kernel definition wins.
        first = symbols.get(name)
        if first is None:
            symbols[name] = Symbol(name, address, parts[1])
        elif address != first.address and address not in duplicates.get(name, ()):
            duplicates[name] = duplicates.get(name, ()) + (address,)
    if not symbols:
        raise SymbolFileError(f"'{p}' holds no symbols")
    _mark_percpu(symbols)
    return SymbolTable(str(p), "system.map", "linux", symbols, duplicates=duplicates, banner=banner)


# tools/trim_system_map.py --image writes this header line: the banner as one JSON string.
_MAP_BANNER = "# linux_banner: "


def _map_banner(p: Path, lineno: int, value: str) -> str:
    try:
        banner = json.loads(value)
    except ValueError:
        banner = None
    if not isinstance(banner, str) or not banner.startswith("Linux version "):
        raise SymbolFileError(f"'{p}' line {lineno}: the linux_banner header is not a JSON string "
                              "starting 'Linux version '", lineno)
    return banner


def _mark_percpu(symbols: dict[str, Symbol]) -> None:
    """Mark per-CPU symbols and make their value the offset into a CPU's per-CPU area.

    On x86_64 the per-CPU section is linked at 0, so the value already is the
    offset (`gdt_page` = 0xb000). On arm64 it is linked at a kernel address
    (`__per_cpu_start` = 0xffff800009804000): the offset is the distance from it.
    """
    start, end = symbols.get("__per_cpu_start"), symbols.get("__per_cpu_end")
    if start is None or end is None or end.address <= start.address:
        if start is not None or end is not None:
            return
        # No markers: a small value in a 64-bit kernel map is still no kernel address.
        lo, hi = 0, 1 << 32
    else:
        lo, hi = start.address, end.address
    for name, sym in list(symbols.items()):
        if lo <= sym.address < hi and sym.kind.upper() != "A" and name not in ("__per_cpu_start", "__per_cpu_end"):
            symbols[name] = Symbol(name, sym.address - lo, sym.kind, True)


def _load_isf(p: Path, raw: bytes) -> SymbolTable:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise SymbolFileError(f"'{p}' is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "metadata" not in doc or not isinstance(doc.get("symbols"), dict):
        raise SymbolFileError(f"'{p}' is JSON but not a Volatility 3 ISF (no 'metadata'/'symbols')")
    os_name = "windows" if "windows" in (doc.get("metadata") or {}) else "linux"
    symbols: dict[str, Symbol] = {}
    for name, entry in doc["symbols"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), int) \
                or isinstance(entry.get("address"), bool) or not 0 <= entry["address"] < 1 << 64:
            raise SymbolFileError(f"'{p}': a symbol has no 64-bit integer address")
        symbols[name] = Symbol(name, entry["address"], "isf")
    if os_name == "linux":
        _mark_percpu(symbols)
    user_types = doc.get("user_types") or {}
    if not isinstance(user_types, dict):
        raise SymbolFileError(f"'{p}': 'user_types' is not an object")
    types: dict[str, TypeInfo] = {}
    for tname, tdef in user_types.items():
        if not isinstance(tdef, dict):
            continue
        size = tdef.get("size", 0)
        fields_doc = tdef.get("fields") or {}
        if not isinstance(size, int) or isinstance(size, bool) or not isinstance(fields_doc, dict):
            raise SymbolFileError(f"'{p}': type '{tname}' is malformed (size or fields)")
        fields: dict[str, tuple[int, str | None]] = {}
        for fname, fdef in fields_doc.items():
            if isinstance(fdef, dict) and isinstance(fdef.get("offset"), int):
                ftype = fdef.get("type", {})
                if not isinstance(ftype, dict):
                    raise SymbolFileError(f"'{p}': a member of type '{tname}' has a malformed type")
                nested = ftype.get("name") if ftype.get("kind") in ("struct", "union", "class") else None
                fields[fname] = (fdef["offset"], nested if isinstance(nested, str) else None)
        types[tname] = TypeInfo(tname, size, fields)
    return SymbolTable(str(p), "isf", os_name, symbols, types, _pdb_identity(doc.get("metadata")),
                       banner=_isf_banner(doc["symbols"]) if os_name == "linux" else None)


def _isf_banner(isf_symbols: dict) -> str | None:
    """linux_banner's constant_data (base64 of the text and its NUL, as dwarf2json writes it), when it
    reads as a banner; None otherwise (binding then checks only that the guest has one there)."""
    data = (isf_symbols.get("linux_banner") or {}).get("constant_data")
    if not isinstance(data, str):
        return None
    try:
        text = base64.b64decode(data, validate=True).split(b"\0", 1)[0].decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return text if text.startswith("Linux version ") else None


def _pdb_identity(metadata: object) -> PdbIdentity | None:
    """metadata.windows.pdb when it is well formed; None otherwise (the symbols stay usable for
    checking and compiling, only binding needs it and says so)."""
    windows = metadata.get("windows") if isinstance(metadata, dict) else None
    pdb = windows.get("pdb") if isinstance(windows, dict) else None
    if not isinstance(pdb, dict):
        return None
    guid, age, database = pdb.get("GUID"), pdb.get("age"), pdb.get("database", "")
    if not isinstance(guid, str) or len(guid) != 32 or any(c not in string.hexdigits for c in guid) \
            or isinstance(age, bool) or not isinstance(age, int) or not 0 <= age < 1 << 32:
        return None
    return PdbIdentity(guid.upper(), age, database if isinstance(database, str) else "")
