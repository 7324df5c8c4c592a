"""Pass `fold_constants`, and the folding of every expression that must be known at compile time.

`fold` takes an expression to a number or a link-time address (`M.Address`);
it dispatches on the node's type through `_FOLDS`. Constants are folded in
dependency order, on first use; one defined in terms of itself is an error.
Arithmetic on numbers is the plan's (`condition_form.ARITH`), with what the plan
would wrap (a division by zero, a shift out of 0..63, a result out of 64 bits)
an error here instead.
"""

from __future__ import annotations

from typing import Callable

from .. import model as M
from .. import syntax as S
from ..arch import EVENT_FIELDS
from ..condition_form import ARITH
from ..diagnostics import did_you_mean
from .context import ABSENT, U64, Checking, Value, collect_definitions, cycle
from .symbols import lookup_symbol

__all__ = ["fold_constants", "fold", "const_value", "named_bit", "call_value"]


def fold_constants(chk: Checking) -> None:
    """`chk.const_defs` (a name defined twice is an error) and `chk.const_values`, each folded once."""
    collect_definitions(chk, S.Const, "constant", chk.const_defs)
    for name in chk.const_defs:
        const_value(chk, name, [])


def const_value(chk: Checking, name: str, stack: list[str]) -> Value:
    """The value of constant `name` (folded now if it was not yet); `stack`: the constants being folded."""
    if name in chk.const_values:
        return chk.const_values[name]
    c = chk.const_defs[name]
    chain = cycle(stack, name)
    if chain is not None:
        chk.d.error("PC314", c.span, f"constant '{name}' is defined in terms of itself: {chain}")
        chk.const_values[name] = None
        return None
    value = fold(chk, c.value, stack + [name])
    if value is ABSENT:
        chk.d.error("PC400", c.value.span, f"constant '{name}' is an absent optional symbol")
        value = None
    chk.const_values[name] = value
    return value


def fold(chk: Checking, e: S.Expr, stack: list[str] | None = None) -> Value:
    """Fold an expression that must be known at compile time: a number or an address."""
    folder = _FOLDS.get(type(e))
    if folder is None:
        raise TypeError(e)
    return folder(chk, e, _NO_STACK if stack is None else stack)


_NO_STACK: list[str] = []  # (shared, never changed: a fold that goes deeper passes stack + [name])


def _num(chk: Checking, e: S.Num, stack: list[str]) -> Value:
    if e.value > U64:
        chk.d.error("PC406", e.span, "number does not fit in 64 bits", f"the largest is 0x{U64:x}")
        return None
    return e.value


def _name(chk: Checking, e: S.Name, stack: list[str]) -> Value:
    if e.name in chk.const_defs:
        return const_value(chk, e.name, stack)
    if e.name in chk.broken:
        return None
    hint = did_you_mean(e.name, chk.const_defs)
    if e.name in chk.arch.registers or any(e.name in f for f in EVENT_FIELDS.values()):
        hint = f"'{e.name}' is only known when an event arrives: use it in a rule's 'where'"
    chk.d.error("PC300", e.span, f"unknown constant '{e.name}'", hint)
    return None


def _unary(chk: Checking, e: S.Unary, stack: list[str]) -> Value:
    if e.op == "not":
        chk.d.error("PC400", e.span, "'not' gives true/false; a number is needed here")
        return None
    v = fold(chk, e.operand, stack)
    if v is None or v is ABSENT:
        return v
    if isinstance(v, M.Address):
        chk.d.error("PC408", e.span, f"'{e.op}' cannot apply to an address")
        return None
    # A negation keeps its sign (`-1` is the constant -1, so the policy's hash spells it); `~` wraps.
    return -v if e.op == "-" else (~v) & U64  # type: ignore[operator]


