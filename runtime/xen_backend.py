"""The production `Backend`: a Xen 4.17 or 4.20 domain through libxenctrl and friends (cffi, ABI mode).

`XenBackend.open("xen-guest-name" | "7")` attaches to one HVM or PVH domain
from dom0 (or a PV introspection domain with the FLASK rights listed in
docs/XEN-SEMANTICS.md §6). Everything goes through the tools libraries'
public API, loaded with ``ffi.dlopen`` (no compiler, no Xen needed to import
this module or install the package):

==========================  ==================================================
libxenctrl.so.4.17 or 4.20  domain info, pause, monitor ring and monitor ops,
                            mem_access, altp2m, physmap, HVM context
libxenevtchn.so.1           the ring's event channel
libxenforeignmemory.so.1    guest frames (read/write_physical, population)
libxendevicemodel.so.1      exception injection (dm_op inject_event)
libxenstore.so.4            name -> domid only (loaded when a name is given)
==========================  ==================================================

The libraries' declarations (`xen_libs.DECLARATIONS`, `xen_libs.STRUCTS`) are checked against Debian's
libxen-dev headers of both releases (`RELEASES`: 4.17 in Debian 12, 4.20 in Debian 13; what
differs between them is in `XenRelease`) by tests/test_xen_backend.py, which compiles a C
file asserting every prototype and struct offset; a declaration that drifts
from the headers fails CI rather than corrupting a call at run time.

Semantics follow docs/XEN-SEMANTICS.md and the simulator
(`policyc.runtime.sim.xen.SimulatedXen`), which is the reference for what
each `Backend` method does and raises. Where real Xen cannot do what the
simulator does, the method says so (`paused_vcpus`, `monitor_control_registers`
disable, `set_registers`).

Errors: every failing call raises a `BackendError` (``InvalidArgument`` for
EINVAL, ``Unsupported`` for EOPNOTSUPP/ENOSYS) naming the libxc call and
carrying its errno. A host that is not a Xen dom0 raises `XenUnavailable`,
whose message starts "not a Xen dom0 (or no privcmd): ".
"""

from __future__ import annotations

import errno as _errno
import os
import select
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ..native import abi
from ..native.constants import CR_INDEX, ET_HW_EXC, ET_SW_EXC, F_DENY, F_PAUSED, RS_MOV_TO_MSR, RS_WRITE_CTRLREG
from .backend import ALWAYS_SYNC_MONITORS, ON_OFF_MONITORS, BackendError, Capabilities, InvalidArgument, Unsupported
from .xen_arm64 import ARM64_VCPU_CONTEXT_SIZE, access_runs, registers_from_arm64_context
from .xen_libs import (BACKEND_LIBRARIES, CONSTANTS, DOMCTL_SIZE, HVM_HW_CPU_SIZE, PAGE_SHIFT, PAGE_SIZE, PRIVCMD,
                       RELEASES, XenUnavailable, access_code, access_name, arch_from_vendor, build_cpu_context,
                       call_error, cpu_vendor, load_library, loaded_release, monitors_from_capabilities,
                       native_event_channel, patch_hvm_cpu, registers_from_hvm_cpu, resolve_domain, xen_ffi)

__all__ = ["XenBackend"]

_INVALID_GFN = (1 << 64) - 1     # ~0: xc_altp2m_change_gfn's "restore the identity mapping"
_NO_ERROR_CODE = 0xFFFFFFFF      # dm_op inject_event: ~0 means no error code (xen/hvm/dm_op.h)


def _probe_runs(gfns: Sequence[int], gap: int) -> list[tuple[int, int]]:
    """Sorted gfns as (first, last) runs to probe, neighbours closer than `gap` merged: probing a
    short gap costs less than another map call."""
    runs: list[tuple[int, int]] = []
    for g in gfns:
        if runs and g - runs[-1][1] <= gap:
            runs[-1] = (runs[-1][0], g)
        else:
            runs.append((g, g))
    return runs



@dataclass
class _Mapping:
    ptr: Any
    writable: bool


# --------------------------------------------------------------------------- the backend

