"""A rule's `where`: typed against its trigger and lowered to the model's condition form.

`_cond` dispatches on the node's type through `_CONDS` and returns the
condition with its type, "bool" or "int". Arithmetic on literals is folded
so the plan's expressions stay small, by the plan's own evaluator
(`condition_form.evaluate`), so a folded value is what the enforcer would compute.
"""

from __future__ import annotations

from typing import Callable

from .. import model as M
from .. import syntax as S
from ..arch import ARCHES, EVENT_FIELDS
from ..condition_form import evaluate
from ..diagnostics import did_you_mean
from ..plan_expr import compile_condition
from .constants import call_value, const_value, fold, named_bit
from .context import ABSENT, Checking, RuleContext, Value, kind_words

__all__ = ["condition", "reads_event"]

Typed = tuple["M.Condition | None", str]  # (the condition, "bool" or "int"); None: reported


def condition(chk: Checking, e: S.Expr, ctx: RuleContext) -> M.Condition | None:
    """A rule's `where` in model form; None when it is not a condition (reported) or had errors."""
    cond, kind = _cond(chk, e, ctx)
    if cond is None:
        return None
    if kind != "bool":
        chk.d.error("PC400", e.span, "a condition must be true or false, not a number",
                    "compare it, e.g. 'rax != 0'")
        return None
    return cond


def reads_event(c: M.Condition) -> bool:
    """Whether the condition depends on the event at all (one that does not is always true or false)."""
    return _READS_EVENT[type(c)](c)


_READS_EVENT: dict[type, Callable[..., bool]] = {
    M.Field: lambda c: True, M.BitTest: lambda c: True, M.InRegion: lambda c: True,
    M.Literal: lambda c: False, M.Address: lambda c: False,
    M.Unary: lambda c: reads_event(c.operand), M.Not: lambda c: reads_event(c.operand),
    M.Binary: lambda c: reads_event(c.left) or reads_event(c.right),
    M.Compare: lambda c: reads_event(c.left) or reads_event(c.right),
    M.Logic: lambda c: reads_event(c.left) or reads_event(c.right),
}


def _cond(chk: Checking, e: S.Expr, ctx: RuleContext) -> Typed:
    typed = _CONDS.get(type(e))
    if typed is None:
        raise TypeError(e)
    return typed(chk, e, ctx)


def _constant(chk: Checking, e: S.Num | S.SymbolRef, ctx: RuleContext) -> Typed:
    return _value_node(chk, fold(chk, e), e), "int"


def _named_bit(chk: Checking, e: S.Attr, ctx: RuleContext) -> Typed:
    v = named_bit(chk, e)
    return (M.Literal(v) if isinstance(v, int) else None), "int"


def _unary(chk: Checking, e: S.Unary, ctx: RuleContext) -> Typed:
    inner, kind = _cond(chk, e.operand, ctx)
    if inner is None:
        return None, "bool" if e.op == "not" else "int"
    if e.op == "not":
        if kind != "bool":
            chk.d.error("PC400", e.span, "'not' takes a condition; for bits use '~'")
            return None, "bool"
        return M.Not(inner), "bool"
    if kind != "int":
        chk.d.error("PC400", e.span, f"'{e.op}' takes a number")
        return None, "int"
    return _folded(M.Unary(e.op, inner)), "int"


def _binary(chk: Checking, e: S.Binary, ctx: RuleContext) -> Typed:
    left, lk = _cond(chk, e.left, ctx)
    right, rk = _cond(chk, e.right, ctx)
    if e.op in ("and", "or"):
        for side, k in ((e.left, lk), (e.right, rk)):
            if k != "bool":
                chk.d.error("PC400", side.span, f"'{e.op}' joins conditions, and this is a number",
                            "compare it, e.g. 'x != 0'")
                return None, "bool"
        return (M.Logic(e.op, left, right) if left and right else None), "bool"
    for side, k in ((e.left, lk), (e.right, rk)):
        if k != "int":
            chk.d.error("PC400", side.span, f"'{e.op}' takes numbers, and this is a condition")
            return None, "bool" if e.op in S.COMPARISONS else "int"
    if left is None or right is None:
        return None, "bool" if e.op in S.COMPARISONS else "int"
    if e.op in S.COMPARISONS:
        return M.Compare(e.op, left, right), "bool"
    if isinstance(left, M.Address) or isinstance(right, M.Address):
        if e.op not in ("+", "-"):
            chk.d.error("PC408", e.span, f"'{e.op}' cannot apply to an address")
            return None, "int"
    if e.op in ("/", "%") and isinstance(right, M.Literal) and right.value == 0:
        chk.d.error("PC407", e.span, "division by zero")
        return None, "int"
    return _folded(M.Binary(e.op, left, right)), "int"


def _in_region(chk: Checking, e: S.InRegion, ctx: RuleContext) -> Typed:
    value, kind = _cond(chk, e.value, ctx)
    if e.region not in chk.regions:
        if e.region not in chk.broken:
            chk.d.error("PC300", e.region_span, f"unknown region '{e.region}'",
                        did_you_mean(e.region, chk.region_defs))
        return None, "bool"
    if kind != "int":
        chk.d.error("PC400", e.value.span, "'in' tests a number (an address) against a region")
        return None, "bool"
    return (M.InRegion(value, e.region, e.negated) if value else None), "bool"


