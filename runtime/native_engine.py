"""The native decision engine: `native/decide.c` fed with the Python engine's tables.

`NativeEngine(engine)` takes a built `runtime.decide.DecisionEngine` (the
reference interpreter) and lays its tables out flat for C, once, at install:

* rules in plan order: the condition compiled to a bytecode that
  `pe_verify_code` checks at load (at most 512 ops, no jumps, a stack of at
  most 32, every field one the event kind carries); the verdict, feed, rate
  limit and its `then`; the messages with their templates split into JSON-ready
  literals and formatted fields;
* memory: gfn -> (per access kind) the Python engine's segment tables, shared
  between pages as there; the page-table frames the enforcer watches;
* CR, MSR, CPUID, descriptor and breakpoint tables, guest_request;
* per kind and verdict the response it lowers to (`DecisionEngine._lowered`);
* the decision record's fixed parts (decision-id prefix, plan hash, kind
  names, event summary keys, response flag names), JSON-encoded here.

`decide_batch(requests, log)` runs `pe_decide` over the batch; an event it
cannot express goes to the Python engine (the reason is counted in `punts`),
with the rate-limit state copied across both ways, and the batch goes on
natively after it. The result holds every response, the batch's log text
(one record per request, in order, native and Python records alike) and the
Python engine's decisions (the only ones with side effects).
`service_ring(ring, log, n)` is the same in one native call that also takes
the batch off the ring, writes its records (one write(2)) and answers it, when
the C engine decides it whole; `decide_blob` is the engine alone on packed
requests (benchmarks). Decisions made in C are counted in C and folded into
the log's `Stats` when they are read.

What the native engine decides: x86 plans; mem_access, write_ctrlreg,
mov_to_msr, software_breakpoint (ours), cpuid, descriptor_access and
guest_request events whose candidate rules have conditions without `in`
regions or per-CPU addresses, no `pause` / `disarm` action and templates of
numbers (`{gla:#x}`), and whose response needs no side effect (injection,
relax-and-rearm, breakpoint restore). Everything else, and every request that
is not a 400-byte version-7 event, is the Python engine's.
"""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..native.abi import extension
from ..native.constants import EVENT_SIZE, F_ALTP2M, FLAG_BITS, MA_GLA_VALID, MA_IN_GPT, MA_R, MA_W, MA_X
from .decide import Decision, DecisionEngine, _Lowered, _Rule
from .decision_log import _DECIMAL_FIELDS, _ENCODE, _CONTROLS, _parse_template, escape_guest
from .vm_event_layout import EVENT_SUMMARY, FLAG_FOR_DATA, X86_NAMES
from ..errors import PolicycError

__all__ = ["CLOCK_SOURCES", "NativeEngine", "NativeBatch", "PUNT_REASONS", "native_available", "native_clock_request"]

U64 = (1 << 64) - 1
PUNT_REASONS = ("size", "version", "reason", "rule", "response", "page_table", "next_page", "not_ours",
                "cr3_view", "limit", "arch")
# pe_call.clock_source's values, in order (decide.h's PE_CLOCK_*)
CLOCK_SOURCES = ("auto", "system", "cycles")
KINDS = ("mem_access", "write_ctrlreg", "mov_to_msr", "software_breakpoint", "cpuid", "descriptor_access",
         "guest_request")
_RESPONSE_KIND = {"software_breakpoint": "breakpoint"}
K_MEM, K_CR, K_MSR, K_BP, K_CPUID, K_DESC, K_GR = range(7)

# Field ids: the first ones are fixed (decide.h reads PE_F_INSN_LENGTH), then the x86 registers.
_FIELDS = ["vcpu", "rip", "cr3", "access", "gfn", "offset", "gla", "gla_valid", "in_gpt", "register", "new",
           "old", "msr", "insn_length", "pending_dbg", "leaf", "subleaf", "descriptor", "is_write"]
_REGS = struct.Struct("<33Q4I2Q6IQ8H")
_OFF_DATA = 56


def _register_layout() -> dict[str, tuple[int, int, int, int]]:
    """x86 register -> (offset in the request, size, shift, mask), as `decide._Event` decodes them."""
    out, off = {}, _OFF_DATA
    sizes = [8] * 33 + [4] * 4 + [8] * 2 + [4] * 6 + [8] + [2] * 8
    raw_at = {}
    for name, size in zip(X86_NAMES, sizes):
        raw_at[name] = (off, size)
        if name[0] != "_":
            out[name] = (off, size, 0, (1 << (8 * size)) - 1)
        off += size
    assert off - _OFF_DATA == _REGS.size
    out["cs_arbytes"] = (raw_at["_cs"][0], 4, 20, 0xFFF)
    out["cpl"] = (raw_at["_ss"][0], 4, 25, 3)
    return out


_REGISTERS = _register_layout()
for _name in _REGISTERS:
    if _name not in _FIELDS:
        _FIELDS.append(_name)
FIELD_ID = {name: i for i, name in enumerate(_FIELDS)}


def _bit(mask: int) -> int:
    return mask.bit_length() - 1


