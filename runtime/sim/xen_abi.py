"""The vm_event ABI as the simulated Xen packs and reads it: constants by their C names, and the
`struct` layouts of a request's header, ``u`` and registers, proved against the cffi layout at import.
"""

from __future__ import annotations

import operator
import struct

from ...native import abi
from .guest import GPRS

_C = abi.constants()          # the header's constants by C name (no cffi objects here)

VERSION = _C["VM_EVENT_INTERFACE_VERSION"]
F_PAUSED = _C["VM_EVENT_FLAG_VCPU_PAUSED"]
F_EMULATE = _C["VM_EVENT_FLAG_EMULATE"]
F_NOWRITE = _C["VM_EVENT_FLAG_EMULATE_NOWRITE"]
F_TOGGLE_SS = _C["VM_EVENT_FLAG_TOGGLE_SINGLESTEP"]
F_READ_DATA = _C["VM_EVENT_FLAG_SET_EMUL_READ_DATA"]
F_DENY = _C["VM_EVENT_FLAG_DENY"]
F_ALTP2M = _C["VM_EVENT_FLAG_ALTERNATE_P2M"]
F_SET_REGS = _C["VM_EVENT_FLAG_SET_REGISTERS"]
F_INSN_DATA = _C["VM_EVENT_FLAG_SET_EMUL_INSN_DATA"]
F_FAST_SS = _C["VM_EVENT_FLAG_FAST_SINGLESTEP"]

RS_MEM_ACCESS = _C["VM_EVENT_REASON_MEM_ACCESS"]
RS_CTRLREG = _C["VM_EVENT_REASON_WRITE_CTRLREG"]
RS_MSR = _C["VM_EVENT_REASON_MOV_TO_MSR"]
RS_SWBP = _C["VM_EVENT_REASON_SOFTWARE_BREAKPOINT"]
RS_SINGLESTEP = _C["VM_EVENT_REASON_SINGLESTEP"]
RS_GUEST_REQUEST = _C["VM_EVENT_REASON_GUEST_REQUEST"]
RS_DEBUG = _C["VM_EVENT_REASON_DEBUG_EXCEPTION"]
RS_CPUID = _C["VM_EVENT_REASON_CPUID"]
RS_PRIVCALL = _C["VM_EVENT_REASON_PRIVILEGED_CALL"]
RS_DESC = _C["VM_EVENT_REASON_DESCRIPTOR_ACCESS"]

MA_R, MA_W, MA_X = _C["MEM_ACCESS_R"], _C["MEM_ACCESS_W"], _C["MEM_ACCESS_X"]
MA_GLA_VALID = _C["MEM_ACCESS_GLA_VALID"]
MA_WITH_GLA = _C["MEM_ACCESS_FAULT_WITH_GLA"]
MA_IN_GPT = _C["MEM_ACCESS_FAULT_IN_GPT"]

CR_INDEX = {"cr0": _C["VM_EVENT_X86_CR0"], "cr3": _C["VM_EVENT_X86_CR3"],
            "cr4": _C["VM_EVENT_X86_CR4"], "xcr0": _C["VM_EVENT_X86_XCR0"]}
CR_NAME = {v: k for k, v in CR_INDEX.items()}

ET_PRI_SW_EXC = _C["X86_EVENTTYPE_PRI_SW_EXCEPTION"]
ET_SW_EXC = _C["X86_EVENTTYPE_SW_EXCEPTION"]

EVENT_SIZE = abi.EVENT_SIZE
FLAGS_AT = 4                                    # the header's flags field
OFF_U, OFF_DATA = 24, 56                      # u and data (XEN-FACTS); _check_layout proves it
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
    arm = abi.make_request(RS_PRIVCALL, 0, fields={"data.regs.arm.pc": 0x1234}).raw
    if REGS_ARM.unpack_from(arm, 56)[3] != 0x1234:
        raise ImportError("policyc.runtime.sim: data.regs.arm is not where expected")

# Segment attributes as Xen packs them (12-bit attr; limit >> 12 when G).
CS_AR = 0xFFFFF | (0xA9B << 20)      # 64-bit code, DPL0, present, granular
SS_AR = 0xFFFFF | (0xC93 << 20)

_check_layout()
