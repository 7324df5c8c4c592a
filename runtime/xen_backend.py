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

The declarations (`DECLARATIONS`, `STRUCTS`) are checked against Debian's
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
import functools
import os
import select
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ..native import abi
from ..native.constants import CR_INDEX, ET_HW_EXC, ET_SW_EXC, F_DENY, F_PAUSED, RS_MOV_TO_MSR, RS_WRITE_CTRLREG
from .backend import (ACCESS_VALUES, ALWAYS_SYNC_MONITORS, ON_OFF_MONITORS, BackendError, Capabilities, InvalidArgument,
                      Unsupported)
from .xen_arm64 import ARM64_VCPU_CONTEXT_SIZE, access_runs, registers_from_arm64_context

__all__ = ["XenBackend", "XenUnavailable", "XenRelease", "RELEASES", "loaded_release", "LIBRARIES", "DECLARATIONS", "STRUCTS", "MONITOR_EVENT_BITS",
           "HVM_HW_CPU_FIELDS", "HVM_HW_CPU_SIZE", "registers_from_hvm_cpu", "patch_hvm_cpu",
           "monitors_from_capabilities", "access_code", "access_name", "PRIVCMD"]

PRIVCMD = "/dev/xen/privcmd"
PAGE_SIZE = 4096                 # XC_PAGE_SIZE; the ring page and every foreign mapping
PAGE_SHIFT = 12



@dataclass(frozen=True)
class XenRelease:
    """What differs between the Xen releases this backend speaks to. libxenctrl's soname carries the
    release, and it only talks to a hypervisor of the same release (the domctl interface version is
    checked by Xen), so the library found decides. Everything else the backend declares is the same
    in both releases' headers (tests/test_xen_backend.py compiles it against each)."""

    version: str                       # "4.17"
    xenctrl: str                       # libxenctrl's soname
    domctl_interface: int              # XEN_DOMCTL_INTERFACE_VERSION (the raw domctl of op 4)
    access_order: tuple[str, ...]      # xenmem_access_t, in enum order (4.19 added r_pw before default)

    @property
    def hypervisor(self) -> tuple[int, int]:
        major, minor = self.version.split(".")
        return int(major), int(minor)


RELEASES: tuple[XenRelease, ...] = (
    XenRelease("4.17", "libxenctrl.so.4.17", 0x15, ACCESS_VALUES),                      # Debian 12
    XenRelease("4.20", "libxenctrl.so.4.20", 0x17, ACCESS_VALUES[:10] + ("r_pw", "default")),  # Debian 13
)

# soname per library key; the versioned names, so a different libxenctrl ABI is never picked up.
# "xenctrl" is the release found on the host (`RELEASES`, tried in order); the rest do not change.
LIBRARIES: dict[str, str] = {
    "xenctrl": RELEASES[0].xenctrl,
    "xenevtchn": "libxenevtchn.so.1",
    "xenforeignmemory": "libxenforeignmemory.so.1",
    "xendevicemodel": "libxendevicemodel.so.1",
    "xenstore": "libxenstore.so.4",
}

# --------------------------------------------------------------------------- declarations
#
# Types as the headers spell them on x86_64 (xen_pfn_t is unsigned long, domid_t uint16_t). The two
# structs are declared field by field (no bitfields: xc_dominfo_t has them, so xc_domain_getinfolist's
# xen_domctl_getdomaininfo is used instead); the test compares every offset with the C compiler's.

TYPEDEFS = """
typedef struct xc_interface_core xc_interface;
typedef struct xentoollog_logger xentoollog_logger;
typedef struct xenevtchn_handle xenevtchn_handle;
typedef struct xenforeignmemory_handle xenforeignmemory_handle;
typedef struct xendevicemodel_handle xendevicemodel_handle;
struct xs_handle;
struct xen_domctl;
typedef unsigned long xen_pfn_t;
typedef uint16_t domid_t;
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
typedef uint32_t xs_transaction_t;
typedef union vcpu_guest_context_any vcpu_guest_context_any_t;
typedef enum {
    XENMEM_access_n, XENMEM_access_r, XENMEM_access_w, XENMEM_access_rw, XENMEM_access_x,
    XENMEM_access_rx, XENMEM_access_wx, XENMEM_access_rwx, XENMEM_access_rx2rw, XENMEM_access_n2rwx,
    XENMEM_access_default
} xenmem_access_t;
"""

