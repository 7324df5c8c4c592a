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

from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable

from .. import model as M
from ..diagnostics import Diagnostics
from ..lower import VIEW_HOST, VIEW_RESTRICTED, VIEW_UNRESTRICTED, _allowed_access
from ..targets import TargetInfo
from . import _geometry as G

__all__ = ["Layout", "GLOBAL", "layout", "rule_context", "context_monitors", "breakpoint_views", "conjuncts"]

GLOBAL = "*"
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
    """Page maps of contexts, with the region geometry cached."""

    def __init__(self, policy: M.Policy, target: TargetInfo) -> None:
        self.policy = policy
        self.x86 = target.name.startswith("x86_64")
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


def _restricted_pages(m: PageMap, bits: str = "rwx") -> int:
    per_space: dict[str, list[G.Interval]] = {}
    for (space, bit), ivs in m.items():
        if bit in bits:
            per_space.setdefault(space, []).extend(ivs)
    return sum(G.measure(G.norm(v)) for v in per_space.values())


def _group_cost(group: Iterable[str], maps: dict[str, PageMap]) -> int:
    members = list(group)
    merged = _union_maps(maps[c] for c in members)
    return sum(_stricter_pages(merged, maps[c]) for c in members)


# ---------------------------------------------------------------- the layout

def layout(policy: M.Policy, target: TargetInfo, *, usable: set[str], shadow_breakpoints: bool,
           diagnostics: Diagnostics | None = None, figures: bool = True) -> Layout:
    """Lay out the permission maps. `usable`: names of rules that were lowered; `shadow_breakpoints`:
    breakpoints are int3s on shadow frames remapped in the restricted views (so they belong to views).
    Diagnostics (PC502) are emitted only when `diagnostics` is given. Without `figures` the report's
    page counts (each a pass over every page run) are None: for a caller that keeps no report."""
    contexts: dict[str, _Context] = {GLOBAL: _Context(GLOBAL)}
    for rule in policy.rules:
        if rule.name not in usable:
            continue
        t = rule.trigger
        if isinstance(t, M.MemoryTrigger):
            ctx = _context_of(contexts, rule)
            for region in t.regions:
                ctx.regions.setdefault(region, set()).update(_TRAPS[t.access])
                ctx.rules_of.setdefault(region, set()).add(rule.name)
            ctx.rules.append(rule)
        elif isinstance(t, M.Breakpoint) and shadow_breakpoints:
            ctx = _context_of(contexts, rule)
            ctx.breakpoints.add((t.address.value, t.address.percpu))
            ctx.rules.append(rule)
    glob = contexts[GLOBAL]
    # Each context's map: the global restrictions plus its own.
    full: dict[str, _Context] = {}
    for name, ctx in contexts.items():
        merged = _Context(name, rules=ctx.rules)
        for part in (glob, ctx) if name != GLOBAL else (glob,):
            for region, traps in part.regions.items():
                merged.regions.setdefault(region, set()).update(traps)
                merged.rules_of.setdefault(region, set()).update(part.rules_of[region])
            merged.breakpoints |= part.breakpoints
        full[name] = merged
    pm = _Maps(policy, target)
    maps = {name: pm.page_map(ctx) for name, ctx in full.items()}
    names = _sorted_contexts(full)
    if target.has("altp2m"):
        return _altp2m_layout(policy, target, full, maps, names, diagnostics, figures)
    return _host_layout(policy, target, full, maps, names, diagnostics, figures)


def _context_of(contexts: dict[str, _Context], rule: M.Rule) -> _Context:
    """The rule's context, made when it is the first rule of it."""
    name = rule_context(rule)
    ctx = contexts.get(name)
    if ctx is None:
        ctx = contexts[name] = _Context(name)
    return ctx


