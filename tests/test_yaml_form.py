"""The YAML spelling: safe loading, schema errors with positions, and the same tree as the DSL."""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from policyc import syntax as S
from policyc import yaml_form
from policyc.yaml_form import schema as yaml_schema
from policyc.diagnostics import CODES, Diagnostics
from policyc.dsl import parse_policy_text
from policyc.yaml_form import MAX_DEPTH, MAX_NODES, parse_yaml_text, policy_schema
from test_frontends_fuzz import VALUES, mutated_documents

LANGUAGE_MD = Path("/work/shared/spec/LANGUAGE.md")


def parse(text: str, path: str = "p.yaml") -> tuple[S.PolicyFile, Diagnostics]:
    diags = Diagnostics()
    result = parse_yaml_text(text, path, diags)
    assert isinstance(result, S.PolicyFile)
    assert result.form == "yaml"
    return result, diags


def dsl(text: str, path: str = "p.vmi") -> S.PolicyFile:
    diags = Diagnostics()
    result = parse_policy_text(text, path, diags)
    assert not diags.items, [str(d) for d in diags]
    return result


def codes(diags: Diagnostics) -> list[str]:
    return [d.code for d in diags]


def only(diags: Diagnostics, code: str):
    found = [d for d in diags if d.code == code]
    assert found, f"no {code} in {[(d.code, d.message) for d in diags]}"
    return found