# (C type name, [(field, C declaration)]) -- cdef'd as typedef struct { ... } NAME;
STRUCTS: dict[str, list[tuple[str, str]]] = {
    "xc_domaininfo_t": [
        ("domain", "uint16_t domain"), ("pad1", "uint16_t pad1"), ("flags", "uint32_t flags"),
        ("tot_pages", "uint64_t tot_pages"), ("max_pages", "uint64_t max_pages"),
        ("outstanding_pages", "uint64_t outstanding_pages"), ("shr_pages", "uint64_t shr_pages"),
        ("paged_pages", "uint64_t paged_pages"), ("shared_info_frame", "uint64_t shared_info_frame"),
        ("cpu_time", "uint64_t cpu_time"), ("nr_online_vcpus", "uint32_t nr_online_vcpus"),
        ("max_vcpu_id", "uint32_t max_vcpu_id"), ("ssidref", "uint32_t ssidref"),
        ("handle", "uint8_t handle[16]"), ("cpupool", "uint32_t cpupool"),
        ("gpaddr_bits", "uint8_t gpaddr_bits"), ("pad2", "uint8_t pad2[7]"),
        ("arch_config", "struct { uint32_t emulation_flags; uint32_t misc_flags; } arch_config"),
    ],
    "xc_physinfo_t": [
        ("threads_per_core", "uint32_t threads_per_core"), ("cores_per_socket", "uint32_t cores_per_socket"),
        ("nr_cpus", "uint32_t nr_cpus"), ("max_cpu_id", "uint32_t max_cpu_id"),
        ("nr_nodes", "uint32_t nr_nodes"), ("max_node_id", "uint32_t max_node_id"),
        ("cpu_khz", "uint32_t cpu_khz"), ("capabilities", "uint32_t capabilities"),
        ("arch_capabilities", "uint32_t arch_capabilities"), ("pad", "uint32_t pad"),
        ("total_pages", "uint64_t total_pages"), ("free_pages", "uint64_t free_pages"),
        ("scrub_pages", "uint64_t scrub_pages"), ("outstanding_pages", "uint64_t outstanding_pages"),
        ("max_mfn", "uint64_t max_mfn"), ("hw_cap", "uint32_t hw_cap[8]"),
    ],
    "xc_vcpuinfo_t": [
        ("vcpu", "uint32_t vcpu"), ("online", "uint8_t online"), ("blocked", "uint8_t blocked"),
        ("running", "uint8_t running"), ("cpu_time", "uint64_t cpu_time"), ("cpu", "uint32_t cpu"),
    ],
}

