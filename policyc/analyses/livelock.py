"""(c) Livelock: can every trapped access complete under the plan's responses?

Xen re-executes the faulting instruction unless the response relaxes the
access, emulates it, steps it in another view, skips it or injects an
exception (XEN-FACTS.md). This pass builds a state graph (networkx DiGraph)
from the plan alone (views, responses, breakpoints, dispatch):

    ("run", v)                  a vCPU running in resident view v (host, restricted)
    ("mem", v, region, a)       access a on a page of `region`, trapped in view v
    ("bp", v, site)             the int3 of breakpoint `site` planted in view v
    ("event", kind, key)        a monitor event (CR, MSR, descriptor, CPUID, ...)
    ("answer", state, verdict)  the response the enforcer gives for `verdict` there
    ("done",)                   the access completed (or an exception was delivered)

Edges: run -> every fault of its view; fault -> one answer per verdict that
can happen there (allow always: collateral accesses and unmatched conditions
are allowed; deny:<access> when a deny rule covers it, enforce mode only);
answer -> what the response leads to:

  - an exception injected or re-injected, EMULATE (with or without NOWRITE or
    read data), the instruction pointer advanced, the breakpoint restored, the
    page relaxed for this access, a CR/MSR write refused with DENY, or a
    monitor event Xen completes itself (CR, MSR, guest request): done (CPUID
    is not one: Xen leaves rip alone, so the response must advance it);
  - ALTERNATE_P2M to view t (with FAST_SINGLESTEP or not): the same access is
    re-executed in t, so it faults again on every range of t that traps the
    same access on one of the same pages (and a breakpoint planted in t at
    the same site fires again); if none, done;
  - nothing of the above: the instruction re-executes in the same view and
    faults again.

A livelock is a cycle reachable from a resident view: an access that never
completes. Each is a PC505 error naming the rules, the view and the cycle.
The model follows the faulting access only: an instruction that touches a
second trapped page while it is being stepped is not modelled.
"""

from __future__ import annotations

from typing import Iterable

from .. import model as M
from ..diagnostics import Diagnostics
from ..lowering import geometry as G

__all__ = ["analyse", "build_graph", "StateGraph"]

_LETTER = {"read": "r", "write": "w", "execute": "x"}
_ACCESS_OF = {"r": "read", "w": "write", "x": "execute"}
# Monitor events after which Xen itself completes (or refuses, with DENY) the instruction. CPUID is not one:
# Xen has run it but leaves rip alone, so the response must advance rip (SET_REGISTERS) or it runs again.
_HYPERVISOR_COMPLETES = {"write_ctrlreg", "mov_to_msr", "guest_request"}
_SKIPS = ("advance_ip", "advance_pc")
DONE = ("done",)


def analyse(plan: dict, policy: M.Policy, target, diagnostics: Diagnostics | None, *, report: bool = True) -> dict:
    """The livelocks (PC505 each), with the graph's size when `report` (without, the answers that
    complete the access are not put in the graph: they cannot be on a cycle)."""
    graph, _ = build_graph(plan, policy, target, completing_answers=report)
    # Only answers that do not complete can take part in a cycle: search those alone (a plan of 100,000
    # trapped ranges has 100,000 fault states but next to no such edges).
    pending_edges: dict[tuple, tuple] = {}
    for answer in (n for n in graph if n[0] == "answer"):
        for nxt in graph.successors(answer):
            if nxt != DONE:
                via = pending_edges.get((answer[1], nxt))
                pending_edges[(answer[1], nxt)] = min(filter(None, (via, answer)), key=repr)
    summary = {"states": sum(1 for n in graph if n[0] not in ("answer", "run", "done")),
               "transitions": graph.number_of_edges()} if report else {}
    if not pending_edges:
        return {**summary, "livelocks": []}
    import networkx as nx  # only a plan with answers that do not complete needs the graph algorithms

    pending = nx.DiGraph()
    for (u, v), via in pending_edges.items():
        pending.add_edge(u, v, via=via)
    roots = sorted(n for n in graph if n[0] == "run")
    entries = {s: r for r in reversed(roots) for s in graph.successors(r) if s in pending}
    reachable = set(entries)
    for s in entries:
        reachable |= nx.descendants(pending, s)
    sub = pending.subgraph(reachable)
    found = []
    cyclic = [c for c in nx.strongly_connected_components(sub) if len(c) > 1 or any(sub.has_edge(n, n) for n in c)]
    for component in sorted((sorted(c, key=repr) for c in cyclic), key=repr):
        cycle = [u for u, _v in nx.find_cycle(sub.subgraph(component), source=component[0])]
        fault = cycle[0]
        # How a vCPU gets there from a view it runs in (shortest, first in a fixed order).
        paths = [nx.shortest_path(sub, e, fault) for e in sorted(entries, key=repr) if nx.has_path(sub, e, fault)]
        path = min(paths, key=lambda p: (len(p), repr(p)))
        rules = sorted({r for n in path + cycle for r in graph.nodes[n].get("rules", ())})

        def walk(states: list[tuple]) -> list[str]:
            out = [_label(states[0])]
            for u, v in zip(states, states[1:]):
                out += [_label(sub.edges[u, v]["via"], graph), _label(v)]
            return out

        entry = {"rules": rules, "view": fault[1] if fault[0] in ("mem", "bp") else None,
                 "state": _label(fault), "cycle": walk(cycle + [cycle[0]]),
                 "path": [_label(entries[path[0]])] + walk(path)}
        found.append(entry)
        if diagnostics is not None:
            rule = next((r for r in policy.rules if r.name in rules), None)
            where = f" in view {entry['view']}" if entry["view"] is not None else ""
            diagnostics.error(
                "PC505", rule.span if rule else policy.span,
                f"livelock{where}: {_label(fault)} ({', '.join(rules) or 'no rule'}) never completes: "
                + " -> ".join(entry["path"][:-1] + entry["cycle"]),
                "the response must relax, emulate, skip or step the access in a view that does not trap it")
    return {**summary, "livelocks": found}


