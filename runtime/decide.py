"""The decision engine: vm_event requests in, one response and one `Decision` each out.

`DecisionEngine(plan, binding)` is built once, at install, from a trap plan
(`policyc.lowering`) and the binding of that plan to one guest (the KASLR slide,
the guest frames of each region, per-CPU bases, breakpoint sites). After that
`decide_batch(requests)` is the hot path: it answers every request it is given,
in order, with exactly one 400-byte response.

What is precomputed (nothing on the hot path parses the plan or walks tables):

* **Memory rules.** Per access kind (read, write, execute), a dict
  gfn -> (segment starts, segment claims): the page is cut at every region
  boundary into segments, each holding the rules (and regions) that claim an
  access starting there. A lookup is one dict get and one `bisect`. An
  `access` rule is in all three kinds.
* **Other triggers.** Per CR index, per MSR, per breakpoint site, per
  (descriptor, load/store), per CPUID leaf (leaf rules merged with the "*"
  ones, "*" alone for other leaves), and flat tables for guest_request,
  debug_exception and privileged_call. Every table is ordered as the plan
  orders it: priority first, then name.
* **Responses.** Per trigger kind and verdict, the response flags and how to
  fill its data, read from the plan's `responses` (the target's strategy).
  Responses are packed with `struct` into the ABI's layout; at import the
  packer is checked byte for byte against `policyc.native.abi.make_response`
  (which a test repeats for every shape).
* **Request decoding.** Fixed `struct` layouts for the header, each `u`
  member, and the register block; registers beyond rip/cr3 are decoded only
  when a condition or template asks for one.

Classification of a memory access. W means write, also when R is set (Xen
reports every write violation as W|R: XEN-FACTS, XEN-SEMANTICS §3); else X
means execute; else R means read. An `access` rule matches every kind.

Sub-page filtering. The trap is per 4 KiB page and the region per byte, and a
request gives the offset of the access within the page but not its size. A
rule's region claims an access if its offset lies in the region's bytes on
that frame. Conservative rule for data accesses: an access that starts up to
`DATA_SLACK` = 7 bytes before a region may reach into it (8 bytes is the widest
ordinary x86 integer move: mov/xchg/cmpxchg/add on a qword), so it is claimed
too. Likewise an access in the last 7 bytes of a page may continue onto the
next virtual page: when the request has a valid GLA, the regions are asked
whether those following bytes belong to them. What this still misses: wider
accesses (SSE/AVX moves of 16-64 bytes, cmpxchg16b, fxsave/xsave areas,
`rep movs`/`rep stos` strings, which report each faulting iteration but whose
first fault may start far before the region) and page-crossing accesses with
no valid GLA. Execute is exact (no slack): the fault offset is the first byte
of the instruction on the trapped page; an instruction that starts outside
the region and ends inside it runs code the guest could run anyway. Accesses
on a trapped page that no rule claims are "collateral": allowed at once (the
plan's allow response) and counted.

Verdicts. Every matching rule's actions run (messages, pause, disarm, limit);
the strongest verdict wins (deny > allow), and among the denying rules the one
first in plan order (highest priority) supplies `feed` / `with #EXC`.
`limit N per second then ACTION`: a token bucket per rule (capacity N, N new
tokens a second, clock injectable); once it is empty, ACTION replaces the
rule's messages/pause/disarm (a `then` verdict replaces the rule's verdict;
otherwise the verdict stays: a deny is never rate-limited into an allow).
A condition that raises (e.g. a register Xen's request does not carry) makes
that rule not match, and the decision records the error; other rules decide
as usual, so with no other match the answer is allow. Any failure beyond that
still gives a response: the kind's allow response, else a bare echo.

Audit mode (plan.policy.mode == "audit"): every request is answered with the
allow response; a deny is recorded as `would_deny`.

Asynchronous requests (no VCPU_PAUSED): Xen ignores the flags of such a
response, so none are set and no exception is injected; the decision is still
made and logged.

Side effects the engine cannot perform with response flags are returned in
`Decision.effects` for the caller: `inject` (dm_op inject_event; must be done
*before* the response is pushed, or the vCPU runs on first), `relax_access` /
`rearm` (arm64's relax-and-rearm), `pause` (the whole domain, after
answering) and `disarm` (remove a rule's trap, after answering; the engine
itself stops matching the rule at once). `SideEffect.apply(backend)` performs
`inject` and `pause`.

Order for the caller: decide, write the decision log (flushed), perform the
"before_response" effects, put the responses, notify, then perform the
"after_response" ones. Logging before answering is what makes a crash lose no
decision that was answered.
"""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from ..arch import EXCEPTION_VECTORS
from ..condition_form import Bindings, evaluate
from ..native.constants import (CR_INDEX, DESC_INDEX, ET_HW_EXC, EVENT_SIZE, FLAG_BITS, F_ALTP2M, F_INSN_DATA,
                                F_PAUSED, F_READ_DATA, F_TOGGLE_SS, MA_GLA_VALID, MA_IN_GPT, MA_R, MA_W, MA_X,
                                RS_CPUID, RS_DEBUG_EXCEPTION, RS_DESCRIPTOR_ACCESS, RS_GUEST_REQUEST,
                                RS_MEM_ACCESS, RS_MOV_TO_MSR, RS_PRIVILEGED_CALL, RS_SINGLESTEP,
                                RS_SOFTWARE_BREAKPOINT, RS_WRITE_CTRLREG, VERSION)
from .pt_step import PageTableSteps
from .vm_event_layout import (ARM_NAMES, EVENT_SUMMARY, FLAG_FOR_DATA, HDR, I, OFF_CR3, OFF_DATA, OFF_PC,
                              OFF_RIP, OFF_U, Q, REGS_ARM, REGS_X86, U_CPUID, U_CR, U_DEBUG, U_DESC, U_MEM,
                              U_MSR, X86_NAMES, ZERO_READ, bare_response, pack_response)

