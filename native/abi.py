"""The vm_event ABI (Xen 4.17, interface version 7) as Python values.

Everything this module returns is an ``int``, ``bytes``, ``dict``, ``list``,
an enum, or one of the classes below; cffi objects appear only through
:func:`extension`, for the modules that hand C structures to C (the ring
replay, the libxc bindings) and for tests of the C layouts. The compiled
extension ``policyc.native._vm_event`` (built from ``native/vm_event_abi.h``
and ``native/ring.c`` at install time) is imported on first use, so
importing this module never fails; using it without the extension raises
:class:`ExtensionNotBuilt`.

Constants (loaded on first access):

``VERSION``        VM_EVENT_INTERFACE_VERSION (7)
``EVENT_SIZE``     sizeof(vm_event_request_t) (400)
``RING_SLOTS``     slots in one ring page (8)
``RING_PAGE_SIZE`` the ring page (4096)
``Reason``         IntEnum of VM_EVENT_REASON_* (``Reason.MEM_ACCESS`` ...)
``Flag``           IntFlag of VM_EVENT_FLAG_* (``Flag.VCPU_PAUSED`` ...)
``MemAccess``      IntFlag of MEM_ACCESS_* (``MemAccess.W`` ...)
``CtrlReg``        IntEnum of VM_EVENT_X86_* (``CtrlReg.CR3`` ...)
``Desc``           IntEnum of VM_EVENT_DESC_*
``X86EventType``   IntEnum of X86_EVENTTYPE_*

Events: :func:`make_request`, :func:`make_response` and
:func:`parse_request` / :func:`parse_response` give :class:`Request` and
:class:`Response` objects, each a 400-byte ``raw`` image plus decoded header
fields. :class:`Ring` drives a 4096-byte ring page from either side.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import PolicycError

__all__ = [
    "ExtensionNotBuilt",
    "RingError",
    "extension",
    "Event",
    "Request",
    "Response",
    "constants",
    "make_request",
    "make_response",
    "parse_request",
    "parse_response",
    "HEADER",
    "Ring",
    "VERSION",
    "EVENT_SIZE",
    "RING_SLOTS",
    "RING_PAGE_SIZE",
    "Reason",
    "Flag",
    "MemAccess",
    "CtrlReg",
    "Desc",
    "X86EventType",
]


class ExtensionNotBuilt(PolicycError, ImportError):
    """The compiled vm_event extension is missing."""


class RingError(PolicycError, RuntimeError):
    """A ring operation that would break the protocol."""


@functools.cache
def extension() -> tuple[Any, Any]:
    """The compiled extension's ``(ffi, lib)``, imported once (``extension.cache_clear()`` forgets it);
    :class:`ExtensionNotBuilt` when it is missing."""
    try:
        from policyc.native import _vm_event  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ExtensionNotBuilt(
            "the vm_event extension policyc.native._vm_event is not built; "
            "install the project (pip install -e .), which compiles "
            "native/ring.c with gcc and the Python headers, or build it with "
            "`python native/build_vm_event.py OUTDIR` and put OUTDIR on "
            f"sys.path ({exc})"
        ) from exc
    return _vm_event.ffi, _vm_event.lib


# ---------------------------------------------------------------------------
# constants

# C prefixes of the header's integer constants.
_PREFIXES = (
    "VM_EVENT_",
    "MEM_ACCESS_",
    "MEM_PAGING_",
    "X86_EVENTTYPE_",
    "VM_RING_",
)


def constants() -> dict[str, int]:
    """Every integer constant of vm_event_abi.h, by its C name."""
    _, lib = extension()
    out = {}
    for name in dir(lib):
        if name.startswith(_PREFIXES):
            value = getattr(lib, name)
            if isinstance(value, int):
                out[name] = value
    return out


def _group(prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    return {
        name[len(prefix):]: value
        for name, value in sorted(constants().items(), key=lambda kv: kv[1])
        if name.startswith(prefix) and name not in exclude
    }


def _build_lazy(name: str) -> Any:
    _, lib = extension()
    if name == "VERSION":
        return lib.VM_EVENT_INTERFACE_VERSION
    if name == "EVENT_SIZE":
        ffi, _ = extension()
        return ffi.sizeof("vm_event_request_t")
    if name == "RING_SLOTS":
        return lib.VM_RING_SLOTS
    if name == "RING_PAGE_SIZE":
        return lib.VM_RING_PAGE_SIZE
    if name == "Reason":
        return enum.IntEnum("Reason", _group("VM_EVENT_REASON_"), module=__name__)
    if name == "Flag":
        return enum.IntFlag("Flag", _group("VM_EVENT_FLAG_"), module=__name__)
    if name == "MemAccess":
        return enum.IntFlag("MemAccess", _group("MEM_ACCESS_"), module=__name__)
    if name == "CtrlReg":
        return enum.IntEnum("CtrlReg", _group("VM_EVENT_X86_"), module=__name__)
    if name == "Desc":
        return enum.IntEnum("Desc", _group("VM_EVENT_DESC_"), module=__name__)
    if name == "X86EventType":
        return enum.IntEnum("X86EventType", _group("X86_EVENTTYPE_"), module=__name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LAZY = {
    "VERSION",
    "EVENT_SIZE",
    "RING_SLOTS",
    "RING_PAGE_SIZE",
    "Reason",
    "Flag",
    "MemAccess",
    "CtrlReg",
    "Desc",
    "X86EventType",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _build_lazy(name)
    globals()[name] = value
    return value


# The union member of ``u`` that each reason fills (by reason name). Reasons
# not listed (GUEST_REQUEST, PRIVILEGED_CALL, EMUL_UNIMPLEMENTED, UNKNOWN)
# carry only the header and the registers.
PAYLOAD_MEMBER: dict[str, str] = {
    "MEM_ACCESS": "mem_access",
    "MEM_SHARING": "mem_sharing",
    "MEM_PAGING": "mem_paging",
    "WRITE_CTRLREG": "write_ctrlreg",
    "MOV_TO_MSR": "mov_to_msr",
    "SOFTWARE_BREAKPOINT": "software_breakpoint",
    "SINGLESTEP": "singlestep",
    "DEBUG_EXCEPTION": "debug_exception",
    "CPUID": "cpuid",
    "INTERRUPT": "interrupt.x86",
    "DESCRIPTOR_ACCESS": "desc_access",
    "VMEXIT": "vmexit",
}


# ---------------------------------------------------------------------------
# cdata <-> Python values (private)

_BYTE_TYPES = ("uint8_t", "unsigned char", "char")


def _to_py(ffi: Any, value: Any) -> Any:
    if not isinstance(value, ffi.CData):
        return value
    ctype = ffi.typeof(value)
    if ctype.kind in ("struct", "union"):
        return {
            name: _to_py(ffi, getattr(value, name))
            for name, _ in ctype.fields
            if not name.startswith("_")
        }
    if ctype.kind == "array":
        if ctype.item.cname in _BYTE_TYPES:
            return bytes(ffi.buffer(value))
        return [_to_py(ffi, item) for item in value]
    raise TypeError(f"unexpected field type {ctype.cname}")


def _walk(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _assign(ffi: Any, obj: Any, name: str, value: Any) -> None:
    """obj.name = value, where value may be a mapping (nested fields) or
    bytes (a byte array, zero-filled past its end)."""
    head, _, rest = name.partition(".")
    if rest:
        _assign(ffi, getattr(obj, head), rest, value)
        return
    current = getattr(obj, head)
    if isinstance(current, ffi.CData):
        ctype = ffi.typeof(current)
        if isinstance(value, Mapping):
            for key, sub in value.items():
                _assign(ffi, current, key, sub)
            return
        if ctype.kind == "array" and ctype.item.cname in _BYTE_TYPES:
            data = bytes(value)
            if len(data) > ctype.length:
                raise ValueError(
                    f"{head}: {len(data)} bytes do not fit {ctype.length}"
                )
            ffi.memmove(current, data + bytes(ctype.length - len(data)), ctype.length)
            return
        raise TypeError(f"{head} is a {ctype.cname}: give a mapping")
    setattr(obj, head, value)


# ---------------------------------------------------------------------------
# events

# The leading fields every request and response share: version, flags, reason, vcpu_id, altp2m_idx.
# For paths that route or count events without decoding them (tests check it against the struct).
HEADER = struct.Struct("<IIIIH")

RawEvent = Union["Event", bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Event:
    """One 400-byte vm_event_st image with its header decoded."""

    raw: bytes = field(repr=False)
    version: int
    flags: int
    reason: int
    vcpu_id: int
    altp2m_idx: int

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> "Event":
        data = bytes(raw)
        size = _event_size()
        if len(data) != size:
            raise ValueError(f"a vm_event is {size} bytes, got {len(data)}")
        ffi, _ = extension()
        p = ffi.from_buffer("vm_event_request_t *", data)
        return cls(data, p.version, p.flags, p.reason, p.vcpu_id, p.altp2m_idx)

    @property
    def reason_name(self) -> str | None:
        try:
            return _reason_enum()(self.reason).name
        except ValueError:
            return None

    @property
    def paused(self) -> bool:
        return bool(self.flags & extension()[1].VM_EVENT_FLAG_VCPU_PAUSED)

    def get(self, path: str) -> Any:
        """A field by its C path, e.g. ``"u.mem_access.gfn"``: int, bytes
        (byte arrays) or dict (structs and unions)."""
        ffi, _ = extension()
        p = ffi.from_buffer("vm_event_request_t *", self.raw)
        return _to_py(ffi, _walk(p, path))

    @functools.cached_property
    def payload(self) -> dict[str, Any]:
        """The member of ``u`` this event's reason fills ({} if none)."""
        name = self.reason_name
        member = PAYLOAD_MEMBER.get(name) if name else None
        return self.get(f"u.{member}") if member else {}

    @functools.cached_property
    def regs(self) -> dict[str, Any]:
        """``data.regs.x86`` (segment registers as {"limit", "ar"})."""
        return self.get("data.regs.x86")

    @functools.cached_property
    def regs_arm(self) -> dict[str, int]:
        return self.get("data.regs.arm")


