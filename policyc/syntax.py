"""The syntax tree both front ends produce.

The DSL parser (`policyc.dsl`) and the YAML reader (`policyc.yaml_form`) each
turn their text into these nodes; from here on nothing knows which spelling a
policy was written in. Every node carries the `Span` it came from; spans never
take part in equality, so two spellings of one policy compare equal.

The tree is faithful to what was written (constants unfolded, names
unresolved, comments kept) because the formatter prints it back. Resolution
and folding happen in the checker (`policyc.checking`), which turns it into the checked model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .diagnostics import Span

NOWHERE = Span("<none>", 1, 1)


def _span() -> Span:
    return field(default=NOWHERE, compare=False, repr=False)


# ---------------------------------------------------------------- expressions

@dataclass(slots=True)
class Num:
    """An integer literal. `radix` remembers how it was written, for the formatter."""
    value: int
    radix: int = 10
    span: Span = _span()


@dataclass(slots=True)
class Name:
    """A bare name: a constant, a register, an event field or an MSR name."""
    name: str
    span: Span = _span()


@dataclass(slots=True)
class Attr:
    """`base.attr`: a named bit such as `cr0.WP` or `EFER.NXE`, or a member path."""
    base: str
    attr: str
    span: Span = _span()


@dataclass(slots=True)
class SymbolRef:
    """`symbol NAME`, `symbol? NAME` (optional) or `percpu symbol NAME`."""
    name: str
    optional: bool = False
    percpu: bool = False
    span: Span = _span()


@dataclass(slots=True)
class Unary:
    op: str  # "-", "~", "not"
    operand: "Expr"
    span: Span = _span()


@dataclass(slots=True)
class Binary:
    op: str  # arithmetic, bitwise, comparison, "and", "or"
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(slots=True)
class InRegion:
    """`X in REGION` / `X not in REGION`."""
    value: "Expr"
    region: str
    negated: bool = False
    span: Span = _span()
    region_span: Span = _span()


@dataclass(slots=True)
class Call:
    """`set(...)`, `cleared(...)`, `changed(...)`, `offsetof(T, member)`, `sizeof(T)`."""
    func: str
    args: list["Expr"]
    span: Span = _span()


Expr = Union[Num, Name, Attr, SymbolRef, Unary, Binary, InRegion, Call]

# Binding strength for the formatter and the parser agree on this table.
PRECEDENCE: dict[str, int] = {
    "or": 1, "and": 2, "not": 3,
    "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "in": 4,
    "|": 5, "^": 6, "&": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10,
    "neg": 11, "~": 11,
}
COMPARISONS = frozenset({"==", "!=", "<", "<=", ">", ">="})


# ---------------------------------------------------------------- regions

@dataclass(slots=True)
class RegionRef:
    """A region named elsewhere."""
    name: str
    span: Span = _span()


@dataclass(slots=True)
class RangeRegion:
    """`[va|pa] START .. END` (half-open)."""
    start: Expr
    end: Expr
    space: str | None = None  # "va", "pa" or None (virtual)
    span: Span = _span()


@dataclass(slots=True)
class SizedRegion:
    """`[va|pa] BASE size N`."""
    base: Expr
    size: Expr
    space: str | None = None
    span: Span = _span()


@dataclass(slots=True)
class RegisterRegion:
    """`register idtr size N`: the base is read from the register at bind time."""
    register: str
    size: Expr
    span: Span = _span()


RegionTerm = Union[RegionRef, RangeRegion, SizedRegion, RegisterRegion]


# ---------------------------------------------------------------- triggers

@dataclass(slots=True)
class MemoryTrigger:
    """`on read of R`, `on write to R`, `on execute in R`, `on access to R`."""
    access: str  # "read" | "write" | "execute" | "access"
    regions: list[RegionTerm]
    span: Span = _span()


@dataclass(slots=True)
class ExecuteTrigger:
    """`on execute symbol S` / `on execute va 0x...`: one address, a breakpoint."""
    address: Expr
    space: str | None = None  # "va" when written, None when the address is symbolic
    span: Span = _span()


@dataclass(slots=True)
class RegisterTrigger:
    """`on write cr0`, `on read idtr`...: which register kind it is is the checker's call."""
    access: str  # "read" | "write"
    register: str
    span: Span = _span()


