"""The simulator checked against live Xen: a recorded run replayed through `SimulatedXen`.

A live run (`policyc run --guest xen:D --record TRACE --log LOG` on a real host) leaves the requests Xen
sent, in order (the trace, runtime/trace.py), and the decision and response flags each was answered with
(the decision log). `replay_live(trace, decisions, plan, symbols)` turns each recorded request back into
the guest step that makes it (a read, write or fetch at its address, a CR or MSR write from its old
value to its new one, a cpuid of its leaf, an int3, a sidt/lidt, a single-step trap ...), runs that step
on a `SimulatedXen` with the same profile, the same compiled plan installed by the same enforcer and
decision engine, and compares, request by request, what the simulator sent (reason, flags, the altp2m
view as a plan view, gfn, offset, access bits, gla, CR index and values, MSR, leaf, descriptor ...) and,
verdict by verdict, how each was answered (rule, verdict, response and response flags). The live side
is Xen's own requests; nothing here decides what they should have been.

A step's event that the simulator makes by itself (an MTF single-step after a response asked for one,
an instruction re-executed) is matched against the next recorded request of its vCPU before a new step
is derived: a request one side sends and the other does not is a difference (`live_only`,
`sim_only`), not a step made up to hide it.

The guest. The simulated guest gets the live one's registers and the frames binding and install read
(the trace's guest reads before `installed`), so binding finds what it found live; its page tables are
the guest's own where they were recorded, and an access's linear address the recorded tables do not
map is mapped, 4 KiB at a time, to the frame its request names. A guest with paging off (the lab's
tiny guest) gets an identity map of its memory in frames above it, and an IDT the recording never
read gets gates to the code segment it runs in (an exception's delivery reads the descriptor they
name). What a write stored is not in its request: the step stores what the recording read from that
frame after the batch (a page table the guest wrote), else what is there.

A request live Xen sent twice running is counted (`repeats`): a loop, or an answer whose effect did
not happen live. What differs after one, until the vCPU is past that instruction, is counted under
`repeat_episode.*`. Differences the simulator does not model are the kinds in `DOCUMENTED`, each
explained in docs/XEN-SEMANTICS.md §10; `LiveReplay.ok` allows those and no others.

`replay_live_files(TRACE, LOG, POLICY)` does it from files (the lab's dom0 check), `trace_excerpt` cuts a
small sample of a recording (tests/data), `load_sample` reads one back.
"""

from __future__ import annotations

import datetime as _dt
import json
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ...native.constants import (CR_INDEX, DESC_INDEX, ET_HW_EXC, ET_PRI_SW_EXC, F_ALTP2M, MA_GLA_VALID,
                                 MA_IN_GPT, MA_W, MA_X, RS_CPUID, RS_DEBUG_EXCEPTION,
                                 RS_DESCRIPTOR_ACCESS, RS_GUEST_REQUEST, RS_MEM_ACCESS, RS_MOV_TO_MSR,
                                 RS_SINGLESTEP, RS_SOFTWARE_BREAKPOINT, RS_WRITE_CTRLREG)
from ..guest_memory import FRAME_SHIFT, FRAME_SIZE
from ..paging import PAGE_2M, PAGE_4K, PageTables, PagingError
from ..trace import Trace, read_trace
from ..vm_event_layout import HDR, REGS_X86, U_CPUID, U_CR, U_DEBUG, U_DESC, U_MEM, U_MSR, X86_NAMES, flag_names
from .guest import CR0, Guest
from .xen import Op, SimulatedXen
from .xen_profiles import DESC_OPS

__all__ = ["LiveReplay", "Difference", "DOCUMENTED", "replay_live", "replay_live_files", "trace_excerpt", "load_sample",
           "request_fields", "SAMPLE_FORMAT"]