def _call(chk: Checking, e: S.Call, ctx: RuleContext) -> Typed:
    if e.func in ("set", "cleared", "changed"):
        return _bit_test(chk, e, ctx), "bool"
    v = call_value(chk, e)
    return (M.Literal(v) if isinstance(v, int) else None), "int"


_CONDS: dict[type, Callable[[Checking, S.Expr, RuleContext], Typed]] = {
    S.Num: _constant,
    S.SymbolRef: _constant,
    S.Attr: _named_bit,
    S.Name: lambda chk, e, ctx: (_name(chk, e, ctx), "int"),
    S.Unary: _unary,
    S.Binary: _binary,
    S.InRegion: _in_region,
    S.Call: _call,
}


def _value_node(chk: Checking, v: Value, e: S.Expr) -> M.Condition | None:
    if v is None:
        return None
    if v is ABSENT:
        chk.d.error("PC302", e.span, "an absent optional symbol cannot be compared with",
                    "use 'symbol' if the rule needs it, or move the test into a region")
        return None
    if isinstance(v, M.Address):
        return v
    return M.Literal(v)  # type: ignore[arg-type]


def _name(chk: Checking, e: S.Name, ctx: RuleContext) -> M.Condition | None:
    name = e.name
    if name in chk.const_defs:
        return _value_node(chk, const_value(chk, name, []), e)
    fields = EVENT_FIELDS[ctx.kind]
    if name in fields or name in chk.arch.registers:
        return M.Field(name)
    if name in chk.arch.msrs:
        return M.Literal(chk.arch.msrs[name])
    elsewhere = [k for k, fs in EVENT_FIELDS.items() if name in fs]
    if elsewhere:
        chk.d.error("PC401", e.span, f"'{name}' is not available on {kind_words(ctx.kind)} triggers",
                    f"it belongs to {', '.join(kind_words(k) for k in elsewhere)} triggers; here: "
                    f"{', '.join(fields)} and the registers")
        return None
    other_arch = [a for a, info in ARCHES.items() if name in info.registers and a != chk.arch.name]
    hint = did_you_mean(name, list(fields) + list(chk.arch.registers) + list(chk.const_defs))
    if other_arch:
        hint = f"'{name}' is a register on {', '.join(other_arch)}, not on {chk.arch.name}" + (
            f"; {hint}" if hint else "")
    chk.d.error("PC402", e.span, f"unknown name '{name}'", hint)
    return None


def _bit_test(chk: Checking, e: S.Call, ctx: RuleContext) -> M.Condition | None:
    if ctx.kind not in ("control_register", "msr"):
        chk.d.error("PC401", e.span, f"{e.func}() compares the old and new value of a register write; "
                    f"{kind_words(ctx.kind)} triggers have none",
                    "use it on 'on write cr0|cr4|xcr0' or 'on write msr ...'")
        return None
    if len(e.args) != 1:
        chk.d.error("PC420", e.span, f"{e.func}() takes one argument: the bits, e.g. {e.func}(cr0.WP)")
        return None
    mask = fold(chk, e.args[0])
    if not isinstance(mask, int) or isinstance(mask, bool):
        if mask is not None:
            chk.d.error("PC400", e.args[0].span, f"{e.func}() takes bits (a number), e.g. cr4.SMEP | cr4.SMAP")
        return None
    for attr in _attrs(e.args[0]):
        owner = attr.base.lower()
        if owner == "access" or owner == (ctx.register or "").lower():
            continue
        chk.d.error("PC400", attr.span, f"{attr.base}.{attr.attr} is a bit of {attr.base}, but this rule "
                    f"watches writes to {ctx.register or 'an MSR'}")
        return None
    if mask == 0:
        chk.d.error("PC405", e.args[0].span, f"{e.func}() of no bits is never true")
        return None
    return M.BitTest(e.func, mask)


def _attrs(e: S.Expr) -> list[S.Attr]:
    """The named bits (`cr4.SMEP`) an expression of bits is made of."""
    parts = _ATTRS.get(type(e))
    return parts(e) if parts is not None else []


_ATTRS: dict[type, Callable[..., list[S.Attr]]] = {
    S.Attr: lambda e: [e],
    S.Binary: lambda e: _attrs(e.left) + _attrs(e.right),
    S.Unary: lambda e: _attrs(e.operand),
}

# The operators folded on literals; the plan keeps `/ % << >>` as written (the evaluator decides them).
_FOLDED_OPS = frozenset({"+", "-", "*", "&", "|", "^"})
_NO_EVENT: dict[str, int] = {}


def _folded(node: M.Unary | M.Binary) -> M.Condition:
    """`node` with its literal operands folded into one literal, by the plan's evaluator."""
    if type(node) is M.Unary:
        operand = node.operand
        if type(operand) is not M.Literal:
            return node
        if node.op == "-":
            # A negation keeps its sign in the model (the policy's hash has always spelled `-4` so);
            # the plan's form is the same either way: it writes every literal modulo 2**64.
            return M.Literal(-operand.value)
    elif not (node.op in _FOLDED_OPS and type(node.left) is M.Literal and type(node.right) is M.Literal):
        return node
    return M.Literal(evaluate(compile_condition(node), _NO_EVENT))