# library key -> [(return type, name, parameter list)]; cdef'd verbatim and asserted in C.
DECLARATIONS: dict[str, list[tuple[str, str, str]]] = {
    "xenctrl": [
        ("xc_interface *", "xc_interface_open", "xentoollog_logger *, xentoollog_logger *, unsigned"),
        ("int", "xc_interface_close", "xc_interface *"),
        ("int", "xc_version", "xc_interface *, int, void *"),
        ("int", "xc_domain_getinfolist", "xc_interface *, uint32_t, unsigned int, xc_domaininfo_t *"),
        ("int", "xc_domain_pause", "xc_interface *, uint32_t"),
        ("int", "xc_domain_unpause", "xc_interface *, uint32_t"),
        ("int", "xc_physinfo", "xc_interface *, xc_physinfo_t *"),
        ("int", "xc_vcpu_getinfo", "xc_interface *, uint32_t, uint32_t, xc_vcpuinfo_t *"),
        ("int", "xc_vcpu_getcontext", "xc_interface *, uint32_t, uint32_t, vcpu_guest_context_any_t *"),
        ("int", "xc_vm_event_get_version", "xc_interface *"),
        ("void *", "xc_monitor_enable", "xc_interface *, uint32_t, uint32_t *"),
        ("int", "xc_monitor_disable", "xc_interface *, uint32_t"),
        ("int", "xc_monitor_get_capabilities", "xc_interface *, uint32_t, uint32_t *"),
        ("int", "xc_monitor_write_ctrlreg", "xc_interface *, uint32_t, uint16_t, bool, bool, uint64_t, bool"),
        ("int", "xc_monitor_mov_to_msr", "xc_interface *, uint32_t, uint32_t, bool, bool"),
        ("int", "xc_monitor_singlestep", "xc_interface *, uint32_t, bool"),
        ("int", "xc_monitor_software_breakpoint", "xc_interface *, uint32_t, bool"),
        ("int", "xc_monitor_descriptor_access", "xc_interface *, uint32_t, bool"),
        ("int", "xc_monitor_guest_request", "xc_interface *, uint32_t, bool, bool, bool"),
        ("int", "xc_monitor_debug_exceptions", "xc_interface *, uint32_t, bool, bool"),
        ("int", "xc_monitor_cpuid", "xc_interface *, uint32_t, bool"),
        ("int", "xc_monitor_privileged_call", "xc_interface *, uint32_t, bool"),
        ("int", "xc_domctl", "xc_interface *, struct xen_domctl *"),
        ("int", "xc_set_mem_access_multi", "xc_interface *, uint32_t, uint8_t *, uint64_t *, uint32_t"),
        ("int", "xc_get_mem_access", "xc_interface *, uint32_t, uint64_t, xenmem_access_t *"),
        ("int", "xc_set_mem_access", "xc_interface *, uint32_t, xenmem_access_t, uint64_t, uint32_t"),
        ("int", "xc_altp2m_get_domain_state", "xc_interface *, uint32_t, bool *"),
        ("int", "xc_altp2m_set_domain_state", "xc_interface *, uint32_t, bool"),
        ("int", "xc_altp2m_create_view", "xc_interface *, uint32_t, xenmem_access_t, uint16_t *"),
        ("int", "xc_altp2m_destroy_view", "xc_interface *, uint32_t, uint16_t"),
        ("int", "xc_altp2m_switch_to_view", "xc_interface *, uint32_t, uint16_t"),
        ("int", "xc_altp2m_set_mem_access_multi",
         "xc_interface *, uint32_t, uint16_t, uint8_t *, uint64_t *, uint32_t"),
        ("int", "xc_altp2m_get_mem_access", "xc_interface *, uint32_t, uint16_t, xen_pfn_t, xenmem_access_t *"),
        ("int", "xc_altp2m_change_gfn", "xc_interface *, uint32_t, uint16_t, xen_pfn_t, xen_pfn_t"),
        ("int", "xc_altp2m_set_visibility", "xc_interface *, uint32_t, uint16_t, bool"),
        ("int", "xc_altp2m_get_vcpu_p2m_idx", "xc_interface *, uint32_t, uint32_t, uint16_t *"),
        ("int", "xc_domain_maximum_gpfn", "xc_interface *, uint32_t, xen_pfn_t *"),
        ("int", "xc_domain_populate_physmap_exact",
         "xc_interface *, uint32_t, unsigned long, unsigned int, unsigned int, xen_pfn_t *"),
        ("int", "xc_domain_decrease_reservation_exact",
         "xc_interface *, uint32_t, unsigned long, unsigned int, xen_pfn_t *"),
        ("int", "xc_domain_setmaxmem", "xc_interface *, uint32_t, uint64_t"),
        ("int", "xc_domain_hvm_getcontext", "xc_interface *, uint32_t, uint8_t *, uint32_t"),
        ("int", "xc_domain_hvm_getcontext_partial", "xc_interface *, uint32_t, uint16_t, uint16_t, void *, uint32_t"),
        ("int", "xc_domain_hvm_setcontext", "xc_interface *, uint32_t, uint8_t *, uint32_t"),
    ],
    "xenevtchn": [
        ("xenevtchn_handle *", "xenevtchn_open", "struct xentoollog_logger *, unsigned int"),
        ("int", "xenevtchn_close", "xenevtchn_handle *"),
        ("int", "xenevtchn_fd", "xenevtchn_handle *"),
        ("int", "xenevtchn_notify", "xenevtchn_handle *, evtchn_port_t"),
        ("xenevtchn_port_or_error_t", "xenevtchn_bind_interdomain", "xenevtchn_handle *, uint32_t, evtchn_port_t"),
        ("int", "xenevtchn_unbind", "xenevtchn_handle *, evtchn_port_t"),
        ("xenevtchn_port_or_error_t", "xenevtchn_pending", "xenevtchn_handle *"),
        ("int", "xenevtchn_unmask", "xenevtchn_handle *, evtchn_port_t"),
    ],
    "xenforeignmemory": [
        ("xenforeignmemory_handle *", "xenforeignmemory_open", "struct xentoollog_logger *, unsigned int"),
        ("int", "xenforeignmemory_close", "xenforeignmemory_handle *"),
        ("void *", "xenforeignmemory_map", "xenforeignmemory_handle *, uint32_t, int, size_t, const xen_pfn_t *, int *"),
        ("int", "xenforeignmemory_unmap", "xenforeignmemory_handle *, void *, size_t"),
    ],
    "xendevicemodel": [
        ("xendevicemodel_handle *", "xendevicemodel_open", "struct xentoollog_logger *, unsigned int"),
        ("int", "xendevicemodel_close", "xendevicemodel_handle *"),
        ("int", "xendevicemodel_inject_event",
         "xendevicemodel_handle *, domid_t, int, uint8_t, uint8_t, uint32_t, uint8_t, uint64_t"),
    ],
    "xenstore": [
        ("struct xs_handle *", "xs_open", "unsigned long"),
        ("void", "xs_close", "struct xs_handle *"),
        ("char **", "xs_directory", "struct xs_handle *, xs_transaction_t, const char *, unsigned int *"),
        ("void *", "xs_read", "struct xs_handle *, xs_transaction_t, const char *, unsigned int *"),
    ],
    "c": [
        ("int", "munmap", "void *, size_t"),
        ("void", "free", "void *"),
    ],
}

# Header constants this module relies on (name -> value); the test checks each against the headers.
CONSTANTS: dict[str, int] = {
    "XC_PAGE_SIZE": PAGE_SIZE,
    "XEN_DOMINF_dying": 1 << 0, "XEN_DOMINF_hvm_guest": 1 << 1, "XEN_DOMINF_shutdown": 1 << 2,
    "XEN_DOMINF_paused": 1 << 3, "XEN_DOMINF_hap": 1 << 8,
    "XEN_SYSCTL_PHYSCAP_hvm": 1 << 0, "XEN_SYSCTL_PHYSCAP_hap": 1 << 3,
    "XEN_DOMCTL_monitor_op": 77, "XENVER_version": 0,
    "XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS": 4,
    "HVM_SAVE_CODE(END)": 0, "HVM_SAVE_CODE(HEADER)": 1, "HVM_SAVE_CODE(CPU)": 2,
    "CPU_XSAVE_CODE": 16,
    "sizeof(struct hvm_save_descriptor)": 8,
    "sizeof(struct xen_domctl)": 0,            # filled below, after HVM_HW_CPU_SIZE
    "offsetof(struct xen_domctl, cmd)": 0, "offsetof(struct xen_domctl, interface_version)": 4,
    "offsetof(struct xen_domctl, domain)": 8, "offsetof(struct xen_domctl, u.monitor_op.op)": 16,
    "offsetof(struct xen_domctl, u.monitor_op.event)": 20,
    "offsetof(struct hvm_hw_cpu_xsave, xcr0)": 8,
}
_DOMCTL_SIZE = 16 + 128          # header + the union (its pad[128] is the largest member)
CONSTANTS["sizeof(struct xen_domctl)"] = _DOMCTL_SIZE
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

