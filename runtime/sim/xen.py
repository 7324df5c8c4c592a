"""A simulated Xen 4.17 hypervisor: the `Backend` every policy meets first.

`SimulatedXen` implements `policyc.runtime.backend.Backend` over a simulated
guest (`policyc.runtime.sim.guest.Guest`) with one of three profiles:

``x86_64``      Intel VT-x with EPT and MTF: mem_access, altp2m (10 views
                including view 0), singlestep, every x86 monitor.
``x86_64-svm``  AMD SVM with NPT: no mem_access (EINVAL), no altp2m and no
                singlestep (EOPNOTSUPP); CR/MSR/int3/CPUID/descriptor/debug
                and guest-request monitors work.
``arm64``       stage-2 mem_access on the host p2m only; monitors are
                guest_request and privileged_call (SMC); no emulation, no
                DENY, no altp2m, no singlestep.

An AArch64 guest (`guest_arm64.Arm64Guest`, e.g. the ``linux-arm64``
layout) runs under ``arm64`` only: its accesses translate through its own
stage-1 tables (TTBR0/TTBR1), a stage-1 fault is the guest's abort before
stage 2 is consulted, and an SMC in the instruction stream (a planted
breakpoint) is a privileged call. An x86 guest under ``arm64`` keeps the
x86 walker (the profile models Xen, the guest the machine).

Semantics follow docs/XEN-SEMANTICS.md (Xen 4.17.7, source-cited) where it
speaks, and Xen's source (xen-project/xen, RELEASE-4.17.x) elsewhere; the
places are named in comments as ``[doc §n]`` and ``[xen path]``.

How it runs. The guest executes *operations* (`Op`: one instruction each:
a read, a write, a fetch, ``mov cr0``, ``wrmsr`` ...) queued per vCPU with
`execute` (or the helpers `read`, `write`, `exec_at` ...). An operation that
traps puts a request on the 8-slot vm_event ring (the real ABI bytes,
`policyc.native.abi.Ring`, Xen on the front side) and, for a sync event,
pauses its vCPU. The monitor (the enforcer, or a test) drives the back side
through the Backend methods: `take_requests`, `put_responses`, `notify`.
`notify` is the event channel: Xen consumes the responses then and there,
applies their flags in Xen's order, and the vCPUs it unpaused run on at
once (re-executing, emulating or finishing their instruction). Nothing
happens on its own: the simulation is single-threaded and deterministic.

Performance: the per-event path packs requests with precomputed
`struct.Struct`s at offsets checked against the cffi layout at import, looks
permissions up in per-view dicts, and never parses text.
"""

from __future__ import annotations

import errno as _errno
import operator
import struct
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from ...native import abi
from ..backend import ACCESS_VALUES, BackendError, Capabilities, InvalidArgument, Unsupported
from .guest import (CR0, CR4, EFER, GPRS, MSR, MSR_NAMES, Guest, GuestFault, TranslationFault,
                    VCpu)
from .guest_arm64 import EC_PC_ALIGN, Arm64TranslationFault
from ..guest_memory import FRAME_MASK, FRAME_SHIFT, FRAME_SIZE

__all__ = ["SimulatedXen", "Op", "PROFILES", "echo_response", "echo_responder",
           "R", "W", "X"]

# --------------------------------------------------------------------------- ABI constants

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
_CR_NAME = {v: k for k, v in CR_INDEX.items()}

ET_PRI_SW_EXC = _C["X86_EVENTTYPE_PRI_SW_EXCEPTION"]
ET_SW_EXC = _C["X86_EVENTTYPE_SW_EXCEPTION"]

EVENT_SIZE = abi.EVENT_SIZE
_OFF_U, _OFF_DATA = 24, 56                      # u and data (XEN-FACTS); _check_layout proves it
_OFF_REGS_RIP = 56 + 19 * 8
_OFF_EMUL_READ = 60

_HDR = struct.Struct("<IIIIH")                 # version flags reason vcpu_id altp2m_idx
_HDR24 = struct.Struct("<IIIIH6x")
# data.regs.x86: 33 u64, 4 u32 segment bases, fs/gs base, 6 selector regs (limit:20 ar:12),
# shadow_gs, gdtr_limit + 6 selectors + pad.
_REGS_X86 = struct.Struct("<33Q4I2Q6IQ8H")
_REGS_ARM = struct.Struct("<5Q")
_GPRS_IN = struct.Struct("<18Q")               # rax..r15, rflags, dr6  (response side)
_U_MEM = struct.Struct("<QQQI4x")
_U_CR = struct.Struct("<I4xQQ")
_U_MSR = struct.Struct("<QQQ")
_U_DEBUG = struct.Struct("<QQIB3x")
_U_SS = struct.Struct("<Q")
_U_CPUID = struct.Struct("<IIII")
_U_DESC = struct.Struct("<I4xQBB6x")
_U_PAD = bytes(32)
assert _REGS_X86.size == 344 and _U_MEM.size == 32
_ARM_PAD = bytes(344 - _REGS_ARM.size)
_MSR_SET1 = (0x174, 0x175, 0x176, 0xC0000080, 0xC0000081, 0xC0000082)
_MSR_SET2 = (0xC0000100, 0xC0000101)
_MSR_GET1 = operator.itemgetter(*_MSR_SET1)
_MSR_GET2 = operator.itemgetter(*_MSR_SET2)
_GPR_GET = operator.itemgetter(*GPRS)
_SEL_GET = operator.itemgetter("cs", "ss", "ds", "es", "fs", "gs")


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
    ours = (_HDR24.pack(VERSION, F_PAUSED | F_ALTP2M, RS_MEM_ACCESS, 3, 5)
            + _U_MEM.pack(0x123, 0x45, 0xFFFF888000000000, MA_W | MA_R)
            + _REGS_X86.pack(*(0x1000 + i for i in range(33)), 1, 2, 3, 4, 5, 6, _CS_AR, _SS_AR,
                             0, 0, 0, 0, 7, 8, 9, 10, 11, 12, 13, 14, 0))
    if ours != ref:
        raise ImportError("policyc.runtime.sim: the request packer disagrees with the vm_event ABI")
    rsp = abi.make_response(abi.parse_request(ref), emul_read=b"abc").raw
    if (struct.unpack_from("<I", rsp, 56)[0], rsp[_OFF_EMUL_READ:_OFF_EMUL_READ + 3]) != (3, b"abc"):
        raise ImportError("policyc.runtime.sim: data.emul.read is not where expected")
    rsp = abi.make_response(abi.parse_request(ref), fast_singlestep_p2midx=7).raw
    if struct.unpack_from("<H", rsp, 24)[0] != 7:
        raise ImportError("policyc.runtime.sim: u.fast_singlestep is not where expected")
    arm = abi.make_request(RS_PRIVCALL, 0, fields={"data.regs.arm.pc": 0x1234}).raw
    if _REGS_ARM.unpack_from(arm, 56)[3] != 0x1234:
        raise ImportError("policyc.runtime.sim: data.regs.arm is not where expected")

# Segment attributes as Xen packs them (12-bit attr; limit >> 12 when G).
_CS_AR = 0xFFFFF | (0xA9B << 20)      # 64-bit code, DPL0, present, granular
_SS_AR = 0xFFFFF | (0xC93 << 20)

_check_layout()

# --------------------------------------------------------------------------- access values

R, W, X = 1, 2, 4
_ACC_CODE = {name: i for i, name in enumerate(ACCESS_VALUES)}
A_N, A_R, A_W, A_RW, A_X, A_RX, A_WX, A_RWX, A_RX2RW, A_N2RWX, A_DEFAULT = range(11)
_ALLOWED = (0, R, W, R | W, X, R | X, W | X, R | W | X, R | X, 0)
# W without R is an EPT misconfiguration on VMX [doc §3, table].
_MISCONFIG_X86 = frozenset({A_W, A_WX})

_VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC",
                 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}

# --------------------------------------------------------------------------- profiles

_X86_MONITORS = frozenset({"write_ctrlreg", "mov_to_msr", "software_breakpoint", "descriptor_access",
                           "cpuid", "guest_request", "debug_exception", "singlestep"})


@dataclass(frozen=True)
class Profile:
    name: str
    x86: bool
    mem_access: bool
    altp2m: bool
    singlestep: bool
    emulate: bool
    monitors: frozenset[str]
    write_implies_read: bool     # VMX (and SVM) report writes as W|R; ARM reports W
    arch: str = ""               # what the host reports (Capabilities.arch); the name when empty


PROFILES: dict[str, Profile] = {
    "x86_64": Profile("x86_64", True, True, True, True, True, _X86_MONITORS, True),
    # VT-x with EPT but no monitor trap flag, as Bochs emulates it (shared/xenlab/NOTES.md): the host
    # is an x86_64 host to the enforcer, without single-stepping.
    "x86_64-nomtf": Profile("x86_64-nomtf", True, True, True, False, True, _X86_MONITORS - {"singlestep"}, True,
                            arch="x86_64"),
    "x86_64-svm": Profile("x86_64-svm", True, False, False, False, True,
                          _X86_MONITORS - {"singlestep"}, True),
    "arm64": Profile("arm64", False, True, False, False, False,
                     frozenset({"guest_request", "privileged_call"}), False),
}

# Default instruction lengths per operation (bytes): mov r/m64, NOP, mov cr, wrmsr,
# lidt [m], cpuid, int3, vmcall, icebp, smc.
INSN_LENGTH = {"read": 4, "write": 4, "rmw": 5, "exec": 1, "write_cr": 3, "wrmsr": 2,
               "lidt": 3, "lgdt": 3, "sidt": 3, "sgdt": 3, "cpuid": 2, "int3": 1,
               "guest_request": 3, "icebp": 1, "smc": 4, "remap": 4}
_NATIVE_KINDS = frozenset({"read", "write", "rmw", "exec", "remap"})  # no VM exit when allowed
_X86_ONLY = frozenset({"write_cr", "wrmsr", "lidt", "lgdt", "sidt", "sgdt", "cpuid", "int3", "icebp"})
_MASK64 = (1 << 64) - 1
_A64_OA = 0x0000_FFFF_FFFF_F000         # output-address bits of an AArch64 descriptor (47:12)


# --------------------------------------------------------------------------- operations

_EXEC, _FINISH = 0, 1


