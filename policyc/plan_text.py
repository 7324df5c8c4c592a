"""How the parts of a trap plan read as text, for `policyc explain` and `policyc diff` alike: conditions
back in the DSL's infix spelling (with its precedence, and bit masks by name where every bit has one),
actions, extents, the dispatch entries in the plan's order, and the pages a view restricts.

Reads only the plan (a dict as `policyc.compiler.compile_plan` builds it or `policyc.plan.load_plan` reads it).
"""

from __future__ import annotations

from typing import Iterable

from .arch import ARCHES
from .syntax import PRECEDENCE

__all__ = ["render_condition", "bits_for", "dispatch_entries", "region_pages", "view_pages", "action_text",
           "extent_text"]

_ATOM = 12
_UNARY_OPS = {"neg": "-", "inv": "~"}


def render_condition(form: list | None, bits: dict[str, int] | None = None, register: str | None = None) -> str:
    """A plan-form condition in the DSL's infix spelling. `bits`: the named bits of the register a
    set()/cleared()/changed() test reads (e.g. {"WP": 0x10000}), shown as `register.NAME`."""
    if form is None:
        return "always"
    text, _ = _render(form, bits or {}, register)
    return text


def _render(form: list, bits: dict[str, int], register: str | None) -> tuple[str, int]:
    op = form[0]
    if op == "lit":
        return form[1], _ATOM
    if op == "addr":
        return ("percpu " if form[2] else "va ") + form[1], _ATOM
    if op == "field":
        return form[1], _ATOM
    if op in ("set", "cleared", "changed"):
        return f"{op}({_mask_names(int(form[1], 16), bits, register)})", _ATOM
    if op == "not":
        inner, p = _render(form[1], bits, register)
        prec = PRECEDENCE["not"]
        return "not " + (f"({inner})" if p < prec else inner), prec
    if op in _UNARY_OPS:
        inner, p = _render(form[1], bits, register)
        prec = PRECEDENCE["neg"]
        return _UNARY_OPS[op] + (f"({inner})" if p < prec else inner), prec
    if op in ("in", "not_in"):
        inner, p = _render(form[1], bits, register)
        prec = PRECEDENCE["in"]
        value = f"({inner})" if p <= prec else inner
        return f"{value} {'not in' if op == 'not_in' else 'in'} {form[2]}", prec
    if op in PRECEDENCE:
        prec = PRECEDENCE[op]
        left, lp = _render(form[1], bits, register)
        right, rp = _render(form[2], bits, register)
        if prec == PRECEDENCE["=="]:  # comparisons do not chain
            wrap_left, wrap_right = lp <= prec, rp <= prec
        else:  # left-associative
            wrap_left, wrap_right = lp < prec, rp <= prec
        left = f"({left})" if wrap_left else left
        right = f"({right})" if wrap_right else right
        return f"{left} {op} {right}", prec
    return repr(form), _ATOM  # not a condition the schema allows; show it as it is


def _mask_names(mask: int, bits: dict[str, int], register: str | None) -> str:
    if not bits or not register:
        return hex(mask)
    names = [name for name, bit in sorted(bits.items(), key=lambda kv: (kv[1], kv[0])) if mask & bit]
    covered = 0
    for name in names:
        covered |= bits[name]
    if covered != mask or not names:
        return hex(mask)
    return " | ".join(f"{register}.{name}" for name in names)


def bits_for(plan: dict, table: str, key: str | None) -> tuple[dict[str, int], str | None]:
    """The named bits that a bit test in this dispatch table refers to."""
    arch = ARCHES.get(plan.get("target", {}).get("arch", ""))
    if arch is None or key is None:
        return {}, None
    if table == "write_ctrlreg":
        return arch.named_bits.get(key, {}), key
    if table == "mov_to_msr":
        name = arch.msr_name(int(key, 16))
        if name and name in arch.msr_bits:
            return arch.msr_bits[name], name
    return {}, None

def dispatch_entries(plan: dict) -> Iterable[tuple[str, str | None, dict]]:
    """Every dispatch entry as (table, key or None, entry), in the plan's order."""
    for table, content in sorted(plan.get("dispatch", {}).items()):
        if isinstance(content, list):
            for entry in content:
                yield table, None, entry
        else:
            for key, entries in sorted(content.items()):
                for entry in entries:
                    yield table, key, entry

def region_pages(plan: dict, name: str) -> int | None:
    region = plan.get("regions", {}).get(name)
    return None if region is None else region.get("pages")

def view_pages(plan: dict, view: dict) -> tuple[int, list[str]]:
    """(pages restricted, regions whose pages are bound at install) for one view: the sum of its regions' pages."""
    total, unbound = 0, []
    for rng in view.get("ranges", []):
        pages = region_pages(plan, rng["region"])
        if pages is None:
            unbound.append(rng["region"])
        else:
            total += pages
    return total, unbound

def action_text(action: dict) -> str:
    (kind, value), = action.items()
    if kind in ("log", "alert"):
        return f"{kind} {value['severity']} {_quote(value['template'])}"
    if kind in ("pause", "disarm"):
        return kind
    if kind == "limit":
        then = value["then"]
        then_text = then["verdict"] if set(then) == {"verdict"} else action_text(then)
        return f"limit {value['per_second']} per second then {then_text}"
    return f"{kind} {value}"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

def extent_text(e: dict) -> str:
    if "register" in e:
        return f"register {e['register']} size {e['size']} (base read at install)"
    kind = "percpu " if e.get("percpu") else ""
    reloc = " (+slide)" if e.get("relocatable") else ""
    origin = f"  [{e['origin']}]" if e.get("origin") else ""
    return f"{kind}{e['space']} {e['start']}{reloc} size {e['size']}{origin}"
