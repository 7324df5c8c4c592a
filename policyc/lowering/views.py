"""(a) View layout: which permission map each execution context runs under.

Contexts. A memory rule (or, with shadow-frame breakpoints, a breakpoint rule)
whose condition has a top-level conjunct `cr3 == K` (K a constant) belongs to
the context "cr3=K" (on arm64, `ttbr0 == K` gives "ttbr0=K"); every other rule
is global ("*"). A context's permission
map is the global restrictions plus its own. The enforcer switches a vCPU's
view on CR3 writes (a sync `write_ctrlreg` cr3 monitor with bitmask 0, see
`context_monitors`); CR3 values that name no context run in the "*" view, or in
view 0 (the host p2m, untouched) when nothing is global.

Views. With altp2m: view 0 is the host p2m, view 1 the unrestricted view used
for stepping, and views 2.. are restricted, so `max_views - 2` are left for
contexts. The conflict graph has a node per context with a non-empty map and
an edge between two contexts whose maps differ. Greedy colouring (largest
degree first) groups contexts with identical maps (free sharing); while there
are more groups than views, the pair of groups cheapest to merge is merged
(the quotient graph is complete). A merged view takes the stricter permission of its contexts (the
intersection of what they allow); rules whose context does not match are
filtered at run time by their condition.

Cost of a merge: for each context of the merged group, the pages the merged
view restricts more strictly than that context's own map would (per access
kind, and per breakpoint page), summed over the contexts. Each merge is a PC502
warning naming the contexts, the view and that cost.

Without altp2m there is one map, the host p2m: every context (and the CR3
values that name none) shares it, which is a PC502 warning when that map is
not the same for all of them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable

from .. import model as M
from ..diagnostics import Diagnostics
from ..targets import TargetInfo, access_name
from . import geometry as G

__all__ = ["Layout", "GLOBAL", "VIEW_HOST", "VIEW_UNRESTRICTED", "VIEW_RESTRICTED", "allowed_access", "layout", "rule_context", "context_monitors", "breakpoint_views", "conjuncts"]

GLOBAL = "*"
# altp2m view numbers: 0 is the host p2m (never changed), 1 the unrestricted view the enforcer steps in,
# 2.. the restricted views, one per group of contexts.
VIEW_HOST, VIEW_UNRESTRICTED, VIEW_RESTRICTED = 0, 1, 2
_TRAPS = {"read": "r", "write": "w", "execute": "x", "access": "rwx"}

PageMap = dict[tuple[str, str], G.Intervals]  # (space, bit) -> page intervals; bit in r w x b(reakpoint)


@dataclass
class Layout:
    views: list[dict]
    report: dict
    merges: list[dict] = field(default_factory=list)


@dataclass
class _Context:
    name: str
    regions: dict[str, set[str]] = field(default_factory=dict)  # region -> trapped access letters
    rules_of: dict[str, set[str]] = field(default_factory=dict)  # region -> rule names
    breakpoints: set[tuple[int, bool]] = field(default_factory=set)  # (link-time address, percpu)
    rules: list[M.Rule] = field(default_factory=list)  # this context's own rules, in policy order


# ---------------------------------------------------------------- contexts

def conjuncts(c: M.Condition | None) -> list[M.Condition]:
    """The top-level `and` operands of a condition."""
    if c is None:
        return []
    if isinstance(c, M.Logic) and c.op == "and":
        return conjuncts(c.left) + conjuncts(c.right)
    return [c]


# The register that names an address space: CR3 on x86, TTBR0 (the user half) on arm64.
CONTEXT_REGISTERS = ("cr3", "ttbr0")


def _context_constant(c: M.Condition) -> tuple[str, int] | None:
    if isinstance(c, M.Compare) and c.op == "==":
        for a, b in ((c.left, c.right), (c.right, c.left)):
            if isinstance(a, M.Field) and a.name in CONTEXT_REGISTERS and isinstance(b, M.Literal):
                return a.name, b.value
    return None


def rule_context(rule: M.Rule) -> str:
    """"cr3=0x..." for a rule with a top-level `cr3 == K` conjunct (the first one; "ttbr0=0x..." for
    `ttbr0 == K` on arm64), else "*"."""
    for c in conjuncts(rule.condition):
        found = _context_constant(c)
        if found is not None:
            return f"{found[0]}={found[1]:#x}"
    return GLOBAL


def _context_key(name: str) -> tuple[int, str, int]:
    if name == GLOBAL:
        return (0, "", 0)
    register, value = name.split("=", 1)
    return (1, register, int(value, 16))


def _group_key(group: Iterable[str]) -> tuple:
    return tuple(sorted(_context_key(c) for c in group))


def _sorted_contexts(names: Iterable[str]) -> list[str]:
    return sorted(names, key=_context_key)


# ---------------------------------------------------------------- permission maps

class _Maps:
    """Each context's permission map, kept as the global map (`glob`) plus the pages only that context
    restricts, per (space, bit) (`residual`). A context's map is the global restrictions plus its own,
    so two contexts' maps are equal when their residuals are, and what merging contexts adds is what
    their residuals add: the global map is walked once, not once per context (which was quadratic in
    contexts times global regions for policies with many `cr3 ==` contexts)."""

    def __init__(self, policy: M.Policy, target: TargetInfo, contexts: dict[str, _Context]) -> None:
        self.policy = policy
        self.x86 = target.name.startswith("x86_64")
        self._global_context = contexts[GLOBAL]
        self._glob: PageMap | None = None  # made when first asked: a layout with no other context and no
        # figures asks only whether it is empty
        self.residual: dict[str, PageMap] = {GLOBAL: {}}
        if len(contexts) > 1:
            index = {k: G.Indexed(ivs) for k, ivs in self.glob.items()}
            for name, ctx in contexts.items():
                if name != GLOBAL:
                    own = ((k, index[k].gaps_within(ivs) if k in index else ivs) for k, ivs in self.page_map(ctx).items())
                    self.residual[name] = {k: ivs for k, ivs in own if ivs}
        self._glob_restricted: tuple[int, dict[str, G.Indexed]] | None = None

    @property
    def glob(self) -> PageMap:
        """The global context's map."""
        if self._glob is None:
            self._glob = self.page_map(self._global_context)
        return self._glob

    def restricts(self, name: str) -> bool:
        """The context's map restricts something."""
        if bool(self.residual[name]):
            return True
        if self._glob is not None:
            return bool(self._glob)
        # The global map is not empty when one of its regions has a page, or it has a breakpoint.
        ctx = self._global_context
        return bool(ctx.breakpoints) or any(self.region_pages(region) for region in ctx.regions)

    def restricted_pages(self, names: Iterable[str]) -> int:
        """Pages the contexts' maps together restrict some access on (breakpoints aside)."""
        if self._glob_restricted is None:
            runs = _restricted_runs(self.glob)
            self._glob_restricted = (sum(map(G.measure, runs.values())),
                                     {space: G.Indexed(ivs) for space, ivs in runs.items()})
        total, glob = self._glob_restricted
        for space, ivs in _restricted_runs(_union_maps(self.residual[n] for n in names)).items():
            total += G.measure(glob[space].gaps_within(ivs) if space in glob else ivs)
        return total

    def region_pages(self, name: str) -> G.SpaceMap:
        return G.named_region_pages(self.policy, name)

    def effective(self, traps: set[str]) -> set[str]:
        # EPT has no write-without-read: trapping reads traps writes too.
        return traps | {"w"} if self.x86 and "r" in traps else set(traps)

    def page_map(self, ctx: _Context) -> PageMap:
        acc: dict[tuple[str, str], list[G.Interval]] = {}
        for region, traps in ctx.regions.items():
            for space, ivs in self.region_pages(region).items():
                for bit in self.effective(traps):
                    acc.setdefault((space, bit), []).extend(ivs)
        for value, percpu in ctx.breakpoints:
            page = value // G.PAGE
            acc.setdefault(("percpu" if percpu else "va", "b"), []).append((page, page + 1))
        return {k: G.norm(v) for k, v in sorted(acc.items()) if v}