class Op:
    """One guest instruction and what became of it.

    ``took_effect``: did the instruction's architectural effect happen (the
    write landed, the register was loaded, the code at ``va`` ran...).
    ``requests`` / ``responses``: raw 400-byte events it caused / that
    answered them (when ``record`` is set; ``events`` counts either way).
    ``faults``: exceptions the guest received. ``livelock``: the instruction
    re-faulted identically `livelock_limit` times and the simulator gave up.
    """

    __slots__ = ("kind", "vcpu", "va", "size", "value", "rip", "insn_len", "reg", "msr",
                 "base", "limit", "leaf", "subleaf", "to_pa", "done", "phase", "took_effect",
                 "events", "requests", "responses", "faults", "livelock", "result", "attempts",
                 "last_key", "same", "record", "started", "emulated", "note")

    def __init__(self, kind: str, vcpu: int = 0, *, va: int | None = None, size: int = 8,
                 value: int = 0, rip: int | None = None, insn_len: int | None = None,
                 reg: str | None = None, msr: int | None = None, base: int = 0, limit: int = 0,
                 leaf: int | None = None, subleaf: int = 0, to_pa: int | None = None,
                 record: bool = True) -> None:
        if kind not in INSN_LENGTH:
            raise ValueError(f"unknown operation '{kind}'")
        self.kind = kind
        self.vcpu = vcpu
        self.va = va
        self.size = size
        self.value = value
        self.rip = rip
        self.insn_len = INSN_LENGTH[kind] if insn_len is None else insn_len
        self.reg = reg
        self.msr = msr
        self.base = base
        self.limit = limit
        self.leaf = leaf
        self.subleaf = subleaf
        self.to_pa = to_pa
        self.record = record
        self.done = False
        self.phase = _EXEC
        self.took_effect = False
        self.events = 0
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []
        self.faults: list[GuestFault] = []
        self.livelock = False
        self.result: Any = None
        self.attempts = 0
        self.last_key: Any = None
        self.same = 0
        self.started = False
        self.emulated = False
        self.note = ""

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return (f"Op({self.kind}, vcpu={self.vcpu}, {state}, took_effect={self.took_effect}, "
                f"events={self.events}{', livelock' if self.livelock else ''})")


class _P2M:
    """One p2m: the host's (index None) or an altp2m view.

    ``access``: gfn -> access code for entries that exist (for a view: the
    populated entries; a missing one is populated from the host on first
    use [xen arch/x86/mm/p2m.c p2m_altp2m_get_or_propagate]). ``frame``:
    gfn -> backing gfn where `change_gfn` remapped it. ``default``: the
    p2m's default_access.
    """

    __slots__ = ("index", "access", "frame", "default")

    def __init__(self, index: int | None, default: int) -> None:
        self.index = index
        self.access: dict[int, int] = {}
        self.frame: dict[int, int] = {}
        self.default = default


class _VState:
    """Xen's per-vCPU state (what `struct vcpu` and `arch_vm_event` hold)."""

    __slots__ = ("v", "index", "queue", "pause", "blocked", "waiting", "view", "single_step",
                 "fast_ss", "set_gprs", "set_pc", "emulate", "do_write", "inject", "last_op")

    def __init__(self, v: VCpu) -> None:
        self.v = v
        self.index = v.index
        self.queue: deque[Op] = deque()
        self.pause = 0                 # vm_event_pause_count
        self.blocked = False           # "black eye" from the ring throttle
        self.waiting: tuple | None = None   # sleeping on the ring's wait queue
        self.view = 0                  # altp2m index (when altp2m is active)
        self.single_step = False
        self.fast_ss: int | None = None
        self.set_gprs: tuple | None = None
        self.set_pc: int | None = None
        self.emulate: tuple | None = None   # (flags, data)
        self.do_write: dict[str, Any] = {}  # deferred CR/MSR writes (op 4)
        self.inject: GuestFault | None = None
        self.last_op: Op | None = None


# --------------------------------------------------------------------------- responders

_FLAGS_AT = 4


def echo_response(request: bytes, flags: int = 0) -> bytes:
    """The response xen-access builds: the request's header and ``u`` copied
    (version, flags & VCPU_PAUSED, reason, vcpu_id, and u.mem_access /
    u.write_ctrlreg that EMULATE and DENY read back [doc §0.2]), plus ``flags``."""
    out = bytearray(EVENT_SIZE)
    out[:_OFF_DATA] = request[:_OFF_DATA]
    req_flags = int.from_bytes(request[4:8], "little")
    struct.pack_into("<I", out, _FLAGS_AT, (req_flags & F_PAUSED) | flags)
    struct.pack_into("<H", out, 16, 0)
    return bytes(out)


def echo_responder(flags: int = F_EMULATE) -> Callable[["SimulatedXen"], None]:
    """A trivial monitor: answer everything with the echo and ``flags``."""
    def respond(xen: "SimulatedXen") -> None:
        while xen.unconsumed_requests():
            reqs = xen.take_requests(8)
            xen.put_responses([echo_response(r, flags) for r in reqs])
            xen.notify()
    return respond


# --------------------------------------------------------------------------- the hypervisor

