"""The vm_event ABI in native/: layout against Xen's headers, and the ring.

Part (a) compiles a C program against Debian's libxen-dev headers
(/usr/include/xen) that prints the size, alignment and every field offset
and size of every type our cdef declares, every constant, and the slot count
the standard ring macros give for one 4 KiB page; each is compared with the
same value from our compiled cffi module. Without the headers those tests
skip. Part (b) drives the ring protocol through ``abi.Ring``.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest

from policyc.native import abi

XEN_VM_EVENT_H = "/usr/include/xen/vm_event.h"
# Each release's headers (tests/test_xen_backend.py says the same): the system's libxen-dev, and
# Debian 13's Xen 4.20 where POLICYC_XEN_HEADERS_4_20 points.
HEADER_SETS = {"system": "/usr/include", "4.20": os.environ.get("POLICYC_XEN_HEADERS_4_20")}
# What a newer release's vm_event.h adds that policyc neither enables nor decodes (same interface
# version 7): Xen 4.20's I/O instruction events, a monitor policyc never turns on.
NEWER_UNUSED = {"VM_EVENT_REASON_IO_INSTRUCTION"}

# Types whose size legitimately differs from Xen's: Xen declares ring[1]
# and sizes it from the page at run time; ours spells out the 8 slots.
SRING_TYPES = {"struct vm_event_sring", "vm_event_sring_t"}

# Our names for Xen's hvm.h X86_EVENTTYPE_* values; the public headers carry
# them as XEN_DMOP_EVENT_* (dm_op.h: "precisely matches").
EVENTTYPE_IN_XEN = {
    "X86_EVENTTYPE_EXT_INTR": "XEN_DMOP_EVENT_ext_int",
    "X86_EVENTTYPE_NMI": "XEN_DMOP_EVENT_nmi",
    "X86_EVENTTYPE_HW_EXCEPTION": "XEN_DMOP_EVENT_hw_exc",
    "X86_EVENTTYPE_SW_INTERRUPT": "XEN_DMOP_EVENT_sw_int",
    "X86_EVENTTYPE_PRI_SW_EXCEPTION": "XEN_DMOP_EVENT_pri_sw_exc",
    "X86_EVENTTYPE_SW_EXCEPTION": "XEN_DMOP_EVENT_sw_exc",
}
# Ours, with the Xen expression that must give the same value.
RING_IN_XEN = {
    "VM_RING_SLOTS": "__CONST_RING_SIZE(vm_event, 4096)",
    "VM_RING_PAGE_SIZE": "(1 << XEN_PAGE_SHIFT)",
}


# ---------------------------------------------------------------------------
# (a) layout against Xen's headers


def _our_types(ffi) -> list[str]:
    """The ABI's types (the native decision engine's pe_* types and the replaying producer's state
    are ours, not Xen's)."""
    typedefs, structs, unions = ffi.list_types()
    typedefs = [t for t in typedefs if not t.startswith("pe_")]
    structs = [s for s in structs if s not in ("vm_ring_replay", "vm_evtchn_kick")]
    return (
        list(typedefs)
        + [f"struct {name}" for name in structs]
        + [f"union {name}" for name in unions]
    )


