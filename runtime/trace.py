"""Recorded request streams: `policyc run --record TRACE`, `policyc replay TRACE --policy P`.

The enforcer's input is the vm_event requests, plus what binding read from
the guest (registers, the page-table and IDT frames), which decides what the
requests mean. A trace keeps both, in the order they happened, so that a
replay re-decides every request against the same guest as it was: for
forensics (what would this policy have done with yesterday's events), and as
a regression test of a policy change (`--baseline OLD`: which decisions
change).

Format: JSON Lines, one object per line.

1. ``{"trace": "policyc-trace/1", "created", "guest", "plan_hash",
   "policy": {name, hash}, "capabilities": {...}}``
2. ``{"guest_read": {"frames": {gfn: base64}, "registers": {vcpu: {...}}}}``:
   what the enforcer read from the guest since the previous record; written
   before the next record that depends on it. A frame read again with new
   contents (the page tables after a remap) is written again.
3. ``{"installed": {"view_map": {plan view: backend view}}}``: requests carry
   the backend's altp2m view ids.
4. ``{"requests": [base64, ...]}``: one batch, as taken from the ring.
5. ``{"rebind": {"gfn", "offset"}}``: the enforcer followed a page-table write.

A replay binds the plan to a `RecordedGuest` serving these reads. A policy
whose regions need pages the recording never read cannot be bound; the
recorder therefore also reads the page tables over the whole kernel image
(`_text` .. `_end`) at start, which covers any region in the image.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

from .backend import BackendError, Capabilities
from .guest_memory import FRAME_SHIFT, FRAME_SIZE
from .output_file import OutputFile
from ..errors import PolicycError

__all__ = ["TRACE_FORMAT", "TraceRecorder", "TraceError", "RecordedGuest", "read_trace", "TraceRecord"]

TRACE_FORMAT = "policyc-trace/1"


class TraceError(PolicycError):
    """A trace that cannot be read (with the line it failed at)."""


class TraceRecorder:
    """Writes a trace while the enforcer runs (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, plan: Mapping[str, Any], guest: str) -> None:
        self.path = Path(path)
        self._f: OutputFile | None = OutputFile(self.path, "the trace", truncate=True)
        self.error: OSError | None = None       # set when the trace could not be written: recording stopped
        self.plan = plan
        self.guest = guest
        self._frames: dict[int, bytes] = {}          # last contents written per frame
        self._new_frames: dict[int, bytes] = {}
        self._new_regs: dict[int, dict[str, int]] = {}
        self._header_written = False
        self.batches = 0

    # -- the enforcer's calls
    def wrap(self, backend: Any) -> "_RecordingBackend":
        """The backend to bind and install through: it notes what binding reads."""
        self._header(backend)
        self._prefetch_kernel_image(backend)
        return _RecordingBackend(backend, self)

    def installed(self, installation: Any) -> None:
        self._flush_reads()
        self._line({"installed": {"view_map": {str(k): v for k, v in installation.view_map.items()}}})

    def requests(self, batch: Sequence[bytes]) -> None:
        self._flush_reads()
        self._line({"requests": [base64.b64encode(bytes(r)).decode("ascii") for r in batch]})
        self.batches += self.error is None

    def rebind(self, gfn: int, offset: int) -> None:
        self._flush_reads()
        self._line({"rebind": {"gfn": hex(gfn), "offset": offset}})

    def close(self) -> None:
        if self._f is not None:
            self._flush_reads()
            self._f.close()
            self._f = None

    # -- reads
    def note_frame(self, gfn: int, data: bytes) -> None:
        if self._frames.get(gfn) != data:
            self._frames[gfn] = data
            self._new_frames[gfn] = data

    def note_registers(self, vcpu: int, regs: Mapping[str, int]) -> None:
        self._new_regs[vcpu] = dict(regs)

    def _flush_reads(self) -> None:
        if not self._new_frames and not self._new_regs:
            return
        rec = {"frames": {hex(g): base64.b64encode(d).decode("ascii") for g, d in sorted(self._new_frames.items())},
               "registers": {str(v): {k: int(x) for k, x in r.items()} for v, r in sorted(self._new_regs.items())}}
        self._new_frames, self._new_regs = {}, {}
        self._line({"guest_read": rec})

    def _header(self, backend: Any) -> None:
        if self._header_written:
            return
        caps = backend.capabilities()
        caps_d = asdict(caps)
        caps_d["monitors"] = sorted(caps_d["monitors"])
        policy = self.plan.get("policy") or {}
        self._line({"trace": TRACE_FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                    "guest": self.guest, "plan_hash": self.plan.get("content_hash", ""),
                    "policy": {"name": policy.get("name"), "hash": policy.get("hash")},
                    "capabilities": caps_d})
        self._header_written = True

    def _prefetch_kernel_image(self, backend: Any) -> None:
        """Read the page tables over the kernel image, so a replay can bind regions this plan did not
        have (any region inside the image). Best effort: a guest whose image does not translate here
        is simply recorded with what binding reads."""
        from .paging import PAGE_2M, PageTables, PagingError
        from .guest_kernel import PhysReader

        if not (self.plan.get("target") or {}).get("arch", "x86_64").startswith("x86_64"):
            return
        try:
            regs = backend.get_registers(0)
            reader = PhysReader(_RecordingBackend(backend, self))
            pt = PageTables(reader, regs["cr3"] & 0x000FFFFFFFFFF000)
            lstar = regs.get("msr_lstar")
            if not lstar:
                return
            # The kernel image window of x86-64 Linux (1 GiB at -2 GiB); each 2 MiB once is enough to
            # read every table frame that maps a 4 KiB page in it.
            start = lstar & ~(PAGE_2M - 1)
            lo, hi = max(0xFFFFFFFF80000000, start - (64 << 20)), min(0xFFFFFFFFFFFFFFFF, start + (64 << 20))
            for va in range(lo, hi, PAGE_2M):
                t = pt.try_translate(va)
                if t is not None and t.page_size < PAGE_2M:
                    for sub in range(va, va + PAGE_2M, 1 << 12 << 9):
                        pt.try_translate(sub)
        except (BackendError, PagingError, KeyError, ValueError):
            return

    def _line(self, obj: Mapping[str, Any]) -> None:
        if self._f is None or self.error is not None:
            return
        try:
            self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._f.flush()
        except OSError as exc:
            # The trace serves forensics; enforcing never stops for it. It ends at its last whole record.
            self.error = exc
            print(f"policyc: {exc}; recording stopped, enforcing goes on", file=sys.stderr, flush=True)