@dataclass(slots=True)
class MsrTrigger:
    """`on write msr LSTAR` / `on write msr 0xc0000082`."""
    msr: Expr
    span: Span = _span()


@dataclass(slots=True)
class CpuidTrigger:
    leaf: Expr | None = None
    span: Span = _span()


@dataclass(slots=True)
class EventTrigger:
    """Triggers with no operand: `guest_request`, `debug_exception`, `smc`."""
    kind: str
    span: Span = _span()


Trigger = Union[MemoryTrigger, ExecuteTrigger, RegisterTrigger, MsrTrigger, CpuidTrigger, EventTrigger]

EVENT_TRIGGERS = ("guest_request", "debug_exception", "smc")


# ---------------------------------------------------------------- actions

@dataclass(slots=True)
class Allow:
    span: Span = _span()


@dataclass(slots=True)
class Deny:
    feed: str | None = None       # bytes fed to a denied read, as a string of code points < 256
    exception: str | None = None  # "#UD", "#GP"... for a denied execute
    span: Span = _span()


@dataclass(slots=True)
class Report:
    """`log SEVERITY "template"` or `alert SEVERITY "template"`."""
    kind: str  # "log" | "alert"
    severity: str
    template: str
    span: Span = _span()
    template_span: Span = _span()


@dataclass(slots=True)
class Pause:
    span: Span = _span()


@dataclass(slots=True)
class Disarm:
    span: Span = _span()


@dataclass(slots=True)
class Limit:
    """`limit N per second then ACTION`."""
    rate: Expr
    then: "Action"
    per: str = "second"
    span: Span = _span()


@dataclass(slots=True)
class Priority:
    value: Expr
    span: Span = _span()


Action = Union[Allow, Deny, Report, Pause, Disarm, Limit, Priority]


# ---------------------------------------------------------------- items

@dataclass(slots=True)
class Target:
    """`target xen >= 4.17 on x86_64`."""
    hypervisor: str
    arch: str
    op: str | None = None
    version: str | None = None
    span: Span = _span()


@dataclass(slots=True)
class Symbols:
    paths: list[str]
    span: Span = _span()


@dataclass(slots=True)
class Mode:
    mode: str
    span: Span = _span()


@dataclass(slots=True)
class Const:
    name: str
    value: Expr
    span: Span = _span()


@dataclass(slots=True)
class Region:
    name: str
    terms: list[RegionTerm]
    span: Span = _span()


@dataclass(slots=True)
class Rule:
    trigger: Trigger
    actions: list[Action]
    name: str | None = None
    where: Expr | None = None
    span: Span = _span()


@dataclass(slots=True)
class Include:
    path: str
    span: Span = _span()


Item = Union[Target, Symbols, Mode, Const, Region, Rule, Include]


@dataclass(slots=True)
class PolicyBlock:
    name: str
    items: list[Item]
    span: Span = _span()


@dataclass(slots=True)
class Comment:
    """A `#` comment, kept so the formatter can put it back."""
    text: str
    span: Span = _span()


@dataclass(slots=True)
class PolicyFile:
    """One source file: a policy block, or (for an included file) bare items."""
    path: str
    items: list[Union[PolicyBlock, Item]]
    comments: list[Comment] = field(default_factory=list, compare=False)
    form: str = "dsl"  # "dsl" | "yaml"
    # Names of items that failed to parse: later stages stay quiet about them
    # instead of reporting them as unknown.
    broken_names: set[str] = field(default_factory=set, compare=False)

    @property
    def policy(self) -> PolicyBlock | None:
        blocks = [i for i in self.items if isinstance(i, PolicyBlock)]
        return blocks[0] if blocks else None
