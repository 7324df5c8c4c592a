"""(b) Rule conflicts, unreachable rules and shadowed rules.

Sound by construction: a finding is reported only when it is proven from the
model; anything the analysis cannot decide cheaply is left alone.

PC503 (error) conflict: two rules on overlapping targets (same trigger kind;
the same CR, MSR, descriptor register and access, breakpoint address, CPUID
leaf or event; or memory rules with a common access kind over regions with a
common byte in one address space), one saying `allow`, the other `deny`, and
no condition telling them apart (both without condition, or with identical
conditions). Reported at the later rule. Rate-limited verdicts (`limit ...
then deny`) do not count: they are not unconditional.

PC504 (warning) a rule that can never match, when one of these is proven:
  - a memory rule whose regions are all empty (absent optional symbols);
  - a top-level conjunct that is always false: `X in R` with R empty;
    `X in R` and `X not in R` together; `set(B)` and `cleared(B)` on one bit;
  - contradictory constraints on one field from top-level conjuncts
    (`cr3 == 1 and cr3 == 2`, `offset >= 4096`: offsets are 0..4095);
  - on a memory trigger, `gla in R` where R is at least a page away from
    every byte the trigger watches, or `gla not in R` where R covers every
    page the trigger traps and the pages around them (comparisons only within
    one address space: otherwise unknown);
  - on a breakpoint, `rip in R` / `rip == symbol S` that cannot hold at the
    breakpoint's address (or their negations that must fail there);
and a rule that has no effect: a later rule whose only action is one
unconditional verdict (no logs: each rule logs its own record), every event of
which earlier rules with the same condition give that same verdict (memory:
the union of their bytes per access kind covers the later rule's), none of
them disarming or rate limited.
"""

from __future__ import annotations

from .. import model as M
from ..diagnostics import Diagnostics
from ..lowering import geometry as G
from ..lowering.views import conjuncts

__all__ = ["analyse", "overlapping_owners"]

U64 = (1 << 64) - 1
_ACCESS = {"read": "r", "write": "w", "execute": "x", "access": "rwx"}
# Value ranges of event fields narrower than 64 bits.
_DOMAINS = {"offset": (0, G.PAGE - 1)}


def analyse(plan: dict, policy: M.Policy, usable: set[str], diagnostics: Diagnostics | None) -> dict:
    """Near-linear in the number of rules: rules are grouped by exact trigger target and condition, and
    memory rules are swept in policy order against interval sets of the earlier rules' bytes."""
    rules = [r for r in policy.rules if r.name in usable]
    at = _Positions(plan.get("rules", {}))
    geo = _Geometry(policy)
    conflicts, unreachable, shadowed = [], [], []
    # A memory rule none of whose bytes another rule watches for one of its accesses can neither conflict
    # nor shadow nor be shadowed: the two sweeps leave it out (one sort of every watched interval).
    touching = _touching_memory_rules(rules, geo)
    swept = [r for r in rules if r.name in touching or not isinstance(r.trigger, M.MemoryTrigger)]

    for earlier, later in _conflicting_pairs(swept, geo):
        conflicts.append({"rules": [earlier.name, later.name], "at": [at.get(earlier.name), at.get(later.name)],
                          "trigger": later.trigger.kind})
        if diagnostics is not None:
            allow, deny = (earlier, later) if _explicit(earlier) == "allow" else (later, earlier)
            diagnostics.error(
                "PC503", later.span,
                f"rules '{earlier.name}' ({at.get(earlier.name)}) and '{later.name}' "
                f"({at.get(later.name)}) conflict: {_trigger_words(earlier.trigger, later.trigger)}, "
                f"'{allow.name}' allows and '{deny.name}' denies, and no condition tells them apart "
                "(deny would always win)",
                "add a condition to one of them (e.g. `where rip in REGION`), or remove one")

    for rule in rules:
        reason = _never_matches(rule, geo)
        if reason is not None:
            unreachable.append({"rule": rule.name, "at": at.get(rule.name), "reason": reason})
            if diagnostics is not None:
                diagnostics.warning("PC504", rule.span, f"rule '{rule.name}' can never match: {reason}",
                                    "fix its condition or regions, or remove it")

    unreached = {u["rule"] for u in unreachable}
    for later, by in _shadowed_rules([r for r in swept if r.name not in unreached], geo):
        shadowed.append({"rule": later.name, "at": at.get(later.name), "by": [r.name for r in by],
                         "by_at": [at.get(r.name) for r in by]})
        if diagnostics is not None:
            names = " and ".join(f"'{r.name}' ({at.get(r.name)})" for r in by)
            diagnostics.warning(
                "PC504", later.span,
                f"rule '{later.name}' has no effect: every event it matches is matched by {names} with the "
                "same verdict",
                "remove it, or give it a condition or an action of its own")
    return {"conflicts": conflicts, "unreachable": unreachable, "shadowed": shadowed}