SAMPLE_FORMAT = "policyc-live-sample/1"
OFF_U, OFF_DATA = 24, 56
_CR_NAME = {index: name for name, index in CR_INDEX.items()}
_DESC_NAME = {index: name for name, index in DESC_INDEX.items()}
_LDT_TR = (DESC_INDEX["ldtr"], DESC_INDEX["tr"])
_U_SS = struct.Struct("<Q")
# The simulator's table of the descriptor-table instructions, both ways the replay reads it:
# (descriptor, a write) -> the instruction, and (an LDTR/TR access, VMX's identity bits 29:28) -> it
_DESC_STEP = {(_DESC_NAME[desc], load): kind for kind, (desc, load, _identity) in DESC_OPS.items()}
_DESC_BY_IDENTITY = {(desc in _LDT_TR, identity): kind for kind, (desc, _load, identity) in DESC_OPS.items()}
_RIP = X86_NAMES.index("rip")
_REASONS = {RS_MEM_ACCESS: "mem_access", RS_WRITE_CTRLREG: "write_ctrlreg", RS_MOV_TO_MSR: "mov_to_msr",
            RS_SOFTWARE_BREAKPOINT: "software_breakpoint", RS_SINGLESTEP: "singlestep",
            RS_GUEST_REQUEST: "guest_request", RS_DEBUG_EXCEPTION: "debug_exception", RS_CPUID: "cpuid",
            RS_DESCRIPTOR_ACCESS: "descriptor_access"}
# Memory below the frames a replay's own page tables take (a guest with paging off).
_MIN_FRAMES = 4096
_TABLE_FRAMES = 512
# A difference kind keeps this many examples (the first ones).
EXAMPLES_PER_KIND = 1
# Differences between live Xen and the simulator that are understood and documented, each kind with
# where (docs/XEN-SEMANTICS.md): a replay with only these passes; any other kind fails it.
DOCUMENTED: dict[str, str] = {
    # The operand's encoding (VMX's instruction information beyond the instruction's identity, and the
    # exit qualification: the operand's displacement) is not modelled; `instruction` is compared.
    "descriptor_access.instr_info": "docs/XEN-SEMANTICS.md §10.2",
    "descriptor_access.exit_qualification": "docs/XEN-SEMANTICS.md §10.2",
    # A re-injected int3 whose #BP live Xen never delivered (the guest ran the int3 again at once, in
    # the first round after install): the simulator delivered it, and is one step ahead until the
    # vCPU is past the int3.
    "repeat_episode.sim_only": "docs/XEN-SEMANTICS.md §10.3",
    # The recording stops at teardown: what the simulator raised for the last step(s) after it.
    "sim_only_after_end": "docs/XEN-SEMANTICS.md §10",
    "repeat_episode.software_breakpoint.view": "docs/XEN-SEMANTICS.md §10.3",
}


# --------------------------------------------------------------------------- results

@dataclass
class Difference:
    """One way the simulator's request or verdict differed from the live one."""

    kind: str                            # e.g. "mem_access.gfn", "verdict.response_flags", "live_only"
    index: int                           # the live request's position in the trace
    live: Any
    sim: Any

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "request": self.index, "live": self.live, "sim": self.sim}


@dataclass
class LiveReplay:
    """The comparison of one live recording with the simulator."""

    requests: int = 0                     # live requests compared
    matched: int = 0                      # with no difference, request and verdict alike
    differences: list[Difference] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)
    steps: Counter = field(default_factory=Counter)       # the guest steps derived, by op
    notes: list[str] = field(default_factory=list)
    plan_hash_matches: bool | None = None
    repeats: int = 0                      # a request the same as the one before it on its vCPU, completed
    repeat_example: dict[str, Any] | None = None

    @property
    def exact(self) -> bool:
        """Every request and verdict the same."""
        return self.requests > 0 and not self.differences

    @property
    def ok(self) -> bool:
        """The same but for documented differences (`DOCUMENTED`)."""
        return self.requests > 0 and all(d.kind in DOCUMENTED for d in self.differences)

    def summary(self) -> dict[str, Any]:
        """Matched and different counts, the differences grouped by kind with the first example of each."""
        kinds: dict[str, dict[str, Any]] = {}
        for d in self.differences:
            k = kinds.setdefault(d.kind, {"count": 0, "examples": []})
            k["count"] += 1
            if len(k["examples"]) < EXAMPLES_PER_KIND:
                k["examples"].append(d.as_dict())
        different = len({d.index for d in self.differences})
        for kind, k in kinds.items():
            k["documented"] = DOCUMENTED.get(kind)
        return {"ok": self.ok, "exact": self.exact, "requests": self.requests, "matched": self.matched, "different": different,
                "differences": dict(sorted(kinds.items())), "by_reason": dict(sorted(self.by_reason.items())),
                "steps": dict(sorted(self.steps.items())), "notes": self.notes[:20],
                "repeats": {"count": self.repeats, "example": self.repeat_example},
                "plan_hash_matches": self.plan_hash_matches}


