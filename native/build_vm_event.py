"""cffi builder for the vm_event ABI: ``policyc.native._vm_event``.

Out-of-line API mode: the C compiler builds ``ring.c`` (the ring) and
``decide.c`` (the native decision engine) and checks the cdef against
``vm_event_abi.h`` and ``decide.h``, so a wrong declaration fails the build instead of
misreading memory. Only gcc and the Python headers are needed; no Xen headers
or libraries.

Each header is the single source of truth for what it declares. It is C for the compiler and,
after :func:`cdef_from_header`, the cdef for cffi: the include guard and
``#include`` lines are dropped and each ``#define NAME value`` becomes
``#define NAME ...``, so cffi takes the value from the compiled header.

Used by setup.py (``cffi_modules``) at install time. Run directly to build
the module into a directory for development::

    python native/build_vm_event.py [OUTDIR]

which leaves ``OUTDIR/policyc/native/_vm_event*.so`` (default OUTDIR:
``build/cffi``).
"""

from __future__ import annotations

import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "vm_event_abi.h")
RING_C = os.path.join(HERE, "ring.c")
DECIDE_H = os.path.join(HERE, "decide.h")
DECIDE_C = os.path.join(HERE, "decide.c")
MODULE = "policyc.native._vm_event"

_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Za-z_]\w*)(\s+(.*))?$")


def cdef_from_header(text: str, path: str = HEADER) -> str:
    """Turn the header into a cdef (see the module docstring)."""
    out = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            out.append(line)
            continue
        m = _DEFINE.match(line)
        if m is None:
            # #ifndef / #endif of the include guard, #include lines.
            if re.match(r"^\s*#\s*(ifndef|endif|include)\b", line) is None:
                raise ValueError(
                    f"{path}: preprocessor line the cdef cannot carry: {line!r}"
                )
            out.append("")
            continue
        value = (m.group(3) or "").split("/*")[0].strip()
        if not value:  # the include guard
            out.append("")
            continue
        out.append(f"#define {m.group(1)} ...")
    return "\n".join(out)


# The C compiled into the extension beside the code cffi generates (tests/lab/lab_arm64.sh cross-compiles
# the same list for aarch64).
SOURCES = (RING_C, DECIDE_C)


def _source_path(path: str, relative: bool) -> str:
    # setuptools wants sources relative to setup.py's directory, the current
    # one during an install. ffi.compile() changes into its output directory
    # first, so a direct build needs absolute paths.
    if not relative:
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def make_builder(relative_sources: bool = True) -> FFI:
    builder = FFI()
    for path in (HEADER, DECIDE_H):
        with open(path, encoding="utf-8") as f:
            builder.cdef(cdef_from_header(f.read(), path))
    builder.set_source(
        MODULE,
        '#include "vm_event_abi.h"\n#include "decide.h"\n',
        sources=[_source_path(c, relative_sources) for c in SOURCES],
        include_dirs=[HERE],
        depends=[HEADER, DECIDE_H],
        extra_compile_args=["-std=gnu11", "-Wall", "-Wextra"],
    )
    return builder


ffibuilder = make_builder()


if __name__ == "__main__":
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(HERE), "build", "cffi"
    )
    so = make_builder(relative_sources=False).compile(tmpdir=outdir, verbose=True)
    print(so)
