"""docs/LANGUAGE.md and docs/SCENARIOS.md say what the code does: their examples are checked, their lists complete."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from policyc.arch import ARCHES
from policyc.authoring import keywords
from policyc.cli import main
from policyc.fmt import check_format

ROOT = Path(__file__).resolve().parent.parent
LANGUAGE = ROOT / "docs" / "LANGUAGE.md"
SCENARIOS = ROOT / "docs" / "SCENARIOS.md"
BLOCK = re.compile(r"^```vmi([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, dict[str, str], str]]:
    """(file name, options, text) of every ```vmi block, in order."""
    out = []
    for i, m in enumerate(BLOCK.finditer(LANGUAGE.read_text())):
        options = dict(o.split("=", 1) for o in m.group(1).split())
        out.append((options.get("file", f"example{i}.vmi"), options, m.group(2)))
    return out


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory):
    """Every block written next to the example symbol files, as a reader would save them."""
    where = tmp_path_factory.mktemp("language")
    for f in (ROOT / "examples" / "policies").iterdir():
        if f.is_file() and not f.name.endswith(".vmi") and not f.name.endswith(".yaml"):   # reload/: a folder
            shutil.copy(f, where / f.name)
    for name, _options, text in _blocks():
        (where / name).write_text(text)
    return where


ROOTS = [b for b in _blocks() if 'policy "' in b[2]]


@pytest.mark.parametrize("name,options,text", ROOTS, ids=[b[0] for b in ROOTS])
def test_each_example_checks_as_the_doc_says(name, options, text, examples_dir, capsys, monkeypatch):
    monkeypatch.chdir(examples_dir)
    code = main(["check", "--format", "json", name])
    errors = [d["code"] for d in json.loads(capsys.readouterr().out)["diagnostics"] if d["severity"] == "error"]
    if "fails" in options:
        assert code == 1 and options["fails"] in errors, errors
    else:
        assert code == 0 and errors == []


@pytest.mark.parametrize("name,options,text", _blocks(), ids=[b[0] for b in _blocks()])
def test_each_example_is_in_canonical_layout(name, options, text):
    formatted, changed = check_format(text, name)
    assert not changed, formatted


def test_every_construct_has_an_example():
    examples = "\n".join(text for _, _, text in _blocks())
    words = set(re.findall(r"[A-Za-z_?]+", examples))
    missing = [k for k in keywords() if k not in words]
    assert not missing, f"keywords of the grammar with no example in docs/LANGUAGE.md: {missing}"
    doc = LANGUAGE.read_text()
    assert all(f"`{arch}`" in doc for arch in ARCHES)
    grammar = (ROOT / "grammar" / "policy.lark").read_text()
    def plain(text: str) -> str:  # tree aliases and alignment are not the reader's business
        return re.sub(r"\s+", " ", re.sub(r"->\s*\w+", "", text))
    for rule in ("policy_block", "target", "symbols", "mode", "const", "include", "region", "rule", "?trigger",
                 "?action", "?expr", "?atom"):
        line = next(line for line in grammar.splitlines() if line.startswith(rule + ":"))
        assert plain(line).strip() in plain(doc), f"the grammar of '{rule}' is not quoted as the grammar has it"


def test_scenarios_doc_documents_every_step_field_and_ships_what_it_names():
    from policyc.runtime.sim import scenario

    doc = SCENARIOS.read_text()
    fields = {k for required, optional in scenario.OPS.values() for k in required + optional} | set(scenario._COMMON)
    assert not [f for f in sorted(fields) if f"`{f}`" not in doc], "undocumented step fields"
    assert not [op for op in scenario.OPS if f"`{op}`" not in doc], "undocumented operations"
    for path in (SCENARIOS, LANGUAGE, ROOT / "README.md"):
        text = path.read_text()
        assert "shared/" not in text, f"{path.name} points outside the repository"
        for named in re.findall(r"`((?:docs|examples|tests|grammar|policyc)/[\w./-]+)`", text):
            assert "*" in named or (ROOT / named).exists(), f"{path.name} names {named}, which is not shipped"


def test_one_missing_size_is_one_error_and_no_false_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi").read_text()
    broken = text.replace("symbol idt_table size 4096", "symbol idt_table").replace(
        '"linux-6.1.System.map"', f'"{ROOT / "examples" / "policies" / "linux-6.1.System.map"}"')
    assert broken.count("symbol idt_table\n") == 1
    (tmp_path / "p.vmi").write_text(broken)
    assert main(["check", "--format", "json", "p.vmi"]) == 1
    diagnostics = json.loads(capsys.readouterr().out)["diagnostics"]
    assert [d["code"] for d in diagnostics] == ["PC110"]  # no cascade, no "policy has no rules" (PC504)
    region_line = broken.splitlines().index("    region idt = symbol idt_table") + 1
    assert f"the region on line {region_line} is not finished (expected 'size')" == diagnostics[0]["hint"]