# --------------------------------------------------------------------------- requests

def request_fields(raw: bytes, view_of: Mapping[int, int] | None = None) -> dict[str, Any]:
    """What the comparison looks at in one request: header, the reason's `u` fields and rip. `view_of`
    maps the backend's altp2m view ids to plan view ids (the two runs hand out their own)."""
    _version, flags, reason, vcpu, idx = HDR.unpack_from(raw, 0)
    out: dict[str, Any] = {"reason": _REASONS.get(reason, str(reason)), "vcpu": vcpu,
                           "flags": "|".join(flag_names(flags))}
    if flags & F_ALTP2M:
        out["view"] = (view_of or {}).get(idx, f"backend {idx}")
    u = raw[OFF_U:OFF_DATA]
    if reason == RS_MEM_ACCESS:
        gfn, offset, gla, mflags = U_MEM.unpack_from(u)
        out.update(gfn=gfn, offset=offset, access=mflags)
        if mflags & MA_GLA_VALID:
            out["gla"] = gla
    elif reason == RS_WRITE_CTRLREG:
        index, new, old = U_CR.unpack_from(u)
        out.update(index=index, new=new, old=old)
    elif reason == RS_MOV_TO_MSR:
        msr, new, old = U_MSR.unpack_from(u)
        out.update(msr=msr, new=new, old=old)
    elif reason in (RS_SOFTWARE_BREAKPOINT, RS_DEBUG_EXCEPTION):
        gfn, pending, length, etype = U_DEBUG.unpack_from(u)
        out.update(gfn=gfn, pending_dbg=pending, insn_length=length, type=etype)
    elif reason == RS_SINGLESTEP:
        out["gfn"] = _U_SS.unpack_from(u)[0]
    elif reason == RS_CPUID:
        length, leaf, subleaf = U_CPUID.unpack_from(u)
        out.update(insn_length=length, leaf=leaf, subleaf=subleaf)
    elif reason == RS_DESCRIPTOR_ACCESS:
        info, qual, desc, is_write = U_DESC.unpack_from(u)
        out.update(descriptor=_DESC_NAME.get(desc, desc), is_write=is_write, instr_info=info,
                   exit_qualification=qual)
        # VMX's VM-exit instruction information: bits 29:28 say which instruction
        out["instruction"] = _DESC_BY_IDENTITY[(desc in _LDT_TR, (info >> 28) & 3)]
    out["rip"] = REGS_X86.unpack_from(raw, OFF_DATA)[_RIP]
    return out


def _registers(raw: bytes) -> dict[str, int]:
    return dict(zip(X86_NAMES[:33], REGS_X86.unpack_from(raw, OFF_DATA)[:33]))


# --------------------------------------------------------------------------- the replay

def replay_live(trace: Trace, decisions: list[Mapping[str, Any]], plan: Mapping[str, Any], symbols: Any,
                *, limit: int | None = None) -> LiveReplay:
    """Replay `trace` (with its decision records, one per request in order) on the simulator under
    `plan`; at most `limit` requests. See the module docstring."""
    return _Replayer(trace, decisions, plan, symbols).run(limit)


def replay_live_files(trace_path: str, log_path: str, policy: str, *, target: str | None = None,
                      limit: int | None = None) -> dict[str, Any]:
    """`replay_live` from a trace file, its decision log and the policy (or compiled plan) the run
    enforced, compiled for `target` as `policyc run --target` does; returns the summary."""
    from ...plan_source import load_plan_source

    trace = read_trace(trace_path)
    compiled = load_plan_source(policy, target)
    result = replay_live(trace, read_decisions(log_path), compiled.plan, compiled.symbols, limit=limit)
    return result.summary()