def _freeze(m: PageMap) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in m.items() if v))


def _union_maps(maps: Iterable[PageMap]) -> PageMap:
    acc: dict[tuple[str, str], list[G.Interval]] = {}
    for m in maps:
        for k, ivs in m.items():
            acc.setdefault(k, []).extend(ivs)
    return {k: G.norm(v) for k, v in sorted(acc.items())}


def _stricter_pages(merged: PageMap, own: PageMap) -> int:
    """Pages on which `merged` restricts some access (or plants a breakpoint) that `own` does not."""
    per_space: dict[str, list[G.Interval]] = {}
    for (space, bit), ivs in merged.items():
        per_space.setdefault(space, []).extend(G.subtract(ivs, own.get((space, bit), [])))
    return sum(G.measure(G.norm(v)) for v in per_space.values())


def _restricted_runs(m: PageMap, bits: str = "rwx") -> dict[str, G.Intervals]:
    """Per space, the pages on which the map restricts some access of `bits`."""
    per_space: dict[str, list[G.Interval]] = {}
    for (space, bit), ivs in m.items():
        if bit in bits:
            per_space.setdefault(space, []).extend(ivs)
    return {space: G.norm(v) for space, v in per_space.items()}


def _group_cost(group: Iterable[str], maps: dict[str, PageMap]) -> int:
    members = list(group)
    merged = _union_maps(maps[c] for c in members)
    return sum(_stricter_pages(merged, maps[c]) for c in members)


