"""A vm_event request's and response's bytes as the runtime reads and writes them: offsets and
`struct` layouts of the header, ``u`` and registers, the register names in ABI order, the event
fields a decision record keeps, flag names, and the response packers (`pack_response`, checked at
import against `policyc.native.abi.make_response`; `echo_response`, the minimal answer).
"""

from __future__ import annotations

import functools
import struct

from ..native import abi
from ..native.constants import (EVENT_SIZE, F_ALTP2M, F_EMULATE, F_FAST_SS, F_INSN_DATA, F_PAUSED, F_READ_DATA,
                                F_SET_REGS, FLAG_BITS, MA_R, MA_W, RS_MEM_ACCESS)

__all__ = ["EVENT_SUMMARY", "X86_NAMES", "ARM_NAMES", "FLAG_FOR_DATA", "flag_names", "pack_response", "bare_response",
           "echo_response"]

U64 = (1 << 64) - 1
OFF_U, OFF_DATA = 24, 56
HDR = struct.Struct("<IIIIH")                   # version flags reason vcpu_id altp2m_idx
HDR_OUT = struct.Struct("<IIIIH6x")
U_MEM = struct.Struct("<QQQI")                  # gfn offset gla flags
U_CR = struct.Struct("<I4xQQ")                  # index new old
U_MSR = struct.Struct("<QQQ")                   # msr new old
U_DEBUG = struct.Struct("<QQIB")                # gfn pending_dbg insn_length type
U_CPUID = struct.Struct("<III")                 # insn_length leaf subleaf
U_DESC = struct.Struct("<I4xQBB")               # instr_info exit_qualification descriptor is_write
Q = struct.Struct("<Q")
H = struct.Struct("<H")
I = struct.Struct("<I")
REGS_X86 = struct.Struct("<33Q4I2Q6IQ8H")
REGS_ARM = struct.Struct("<5Q")
X86_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
             "r13", "r14", "r15", "rflags", "dr6", "dr7", "rip", "cr0", "cr2", "cr3", "cr4",
             "sysenter_cs", "sysenter_esp", "sysenter_eip", "msr_efer", "msr_star", "msr_lstar",
             "gdtr_base", "npt_base", "vmtrace_pos", "cs_base", "ss_base", "ds_base", "es_base",
             "fs_base", "gs_base", "_cs", "_ss", "_ds", "_es", "_fs", "_gs", "shadow_gs", "gdtr_limit",
             "cs_sel", "ss_sel", "ds_sel", "es_sel", "fs_sel", "gs_sel", "_pad")
ARM_NAMES = ("ttbr0", "ttbr1", "ttbcr", "pc", "cpsr")
OFF_RIP = OFF_DATA + 19 * 8
OFF_CR3 = OFF_DATA + 22 * 8
OFF_PC = OFF_DATA + 3 * 8
REGS_PAD = OFF_DATA + REGS_X86.size - 2       # data.regs.x86._pad (make_response leaves it 0)
DATA_SIZE = EVENT_SIZE - OFF_DATA
ZERO_DATA = bytes(DATA_SIZE)
ZERO_READ = bytes(8)

# The event fields a decision record keeps, per kind (besides vcpu, rip/pc and cr3).
EVENT_SUMMARY: dict[str, tuple[str, ...]] = {
    "mem_access": ("access", "gfn", "offset", "gla", "gla_valid", "in_gpt"),
    "write_ctrlreg": ("register", "new", "old"),
    "mov_to_msr": ("msr", "new", "old"),
    "software_breakpoint": ("gfn", "insn_length"),
    "debug_exception": ("gfn", "pending_dbg", "insn_length"),
    "cpuid": ("leaf", "subleaf", "insn_length"),
    "descriptor_access": ("descriptor", "is_write"),
    "singlestep": ("gfn",),
    "guest_request": (),
    "privileged_call": (),
    "unknown": (),
}

# Flags whose response carries data (or a view index) of its own: never copied from a plain response.
FLAG_FOR_DATA = F_ALTP2M | F_FAST_SS | F_READ_DATA | F_INSN_DATA | F_SET_REGS


_FLAGS_BY_BIT = tuple(sorted(FLAG_BITS.items(), key=lambda kv: kv[1]))


@functools.lru_cache(maxsize=256)
def _flag_names(flags: int) -> tuple[str, ...]:
    return tuple(name for name, bit in _FLAGS_BY_BIT if flags & bit)


def flag_names(flags: int) -> list[str]:
    """VM_EVENT_FLAG_* names set in `flags`, low bit first."""
    return list(_flag_names(flags))