__all__ = ["Binding", "Decision", "DecisionEngine", "SideEffect", "DATA_SLACK", "classify_access"]

PAGE = 4096
DATA_SLACK = 7          # bytes before a region that an 8-byte data access may start at
U64 = (1 << 64) - 1

# --------------------------------------------------------------------------- reasons and vectors

# vm_event reason -> the plan's dispatch table name
_KIND_OF_REASON = {
    RS_MEM_ACCESS: "mem_access", RS_WRITE_CTRLREG: "write_ctrlreg", RS_MOV_TO_MSR: "mov_to_msr",
    RS_SOFTWARE_BREAKPOINT: "software_breakpoint", RS_SINGLESTEP: "singlestep",
    RS_GUEST_REQUEST: "guest_request", RS_DEBUG_EXCEPTION: "debug_exception", RS_CPUID: "cpuid",
    RS_PRIVILEGED_CALL: "privileged_call", RS_DESCRIPTOR_ACCESS: "descriptor_access",
}
_HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21})

_SUMMARY_FIELDS = {kind: ("rip", "pc", "cr3") + names for kind, names in EVENT_SUMMARY.items()}

READ, WRITE, EXECUTE = 0, 1, 2
_KIND_NAMES = ("read", "write", "execute")
_ACCESS_KINDS = {"read": (READ,), "write": (WRITE,), "execute": (EXECUTE,), "access": (READ, WRITE, EXECUTE)}


def classify_access(flags: int) -> int:
    """READ, WRITE or EXECUTE for a MEM_ACCESS request's flags: W|R is a write, never a read."""
    if flags & MA_W:
        return WRITE
    if flags & MA_X:
        return EXECUTE
    return READ


# --------------------------------------------------------------------------- the binding

@runtime_checkable
class Binding(Protocol):
    """What the engine needs from the install-time binding of a plan to one guest.

    Minimal until runtime/bind.py provides the real one. Addresses are guest
    virtual addresses with the slide applied; frames are guest frame numbers.
    """

    slide: int

    def region_frames(self, name: str) -> list[tuple[int, int, int]]:
        """(gfn, first byte offset, last byte offset inclusive) of each frame the region covers
        (for a per-CPU region: the frames of every vCPU's instance)."""
        ...

    def percpu_base(self, vcpu: int) -> int: ...

    def breakpoint_sites(self) -> dict[int, str]:
        """Slid virtual address (or guest-physical address) of each breakpoint site -> its plan id."""
        ...

    def in_region(self, name: str, address: int) -> bool:
        """Whether a virtual address lies in the region (slid; any vCPU's instance if per-CPU)."""
        ...


# --------------------------------------------------------------------------- results

BEFORE, AFTER = "before_response", "after_response"


@dataclass(frozen=True, slots=True)
class SideEffect:
    """Something the caller must do besides pushing the response.

    kind: ``inject`` (vector, error_code, insn_length, software; before the
    response), ``relax_access`` / ``rearm`` (gfn, access; arm64 relax-and-rearm;
    before), ``restore_breakpoint`` (site; before), ``pause`` (the domain; after),
    ``disarm`` (rule; after).
    """

    kind: str
    when: str
    vcpu: int | None = None
    vector: int | None = None
    error_code: int | None = None
    insn_length: int = 0
    software: bool = False
    rule: str | None = None
    gfn: int | None = None
    access: str | None = None
    site: str | None = None

    def apply(self, backend: Any) -> bool:
        """Perform it on a `policyc.runtime.backend.Backend` if it is one the engine can do alone
        (inject, pause); False for the others (they need the installer)."""
        if self.kind == "inject":
            backend.inject_exception(self.vcpu, self.vector, error_code=self.error_code,
                                     insn_length=self.insn_length, software=self.software)
            return True
        if self.kind == "pause":
            backend.pause()
            return True
        return False

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "when": self.when}
        for name in ("vcpu", "vector", "error_code", "rule", "gfn", "access", "site"):
            value = getattr(self, name)
            if value is not None:
                out[name] = hex(value) if name == "gfn" else value
        if self.kind == "inject":
            out["insn_length"] = self.insn_length
            out["software"] = self.software
        return out


@dataclass(slots=True)
class Message:
    """A log or alert action of a matched rule, rendered by the decision log."""

    kind: str           # "log" | "alert"
    severity: str
    rule: str
    priority: int
    template: str


@dataclass(slots=True)
class Decision:
    """What the engine decided for one request (one per request, always)."""

    id: str
    time_ns: int
    kind: str                       # the plan's dispatch table: mem_access, write_ctrlreg, ...
    reason: int
    vcpu: int
    paused: bool                    # a sync request (the vCPU waits for this response)
    event: Mapping[str, Any]        # field -> value (ints; registers decoded on demand)
    rules: tuple[str, ...] = ()     # every matching rule, in plan order (priority first)
    rule: str | None = None         # the rule whose verdict won
    verdict: str = "allow"          # what the policy decided
    would_deny: bool = False        # audit mode: a deny that was answered with allow
    response: str = "allow"         # the plan response used: allow, deny, deny:write ...
    response_flags: int = 0
    effects: tuple[SideEffect, ...] = ()
    collateral: bool = False        # a trapped page, but no rule's region claims the access
    conservative: bool = False      # claimed only by the unknown-size rule (DATA_SLACK)
    messages: list[Message] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    limited: tuple[str, ...] = ()   # rules past their rate limit (their `then` ran)
    regions: tuple[str, ...] = ()   # regions that claimed a memory access
    note: str | None = None
    latency_ns: int = 0
    pt_write: tuple[int, int] | None = None     # (gfn, offset): a stepped page-table write has landed (pt_step.py)

    def summary(self) -> dict[str, Any]:
        """The event fields a log record keeps (ints), kind-specific plus vcpu and rip/pc, cr3.
        Only fields already decoded: this never decodes the register block."""
        ev = self.event
        get = dict.get if isinstance(ev, dict) else type(ev).get   # dict.get skips _Event.__missing__
        out: dict[str, Any] = {"vcpu": self.vcpu}
        for name in _SUMMARY_FIELDS.get(self.kind, _SUMMARY_FIELDS["unknown"]):
            value = get(ev, name)
            if value is not None:
                out[name] = value
        return out