class StateGraph:
    """The state graph: nodes with attributes, edges in insertion order (the subset of a networkx
    DiGraph this pass uses; networkx is imported only when there is a cycle to look for)."""

    def __init__(self) -> None:
        self.nodes: dict[tuple, dict] = {}
        self._succ: dict[tuple, dict[tuple, None]] = {}

    def add_node(self, node: tuple, **attrs) -> None:
        self.nodes.setdefault(node, {}).update(attrs)
        self._succ.setdefault(node, {})

    def add_edge(self, u: tuple, v: tuple) -> None:
        self.add_node(u)
        self.add_node(v)
        self._succ[u][v] = None

    def successors(self, node: tuple) -> Iterable[tuple]:
        return iter(self._succ[node])

    def number_of_edges(self) -> int:
        return sum(len(s) for s in self._succ.values())

    def __iter__(self):
        return iter(self.nodes)

    def __contains__(self, node: object) -> bool:
        return node in self.nodes


def build_graph(plan: dict, policy: M.Policy, target, *, completing_answers: bool = True) -> tuple[StateGraph, dict]:
    """The state graph; without `completing_answers`, an answer all of whose ways lead to done is left
    out (with its edges): what is left is every state and every way an access can fail to complete."""
    builder = _GraphBuilder(plan, policy, target, completing_answers)
    for state in builder.add_fault_states():
        builder.answer_fault(state)
    builder.add_monitor_events()
    return builder.graph, {"resident": builder.resident}