def _kind_fields(kind: int) -> dict[str, tuple[int, int, int, int]]:
    """The fields `decide._Event` has for one kind of event (name -> layout)."""
    f = dict(_REGISTERS)
    f["vcpu"] = (12, 4, 0, 0xFFFFFFFF)
    per = {
        K_MEM: {"gfn": (24, 8), "offset": (32, 8), "gla": (40, 8), "access": (48, 4, 0, MA_R | MA_W | MA_X),
                "gla_valid": (48, 4, _bit(MA_GLA_VALID), 1), "in_gpt": (48, 4, _bit(MA_IN_GPT), 1)},
        K_CR: {"register": (24, 4), "new": (32, 8), "old": (40, 8)},
        K_MSR: {"msr": (24, 8), "new": (32, 8), "old": (40, 8)},
        K_BP: {"gfn": (24, 8), "insn_length": (40, 4), "gla": _REGISTERS["rip"][:2]},
        K_CPUID: {"insn_length": (24, 4), "leaf": (28, 4), "subleaf": (32, 4)},
        K_DESC: {"descriptor": (40, 1), "is_write": (41, 1)},
        K_GR: {},
    }[kind]
    for name, spec in per.items():
        f[name] = spec if len(spec) == 4 else (spec[0], spec[1], 0, (1 << (8 * spec[1])) - 1)
    return f


_SPEC = re.compile(r"^(#)?(0)?([1-9][0-9]?)?([xXd]?)$")
_OPS = {"not": 3, "neg": 4, "inv": 5, "+": 6, "-": 7, "*": 8, "/": 9, "%": 10, "<<": 11, ">>": 12, "&": 13,
        "|": 14, "^": 15, "==": 16, "!=": 17, "<": 18, "<=": 19, ">": 20, ">=": 21, "and": 22, "or": 23,
        "set": 24, "cleared": 25, "changed": 26}
OP_LIT, OP_FIELD = 1, 2


def native_available() -> bool:
    try:
        extension()
    except ImportError:
        return False
    return True


class NativeLogError(PolicycError, OSError):
    """The native call could not write a batch's records: it is decided but not answered yet."""

    def __init__(self, requests: list[bytes], responses: list[bytes], served: int) -> None:
        super().__init__(f"the decision log could not be written ({len(requests)} decisions)")
        self.requests, self.responses = requests, responses
        self.served = served                  # requests of earlier batches of the call, answered


class _Unexpressible(Exception):
    """A rule, template or response the native engine leaves to the Python engine."""


@dataclass
class NativeBatch:
    """One batch through the native engine (with the Python engine for what it hands over)."""

    responses: list[bytes]
    decisions: list[tuple[int, bytes, Decision]] = field(default_factory=list)   # (index, response, d): Python's
    text: str | None = None             # every record of the batch, in order (None: counted only)
    alerts: list[str] = field(default_factory=list)    # alert stream lines, in order
    requests: Sequence[bytes] = ()      # what was answered (service_ring: as taken off the ring)