def _ranges(members: Iterable[_Context], target: TargetInfo) -> list[dict]:
    traps: dict[str, set[str]] = {}
    rules: dict[str, set[str]] = {}
    for ctx in members:
        for region, t in ctx.regions.items():
            traps.setdefault(region, set()).update(t)
            rules.setdefault(region, set()).update(ctx.rules_of[region])
    return [{"region": name, "access": _allowed_access(t, target), "traps": "".join(sorted(t)),
             "rules": sorted(rules[name])} for name, t in sorted(traps.items())]


def _breakpoint_list(members: Iterable[_Context]) -> list[str]:
    sites = set().union(*(c.breakpoints for c in members))
    return [("percpu+" if percpu else "") + hex(value) for value, percpu in sorted(sites)]


def _context_report(full: dict[str, _Context], maps: dict[str, PageMap], view_of: dict[str, int],
                    figures: bool) -> dict:
    return {name: {"rule_count": len(full[name].rules),
                   "pages_restricted": _restricted_pages(maps[name]) if figures else None,
                   "view": view_of.get(name, VIEW_HOST)}
            for name in _sorted_contexts(full)}


def _first_rule(full: dict[str, _Context], names: Iterable[str], policy: M.Policy) -> M.Rule | None:
    wanted = {r.name for n in names for r in full[n].rules}
    return next((r for r in policy.rules if r.name in wanted), None)


def _host_layout(policy: M.Policy, target: TargetInfo, full: dict[str, _Context], maps: dict[str, PageMap],
                 names: list[str], d: Diagnostics | None, figures: bool) -> Layout:
    ranges = _ranges(full.values(), target)
    views = [{"id": VIEW_HOST, "role": "host", "default_access": "rwx", "ranges": ranges}] if ranges else []
    merges: list[dict] = []
    if ranges and len(names) > 1 and len({_freeze(maps[n]) for n in names}) > 1:
        cost = _group_cost(names, maps)
        merges.append({"contexts": [[n] for n in names], "view": VIEW_HOST, "extra_trapped_pages": cost})
        if d is not None:
            rule = _first_rule(full, [n for n in names if n != GLOBAL], policy)
            d.warning("PC502", rule.span if rule else policy.span,
                      f"{target.name} has no altp2m: contexts {', '.join(names)} all share the host p2m (view "
                      f"{VIEW_HOST}), which traps {cost} more page(s) than their own maps (counted per context); "
                      "the other contexts' events there are filtered at run time",
                      "on x86_64 (Intel VT-x, altp2m) each context gets its own view")
    report = {
        "mechanism": "host-p2m",
        "available": 0,
        "default_view": VIEW_HOST,
        "contexts": _context_report(full, maps, {}, figures),
        "views": [{"id": VIEW_HOST, "contexts": names,
                   "pages_restricted": _restricted_pages(_union_maps(maps.values())) if figures else None,
                   "breakpoints": []}] if ranges else [],
        "merges": merges,
        "extra_trapped_pages": sum(m["extra_trapped_pages"] for m in merges),
        "monitors_needed": {},
    }
    return Layout(views, report, merges)


