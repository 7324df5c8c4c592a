"""Replay: re-decide a recorded request stream (runtime/trace.py) with a policy.

`replay(trace, plan, symbols)` binds the plan to the recorded guest (the
slide, regions and breakpoints found from what the recording read), builds
the decision engine with the recording's view ids, and feeds it every
recorded batch in order, following the recorded rebinds. Nothing is
answered: the result is the decisions, and the decision log when one is given.

`compare(base, new)` pairs two replays of the same trace request by request
and lists the decisions whose verdict or deciding rule differ: a policy
change's effect on real traffic, before it is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .backend import BackendError
from .bind import BindError, BoundPlan, bind_plan
from .decide import Decision, DecisionEngine
from .decision_log import DecisionLog
from .guest_memory import GuestMemoryError
from ..targets import runs_on
from .install import remap_view_ids
from .trace import RecordedGuest, Trace
from ..errors import PolicycError

__all__ = ["ReplayResult", "ReplayError", "Change", "replay", "compare"]


class ReplayError(PolicycError):
    """The plan cannot be replayed on this trace (binding failed, or the trace is for another arch)."""


@dataclass
class ReplayResult:
    decisions: list[Decision] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    rebinds: int = 0
    notes: list[str] = field(default_factory=list)


def replay(trace: Trace, plan: Mapping[str, Any], symbols: Any, *, log: DecisionLog | None = None,
           keep: bool = True) -> ReplayResult:
    caps = trace.capabilities
    arch = (plan.get("target") or {}).get("arch")
    if not runs_on(str(arch), caps.arch):
        raise ReplayError(f"the plan is for {arch} but the trace was recorded on a {caps.arch} host "
                          f"(compile with --target {caps.arch})")
    guest = RecordedGuest(caps)
    out = ReplayResult()
    bound: BoundPlan | None = None
    engine: DecisionEngine | None = None
    view_map: dict[int, int] = {}
    for rec in trace.records:
        if rec.kind == "guest_read":
            frames, regs = rec.data
            guest.update(frames, regs)
        elif rec.kind == "installed":
            view_map = dict(rec.data)
        elif rec.kind == "requests":
            if engine is None:
                bound, engine = _bind(plan, guest, symbols, view_map, trace)
            pairs = engine.decide_batch(rec.data)
            if log is not None:
                log.write_batch(pairs)
            if keep:
                out.decisions.extend(d for _r, d in pairs)
                out.requests.extend(rec.data)
        elif rec.kind == "rebind" and bound is not None and engine is not None:
            try:
                if bound.rebind(guest):
                    engine.refresh_binding()
                    out.rebinds += 1
            except Exception as exc:  # noqa: BLE001 - a rebind the recording cannot serve is reported
                out.notes.append(f"line {rec.line}: rebind not replayed: {exc}")
    return out


def _bind(plan: Mapping[str, Any], guest: RecordedGuest, symbols: Any, view_map: Mapping[int, int],
          trace: Trace) -> tuple[BoundPlan, DecisionEngine]:
    try:
        bound = bind_plan(plan, guest, symbols)
    except BindError as exc:
        raise ReplayError(f"cannot bind the plan to the guest recorded in {trace.path}: {exc}") from None
    except (GuestMemoryError, BackendError) as exc:
        # The recording holds what its own plan's binding read (and the kernel image's page
        # tables); another policy may need guest memory or registers it never read.
        recorded = (trace.header.get("policy") or {}).get("name") or "its policy"
        raise ReplayError(f"{trace.path} lacks what binding policy '{(plan.get('policy') or {}).get('name')}' "
                          f"needs: {exc}. The trace was recorded under '{recorded}' and holds only what that "
                          "binding read; record the guest under this policy (policyc run POLICY --record TRACE) "
                          "to replay it") from None
    # Plan views the recording had keep its backend ids (the requests carry those); a view the
    # recorded plan did not have gets the next free id, as install would have handed out.
    ids = dict(view_map)
    used = set(ids.values())
    nxt = max(used, default=0) + 1
    for v in sorted(bound.views):
        if v not in ids:
            while nxt in used:
                nxt += 1
            ids[v] = nxt
            used.add(nxt)
    return bound, DecisionEngine(remap_view_ids(bound.plan, ids), bound)


@dataclass
class Change:
    index: int
    base: Decision
    new: Decision

    def describe(self) -> str:
        def one(d: Decision) -> str:
            return f"{d.verdict}{' (would deny)' if d.would_deny else ''} by {d.rule or 'no rule'}"
        ev = self.new.summary()
        where = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and k != "vcpu" else f"{k}={v}"
                          for k, v in ev.items() if k in ("vcpu", "rip", "pc", "gla", "gfn", "msr", "new", "register"))
        return f"request {self.index} {self.new.kind} [{where}]: {one(self.base)} -> {one(self.new)}"


def compare(base: ReplayResult, new: ReplayResult) -> list[Change]:
    out = []
    for i, (a, b) in enumerate(zip(base.decisions, new.decisions)):
        if (a.verdict, a.would_deny, a.rule) != (b.verdict, b.would_deny, b.rule):
            out.append(Change(i, a, b))
    return out