class SimulatedXen:
    """One simulated guest domain with a vm_event monitor ring attached.

    Args:
        guest: the guest to run (see `layouts.build_linux_x86_64`).
        profile: ``x86_64`` (VMX), ``x86_64-svm`` or ``arm64``.
        control_register_values: whether the attach issued
            XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS (op 4). Without it Xen
            applies CR/MSR writes during the exit and DENY has nothing to
            cancel [doc §0.1]; a production backend must issue it to make
            DENY work, so the simulator assumes it by default.
        access_required: a violation with no ring crashes the domain
            instead of resetting the page to rwx [doc §3].
        xen_version: (4, 17) by default. From 4.19 a view's entries that
            are populated lazily take the view's default_access; in 4.17
            they inherit the host p2m's access (xen commit 7e5b662b28).
        livelock_limit: identical re-faults of one instruction tolerated
            before the simulator declares a livelock and abandons it (Xen
            itself would loop forever).
        arm_mem_access: on arm64, whether Xen was built with
            CONFIG_MEM_ACCESS (off by default upstream [doc §0.8]).
    """

    def __init__(self, guest: Guest, profile: str = "x86_64", *, name: str | None = None,
                 control_register_values: bool = True, access_required: bool = False,
                 xen_version: tuple[int, int] = (4, 17), livelock_limit: int = 8,
                 max_views: int = 10, arm_mem_access: bool = True, record: bool = True) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile '{profile}' (known: {', '.join(PROFILES)})")
        self.profile = profile
        self._p = PROFILES[profile]
        self.name = name or f"sim-{profile}"
        self.instance = uuid.uuid4().hex       # this simulated domain, as a journal names it
        self.guest = guest
        # An AArch64 guest translates with its own stage-1 tables; an x86 guest under the arm64 profile
        # keeps the x86 walker (the profile models Xen, the guest models the machine).
        self._a64 = getattr(guest, "arch", None) == "arm64"
        if self._a64 and self._p.x86:
            raise ValueError(f"an AArch64 guest runs under the arm64 profile, not {profile}")
        self.crv = control_register_values
        self.access_required = access_required
        self.xen_version = xen_version
        self.livelock_limit = livelock_limit
        self.max_views = max_views if self._p.altp2m else 0
        self.arm_mem_access = arm_mem_access
        self.record = record
        self._vs = [_VState(v) for v in guest.vcpus]
        self._nvcpus = len(self._vs)
        self._host = _P2M(None, A_RWX)
        self._altp2m = False
        self._views: list[_P2M | None] = [None] * max(self.max_views, 1)
        self._domain_pause = 0
        self.crashed: str | None = None
        # monitors
        self._cr_mon: dict[int, tuple[bool, bool, int]] = {}     # index -> (sync, onchangeonly, mask)
        self._msr_mon: dict[int, bool] = {}                       # msr -> onchangeonly
        self._mon: dict[str, bool] = {}                           # kind -> sync
        # the ring
        self._ring: abi.Ring | None = abi.Ring()
        self._waitq: deque[_VState] = deque()
        self._runq: list[_VState] = []
        self._blocked = 0
        self._last_wake = -1
        self._evtchn = False
        self.requests_put = 0
        self.ring_full_stalls = 0
        self.responses_consumed = 0
        self.dropped_responses: list[bytes] = []
        self._closed = False

    # ================================================================== Backend: discovery
    def domain_identity(self) -> dict[str, Any]:
        """Which domain this is (XenBackend's is its domid and UUID): a fresh simulator is another domain."""
        return {"kind": "sim", "name": self.name, "instance": self.instance}

    def capabilities(self) -> Capabilities:
        p = self._p
        return Capabilities(arch=self._p.arch or self.profile, vm_event_version=VERSION, vcpus=self._nvcpus,
                            mem_access=p.mem_access and (p.x86 or self.arm_mem_access),
                            altp2m=p.altp2m, max_views=self.max_views, singlestep=p.singlestep,
                            monitors=p.monitors, ring_slots=abi.RING_SLOTS)

    def close(self) -> None:
        """xc_monitor_disable [doc §7]: fails with EBUSY while a vCPU sleeps on the
        ring's wait queue; otherwise wakes throttled vCPUs, drops deferred writes
        and pending emulation, clears every monitor. vCPUs paused on unanswered
        sync events stay paused. Access restrictions, views and single-step stay."""
        if self._closed:
            return
        if self._waitq:
            raise BackendError("close", "a vCPU is waiting for a ring slot", _errno.EBUSY)
        for s in self._vs:
            if s.blocked:
                s.blocked = False
            s.do_write.clear()
            s.emulate = None
        self._blocked = 0
        self._cr_mon.clear()
        self._msr_mon.clear()
        self._mon.clear()
        self._ring = None
        self._closed = True
        self._run_all()

    def reattach(self) -> None:
        """Enable a fresh monitor ring after `close` (a new agent attaching)."""
        if not self._closed:
            raise BackendError("reattach", "vm_event is (or was) active on this domain", _errno.EBUSY)
        self._ring = abi.Ring()
        self._closed = False

    # ================================================================== Backend: pausing
    def pause(self) -> None:
        self._domain_pause += 1

    def unpause(self) -> None:
        if not self._domain_pause:
            raise InvalidArgument("unpause", "domain is not paused", _errno.EINVAL)
        self._domain_pause -= 1
        if not self._domain_pause:
            self._run_all()

    def is_paused(self, vcpu: int) -> bool:
        s = self._vs[vcpu]
        return bool(s.pause or s.blocked or s.waiting or self._domain_pause or self.crashed)

    def paused_vcpus(self) -> frozenset[int]:
        if self._domain_pause or self.crashed:
            return frozenset(range(self._nvcpus))
        return frozenset(s.index for s in self._vs if s.pause or s.blocked or s.waiting)

    # ================================================================== Backend: mem_access
    def _check_mem_access(self, op: str) -> None:
        if not self._p.mem_access:
            raise InvalidArgument(op, "mem_access needs VMX with HAP (AMD NPT keeps no access bits)",
                                  _errno.EINVAL)
        if not self._p.x86 and not self.arm_mem_access:
            raise Unsupported(op, "Xen built without CONFIG_MEM_ACCESS", _errno.ENOSYS)
        if self._closed:
            raise BackendError(op, "no monitor ring", _errno.ENODEV)

    def _view_for(self, op: str, view: int) -> _P2M:
        if view == 0:
            return self._host
        if not self._p.altp2m:
            raise InvalidArgument(op, f"view {view}: no altp2m on {self.profile}", _errno.EINVAL)
        if not self._altp2m or not 0 < view < self.max_views or self._views[view] is None:
            raise InvalidArgument(op, f"view {view} does not exist", _errno.EINVAL)
        return self._views[view]  # type: ignore[return-value]

    def set_access(self, view: int, gfns: Sequence[int], access: str | Sequence[str]) -> None:
        self._check_mem_access("set_access")
        p2m = self._view_for("set_access", view)
        gfns = list(gfns)
        if isinstance(access, str):
            codes = [self._code("set_access", access, p2m)] * len(gfns)
        else:
            access = list(access)
            if len(access) != len(gfns):
                raise InvalidArgument("set_access", "one access value per gfn", _errno.EINVAL)
            codes = [self._code("set_access", a, p2m) for a in access]
        guest = self.guest
        for gfn, code in zip(gfns, codes):       # xc_set_mem_access_multi stops at the first error
            if not guest.is_ram(gfn):
                raise InvalidArgument("set_access", f"gfn {gfn:#x} is not populated", _errno.EINVAL)
            if p2m is self._host:
                self._host.access[gfn] = code
                if self._altp2m:   # host changes overwrite populated view entries [doc §2]
                    for v in self._views:
                        if v is not None and gfn in v.access:
                            v.access[gfn] = code
                            v.frame.pop(gfn, None)
            else:
                if gfn not in p2m.access:
                    self._populate(p2m, gfn)
                p2m.access[gfn] = code

    def _code(self, op: str, access: str, p2m: _P2M) -> int:
        code = _ACC_CODE.get(access)
        if code is None:
            raise InvalidArgument(op, f"unknown access '{access}' (one of {', '.join(ACCESS_VALUES)})",
                                  _errno.EINVAL)
        return p2m.default if code == A_DEFAULT else code

    def get_access(self, view: int, gfn: int) -> str:
        self._check_mem_access("get_access")
        p2m = self._view_for("get_access", view)
        if not self.guest.is_ram(gfn):
            raise InvalidArgument("get_access", f"gfn {gfn:#x} is not populated", _errno.EINVAL)
        if p2m is self._host:
            return ACCESS_VALUES[self._host.access.get(gfn, self._host.default)]
        code = p2m.access.get(gfn)
        if code is None:   # not populated yet: what the first access will see
            code = self._lazy_code(p2m, gfn)
        return ACCESS_VALUES[code]

    def populated_frames(self) -> Iterable[int]:
        return self.guest.populated_frames()

    # ================================================================== Backend: altp2m
    def _check_altp2m(self, op: str, need_active: bool = True) -> None:
        if not self._p.altp2m:
            raise Unsupported(op, f"altp2m is not available on {self.profile}", _errno.EOPNOTSUPP)
        if need_active and not self._altp2m:
            raise Unsupported(op, "altp2m is not active on this domain", _errno.EOPNOTSUPP)

    def altp2m_get_state(self) -> bool:
        """xc_altp2m_get_domain_state."""
        return self._altp2m

    def state_snapshot(self, *, memory: bool = True) -> dict[str, Any]:
        """Everything an enforcer may change in the domain, for before/after comparisons: each
        populated frame's access in every view, views and altp2m, monitors, per-vCPU view,
        single-step and pause state, the ring, and (``memory=True``) guest memory and registers."""
        frames = tuple(self.populated_frames())
        access: dict[int, tuple[str, ...]] = {}
        if self._p.mem_access and not self._closed:
            for view in range(max(self.max_views, 1)):
                try:
                    access[view] = tuple(self.get_access(view, g) for g in frames)
                except BackendError:
                    continue
        n = len(self._vs)
        snap: dict[str, Any] = {
            "frames": frames, "access": access, "altp2m": self._altp2m,
            "views": tuple(self.current_view(i) for i in range(n)),
            "single_step": tuple(self.single_stepping(i) for i in range(n)),
            "monitors": repr(sorted((k, repr(v)) for k, v in self.monitors().items())),
            "paused": tuple(sorted(self.paused_vcpus())), "ring": self.unconsumed_requests(),
            "crashed": self.crashed,
        }
        if memory:
            snap["memory"] = self.guest.memory.snapshot()
            snap["registers"] = tuple(tuple(sorted(self.get_registers(i).items())) for i in range(n))
        return snap

    def altp2m_set_state(self, enabled: bool) -> None:
        self._check_altp2m("altp2m_set_state", need_active=False)
        if enabled == self._altp2m:
            return
        self._altp2m = enabled
        self._views = [None] * self.max_views
        if enabled:
            # view 0 is a fresh altp2m created from the host with its default access
            self._views[0] = _P2M(0, self._host.default)
        for s in self._vs:
            s.view = 0

    def create_view(self, default_access: str = "rwx") -> int:
        self._check_altp2m("create_view")
        code = _ACC_CODE.get(default_access)
        if code is None:
            raise InvalidArgument("create_view", f"unknown access '{default_access}'", _errno.EINVAL)
        if code == A_DEFAULT:
            code = self._host.default
        for i in range(1, self.max_views):
            if self._views[i] is None:
                self._views[i] = _P2M(i, code)
                return i
        raise InvalidArgument("create_view", f"all {self.max_views} views are in use", _errno.EINVAL)

    def destroy_view(self, view: int) -> None:
        self._check_altp2m("destroy_view")
        if not 0 < view < self.max_views or self._views[view] is None:
            raise BackendError("destroy_view", f"view {view} cannot be destroyed", _errno.EBUSY)
        if any(s.view == view for s in self._vs):
            raise BackendError("destroy_view", f"view {view} is in use by a vCPU", _errno.EBUSY)
        self._views[view] = None

    def switch_view(self, view: int) -> None:
        self._check_altp2m("switch_view")
        if not 0 <= view < self.max_views or self._views[view] is None:
            raise InvalidArgument("switch_view", f"view {view} does not exist", _errno.EINVAL)
        for s in self._vs:
            s.view = view

    def change_gfn(self, view: int, gfn: int, new_gfn: int | None) -> None:
        self._check_altp2m("change_gfn")
        if not 0 <= view < self.max_views or self._views[view] is None:
            raise InvalidArgument("change_gfn", f"view {view} does not exist", _errno.EINVAL)
        p2m = self._views[view]
        assert p2m is not None
        if new_gfn is None:
            p2m.access.pop(gfn, None)    # entry removed; repopulated lazily on next use
            p2m.frame.pop(gfn, None)
            return
        if not self.guest.is_ram(gfn) or not self.guest.is_ram(new_gfn):
            raise InvalidArgument("change_gfn", "both gfns must be populated RAM", _errno.EINVAL)
        if gfn not in p2m.access:
            self._populate(p2m, gfn)
        # the entry takes new_gfn's frame and access, as the view (or else the host) has them
        frame = p2m.frame.get(new_gfn, new_gfn)
        code = p2m.access.get(new_gfn)
        if code is None:
            code = self._host.access.get(new_gfn, self._host.default)
        p2m.access[gfn] = code
        if frame == gfn:
            p2m.frame.pop(gfn, None)
        else:
            p2m.frame[gfn] = frame

    def add_frame(self) -> int:
        return self.guest.add_frame()

    def remove_frame(self, gfn: int) -> None:
        if gfn not in self.guest.added_frames:
            raise InvalidArgument("remove_frame", f"gfn {gfn:#x} was not added", _errno.EINVAL)
        self.guest.remove_frame(gfn)
        self._host.access.pop(gfn, None)
        for v in self._views:
            if v is not None:
                v.access.pop(gfn, None)
                v.frame.pop(gfn, None)

    def _lazy_code(self, p2m: _P2M, gfn: int) -> int:
        if self.xen_version >= (4, 19):
            return p2m.default
        return self._host.access.get(gfn, self._host.default)

    def _populate(self, p2m: _P2M, gfn: int) -> int:
        code = p2m.access[gfn] = self._lazy_code(p2m, gfn)
        return code

    # ================================================================== Backend: monitors
    def _mon_errors(self, op: str, kind: str) -> None:
        if kind not in self._p.monitors:
            raise Unsupported(op, f"{kind} is not available on {self.profile}", _errno.EOPNOTSUPP)
        if self._closed:
            raise BackendError(op, "no monitor ring", _errno.ENODEV)

    def monitor_write_ctrlreg(self, index: str, enable: bool, *, sync: bool = True,
                              onchangeonly: bool = False, bitmask: int = 0) -> None:
        self._mon_errors("monitor_write_ctrlreg", "write_ctrlreg")
        idx = CR_INDEX.get(index.lower())
        if idx is None:
            raise InvalidArgument("monitor_write_ctrlreg", f"unknown control register '{index}'",
                                  _errno.EINVAL)
        if (idx in self._cr_mon) == enable:
            raise BackendError("monitor_write_ctrlreg", f"{index} monitor already "
                               f"{'enabled' if enable else 'disabled'}", _errno.EEXIST)
        if enable:
            self._cr_mon[idx] = (sync, onchangeonly, bitmask)
        else:
            del self._cr_mon[idx]

    def monitor_control_registers(self, enable: bool) -> None:
        """XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS (op 4): without it a DENY of a CR/MSR write does
        nothing [doc §0.1]. The simulator starts with it as ``control_register_values`` says."""
        if not self._p.x86:
            raise Unsupported("monitor_control_registers", "x86 only", _errno.EOPNOTSUPP)
        self.crv = bool(enable)

    def monitor_mov_to_msr(self, msr: int, enable: bool, *, onchangeonly: bool = False) -> None:
        self._mon_errors("monitor_mov_to_msr", "mov_to_msr")
        if not (0 <= msr <= 0x1FFF or 0x40000000 <= msr <= 0x40001FFF or 0xC0000000 <= msr <= 0xC0001FFF):
            raise InvalidArgument("monitor_mov_to_msr", f"MSR {msr:#x} cannot be monitored", _errno.EINVAL)
        if (msr in self._msr_mon) == enable:
            raise BackendError("monitor_mov_to_msr", f"MSR {msr:#x} monitor already "
                               f"{'enabled' if enable else 'disabled'}", _errno.EEXIST)
        if enable:
            self._msr_mon[msr] = onchangeonly
        else:
            del self._msr_mon[msr]

    _ON_OFF = ("software_breakpoint", "descriptor_access", "cpuid", "guest_request",
               "debug_exception", "privileged_call", "singlestep")
    _ALWAYS_SYNC = ("software_breakpoint", "descriptor_access", "cpuid", "privileged_call", "singlestep")

    def monitor(self, kind: str, enable: bool, *, sync: bool = True) -> None:
        if kind not in self._ON_OFF:
            raise InvalidArgument("monitor", f"unknown monitor '{kind}'", _errno.EINVAL)
        self._mon_errors("monitor", kind)
        if (kind in self._mon) == enable:
            raise BackendError("monitor", f"{kind} monitor already {'enabled' if enable else 'disabled'}",
                               _errno.EEXIST)
        if enable:
            self._mon[kind] = True if kind in self._ALWAYS_SYNC else sync
        else:
            del self._mon[kind]

    def monitors(self) -> Mapping[str, object]:
        out: dict[str, object] = {}
        if self._cr_mon:
            out["write_ctrlreg"] = {_CR_NAME[i]: {"sync": s, "onchangeonly": o, "bitmask": m}
                                    for i, (s, o, m) in sorted(self._cr_mon.items())}
        if self._msr_mon:
            out["mov_to_msr"] = {msr: {"onchangeonly": o} for msr, o in sorted(self._msr_mon.items())}
        for kind, sync in self._mon.items():
            out[kind] = {"sync": sync}
        return out

    # ================================================================== Backend: guest state
    def _check_pa(self, address: int, size: int) -> None:
        g = self.guest
        first, last = address >> FRAME_SHIFT, (address + max(size, 1) - 1) >> FRAME_SHIFT
        for gfn in range(first, last + 1):
            if not g.is_ram(gfn):
                raise InvalidArgument("physical access", f"gfn {gfn:#x} is not guest RAM", _errno.EINVAL)

    def read_physical(self, address: int, size: int) -> bytes:
        self._check_pa(address, size)
        return self.guest.memory.read(address, size)

    def write_physical(self, address: int, data: bytes) -> None:
        self._check_pa(address, len(data))
        self.guest.memory.write(address, data)

    def get_registers(self, vcpu: int) -> dict[str, int]:
        regs = self._vcpu(vcpu).v.registers()
        if self._a64:
            return regs
        if not self._p.x86:
            regs.update(pc=regs["rip"], ttbr0=regs["cr3"], ttbr1=regs["cr3"], cpsr=0x3C5)
        return regs

    def set_registers(self, vcpu: int, registers: Mapping[str, int]) -> None:
        v = self._vcpu(vcpu).v
        for name, value in registers.items():
            if name == "pc" and not self._a64:
                name = "rip"
            try:
                v.set(name, value)
            except KeyError:
                raise InvalidArgument("set_registers", f"unknown register '{name}'", _errno.EINVAL) from None

    def inject_exception(self, vcpu: int, vector: int, *, error_code: int | None = None,
                         insn_length: int = 0, software: bool = False) -> None:
        """xendevicemodel_inject_event: delivered at the vCPU's next VM entry,
        after the deferred writes; dropped if one is already pending [doc §1.0]."""
        if not self._p.x86:
            raise Unsupported("inject_exception", "dm_op inject_event is x86-only", _errno.EOPNOTSUPP)
        if not 0 <= vector < 32:
            raise InvalidArgument("inject_exception", f"vector {vector}", _errno.EINVAL)
        s = self._vcpu(vcpu)
        if s.inject is None:
            s.inject = GuestFault(vector, _VECTOR_NAMES.get(vector, f"#{vector}"), error_code,
                                  None, injected=True)
        if self._runnable(s):
            self._runq.append(s)
            self._drain()

    # ================================================================== Backend: the ring
    def _ring_or_fail(self, op: str) -> abi.Ring:
        if self._ring is None:
            raise BackendError(op, "no monitor ring (closed)", _errno.ENODEV)
        return self._ring

    def native_ring(self) -> abi.Ring:
        """The monitor ring, for a native monitor that takes requests and puts responses in C (then
        calls `notify`); this backend keeps no other books on either."""
        return self._ring_or_fail("native_ring")

    def take_requests(self, limit: int = 8) -> list[bytes]:
        ring = self._ring_or_fail("take_requests")
        return [r.raw for r in ring.take_requests(limit)]

    def put_responses(self, responses: Iterable[bytes]) -> None:
        ring = self._ring_or_fail("put_responses")
        batch = list(responses)
        try:
            if len(batch) > ring.pending_responses and not ring.pending_responses \
                    and not ring.unconsumed_requests:
                ring.put_unsolicited_responses(batch)   # Xen takes answers to nothing [doc §7 step 5]
            else:
                ring.put_responses(batch)
        except abi.RingError as exc:
            raise BackendError("put_responses", str(exc), _errno.EINVAL) from None
        ring.push_responses()

    def notify(self) -> None:
        """The monitor's event-channel kick: Xen consumes every published response."""
        self._ring_or_fail("notify")
        self._vm_event_resume()

    def wait(self, timeout: float) -> bool:
        """True when Xen has signalled since the last wait. Nothing runs
        behind the caller's back in the simulation, so this never sleeps."""
        fired = self._evtchn or (self._ring is not None and self._ring.unconsumed_requests > 0)
        self._evtchn = False
        return fired

    # ================================================================== guest-side API
    def execute(self, vcpu: int, op: Op) -> Op:
        """Queue `op` on `vcpu` and run the vCPU as far as it can go."""
        s = self._vcpu(vcpu)
        # Refused before the op is queued: a queued op that cannot run would fail again at every resume.
        if (self._a64 or not self._p.x86) and op.kind in _X86_ONLY:
            raise ValueError(f"{op.kind} is an x86 instruction; this guest is not x86")
        if self._p.x86 and op.kind == "smc":
            raise ValueError("smc is an arm64 instruction; this guest is x86")
        op.vcpu = vcpu
        s.queue.append(op)
        if self._runnable(s) and len(s.queue) == 1:
            self._run(s)
            self._drain()
        return op

    def read(self, vcpu: int, va: int, size: int = 8, **kw: Any) -> Op:
        return self.execute(vcpu, Op("read", vcpu, va=va, size=size, **kw))

    def write(self, vcpu: int, va: int, value: int | bytes, size: int = 8, **kw: Any) -> Op:
        if isinstance(value, (bytes, bytearray)):
            size = len(value)
        return self.execute(vcpu, Op("write", vcpu, va=va, size=size, value=value, **kw))

    def exec_at(self, vcpu: int, va: int, **kw: Any) -> Op:
        return self.execute(vcpu, Op("exec", vcpu, va=va, **kw))

    def write_cr(self, vcpu: int, cr: str, value: int, **kw: Any) -> Op:
        return self.execute(vcpu, Op("write_cr", vcpu, reg=cr.lower(), value=value, **kw))

    def wrmsr(self, vcpu: int, msr: int | str, value: int, **kw: Any) -> Op:
        index = MSR[msr.upper()] if isinstance(msr, str) else msr
        return self.execute(vcpu, Op("wrmsr", vcpu, msr=index, value=value, **kw))

    def vcpu(self, index: int) -> VCpu:
        return self._vcpu(index).v

    def current_view(self, vcpu: int) -> int:
        return self._vcpu(vcpu).view if self._altp2m else 0

    def single_stepping(self, vcpu: int) -> bool:
        return self._vcpu(vcpu).single_step

    @property
    def ring(self) -> abi.Ring | None:
        return self._ring

    def free_slots(self) -> int:
        return self._ring.free_requests if self._ring is not None else 0

    def unconsumed_requests(self) -> int:
        return self._ring.unconsumed_requests if self._ring is not None else 0

    def pending_ops(self, vcpu: int) -> int:
        return len(self._vcpu(vcpu).queue)

    def read_guest(self, vcpu: int, va: int, size: int, *, view: int | None = None) -> bytes:
        """What the guest would read at ``va`` in ``view`` (default: its current
        view), without permission checks or events."""
        s = self._vcpu(vcpu)
        p2m = self._p2m_of_index(view) if view is not None else self._cur(s)
        if self._a64:
            return self._read_guest_a64(s, va, size)
        out = bytearray()
        remap = p2m.frame if p2m is not None else None
        while size:
            w = self.guest.walk(s.v.cr3, va, remap)
            n = min(size, FRAME_SIZE - (va & FRAME_MASK))
            gfn = w.pa >> FRAME_SHIFT
            frame = remap.get(gfn, gfn) if remap else gfn
            out += self.guest.memory.read((frame << FRAME_SHIFT) | (w.pa & FRAME_MASK), n)
            va += n
            size -= n
        return bytes(out)

    # ================================================================== internals: state
    def _vcpu(self, index: int) -> _VState:
        if not 0 <= index < self._nvcpus:
            raise InvalidArgument("vcpu", f"no vCPU {index}", _errno.EINVAL)
        return self._vs[index]

    def _runnable(self, s: _VState) -> bool:
        return not (s.pause or s.blocked or s.waiting or self._domain_pause or self.crashed)

    def _cur(self, s: _VState) -> _P2M:
        if self._altp2m:
            view = self._views[s.view]
            if view is not None:
                return view
        return self._host

    def _p2m_of_index(self, view: int) -> _P2M:
        if view == 0 and not self._altp2m:
            return self._host
        p2m = self._views[view] if 0 <= view < len(self._views) else None
        if p2m is None:
            raise InvalidArgument("view", f"view {view} does not exist", _errno.EINVAL)
        return p2m

    def _run_all(self) -> None:
        self._runq.extend(self._vs)
        self._drain()

    # ================================================================== internals: running
    def _run(self, s: _VState) -> None:
        queue = s.queue
        while queue and self._runnable(s):
            op = queue[0]
            if op.done:
                queue.popleft()
                continue
            if op.phase == _FINISH:      # waiting for a resume that already happened
                self._finish(s, op, native=False)
                continue
            self._attempt(s, op)
            if not op.done:
                break

    def _finish(self, s: _VState, op: Op, *, native: bool) -> None:
        op.done = True
        if s.queue and s.queue[0] is op:
            s.queue.popleft()
        if native and s.single_step and self._p.singlestep:
            self._mtf(s, op)

    def _mtf(self, s: _VState, op: Op) -> None:
        """The MTF exit after a natively retired instruction [doc §1.10, §2; xen
        4.17 hvm/monitor.c: the singlestep monitor is checked first]."""
        if not self._mon.get("singlestep") or self._ring is None:
            return     # 4.17: MTF exits go nowhere; stepping (and FAST) never ends [doc §0.3]
        if s.fast_ss is not None:
            idx = s.fast_ss
            s.single_step = False
            s.fast_ss = None
            self._switch_vcpu(s, idx)
            return
        gfn = self._gfn_of(s, s.v.rip)
        self._send(s, op, RS_SINGLESTEP, _U_SS.pack(gfn), True)

    def _switch_vcpu(self, s: _VState, idx: int) -> None:
        if self._altp2m and 0 <= idx < self.max_views and self._views[idx] is not None:
            s.view = idx

    def _gfn_of(self, s: _VState, va: int) -> int:
        try:
            if self._a64:
                return self.guest.walk_vcpu(s.v, va)[0].pa >> FRAME_SHIFT   # type: ignore[attr-defined]
            return self.guest.walk(s.v.cr3, va).pa >> FRAME_SHIFT
        except TranslationFault:
            return 0xFFFFFFFFFFFFFFFF

    def _fault(self, s: _VState, op: Op, fault: GuestFault, *, took_effect: bool = False) -> None:
        v = s.v
        if fault.vector == 14 and fault.address is not None:
            v.cr2 = fault.address
        v.faults.append(fault)
        op.faults.append(fault)
        op.took_effect = took_effect
        self._finish(s, op, native=False)

    def _start(self, s: _VState, op: Op) -> None:
        op.started = True
        v = s.v
        if op.rip is None:
            op.rip = op.va if op.kind == "exec" else v.rip
        v.rip = op.rip
        if self._a64:
            op.insn_len = 4                     # every A64 instruction is 4 bytes
            if op.kind == "remap":
                self._prepare_remap_a64(s, op)
            return
        if op.kind == "cpuid":
            if op.leaf is not None:
                v.gpr["rax"] = op.leaf
                v.gpr["rcx"] = op.subleaf
        elif op.kind == "remap":
            self._prepare_remap(s, op)

    def _attempt(self, s: _VState, op: Op) -> None:
        if not op.started:
            self._start(s, op)
        op.attempts += 1
        if op.attempts > 4 * self.livelock_limit + 4:
            self._livelock(s, op)
            return
        kind = op.kind
        if kind == "write" or kind == "remap":
            self._op_data(s, op, W)
        elif kind == "read":
            self._op_data(s, op, R)
        elif kind == "exec":
            self._op_exec(s, op)
        elif kind == "rmw":
            self._op_data(s, op, R | W)
        elif kind == "write_cr":
            self._op_write_cr(s, op)
        elif kind == "wrmsr":
            self._op_wrmsr(s, op)
        elif kind in ("lidt", "lgdt", "sidt", "sgdt"):
            self._op_desc(s, op)
        elif kind == "cpuid":
            self._op_cpuid(s, op)
        elif kind == "int3":
            if not self._p.x86:
                raise ValueError("int3 is an x86 instruction; arm64 guests use smc")
            self._breakpoint(s, op)
        elif kind == "guest_request":
            self._op_guest_request(s, op)
        elif kind == "icebp":
            self._op_icebp(s, op)
        elif kind == "smc":
            self._op_smc(s, op)
        else:  # pragma: no cover
            raise ValueError(kind)

    def _livelock(self, s: _VState, op: Op) -> None:
        op.livelock = True
        op.took_effect = False
        op.note = "livelock: the instruction re-faults with no progress"
        self._finish(s, op, native=False)

    # ---------------------------------------------------------------- events
    def _send(self, s: _VState, op: Op, reason: int, u: bytes, sync: bool,
              after: Callable[[int], None] | None = None) -> int:
        """monitor_traps: 0 = no ring (carry on as if unmonitored), 1 = sync
        request queued (vCPU paused), 2 = async request queued, 3 = the vCPU
        sleeps for a ring slot, 4 = abandoned as a livelock."""
        ring = self._ring
        if ring is None:
            return 0
        if op is not None and not op.done:
            key = (reason, u, s.v.rip, s.view)
            if key == op.last_key:
                op.same += 1
                if op.same >= self.livelock_limit:
                    self._livelock(s, op)
                    return 4
            else:
                op.last_key = key
                op.same = 0
        if ring.free_requests == 0:
            s.waiting = (reason, u, sync, op, after)
            self._waitq.append(s)
            self.ring_full_stalls += 1      # a vCPU that stopped for want of a ring slot
            return 3
        rc = self._put(s, reason, u, sync, op)
        if after is not None:
            after(rc)
        return rc

    def _put(self, s: _VState, reason: int, u: bytes, sync: bool, op: Op | None) -> int:
        ring = self._ring
        assert ring is not None
        flags = 0
        if sync:
            flags = F_PAUSED
            s.pause += 1
        idx = 0
        if self._altp2m:
            flags |= F_ALTP2M
            idx = s.view
        raw = self._pack(s, reason, flags, idx, u)
        ring.put_request(raw)
        self._evtchn = True
        self.requests_put += 1
        if op is not None:
            op.events += 1
            if op.record and self.record:
                op.requests.append(raw)
            s.last_op = op
        self._wake()              # the slot reservation is released: wake whoever waits
        # the throttle: only a vCPU not already paused for a vm_event [doc §0.4]
        if not s.pause and not s.blocked and ring.free_requests < self._nvcpus:
            s.blocked = True
            self._blocked += 1
        return 1 if sync else 2

    def _pack(self, s: _VState, reason: int, flags: int, idx: int, u: bytes) -> bytes:
        v = s.v
        if len(u) != 32:
            u = u.ljust(32, b"\0")
        head = _HDR24.pack(VERSION, flags, reason, s.index, idx) + u
        if self._a64:
            return head + _REGS_ARM.pack(v.ttbr0, v.ttbr1, v.tcr, v.rip, v.cpsr) + _ARM_PAD
        if not self._p.x86:
            return head + _REGS_ARM.pack(v.cr3, v.cr3, 0, v.rip, 0x3C5) + _ARM_PAD
        m = v.msrs
        try:
            sysenter_efer_star_lstar = _MSR_GET1(m)
            fs_gs = _MSR_GET2(m)
            shadow_gs = m[0xC0000102]
        except KeyError:
            sysenter_efer_star_lstar = tuple(m.get(i, 0) for i in _MSR_SET1)
            fs_gs = tuple(m.get(i, 0) for i in _MSR_SET2)
            shadow_gs = m.get(0xC0000102, 0)
        sel = v.sel
        return head + _REGS_X86.pack(
            *_GPR_GET(v.gpr), v.rflags, v.dr6, v.dr7, v.rip, v.cr0, v.cr2, v.cr3, v.cr4,
            *sysenter_efer_star_lstar, v.gdtr_base, 0, 0xFFFFFFFFFFFFFFFF,
            0, 0, 0, 0, *fs_gs, _CS_AR, _SS_AR, 0, 0, 0, 0,
            shadow_gs, v.gdtr_limit & 0xFFFF, *_SEL_GET(sel), 0)

    # ---------------------------------------------------------------- vm_event_resume
    def _vm_event_resume(self) -> None:
        ring = self._ring
        if ring is None:
            return
        to_run = self._runq
        nv = self._nvcpus
        x86 = self._p.x86
        while ring.unconsumed_responses:
            batch = ring.take_responses()
            for rsp in batch:
                raw = rsp.raw
                self.responses_consumed += 1
                self._wake()
                version, flags, reason, vcpu_id, altp2m_idx = _HDR.unpack_from(raw, 0)
                if version != VERSION or vcpu_id >= nv:
                    self.dropped_responses.append(raw)   # [doc §1.0]: the vCPU stays paused
                    continue
                s = self._vs[vcpu_id]
                op = s.last_op
                if op is not None and op.record and self.record:
                    op.responses.append(raw)
                if not s.pause:
                    continue     # flags are honoured only while paused for a vm_event
                if x86:
                    self._rsp_x86(s, raw, flags, reason, altp2m_idx)
                elif flags & F_SET_REGS:
                    s.set_pc = struct.unpack_from("<Q", raw, 56 + 24)[0]
                if flags & F_PAUSED:
                    s.pause -= 1
                    if not s.pause:
                        to_run.append(s)
        self._drain()

    def _rsp_x86(self, s: _VState, raw: bytes, flags: int, reason: int, altp2m_idx: int) -> None:
        # 1. emulate check [xen arch/x86/vm_event.c vm_event_emulate_check]
        if flags & F_EMULATE:
            if reason == RS_MEM_ACCESS:
                gfn, _off, _gla, mflags = _U_MEM.unpack_from(raw, 24)
                if self._still_violates(s, gfn, mflags):
                    s.emulate = (flags, self._read_data(raw) if flags & F_READ_DATA else None)
            elif reason == RS_SWBP:
                if flags & F_INSN_DATA:
                    s.emulate = (flags, raw[56:72])
            elif reason == RS_DESC:
                s.emulate = (flags, self._read_data(raw) if flags & F_READ_DATA else None)
        else:
            s.emulate = None
        # 2. DENY [xen arch/x86/vm_event.c vm_event_register_write_resume]
        if flags & F_DENY:
            if reason == RS_MSR:
                s.do_write.pop("msr", None)
            elif reason == RS_CTRLREG:
                index = struct.unpack_from("<I", raw, 24)[0]
                name = {0: "cr0", 1: "cr3", 2: "cr4"}.get(index)
                if name:
                    s.do_write.pop(name, None)
        # 3. single-step (TOGGLE wins over FAST; no-ops without MTF)
        if flags & (F_TOGGLE_SS | F_FAST_SS) and self._p.singlestep:
            if flags & F_TOGGLE_SS:
                s.single_step = not s.single_step
            else:
                p2midx = struct.unpack_from("<H", raw, 24)[0]
                if p2midx < self.max_views:
                    s.single_step = True
                    s.fast_ss = p2midx
        # 4. view switch, at once
        if flags & F_ALTP2M:
            self._switch_vcpu(s, altp2m_idx)
        # 5. registers (applied at the next VM entry)
        if flags & F_SET_REGS:
            s.set_gprs = _GPRS_IN.unpack_from(raw, 56)[:17] + struct.unpack_from("<Q", raw, _OFF_REGS_RIP)

    @staticmethod
    def _read_data(raw: bytes) -> bytes:
        size = min(struct.unpack_from("<I", raw, 56)[0], 340)
        return raw[_OFF_EMUL_READ:_OFF_EMUL_READ + size]

    def _still_violates(self, s: _VState, gfn: int, mflags: int) -> bool:
        """p2m_mem_access_emulate_check, from the response's u.mem_access."""
        p2m = self._cur(s)
        if p2m is self._host:
            code = self._host.access.get(gfn, self._host.default) if self.guest.is_ram(gfn) else None
        else:
            code = p2m.access.get(gfn)
        if code is None:
            return True
        if code in (A_N, A_N2RWX):
            return bool(mflags & (MA_R | MA_W | MA_X))
        if code == A_RX2RW:
            code = A_RX
        allowed = _ALLOWED[code]
        need = (R if mflags & MA_R else 0) | (W if mflags & MA_W else 0) | (X if mflags & MA_X else 0)
        return bool(need & ~allowed)

    def _wake(self) -> None:
        """vm_event_wake: after a response is consumed and after every put (the
        slot reservation is released). Vcpus sleeping for a slot go first, then
        throttled ones, round-robin [xen common/vm_event.c vm_event_wake]."""
        if not self._waitq and not self._blocked:
            return
        ring = self._ring
        assert ring is not None
        avail = ring.free_requests
        while self._waitq and avail > 0:
            s = self._waitq.popleft()
            reason, u, sync, op, after = s.waiting  # type: ignore[misc]
            s.waiting = None
            rc = self._put(s, reason, u, sync, op)
            if after is not None:
                after(rc)
            self._runq.append(s)
            avail = ring.free_requests
        if self._waitq or not self._blocked or avail == 0:
            return
        n = self._nvcpus
        i = self._last_wake + 1
        for _ in range(n):
            k = i % n
            i += 1
            s = self._vs[k]
            if not self._blocked or avail == 0:
                break
            if s.blocked:
                s.blocked = False
                self._blocked -= 1
                avail -= 1
                self._last_wake = k
                self._runq.append(s)

    def _drain(self) -> None:
        """Run the vCPUs that became runnable (outside any other vCPU's instruction)."""
        runq = self._runq
        while runq:
            s = runq.pop(0)
            if self._runnable(s):
                self._enter(s)
                self._run(s)

    # ---------------------------------------------------------------- hvm_do_resume
    def _enter(self, s: _VState) -> None:
        """What Xen does before the vCPU re-enters the guest [doc §1.0]."""
        v = s.v
        op = s.queue[0] if s.queue else None
        if s.set_gprs is not None:
            vals = s.set_gprs
            s.set_gprs = None
            g = v.gpr
            for name, value in zip(GPRS, vals[:16]):
                g[name] = value
            v.rflags = vals[16]
            v.rip = vals[17]
        if s.set_pc is not None:
            v.rip = s.set_pc
            s.set_pc = None
        if op is not None and op.phase == _EXEC and op.started and v.rip != op.rip:
            # the monitor moved RIP past (or away from) the instruction: it is skipped
            s.emulate = None
            op.took_effect = op.kind == "cpuid"     # CPUID had already executed [doc §0.6]
            op.note = op.note or "skipped by the monitor (RIP moved)"
            self._finish(s, op, native=False)
            op = s.queue[0] if s.queue else None
        if s.emulate is not None:
            eflags, data = s.emulate
            s.emulate = None
            if op is not None and op.phase == _EXEC and op.started:
                self._emulate(s, op, eflags, data)
        if s.do_write:
            self._apply_deferred(s)
        if op is not None and op.phase == _FINISH and not op.done:
            self._finish(s, op, native=False)
        if s.inject is not None:
            fault = s.inject
            s.inject = None
            head = s.queue[0] if s.queue else None
            if head is not None and head.started and not head.done:
                took = (head.kind == "int3" and fault.vector == 3) or (head.kind == "icebp" and fault.vector == 1)
                self._fault(s, head, fault, took_effect=took)
            else:
                v.faults.append(fault)
                if s.last_op is not None:
                    s.last_op.faults.append(fault)

    def _apply_deferred(self, s: _VState) -> None:
        w = s.do_write
        s.do_write = {}
        for name in ("cr0", "cr4", "cr3"):
            if name in w:
                value, op = w[name]
                fault = self._set_cr(s, name, value)
                if fault is not None:
                    self._inject_now(s, op, fault)
                else:
                    op.took_effect = True
        if "msr" in w:
            msr, value, op = w["msr"]
            fault = self._set_msr(s, msr, value)
            if fault is not None:
                self._inject_now(s, op, fault)
            else:
                op.took_effect = True

    def _inject_now(self, s: _VState, op: Op, fault: GuestFault) -> None:
        s.v.faults.append(fault)
        op.faults.append(fault)
        op.took_effect = False

    # ---------------------------------------------------------------- EPT checks
    def _ept(self, s: _VState, op: Op, gfn: int, need: int, gla: int, offset: int, in_gpt: bool,
             report: int | None = None) -> bool:
        """The slow path of a permission check: True when the instruction must
        stop (event queued, vCPU waiting, domain crashed), False to carry on.
        ``report``: the one access kind (R, W or X) the request carries instead
        of what ``need`` implies (Xen on arm64 reports what the abort was)."""
        p2m = self._cur(s)
        code = p2m.access.get(gfn)
        if code is None:
            code = self._populate(p2m, gfn) if p2m is not self._host else self._host.default
        if self._p.x86 and code in _MISCONFIG_X86:
            self._crash(f"EPT misconfiguration: gfn {gfn:#x} has access '{ACCESS_VALUES[code]}'")
            return True
        if not need & ~_ALLOWED[code]:
            return False
        if code == A_RX2RW and need & W:
            p2m.access[gfn] = A_RW         # flips silently, no event [doc §0.5]
            return bool(need & ~_ALLOWED[A_RW])  and self._ept(s, op, gfn, need, gla, offset, in_gpt, report)
        if self._ring is None:             # no listener [doc §3]
            if self.access_required:
                self._crash(f"memory access to gfn {gfn:#x} with no vm_event listener")
                return True
            if code != A_N2RWX:
                p2m.access[gfn] = A_RWX
                return False
        sync = code != A_N2RWX
        if code == A_N2RWX:
            p2m.access[gfn] = A_RWX
        if need & W:
            mflags = (MA_R | MA_W) if self._p.write_implies_read else MA_W
        elif need & X:
            mflags = MA_X
        else:
            mflags = MA_R
        if need & R and need & W:
            mflags |= MA_R
        if report is not None:
            mflags = MA_R if report == R else MA_W if report == W else MA_X
        mflags |= MA_GLA_VALID | (MA_IN_GPT if in_gpt else MA_WITH_GLA)
        rc = self._send(s, op, RS_MEM_ACCESS, _U_MEM.pack(gfn, offset, gla, mflags), sync)
        if rc == 0:
            return False
        if rc == 2:             # async (n2rwx): the access retries, now allowed
            return s.blocked
        return True

    def _crash(self, why: str) -> None:
        self.crashed = why

    # ---------------------------------------------------------------- data accesses
    def _translate(self, s: _VState, op: Op, va: int, size: int, need: int) -> list | None:
        """Walk and check every page the access touches; returns
        [(gfn, offset, length, frame)] or None when the instruction stopped."""
        v = s.v
        p2m = self._cur(s)
        host = p2m is self._host
        acc = p2m.access
        default = p2m.default if host else -1
        remap = None if host else p2m.frame
        write = bool(need & W)
        fetch = need == X
        wp = bool(v.cr0 & 0x10000)
        nxe = bool(v.msrs.get(0xC0000080, 0) & 0x800)
        walk = self.guest.walk_fast
        allowed = _ALLOWED
        pieces = []
        pos = 0
        while pos < size:
            a = va + pos
            res = walk(v.cr3, a, remap, write, fetch, wp, nxe)
            if type(res) is TranslationFault:
                for gfn, off in res.reads:
                    code = acc.get(gfn, default)
                    if code < 0 or not allowed[code] & R:
                        if self._ept(s, op, gfn, R, a, off, True):
                            return None
                self._fault(s, op, res.fault)
                return None
            pa, reads = res
            for gfn, off in reads:
                code = acc.get(gfn, default)
                if code < 0 or not allowed[code] & R:
                    if self._ept(s, op, gfn, R, a, off, True):
                        return None
            gfn = pa >> 12
            code = acc.get(gfn, default)
            if code < 0 or need & ~allowed[code] or code in _MISCONFIG_X86:
                if self._ept(s, op, gfn, need, a, pa & 0xFFF, False):
                    return None
            n = 4096 - (a & 0xFFF)
            if n > size - pos:
                n = size - pos
            pieces.append((gfn, pa & 0xFFF, n, remap.get(gfn, gfn) if remap else gfn))
            pos += n
        return pieces

    def _op_data(self, s: _VState, op: Op, need: int) -> None:
        if self._a64:
            self._op_data_a64(s, op, need)
            return
        pieces = self._translate(s, op, op.va, op.size, need)
        if pieces is None:
            return
        self._complete_data(s, op, pieces, need, view_frames=True)
        self._finish(s, op, native=True)

    def _complete_data(self, s: _VState, op: Op, pieces: list, need: int, *, view_frames: bool,
                       write: bool = True, read_data: bytes | None = None) -> None:
        mem = self.guest.memory
        v = s.v
        if need == R or need == (R | W):
            if read_data is not None and need == R:
                data = read_data[:op.size] + bytes(max(0, op.size - len(read_data)))
            else:
                data = b"".join(mem.read(((f if view_frames else g) << FRAME_SHIFT) | off, n)
                                for g, off, n, f in pieces)
            old = int.from_bytes(data, "little")
            op.result = old
            if need == R:
                if op.size <= 8:
                    v.gpr["rax"] = old
                # A read fed by the monitor (SET_EMUL_READ_DATA) completes, but not with what memory
                # holds: the read the guest tried did not take effect.
                op.took_effect = read_data is None
            else:
                new = (old + op.value) & ((1 << (8 * op.size)) - 1)
                if write:
                    self._store(pieces, new.to_bytes(op.size, "little"), view_frames)
                    op.took_effect = True
                else:
                    op.took_effect = False
        else:
            if write:
                value = op.value
                data = value if isinstance(value, (bytes, bytearray)) else \
                    (value & ((1 << (8 * op.size)) - 1)).to_bytes(op.size, "little")
                self._store(pieces, bytes(data), view_frames)
                op.took_effect = True
            else:
                op.took_effect = False
        v.rip = (op.rip + op.insn_len) & 0xFFFFFFFFFFFFFFFF

    def _store(self, pieces: list, data: bytes, view_frames: bool) -> None:
        frames = self.guest.memory._frames
        pos = 0
        for g, off, n, f in pieces:
            gfn = f if view_frames else g
            frame = frames.get(gfn)
            if frame is None:
                self.guest.memory.populate(gfn)
                frame = frames[gfn]
            frame[off:off + n] = data[pos:pos + n]
            pos += n

    def _op_exec(self, s: _VState, op: Op) -> None:
        if self._a64:
            self._op_exec_a64(s, op)
            return
        pieces = self._translate(s, op, op.va, 1, X)
        if pieces is None:
            return
        g, off, _n, frame = pieces[0]
        byte = self.guest.memory.read((frame << FRAME_SHIFT) | off, 1)[0]
        if byte == 0xCC:
            self._breakpoint(s, op)
            return
        op.result = byte
        op.took_effect = True
        s.v.rip = op.va + 1
        self._finish(s, op, native=True)

    def _stage_remap_store(self, op: Op, store_at: int, original: int, leaf_address: int, leaf: int,
                           oa_mask: int) -> None:
        """Make ``op`` the remap's one guest store: to the leaf at ``leaf_address`` when that is where
        the walk ended (``store_at``), else to the entry at ``store_at`` (holding ``original``) that
        links the table a split filled. The split's new leaf is written now, while that table is still
        unlinked (nobody watches its fresh frame), and the link undone, so that the store traps."""
        g = self.guest
        new_leaf = (leaf & ~oa_mask) | (op.to_pa & oa_mask)
        if store_at == leaf_address:
            new = new_leaf
        else:
            g.memory.write_u64(leaf_address, new_leaf)
            new = g.memory.read_u64(store_at)
            g.memory.write_u64(store_at, original)
        op.value = new
        op.size = 8
        op.result = store_at
        op.va = (g.direct_map_base + store_at) & _MASK64

    def _prepare_remap(self, s: _VState, op: Op) -> None:
        """The rootkit remap: rewrite the PTE of ``va`` to point at ``to_pa``, as a
        guest store to the paging entry through the direct map (so a
        write-protected page-table frame traps). A large page is split the way
        a guest splits one: new tables are filled in fresh frames (nobody
        watches those), then linked by one store to the large page's entry,
        and that store is the op's. With a 4 KiB page the store is to its PTE."""
        from ..paging import PageTables
        g = self.guest
        if g.direct_map_base is None:
            raise ValueError("remap needs a guest with a direct map")
        w = g.walk(s.v.cr3, op.va)
        store_at = w.pte_address
        original = g.memory.read_u64(store_at)
        if w.page_size != FRAME_SIZE:
            tables = PageTables(g.memory, s.v.cr3)
            while w.page_size != FRAME_SIZE:
                tables.split(op.va)
                w = g.walk(s.v.cr3, op.va)
        self._stage_remap_store(op, store_at, original, w.pte_address, g.memory.read_u64(w.pte_address),
                                0x000FFFFFFFFFF000)

    # ---------------------------------------------------------------- AArch64 guests
    # Order of checks for one access, as the hardware and Xen 4.17 on arm64 make them: each stage-1
    # table read needs stage-2 read permission (a fault there is reported "in the guest page tables"
    # before anything else); then the guest's own stage-1 fault (a data or instruction abort the guest
    # takes, which Xen never sees); then the stage-2 check of the access itself. Xen reports a fetch as
    # X alone and a data access as W when it writes, else R [xen arch/arm/traps.c:1894-1899].

    def _translate_a64(self, s: _VState, op: Op, va: int, size: int, need: int) -> list | None:
        v = s.v
        g = self.guest
        acc, default = self._host.access, self._host.default      # no altp2m on arm64
        fetch = need == X
        access = "exec" if fetch else "write" if need & W else "read"
        report = X if fetch else W if need & W else R
        pieces = []
        pos = 0
        while pos < size:
            a = (va + pos) & _MASK64
            try:
                t, reads = g.walk_vcpu(v, a, access)                   # type: ignore[attr-defined]
                fault = None
            except Arm64TranslationFault as exc:
                t, reads, fault = None, exc.reads, exc
            for gfn, off in reads:
                code = acc.get(gfn, default)
                if not _ALLOWED[code] & R:
                    if fetch and code in (A_X, A_WX):
                        # Xen judges the abort by the fetch, which the entry allows: it returns to the
                        # guest with no event and the walk faults again, forever
                        # [xen arch/arm/mem_access.c p2m_mem_access_check].
                        self._livelock(s, op)
                        return None
                    if self._ept(s, op, gfn, R, a, off, True, X if fetch else R):
                        return None
            if fault is not None:
                self._abort(s, op, fault.fault)
                return None
            assert t is not None
            gfn = t.pa >> FRAME_SHIFT
            if need & ~_ALLOWED[acc.get(gfn, default)]:
                if self._ept(s, op, gfn, need, a, t.pa & FRAME_MASK, False, report):
                    return None
            n = min(size - pos, FRAME_SIZE - (a & FRAME_MASK))
            pieces.append((gfn, t.pa & FRAME_MASK, n, gfn))
            pos += n
        return pieces

    def _abort(self, s: _VState, op: Op, fault: GuestFault) -> None:
        """A synchronous exception the guest takes: FAR_EL1 and ESR_EL1 describe it."""
        v = s.v
        v.far = fault.address if fault.address is not None else 0       # type: ignore[union-attr]
        v.esr = fault.error_code or 0                                   # type: ignore[union-attr]
        self._fault(s, op, fault)

    def _op_data_a64(self, s: _VState, op: Op, need: int) -> None:
        pieces = self._translate_a64(s, op, op.va, op.size, need)
        if pieces is None:
            return
        v = s.v
        width = (1 << (8 * op.size)) - 1
        if need & R:
            old = int.from_bytes(b"".join(self.guest.memory.read((g << FRAME_SHIFT) | off, n)
                                          for g, off, n, _f in pieces), "little")
            op.result = old
            if need == R:
                if op.size <= 8:
                    v.x[0] = old                                         # type: ignore[union-attr]
            else:
                self._store(pieces, ((old + op.value) & width).to_bytes(op.size, "little"), True)
        else:
            value = op.value
            data = bytes(value) if isinstance(value, (bytes, bytearray)) else (value & width).to_bytes(op.size, "little")
            self._store(pieces, data, True)
        op.took_effect = True
        v.rip = (op.rip + 4) & _MASK64
        self._finish(s, op, native=True)

    def _op_exec_a64(self, s: _VState, op: Op) -> None:
        v = s.v
        va = op.va & _MASK64
        if va & 3:
            self._abort(s, op, GuestFault(EC_PC_ALIGN, "PC alignment fault", EC_PC_ALIGN << 26 | 1 << 25, va))
            return
        pieces = self._translate_a64(s, op, va, 4, X)
        if pieces is None:
            return
        gfn, off, _n, _f = pieces[0]
        insn = struct.unpack("<I", self.guest.memory.read((gfn << FRAME_SHIFT) | off, 4))[0]
        op.result = insn
        if insn & 0xFFE0001F == 0xD4000003:     # SMC #imm16: a planted breakpoint or the guest's own call
            self._op_smc(s, op)
            return
        op.took_effect = True
        v.rip = (va + 4) & _MASK64
        self._finish(s, op, native=True)

    def _read_guest_a64(self, s: _VState, va: int, size: int) -> bytes:
        out = bytearray()
        while size:
            t, _reads = self.guest.walk_vcpu(s.v, va)                  # type: ignore[attr-defined]
            n = min(size, FRAME_SIZE - (va & FRAME_MASK))
            out += self.guest.memory.read(t.pa, n)
            va = (va + n) & _MASK64
            size -= n
        return bytes(out)

    def _prepare_remap_a64(self, s: _VState, op: Op) -> None:
        """The rootkit remap on AArch64, as `_prepare_remap` does it on x86: one guest store, through
        the linear map, to the page descriptor of ``va`` (or, for a block, to the block descriptor,
        linking a table of smaller pages filled in fresh frames beforehand)."""
        g = self.guest
        if g.direct_map_base is None:
            raise ValueError("remap needs a guest with a linear map")
        try:
            t, _reads = g.walk_vcpu(s.v, op.va)                        # type: ignore[attr-defined]
        except Arm64TranslationFault as exc:
            raise ValueError(f"remap: {op.va:#x} does not translate ({exc.stage1})") from None
        tables = s.v.tables(g.memory)                                  # type: ignore[union-attr]
        store_at = t.descriptor_address
        original = g.memory.read_u64(store_at)
        while t.page_size != FRAME_SIZE:
            tables.split(op.va)
            t = tables.translate(op.va)
        self._stage_remap_store(op, store_at, original, t.descriptor_address, t.descriptor, _A64_OA)

    # ---------------------------------------------------------------- emulation
    def _emulate(self, s: _VState, op: Op, eflags: int, data: bytes | None) -> None:
        """hvm_emulate_one_vm_event: the instruction runs in Xen's emulator,
        which reads and writes through the host p2m with no EPT checks."""
        if eflags & F_READ_DATA:
            kind = "data"
        elif eflags & F_NOWRITE:
            kind = "nowrite"
        elif eflags & F_INSN_DATA:
            kind = "insn"
        else:
            kind = "normal"
        op.emulated = True
        v = s.v
        k = op.kind
        if k in ("read", "write", "rmw", "remap"):
            need = {"read": R, "write": W, "remap": W, "rmw": R | W}[k]
            pieces = []
            pos = 0
            while pos < op.size:
                a = op.va + pos
                res = self.guest.walk_fast(v.cr3, a, None, bool(need & W), False,
                                           bool(v.cr0 & CR0.WP), True)
                if type(res) is TranslationFault:
                    self._fault(s, op, res.fault)
                    return
                pa = res[0]
                n = min(op.size - pos, FRAME_SIZE - (a & FRAME_MASK))
                pieces.append((pa >> FRAME_SHIFT, pa & FRAME_MASK, n, pa >> FRAME_SHIFT))
                pos += n
            self._complete_data(s, op, pieces, need, view_frames=False, write=kind != "nowrite",
                                read_data=data if kind == "data" else None)
            self._finish(s, op, native=False)
        elif k in ("exec", "int3"):
            if kind == "insn" and data is not None:
                byte = data[0]
            elif k == "int3":
                byte = 0xCC
            else:
                w = self.guest.walk(v.cr3, op.va)
                byte = self.guest.memory.read(w.pa, 1)[0]
            if byte == 0xCC:
                self._fault(s, op, GuestFault(3, "#BP"), took_effect=k == "int3")
                return
            op.result = byte
            op.took_effect = k == "exec"
            v.rip = op.rip + 1
            self._finish(s, op, native=False)
        elif k in ("lidt", "lgdt"):
            base, limit = op.base, op.limit
            if kind == "data" and data is not None:
                blob = data[:10] + bytes(max(0, 10 - len(data)))
                limit, base = struct.unpack("<HQ", blob)
            self._load_desc(v, k, base, limit)
            op.took_effect = (base, limit) == (op.base, op.limit)
            op.result = (base, limit)
            v.rip = op.rip + op.insn_len
            self._finish(s, op, native=False)
        elif k in ("sidt", "sgdt"):
            op.result = self._store_desc(v, k)
            op.took_effect = True
            v.rip = op.rip + op.insn_len
            self._finish(s, op, native=False)
        # other reasons never reach here: EMULATE is ignored for them

    @staticmethod
    def _load_desc(v: VCpu, kind: str, base: int, limit: int) -> None:
        if kind == "lidt":
            v.idtr_base, v.idtr_limit = base, limit & 0xFFFF
        else:
            v.gdtr_base, v.gdtr_limit = base, limit & 0xFFFF

    @staticmethod
    def _store_desc(v: VCpu, kind: str) -> tuple[int, int]:
        return (v.idtr_base, v.idtr_limit) if kind == "sidt" else (v.gdtr_base, v.gdtr_limit)

    # ---------------------------------------------------------------- int3 / debug / smc
    def _breakpoint(self, s: _VState, op: Op) -> None:
        v = s.v
        if self._mon.get("software_breakpoint") and self._p.x86:
            u = _U_DEBUG.pack(self._gfn_of(s, v.rip), 0, 1, ET_SW_EXC)
            if self._send(s, op, RS_SWBP, u, True):
                return
        # no monitor (or no ring): the #BP is the guest's [doc §1.5]
        self._fault(s, op, GuestFault(3, "#BP", None, v.rip), took_effect=op.kind == "int3")

    def _op_icebp(self, s: _VState, op: Op) -> None:
        v = s.v
        if "debug_exception" in self._mon:
            sync = self._mon["debug_exception"]
            u = _U_DEBUG.pack(self._gfn_of(s, v.rip), 0, 1, ET_PRI_SW_EXC)

            def after(rc: int) -> None:
                if rc == 2:   # async: the #DB reaches the guest as well
                    self._fault(s, op, GuestFault(1, "#DB", None, v.rip), took_effect=True)
            if self._send(s, op, RS_DEBUG, u, sync, after):
                return
        self._fault(s, op, GuestFault(1, "#DB", None, v.rip), took_effect=True)

    def _op_smc(self, s: _VState, op: Op) -> None:
        if self._p.x86:
            raise ValueError("smc is an arm64 instruction")
        if self._mon.get("privileged_call"):
            if self._send(s, op, RS_PRIVCALL, _U_PAD, True):
                return      # PC is not advanced: the monitor must move it [doc §1.11]
        op.took_effect = True
        s.v.rip = op.rip + 4
        self._finish(s, op, native=False)

    def _op_guest_request(self, s: _VState, op: Op) -> None:
        v = s.v

        def finish(rc: int = 0) -> None:
            if self._a64:
                v.x[0] = 0                      # the hypercall's return value (HVC returns in x0)
            else:
                v.gpr["rax"] = 0
            v.rip = op.rip + op.insn_len
            op.took_effect = True
            self._finish(s, op, native=False)
        if "guest_request" in self._mon:
            if self._send(s, op, RS_GUEST_REQUEST, _U_PAD, self._mon["guest_request"], finish):
                return
        finish()

    # ---------------------------------------------------------------- cpuid
    def _op_cpuid(self, s: _VState, op: Op) -> None:
        v = s.v
        g = v.gpr
        leaf = g["rax"] & 0xFFFFFFFF
        subleaf = g["rcx"] & 0xFFFFFFFF
        a, b, c, d = _cpuid(leaf, subleaf, self._p)
        g["rax"], g["rbx"], g["rcx"], g["rdx"] = a, b, c, d   # executed before the event [doc §0.6]
        op.result = (a, b, c, d)
        if self._mon.get("cpuid") and self._p.x86:
            if self._send(s, op, RS_CPUID, _U_CPUID.pack(op.insn_len, leaf, subleaf, 0), True):
                return
        op.took_effect = True
        v.rip = op.rip + op.insn_len
        self._finish(s, op, native=False)

    # ---------------------------------------------------------------- descriptor tables
    def _op_desc(self, s: _VState, op: Op) -> None:
        if not self._p.x86:
            raise ValueError(f"{op.kind} is an x86 instruction")
        v = s.v
        kind = op.kind
        if self._mon.get("descriptor_access"):
            is_idt = kind in ("lidt", "sidt")
            is_load = kind in ("lidt", "lgdt")
            info = ((1 if is_idt else 0) << 28 | (1 if is_load else 0) << 29) if self.capabilities().arch == "x86_64" else 0
            u = _U_DESC.pack(info, 0, 1 if is_idt else 2, 1 if is_load else 0)
            if self._send(s, op, RS_DESC, u, True):
                return        # nothing else happens until EMULATE [doc §1.7]
        if kind in ("lidt", "lgdt"):
            self._load_desc(v, kind, op.base, op.limit)
            op.result = (op.base, op.limit)
        else:
            op.result = self._store_desc(v, kind)
        op.took_effect = True
        v.rip = op.rip + op.insn_len
        self._finish(s, op, native=False)

    # ---------------------------------------------------------------- control registers
    def _cr_precheck(self, s: _VState, name: str, value: int) -> tuple[int, GuestFault | None]:
        v = s.v
        gp = GuestFault(13, "#GP", 0)
        if name == "cr0":
            if value >> 32:
                return value, gp
            value |= CR0.ET
            if value & CR0.PG and not value & CR0.PE:
                return value, gp
        elif name == "cr4":
            if value & ~CR4.VALID or (not value & CR4.PAE and v.msrs.get(0xC0000080, 0) & EFER.LMA):
                return value, gp
        elif name == "cr3":
            if value >> 52:
                return value, gp
        elif name == "xcr0":
            if not value & 1 or (value & 4 and not value & 2) or value >> 20:
                return value, gp
        return value, None

    def _set_cr(self, s: _VState, name: str, value: int) -> GuestFault | None:
        """The write itself (hvm_set_crN with may_defer = false)."""
        v = s.v
        if name == "cr0":
            if not value & CR0.PG and v.msrs.get(0xC0000080, 0) & EFER.LMA:
                return GuestFault(13, "#GP", 0)
            v.cr0 = value
        elif name == "cr4":
            v.cr4 = value
        elif name == "cr3":
            v.cr3 = value
        elif name == "xcr0":
            v.xcr0 = value
        return None

    def _op_write_cr(self, s: _VState, op: Op) -> None:
        v = s.v
        name = op.reg
        if name not in CR_INDEX or not self._p.x86:
            raise ValueError(f"write_cr: unknown register '{name}'")
        value, fault = self._cr_precheck(s, name, op.value & 0xFFFFFFFFFFFFFFFF)
        if fault is not None:
            self._fault(s, op, fault)
            return
        idx = CR_INDEX[name]
        old = getattr(v, name)
        mon = self._cr_mon.get(idx)
        fire = mon is not None and (not mon[1] or value != old) and ((value ^ old) & ~mon[2])
        if name == "xcr0":
            def write_xcr0(rc: int = 0) -> None:      # the event never defers XSETBV [doc §1.3]
                self._set_cr(s, name, value)
                op.took_effect = True
                v.rip = op.rip + op.insn_len
                self._finish(s, op, native=False)
            if fire and self._send(s, op, RS_CTRLREG, _U_CR.pack(idx, value, old), mon[0], write_xcr0):
                return
            write_xcr0()
            return

        def after(rc: int) -> None:
            v.rip = op.rip + op.insn_len              # MOV to CR is DONE at exit [doc §1.3]
            if self.crv:
                s.do_write[name] = (value, op)        # held back until resume, unless denied
                if rc == 1:
                    op.phase = _FINISH
                else:                                  # async: applied at the very next entry
                    self._apply_deferred(s)
                    self._finish(s, op, native=False)
            else:
                self._write_now(s, op, name, value)

        if fire:
            rc = self._send(s, op, RS_CTRLREG, _U_CR.pack(idx, value, old), mon[0], after)
            if rc:
                return
        v.rip = op.rip + op.insn_len
        self._write_now(s, op, name, value)

    def _write_now(self, s: _VState, op: Op, name: str, value: int) -> None:
        self._register_write_done(s, op, self._set_cr(s, name, value))

    def _register_write_done(self, s: _VState, op: Op, fault: GuestFault | None) -> None:
        """A CR or MSR write has been tried: the guest takes its fault, or the write took effect."""
        if fault is not None:
            self._fault(s, op, fault)
            return
        op.took_effect = True
        self._finish(s, op, native=False)

    # ---------------------------------------------------------------- MSRs
    def _msr_check(self, msr: int, value: int) -> GuestFault | None:
        if msr not in MSR_NAMES:
            return GuestFault(13, "#GP", 0)
        if msr in (0xC0000082, 0xC0000083, 0xC0000100, 0xC0000101, 0xC0000102, 0x175, 0x176):
            top = value >> 47
            if top not in (0, 0x1FFFF):
                return GuestFault(13, "#GP", 0)
        if msr == 0xC0000080 and value & ~(EFER.SCE | EFER.LME | EFER.LMA | EFER.NXE | (1 << 12) | (1 << 14) | (1 << 15)):
            return GuestFault(13, "#GP", 0)
        return None

    def _set_msr(self, s: _VState, msr: int, value: int) -> GuestFault | None:
        fault = self._msr_check(msr, value)
        if fault is None:
            s.v.msrs[msr] = value
        return fault

    def _op_wrmsr(self, s: _VState, op: Op) -> None:
        v = s.v
        if not self._p.x86:
            raise ValueError("wrmsr is an x86 instruction")
        msr = op.msr if op.msr is not None else 0
        value = op.value & 0xFFFFFFFFFFFFFFFF
        if msr not in MSR_NAMES:
            self._fault(s, op, GuestFault(13, "#GP", 0))
            return
        onchange = self._msr_mon.get(msr)
        old = v.msrs.get(msr, 0)
        if onchange is not None and (not onchange or value != old):
            def after(rc: int) -> None:
                v.rip = op.rip + op.insn_len
                if self.crv:
                    s.do_write["msr"] = (msr, value, op)
                    op.phase = _FINISH
                else:
                    self._msr_now(s, op, msr, value)
            if self._send(s, op, RS_MSR, _U_MSR.pack(msr, value, old), True, after):
                return
        v.rip = op.rip + op.insn_len
        self._msr_now(s, op, msr, value)

    def _msr_now(self, s: _VState, op: Op, msr: int, value: int) -> None:
        self._register_write_done(s, op, self._set_msr(s, msr, value))

    def __repr__(self) -> str:
        return f"SimulatedXen({self.name!r}, profile={self.profile!r}, vcpus={self._nvcpus})"


# --------------------------------------------------------------------------- CPUID

def _regs4(text: str) -> tuple[int, int, int]:
    raw = text.encode("ascii")
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def _cpuid(leaf: int, subleaf: int, profile: Profile) -> tuple[int, int, int, int]:
    """A small, plausible guest CPUID (what Xen's policy would give a PVH/HVM guest)."""
    if leaf == 0:
        vendor = "GenuineIntel" if profile.name == "x86_64" else "AuthenticAMD"
        b, d, c = _regs4(vendor)
        return 0xD, b, c, d
    if leaf == 1:
        return 0x000906EA, 0x00000800, 0xFEDA3203 | (1 << 31), 0x178BFBFF
    if leaf == 7 and subleaf == 0:
        return 0, (1 << 7) | (1 << 20) | (1 << 0), 0, 0       # SMEP, SMAP, FSGSBASE
    if leaf == 0x40000000:
        b, c, d = _regs4("XenVMMXenVMM")
        return 0x40000005, b, c, d
    if leaf == 0x80000000:
        return 0x80000008, 0, 0, 0
    if leaf == 0x80000001:
        return 0, 0, 0x121, 0x2C100800                         # LM, NX, SYSCALL
    return 0, 0, 0, 0