# ---------------------------------------------------------------- the layout

def allowed_access(traps: set[str], target: TargetInfo) -> str:
    """The access a view grants on a page where `traps` (a set of r, w, x) must fault."""
    return access_name(set("rwx") - traps, x86=target.name.startswith("x86_64"))


def layout(policy: M.Policy, target: TargetInfo, *, usable: set[str], shadow_breakpoints: bool,
           diagnostics: Diagnostics | None = None, figures: bool = True) -> Layout:
    """Lay out the permission maps. `usable`: names of rules that were lowered; `shadow_breakpoints`:
    breakpoints are int3s on shadow frames remapped in the restricted views (so they belong to views).
    Diagnostics (PC502) are emitted only when `diagnostics` is given. Without `figures` the report's
    page counts (each a pass over every page run) are None: for a caller that keeps no report."""
    glob = _Context(GLOBAL)
    contexts: dict[str, _Context] = {GLOBAL: glob}
    for rule in policy.rules:
        if rule.name not in usable:
            continue
        t = rule.trigger
        if isinstance(t, M.MemoryTrigger):
            ctx = glob if rule.condition is None else _context_of(contexts, rule)
            letters = _TRAPS[t.access]
            for region in t.regions:
                here = ctx.regions.get(region)
                if here is None:
                    ctx.regions[region] = set(letters)
                    ctx.rules_of[region] = {rule.name}
                else:
                    here.update(letters)
                    ctx.rules_of[region].add(rule.name)
            ctx.rules.append(rule)
        elif isinstance(t, M.Breakpoint) and shadow_breakpoints:
            ctx = _context_of(contexts, rule)
            ctx.breakpoints.add((t.address.value, t.address.percpu))
            ctx.rules.append(rule)
    maps = _Maps(policy, target, contexts)
    names = _sorted_contexts(contexts)
    if target.has("altp2m"):
        return _altp2m_layout(policy, target, contexts, maps, names, diagnostics, figures)
    return _host_layout(policy, target, contexts, maps, names, diagnostics, figures)


def _context_of(contexts: dict[str, _Context], rule: M.Rule) -> _Context:
    """The rule's context, made when it is the first rule of it."""
    name = rule_context(rule)
    ctx = contexts.get(name)
    if ctx is None:
        ctx = contexts[name] = _Context(name)
    return ctx


def _ranges(members: list[_Context], target: TargetInfo) -> list[dict]:
    if len(members) == 1:  # a view of the global context alone: its own sets, not copies of them
        traps, rules = members[0].regions, members[0].rules_of
    else:
        traps, rules = {}, {}
        for ctx in members:
            for region, t in ctx.regions.items():
                traps.setdefault(region, set()).update(t)
                rules.setdefault(region, set()).update(ctx.rules_of[region])
    access: dict[str, str] = {}  # trapped letters -> the access the view allows (a few distinct ones)
    out = []
    for name in sorted(traps):
        t = traps[name]
        letters = "".join(sorted(t))
        allowed = access.get(letters)
        if allowed is None:
            allowed = access[letters] = allowed_access(t, target)
        out.append({"region": name, "access": allowed, "traps": letters, "rules": sorted(rules[name])})
    return out


def _members(contexts: dict[str, _Context], group: Iterable[str]) -> list[_Context]:
    """What a view serving `group` restricts: the global context's and each member context's own."""
    return [contexts[GLOBAL]] + [contexts[c] for c in group if c != GLOBAL]


def _breakpoint_list(members: Iterable[_Context]) -> list[str]:
    sites = set().union(*(c.breakpoints for c in members))
    return [("percpu+" if percpu else "") + hex(value) for value, percpu in sorted(sites)]


def _context_report(contexts: dict[str, _Context], maps: _Maps, view_of: dict[str, int], figures: bool) -> dict:
    return {name: {"rule_count": len(contexts[name].rules),
                   "pages_restricted": maps.restricted_pages([name]) if figures else None,
                   "view": view_of.get(name, VIEW_HOST)}
            for name in _sorted_contexts(contexts)}


def _first_rule(contexts: dict[str, _Context], names: Iterable[str], policy: M.Policy) -> M.Rule | None:
    wanted = {r.name for n in names for r in contexts[n].rules}
    return next((r for r in policy.rules if r.name in wanted), None)