def _binary(chk: Checking, e: S.Binary, stack: list[str]) -> Value:
    if e.op in _TRUTHS:
        chk.d.error("PC400", e.span, f"'{e.op}' gives true/false; a number is needed here")
        return None
    if e.op in OFFSETS and type(e.right) is S.Num and e.right.value <= U64:
        return _offsets(chk, e, stack)
    # (`fold` inlined: a region's address is a chain of these, and there are 100,000 regions)
    left, right = e.left, e.right
    left = (_FOLDS.get(type(left)) or _unknown)(chk, left, stack)
    right = (_FOLDS.get(type(right)) or _unknown)(chk, right, stack)
    if left is None or right is None:
        return None
    if left is ABSENT or right is ABSENT:
        return ABSENT
    return _arith(chk, e, left, right)  # type: ignore[arg-type]


_TRUTHS = S.COMPARISONS | {"and", "or"}
OFFSETS = frozenset({"+", "-"})  # (the operators `_offsets` folds a chain of; a test empties it)


def _offsets(chk: Checking, e: S.Binary, stack: list[str]) -> Value:
    """`x + n - m ...`, numbers (that fit in 64 bits) added to or taken from one operand, as `_binary`
    folds it step by step, in one loop: the operand first, then each step's arithmetic in turn (a number
    folds to itself with no diagnostic). Off an address (`symbol S - 0x1000 + 8`, how regions are
    written), the steps make one Address, not one a step."""
    steps = []
    while type(e) is S.Binary and e.op in OFFSETS and type(e.right) is S.Num and e.right.value <= U64:
        steps.append(e)
        e = e.left
    steps.reverse()
    value = (_FOLDS.get(type(e)) or _unknown)(chk, e, stack)
    for i, step in enumerate(steps):
        if value is None or value is ABSENT:
            return value
        if type(value) is M.Address:
            at, parts = value.value, [value.origin]
            for rest in steps[i:]:
                n = rest.right.value
                at = at + n if rest.op == "+" else at - n
                parts.append(f"{rest.op} 0x{n:x}")
            return M.Address(at, value.percpu, " ".join(parts))
        value = _arith(chk, step, value, step.right.value)  # type: ignore[arg-type]
    return value


def _unknown(chk: Checking, e: S.Expr, stack: list[str]) -> Value:
    raise TypeError(e)


def _in_region(chk: Checking, e: S.InRegion, stack: list[str]) -> Value:
    chk.d.error("PC400", e.span, "'in' gives true/false; a number is needed here")
    return None


_FOLDS: dict[type, Callable[[Checking, S.Expr, list[str]], Value]] = {
    S.Num: _num,
    S.Name: _name,
    S.Attr: lambda chk, e, stack: named_bit(chk, e),
    S.SymbolRef: lambda chk, e, stack: lookup_symbol(chk, e),
    S.Unary: _unary,
    S.Binary: _binary,
    S.Call: lambda chk, e, stack: call_value(chk, e),
    S.InRegion: _in_region,
}


def _arith(chk: Checking, e: S.Binary, left: int | M.Address, right: int | M.Address) -> Value:
    la, ra = isinstance(left, M.Address), isinstance(right, M.Address)
    if la or ra:
        if e.op == "+" and not (la and ra):
            a, n = (left, right) if la else (right, left)
            return M.Address(a.value + n, a.percpu, f"{a.origin} + 0x{n:x}")  # type: ignore[union-attr,operator]
        if e.op == "-" and la and not ra:
            return M.Address(left.value - right, left.percpu, f"{left.origin} - 0x{right:x}")  # type: ignore
        if e.op == "-" and la and ra:
            if left.percpu != right.percpu:  # type: ignore[union-attr]
                chk.d.error("PC408", e.span, "subtracting a per-CPU offset from an address means nothing")
                return None
            return left.value - right.value  # type: ignore[union-attr]
        chk.d.error("PC408", e.span, f"'{e.op}' cannot combine these: an address only takes + or - a number",
                    "addresses move by the KASLR slide at install; only offsets from them keep their meaning")
        return None
    a, b = int(left), int(right)  # type: ignore[arg-type]
    if e.op in ("/", "%") and b == 0:
        chk.d.error("PC407", e.span, "division by zero")
        return None
    if e.op in ("<<", ">>") and not 0 <= b < 64:
        chk.d.error("PC406", e.span, f"shift by {b}: shifts take 0..63")
        return None
    # The plan's operators; the cases where they differ from exact arithmetic were refused above.
    result = ARITH[e.op](a, b)
    if not -(1 << 63) <= result <= U64:
        chk.d.error("PC406", e.span, f"the result {result:#x} does not fit in 64 bits")
        return None
    return result