def read_decisions(path: str) -> list[dict[str, Any]]:
    """A decision log's decision records, in order (other records, such as reloads, left out)."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue          # a torn last line
            if isinstance(rec, dict) and "decision_id" in rec:
                out.append(rec)
    return out


class _Replayer:
    def __init__(self, trace: Trace, decisions: list[Mapping[str, Any]], plan: Mapping[str, Any],
                 symbols: Any) -> None:
        self.trace, self.decisions, self.plan, self.symbols = trace, decisions, plan, symbols
        self.result = LiveReplay()
        self.now = [0.0]                  # the engine's clock: the live record's time (rate limits)
        self.produced: list[tuple[bytes, bytes, Any]] = []
        self.pending: dict[int, deque] = {}
        self.live_view: dict[int, int] = {}
        self.last: dict[int, dict[str, Any] | None] = {}   # per vCPU: the last request a step completed
        # per vCPU: the rip of a request live sent twice running, until a request elsewhere agrees
        self.episode: dict[int | None, int | None] = {}
        self.prev_live: dict[int, dict[str, Any]] = {}
        self.live_vcpus: list[int] = []
        self.read_after: dict[int, bytes] = {}    # frames the recording read after the current batch
        self.restore_cr3 = False                  # a paging-off guest's CR3 write step ran: back to our tables
        self.sim_view: dict[int, int] = {}

    # -- set-up
    def run(self, limit: int | None) -> LiveReplay:
        from ..enforce import Enforcer

        live = [r for rec in self.trace.records if rec.kind == "requests" for r in rec.data]
        if limit is not None:
            live = live[:limit]
        if not str((self.plan.get("target") or {}).get("arch", "x86_64")).startswith("x86_64"):
            raise ValueError("replay_live replays x86 recordings (the trace's requests are decoded as x86)")
        self.result.plan_hash_matches = self.plan.get("content_hash") == self.trace.header.get("plan_hash")
        self.live_vcpus = [HDR.unpack_from(r, 0)[3] for r in live]
        if len(self.decisions) < len(live):
            self.result.notes.append(f"{len(self.decisions)} decision records for {len(live)} requests: "
                                     "verdicts compared where a record exists")
        self.xen, self.builder = self._build()
        self.enforcer = Enforcer(self.plan, self.xen, self.symbols, guest="live-replay", native=False,
                                 observer=self._observe, clock=lambda: self.now[0])
        self.enforcer.start()
        try:
            self.sim_view = {b: p for p, b in self.enforcer.installation.view_map.items()}
            self.live_view = {b: p for p, b in self._recorded_view_map().items()}
            i = 0
            installed = False
            records = self.trace.records
            for j, rec in enumerate(records):
                if rec.kind == "installed":
                    installed = True
                elif rec.kind == "guest_read" and installed:
                    self.builder.load(rec.data[0])       # what the guest wrote since (its page tables)
                elif rec.kind == "requests":
                    self.read_after = _frames_read_after(records, j)
                    for raw in rec.data:
                        if i < len(live):
                            self._one(i, raw)
                        i += 1
            for vcpu, q in self.pending.items():
                for req, _rsp, _d in q:
                    # raised by the last steps after the recording ended (the live enforcer tore down)
                    self._differ("sim_only_after_end", -1, None, request_fields(req, self.sim_view))
        finally:
            errors = self.enforcer.stop()
        if errors:
            self.result.notes.append(f"simulator teardown: {'; '.join(errors)[:300]}")
        return self.result

    def _recorded_view_map(self) -> dict[int, int]:
        for rec in self.trace.records:
            if rec.kind == "installed":
                return dict(rec.data)
        return {0: 0}

    def _build(self) -> tuple[SimulatedXen, "_GuestBuilder"]:
        profile = str((self.plan.get("target") or {}).get("arch") or self.trace.capabilities.arch)
        builder = _GuestBuilder(self.trace)
        return SimulatedXen(builder.guest, profile, name="live-replay"), builder

    def _observe(self, pairs: Any, requests: Any) -> None:
        for raw, (rsp, d) in zip(requests, pairs):
            self.produced.append((bytes(raw), bytes(rsp), d))

    # -- one live request
    def _one(self, i: int, raw: bytes) -> None:
        res = self.result
        res.requests += 1
        before = len(res.differences)
        live = request_fields(raw, self.live_view)
        res.by_reason[live["reason"]] += 1
        record = self.decisions[i] if i < len(self.decisions) else None
        self.now[0] = _epoch(record.get("time")) if record else self.now[0]
        vcpu = live["vcpu"]
        q = self.pending.setdefault(vcpu, deque())
        if self.prev_live.get(vcpu) == live:
            # The same request twice running: the guest ran the instruction again, here or in a
            # loop. Where the simulator does not (what an answer asked for did not happen live, doc
            # §10.3), what differs until the vCPU is past that instruction is counted apart.
            self.episode[vcpu] = live["rip"]
        self.prev_live[vcpu] = live
        # Events the simulator made by itself come first; one of another reason is the simulator's alone.
        while q and request_fields(q[0][0], self.sim_view)["reason"] != live["reason"]:
            req, _rsp, _d = q.popleft()
            self._differ("sim_only", i, None, request_fields(req, self.sim_view))
        if not q:
            if self.last.get(vcpu) == live:
                # The simulator's answer to this very request completed the instruction, and live Xen
                # sent it again at once: the guest ran it again (a loop), or what the answer asked for
                # did not happen live (a re-injection lost, doc §10.3). Not a difference by itself (the
                # step is made again); counted, and what differs until the two agree again is counted
                # apart (`repeat_episode.*`): the simulator cannot follow a live run that lost an answer.
                res.repeats += 1
                res.repeat_example = res.repeat_example or {"request": i, **_jsonable(live)}
            step = self._step(raw, live)
            if step is None:
                self._differ("live_only", i, live, None)
                return
            self._run_step(vcpu, step)
            self.last[vcpu] = live if step.done and not step.livelock else None
            for req, rsp, d in self.produced:
                self.pending.setdefault(HDR.unpack_from(req, 0)[3], deque()).append((req, rsp, d))
            self.produced = []
        else:
            self.last[vcpu] = None
        if not q:
            self._differ("no_request", i, live, f"the simulator's {step.kind} made no request")
            return
        req, rsp, d = q.popleft()
        self._compare(i, live, request_fields(req, self.sim_view))
        self._compare_verdict(i, record, rsp, d)
        if len(res.differences) == before:
            res.matched += 1
            if self.episode.get(vcpu) not in (None, live["rip"]):
                self.episode[vcpu] = None

    def _run_step(self, vcpu: int, op: Op) -> None:
        """Execute the step and answer what it raises, as the scenario runner drives a step."""
        xen, enforcer = self.xen, self.enforcer
        xen.execute(vcpu, op)
        for _ in range(64):
            pending = xen.unconsumed_requests()
            if not pending or (op.done and not xen.is_paused(vcpu)):
                break
            before = (xen.responses_consumed, pending)
            enforcer.service()
            if (xen.responses_consumed, xen.unconsumed_requests()) == before:
                break
        if self.restore_cr3:
            self.restore_cr3 = False
            xen.vcpu(vcpu).cr3 = self.builder.tables.cr3
        if xen.domain_pauses:
            # the policy's `pause` paused the domain; live, the lab check unpaused it (`xl unpause`)
            while xen.domain_pauses:
                xen.unpause()
            self.result.notes.append(f"the policy paused the domain at a {op.kind} step; unpaused, as live")
            del self.result.notes[20:]
        if not op.done:
            self.result.notes.append(f"a {op.kind} step at {op.rip:#x} did not finish" if op.rip is not None
                                     else f"a {op.kind} step did not finish")
            del self.result.notes[20:]

    # -- the step a request comes from
    def _step(self, raw: bytes, live: dict[str, Any]) -> Op | None:
        reason, vcpu, rip = live["reason"], live["vcpu"], live["rip"]
        v = self.xen.vcpu(vcpu)
        regs = _registers(raw)
        for name in X86_NAMES[:17]:          # the general registers and rflags (a rule's `where rsi == 2`)
            v.set(name, regs[name])
        op: Op | None = None
        if reason == "mem_access":
            op = self._memory_step(vcpu, live)
        elif reason == "write_ctrlreg":
            name = _CR_NAME.get(live["index"])
            if name is not None:
                setattr(v, name, live["old"])
                op = Op("write_cr", vcpu, reg=name, value=live["new"], rip=rip)
                if name == "cr3" and self.builder.paging_off:
                    self.restore_cr3 = True     # the replay's own tables translate; the guest's CR3 does not
        elif reason == "mov_to_msr":
            v.msrs[live["msr"]] = live["old"]
            op = Op("wrmsr", vcpu, msr=live["msr"], value=live["new"], rip=rip)
        elif reason == "cpuid":
            op = Op("cpuid", vcpu, leaf=live["leaf"], subleaf=live["subleaf"], rip=rip,
                    insn_len=live["insn_length"])
        elif reason == "software_breakpoint":
            planted = self._planted(live["gfn"], rip)
            op = Op("exec", vcpu, va=rip, rip=rip) if planted else Op("int3", vcpu, rip=rip,
                                                                      insn_len=live["insn_length"] or 1)
            self.builder.map(rip, live["gfn"])          # the event names the frame of rip
        elif reason == "debug_exception":
            self.builder.map(rip, live["gfn"])
            kind = "icebp" if live["type"] == ET_PRI_SW_EXC else "trap_flag" if live["type"] == ET_HW_EXC else None
            op = Op(kind, vcpu, rip=rip) if kind else None
        elif reason == "descriptor_access":
            kind = _DESC_STEP.get((live["descriptor"], bool(live["is_write"])))
            if kind is not None:          # what a load loads is not in the request: what is there
                base, limit = {"lidt": (v.idtr_base, v.idtr_limit), "lgdt": (v.gdtr_base, v.gdtr_limit),
                               "lldt": (v.ldtr, 0), "ltr": (v.tr, 0)}.get(kind, (0, 0))
                op = Op(kind, vcpu, rip=rip, base=base, limit=limit)
        elif reason == "guest_request":
            op = Op("guest_request", vcpu, rip=rip)
        if op is not None:
            self.result.steps[op.kind] += 1
        return op

    def _memory_step(self, vcpu: int, live: dict[str, Any]) -> Op | None:
        access, gfn, offset = live["access"], live["gfn"], live["offset"]
        if access & MA_IN_GPT:
            return None              # a fault in the guest's own page walk: its tables are not the replay's
        va = live.get("gla")
        if va is None:
            if not self.builder.paging_off:
                return None          # no linear address, and the guest's does not equal the physical one
            va = (gfn << FRAME_SHIFT) | offset
        if not self.builder.map(va, gfn):
            return None
        size = min(4 if self.builder.paging_off else 8, FRAME_SIZE - (va & (FRAME_SIZE - 1)))
        if access & MA_X:
            return Op("exec", vcpu, va=va, rip=va)
        if not access & MA_W:
            return Op("read", vcpu, va=va, size=size, rip=live["rip"])
        # VMX reports a write as W|R (XEN-SEMANTICS §3): W is a write whatever R says. What the guest
        # stored is not in the request: where the recording read the frame again after this batch (a
        # rebind's walk of a page table the guest wrote), the step stores that; else what is there.
        later = self.read_after.get(gfn)
        # the other frames read then were filled before this store (the new tables of a split page)
        self.builder.load({g: d for g, d in self.read_after.items() if g != gfn})
        if later is not None and offset + size <= FRAME_SIZE:
            value = int.from_bytes(later[offset:offset + size], "little")
        else:
            try:
                value = int.from_bytes(self.xen.read_guest(vcpu, va, size, view=0), "little")
            except Exception:  # noqa: BLE001 - an address the replay cannot read: store zeros
                value = 0
        return Op("write", vcpu, va=va, size=size, value=value, rip=live["rip"])

    def _planted(self, gfn: int, rip: int) -> bool:
        """Whether the enforcer planted a breakpoint at this frame and offset (else the int3 is the guest's)."""
        bound = self.enforcer.bound
        return bound is not None and any(bp.gfn == gfn and bp.offset == rip & (FRAME_SIZE - 1)
                                         for bp in bound.breakpoints)

    # -- comparing
    def _compare(self, i: int, live: dict[str, Any], sim: dict[str, Any]) -> None:
        if live["reason"] != sim["reason"]:
            self._differ("reason", i, live, sim)
            return
        for key in sorted(set(live) | set(sim)):
            if key in ("rip",):
                continue
            if live.get(key) != sim.get(key):
                self._differ(f"{live['reason']}.{key}", i, _show(live, key), _show(sim, key))

    def _compare_verdict(self, i: int, record: Mapping[str, Any] | None, rsp: bytes, d: Any) -> None:
        if record is None:
            return
        sim_flags = flag_names(HDR.unpack_from(rsp, 0)[1])
        pairs = (("rule", record.get("rule"), d.rule), ("verdict", record.get("verdict"), d.verdict),
                 ("response", record.get("response"), d.response),
                 ("response_flags", list(record.get("response_flags") or []), sim_flags))
        for name, live, sim in pairs:
            if live != sim:
                self._differ(f"verdict.{name}", i, live, sim)

    def _differ(self, kind: str, i: int, live: Any, sim: Any) -> None:
        vcpu = (live or sim or {}).get("vcpu") if isinstance(live or sim, dict) else None
        if vcpu is None and 0 <= i < len(self.live_vcpus):
            vcpu = self.live_vcpus[i]
        if self.episode.get(vcpu) is not None:
            kind = "repeat_episode." + kind
        self.result.differences.append(Difference(kind, i, _jsonable(live), _jsonable(sim)))


def _frames_read_after(records: list[Any], j: int) -> dict[int, bytes]:
    """The frames the recording read between batch `j` and the next one: what its writes stored. A batch of
    single-step events alone does not end it: a stepped page-table write is followed (re-walked) at its
    single-step event (runtime/pt_step.py), so its frames are read after that batch."""
    out: dict[int, bytes] = {}
    for rec in records[j + 1:]:
        if rec.kind == "requests":
            if rec.data and all(HDR.unpack_from(r, 0)[2] == RS_SINGLESTEP for r in rec.data):
                continue
            break
        if rec.kind == "guest_read":
            out.update(rec.data[0])
    return out


def _show(fields: dict[str, Any], key: str) -> Any:
    """A field with what identifies its request (for a difference's example)."""
    return {"value": fields.get(key), "reason": fields["reason"], "rip": fields["rip"],
            **({"gfn": fields["gfn"]} if "gfn" in fields and key != "gfn" else {})}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (hex(v) if isinstance(v, int) and k in ("gfn", "gla", "rip", "new", "old", "msr", "offset",
                                                               "exit_qualification", "instr_info", "value")
                    else _jsonable(v)) for k, v in value.items()}
    return value


