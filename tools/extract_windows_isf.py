#!/usr/bin/env python3
"""Extract a minimal Volatility 3 ISF for one Windows kernel from MemProcFS's info.db.

    pip install memprocfs        # only for its data file, info.db (AGPL-3.0)
    python tools/extract_windows_isf.py --guid GUID --age AGE --out FILE.isf.json

MemProcFS (https://github.com/ufrisk/MemProcFS) ships ``info.db``, an SQLite
file with symbol RVAs, type sizes and struct member offsets taken from
Microsoft's public PDBs for thousands of kernel builds. We read it as a data
source of facts; the db itself is not copied into this project.

Its keys are hashes (vmm/infodb.c, vmm/charutil.c in MemProcFS):

    h32(s)               = ror13 hash: h = ror32(h, 13) + byte, over the name
    symbol_offset.hash   = (pdb_id << 32) + h32(symbol)
    type_size.hash       = (pdb_id << 32) + h32(type)
    type_child.hash      = ((h32(child) << 32) + h32(type) + pdb_id + (pdb_id << 32))
                           & 0x7fffffffffffffff
    pdb.guidage          = GUID as 32 hex digits (upper case) + age in hex

so names can be looked up, but not listed. Every run first checks the hash
against a known value (KeServiceDescriptorTable, RVA 0xE01900, in PDB
0008C88E851DDB35CFFBFE4D2771E37E1) and stops if it does not match.

The ISF has only what the db has: symbol RVAs (``address``, relative to the
kernel image base, as in every Windows ISF) and the member offsets/sizes of
_EPROCESS and _KPROCESS. Names that the db does not hold are reported and
left out; nothing is filled in. The member *types* are not in the db: they
are written from the public x64 layouts (LIST_ENTRY, EX_FAST_REF, HANDLE,
UCHAR[15], ULONGLONG) so that the ISF is well formed.

This is a development tool, not part of the policyc package.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sqlite3
import sys
from pathlib import Path

PRODUCER = "policyc-tools/memprocfs-infodb-extract"

SYMBOLS = (
    "KeServiceDescriptorTable", "KeServiceDescriptorTableShadow", "KiServiceTable",
    "HalDispatchTable", "HalPrivateDispatchTable", "KiSystemCall64", "KiSystemCall64Shadow",
    "PsInitialSystemProcess", "PsActiveProcessHead", "PsLoadedModuleList",
    "KdDebuggerDataBlock", "PspCreateProcessNotifyRoutine", "PspLoadImageNotifyRoutine",
    "PspCreateThreadNotifyRoutine", "ObHeaderCookie", "MmPfnDatabase", "KiWaitNever",
)

# (struct, member, ISF type of the member).  Types: public x64 layouts.
_PTR_VOID = {"kind": "pointer", "subtype": {"kind": "base", "name": "void"}}
_ULONGLONG = {"kind": "base", "name": "unsigned long long"}
MEMBERS = (
    ("_EPROCESS", "UniqueProcessId", _PTR_VOID),                       # HANDLE
    ("_EPROCESS", "ActiveProcessLinks", {"kind": "struct", "name": "_LIST_ENTRY"}),
    ("_EPROCESS", "Token", {"kind": "union", "name": "_EX_FAST_REF"}),
    ("_EPROCESS", "ImageFileName",
     {"kind": "array", "count": 15, "subtype": {"kind": "base", "name": "unsigned char"}}),
    ("_KPROCESS", "DirectoryTableBase", _ULONGLONG),
    ("_KPROCESS", "UserDirectoryTableBase", _ULONGLONG),                # KPTI user CR3
)
# Byte size of each member type above, to check that members fit their struct.
_MEMBER_SIZE = {"UniqueProcessId": 8, "ActiveProcessLinks": 16, "Token": 8,
                "ImageFileName": 15, "DirectoryTableBase": 8, "UserDirectoryTableBase": 8}

# Helper types the members refer to (public x64 layouts, not from the db).
HELPER_TYPES = {
    "_LIST_ENTRY": {
        "kind": "struct", "size": 16,
        "fields": {
            "Flink": {"offset": 0, "type": {"kind": "pointer",
                                            "subtype": {"kind": "struct", "name": "_LIST_ENTRY"}}},
            "Blink": {"offset": 8, "type": {"kind": "pointer",
                                            "subtype": {"kind": "struct", "name": "_LIST_ENTRY"}}},
        },
    },
    "_EX_FAST_REF": {
        "kind": "union", "size": 8,
        "fields": {
            "Object": {"offset": 0, "type": _PTR_VOID},
            "RefCnt": {"offset": 0, "type": {"kind": "bitfield", "bit_position": 0, "bit_length": 4,
                                             "type": _ULONGLONG}},
            "Value": {"offset": 0, "type": _ULONGLONG},
        },
    },
}

BASE_TYPES = {
    "void": {"kind": "void", "size": 0, "signed": False, "endian": "little"},
    "pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
    "unsigned char": {"kind": "char", "size": 1, "signed": False, "endian": "little"},
    "unsigned long long": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
}

CHECK_GUIDAGE = "0008C88E851DDB35CFFBFE4D2771E37E1"
CHECK_SYMBOL, CHECK_RVA = "KeServiceDescriptorTable", 0xE01900


def h32(name: str) -> int:
    """MemProcFS CharUtil_Hash32A(name, FALSE) for an ASCII name."""
    h = 0
    for byte in name.encode("utf-8"):
        h = (((h >> 13) | (h << 19)) + byte) & 0xFFFFFFFF
    return h


class InfoDB:
    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def pdb(self, guidage: str) -> tuple[int, str, str] | None:
        return self.db.execute("SELECT id, name, pdbname FROM pdb WHERE guidage = ?",
                               (guidage,)).fetchone()

    def _one(self, table: str, key: int) -> int | None:
        row = self.db.execute(f"SELECT data FROM {table} WHERE hash = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def symbol(self, pdb_id: int, name: str) -> int | None:
        return self._one("symbol_offset", (pdb_id << 32) + h32(name))

    def type_size(self, pdb_id: int, type_name: str) -> int | None:
        return self._one("type_size", (pdb_id << 32) + h32(type_name))

    def member_offset(self, pdb_id: int, type_name: str, member: str) -> int | None:
        key = ((h32(member) << 32) + h32(type_name) + pdb_id + (pdb_id << 32)) & 0x7FFFFFFFFFFFFFFF
        return self._one("type_child", key)

    def created(self) -> int | None:
        row = self.db.execute("SELECT value FROM dbinfo WHERE type = 'created'").fetchone()
        return None if row is None else int(row[0])


def find_infodb() -> Path:
    spec = importlib.util.find_spec("memprocfs")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("memprocfs is not installed (pip install memprocfs), or pass --db")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "info.db"
        if p.is_file():
            return p
    raise SystemExit("memprocfs is installed but has no info.db; pass --db")


def memprocfs_version() -> str:
    try:
        return importlib.metadata.version("memprocfs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def guidage_of(guid: str, age: int) -> str:
    g = guid.replace("-", "").replace("{", "").replace("}", "").upper()
    if len(g) != 32 or any(c not in "0123456789ABCDEF" for c in g):
        raise SystemExit(f"not a 32-hex-digit PDB GUID: {guid!r}")
    return f"{g}{age:X}"


def build_isf(db: InfoDB, pdb_id: int, guid: str, age: int, database: str,
              machine_type: int, version: str) -> tuple[dict, dict]:
    """Return (isf, report)."""
    report: dict = {"symbols_found": {}, "symbols_absent": [], "members_found": {},
                    "members_absent": [], "sizes": {}, "sizes_absent": []}
    symbols = {}
    for name in SYMBOLS:
        rva = db.symbol(pdb_id, name)
        if rva is None:
            report["symbols_absent"].append(name)
        else:
            symbols[name] = {"address": rva}
            report["symbols_found"][name] = rva

    user_types: dict = {}
    for struct, member, mtype in MEMBERS:
        off = db.member_offset(pdb_id, struct, member)
        if off is None:
            report["members_absent"].append(f"{struct}.{member}")
            continue
        report["members_found"][f"{struct}.{member}"] = off
        ut = user_types.setdefault(struct, {"kind": "struct", "size": None, "fields": {}})
        ut["fields"][member] = {"offset": off, "type": mtype}

    for struct, ut in user_types.items():
        size = db.type_size(pdb_id, struct)
        end = max(f["offset"] + _MEMBER_SIZE[m] for m, f in ut["fields"].items())
        if size is None:
            # The ISF needs a size; the db does not have one. Use the end of the
            # last known member: a lower bound, recorded as such in the report.
            report["sizes_absent"].append(struct)
            report["sizes"][struct] = f"{end} (lower bound: end of the last known member)"
            ut["size"] = end
        else:
            if end > size:
                raise SystemExit(f"{struct}: member ends at {end} > size {size}: db inconsistent?")
            report["sizes"][struct] = size
            ut["size"] = size
        ut["fields"] = dict(sorted(ut["fields"].items(), key=lambda kv: kv[1]["offset"]))

    used = set()
    for ut in user_types.values():
        for f in ut["fields"].values():
            t = f["type"]
            if t.get("kind") in ("struct", "union"):
                used.add(t["name"])
    for name in sorted(used):
        user_types[name] = HELPER_TYPES[name]

    isf = {
        "metadata": {
            "format": "6.2.0",
            # producer.version is the version of the memprocfs package whose
            # info.db the data came from (schema 6.3 wants N.N.N here).
            "producer": {"name": PRODUCER, "version": version},
            "windows": {"pdb": {"GUID": guid, "age": age, "database": database,
                                "machine_type": machine_type}},
        },
        "base_types": BASE_TYPES,
        "user_types": dict(sorted(user_types.items())),
        "enums": {},
        "symbols": dict(sorted(symbols.items())),
    }
    return isf, report


def validate(isf: dict) -> str:
    """Validate against volatility3's own schema files if volatility3 is installed."""
    spec = importlib.util.find_spec("volatility3")
    if spec is None or not spec.submodule_search_locations:
        return "not validated (volatility3 not installed)"
    schemas = Path(list(spec.submodule_search_locations)[0]) / "schemas"
    import jsonschema
    done = []
    for version in ("6.2.0", "6.3.0"):
        schema_file = schemas / f"schema-{version}.json"
        if schema_file.is_file():
            jsonschema.validate(isf, json.loads(schema_file.read_text()))
            done.append(schema_file.name)
    return f"valid against {', '.join(done)} (volatility3)" if done else "not validated (no schema files)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guid", required=True, help="PDB GUID, 32 hex digits")
    p.add_argument("--age", type=int, required=True, help="PDB age (decimal)")
    p.add_argument("--out", type=Path, required=True, help="ISF JSON file to write")
    p.add_argument("--db", type=Path, help="info.db path (default: the installed memprocfs package's)")
    p.add_argument("--database", default="ntkrnlmp.pdb", help="PDB file name for the ISF metadata")
    p.add_argument("--machine-type", type=int, default=34404,
                   help="PE machine of the kernel (34404 = AMD64); the db does not record it")
    args = p.parse_args(argv)

    db_path = args.db or find_infodb()
    db = InfoDB(db_path)
    version = memprocfs_version()

    check = db.pdb(CHECK_GUIDAGE)
    if check is None or db.symbol(check[0], CHECK_SYMBOL) != CHECK_RVA:
        raise SystemExit("hash self-check failed: this info.db does not give "
                         f"{CHECK_SYMBOL} = {CHECK_RVA:#x} for {CHECK_GUIDAGE}")

    guid = args.guid.replace("-", "").upper()
    guidage = guidage_of(guid, args.age)
    row = db.pdb(guidage)
    if row is None:
        raise SystemExit(f"PDB {guidage} is not in {db_path}")
    pdb_id, module, pdbname = row
    if pdbname.lower() != args.database.lower():
        print(f"note: the db names this PDB {pdbname!r} (module {module!r})", file=sys.stderr)

    isf, report = build_isf(db, pdb_id, guid, args.age, args.database, args.machine_type, version)
    status = validate(isf)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(isf, indent=2) + "\n", encoding="utf-8")

    report = {"info_db": str(db_path), "memprocfs_version": version, "info_db_created": db.created(),
              "pdb_row_id": pdb_id, "guidage": guidage, "pdb_name": pdbname, "isf": str(args.out),
              "validation": status, **report}
    report["symbols_found"] = {k: hex(v) for k, v in report["symbols_found"].items()}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