def _designator(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _walk_fields(ctype, prefix: tuple = ()):
    """(path, CField) for every field, nested structs/unions and the first
    element of arrays of structs included."""
    for name, fld in ctype.fields:
        path = prefix + (name,)
        yield path, fld
        if fld.bitsize >= 0:
            continue
        t = fld.type
        if t.kind in ("struct", "union"):
            yield from _walk_fields(t, path)
        elif t.kind == "array" and t.item.kind in ("struct", "union"):
            yield from _walk_fields(t.item, path + (0,))


def _checks(ffi, lib):
    """(key, C expression or None, our value); None marks a bitfield check
    handled by C statements generated separately."""
    numeric = []  # (key, c_expr, ours)
    bitfields = []  # (key, type, designator, mask, ours_hex)
    for tname in _our_types(ffi):
        ctype = ffi.typeof(tname)
        if ctype.kind not in ("struct", "union"):
            numeric.append((f"sizeof:{tname}", f"sizeof({tname})", ffi.sizeof(tname)))
            continue
        if tname not in SRING_TYPES:
            numeric.append((f"sizeof:{tname}", f"sizeof({tname})", ffi.sizeof(tname)))
        numeric.append((f"alignof:{tname}", f"_Alignof({tname})", ffi.alignof(tname)))
        for path, fld in _walk_fields(ctype):
            des = _designator(path)
            if fld.bitsize >= 0:
                # Set the bitfield to all ones (of our width here, of Xen's in
                # the probe) in a zeroed object; compare the bytes of the
                # struct that holds it: position and width both show.
                mask = (1 << fld.bitsize) - 1
                p = ffi.new(f"{tname} *")
                parent = p[0]
                for part in path[:-1]:
                    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
                setattr(parent, path[-1], mask)
                ours = bytes(ffi.buffer(ffi.addressof(parent))).hex()
                bitfields.append(
                    (f"bits:{tname}:{des}", tname, des, mask, ours)
                )
                continue
            numeric.append(
                (f"offsetof:{tname}:{des}", f"offsetof({tname}, {des})",
                 ffi.offsetof(tname, *path))
            )
            if tname in SRING_TYPES and path == ("ring",):
                continue  # ring[8] here, ring[1] in Xen: checked separately
            numeric.append(
                (f"fieldsize:{tname}:{des}", f"sizeof((({tname} *)0)->{des})",
                 ffi.sizeof(fld.type))
            )
    for name, value in abi.constants().items():
        if name in RING_IN_XEN:
            expr = RING_IN_XEN[name]
        elif name in EVENTTYPE_IN_XEN:
            expr = EVENTTYPE_IN_XEN[name]
        else:
            expr = name
        numeric.append((f"const:{name}", f"(long long)({expr})", value))
    return numeric, bitfields


def _c_program(numeric, bitfields) -> str:
    lines = [
        "#define __XEN_TOOLS__ 1",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <stdio.h>",
        "#include <string.h>",
        "#include <xen/xen.h>",
        "#include <xen/vm_event.h>",
        "#include <xen/io/ring.h>",
        "#include <xen/hvm/dm_op.h>",
        "",
        "static void hex(const char *key, const void *p, size_t n)",
        "{",
        "    const unsigned char *b = p;",
        "    size_t i;",
        '    printf("%s=", key);',
        "    for (i = 0; i < n; i++)",
        '        printf("%02x", b[i]);',
        '    printf("\\n");',
        "}",
        "",
        "int main(void)",
        "{",
        "    volatile unsigned long long ones_src = ~0ull;",
        "    unsigned long long ones = ones_src;",
    ]
    for key, expr, _ in numeric:
        lines.append(f'    printf("%s=%lld\\n", "{key}", (long long)({expr}));')
    for key, tname, des, mask, _ in bitfields:
        holder = "(*v)." + des.rsplit(".", 1)[0] if "." in des else "(*v)"
        # In a page, not on the stack: from Xen 4.20 the ring is a flexible array (ring[]), so an
        # object of the sring type has no room for ring[0].
        lines += [
            "    {",
            "        static unsigned char page[4096] __attribute__((aligned(64)));",
            f"        {tname} *v = ({tname} *)(void *)page;",
            "        memset(page, 0, sizeof(page));",
            f"        (*v).{des} = ones;  /* truncated to Xen's width */",
            f'        hex("{key}", &{holder}, sizeof({holder}));',
            "    }",
        ]
    # Figures the report and the sring test use.
    lines += [
        '    printf("xen:sizeof_sring=%zu\\n", sizeof(struct vm_event_sring));',
        '    printf("xen:entry=%zu\\n", sizeof(union vm_event_sring_entry));',
        '    printf("xen:ring_offset=%zu\\n", offsetof(struct vm_event_sring, ring));',
        '    printf("xen:slots=%u\\n", (unsigned)__CONST_RING_SIZE(vm_event, 4096));',
        "    return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _header_root(which: str) -> str:
    root = HEADER_SETS[which]
    if root is None:
        pytest.skip(f"no Xen {which} headers: set POLICYC_XEN_HEADERS_4_20 to Debian 13's libxen-dev include "
                    "directory (.ci/run fetches it)")
    if not os.path.exists(os.path.join(root, "xen", "vm_event.h")):
        pytest.skip(f"{root}/xen/vm_event.h absent: install Debian's libxen-dev to check the "
                    "layout against Xen's own headers")
    return root


# The arm64 layout: the same probe cross-compiled against Debian's libxen-dev:arm64 headers (unpacked
# by tests/lab/lab_arm64.sh fetch, or wherever POLICYC_XEN_ARM64_INCLUDE points) and run under
# qemu-user. The request's register union holds both arches' structs on every arch, so our one
# layout must be Xen's on arm64 too.
ARM64_INCLUDE = os.environ.get("POLICYC_XEN_ARM64_INCLUDE", "/tmp/policyc-lab-arm64/root/usr/include")


@pytest.fixture(scope="module", params=sorted(HEADER_SETS) + ["arm64"])
def xen(request, tmp_path_factory):
    """Our checks, and Xen's values for them from a compiled program: each x86 release's headers,
    and the arm64 headers."""
    if request.param != "arm64":
        root = _header_root(request.param)
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            pytest.skip("no C compiler to build the Xen layout probe")
        compile_cmd, runner = [gcc, f"-I{root}"], []
    else:
        header = os.path.join(ARM64_INCLUDE, "xen", "vm_event.h")
        tools = {t: shutil.which(t) for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64-static")}
        missing = [t for t, path in tools.items() if path is None]
        if not os.path.exists(header) or missing:
            reason = (f"the arm64 layout check needs {header} (tests/lab/lab_arm64.sh fetch unpacks "
                      f"libxen-dev:arm64) and {', '.join(tools)}; missing: "
                      f"{', '.join(missing + ([header] if not os.path.exists(header) else []))}")
            print(f"SKIP: {reason}")
            pytest.skip(reason)
        compile_cmd = [tools["aarch64-linux-gnu-gcc"], "-static", "-nostdinc",
                       "-isystem", subprocess.run([tools["aarch64-linux-gnu-gcc"], "-print-file-name=include"],
                                                  capture_output=True, text=True).stdout.strip(),
                       "-isystem", "/usr/aarch64-linux-gnu/include", "-isystem", ARM64_INCLUDE]
        runner = [tools["qemu-aarch64-static"]]
    ffi, lib = abi.extension()

    numeric, bitfields = _checks(ffi, lib)
    d = tmp_path_factory.mktemp(f"xenprobe-{request.param}")
    src = d / "probe.c"
    exe = d / "probe"
    src.write_text(_c_program(numeric, bitfields))
    build = subprocess.run(
        compile_cmd + ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, f"probe against Xen headers ({request.param}) failed:\n{build.stderr}"
    run = subprocess.run(runner + [str(exe)], capture_output=True, text=True, check=True)
    if request.param == "arm64":
        assert "aarch64" in subprocess.run(["file", str(exe)], capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in run.stdout.splitlines())
    return numeric, bitfields, values


def test_every_declared_size_and_offset_matches_xen(xen):
    numeric, _, values = xen
    layout = [c for c in numeric if not c[0].startswith("const:")]
    mismatches = [
        f"{key}: ours {ours}, Xen {values[key]}"
        for key, _, ours in layout
        if int(values[key]) != ours
    ]
    assert not mismatches, "\n".join(mismatches)
    # The walk really covered the ABI: every union member and register.
    keys = {k for k, _, _ in layout}
    for expected in (
        "offsetof:vm_event_request_t:u",
        "offsetof:vm_event_request_t:data",
        "offsetof:vm_event_request_t:u.mem_access.gla",
        "offsetof:vm_event_request_t:u.write_ctrlreg.old_value",
        "offsetof:vm_event_request_t:u.mov_to_msr.msr",
        "offsetof:vm_event_request_t:u.software_breakpoint.insn_length",
        "offsetof:vm_event_request_t:u.singlestep.gfn",
        "offsetof:vm_event_request_t:u.fast_singlestep.p2midx",
        "offsetof:vm_event_request_t:u.debug_exception.pending_dbg",
        "offsetof:vm_event_request_t:u.cpuid.subleaf",
        "offsetof:vm_event_request_t:u.interrupt.x86.cr2",
        "offsetof:vm_event_request_t:u.desc_access.arch.vmx.exit_qualification",
        "offsetof:vm_event_request_t:u.desc_access.is_write",
        "offsetof:vm_event_request_t:u.vmexit.arch.vmx.qualification",
        "offsetof:vm_event_request_t:u.mem_paging.flags",
        "offsetof:vm_event_request_t:u.mem_sharing.p2mt",
        "offsetof:vm_event_request_t:data.regs.x86.gs_sel",
        "offsetof:vm_event_request_t:data.regs.x86.vmtrace_pos",
        "offsetof:vm_event_request_t:data.regs.arm.cpsr",
        "offsetof:vm_event_request_t:data.emul.read.data",
        "offsetof:vm_event_request_t:data.emul.insn.data",
        "offsetof:struct vm_event_sring:__pad",
        "offsetof:struct vm_event_sring:ring[0].rsp.data",
        "fieldsize:struct vm_event_sring:pvt",
        "offsetof:struct vm_event_back_ring:sring",
        "sizeof:vm_event_response_t",
    ):
        assert expected in keys, expected
    assert len(layout) > 500


def test_bitfields_match_xen(xen):
    _, bitfields, values = xen
    assert {d for _, _, d, _, _ in bitfields} >= {
        "data.regs.x86.cs.limit", "data.regs.x86.gs.ar", "ar", "limit",
    }
    mismatches = [
        f"{key}: ours {ours}, Xen {values[key]}"
        for key, _, _, _, ours in bitfields
        if values[key] != ours
    ]
    assert not mismatches, "\n".join(mismatches)


def test_every_constant_matches_xen(xen):
    numeric, _, values = xen
    consts = [c for c in numeric if c[0].startswith("const:")]
    mismatches = [
        f"{key}: ours {ours}, Xen {values[key]}"
        for key, _, ours in consts
        if int(values[key]) != ours
    ]
    assert not mismatches, "\n".join(mismatches)
    assert len(consts) >= 50


@pytest.mark.parametrize("which", sorted(HEADER_SETS))
def test_every_xen_vm_event_constant_is_declared(which):
    root = _header_root(which)
    with open(os.path.join(root, "xen", "vm_event.h"), encoding="utf-8") as f:
        xen_names = set(
            re.findall(r"^\s*#\s*define\s+((?:VM_EVENT|MEM_ACCESS|MEM_PAGING)_\w+)",
                       f.read(), re.MULTILINE)
        )
    assert len(xen_names) > 40
    missing = sorted(xen_names - set(abi.constants()) - NEWER_UNUSED)
    assert not missing, f"declared by Xen, not by us: {missing}"


def test_one_page_ring_holds_what_xen_computes(xen):
    _, _, values = xen
    ffi, _ = abi.extension()

    slots = int(values["xen:slots"])
    entry = int(values["xen:entry"])
    ring_offset = int(values["xen:ring_offset"])
    assert slots == abi.RING_SLOTS == 8
    assert entry == abi.EVENT_SIZE == 400
    # Ours is Xen's header plus the slots Xen sizes at run time.
    assert ffi.sizeof("struct vm_event_sring") == ring_offset + slots * entry
    # Xen 4.17 declares ring[1], Xen 4.20 a flexible array ring[]
    assert int(values["xen:sizeof_sring"]) in (ring_offset + entry, ring_offset)


# ---------------------------------------------------------------------------
# the numbers the project relies on (no Xen headers needed)


def test_known_abi_figures():
    ffi, lib = abi.extension()

    assert abi.VERSION == 7
    assert abi.EVENT_SIZE == 400
    assert ffi.offsetof("vm_event_request_t", "u") == 24
    assert ffi.offsetof("vm_event_request_t", "data") == 56
    assert ffi.offsetof("struct vm_event_sring", "ring") == 64
    assert abi.RING_PAGE_SIZE == 4096
    assert abi.RING_SLOTS == 8
    # Slot count rule: the page's entries rounded down to a power of two.
    assert lib.vm_ring_slots_for(4096) == 8  # 10 fit
    assert lib.vm_ring_slots_for(8192) == 16  # 20 fit
    assert lib.vm_ring_slots_for(64 + 400) == 1
    assert lib.vm_ring_slots_for(64 + 399) == 0


def test_enums():
    assert abi.Reason.MEM_ACCESS == 1 and abi.Reason.VMEXIT == 15
    assert abi.Reason(6).name == "SOFTWARE_BREAKPOINT"
    assert abi.Flag.VCPU_PAUSED == 1 and abi.Flag.DENY == 64
    assert abi.Flag.FAST_SINGLESTEP == 1 << 11
    assert abi.MemAccess.RWX == abi.MemAccess.R | abi.MemAccess.W | abi.MemAccess.X
    assert abi.CtrlReg.XCR0 == 3
    assert abi.X86EventType.SW_EXCEPTION == 6
    assert set(abi.PAYLOAD_MEMBER) <= {r.name for r in abi.Reason}


# ---------------------------------------------------------------------------
# requests and responses as values


def _req(i: int, *, paused: bool = True, reason=None) -> abi.Request:
    return abi.make_request(
        abi.Reason.MEM_ACCESS if reason is None else reason,
        vcpu_id=i,
        flags=abi.Flag.VCPU_PAUSED if paused else 0,
        payload={"gfn": 0x1000 + i, "offset": 0x10, "flags": abi.MemAccess.W},
    )


def test_request_bytes_land_at_abi_offsets():
    r = abi.make_request(
        abi.Reason.MEM_ACCESS, 5, flags=abi.Flag.VCPU_PAUSED, altp2m_idx=2,
        payload={"gfn": 0xABCDE, "offset": 0x123, "gla": 0xFFFF8000DEAD0123,
                 "flags": abi.MemAccess.W | abi.MemAccess.GLA_VALID},
        regs={"rip": 0x401000, "cr3": 0x1AB000},
    )
    raw = r.raw
    assert len(raw) == 400
    assert struct.unpack_from("<IIIIH", raw, 0) == (7, 1, 1, 5, 2)
    assert abi.HEADER.unpack_from(raw) == (7, 1, 1, 5, 2)       # what the hot paths read
    assert struct.unpack_from("<QQQI", raw, 24) == (0xABCDE, 0x123, 0xFFFF8000DEAD0123, 0xA)
    # rip is the 20th u64 of the x86 registers, cr3 the 23rd.
    assert struct.unpack_from("<Q", raw, 56 + 19 * 8) == (0x401000,)
    assert struct.unpack_from("<Q", raw, 56 + 22 * 8) == (0x1AB000,)
    back = abi.parse_request(raw)
    assert back == r
    assert back.payload == {"gfn": 0xABCDE, "offset": 0x123,
                            "gla": 0xFFFF8000DEAD0123, "flags": 0xA}
    assert back.regs["rip"] == 0x401000 and back.regs["cs"] == {"limit": 0, "ar": 0}
    assert back.paused and back.reason_name == "MEM_ACCESS"


def test_payload_follows_reason():
    cr = abi.make_request(abi.Reason.WRITE_CTRLREG, 1, payload={
        "index": abi.CtrlReg.CR3, "new_value": 0x2000, "old_value": 0x1000})
    assert cr.payload == {"index": 1, "new_value": 0x2000, "old_value": 0x1000}
    irq = abi.make_request(abi.Reason.INTERRUPT, payload={
        "vector": 14, "type": abi.X86EventType.HW_EXCEPTION, "error_code": 2, "cr2": 0xdead})
    assert irq.payload == {"vector": 14, "type": 3, "error_code": 2, "cr2": 0xdead}
    assert struct.unpack_from("<IIII", irq.raw, 24) == (14, 3, 2, 0)
    desc = abi.make_request(abi.Reason.DESCRIPTOR_ACCESS, payload={
        "arch": {"vmx": {"instr_info": 7, "exit_qualification": 9}},
        "descriptor": abi.Desc.IDTR, "is_write": 1})
    assert desc.payload["arch"]["vmx"] == {"instr_info": 7, "exit_qualification": 9}
    assert desc.raw[24 + 16] == 1 and desc.raw[24 + 17] == 1
    assert abi.make_request(abi.Reason.GUEST_REQUEST).payload == {}
    with pytest.raises(ValueError):
        abi.make_request(abi.Reason.GUEST_REQUEST, payload={"gfn": 1})
    with pytest.raises(AttributeError):
        abi.make_request(abi.Reason.CPUID, payload={"no_such_field": 1})
    with pytest.raises(OverflowError):
        abi.make_request(abi.Reason.CPUID, payload={"leaf": 1 << 32})


def test_response_echoes_what_unpauses_the_vcpu():
    req = abi.make_request(abi.Reason.MOV_TO_MSR, 3, flags=abi.Flag.VCPU_PAUSED
                           | abi.Flag.ALTERNATE_P2M, altp2m_idx=4,
                           payload={"msr": 0xC0000082, "new_value": 1, "old_value": 2})
    rsp = abi.make_response(req, flags=abi.Flag.DENY)
    assert (rsp.version, rsp.vcpu_id, rsp.reason) == (7, 3, abi.Reason.MOV_TO_MSR)
    assert rsp.flags == abi.Flag.VCPU_PAUSED | abi.Flag.DENY  # ALTERNATE_P2M not echoed
    assert rsp.altp2m_idx == 0
    # An asynchronous event (not paused) must not get the paused flag.
    unpaused = abi.make_response(_req(1, paused=False))
    assert unpaused.flags == 0
    # From raw bytes too.
    assert abi.make_response(req.raw).flags == abi.Flag.VCPU_PAUSED


def test_response_data_sets_its_flag():
    req = abi.make_request(abi.Reason.MEM_ACCESS, 0, flags=abi.Flag.VCPU_PAUSED,
                           regs={"rax": 1, "rip": 0x1000, "rsp": 0x8000})
    r = abi.make_response(req, emul_read=b"\x90\x90\x90")
    assert r.flags == abi.Flag.VCPU_PAUSED | abi.Flag.EMULATE | abi.Flag.SET_EMUL_READ_DATA
    assert struct.unpack_from("<I", r.raw, 56) == (3,)
    assert r.raw[60:63] == b"\x90\x90\x90" and r.raw[63:400] == bytes(337)
    with pytest.raises(ValueError):
        abi.make_response(req, emul_read=bytes(341))
    r = abi.make_response(req, emul_insn=bytes(range(16)))
    assert r.flags & abi.Flag.SET_EMUL_INSN_DATA and r.raw[56:72] == bytes(range(16))
    with pytest.raises(ValueError):
        abi.make_response(req, emul_insn=bytes(15))
    r = abi.make_response(req, regs={"rip": 0x1002})
    assert r.flags == abi.Flag.VCPU_PAUSED | abi.Flag.SET_REGISTERS
    assert (r.regs["rax"], r.regs["rip"], r.regs["rsp"]) == (1, 0x1002, 0x8000)
    r = abi.make_response(req, altp2m_idx=3)
    assert r.flags & abi.Flag.ALTERNATE_P2M and r.altp2m_idx == 3
    r = abi.make_response(req, fast_singlestep_p2midx=2, altp2m_idx=1)
    assert r.flags & abi.Flag.FAST_SINGLESTEP and r.get("u.fast_singlestep.p2midx") == 2
    assert struct.unpack_from("<H", r.raw, 24) == (2,)


def test_event_size_is_checked():
    with pytest.raises(ValueError):
        abi.parse_request(bytes(399))
    with pytest.raises(ValueError):
        abi.Ring().put_request(bytes(401))


# ---------------------------------------------------------------------------
# (b) the ring protocol


def test_fill_to_eight_and_ninth_is_refused():
    ring = abi.Ring()
    assert ring.slots == 8 and ring.free_requests == 8
    for i in range(8):
        assert ring.put_request(_req(i))
        assert ring.free_requests == 7 - i
    before = [ring.slot_bytes(i) for i in range(8)]
    assert not ring.put_request(_req(8))
    assert ring.put_requests([_req(8), _req(9)]) == 0
    assert ring.indices["req_prod"] == 8
    assert [ring.slot_bytes(i) for i in range(8)] == before
    # Taking requests does not free slots: only consumed responses do.
    taken = ring.take_requests()
    assert [r.vcpu_id for r in taken] == list(range(8))
    assert [r.payload["gfn"] for r in taken] == [0x1000 + i for i in range(8)]
    assert ring.free_requests == 0 and not ring.put_request(_req(8))
    assert ring.put_responses(abi.make_response(r) for r in taken) == 8
    assert ring.free_requests == 0  # written, not yet published
    ring.push_responses()
    assert ring.free_requests == 0  # published, not yet consumed by Xen
    assert len(ring.take_responses(3)) == 3
    assert ring.free_requests == 3
    assert ring.put_request(_req(8))


def test_requests_invisible_until_pushed():
    ring = abi.Ring()
    assert ring.put_requests([_req(0), _req(1), _req(2)]) == 3
    assert ring.unconsumed_requests == 0 and ring.take_requests() == []
    ring.push_requests()
    assert ring.unconsumed_requests == 3


def test_responses_come_back_in_order():
    ring = abi.Ring()
    reqs = [_req(i) for i in range(6)]
    assert ring.put_requests(reqs) == 6
    ring.push_requests()
    first = ring.take_requests(2)
    rest = ring.take_requests()
    assert [r.vcpu_id for r in first + rest] == list(range(6))
    # Answer in two batches; mark each response with its request's gfn.
    rsps = [abi.make_response(r, fields={"u.fast_singlestep.p2midx": r.payload["gfn"] & 0xFFFF})
            for r in first + rest]
    ring.put_responses(rsps[:4])
    assert ring.unconsumed_responses == 0
    ring.push_responses()
    assert ring.unconsumed_responses == 4
    ring.put_responses(rsps[4:])
    ring.push_responses()
    got = ring.take_responses()
    assert [g.vcpu_id for g in got] == list(range(6))
    assert [g.get("u.fast_singlestep.p2midx") for g in got] == [0x1000 + i for i in range(6)]
    assert all(g.paused for g in got)
    assert ring.take_responses() == []


def test_no_more_responses_than_requests_taken():
    ring = abi.Ring()
    ring.put_requests([_req(i) for i in range(5)])
    ring.push_requests()
    taken = ring.take_requests(3)
    assert ring.pending_responses == 3
    rsps = [abi.make_response(r) for r in taken]
    with pytest.raises(abi.RingError):
        ring.put_responses(rsps + [abi.make_response(_req(9))])
    assert ring.pending_responses == 3 and ring.indices["rsp_prod"] == 0
    # A response slot past req_cons still holds an unread request: intact.
    assert abi.parse_request(ring.slot_bytes(3)).vcpu_id == 3
    ring.put_responses(rsps)
    ring.push_responses()
    assert ring.pending_responses == 0
    assert abi.parse_request(ring.slot_bytes(3)).vcpu_id == 3


def test_slot_index_wraps():
    ring = abi.Ring()
    sent = 0
    received = []
    for batch in (5, 3, 8, 7, 1, 8, 6):  # 38 events, wrapping 4 times
        reqs = [_req(sent + i) for i in range(batch)]
        assert ring.put_requests(reqs) == batch
        ring.push_requests()
        # The newest request sits at slot index % 8.
        last = sent + batch - 1
        assert abi.parse_request(ring.slot_bytes(last % 8)).vcpu_id == last
        sent += batch
        taken = ring.take_requests()
        assert [t.vcpu_id for t in taken] == [r.vcpu_id for r in reqs]
        ring.put_responses(abi.make_response(t) for t in taken)
        ring.push_responses()
        received += [r.vcpu_id for r in ring.take_responses()]
        assert ring.free_requests == 8
    assert received == list(range(sent))
    assert ring.indices["req_prod"] == ring.indices["rsp_prod"] == sent == 38


def test_consumer_bounds_a_lying_producer():
    page = bytearray(4096)
    ring = abi.Ring(page)
    ring.put_requests([_req(i) for i in range(2)])
    ring.push_requests()
    struct.pack_into("<I", page, 0, 1000)  # req_prod claims 1000 requests
    assert ring.unconsumed_requests == 8
    assert len(ring.take_requests()) == 8
    assert ring.take_requests() == []  # all 8 slots await answers


def test_xen_side_takes_every_published_response_as_xen_does():
    # XEN_RING_NR_UNCONSUMED_RESPONSES is rsp_prod - rsp_cons, with no bound by the requests made:
    # Xen takes answers to nothing (what a recovering agent's bare unpause responses rely on).
    page = bytearray(4096)
    ring = abi.Ring(page)
    ring.put_request(_req(0))
    struct.pack_into("<I", page, 8, 3)   # rsp_prod claims 3 responses
    assert ring.unconsumed_responses == 3
    assert len(ring.take_responses()) == 3


def test_unsolicited_responses_need_a_quiet_ring():
    ring = abi.Ring()
    ring.put_request(_req(0))
    with pytest.raises(abi.RingError, match="quiet ring"):
        ring.put_unsolicited_responses([bytes(400)])
    ring.take_requests()
    with pytest.raises(abi.RingError, match="quiet ring"):
        ring.put_unsolicited_responses([bytes(400)])
    ring.put_responses([bytes(400)])
    with pytest.raises(abi.RingError, match="slots"):
        ring.put_unsolicited_responses([bytes(400)] * (ring.slots + 1))
    assert ring.put_unsolicited_responses([bytes(400)] * 2) == 2
    ring.push_responses()
    assert ring.unconsumed_responses == 3


def test_notify_checks_follow_the_event_indices():
    ring = abi.Ring()
    assert ring.indices == {"req_prod": 0, "req_event": 1, "rsp_prod": 0, "rsp_event": 1}
    ring.put_requests([_req(0)])
    assert ring.push_requests() is True  # crossed req_event = 1
    ring.put_requests([_req(1)])
    assert ring.push_requests() is False  # req_event still 1: no new wakeup
    ring.take_requests()
    assert ring.indices["req_event"] == 3
    assert ring.final_check_for_requests() is False
    ring.put_requests([_req(2)])
    assert ring.push_requests() is True
    assert ring.final_check_for_requests() is True  # one is waiting

    taken = ring.take_requests()
    assert len(taken) == 1
    ring.put_responses([abi.make_response(_req(0))])
    assert ring.push_responses() is True  # crossed rsp_event = 1
    ring.put_responses([abi.make_response(_req(1))])
    assert ring.push_responses() is False
    ring.take_responses()
    assert ring.indices["rsp_event"] == 3
    ring.put_responses([abi.make_response(_req(2))])
    assert ring.push_responses() is True


def test_ring_buffers():
    with pytest.raises(ValueError):
        abi.Ring(bytearray(4095))
    with pytest.raises(ValueError):
        abi.Ring(bytes(4096))
    with mmap.mmap(-1, 4096) as page:  # the shape of the real mapped page
        ring = abi.Ring(page)
        ring.put_request(_req(7))
        assert struct.unpack_from("<I", page, 0) == (1,)
        assert struct.unpack_from("<I", page, 64 + 12) == (7,)  # slot 0 vcpu_id
        assert ring.take_requests()[0].vcpu_id == 7
        del ring


def test_two_threads_every_request_answered_once_in_order():
    """Xen's side and the monitor's side on two threads over one page."""
    ring = abi.Ring()
    total = 3000
    deadline = time.monotonic() + 60
    errors: list[str] = []
    answered: list[int] = []

    def monitor():
        done = 0
        while done < total and time.monotonic() < deadline:
            reqs = ring.take_requests()
            if not reqs:
                time.sleep(0)
                continue
            ring.put_responses(abi.make_response(r, flags=abi.Flag.EMULATE) for r in reqs)
            ring.push_responses()
            done += len(reqs)

    t = threading.Thread(target=monitor)
    t.start()
    sent = 0
    while len(answered) < total and time.monotonic() < deadline:
        while sent < total and ring.free_requests:
            ring.put_request(_req(sent))
            sent += 1
        for rsp in ring.take_responses():
            if not (rsp.paused and rsp.flags & abi.Flag.EMULATE):
                errors.append(f"bad flags {rsp.flags}")
            answered.append(rsp.vcpu_id)
        time.sleep(0)
    t.join(timeout=10)
    assert not t.is_alive()
    assert not errors
    assert answered == list(range(total))


def test_floor_loop_round_trips():
    assert abi.floor_loop(0) == 0
    assert abi.floor_loop(1000) == 1000


def test_missing_extension_is_reported(monkeypatch):
    import policyc.native

    abi.extension.cache_clear()
    monkeypatch.setitem(sys.modules, "policyc.native._vm_event", None)
    monkeypatch.delattr(policyc.native, "_vm_event", raising=False)
    try:
        with pytest.raises(abi.ExtensionNotBuilt, match="not built"):
            abi.constants()
    finally:
        monkeypatch.undo()
        abi.extension.cache_clear()
    assert abi.constants()["VM_EVENT_INTERFACE_VERSION"] == 7