def _host_layout(policy: M.Policy, target: TargetInfo, contexts: dict[str, _Context], maps: _Maps,
                 names: list[str], d: Diagnostics | None, figures: bool) -> Layout:
    ranges = _ranges(list(contexts.values()), target)
    views = [{"id": VIEW_HOST, "role": "host", "default_access": "rwx", "ranges": ranges}] if ranges else []
    merges: list[dict] = []
    if ranges and len(names) > 1 and len({_freeze(maps.residual[n]) for n in names}) > 1:
        cost = _group_cost(names, maps.residual)
        merges.append({"contexts": [[n] for n in names], "view": VIEW_HOST, "extra_trapped_pages": cost})
        if d is not None:
            rule = _first_rule(contexts, [n for n in names if n != GLOBAL], policy)
            d.warning("PC502", rule.span if rule else policy.span,
                      f"{target.name} has no altp2m: contexts {', '.join(names)} all share the host p2m (view "
                      f"{VIEW_HOST}), which traps {cost} more page(s) than their own maps (counted per context); "
                      "the other contexts' events there are filtered at run time",
                      "on x86_64 (Intel VT-x, altp2m) each context gets its own view")
    report = {
        "mechanism": "host-p2m",
        "available": 0,
        "default_view": VIEW_HOST,
        "contexts": _context_report(contexts, maps, {}, figures),
        "views": [{"id": VIEW_HOST, "contexts": names,
                   "pages_restricted": maps.restricted_pages(names) if figures else None,
                   "breakpoints": []}] if ranges else [],
        "merges": merges,
        "extra_trapped_pages": sum(m["extra_trapped_pages"] for m in merges),
        "monitors_needed": {},
    }
    return Layout(views, report, merges)


def _altp2m_layout(policy: M.Policy, target: TargetInfo, contexts: dict[str, _Context], maps: _Maps,
                   names: list[str], d: Diagnostics | None, figures: bool) -> Layout:
    available = max(target.max_views - 2, 1)
    nodes = [n for n in names if maps.restricts(n)]
    if not nodes:
        report = {"mechanism": "altp2m", "available": available, "default_view": VIEW_HOST,
                  "contexts": _context_report(contexts, maps, {}, figures), "views": [], "merges": [],
                  "extra_trapped_pages": 0, "monitors_needed": {}, "conflict_graph": {"nodes": 0, "edges": 0}}
        return Layout([], report, [])

    # The conflict graph: contexts whose maps differ cannot share a view for free. It is complete
    # multipartite (a part per distinct map), so its greedy colouring (largest degree first) gives each
    # part one colour of its own: the groups are the contexts with equal maps, found by hashing the
    # residuals rather than by comparing every pair of contexts.
    classes: dict[tuple, list[str]] = {}
    for n in nodes:
        classes.setdefault(_freeze(maps.residual[n]), []).append(n)
    groups = sorted((tuple(_sorted_contexts(c)) for c in classes.values()), key=_group_key)
    edges = (len(nodes) ** 2 - sum(len(c) ** 2 for c in classes.values())) // 2
    colour_count = len(groups)

    # Too many colours for the views there are: merge the cheapest pair of groups (the quotient graph
    # is complete: any two groups can share a view at some cost), until the groups fit.
    steps: list[tuple[tuple[str, ...], tuple[str, ...], int]] = []
    if len(groups) > available:
        steps, groups = _merge_to_fit(groups, available, maps.residual)
    final = sorted(groups, key=_group_key)
    view_of = {c: VIEW_RESTRICTED + i for i, g in enumerate(final) for c in g}

    views = [
        {"id": VIEW_HOST, "role": "host", "default_access": "rwx", "ranges": []},
        {"id": VIEW_UNRESTRICTED, "role": "unrestricted", "default_access": "rwx", "ranges": []},
    ]
    view_reports = []
    for i, g in enumerate(final):
        members = _members(contexts, g)
        views.append({"id": VIEW_RESTRICTED + i, "role": "restricted", "contexts": list(g), "default_access": "rwx",
                      "ranges": _ranges(members, target)})
        view_reports.append({"id": VIEW_RESTRICTED + i, "contexts": list(g),
                             "pages_restricted": maps.restricted_pages(g) if figures else None,
                             "breakpoints": _breakpoint_list(members)})

    merges = []
    for a, b, w in steps:
        view = view_of[a[0]]
        merges.append({"contexts": [list(a), list(b)], "view": view, "extra_trapped_pages": w})
        if d is not None:
            rule = _first_rule(contexts, [c for c in a + b if c != GLOBAL] or [GLOBAL], policy)
            d.warning("PC502", rule.span if rule else policy.span,
                      f"views merged: {len(nodes)} contexts need their own permission maps but {target.name} has "
                      f"{available} restricted views; contexts {', '.join(a)} and {', '.join(b)} share view "
                      f"{view}, which traps {w} more page(s) (counted per context) whose events are filtered "
                      "at run time",
                      "fewer cr3 contexts, or contexts that watch the same pages, need fewer views")
    contextual = any(c != GLOBAL for c in view_of)
    report = {
        "mechanism": "altp2m",
        "available": available,
        "default_view": view_of.get(GLOBAL, VIEW_HOST),
        "contexts": _context_report(contexts, maps, view_of, figures),
        "views": view_reports,
        "merges": merges,
        "extra_trapped_pages": sum(w for _, _, w in steps),
        "conflict_graph": {"nodes": len(nodes), "edges": edges,
                           "colours": colour_count},
        "monitors_needed": _CR3_MONITOR if contextual else {},
    }
    return Layout(views, report, merges)