class _RecordingBackend:
    """Forwards everything to the real backend; notes guest reads for the trace."""

    def __init__(self, inner: Any, recorder: TraceRecorder) -> None:
        self._inner = inner
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_physical(self, address: int, size: int) -> bytes:
        data = self._inner.read_physical(address, size)
        first, last = address >> FRAME_SHIFT, (address + max(size, 1) - 1) >> FRAME_SHIFT
        for gfn in range(first, last + 1):
            if address == gfn << FRAME_SHIFT and size == FRAME_SIZE:
                frame = data
            else:
                frame = self._inner.read_physical(gfn << FRAME_SHIFT, FRAME_SIZE)
            self._recorder.note_frame(gfn, frame)
        return data

    def get_registers(self, vcpu: int) -> dict[str, int]:
        regs = self._inner.get_registers(vcpu)
        self._recorder.note_registers(vcpu, regs)
        return regs


# --------------------------------------------------------------------------- reading

@dataclass
class TraceRecord:
    kind: str                  # guest_read, installed, requests, rebind
    data: Any
    line: int


@dataclass
class Trace:
    path: Path
    header: dict[str, Any]
    records: list[TraceRecord] = field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities:
        c = dict(self.header["capabilities"])
        c["monitors"] = frozenset(c.get("monitors", ()))
        return Capabilities(**c)

    def check_header(self) -> None:
        """Raise ValueError naming the first field of the header that is not what a recorder writes."""
        caps = self.header.get("capabilities")
        if not isinstance(caps, dict):
            raise ValueError("'capabilities' is not an object")
        for key, (kind, low, high) in _CAPABILITY_FIELDS.items():
            if key not in caps:
                if key == "ring_slots":
                    continue
                raise ValueError(f"capabilities.{key} is missing")
            value = caps[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
                raise ValueError(f"capabilities.{key} is {value!r}, not a number in {low}..{high}")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"capabilities.{key} is {value!r}, not true or false")
            if kind is str and not isinstance(value, str):
                raise ValueError(f"capabilities.{key} is {value!r}, not a string")
        monitors = caps.get("monitors", [])
        if not isinstance(monitors, list) or not all(isinstance(m, str) for m in monitors):
            raise ValueError("capabilities.monitors is not a list of names")
        unknown = set(caps) - set(_CAPABILITY_FIELDS) - {"monitors"}
        if unknown:
            raise ValueError(f"capabilities has unknown field(s) {', '.join(sorted(unknown))}")

    def request_count(self) -> int:
        return sum(len(r.data) for r in self.records if r.kind == "requests")


