"""The trap plan as an artifact: canonical bytes, content hash, schema, loading.

A plan is JSON with sorted keys and every integer that could be an address
written as a hex string (addresses exceed 2^63; JSON readers that go through
doubles would corrupt them). The same policy and target always give the same
bytes: nothing in a plan depends on the machine, the time or file locations.
`content_hash` is the SHA-256 of the plan's canonical bytes without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
from importlib import resources
from pathlib import Path

from .errors import PolicycError

__all__ = ["dump_plan", "load_plan", "plan_schema", "reference_problems", "format_width_over_bound", "MAX_FORMAT_WIDTH", "seal", "validate_plan", "PlanError"]


class PlanError(PolicycError):
    """A plan file that cannot be used."""


def seal(plan: dict) -> dict:
    """Add `content_hash` (over everything else)."""
    body = {k: v for k, v in plan.items() if k != "content_hash"}
    body["content_hash"] = "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest()
    return body


def dump_plan(plan: dict) -> str:
    """The plan's canonical text: sorted keys, two-space indent, trailing newline.

    Byte for byte `json.dumps(plan, indent=2, sort_keys=True, ensure_ascii=True)`: the standard
    library writes indented JSON in pure Python through generators, about twice as slow as appending
    to one list here (a plan of 10,000 rules is 16 MB of text)."""
    out: list[str] = []
    _indented(plan, "\n", out)
    out.append("\n")
    return "".join(out)


def _indented(value: object, newline: str, out: list[str]) -> None:
    """Append `value` as indented JSON; `newline` is a line break plus the current indent."""
    kind = type(value)
    if kind is str:
        out.append(_quote(value))  # type: ignore[arg-type]
    elif kind is dict:
        if not value:
            out.append("{}")
            return
        inner = newline + "  "
        first = True
        for key in sorted(value):  # type: ignore[call-overload]
            out.append(("{" if first else ",") + inner + _key(key) + ": ")
            first = False
            _indented(value[key], inner, out)  # type: ignore[index]
        out.append(newline + "}")
    elif kind is list or kind is tuple:
        if not value:
            out.append("[]")
            return
        inner = newline + "  "
        first = True
        for item in value:  # type: ignore[attr-defined]
            out.append(("[" if first else ",") + inner)
            first = False
            _indented(item, inner, out)
        out.append(newline + "]")
    elif kind is int:
        out.append(int.__repr__(value))  # type: ignore[arg-type]
    elif value is True or value is False or value is None:
        out.append("true" if value is True else "false" if value is False else "null")
    else:
        out.append(json.dumps(value))  # floats as json writes them


def _key(key: object) -> str:
    if type(key) is str:
        return _quote(key)  # type: ignore[arg-type]
    return _quote(json.dumps(key).strip('"'))  # json's own spelling of a non-string key


_quote = json.encoder.encode_basestring_ascii


MAX_FORMAT_WIDTH = 128   # a message field's width or precision: wider than any register in binary
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?(?P<width>\d*)[_,]?(?:\.(?P<precision>\d*))?[A-Za-z%]?", re.S)


def format_width_over_bound(spec: str) -> int:
    """The width or precision a format spec asks for when above MAX_FORMAT_WIDTH, else 0.

    Checked before `format()` is tried: trying `{gla:>99999999}` would itself build 100 MB, and
    every event's record would be as large."""
    m = _FORMAT_SPEC.fullmatch(spec)
    if m is None:
        return 0
    widest = max(int(m["width"] or 0), int(m["precision"] or 0))
    return widest if widest > MAX_FORMAT_WIDTH else 0


# A condition nests at most 200 levels (the DSL's bound) inside a few levels of plan structure.
MAX_PLAN_DEPTH = 256


