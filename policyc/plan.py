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
from importlib import resources
from pathlib import Path

__all__ = ["dump_plan", "load_plan", "plan_schema", "seal", "validate_plan", "PlanError"]


class PlanError(Exception):
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


def load_plan(path: str | Path) -> dict:
    """Read a plan file and check its schema and content hash."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read plan '{path}': {exc}") from None
    except ValueError as exc:
        raise PlanError(f"'{path}' is not JSON: {exc}") from None
    problems = validate_plan(plan)
    if problems:
        raise PlanError(f"'{path}' is not a valid trap plan: " + "; ".join(problems[:5]))
    if seal(plan)["content_hash"] != plan["content_hash"]:
        raise PlanError(f"'{path}': content hash mismatch (the plan was edited after compiling)")
    return plan


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


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