class _Positions:
    """Rule name -> its position as the plan's rules section gives it, looked up when a finding names the
    rule (a dict of every rule's position cost more than the sweeps that rarely find anything)."""

    def __init__(self, rules: dict) -> None:
        self.rules = rules

    def get(self, name: str) -> str | None:
        info = self.rules.get(name)
        return None if info is None else info.get("at")


def _target_key(t: M.Trigger) -> tuple:
    """Rules with different keys never share an event (memory and CPUID rules are compared finer)."""
    if isinstance(t, M.Breakpoint):
        return ("breakpoint", t.address.value, t.address.percpu)
    if isinstance(t, M.ControlRegisterTrigger):
        return ("control_register", t.register)
    if isinstance(t, M.MsrTrigger):
        return ("msr", t.index)
    if isinstance(t, M.DescriptorTrigger):
        return ("descriptor", t.register, t.access)
    return (t.kind,)


def _memory_intervals(rule: M.Rule, geo: "_Geometry") -> list[tuple[str, str, int, int]]:
    """(access letter, space, lo, hi) of every byte interval the memory rule watches (the conflict and
    the shadowing sweeps both ask: worked out once per rule)."""
    found = geo.intervals.get(rule.name)
    if found is not None:
        return found
    t = rule.trigger
    out = []
    for space, ivs in geo.regions(t.regions).items():  # type: ignore[union-attr]
        for letter in _ACCESS[t.access]:  # type: ignore[union-attr]
            out.extend((letter, space, lo, hi) for lo, hi in ivs)
    geo.intervals[rule.name] = out
    return out


def _touching_memory_rules(rules: list[M.Rule], geo: "_Geometry") -> set[str]:
    """The memory rules with a byte that another rule (or another of their own regions) watches for the
    same access in the same space."""
    by_place: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for rule in rules:
        t = rule.trigger
        if isinstance(t, M.MemoryTrigger):
            name = rule.name
            for space, ivs in geo.regions(t.regions).items():
                for letter in _ACCESS[t.access]:
                    found = by_place.get((letter, space))
                    if found is None:
                        found = by_place[(letter, space)] = []
                    if len(ivs) == 1:  # (most regions: no generator to run)
                        found.append((ivs[0][0], ivs[0][1], name))
                    else:
                        found.extend((lo, hi, name) for lo, hi in ivs)
    touching: set[str] = set()
    for intervals in by_place.values():
        touching |= overlapping_owners(intervals)
    return touching


def overlapping_owners(intervals: list[tuple[int, int, str]]) -> set[str]:
    """The owners of the intervals (lo, hi, owner) that share a point with another. One sort and one
    sweep: an interval starting before the furthest end seen so far is marked with the interval of that
    end. That marks every interval that overlaps another: the first interval after X in the order that
    overlaps X comes right after X (any between would start inside X), and then X either holds the
    furthest end or overlapped the interval that does."""
    intervals = sorted(intervals)
    touching: set[str] = set()
    furthest, owner = intervals[0][1], intervals[0][2]
    for lo, hi, name in intervals[1:]:
        if lo < furthest:
            touching.add(name)
            touching.add(owner)
        if hi > furthest:
            furthest, owner = hi, name
    return touching