def pack_response(raw: bytes, flags: int, *, altp2m_idx: int | None = None, p2midx: int | None = None,
                  read_data: bytes | None = None, insn_data: bytes | None = None,
                  rip: int | None = None, pc: int | None = None) -> bytes:
    """The response to request `raw`, byte for byte what `abi.make_response` builds: version,
    reason, vcpu_id and the VCPU_PAUSED flag echoed, the `u` union copied (Xen reads
    u.mem_access and u.write_ctrlreg back), plus the given flags and data."""
    req_flags = I.unpack_from(raw, 4)[0]
    out_flags = (req_flags & F_PAUSED) | flags
    idx = 0
    if altp2m_idx is not None:
        out_flags |= F_ALTP2M
        idx = altp2m_idx
    u = raw[OFF_U:OFF_DATA]
    if p2midx is not None:
        out_flags |= F_FAST_SS
        u = H.pack(p2midx) + u[2:]
    if read_data is not None:
        out_flags |= F_EMULATE | F_READ_DATA
        data = I.pack(len(read_data)) + read_data
        data += bytes(DATA_SIZE - len(data))
    elif insn_data is not None:
        out_flags |= F_EMULATE | F_INSN_DATA
        data = insn_data + bytes(DATA_SIZE - len(insn_data))
    elif rip is not None:
        out_flags |= F_SET_REGS
        data = raw[OFF_DATA:OFF_RIP] + Q.pack(rip & U64) + raw[OFF_RIP + 8:REGS_PAD] + b"\0\0"
    elif pc is not None:
        out_flags |= F_SET_REGS
        data = (raw[OFF_DATA:OFF_PC] + Q.pack(pc & U64) + raw[OFF_PC + 8:OFF_DATA + REGS_ARM.size])
        data += bytes(DATA_SIZE - len(data))
    else:
        data = ZERO_DATA
    version, _f, reason, vcpu = struct.unpack_from("<IIII", raw, 0)
    return HDR_OUT.pack(version, out_flags, reason, vcpu, idx) + u + data


def bare_response(raw: bytes) -> bytes:
    """A bare response: the header, paused flag and union echoed, nothing else (never fails)."""
    raw = bytes(raw[:EVENT_SIZE]).ljust(EVENT_SIZE, b"\0")
    return pack_response(raw, 0)


def echo_response(request: bytes, flags: int = 0) -> bytes:
    """The response xen-access builds: the request's header and ``u`` copied (version, flags &
    VCPU_PAUSED, reason, vcpu_id, and u.mem_access / u.write_ctrlreg that EMULATE and DENY read back
    [doc §0.2]), altp2m_idx cleared, plus ``flags``."""
    out = bytearray(EVENT_SIZE)
    out[:OFF_DATA] = request[:OFF_DATA]
    req_flags = int.from_bytes(request[4:8], "little")
    struct.pack_into("<I", out, 4, (req_flags & F_PAUSED) | flags)
    struct.pack_into("<H", out, 16, 0)
    return bytes(out)


def _check_packer() -> None:
    """The packer must agree with the ABI module (as the simulator checks its own)."""
    regs = {name: 0x1000 + i for i, name in enumerate(X86_NAMES[:33])}
    regs.update(cs={"limit": 0xFFFFF, "ar": 0xA9B}, ss={"limit": 0xFFFFF, "ar": 0xC93}, gs_sel=7)
    req = abi.make_request(RS_MEM_ACCESS, 2, flags=F_PAUSED | F_ALTP2M, altp2m_idx=3,
                           payload={"gfn": 0x1234, "offset": 0x88, "gla": 0xFFFF888000001088, "flags": MA_W | MA_R},
                           regs=regs)
    cases = [
        (pack_response(req.raw, 0, altp2m_idx=1, p2midx=3),
         abi.make_response(req, altp2m_idx=1, fast_singlestep_p2midx=3)),
        (pack_response(req.raw, F_EMULATE | FLAG_BITS["EMULATE_NOWRITE"]),
         abi.make_response(req, flags=F_EMULATE | FLAG_BITS["EMULATE_NOWRITE"])),
        (pack_response(req.raw, 0, read_data=b"\1\2\3"), abi.make_response(req, emul_read=b"\1\2\3")),
        (pack_response(req.raw, 0, rip=0x4242), abi.make_response(req, regs={"rip": 0x4242})),
        (pack_response(req.raw, 0, insn_data=bytes(range(16))), abi.make_response(req, emul_insn=bytes(range(16)))),
    ]
    for ours, ref in cases:
        if ours != ref.raw:
            raise ImportError("policyc.runtime.vm_event_layout: the response packer disagrees with the vm_event ABI")


_check_packer()