def named_bit(chk: Checking, e: S.Attr) -> Value:
    """`cr4.SMEP` and the like: a named bit of a register on the target's architecture."""
    bits = chk.arch.named_bits.get(e.base)
    if bits is None:
        lowered = {k.lower(): k for k in chk.arch.named_bits}
        if e.base.lower() in lowered:
            bits = chk.arch.named_bits[lowered[e.base.lower()]]
        else:
            chk.d.error("PC402", e.span, f"'{e.base}' has no named bits on {chk.arch.name}",
                        did_you_mean(e.base, chk.arch.named_bits) or
                        f"named bits exist for: {', '.join(chk.arch.named_bits)}")
            return None
    if e.attr not in bits:
        chk.d.error("PC403", e.span, f"{e.base} has no bit '{e.attr}'",
                    did_you_mean(e.attr, bits) or f"its bits: {', '.join(bits)}")
        return None
    return bits[e.attr]


def call_value(chk: Checking, e: S.Call) -> Value:
    """`offsetof(T, m)` and `sizeof(T)` from the ISF's types; the bit tests are no values."""
    if e.func in ("offsetof", "sizeof"):
        return _type_layout(chk, e)
    if e.func in ("set", "cleared", "changed"):
        chk.d.error("PC400", e.span, f"{e.func}() gives true/false and is only meaningful in a rule's 'where'")
        return None
    chk.d.error("PC419", e.span, f"unknown function '{e.func}'",
                did_you_mean(e.func, ["offsetof", "sizeof", "set", "cleared", "changed"]))
    return None


def _type_layout(chk: Checking, e: S.Call) -> Value:
    want = 2 if e.func == "offsetof" else 1
    if len(e.args) != want:
        chk.d.error("PC420", e.span, f"{e.func} takes {want} argument{'s' if want > 1 else ''}")
        return None
    type_name = _plain_name(e.args[0])
    if type_name is None:
        chk.d.error("PC400", e.args[0].span, f"{e.func} takes a type name")
        return None
    tables = [t for t in chk.tables if t.types]
    if not tables:
        chk.d.error("PC309", e.span, f"{e.func} needs type information",
                    "declare a Volatility 3 ISF symbol file (a System.map has no types)")
        return None
    member_path = _member_path(e.args[1]) if want == 2 else []
    if want == 2 and member_path is None:
        chk.d.error("PC400", e.args[1].span, "offsetof takes a member name (or a.b for nested members)")
        return None
    errors = []
    for t in tables:
        try:
            return t.offsetof(type_name, member_path) if want == 2 else t.sizeof(type_name)
        except KeyError as exc:
            errors.append(str(exc.args[0]))
    near = did_you_mean(type_name, [n for t in tables for n in t.types if abs(len(n) - len(type_name)) < 4])
    if member_path and type_name in tables[0].types:
        near = did_you_mean(member_path[-1], tables[0].types[type_name].fields)
    chk.d.error("PC309", e.span, errors[0], near)
    return None


def _plain_name(e: S.Expr) -> str | None:
    return e.name if type(e) is S.Name else None


# A member path as written: `m`, or `a.b` for a nested member (which the parser reads as an Attr).
_MEMBER_PATHS: dict[type, Callable[[S.Expr], list[str]]] = {
    S.Name: lambda e: [e.name],
    S.Attr: lambda e: [e.base, e.attr],
}


def _member_path(e: S.Expr) -> list[str] | None:
    path = _MEMBER_PATHS.get(type(e))
    return path(e) if path is not None else None