def _conflicting_pairs(rules: list[M.Rule], geo: "_Geometry") -> list[tuple[M.Rule, M.Rule]]:
    """For each rule, the first earlier rule it conflicts with (one finding per later rule)."""
    groups: dict[tuple, list[M.Rule]] = {}
    seen: dict[tuple, dict[tuple[str, str, str], G.IntervalSet]] = {}  # memory: (verdict, letter, space) -> set
    out = []
    for rule in rules:
        verdict = _explicit(rule)
        if verdict is None:
            continue
        key = geo.group_key(rule)
        group = groups.setdefault(key, [])
        opposite = "allow" if verdict == "deny" else "deny"
        if isinstance(rule.trigger, M.MemoryTrigger):
            sets = seen.setdefault(key, {})
            mine = _memory_intervals(rule, geo)
            if any((opposite, letter, space) in sets and sets[(opposite, letter, space)].overlaps(lo, hi)
                   for letter, space, lo, hi in mine):
                partner = next(e for e in group if _conflict(e, rule, geo))
                out.append((partner, rule))
            for letter, space, lo, hi in mine:
                G.interval_set(sets, (verdict, letter, space)).add(lo, hi)
        else:
            partner = next((e for e in group if _explicit(e) == opposite and _conflict(e, rule, geo)), None)
            if partner is not None:
                out.append((partner, rule))
        group.append(rule)
    return out


def _shadowed_rules(rules: list[M.Rule], geo: "_Geometry") -> list[tuple[M.Rule, list[M.Rule]]]:
    """Rules whose only actions are one verdict that earlier rules (together) always give for every event
    of theirs. Logs and alerts are effects of their own (one record per rule); an earlier rule that can
    disarm or is rate limited stops answering at some point, so it shadows nothing."""
    groups: dict[tuple, list[M.Rule]] = {}
    unions: dict[tuple, dict[tuple[str, str], G.IntervalSet]] = {}
    out = []
    for rule in rules:
        verdicts = {a for a in rule.actions if isinstance(a, M.Verdict)}
        key_base = geo.group_key(rule)
        pure = bool(verdicts) and len(verdicts) == 1 and all(isinstance(a, M.Verdict) for a in rule.actions)
        if pure:
            key = key_base + (next(iter(verdicts)),)
            earlier = groups.get(key, [])
            if isinstance(rule.trigger, M.MemoryTrigger):
                sets = unions.get(key, {})
                mine = _memory_intervals(rule, geo)
                if mine and all((letter, space) in sets and sets[(letter, space)].covers(lo, hi)
                                for letter, space, lo, hi in mine):
                    by = [e for e in earlier if _targets_overlap(e.trigger, rule.trigger, geo)][:5]
                    out.append((rule, by))
            else:
                by = [e for e in earlier if _target_within(rule.trigger, e.trigger, geo)][:1]
                if by:
                    out.append((rule, by))
        if _explicit(rule) is not None and not any(isinstance(a, (M.Disarm, M.RateLimit)) for a in rule.actions):
            for v in verdicts:
                key = key_base + (v,)
                groups.setdefault(key, []).append(rule)
                if isinstance(rule.trigger, M.MemoryTrigger):
                    sets = unions.setdefault(key, {})
                    for letter, space, lo, hi in _memory_intervals(rule, geo):
                        G.interval_set(sets, (letter, space)).add(lo, hi)
    return out


# ---------------------------------------------------------------- trigger targets

