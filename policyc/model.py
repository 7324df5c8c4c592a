"""The checked model: one policy, names resolved, constants folded, types checked.

This is where the DSL and the YAML spelling meet for good; the compiler back
end reads only this. Addresses stay relocatable (`Address`): the link-time
value of a symbol expression, to which the enforcer adds the guest's slide.
Spans ride along for diagnostics in later stages but never take part in
equality, so a policy and its reformatted twin give equal models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Union

from .diagnostics import Span

__all__ = [
    "Address", "BitTest", "Binary", "Breakpoint", "Compare", "Condition", "ControlRegisterTrigger",
    "CpuidTrigger", "DescriptorTrigger", "EventTrigger", "Extent", "Field", "InRegion", "Literal", "Logic",
    "LogAction", "MemoryTrigger", "MsrTrigger", "Not", "Policy", "Region", "RegisterExtent", "Rule",
    "RateLimit", "Target", "Unary", "Verdict", "canonical_json",
]

NOWHERE = Span("<none>", 1, 1)

# Model objects are never changed once made, but they are not frozen dataclasses (`unsafe_hash` gives them
# the hash a frozen one has): a frozen dataclass's constructor sets each field through object.__setattr__
# and costs three to four times as much, and checking a 10 MB policy makes a million of them (as with
# `diagnostics.Span`).


def _span() -> Span:
    return field(default=NOWHERE, compare=False, repr=False)


class _cached:
    """functools.cached_property without its lock (Python 3.11 takes one for every first computation: a
    tenth of a second over 82,000 rules). Like it, a non-data descriptor: once the value is in the
    instance's __dict__, the attribute is read from there."""

    def __init__(self, func) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


@dataclass(slots=True, unsafe_hash=True)
class Address:
    """A kernel address before binding: `value` (link-time) plus the slide found at install.

    `percpu` addresses are offsets into the per-CPU area of the vCPU that raised the event.
    """
    value: int
    percpu: bool = False
    origin: str = field(default="", compare=False)  # e.g. "symbol sys_call_table + 0x1f0", for explain


@dataclass(slots=True, unsafe_hash=True)
class Target:
    hypervisor: str = "xen"
    min_version: tuple[int, ...] = (4, 17)
    arch: str = "x86_64"

    def __str__(self) -> str:
        return f"{self.hypervisor} >= {'.'.join(map(str, self.min_version))} on {self.arch}"


# ---------------------------------------------------------------- regions

@dataclass(slots=True, unsafe_hash=True)
class Extent:
    """A byte range. `space` is "va" (kernel virtual, relocatable when `start` is an Address) or "pa"."""
    space: str
    start: Address | int
    size: int
    span: Span = _span()


@dataclass(slots=True, unsafe_hash=True)
class RegisterExtent:
    """A range whose base is read from a descriptor-table register at bind time."""
    register: str  # "idtr" | "gdtr"
    size: int
    span: Span = _span()


@dataclass(slots=True, unsafe_hash=True)
class Region:
    name: str
    extents: tuple[Extent | RegisterExtent, ...]
    span: Span = _span()

    @property
    def empty(self) -> bool:
        return not self.extents


# ---------------------------------------------------------------- conditions

@dataclass(slots=True, unsafe_hash=True)
class Literal:
    value: int


@dataclass(slots=True, unsafe_hash=True)
class Field:
    """An event field or a register, read from the request."""
    name: str


@dataclass(slots=True, unsafe_hash=True)
class Unary:
    op: str  # "-", "~"
    operand: "Condition"


@dataclass(slots=True, unsafe_hash=True)
class Binary:
    op: str  # + - * / % << >> & | ^
    left: "Condition"
    right: "Condition"


@dataclass(slots=True, unsafe_hash=True)
class Compare:
    op: str  # == != < <= > >=
    left: "Condition"
    right: "Condition"


@dataclass(slots=True, unsafe_hash=True)
class Logic:
    op: str  # "and" | "or"
    left: "Condition"
    right: "Condition"


@dataclass(slots=True, unsafe_hash=True)
class Not:
    operand: "Condition"


@dataclass(slots=True, unsafe_hash=True)
class InRegion:
    value: "Condition"
    region: str
    negated: bool = False


@dataclass(slots=True, unsafe_hash=True)
class BitTest:
    """`set(BITS)`, `cleared(BITS)`, `changed(BITS)` on a register write: compares old and new under `mask`."""
    kind: str  # "set" | "cleared" | "changed"
    mask: int


Condition = Union[Literal, Address, Field, Unary, Binary, Compare, Logic, Not, InRegion, BitTest]


# ---------------------------------------------------------------- triggers

@dataclass(slots=True, unsafe_hash=True)
class MemoryTrigger:
    access: str  # "read" | "write" | "execute" | "access"
    regions: tuple[str, ...]  # names into Policy.regions (inline regions get generated names)
    span: Span = _span()
    kind: str = field(default="memory", init=False)


@dataclass(slots=True, unsafe_hash=True)
class Breakpoint:
    address: Address
    span: Span = _span()
    kind: str = field(default="breakpoint", init=False)
    # `execute symbol S` is a link-time address the slide moves; `execute va 0x...` is where the code is
    # in the running guest, and `execute pa 0x...` a guest-physical address (no translation).
    relocatable: bool = True
    physical: bool = False