def _epoch(iso: Any) -> float:
    try:
        return _dt.datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


# --------------------------------------------------------------------------- the guest

class _GuestBuilder:
    """The simulated guest for a recording: registers and frames as binding read them live."""

    def __init__(self, trace: Trace) -> None:
        caps = trace.capabilities
        frames: dict[int, bytes] = {}
        regs: dict[int, dict[str, int]] = {}
        gfns = [0]
        for rec in trace.records:
            if rec.kind == "installed":
                break
            if rec.kind == "guest_read":
                frames.update(rec.data[0])
                for v, r in rec.data[1].items():
                    regs.setdefault(v, dict(r))
        for rec in trace.records:
            if rec.kind == "requests":
                gfns.extend(_gfn_of(r) for r in rec.data)
        top = max(max(gfns, default=0), max(frames, default=0)) + 1
        ram = max(_MIN_FRAMES, (top + 511) & ~511)
        # The replay's own page tables live in frames above RAM, which the guest never touches.
        guest = Guest((ram + _TABLE_FRAMES) << FRAME_SHIFT, caps.vcpus, alloc_range=(ram, ram + _TABLE_FRAMES))
        guest.holes = [(ram, ram + _TABLE_FRAMES)]
        guest.layout = "live-replay"
        for gfn, data in frames.items():
            if gfn < ram:
                guest.memory.write(gfn << FRAME_SHIFT, data)
        self.guest = guest
        first = regs.get(0, {})
        self.paging_off = not first.get("cr0", CR0.PG) & CR0.PG
        self.tables = PageTables(guest.memory) if self.paging_off else \
            PageTables(guest.memory, first.get("cr3", 0) & 0x000FFFFFFFFFF000)
        if self.paging_off:
            # its linear addresses are its physical ones: an identity map of its memory
            self.tables.map(0, 0, ram << FRAME_SHIFT, PAGE_2M, writable=True, executable=True)
            _fill_idt(guest, first, frames)
        for vcpu in guest.vcpus:
            for name, value in regs.get(vcpu.index, first).items():
                try:
                    vcpu.set(name, value)
                except KeyError:
                    pass
            if self.paging_off:
                vcpu.cr3 = self.tables.cr3
        self._mapped: dict[int, int] = {}

    def load(self, frames: Mapping[int, bytes]) -> None:
        """Frames the recording read again (a rebind's page walk): the guest's memory as it is now."""
        for gfn, data in frames.items():
            if gfn < self.guest.ram_frames - _TABLE_FRAMES:
                self.guest.memory.write(gfn << FRAME_SHIFT, data)
        self._mapped.clear()

    def map(self, va: int, gfn: int) -> bool:
        """Make `va`'s page translate to `gfn` (False when the guest's own tables map it elsewhere)."""
        page = va & ~(FRAME_SIZE - 1)
        known = self._mapped.get(page)
        if known is not None:
            return known == gfn
        t = self.tables.try_translate(page)
        if t is None:
            try:
                self.tables.map(page, gfn << FRAME_SHIFT, PAGE_4K, PAGE_4K, writable=True, executable=True)
            except PagingError:
                return False
        elif t.pa >> FRAME_SHIFT != gfn:
            return False
        self._mapped[page] = gfn
        return True