class _Geometry:
    def __init__(self, policy: M.Policy) -> None:
        self.policy = policy
        self.table = G.region_table(policy)
        self.unions: dict[tuple[str, ...], G.SpaceMap] = {}  # region names -> their bytes together
        self.intervals: dict[str, list[tuple[str, str, int, int]]] = {}  # rule -> _memory_intervals
        self.group_keys: dict[str, tuple] = {}  # rule -> (trigger target, condition number)
        self.condition_numbers: dict = {}  # condition -> a number: equal conditions, equal numbers

    def group_key(self, rule: M.Rule) -> tuple:
        """Rules with the same key share a target and a condition. Conditions are numbered once per rule:
        hashing a condition tree for every look-up of both sweeps cost more than the sweeps."""
        key = self.group_keys.get(rule.name)
        if key is None:
            number = self.condition_numbers.setdefault(rule.condition, len(self.condition_numbers))
            key = self.group_keys[rule.name] = (_target_key(rule.trigger), number)
        return key

    def region(self, name: str) -> G.SpaceMap:
        return G.named_region_bytes(self.policy, name)

    def regions(self, names) -> G.SpaceMap:
        """The bytes of these regions together (shared: callers must not change the lists)."""
        if len(names) == 1:  # (a region's own bytes are kept per policy already: no union to keep)
            return G.named_region_bytes(self.policy, names[0])
        key = tuple(names)
        found = self.unions.get(key)
        if found is not None:
            return found
        acc: dict[str, list] = {}
        for n in key:
            for space, ivs in self.region(n).items():
                acc.setdefault(space, []).extend(ivs)
        found = {s: G.norm(v) for s, v in acc.items()}
        self.unions[key] = found
        return found


def _targets_overlap(a: M.Trigger, b: M.Trigger, geo: _Geometry) -> bool:
    """Proven: some event is a trigger of both."""
    if a.kind != b.kind:
        return False
    if isinstance(a, M.MemoryTrigger) and isinstance(b, M.MemoryTrigger):
        if not set(_ACCESS[a.access]) & set(_ACCESS[b.access]):
            return False
        return G.space_maps_overlap(geo.regions(a.regions), geo.regions(b.regions))
    if isinstance(a, M.Breakpoint) and isinstance(b, M.Breakpoint):
        return a.address == b.address
    if isinstance(a, M.ControlRegisterTrigger) and isinstance(b, M.ControlRegisterTrigger):
        return a.register == b.register
    if isinstance(a, M.MsrTrigger) and isinstance(b, M.MsrTrigger):
        return a.index == b.index
    if isinstance(a, M.DescriptorTrigger) and isinstance(b, M.DescriptorTrigger):
        return (a.register, a.access) == (b.register, b.access)
    if isinstance(a, M.CpuidTrigger) and isinstance(b, M.CpuidTrigger):
        return a.leaf is None or b.leaf is None or a.leaf == b.leaf
    return isinstance(a, M.EventTrigger) and isinstance(b, M.EventTrigger) and a.event == b.event


def _target_within(inner: M.Trigger, outer: M.Trigger, geo: _Geometry) -> bool:
    """Proven: every event of `inner` is an event of `outer`."""
    if inner.kind != outer.kind:
        return False
    if isinstance(inner, M.MemoryTrigger) and isinstance(outer, M.MemoryTrigger):
        if not set(_ACCESS[inner.access]) <= set(_ACCESS[outer.access]):
            return False
        o = geo.regions(outer.regions)
        return all(space in o and G.covers(o[space], ivs) for space, ivs in geo.regions(inner.regions).items())
    if isinstance(inner, M.CpuidTrigger) and isinstance(outer, M.CpuidTrigger):
        return outer.leaf is None or inner.leaf == outer.leaf
    return _targets_overlap(inner, outer, geo)


