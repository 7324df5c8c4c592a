"""The plan's condition form and its reference interpreter; imports nothing from the compiler.

A condition in a trap plan is a nested JSON array, checkable by the plan's
schema (`policyc.plan_expr.compile_condition` produces it from the checked
model):

    ["lit", "0x10"]                 a 64-bit number (hex string)
    ["addr", "0xffff...", percpu]   a link-time address; bound to the guest at install
    ["field", "gla"]                an event field or register
    ["neg" | "inv" | "not", X]
    ["+" | "-" | "*" | "/" | "%" | "<<" | ">>" | "&" | "|" | "^", A, B]
    ["==" | "!=" | "<" | "<=" | ">" | ">=", A, B]
    ["and" | "or", A, B]
    ["in" | "not_in", X, "region"]
    ["set" | "cleared" | "changed", "0xMASK"]   on register writes: old vs new under MASK

Arithmetic wraps at 64 bits, as the guest's registers do; `/` and `%` by zero
give 0; a shift by 64 or more gives 0. Comparisons give 0 or 1.

This module is the one definition of what a form means. The enforcer's
Python engine calls `evaluate`; the native engine (`policyc.runtime.native_engine`)
compiles the same forms to its bytecode and is tested against `evaluate`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

__all__ = ["evaluate", "fields_read", "Bindings", "ARITH", "COMPARE", "U64"]

U64 = (1 << 64) - 1

Form = list  # a JSON array as above


class Bindings:
    """What evaluation needs from the bound guest: the slide, per-CPU bases, region membership."""

    def __init__(self, slide: int = 0, percpu_base: Callable[[int], int] | None = None,
                 in_region: Callable[[str, int, Mapping[str, int]], bool] | None = None) -> None:
        self.slide = slide
        self.percpu_base = percpu_base or (lambda vcpu: 0)
        self.in_region = in_region or (lambda region, value, event: False)


def evaluate(form: Form, event: Mapping[str, int], bindings: Bindings | None = None) -> int | bool:
    """Evaluate a condition form against one event (field name -> value). Missing fields raise KeyError."""
    b = bindings or Bindings()
    op = form[0]
    if op == "lit":
        return int(form[1], 16)
    if op == "addr":
        value = int(form[1], 16)
        base = b.percpu_base(event.get("vcpu", 0)) if form[2] else b.slide
        return (value + base) & U64
    if op == "field":
        return event[form[1]]
    if op in ("set", "cleared", "changed"):
        mask = int(form[1], 16)
        old, new = event["old"] & mask, event["new"] & mask
        if op == "set":
            return (new & ~old) != 0
        if op == "cleared":
            return (old & ~new) != 0
        return old != new
    if op == "not":
        return not evaluate(form[1], event, b)
    if op == "neg":
        return (-evaluate(form[1], event, b)) & U64
    if op == "inv":
        return (~evaluate(form[1], event, b)) & U64
    if op in ("in", "not_in"):
        inside = b.in_region(form[2], evaluate(form[1], event, b), event)
        return inside if op == "in" else not inside
    if op == "and":
        return bool(evaluate(form[1], event, b)) and bool(evaluate(form[2], event, b))
    if op == "or":
        return bool(evaluate(form[1], event, b)) or bool(evaluate(form[2], event, b))
    left, right = evaluate(form[1], event, b), evaluate(form[2], event, b)
    if op in COMPARE:
        return COMPARE[op](left, right)
    return ARITH[op](left, right) & U64


def fields_read(form: Form) -> set[str]:
    """Every event field a condition reads (the enforcer fetches only these)."""
    op = form[0]
    if op == "field":
        return {form[1]}
    if op in ("set", "cleared", "changed"):
        return {"old", "new"}
    out: set[str] = set()
    for part in form[1:]:
        if isinstance(part, list):
            out |= fields_read(part)
    return out


COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}
ARITH: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a // b if b else 0, "%": lambda a, b: a % b if b else 0,
    "<<": lambda a, b: a << b if b < 64 else 0, ">>": lambda a, b: a >> b if b < 64 else 0,
    "&": lambda a, b: a & b, "|": lambda a, b: a | b, "^": lambda a, b: a ^ b,
}
