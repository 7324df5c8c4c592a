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

Where it lives: this class holds the domain (its vCPUs, p2ms, monitors and ring) and the Backend's
discovery, pausing and register calls; each other responsibility is a mixin of its own module:
`xen_access` (mem_access, altp2m, the EPT check), `xen_ring` (the ring and its event channel),
`xen_monitors` (monitors and the instructions they trap), `xen_responses` (responses and VM
entry), `xen_memory` (data accesses and fetches), `xen_run` (the vCPUs running their operations).
Profiles are in `xen_profiles`, the ABI's layouts in `xen_abi`, the state's types in `xen_state`.

Performance: the per-event path packs requests with precomputed
`struct.Struct`s at offsets checked against the cffi layout at import, looks
permissions up in per-view dicts, and never parses text.
"""

from __future__ import annotations

import errno as _errno
import uuid
from collections import deque
from typing import Any, Mapping

from ...arch import EXCEPTION_VECTORS
from ...native import abi
from ..backend import BackendError, Capabilities, InvalidArgument, Unsupported
from .guest import Guest, GuestFault, VCpu
from ..guest_memory import FRAME_SHIFT
from ...native.constants import VERSION
from .xen_access import AccessMixin
from .xen_memory import MemoryMixin
from .xen_monitors import MonitorMixin
from .xen_profiles import PROFILES
from .xen_responses import ResponseMixin
from ..vm_event_layout import echo_response
from .xen_ring import RingMixin, echo_responder
from .xen_run import RunMixin
from .xen_state import A_RWX, P2M, R, W, X, Op, VState

__all__ = ["SimulatedXen", "Op", "PROFILES", "echo_response", "echo_responder",
           "R", "W", "X"]

_VECTOR_NAMES = {vector: name for name, vector in EXCEPTION_VECTORS.items()}


class SimulatedXen(AccessMixin, RingMixin, MonitorMixin, ResponseMixin, MemoryMixin, RunMixin):
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
        self._vs = [VState(v) for v in guest.vcpus]
        self._nvcpus = len(self._vs)
        self._host = P2M(None, A_RWX)
        self._altp2m = False
        self._views: list[P2M | None] = [None] * max(self.max_views, 1)
        self._domain_pause = 0
        self.crashed: str | None = None
        # monitors
        self._cr_mon: dict[int, tuple[bool, bool, int]] = {}     # index -> (sync, onchangeonly, mask)
        self._msr_mon: dict[int, bool] = {}                       # msr -> onchangeonly
        self._mon: dict[str, bool] = {}                           # kind -> sync
        # the ring
        self._ring: abi.Ring | None = abi.Ring()
        self._waitq: deque[VState] = deque()
        self._runq: list[VState] = []
        self._blocked = 0
        self._last_wake = -1
        self._evtchn = False
        self.requests_put = 0
        self.ring_full_stalls = 0
        self.responses_consumed = 0
        self.dropped_responses: list[bytes] = []
        self._closed = False

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

    def pause(self) -> None:
        self._domain_pause += 1

    def unpause(self) -> None:
        if not self._domain_pause:
            raise InvalidArgument("unpause", "domain is not paused", _errno.EINVAL)
        self._domain_pause -= 1
        if not self._domain_pause:
            self._run_all()

    @property
    def domain_pauses(self) -> int:
        """How many times the domain is paused (`pause` without its `unpause`)."""
        return self._domain_pause

    def is_paused(self, vcpu: int) -> bool:
        s = self._vs[vcpu]
        return bool(s.pause or s.blocked or s.waiting or self._domain_pause or self.crashed)

    def paused_vcpus(self) -> frozenset[int]:
        if self._domain_pause or self.crashed:
            return frozenset(range(self._nvcpus))
        return frozenset(s.index for s in self._vs if s.pause or s.blocked or s.waiting)

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
            s.inject_sw = software
        if self._runnable(s):
            self._runq.append(s)
            self._drain()

    def vcpu(self, index: int) -> VCpu:
        return self._vcpu(index).v

    def current_view(self, vcpu: int) -> int:
        return self._vcpu(vcpu).view if self._altp2m else 0

    def single_stepping(self, vcpu: int) -> bool:
        return self._vcpu(vcpu).single_step

    def _vcpu(self, index: int) -> VState:
        if not 0 <= index < self._nvcpus:
            raise InvalidArgument("vcpu", f"no vCPU {index}", _errno.EINVAL)
        return self._vs[index]

    def _runnable(self, s: VState) -> bool:
        return not (s.pause or s.blocked or s.waiting or self._domain_pause or self.crashed)

    def _crash(self, why: str) -> None:
        self.crashed = why

    def __repr__(self) -> str:
        return f"SimulatedXen({self.name!r}, profile={self.profile!r}, vcpus={self._nvcpus})"