@dataclass(frozen=True)
class Request(Event):
    """A request, as Xen puts it on the ring."""


@dataclass(frozen=True)
class Response(Event):
    """A response, as the monitor puts it on the ring."""


@functools.cache
def _event_size() -> int:
    ffi, _ = extension()
    return int(ffi.sizeof("vm_event_request_t"))


@functools.cache
def _reason_enum() -> Any:
    return __getattr__("Reason")


def _pack(fields: Mapping[str, Any], u_from: bytes | None = None) -> bytes:
    """Build an event; `u_from` (a raw event) supplies the `u` union before `fields` apply."""
    ffi, _ = extension()
    p = ffi.new("vm_event_request_t *")
    if u_from is not None:
        offset, size = ffi.offsetof("vm_event_request_t", "u"), ffi.sizeof(p.u)
        ffi.memmove(ffi.addressof(p, "u"), u_from[offset:offset + size], size)
    for path, value in fields.items():
        _assign(ffi, p, path, value)
    return bytes(ffi.buffer(p))


def _raw(event: RawEvent) -> bytes:
    if isinstance(event, Event):
        return event.raw
    data = bytes(event)
    if len(data) != _event_size():
        raise ValueError(f"a vm_event is {_event_size()} bytes, got {len(data)}")
    return data


