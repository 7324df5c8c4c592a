"""The broken-policy corpus (tests/broken): every realistic mistake gets the right diagnostic, at the right place.

Each case is a policy file whose leading comment lines say what the checker
must report:

    # expect: PC302 at 5:16 "did you mean 'sys_call_table'"

- `PCnnn` is the stable code (policyc.diagnostics.CODES);
- `at LINE:COL` the 1-based position (`at FILE:LINE:COL` when the diagnostic
  belongs to another file, FILE relative to the case: an include cycle is
  reported in the file that closes it); omitted only where the position is
  the reader's business (where an alias-expansion bound trips);
- the optional quoted text must occur in the message or the hint.

A case may have several `# expect:` lines: one run must report them all
(recovery), and no error that is not expected (no cascades). Warnings are
not required to be listed. Files that cannot hold a header (an empty file,
binary garbage) have it in a sidecar `FILE.expect`.

Files directly in tests/broken are cases. In subfolders, a file is a case
(a root under test) when it has `# expect:` lines, and a helper (included by
a case) when its first line is `# helper: ...`; anything else is an error in
the corpus itself.

Every case runs through the CLI entry point in-process (`policyc.cli.main`)
in all three formats; one subprocess run checks the whole directory through
the installed `policyc` command, to prove no traceback ever reaches stderr.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from policyc.cli import main
from policyc.diagnostics import CODES

REPO = Path(__file__).resolve().parent.parent
BROKEN = REPO / "tests" / "broken"
POLICY_SUFFIXES = (".vmi", ".yaml", ".yml")

_EXPECT = re.compile(
    r"#\s*expect:\s*(?P<code>PC\d{3})"
    r"(?:\s+at\s+(?:(?P<file>[^\s\"]+?):)?(?P<line>\d+):(?P<col>\d+))?"
    r'(?:\s+"(?P<text>.*)")?\s*$')


@dataclass(frozen=True)
class Expect:
    code: str
    file: Path  # resolved
    line: int | None
    col: int | None
    text: str | None

    def __str__(self) -> str:
        where = f" at {self.file.name}:{self.line}:{self.col}" if self.line else ""
        return f"{self.code}{where}" + (f' "{self.text}"' if self.text else "")


@dataclass(frozen=True)
class Case:
    path: Path
    expects: tuple[Expect, ...]

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix()


def _header_lines(path: Path) -> list[str]:
    sidecar = path.with_name(path.name + ".expect")
    if sidecar.exists():
        return sidecar.read_text(encoding="utf-8").splitlines()
    lines = []
    for raw in path.read_bytes().split(b"\n"):
        if not raw.lstrip().startswith(b"#"):
            break
        lines.append(raw.decode("utf-8", "replace").strip())
    return lines


def _expects(path: Path) -> tuple[Expect, ...]:
    out = []
    for line in _header_lines(path):
        if not re.match(r"#\s*expect:", line):
            continue
        m = _EXPECT.match(line)
        assert m, f"{path.name}: malformed header line {line!r}"
        assert m["code"] in CODES, f"{path.name}: {m['code']} is not a registered code"
        file = (path.parent / m["file"]).resolve() if m["file"] else path.resolve()
        out.append(Expect(m["code"], file, int(m["line"]) if m["line"] else None,
                          int(m["col"]) if m["col"] else None, m["text"]))
    return tuple(out)


def _corpus() -> tuple[list[Case], list[Path]]:
    """(cases, helpers). Raises on a file that is neither, so nothing is skipped silently."""
    cases, helpers = [], []
    for p in sorted(BROKEN.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in POLICY_SUFFIXES:
            continue
        expects = _expects(p)
        if expects:
            cases.append(Case(p, expects))
        elif p.parent != BROKEN and p.read_bytes().startswith(b"# helper:"):
            helpers.append(p)
        else:
            raise AssertionError(f"{p}: a corpus file with no '# expect:' header (or FILE.expect), "
                                 "and not a '# helper:' in a subfolder")
    return cases, helpers


CASES, HELPERS = _corpus()


def _run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(list(args))
    except BaseException as exc:  # noqa: BLE001 - any escape from the CLI is the bug under test
        out, err = capsys.readouterr()
        pytest.fail(f"policyc {' '.join(args)} raised {exc!r}\nstdout:\n{out}\nstderr:\n{err}")
    out, err = capsys.readouterr()
    return rc, out, err


def _same_file(reported: str | None, expected: Path) -> bool:
    return reported is not None and (REPO / reported).resolve() == expected


def _matches(d: dict, e: Expect) -> bool:
    if d["code"] != e.code or not _same_file(d.get("file"), e.file):
        return False
    if e.line is not None and (d.get("line"), d.get("column")) != (e.line, e.col):
        return False
    if e.text is not None and e.text not in d["message"] + " " + (d.get("hint") or ""):
        return False
    return True


def _show(diags: list[dict]) -> str:
    return "\n".join(f"  {d['severity']} {d['code']} {d.get('file')}:{d.get('line')}:{d.get('column')} "
                     f"{d['message']} | {d.get('hint')}" for d in diags) or "  (none)"


def _line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") + 1


# ---------------------------------------------------------------- the corpus itself

def test_corpus_is_big_and_varied():
    assert len(CASES) >= 30
    multi = [c for c in CASES if len(c.expects) >= 3]
    assert len(multi) >= 2, "at least two cases must report 3+ errors in one run"
    assert any(c.path.suffix == ".yaml" for c in multi), "one YAML case with 3+ errors"
    codes = {e.code for c in CASES for e in c.expects}
    for needed in ("PC101", "PC102", "PC110", "PC111", "PC112", "PC113", "PC115", "PC200", "PC201", "PC202",
                   "PC203", "PC204", "PC205", "PC300", "PC301", "PC302", "PC305", "PC306", "PC307", "PC308",
                   "PC400", "PC401", "PC402", "PC403", "PC404", "PC405", "PC406", "PC408", "PC411", "PC413",
                   "PC414", "PC415", "PC417", "PC418", "PC419"):
        assert needed in codes, f"no case expects {needed}"


def test_sidecars_belong_to_files():
    for sidecar in BROKEN.rglob("*.expect"):
        assert sidecar.with_suffix("").is_file(), f"{sidecar} has no policy file next to it"


def test_garbage_is_really_garbage():
    data = (BROKEN / "garbage.vmi").read_bytes()
    assert b"\x00" in data
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    sys.path.insert(0, str(BROKEN))
    try:
        import _make_garbage  # the committed bytes are what the generator makes
    finally:
        sys.path.remove(str(BROKEN))
    assert _make_garbage.garbage(0x5EED_0001) == data
    assert _make_garbage.garbage(0x5EED_0002) == (BROKEN / "garbage.yaml").read_bytes()


def test_the_escaping_include_targets_a_real_file_outside_the_corpus():
    text = (BROKEN / "include-escape.vmi").read_text(encoding="utf-8")
    target = (BROKEN / re.search(r'include "([^"]+)"', text)[1]).resolve()
    assert target.is_file() and not target.is_relative_to(BROKEN)


def test_helpers_are_included_by_a_case():
    included = set()
    for c in CASES:
        text = c.path.read_bytes().decode("utf-8", "replace")
        included |= {(c.path.parent / m).resolve() for m in re.findall(r'include "([^"]+)"', text)}
    for h in HELPERS:
        assert h.resolve() in included, f"{h} is included by no case"


def test_python_tag_is_never_run(capsys, monkeypatch):
    marker = Path("/tmp/pwned-by-policyc")
    text = (BROKEN / "yaml-python-tag.yaml").read_text(encoding="utf-8")
    assert f"touch {marker}" in text
    marker.unlink(missing_ok=True)
    monkeypatch.chdir(REPO)
    rc, out, err = _run(capsys, "check", "tests/broken/yaml-python-tag.yaml", "--format", "json")
    assert rc == 1
    assert not marker.exists(), "a YAML tag constructed an object and ran a command"


# ---------------------------------------------------------------- each case, in-process

@pytest.mark.parametrize("case", CASES, ids=[c.rel.removeprefix("tests/broken/") for c in CASES])
def test_broken_case_json(case: Case, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = _run(capsys, "check", case.rel, "--format", "json")
    assert "Traceback" not in out + err
    diags = json.loads(out)["diagnostics"]
    missing = [e for e in case.expects if not any(_matches(d, e) for d in diags)]
    assert not missing, ("expected " + ", ".join(map(str, missing)) + "\ngot:\n" + _show(diags))
    unexpected = [d for d in diags if d["severity"] == "error" and not any(_matches(d, e) for e in case.expects)]
    assert not unexpected, "errors nobody expected (a cascade?):\n" + _show(unexpected)
    assert rc == 1
    for d in diags:
        assert d["code"] in CODES
        assert d["severity"] in ("error", "warning", "note")
        assert d["message"].strip()
        if "line" in d:
            assert 1 <= d["line"] <= _line_count(REPO / d["file"]), d
            assert d["column"] >= 1, d


def _json_diags(capsys, rel: str) -> list[dict]:
    rc, out, err = _run(capsys, "check", rel, "--format", "json")
    return json.loads(out)["diagnostics"]


def _key(d: dict) -> tuple:
    return d["code"], d["severity"], d.get("file"), d.get("line"), d.get("column")


# The text and SARIF renderings must say what the JSON says; whether that is right is
# test_broken_case_json's business, so a checker bug fails one test, not three.

@pytest.mark.parametrize("case", CASES, ids=[c.rel.removeprefix("tests/broken/") for c in CASES])
def test_broken_case_text(case: Case, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    diags = _json_diags(capsys, case.rel)
    rc, out, err = _run(capsys, "check", case.rel)
    assert rc == 1
    assert "Traceback" not in out + err
    assert out == ""  # text goes to stderr
    for d in diags:
        assert f"{d['severity']}[{d['code']}]: {d['message']}" in err
        if "line" in d:
            assert f"--> {d['file']}:{d['line']}:{d['column']}" in err
    assert re.search(r"checked 1 policy: \d+ errors?, \d+ warnings?", err)


@pytest.mark.parametrize("case", CASES, ids=[c.rel.removeprefix("tests/broken/") for c in CASES])
def test_broken_case_sarif(case: Case, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    diags = _json_diags(capsys, case.rel)
    rc, out, err = _run(capsys, "check", case.rel, "--format", "sarif")
    assert rc == 1
    assert "Traceback" not in out + err
    log = json.loads(out)
    check_sarif_structure(log)
    results = log["runs"][0]["results"]
    assert len(results) == len(diags)
    level = {"error": "error", "warning": "warning", "note": "note"}
    for d, r in zip(diags, results):
        assert r["ruleId"] == d["code"] and r["level"] == level[d["severity"]]
        assert d["message"] in r["message"]["text"]
        if "line" in d:
            loc = r["locations"][0]["physicalLocation"]
            assert (REPO / loc["artifactLocation"]["uri"]).resolve() == (REPO / d["file"]).resolve()
            assert (loc["region"]["startLine"], loc["region"]["startColumn"]) == (d["line"], d["column"])


def check_sarif_structure(log: dict) -> None:
    """SARIF 2.1.0 as code-scanning UIs read it (structural; no schema download)."""
    assert log["version"] == "2.1.0"
    assert "sarif" in log.get("$schema", "") and "2.1.0" in log["$schema"]
    assert isinstance(log["runs"], list) and len(log["runs"]) == 1
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "policyc" and isinstance(driver.get("version"), str)
    rules = driver.get("rules", [])
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids))
    for r in rules:
        assert r["id"] in CODES and r["shortDescription"]["text"]
    for res in run["results"]:
        assert res["ruleId"] in CODES
        assert res["level"] in ("error", "warning", "note", "none")
        assert isinstance(res["message"]["text"], str) and res["message"]["text"]
        if "ruleIndex" in res:
            assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        for loc in res.get("locations", []):
            phys = loc["physicalLocation"]
            uri = phys["artifactLocation"]["uri"]
            assert isinstance(uri, str) and uri and "\\" not in uri
            region = phys["region"]
            assert isinstance(region["startLine"], int) and region["startLine"] >= 1
            assert region.get("startColumn", 1) >= 1
            if "endLine" in region:
                assert region["endLine"] >= region["startLine"]
                if region["endLine"] == region["startLine"] and "endColumn" in region:
                    assert region["endColumn"] >= region["startColumn"]


# ---------------------------------------------------------------- the whole corpus, as a user runs it

def _policyc_command() -> list[str]:
    exe = shutil.which("policyc")
    return [exe] if exe else [sys.executable, "-c", "import sys; from policyc.cli import main; sys.exit(main())"]


def test_whole_corpus_in_a_subprocess_never_shows_a_traceback(capsys, monkeypatch):
    proc = subprocess.run(_policyc_command() + ["check", "--format", "json", "tests/broken"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]
    diags = json.loads(proc.stdout)["diagnostics"]
    # A directory run reports what checking each case alone reports (whether that is right is
    # test_broken_case_json's business), and nothing about helpers on their own.
    monkeypatch.chdir(REPO)
    one_by_one = {_key(d) for case in CASES for d in _json_diags(capsys, case.rel)}
    assert {_key(d) for d in diags} == one_by_one
    case_files = {c.path.resolve() for c in CASES} | {e.file for c in CASES for e in c.expects}
    strays = [d for d in diags if d.get("file") and (REPO / d["file"]).resolve() not in case_files]
    assert not strays, _show(strays)