def _trigger_words(t: M.Trigger, other: M.Trigger | None = None) -> str:
    if isinstance(t, M.MemoryTrigger):
        mine = f"{t.access} of {', '.join(t.regions)}"
        if isinstance(other, M.MemoryTrigger):
            theirs = f"{other.access} of {', '.join(other.regions)}"
            return f"the same memory events ({mine} overlaps {theirs})" if theirs != mine else f"the same {mine}"
        return mine
    if other is not None:
        return "the same " + _trigger_words(t)
    if isinstance(t, M.Breakpoint):
        return f"breakpoint at {t.address.value:#x}"
    if isinstance(t, M.ControlRegisterTrigger):
        return f"write to {t.register}"
    if isinstance(t, M.MsrTrigger):
        return f"write to MSR {t.name or hex(t.index)}"
    if isinstance(t, M.DescriptorTrigger):
        return f"{t.access} of {t.register}"
    if isinstance(t, M.CpuidTrigger):
        return "cpuid" + ("" if t.leaf is None else f" leaf {t.leaf:#x}")
    return t.kind


# ---------------------------------------------------------------- conflicts and shadowing

def _explicit(rule: M.Rule) -> str | None:
    """The rule's unconditional verdict, if it states one (not behind a rate limit)."""
    verdicts = {a.verdict for a in rule.actions if isinstance(a, M.Verdict)}
    if "deny" in verdicts:
        return "deny"
    return "allow" if "allow" in verdicts else None


def _conflict(a: M.Rule, b: M.Rule, geo: _Geometry) -> bool:
    return ({_explicit(a), _explicit(b)} == {"allow", "deny"} and a.condition == b.condition
            and _targets_overlap(a.trigger, b.trigger, geo))


# ---------------------------------------------------------------- unreachable rules

def _never_matches(rule: M.Rule, geo: _Geometry) -> str | None:
    t = rule.trigger
    if isinstance(t, M.MemoryTrigger) and (not geo.table[t.regions[0]].extents if len(t.regions) == 1
                                           else all(geo.table[r].empty for r in t.regions)):
        names = ", ".join(t.regions)
        return f"its region{'s' if len(t.regions) > 1 else ''} {names} {'are' if len(t.regions) > 1 else 'is'} empty"
    if rule.condition is None:
        return None  # nothing left that could be always false or contradict itself
    parts = conjuncts(rule.condition)
    for c in parts:
        reason = _always_false(c, t, geo)
        if reason:
            return reason
    return _contradiction(parts)


def _always_false(c: M.Condition, t: M.Trigger, geo: _Geometry) -> str | None:
    if isinstance(c, M.Not):
        c = _negate(c.operand)
        if c is None:
            return None
    if isinstance(c, M.InRegion):
        region = geo.table[c.region]
        if region.empty and not c.negated:
            return f"region '{c.region}' is empty, so `in {c.region}` never holds"
        if isinstance(t, M.MemoryTrigger) and c.value == M.Field("gla"):
            return _gla_never(c, t, geo)
        if isinstance(t, M.Breakpoint) and c.value in (M.Field("rip"), M.Field("pc")):
            return _rip_never(c, t, geo)
    if isinstance(t, M.Breakpoint) and isinstance(c, M.Compare) and c.op in ("==", "!="):
        for a, b in ((c.left, c.right), (c.right, c.left)):
            if a in (M.Field("rip"), M.Field("pc")) and isinstance(b, M.Address) and b.percpu == t.address.percpu:
                equal = b.value == t.address.value
                if (c.op == "==") != equal:
                    return (f"rip is {t.address.value:#x} at this breakpoint, so `rip {c.op} "
                            f"{b.origin or hex(b.value)}` never holds")
    return None


def _negate(c: M.Condition) -> M.Condition | None:
    if isinstance(c, M.InRegion):
        return M.InRegion(c.value, c.region, not c.negated)
    if isinstance(c, M.Compare):
        flip = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}
        return M.Compare(flip[c.op], c.left, c.right)
    return None


def _gla_never(c: M.InRegion, t: M.MemoryTrigger, geo: _Geometry) -> str | None:
    watched = geo.regions(t.regions)
    r = geo.region(c.region)
    spaces = set(watched) | set(r)
    if len(spaces) != 1 or next(iter(spaces)) not in ("va", "va-fixed", "percpu"):
        return None  # mixed or physical spaces: unknown
    space = next(iter(spaces))
    # The pages the trigger traps, widened by a page each side for accesses that straddle a page boundary.
    near = G.pages_to_bytes(G.norm((lo - 1, hi + 1) for lo, hi in G.to_pages(watched.get(space, []))))
    if not c.negated:
        if not G.overlaps(r.get(space, []), near):
            return f"`gla in {c.region}`: {c.region} is nowhere near the bytes this rule watches"
    elif G.covers(r.get(space, []), near):
        return f"`gla not in {c.region}`: {c.region} covers every page this rule traps"
    return None