class _GraphBuilder:
    """The plan's views, responses and breakpoints, indexed once, and the graph built from them in three
    steps: the fault states (memory and breakpoint, per view), their answers, the monitor events."""

    def __init__(self, plan: dict, policy: M.Policy, target, completing_answers: bool) -> None:
        self.plan, self.policy, self.completing_answers = plan, policy, completing_answers
        self.x86 = (target.name if hasattr(target, "name") else str(target)).startswith("x86_64")
        self.enforce = plan.get("policy", {}).get("mode", policy.mode) == "enforce"
        self.views = {v["id"]: v for v in plan.get("views", [])}
        self.responses = plan.get("responses", {})
        self.denying = {r.name for r in policy.rules if r.verdict == "deny"}
        self.deny_access: dict[str, set[str]] = {}  # rule -> access letters it denies
        for r in policy.rules:
            if r.verdict == "deny" and isinstance(r.trigger, M.MemoryTrigger):
                self.deny_access[r.name] = set({"access": "rwx"}.get(r.trigger.access,
                                                                     _LETTER.get(r.trigger.access, "")))
        self.graph = StateGraph()
        self.graph.add_node(DONE)
        self.trapped: dict[tuple, G.IntervalSet] = {}  # (view, access, space) -> pages some range traps
        self.untrapped = G.IntervalSet()  # only ever asked
        self.indexed: set = set()
        self.bp_views: dict[str, set] = {}
        self.bp_info: dict[str, dict] = {}
        for site in plan.get("breakpoints", []):
            self.bp_info[site["id"]] = site
            # Shadow frames live in views; an inline int3 or SMC is in the guest's own frame, in every view (None).
            vs = site.get("views") or ([site["view"]] if "view" in site else [None])
            self.bp_views[site["id"]] = set(vs)
        self.outcomes: dict[tuple, object] = {}  # (kind, verdict, access) -> _outcome: one response each
        self.labels: dict[tuple[str, str], str] = {}  # (kind, verdict) -> the answer's label: one response each
        self.resident = [v for v in sorted(self.views) if self.views[v].get("role") != "unrestricted"]

    # ------------------------------------------------------------------ the steps

    def add_fault_states(self) -> list[tuple]:
        """Memory faults and breakpoints, per view, each reached from the resident views it is in."""
        g, views, resident = self.graph, self.views, self.resident
        todo: list[tuple] = []
        # Without the completing answers, a fault every answer of which completes has no edge out: it can
        # be on no cycle and on no way to one, so it is not made (a plan of 100,000 trapped ranges has
        # 100,000 such states and, as a rule, not one other).
        skipped = set() if self.completing_answers else {a for a in "rwx" if self.settles("mem_access", a)}
        for vid in sorted(views):
            for rng in views[vid].get("ranges", []):
                for a in sorted(self.traps(rng)):
                    if a in skipped:
                        continue
                    state = ("mem", vid, rng["region"], a)
                    g.add_node(state, rules=list(rng.get("rules", [])))
                    if vid in resident:
                        g.add_edge(("run", vid), state)
                    todo.append(state)
        for site_id, vs in sorted(self.bp_views.items()):
            for vid in sorted(vs, key=repr):
                state = ("bp", vid, site_id)
                g.add_node(state, rules=list(self.bp_info[site_id].get("rules", [])))
                for run in ([vid] if vid is not None else resident or [0]):
                    if run in resident or vid is None:
                        g.add_edge(("run", run), state)
                todo.append(state)
        return todo

    def answer_fault(self, state: tuple) -> None:
        """The answers to one fault state: allow, and deny when a deny rule covers it (enforce mode)."""
        rules = self.graph.nodes[state]["rules"]
        if state[0] == "mem":
            _, _vid, region, a = state
            verdicts = ["allow"]
            if self.enforce and any(a in self.deny_access.get(r, ()) for r in rules):
                verdicts.append(f"deny:{_ACCESS_OF[a]}")
            self.add_answers(state, "mem_access", verdicts, a,
                             lambda t, region=region, a=a: self.mem_faults(t, region, a))
        else:
            _, _vid, site_id = state
            verdicts = ["allow"] + (["deny"] if self.enforce and any(r in self.denying for r in rules) else [])
            self.add_answers(state, "breakpoint", verdicts, "x",
                             lambda t, site_id=site_id, state=state: self.bp_faults(t, site_id)
                             if state[1] is not None else [state])

    def add_monitor_events(self) -> None:
        """Monitor events: any vCPU, whatever its view."""
        g = self.graph
        for kind, table in self.plan.get("dispatch", {}).items():
            if kind in ("mem_access", "software_breakpoint"):
                continue
            keys = sorted(table) if isinstance(table, dict) else ["*"]
            for key in keys:
                entries = table[key] if isinstance(table, dict) else table
                state = ("event", kind, key)
                g.add_node(state, rules=[e["rule"] for e in entries])
                for vid in self.resident or [0]:
                    g.add_edge(("run", vid), state)
                verdicts = ["allow"] + (["deny"] if self.enforce and any(e["verdict"]["verdict"] == "deny"
                                                                         for e in entries) else [])
                self.add_answers(state, kind, verdicts, None, lambda t, state=state: [state])

    # ------------------------------------------------------------------ answers and where they lead

    def settles(self, kind: str, access: str) -> bool:
        """Every answer to a fault of `kind` on `access` completes it, in whatever state: its response
        completes the access, or steps it in a view that traps nothing."""
        for verdict in ("allow", f"deny:{_ACCESS_OF[access]}"):
            response = self.responses.get(kind, {}).get(verdict)
            if not isinstance(response, dict):
                continue
            outcome = self.outcomes.get((kind, verdict, access))
            if outcome is None:
                outcome = self.outcomes[(kind, verdict, access)] = _outcome(kind, response, access)
            if outcome is not _COMPLETES and (outcome is _REPEATS or self.views.get(outcome, {}).get("ranges")):
                return False
        return True

    def add_answers(self, state: tuple, kind: str, verdicts: list[str], access: str | None, again) -> None:
        g = self.graph
        table = self.responses.get(kind, {})
        for verdict in verdicts:
            response = table.get(verdict)
            if not isinstance(response, dict):
                continue
            nexts = self.follow(state, kind, verdict, response, access, again)
            if not self.completing_answers and nexts == [DONE]:
                continue
            label = self.labels.get((kind, verdict))
            if label is None:
                label = self.labels[(kind, verdict)] = _describe(verdict, response)
            answer = ("answer", state, verdict)
            g.add_node(answer, label=label)
            g.add_edge(state, answer)
            for nxt in nexts:
                g.add_edge(answer, nxt)

    def follow(self, state: tuple, kind: str, verdict: str, response: dict, access: str | None,
               again) -> list[tuple]:
        """Where the answer leads. `again(view)` gives the faults of re-executing in a view."""
        outcome = self.outcomes.get((kind, verdict, access))
        if outcome is None:
            outcome = self.outcomes[(kind, verdict, access)] = _outcome(kind, response, access)
        if outcome is _COMPLETES:
            return [DONE]
        if outcome is _REPEATS:
            return [state]
        return again(outcome) or [DONE]

    def mem_faults(self, view_id, region: str, access: str) -> list[tuple]:
        """Faults of the same access on the same pages, in view `view_id`."""
        view = self.views.get(view_id)
        if view is None or not view.get("ranges"):
            return []  # (stepping in the unrestricted view, which traps nothing, is every allow's way)
        mine = self.region_pages(region)
        if not any(self.view_traps(view_id, access, sp).overlaps(lo, hi) for sp, ivs in mine.items() for lo, hi in ivs):
            return []  # the common case, without walking the view's ranges
        out = []
        for rng in view.get("ranges", []):
            if access in self.traps(rng) and G.space_maps_overlap(mine, self.region_pages(rng["region"])):
                out.append(("mem", view_id, rng["region"], access))
        return out

    def bp_faults(self, view_id, site_id: str) -> list[tuple]:
        out = []
        if view_id in self.bp_views.get(site_id, ()):
            out.append(("bp", view_id, site_id))
        # Executing the instruction at the site may also hit an execute trap on its page in that view.
        site = self.bp_info[site_id]
        addr = int(site["address"], 16)
        here = {"va" if site.get("relocatable", True) else "percpu": [(addr // G.PAGE, addr // G.PAGE + 1)]}
        view = self.views.get(view_id)
        for rng in (view or {}).get("ranges", []):
            if "x" in self.traps(rng) and G.space_maps_overlap(here, self.region_pages(rng["region"])):
                out.append(("mem", view_id, rng["region"], "x"))
        return out

    # ------------------------------------------------------------------ pages

    def region_pages(self, name: str) -> G.SpaceMap:
        try:
            return G.named_region_pages(self.policy, name)
        except KeyError:
            return {}

    def traps(self, rng: dict) -> set[str]:
        t = set(rng.get("traps", ""))
        return t | {"w"} if self.x86 and "r" in t else t

    def view_traps(self, view_id, access: str, space: str) -> G.IntervalSet:
        if view_id not in self.indexed:
            self.indexed.add(view_id)
            for rng in self.views[view_id].get("ranges", []):
                for a in self.traps(rng):
                    for sp, ivs in self.region_pages(rng["region"]).items():
                        for lo, hi in ivs:
                            G.interval_set(self.trapped, (view_id, a, sp)).add(lo, hi)
        return self.trapped.get((view_id, access, space)) or self.untrapped


_COMPLETES, _REPEATS = "completes", "repeats"


def _outcome(kind: str, response: dict, access: str | None) -> object:
    """What a response does to the access: _COMPLETES, _REPEATS (re-executed in the same view), or the
    view (an int) it is re-executed in."""
    flags = set(response.get("flags", []))
    if "inject" in response or "reinject" in response:
        return _COMPLETES
    if flags & {"EMULATE", "EMULATE_NOWRITE"} or any(k in response for k in _SKIPS) \
            or response.get("restore_original"):
        return _COMPLETES
    if access is not None and access in str(response.get("relax_access", "")):
        return _COMPLETES
    if kind in ("write_ctrlreg", "mov_to_msr") and "DENY" in flags:
        return _COMPLETES
    if kind in _HYPERVISOR_COMPLETES:
        return _COMPLETES
    if "ALTERNATE_P2M" in flags and isinstance(response.get("altp2m_idx"), int):
        return response["altp2m_idx"]
    return _REPEATS


def _describe(verdict: str, response: dict) -> str:
    what = "+".join(response.get("flags", [])) or "no flags"
    if "altp2m_idx" in response:
        what += f" to view {response['altp2m_idx']}"
    for key in ("inject", "reinject", "relax_access", "advance_ip", "advance_pc"):
        if key in response:
            what += f", {key.replace('_', ' ')} {response[key]}"
    return f"{verdict}: {what}"


def _label(n: tuple, graph: StateGraph | None = None) -> str:
    if n[0] == "mem":
        return f"view {n[1]}: {_ACCESS_OF[n[3]]} in {n[2]}"
    if n[0] == "bp":
        return f"view {n[1]}: breakpoint {n[2]}" if n[1] is not None else f"breakpoint {n[2]} (guest frame)"
    if n[0] == "event":
        return f"{n[1]} {n[2]}"
    if n[0] == "answer":
        return f"[{graph.nodes[n]['label']}]" if graph is not None else f"[{n[2]}]"
    if n[0] == "run":
        return f"running in view {n[1]}"
    return "done"