def read_trace(path: str | os.PathLike) -> Trace:
    """Load a trace; `TraceError` names the line of anything malformed."""
    p = Path(path)
    try:
        f = open(p, "rb")   # noqa: SIM115 - bytes: a line that is not UTF-8 is named, not a traceback
    except OSError as exc:
        raise TraceError(f"{p}: cannot read: {exc.strerror}") from None
    with f:
        trace: Trace | None = None
        for n, line in enumerate(_lines(f, p), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise TraceError(f"{p}:{n}: not UTF-8 text (a trace is JSON Lines from `policyc run --record`)") from None
            except json.JSONDecodeError as exc:
                raise TraceError(f"{p}:{n}: not JSON: {exc.msg}") from None
            except RecursionError:
                raise TraceError(f"{p}:{n}: JSON nested too deep for a trace record") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{p}:{n}: a trace line is a JSON object")
            if trace is None:
                if obj.get("trace") != TRACE_FORMAT:
                    raise TraceError(f"{p}:{n}: not a policyc trace (expected a header with "
                                     f"\"trace\": \"{TRACE_FORMAT}\")")
                try:
                    trace = Trace(p, obj)
                    trace.check_header()
                except (KeyError, TypeError, ValueError) as exc:
                    raise TraceError(f"{p}:{n}: bad header: {exc}") from None
                continue
            trace.records.append(_record(obj, p, n))
        if trace is None:
            raise TraceError(f"{p}: empty trace")
        _check_vcpus(trace)
        return trace


def _check_vcpus(trace: Trace) -> None:
    """Registers and requests name only the header's vCPUs, and the first registers cover them all
    (binding reads every vCPU): else a replay fails deep inside binding or deciding."""
    vcpus = trace.header["capabilities"]["vcpus"]
    registers_seen = False
    for rec in trace.records:
        if rec.kind == "guest_read" and rec.data[1]:
            recorded = set(rec.data[1])
            if max(recorded) >= vcpus or (not registers_seen and recorded != set(range(vcpus))):
                raise TraceError(f"{trace.path}:{rec.line}: registers of vCPU(s) {', '.join(map(str, sorted(recorded)))}, "
                                 f"but the header says the guest has {vcpus} vCPU(s)")
            registers_seen = True
        elif rec.kind == "requests":
            for i, raw in enumerate(rec.data):
                vcpu = int.from_bytes(raw[12:16], "little")   # vm_event_request.vcpu_id
                if vcpu >= vcpus:
                    raise TraceError(f"{trace.path}:{rec.line}: request {i} is from vCPU {vcpu}, but the header "
                                     f"says the guest has {vcpus} vCPU(s)")


# A header's capabilities as a recorder writes them: (type, least, most) per field.
_CAPABILITY_FIELDS: dict[str, tuple[type, int, int]] = {
    "arch": (str, 0, 0), "vm_event_version": (int, 1, 1 << 16), "vcpus": (int, 1, 4096),
    "mem_access": (bool, 0, 0), "altp2m": (bool, 0, 0), "max_views": (int, 0, 1 << 16),
    "singlestep": (bool, 0, 0), "ring_slots": (int, 1, 1 << 20),
}
# One batch of a full ring of 400-byte requests in base64 is far below this; a longer line is no trace.
MAX_LINE_BYTES = 256 << 20


def _lines(f: IO[bytes], p: Path) -> Iterator[bytes]:
    n = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        n += 1
        if len(line) > MAX_LINE_BYTES:
            raise TraceError(f"{p}:{n}: a line longer than {MAX_LINE_BYTES >> 20} MiB is no trace record")
        yield line


def _record(obj: Mapping[str, Any], p: Path, n: int) -> TraceRecord:
    try:
        if "requests" in obj:
            reqs = [base64.b64decode(r, validate=True) for r in obj["requests"]]
            if any(len(r) != 400 for r in reqs):
                raise ValueError("a request is 400 bytes")
            return TraceRecord("requests", reqs, n)
        if "guest_read" in obj:
            g = obj["guest_read"]
            frames = {int(k, 16): base64.b64decode(v, validate=True) for k, v in g.get("frames", {}).items()}
            if any(len(d) != FRAME_SIZE for d in frames.values()):
                raise ValueError("a frame is 4096 bytes")
            regs = {int(k): {r: int(x) for r, x in v.items()} for k, v in g.get("registers", {}).items()}
            return TraceRecord("guest_read", (frames, regs), n)
        if "installed" in obj:
            return TraceRecord("installed", {int(k): int(v) for k, v in obj["installed"]["view_map"].items()}, n)
        if "rebind" in obj:
            r = obj["rebind"]
            return TraceRecord("rebind", (int(r["gfn"], 16), int(r["offset"])), n)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TraceError(f"{p}:{n}: malformed record: {exc}") from None
    raise TraceError(f"{p}:{n}: unknown record (keys: {', '.join(obj)})")


class RecordedGuest:
    """A read-only backend over a trace's guest reads: what binding needs, nothing else."""

    def __init__(self, caps: Capabilities) -> None:
        self._caps = caps
        self.frames: dict[int, bytes] = {}
        self.registers: dict[int, dict[str, int]] = {}

    def update(self, frames: Mapping[int, bytes], registers: Mapping[int, Mapping[str, int]]) -> None:
        self.frames.update(frames)
        for v, r in registers.items():
            self.registers[v] = dict(r)

    def capabilities(self) -> Capabilities:
        return self._caps

    def get_registers(self, vcpu: int) -> dict[str, int]:
        try:
            return dict(self.registers[vcpu])
        except KeyError:
            raise BackendError("get_registers", f"the trace holds no registers of vCPU {vcpu}") from None

    def read_physical(self, address: int, size: int) -> bytes:
        out = bytearray()
        a, end = address, address + size
        while a < end:
            gfn, off = a >> FRAME_SHIFT, a & (FRAME_SIZE - 1)
            frame = self.frames.get(gfn)
            if frame is None:
                raise BackendError("read_physical", f"frame {gfn:#x} was not read while recording: a replay can "
                                   "only bind what the recording's binding could see")
            n = min(end - a, FRAME_SIZE - off)
            out += frame[off:off + n]
            a += n
        return bytes(out)

    def populated_frames(self) -> Iterator[int]:
        return iter(sorted(self.frames))