# XEN_DOMCTL_MONITOR_EVENT_* bit -> the monitor's name in the Backend vocabulary (the simulator's names).
# Bits without a Backend monitor (INTERRUPT, EMUL_UNIMPLEMENTED, INGUEST_PAGEFAULT, VMEXIT, IO) are left out.
MONITOR_EVENT_BITS: dict[str, tuple[int, str]] = {
    "XEN_DOMCTL_MONITOR_EVENT_WRITE_CTRLREG": (0, "write_ctrlreg"),
    "XEN_DOMCTL_MONITOR_EVENT_MOV_TO_MSR": (1, "mov_to_msr"),
    "XEN_DOMCTL_MONITOR_EVENT_SINGLESTEP": (2, "singlestep"),
    "XEN_DOMCTL_MONITOR_EVENT_SOFTWARE_BREAKPOINT": (3, "software_breakpoint"),
    "XEN_DOMCTL_MONITOR_EVENT_GUEST_REQUEST": (4, "guest_request"),
    "XEN_DOMCTL_MONITOR_EVENT_DEBUG_EXCEPTION": (5, "debug_exception"),
    "XEN_DOMCTL_MONITOR_EVENT_CPUID": (6, "cpuid"),
    "XEN_DOMCTL_MONITOR_EVENT_PRIVILEGED_CALL": (7, "privileged_call"),
    "XEN_DOMCTL_MONITOR_EVENT_DESC_ACCESS": (9, "descriptor_access"),
}


def monitors_from_capabilities(bitmask: int) -> frozenset[str]:
    """`xc_monitor_get_capabilities`'s (1 << XEN_DOMCTL_MONITOR_EVENT_*) bitmap as monitor names."""
    return frozenset(name for bit, name in MONITOR_EVENT_BITS.values() if bitmask >> bit & 1)


# --------------------------------------------------------------------------- access values

def access_code(name: str, op: str = "set_access", release: XenRelease = RELEASES[0]) -> int:
    """xenmem_access_t for an access name in `release`'s enum (checked against its memory.h)."""
    if name not in ACCESS_VALUES:
        raise InvalidArgument(op, f"unknown access '{name}' (one of {', '.join(ACCESS_VALUES)})",
                              _errno.EINVAL) from None
    return release.access_order.index(name)


def access_name(code: int, op: str = "get_access", release: XenRelease = RELEASES[0]) -> str:
    order = release.access_order
    if not 0 <= code < len(order):
        raise BackendError(op, f"Xen returned access value {code}, which xenmem_access_t does not have")
    if order[code] not in ACCESS_VALUES:
        raise BackendError(op, f"Xen returned access {order[code]} ({code}), which policyc never sets")
    return order[code]


# --------------------------------------------------------------------------- struct hvm_hw_cpu