@dataclass(slots=True, unsafe_hash=True)
class ControlRegisterTrigger:
    register: str  # cr0 cr3 cr4 xcr0
    span: Span = _span()
    kind: str = field(default="control_register", init=False)


@dataclass(slots=True, unsafe_hash=True)
class MsrTrigger:
    index: int
    name: str | None = None
    span: Span = _span()
    kind: str = field(default="msr", init=False)


@dataclass(slots=True, unsafe_hash=True)
class DescriptorTrigger:
    access: str  # "read" | "write"
    register: str  # idtr gdtr ldtr tr
    span: Span = _span()
    kind: str = field(default="descriptor", init=False)


@dataclass(slots=True, unsafe_hash=True)
class CpuidTrigger:
    leaf: int | None = None
    span: Span = _span()
    kind: str = field(default="cpuid", init=False)


@dataclass(slots=True, unsafe_hash=True)
class EventTrigger:
    event: str  # guest_request | debug_exception | smc
    span: Span = _span()

    @property
    def kind(self) -> str:
        return self.event


Trigger = Union[MemoryTrigger, Breakpoint, ControlRegisterTrigger, MsrTrigger, DescriptorTrigger, CpuidTrigger,
                EventTrigger]


# ---------------------------------------------------------------- actions and rules

@dataclass(slots=True, unsafe_hash=True)
class Verdict:
    """What happens to the access. `deny` details: bytes fed to a read, exception injected on execute."""
    verdict: str  # "allow" | "deny"
    feed: bytes | None = None
    exception: str | None = None
    span: Span = _span()


@dataclass(slots=True, unsafe_hash=True)
class LogAction:
    kind: str  # "log" | "alert"
    severity: str
    template: str
    fields: tuple[str, ...] = ()  # the {field}s the template reads
    span: Span = _span()


@dataclass(slots=True, unsafe_hash=True)
class RateLimit:
    per_second: int
    then: "Action"
    span: Span = _span()


@dataclass(slots=True, unsafe_hash=True)
class Pause:
    span: Span = _span()


@dataclass(slots=True, unsafe_hash=True)
class Disarm:
    span: Span = _span()


Action = Union[Verdict, LogAction, RateLimit, Pause, Disarm]


@dataclass(unsafe_hash=True)
class Rule:
    name: str
    trigger: Trigger
    condition: Condition | None
    actions: tuple[Action, ...]
    priority: int = 0
    generated_name: bool = field(default=False, compare=False)
    span: Span = _span()

    @_cached
    def verdict(self) -> str:
        """The rule's own verdict: deny if it says deny anywhere (also behind a limit), else allow. Asked
        for a rule by every pass of the back end: worked out once."""
        for a in self.actions:
            while type(a) is RateLimit:
                a = a.then
            if type(a) is Verdict and a.verdict == "deny":
                return "deny"
        return "allow"


@dataclass(slots=True, unsafe_hash=True)
class SymbolSource:
    path: str = field(compare=False)
    name: str  # the file name as written
    sha256: str


@dataclass(unsafe_hash=True)
class Policy:
    name: str
    target: Target
    mode: str  # "enforce" | "audit"
    symbols: tuple[SymbolSource, ...]
    constants: tuple[tuple[str, int], ...]
    regions: tuple[Region, ...]
    rules: tuple[Rule, ...]
    files: tuple[str, ...] = field(default=(), compare=False)
    span: Span = _span()

    def region(self, name: str) -> Region:
        return self._regions_by_name[name]

    def rule(self, name: str) -> Rule:
        return self._rules_by_name[name]

    @_cached
    def _regions_by_name(self) -> dict[str, Region]:
        # Policies hold up to ~100,000 regions: lookups by name must not scan.
        return {r.name: r for r in self.regions}

    @_cached
    def _rules_by_name(self) -> dict[str, Rule]:
        return {r.name: r for r in self.rules}

    def content_hash(self) -> str:
        """A hash of what the policy means (not how it is spelled or where it lives)."""
        return hashlib.sha256(canonical_json(self).encode()).hexdigest()


def canonical_json(obj: object) -> str:
    """Deterministic JSON of a model object: spans and file paths excluded, integers as hex strings."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))


# The compared fields of each dataclass met so far (a policy has 100,000s of model objects).
_COMPARED: dict[type, tuple[str, ...]] = {}


def _plain(obj: object) -> object:
    kind = type(obj)
    compared = _COMPARED.get(kind)
    if compared is not None:
        out: dict = {"_": kind.__name__}
        for name in compared:
            out[name] = _plain(getattr(obj, name))
        return out
    if kind is str or obj is None or kind is bool:
        return obj
    if kind is int:
        return hex(obj)  # type: ignore[arg-type]
    if kind is tuple or kind is list:
        return [_plain(x) for x in obj]  # type: ignore[attr-defined]
    if is_dataclass(obj):
        _COMPARED[kind] = tuple(f.name for f in fields(obj) if f.compare)
        return _plain(obj)
    if isinstance(obj, bool) or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return hex(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, (tuple, list)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    raise TypeError(f"cannot serialise {type(obj).__name__}")