class _Event(dict):
    """Event fields; the register block is decoded on the first lookup that misses."""

    __slots__ = ("_raw", "_arm")

    def __init__(self, raw: bytes, arm: bool) -> None:
        super().__init__()
        self._raw = raw
        self._arm = arm

    def __missing__(self, key: str) -> Any:
        raw = self._raw
        if raw is None:
            raise KeyError(key)
        self._raw = None
        if self._arm:
            for name, value in zip(ARM_NAMES, REGS_ARM.unpack_from(raw, OFF_DATA)):
                self.setdefault(name, value)
        else:
            values = REGS_X86.unpack_from(raw, OFF_DATA)
            for name, value in zip(X86_NAMES, values):
                if name[0] != "_":
                    self.setdefault(name, value)
            cs, ss = values[39], values[40]
            self.setdefault("cs_arbytes", cs >> 20)
            self.setdefault("cpl", (ss >> 25) & 3)          # SS.DPL (ar bits 5-6) is the CPL
        return self[key]

    def get(self, key: str, default: Any = None) -> Any:   # dict.get skips __missing__
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
            return True
        except KeyError:
            return False


# --------------------------------------------------------------------------- rules

class _Rule:
    """One rule's compiled entry plus its run-time state (rate bucket, disarmed)."""

    __slots__ = ("name", "priority", "condition", "verdict", "feed", "exception", "vector", "messages",
                 "pause", "disarm", "limit", "then", "tokens", "stamp", "disarmed", "order")

    def __init__(self, entry: Mapping[str, Any], order: int) -> None:
        self.name: str = entry["rule"]
        self.priority: int = int(entry.get("priority", 0))
        self.condition = entry.get("condition")
        v = entry.get("verdict") or {"verdict": "allow"}
        self.verdict: str = v.get("verdict", "allow")
        self.feed: bytes | None = bytes.fromhex(v["feed"]) if v.get("feed") is not None else None
        self.exception: str | None = v.get("exception")
        self.vector: int | None = v.get("vector")
        self.messages: list[Message] = []
        self.pause = False
        self.disarm = False
        self.limit: float | None = None
        self.then: _Then | None = None
        for action in entry.get("actions", ()):
            self._action(action)
        self.tokens = self.limit or 0.0
        self.stamp: float | None = None
        self.disarmed = False
        self.order = order

    def _action(self, action: Mapping[str, Any]) -> None:
        for kind in ("log", "alert"):
            if kind in action:
                a = action[kind]
                self.messages.append(Message(kind, a["severity"], self.name, self.priority, a["template"]))
        if action.get("pause"):
            self.pause = True
        if action.get("disarm"):
            self.disarm = True
        if "limit" in action:
            self.limit = float(action["limit"]["per_second"])
            self.then = _Then(action["limit"]["then"], self)

    def take_token(self, now: float) -> bool:
        """Token bucket: capacity `limit`, refilled at `limit` tokens per second."""
        limit = self.limit
        assert limit is not None
        if self.stamp is not None:
            self.tokens = min(limit, self.tokens + (now - self.stamp) * limit)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Then:
    __slots__ = ("verdict", "feed", "exception", "vector", "messages", "pause", "disarm")

    def __init__(self, then: Mapping[str, Any], rule: _Rule) -> None:
        v = then.get("verdict")
        self.verdict: str | None = v.get("verdict") if v else None
        self.feed = bytes.fromhex(v["feed"]) if v and v.get("feed") is not None else None
        self.exception = v.get("exception") if v else None
        self.vector = v.get("vector") if v else None
        self.messages: list[Message] = []
        for kind in ("log", "alert"):
            if kind in then:
                a = then[kind]
                self.messages.append(Message(kind, a["severity"], rule.name, rule.priority, a["template"]))
        self.pause = bool(then.get("pause"))
        self.disarm = bool(then.get("disarm"))


class _Claim:
    """A rule claiming the accesses that start in one segment of a page."""

    __slots__ = ("rule", "region", "exact")

    def __init__(self, rule: _Rule, region: str, exact: bool) -> None:
        self.rule, self.region, self.exact = rule, region, exact


# --------------------------------------------------------------------------- responses

class _Lowered:
    """One response shape of the plan (e.g. responses.mem_access["deny:write"]), ready to pack."""

    __slots__ = ("key", "flags", "altp2m_idx", "p2midx_faulting", "p2midx", "read_data", "inject",
                 "default_vector", "advance", "advance_insn", "relax", "insn_data", "restore", "disarm",
                 "reinject")

    def __init__(self, key: str, spec: Mapping[str, Any]) -> None:
        self.key = key
        flags = 0
        for name in spec.get("flags", ()):
            if name not in FLAG_BITS:
                raise ValueError(f"responses: unknown response flag '{name}'")
            flags |= FLAG_BITS[name]
        self.flags = flags
        self.altp2m_idx: int | None = spec.get("altp2m_idx")
        p2m = spec.get("fast_singlestep_p2midx")
        self.p2midx_faulting = p2m == "faulting view"
        self.p2midx: int | None = p2m if isinstance(p2m, int) else None
        self.read_data = "read_data" in spec or bool(flags & F_READ_DATA)
        inject = spec.get("inject")
        self.inject = inject is not None
        self.default_vector = EXCEPTION_VECTORS.get(inject.split(",")[-1].replace("else", "").strip(), 13) \
            if isinstance(inject, str) else 13
        adv = spec.get("advance_ip")
        self.advance_insn = isinstance(adv, str)          # "u.cpuid.insn_length"
        self.advance: int | None = adv if isinstance(adv, int) else None
        self.relax: str | None = spec.get("relax_access")
        self.insn_data = bool(flags & F_INSN_DATA) or "insn_data" in spec
        self.restore = bool(spec.get("restore_original"))
        self.disarm = bool(spec.get("disarm"))
        self.reinject: str | None = spec.get("reinject")