class _Pool:
    """Strings (and bytes) for C, deduplicated: value -> (offset, length)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.index: dict[bytes, tuple[int, int]] = {}

    def add(self, value: str | bytes) -> tuple[int, int]:
        b = value.encode("ascii") if isinstance(value, str) else bytes(value)
        found = self.index.get(b)
        if found is None:
            found = self.index[b] = (len(self.data), len(b))
            self.data += b
        return found


def native_clock_request(clock: str | None = None) -> str:
    """The clock source asked for (`clock`, else $POLICYC_NATIVE_CLOCK, else "auto"), checked."""
    clock = clock or os.environ.get("POLICYC_NATIVE_CLOCK") or "auto"
    if clock not in CLOCK_SOURCES:
        raise PolicycError(f"POLICYC_NATIVE_CLOCK={clock!r}: expected one of {', '.join(CLOCK_SOURCES)}")
    return clock


class NativeEngine:
    """`native/decide.c` over one `DecisionEngine`'s tables (see the module docstring)."""

    def __init__(self, engine: DecisionEngine, *, plan_hash: str | None = None,
                 pt_frames: Callable[[], frozenset[int] | set[int]] | None = None,
                 python_denies: Sequence[str] = (), clock: str | None = None) -> None:
        self.ffi, self.lib = extension()
        # Where C's monotonic time comes from (decide.h, PE_CLOCK_*): "auto" takes the CPU's cycle
        # counter only where each read of the system clock is a system call.
        self._clock_request = CLOCK_SOURCES.index(native_clock_request(clock))
        self.engine = engine
        # Kinds whose deny the backend must send itself (Xen's register-write DENY is held until
        # the vCPU left its pCPU): handed to Python whenever the native call would push them.
        self.python_denies = frozenset(python_denies)
        self.plan_hash = engine.plan_hash if plan_hash is None else plan_hash
        # Page-table frames go to Python (the engine may step a write there, runtime/pt_step.py): by
        # default the ones its binding watches
        self.pt_frames = pt_frames or (lambda: getattr(engine.binding, "pt_frames", frozenset()))
        self.rules: list[_Rule] = sorted(engine.rules.values(), key=lambda r: r.order)
        self._stateful = [i for i, r in enumerate(self.rules)
                          if r.limit is not None or r.disarm or (r.then is not None and r.then.disarm)]
        self.unexpressible: dict[str, str] = {}     # rule -> why the native engine hands it over
        self._counted_in: Any = None
        self._ring_key: Any = None
        # The engine's clocks are the system's: C reads them itself (no Python call a batch).
        self._own_clocks = engine.clock is time.monotonic and engine.wall_clock_ns is time.time_ns
        self.state = self.ffi.new("pe_state[]", max(1, len(self.rules)))
        # The global budget's bucket in C (decided per event there), copied from and back to the
        # engine's `Budget` around every native call: the Budget stays the one record between calls.
        self._budget = self.ffi.new("pe_budget *") if engine.budget is not None else self.ffi.NULL
        self.stats = self.ffi.new("pe_stats *")
        self.rule_stats = self.ffi.new("pe_rule_stats[]", max(1, len(self.rules)))
        self._push_state(range(len(self.rules)))
        self._build()

    # ------------------------------------------------------------------ public
    @property
    def clock_source(self) -> str:
        """"system" or "cycles" once C has read its clock ("auto" before)."""
        return CLOCK_SOURCES[self._call.clock_source]

    @property
    def stateful(self) -> bool:
        """Whether a rule keeps state between events (a rate limit, a disarm) that the native and the
        Python engine must hand each other."""
        return bool(self._stateful)

    def rebuild(self) -> None:
        """After the binding moved (a rebind) or the watched page-table frames changed."""
        self._pull_state(self._stateful)
        self._build()

    @property
    def punts(self) -> dict[str, int]:
        return {name: int(self.e.punts[i]) for i, name in enumerate(PUNT_REASONS) if self.e.punts[i]}

    def decided_natively(self) -> int:
        """Decisions made natively so far (counted before any stats fold)."""
        return self._native_total + int(self.stats.decisions)

    def decide_batch(self, requests: Sequence[bytes], log: Any = None,
                     on_python: Callable[[Decision], None] | None = None) -> NativeBatch:
        """Answer every request, in order: natively where it can, else by the Python engine.
        `log` (a `DecisionLog`) renders the records; with None, or a log that only counts, none are.
        `on_python(d)` sees each Python decision before its record is rendered (the enforcer notes
        page-table writes there)."""
        render = self._prepare(log)
        self._call.log = self._log if render else self.ffi.NULL
        self._call.log_len = 0
        self._push_budget()
        try:
            return self._finish(requests, 0, log, render, on_python)
        finally:
            self._pull_budget()

    def decide_blob(self, blob: bytes) -> bytes:
        """Requests packed back to back (400 bytes each) -> their responses, packed likewise; no
        records (they are counted). The engine alone, as a benchmark measures it."""
        n = len(blob) // EVENT_SIZE
        if n > self._capacity:
            self._grow(n)
        self._call.log = self.ffi.NULL
        self._push_budget()
        try:
            self._decide_blob(blob, n)
        finally:
            self._pull_budget()
        return self.ffi.buffer(self._rsp, n * EVENT_SIZE)[:]

    def _decide_blob(self, blob: bytes, n: int) -> None:
        ffi, lib, engine = self.ffi, self.lib, self.engine
        call, rsp = self._call, self._rsp
        i = 0
        while i < n:
            call.next_id = engine.next_id
            if not self._own_clocks:
                call.now_ns = engine.wall_clock_ns()
                call.clock = engine.clock()
            i += lib.pe_decide(self.e, call, ffi.from_buffer(blob) + i * EVENT_SIZE, n - i, rsp + i * EVENT_SIZE)
            engine.next_id = call.next_id
            if i < n:
                response, _d = self._python_decides(blob[i * EVENT_SIZE:(i + 1) * EVENT_SIZE])
                ffi.memmove(rsp + i * EVENT_SIZE, response, EVENT_SIZE)
                i += 1

    def service_ring(self, ring: Any, log: Any, max_count: int,
                     on_python: Callable[[Decision], None] | None = None,
                     notify: tuple[Any, Any] | None = None, wait: tuple[Any, Any] | None = None,
                     wait_s: float = 0.0) -> tuple[int, int, NativeBatch | None]:
        """Native calls that take batches of up to `max_count` requests from `ring` (an `abi.Ring`,
        monitor side), decide them, write their records (one write to the log's file a batch) and
        put and publish their responses. With `notify` (a C kick and its argument: the backend's
        `native_notify()`) batch follows batch in C, the kick after each, until the ring is empty;
        without it the caller notifies after one batch. With `wait` too (a C wait and its argument:
        the backend's `native_wait()`) an empty ring is waited on in C, for up to `wait_s` seconds
        from the call's start, so the answering loop never comes back to Python while events flow;
        `notify_failed` and `wait_errno` then say how the call's last kick and wait ended. Returns (requests taken, requests answered
        here, batch): when a batch needs Python (a handed-over event, alerts, a log that is not a
        file) it is not answered yet and comes back as a finished `NativeBatch` for the caller to
        log and answer. Raises `NativeLogError` when a batch's records could not be written (it is
        decided, not answered)."""
        if (ring, log, max_count, notify, wait) != self._ring_key:
            self._attach_ring(ring, log, max_count, notify, wait)
        call, engine = self._call, self.engine
        call.wait_ms = max(0, round(wait_s * 1000))
        call.next_id = engine.next_id
        if not self._own_clocks:
            call.now_ns = engine.wall_clock_ns()
            call.clock = engine.clock()
        self._push_budget()
        try:
            status = self._pe_service(self.e, call)
        finally:
            self._pull_budget()
        engine.next_id = call.next_id
        served = call.served
        if status == self._served:
            return served, served, None
        taken = call.ntaken
        raw = self.ffi.buffer(self._taken, taken * EVENT_SIZE)[:]
        requests = [raw[k * EVENT_SIZE:(k + 1) * EVENT_SIZE] for k in range(taken)]
        if status == self.lib.PE_LOG_FAILED:
            raise NativeLogError(requests, self._responses(taken), served)
        self._push_budget()
        try:
            return served + taken, served, self._finish(requests, call.decided, log, self._ring_render, on_python)
        finally:
            self._pull_budget()

    @property
    def notify_failed(self) -> bool:
        """The last service_ring call's native kick failed: the other side is owed one."""
        return bool(self._call.notify_failed)

    @property
    def wait_errno(self) -> int:
        """How the last service_ring call's native wait failed (EINTR: a signal), or 0."""
        return int(self._call.wait_errno)

    def _attach_ring(self, ring: Any, log: Any, max_count: int, notify: tuple[Any, Any] | None,
                     wait: tuple[Any, Any] | None) -> None:
        """Set the call up once for a ring and a log (what pe_service needs besides the engine)."""
        render = self._prepare(log)
        call = self._call
        call.log = self._log if render else self.ffi.NULL
        call.back = ring._back
        call.max = min(max_count, self._capacity)
        call.fd = log.native_fd() if render else -1
        call.finish_alerts = bool(render and log.has_alerts)
        call.taken, call.rsps = self._taken, self._rsp
        call.notify_fn, call.notify_ctx = notify if notify is not None else (self.ffi.NULL, self.ffi.NULL)
        # a bound on the batches one call serves: the loop around it checks for signals and stops
        call.max_batches = 4096 if notify is not None else 1
        # a wait only after a native kick: without one, the caller must notify before anything waits
        call.wait_fn, call.wait_ctx = wait if wait is not None and notify is not None else (self.ffi.NULL, self.ffi.NULL)
        self._ring_key = (ring, log, max_count, notify, wait)
        self._ring_render = render
        self._pe_service = self.lib.pe_service
        self._served = self.lib.PE_SERVED

    def _prepare(self, log: Any) -> bool:
        if log is not None and log is not self._counted_in:   # native counts reach the log's stats
            log.add_counter_source(self.fold_stats)
            self._counted_in = log
        render = log is not None and log.renders
        if render and log.plan_hash != self.plan_hash:      # the record says the log's plan hash
            self.plan_hash = log.plan_hash
            self.rebuild()
        return render

    def _responses(self, n: int) -> list[bytes]:
        out = self.ffi.buffer(self._rsp, n * EVENT_SIZE)[:]
        return [out[k * EVENT_SIZE:(k + 1) * EVENT_SIZE] for k in range(n)]

    def _finish(self, requests: Sequence[bytes], done: int, log: Any, render: bool,
                on_python: Callable[[Decision], None] | None) -> NativeBatch:
        """Decide requests[done:] (the first `done` are decided, their records in the buffer)."""
        ffi, lib, engine = self.ffi, self.lib, self.engine
        n = len(requests)
        if n > self._capacity:
            self._grow(n)
        rsp, call, buf = self._rsp, self._call, self._log
        want_alerts = render and log.has_alerts
        cut = 0                                   # start of the buffer's text not yet in pieces
        pieces: list[str] = []
        alerts: list[str] = []
        python: list[tuple[int, bytes, Decision]] = []
        if want_alerts and done:
            alerts.extend(self._alert_lines(log, 0, done))
        uniform = set(map(len, requests)) <= {EVENT_SIZE}
        i = done
        while i < n:
            j = n if uniform else i
            while j < n and len(requests[j]) == EVENT_SIZE:
                j += 1
            if j > i:
                call.next_id = engine.next_id
                if not self._own_clocks:
                    call.now_ns = engine.wall_clock_ns()
                    call.clock = engine.clock()
                start = call.log_len
                got = lib.pe_decide(self.e, call, b"".join(requests[i:j]), j - i, rsp + i * EVENT_SIZE)
                engine.next_id = call.next_id
                if want_alerts:
                    alerts.extend(self._alert_lines(log, start, got))
                i += got
                if i < j and call.punt < 0:       # the log buffer is full: keep its text, go on
                    pieces.append(ffi.buffer(buf, call.log_len)[cut:].decode("ascii"))
                    call.log_len = cut = 0
                    continue
                if i == j:
                    continue
            else:
                self.e.punts[0] += 1              # not a 400-byte request
            if render and call.log_len > cut:
                pieces.append(ffi.buffer(buf, call.log_len)[cut:].decode("ascii"))
                cut = call.log_len
            response, d = self._python_decides(requests[i])
            ffi.memmove(rsp + i * EVENT_SIZE, response, EVENT_SIZE)
            python.append((i, response, d))
            if on_python is not None:
                on_python(d)
            if log is not None:
                line, extra = log.render(d)
                if render:
                    pieces.append(line)
                alerts.extend(extra)
            i += 1
        if render and call.log_len > cut:
            pieces.append(ffi.buffer(buf, call.log_len)[cut:].decode("ascii"))
        return NativeBatch(self._responses(n), python, "".join(pieces) if render else None, alerts, requests)

    def _alert_lines(self, log: Any, start: int, count: int) -> list[str]:
        """Alert stream lines for the native records just written at [start, ...) of the buffer."""
        out: list[str] = []
        ends = [start] + [self._line_end[x] for x in range(count)]
        for x in range(count):
            if self._alert[x]:
                out.extend(log.alert_lines(self.ffi.buffer(self._log, ends[x + 1])[ends[x]:].decode("ascii")))
        return out

    def detach(self) -> None:
        """Replaced (a reload): what this engine counted goes into the log's stats a last time, and the
        log stops asking it."""
        if self._counted_in is not None:
            self._counted_in.retire_counter_source(self.fold_stats)
            self._counted_in = None

    def fold_stats(self, stats: Any) -> None:
        """Add the native decisions counted since the last fold to a `decision_log.Stats`."""
        s = self.stats
        if not s.decisions:
            return
        from .decision_log import RuleStats
        self._native_total += int(s.decisions)
        stats.decisions += s.decisions
        for k, name in enumerate(KINDS):
            if s.by_kind[k]:
                stats.by_kind[name] += s.by_kind[k]
        for name in ("allow", "deny", "would_deny"):
            if getattr(s, name):
                stats.verdicts[name] += getattr(s, name)
        stats.collateral += s.collateral
        stats.conservative += s.conservative
        stats.unmatched += s.unmatched
        stats.alerts += s.alerts
        _merge_hist(stats.latency, s.hist, s.lat_count, s.lat_total, s.lat_max)
        for i, rule in enumerate(self.rules):
            r = self.rule_stats[i]
            if not (r.matches or r.alerts or r.logs):
                continue
            rs = stats.rules.get(rule.name)
            if rs is None:
                rs = stats.rules[rule.name] = RuleStats()
            for name in ("matches", "decided", "deny", "would_deny", "limited", "alerts", "logs"):
                setattr(rs, name, getattr(rs, name) + getattr(r, name))
            _merge_hist(rs.latency, r.hist, r.matches, r.lat_total, r.lat_max)
        self.ffi.memmove(self.stats, bytes(self.ffi.sizeof("pe_stats")), self.ffi.sizeof("pe_stats"))
        size = self.ffi.sizeof("pe_rule_stats") * max(1, len(self.rules))
        self.ffi.memmove(self.rule_stats, bytes(size), size)

    # ------------------------------------------------------------------ rule state, the budget
    def _python_decides(self, raw: bytes) -> tuple[bytes, Decision]:
        """An event handed over: the Python engine sees the rate-limit and budget state and leaves its own."""
        self._pull_state(self._stateful)
        self._pull_budget()
        try:
            return self.engine.decide(raw)
        finally:
            self._push_state(self._stateful)
            self._push_budget()

    def _push_budget(self) -> None:
        budget, b = self.engine.budget, self._budget
        if b:
            b.rate, b.tokens, b.stamp = budget.per_second, budget.tokens, budget.stamp
            b.over, b.allow = budget.over, budget.over_budget == "allow"

    def _pull_budget(self) -> None:
        budget, b = self.engine.budget, self._budget
        if b:
            budget.tokens, budget.stamp, budget.over = b.tokens, b.stamp, int(b.over)

    def _push_state(self, indices: Any) -> None:
        for i in indices:
            r, st = self.rules[i], self.state[i]
            st.tokens = r.tokens
            st.has_stamp = r.stamp is not None
            st.stamp = r.stamp or 0.0
            st.disarmed = r.disarmed

    def _pull_state(self, indices: Any) -> None:
        for i in indices:
            r, st = self.rules[i], self.state[i]
            r.tokens = st.tokens
            r.stamp = st.stamp if st.has_stamp else None
            r.disarmed = bool(st.disarmed)

    def set_audit(self, audit: bool) -> None:
        """Answer every later deny with allow (recorded as would-deny), as the Python engine's `audit`."""
        self.e.audit = audit

    # ------------------------------------------------------------------ the tables
    def _build(self) -> None:
        ffi, engine = self.ffi, self.engine
        self._keep: list[Any] = []           # every array the C tables point into
        pool = _Pool()
        feeds = _Pool()
        e = self.e = ffi.new("pe_engine *")
        e.audit = engine.audit
        e.enabled = not engine.arm
        e.nrules = len(self.rules)
        e.state = self.state
        e.budget = self._budget
        e.stats = self.stats
        e.rule_stats = self.rule_stats
        arr = self._array
        field_tables = [_kind_fields(k) for k in range(len(KINDS))]
        self._build_records(e, pool, field_tables)
        self._build_rules(e, pool, feeds, field_tables)
        self._build_dispatch(e, arr, pool)
        self._build_responses(e, pool)
        self._record_max = self._bound_record(pool)

        e.str = self._pin(bytes(pool.data))
        e.nstr = len(pool.data)
        e.bytes = self._pin(bytes(feeds.data))
        e.nbytes = len(feeds.data)
        self._log = ffi.new("char[]", max(1 << 20, 64 * self._record_max))
        self._grow(4096)
        call = self._call = ffi.new("pe_call *")
        call.line_end, call.alert = self._line_end, self._alert
        call.own_clocks = self._own_clocks
        call.clock_source = self._clock_request
        self._ring_key = None
        call.log_cap = len(self._log)
        call.record_max = self._record_max
        if not hasattr(self, "_native_total"):
            self._native_total = 0

    def _array(self, ctype: str, values: Sequence[Any]) -> Any:
        a = self.ffi.new(f"{ctype}[]", max(1, len(values)))
        for i, v in enumerate(values):
            a[i] = v
        self._keep.append(a)
        return a

    def _build_records(self, e: Any, pool: _Pool, field_tables: list[dict[str, Any]]) -> None:
        """Event fields per kind, and the decision record's fixed parts."""
        arr, engine = self._array, self.engine
        for k, table in enumerate(field_tables):
            for name, (off, size, shift, mask) in table.items():
                f = e.fields[k][FIELD_ID[name]]
                f.off, f.size, f.shift, f.mask = off, size, shift, mask
        summary: list[int] = []
        for k, kind in enumerate(KINDS):
            ids = [FIELD_ID[n] for n in ("vcpu", "rip", "cr3") + EVENT_SUMMARY[kind] if n in field_tables[k]]
            e.summary_off[k], e.summary_len[k] = len(summary), len(ids)
            summary.extend(ids)
            e.kind_name_off[k], e.kind_name_len[k] = pool.add(_ENCODE(kind))
        keys = [pool.add(_ENCODE(name) + ":") for name in _FIELDS]
        e.summary = arr("uint16_t", summary)
        e.summary_key_off = arr("uint32_t", [o for o, _ in keys])
        e.summary_key_len = arr("uint32_t", [n for _, n in keys])
        e.summary_hex = arr("uint8_t", [name not in _DECIMAL_FIELDS for name in _FIELDS])
        for name, bit in FLAG_BITS.items():
            e.flag_name_off[_bit(bit)], e.flag_name_len[_bit(bit)] = pool.add(_ENCODE(name))
        head = _ENCODE({"decision_id": engine.id_prefix + "."})
        e.id_head_off, e.id_head_len = pool.add(head[:-2])                    # {"decision_id":"PREFIX.
        e.hash_off, e.hash_len = pool.add('","plan_hash":' + _ENCODE(self.plan_hash) + ',"kind":')

    def _build_rules(self, e: Any, pool: _Pool, feeds: _Pool, field_tables: list[dict[str, Any]]) -> None:
        """Rules in plan order: conditions compiled and verified, verdicts, limits, messages."""
        ffi, lib, engine, arr, keep = self.ffi, self.lib, self.engine, self._array, self._keep
        kinds_of = self._rule_kinds()
        code: list[int] = []
        consts: list[int] = []
        msgs: list[tuple] = []
        msg_index: list[int] = []
        pieces: list[tuple] = []
        rules = ffi.new("pe_rule[]", max(1, len(self.rules)))
        keep.append(rules)
        self.unexpressible = {}
        e.rules = rules
        for i, rule in enumerate(self.rules):
            c = rules[i]
            c.name_off, c.name_len = pool.add(_ENCODE(rule.name))
            c.priority = rule.priority
            c.deny = rule.verdict == "deny"
            c.limit = rule.limit or 0.0
            c.feed_off, c.feed_len = self._feed(rule.feed, feeds)
            kinds = kinds_of.get(i, set())
            try:
                if len(kinds) != 1:
                    raise _Unexpressible("a rule of no table or of several kinds")
                kind = next(iter(kinds))
                if rule.pause or rule.disarm:
                    raise _Unexpressible("pause or disarm")
                if rule.feed is not None and len(rule.feed) > 340:
                    raise _Unexpressible("a feed longer than the emulated read")
                c.cond_off = len(code)
                if rule.condition is not None:
                    code.extend(_compile(rule.condition, field_tables[kind], consts, engine))
                c.cond_len = len(code) - c.cond_off
                c.msg_off, c.msg_len = self._messages(rule.messages, i, field_tables[kind], pool, msgs,
                                                      msg_index, pieces)
                c.native = 1
            except _Unexpressible as exc:
                del code[c.cond_off:]
                c.cond_len = 0
                c.native = 0
                self.unexpressible[rule.name] = str(exc)
                continue
            then = rule.then
            if then is None:        # past its limit (or the budget) it keeps its verdict, drops its actions
                c.then_native = 1
                continue
            c.then_verdict = {None: 0, "allow": 1, "deny": 2}[then.verdict]
            c.then_feed_off, c.then_feed_len = self._feed(then.feed, feeds)
            try:
                if then.pause or then.disarm or (then.feed is not None and len(then.feed) > 340):
                    raise _Unexpressible("pause or disarm")
                c.then_msg_off, c.then_msg_len = self._messages(then.messages, i, field_tables[kind], pool,
                                                                msgs, msg_index, pieces)
                c.then_native = 1
            except _Unexpressible:
                c.then_native = 0
        e.code = arr("uint32_t", code)
        e.ncode = len(code)
        e.consts = arr("uint64_t", consts)
        e.nconsts = len(consts)
        for i, rule in enumerate(self.rules):
            c = rules[i]
            if c.native and c.cond_len and not lib.pe_verify_code(e, next(iter(kinds_of[i])), c.cond_off,
                                                                    c.cond_len):
                c.native = 0
                self.unexpressible[rule.name] = "the condition failed verification"
        m = ffi.new("pe_msg[]", max(1, len(msgs)))
        keep.append(m)
        for x, (head_ol, piece_off, piece_len, prio, alert, rule_i) in enumerate(msgs):
            m[x].head_off, m[x].head_len = head_ol
            m[x].piece_off, m[x].piece_len, m[x].priority, m[x].alert, m[x].rule = \
                piece_off, piece_len, prio, alert, rule_i
        e.msgs = m
        e.msg_index = arr("uint32_t", msg_index)
        p = ffi.new("pe_piece[]", max(1, len(pieces)))
        keep.append(p)
        for x, (lit, fid, hash_, zero, upper, hexa, width) in enumerate(pieces):
            p[x].lit_off, p[x].lit_len = lit
            p[x].field, p[x].hash, p[x].zero, p[x].upper, p[x].hex, p[x].width = \
                fid, hash_, zero, upper, hexa, width
        e.pieces = p

    def _grow(self, capacity: int) -> None:
        """Room for `capacity` requests a call (responses, per-record line ends and alert flags)."""
        ffi = self.ffi
        self._capacity = capacity
        self._taken = ffi.new("uint8_t[]", capacity * EVENT_SIZE)
        self._rsp = ffi.new("uint8_t[]", capacity * EVENT_SIZE)
        self._line_end = ffi.new("uint32_t[]", capacity)
        self._alert = ffi.new("uint8_t[]", capacity)
        if hasattr(self, "_call"):
            self._call.line_end, self._call.alert = self._line_end, self._alert
            self._ring_key = None             # the ring's call takes the new buffers

    def _pin(self, data: bytes) -> Any:
        buf = self.ffi.new("char[]", max(1, len(data)))
        self.ffi.memmove(buf, data, len(data))
        self._keep.append(buf)
        return buf

    @staticmethod
    def _feed(feed: bytes | None, feeds: _Pool) -> tuple[int, int]:
        return (-1, -1) if feed is None else feeds.add(feed)

    def _rule_kinds(self) -> dict[int, set[int]]:
        """Rule index -> the kinds of the tables it is in."""
        eng = self.engine
        out: dict[int, set[int]] = {}

        def note(rules: Any, kind: int) -> None:
            for r in rules:
                out.setdefault(r.order, set()).add(kind)

        for table in eng._mem:
            for _starts, segs in {id(v): v for v in table.values()}.values():
                for claims in segs:
                    note((c.rule for c in claims), K_MEM)
        for k, tables in ((K_CR, eng._cr.values()), (K_MSR, eng._msr.values()), (K_DESC, eng._desc.values()),
                          (K_CPUID, list(eng._cpuid_leaf.values()) + [eng._cpuid_any]),
                          (K_BP, eng._bp.values()), (K_GR, [eng._flat["guest_request"]])):
            for rules in tables:
                note(rules, k)
        return out

    def _messages(self, messages: Sequence[Any], rule_i: int, fields: Mapping[str, Any], pool: _Pool,
                  msgs: list, msg_index: list, pieces: list) -> tuple[int, int]:
        start = len(msg_index)
        for msg in messages:
            head = _ENCODE({"kind": msg.kind, "severity": msg.severity, "rule": msg.rule, "message": ""})
            piece_off = len(pieces)
            pending = ""
            for literal, name, spec, _conv in _parse_template(msg.template):
                pending += literal
                if name is None:
                    continue
                if name not in fields:
                    if name == "site":
                        raise _Unexpressible("a template with the breakpoint site (text)")
                    pending += f"<{escape_guest(name)}?>"
                    continue
                m = _SPEC.match(spec)
                if m is None:
                    raise _Unexpressible(f"template format '{spec}'")
                hash_, zero, width, typ = m.groups()
                pieces.append((pool.add(_json_text(pending)), FIELD_ID[name], bool(hash_), bool(zero),
                               typ == "X", typ in ("x", "X"), int(width or 0)))
                pending = ""
            pieces.append((pool.add(_json_text(pending)), -1, 0, 0, 0, 0, 0))
            msg_index.append(len(msgs))
            msgs.append((pool.add(head[:-2]), piece_off, len(pieces) - piece_off, msg.priority,
                         msg.kind == "alert", rule_i))
        return start, len(msg_index) - start

    def _build_dispatch(self, e: Any, arr: Callable[[str, Sequence[Any]], Any], pool: _Pool) -> None:
        ffi, eng = self.ffi, self.engine
        lists: list[int] = []

        def rule_list(rules: Sequence[_Rule]) -> tuple[int, int]:
            off = len(lists)
            lists.extend(r.order for r in rules)
            return off, len(rules)

        # memory: gfn -> per kind segment table (shared as the Python engine shares them)
        regions: dict[str, int] = {}
        segtabs: list[tuple[int, int]] = []
        segments: list[tuple[int, int, int]] = []
        claims: list[tuple[int, int, int]] = []
        tab_of: dict[int, int] = {}
        pages: dict[int, list[int]] = {}
        for k, table in enumerate(eng._mem):
            for gfn, tab in table.items():
                t = tab_of.get(id(tab))
                if t is None:
                    t = tab_of[id(tab)] = len(segtabs)
                    starts, segs = tab
                    segtabs.append((len(segments), len(starts)))
                    for start, seg_claims in zip(starts, segs):
                        segments.append((start, len(claims), len(seg_claims)))
                        for c in seg_claims:
                            if c.region not in regions:
                                regions[c.region] = len(regions)
                            claims.append((c.rule.order, regions[c.region], c.exact))
                pages.setdefault(gfn, [-1, -1, -1])[k] = t
        pt = set(self.pt_frames())
        size = 16
        while size < 2 * (len(pages) + len(pt)):
            size *= 2
        table = ffi.new("pe_page[]", size)
        self._keep.append(table)
        mask = size - 1
        for gfn in set(pages) | pt:
            i = ((gfn * 0x9E3779B97F4A7C15) & U64) >> 20 & mask
            while table[i].used:
                i = (i + 1) & mask
            p = table[i]
            p.used, p.gfn = 1, gfn
            p.seg = pages.get(gfn, [-1, -1, -1])
            p.trapped = gfn in pages
            p.pt = gfn in pt
        e.pages, e.page_mask = table, mask
        st = ffi.new("pe_segtab[]", max(1, len(segtabs)))
        for i, (first, count) in enumerate(segtabs):
            st[i].first, st[i].count = first, count
        sg = ffi.new("pe_segment[]", max(1, len(segments)))
        for i, (start, off, n) in enumerate(segments):
            sg[i].start, sg[i].claim_off, sg[i].claim_len = start, off, n
        cl = ffi.new("pe_claim[]", max(1, len(claims)))
        for i, (rule, region, exact) in enumerate(claims):
            cl[i].rule, cl[i].region, cl[i].exact = rule, region, exact
        self._keep.extend((st, sg, cl))
        e.segtabs, e.segments, e.claims = st, sg, cl
        names = [pool.add(_ENCODE(r)) for r in regions]
        e.region_off = arr("uint32_t", [o for o, _ in names])
        e.region_len = arr("uint32_t", [n for _, n in names])

        # the other triggers
        for index, rules in eng._cr.items():
            if 0 <= index < 8:
                e.cr_list_off[index], e.cr_list_len[index] = rule_list(rules)
        e.cr3_switch = eng._switch_on_cr3

        def keyed(items: Sequence[tuple[int, Sequence[_Rule] | None]]) -> tuple[Any, int]:
            t = ffi.new("pe_keyed[]", max(1, len(items)))
            self._keep.append(t)
            for i, (key, rules) in enumerate(sorted(items, key=lambda kv: kv[0])):
                t[i].key = key
                if rules is None:
                    t[i].extra = -1
                else:
                    t[i].list_off, t[i].list_len = rule_list(rules)
            return t, len(items)

        e.msrs, e.nmsrs = keyed(list(eng._msr.items()))
        e.cpuid, e.ncpuid = keyed(list(eng._cpuid_leaf.items()))
        e.cpuid_any_off, e.cpuid_any_len = rule_list(eng._cpuid_any)
        e.desc, e.ndesc = keyed([(d << 1 | w, rules) for (d, w), rules in eng._desc.items()])
        e.bps, e.nbps = keyed([(addr, eng._bp.get(site)) for addr, site in eng._sites.items()])
        e.gr_off, e.gr_len = rule_list(eng._flat["guest_request"])
        e.lists = arr("uint32_t", lists)
        e.nlists = len(lists)

    def _build_responses(self, e: Any, pool: _Pool) -> None:
        eng, ffi = self.engine, self.ffi
        lows: dict[tuple[int, bool], int] = {}
        specs: list[_Lowered] = []
        keys = {K_MEM: ("allow", "deny:read", "deny:write", "deny:execute")}
        by_python: set[int] = set()
        for k, kind in enumerate(KINDS):
            plan_kind = _RESPONSE_KIND.get(kind, kind)
            for slot, key in enumerate(keys.get(k, ("allow", "deny"))):
                low = eng._lowered(plan_kind, key)
                s = e.slots[k][slot]
                s.name_off, s.name_len = pool.add(_ENCODE(key if low is None else low.key))
                if low is None:
                    s.low = -1
                    continue
                python = key == "deny" and kind in self.python_denies
                if (id(low), python) not in lows:
                    lows[(id(low), python)] = len(specs)
                    if python:
                        by_python.add(len(specs))
                    specs.append(low)
                s.low = lows[(id(low), python)]
        t = ffi.new("pe_low[]", max(1, len(specs)))
        self._keep.append(t)
        for i, low in enumerate(specs):
            c = t[i]
            c.base_flags = low.flags & ~FLAG_FOR_DATA | (low.flags & F_ALTP2M if low.altp2m_idx is None else 0)
            c.altp2m = -1 if low.altp2m_idx is None else low.altp2m_idx
            c.p2midx = -2 if low.p2midx_faulting else (-1 if low.p2midx is None else low.p2midx)
            c.read_data = low.read_data
            c.advance = 1 if low.advance is not None else (2 if low.advance_insn else 0)
            c.advance_by = (low.advance or 0) & U64
            c.native = not (low.inject or low.insn_data or low.relax is not None or low.restore or low.disarm
                            or i in by_python)
        e.lows = t
        e.cpuid_no_response = "cpuid" not in eng._resp

    def _bound_record(self, pool: _Pool) -> int:
        """Bytes one record can take at most (the buffer keeps this much room before each decision)."""
        names = sum(len(_ENCODE(r.name)) + 1 for r in self.rules)
        longest_region = max((n for _off, n in pool.index.values()), default=0)
        per_message = 0
        for r in self.rules:
            for m in list(r.messages) + (list(r.then.messages) if r.then else []):
                # a template character renders to at most 12 bytes of JSON (an astral character's
                # surrogate pair); a field of at most 3 characters to 20 digits (widths <= 99 take more)
                per_message += 200 + 16 * len(m.template) + len(_ENCODE(m.rule)) + len(_ENCODE(m.severity))
        return 4096 + 2 * names + per_message + len(self.rules) * (longest_region + 1)


