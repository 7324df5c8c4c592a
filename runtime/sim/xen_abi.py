"""The vm_event ABI as the simulated Xen packs and reads it (its constants are `policyc.native.constants`):
the `struct` layouts of a request's header, ``u`` and registers, proved against the cffi layout at import.
"""

from __future__ import annotations

import operator
import struct

from ...native import abi
from ...native.constants import (F_ALTP2M, F_PAUSED, MA_R, MA_W, RS_MEM_ACCESS, RS_PRIVILEGED_CALL,
                                 VERSION)
from .guest import GPRS

OFF_REGS_RIP = 56 + 19 * 8
OFF_EMUL_READ = 60

HDR = struct.Struct("<IIIIH")                 # version flags reason vcpu_id altp2m_idx
HDR24 = struct.Struct("<IIIIH6x")
# data.regs.x86: 33 u64, 4 u32 segment bases, fs/gs base, 6 selector regs (limit:20 ar:12),
# shadow_gs, gdtr_limit + 6 selectors + pad.
REGS_X86 = struct.Struct("<33Q4I2Q6IQ8H")
REGS_ARM = struct.Struct("<5Q")
GPRS_IN = struct.Struct("<18Q")               # rax..r15, rflags, dr6  (response side)
U_MEM = struct.Struct("<QQQI4x")
U_CR = struct.Struct("<I4xQQ")
U_MSR = struct.Struct("<QQQ")
U_DEBUG = struct.Struct("<QQIB3x")
U_SS = struct.Struct("<Q")
U_CPUID = struct.Struct("<IIII")
U_DESC = struct.Struct("<I4xQBB6x")
U_PAD = bytes(32)
assert REGS_X86.size == 344 and U_MEM.size == 32
ARM_PAD = bytes(344 - REGS_ARM.size)
MSR_SET1 = (0x174, 0x175, 0x176, 0xC0000080, 0xC0000081, 0xC0000082)
MSR_SET2 = (0xC0000100, 0xC0000101)
MSR_GET1 = operator.itemgetter(*MSR_SET1)
MSR_GET2 = operator.itemgetter(*MSR_SET2)
GPR_GET = operator.itemgetter(*GPRS)
SEL_GET = operator.itemgetter("cs", "ss", "ds", "es", "fs", "gs")


def _check_layout() -> None:
    """The packers must produce the ABI's bytes: compare with abi.make_request."""
    names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rflags", "dr6", "dr7", "rip", "cr0", "cr2", "cr3", "cr4",
             "sysenter_cs", "sysenter_esp", "sysenter_eip", "msr_efer", "msr_star", "msr_lstar",
             "gdtr_base", "npt_base", "vmtrace_pos")
    regs: dict = {name: 0x1000 + i for i, name in enumerate(names)}
    regs.update(cs_base=1, ss_base=2, ds_base=3, es_base=4, fs_base=5, gs_base=6,
                cs={"limit": 0xFFFFF, "ar": 0xA9B}, ss={"limit": 0xFFFFF, "ar": 0xC93},
                shadow_gs=7, gdtr_limit=8, cs_sel=9, ss_sel=10, ds_sel=11, es_sel=12, fs_sel=13,
                gs_sel=14)
    ref = abi.make_request(RS_MEM_ACCESS, 3, flags=F_PAUSED | F_ALTP2M, altp2m_idx=5,
                           payload={"gfn": 0x123, "offset": 0x45, "gla": 0xFFFF888000000000,
                                    "flags": MA_W | MA_R}, regs=regs).raw
    ours = (HDR24.pack(VERSION, F_PAUSED | F_ALTP2M, RS_MEM_ACCESS, 3, 5)
            + U_MEM.pack(0x123, 0x45, 0xFFFF888000000000, MA_W | MA_R)
            + REGS_X86.pack(*(0x1000 + i for i in range(33)), 1, 2, 3, 4, 5, 6, CS_AR, SS_AR,
                             0, 0, 0, 0, 7, 8, 9, 10, 11, 12, 13, 14, 0))
    if ours != ref:
        raise ImportError("policyc.runtime.sim: the request packer disagrees with the vm_event ABI")
    rsp = abi.make_response(abi.parse_request(ref), emul_read=b"abc").raw
    if (struct.unpack_from("<I", rsp, 56)[0], rsp[OFF_EMUL_READ:OFF_EMUL_READ + 3]) != (3, b"abc"):
        raise ImportError("policyc.runtime.sim: data.emul.read is not where expected")
    rsp = abi.make_response(abi.parse_request(ref), fast_singlestep_p2midx=7).raw
    if struct.unpack_from("<H", rsp, 24)[0] != 7:
        raise ImportError("policyc.runtime.sim: u.fast_singlestep is not where expected")
    arm = abi.make_request(RS_PRIVILEGED_CALL, 0, fields={"data.regs.arm.pc": 0x1234}).raw
    if REGS_ARM.unpack_from(arm, 56)[3] != 0x1234:
        raise ImportError("policyc.runtime.sim: data.regs.arm is not where expected")

# Segment attributes as Xen packs them (12-bit attr; limit >> 12 when G).
CS_AR = 0xFFFFF | (0xA9B << 20)      # 64-bit code, DPL0, present, granular
SS_AR = 0xFFFFF | (0xC93 << 20)

_check_layout()
