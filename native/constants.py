"""The vm_event ABI's flags, reasons and codes as plain ints: the one set of these names the per-event
paths use (the decision engine, the simulated Xen, install's answers, the Xen backend).

They are `abi.Flag`, `abi.Reason`, `abi.MemAccess`, `abi.CtrlReg`, `abi.Desc` and `abi.X86EventType`
(which stay the API everywhere else) without the enum: an IntFlag operand turns every `flags & F_X`
on an event into an enum operation. Importing this module loads the compiled extension.
"""

from __future__ import annotations

from . import abi

__all__ = [
    "VERSION", "EVENT_SIZE", "OFF_U", "OFF_DATA", "FLAG_BITS",
    "F_PAUSED", "F_EMULATE", "F_NOWRITE", "F_TOGGLE_SS", "F_READ_DATA", "F_DENY", "F_ALTP2M", "F_SET_REGS",
    "F_INSN_DATA", "F_FAST_SS",
    "RS_MEM_ACCESS", "RS_WRITE_CTRLREG", "RS_MOV_TO_MSR", "RS_SOFTWARE_BREAKPOINT", "RS_SINGLESTEP",
    "RS_GUEST_REQUEST", "RS_DEBUG_EXCEPTION", "RS_CPUID", "RS_PRIVILEGED_CALL", "RS_DESCRIPTOR_ACCESS",
    "MA_R", "MA_W", "MA_X", "MA_GLA_VALID", "MA_WITH_GLA", "MA_IN_GPT",
    "CR_INDEX", "DESC_INDEX", "ET_SW_EXC", "ET_PRI_SW_EXC", "ET_HW_EXC",
]

VERSION = int(abi.VERSION)
EVENT_SIZE = int(abi.EVENT_SIZE)
OFF_U, OFF_DATA = 24, 56                    # a request's u and data (XEN-FACTS); abi's layout checks them

_F = abi.Flag
F_PAUSED = int(_F.VCPU_PAUSED)
F_EMULATE = int(_F.EMULATE)
F_NOWRITE = int(_F.EMULATE_NOWRITE)
F_TOGGLE_SS = int(_F.TOGGLE_SINGLESTEP)
F_READ_DATA = int(_F.SET_EMUL_READ_DATA)
F_DENY = int(_F.DENY)
F_ALTP2M = int(_F.ALTERNATE_P2M)
F_SET_REGS = int(_F.SET_REGISTERS)
F_INSN_DATA = int(_F.SET_EMUL_INSN_DATA)
F_FAST_SS = int(_F.FAST_SINGLESTEP)
# Every flag by its name without VM_EVENT_FLAG_, alphabetically (the order decision records name them in).
FLAG_BITS = {name[len("VM_EVENT_FLAG_"):]: value for name, value in abi.constants().items()
             if name.startswith("VM_EVENT_FLAG_")}

_R = abi.Reason
RS_MEM_ACCESS = int(_R.MEM_ACCESS)
RS_WRITE_CTRLREG = int(_R.WRITE_CTRLREG)
RS_MOV_TO_MSR = int(_R.MOV_TO_MSR)
RS_SOFTWARE_BREAKPOINT = int(_R.SOFTWARE_BREAKPOINT)
RS_SINGLESTEP = int(_R.SINGLESTEP)
RS_GUEST_REQUEST = int(_R.GUEST_REQUEST)
RS_DEBUG_EXCEPTION = int(_R.DEBUG_EXCEPTION)
RS_CPUID = int(_R.CPUID)
RS_PRIVILEGED_CALL = int(_R.PRIVILEGED_CALL)
RS_DESCRIPTOR_ACCESS = int(_R.DESCRIPTOR_ACCESS)

_M = abi.MemAccess
MA_R, MA_W, MA_X = int(_M.R), int(_M.W), int(_M.X)
MA_GLA_VALID = int(_M.GLA_VALID)
MA_WITH_GLA = int(_M.FAULT_WITH_GLA)
MA_IN_GPT = int(_M.FAULT_IN_GPT)

CR_INDEX = {"cr0": int(abi.CtrlReg.CR0), "cr3": int(abi.CtrlReg.CR3), "cr4": int(abi.CtrlReg.CR4),
            "xcr0": int(abi.CtrlReg.XCR0)}
DESC_INDEX = {"idtr": int(abi.Desc.IDTR), "gdtr": int(abi.Desc.GDTR), "ldtr": int(abi.Desc.LDTR),
              "tr": int(abi.Desc.TR)}
ET_SW_EXC = int(abi.X86EventType.SW_EXCEPTION)
ET_PRI_SW_EXC = int(abi.X86EventType.PRI_SW_EXCEPTION)
ET_HW_EXC = int(abi.X86EventType.HW_EXCEPTION)