def _altp2m_layout(policy: M.Policy, target: TargetInfo, full: dict[str, _Context], maps: dict[str, PageMap],
                   names: list[str], d: Diagnostics | None, figures: bool) -> Layout:
    available = max(target.max_views - 2, 1)
    nodes = [n for n in names if maps[n]]
    if not nodes:
        report = {"mechanism": "altp2m", "available": available, "default_view": VIEW_HOST,
                  "contexts": _context_report(full, maps, {}, figures), "views": [], "merges": [],
                  "extra_trapped_pages": 0, "monitors_needed": {}, "conflict_graph": {"nodes": 0, "edges": 0}}
        return Layout([], report, [])

    # The conflict graph: contexts whose maps differ cannot share a view for free.
    frozen = {n: _freeze(maps[n]) for n in nodes} if len(nodes) > 1 else {}
    conflicts: dict[str, list[str]] = {n: [] for n in nodes}
    edges = 0
    for a, b in combinations(nodes, 2):
        if frozen[a] != frozen[b]:
            conflicts[a].append(b)
            conflicts[b].append(a)
            edges += 1
    colouring = _greedy_colouring(nodes, conflicts)
    classes: dict[int, list[str]] = {}
    for n in nodes:
        classes.setdefault(colouring[n], []).append(n)
    groups = sorted((tuple(_sorted_contexts(c)) for c in classes.values()), key=_group_key)
    colour_count = len(groups)

    # Too many colours for the views there are: merge the cheapest pair of groups (the quotient graph
    # is complete: any two groups can share a view at some cost), until the groups fit.
    steps: list[tuple[tuple[str, ...], tuple[str, ...], int]] = []
    costs = {(u, v): _merge_cost(u, v, maps) for u, v in combinations(groups, 2)} if len(groups) > available else {}
    while len(groups) > available:
        a, b, w = min(((*sorted(pair, key=_group_key), w) for pair, w in costs.items()),
                      key=lambda e: (e[2], _group_key(e[0]), _group_key(e[1])))
        merged = tuple(_sorted_contexts(a + b))
        groups = [g for g in groups if g not in (a, b)]
        costs = {pair: w for pair, w in costs.items() if a not in pair and b not in pair}
        costs.update({(merged, o): _merge_cost(merged, o, maps) for o in groups})
        groups.append(merged)
        steps.append((a, b, w))
    final = sorted(groups, key=_group_key)
    view_of = {c: VIEW_RESTRICTED + i for i, g in enumerate(final) for c in g}

    views = [
        {"id": VIEW_HOST, "role": "host", "default_access": "rwx", "ranges": []},
        {"id": VIEW_UNRESTRICTED, "role": "unrestricted", "default_access": "rwx", "ranges": []},
    ]
    view_reports = []
    for i, g in enumerate(final):
        members = [full[c] for c in g]
        views.append({"id": VIEW_RESTRICTED + i, "role": "restricted", "contexts": list(g), "default_access": "rwx",
                      "ranges": _ranges(members, target)})
        view_reports.append({"id": VIEW_RESTRICTED + i, "contexts": list(g),
                             "pages_restricted": _restricted_pages(_union_maps(maps[c] for c in g))
                             if figures else None,
                             "breakpoints": _breakpoint_list(members)})

    merges = []
    for a, b, w in steps:
        view = view_of[a[0]]
        merges.append({"contexts": [list(a), list(b)], "view": view, "extra_trapped_pages": w})
        if d is not None:
            rule = _first_rule(full, [c for c in a + b if c != GLOBAL] or [GLOBAL], policy)
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
        "contexts": _context_report(full, maps, view_of, figures),
        "views": view_reports,
        "merges": merges,
        "extra_trapped_pages": sum(w for _, _, w in steps),
        "conflict_graph": {"nodes": len(nodes), "edges": edges,
                           "colours": colour_count},
        "monitors_needed": _CR3_MONITOR if contextual else {},
    }
    return Layout(views, report, merges)


def _merge_cost(a: tuple[str, ...], b: tuple[str, ...], maps: dict[str, PageMap]) -> int:
    """What merging two groups adds to the trapped pages (counted per context)."""
    return _group_cost(a + b, maps) - _group_cost(a, maps) - _group_cost(b, maps)


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


def _greedy_colouring(nodes: list[str], neighbours: dict[str, list[str]]) -> dict[str, int]:
    """Greedy colouring, largest degree first (ties in `nodes` order): each node takes the smallest
    colour none of its coloured neighbours has. The same colouring as networkx's
    greedy_color(strategy="largest_first"), without importing networkx for it."""
    colours: dict[str, int] = {}
    for n in sorted(nodes, key=lambda m: len(neighbours[m]), reverse=True):
        taken = {colours[m] for m in neighbours[n] if m in colours}
        colours[n] = next(c for c in range(len(taken) + 1) if c not in taken)
    return colours