def _hvm_cpu_layout() -> tuple[dict[str, tuple[int, int]], int]:
    """(field -> (offset, size), total size) of struct hvm_hw_cpu (xen/arch-x86/hvm/save.h)."""
    fields: list[tuple[str, int]] = [("fpu_regs", 512)]
    fields += [(r, 8) for r in ("rax", "rbx", "rcx", "rdx", "rbp", "rsi", "rdi", "rsp",
                                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
                                "cr0", "cr2", "cr3", "cr4", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7")]
    segs = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
    fields += [(f"{s}_sel", 4) for s in segs]
    fields += [(f"{s}_limit", 4) for s in segs + ("idtr", "gdtr")]
    fields += [(f"{s}_base", 8) for s in segs + ("idtr", "gdtr")]
    fields += [(f"{s}_arbytes", 4) for s in segs]
    fields += [(r, 8) for r in ("sysenter_cs", "sysenter_esp", "sysenter_eip", "shadow_gs", "msr_flags",
                                "msr_lstar", "msr_star", "msr_cstar", "msr_syscall_mask", "msr_efer",
                                "msr_tsc_aux", "tsc")]
    fields += [("pending_event", 4), ("error_code", 4), ("flags", 4), ("pad0", 4)]
    out: dict[str, tuple[int, int]] = {}
    off = 0
    for name, size in fields:
        off = (off + size - 1) // size * size if size in (4, 8) else off
        out[name] = (off, size)
        off += size
    return out, (off + 7) // 8 * 8


HVM_HW_CPU_FIELDS, HVM_HW_CPU_SIZE = _hvm_cpu_layout()
CONSTANTS["sizeof(struct hvm_hw_cpu)"] = HVM_HW_CPU_SIZE

# Backend register name -> hvm_hw_cpu field, for the names that map one to one (the simulator's names,
# `VCpu.registers`). fs_base/gs_base are the segment bases (= the MSRs in 64-bit mode).
_REG_FIELDS: dict[str, str] = {r: r for r in (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "dr6", "dr7", "idtr_base", "idtr_limit",
    "gdtr_base", "gdtr_limit", "msr_efer", "msr_star", "msr_lstar", "msr_cstar", "fs_base", "gs_base",
    "shadow_gs", "sysenter_cs", "sysenter_esp", "sysenter_eip")}
_REG_FIELDS.update({f"{s}_sel": f"{s}_sel" for s in ("cs", "ss", "ds", "es", "fs", "gs", "ldtr", "tr")})


def registers_from_hvm_cpu(blob: bytes) -> dict[str, int]:
    """The Backend register dict (names as `SimulatedXen.get_registers`) from one HVM_SAVE_CODE(CPU)
    record. ``cpl`` is SS.DPL (VMX keeps CPL there); ``xcr0`` is not in this record (see
    `XenBackend.get_registers`)."""
    if len(blob) < HVM_HW_CPU_SIZE:
        raise ValueError(f"an hvm_hw_cpu record is {HVM_HW_CPU_SIZE} bytes, got {len(blob)}")
    out: dict[str, int] = {}
    for name, field in _REG_FIELDS.items():
        off, size = HVM_HW_CPU_FIELDS[field]
        value = int.from_bytes(blob[off:off + size], "little")
        out[name] = value & 0xFFFF if name.endswith("_sel") else value
    off, size = HVM_HW_CPU_FIELDS["ss_arbytes"]
    out["cpl"] = int.from_bytes(blob[off:off + size], "little") >> 5 & 3
    return out


def patch_hvm_cpu(blob: bytes, registers: Mapping[str, int]) -> bytes:
    """`blob` (one hvm_hw_cpu record) with `registers` written in. Unknown or read-only names raise
    InvalidArgument (cpl and xcr0 cannot be set through this record)."""
    out = bytearray(blob)
    for name, value in registers.items():
        if name == "pc":
            name = "rip"
        field = _REG_FIELDS.get(name)
        if field is None:
            raise InvalidArgument("set_registers", f"register '{name}' cannot be set through the HVM CPU "
                                                   "context", _errno.EINVAL)
        off, size = HVM_HW_CPU_FIELDS[field]
        out[off:off + size] = (int(value) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    return bytes(out)


# --------------------------------------------------------------------------- loading

class XenUnavailable(BackendError):
    """This host cannot reach Xen: a tools library or /dev/xen/privcmd is missing, or a handle
    cannot be opened. The message starts "not a Xen dom0 (or no privcmd): "."""

    def __init__(self, operation: str, message: str, errno: int | None = None) -> None:
        if not message.startswith("not a Xen dom0"):
            message = f"not a Xen dom0 (or no privcmd): {message}"
        super().__init__(operation, message, errno)


def cdef_source() -> str:
    """The complete cdef: typedefs, structs and every declared function."""
    parts = [TYPEDEFS]
    for name, fields in STRUCTS.items():
        parts.append("typedef struct {\n" + "".join(f"    {decl};\n" for _f, decl in fields) + f"}} {name};\n")
    for decls in DECLARATIONS.values():
        parts.extend(f"{ret} {name}({params});\n" for ret, name, params in decls)
    return "".join(parts)


@functools.cache
def _ffi() -> Any:
    try:
        from cffi import FFI
    except ImportError as exc:   # cffi is a dependency; without it nothing native works
        raise XenUnavailable("attach", f"cffi is not installed ({exc})") from None
    ffi = FFI()
    ffi.cdef(cdef_source())
    return ffi


_LIBS: dict[str, Any] = {}
# What a backend opens, in this order (libc last: it serves the foreign mappings' munmap).
_LIBRARIES = ("xenctrl", "xenevtchn", "xenforeignmemory", "xendevicemodel", "c")


def load_library(key: str) -> Any:
    """dlopen one library of `LIBRARIES` (or libc, key "c"); XenUnavailable when it is missing. For
    "xenctrl", the first release of `RELEASES` whose library is installed (`LIBRARIES` names it then)."""
    if key in _LIBS:
        return _LIBS[key]
    ffi = _ffi()
    names = ([LIBRARIES[key]] + [r.xenctrl for r in RELEASES if r.xenctrl != LIBRARIES[key]]
             if key == "xenctrl" else [LIBRARIES.get(key)])
    errors = []
    for soname in names:
        try:
            lib = ffi.dlopen(None) if key == "c" else ffi.dlopen(soname)
        except OSError as exc:
            errors.append(str(exc))
            continue
        if key == "xenctrl":
            LIBRARIES[key] = soname
        _LIBS[key] = lib
        return lib
    raise XenUnavailable("attach", f"cannot load {' or '.join(n or 'libc' for n in names)} ({errors[0]}); install "
                                   "the Xen tools libraries (Debian 12: libxenmisc4.17, Debian 13: "
                                   "libxenmisc4.20)") from None


def loaded_release() -> XenRelease:
    """The Xen release of the libxenctrl `load_library` found."""
    load_library("xenctrl")
    return next(r for r in RELEASES if r.xenctrl == LIBRARIES["xenctrl"])


def _error(op: str, call: str, err: int, detail: str = "") -> BackendError:
    text = f"{call} failed: {os.strerror(err) if err else 'unknown error'}"
    if detail:
        text += f" ({detail})"
    if err == _errno.EINVAL:
        return InvalidArgument(op, text, err)
    if err in (_errno.EOPNOTSUPP, _errno.ENOSYS):
        return Unsupported(op, text, err)
    return BackendError(op, text, err)


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
        libraries = {lib: load_library(lib) for lib in _LIBRARIES}
        release = loaded_release()
        if not os.path.exists(PRIVCMD):
            raise XenUnavailable("attach", f"{PRIVCMD} is missing (run as root in dom0 with the xen-privcmd "
                                           "module loaded and xenfs mounted)", _errno.ENOENT)
        self._init_state(domid, name, _ffi(), libraries, release)
        try:
            self._open_handles()
            self._caps = self._discover()
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
        b._init_state(domid, name, _ffi(), dict(libraries or {}), xen_release or RELEASES[0])
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
        self._kick: Any = None              # native_notify's C kick (kept alive with its struct)
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

    def _open_handles(self) -> None:
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
            raise _error(op, "xc_domain_getinfolist", self._ffi.errno)
        if n == 0 or info.domain != self.domid:
            raise BackendError(op, f"no domain {self.domid}", _errno.ESRCH)
        return info

    def _discover(self) -> Capabilities:
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
            raise _error("attach", "xc_vm_event_get_version", ffi.errno)
        if version != abi.VERSION:
            raise Unsupported("attach", f"Xen speaks vm_event interface version {version}; this build speaks "
                                        f"{abi.VERSION} (Xen 4.17 to 4.20)", _errno.EPROTO)
        caps = ffi.new("uint32_t *")
        if xc.xc_monitor_get_capabilities(self._xch, self.domid, caps) < 0:
            raise _error("attach", "xc_monitor_get_capabilities", ffi.errno)
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
            raise _error("attach", "xc_physinfo", ffi.errno)
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
            raise _error("monitor ring", "xc_monitor_enable", err, detail)
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
            raise _error("monitor ring", "xenevtchn_bind_interdomain", err)
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
            raise _error("close", "xc_monitor_disable", err)

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
            raise _error("pause", "xc_domain_pause", self._ffi.errno)

    def unpause(self) -> None:
        if self._xc.xc_domain_unpause(self._xch, self.domid) < 0:
            raise _error("unpause", "xc_domain_unpause", self._ffi.errno)

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
                    raise _error(op, "xc_set_mem_access", ffi.errno, f"{count} gfn(s) from {first:#x}")
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
                raise _error(op, call, ffi.errno, f"view {view}, {len(chunk)} gfn(s) from {chunk[0]:#x}")

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
            raise _error(op, call, ffi.errno, f"view {view}, gfn {gfn:#x}")
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
            raise _error(op, "xc_domain_maximum_gpfn", self._ffi.errno)
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
                raise _error("populated_frames", "xenforeignmemory_map", ffi.errno,
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
            raise _error("altp2m_get_state", "xc_altp2m_get_domain_state", err)
        return bool(state[0])

    def altp2m_set_state(self, enabled: bool) -> None:
        if self._xc.xc_altp2m_set_domain_state(self._xch, self.domid, bool(enabled)) < 0:
            raise _error("altp2m_set_state", "xc_altp2m_set_domain_state", self._ffi.errno)

    def create_view(self, default_access: str = "rwx") -> int:
        view = self._ffi.new("uint16_t *")
        if self._xc.xc_altp2m_create_view(self._xch, self.domid, access_code(default_access, "create_view", self.xen_release),
                                          view) < 0:
            raise _error("create_view", "xc_altp2m_create_view", self._ffi.errno)
        return int(view[0])

    def destroy_view(self, view: int) -> None:
        if self._xc.xc_altp2m_destroy_view(self._xch, self.domid, view) < 0:
            raise _error("destroy_view", "xc_altp2m_destroy_view", self._ffi.errno, f"view {view}")

    def switch_view(self, view: int) -> None:
        if self._xc.xc_altp2m_switch_to_view(self._xch, self.domid, view) < 0:
            raise _error("switch_view", "xc_altp2m_switch_to_view", self._ffi.errno, f"view {view}")

    def current_view(self, vcpu: int) -> int:
        """xc_altp2m_get_vcpu_p2m_idx; 0 when altp2m is off."""
        idx = self._ffi.new("uint16_t *")
        if self._xc.xc_altp2m_get_vcpu_p2m_idx(self._xch, self.domid, vcpu, idx) < 0:
            err = self._ffi.errno
            if err in (_errno.EOPNOTSUPP, _errno.EINVAL):
                return 0
            raise _error("current_view", "xc_altp2m_get_vcpu_p2m_idx", err)
        return int(idx[0])

    def altp2m_set_visibility(self, view: int, visible: bool) -> None:
        """Hide a view from the guest's VMFUNC and from xc_altp2m_switch_to_view (XEN-SEMANTICS §2)."""
        if self._xc.xc_altp2m_set_visibility(self._xch, self.domid, view, bool(visible)) < 0:
            raise _error("altp2m_set_visibility", "xc_altp2m_set_visibility", self._ffi.errno, f"view {view}")

    def change_gfn(self, view: int, gfn: int, new_gfn: int | None) -> None:
        target = _INVALID_GFN if new_gfn is None else new_gfn
        if self._xc.xc_altp2m_change_gfn(self._xch, self.domid, view, gfn, target) < 0:
            raise _error("change_gfn", "xc_altp2m_change_gfn", self._ffi.errno,
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
                raise _error("add_frame", "xc_domain_populate_physmap_exact", err, f"gfn {gfn:#x}")
            info = self._info("add_frame")
            if self._xc.xc_domain_setmaxmem(self._xch, self.domid, (info.max_pages + 1) * (PAGE_SIZE // 1024)) < 0:
                raise _error("add_frame", "xc_domain_setmaxmem", ffi.errno)
            raised = True
            arr[0] = gfn
            if self._xc.xc_domain_populate_physmap_exact(self._xch, self.domid, 1, 0, 0, arr) < 0:
                err = ffi.errno
                self._xc.xc_domain_setmaxmem(self._xch, self.domid, info.max_pages * (PAGE_SIZE // 1024))
                raise _error("add_frame", "xc_domain_populate_physmap_exact", err, f"gfn {gfn:#x}")
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
            raise _error("remove_frame", "xc_domain_decrease_reservation_exact", self._ffi.errno, f"gfn {gfn:#x}")
        raised = self._added.pop(gfn)
        self._known[gfn] = False
        if self._populated is not None and gfn in self._populated:
            self._populated.remove(gfn)
            self._population_index = None
        if raised:
            info = self._info("remove_frame")
            if self._xc.xc_domain_setmaxmem(self._xch, self.domid,
                                            max(info.max_pages - 1, 0) * (PAGE_SIZE // 1024)) < 0:
                raise _error("remove_frame", "xc_domain_setmaxmem", self._ffi.errno)

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
            raise _error(op, "xc_monitor_write_ctrlreg", self._ffi.errno, name)
        if enable:
            self._mon_cr[name] = {"sync": bool(sync), "onchangeonly": bool(onchangeonly), "bitmask": bitmask}
        else:
            self._mon_cr.pop(name, None)

    def monitor_mov_to_msr(self, msr: int, enable: bool, *, onchangeonly: bool = False) -> None:
        op = "monitor_mov_to_msr"
        self._mon_check(op, "mov_to_msr")
        if self._xc.xc_monitor_mov_to_msr(self._xch, self.domid, msr, bool(enable), bool(onchangeonly)) < 0:
            raise _error(op, "xc_monitor_mov_to_msr", self._ffi.errno, f"MSR {msr:#x}")
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
        buf = bytearray(_DOMCTL_SIZE)
        buf[0:4] = CONSTANTS["XEN_DOMCTL_monitor_op"].to_bytes(4, "little")
        buf[4:8] = self.xen_release.domctl_interface.to_bytes(4, "little")
        buf[8:10] = self.domid.to_bytes(2, "little")
        buf[16:20] = CONSTANTS["XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS"].to_bytes(4, "little")
        cbuf = self._ffi.new("uint8_t[]", bytes(buf))
        if self._xc.xc_domctl(self._xch, self._ffi.cast("struct xen_domctl *", cbuf)) < 0:
            raise _error(op, "xc_domctl(XEN_DOMCTL_monitor_op, CONTROL_REGISTERS)", self._ffi.errno)

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
            raise _error(op, call, self._ffi.errno, kind)
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
            raise _error("get_registers", "xc_domain_hvm_getcontext_partial(CPU)", ffi.errno, f"vCPU {vcpu}")
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
            raise _error("get_registers", "xc_vcpu_getcontext", ffi.errno, f"vCPU {vcpu}")
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
                raise _error(op, "xc_domain_hvm_getcontext", ffi.errno)
            buf = ffi.new("uint8_t[]", size)
            got = self._xc.xc_domain_hvm_getcontext(self._xch, self.domid, buf, size)
            if got <= 0:
                raise _error(op, "xc_domain_hvm_getcontext", ffi.errno)
            blob = build_cpu_context(bytes(ffi.buffer(buf, got)), vcpu, registers)
            cblob = ffi.new("uint8_t[]", blob)
            if self._xc.xc_domain_hvm_setcontext(self._xch, self.domid, cblob, len(blob)) < 0:
                raise _error(op, "xc_domain_hvm_setcontext", ffi.errno, f"vCPU {vcpu}")
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
            raise _error(op, "xendevicemodel_inject_event", self._ffi.errno, f"vector {vector}, vCPU {vcpu}")

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
        if self._kick is None:
            nffi, nlib = abi._native()
            xffi = self._ffi
            k = nffi.new("struct vm_evtchn_kick *")
            k.notify = nffi.cast("int (*)(void *, uint32_t)", int(xffi.cast("uintptr_t", self._ev.xenevtchn_notify)))
            k.xce = nffi.cast("void *", int(xffi.cast("uintptr_t", self._xce)))
            k.port = self._port
            self._kick = (nffi.addressof(nlib, "vm_evtchn_kick"), nffi.cast("void *", k), k)
        return self._kick[:2]

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
                    raise _error("put_responses", "xc_vcpu_getinfo", self._ffi.errno, f"vCPU {vcpu}")
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
            raise _error("notify", "xenevtchn_notify", self._ffi.errno)

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
            raise _error("wait", "xenevtchn_pending", self._ffi.errno)
        if self._ev.xenevtchn_unmask(self._xce, port) < 0:
            raise _error("wait", "xenevtchn_unmask", self._ffi.errno)
        return True

    def __repr__(self) -> str:
        return f"XenBackend(domid={self.domid}, name={self.name!r}, ring={'on' if self._ring else 'off'})"


# --------------------------------------------------------------------------- helpers

_REGISTER_WRITE_REASONS = (RS_WRITE_CTRLREG, RS_MOV_TO_MSR)


def build_cpu_context(context: bytes, vcpu: int, registers: Mapping[str, int]) -> bytes:
    """From a whole HVM context (hvm_save_descriptor {u16 typecode, u16 instance, u32 length} + data,
    repeated, ending with END), the context to load: its HEADER record, vCPU `vcpu`'s CPU record
    with `registers` patched in, and END."""
    header = cpu = None
    pos = 0
    while pos + 8 <= len(context):
        code = int.from_bytes(context[pos:pos + 2], "little")
        inst = int.from_bytes(context[pos + 2:pos + 4], "little")
        length = int.from_bytes(context[pos + 4:pos + 8], "little")
        rec = context[pos:pos + 8 + length]
        if code == CONSTANTS["HVM_SAVE_CODE(HEADER)"]:
            header = rec
        elif code == CONSTANTS["HVM_SAVE_CODE(CPU)"] and inst == vcpu:
            cpu = rec
        elif code == CONSTANTS["HVM_SAVE_CODE(END)"]:
            break
        pos += 8 + length
    if header is None or cpu is None:
        raise BackendError("set_registers", f"the HVM context has no {'header' if header is None else 'CPU'} "
                                            f"record for vCPU {vcpu}")
    if len(cpu) - 8 < HVM_HW_CPU_SIZE:
        raise BackendError("set_registers", f"vCPU {vcpu}'s CPU record is {len(cpu) - 8} bytes, expected "
                                            f"{HVM_HW_CPU_SIZE}")
    patched = cpu[:8] + patch_hvm_cpu(cpu[8:], registers)
    return header + patched + bytes(8)


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU vendor string dom0 sees ("GenuineIntel", "AuthenticAMD", ...); "" when unknown."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def arch_from_vendor(vendor: str) -> str:
    """The Backend arch for an x86 host: VMX/EPT on Intel, SVM/NPT on AMD and Hygon."""
    if vendor in ("AuthenticAMD", "HygonGenuine"):
        return "x86_64-svm"
    if vendor == "GenuineIntel":
        return "x86_64"
    raise Unsupported("attach", f"unknown CPU vendor '{vendor}' (expected GenuineIntel or AuthenticAMD)",
                      _errno.EOPNOTSUPP)


def resolve_domain(spec: str) -> tuple[int, str]:
    """(domid, name) for a domid or a domain name. A name is looked up in xenstore
    (/local/domain/*/name, xs_open/xs_directory/xs_read); for a domid the name is read back when
    xenstore answers, else the name is the domid."""
    spec = spec.strip()
    if spec.isdigit():
        domid = int(spec)
        if domid >= 0x7FF0:
            raise InvalidArgument("attach", f"{domid} is not a guest domid", _errno.EINVAL)
        try:
            names = _xenstore_names()
        except BackendError:
            return domid, spec
        return domid, names.get(domid, spec)
    if not spec:
        raise InvalidArgument("attach", "empty domain name", _errno.EINVAL)
    names = _xenstore_names()
    found = [d for d, n in names.items() if n == spec]
    if not found:
        raise BackendError("attach", f"no domain named '{spec}' in xenstore", _errno.ENOENT)
    return found[0], spec


def _xenstore_names() -> dict[int, str]:
    ffi = _ffi()
    xs = load_library("xenstore")
    libc = load_library("c")
    h = xs.xs_open(0)
    if h == ffi.NULL:
        raise BackendError("attach", f"xs_open failed: {os.strerror(ffi.errno)}: cannot resolve domain names "
                                     "(give the domid)", ffi.errno)
    try:
        num = ffi.new("unsigned int *")
        entries = xs.xs_directory(h, 0, b"/local/domain", num)
        if entries == ffi.NULL:
            raise BackendError("attach", f"xs_directory(/local/domain) failed: {os.strerror(ffi.errno)}",
                               ffi.errno)
        ids = [ffi.string(entries[i]).decode() for i in range(num[0])]
        libc.free(entries)
        out: dict[int, str] = {}
        for d in ids:
            if not d.isdigit():
                continue
            n = ffi.new("unsigned int *")
            value = xs.xs_read(h, 0, f"/local/domain/{d}/name".encode(), n)
            if value == ffi.NULL:
                continue
            out[int(d)] = bytes(ffi.buffer(value, n[0])).decode(errors="replace")
            libc.free(value)
        return out
    finally:
        xs.xs_close(h)