def _rip_never(c: M.InRegion, t: M.Breakpoint, geo: _Geometry) -> str | None:
    r = geo.region(c.region)
    space = G.address_space(t.address)
    if set(r) - {space}:
        return None
    inside = G.overlaps(r.get(space, []), [(t.address.value, t.address.value + 1)])
    if inside == c.negated:
        return (f"rip is {t.address.value:#x} at this breakpoint, which is "
                f"{'in' if inside else 'not in'} {c.region}")
    return None


def _contradiction(parts: list[M.Condition]) -> str | None:
    """Field constraints from top-level conjuncts `F op K` (K a literal) that no value satisfies."""
    lo: dict[str, int] = {}
    hi: dict[str, int] = {}
    eq: dict[str, set[int]] = {}
    ne: dict[str, set[int]] = {}
    bits: dict[str, set[int]] = {"set": set(), "cleared": set()}
    flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "==": "==", "!=": "!="}
    for c in parts:
        if isinstance(c, M.BitTest) and c.kind in bits and c.mask and c.mask & (c.mask - 1) == 0:
            bits[c.kind].add(c.mask)
            continue
        if not isinstance(c, M.Compare):
            continue
        if isinstance(c.left, M.Field) and isinstance(c.right, M.Literal):
            f, op, k = c.left.name, c.op, c.right.value
        elif isinstance(c.right, M.Field) and isinstance(c.left, M.Literal):
            f, op, k = c.right.name, flip[c.op], c.left.value
        else:
            continue
        dlo, dhi = _DOMAINS.get(f, (0, U64))
        lo.setdefault(f, dlo)
        hi.setdefault(f, dhi)
        if op == "==":
            eq.setdefault(f, set()).add(k)
        elif op == "!=":
            ne.setdefault(f, set()).add(k)
        elif op == "<":
            hi[f] = min(hi[f], k - 1)
        elif op == "<=":
            hi[f] = min(hi[f], k)
        elif op == ">":
            lo[f] = max(lo[f], k + 1)
        elif op == ">=":
            lo[f] = max(lo[f], k)
    for f in sorted(lo):
        values = eq.get(f, set())
        if len(values) > 1:
            return f"{f} cannot equal {' and '.join(hex(v) for v in sorted(values))} at once"
        if lo[f] > hi[f]:
            if f in _DOMAINS:
                dlo, dhi = _DOMAINS[f]
                return f"{f} is always in {dlo:#x}..{dhi:#x}, and the condition's bounds exclude every such value"
            return f"no value of {f} satisfies the condition's bounds"
        if lo[f] == hi[f] and lo[f] in ne.get(f, set()):
            return f"{f} must be {lo[f]:#x} and must not be {lo[f]:#x}"
        if values:
            v = next(iter(values))
            if not lo[f] <= v <= hi[f]:
                return f"{f} == {v:#x} contradicts the condition's bounds on {f}"
            if v in ne.get(f, set()):
                return f"{f} cannot be both == and != {v:#x}"
    memberships = set()
    for c in parts:
        c = _negate(c.operand) if isinstance(c, M.Not) else c
        if isinstance(c, M.InRegion):
            memberships.add((c.value, c.region, c.negated))
    for value, region, negated in sorted(memberships, key=repr):
        if not negated and (value, region, True) in memberships:
            return f"a value cannot be both in and not in {region}"
    both = bits["set"] & bits["cleared"]
    if both:
        return f"one bit ({min(both):#x}) cannot be both set and cleared by one write"
    return None