def parse_request(raw: bytes | bytearray | memoryview) -> Request:
    return Request.from_bytes(raw)  # type: ignore[return-value]


def parse_response(raw: bytes | bytearray | memoryview) -> Response:
    return Response.from_bytes(raw)  # type: ignore[return-value]


def make_request(
    reason: int,
    vcpu_id: int = 0,
    *,
    flags: int = 0,
    altp2m_idx: int = 0,
    version: int | None = None,
    payload: Mapping[str, Any] | None = None,
    regs: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Request:
    """A request as Xen would write it (for tests and simulation).

    ``payload`` fills the member of ``u`` that ``reason`` uses
    (``PAYLOAD_MEMBER``); ``regs`` fills ``data.regs.x86``; ``fields`` sets
    any other field by C path (``{"u.fast_singlestep.p2midx": 2}``).
    Everything else is zero.
    """
    _, lib = extension()
    values: dict[str, Any] = {
        "version": lib.VM_EVENT_INTERFACE_VERSION if version is None else version,
        "flags": int(flags),
        "reason": int(reason),
        "vcpu_id": vcpu_id,
        "altp2m_idx": altp2m_idx,
    }
    if payload:
        name = _reason_enum()(int(reason)).name
        member = PAYLOAD_MEMBER.get(name)
        if member is None:
            raise ValueError(f"reason {name} carries no payload in u")
        values[f"u.{member}"] = payload
    if regs:
        values["data.regs.x86"] = regs
    if fields:
        values.update(fields)
    return parse_request(_pack(values))


def make_response(
    request: Request | RawEvent,
    *,
    flags: int = 0,
    altp2m_idx: int | None = None,
    fast_singlestep_p2midx: int | None = None,
    emul_read: bytes | None = None,
    emul_insn: bytes | None = None,
    regs: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Response:
    """The response to ``request``.

    It always echoes ``version``, ``vcpu_id``, ``reason``, the VCPU_PAUSED
    flag (without which the vCPU stays paused) and the ``u`` union: Xen reads
    ``u.mem_access`` (EMULATE) and ``u.write_ctrlreg.index`` (DENY) back from
    the response and ignores a response whose union was zeroed. ``flags`` are
    added to that. The data arguments also set the flag they need:

    - ``altp2m_idx``: ALTERNATE_P2M, resume in that view;
    - ``fast_singlestep_p2midx``: FAST_SINGLESTEP, step once then switch;
    - ``emul_read``: EMULATE | SET_EMUL_READ_DATA, data for the read;
    - ``emul_insn``: EMULATE | SET_EMUL_INSN_DATA, 16 instruction bytes;
    - ``regs``: SET_REGISTERS, the request's x86 registers with these
      replaced.
    """
    _, lib = extension()
    req = request if isinstance(request, Event) else parse_request(_raw(request))
    out_flags = (req.flags & lib.VM_EVENT_FLAG_VCPU_PAUSED) | int(flags)
    values: dict[str, Any] = {
        "version": req.version,
        "reason": req.reason,
        "vcpu_id": req.vcpu_id,
    }
    if altp2m_idx is not None:
        out_flags |= lib.VM_EVENT_FLAG_ALTERNATE_P2M
        values["altp2m_idx"] = altp2m_idx
    if fast_singlestep_p2midx is not None:
        out_flags |= lib.VM_EVENT_FLAG_FAST_SINGLESTEP
        values["u.fast_singlestep.p2midx"] = fast_singlestep_p2midx
    if emul_read is not None and emul_insn is not None:
        raise ValueError("emul_read and emul_insn share data.emul: give one")
    if emul_read is not None:
        out_flags |= lib.VM_EVENT_FLAG_EMULATE | lib.VM_EVENT_FLAG_SET_EMUL_READ_DATA
        values["data.emul.read.size"] = len(emul_read)
        values["data.emul.read.data"] = bytes(emul_read)
    if emul_insn is not None:
        if len(emul_insn) != 16:
            raise ValueError("emul_insn must be exactly 16 bytes")
        out_flags |= lib.VM_EVENT_FLAG_EMULATE | lib.VM_EVENT_FLAG_SET_EMUL_INSN_DATA
        values["data.emul.insn.data"] = bytes(emul_insn)
    if regs is not None:
        if emul_read is not None or emul_insn is not None:
            raise ValueError("regs and emulation data share the data union")
        out_flags |= lib.VM_EVENT_FLAG_SET_REGISTERS
        merged = dict(req.regs)
        merged.update(regs)
        values["data.regs.x86"] = merged
    values["flags"] = out_flags
    if fields:
        values.update(fields)
    return parse_response(_pack(values, u_from=req.raw))


# ---------------------------------------------------------------------------
# the ring


class Ring:
    """One vm_event ring page, with both sides' private indices.

    ``buffer`` is any writable buffer of at least ``RING_PAGE_SIZE`` bytes,
    8-byte aligned (a ``bytearray``, an ``mmap`` of the real ring page); by
    default a fresh ``bytearray``. The page is initialised as Xen's
    ``SHARED_RING_INIT`` does, and both sides attach at index 0.

    The requesting side (Xen; simulated here) uses :meth:`put_requests`,
    :meth:`put_request`, :meth:`push_requests`, :meth:`take_responses` and
    :attr:`free_requests`. The responding side (the monitor) uses
    :meth:`take_requests`, :meth:`put_responses`, :meth:`push_responses`
    and :meth:`final_check_for_requests`. Each side keeps its own scratch
    space, so one thread per side may use the ring at the same time.
    """

    def __init__(self, buffer: Any = None) -> None:
        ffi, lib = extension()
        page_size = lib.VM_RING_PAGE_SIZE
        if buffer is None:
            buffer = bytearray(page_size)
        view = memoryview(buffer)
        if view.readonly:
            raise ValueError("the ring buffer must be writable")
        if view.nbytes < page_size:
            raise ValueError(
                f"the ring buffer has {view.nbytes} bytes, needs {page_size}"
            )
        self._buffer = buffer
        self._page = ffi.from_buffer(
            "struct vm_event_sring *", buffer, require_writable=True
        )
        if int(ffi.cast("uintptr_t", self._page)) % 8:
            raise ValueError("the ring buffer must be 8-byte aligned")
        self._front = ffi.new("struct vm_event_front_ring *")
        self._back = ffi.new("struct vm_event_back_ring *")
        lib.vm_ring_shared_init(self._page)
        lib.vm_ring_front_init(self._front, self._page)
        lib.vm_ring_back_init(self._back, self._page)
        self.slots: int = self._back.nr_ents
        # Per-side scratch arrays.
        self._front_in = ffi.new("vm_event_request_t[]", self.slots)
        self._front_out = ffi.new("vm_event_response_t[]", self.slots)
        self._back_in = ffi.new("vm_event_response_t[]", self.slots)
        self._back_out = ffi.new("vm_event_request_t[]", self.slots)
        self._size = ffi.sizeof("vm_event_request_t")

    # -- shared state -----------------------------------------------------
    @property
    def indices(self) -> dict[str, int]:
        """The shared page's indices (req_prod, req_event, rsp_prod,
        rsp_event)."""
        p = self._page
        return {
            "req_prod": p.req_prod,
            "req_event": p.req_event,
            "rsp_prod": p.rsp_prod,
            "rsp_event": p.rsp_event,
        }

    def slot_bytes(self, index: int) -> bytes:
        """The raw 400 bytes of slot ``index % slots`` in the shared page."""
        ffi, _ = extension()
        return bytes(ffi.buffer(ffi.addressof(self._page.ring[index % self.slots])))

    # -- helpers ------------------------------------------------------------
    def _fill(self, array: Any, events: Iterable[RawEvent], limit: int) -> int:
        ffi, _ = extension()
        n = 0
        for event in events:
            if n == limit:
                break
            ffi.memmove(array + n, _raw(event), self._size)
            n += 1
        return n

    def _drain(self, array: Any, n: int, cls: type[Event]) -> list[Any]:
        ffi, _ = extension()
        blob = ffi.buffer(array, n * self._size)[:]
        size = self._size
        return [cls.from_bytes(blob[i * size:(i + 1) * size]) for i in range(n)]

    @staticmethod
    def _limit(max_count: int | None, cap: int) -> int:
        if max_count is None:
            return cap
        if max_count < 0:
            raise ValueError("max_count must be >= 0")
        return min(max_count, cap)

    # -- requesting side (Xen) ---------------------------------------------
    @property
    def free_requests(self) -> int:
        return extension()[1].vm_ring_free_requests(self._front)

    def put_requests(self, requests: Iterable[RawEvent]) -> int:
        """Write as many requests as there are free slots; returns how many
        were written. They are not visible until :meth:`push_requests`."""
        _, lib = extension()
        batch = list(requests)
        placed = 0
        while placed < len(batch):
            n = self._fill(self._front_in, batch[placed:], self.slots)
            done = lib.vm_ring_put_requests(self._front, self._front_in, n)
            placed += done
            if done < n:
                break
        return placed

    def push_requests(self) -> bool:
        """Publish written requests; True if the other side asked to be
        notified (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY)."""
        return bool(extension()[1].vm_ring_push_requests(self._front))

    def put_request(self, request: RawEvent) -> bool:
        """Write and publish one request; False (nothing written) if full."""
        _, lib = extension()
        self._fill(self._front_in, (request,), 1)
        return bool(lib.vm_ring_put_request(self._front, self._front_in))

    @property
    def unconsumed_responses(self) -> int:
        return extension()[1].vm_ring_unconsumed_responses(self._front)

    def take_responses(self, max_count: int | None = None) -> list[Response]:
        """Published responses, oldest first (at most ``max_count``)."""
        _, lib = extension()
        n = lib.vm_ring_take_responses(
            self._front, self._front_out, self._limit(max_count, self.slots)
        )
        return self._drain(self._front_out, n, Response)

    # -- responding side (the monitor) -------------------------------------
    @property
    def unconsumed_requests(self) -> int:
        return extension()[1].vm_ring_unconsumed_requests(self._back)

    @property
    def pending_responses(self) -> int:
        """Requests taken and not answered yet."""
        return extension()[1].vm_ring_pending_responses(self._back)

    def take_requests(self, max_count: int | None = None) -> list[Request]:
        """Published requests, oldest first (at most ``max_count``), each
        copied out of the shared page once."""
        _, lib = extension()
        n = lib.vm_ring_take_requests(
            self._back, self._back_out, self._limit(max_count, self.slots)
        )
        return self._drain(self._back_out, n, Request)

    def put_responses(self, responses: Iterable[RawEvent]) -> int:
        """Write responses, in the order of the requests taken; they are not
        visible until :meth:`push_responses`. More responses than requests
        pending is a protocol error: :class:`RingError`, nothing written."""
        _, lib = extension()
        batch = list(responses)
        if len(batch) > self.pending_responses:
            raise RingError(
                f"{len(batch)} responses for {self.pending_responses} "
                "pending requests: every request gets exactly one response"
            )
        n = self._fill(self._back_in, batch, self.slots)
        done = lib.vm_ring_put_responses(self._back, self._back_in, n)
        if done != n:  # cannot happen after the check above
            raise RingError(f"placed {done} of {n} responses")
        return done

    def put_unsolicited_responses(self, responses: Iterable[RawEvent]) -> int:
        """Write responses that answer no request taken: the bare unpause
        responses a new agent sends after re-enabling the ring of a dead one
        (docs/XEN-SEMANTICS.md §7). Xen accepts them, since it matches
        responses to nothing. Allowed only on a quiet ring (nothing unconsumed,
        nothing pending) and at most one ring's worth. They advance the
        responding side past the requests it ever took. The indices stay skewed
        until the ring is disabled and enabled again, so the caller must do
        that before the ring carries requests again."""
        _, lib = extension()
        batch = list(responses)
        if self.unconsumed_requests or self.pending_responses:
            raise RingError("unsolicited responses need a quiet ring: requests are unanswered")
        if len(batch) > self.slots:
            raise RingError(f"{len(batch)} unsolicited responses for a ring of {self.slots} slots")
        self._back.req_cons += len(batch)
        n = self._fill(self._back_in, batch, self.slots)
        return lib.vm_ring_put_responses(self._back, self._back_in, n)

    def push_responses(self) -> bool:
        """Publish written responses; True if the other side asked to be
        notified (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY)."""
        return bool(extension()[1].vm_ring_push_responses(self._back))

    def final_check_for_requests(self) -> bool:
        """Before waiting on the event channel: ask to be notified of the
        next request and look once more (RING_FINAL_CHECK_FOR_REQUESTS)."""
        return bool(extension()[1].vm_ring_final_check_for_requests(self._back))


def floor_loop(n: int) -> int:
    """Run ``n`` request/response round trips through a private ring in C;
    returns how many came back with a correct echo (n when all is well)."""
    return int(extension()[1].vm_ring_floor_loop(n))
