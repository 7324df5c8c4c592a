"""The plan's condition form, from the compiler's side: model conditions lowered to JSON trees.

The form and its one evaluator live in `policyc.condition_form` (which imports
nothing from the compiler's model, so the enforcer and the native engine use it
without the compiler); they are re-exported here. Kafel keeps a BPF interpreter
beside its compiler for the same reason.
"""

from __future__ import annotations

from . import model as M
from .condition_form import U64, Bindings, evaluate, fields_read

__all__ = ["compile_condition", "evaluate", "fields_read", "Bindings"]

Form = list  # a JSON array as above


def compile_condition(c: M.Condition) -> Form:
    """Model condition -> plan form."""
    if isinstance(c, M.Literal):
        return ["lit", _hex(c.value)]
    if isinstance(c, M.Address):
        return ["addr", _hex(c.value), c.percpu]
    if isinstance(c, M.Field):
        return ["field", c.name]
    if isinstance(c, M.Unary):
        return ["neg" if c.op == "-" else "inv", compile_condition(c.operand)]
    if isinstance(c, M.Not):
        return ["not", compile_condition(c.operand)]
    if isinstance(c, (M.Binary, M.Compare, M.Logic)):
        return [c.op, compile_condition(c.left), compile_condition(c.right)]
    if isinstance(c, M.InRegion):
        return ["not_in" if c.negated else "in", compile_condition(c.value), c.region]
    if isinstance(c, M.BitTest):
        return [c.kind, _hex(c.mask)]
    raise TypeError(c)


def _hex(value: int) -> str:
    return hex(value & U64)
