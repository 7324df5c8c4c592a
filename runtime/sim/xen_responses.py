"""Responses: vm_event_resume consuming the ring's responses and applying their flags in Xen's order,
what happens at the next VM entry (registers, emulation, deferred writes, injection), the emulator.
"""

from __future__ import annotations

import struct

from ..guest_memory import FRAME_MASK, FRAME_SHIFT, FRAME_SIZE
from .guest import CR0, GPRS, GuestFault, TranslationFault, VCpu
from ...native.constants import (F_ALTP2M, F_DENY, F_EMULATE, F_FAST_SS, F_INSN_DATA, F_NOWRITE, F_PAUSED,
                                 F_READ_DATA, F_SET_REGS, F_TOGGLE_SS, RS_DESCRIPTOR_ACCESS, RS_MEM_ACCESS,
                                 RS_MOV_TO_MSR, RS_SOFTWARE_BREAKPOINT, RS_WRITE_CTRLREG, VERSION)
from .xen_abi import GPRS_IN, HDR, OFF_EMUL_READ, OFF_REGS_RIP, U_MEM
from .xen_state import ALLOWED, PHASE_EXEC, PHASE_FINISH, R, W, Op, VState


class ResponseMixin:
    """SimulatedXen consuming responses and entering the guest again."""

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
                version, flags, reason, vcpu_id, altp2m_idx = HDR.unpack_from(raw, 0)
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

    def _rsp_x86(self, s: VState, raw: bytes, flags: int, reason: int, altp2m_idx: int) -> None:
        # 1. emulate check [xen arch/x86/vm_event.c vm_event_emulate_check]
        if flags & F_EMULATE:
            if reason == RS_MEM_ACCESS:
                gfn, _off, _gla, mflags = U_MEM.unpack_from(raw, 24)
                if self._still_violates(s, gfn, mflags):
                    s.emulate = (flags, self._read_data(raw) if flags & F_READ_DATA else None)
            elif reason == RS_SOFTWARE_BREAKPOINT:
                if flags & F_INSN_DATA:
                    s.emulate = (flags, raw[56:72])
            elif reason == RS_DESCRIPTOR_ACCESS:
                s.emulate = (flags, self._read_data(raw) if flags & F_READ_DATA else None)
        else:
            s.emulate = None
        # 2. DENY [xen arch/x86/vm_event.c vm_event_register_write_resume]
        if flags & F_DENY:
            if reason == RS_MOV_TO_MSR:
                s.do_write.pop("msr", None)
            elif reason == RS_WRITE_CTRLREG:
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
            s.set_gprs = GPRS_IN.unpack_from(raw, 56)[:17] + struct.unpack_from("<Q", raw, OFF_REGS_RIP)

    @staticmethod
    def _read_data(raw: bytes) -> bytes:
        size = min(struct.unpack_from("<I", raw, 56)[0], 340)
        return raw[OFF_EMUL_READ:OFF_EMUL_READ + size]

    def _enter(self, s: VState) -> None:
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
        if op is not None and op.phase == PHASE_EXEC and op.started and v.rip != op.rip:
            # the monitor moved RIP past (or away from) the instruction: it is skipped
            s.emulate = None
            op.took_effect = op.kind == "cpuid"     # CPUID had already executed [doc §0.6]
            op.note = op.note or "skipped by the monitor (RIP moved)"
            self._finish(s, op, native=False)
            op = s.queue[0] if s.queue else None
        if s.emulate is not None:
            eflags, data = s.emulate
            s.emulate = None
            if op is not None and op.phase == PHASE_EXEC and op.started:
                self._emulate(s, op, eflags, data)
        if s.do_write:
            self._apply_deferred(s)
        if op is not None and op.phase == PHASE_FINISH and not op.done:
            self._finish(s, op, native=False)
        if s.inject is not None:
            fault = s.inject
            head = s.queue[0] if s.queue else None
            if self._p.x86 and not self._a64 and self._delivery_traps(s, head, fault.vector):
                # Delivery trapped (its mem_access event is out, the vCPU waits). A hardware exception
                # is injected again at the next entry; a software one (int3) is not: the instruction
                # runs again [xen arch/x86/hvm/hvm.c hvm_event_needs_reinjection]. Seen live [doc §10.1].
                if s.inject_sw:
                    s.inject = None
                return
            s.inject = None
            if head is not None and head.started and not head.done:
                took = (head.kind == "int3" and fault.vector == 3) or (head.kind in ("icebp", "trap_flag")
                                                                       and fault.vector == 1)
                self._fault(s, head, fault, took_effect=took)
            else:
                v.faults.append(fault)
                if s.last_op is not None:
                    s.last_op.faults.append(fault)
            if s.single_step and self._p.singlestep and (head or s.last_op) is not None:
                # MTF: an exit is pending on the boundary after an injected event's delivery (SDM 26.7.2)
                self._mtf(s, head or s.last_op)

    def _delivery_traps(self, s: VState, op: Op | None, vector: int) -> bool:
        """The reads of an exception's delivery, checked against the vCPU's view: the IDT gate, then the
        descriptor of its code segment in the GDT (the exception frame's stores are not modelled).
        True when one violated the view's access: its mem_access event is out."""
        v = s.v
        gate = v.idtr_base + vector * (16 if v.msrs.get(0xC0000080, 0) & 0x400 else 8)    # EFER.LMA
        if self._implicit_read_traps(s, op, gate):
            return True
        try:
            selector = int.from_bytes(self.read_guest(s.index, gate + 2, 2), "little")
        except TranslationFault:
            return False
        return self._implicit_read_traps(s, op, v.gdtr_base + (selector & ~7))

    def _implicit_read_traps(self, s: VState, op: Op | None, gla: int) -> bool:
        p2m = self._cur(s)
        host = p2m is self._host
        res = self.guest.walk_fast(s.v.cr3, gla, None if host else p2m.frame, False, False, True, True)
        if type(res) is TranslationFault:
            return False
        pa = res[0]
        gfn = pa >> FRAME_SHIFT
        code = p2m.access.get(gfn, p2m.default if host else -1)
        if code >= 0 and ALLOWED[code] & R:
            return False
        return self._ept(s, op, gfn, R, gla, pa & FRAME_MASK, False)

    def _apply_deferred(self, s: VState) -> None:
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

    def _inject_now(self, s: VState, op: Op, fault: GuestFault) -> None:
        s.v.faults.append(fault)
        op.faults.append(fault)
        op.took_effect = False

    def _emulate(self, s: VState, op: Op, eflags: int, data: bytes | None) -> None:
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
        elif k in ("lidt", "lgdt", "lldt", "ltr"):
            base, limit = op.base, op.limit
            if kind == "data" and data is not None and k in ("lidt", "lgdt"):
                blob = data[:10] + bytes(max(0, 10 - len(data)))
                limit, base = struct.unpack("<HQ", blob)
            self._load_desc(v, k, base, limit)
            op.took_effect = (base, limit) == (op.base, op.limit)
            op.result = (base, limit)
            v.rip = op.rip + op.insn_len
            self._finish(s, op, native=False)
        elif k in ("sidt", "sgdt", "sldt", "str"):
            op.result = self._store_desc(v, k)
            op.took_effect = True
            v.rip = op.rip + op.insn_len
            self._finish(s, op, native=False)

    @staticmethod
    def _load_desc(v: VCpu, kind: str, base: int, limit: int) -> None:
        """A descriptor-table register loaded; LLDT and LTR load a selector (`base`)."""
        if kind == "lidt":
            v.idtr_base, v.idtr_limit = base, limit & 0xFFFF
        elif kind == "lgdt":
            v.gdtr_base, v.gdtr_limit = base, limit & 0xFFFF
        elif kind == "lldt":
            v.ldtr = base & 0xFFFF
        else:
            v.tr = base & 0xFFFF

    @staticmethod
    def _store_desc(v: VCpu, kind: str) -> tuple[int, int]:
        return {"sidt": (v.idtr_base, v.idtr_limit), "sgdt": (v.gdtr_base, v.gdtr_limit),
                "sldt": (v.ldtr, 0), "str": (v.tr, 0)}[kind]
