"""Step 3 of the YAML reader: the positioned tree checked against `policyc/schemas/policy.schema.json`
(Draft 2020-12), every error reported at the line:column of the offending node, with one readable
message per `anyOf` (the branch is picked by the keys present).
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..diagnostics import Diagnostics, Span, closest_names
from ..schema_subset import accepts
from .compose import REGISTERS, PMap, PScalar, PSeq, PValue, describe_value, json_type, show_value

__all__ = ["policy_schema", "strict_validator", "validate_tree"]

_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "boolean": "a boolean",
               "integer": "an integer", "number": "a number", "null": "nothing"}


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    try:
        return resources.files("policyc").joinpath("schemas").joinpath("policy.schema.json").read_text("utf-8")
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError, TypeError, AttributeError):
        return (Path(__file__).parents[1] / "schemas" / "policy.schema.json").read_text("utf-8")


def policy_schema() -> dict:
    """The JSON Schema (Draft 2020-12) of the YAML spelling, as a fresh dict (cached text)."""
    return json.loads(_schema_text())


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The schema, parsed once (shared: not to be changed)."""
    return policy_schema()


@functools.lru_cache(maxsize=1)
def strict_validator():
    """The jsonschema validator of the policy schema, YAML's floats refused as integers (cached)."""
    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts 4000.0 as an integer; YAML's 4.0e+3 is a float and has no place in a policy.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    strict = validators.extend(Draft202012Validator, type_checker=checker)
    return strict(_schema())


# ---------------------------------------------------------------- schema errors

def _a(title: str) -> str:
    """'a region', 'an address', 'an MSR write'."""
    return ("an " if title[:1].lower() in "aeiou" or title.startswith(("MSR", "ISF")) else "a ") + title


def _dotted(path: Iterable) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validate_tree(tree: PMap, path: str, diagnostics: Diagnostics) -> None:
    if accepts(_schema(), tree.plain):
        return  # certainly valid: jsonschema (a third of a check's start-up) is imported only to report
    try:
        errors = list(strict_validator().iter_errors(tree.plain))
    except RecursionError:
        diagnostics.error("PC203", tree.span(path), "the policy is nested too deeply to check")
        return
    reporter = _SchemaReporter(tree, path)
    found: list[tuple[Span, str, str | None]] = []
    for err in errors:
        found.extend(reporter.render(err))
    for span, message, hint in sorted(found, key=lambda f: (f[0].line, f[0].col)):
        diagnostics.error("PC201", span, message, hint)


