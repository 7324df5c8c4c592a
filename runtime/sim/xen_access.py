"""mem_access and altp2m: per-view access codes, views created, switched and remapped, the lazy
population of a view's entries, and the EPT (stage-2) check that raises a mem_access event.
"""

from __future__ import annotations

import errno as _errno
from typing import Iterable, Sequence

from ..backend import ACCESS_VALUES, BackendError, InvalidArgument, Unsupported
from ...native.constants import MA_GLA_VALID, MA_IN_GPT, MA_R, MA_W, MA_WITH_GLA, MA_X, RS_MEM_ACCESS
from .xen_abi import U_MEM
from .xen_state import (ACC_CODE, ALLOWED, A_DEFAULT, A_N, A_N2RWX, A_RW, A_RWX, A_RX, A_RX2RW,
                        MISCONFIG_X86, P2M, R, W, X, Op, VState)


class AccessMixin:
    """SimulatedXen's mem_access and altp2m calls and the stage-2 permission check."""

    def _check_mem_access(self, op: str) -> None:
        if not self._p.mem_access:
            raise InvalidArgument(op, "mem_access needs VMX with HAP (AMD NPT keeps no access bits)",
                                  _errno.EINVAL)
        if not self._p.x86 and not self.arm_mem_access:
            raise Unsupported(op, "Xen built without CONFIG_MEM_ACCESS", _errno.ENOSYS)
        if self._closed:
            raise BackendError(op, "no monitor ring", _errno.ENODEV)

    def _view_for(self, op: str, view: int) -> P2M:
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

    def _code(self, op: str, access: str, p2m: P2M) -> int:
        code = ACC_CODE.get(access)
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

    def _check_altp2m(self, op: str, need_active: bool = True) -> None:
        if not self._p.altp2m:
            raise Unsupported(op, f"altp2m is not available on {self.profile}", _errno.EOPNOTSUPP)
        if need_active and not self._altp2m:
            raise Unsupported(op, "altp2m is not active on this domain", _errno.EOPNOTSUPP)

    def altp2m_get_state(self) -> bool:
        """xc_altp2m_get_domain_state."""
        return self._altp2m

    def altp2m_set_state(self, enabled: bool) -> None:
        self._check_altp2m("altp2m_set_state", need_active=False)
        if enabled == self._altp2m:
            return
        self._altp2m = enabled
        self._views = [None] * self.max_views
        if enabled:
            # view 0 is a fresh altp2m created from the host with its default access
            self._views[0] = P2M(0, self._host.default)
        for s in self._vs:
            s.view = 0

    def create_view(self, default_access: str = "rwx") -> int:
        self._check_altp2m("create_view")
        code = ACC_CODE.get(default_access)
        if code is None:
            raise InvalidArgument("create_view", f"unknown access '{default_access}'", _errno.EINVAL)
        if code == A_DEFAULT:
            code = self._host.default
        for i in range(1, self.max_views):
            if self._views[i] is None:
                self._views[i] = P2M(i, code)
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

    def _lazy_code(self, p2m: P2M, gfn: int) -> int:
        if self.xen_version >= (4, 19):
            return p2m.default
        return self._host.access.get(gfn, self._host.default)

    def _populate(self, p2m: P2M, gfn: int) -> int:
        code = p2m.access[gfn] = self._lazy_code(p2m, gfn)
        return code

    def _cur(self, s: VState) -> P2M:
        if self._altp2m:
            view = self._views[s.view]
            if view is not None:
                return view
        return self._host

    def _p2m_of_index(self, view: int) -> P2M:
        if view == 0 and not self._altp2m:
            return self._host
        p2m = self._views[view] if 0 <= view < len(self._views) else None
        if p2m is None:
            raise InvalidArgument("view", f"view {view} does not exist", _errno.EINVAL)
        return p2m

    def _switch_vcpu(self, s: VState, idx: int) -> None:
        if self._altp2m and 0 <= idx < self.max_views and self._views[idx] is not None:
            s.view = idx

    def _ept(self, s: VState, op: Op, gfn: int, need: int, gla: int, offset: int, in_gpt: bool,
             report: int | None = None) -> bool:
        """The slow path of a permission check: True when the instruction must
        stop (event queued, vCPU waiting, domain crashed), False to carry on.
        ``report``: the one access kind (R, W or X) the request carries instead
        of what ``need`` implies (Xen on arm64 reports what the abort was)."""
        p2m = self._cur(s)
        code = p2m.access.get(gfn)
        if code is None:
            code = self._populate(p2m, gfn) if p2m is not self._host else self._host.default
        if self._p.x86 and code in MISCONFIG_X86:
            self._crash(f"EPT misconfiguration: gfn {gfn:#x} has access '{ACCESS_VALUES[code]}'")
            return True
        if not need & ~ALLOWED[code]:
            return False
        if code == A_RX2RW and need & W:
            p2m.access[gfn] = A_RW         # flips silently, no event [doc §0.5]
            return bool(need & ~ALLOWED[A_RW])  and self._ept(s, op, gfn, need, gla, offset, in_gpt, report)
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
        rc = self._send(s, op, RS_MEM_ACCESS, U_MEM.pack(gfn, offset, gla, mflags), sync)
        if rc == 0:
            return False
        if rc == 2:             # async (n2rwx): the access retries, now allowed
            return s.blocked
        return True

    def _still_violates(self, s: VState, gfn: int, mflags: int) -> bool:
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
        allowed = ALLOWED[code]
        need = (R if mflags & MA_R else 0) | (W if mflags & MA_W else 0) | (X if mflags & MA_X else 0)
        return bool(need & ~allowed)
