"""Does a document satisfy a JSON Schema? A small interpreter of the keywords policyc's schemas use.

`jsonschema` stays the validator that reports what is wrong (its errors become
PC201 diagnostics), but importing it costs a third of `policyc check`'s start,
and a valid document needs no report. `accepts` answers only "certainly
valid": it returns False for an invalid document and also whenever it is not
sure (a keyword or a `$ref` it does not interpret, a value of a type JSON
does not have), so the caller asks `jsonschema` then. It must never accept
what `jsonschema` refuses; `tests/test_yaml_form.py` compares the two.

Semantics are Draft 2020-12's for: type (with "integer" meaning a Python int
that is not a bool, as policyc's validator redefines it), enum, pattern
(`re.search`, as jsonschema), minLength, minimum, properties,
additionalProperties, propertyNames, required, minProperties, maxProperties,
items, minItems, anyOf, not, and local `$ref`s into `$defs`.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["accepts"]

# Keywords that only annotate: they never make a document invalid.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "$defs", "title", "description", "examples", "default"})
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def accepts(schema: dict, instance: Any) -> bool:
    """True only when `instance` is certainly valid against `schema` (see the module's docstring)."""
    try:
        return _Subset(schema).valid(schema, instance)
    except (_Unsure, RecursionError):
        return False


class _Unsure(Exception):
    """A keyword or reference this interpreter does not know: the full validator decides."""


class _Subset:
    def __init__(self, root: dict) -> None:
        self.defs = root.get("$defs", {})
        self.patterns: dict[str, re.Pattern] = {}

    def valid(self, schema: Any, value: Any) -> bool:
        if isinstance(schema, bool):
            return schema
        if not isinstance(schema, dict):
            raise _Unsure
        for word, arg in schema.items():
            if word in _ANNOTATIONS:
                continue
            if word == "additionalProperties":  # the only keyword that reads its neighbours
                if "patternProperties" in schema:
                    raise _Unsure
                ok = self.additional(arg, value, schema.get("properties", {}))
            else:
                check = _KEYWORDS.get(word)
                if check is None:
                    raise _Unsure
                ok = check(self, arg, value)
            if not ok:
                return False
        return True

    def ref(self, target: Any, value: Any) -> bool:
        if not isinstance(target, str) or not target.startswith("#/$defs/") or \
                target[len("#/$defs/"):] not in self.defs:
            raise _Unsure
        return self.valid(self.defs[target[len("#/$defs/"):]], value)

    def type(self, names: Any, value: Any) -> bool:
        names = names if isinstance(names, list) else [names]
        known = [_TYPES.get(n) for n in names]
        if None in known:
            raise _Unsure
        if not isinstance(value, (dict, list, str, int, float, bool)) and value is not None:
            raise _Unsure  # not a JSON value: the full validator says what it makes of it
        return any(is_type(value) for is_type in known)

    def pattern(self, regex: str, value: Any) -> bool:
        if not isinstance(value, str):
            return True
        compiled = self.patterns.get(regex)
        if compiled is None:
            compiled = self.patterns[regex] = re.compile(regex)
        return compiled.search(value) is not None

    def properties(self, schema: dict, value: Any) -> bool:
        if not isinstance(value, dict):
            return True
        return all(self.valid(sub, value[k]) for k, sub in schema.items() if k in value)

    def additional(self, schema: Any, value: Any, known: dict) -> bool:
        if not isinstance(value, dict):
            return True
        return all(self.valid(schema, v) for k, v in value.items() if k not in known)

    def items(self, schema: Any, value: Any) -> bool:
        return not isinstance(value, list) or all(self.valid(schema, v) for v in value)


def _enum(_s: _Subset, options: list, value: Any) -> bool:
    # Every keyword's "invalid" must be exact, not merely cautious: under `not` it turns into "valid". So
    # JSON's equality of scalars (1 equals 1.0, True does not equal 1); a list or mapping among the options
    # is left to jsonschema (Python's == inside them takes True for 1).
    if any(isinstance(o, (dict, list)) for o in options):
        raise _Unsure
    return any(_json_equal(o, value) for o in options)


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


_KEYWORDS = {
    "$ref": _Subset.ref,
    "type": _Subset.type,
    "enum": _enum,
    "pattern": _Subset.pattern,
    "minLength": lambda s, n, v: not isinstance(v, str) or len(v) >= n,
    "minimum": lambda s, n, v: not _TYPES["number"](v) or v >= n,
    "properties": _Subset.properties,
    "propertyNames": lambda s, sub, v: not isinstance(v, dict) or all(s.valid(sub, k) for k in v),
    "required": lambda s, names, v: not isinstance(v, dict) or all(n in v for n in names),
    "minProperties": lambda s, n, v: not isinstance(v, dict) or len(v) >= n,
    "maxProperties": lambda s, n, v: not isinstance(v, dict) or len(v) <= n,
    "items": _Subset.items,
    "minItems": lambda s, n, v: not isinstance(v, list) or len(v) >= n,
    "anyOf": lambda s, subs, v: any(s.valid(sub, v) for sub in subs),
    "not": lambda s, sub, v: not s.valid(sub, v),
}