Group = tuple[str, ...]


def _merge_to_fit(groups: list[Group], available: int, maps: dict[str, PageMap]
                  ) -> tuple[list[tuple[Group, Group, int]], list[Group]]:
    """Merge the cheapest pair of groups (cost, then the groups' keys) until `available` are left: the
    merges (group, group, cost) and the groups left. The pairs wait in a heap ordered as the choice is,
    and each merge prices only the new group against the others (a minimum over every pair at every
    merge was cubic in the groups)."""
    keys = {g: _group_key(g) for g in groups}
    own: dict[Group, int] = {}

    def cost(g: Group) -> int:
        found = own.get(g)
        if found is None:
            found = own[g] = _group_cost(g, maps)
        return found

    def pair(a: Group, b: Group) -> tuple:
        a, b = sorted((a, b), key=keys.__getitem__)
        return (cost(a + b) - cost(a) - cost(b), keys[a], keys[b], a, b)

    heap = [pair(a, b) for a, b in combinations(groups, 2)]
    heapq.heapify(heap)
    alive = set(groups)
    steps = []
    while len(alive) > available:
        w, _, _, a, b = heapq.heappop(heap)
        if a not in alive or b not in alive:
            continue  # a pair of a group merged since
        merged = tuple(_sorted_contexts(a + b))
        keys[merged] = _group_key(merged)
        alive -= {a, b}
        for other in alive:
            heapq.heappush(heap, pair(merged, other))
        alive.add(merged)
        steps.append((a, b, w))
    return steps, list(alive)


# ---------------------------------------------------------------- what the rest of the plan needs

_CR3_MONITOR = {"write_ctrlreg": [{"index": "cr3", "sync": True, "onchangeonly": False, "bitmask": "0x0"}]}


def context_monitors(views: list[dict]) -> dict:
    """Monitors the view layout needs: a sync CR3 write monitor with bitmask 0 when any restricted view
    serves a cr3 context (the enforcer answers it with ALTERNATE_P2M into that context's view)."""
    contextual = any(c != GLOBAL for v in views if v.get("role") == "restricted" for c in v.get("contexts", ()))
    return {k: [dict(x) for x in v] for k, v in _CR3_MONITOR.items()} if contextual else {}


def breakpoint_views(policy: M.Policy, views: list[dict], address: int, percpu: bool = False) -> list[int]:
    """The restricted views a shadow-frame breakpoint must be planted in: every restricted view when a
    global rule uses it, else the views of the contexts of its rules."""
    wanted = _breakpoint_contexts(policy).get((address, percpu), set())
    out = []
    for v in views:
        if v.get("role") != "restricted":
            continue
        if GLOBAL in wanted or wanted & set(v.get("contexts", ())):
            out.append(v["id"])
    return out


_BREAKPOINT_CONTEXTS: list = [None, {}]  # the last policy asked about; (address, percpu) -> contexts


def _breakpoint_contexts(policy: M.Policy) -> dict[tuple[int, bool], set[str]]:
    """The contexts of the rules on each breakpoint address, indexed once per policy (a policy places
    hundreds of breakpoints among 10,000s of rules: scanning the rules per site was quadratic)."""
    if _BREAKPOINT_CONTEXTS[0] is not policy:
        index: dict[tuple[int, bool], set[str]] = {}
        for r in policy.rules:
            if isinstance(r.trigger, M.Breakpoint):
                a = r.trigger.address
                index.setdefault((a.value, a.percpu), set()).add(rule_context(r))
        _BREAKPOINT_CONTEXTS[:] = [policy, index]
    return _BREAKPOINT_CONTEXTS[1]