def _compile(form: list, fields: Mapping[str, Any], consts: list[int], engine: DecisionEngine) -> list[int]:
    """A condition form as the bytecode decide.c runs: postfix, one 32-bit word an op."""
    op = form[0]

    def const(value: int) -> int:
        consts.append(value & U64)
        return OP_LIT | (len(consts) - 1) << 8

    if op == "lit":
        return [const(int(form[1], 16))]
    if op == "addr":
        if form[2]:
            raise _Unexpressible("a per-CPU address")
        return [const(int(form[1], 16) + engine.bindings.slide)]
    if op == "field":
        if form[1] not in fields:
            raise _Unexpressible(f"field '{form[1]}' is not in this kind of event")
        return [OP_FIELD | FIELD_ID[form[1]] << 8]
    if op in ("set", "cleared", "changed"):
        if "old" not in fields:
            raise _Unexpressible(f"{op}() on an event without old and new values")
        consts.append(int(form[1], 16) & U64)
        return [_OPS[op] | (len(consts) - 1) << 8]
    if op in ("in", "not_in"):
        raise _Unexpressible("region membership")
    if op not in _OPS:
        raise _Unexpressible(f"operator '{op}'")
    out: list[int] = []
    for part in form[1:]:
        out.extend(_compile(part, fields, consts, engine))
    return out + [_OPS[op]]


def _json_text(text: str) -> str:
    """Rendered message text as it appears inside the record's JSON string."""
    return _ENCODE(text.translate(_CONTROLS))[1:-1]


def _merge_hist(h: Any, buckets: Any, count: int, total: int, top: int) -> None:
    for b in range(len(h.buckets)):
        if buckets[b]:
            h.buckets[b] += buckets[b]
    h.count += count
    h.total += total
    if top > h.max:
        h.max = top
