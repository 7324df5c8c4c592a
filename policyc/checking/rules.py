"""Pass `check_rules`: each rule's trigger (per architecture), its condition (typed per trigger) and
its actions; a rule with an error is left out of the policy.

`_trigger` dispatches on the trigger's type through `_TRIGGERS`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from .. import model as M
from .. import syntax as S
from ..arch import ARCHES, CONTROL_REGISTERS, DESCRIPTOR_REGISTERS, RESERVED_REGION_NAMES
from ..diagnostics import Span, did_you_mean
from .actions import check_actions
from .conditions import condition, reads_event
from .constants import fold
from .context import ABSENT, KEYWORD_NAMES, Checking, RuleContext, keyword_name
from .regions import region_terms

__all__ = ["check_rules"]

Checked = tuple["M.Trigger | None", "RuleContext | None"]  # the trigger (None: an error) and its context


def check_rules(chk: Checking) -> None:
    """`chk.rules`: every rule that checked without an error, in source order; a name used twice is an error."""
    names: dict[str, Span] = {}
    for u in chk.units_of(S.Rule):
        r = u.item
        if r.name in KEYWORD_NAMES and keyword_name(chk, r.name, "rule", r.span):
            continue
        generated = r.name is None
        name = r.name or _generated_rule_name(u.file, r.span)
        if name in names:
            chk.d.error("PC301", r.span, f"rule '{name}' is defined twice", f"the first is at {names[name]}")
            continue
        names[name] = r.span
        rule = _rule(chk, r, name, generated)
        if rule is not None:
            chk.rules.append(rule)


def _generated_rule_name(file: Path, span: Span) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", file.stem)
    return f"{stem}_L{span.line}"


def _rule(chk: Checking, r: S.Rule, name: str, generated: bool) -> M.Rule | None:
    errors_before = chk.d.error_count
    trigger, ctx = _trigger(chk, r.trigger, name)
    cond = None
    if r.where is not None and ctx is not None:
        cond = condition(chk, r.where, ctx)
        if cond is not None and not reads_event(cond) and chk.d.error_count == errors_before:
            chk.d.warning("PC421", r.where.span, "this condition does not depend on the event: "
                          "it is always true or always false")
    actions, priority = check_actions(chk, r, ctx)
    if trigger is None or chk.d.error_count != errors_before:
        return None
    return M.Rule(name, trigger, cond, tuple(actions), priority, generated, r.span)


def _trigger(chk: Checking, t: S.Trigger, rule_name: str) -> Checked:
    check = _TRIGGERS.get(type(t))
    if check is None:
        raise TypeError(t)
    result, ctx = check(chk, t, rule_name)
    if result is not None and result.kind not in chk.arch.triggers:
        where = [a for a, info in ARCHES.items() if result.kind in info.triggers]
        chk.d.error("PC418", t.span, f"'{_TRIGGER_WORDS[result.kind]}' triggers do not exist on {chk.arch.name}",
                    f"they exist on: {', '.join(where)}" if where else None)
        return None, ctx
    return result, ctx


def _memory(chk: Checking, t: S.MemoryTrigger, rule_name: str) -> Checked:
    names = []
    for i, term in enumerate(t.regions):
        if type(term) is S.RegionRef:
            if term.name in chk.regions:
                names.append(term.name)
            elif term.name in RESERVED_REGION_NAMES:
                chk.d.error("PC400", term.span, f"'{term.name}' is a register, not a region",
                            f"for register writes write 'on write {term.name}'")
            elif term.name not in chk.broken and term.name not in chk.region_defs:
                chk.d.error("PC300", term.span, f"unknown region '{term.name}'",
                            did_you_mean(term.name, chk.region_defs))
            continue
        inline = f"{rule_name}#{i + 1}"
        chk.regions[inline] = M.Region(inline, tuple(region_terms(chk, term, [])), term.span)
        names.append(inline)
    return M.MemoryTrigger(t.access, tuple(names), t.span), _MEMORY


_MEMORY = RuleContext("memory")  # (no pass changes a context: one for every memory rule)


def _execute(chk: Checking, t: S.ExecuteTrigger, rule_name: str) -> Checked:
    result = None
    v = fold(chk, t.address)
    literal = isinstance(v, int)
    if literal:
        v = M.Address(v, False, f"{t.space or 'va'} 0x{v:x}")
    if isinstance(v, M.Address) and v.percpu:
        chk.d.error("PC305", t.span, "a breakpoint needs a code address, not a per-CPU offset")
    elif v is ABSENT:
        chk.d.error("PC302", t.span, "the breakpoint's optional symbol is absent: nothing to execute")
    elif isinstance(v, M.Address):
        result = M.Breakpoint(v, t.span, relocatable=not literal, physical=t.space == "pa")
    return result, RuleContext("breakpoint")


def _register(chk: Checking, t: S.RegisterTrigger, rule_name: str) -> Checked:
    reg = t.register
    if reg in CONTROL_REGISTERS:
        result = None
        if t.access == "read":
            chk.d.error("PC418", t.span, f"Xen cannot trap reads of {reg}",
                        f"monitor writes instead: 'on write {reg}'")
        else:
            result = M.ControlRegisterTrigger(reg, t.span)
        return result, RuleContext("control_register", reg)
    if reg in DESCRIPTOR_REGISTERS:
        return M.DescriptorTrigger(t.access, reg, t.span), RuleContext("descriptor", reg)
    hint = did_you_mean(reg, CONTROL_REGISTERS + DESCRIPTOR_REGISTERS)
    if reg in chk.regions or reg in chk.region_defs:
        hint = f"for writes to the region write 'on {t.access} {'to' if t.access == 'write' else 'of'} {reg}'"
    elif reg in chk.arch.msrs or reg.upper() in chk.arch.msrs:
        hint = f"'{reg}' is an MSR: write 'on write msr {reg}'"
    chk.d.error("PC402", t.span, f"cannot trap {t.access}s of '{reg}'",
                hint or "registers: cr0 cr3 cr4 xcr0 (write); idtr gdtr ldtr tr (read, write)")
    return None, None


def _msr_trigger(chk: Checking, t: S.MsrTrigger, rule_name: str) -> Checked:
    index, name = _msr(chk, t.msr)
    result = M.MsrTrigger(index, name, t.span) if index is not None else None
    return result, RuleContext("msr", name, name)


def _cpuid(chk: Checking, t: S.CpuidTrigger, rule_name: str) -> Checked:
    leaf = None
    if t.leaf is not None:
        v = fold(chk, t.leaf)
        if isinstance(v, int) and not 0 <= v <= 0xFFFFFFFF:
            chk.d.error("PC406", t.leaf.span, "a CPUID leaf is a 32-bit number")
        elif isinstance(v, int):
            leaf = v
        elif v is not None:
            chk.d.error("PC400", t.leaf.span, "a CPUID leaf is a number")
    return M.CpuidTrigger(leaf, t.span), RuleContext("cpuid")


_TRIGGERS: dict[type, Callable[[Checking, S.Trigger, str], Checked]] = {
    S.MemoryTrigger: _memory,
    S.ExecuteTrigger: _execute,
    S.RegisterTrigger: _register,
    S.MsrTrigger: _msr_trigger,
    S.CpuidTrigger: _cpuid,
    S.EventTrigger: lambda chk, t, rule_name: (M.EventTrigger(t.kind, t.span), RuleContext(t.kind)),
}

_TRIGGER_WORDS = {"memory": "memory access", "breakpoint": "execute (breakpoint)",
                  "control_register": "control register", "msr": "MSR write", "descriptor": "descriptor register",
                  "cpuid": "cpuid", "guest_request": "guest_request", "debug_exception": "debug_exception",
                  "smc": "smc"}


def _msr(chk: Checking, e: S.Expr) -> tuple[int | None, str | None]:
    """An MSR's index and name: by name (`IA32_LSTAR`, `lstar`), or a number or constant."""
    if type(e) is S.Name:
        if e.name in chk.arch.msrs:
            return chk.arch.msrs[e.name], e.name
        upper = e.name.upper().removeprefix("MSR_").removeprefix("IA32_")
        if upper in chk.arch.msrs and e.name not in chk.const_defs:
            return chk.arch.msrs[upper], upper
        if e.name in chk.const_defs:
            v = fold(chk, e)
            if isinstance(v, int):
                return v, chk.arch.msr_name(v)
            return None, None
        chk.d.error("PC404", e.span, f"unknown MSR '{e.name}'",
                    did_you_mean(e.name, chk.arch.msrs) or "give its number: 'on write msr 0xc0000082'")
        return None, None
    v = fold(chk, e)
    if isinstance(v, int):
        if not 0 <= v <= 0xFFFFFFFF:
            chk.d.error("PC406", e.span, "an MSR index is a 32-bit number")
            return None, None
        return v, chk.arch.msr_name(v)
    return None, None