def load_plan(path: str | Path) -> dict:
    """Read a plan file and check its nesting, schema, cross-references and content hash.

    The hash proves the plan is what some tool sealed, not that it makes sense: a plan edited and
    sealed again must still name only regions, rules, views and breakpoints it defines."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read plan '{path}': {exc}") from None
    except RecursionError:
        raise PlanError(f"'{path}' is not a valid trap plan: it nests deeper than {MAX_PLAN_DEPTH} levels") from None
    except ValueError as exc:
        raise PlanError(f"'{path}' is not JSON: {exc}") from None
    if _depth_exceeds(plan, MAX_PLAN_DEPTH):
        raise PlanError(f"'{path}' is not a valid trap plan: it nests deeper than {MAX_PLAN_DEPTH} levels")
    problems = validate_plan(plan) or reference_problems(plan)
    if problems:
        raise PlanError(f"'{path}' is not a valid trap plan: " + "; ".join(problems[:5]))
    if seal(plan)["content_hash"] != plan["content_hash"]:
        raise PlanError(f"'{path}': content hash mismatch (the plan was edited after compiling)")
    return plan


def reference_problems(plan: dict) -> list[str]:
    """Names a schema-valid plan uses but does not define, as readable strings (empty when none)."""
    regions, rules = set(plan["regions"]), set(plan["rules"])
    view_ids = [v["id"] for v in plan["views"]]
    breakpoint_ids = [b["id"] for b in plan["breakpoints"]]
    out: list[str] = []

    def need(kind: str, name: object, known: set | list, where: str) -> None:
        if name not in known:
            out.append(f"{where}: {kind} {name!r} is not in the plan")

    for kind, ids in (("view id", view_ids), ("breakpoint id", breakpoint_ids)):
        if len(set(ids)) != len(ids):
            out.append(f"{kind}s are not unique")
    for i, view in enumerate(plan["views"]):
        for j, rng in enumerate(view["ranges"]):
            need("region", rng["region"], regions, f"views/{i}/ranges/{j}")
            for rule in rng["rules"]:
                need("rule", rule, rules, f"views/{i}/ranges/{j}")
    for i, bp in enumerate(plan["breakpoints"]):
        for rule in bp["rules"]:
            need("rule", rule, rules, f"breakpoints/{i}")
        for view in bp.get("views", []) + ([bp["step_view"]] if "step_view" in bp else []):
            need("view", view, view_ids, f"breakpoints/{i}")
    for where, entry in _dispatch_entries(plan["dispatch"]):
        need("rule", entry["rule"], rules, where)
        for region in entry.get("regions", []):
            need("region", region, regions, where)
        for region in _condition_regions(entry["condition"]):
            need("region", region, regions, where + "/condition")
        for template in _templates(entry["actions"]):
            try:
                widths = [format_width_over_bound(spec or "") for _, _, spec, _ in string.Formatter().parse(template)]
            except ValueError as exc:
                out.append(f"{where}: malformed message template: {exc}")
                continue
            if any(widths):
                out.append(f"{where}: a message field pads to {max(widths)} characters (at most {MAX_FORMAT_WIDTH})")
    for site in plan["dispatch"].get("software_breakpoint", {}):
        need("breakpoint", site, breakpoint_ids, "dispatch/software_breakpoint")
    return out


def validate_plan(plan: object) -> list[str]:
    """Schema problems, as readable strings (empty when valid)."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(plan_schema())
    out = []
    for err in sorted(validator.iter_errors(plan), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, err.absolute_path)) or "(top)"
        out.append(f"{where}: {err.message}")
    return out


@functools.lru_cache(maxsize=1)
def plan_schema() -> dict:
    return json.loads(resources.files("policyc").joinpath("schemas/plan.schema.json").read_text(encoding="utf-8"))


def _dispatch_entries(dispatch: dict) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    for table, content in dispatch.items():
        lists = content.items() if isinstance(content, dict) else [(None, content)]
        for key, entries in lists:
            prefix = f"dispatch/{table}" + (f"/{key}" if key is not None else "")
            out += [(f"{prefix}/{i}", e) for i, e in enumerate(entries)]
    return out


def _templates(actions: list) -> list[str]:
    """The message templates of a dispatch entry's actions, rate-limit `then`s included."""
    found: list[str] = []
    todo = list(actions)
    while todo:
        action = todo.pop()
        if not isinstance(action, dict):
            continue
        for kind in ("log", "alert"):
            if isinstance(action.get(kind), dict):
                found.append(action[kind]["template"])
        if isinstance(action.get("limit"), dict):
            todo.append(action["limit"].get("then"))
    return found


def _condition_regions(condition: object) -> list[str]:
    """The regions `in`/`not_in` tests name (walked without recursion: depth is bounded but large)."""
    found: list[str] = []
    todo = [condition]
    while todo:
        node = todo.pop()
        if not isinstance(node, list) or not node:
            continue
        if node[0] in ("in", "not_in") and len(node) == 3:
            found.append(node[2])
        todo += node[1:]
    return found


def _depth_exceeds(obj: object, limit: int) -> bool:
    todo = [(obj, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            todo += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            todo += [(v, depth + 1) for v in node]
    return False


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