_PLAIN_ALLOW = _Lowered("allow", {"flags": []})


# --------------------------------------------------------------------------- the engine

class DecisionEngine:
    """Answers vm_event requests for one plan bound to one guest.

    Args:
        plan: a trap plan (`policyc.compiler.compile_plan` / `policyc.plan.load_plan`).
        binding: the plan bound to the guest (see `Binding`).
        clock: seconds, monotonic (rate limits); injectable for tests.
        wall_clock_ns: wall time in ns (decision timestamps).
        id_prefix: the decision-id prefix (default: unique per process).
    """

    def __init__(self, plan: Mapping[str, Any], binding: Binding, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock_ns: Callable[[], int] = time.time_ns,
                 id_prefix: str | None = None) -> None:
        self.plan = plan
        self.binding = binding
        self.clock = clock
        self.wall_clock_ns = wall_clock_ns
        self.plan_hash: str = plan.get("content_hash", "")
        self.audit = plan.get("policy", {}).get("mode") == "audit"
        self.budget: Any = None         # the enforcer's global budget (runtime/budget.py): a token an event
        self.over_budget = False        # the event being decided is past it
        self.arch: str = plan.get("target", {}).get("arch", "x86_64")
        self.arm = self.arch == "arm64"
        self.strategies: dict[str, str] = dict(plan.get("strategies", {}))
        self.id_prefix = id_prefix or f"{os.getpid():x}.{time.time_ns() // 1_000_000:x}"
        self.next_id = 1             # decision ids are PREFIX.N (the native engine shares the count)
        self.bindings = Bindings(slide=binding.slide, percpu_base=binding.percpu_base,
                                 in_region=lambda region, value, event: binding.in_region(region, value))
        self.rules: dict[str, _Rule] = {}
        self._pending_rearm: list[int] = []
        self.pt_steps = PageTableSteps(binding)
        self._build_dispatch(plan.get("dispatch", {}))
        self._build_responses(plan.get("responses", {}))
        self._build_views(plan.get("views", []))
        self._handlers = {
            RS_MEM_ACCESS: self._mem_access, RS_WRITE_CTRLREG: self._write_ctrlreg,
            RS_MOV_TO_MSR: self._mov_to_msr, RS_SOFTWARE_BREAKPOINT: self._breakpoint,
            RS_CPUID: self._cpuid, RS_DESCRIPTOR_ACCESS: self._descriptor,
            RS_GUEST_REQUEST: self._guest_request, RS_DEBUG_EXCEPTION: self._debug_exception,
            RS_PRIVILEGED_CALL: self._privileged_call, RS_SINGLESTEP: self._singlestep,
        }
        # Reasons the architecture never sends (x86-only on arm64, SMC on x86): a bare echo.
        foreign = (RS_PRIVILEGED_CALL,) if not self.arm else (
            RS_WRITE_CTRLREG, RS_MOV_TO_MSR, RS_SOFTWARE_BREAKPOINT, RS_CPUID, RS_DESCRIPTOR_ACCESS,
            RS_DEBUG_EXCEPTION, RS_SINGLESTEP)
        for reason in foreign:
            self._handlers[reason] = self._foreign

    def table_keys(self) -> dict[str, frozenset[int]]:
        """What the dispatch tables are keyed on: the trapped gfns, breakpoint sites (addresses), MSRs
        and CPUID leaves for which a request reaches a rule other than by default."""
        return {"gfns": self.trapped_gfns, "sites": frozenset(self._sites), "msrs": frozenset(self._msr),
                "cpuid_leaves": frozenset(self._cpuid_leaf)}

    def take_pending_rearm(self) -> list[int]:
        """Pages relaxed for the last event (arm64 relax-and-rearm) and not re-armed yet; the caller
        re-arms them when the guest goes quiet, since the next event may be long in coming."""
        pending, self._pending_rearm = self._pending_rearm, []
        return pending

    def refresh_binding(self) -> None:
        """Rebuild the tables that depend on where the guest's pages are (after the binding followed a
        remapped page). Rules keep their state: rate buckets, disarmed."""
        self._build_dispatch(self.plan.get("dispatch", {}))

    # ------------------------------------------------------------------ build (once)
    def _rule(self, entry: Mapping[str, Any]) -> _Rule:
        name = entry["rule"]
        rule = self.rules.get(name)
        if rule is None:
            rule = self.rules[name] = _Rule(entry, len(self.rules))
        return rule

    def _table(self, entries: Iterable[Mapping[str, Any]]) -> tuple[_Rule, ...]:
        return tuple(self._rule(e) for e in entries)

    def _build_dispatch(self, dispatch: Mapping[str, Any]) -> None:
        b = self.binding
        # memory: per access kind, gfn -> [(lo, hi, claim)]
        spans: tuple[dict[int, list], ...] = ({}, {}, {})
        self._mem_regions: tuple[list[tuple[str, tuple[_Rule, ...]]], ...] = ([], [], [])
        by_region: tuple[dict[str, list[_Rule]], ...] = ({}, {}, {})
        for entry in dispatch.get("mem_access", ()):
            rule = self._rule(entry)
            kinds = _ACCESS_KINDS[entry["access"]]
            for region in entry["regions"]:
                frames = b.region_frames(region)
                exact, near = _Claim(rule, region, True), _Claim(rule, region, False)
                for k in kinds:
                    by_region[k].setdefault(region, []).append(rule)
                    slack = DATA_SLACK if k != EXECUTE else 0
                    for gfn, first, last in frames:
                        per = spans[k].setdefault(gfn, [])
                        per.append((first, last, exact))
                        if slack and first > 0:
                            per.append((max(0, first - slack), first - 1, near))
        # Pages with the same claims (most of a big region's) share one segment table.
        interned: dict[tuple, tuple[list[int], list[tuple[_Claim, ...]]]] = {}
        mem = []
        for s in spans:
            table = {}
            for gfn, items in s.items():
                key = tuple(sorted((lo, hi, id(c)) for lo, hi, c in items))
                seg = interned.get(key)
                if seg is None:
                    seg = interned[key] = _segments(items)
                table[gfn] = seg
            mem.append(table)
        self._mem = tuple(mem)
        for k in (READ, WRITE, EXECUTE):
            self._mem_regions[k].extend((r, tuple(sorted(rs, key=lambda x: x.order)))
                                        for r, rs in by_region[k].items())
        self.trapped_gfns = frozenset().union(*(m.keys() for m in self._mem))
        self._cr = {CR_INDEX[name]: self._table(es) for name, es in dispatch.get("write_ctrlreg", {}).items()}
        self._msr = {int(k, 16): self._table(es) for k, es in dispatch.get("mov_to_msr", {}).items()}
        self._desc: dict[tuple[int, int], tuple[_Rule, ...]] = {}
        for key, es in dispatch.get("descriptor_access", {}).items():
            reg, access = key.split(":")
            self._desc[(DESC_INDEX[reg], 1 if access == "write" else 0)] = self._table(es)
        cpuid = dispatch.get("cpuid", {})
        self._cpuid_any = self._table(cpuid.get("*", ()))
        self._cpuid_leaf = {int(k, 16): tuple(sorted(self._table(es) + self._cpuid_any,
                                                     key=lambda r: (-r.priority, r.name)))
                            for k, es in cpuid.items() if k != "*"}
        self._flat = {kind: self._table(dispatch.get(kind, ()))
                      for kind in ("guest_request", "debug_exception", "privileged_call")}
        sites = dispatch.get("software_breakpoint", {})
        self._bp = {site: self._table(es) for site, es in sites.items()}
        self._sites = dict(b.breakpoint_sites()) if sites else {}
        self._insn_bytes = getattr(b, "breakpoint_insn_bytes", None)

    def _build_responses(self, responses: Mapping[str, Any]) -> None:
        self._resp: dict[str, dict[str, _Lowered]] = {}
        for kind, shapes in responses.items():
            table = {}
            for key, spec in shapes.items():
                if isinstance(spec, Mapping) and ("flags" in spec or key == "not_ours"):
                    table[key] = _Lowered(key, spec)
            self._resp[kind] = table
        bp = self.strategies.get("breakpoint")
        if bp == "int3-inline-emulate" and self._bp and self._insn_bytes is None:
            raise ValueError("the plan plants inline breakpoints emulated from their original bytes: "
                             "the binding must provide breakpoint_insn_bytes(site_id)")

    def _build_views(self, views: Sequence[Mapping[str, Any]]) -> None:
        """CR3 contexts: the view each CR3 value runs in (plan.views; see policyc.lowering.views)."""
        self._cr3_view: dict[int, int] = {}
        self._default_view = 0
        for v in views:
            if v.get("role") != "restricted":
                continue
            for ctx in v.get("contexts", ()):
                if ctx == "*":
                    self._default_view = v["id"]
                elif ctx.startswith("cr3="):
                    self._cr3_view[int(ctx[4:], 16)] = v["id"]
        self._switch_on_cr3 = bool(self._cr3_view)

    def _lowered(self, kind: str, key: str) -> _Lowered | None:
        table = self._resp.get(kind)
        if table is None:
            return None
        found = table.get(key)
        if found is None and ":" in key:
            found = table.get(key.split(":")[0])
        if found is None and key != "allow":
            found = table.get("allow")
        return found

    # ------------------------------------------------------------------ the hot path
    def decide_batch(self, requests: Sequence[bytes]) -> list[tuple[bytes, Decision]]:
        """One (response, decision) per request, in order. Never raises for a bad request."""
        out = []
        decide = self.decide
        for raw in requests:
            out.append(decide(raw))
        return out

    def decide(self, raw: bytes) -> tuple[bytes, Decision]:
        """One request: its response and its decision. With a global budget each request takes a token
        from it first; one past it is decided as `budget.over_budget` says (runtime/budget.py)."""
        budget = self.budget
        if budget is None or budget.take(1):
            return self._decide(raw)
        audit = self.audit
        self.over_budget = True
        self.audit = audit or budget.over_budget == "allow"
        try:
            return self._decide(raw)
        finally:
            self.over_budget, self.audit = False, audit

    def _decide(self, raw: bytes) -> tuple[bytes, Decision]:
        t0 = time.perf_counter_ns()
        try:
            raw = bytes(raw)
            if len(raw) != EVENT_SIZE:
                raise ValueError(f"a request is {EVENT_SIZE} bytes, got {len(raw)}")
            version, flags, reason, vcpu, idx = HDR.unpack_from(raw, 0)
            ev = _Event(raw, self.arm)
            ev["vcpu"] = vcpu
            if self.arm:
                ev["pc"] = Q.unpack_from(raw, OFF_PC)[0]
            else:
                ev["rip"] = Q.unpack_from(raw, OFF_RIP)[0]
                ev["cr3"] = Q.unpack_from(raw, OFF_CR3)[0]
            d = Decision(self._take_id(), self.wall_clock_ns(),
                         _KIND_OF_REASON.get(reason, "unknown"), reason, vcpu, bool(flags & F_PAUSED), ev)
            if version != VERSION:
                d.errors.append(f"interface version {version}, expected {VERSION}: Xen drops the response")
            rearm = self._pending_rearm     # arm64 relax-and-rearm: pages relaxed for the previous event
            self._pending_rearm = []         # (a fresh list: this event may relax a page itself)
            handler = self._handlers.get(reason)
            if handler is None:
                d.note = f"reason {reason} is not handled by this plan: answered with a bare echo"
                response = bare_response(raw)
            else:
                response = handler(raw, flags, idx, ev, d)
            if rearm:
                d.effects = tuple(SideEffect("rearm", BEFORE, gfn=g) for g in rearm) + d.effects
        except Exception as exc:  # noqa: BLE001 - one response per request, always
            response, d = self._fallback(raw, exc)
        d.response_flags = I.unpack_from(response, 4)[0]
        d.latency_ns = time.perf_counter_ns() - t0
        return response, d

    def _take_id(self) -> str:
        n = self.next_id
        self.next_id = n + 1
        return f"{self.id_prefix}.{n}"

    def _fallback(self, raw: Any, exc: Exception) -> tuple[bytes, Decision]:
        data = bytes(raw[:EVENT_SIZE]) if isinstance(raw, (bytes, bytearray, memoryview)) else b""
        data = data.ljust(EVENT_SIZE, b"\0")
        version, flags, reason, vcpu, idx = HDR.unpack_from(data, 0)
        kind = _KIND_OF_REASON.get(reason, "unknown")
        ev = _Event(data, self.arm)
        ev["vcpu"] = vcpu
        d = Decision(self._take_id(), self.wall_clock_ns(), kind, reason, vcpu,
                     bool(flags & F_PAUSED), ev)
        d.errors.append(f"{type(exc).__name__}: {exc}")
        d.note = "engine error: answered with the allow response"
        try:
            plan_kind = "breakpoint" if kind == "software_breakpoint" else kind
            low = self._lowered(plan_kind, "allow")
            response = self._pack(data, flags, idx, low, d, None) if low is not None and d.paused else bare_response(data)
        except Exception:  # noqa: BLE001
            response = bare_response(data)
        return response, d

    # ------------------------------------------------------------------ matching and verdicts
    def _match(self, rules: Iterable[_Rule], ev: _Event, d: Decision) -> list[_Rule]:
        matched = []
        bindings = self.bindings
        for rule in rules:
            if rule.disarmed:
                continue
            cond = rule.condition
            if cond is not None:
                try:
                    if not evaluate(cond, ev, bindings):
                        continue
                except Exception as exc:  # noqa: BLE001
                    d.errors.append(f"rule {rule.name}: condition failed: {type(exc).__name__}: {exc}")
                    continue
            matched.append(rule)
        return matched

    def _verdict(self, matched: list[_Rule], d: Decision) -> tuple[str, bytes | None, int | None]:
        """Run every matched rule's actions; the strongest verdict wins. Returns (verdict, feed, vector)."""
        if not matched:
            return "allow", None, None
        now = self.clock()
        verdict, feed, vector, winner = "allow", None, None, None
        effects: list[SideEffect] = list(d.effects)
        limited = []
        for rule in matched:
            r_verdict, r_feed, r_vector = rule.verdict, rule.feed, rule.vector
            messages, pause, disarm = rule.messages, rule.pause, rule.disarm
            if self.over_budget or (rule.limit is not None and not rule.take_token(now)):
                # Past the rule's rate limit, or the enforcer's global budget: the rule's `then`
                # runs; a rule without one keeps its verdict and drops its actions.
                then = rule.then
                limited.append(rule.name)
                messages, pause, disarm = (then.messages, then.pause, then.disarm) if then else ((), False, False)
                if then is not None and then.verdict is not None:
                    r_verdict, r_feed, r_vector = then.verdict, then.feed, then.vector
            d.messages.extend(messages)
            if pause:
                effects.append(SideEffect("pause", AFTER, rule=rule.name))
            if disarm:
                rule.disarmed = True
                effects.append(SideEffect("disarm", AFTER, rule=rule.name))
            if r_verdict == "deny" and verdict != "deny":
                verdict, feed, vector, winner = "deny", r_feed, r_vector, rule
            elif winner is None:
                winner = rule
        d.rules = tuple(r.name for r in matched)
        d.rule = winner.name if winner is not None else None
        d.verdict = verdict
        d.effects = tuple(effects)
        if limited:
            d.limited = tuple(limited)
        if len(d.messages) > 1:
            d.messages.sort(key=lambda m: -m.priority)
        return verdict, feed, vector

    def _respond(self, raw: bytes, flags: int, idx: int, kind: str, verdict: str, d: Decision,
                 *, deny_key: str = "deny", feed: bytes | None = None, vector: int | None = None) -> bytes:
        """Lower the verdict by the plan's strategy for `kind` (audit: allow) and pack the response."""
        if verdict == "deny" and self.audit:
            d.would_deny = True
            verdict = "allow"
        key = deny_key if verdict == "deny" else "allow"
        low = self._lowered(kind, key)
        d.response = key if low is None else low.key
        if not d.paused:
            d.note = d.note or "asynchronous event: Xen ignores response flags, nothing enforced"
            return bare_response(raw)
        if low is None:
            return bare_response(raw)
        return self._pack(raw, flags, idx, low, d, feed, vector)

    def _pack(self, raw: bytes, flags: int, idx: int, low: _Lowered, d: Decision,
              feed: bytes | None, vector: int | None = None, altp2m_idx: int | None = None) -> bytes:
        effects = list(d.effects)
        kw: dict[str, Any] = {}
        alt = low.altp2m_idx if altp2m_idx is None else altp2m_idx
        if alt is not None:
            kw["altp2m_idx"] = alt
        if low.p2midx_faulting:
            kw["p2midx"] = idx
        elif low.p2midx is not None:
            kw["p2midx"] = low.p2midx
        if low.read_data:
            kw["read_data"] = feed if feed is not None else ZERO_READ
        if low.advance is not None or low.advance_insn:
            step = low.advance if low.advance is not None else d.event.get("insn_length", 0)
            if self.arm:
                kw["pc"] = d.event["pc"] + step
            else:
                kw["rip"] = d.event["rip"] + step
        if low.insn_data:
            site = d.event.get("site")
            kw["insn_data"] = self._insn_bytes(site) if self._insn_bytes is not None and site else bytes(16)
        if low.inject:
            vec = vector if vector is not None else low.default_vector
            effects.insert(0, SideEffect("inject", BEFORE, vcpu=d.vcpu, vector=vec,
                                         error_code=0 if vec in _HAS_ERROR_CODE else None))
        if low.relax is not None and d.kind == "mem_access":
            gfn = d.event["gfn"]
            effects.insert(0, SideEffect("relax_access", BEFORE, gfn=gfn, access=low.relax))
            self._pending_rearm.append(gfn)
        if low.restore and d.event.get("site"):
            effects.insert(0, SideEffect("restore_breakpoint", BEFORE, site=d.event["site"]))
        if low.disarm and d.event.get("site"):
            effects.append(SideEffect("disarm", AFTER, site=d.event["site"]))
        d.effects = tuple(effects)
        base = low.flags & ~FLAG_FOR_DATA | (low.flags & F_ALTP2M if alt is None else 0)
        return pack_response(raw, base, **kw)

    # ------------------------------------------------------------------ per reason
    def _mem_access(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        gfn, offset, gla, mflags = U_MEM.unpack_from(raw, OFF_U)
        k = classify_access(mflags)
        ev["gfn"], ev["offset"], ev["gla"] = gfn, offset, gla
        ev["access"] = mflags & (MA_R | MA_W | MA_X)
        ev["gla_valid"] = int(bool(mflags & MA_GLA_VALID))
        ev["in_gpt"] = int(bool(mflags & MA_IN_GPT))
        claims: Sequence[_Claim] = ()
        page = self._mem[k].get(gfn)
        if page is not None:
            starts, segs = page
            claims = segs[bisect.bisect_right(starts, offset) - 1]
        if k != EXECUTE and offset > PAGE - 1 - DATA_SLACK and mflags & MA_GLA_VALID:
            claims = self._next_page_claims(k, gla, claims)
        kind_name = _KIND_NAMES[k]
        if not claims:
            d.collateral = True
            d.note = "collateral: no rule's region claims this access" if page is not None or \
                gfn in self.trapped_gfns else "no rule traps this frame"
            if k == WRITE and (step := self.pt_steps.step(raw, idx, d, gfn, offset,
                                                          self._lowered("mem_access", "allow"))) is not None:
                return step
            return self._respond(raw, flags, idx, "mem_access", "allow", d)
        seen: dict[str, _Claim] = {}
        for c in claims:
            prev = seen.get(c.rule.name)
            if prev is None or (c.exact and not prev.exact):
                seen[c.rule.name] = c
        rules = sorted((c.rule for c in seen.values()), key=lambda r: r.order)
        matched = self._match(rules, ev, d)
        d.regions = tuple(dict.fromkeys(seen[r.name].region for r in matched))
        d.conservative = bool(matched) and not any(seen[r.name].exact for r in matched)
        verdict, feed, vector = self._verdict(matched, d)
        return self._respond(raw, flags, idx, "mem_access", verdict, d, deny_key=f"deny:{kind_name}",
                             feed=feed, vector=vector)

    def _next_page_claims(self, k: int, gla: int, claims: Sequence[_Claim]) -> Sequence[_Claim]:
        """An access in the last DATA_SLACK bytes of a page may continue on the next virtual page."""
        nxt = (gla | (PAGE - 1)) + 1
        end = gla + DATA_SLACK
        extra = []
        names = {c.rule.name for c in claims}
        for region, rules in self._mem_regions[k]:
            if any(self.binding.in_region(region, a & U64) for a in range(nxt, end + 1)):
                extra.extend(_Claim(r, region, False) for r in rules if r.name not in names)
        return tuple(claims) + tuple(extra) if extra else claims

    def _write_ctrlreg(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        index, new, old = U_CR.unpack_from(raw, OFF_U)
        ev["register"], ev["new"], ev["old"] = index, new, old
        rules = self._cr.get(index, ())
        verdict, _f, _v = self._verdict(self._match(rules, ev, d), d)
        if self._switch_on_cr3 and index == CR_INDEX["cr3"] and (verdict == "allow" or self.audit) \
                and d.paused and not self.arm:
            # The plan has context views: the vCPU runs in its new CR3's view (the monitor exists for
            # this even when no rule watches CR3, so the plan may have no write_ctrlreg responses).
            view = self._cr3_view.get(new, self._cr3_view.get(new & ~0xFFF & U64, self._default_view))
            low = self._lowered("write_ctrlreg", "allow") or _PLAIN_ALLOW
            if verdict == "deny":
                d.would_deny = True
            d.response = "allow"
            d.note = f"cr3 context: view {view}"
            return self._pack(raw, flags, idx, low, d, None, altp2m_idx=view)
        return self._respond(raw, flags, idx, "write_ctrlreg", verdict, d)

    def _mov_to_msr(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        msr, new, old = U_MSR.unpack_from(raw, OFF_U)
        ev["msr"], ev["new"], ev["old"] = msr, new, old
        verdict, _f, _v = self._verdict(self._match(self._msr.get(msr, ()), ev, d), d)
        return self._respond(raw, flags, idx, "mov_to_msr", verdict, d)

    def _site_of(self, ev: _Event, gfn: int) -> str | None:
        pointer = ev["pc"] if self.arm else ev["rip"]
        sites = self._sites
        site = sites.get(pointer)
        if site is None and gfn != U64:
            site = sites.get((gfn << 12) | (pointer & 0xFFF))
        return site

    def _breakpoint(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        gfn, pending, insn_length, etype = U_DEBUG.unpack_from(raw, OFF_U)
        ev["gfn"], ev["insn_length"], ev["gla"] = gfn, insn_length, ev["pc" if self.arm else "rip"]
        site = self._site_of(ev, gfn)
        if site is None or site not in self._bp:
            # Not ours: the guest's own int3. Xen swallowed the #BP while the monitor is on.
            d.note = "not our breakpoint: re-injected to the guest"
            if d.paused:
                d.effects = (SideEffect("inject", BEFORE, vcpu=d.vcpu, vector=3, insn_length=insn_length,
                                        software=True),)
            d.response = "not_ours"
            return bare_response(raw)
        ev["site"] = site
        verdict, _f, vector = self._verdict(self._match(self._bp[site], ev, d), d)
        return self._respond(raw, flags, idx, "breakpoint", verdict, d, vector=vector)

    def _cpuid(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        insn_length, leaf, subleaf = U_CPUID.unpack_from(raw, OFF_U)
        ev["insn_length"], ev["leaf"], ev["subleaf"] = insn_length, leaf, subleaf
        rules = self._cpuid_leaf.get(leaf, self._cpuid_any)
        verdict, _f, _v = self._verdict(self._match(rules, ev, d), d)
        if "cpuid" not in self._resp:
            # Not in the plan, yet it arrived: CPUID has run but rip has not moved (livelock otherwise).
            d.response = "allow"
            return pack_response(raw, 0, rip=ev["rip"] + insn_length) if d.paused else bare_response(raw)
        return self._respond(raw, flags, idx, "cpuid", verdict, d)

    def _descriptor(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        _info, _qual, descriptor, is_write = U_DESC.unpack_from(raw, OFF_U)
        ev["descriptor"], ev["is_write"] = descriptor, is_write
        rules = self._desc.get((descriptor, 1 if is_write else 0), ())
        verdict, _f, _v = self._verdict(self._match(rules, ev, d), d)
        return self._respond(raw, flags, idx, "descriptor_access", verdict, d)

    def _guest_request(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        verdict, _f, _v = self._verdict(self._match(self._flat["guest_request"], ev, d), d)
        return self._respond(raw, flags, idx, "guest_request", verdict, d)

    def _debug_exception(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        gfn, pending, insn_length, etype = U_DEBUG.unpack_from(raw, OFF_U)
        ev["gfn"], ev["pending_dbg"], ev["insn_length"] = gfn, pending, insn_length
        verdict, _f, _v = self._verdict(self._match(self._flat["debug_exception"], ev, d), d)
        response = self._respond(raw, flags, idx, "debug_exception", verdict, d)
        if d.paused:
            # Sync: Xen swallowed the #DB; the guest must still see its own (XEN-SEMANTICS §1.9).
            d.effects = (SideEffect("inject", BEFORE, vcpu=d.vcpu, vector=1, insn_length=insn_length,
                                    software=etype != ET_HW_EXC),) + d.effects
        return response

    def _foreign(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        d.note = f"{d.kind} events do not exist on {self.arch}: answered with a bare echo"
        return bare_response(raw)

    def _privileged_call(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        if self._bp and self.strategies.get("breakpoint") == "smc-inline":
            site = self._site_of(ev, U64)
            if site is not None and site in self._bp:
                ev["site"] = site
                d.kind = "software_breakpoint"
                verdict, _f, vector = self._verdict(self._match(self._bp[site], ev, d), d)
                return self._respond(raw, flags, idx, "breakpoint", verdict, d, vector=vector)
        verdict, _f, _v = self._verdict(self._match(self._flat["privileged_call"], ev, d), d)
        if "privileged_call" not in self._resp:
            d.response = "allow"
            return pack_response(raw, 0, pc=ev["pc"] + 4) if d.paused else bare_response(raw)
        return self._respond(raw, flags, idx, "privileged_call", verdict, d)

    def _singlestep(self, raw: bytes, flags: int, idx: int, ev: _Event, d: Decision) -> bytes:
        """The plans step only with FAST_SINGLESTEP, which ends without an event: a SINGLESTEP event
        is stray stepping (e.g. left over from a previous agent). Stepping would go on for every
        instruction until a response toggles it (XEN-SEMANTICS §1.10): toggle it off."""
        ev["gfn"] = Q.unpack_from(raw, OFF_U)[0]
        if (landed := self.pt_steps.landed(raw, d)) is not None:
            return landed
        if not d.paused:
            return bare_response(raw)
        d.note = "stray single-step: turned off"
        d.response = "toggle_singlestep"
        return pack_response(raw, F_TOGGLE_SS)


def _segments(items: list[tuple[int, int, _Claim]]) -> tuple[list[int], list[tuple[_Claim, ...]]]:
    """Cut one page at every claim boundary: sorted segment starts and the claims covering each."""
    cuts = {0}
    for lo, hi, _c in items:
        cuts.add(max(0, lo))
        if hi + 1 < PAGE:
            cuts.add(hi + 1)
    starts = sorted(cuts)
    segs = []
    order = sorted(items, key=lambda it: (it[2].rule.order, not it[2].exact))
    for s in starts:
        segs.append(tuple(c for lo, hi, c in order if lo <= s <= hi))
    # merge neighbours with the same claims
    m_starts, m_segs = [starts[0]], [segs[0]]
    for s, claims in zip(starts[1:], segs[1:]):
        if claims == m_segs[-1]:
            continue
        m_starts.append(s)
        m_segs.append(claims)
    return m_starts, m_segs