class XenBackend:
    """One attached Xen domain (see the module docstring). Use `XenBackend.open(spec)`.

    ``ring=True`` (run): the monitor ring is enabled at attach, and attach fails with EBUSY when
    another agent holds it. ``ring=False`` (recover): nothing is enabled; `take_requests` fails,
    `close` disables whatever ring the domain has (a dead agent's), `reattach` enables a fresh one.
    """

    DENY_HOLD_LIMIT = 0.25           # seconds a register-write DENY waits for its vCPU to leave its pCPU
    POPULATION_BATCH = 1024          # frames per foreign-map probe in populated_frames()
    MAP_CACHE = 1024                 # foreign mappings kept (LRU) for read/write_physical

    def __init__(self, domid: int, name: str, *, ring: bool = True) -> None:
        libraries = {lib: load_library(lib) for lib in BACKEND_LIBRARIES}
        release = loaded_release()
        if not os.path.exists(PRIVCMD):
            raise XenUnavailable("attach", f"{PRIVCMD} is missing (run as root in dom0 with the xen-privcmd "
                                           "module loaded and xenfs mounted)", _errno.ENOENT)
        self._init_state(domid, name, xen_ffi(), libraries, release)
        try:
            self.open_handles()
            self._caps = self.discover()
            if ring:
                self._enable_ring()
        except BaseException:
            self.release()
            raise

    @classmethod
    def detached(cls, *, domid: int = 0, name: str = "detached", libraries: Mapping[str, Any] | None = None,
                 handles: Mapping[str, Any] | None = None, ring: abi.Ring | None = None,
                 port: int | None = None, xen_release: Any = None) -> "XenBackend":
        """A backend attached to no domain, for exercising its bookkeeping and the calls it makes
        without Xen: `libraries` stand in for the Xen libraries by name ("xenctrl", "xenevtchn",
        "xenforeignmemory", "xendevicemodel", "c"; a missing one is None), `handles` for the handles
        opened on them ("xch", "xce", "fmh", "dmh"; NULL unless given), `ring` is the monitor ring."""
        b = cls.__new__(cls)
        b._init_state(domid, name, xen_ffi(), dict(libraries or {}), xen_release or RELEASES[0])
        for handle, value in (handles or {}).items():
            setattr(b, f"_{handle}", value)
        b._ring, b._port = ring, port
        return b

    def _init_state(self, domid: int, name: str, ffi: Any, libraries: Mapping[str, Any], release: Any) -> None:
        self.domid = domid
        self.name = name
        self.capability_notes: dict[str, str] = {}     # why a capability is missing, for messages
        self._ffi = ffi
        self._xc = libraries.get("xenctrl")
        self.xen_release = release
        self._ev = libraries.get("xenevtchn")
        self._fm = libraries.get("xenforeignmemory")
        self._dm = libraries.get("xendevicemodel")
        self._c = libraries.get("c")
        self._xch = self._xce = self._fmh = self._dmh = ffi.NULL
        self._ring: abi.Ring | None = None
        self._poller: Any = None            # select.poll on the event channel's fd (wait)
        self._kick: Any = None              # the native kick and wait (kept alive with their struct)
        self._ring_page = ffi.NULL
        self._port: int | None = None
        self._disabled = False            # close() disabled the ring; a second close() does nothing
        self._maps: OrderedDict[int, _Mapping] = OrderedDict()
        self._populated: list[int] | None = None
        self._population_index: set[int] | None = None     # _populated as a set, built on first use
        self._known: dict[int, bool] = {}                  # gfn -> populated, from narrow probes
        self._added: dict[int, bool] = {}  # gfn added by add_frame -> whether maxmem was raised for it
        self._sync_out: dict[int, int] = {}  # vcpu -> sync requests taken and not answered
        self._mon_cr: dict[str, dict[str, Any]] = {}
        self._mon_msr: dict[int, dict[str, Any]] = {}
        self._mon: dict[str, bool] = {}
        # register-write DENYs held until their vCPU was off its pCPU (_hold_register_denies)
        self.deny_holds = {"checked": 0, "held": 0, "max_wait_ms": 0.0, "unconfirmed": 0}

    # ================================================================== attach
    @classmethod
    def open(cls, spec: str, *, ring: bool = True) -> "XenBackend":
        """Attach to domain `spec`: a domid, or a name looked up in xenstore."""
        load_library("xenctrl")
        if not os.path.exists(PRIVCMD):
            raise XenUnavailable("attach", f"{PRIVCMD} is missing (run as root in dom0 with the xen-privcmd "
                                           "module loaded and xenfs mounted)", _errno.ENOENT)
        domid, name = resolve_domain(spec)
        return cls(domid, name, ring=ring)

    def open_handles(self) -> None:
        """Attach, first step: the libraries' handles, once the hypervisor is known to be the release
        they were built for. (Public with `discover` so a detached backend can be put through attach.)"""
        ffi = self._ffi
        self._xch = self._xc.xc_interface_open(ffi.NULL, ffi.NULL, 0)
        if self._xch == ffi.NULL:
            raise XenUnavailable("attach", f"xc_interface_open failed: {os.strerror(ffi.errno)}", ffi.errno)
        # libxenctrl talks to its own release only; say so plainly rather than fail on the first domctl
        v = self._xc.xc_version(self._xch, CONSTANTS["XENVER_version"], ffi.NULL)
        running = (v >> 16, v & 0xFFFF) if v >= 0 else None
        if running != self.xen_release.hypervisor:
            found = f"Xen {running[0]}.{running[1]}" if running else f"an unknown Xen ({os.strerror(ffi.errno)})"
            raise XenUnavailable("attach", f"{found} runs here, but the tools library found is "
                                           f"{self.xen_release.xenctrl} (Xen {self.xen_release.version}): install that "
                                           "release's tools libraries", _errno.EPROTO)
        for attr, lib, fn in (("_xce", self._ev, "xenevtchn_open"), ("_fmh", self._fm, "xenforeignmemory_open"),
                              ("_dmh", self._dm, "xendevicemodel_open")):
            h = getattr(lib, fn)(ffi.NULL, 0)
            if h == ffi.NULL:
                raise XenUnavailable("attach", f"{fn} failed: {os.strerror(ffi.errno)}", ffi.errno)
            setattr(self, attr, h)

    def _info(self, op: str = "domain info") -> Any:
        """xc_domain_getinfolist for our domid (it answers for the first domain >= domid)."""
        info = self._ffi.new("xc_domaininfo_t *")
        n = self._xc.xc_domain_getinfolist(self._xch, self.domid, 1, info)
        if n < 0:
            raise call_error(op, "xc_domain_getinfolist", self._ffi.errno)
        if n == 0 or info.domain != self.domid:
            raise BackendError(op, f"no domain {self.domid}", _errno.ESRCH)
        return info

    def discover(self) -> Capabilities:
        """Attach, second step: what this host and domain can do (and refuse what the backend cannot speak)."""
        ffi, xc = self._ffi, self._xc
        if self.domid == 0:
            raise InvalidArgument("attach", "domain 0 cannot be introspected from itself", _errno.EINVAL)
        info = self._info("attach")
        if info.flags & CONSTANTS["XEN_DOMINF_dying"]:
            raise BackendError("attach", f"domain {self.domid} is dying", _errno.ESRCH)
        if not info.flags & CONSTANTS["XEN_DOMINF_hvm_guest"]:
            raise Unsupported("attach", f"domain {self.domid} is PV: vm_event monitoring needs an HVM or PVH "
                                        "guest", _errno.EOPNOTSUPP)
        if info.max_vcpu_id == 0xFFFFFFFF:              # XEN_INVALID_MAX_VCPU_ID: no vCPUs yet
            raise BackendError("attach", f"domain {self.domid} has no vCPUs", _errno.ESRCH)
        version = xc.xc_vm_event_get_version(self._xch)
        if version < 0:
            raise call_error("attach", "xc_vm_event_get_version", ffi.errno)
        if version != abi.VERSION:
            raise Unsupported("attach", f"Xen speaks vm_event interface version {version}; this build speaks "
                                        f"{abi.VERSION} (Xen 4.17 to 4.20)", _errno.EPROTO)
        caps = ffi.new("uint32_t *")
        if xc.xc_monitor_get_capabilities(self._xch, self.domid, caps) < 0:
            raise call_error("attach", "xc_monitor_get_capabilities", ffi.errno)
        monitors = monitors_from_capabilities(caps[0])
        arch = self._host_arch()
        hap = bool(info.flags & CONSTANTS["XEN_DOMINF_hap"])
        mem_access = self._probe_mem_access()
        if not hap:
            self.capability_notes.setdefault("mem_access", "the domain runs on shadow paging (no HAP)")
        state = ffi.new("bool *")
        if xc.xc_altp2m_get_domain_state(self._xch, self.domid, state) < 0:
            err = ffi.errno
            altp2m = False
            self.capability_notes["altp2m"] = (
                "Xen has no altp2m here (needs Intel EPT and the boot option altp2m=1)"
                if err == _errno.EOPNOTSUPP else
                "the domain was built without altp2m (xl: altp2m=\"external\")" if err == _errno.EINVAL else
                f"xc_altp2m_get_domain_state: {os.strerror(err)}")
        else:
            altp2m = True
        if "singlestep" not in monitors:
            self.capability_notes.setdefault("singlestep", "no singlestep monitor (needs Intel MTF)")
        return Capabilities(arch=arch, vm_event_version=version, vcpus=info.max_vcpu_id + 1,
                            mem_access=mem_access and hap, altp2m=altp2m, max_views=10 if altp2m else 0,
                            singlestep="singlestep" in monitors, monitors=monitors, ring_slots=abi.RING_SLOTS)

    def _host_arch(self) -> str:
        """x86_64 (VMX/EPT) or x86_64-svm (AMD): the CPU vendor as dom0 sees it (Xen passes it through),
        after xc_physinfo confirms HVM and HAP support."""
        ffi = self._ffi
        phys = ffi.new("xc_physinfo_t *")
        if self._xc.xc_physinfo(self._xch, phys) < 0:
            raise call_error("attach", "xc_physinfo", ffi.errno)
        if not phys.capabilities & CONSTANTS["XEN_SYSCTL_PHYSCAP_hvm"]:
            raise Unsupported("attach", "this Xen host has no HVM support", _errno.EOPNOTSUPP)
        if not phys.capabilities & CONSTANTS["XEN_SYSCTL_PHYSCAP_hap"]:
            self.capability_notes["mem_access"] = "the host has no HAP (EPT/NPT)"
        if os.uname().machine == "aarch64":          # dom0's arch is Xen's: there is no arm64-on-x86 Xen
            self.capability_notes.setdefault("singlestep", "Xen on Arm cannot single-step: relax-and-rearm")
            return "arm64"
        return arch_from_vendor(cpu_vendor())

    def _probe_mem_access(self) -> bool:
        """XENMEM_access_op checks VMX+HAP before anything else (EINVAL) and the ring after (ENODEV)
        [XEN-SEMANTICS §3], so a get on gfn 0 tells without a ring: EINVAL means no mem_access."""
        acc = self._ffi.new("xenmem_access_t *")
        if self._xc.xc_get_mem_access(self._xch, self.domid, 0, acc) == 0:
            return True
        err = self._ffi.errno
        if err in (_errno.ENODEV, _errno.ESRCH, _errno.ENOENT):
            return True
        self.capability_notes["mem_access"] = (
            "Xen allows mem_access only on Intel VT-x with EPT (AMD NPT keeps no access bits)"
            if err == _errno.EINVAL else
            "this Xen was built without CONFIG_MEM_ACCESS (Debian's arm64 hypervisor is): no stage-2 watching"
            if err == _errno.ENOSYS else f"xc_get_mem_access: {os.strerror(err)}")
        return False

    def capabilities(self) -> Capabilities:
        return self._caps

    # ================================================================== the ring's life cycle
    def _enable_ring(self) -> None:
        ffi = self._ffi
        port = ffi.new("uint32_t *")
        page = self._xc.xc_monitor_enable(self._xch, self.domid, port)
        if page == ffi.NULL:
            err = ffi.errno
            detail = ("another agent holds this domain's monitor ring (xen-access, LibVMI, or a killed "
                      "enforcer: run 'policyc recover')" if err == _errno.EBUSY else "")
            raise call_error("monitor ring", "xc_monitor_enable", err, detail)
        try:
            # The page is Xen's front ring: SHARED_RING_INIT and BACK_RING_INIT as every monitor does
            # (abi.Ring's constructor); Xen's own FRONT_RING_INIT starts at index 0 as well.
            ring = abi.Ring(ffi.buffer(page, PAGE_SIZE))
        except BaseException:
            self._xc.xc_monitor_disable(self._xch, self.domid)
            self._c.munmap(page, PAGE_SIZE)
            raise
        local = self._ev.xenevtchn_bind_interdomain(self._xce, self.domid, port[0])
        if local < 0:
            err = ffi.errno
            self._xc.xc_monitor_disable(self._xch, self.domid)
            self._c.munmap(page, PAGE_SIZE)
            raise call_error("monitor ring", "xenevtchn_bind_interdomain", err)
        self._ring, self._ring_page, self._port = ring, page, local
        self._disabled = False
        self._sync_out.clear()

    def _drop_ring_locally(self) -> None:
        """Unbind the event channel and munmap the ring page (xc_monitor_enable mapped one XC_PAGE_SIZE
        page with xc_map_foreign_pages; the caller owns it)."""
        if self._port is not None:
            self._ev.xenevtchn_unbind(self._xce, self._port)
            self._port = None
        self._ring = None                  # never touch the page after this
        self._poller = None
        self._kick = None
        if self._ring_page != self._ffi.NULL:
            self._c.munmap(self._ring_page, PAGE_SIZE)
            self._ring_page = self._ffi.NULL

    def close(self) -> None:
        """xc_monitor_disable, then unbind and unmap (our ring), and drop every foreign mapping.
        EBUSY (a vCPU sleeps waiting for a ring slot, XEN-SEMANTICS §7) raises with the ring kept.
        Without a ring of ours, this disables the domain's ring if it has one (recovery from a dead
        agent); EINVAL there means there is none. Idempotent until `reattach`."""
        self._unmap_all()
        if self._disabled or self._xch == self._ffi.NULL:
            return
        rc = self._xc.xc_monitor_disable(self._xch, self.domid)
        err = self._ffi.errno if rc < 0 else 0
        if err == _errno.EBUSY:
            raise BackendError("close", "xc_monitor_disable failed: a vCPU is waiting for a ring slot",
                               _errno.EBUSY)
        had_ring = self._ring is not None
        self._drop_ring_locally()
        self._mon_cr.clear()
        self._mon_msr.clear()
        self._mon.clear()
        self._sync_out.clear()
        self._disabled = True
        if err and not (err == _errno.EINVAL and not had_ring):
            raise call_error("close", "xc_monitor_disable", err)

    def reattach(self) -> None:
        """Enable a fresh monitor ring after `close` (a new agent attaching)."""
        if self._ring is not None:
            raise BackendError("reattach", "this backend holds the monitor ring already", _errno.EBUSY)
        self._enable_ring()

    def release(self) -> None:
        """`close` (errors ignored) and close every library handle; the object is unusable after."""
        try:
            if self._ring is not None:
                self.close()
        except BackendError:
            self._drop_ring_locally()
        self._unmap_all()
        ffi = self._ffi
        for attr, lib, fn in (("_dmh", "_dm", "xendevicemodel_close"), ("_fmh", "_fm", "xenforeignmemory_close"),
                              ("_xce", "_ev", "xenevtchn_close"), ("_xch", "_xc", "xc_interface_close")):
            h = getattr(self, attr, ffi.NULL)
            if h != ffi.NULL:
                getattr(getattr(self, lib), fn)(h)
                setattr(self, attr, ffi.NULL)

    def __enter__(self) -> "XenBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def domain_identity(self) -> dict[str, Any]:
        """Which domain this is, for a journal to name: its domid and the handle (UUID) the toolstack
        gave it. A domain created later under the same name (or domid) has another handle."""
        handle = bytes(int(b) for b in self._info("domain identity").handle)
        uuid = handle.hex()
        return {"kind": "xen", "domid": self.domid,
                "uuid": f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}"}

    def domain_alive(self) -> bool:
        """False once the domain is gone, dying or shut down (the run loop stops then)."""
        try:
            info = self._info()
        except BackendError:
            return False
        return not info.flags & (CONSTANTS["XEN_DOMINF_dying"] | CONSTANTS["XEN_DOMINF_shutdown"])

    # ================================================================== pausing
    def pause(self) -> None:
        if self._xc.xc_domain_pause(self._xch, self.domid) < 0:
            raise call_error("pause", "xc_domain_pause", self._ffi.errno)

    def unpause(self) -> None:
        if self._xc.xc_domain_unpause(self._xch, self.domid) < 0:
            raise call_error("unpause", "xc_domain_unpause", self._ffi.errno)

    def paused_vcpus(self) -> frozenset[int]:
        """Every vCPU while the domain is paused by a controller (XEN_DOMINF_paused); otherwise the
        vCPUs with a sync request on our ring that has not been answered (taken or still on the ring).

        What Xen cannot tell: a vCPU paused for a vm_event (its pause_count) is invisible to
        xc_vcpu_getinfo, which reports only online/blocked/running, so it looks like a runnable vCPU
        waiting for a pCPU. vCPUs paused on a dead agent's ring are therefore not reported; `recover`
        releases them with the ring reset (XEN-SEMANTICS §7) regardless."""
        info = self._info("paused_vcpus")
        if info.flags & CONSTANTS["XEN_DOMINF_paused"]:
            return frozenset(range(info.max_vcpu_id + 1))
        out = {v for v, n in self._sync_out.items() if n > 0}
        ring = self._ring
        if ring is not None and ring.unconsumed_requests:
            prod = ring.indices["req_prod"]
            for i in range(prod - ring.unconsumed_requests, prod):
                _, flags, _, vcpu, _ = abi.HEADER.unpack_from(ring.slot_bytes(i))
                if flags & F_PAUSED:
                    out.add(vcpu)
        return frozenset(out)

    # ================================================================== mem_access
    def _check_ring(self, op: str) -> abi.Ring:
        if self._ring is None:
            raise BackendError(op, "no monitor ring", _errno.ENODEV)
        return self._ring

    def set_access(self, view: int, gfns: Sequence[int], access: str | Sequence[str]) -> None:
        """xc_set_mem_access_multi (view 0) or xc_altp2m_set_mem_access_multi, in batches of 4096, on
        populated frames only: a hole refuses the whole call on a PVH guest (NOTES), so any gfn
        not in `populated_frames()` is refused here before anything changes."""
        op = "set_access"
        self._check_ring(op)
        gfns = [int(g) for g in gfns]
        if isinstance(access, str):
            codes = [access_code(access, op, self.xen_release)] * len(gfns)
        else:
            codes = [access_code(a, op, self.xen_release) for a in access]
            if len(codes) != len(gfns):
                raise InvalidArgument(op, "one access value per gfn", _errno.EINVAL)
        populated = self.populated_among(gfns)
        for g in gfns:
            if g not in populated:
                raise InvalidArgument(op, f"gfn {g:#x} is not populated", _errno.EINVAL)
        ffi = self._ffi
        if self._caps.arch == "arm64":
            # Xen on Arm has no XENMEM_access_op_set_access_multi (EOPNOTSUPP, measured in the arm64
            # lab) and no altp2m: one xc_set_mem_access per run of consecutive frames sharing an access.
            for first, count, code in access_runs(gfns, codes):
                if self._xc.xc_set_mem_access(self._xch, self.domid, code, first, count) < 0:
                    raise call_error(op, "xc_set_mem_access", ffi.errno, f"{count} gfn(s) from {first:#x}")
            return
        for start in range(0, len(gfns), 4096):
            chunk = gfns[start:start + 4096]
            arr_a = ffi.new("uint8_t[]", codes[start:start + 4096])
            arr_g = ffi.new("uint64_t[]", chunk)
            if view == 0:
                rc = self._xc.xc_set_mem_access_multi(self._xch, self.domid, arr_a, arr_g, len(chunk))
                call = "xc_set_mem_access_multi"
            else:
                rc = self._xc.xc_altp2m_set_mem_access_multi(self._xch, self.domid, view, arr_a, arr_g,
                                                              len(chunk))
                call = "xc_altp2m_set_mem_access_multi"
            if rc < 0:
                raise call_error(op, call, ffi.errno, f"view {view}, {len(chunk)} gfn(s) from {chunk[0]:#x}")

    def get_access(self, view: int, gfn: int) -> str:
        op = "get_access"
        ffi = self._ffi
        acc = ffi.new("xenmem_access_t *")
        if view == 0:
            rc, call = self._xc.xc_get_mem_access(self._xch, self.domid, gfn, acc), "xc_get_mem_access"
        else:
            rc = self._xc.xc_altp2m_get_mem_access(self._xch, self.domid, view, gfn, acc)
            call = "xc_altp2m_get_mem_access"
            if rc < 0 and ffi.errno == _errno.ESRCH:
                # An altp2m view holds an entry only once it was set or faulted in: until then Xen
                # answers ESRCH (no mfn in the view), and the guest's first access copies the host
                # p2m's entry into it. Its effective access is the host's (found live under Bochs 3.0,
                # XEN-SEMANTICS §3).
                return self.get_access(0, gfn)
        if rc < 0:
            raise call_error(op, call, ffi.errno, f"view {view}, gfn {gfn:#x}")
        return access_name(int(acc[0]), op, self.xen_release)

    def populated_frames(self) -> Iterable[int]:
        """Frames backed by guest memory, from 0 to xc_domain_maximum_gpfn.

        How: map the range read-only in batches of `POPULATION_BATCH` with xenforeignmemory_map and
        its per-page error array (a hole, MMIO or special page fails to map), then unmap. Cost:
        ceil((max_gpfn + 1) / 1024) map/unmap pairs: about 1,100 for a PVH guest whose max_gpfn is
        0x10ffff (4 GiB), each an mmap, one privcmd ioctl over 1024 frames and an munmap. The result is
        cached; add_frame/remove_frame keep it current, `refresh_populated()` recomputes it (after
        ballooning). On a populate-on-demand guest the probe populates what it touches."""
        return list(self._populated_list())

    def populated_among(self, gfns: Iterable[int]) -> set[int]:
        """The populated frames among `gfns`. Without the whole-range list, only their runs are
        probed (a plan's few thousand frames, not a PVH guest's million-frame range: under Bochs the
        whole probe took 34 s of a 53 s start), and the answers are kept."""
        want = {int(g) for g in gfns}
        if self._populated is not None:
            if self._population_index is None:
                self._population_index = set(self._populated)
            return want & self._population_index
        unknown = sorted(g for g in want if g not in self._known)
        for first, last in _probe_runs(unknown, self.POPULATION_BATCH):
            hits = set(self._probe_population(first, last))
            self._known.update((g, g in hits) for g in range(first, last + 1))
        return {g for g in want if self._known[g]}

    def refresh_populated(self) -> None:
        self._populated = self._population_index = None
        self._known.clear()

    def _populated_list(self) -> list[int]:
        if self._populated is None:
            self._populated = self._probe_population()
            self._population_index = None
        return self._populated

    def _max_gpfn(self, op: str) -> int:
        out = self._ffi.new("xen_pfn_t *")
        if self._xc.xc_domain_maximum_gpfn(self._xch, self.domid, out) < 0:
            raise call_error(op, "xc_domain_maximum_gpfn", self._ffi.errno)
        return int(out[0])

    def _probe_population(self, first: int = 0, last: int | None = None) -> list[int]:
        ffi = self._ffi
        if last is None:
            last = self._max_gpfn("populated_frames")
        found: list[int] = []
        n_max = self.POPULATION_BATCH
        arr = ffi.new("xen_pfn_t[]", n_max)
        errs = ffi.new("int[]", n_max)
        prot_read = 1                                   # PROT_READ
        no_errors = bytes(4 * n_max)
        gfn = first
        while gfn <= last:
            n = min(n_max, last - gfn + 1)
            # whole-array copies, not a Python loop per frame: 0.58 s -> 0.12 s of interpreter time
            # per million frames (a PVH guest's range is a million), far more under emulation
            arr[0:n] = range(gfn, gfn + n)
            ffi.memmove(errs, no_errors, 4 * n)
            ptr = self._fm.xenforeignmemory_map(self._fmh, self.domid, prot_read, n, arr, errs)
            if ptr == ffi.NULL:
                raise call_error("populated_frames", "xenforeignmemory_map", ffi.errno,
                             f"{n} frame(s) from {gfn:#x}")
            if ffi.buffer(errs, 4 * n)[:] == no_errors[:4 * n]:
                found.extend(range(gfn, gfn + n))
            else:
                found.extend(gfn + i for i in range(n) if errs[i] == 0)
            self._fm.xenforeignmemory_unmap(self._fmh, ptr, n)
            gfn += n
        return found

    # ================================================================== altp2m
    def altp2m_get_state(self) -> bool:
        state = self._ffi.new("bool *")
        if self._xc.xc_altp2m_get_domain_state(self._xch, self.domid, state) < 0:
            err = self._ffi.errno
            if err in (_errno.EOPNOTSUPP, _errno.EINVAL):
                return False
            raise call_error("altp2m_get_state", "xc_altp2m_get_domain_state", err)
        return bool(state[0])

    def altp2m_set_state(self, enabled: bool) -> None:
        if self._xc.xc_altp2m_set_domain_state(self._xch, self.domid, bool(enabled)) < 0:
            raise call_error("altp2m_set_state", "xc_altp2m_set_domain_state", self._ffi.errno)

    def create_view(self, default_access: str = "rwx") -> int:
        view = self._ffi.new("uint16_t *")
        if self._xc.xc_altp2m_create_view(self._xch, self.domid, access_code(default_access, "create_view", self.xen_release),
                                          view) < 0:
            raise call_error("create_view", "xc_altp2m_create_view", self._ffi.errno)
        return int(view[0])

    def destroy_view(self, view: int) -> None:
        if self._xc.xc_altp2m_destroy_view(self._xch, self.domid, view) < 0:
            raise call_error("destroy_view", "xc_altp2m_destroy_view", self._ffi.errno, f"view {view}")

    def switch_view(self, view: int) -> None:
        if self._xc.xc_altp2m_switch_to_view(self._xch, self.domid, view) < 0:
            raise call_error("switch_view", "xc_altp2m_switch_to_view", self._ffi.errno, f"view {view}")

    def current_view(self, vcpu: int) -> int:
        """xc_altp2m_get_vcpu_p2m_idx; 0 when altp2m is off."""
        idx = self._ffi.new("uint16_t *")
        if self._xc.xc_altp2m_get_vcpu_p2m_idx(self._xch, self.domid, vcpu, idx) < 0:
            err = self._ffi.errno
            if err in (_errno.EOPNOTSUPP, _errno.EINVAL):
                return 0
            raise call_error("current_view", "xc_altp2m_get_vcpu_p2m_idx", err)
        return int(idx[0])

    def altp2m_set_visibility(self, view: int, visible: bool) -> None:
        """Hide a view from the guest's VMFUNC and from xc_altp2m_switch_to_view (XEN-SEMANTICS §2)."""
        if self._xc.xc_altp2m_set_visibility(self._xch, self.domid, view, bool(visible)) < 0:
            raise call_error("altp2m_set_visibility", "xc_altp2m_set_visibility", self._ffi.errno, f"view {view}")

    def change_gfn(self, view: int, gfn: int, new_gfn: int | None) -> None:
        target = _INVALID_GFN if new_gfn is None else new_gfn
        if self._xc.xc_altp2m_change_gfn(self._xch, self.domid, view, gfn, target) < 0:
            raise call_error("change_gfn", "xc_altp2m_change_gfn", self._ffi.errno,
                         f"view {view}, {gfn:#x} -> {'identity' if new_gfn is None else hex(new_gfn)}")

    def add_frame(self) -> int:
        """Populate one frame above the guest's memory: at max(max_gpfn + 1, 4 GiB) (past the PVH/HVM
        special pages below 4 GiB; the guest's e820 never lists it), checked absent first. A domain at
        its memory limit (ENOMEM) gets its limit raised by one page, lowered again by remove_frame."""
        ffi = self._ffi
        gfn = max(self._max_gpfn("add_frame") + 1, 1 << (32 - PAGE_SHIFT), *(g + 1 for g in self._added))
        while self._probe_population(gfn, gfn):
            gfn += 1
        arr = ffi.new("xen_pfn_t[1]", [gfn])
        raised = False
        if self._xc.xc_domain_populate_physmap_exact(self._xch, self.domid, 1, 0, 0, arr) < 0:
            err = ffi.errno
            if err != _errno.ENOMEM:
                raise call_error("add_frame", "xc_domain_populate_physmap_exact", err, f"gfn {gfn:#x}")
            info = self._info("add_frame")
            if self._xc.xc_domain_setmaxmem(self._xch, self.domid, (info.max_pages + 1) * (PAGE_SIZE // 1024)) < 0:
                raise call_error("add_frame", "xc_domain_setmaxmem", ffi.errno)
            raised = True
            arr[0] = gfn
            if self._xc.xc_domain_populate_physmap_exact(self._xch, self.domid, 1, 0, 0, arr) < 0:
                err = ffi.errno
                self._xc.xc_domain_setmaxmem(self._xch, self.domid, info.max_pages * (PAGE_SIZE // 1024))
                raise call_error("add_frame", "xc_domain_populate_physmap_exact", err, f"gfn {gfn:#x}")
        self._added[gfn] = raised
        self._known[gfn] = True
        if self._populated is not None:
            self._populated.append(gfn)
            self._population_index = None
        return gfn

    def remove_frame(self, gfn: int) -> None:
        if gfn not in self._added:
            raise InvalidArgument("remove_frame", f"gfn {gfn:#x} was not added", _errno.EINVAL)
        self._unmap(gfn)
        arr = self._ffi.new("xen_pfn_t[1]", [gfn])
        if self._xc.xc_domain_decrease_reservation_exact(self._xch, self.domid, 1, 0, arr) < 0:
            raise call_error("remove_frame", "xc_domain_decrease_reservation_exact", self._ffi.errno, f"gfn {gfn:#x}")
        raised = self._added.pop(gfn)
        self._known[gfn] = False
        if self._populated is not None and gfn in self._populated:
            self._populated.remove(gfn)
            self._population_index = None
        if raised:
            info = self._info("remove_frame")
            if self._xc.xc_domain_setmaxmem(self._xch, self.domid,
                                            max(info.max_pages - 1, 0) * (PAGE_SIZE // 1024)) < 0:
                raise call_error("remove_frame", "xc_domain_setmaxmem", self._ffi.errno)

    # ================================================================== monitors
    def _mon_check(self, op: str, kind: str) -> None:
        if kind not in self._caps.monitors:
            raise Unsupported(op, f"{kind} is not available on this host "
                                  f"({self.capability_notes.get(kind, 'not in xc_monitor_get_capabilities')})",
                              _errno.EOPNOTSUPP)
        self._check_ring(op)

    def monitor_write_ctrlreg(self, index: str, enable: bool, *, sync: bool = True,
                              onchangeonly: bool = False, bitmask: int = 0) -> None:
        op = "monitor_write_ctrlreg"
        self._mon_check(op, "write_ctrlreg")
        name = index.lower()
        idx = CR_INDEX.get(name)
        if idx is None:
            raise InvalidArgument(op, f"unknown control register '{index}'", _errno.EINVAL)
        if self._xc.xc_monitor_write_ctrlreg(self._xch, self.domid, idx, bool(enable), bool(sync),
                                             bitmask & ((1 << 64) - 1), bool(onchangeonly)) < 0:
            raise call_error(op, "xc_monitor_write_ctrlreg", self._ffi.errno, name)
        if enable:
            self._mon_cr[name] = {"sync": bool(sync), "onchangeonly": bool(onchangeonly), "bitmask": bitmask}
        else:
            self._mon_cr.pop(name, None)

    def monitor_mov_to_msr(self, msr: int, enable: bool, *, onchangeonly: bool = False) -> None:
        op = "monitor_mov_to_msr"
        self._mon_check(op, "mov_to_msr")
        if self._xc.xc_monitor_mov_to_msr(self._xch, self.domid, msr, bool(enable), bool(onchangeonly)) < 0:
            raise call_error(op, "xc_monitor_mov_to_msr", self._ffi.errno, f"MSR {msr:#x}")
        if enable:
            self._mon_msr[msr] = {"onchangeonly": bool(onchangeonly)}
        else:
            self._mon_msr.pop(msr, None)

    def monitor_control_registers(self, enable: bool) -> None:
        """XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS (op 4): Xen defers CR/MSR writes to resume time, so
        a DENY in a sync response drops them [XEN-SEMANTICS §0.1].

        libxenctrl 4.17 has no xc_monitor_* wrapper for op 4 (xenctrl.h lists none), so this issues the
        domctl through the public xc_domctl() with a struct xen_domctl built here; its size and the
        offsets used are asserted against domctl.h by the tests. Xen has no "off" for op 4: the flag
        is cleared only when the monitor ring is disabled, so ``enable=False`` raises Unsupported."""
        op = "monitor_control_registers"
        if not enable:
            raise Unsupported(op, "Xen clears XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS only when the monitor "
                                  "ring is disabled", _errno.EOPNOTSUPP)
        self._check_ring(op)
        buf = bytearray(DOMCTL_SIZE)
        buf[0:4] = CONSTANTS["XEN_DOMCTL_monitor_op"].to_bytes(4, "little")
        buf[4:8] = self.xen_release.domctl_interface.to_bytes(4, "little")
        buf[8:10] = self.domid.to_bytes(2, "little")
        buf[16:20] = CONSTANTS["XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS"].to_bytes(4, "little")
        cbuf = self._ffi.new("uint8_t[]", bytes(buf))
        if self._xc.xc_domctl(self._xch, self._ffi.cast("struct xen_domctl *", cbuf)) < 0:
            raise call_error(op, "xc_domctl(XEN_DOMCTL_monitor_op, CONTROL_REGISTERS)", self._ffi.errno)

    def monitor(self, kind: str, enable: bool, *, sync: bool = True) -> None:
        op = "monitor"
        if kind not in ON_OFF_MONITORS:
            raise InvalidArgument(op, f"unknown monitor '{kind}'", _errno.EINVAL)
        self._mon_check(op, kind)
        xc, xch, d, on = self._xc, self._xch, self.domid, bool(enable)
        if kind == "software_breakpoint":
            rc, call = xc.xc_monitor_software_breakpoint(xch, d, on), "xc_monitor_software_breakpoint"
        elif kind == "descriptor_access":
            rc, call = xc.xc_monitor_descriptor_access(xch, d, on), "xc_monitor_descriptor_access"
        elif kind == "cpuid":
            rc, call = xc.xc_monitor_cpuid(xch, d, on), "xc_monitor_cpuid"
        elif kind == "guest_request":
            # allow_userspace off: only the guest kernel may raise requests
            rc, call = xc.xc_monitor_guest_request(xch, d, on, bool(sync), False), "xc_monitor_guest_request"
        elif kind == "debug_exception":
            rc, call = xc.xc_monitor_debug_exceptions(xch, d, on, bool(sync)), "xc_monitor_debug_exceptions"
        elif kind == "privileged_call":
            rc, call = xc.xc_monitor_privileged_call(xch, d, on), "xc_monitor_privileged_call"
        else:
            rc, call = xc.xc_monitor_singlestep(xch, d, on), "xc_monitor_singlestep"
        if rc < 0:
            raise call_error(op, call, self._ffi.errno, kind)
        if enable:
            self._mon[kind] = True if kind in ALWAYS_SYNC_MONITORS else bool(sync)
        else:
            self._mon.pop(kind, None)

    def monitors(self) -> Mapping[str, object]:
        """What this backend enabled (Xen has no query for monitor settings)."""
        out: dict[str, object] = {}
        if self._mon_cr:
            out["write_ctrlreg"] = {k: dict(v) for k, v in sorted(self._mon_cr.items())}
        if self._mon_msr:
            out["mov_to_msr"] = {k: dict(v) for k, v in sorted(self._mon_msr.items())}
        for kind, sync in self._mon.items():
            out[kind] = {"sync": sync}
        return out

    # ================================================================== guest memory
    def _map(self, gfn: int, writable: bool) -> Any:
        m = self._maps.get(gfn)
        if m is not None and (m.writable or not writable):
            self._maps.move_to_end(gfn)
            return m.ptr
        if m is not None:
            self._unmap(gfn)
        ffi = self._ffi
        arr = ffi.new("xen_pfn_t[1]", [gfn])
        err = ffi.new("int[1]")
        prot = 3 if writable else 1                     # PROT_READ | PROT_WRITE, PROT_READ
        ptr = self._fm.xenforeignmemory_map(self._fmh, self.domid, prot, 1, arr, err)
        if ptr == ffi.NULL or err[0]:
            code = err[0] if ptr != ffi.NULL else ffi.errno
            if ptr != ffi.NULL:
                self._fm.xenforeignmemory_unmap(self._fmh, ptr, 1)
            raise InvalidArgument("physical access", f"gfn {gfn:#x} is not guest RAM (xenforeignmemory_map: "
                                                     f"{os.strerror(abs(code))})", _errno.EINVAL)
        self._maps[gfn] = _Mapping(ptr, writable)
        while len(self._maps) > self.MAP_CACHE:
            old, mapping = self._maps.popitem(last=False)
            self._fm.xenforeignmemory_unmap(self._fmh, mapping.ptr, 1)
        return ptr

    def _unmap(self, gfn: int) -> None:
        m = self._maps.pop(gfn, None)
        if m is not None:
            self._fm.xenforeignmemory_unmap(self._fmh, m.ptr, 1)

    def _unmap_all(self) -> None:
        if getattr(self, "_fmh", None) is None or self._fmh == self._ffi.NULL:
            self._maps.clear()
            return
        while self._maps:
            _gfn, m = self._maps.popitem()
            self._fm.xenforeignmemory_unmap(self._fmh, m.ptr, 1)

    def read_physical(self, address: int, size: int) -> bytes:
        ffi = self._ffi
        out = bytearray()
        while size > 0:
            gfn, off = address >> PAGE_SHIFT, address & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            out += ffi.buffer(ffi.cast("uint8_t *", self._map(gfn, False)) + off, n)[:]
            address += n
            size -= n
        return bytes(out)

    def write_physical(self, address: int, data: bytes) -> None:
        ffi = self._ffi
        pos = 0
        while pos < len(data):
            gfn, off = (address + pos) >> PAGE_SHIFT, (address + pos) & (PAGE_SIZE - 1)
            n = min(len(data) - pos, PAGE_SIZE - off)
            ffi.memmove(ffi.cast("uint8_t *", self._map(gfn, True)) + off, data[pos:pos + n], n)
            pos += n

    # ================================================================== registers
    def _vcpu_check(self, op: str, vcpu: int) -> None:
        if not 0 <= vcpu < self._caps.vcpus:
            raise InvalidArgument(op, f"no vCPU {vcpu}", _errno.EINVAL)

    def get_registers(self, vcpu: int) -> dict[str, int]:
        """HVM_SAVE_CODE(CPU) for the vCPU (xc_domain_hvm_getcontext_partial), plus xcr0 from its
        CPU_XSAVE record when Xen gives one (absent key otherwise)."""
        self._vcpu_check("get_registers", vcpu)
        ffi = self._ffi
        if self._caps.arch == "arm64":
            return self._arm64_registers(vcpu)
        buf = ffi.new("uint8_t[]", HVM_HW_CPU_SIZE)
        if self._xc.xc_domain_hvm_getcontext_partial(self._xch, self.domid, CONSTANTS["HVM_SAVE_CODE(CPU)"],
                                                     vcpu, buf, HVM_HW_CPU_SIZE) < 0:
            raise call_error("get_registers", "xc_domain_hvm_getcontext_partial(CPU)", ffi.errno, f"vCPU {vcpu}")
        regs = registers_from_hvm_cpu(bytes(ffi.buffer(buf)))
        xs = ffi.new("uint8_t[]", 1 << 16)
        if self._xc.xc_domain_hvm_getcontext_partial(self._xch, self.domid, CONSTANTS["CPU_XSAVE_CODE"],
                                                     vcpu, xs, 1 << 16) == 0:
            off = CONSTANTS["offsetof(struct hvm_hw_cpu_xsave, xcr0)"]
            regs["xcr0"] = int.from_bytes(ffi.buffer(xs + off, 8)[:], "little")
        return regs

    def _not_on_arm64(self, op: str, why: str) -> None:
        if self._caps.arch == "arm64":
            raise Unsupported(op, why, _errno.EOPNOTSUPP)

    def _arm64_registers(self, vcpu: int) -> dict[str, int]:
        """Arm keeps no HVM save records: the vCPU's vcpu_guest_context (xc_vcpu_getcontext)."""
        ffi = self._ffi
        buf = ffi.new("uint8_t[]", 4096)         # vcpu_guest_context_any_t is 352 bytes on arm64
        if self._xc.xc_vcpu_getcontext(self._xch, self.domid, vcpu, ffi.cast("vcpu_guest_context_any_t *", buf)) < 0:
            raise call_error("get_registers", "xc_vcpu_getcontext", ffi.errno, f"vCPU {vcpu}")
        return registers_from_arm64_context(bytes(ffi.buffer(buf, ARM64_VCPU_CONTEXT_SIZE)))

    def set_registers(self, vcpu: int, registers: Mapping[str, int]) -> None:
        """Rewrite the vCPU's CPU record: the domain is paused, its whole HVM context read
        (xc_domain_hvm_getcontext), and a context of the header, the patched CPU record and END loaded
        back (xc_domain_hvm_setcontext). Loading a CPU record also reloads the vCPU's TSC from it, which
        the pause keeps current. Inside a vm_event, prefer SET_REGISTERS in the response."""
        op = "set_registers"
        self._vcpu_check(op, vcpu)
        self._not_on_arm64(op, "registers are written only through a response's SET_REGISTERS (pc)")
        patch_hvm_cpu(bytes(HVM_HW_CPU_SIZE), registers)          # refuse unknown names before pausing
        ffi = self._ffi
        self.pause()
        try:
            size = self._xc.xc_domain_hvm_getcontext(self._xch, self.domid, ffi.NULL, 0)
            if size <= 0:
                raise call_error(op, "xc_domain_hvm_getcontext", ffi.errno)
            buf = ffi.new("uint8_t[]", size)
            got = self._xc.xc_domain_hvm_getcontext(self._xch, self.domid, buf, size)
            if got <= 0:
                raise call_error(op, "xc_domain_hvm_getcontext", ffi.errno)
            blob = build_cpu_context(bytes(ffi.buffer(buf, got)), vcpu, registers)
            cblob = ffi.new("uint8_t[]", blob)
            if self._xc.xc_domain_hvm_setcontext(self._xch, self.domid, cblob, len(blob)) < 0:
                raise call_error(op, "xc_domain_hvm_setcontext", ffi.errno, f"vCPU {vcpu}")
        finally:
            self.unpause()

    def inject_exception(self, vcpu: int, vector: int, *, error_code: int | None = None,
                         insn_length: int = 0, software: bool = False) -> None:
        """xendevicemodel_inject_event: delivered at the vCPU's next VM entry, after the deferred
        writes; dropped by Xen if one is already pending [XEN-SEMANTICS §1.0]."""
        op = "inject_exception"
        self._vcpu_check(op, vcpu)
        self._not_on_arm64(op, "Xen on Arm has no exception injection for a monitor")
        if not 0 <= vector < 32:
            raise InvalidArgument(op, f"vector {vector}", _errno.EINVAL)
        kind = ET_SW_EXC if software else ET_HW_EXC
        code = _NO_ERROR_CODE if error_code is None else error_code & 0xFFFFFFFF
        if self._dm.xendevicemodel_inject_event(self._dmh, self.domid, vcpu, vector, kind, code,
                                                insn_length, 0) < 0:
            raise call_error(op, "xendevicemodel_inject_event", self._ffi.errno, f"vector {vector}, vCPU {vcpu}")

    # ================================================================== the ring
    # The kinds whose DENY must go through `put_responses` (held until the vCPU left its pCPU):
    # a native monitor hands those back instead of pushing them (`NativeEngine(python_denies=)`).
    python_denies = ("write_ctrlreg", "mov_to_msr")

    def native_ring(self) -> abi.Ring:
        """The monitor ring, for a native monitor that takes, decides and answers in C (then calls
        `notify`). Those requests never reach the books `take_requests` keeps (sync requests out per
        vCPU): each is answered within the same native call. Register-write DENYs are not pushed
        there (`python_denies`): they come back to `put_responses`, which holds them."""
        return self._check_ring("native_ring")

    def native_notify(self) -> tuple[Any, Any]:
        """The kick as a C function and its argument (`vm_evtchn_kick` over libxenevtchn's
        xenevtchn_notify, this handle and port): a native monitor answers batch after batch and
        kicks after each without coming back to Python."""
        self._check_ring("native_notify")
        return self._native_evtchn()[0]

    def native_wait(self) -> tuple[Any, Any]:
        """The wait as a C function and its argument (`vm_evtchn_wait`: `wait`'s poll, pending and unmask
        in C): with `native_notify`, the answering loop stays in one native call while events flow."""
        self._check_ring("native_wait")
        return self._native_evtchn()[1]

    def _native_evtchn(self) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        self._kick = self._kick or native_event_channel(self._ffi, self._ev, self._xce, self._port)  # once a ring
        return self._kick[0], self._kick[1]

    def sync_outstanding(self) -> dict[int, int]:
        """vCPU -> sync requests taken from the ring and not answered yet (those vCPUs are paused)."""
        return {v: n for v, n in self._sync_out.items() if n > 0}

    def take_requests(self, limit: int = 8) -> list[bytes]:
        ring = self._check_ring("take_requests")
        out = [r.raw for r in ring.take_requests(limit)]
        for raw in out:
            _, flags, _, v, _ = abi.HEADER.unpack_from(raw)
            if flags & F_PAUSED:
                self._sync_out[v] = self._sync_out.get(v, 0) + 1
        return out

    def put_responses(self, responses: Iterable[bytes]) -> None:
        ring = self._check_ring("put_responses")
        batch = [bytes(r) for r in responses]
        self._hold_register_denies(batch)
        try:
            if len(batch) > ring.pending_responses and not ring.pending_responses \
                    and not ring.unconsumed_requests:
                ring.put_unsolicited_responses(batch)   # bare unpauses after a reset (XEN-SEMANTICS §7)
            else:
                ring.put_responses(batch)
        except abi.RingError as exc:
            raise BackendError("put_responses", str(exc), _errno.EINVAL) from None
        ring.push_responses()
        for raw in batch:
            _, flags, _, v, _ = abi.HEADER.unpack_from(raw)
            if flags & F_PAUSED:
                if self._sync_out.get(v, 0) > 0:
                    self._sync_out[v] -= 1

    def _hold_register_denies(self, batch: Sequence[bytes]) -> None:
        """Xen sends a CR or MSR write request before it marks that write deferred (hvm_set_cr4 calls
        monitor_traps, then sets do_write.cr4; hvm_msr_write_intercept likewise). A DENY that Xen
        processes in between clears a flag that is not yet set, and the denied write lands. The
        vCPU sets the flag before it leaves its pCPU, so a DENY goes on the ring only once
        xc_vcpu_getinfo says the vCPU is not running (XEN-SEMANTICS §1.3). Seen in the lab on
        2 emulated pCPUs: one denied CR4 write and one LSTAR write landed in 205."""
        for raw in batch:
            _, flags, reason, vcpu, _ = abi.HEADER.unpack_from(raw)
            if not flags & F_DENY or reason not in _REGISTER_WRITE_REASONS:
                continue
            self.deny_holds["checked"] += 1
            info = self._ffi.new("xc_vcpuinfo_t *")
            t0 = time.monotonic()
            held = False
            while True:
                if self._xc.xc_vcpu_getinfo(self._xch, self.domid, vcpu, info) < 0:
                    raise call_error("put_responses", "xc_vcpu_getinfo", self._ffi.errno, f"vCPU {vcpu}")
                if not info.running:
                    break
                held = True
                if time.monotonic() - t0 > self.DENY_HOLD_LIMIT:
                    self.deny_holds["unconfirmed"] += 1      # sent anyway: a vCPU must not stay paused
                    break
                time.sleep(0.0002)
            if held:
                self.deny_holds["held"] += 1
                waited = round(1000 * (time.monotonic() - t0), 3)
                self.deny_holds["max_wait_ms"] = max(self.deny_holds["max_wait_ms"], waited)

    def notify(self) -> None:
        self._check_ring("notify")
        if self._ev.xenevtchn_notify(self._xce, self._port) < 0:
            raise call_error("notify", "xenevtchn_notify", self._ffi.errno)

    def wait(self, timeout: float) -> bool:
        """True at once when requests are on the ring; else poll() the event channel's fd for up to
        `timeout` seconds, and on a wake-up consume it (xenevtchn_pending + xenevtchn_unmask)."""
        ring = self._check_ring("wait")
        if ring.final_check_for_requests():
            return True
        poller = self._poller
        if poller is None:             # one poll object per ring: set up once, not at every wait
            poller = self._poller = select.poll()
            poller.register(self._ev.xenevtchn_fd(self._xce), select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return ring.unconsumed_requests > 0
        port = self._ev.xenevtchn_pending(self._xce)
        if port < 0:
            raise call_error("wait", "xenevtchn_pending", self._ffi.errno)
        if self._ev.xenevtchn_unmask(self._xce, port) < 0:
            raise call_error("wait", "xenevtchn_unmask", self._ffi.errno)
        return True

    def __repr__(self) -> str:
        return f"XenBackend(domid={self.domid}, name={self.name!r}, ring={'on' if self._ring else 'off'})"


# --------------------------------------------------------------------------- helpers

_REGISTER_WRITE_REASONS = (RS_WRITE_CTRLREG, RS_MOV_TO_MSR)


