"""The vm_event ring and its event channel, Xen's side and the monitor's: requests put (with the
ring throttle and the wait queue for a slot), the Backend's ring calls, and the echo responders.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, Callable, Iterable

from ...native import abi
from ..backend import BackendError
from ...native.constants import F_ALTP2M, F_EMULATE, F_PAUSED, VERSION
from .xen_abi import (ARM_PAD, CS_AR, GPR_GET, HDR24, MSR_GET1, MSR_GET2, MSR_SET1, MSR_SET2,
                      REGS_ARM, REGS_X86, SEL_GET, SS_AR)
from ..vm_event_layout import echo_response
from .xen_state import Op, VState


def echo_responder(flags: int = F_EMULATE) -> Callable[[Any], None]:
    """A trivial monitor: answer everything with the echo and ``flags``."""
    def respond(xen: Any) -> None:
        while xen.unconsumed_requests():
            reqs = xen.take_requests(8)
            xen.put_responses([echo_response(r, flags) for r in reqs])
            xen.notify()
    return respond


class RingMixin:
    """SimulatedXen's ring: the Backend's ring calls and Xen putting requests on it."""

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

    @property
    def ring(self) -> abi.Ring | None:
        return self._ring

    def free_slots(self) -> int:
        return self._ring.free_requests if self._ring is not None else 0

    def unconsumed_requests(self) -> int:
        return self._ring.unconsumed_requests if self._ring is not None else 0

    def _send(self, s: VState, op: Op, reason: int, u: bytes, sync: bool,
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

    def _put(self, s: VState, reason: int, u: bytes, sync: bool, op: Op | None) -> int:
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

    def _pack(self, s: VState, reason: int, flags: int, idx: int, u: bytes) -> bytes:
        v = s.v
        if len(u) != 32:
            u = u.ljust(32, b"\0")
        head = HDR24.pack(VERSION, flags, reason, s.index, idx) + u
        if self._a64:
            return head + REGS_ARM.pack(v.ttbr0, v.ttbr1, v.tcr, v.rip, v.cpsr) + ARM_PAD
        if not self._p.x86:
            return head + REGS_ARM.pack(v.cr3, v.cr3, 0, v.rip, 0x3C5) + ARM_PAD
        m = v.msrs
        try:
            sysenter_efer_star_lstar = MSR_GET1(m)
            fs_gs = MSR_GET2(m)
            shadow_gs = m[0xC0000102]
        except KeyError:
            sysenter_efer_star_lstar = tuple(m.get(i, 0) for i in MSR_SET1)
            fs_gs = tuple(m.get(i, 0) for i in MSR_SET2)
            shadow_gs = m.get(0xC0000102, 0)
        sel = v.sel
        return head + REGS_X86.pack(
            *GPR_GET(v.gpr), v.rflags, v.dr6, v.dr7, v.rip, v.cr0, v.cr2, v.cr3, v.cr4,
            *sysenter_efer_star_lstar, v.gdtr_base, 0, 0xFFFFFFFFFFFFFFFF,
            0, 0, 0, 0, *fs_gs, CS_AR, SS_AR, 0, 0, 0, 0,
            shadow_gs, v.gdtr_limit & 0xFFFF, *SEL_GET(sel), 0)

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
