"""The `Backend` protocol: everything the enforcer may ask of a hypervisor.

Every backend (the simulated Xen, libxenctrl, KVM) implements exactly this
and nothing more is assumed. The vocabulary is Xen's: altp2m views, mem_access
values, monitor_op settings, vm_event requests and responses as the bytes of
interface version 7 (`policyc.native.abi`). A backend that lacks a feature
raises `Unsupported` as the real hypervisor fails, never silently succeeds.

Errors: `BackendError` and its subclasses carry the operation and, where the
hypervisor gave one, the errno.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

from ..errors import PolicycError

__all__ = ["ACCESS_VALUES", "ON_OFF_MONITORS", "ALWAYS_SYNC_MONITORS", "Backend", "BackendError", "Capabilities",
           "Unsupported", "InvalidArgument"]

# Xen's p2m access values (xenmem_access_t), by the names xen-access uses.
ACCESS_VALUES = ("n", "r", "w", "rw", "x", "rx", "wx", "rwx", "rx2rw", "n2rwx", "default")


class BackendError(PolicycError, RuntimeError):
    def __init__(self, operation: str, message: str, errno: int | None = None) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation
        self.message = message
        self.errno = errno

    def __reduce__(self) -> tuple:
        # Crosses process boundaries intact (a backend served to another process, runtime/sim/host.py).
        return (type(self), (self.operation, self.message, self.errno))


class Unsupported(BackendError):
    """The hypervisor refuses: the feature does not exist here (EOPNOTSUPP on Xen)."""


class InvalidArgument(BackendError):
    """The hypervisor refuses the arguments (EINVAL on Xen)."""


# The monitors `Backend.monitor` switches on and off (the others take arguments: write_ctrlreg,
# mov_to_msr), in the order install enables them; and those Xen always delivers synchronously.
ON_OFF_MONITORS = ("software_breakpoint", "descriptor_access", "cpuid", "privileged_call", "singlestep",
                   "guest_request", "debug_exception")
ALWAYS_SYNC_MONITORS = frozenset({"software_breakpoint", "descriptor_access", "cpuid", "privileged_call",
                                  "singlestep"})


@dataclass(frozen=True)
class Capabilities:
    """What a host offers, discovered at attach (`xc_monitor_get_capabilities` and friends)."""
    arch: str                       # "x86_64", "x86_64-svm", "arm64"
    vm_event_version: int           # 7 on Xen 4.17
    vcpus: int
    mem_access: bool
    altp2m: bool
    max_views: int                  # altp2m views including view 0; 0 without altp2m
    singlestep: bool
    monitors: frozenset[str]        # write_ctrlreg mov_to_msr software_breakpoint descriptor_access cpuid
                                    # guest_request debug_exception privileged_call singlestep
    ring_slots: int = 8


@runtime_checkable
class Backend(Protocol):
    """One attached guest domain."""

    name: str

    # -- discovery and life cycle
    def capabilities(self) -> Capabilities: ...
    def close(self) -> None: ...

    # -- pausing
    def pause(self) -> None: ...
    def unpause(self) -> None: ...
    def paused_vcpus(self) -> frozenset[int]:
        """vCPUs that are paused for any reason (domain pause or an unanswered sync event)."""
        ...

    # -- memory access permissions (per altp2m view; view 0 is the host p2m)
    def set_access(self, view: int, gfns: Sequence[int], access: str | Sequence[str]) -> None:
        """Set access on populated frames: one value for all, or one per gfn (xc_set_mem_access_multi)."""
        ...
    def get_access(self, view: int, gfn: int) -> str: ...
    def populated_frames(self) -> Iterable[int]: ...

    # -- altp2m
    def altp2m_set_state(self, enabled: bool) -> None: ...
    def create_view(self, default_access: str = "rwx") -> int: ...
    def destroy_view(self, view: int) -> None: ...
    def switch_view(self, view: int) -> None:
        """Switch every vCPU to `view` (xc_altp2m_switch_to_view)."""
        ...
    def change_gfn(self, view: int, gfn: int, new_gfn: int | None) -> None:
        """In `view`, map `gfn` to `new_gfn`'s frame; None restores the identity mapping."""
        ...
    def add_frame(self) -> int:
        """Populate one new frame beyond the guest's memory (for shadow pages); returns its gfn."""
        ...
    def remove_frame(self, gfn: int) -> None: ...

    # -- monitors (monitor_op domctls)
    def monitor_write_ctrlreg(self, index: str, enable: bool, *, sync: bool = True,
                              onchangeonly: bool = False, bitmask: int = 0) -> None: ...
    def monitor_mov_to_msr(self, msr: int, enable: bool, *, onchangeonly: bool = False) -> None: ...
    def monitor_control_registers(self, enable: bool) -> None:
        """XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS: needed before a DENY of a CR/MSR write has effect."""
    def monitor(self, kind: str, enable: bool, *, sync: bool = True) -> None:
        """The on/off monitors: software_breakpoint, descriptor_access, cpuid, guest_request,
        debug_exception, privileged_call, singlestep."""
        ...
    def monitors(self) -> Mapping[str, object]:
        """What is enabled now (for snapshots and recovery)."""
        ...

    # -- guest state
    def read_physical(self, address: int, size: int) -> bytes: ...
    def write_physical(self, address: int, data: bytes) -> None: ...
    def get_registers(self, vcpu: int) -> dict[str, int]: ...
    def set_registers(self, vcpu: int, registers: Mapping[str, int]) -> None: ...
    def inject_exception(self, vcpu: int, vector: int, *, error_code: int | None = None,
                         insn_length: int = 0, software: bool = False) -> None: ...

    # -- the vm_event ring
    def take_requests(self, limit: int = 8) -> list[bytes]:
        """Raw 400-byte requests, oldest first."""
        ...
    def put_responses(self, responses: Iterable[bytes]) -> None: ...
    def notify(self) -> None: ...
    def wait(self, timeout: float) -> bool:
        """Block until the event channel fires or `timeout` seconds pass; True when it fired."""
        ...
