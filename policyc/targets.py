"""Targets: what each kind of Xen host can enforce (XEN-FACTS.md, docs/XEN-SEMANTICS.md).

A target is a set of capabilities. The lowering asks for capabilities by
name; a missing one is an error naming the rule, the target and what would
work instead, and a weak one (it works, but with a gap a user must know
about) is a warning that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CAPABILITIES", "TARGETS", "TargetInfo", "access_name", "target_info", "runs_on"]

# Every capability the lowering may ask for, with the words used in diagnostics.
CAPABILITIES: dict[str, str] = {
    "mem_access": "EPT/stage-2 access permissions (mem_access)",
    "altp2m": "alternate p2m views (altp2m)",
    "singlestep": "single-stepping (monitor trap flag)",
    "fast_singlestep": "fast single-step with a view switch",
    "emulate": "emulating the faulting instruction (EMULATE)",
    "emulate_nowrite": "emulating without the write (EMULATE_NOWRITE)",
    "emul_read_data": "feeding data to an emulated read (SET_EMUL_READ_DATA)",
    "emulate_insn": "emulating given instruction bytes (SET_EMUL_INSN_DATA)",
    "set_registers": "setting registers in the response (SET_REGISTERS)",
    "deny_cr": "refusing a CR0/CR3/CR4 write (DENY)",
    "deny_msr": "refusing an MSR write (DENY)",
    "write_ctrlreg": "control-register write monitor",
    "mov_to_msr": "MSR write monitor",
    "software_breakpoint": "int3 breakpoint monitor",
    "smc_breakpoint": "SMC injection for breakpoints",
    "descriptor_access": "descriptor-register monitor",
    "cpuid": "CPUID monitor",
    "guest_request": "guest request monitor",
    "debug_exception": "debug exception monitor",
    "privileged_call": "privileged call (SMC) monitor",
    "inject_exception": "injecting an exception into the guest",
    "ve": "#VE delivery into the guest",
}


@dataclass(frozen=True)
class TargetInfo:
    name: str
    description: str
    capabilities: frozenset[str]
    max_views: int  # altp2m views including view 0 (the host p2m); 0 without altp2m
    page_size: int = 4096
    instruction_size: int | None = None  # fixed instruction length (arm64), for skipping a denied access

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


_X86_COMMON = frozenset({"write_ctrlreg", "mov_to_msr", "software_breakpoint", "descriptor_access", "cpuid",
                         "guest_request", "debug_exception", "deny_cr", "deny_msr", "set_registers",
                         "inject_exception", "emulate_insn"})

TARGETS: dict[str, TargetInfo] = {
    "x86_64": TargetInfo(
        "x86_64", "Xen on Intel VT-x with EPT",
        _X86_COMMON | {"mem_access", "altp2m", "singlestep", "fast_singlestep", "emulate", "emulate_nowrite",
                       "emul_read_data", "ve"},
        max_views=10),
    # Nested or emulated VT-x often has EPT but no monitor trap flag (Bochs has none): no single-step,
    # so no altp2m step-over. An allowed access is emulated by Xen instead, and an int3 is planted
    # in the guest's frame and emulated from its original bytes.
    "x86_64-nomtf": TargetInfo(
        "x86_64-nomtf", "Xen on Intel VT-x with EPT but no monitor trap flag (nested or emulated VT-x)",
        _X86_COMMON | {"mem_access", "emulate", "emulate_nowrite", "emul_read_data"},
        max_views=0),
    "x86_64-svm": TargetInfo(
        "x86_64-svm", "Xen on AMD SVM with NPT (no mem_access, no altp2m, no single-stepping)",
        _X86_COMMON, max_views=0),
    "arm64": TargetInfo(
        "arm64", "Xen on arm64 (stage-2 mem_access; no single-stepping, emulation, DENY or altp2m)",
        frozenset({"mem_access", "privileged_call", "smc_breakpoint", "guest_request", "set_registers"}),
        max_views=0, instruction_size=4),
}


def target_info(name: str) -> TargetInfo:
    return TARGETS[name]


# A plan needing a subset of a host's capabilities runs there: VT-x without MTF on any VT-x host.
_RUNS_ON = {"x86_64-nomtf": frozenset({"x86_64"})}


def runs_on(plan_arch: str, host_arch: str) -> bool:
    """Whether a plan compiled for `plan_arch` can be installed on a host of `host_arch`."""
    return plan_arch == host_arch or host_arch in _RUNS_ON.get(plan_arch, ())


# Xen's mem_access names for the plain sets of allowed accesses.
_ACCESS_NAMES = {frozenset(): "n", frozenset("r"): "r", frozenset("w"): "w", frozenset("rw"): "rw",
                 frozenset("x"): "x", frozenset("rx"): "rx", frozenset("wx"): "wx", frozenset("rwx"): "rwx"}


def access_name(allowed: set[str] | frozenset[str], *, x86: bool) -> str:
    """The mem_access name for a set of allowed accesses ("r", "w", "x").

    EPT has no write-without-read (such an entry is a misconfiguration), so on
    x86 a set with W but not R loses W: writes there trap too, and arrive as W|R.
    """
    allowed = frozenset(allowed)
    if x86 and "w" in allowed and "r" not in allowed:
        allowed = allowed - {"w"}
    return _ACCESS_NAMES[allowed]
