"""The vCPUs running: operations queued per vCPU, each attempted in turn until it finishes, stops on
an event, faults or livelocks; the MTF exit after a natively retired instruction.
"""

from __future__ import annotations

from typing import Any

from ..guest_memory import FRAME_SHIFT
from .guest import MSR, GuestFault, TranslationFault
from ...native.constants import RS_SINGLESTEP
from .xen_abi import U_SS
from .xen_profiles import DESC_OPS, X86_ONLY
from .xen_state import PHASE_FINISH, R, W, Op, VState


class RunMixin:
    """SimulatedXen running its vCPUs' operations."""

    def execute(self, vcpu: int, op: Op) -> Op:
        """Queue `op` on `vcpu` and run the vCPU as far as it can go."""
        s = self._vcpu(vcpu)
        # Refused before the op is queued: a queued op that cannot run would fail again at every resume.
        if (self._a64 or not self._p.x86) and op.kind in X86_ONLY:
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

    def pending_ops(self, vcpu: int) -> int:
        return len(self._vcpu(vcpu).queue)

    def _run_all(self) -> None:
        self._runq.extend(self._vs)
        self._drain()

    def _run(self, s: VState) -> None:
        queue = s.queue
        while queue and self._runnable(s):
            op = queue[0]
            if op.done:
                queue.popleft()
                continue
            if op.phase == PHASE_FINISH:      # waiting for a resume that already happened
                self._finish(s, op, native=False)
                continue
            self._attempt(s, op)
            if not op.done:
                break

    def _finish(self, s: VState, op: Op, *, native: bool) -> None:
        op.done = True
        if s.queue and s.queue[0] is op:
            s.queue.popleft()
        if native and s.single_step and self._p.singlestep:
            self._mtf(s, op)

    def _mtf(self, s: VState, op: Op) -> None:
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
        self._send(s, op, RS_SINGLESTEP, U_SS.pack(gfn), True)

    def _gfn_of(self, s: VState, va: int) -> int:
        try:
            if self._a64:
                return self.guest.walk_vcpu(s.v, va)[0].pa >> FRAME_SHIFT   # type: ignore[attr-defined]
            return self.guest.walk(s.v.cr3, va).pa >> FRAME_SHIFT
        except TranslationFault:
            return 0xFFFFFFFFFFFFFFFF

    def _fault(self, s: VState, op: Op, fault: GuestFault, *, took_effect: bool = False) -> None:
        v = s.v
        if fault.vector == 14 and fault.address is not None:
            v.cr2 = fault.address
        v.faults.append(fault)
        op.faults.append(fault)
        op.took_effect = took_effect
        self._finish(s, op, native=False)

    def _start(self, s: VState, op: Op) -> None:
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

    def _attempt(self, s: VState, op: Op) -> None:
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
        elif kind in DESC_OPS:
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
        elif kind == "trap_flag":
            self._op_trap_flag(s, op)
        elif kind == "smc":
            self._op_smc(s, op)
        else:  # pragma: no cover
            raise ValueError(kind)

    def _livelock(self, s: VState, op: Op) -> None:
        op.livelock = True
        op.took_effect = False
        op.note = "livelock: the instruction re-faults with no progress"
        self._finish(s, op, native=False)
