"""The monitors (write_ctrlreg, mov_to_msr, and the on/off ones) and the monitored instructions they
trap: int3, icebp, smc, guest requests, CPUID, descriptor-table loads and stores, CR and MSR writes.
"""

from __future__ import annotations

import errno as _errno
from typing import Mapping

from ..backend import ALWAYS_SYNC_MONITORS, ON_OFF_MONITORS, BackendError, InvalidArgument, Unsupported
from .guest import CR0, CR4, EFER, MSR_NAMES, GuestFault
from ...native.constants import (CR_INDEX, ET_HW_EXC, ET_PRI_SW_EXC, ET_SW_EXC, RS_CPUID, RS_DEBUG_EXCEPTION,
                                 RS_DESCRIPTOR_ACCESS, RS_GUEST_REQUEST, RS_MOV_TO_MSR, RS_PRIVILEGED_CALL,
                                 RS_SOFTWARE_BREAKPOINT, RS_WRITE_CTRLREG)
from .xen_abi import U_CPUID, U_CR, U_DEBUG, U_DESC, U_MSR, U_PAD
from .xen_profiles import DESC_OPS, cpuid_values
from .xen_state import PHASE_FINISH, Op, VState

_CR_NAME = {index: name for name, index in CR_INDEX.items()}


class MonitorMixin:
    """SimulatedXen's monitor calls and the monitored instructions."""

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

    def monitor(self, kind: str, enable: bool, *, sync: bool = True) -> None:
        if kind not in ON_OFF_MONITORS:
            raise InvalidArgument("monitor", f"unknown monitor '{kind}'", _errno.EINVAL)
        self._mon_errors("monitor", kind)
        if (kind in self._mon) == enable:
            raise BackendError("monitor", f"{kind} monitor already {'enabled' if enable else 'disabled'}",
                               _errno.EEXIST)
        if enable:
            self._mon[kind] = True if kind in ALWAYS_SYNC_MONITORS else sync
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

    def _breakpoint(self, s: VState, op: Op) -> None:
        v = s.v
        if self._mon.get("software_breakpoint") and self._p.x86:
            u = U_DEBUG.pack(self._gfn_of(s, v.rip), 0, 1, ET_SW_EXC)
            if self._send(s, op, RS_SOFTWARE_BREAKPOINT, u, True):
                return
        # no monitor (or no ring): the #BP is the guest's [doc §1.5]
        self._fault(s, op, GuestFault(3, "#BP", None, v.rip), took_effect=op.kind == "int3")

    def _op_icebp(self, s: VState, op: Op) -> None:
        self._debug_trap(s, op, ET_PRI_SW_EXC, 1, 0)

    def _op_trap_flag(self, s: VState, op: Op) -> None:
        """The single-step trap of an instruction retired with RFLAGS.TF set, at the next one: a #DB of
        hardware type with no instruction length (read only for software types) and pending_dbg 0 (on
        VMX 4.17 always 0; DR6.BS went into the guest's DR6 at the exit) [doc §1.9]."""
        self._debug_trap(s, op, ET_HW_EXC, 0, 0)

    def _debug_trap(self, s: VState, op: Op, etype: int, length: int, pending_dbg: int) -> None:
        v = s.v
        if "debug_exception" in self._mon:
            sync = self._mon["debug_exception"]
            u = U_DEBUG.pack(self._gfn_of(s, v.rip), pending_dbg, length, etype)

            def after(rc: int) -> None:
                if rc == 2:   # async: the #DB reaches the guest as well
                    self._fault(s, op, GuestFault(1, "#DB", None, v.rip), took_effect=True)
            if self._send(s, op, RS_DEBUG_EXCEPTION, u, sync, after):
                return
        self._fault(s, op, GuestFault(1, "#DB", None, v.rip), took_effect=True)

    def _op_smc(self, s: VState, op: Op) -> None:
        if self._p.x86:
            raise ValueError("smc is an arm64 instruction")
        if self._mon.get("privileged_call"):
            if self._send(s, op, RS_PRIVILEGED_CALL, U_PAD, True):
                return      # PC is not advanced: the monitor must move it [doc §1.11]
        op.took_effect = True
        s.v.rip = op.rip + 4
        self._finish(s, op, native=False)

    def _op_guest_request(self, s: VState, op: Op) -> None:
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
            if self._send(s, op, RS_GUEST_REQUEST, U_PAD, self._mon["guest_request"], finish):
                return
        finish()

    def _op_cpuid(self, s: VState, op: Op) -> None:
        v = s.v
        g = v.gpr
        leaf = g["rax"] & 0xFFFFFFFF
        subleaf = g["rcx"] & 0xFFFFFFFF
        a, b, c, d = cpuid_values(leaf, subleaf, self._p)
        g["rax"], g["rbx"], g["rcx"], g["rdx"] = a, b, c, d   # executed before the event [doc §0.6]
        op.result = (a, b, c, d)
        if self._mon.get("cpuid") and self._p.x86:
            if self._send(s, op, RS_CPUID, U_CPUID.pack(op.insn_len, leaf, subleaf, 0), True):
                return
        op.took_effect = True
        v.rip = op.rip + op.insn_len
        self._finish(s, op, native=False)

    def _op_desc(self, s: VState, op: Op) -> None:
        if not self._p.x86:
            raise ValueError(f"{op.kind} is an x86 instruction")
        v = s.v
        kind = op.kind
        desc, is_load, identity = DESC_OPS[kind]
        if self._mon.get("descriptor_access"):
            info = identity << 28 if self.capabilities().arch == "x86_64" else 0
            u = U_DESC.pack(info, 0, desc, 1 if is_load else 0)
            if self._send(s, op, RS_DESCRIPTOR_ACCESS, u, True):
                return        # nothing else happens until EMULATE [doc §1.7]
        if is_load:
            self._load_desc(v, kind, op.base, op.limit)
            op.result = (op.base, op.limit)
        else:
            op.result = self._store_desc(v, kind)
        op.took_effect = True
        v.rip = op.rip + op.insn_len
        self._finish(s, op, native=False)

    def _cr_precheck(self, s: VState, name: str, value: int) -> tuple[int, GuestFault | None]:
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

    def _set_cr(self, s: VState, name: str, value: int) -> GuestFault | None:
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

    def _op_write_cr(self, s: VState, op: Op) -> None:
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
            if fire and self._send(s, op, RS_WRITE_CTRLREG, U_CR.pack(idx, value, old), mon[0], write_xcr0):
                return
            write_xcr0()
            return

        def after(rc: int) -> None:
            v.rip = op.rip + op.insn_len              # MOV to CR is DONE at exit [doc §1.3]
            if self.crv:
                s.do_write[name] = (value, op)        # held back until resume, unless denied
                if rc == 1:
                    op.phase = PHASE_FINISH
                else:                                  # async: applied at the very next entry
                    self._apply_deferred(s)
                    self._finish(s, op, native=False)
            else:
                self._write_now(s, op, name, value)

        if fire:
            rc = self._send(s, op, RS_WRITE_CTRLREG, U_CR.pack(idx, value, old), mon[0], after)
            if rc:
                return
        v.rip = op.rip + op.insn_len
        self._write_now(s, op, name, value)

    def _write_now(self, s: VState, op: Op, name: str, value: int) -> None:
        self._register_write_done(s, op, self._set_cr(s, name, value))

    def _register_write_done(self, s: VState, op: Op, fault: GuestFault | None) -> None:
        """A CR or MSR write has been tried: the guest takes its fault, or the write took effect."""
        if fault is not None:
            self._fault(s, op, fault)
            return
        op.took_effect = True
        self._finish(s, op, native=False)

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

    def _set_msr(self, s: VState, msr: int, value: int) -> GuestFault | None:
        fault = self._msr_check(msr, value)
        if fault is None:
            s.v.msrs[msr] = value
        return fault

    def _op_wrmsr(self, s: VState, op: Op) -> None:
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
                    op.phase = PHASE_FINISH
                else:
                    self._msr_now(s, op, msr, value)
            if self._send(s, op, RS_MOV_TO_MSR, U_MSR.pack(msr, value, old), True, after):
                return
        v.rip = op.rip + op.insn_len
        self._msr_now(s, op, msr, value)

    def _msr_now(self, s: VState, op: Op, msr: int, value: int) -> None:
        self._register_write_done(s, op, self._set_msr(s, msr, value))