class _SchemaReporter:
    """jsonschema errors -> (span, message, hint), one readable message per failed choice."""

    def __init__(self, tree: PMap, path: str) -> None:
        self.tree = tree
        self.path = path
        self.schema = strict_validator().schema

    # -- locating
    def node_at(self, where: Iterable) -> PValue:
        node: PValue = self.tree
        for step in where:
            if isinstance(node, PMap) and isinstance(step, str) and step in node.entries:
                node = node.entries[step][1]
            elif isinstance(node, PSeq) and isinstance(step, int) and 0 <= step < len(node.items):
                node = node.items[step]
            else:
                break
        return node

    def key_at(self, where: Iterable, key: str) -> Span:
        node = self.node_at(where)
        if isinstance(node, PMap) and key in node.entries:
            return node.entries[key][0].span(self.path)
        return node.span(self.path)

    # -- schema helpers
    def resolve(self, schema: Any) -> dict:
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 20:
            ref = schema["$ref"]
            if not ref.startswith("#/$defs/"):
                break
            schema = self.schema["$defs"].get(ref[len("#/$defs/"):], {})
            seen += 1
        return schema if isinstance(schema, dict) else {}

    def types(self, schema: Any) -> set[str] | None:
        """JSON types a schema can accept; None when it does not say."""
        schema = self.resolve(schema)
        if "type" in schema:
            t = schema["type"]
            return set(t) if isinstance(t, list) else {t}
        if "enum" in schema:
            return {json_type(v) for v in schema["enum"]}
        if "const" in schema:
            return {json_type(schema["const"])}
        for word in ("anyOf", "oneOf"):
            if word in schema:
                out: set[str] = set()
                for branch in schema[word]:
                    t = self.types(branch)
                    if t is None:
                        return None
                    out |= t
                return out
        return None

    def type_ok(self, schema: Any, value: Any) -> bool:
        t = self.types(schema)
        if t is None:
            return True
        kind = json_type(value)
        return kind in t or (kind == "integer" and "number" in t)

    def keys(self, schema: Any) -> set[str]:
        schema = self.resolve(schema)
        out = set(schema.get("properties", {}))
        for word in ("anyOf", "oneOf"):
            for branch in schema.get(word, ()):
                out |= self.keys(branch)
        return out

    def required(self, schema: Any) -> set[str]:
        return set(self.resolve(schema).get("required", ()))

    def title(self, schema: Any, fallback: str = "value") -> str:
        return self.resolve(schema).get("title") or fallback

    # -- rendering
    def render(self, err) -> list[tuple[Span, str, str | None]]:
        if err.validator in ("anyOf", "oneOf"):
            return self.render_choice(err)
        return self.render_leaf(err)

    def render_many(self, errors: list) -> list[tuple[Span, str, str | None]]:
        # A missing key whose near-miss is present (`symbl:` for `symbol:`) is one mistake, not two.
        typos: set[tuple[tuple, str]] = set()
        for e in errors:
            if e.validator == "additionalProperties" and isinstance(e.instance, dict):
                allowed = list(e.schema.get("properties", {}))
                for extra in self.extras(e):
                    for near in closest_names(extra, allowed, limit=1):
                        typos.add((tuple(e.absolute_path), near))
        out = []
        for e in errors:
            if e.validator == "required" and isinstance(e.instance, dict):
                missing = self.missing(e)
                if missing and all((tuple(e.absolute_path), m) in typos for m in missing):
                    continue
            out.extend(self.render(e))
        return out

    def extras(self, err) -> list[str]:
        props = err.schema.get("properties", {})
        patterns = err.schema.get("patternProperties", {})
        return [k for k in err.instance
                if k not in props and not any(re.search(p, k) for p in patterns)]

    def missing(self, err) -> list[str]:
        return [k for k in err.validator_value if k not in err.instance]

    def render_choice(self, err) -> list[tuple[Span, str, str | None]]:
        value = err.instance
        node = self.node_at(err.absolute_path)
        branches = err.validator_value
        groups: dict[int, list] = defaultdict(list)
        for sub in err.context:
            if sub.relative_schema_path:
                groups[sub.relative_schema_path[0]].append(sub)
        title = self.title(err.schema, self.label(err.absolute_path))
        description = self.resolve(err.schema).get("description")
        fitting = [i for i, b in enumerate(branches) if self.type_ok(b, value) and groups.get(i)]
        prefix = self.where(err.absolute_path)
        if not fitting:
            titled = self.resolve(err.schema).get("title")
            expected = _a(titled) if titled else self.expected_words(err.schema)
            return [(node.span(self.path), f"{prefix}expected {expected}, got {describe_value(node, value)}",
                     self.type_hint(node, value, err.absolute_path, description, self.type_ok(err.schema, 0)))]
        if len(fitting) == 1:
            return self.render_many(groups[fitting[0]])
        if isinstance(value, dict):
            def score(i: int) -> tuple:
                known = self.keys(branches[i])
                exact = sum(1 for k in value if k in known)
                near = sum(1 for k in value if k not in known and closest_names(k, known, limit=1))
                missing = len(self.required(branches[i]) - set(value))
                return (2 * exact + near, -missing, -self.weight(groups[i]), -i)
            best = max(fitting, key=score)
            if score(best)[0] == 0:
                # No branch knows any of these keys: one message for the whole choice.
                if not value:
                    return [(node.span(self.path), f"{prefix}empty mapping where {_a(title)} belongs", description)]
                keys = list(value)
                words = ", ".join(f"'{k}'" for k in keys)
                span = self.key_at(err.absolute_path, keys[0])
                return [(span, f"{prefix}unknown key{'s' if len(keys) > 1 else ''} {words} for {_a(title)}",
                         description)]
            return self.render_many(groups[best])
        # A scalar that several branches could take: prefer one with a near-miss suggestion.
        for i in fitting:
            for leaf in self.leaves(groups[i]):
                if leaf.validator == "enum" and isinstance(value, str) and \
                        closest_names(value, [str(v) for v in leaf.validator_value]):
                    return self.render_many([leaf])
        hint = description
        reserved = any(leaf.validator == "not" for i in fitting for leaf in self.leaves(groups[i]))
        if reserved and value in REGISTERS:
            hint = f"'{value}' is a register name, reserved: it cannot name a region. " + (description or "")
        return [(node.span(self.path), f"{prefix}{show_value(value)} is not a valid {title}", hint)]

    def leaves(self, errors: list) -> list:
        out = []
        for e in errors:
            if e.context:
                out.extend(self.leaves(e.context))
            else:
                out.append(e)
        return out

    def weight(self, errors: list) -> int:
        return len(self.leaves(errors))

    def expected_words(self, schema: Any) -> str:
        schema = self.resolve(schema)
        types = self.types(schema) or set()
        words = []
        enum_values: list[str] = []
        for branch in schema.get("anyOf", schema.get("oneOf", [])):
            b = self.resolve(branch)
            if "enum" in b:
                enum_values += [str(v) for v in b["enum"]]
        if enum_values:
            words.append("one of " + ", ".join(enum_values))
            types = types - {"string"}
        for t in ("string", "integer", "object", "array", "boolean"):
            if t in types:
                words.append(_TYPE_WORDS[t])
        if not words:
            return "something else"
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]

    def label(self, where: Iterable) -> str:
        steps = [p for p in where]
        for p in reversed(steps):
            if isinstance(p, str):
                return f"'{p}'"
        return "value"

    def where(self, where: Iterable) -> str:
        dotted = _dotted(where)
        return f"{dotted}: " if dotted else ""

    def type_hint(self, node: PValue | None, value: Any, where: Iterable, description: str | None,
                  integer_ok: bool = True) -> str | None:
        steps = list(where)
        last = steps[-1] if steps else None
        if value is None and last == "with":
            return "quote the vector: with: \"#UD\" (an unquoted # starts a YAML comment)"
        if value is None:
            return "a value is missing after the ':'" + (f". {description}" if description else "")
        if isinstance(value, float) and not integer_ok:
            text = node.text if isinstance(node, PScalar) else str(value)
            return description or f"YAML reads {text} as a number; quote it (\"{text}\") to make it a string"
        if isinstance(value, float):
            return ("YAML reads this as a float; addresses, sizes and constants are integers "
                    "(write e.g. 4096, 0x1000 or an expression string such as \"8 * 512\")")
        if isinstance(value, bool) and isinstance(node, PScalar):
            return (f"YAML 1.1 reads unquoted {node.text} as a boolean; quote it (\"{node.text}\") "
                    "if you meant the word")
        return description

    def render_leaf(self, err) -> list[tuple[Span, str, str | None]]:
        where = list(err.absolute_path)
        node = self.node_at(where)
        span = node.span(self.path)
        value = err.instance
        v = err.validator
        schema = err.schema if isinstance(err.schema, dict) else {}
        title = schema.get("title")
        in_names = "propertyNames" in err.relative_schema_path or "propertyNames" in err.schema_path
        prefix = self.where(where)

        if in_names:
            # The key itself is wrong: point at it.
            key = str(value)
            span = self.key_at(where, key)
            if v == "not" and key in REGISTERS:
                return [(span, f"'{key}' is a register name, reserved: it cannot name a region",
                         "pick another name, e.g. " + f"'{key}_region'")]
            what = title or "name"
            return [(span, f"{show_value(key)} is not a valid {what}",
                     schema.get("description") or "names are letters, digits and '_', not starting with a digit")]
        if v == "additionalProperties":
            allowed = list(schema.get("properties", {}))
            out = []
            for extra in self.extras(err):
                near = closest_names(extra, allowed)
                if where:
                    msg = f"unknown key '{extra}' in {title or self.label(where)}"
                else:
                    msg = f"unknown top-level key '{extra}'"
                if near:
                    hint = "did you mean " + " or ".join(f"'{n}'" for n in near) + "?"
                else:
                    hint = "allowed keys: " + ", ".join(allowed)
                out.append((self.key_at(where, extra), msg, hint))
            return out
        if v == "required":
            out = []
            for key in self.missing(err):
                what = title or self.label(where)
                out.append((span, f"missing key '{key}' in {what}", schema.get("description")))
            return out
        if v == "type":
            expected = schema.get("type")
            expected = expected if isinstance(expected, list) else [expected]
            words = [_TYPE_WORDS.get(t, t) for t in expected]
            if set(expected) == {"integer", "string"}:
                words = ["an integer or an expression string"]
            want = " or ".join(words)
            return [(span, f"{prefix}expected {want}, got {describe_value(node, value)}",
                     self.type_hint(node, value, where, schema.get("description"), "integer" in expected))]
        if v in ("enum", "const"):
            options = [str(o) for o in (err.validator_value if v == "enum" else [err.validator_value])]
            what = title or self.label(where)
            if not isinstance(value, str):
                return [(span, f"{prefix}expected one of {', '.join(options)}, got {describe_value(node, value)}",
                         self.type_hint(node, value, where, None))]
            near = closest_names(value, options)
            hint = ("did you mean " + " or ".join(f"'{n}'" for n in near) + "?") if near \
                else "expected one of: " + ", ".join(options)
            return [(span, f"{prefix}{show_value(value)} is not a valid {what}", hint)]
        if v == "not":
            if isinstance(value, str) and value in REGISTERS:
                return [(span, f"{prefix}'{value}' is a register name, reserved: it cannot name a region", None)]
            return [(span, f"{prefix}{show_value(value)} is not allowed here", schema.get("description"))]
        if v in ("minLength", "pattern") and isinstance(value, str) and not value.strip():
            return [(span, f"{prefix}empty {title or 'value'}", schema.get("description"))]
        if v == "pattern":
            what = title or self.label(where)
            return [(span, f"{prefix}{show_value(value)} is not a valid {what}", schema.get("description"))]
        if v == "minItems":
            return [(span, f"{prefix}the list is empty", f"give at least {err.validator_value} item(s)"
                     + (f"; {schema.get('description')}" if schema.get("description") else ""))]
        if v in ("minProperties", "maxProperties"):
            what = title or self.label(where)
            keys = list(value) if isinstance(value, dict) else []
            if v == "minProperties":
                msg = f"empty {what}"
            else:
                msg = f"one {what} per entry, but this mapping has {len(keys)}: " + ", ".join(keys)
            return [(span, f"{prefix}{msg}", schema.get("description"))]
        if v == "minimum":
            return [(span, f"{prefix}{show_value(value)} is below {err.validator_value}", schema.get("description"))]
        return [(span, f"{prefix}{err.message}", schema.get("description"))]


# ---------------------------------------------------------------- building syntax