def _fill_idt(guest: Guest, regs: Mapping[str, int], recorded: Mapping[int, bytes]) -> None:
    """A paging-off guest's IDT the recording never read: gates to the code segment it runs in, so that
    an exception's delivery reads the descriptor the guest's own gates name (the simulator checks
    those reads against the views)."""
    base, limit, cs = regs.get("idtr_base"), regs.get("idtr_limit", 0), regs.get("cs_sel", 0)
    if base is None or not cs:
        return
    for vector in range((limit + 1) // 8):
        gate = base + 8 * vector
        if gate >> FRAME_SHIFT not in recorded and (gate + 7) >> FRAME_SHIFT < guest.ram_frames:
            guest.memory.write(gate + 2, cs.to_bytes(2, "little"))


def _gfn_of(raw: bytes) -> int:
    reason = HDR.unpack_from(raw, 0)[2]
    if reason in (RS_MEM_ACCESS, RS_SOFTWARE_BREAKPOINT, RS_DEBUG_EXCEPTION, RS_SINGLESTEP):
        gfn = _U_SS.unpack_from(raw, OFF_U)[0]
        return gfn if gfn < 1 << 40 else 0
    return 0


# --------------------------------------------------------------------------- samples

def trace_excerpt(trace_path: str, log_path: str, max_requests: int) -> dict[str, Any]:
    """The first `max_requests` requests of a recording (whole batches) with everything before them
    (header, guest reads, install) and their decision records: a sample small enough to keep."""
    lines: list[Any] = []
    n = 0
    with open(trace_path) as f:
        for line in f:
            rec = json.loads(line)
            if "requests" in rec:
                if n >= max_requests:
                    break
                n += len(rec["requests"])
            lines.append(rec)
    return {"format": SAMPLE_FORMAT, "trace": lines, "decisions": read_decisions(log_path)[:n], "requests": n}


def load_sample(path: str | Path, workdir: str | Path) -> tuple[Trace, list[dict[str, Any]]]:
    """A sample (`trace_excerpt`'s JSON) as a trace (written under `workdir`) and its decision records."""
    sample = json.loads(Path(path).read_text())
    if sample.get("format") != SAMPLE_FORMAT:
        raise ValueError(f"{path}: not a {SAMPLE_FORMAT} sample")
    out = Path(workdir) / (Path(path).stem + ".trace.jsonl")
    out.write_text("".join(json.dumps(rec, separators=(",", ":")) + "\n" for rec in sample["trace"]))
    return read_trace(out), list(sample["decisions"])
