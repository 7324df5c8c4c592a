"""What the language knows about each architecture: registers, named bits, MSRs, event fields.

Values come from the architecture manuals as Linux spells them
(arch/x86/include/uapi/asm/processor-flags.h, asm/msr-index.h; Intel SDM
Vol. 3A 2.5, Vol. 4). Some public code gets CR4.SMEP/SMAP wrong (0x200000 is
SMAP, not SMEP); the tests pin these against the kernel's values.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARCHES", "ArchInfo", "CONTROL_REGISTERS", "DESCRIPTOR_REGISTERS", "EVENT_FIELDS", "EXCEPTION_VECTORS",
    "RESERVED_REGION_NAMES", "SEVERITIES", "TRIGGER_KINDS", "arch_info",
]

SEVERITIES = ("info", "low", "medium", "high", "critical")

# The vm_event reason each trigger kind lowers to.
TRIGGER_KINDS = {
    "memory": "MEM_ACCESS",
    "breakpoint": "SOFTWARE_BREAKPOINT",
    "control_register": "WRITE_CTRLREG",
    "msr": "MOV_TO_MSR",
    "descriptor": "DESCRIPTOR_ACCESS",
    "cpuid": "CPUID",
    "guest_request": "GUEST_REQUEST",
    "debug_exception": "DEBUG_EXCEPTION",
    "smc": "PRIVILEGED_CALL",
}

CONTROL_REGISTERS = ("cr0", "cr3", "cr4", "xcr0")
DESCRIPTOR_REGISTERS = ("idtr", "gdtr", "ldtr", "tr")
RESERVED_REGION_NAMES = frozenset(CONTROL_REGISTERS + DESCRIPTOR_REGISTERS)

# x86 exception vectors a denied execute may inject.
EXCEPTION_VECTORS = {"#DE": 0, "#DB": 1, "#BP": 3, "#OF": 4, "#BR": 5, "#UD": 6, "#NM": 7, "#DF": 8,
                     "#TS": 10, "#NP": 11, "#SS": 12, "#GP": 13, "#PF": 14, "#MF": 16, "#AC": 17,
                     "#MC": 18, "#XM": 19, "#VE": 20, "#CP": 21}

_CR0 = {"PE": 0, "MP": 1, "EM": 2, "TS": 3, "ET": 4, "NE": 5, "WP": 16, "AM": 18, "NW": 29, "CD": 30, "PG": 31}
_CR4 = {"VME": 0, "PVI": 1, "TSD": 2, "DE": 3, "PSE": 4, "PAE": 5, "MCE": 6, "PGE": 7, "PCE": 8,
        "OSFXSR": 9, "OSXMMEXCPT": 10, "UMIP": 11, "LA57": 12, "VMXE": 13, "SMXE": 14, "FSGSBASE": 16,
        "PCIDE": 17, "OSXSAVE": 18, "KL": 19, "SMEP": 20, "SMAP": 21, "PKE": 22, "CET": 23, "PKS": 24,
        "UINTR": 25, "LAM_SUP": 28, "FRED": 32}
_XCR0 = {"X87": 0, "SSE": 1, "AVX": 2, "BNDREGS": 3, "BNDCSR": 4, "OPMASK": 5, "ZMM_HI256": 6,
         "HI16_ZMM": 7, "PKRU": 9, "CET_U": 11, "CET_S": 12, "AMX_TILECFG": 17, "AMX_TILEDATA": 18}
_EFER = {"SCE": 0, "LME": 8, "LMA": 10, "NXE": 11, "SVME": 12, "LMSLE": 13, "FFXSR": 14, "TCE": 15}
_ACCESS = {"R": 0, "W": 1, "X": 2}


def _bits(table: dict[str, int]) -> dict[str, int]:
    return {name: 1 << bit for name, bit in table.items()}


# MSR indices (asm/msr-index.h).
_X86_MSRS = {
    "EFER": 0xC0000080, "STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083, "SFMASK": 0xC0000084,
    "FS_BASE": 0xC0000100, "GS_BASE": 0xC0000101, "KERNEL_GS_BASE": 0xC0000102, "TSC_AUX": 0xC0000103,
    "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175, "SYSENTER_EIP": 0x176,
    "APIC_BASE": 0x1B, "FEATURE_CONTROL": 0x3A, "SPEC_CTRL": 0x48, "PRED_CMD": 0x49,
    "MISC_ENABLE": 0x1A0, "DEBUGCTL": 0x1D9, "PAT": 0x277, "U_CET": 0x6A0, "S_CET": 0x6A2,
    "PL0_SSP": 0x6A4, "PL1_SSP": 0x6A5, "PL2_SSP": 0x6A6, "PL3_SSP": 0x6A7, "INTERRUPT_SSP_TABLE_ADDR": 0x6A8,
    "XSS": 0xDA0, "PKRS": 0x6E1, "TSC_DEADLINE": 0x6E0, "MCG_CTL": 0x17B,
}
_MSR_BITS = {"EFER": _bits(_EFER)}

_X86_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
# Exactly what Xen's vm_event request carries (struct vm_event_regs_x86 / _arm, interface 7):
# a condition on anything else could never be evaluated. arm64 requests carry no general
# registers at all.
_X86_SYSTEM = ("cr0", "cr2", "cr3", "cr4", "dr6", "dr7", "msr_efer", "msr_star", "msr_lstar",
               "sysenter_cs", "sysenter_esp", "sysenter_eip", "gdtr_base", "gdtr_limit", "fs_base", "gs_base",
               "shadow_gs", "cs_base", "ss_base", "ds_base", "es_base", "cs_sel", "ss_sel", "ds_sel", "es_sel",
               "fs_sel", "gs_sel")
_ARM64_REGS = ("pc", "ttbr0", "ttbr1", "ttbcr", "cpsr")

# Event fields by trigger kind. Registers are available on every kind (Xen
# puts the vCPU's registers in each request); these are the extra fields.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "memory": ("gla", "gfn", "offset", "access", "vcpu"),
    "breakpoint": ("gla", "gfn", "vcpu", "insn_length"),
    "control_register": ("new", "old", "vcpu"),
    "msr": ("msr", "new", "old", "vcpu"),
    "descriptor": ("descriptor", "is_write", "vcpu"),
    "cpuid": ("leaf", "subleaf", "insn_length", "vcpu"),
    "guest_request": ("vcpu",),
    "debug_exception": ("gfn", "pending_dbg", "insn_length", "vcpu"),
    "smc": ("vcpu",),
}


@dataclass(frozen=True)
class ArchInfo:
    name: str
    registers: tuple[str, ...]
    named_bits: dict[str, dict[str, int]]  # "cr0" -> {"WP": 0x10000}
    msrs: dict[str, int]
    msr_bits: dict[str, dict[str, int]]
    triggers: frozenset[str]  # trigger kinds this architecture has at all
    pointer_register: str  # the instruction pointer's name

    def msr_name(self, index: int) -> str | None:
        for name, value in self.msrs.items():
            if value == index:
                return name
        return None


_X86 = dict(
    registers=_X86_GPRS + _X86_SYSTEM,
    named_bits={"cr0": _bits(_CR0), "cr4": _bits(_CR4), "xcr0": _bits(_XCR0), "access": _bits(_ACCESS),
                **{name: bits for name, bits in _MSR_BITS.items()}},
    msrs=_X86_MSRS,
    msr_bits=_MSR_BITS,
    triggers=frozenset({"memory", "breakpoint", "control_register", "msr", "descriptor", "cpuid",
                        "guest_request", "debug_exception"}),
    pointer_register="rip",
)

ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo("x86_64", **_X86),
    "x86_64-nomtf": ArchInfo("x86_64-nomtf", **_X86),
    "x86_64-svm": ArchInfo("x86_64-svm", **_X86),
    "arm64": ArchInfo(
        "arm64", registers=_ARM64_REGS, named_bits={"access": _bits(_ACCESS)}, msrs={}, msr_bits={},
        triggers=frozenset({"memory", "breakpoint", "guest_request", "smc"}), pointer_register="pc"),
}


def arch_info(name: str) -> ArchInfo | None:
    return ARCHES.get(name)
