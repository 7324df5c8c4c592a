"""The YAML front end: YAML text -> syntax tree, or diagnostics.

Stage: a front end (YAML text -> `policyc.syntax` tree), beside the DSL parser; one module per step.
May import: syntax, diagnostics, schema_subset, and dsl for expression strings; never the checker or lowering.

The YAML spelling (docs/YAML.md) says what the DSL says, so this package ends
in the same `policyc.syntax` nodes the DSL parser builds. It runs in four
steps, each of which only reports (it never raises on bad input):

1. Compose (`compose`). PyYAML's SafeLoader scans, parses and composes the text into a
   node graph with positions; nothing is constructed from tags. The composer
   is bounded: the number of nodes written and the nesting depth are counted
   while composing, so an oversized or absurdly deep file stops early.
2. Convert (`compose`). The node graph becomes a positioned value tree (`PMap`,
   `PSeq`, `PScalar`, each with its 1-based line and column) and, in the
   same walk, the plain value tree (dicts, lists, str, int, bool, None,
   float) the JSON Schema sees. Scalars are resolved as YAML 1.1 / SafeLoader
   resolves them (so `on:` would be a boolean as a *value*; mapping keys keep
   their text). Aliases are expanded by sharing already converted subtrees:
   the expansion is counted (each reuse adds the reused subtree's size) and
   refused past `MAX_NODES`, so a "billion laughs" file costs a few
   microseconds and no memory. Duplicate keys, non-standard tags and
   recursive aliases are reported here.
3. Validate (`schema`) against `policyc/schemas/policy.schema.json` (Draft 2020-12),
   reporting every error at the line:column of the offending node, with one
   readable message per `anyOf` (the branch is picked by the keys present).
4. Build (`build`) syntax nodes, exactly as the DSL builder builds them for the same
   policy; expression strings go through `policyc.dsl.parse_expression`.
"""

from __future__ import annotations

from .. import syntax as S
from ..diagnostics import Diagnostics, Span
from .build import SyntaxBuilder
from .compose import (MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES, REGISTERS, BoundedLoader, YamlBoundError,
                      describe_yaml_error, read_tree)
from .schema import policy_schema, validate_tree

__all__ = [
    "parse_yaml_text",
    "policy_schema",
    "MAX_DOCUMENT_BYTES",
    "MAX_NODES",
    "MAX_DEPTH",
    "BoundedLoader",
    "YamlBoundError",
    "REGISTERS",
    "describe_yaml_error",
]


def parse_yaml_text(text: str, path: str, diagnostics: Diagnostics) -> S.PolicyFile:
    """Read a YAML policy. Problems go to `diagnostics`; the tree holds what could be built."""
    tree = read_tree(text, path, diagnostics)
    if tree is None:
        return S.PolicyFile(path, [], [], "yaml")
    before = diagnostics.error_count
    validate_tree(tree.root, path, diagnostics)
    if diagnostics.error_count > before or tree.duplicates:
        return S.PolicyFile(path, [], tree.comments, "yaml")
    try:
        return SyntaxBuilder(path, text, diagnostics).file(tree.root, tree.comments)
    except RecursionError:
        diagnostics.error("PC203", Span(path, 1, 1), "an expression is nested too deeply")
        return S.PolicyFile(path, [], tree.comments, "yaml")