def position(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based line and column of the nth occurrence of needle."""
    index = -1
    for _ in range(nth + 1):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


def at(d, text: str, needle: str, nth: int = 0) -> bool:
    return (d.span.line, d.span.col) == position(text, needle, nth)


# ---------------------------------------------------------------- the schema

def test_schema_is_valid_draft_2020_12():
    schema = policy_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert policy_schema() == schema and policy_schema() is not schema  # a fresh copy each time


def test_schema_closes_every_object_and_documents_it():
    schema = policy_schema()

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "#")
    for name, definition in schema["$defs"].items():
        assert definition.get("title") and definition.get("description"), name
    defs = schema["$defs"]
    assert defs["writableRegister"]["enum"] == list(yaml_form.REGISTERS)
    assert set(defs["readableRegister"]["enum"]) == {"idtr", "gdtr", "ldtr", "tr"}
    assert defs["severity"]["enum"] == ["info", "low", "medium", "high", "critical"]
    assert schema["properties"]["mode"]["enum"] == ["enforce", "audit"]
    from policyc.targets import TARGETS
    assert set(defs["target"]["properties"]["arch"]["enum"]) == set(TARGETS)
    assert set(defs["triggerMap"]["properties"]) == {"read", "write", "execute", "access", "cpuid"}
    assert set(defs["trigger"]["anyOf"][0]["enum"]) == {"cpuid", *S.EVENT_TRIGGERS}
    assert set(defs["actionMap"]["properties"]) == {"deny", "log", "alert", "limit"}


# The quick validity check that spares valid documents the jsonschema import must never accept what
# jsonschema refuses (its misses only cost that import).
REPO = Path(__file__).resolve().parent.parent


def _strict_validator():
    return yaml_schema.strict_validator()


def test_schema_subset_agrees_on_every_yaml_file_of_the_repository(monkeypatch):
    from policyc.schema_subset import accepts
    documents = []  # the trees the YAML reader validates (its own loader: `on:` is a key, not True)
    monkeypatch.setattr(yaml_schema, "accepts", lambda schema, doc: documents.append(doc) or accepts(schema, doc))
    for path in sorted(REPO.glob("examples/**/*.yaml")) + sorted(REPO.glob("tests/**/*.yaml")):
        parse_yaml_text(path.read_text(encoding="utf-8", errors="replace"), str(path), Diagnostics())
    schema = policy_schema()
    verdicts = [(accepts(schema, doc), _strict_validator().is_valid(doc)) for doc in documents]
    assert all(ours == full for ours, full in verdicts), [d for d, v in zip(documents, verdicts) if v[0] != v[1]]
    assert sum(full for _, full in verdicts) >= 5 and sum(not full for _, full in verdicts) >= 5


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_documents(), VALUES))
def test_schema_subset_never_accepts_what_jsonschema_refuses(document):
    from policyc.schema_subset import accepts
    if accepts(policy_schema(), document):
        assert _strict_validator().is_valid(document), document


def test_schema_subset_is_unsure_of_what_it_does_not_interpret():
    from policyc.schema_subset import accepts
    assert accepts({"type": "object", "properties": {"a": {"type": "integer"}}}, {"a": 1})
    assert not accepts({"type": "object", "properties": {"a": {"type": "integer"}}}, {"a": True})
    assert not accepts({"format": "date"}, "2020-01-01")  # an unknown keyword: jsonschema decides
    assert not accepts({"$ref": "https://example.invalid/x"}, 1)
    assert not accepts({"type": "string"}, b"bytes")  # not a JSON value
    assert accepts({"enum": [1, "a"]}, 1) and not accepts({"enum": [1]}, True)
    # Under `not` a keyword's "invalid" becomes "valid": each must be exact (1.0 is JSON's 1).
    assert not accepts({"not": {"enum": [1]}}, 1.0) and accepts({"not": {"enum": [1]}}, True)


def test_schema_file_is_the_packaged_one():
    on_disk = json.loads((Path(yaml_form.__file__).parents[1] / "schemas" / "policy.schema.json").read_text())
    assert policy_schema() == on_disk


# ---------------------------------------------------------------- the LANGUAGE.md excerpt

def language_yaml() -> str:
    match = re.search(r"```yaml\n(.*?)```", LANGUAGE_MD.read_text(encoding="utf-8"), re.S)
    assert match, "LANGUAGE.md has a YAML excerpt"
    return match.group(1)


@pytest.mark.skipif(not LANGUAGE_MD.exists(), reason="shared spec not present")
def test_language_excerpt_parses_to_the_expected_nodes():
    text = language_yaml()
    tree, diags = parse(text, "linux.yaml")
    assert not diags.items, [(d.code, d.message) for d in diags]
    block = tree.policy
    assert block is not None and block.name == "linux-kernel-integrity"
    items = block.items
    assert items[:4] == [
        S.Target("xen", "x86_64", ">=", "4.17"),
        S.Symbols(["linux-6.1.System.map"]),
        S.Mode("enforce"),
        S.Const("NR_SYSCALLS", S.Num(451)),
    ]
    regions = {i.name: i for i in items if isinstance(i, S.Region)}
    assert regions["kernel_text"].terms == [S.RangeRegion(S.SymbolRef("_stext"), S.SymbolRef("_etext"))]
    assert regions["syscalls"].terms == [
        S.SizedRegion(S.SymbolRef("sys_call_table"), S.Binary("*", S.Num(8), S.Name("NR_SYSCALLS")))]
    assert regions["idt"].terms == [S.SizedRegion(S.SymbolRef("idt_table"), S.Num(4096))]
    rules = [i for i in items if isinstance(i, S.Rule)]
    assert [r.name for r in rules] == ["protect_tables", "wp_guard", "syscall_entry_guard"]
    assert rules[0].trigger == S.MemoryTrigger("write", [S.RegionRef("syscalls"), S.RegionRef("idt")])
    assert rules[0].actions == [S.Deny(), S.Report("alert", "critical", "dispatch table write at {gla:#x}")]
    assert rules[1].trigger == S.RegisterTrigger("write", "cr0")
    assert rules[1].where == S.Call("cleared", [S.Attr("cr0", "WP")])
    assert rules[2].trigger == S.MsrTrigger(S.Name("LSTAR"))
    assert rules[2].where == S.Binary("!=", S.Name("new"), S.SymbolRef("entry_SYSCALL_64"))
    assert rules[2].actions == [S.Deny()]

    # Spans point into the YAML text.
    assert (block.span.file, block.span.line, block.span.col) == ("linux.yaml", *position(text, "policy:"))
    assert rules[1].span.file == "linux.yaml"
    assert (rules[1].span.line, rules[1].span.col) == position(text, "name: wp_guard")
    where = rules[2].where
    assert (where.span.line, where.span.col) == position(text, "new != symbol")
    size = regions["syscalls"].terms[0].size
    assert (size.span.line, size.span.col) == position(text, "8 * NR_SYSCALLS")


@pytest.mark.skipif(not LANGUAGE_MD.exists(), reason="shared spec not present")
def test_language_excerpt_matches_the_same_rules_in_the_dsl():
    tree, diags = parse(language_yaml())
    assert not diags.items
    same = dsl('''
        policy "linux-kernel-integrity" {
            target xen >= 4.17 on x86_64
            symbols "linux-6.1.System.map"
            mode enforce
            const NR_SYSCALLS = 451
            region kernel_text = symbol _stext .. symbol _etext
            region syscalls    = symbol sys_call_table size 8 * NR_SYSCALLS
            region idt         = symbol idt_table size 4096
            rule protect_tables: on write to syscalls, idt {
                deny
                alert critical "dispatch table write at {gla:#x}"
            }
            rule wp_guard: on write cr0 where cleared(cr0.WP) {
                deny
                alert critical "CR0.WP cleared"
            }
            rule syscall_entry_guard: on write msr LSTAR where new != symbol entry_SYSCALL_64 {
                deny
            }
        }
    ''')
    assert tree.items == same.items


# ---------------------------------------------------------------- DSL and YAML: one tree

EVERYTHING_DSL = r'''
policy "everything" {
    target xen >= 4.17 on x86_64
    symbols "linux.map", "extra.json"
    mode audit
    include "common.vmi"
    include "more.vmi"
    const NR = 451
    const PAGE = 0x1000
    const MASK = ~(PAGE - 1) & 0xffff
    const NEG = -3
    region text = symbol _stext .. symbol _etext
    region tables = symbol sys_call_table size 8 * NR, symbol idt_table + 16 size 4096
    region heap = va 0xffff888000000000 size 0x200000
    region low = pa 0x1000 size 4096
    region idt_page = register idtr size 4096
    region gdt_base = register gdtr size 0x1000
    region opt = symbol? maybe_absent size 64
    region gdt = percpu symbol gdt_page + -8 size 4096
    region vrange = va 0xffffffff81000000 .. 0xffffffff82000000
    region prange = pa 0x100000 .. 0x200000
    region both = text, tables
    rule r_read: on read of heap { allow }
    rule on write to tables, low where rip not in text {
        deny
        alert critical "write at {gla:#x} from {rip:#x}"
    }
    rule r_exec_in: on execute in text, va 0xffffffff83000000 size 4096 { deny with #UD pause }
    rule r_exec_ref: on execute in both { deny }
    rule r_access: on access to symbol init_task size 64 { log low "touched" disarm }
    rule r_bp: on execute symbol commit_creds { log info "commit_creds on vcpu {vcpu} cr3={cr3:#x}" }
    rule r_bp_off: on execute symbol commit_creds + 4 { allow }
    rule r_bp_opt: on execute symbol? maybe_there { allow }
    rule r_bp_va: on execute va 0xffffffff81000000 { allow }
    rule r_cr0: on write cr0 where cleared(cr0.WP) { priority 10 deny alert critical "CR0.WP cleared" }
    rule r_cr4: on write cr4 where cleared(cr4.SMEP | cr4.SMAP) { deny }
    rule r_cr3: on write cr3 { limit 100 per second then log medium "cr3 {new:#x}" }
    rule r_xcr0: on write xcr0 { allow }
    rule r_idtr_w: on write idtr { deny }
    rule r_ldtr_w: on write ldtr { deny }
    rule r_gdtr_r: on read gdtr { log info "sgdt" }
    rule r_tr_r: on read tr { log info "str" }
    rule r_msr: on write msr LSTAR where new != symbol entry_SYSCALL_64 { deny }
    rule r_msr_n: on write msr 0xc0000082 { deny feed "\x00\x01ab" with #GP }
    rule r_cpuid: on cpuid { allow }
    rule r_leaf: on cpuid leaf 0x40000000 { limit 5 per second then limit 1 per second then deny }
    rule r_gr: on guest_request { alert high "agent" }
    rule r_dbg: on debug_exception { allow }
    rule r_smc: on smc where pc == 0 { deny feed "zz" }
    rule r_in: on read of opt, gdt, idt_page where gla in vrange and vcpu == 0 { allow }
    rule r_range: on access to va 0x1000 .. 0x2000, symbol a .. symbol b { priority PRIO + 1 deny }
}
'''

EVERYTHING_YAML = r'''
# every trigger and action form of docs/YAML.md
policy: everything
target: {hypervisor: xen, version: ">= 4.17", arch: x86_64}
symbols: [linux.map, extra.json]
mode: audit
include: [common.vmi, more.vmi]
constants:
  NR: 451
  PAGE: 0x1000
  MASK: "~(PAGE - 1) & 0xffff"
  NEG: -3
regions:
  text: {from: {symbol: _stext}, to: {symbol: _etext}}
  tables:
    - {symbol: sys_call_table, size: "8 * NR"}
    - {symbol: idt_table, offset: 16, size: 4096}
  heap: {va: 0xffff888000000000, size: 0x200000}
  low: {pa: "0x1000", size: 4096}
  idt_page: {register: idtr, size: 4096}
  gdt_base: {register: gdtr, size: 0x1000}
  opt: {symbol: maybe_absent, optional: true, size: 64}
  gdt: {symbol: gdt_page, percpu: true, offset: -8, size: 4096}
  vrange: {from: {va: 0xffffffff81000000}, to: 0xffffffff82000000}
  prange: {from: {pa: 0x100000}, to: {pa: 0x200000}}
  both: [text, tables]
rules:
  - name: r_read
    on: {read: heap}
    do: [allow]
  - on: {write: [tables, low]}          # a rule without a name
    where: rip not in text
    do:
      - deny
      - alert: {severity: critical, message: "write at {gla:#x} from {rip:#x}"}
  - name: r_exec_in
    on: {execute: [text, {va: 0xffffffff83000000, size: 4096}]}
    do: [{deny: {with: "#UD"}}, pause]
  - name: r_exec_ref
    on: {execute: both}
    do: [deny]
  - name: r_access
    on: {access: {symbol: init_task, size: 64}}
    do: [{log: {severity: low, message: touched}}, disarm]
  - name: r_bp
    on: {execute: {symbol: commit_creds}}
    do: [{log: {severity: info, message: "commit_creds on vcpu {vcpu} cr3={cr3:#x}"}}]
  - name: r_bp_off
    on: {execute: {symbol: commit_creds, offset: 4}}
    do: [allow]
  - name: r_bp_opt
    on: {execute: {symbol: maybe_there, optional: true}}
    do: [allow]
  - name: r_bp_va
    on: {execute: {va: 0xffffffff81000000}}
    do: [allow]
  - name: r_cr0
    on: {write: cr0}
    where: "cleared(cr0.WP)"
    priority: 10
    do: [deny, {alert: {severity: critical, message: CR0.WP cleared}}]
  - name: r_cr4
    on: {write: cr4}
    where: "cleared(cr4.SMEP | cr4.SMAP)"
    do: [deny]
  - name: r_cr3
    on: {write: cr3}
    do:
      - limit: {rate: 100, per: second, then: {log: {severity: medium, message: "cr3 {new:#x}"}}}
  - {name: r_xcr0, on: {write: xcr0}, do: [allow]}
  - {name: r_idtr_w, on: {write: idtr}, do: [deny]}
  - {name: r_ldtr_w, on: {write: ldtr}, do: [deny]}
  - {name: r_gdtr_r, on: {read: gdtr}, do: [{log: {severity: info, message: sgdt}}]}
  - {name: r_tr_r, on: {read: tr}, do: [{log: {severity: info, message: str}}]}
  - name: r_msr
    on: {write: {msr: LSTAR}}
    where: new != symbol entry_SYSCALL_64
    do: [deny]
  - name: r_msr_n
    on: {write: {msr: 0xc0000082}}
    do: [{deny: {feed: "\x00\x01ab", with: "#GP"}}]
  - {name: r_cpuid, on: cpuid, do: [allow]}
  - name: r_leaf
    on: {cpuid: {leaf: 0x40000000}}
    do: [{limit: {rate: 5, then: {limit: {rate: 1, per: second, then: deny}}}}]
  - {name: r_gr, on: guest_request, do: [{alert: {severity: high, message: agent}}]}
  - {name: r_dbg, on: debug_exception, do: [allow]}
  - {name: r_smc, on: smc, where: "pc == 0", do: [{deny: {feed: zz}}]}
  - name: r_in
    on: {read: [opt, gdt, idt_page]}
    where: >-
      gla in vrange and vcpu == 0
    do: [allow]
  - name: r_range
    on:
      access:
        - {from: {va: 0x1000}, to: 0x2000}
        - {from: {symbol: a}, to: {symbol: b}}
    priority: PRIO + 1
    do: [deny]
'''


def test_every_form_gives_the_same_tree_in_both_spellings():
    from_dsl = dsl(EVERYTHING_DSL)
    from_yaml, diags = parse(EVERYTHING_YAML)
    assert not diags.items, [(d.code, str(d.span), d.message) for d in diags]
    dsl_items, yaml_items = from_dsl.items[0].items, from_yaml.items[0].items
    assert len(dsl_items) == len(yaml_items)
    for a, b in zip(dsl_items, yaml_items):
        assert a == b
    assert from_dsl.items == from_yaml.items
    assert from_yaml.comments and from_yaml.comments[0].text == "# every trigger and action form of docs/YAML.md"


def test_every_trigger_and_action_kind_is_exercised():
    tree, _ = parse(EVERYTHING_YAML)
    rules = [i for i in tree.policy.items if isinstance(i, S.Rule)]
    triggers = {type(r.trigger).__name__ for r in rules}
    assert triggers == {"MemoryTrigger", "ExecuteTrigger", "RegisterTrigger", "MsrTrigger", "CpuidTrigger",
                        "EventTrigger"}
    accesses = {r.trigger.access for r in rules if isinstance(r.trigger, S.MemoryTrigger)}
    assert accesses == {"read", "write", "execute", "access"}
    registers = {(r.trigger.access, r.trigger.register) for r in rules if isinstance(r.trigger, S.RegisterTrigger)}
    assert {reg for _, reg in registers} >= {"cr0", "cr3", "cr4", "xcr0", "idtr", "ldtr", "gdtr", "tr"}

    def actions(acts):
        for a in acts:
            yield a
            if isinstance(a, S.Limit):
                yield from actions([a.then])

    kinds = {type(a).__name__ for r in rules for a in actions(r.actions)}
    assert kinds == {"Allow", "Deny", "Report", "Pause", "Disarm", "Limit", "Priority"}
    # Priority comes first, whatever the order of the YAML keys.
    r_cr0 = next(r for r in rules if r.name == "r_cr0")
    assert isinstance(r_cr0.actions[0], S.Priority) and r_cr0.actions[0].value == S.Num(10)


def test_item_order_is_fixed_whatever_the_key_order():
    text = ("rules: [{on: smc, do: [deny]}]\nregions: {r: {va: 1, size: 2}}\nconstants: {C: 1}\n"
            "include: x.vmi\nmode: enforce\nsymbols: s.map\ntarget: {arch: arm64, hypervisor: xen}\npolicy: p\n")
    tree, diags = parse(text)
    assert not diags.items
    kinds = [type(i).__name__ for i in tree.policy.items]
    assert kinds == ["Target", "Symbols", "Mode", "Include", "Const", "Region", "Rule"]
    assert tree.policy.items[0] == S.Target("xen", "arm64", None, None)


def test_include_only_file_gives_bare_items_like_a_dsl_module():
    text = "constants: {PAGE: 4096}\nregions:\n  r: {symbol: s, size: PAGE}\nrules:\n  - {on: cpuid, do: [allow]}\n"
    tree, diags = parse(text)
    assert not diags.items
    assert tree.policy is None
    module = dsl("const PAGE = 4096\nregion r = symbol s size PAGE\nrule on cpuid { allow }\n")
    assert tree.items == module.items


def test_yaml_integers_keep_their_radix_and_sign():
    tree, diags = parse("constants: {A: 0x10, B: 0b101, C: 017, D: 1_000, E: -0x8, F: '0o17', G: 0}\n")
    assert not diags.items
    values = {c.name: c.value for c in tree.items}
    assert values["A"] == S.Num(16, 16)
    assert values["B"] == S.Num(5, 2)
    assert values["C"] == S.Num(15, 8)  # YAML 1.1 octal, as SafeLoader reads it
    assert values["D"] == S.Num(1000, 10)
    assert values["E"] == S.Unary("-", S.Num(8, 16))
    assert values["F"] == S.Num(15, 8)
    assert values["G"] == S.Num(0, 10)


def test_on_is_a_key_not_a_boolean_and_merge_keys_work():
    text = ("rules:\n"
            "  - &base {on: {write: cr0}, do: [deny]}\n"
            "  - <<: *base\n"
            "    on: {write: cr4}\n")
    tree, diags = parse(text)
    assert not diags.items, [(d.code, d.message) for d in diags]
    rules = tree.items
    assert rules[0].trigger == S.RegisterTrigger("write", "cr0")
    assert rules[1].trigger == S.RegisterTrigger("write", "cr4")
    assert rules[1].actions == [S.Deny()]


def test_spans_of_quoted_and_block_expressions_point_inside_the_string():
    text = 'rules:\n  - on: cpuid\n    where: "vcpu == 0 and"\n    do: [allow]\n'
    _, diags = parse(text)
    (d,) = diags.items
    assert d.code in ("PC110", "PC112")
    assert d.span.line == 3 and d.span.col >= position(text, "vcpu")[1]

    text = 'rules:\n  - on: cpuid\n    where: "vcpu == ="\n    do: [allow]\n'
    _, diags = parse(text)
    (d,) = diags.items
    assert (d.span.line, d.span.col) == position(text, "=\"")

    text = "rules:\n  - on: cpuid\n    where: |\n      vcpu == 0 and rip ) 3\n    do: [allow]\n"
    _, diags = parse(text)
    (d,) = diags.items
    assert (d.span.line, d.span.col) == position(text, ")")


# ---------------------------------------------------------------- schema errors

def test_unknown_keys_point_at_the_key_with_did_you_mean():
    text = ("policy: p\n"
            "symbol: a.map\n"
            "rules:\n"
            "  - name: r\n"
            "    on: {writ: cr0}\n"
            "    do: [deny, {alrt: {severity: high, message: m}}]\n"
            "regions:\n"
            "  x: {symbl: s, size: 4}\n")
    tree, diags = parse(text)
    assert tree.items == []
    assert set(codes(diags)) == {"PC201"}
    by_key = {re.search(r"'(\w+)'", d.message).group(1): d for d in diags}
    assert set(by_key) == {"symbol", "writ", "alrt", "symbl"}
    assert at(by_key["symbol"], text, "symbol:") and "'symbols'" in by_key["symbol"].hint
    assert at(by_key["writ"], text, "writ") and "'write'" in by_key["writ"].hint
    assert at(by_key["alrt"], text, "alrt") and "'alert'" in by_key["alrt"].hint
    assert at(by_key["symbl"], text, "symbl") and "'symbol'" in by_key["symbl"].hint
    assert all("did you mean" in d.hint for d in diags)
    # The missing `symbol:` that the typo caused is not reported a second time.
    assert not any("missing" in d.message for d in diags)


def test_every_schema_error_is_reported_once_at_its_node():
    text = ("policy: p\n"
            "target: {hypervisor: xen, version: 4.17, arch: x86-64}\n"
            "mode: enforced\n"
            "constants: {A: 1.5, 2bad: 3}\n"
            "regions:\n"
            "  cr0: {symbol: a, size: 1}\n"
            "  y: {symbol: a}\n"
            "  w: 5\n"
            "rules:\n"
            "  - on: guest_reqest\n"
            "    do: [dney]\n"
            "  - on: {write: cr0, read: idtr}\n"
            "    do: [{deny: {with: #UD\n"
            "      }}]\n"
            "  - on: {write: {msr: LSTAR}}\n"
            "    priority: off\n"
            "    do: [{limit: {rate: 10, per: minute, then: deny}}]\n")
    _, diags = parse(text)
    assert set(codes(diags)) == {"PC201"}
    found = {(d.span.line, d.span.col): d for d in diags}
    expect = {
        "4.17": "got the float 4.17",
        "x86-64": "not a valid architecture",
        "enforced": "not a valid mode",
        "1.5": "got the float 1.5",
        "2bad": "not a valid name",
        "cr0:": "register name, reserved",
        "{symbol: a}": "missing key 'size'",
        "5\n": "got the integer 5",
        "guest_reqest": "not a valid event",
        "dney": "not a valid action",
        "{write: cr0, read": "one trigger per entry",
        "#UD": "expected a string, got nothing",
        "off": "got the boolean off",
        "minute": "not a valid rate period",
    }
    for needle, words in expect.items():
        where = position(text, needle)
        if needle == "#UD":
            where = (where[0], where[1] - 1)  # the null value starts before the comment
        assert where in found, (needle, where, sorted(found))
        assert words in found[where].message, (needle, found[where].message)
    assert len(diags) == len(expect)
    assert "'x86_64'" in found[position(text, "x86-64")].hint
    assert "'guest_request'" in found[position(text, "guest_reqest")].hint
    assert "quote" in found[position(text, "off")].hint
    assert "quote" in found[position(text, "4.17")].hint
    assert '"#UD"' in found[(position(text, "#UD")[0], position(text, "#UD")[1] - 1)].hint


def test_choice_errors_give_one_message():
    text = "regions:\n  x: {from: {symbol: a}, to: {va: 1, size: 3}}\n  y: [a, {pa: 1}]\n"
    _, diags = parse(text)
    messages = [(d.span.line, d.span.col, d.message) for d in diags]
    assert len(messages) == 2, messages
    assert at(diags.items[0], text, "size: 3") and "unknown key 'size'" in diags.items[0].message
    assert at(diags.items[1], text, "{pa: 1}") and "missing key 'size'" in diags.items[1].message


def test_reserved_register_name_as_read_target():
    text = "rules:\n  - {on: {read: cr0}, do: [allow]}\n"
    _, diags = parse(text)
    (d,) = diags.items
    assert d.code == "PC201" and at(d, text, "cr0")
    assert "read trigger" in d.message and "idtr" in d.hint


def test_floats_are_refused_where_integers_belong():
    for snippet, needle in [
        ("constants: {A: 1.5}\n", "1.5"),
        ("regions: {r: {va: 0x1000, size: 4.0e+3}}\n", "4.0e+3"),
        ("regions: {r: {symbol: s, offset: .5, size: 8}}\n", ".5"),
        ("rules: [{on: {cpuid: {leaf: 7.0}}, do: [allow]}]\n", "7.0"),
        ("rules: [{on: smc, priority: 1.5, do: [allow]}]\n", "1.5"),
        ("rules: [{on: smc, do: [{limit: {rate: .inf, then: deny}}]}]\n", ".inf"),
    ]:
        tree, diags = parse(snippet)
        assert tree.items == []
        (d,) = diags.items
        assert d.code == "PC201" and at(d, snippet, needle), (snippet, d)
        assert "float" in d.message and "integer" in d.message
    # YAML 1.1 reads 1e3 and "2.5" as strings: they reach the expression parser, which says the same.
    for snippet, needle in [("regions: {r: {va: 0x1000, size: 1e3}}\n", "1e3"),
                            ("constants: {A: \"2.5\"}\n", "2.5")]:
        tree, diags = parse(snippet)
        (d,) = diags.items
        assert d.code == "PC114" and "float" in d.message and tree.items == []


def test_expression_errors_drop_the_item_and_name_it_broken():
    text = "policy: p\nconstants: {A: \"1 +\", B: 2}\nrules:\n  - {name: bad, on: smc, where: \"a ==\", do: [deny]}\n"
    tree, diags = parse(text)
    assert diags.has_errors
    assert [type(i).__name__ for i in tree.policy.items] == ["Const"]
    assert tree.broken_names == {"A", "bad"}


def test_optional_and_percpu_together_and_mixed_range_spaces():
    _, diags = parse("regions: {r: {symbol: s, optional: true, percpu: true, size: 8}}\n")
    assert codes(diags) == ["PC201"] and "optional and percpu" in diags.items[0].message
    _, diags = parse("regions: {r: {from: {va: 1}, to: {pa: 2}}}\n")
    assert codes(diags) == ["PC201"] and "range" in diags.items[0].message


# ---------------------------------------------------------------- safe loading

def billion_laughs(levels: int = 10, fanout: int = 10) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    lines.append(f"policy: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_fast_and_small():
    text = billion_laughs()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        tree, diags = parse(text)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert codes(diags) == ["PC202"]
    assert "alias expansion exceeds" in diags.items[0].message
    assert tree.items == []
    assert elapsed < 1.0
    assert peak < 20 * 1024 * 1024


def test_merge_keys_count_towards_the_expansion_bound():
    lines = ["a0: &a0 {k0: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]")
    lines.append("x: {<<: *a0, y: *a11}")
    start = time.perf_counter()
    _, diags = parse("\n".join(lines) + "\n")
    assert codes(diags) == ["PC202"] and time.perf_counter() - start < 1.0


def test_recursive_alias_is_refused():
    _, diags = parse("policy: &a [*a]\n")
    assert codes(diags) == ["PC202"]


def test_too_many_written_nodes_are_refused():
    text = "rules: [" + ", ".join(["1"] * (MAX_NODES + 10)) + "]\n"
    _, diags = parse(text)
    assert codes(diags) == ["PC202"]


def test_document_size_is_bounded():
    _, diags = parse("policy: p\n" + "#" * (yaml_form.MAX_DOCUMENT_BYTES + 1) + "\n")
    assert codes(diags) == ["PC202"]


@pytest.mark.parametrize("text", [
    "policy: " + "[" * 100 + "]" * 100 + "\n",
    "policy: " + "{a: " * 100 + "1" + "}" * 100 + "\n",
    "".join(" " * i + "k:\n" for i in range(200)) + " " * 200 + "k: 1\n",
    "policy: " + "[" * 100_000 + "\n",
])
def test_deep_nesting_is_refused(text):
    _, diags = parse(text)
    assert codes(diags) == ["PC203"], [(d.code, d.message) for d in diags]
    assert str(MAX_DEPTH) in diags.items[0].message


def test_deep_nesting_through_aliases_is_refused():
    nest = "[" * 40 + "1" + "]" * 40
    _, diags = parse(f"a: &a {nest}\npolicy: {'[' * 40}*a{']' * 40}\n")
    assert codes(diags) == ["PC203"]


def test_deeply_nested_expression_strings_are_refused():
    for expr in ["-" * 3000 + "1", "1" + "+1" * 3000, "(" * 3000 + "1" + ")" * 3000]:
        tree, diags = parse(f'constants: {{A: "{expr}"}}\n')
        if expr.startswith("("):
            assert not diags.items and tree.items == [S.Const("A", S.Num(1))]  # parentheses leave no trace
        else:
            assert codes(diags) == ["PC115"], [d.message for d in diags]


def test_duplicate_keys_are_reported_at_the_second_key():
    text = "policy: p\nmode: audit\nrules:\n  - {on: smc, do: [deny], on: cpuid}\nmode: enforce\n"
    tree, diags = parse(text)
    assert tree.items == []
    dups = only(diags, "PC204")
    assert len(dups) == 2
    assert at(dups[0], text, "on", 1) or at(dups[1], text, "on", 1)
    assert any(at(d, text, "mode", 1) for d in dups)
    assert all("line" in d.hint for d in dups)


def test_python_tags_are_refused_and_never_run(monkeypatch):
    import os
    import subprocess

    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(a) or 0)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: called.append(a))
    for text in [
        '!!python/object/apply:os.system ["echo hi"]\n',
        'policy: !!python/object/apply:os.system ["echo hi"]\n',
        "policy: !!python/object/new:subprocess.Popen [[echo, hi]]\n",
        "policy: !!python/name:os.system\n",
        "policy: p\nrules: !local [x]\n",
        "policy: !!binary aGk=\n",
        "policy: !!set {a, b}\n",
        "policy: !!omap [a: 1]\n",
        "!!python/object:__main__.X {a: 1}\n",
        "? !!python/tuple [1, 2]\n: x\n",
    ]:
        tree, diags = parse(text)
        assert "PC205" in codes(diags), (text, [(d.code, d.message) for d in diags])
        assert tree.items == []
    assert called == []


def test_standard_tags_are_allowed():
    tree, diags = parse("policy: !!str p\nconstants: {A: !!int '12', B: !!str 7}\n")
    assert not diags.items
    assert tree.policy.name == "p"
    assert tree.policy.items == [S.Const("A", S.Num(12)), S.Const("B", S.Num(7))]


def test_multiple_documents_are_refused():
    text = "policy: a\n---\npolicy: b\n"
    tree, diags = parse(text)
    (d,) = diags.items
    assert d.code == "PC205" and at(d, text, "---") and tree.items == []


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n", "---\n", "--- \n...\n"])
def test_empty_documents_say_so(text):
    tree, diags = parse(text)
    (d,) = diags.items
    assert d.code == "PC102" and "empty" in d.message and tree.items == []


@pytest.mark.parametrize("text, word", [
    ("- a\n- b\n", "a list"), ("hello\n", "scalar"), ("42\n", "scalar"), ("null\n", "scalar"),
])
def test_top_level_must_be_a_mapping(text, word):
    _, diags = parse(text)
    (d,) = diags.items
    assert d.code == "PC201" and "mapping" in d.message and word in d.message
    assert (d.span.line, d.span.col) == (1, 1)


def test_yaml_syntax_errors_have_positions():
    text = "policy: p\nrules:\n  - on: smc\n   do: [deny]\n"
    _, diags = parse(text)
    (d,) = diags.items
    assert d.code == "PC200" and d.span.line == 4
    _, diags = parse("policy: [a, b\n")
    assert codes(diags) == ["PC200"]
    _, diags = parse("policy: p\n\tmode: audit\n")
    (d,) = diags.items
    assert d.code == "PC200" and (d.span.line, d.span.col) == (2, 1) and "tabs" in d.hint
    _, diags = parse("policy: *nowhere\n")
    assert codes(diags) == ["PC200"] and "nowhere" in diags.items[0].message
    _, diags = parse("policy: a\x00b\n")
    (d,) = diags.items
    assert d.code == "PC200" and (d.span.line, d.span.col) == (1, 10)


def test_invalid_explicit_scalars():
    _, diags = parse("constants: {A: !!int zz}\n")
    assert codes(diags) == ["PC114"]
    _, diags = parse("constants: {A: " + "9" * 5000 + "}\n")
    assert codes(diags) == ["PC114"]
    _, diags = parse("constants: {A: !!bool maybe}\n")
    assert codes(diags) == ["PC205"]


# ---------------------------------------------------------------- never raises

def check_clean(text: str) -> None:
    diags = Diagnostics()
    result = parse_yaml_text(text, "h.yaml", diags)
    assert isinstance(result, S.PolicyFile)
    for d in diags:
        assert d.code in CODES
        assert d.span is None or (d.span.line >= 1 and d.span.col >= 1)
    if not diags.has_errors:
        yaml.safe_load(text)  # what we accepted, plain YAML accepts too


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text):
    check_clean(text)


YAMLISH = st.lists(st.sampled_from(list("abcdeonrwxy01:-_ ,[]{}&*!|>'\"#?.<=\t\n\\%@`~+()")
                                   + ["  ", "\n  ", "- ", ": ", "<<: ", "&a ", "*a", "!!str ", "---\n"]),
                   max_size=120).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_yamlish_text_never_raises(text):
    check_clean(text)


WORDS = ["policy", "target", "symbols", "mode", "include", "constants", "regions", "rules", "name", "on",
         "where", "priority", "do", "read", "write", "execute", "access", "cpuid", "leaf", "msr", "symbol",
         "offset", "size", "optional", "percpu", "va", "pa", "from", "to", "register", "deny", "allow", "pause",
         "disarm", "log", "alert", "limit", "rate", "per", "then", "feed", "with", "severity", "message",
         "hypervisor", "version", "arch", "cr0", "idtr", "LSTAR", "smc", "guest_request", "enforce", "audit",
         "xen", "x86_64", "high", "second", "#UD", "8 * N", "cleared(cr0.WP)", "a ==", "(((", "<<"]
SCALARS = st.one_of(st.sampled_from(WORDS), st.integers(-2**70, 2**70), st.booleans(), st.none(),
                    st.floats(allow_nan=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(WORDS), inner, max_size=4)), max_leaves=30)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(WORDS[:8]), VALUES, max_size=8), st.booleans())
def test_arbitrary_documents_never_raise(document, flow):
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)
    check_clean(text)


RULE_PARTS = st.fixed_dictionaries(
    {"on": st.one_of(st.sampled_from(["cpuid", "smc", "guest_request", "debug_exception"]),
                     st.dictionaries(st.sampled_from(["read", "write", "execute", "access", "cpuid"]), VALUES,
                                     min_size=1, max_size=1)),
     "do": st.lists(st.one_of(st.sampled_from(["allow", "deny", "pause", "disarm"]), VALUES), max_size=3)},
    optional={"where": SCALARS, "priority": SCALARS, "name": st.sampled_from(WORDS)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RULE_PARTS, max_size=4), st.dictionaries(st.sampled_from(WORDS), VALUES, max_size=3))
def test_near_valid_policies_never_raise(rules, regions):
    document = {"policy": "p", "rules": rules, "regions": regions}
    check_clean(yaml.safe_dump(document, allow_unicode=True))
