"""The Xen tools libraries as `XenBackend` calls them, and what it needs to know around them.

The releases it speaks to (`RELEASES`, what differs in `XenRelease`), the C declarations
(`TYPEDEFS`, `STRUCTS`, `DECLARATIONS`, `CONSTANTS`) checked against Debian's libxen-dev headers by
tests/test_xen_backend.py, loading the libraries (`load_library`, ABI mode: no compiler and no Xen
needed to import this), the monitor capability bits, xenmem_access_t, the `struct hvm_hw_cpu`
layout of an HVM context, and finding the host's CPU vendor and a domain by name or id.
"""

from __future__ import annotations

import errno as _errno
import functools
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..native import abi

from .backend import ACCESS_VALUES, BackendError, InvalidArgument, Unsupported

__all__ = ["XenUnavailable", "XenRelease", "RELEASES", "LIBRARIES", "BACKEND_LIBRARIES", "TYPEDEFS", "STRUCTS",
           "DECLARATIONS", "CONSTANTS", "MONITOR_EVENT_BITS", "HVM_HW_CPU_FIELDS", "HVM_HW_CPU_SIZE", "PRIVCMD",
           "PAGE_SIZE", "PAGE_SHIFT", "DOMCTL_SIZE", "xen_ffi", "cdef_source", "load_library",
           "forget_loaded_libraries", "loaded_release", "call_error",
           "monitors_from_capabilities", "access_code", "access_name", "registers_from_hvm_cpu", "patch_hvm_cpu",
           "build_cpu_context", "cpu_vendor", "arch_from_vendor", "resolve_domain"]

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
DOMCTL_SIZE = 16 + 128          # header + the union (its pad[128] is the largest member)
CONSTANTS["sizeof(struct xen_domctl)"] = DOMCTL_SIZE


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
def xen_ffi() -> Any:
    try:
        from cffi import FFI
    except ImportError as exc:   # cffi is a dependency; without it nothing native works
        raise XenUnavailable("attach", f"cffi is not installed ({exc})") from None
    ffi = FFI()
    ffi.cdef(cdef_source())
    return ffi


_LIBS: dict[str, Any] = {}
# What a backend opens, in this order (libc last: it serves the foreign mappings' munmap).
BACKEND_LIBRARIES = ("xenctrl", "xenevtchn", "xenforeignmemory", "xendevicemodel", "c")


def load_library(key: str) -> Any:
    """dlopen one library of `LIBRARIES` (or libc, key "c"); XenUnavailable when it is missing. For
    "xenctrl", the first release of `RELEASES` whose library is installed (`LIBRARIES` names it then)."""
    if key in _LIBS:
        return _LIBS[key]
    ffi = xen_ffi()
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


def forget_loaded_libraries() -> None:
    """Drop what `load_library` opened: the next call opens the library again, as `LIBRARIES` and
    `RELEASES` then say."""
    _LIBS.clear()


def loaded_release() -> XenRelease:
    """The Xen release of the libxenctrl `load_library` found."""
    load_library("xenctrl")
    return next(r for r in RELEASES if r.xenctrl == LIBRARIES["xenctrl"])


def call_error(op: str, call: str, err: int, detail: str = "") -> BackendError:
    text = f"{call} failed: {os.strerror(err) if err else 'unknown error'}"
    if detail:
        text += f" ({detail})"
    if err == _errno.EINVAL:
        return InvalidArgument(op, text, err)
    if err in (_errno.EOPNOTSUPP, _errno.ENOSYS):
        return Unsupported(op, text, err)
    return BackendError(op, text, err)


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
    ffi = xen_ffi()
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


def native_event_channel(xffi: Any, ev: Any, xce: Any, port: int) -> tuple[tuple[Any, Any], tuple[Any, Any], Any]:
    """libxenevtchn for a native monitor: the kick's and the wait's (C function, argument) and the
    struct both take (`vm_evtchn_kick` and `vm_evtchn_wait` in native/ring.c), which holds the
    library's notify, pending and unmask calls, the handle, the port and the handle's descriptor.
    The struct must live as long as the two are used."""
    nffi, nlib = abi.extension()

    def c_function(ctype: str, fn: Any) -> Any:
        return nffi.cast(ctype, int(xffi.cast("uintptr_t", fn)))

    k = nffi.new("struct vm_evtchn_kick *")
    k.notify = c_function("int (*)(void *, uint32_t)", ev.xenevtchn_notify)
    k.pending = c_function("int (*)(void *)", ev.xenevtchn_pending)
    k.unmask = c_function("int (*)(void *, uint32_t)", ev.xenevtchn_unmask)
    k.xce = nffi.cast("void *", int(xffi.cast("uintptr_t", xce)))
    k.port = port
    k.fd = ev.xenevtchn_fd(xce)
    ctx = nffi.cast("void *", k)
    return (nffi.addressof(nlib, "vm_evtchn_kick"), ctx), (nffi.addressof(nlib, "vm_evtchn_wait"), ctx), k
